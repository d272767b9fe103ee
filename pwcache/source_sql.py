"""What pwserver reads from the user database (docs/database.md): the SQL
rendering its rows as the lines of the four sources the C loader reads,
and the settings of a database source (docs/pwserver.md, "A PostgreSQL
source"). No psycopg here: `pwmail db export` and the server's settings use
these without connecting.
"""

from __future__ import annotations

import re

SOURCE_DEFAULTS: dict = {
    "source": "",  # postgresql://... : follow that database instead of the files
    # seconds between tries to reconnect grow to this (from RECONNECT_FIRST, doubling)
    "source_reconnect_max": 10.0,
    # more pending changes than this are not applied one by one: a full load
    # from a new snapshot is cheaper (and goes through the reload guard)
    "source_full_reload_changes": 100_000,
}
SOURCE_SCHEMES = ("postgresql://", "postgres://")


def check_source_uri(value: str) -> str | None:
    """The settings check of `source`: empty, or a PostgreSQL URI."""
    if not value or value.startswith(SOURCE_SCHEMES):
        return None
    return "want a PostgreSQL URI (postgresql://[user@]host[:port]/dbname)"


# Each row of pwmail.users as its lines: shadow and mailhosts are NULL
# when the user has no password hash or no mailhost (`||` with NULL is NULL).
_OPT = "coalesce({}::text, '')"
_SHADOW_NUMBERS = ("last_change", "min_days", "max_days", "warn_days", "inactive_days", "expire_day", "shadow_flag")
USER_LINES = {
    "passwd": "name || ':x:' || uid || ':' || gid || ':' || gecos || ':' || home || ':' || shell",
    "shadow": "name || ':' || password_hash || ':' || " + " || ':' || ".join(_OPT.format(c) for c in _SHADOW_NUMBERS),
    "mailhosts": "name || ' ' || mailhost || CASE WHEN frozen THEN ' frozen' ELSE '' END",
}
# A row of pwmail.groups (as g) as its group(5) line, members in the order they were added.
GROUP_LINE = (
    "g.name || ':x:' || g.gid || ':' || coalesce((SELECT string_agg(m.user_name, ',' ORDER BY m.position) "
    "FROM pwmail.members m WHERE m.group_name = g.name), '')"
)
# The four sources whole: users in uid order, groups in gid order.
SOURCE_QUERIES = {
    "passwd": f"SELECT {USER_LINES['passwd']} FROM pwmail.users ORDER BY uid",
    "shadow": f"SELECT {USER_LINES['shadow']} FROM pwmail.users WHERE password_hash IS NOT NULL ORDER BY uid",
    "group": f"SELECT {GROUP_LINE} FROM pwmail.groups g ORDER BY g.gid",
    "mailhosts": f"SELECT {USER_LINES['mailhosts']} FROM pwmail.users WHERE mailhost IS NOT NULL ORDER BY uid",
}
# A whole source as one value, for pwserver's load: COPY sends a row a
# message, and at a million users the client's cost per message would be
# most of the load; one bytea, in COPY's binary format, is read in one go
# and holds the lines unescaped (copy_single_bytea). (string_agg takes the
# rows in the subquery's order: so PostgreSQL does it, though SQL does not promise it.)
SOURCE_COPIES = {
    name: f"COPY (SELECT convert_to(coalesce(string_agg(line || E'\\n', ''), ''), 'UTF8') FROM ({query}) s(line)) "
    "TO STDOUT (FORMAT binary)"
    for name, query in SOURCE_QUERIES.items()
}
_COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"


def copy_single_bytea(data: bytes) -> bytes:
    """The one bytea of COPY ... (FORMAT binary) of one row of one column
    (PostgreSQL docs, "Binary Format"): signature, flags, header extension,
    then the row (field count, length, bytes) and the trailer."""
    if not data.startswith(_COPY_SIGNATURE):
        raise ValueError("not COPY's binary format")
    ext = int.from_bytes(data[15:19], "big")
    row = 19 + ext
    fields = int.from_bytes(data[row : row + 2], "big", signed=True)
    length = int.from_bytes(data[row + 2 : row + 6], "big", signed=True)
    if fields != 1 or length < 0 or row + 6 + length > len(data):
        raise ValueError("not one row of one bytea")
    return data[row + 6 : row + 6 + length]


# Some users and groups now, by name (a batch of changes)
USERS_BY_NAME = (
    f"SELECT name, {USER_LINES['passwd']}, {USER_LINES['shadow']}, {USER_LINES['mailhosts']} "
    "FROM pwmail.users WHERE name = ANY(%s)"
)
GROUPS_BY_NAME = f"SELECT g.name, {GROUP_LINE} FROM pwmail.groups g WHERE g.name = ANY(%s)"
LAST_SEQ = "SELECT coalesce(max(seq), 0) FROM pwmail.changes"
CHANGES_AFTER = "SELECT seq, kind, op, name, old_name FROM pwmail.changes WHERE seq > %s ORDER BY seq LIMIT %s"
# Whether the log still holds what follows `last` (see log_kept)
LOG_AROUND = (
    "SELECT EXISTS (SELECT 1 FROM pwmail.changes WHERE seq <= %s), (SELECT min(seq) FROM pwmail.changes WHERE seq > %s)"
)

# COPY's text format escapes (PostgreSQL docs, "COPY ... File Formats")
_COPY_UNESCAPE = re.compile(rb"\\(.)")
_UNESCAPED = {b"\\": b"\\", b"t": b"\t", b"n": b"\n", b"r": b"\r", b"b": b"\b", b"f": b"\f", b"v": b"\v"}


def copy_unescape(data: bytes) -> bytes:
    """Rows of COPY ... TO STDOUT (text format) as the plain lines they
    hold; the escapes are self-delimiting, so a whole buffer of rows at once."""
    return _COPY_UNESCAPE.sub(lambda m: _UNESCAPED.get(m.group(1), m.group(1)), data) if b"\\" in data else data


def log_kept(last: int, older_kept: bool, first_after: int | None) -> bool:
    """Whether the change log still holds every change after `last`
    (LOG_AROUND's answer). Sites may prune its oldest rows: when a row at
    or below `last` is left, nothing after it went; otherwise the next row
    must be last + 1 (a gap is a pruned stretch, or numbers a rolled-back
    transaction drew: a full load is right for the one, harmless for the other)."""
    return older_kept or first_after is None or first_after == last + 1
