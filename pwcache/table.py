"""Thin wrapper over the C table (pwcache/_csrc/pw_table.h).

Checks types and lengths, turns return codes into exceptions and frees C
memory explicitly (context managers). Lookups return the packed msgpack
record exactly as the server sends it (docs/protocol.md, "Records").
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from pwcache._pwtable import ffi, lib
from pwcache.placement import PlacementRule

MAX_NAME = 255
MAX_ID = 2**32 - 2
_ERRCAP = 512
# enum pwt_source, in order
SKIP_SOURCES = ("passwd", "shadow", "group", "mailhosts")


class TableError(Exception):
    """A table could not be built."""


# pwt_apply's kinds of change: a line as in that source, or a name to delete.
CHANGE_KINDS = {
    "passwd": lib.PWT_CH_PASSWD,
    "shadow": lib.PWT_CH_SHADOW,
    "group": lib.PWT_CH_GROUP,
    "mailhosts": lib.PWT_CH_MAILHOSTS,
    "del_user": lib.PWT_CH_DEL_USER,
    "del_group": lib.PWT_CH_DEL_GROUP,
}
# What became of each change (pwt_change_status).
CHANGE_STATUS = {
    lib.PWT_APPLIED: "applied",
    lib.PWT_REFUSED_BAD: "bad",  # malformed, as that line in a file would be
    lib.PWT_REFUSED_UNKNOWN: "unknown",  # no such user or group
    lib.PWT_REFUSED_DUP_ID: "dup_id",  # the uid or gid is another's
}

Change = tuple[str, "str | bytes"]  # (kind, line or name)


def apply_changes_to(ptr, changes: Iterable[Change], rule: PlacementRule | None = None):
    """Applies changes to a copy of the C table `ptr` (ptr is unchanged).
    Returns (the new C table, each change's status from CHANGE_STATUS)."""
    items = list(changes)
    arr = ffi.new("pwt_change[]", max(len(items), 1))
    keep = []  # the texts stay alive for the call
    for i, item in enumerate(items):
        kind, text = item
        if kind not in CHANGE_KINDS:
            raise ValueError(f"unknown change kind {kind!r} (one of {', '.join(CHANGE_KINDS)})")
        raw = _name_bytes(text)
        buf = ffi.new("char[]", raw)
        keep.append(buf)
        arr[i].kind, arr[i].text, arr[i].len = CHANGE_KINDS[kind], buf, len(raw)
    status = ffi.new("int[]", max(len(items), 1))
    err = ffi.new("char[]", _ERRCAP)
    crule = CRule(rule) if rule is not None else None
    try:
        new = lib.pwt_apply(ptr, arr, len(items), crule.ptr if crule else ffi.NULL, status, err, _ERRCAP)
    finally:
        if crule:
            crule.close()
    if new == ffi.NULL:
        raise MemoryError(ffi.string(err).decode(errors="replace"))
    return new, [CHANGE_STATUS[status[i]] for i in range(len(items))]


def fold_table(ptr, rule: PlacementRule | None = None):
    """A new C table holding ptr's records in a fresh base, no delta."""
    return Table._build(lambda crule, err: lib.pwt_fold(ptr, crule, err, _ERRCAP), rule).detach()


class CHandle:
    """A C object owned by Python, freed by close() or at the end of a
    with block (not left to the garbage collector)."""

    what = "object"

    def __init__(self, ptr):
        if ptr == ffi.NULL:
            raise MemoryError(f"cannot allocate the C {self.what}")
        self._ptr = ptr

    @property
    def ptr(self):
        if self._ptr is None:
            raise ValueError(f"{self.what} is closed")
        return self._ptr

    def _release(self, ptr) -> None:
        raise NotImplementedError

    def close(self) -> None:
        if self._ptr is not None:
            ptr, self._ptr = self._ptr, None
            self._release(ptr)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CRule(CHandle):
    """A PlacementRule handed to C (pwpl_rule)."""

    what = "placement rule"

    def __init__(self, rule: PlacementRule):
        super().__init__(lib.pwpl_new(lib.PWPL_HASH if rule.kind == "hash" else lib.PWPL_RANGES))
        try:
            for host, weight in rule.hosts:
                raw = host.encode()
                if lib.pwpl_add_host(self._ptr, raw, len(raw), weight) < 0:
                    raise TableError(f"placement: cannot add host {host!r}")
            for first, last, host in rule.ranges:
                if lib.pwpl_add_range(self._ptr, first, last, host) < 0:
                    raise TableError(f"placement: cannot add range {first}-{last}")
        except BaseException:
            self.close()
            raise

    def pick(self, name: str | bytes) -> int:
        raw = _name_bytes(name)
        return lib.pwpl_pick(self.ptr, raw, len(raw))

    def _release(self, ptr) -> None:
        lib.pwpl_free(ptr)


def _name_bytes(name: str | bytes) -> bytes:
    if isinstance(name, str):
        return name.encode("utf-8", "surrogatepass")
    if isinstance(name, (bytes, bytearray, memoryview)):
        return bytes(name)
    raise TypeError(f"name must be str or bytes, not {type(name).__name__}")


def _check_id(value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"id must be int, not {type(value).__name__}")
    if not 0 <= value <= MAX_ID:
        raise ValueError(f"id {value} out of range 0..{MAX_ID}")
    return value


def _path_arg(path: str | os.PathLike | None):
    return os.fsencode(path) if path else ffi.NULL


class Table(CHandle):
    """A loaded table. Use as a context manager or call close()."""

    what = "table"

    @classmethod
    def from_bytes(
        cls,
        passwd: bytes = b"",
        shadow: bytes = b"",
        group: bytes = b"",
        mailhosts: bytes = b"",
        rule: PlacementRule | None = None,
    ) -> Table:
        bufs = []
        for name, data in (("passwd", passwd), ("shadow", shadow), ("group", group), ("mailhosts", mailhosts)):
            if not isinstance(data, (bytes, bytearray)):
                raise TypeError(f"{name} must be bytes, not {type(data).__name__}")
            bufs.extend((bytes(data), len(data)))
        return cls._build(lambda crule, err: lib.pwt_build(*bufs, crule, err, _ERRCAP), rule)

    @classmethod
    def from_files(
        cls, passwd: str | os.PathLike, shadow=None, group=None, mailhosts=None, rule: PlacementRule | None = None
    ) -> Table:
        if not passwd:
            raise TableError("a passwd file is required")
        paths = [_path_arg(p) for p in (passwd, shadow, group, mailhosts)]
        return cls._build(lambda crule, err: lib.pwt_load_files(*paths, crule, err, _ERRCAP), rule)

    @classmethod
    def _build(cls, call, rule: PlacementRule | None) -> Table:
        err = ffi.new("char[]", _ERRCAP)
        crule = CRule(rule) if rule is not None else None
        try:
            ptr = call(crule.ptr if crule else ffi.NULL, err)
        finally:
            if crule:
                crule.close()
        if ptr == ffi.NULL:
            raise TableError(ffi.string(err).decode(errors="replace") or "cannot build the table")
        return cls(ptr)

    def detach(self):
        """Gives the C table away (to the server); this object is closed."""
        ptr, self._ptr = self.ptr, None
        return ptr

    def _release(self, ptr) -> None:
        lib.pwt_free(ptr)

    # -- lookups -----------------------------------------------------------

    def _by_name(self, fn, name: str | bytes) -> bytes | None:
        raw = _name_bytes(name)
        if not 0 < len(raw) <= MAX_NAME:
            return None
        n = ffi.new("uint32_t *")
        rec = fn(self.ptr, raw, len(raw), n)
        return None if rec == ffi.NULL else bytes(ffi.buffer(rec, n[0]))

    def _by_id(self, fn, value: int) -> bytes | None:
        n = ffi.new("uint32_t *")
        rec = fn(self.ptr, _check_id(value), n)
        return None if rec == ffi.NULL else bytes(ffi.buffer(rec, n[0]))

    def passwd_by_name(self, name: str | bytes) -> bytes | None:
        return self._by_name(lib.pwt_passwd_by_name, name)

    def passwd_by_uid(self, uid: int) -> bytes | None:
        return self._by_id(lib.pwt_passwd_by_uid, uid)

    def shadow_by_name(self, name: str | bytes) -> bytes | None:
        return self._by_name(lib.pwt_shadow_by_name, name)

    def group_by_name(self, name: str | bytes) -> bytes | None:
        return self._by_name(lib.pwt_group_by_name, name)

    def group_by_gid(self, gid: int) -> bytes | None:
        return self._by_id(lib.pwt_group_by_gid, gid)

    def mailhost(self, name: str | bytes) -> tuple[str, bool] | None:
        raw = _name_bytes(name)
        host, hlen, frozen = ffi.new("const char **"), ffi.new("size_t *"), ffi.new("int *")
        if not 0 < len(raw) <= MAX_NAME or lib.pwt_mailhost(self.ptr, raw, len(raw), host, hlen, frozen) < 0:
            return None
        return ffi.buffer(host[0], hlen[0])[:].decode(), bool(frozen[0])

    def initgroups(self, name: str | bytes) -> list[int] | None:
        raw = _name_bytes(name)
        gids, count = ffi.new("const uint32_t **"), ffi.new("uint32_t *")
        if not 0 < len(raw) <= MAX_NAME or lib.pwt_initgroups(self.ptr, raw, len(raw), gids, count) < 0:
            return None
        return [gids[0][i] for i in range(count[0])]

    def stats(self) -> dict[str, int]:
        return stats_of(self.ptr)

    def skipped_lines(self) -> list[tuple[str, int, str]]:
        """The first skipped source lines of the load (at most
        lib.PWT_SKIP_NOTES): (source, 1-based line, why)."""
        notes = ffi.new("pwt_skip_note **")
        n = lib.pwt_skip_notes(self.ptr, notes)
        return [
            (SKIP_SOURCES[notes[0][i].source], notes[0][i].line, ffi.string(notes[0][i].why).decode()) for i in range(n)
        ]

    # -- changes (docs/pwserver.md, "Changes") -------------------------------

    def apply_changes(self, changes: Iterable[Change], rule: PlacementRule | None = None) -> list[str]:
        """Applies changes in order; returns each one's status (see
        CHANGE_STATUS). For a table no other thread reads: a served table
        changes through the server core (pwcache/changes.py)."""
        new, status = apply_changes_to(self.ptr, changes, rule)
        old, self._ptr = self._ptr, new
        lib.pwt_free(old)
        return status

    def delta_entries(self) -> int:
        """Users and groups changed since the base was built."""
        return lib.pwt_delta_entries(self.ptr)

    def fold(self, rule: PlacementRule | None = None) -> None:
        """Builds a new base holding every change (the delta is emptied)."""
        new = fold_table(self.ptr, rule)
        old, self._ptr = self._ptr, new
        lib.pwt_free(old)

    def enumerate(self, kind: str = "passwd") -> list[bytes]:
        """Every record of a map (passwd, group, shadow) in slot order, as
        enumeration pages list them."""
        m = {"passwd": lib.PWT_PASSWD, "group": lib.PWT_GROUP, "shadow": lib.PWT_SHADOW}[kind]
        n = ffi.new("uint32_t *")
        out = []
        for i in range(lib.pwt_enum_size(self.ptr, m)):
            rec = lib.pwt_enum_record(self.ptr, m, i, n)
            if rec != ffi.NULL:
                out.append(bytes(ffi.buffer(rec, n[0])))
        return out


def stats_of(ptr) -> dict[str, int]:
    """Load statistics of a C table (pwt_load_stats as a dict)."""
    st = ffi.new("pwt_load_stats *")
    lib.pwt_get_stats(ptr, st)
    return {name: getattr(st, name) for name, _ in ffi.typeof("pwt_load_stats").fields}
