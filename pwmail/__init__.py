"""What every part of pwmail shares, in two layers (docs/layout in
DESIGN.md): `pwmail.base` at the bottom (settings, logging, errors,
HOST:PORT; imports nothing of ours), and on top the tools that reach every
part: the `pwmail` command (`pwmail.admin`), `pwmail.placement` (reports,
moves, rebalance) and `pwmail.testbed` (the namespaces test bed, the demo)."""
