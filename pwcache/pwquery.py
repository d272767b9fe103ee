"""`pwquery`: ask the password server directly, answers in getent's format.

Exit codes (as getent where it has one):
   0  found
   2  not found (the server said so)
  64  usage error (EX_USAGE)
  65  the server refused the request as malformed (EX_DATAERR)
  75  no server answered: temporary (EX_TEMPFAIL)
  77  denied: shadow needs the shadow key (EX_NOPERM)
  78  configuration error: the client configuration, a key file or a flag (EX_CONFIG)
"""

from __future__ import annotations

import argparse
import json
import sys

from pwmail.base.errors import EX_CONFIG

from .client import BadRequest, Client, Denied, Unavailable
from .config import ConfigError
from .protocol import Op

EXIT_FOUND, EXIT_NOTFOUND, EXIT_USAGE, EXIT_BADREQUEST, EXIT_UNAVAILABLE, EXIT_DENIED = 0, 2, 64, 65, 75, 77

DATABASES = {
    # name: (op by name, op by number, how to print)
    "passwd": (Op.PASSWD_BY_NAME, Op.PASSWD_BY_UID),
    "group": (Op.GROUP_BY_NAME, Op.GROUP_BY_GID),
    "initgroups": (Op.INITGROUPS, None),
    "shadow": (Op.SHADOW_BY_NAME, None),
    "mailhost": (Op.MAILHOST, None),
}


def render(db: str, key: str, result) -> str:
    if db in ("passwd", "group", "shadow"):
        return result.getent_line()
    if db == "initgroups":
        # getent initgroups prints the user and its gids
        return f"{key:<21}" + " ".join(str(g) for g in result)
    if db == "mailhost":
        return f"{key} {result.host}" + (" frozen" if result.frozen else "")
    raise AssertionError(db)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="pwquery",
        description="Query pwserver directly (not through NSS).",
        epilog=__doc__.split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--server",
        action="append",
        metavar="HOST:PORT",
        help="server to ask, repeat in priority order (default: from /etc/pwserver.conf)",
    )
    ap.add_argument(
        "--pwserver-conf", metavar="F", help="client configuration file (default $PWSERVER_CONF or /etc/pwserver.conf)"
    )
    ap.add_argument("--config", dest="pwserver_conf", help=argparse.SUPPRESS)  # its first spelling
    ap.add_argument("--timeout-ms", type=int, help="per-try timeout")
    ap.add_argument("--shadow-key", help="shadow key file (for `shadow`)")
    ap.add_argument("--network-key", help="network key file")
    ap.add_argument("database", choices=list(DATABASES) + ["stats", "ping"])
    ap.add_argument("keys", nargs="*", metavar="KEY", help="names or numeric ids")
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:
        return EXIT_USAGE if e.code else 0
    try:
        client = Client.from_config(
            args.pwserver_conf,
            servers=args.server,
            timeout_ms=args.timeout_ms,
            shadow_keyfile=args.shadow_key,
            keyfile=args.network_key,
        )
    except (ConfigError, OSError, ValueError) as e:  # a key file unreadable or malformed too
        print(f"pwquery: {e}", file=sys.stderr)
        return EX_CONFIG
    try:
        if args.database in ("stats", "ping"):
            result = client.query(Op.STATS if args.database == "stats" else Op.PING)
            if isinstance(result, dict):
                for k in sorted(result):
                    print(f"{k} {result[k]}")
            else:
                print(json.dumps(result))
            return EXIT_FOUND
        if not args.keys:
            print(f"pwquery: {args.database} needs at least one key (enumeration: use getent)", file=sys.stderr)
            return EXIT_USAGE
        by_name, by_number = DATABASES[args.database]
        rc = EXIT_FOUND
        for key in args.keys:
            if key.isdigit() and by_number is not None:
                op, arg = by_number, int(key)
            else:
                op, arg = by_name, key
            try:
                result = client.query(op, arg)
            except ValueError as e:  # the name cannot be a user name at all
                print(f"pwquery: {e}", file=sys.stderr)
                rc = EXIT_NOTFOUND if rc == EXIT_FOUND else rc
                continue
            if result is None:
                rc = EXIT_NOTFOUND if rc == EXIT_FOUND else rc
                continue
            print(render(args.database, key, result))
        return rc
    except Unavailable as e:
        print(f"pwquery: unavailable: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except Denied as e:
        print(f"pwquery: {e} (shadow needs --shadow-key, readable by root only)", file=sys.stderr)
        return EXIT_DENIED
    except BadRequest as e:
        print(f"pwquery: {e}", file=sys.stderr)
        return EXIT_BADREQUEST
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
