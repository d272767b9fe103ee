"""Connecting to the user database and saying what went wrong in one line.

The DSN comes from the command line, else `dsn` in `[db]` of
/etc/pwmail.toml, else libpq's own defaults and environment (PGHOST,
PGDATABASE, ~/.pgpass...). Constraint violations are turned into sentences
named after the constraint (schema.sql) instead of a PostgreSQL dump.
"""

from __future__ import annotations

import importlib.resources

from pwmail.base import settings

DEFAULTS = {
    "dsn": "",  # libpq connection string or URI; "" = libpq's defaults and PG* variables
    "connect_timeout": 10,  # seconds
    "first_uid": 10000,  # `pwmail user add` without --uid: the next free uid from here
    "gid": 10000,  # primary group of new users (gen-users' mailusers)
    "shell": "/usr/sbin/nologin",  # login shell of new users
}

# constraint name (schema.sql) -> what it means to the person who typed the command
CONSTRAINT_TEXT = {
    "users_name_key": "a user of that name exists",
    "users_mailbox_key": "a user of that name in other letter case exists (they would share one mailbox)",
    "users_uid_key": "that uid belongs to another user",
    "users_name_valid": "the name cannot be a mailbox name (printable ASCII without space, '/' or ':', "
    "not starting with '.', '+' or '-', at most 255 characters)",
    "users_uid_range": "uid out of range 0..4294967294",
    "users_gid_range": "gid out of range 0..4294967294",
    "users_fields_valid": "gecos, home, shell and password hash may not hold ':' or line ends",
    "users_mailhost_valid": "the mailhost must be 1 to 255 printable ASCII characters without space",
    "users_frozen_needs_mailhost": "only a user with a mailhost can be frozen",
    "users_quota_valid": "the quota must not be negative",
    "groups_name_key": "a group of that name exists",
    "groups_gid_key": "that gid belongs to another group",
    "groups_name_valid": "the group name cannot be a mailbox name",
    "groups_gid_range": "gid out of range 0..4294967294",
    "members_key": "the user is in that group already",
    "members_group_name_fkey": "no such group",
    "members_user_name_fkey": "no such user",
}


class DbError(Exception):
    """A database operation failed; str() is one line for stderr."""


def schema_sql() -> str:
    return importlib.resources.files("pwmail.db").joinpath("schema.sql").read_text(encoding="utf-8")


def load_settings() -> dict:
    """[db] of /etc/pwmail.toml over DEFAULTS."""
    return settings.section("db", DEFAULTS)


def resolve_dsn(dsn: str | None) -> tuple[str, int]:
    cfg = load_settings()
    return (dsn if dsn is not None else cfg["dsn"]), int(cfg["connect_timeout"])


def describe(exc: Exception) -> str:
    """One line for a psycopg error."""
    import psycopg

    diag = getattr(exc, "diag", None)
    constraint = diag.constraint_name if diag is not None else None
    if constraint in CONSTRAINT_TEXT:
        return CONSTRAINT_TEXT[constraint] + (f" ({diag.message_detail})" if diag.message_detail else "")
    if isinstance(exc, psycopg.OperationalError):
        return "cannot reach the database: " + " ".join((str(exc).strip().splitlines() or ["?"])[0].split())
    if isinstance(exc, psycopg.errors.UndefinedTable):
        return "no pwmail schema in this database: run `pwmail db init DSN` first"
    text = (diag.message_primary if diag is not None and diag.message_primary else str(exc)).strip()
    return " ".join(text.split())


def connect(dsn: str | None = None, autocommit: bool = False):
    """A psycopg connection; DbError with one line when it cannot be had."""
    import psycopg  # on use: the other `pwmail` subcommands do not need it

    dsn, timeout = resolve_dsn(dsn)
    try:
        return psycopg.connect(dsn, autocommit=autocommit, connect_timeout=timeout)
    except psycopg.Error as e:
        raise DbError(describe(e)) from e


def init_schema(conn) -> None:
    """Creates or completes the schema; idempotent (schema.sql)."""
    with conn.transaction():
        conn.execute(schema_sql())
