"""Moving a whole site between the four files and the database with COPY
(`pwmail db import` and `pwmail db export`, docs/database.md)."""

from __future__ import annotations

import pathlib

from pwcache.source_sql import SOURCE_QUERIES, copy_unescape

from . import files
from .progress import Progress

BATCH = 20_000  # rows per COPY write: big enough to be cheap, small enough to draw progress
LOADED_TABLES = ("pwmail.groups", "pwmail.users", "pwmail.members")

USER_COLUMNS = (
    "name",
    "uid",
    "gid",
    "gecos",
    "home",
    "shell",
    "password_hash",
    "last_change",
    "min_days",
    "max_days",
    "warn_days",
    "inactive_days",
    "expire_day",
    "shadow_flag",
    "mailhost",
    "frozen",
)

FILE_MODES = {
    "passwd": files.PUBLIC_MODE,
    "shadow": files.SHADOW_MODE,
    "group": files.PUBLIC_MODE,
    "mailhosts": files.PUBLIC_MODE,
}

# COPY's text format escapes (PostgreSQL docs, "COPY ... File Formats")
_COPY_ESCAPE = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


class ImportRefused(Exception):
    """The database already holds a site (and --replace was not given)."""


def _copy_line(fields) -> str:
    """One row in COPY's text format (fields: str, or None for NULL)."""
    return "\t".join([_field(f) for f in fields])


def _field(value: str | None) -> str:
    if value is None:
        return "\\N"
    if "\\" in value or "\t" in value or "\r" in value or "\n" in value:  # rare: translate is slow
        return value.translate(_COPY_ESCAPE)
    return value


def _copy_rows(cur, sql: str, rows, progress: Progress) -> None:
    with cur.copy(sql) as copy:
        batch: list[str] = []
        for row in rows:
            batch.append(_copy_line(row))
            if len(batch) == BATCH:
                copy.write("\n".join(batch) + "\n")
                progress.advance(len(batch))
                batch = []
        if batch:
            copy.write("\n".join(batch) + "\n")
            progress.advance(len(batch))


def _user_rows(site: files.Site, users):
    no_shadow = [None] * (1 + files.SHADOW_NUMBERS)
    for row in users:
        host, frozen = site.mailhosts.get(row[0], (None, False))
        yield (*row, *site.shadow.get(row[0], no_shadow), host, "t" if frozen else "f")


def _drop_keys(cur) -> list[str]:
    """Drops the keys, indexes and foreign keys of the loaded tables and
    returns the statements that put them back, taken from the catalog (so
    schema.sql stays their one definition). Built once over the loaded rows,
    they cost a fraction of a million index insertions and foreign-key
    checks made row by row; the import's transaction holds the tables
    meanwhile (readers wait for its commit)."""
    tables = list(LOADED_TABLES)
    constraints = cur.execute(
        "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid), contype = 'f' FROM pg_constraint "
        "WHERE conrelid = ANY (%s::regclass[]) AND contype IN ('f', 'p', 'u') ORDER BY contype = 'f' DESC",
        (tables,),
    ).fetchall()
    indexes = cur.execute(
        "SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid) FROM pg_index i "
        "WHERE indrelid = ANY (%s::regclass[]) AND NOT EXISTS (SELECT 1 FROM pg_constraint c "
        "  WHERE c.conindid = i.indexrelid AND c.contype IN ('p', 'u'))",
        (tables,),
    ).fetchall()
    for table, name, _, _ in constraints:
        cur.execute(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')
    for index, _ in indexes:
        cur.execute(f"DROP INDEX {index}")
    keys = [f'ALTER TABLE {t} ADD CONSTRAINT "{n}" {d}' for t, n, d, fk in reversed(constraints) if not fk]
    foreign = [f'ALTER TABLE {t} ADD CONSTRAINT "{n}" {d}' for t, n, d, fk in reversed(constraints) if fk]
    return keys + [d for _, d in indexes] + foreign


def _count_lines(path: str | None, also: bytes = b"") -> int:
    """Lines (and `also` bytes) in a file: the progress bar's total."""
    if not path:
        return 0
    with open(path, "rb") as f:
        data = f.read()
    return data.count(b"\n") + (data.count(also) if also else 0)


def import_files(
    conn,
    passwd: str,
    shadow: str | None = None,
    group: str | None = None,
    mailhosts: str | None = None,
    replace: bool = False,
    stream=None,
) -> tuple[dict, files.Site]:
    """Loads a site from its files in one transaction: all of it or nothing.
    A database that holds users or groups already is refused unless
    `replace`, which deletes them first (in the same transaction: readers
    and followers see the old site or the new one). Returns the counts and
    the Site (its `skipped` says what was left out)."""
    site = files.read_side_files(shadow, mailhosts)
    progress = Progress(_count_lines(passwd) + _count_lines(group, b","), "importing", stream)
    with conn.transaction(), conn.cursor() as cur:
        held = cur.execute(
            "SELECT (SELECT count(*) FROM pwmail.users), (SELECT count(*) FROM pwmail.groups)"
        ).fetchone()
        if any(held) and not replace:
            raise ImportRefused(
                f"the database holds {held[0]} users and {held[1]} groups already (--replace deletes them first)"
            )
        if replace:
            cur.execute("DELETE FROM pwmail.members; DELETE FROM pwmail.users; DELETE FROM pwmail.groups")
        restore = _drop_keys(cur)
        with files.opened(passwd) as f:
            _copy_rows(
                cur,
                f"COPY pwmail.users ({', '.join(USER_COLUMNS)}) FROM STDIN",
                _user_rows(site, files.passwd_rows(site, f)),
                progress,
            )
        files.drop_orphans(site)
        if group:
            with files.opened(group) as f:
                files.parse_group(site, f, site.names)
        _copy_rows(cur, "COPY pwmail.groups (name, gid) FROM STDIN", site.groups, progress)
        _copy_rows(cur, "COPY pwmail.members (group_name, user_name) FROM STDIN", site.members, progress)
        for statement in restore:
            cur.execute(statement)
    progress.finish()
    return {"users": len(site.names), "groups": len(site.groups), "members": len(site.members)}, site


def export_site(conn, folder: pathlib.Path) -> dict[str, int]:
    """Writes passwd, shadow, group and mailhosts into `folder` from one
    snapshot of the database; the four files replace the old ones together
    at the end (files.StagedFiles). Returns the lines written per file.
    The SELECTs are the ones pwserver loads a database source with."""
    staged = files.StagedFiles(folder)
    counts: dict[str, int] = {}
    try:
        with conn.transaction(), conn.cursor() as cur:
            cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            for name, query in SOURCE_QUERIES.items():
                n = 0
                with staged.open(name, FILE_MODES[name]) as out, cur.copy(f"COPY ({query}) TO STDOUT") as copy:
                    for row in copy:
                        out.write(copy_unescape(bytes(row)))
                        n += 1
                counts[name] = n
        staged.commit()
    except BaseException:
        staged.abort()
        raise
    return counts
