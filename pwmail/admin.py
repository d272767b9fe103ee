"""`pwmail`: the admin tool. Each subcommand lives in the module of the part
it belongs to; this file only maps names to them, imported on use so that
one broken part does not take the others down."""

from __future__ import annotations

import importlib
import sys

from pwmail.base.errors import exit_on_config_error

# name -> (module, function, one-line help). The function takes argv (list)
# and returns an exit code.
SUBCOMMANDS = {
    "gen-users": ("pwmail.genusers", "main", "generate synthetic passwd/shadow/group/mailhosts files"),
    "gen-key": ("pwcache.keys", "main", "write a new network or shadow key file (mode 0600)"),
    "nss": ("nss_module.install", "main", "install/uninstall libnss_pwserver.so.2 and the nsswitch.conf lines"),
    "demo": ("pwmail.testbed.demo", "main", "run the whole system on this machine and show it working"),
    "hash-report": ("pwmail.placement.hashreport", "main", "compare mailbox directory hashing schemes on login names"),
    "placement-report": ("pwmail.placement.report", "main", "users and bytes per storage server, and the imbalance"),
    "move": ("pwmail.placement.move", "main", "move a mailbox to another storage server, live (no mail lost)"),
    "rebalance": ("pwmail.placement.move", "rebalance_main", "move the mailboxes a new storage server should hold"),
    "status": ("pwmail.status", "main", "are the password servers, stores and proxies up (exit 0 when all is well)"),
    "db": ("pwmail.db.dbcmd", "main", "the user database: init the schema, import or export the four files"),
    "user": ("pwmail.db.usercmd", "main", "add, change, freeze or delete one user in the database"),
}


def usage() -> str:
    lines = ["usage: pwmail SUBCOMMAND [ARGS...]", "", "subcommands:"]
    for name, (_, _, text) in SUBCOMMANDS.items():
        lines.append(f"  {name:<18} {text}")
    lines.append("")
    lines.append("`pwmail SUBCOMMAND --help` tells more.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"pwmail: unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, func, _ = SUBCOMMANDS[name]
    # a configuration mistake in any subcommand: one line and EX_CONFIG
    return exit_on_config_error(f"pwmail {name}", lambda: getattr(importlib.import_module(module), func)(rest))


if __name__ == "__main__":
    sys.exit(main())
