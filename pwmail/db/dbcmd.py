"""`pwmail db init|import|export DSN`: the schema, and whole sites between
the four files and the database (docs/database.md)."""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

from pwmail.base.errors import ConfigError

from . import files, transfer
from .connect import DbError, connect, describe, init_schema

PROG = "pwmail db"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__)
    sub = ap.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = sub.add_parser("init", help="create the schema (idempotent)")
    p.add_argument("dsn", metavar="DSN", help="libpq connection string or postgresql:// URI")
    p = sub.add_parser("import", help="load passwd/shadow/group/mailhosts files into the database")
    p.add_argument("dsn", metavar="DSN")
    p.add_argument("--passwd", required=True, metavar="F")
    p.add_argument("--shadow", metavar="F")
    p.add_argument("--group", metavar="F")
    p.add_argument("--mailhosts", metavar="F", help="'user host [frozen]' a line")
    p.add_argument("--replace", action="store_true", help="delete the users and groups the database holds first")
    p = sub.add_parser("export", help="write passwd, shadow, group and mailhosts from the database")
    p.add_argument("dsn", metavar="DSN")
    p.add_argument("--dir", required=True, metavar="D", help="folder for the four files (replaced atomically)")
    return ap


def _report_skipped(site: files.Site) -> None:
    for what, skipped in site.skipped.items():
        print(f"{PROG} import: skipped {skipped.count} {what} line(s) (first: {skipped.first})", file=sys.stderr)


def run(args: argparse.Namespace) -> str:
    t0 = time.monotonic()
    with connect(args.dsn, autocommit=True) as conn:
        if args.action == "init":
            init_schema(conn)
            return "schema pwmail ready"
        if args.action == "import":
            n, site = transfer.import_files(
                conn, args.passwd, args.shadow, args.group, args.mailhosts, replace=args.replace
            )
            _report_skipped(site)
            return (
                f"imported {n['users']:,} users, {n['groups']:,} groups, {n['members']:,} memberships "
                f"in {time.monotonic() - t0:.1f} s"
            )
        folder = pathlib.Path(args.dir)
        n = transfer.export_site(conn, folder)
        return f"wrote {', '.join(f'{k} ({v:,} lines)' for k, v in n.items())} to {folder}"


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    import psycopg

    try:
        print(f"{PROG} {args.action}: {run(args)}")
    except (DbError, transfer.ImportRefused, ConfigError, OSError) as e:
        print(f"{PROG} {args.action}: {e}", file=sys.stderr)
        return 1
    except psycopg.Error as e:
        print(f"{PROG} {args.action}: {describe(e)}", file=sys.stderr)
        return 1
    return 0
