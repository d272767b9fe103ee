"""`pwmail placement-report`: users, messages and bytes per storage server,
and how uneven they are.

Users and their hosts come from the source files (`--passwd` and
`--mailhosts`, default `[pwserver]` passwd and mailhosts; users missing
from the map get the `[placement]` default rule, as the server does) or
from a running password server (`--server HOST:PORT`: enumerates passwd
over TCP; needs `enumerate` allowed there). Bytes and messages come from
the Maildirs under each host's storage root (`--root HOST=DIR` or
`[move] roots`; hosts without a root known here are counted in users only).

Imbalance, per column: largest / mean - 1 (0 is perfectly even; 0.25 means
the fullest host holds 25% more than its share), with hosts' weights taken
into account when `[placement]` gives them (`--weights H:W,...` overrides).
`--strays` also walks every root for mailboxes whose user lives elsewhere
(left by a crash outside `pwmail move`, or by a misrouted delivery).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from dataclasses import asdict, dataclass, field

from delivery.layout import SCHEMES, MailboxLayout, check_user
from delivery.maildir import walk_maildirs
from pwmail.base.errors import ConfigError


@dataclass
class HostLoad:
    host: str
    weight: float = 1.0
    users: int = 0
    frozen: int = 0
    mailboxes: int = 0  # users with a Maildir on the root
    messages: int = 0
    bytes: int = 0
    root: str | None = None


@dataclass
class Report:
    hosts: list[HostLoad]
    imbalance: dict[str, float] = field(default_factory=dict)
    strays: list[tuple[str, str]] = field(default_factory=list)  # (host, path)

    def table(self) -> str:
        head = ["host", "weight", "users", "frozen", "mailboxes", "messages", "bytes", "root"]
        rows = [
            [
                h.host,
                f"{h.weight:g}",
                str(h.users),
                str(h.frozen),
                str(h.mailboxes),
                str(h.messages),
                str(h.bytes),
                h.root or "-",
            ]
            for h in self.hosts
        ]
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        out.append("")
        out.append(
            "imbalance (largest/mean - 1, by weight): " + ", ".join(f"{k} {v:.3f}" for k, v in self.imbalance.items())
        )
        if self.strays:
            out.append(f"{len(self.strays)} stray mailbox(es):")
            out += [f"  {host} {path}" for host, path in self.strays]
        return "\n".join(out)


def imbalance(values: list[float], weights: list[float]) -> float:
    """max over hosts of (value / expected share) - 1."""
    total, wsum = sum(values), sum(weights)
    if not total or not wsum:
        return 0.0
    return max(v / (total * w / wsum) for v, w in zip(values, weights)) - 1.0


def box_usage(box: pathlib.Path) -> tuple[int, int]:
    """(messages, bytes) of a Maildir, every folder."""
    from pwmail.placement.move import scan

    msgs = size = 0
    for key, (_, nbytes, _) in scan(box).items():
        size += nbytes
        if "msg/" in key:
            msgs += 1
    return msgs, size


def users_from_files(passwd: str, mailhosts: str | None) -> dict[str, tuple[str, bool]]:
    from pwcache import placement
    from pwmail.placement.move import MailhostsFile

    mapped = MailhostsFile(mailhosts).read() if mailhosts else {}
    rule = placement.PlacementRule.from_settings(placement.SECTION.load())
    out = {}
    with open(passwd) as f:
        for line in f:
            name = line.split(":", 1)[0].strip()
            if not name or name.startswith("#"):
                continue
            out[name] = mapped.get(name) or (rule.pick(name) or "", False)
    return out


def users_from_server(address: str) -> dict[str, tuple[str, bool]]:
    from pwcache.client import Client

    with Client([address], timeout_ms=5000) as c:
        return {e.name: (e.mailhost, False) for e in c.enumerate()}


def build(
    users: dict[str, tuple[str, bool]],
    roots: dict[str, str],
    scheme: str,
    weights: dict[str, float],
    bytes_too: bool = True,
    strays: bool = False,
) -> Report:
    loads: dict[str, HostLoad] = {}
    for host in list(weights) + sorted(roots):
        loads.setdefault(host, HostLoad(host, weights.get(host, 1.0), root=roots.get(host)))
    layouts = {h: MailboxLayout(r, scheme) for h, r in roots.items()}
    for name, (host, frozen) in users.items():
        h = loads.setdefault(host, HostLoad(host, weights.get(host, 1.0), root=roots.get(host)))
        h.users += 1
        h.frozen += frozen
        if bytes_too and host in layouts:
            try:
                box = layouts[host].path(name)
            except ValueError:
                continue
            if (box / "new").is_dir() or (box / "cur").is_dir():
                m, b = box_usage(box)
                h.mailboxes += 1
                h.messages += m
                h.bytes += b
    hosts = sorted(loads.values(), key=lambda h: h.host)
    report = Report(hosts)
    live = [h for h in hosts if h.users]
    w = [h.weight for h in live]
    report.imbalance["users"] = imbalance([h.users for h in live], w)
    if bytes_too:
        report.imbalance["messages"] = imbalance([h.messages for h in live], w)
        report.imbalance["bytes"] = imbalance([h.bytes for h in live], w)
    if strays:
        report.strays = find_strays(users, roots, scheme)
    return report


def find_strays(users: dict[str, tuple[str, bool]], roots: dict[str, str], scheme: str) -> list[tuple[str, str]]:
    """Maildirs under a root whose user is unknown or lives on another host
    (frozen users are being moved: their copies are not strays)."""
    out = []
    for host, root in sorted(roots.items()):
        layout = MailboxLayout(root, scheme)
        for box in walk_maildirs(root):
            name = os.path.basename(box)
            if name.startswith("."):
                continue  # a Maildir++ folder of the box above
            try:
                check_user(name)
                if layout.path(name) != pathlib.Path(box):
                    continue  # a hash level that doubles as a box, or a folder
            except ValueError:
                out.append((host, box))  # e.g. `user pwmove-old` left by a crash
                continue
            entry = users.get(name)
            if entry is None or (entry[0] != host and not entry[1]):
                out.append((host, box))
    return out


def main(argv: list[str]) -> int:
    from pwmail.base import settings
    from pwmail.genusers import parse_hosts
    from pwmail.placement.move import MoveError, layout_scheme, storage_roots

    ap = argparse.ArgumentParser(
        prog="pwmail placement-report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--passwd", metavar="F", help="passwd file (default [pwserver] passwd)")
    ap.add_argument("--mailhosts", metavar="F", help="mailhosts map (default [pwserver] mailhosts)")
    ap.add_argument("--server", metavar="HOST:PORT", help="ask this running pwserver instead of the files")
    ap.add_argument("--root", action="append", default=[], metavar="HOST=DIR", help="storage root of HOST (repeatable)")
    ap.add_argument("--layout", choices=SCHEMES, help="mailbox layout (default [delivery] layout or first3)")
    ap.add_argument("--weights", metavar="H:W,...", help="host weights (default [placement] hosts, else 1)")
    ap.add_argument("--users-only", action="store_true", help="do not read the Maildirs")
    ap.add_argument("--strays", action="store_true", help="list mailboxes on a host their user does not live on")
    ap.add_argument("--json", action="store_true", help="JSON instead of a table")
    args = ap.parse_args(argv)
    try:
        data = settings.load()
        roots = storage_roots(data, args.root)
        pw = data.get("pwserver", {})
        if args.server:
            users = users_from_server(args.server)
        else:
            passwd = args.passwd or pw.get("passwd")
            if not passwd:
                ap.error("give --passwd F or --server HOST:PORT (or passwd in [pwserver])")
            users = users_from_files(passwd, args.mailhosts or pw.get("mailhosts"))
        if args.weights:
            weights = dict(parse_hosts(args.weights))
        else:
            from pwcache.placement import PlacementRule

            hosts = data.get("placement", {}).get("hosts") or []
            weights = dict(PlacementRule.from_settings({"rule": "hash", "hosts": hosts}).hosts) if hosts else {}
        report = build(
            users, roots, layout_scheme(data, args.layout), weights, bytes_too=not args.users_only, strays=args.strays
        )
    except ConfigError:
        raise  # one line and EX_CONFIG (pwmail/admin.py)
    except (OSError, ValueError, MoveError) as e:
        print(f"pwmail placement-report: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(
            json.dumps(
                {"hosts": [asdict(h) for h in report.hosts], "imbalance": report.imbalance, "strays": report.strays},
                indent=1,
            )
        )
    else:
        print(report.table())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
