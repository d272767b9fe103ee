"""`pwmail user [--db DSN] ACTION NAME ...`: day-to-day changes to one user
in the database (docs/database.md). Every change is one transaction, logged
by the schema's triggers, so a following pwserver sees it.

Passwords are never taken from the command line (they would show in `ps`
and shell histories): `--password-stdin` reads one line from standard
input, else a terminal is asked twice. They are stored as yescrypt hashes
(libxcrypt, the binding pop3d checks them with: pop/crypt.py).
"""

from __future__ import annotations

import argparse
import getpass
import re
import sys
import time

from delivery import config as delivery_config
from delivery.layout import MailboxLayout
from pop import crypt
from pwmail.base.errors import ConfigError

from .connect import DbError, connect, describe, load_settings
from .files import valid_name

PROG = "pwmail user"
NOT_FOUND = 2  # exit code: no such user (as pwquery's)
DAY = 86400
# shadow(5) aging of new users, as useradd and gen-users write them
NEW_MIN_DAYS, NEW_MAX_DAYS, NEW_WARN_DAYS = 0, 99999, 7
LOCKED = "!"  # password hash of a user added without a password: no login

SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"(\d+)\s*([KMGT]?)i?B?", re.I)


class UserError(Exception):
    """A mistake in what was asked; str() is the line for stderr."""

    def __init__(self, text: str, code: int = 1) -> None:
        super().__init__(text)
        self.code = code


def parse_size(text: str) -> int:
    """Bytes from `500M`, `2G`, `1048576` (binary units)."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise UserError(f"not a size: {text!r} (bytes, or a number with K, M, G or T)")
    return int(m.group(1)) * SIZE_UNITS[m.group(2).upper()]


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("true", "false", "yes", "no", "1", "0"):
        raise UserError(f"not true or false: {text!r}")
    return value in ("true", "yes", "1")


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UserError(f"not a number: {text!r}") from None


def _optional(convert):
    return lambda text: None if text == "" else convert(text)


# `set NAME key=value`: key -> (column, conversion). An empty value clears
# the optional ones (mailhost: back to the default rule; quota: none). The
# password is not here: `passwd` reads it from stdin or a terminal.
SETTABLE = {
    "name": ("name", str),
    "uid": ("uid", _int),
    "gid": ("gid", _int),
    "gecos": ("gecos", str),
    "home": ("home", str),
    "shell": ("shell", str),
    "mailhost": ("mailhost", _optional(str)),
    "frozen": ("frozen", _bool),
    "quota": ("quota_bytes", _optional(parse_size)),
    "expire_day": ("expire_day", _optional(_int)),
}


def read_password(from_stdin: bool, stdin=None) -> str:
    """The new password: one line of stdin, or asked twice on the terminal."""
    stdin = stdin or sys.stdin
    if from_stdin or not stdin.isatty():
        phrase = stdin.readline().rstrip("\r\n")
    else:
        phrase = getpass.getpass("New password: ")
        if getpass.getpass("Again: ") != phrase:
            raise UserError("the passwords differ")
    if not phrase:
        raise UserError("empty password")
    if len(phrase.encode("utf-8")) > crypt.MAX_PASSWORD:
        raise UserError(f"password longer than {crypt.MAX_PASSWORD} bytes")
    return phrase


def today() -> int:
    return int(time.time() // DAY)


def _parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: `--password X` must not pass for `--password-stdin`
    ap = argparse.ArgumentParser(
        prog=PROG, description=__doc__, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--db", metavar="DSN", help="database (default: [db] dsn in /etc/pwmail.toml, then libpq's)")
    sub = ap.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, allow_abbrev=False)
        p.add_argument("name", metavar="NAME")
        return p

    p = action("add", "add a user")
    p.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    p.add_argument("--mailhost", metavar="H", help="storage host (default: pwserver's placement rule)")
    p.add_argument("--quota", metavar="Q", type=parse_size, help="mailbox quota, e.g. 500M or 2G")
    p.add_argument("--uid", type=int, metavar="N", help="default: the next free uid from [db] first_uid")
    p.add_argument("--gid", type=int, metavar="N", help="primary group (default: [db] gid)")
    p.add_argument("--gecos", default="", metavar="TEXT")
    p.add_argument("--home", metavar="DIR", help="default: the mailbox path ([delivery] root and layout)")
    p.add_argument("--shell", metavar="PATH", help="default: [db] shell")
    p.add_argument("--no-password", action="store_true", help="add the user locked (no password yet)")
    p = action("passwd", "set the password (from stdin or a terminal prompt)")
    p.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    action("del", "delete a user (and their group memberships)")
    action("show", "print a user")
    action("freeze", "freeze the mailbox (deliveries deferred, POP refused: docs/moving.md)")
    action("unfreeze", "unfreeze the mailbox")
    p = action("set", "change fields: " + ", ".join(SETTABLE))
    p.add_argument("pairs", nargs="+", metavar="KEY=VALUE")
    return ap


def _changed(cur, name: str) -> None:
    if cur.rowcount == 0:
        raise UserError(f"no such user: {name}", NOT_FOUND)


def add(conn, args) -> str:
    if not valid_name(args.name):
        raise UserError(
            f"{args.name!r}: the name cannot be a mailbox name (printable ASCII without space, "
            "'/' or ':', not starting with '.', '+' or '-', at most 255 characters)"
        )
    if args.no_password and args.password_stdin:
        raise UserError("--no-password and --password-stdin exclude each other")
    hashed = LOCKED if args.no_password else crypt.hash_password(read_password(args.password_stdin))
    cfg = load_settings()
    delivery = delivery_config.load()
    home = args.home or str(MailboxLayout(delivery["root"], delivery["layout"]).path(args.name))
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("SELECT pwmail.log_lock()")  # no other add picks the same free uid meanwhile
        uid = args.uid
        if uid is None:
            uid = cur.execute(
                "SELECT greatest(coalesce(max(uid) + 1, %(f)s), %(f)s) FROM pwmail.users WHERE uid >= %(f)s",
                {"f": int(cfg["first_uid"])},
            ).fetchone()[0]
        cur.execute(
            "INSERT INTO pwmail.users (name, uid, gid, gecos, home, shell, password_hash, last_change, "
            "min_days, max_days, warn_days, mailhost, quota_bytes) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (
                args.name,
                uid,
                args.gid if args.gid is not None else int(cfg["gid"]),
                args.gecos,
                home,
                args.shell or cfg["shell"],
                hashed,
                today(),
                NEW_MIN_DAYS,
                NEW_MAX_DAYS,
                NEW_WARN_DAYS,
                args.mailhost,
                args.quota,
            ),
        )
    return f"{args.name} added (uid {uid})"


def passwd(conn, args) -> str:
    hashed = crypt.hash_password(read_password(args.password_stdin))
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(
            "UPDATE pwmail.users SET password_hash = %s, last_change = %s WHERE name = %s", (hashed, today(), args.name)
        )
        _changed(cur, args.name)
    return f"password of {args.name} changed"


def delete(conn, args) -> str:
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("DELETE FROM pwmail.users WHERE name = %s", (args.name,))
        _changed(cur, args.name)
    return f"{args.name} deleted"


def update(conn, name: str, values: dict) -> None:
    """One UPDATE of the given columns (names from SETTABLE only)."""
    sets = ", ".join(f"{column} = %s" for column in values)
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(f"UPDATE pwmail.users SET {sets} WHERE name = %s", (*values.values(), name))
        _changed(cur, name)


def set_fields(conn, args) -> str:
    values = {}
    for pair in args.pairs:
        key, eq, value = pair.partition("=")
        if not eq or key not in SETTABLE:
            raise UserError(
                f"{pair!r}: expected KEY=VALUE with KEY one of {', '.join(SETTABLE)} "
                "(the password: `pwmail user passwd NAME`)"
            )
        column, convert = SETTABLE[key]
        values[column] = convert(value)
    update(conn, args.name, values)
    return f"{args.name}: {', '.join(args.pairs)}"


def freeze(conn, args) -> str:
    update(conn, args.name, {"frozen": args.action == "freeze"})
    return f"{args.name} {'frozen' if args.action == 'freeze' else 'unfrozen'}"


def show(conn, args) -> str:
    with conn.cursor() as cur:
        row = cur.execute(
            "SELECT name, uid, gid, gecos, home, shell, mailhost, frozen, quota_bytes, "
            "password_hash, last_change, expire_day, "
            "ARRAY(SELECT group_name FROM pwmail.members m WHERE m.user_name = u.name "
            "      ORDER BY position) "
            "FROM pwmail.users u WHERE name = %s",
            (args.name,),
        ).fetchone()
    if row is None:
        raise UserError(f"no such user: {args.name}", NOT_FOUND)
    keys = (
        "name",
        "uid",
        "gid",
        "gecos",
        "home",
        "shell",
        "mailhost",
        "frozen",
        "quota",
        "password",
        "last_change",
        "expire_day",
        "groups",
    )
    values = dict(zip(keys, row, strict=True))
    # the hash itself stays in the database: only whether one is usable, and its method
    values["password"] = (
        "set (" + values["password"].split("$")[1] + ")"
        if crypt.usable_hash(values["password"])
        else "none"
        if values["password"] is None
        else "locked"
    )
    values["groups"] = ",".join(values["groups"])
    return "\n".join(
        f"{k}={'' if v is None else str(v).lower() if isinstance(v, bool) else v}" for k, v in values.items()
    )


ACTIONS = {
    "add": add,
    "passwd": passwd,
    "del": delete,
    "show": show,
    "freeze": freeze,
    "unfreeze": freeze,
    "set": set_fields,
}


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    import psycopg

    where = f"{PROG} {args.action}"
    try:
        with connect(args.db, autocommit=True) as conn:
            text = ACTIONS[args.action](conn, args)
    except UserError as e:
        print(f"{where}: {e}", file=sys.stderr)
        return e.code
    except (DbError, ConfigError, crypt.CryptError) as e:
        print(f"{where}: {e}", file=sys.stderr)
        return 1
    except psycopg.Error as e:
        print(f"{where}: {args.name}: {describe(e)}", file=sys.stderr)
        return 1
    print(text if args.action == "show" else f"{where}: {text}")
    return 0
