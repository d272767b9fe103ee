"""The four files pwserver reads (docs/pwserver.md): passwd(5), shadow(5),
group(5) and the mailhosts map (`user host [frozen]`), parsed into rows for
the database and written back from it.

Lines the database would refuse are skipped and counted here, with the first
one's line number, so that an import says what it left out instead of
failing on line 700,000. The first line of a name wins, as in pwserver.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Iterable, Iterator

from delivery.layout import LayoutError, check_user

MAX_ID = 2**32 - 2
SHADOW_NUMBERS = 7  # lastchg min max warn inact expire flag
FILES = ("passwd", "shadow", "group", "mailhosts")
SHADOW_MODE = 0o600  # hashes: root only, as /etc/shadow
PUBLIC_MODE = 0o644


def valid_name(name: str) -> bool:
    """The rule of pwmail.valid_name() in schema.sql: a login that can name a
    mailbox directory (delivery/layout.py), a passwd(5) field (no ':'), and
    not a NIS compat line of a file ('+', '-': pwserver skips those)."""
    try:
        check_user(name)
    except LayoutError:
        return False
    return ":" not in name and name[0] not in "+-"


@dataclasses.dataclass
class Skipped:
    """Lines left out of one file: how many, and the first one's number and why."""

    count: int = 0
    first: str = ""

    def add(self, lineno: int, why: str) -> None:
        if not self.count:
            self.first = f"line {lineno}: {why}" if lineno else why
        self.count += 1


def _lines(lines: Iterable[str]) -> Iterator[tuple[int, str]]:
    """(number, line) of the lines that are not blank or comments."""
    for lineno, line in enumerate(lines, 1):
        line = line.rstrip("\r\n")
        stripped = line.lstrip(" \t")
        if stripped and not stripped.startswith("#"):
            yield lineno, line


def _id(text: str) -> int:
    value = int(text)
    if not text.isdigit() or value > MAX_ID:
        raise ValueError(text)
    return value


def _numbers_ok(numbers: list[str]) -> bool:
    """shadow(5)'s day counts: each empty or a whole number (negative too:
    -1 is "unset" in some files). The common case costs one isdigit()."""
    joined = "".join(numbers)
    if not joined or joined.isdigit():
        return True
    try:
        for n in numbers:
            if n:
                int(n)
    except ValueError:
        return False
    return True


@dataclasses.dataclass
class Site:
    """A site read from files: rows of strings in file order (numbers as
    their text, None for an empty shadow field), ready for COPY. Users are
    not kept: passwd_rows() hands them on as it reads them (a million rows
    go to the database while the next are read) and remembers their names."""

    names: set[str] = dataclasses.field(default_factory=set)
    shadow: dict[str, list] = dataclasses.field(default_factory=dict)  # name -> [hash, 7 numbers or None]
    groups: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (name, gid)
    members: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (group, user)
    mailhosts: dict[str, tuple[str, bool]] = dataclasses.field(default_factory=dict)
    skipped: dict[str, Skipped] = dataclasses.field(default_factory=dict)

    def skip(self, what: str, lineno: int, why: str) -> None:
        self.skipped.setdefault(what, Skipped()).add(lineno, why)


def passwd_rows(site: Site, lines: Iterable[str]) -> Iterator[tuple[str, ...]]:
    """(name, uid, gid, gecos, home, shell) of each usable line, in order."""
    seen_names: set[str] = set()  # lower-cased: Juan and juan share a mailbox
    seen_uids: set[int] = set()
    for lineno, line in _lines(lines):
        f = line.split(":")
        if len(f) != 7:
            site.skip("passwd", lineno, "not 7 fields")
            continue
        name = f[0]
        try:
            uid, gid = _id(f[2]), _id(f[3])
        except ValueError:
            site.skip("passwd", lineno, "bad uid or gid")
            continue
        if not valid_name(name):
            site.skip("passwd", lineno, f"name not usable as a mailbox: {name!r}")
        elif name.lower() in seen_names:
            site.skip("passwd", lineno, f"duplicate name {name!r}")
        elif uid in seen_uids:
            site.skip("passwd", lineno, f"duplicate uid {uid}")
        else:
            seen_names.add(name.lower())
            seen_uids.add(uid)
            site.names.add(name)
            yield name, str(uid), str(gid), f[4], f[5], f[6]


def parse_shadow(site: Site, lines: Iterable[str]) -> None:
    for lineno, line in _lines(lines):
        f = line.split(":")
        if len(f) != 2 + SHADOW_NUMBERS:
            site.skip("shadow", lineno, f"not {2 + SHADOW_NUMBERS} fields")
        elif not _numbers_ok(f[2:]):
            site.skip("shadow", lineno, "bad number")
        elif f[0] in site.shadow:
            site.skip("shadow", lineno, f"duplicate name {f[0]!r}")
        else:
            site.shadow[f[0]] = [f[1]] + [n or None for n in f[2:]]


def parse_group(site: Site, lines: Iterable[str], users: set[str]) -> None:
    """Members must be users of the site (the database keeps memberships of
    users only); others are skipped and counted under "group members"."""
    names: set[str] = set()
    gids: set[int] = set()
    for lineno, line in _lines(lines):
        f = line.split(":")
        if len(f) != 4:
            site.skip("group", lineno, "not 4 fields")
            continue
        try:
            gid = _id(f[2])
        except ValueError:
            site.skip("group", lineno, "bad gid")
            continue
        if not valid_name(f[0]) or f[0] in names or gid in gids:
            site.skip("group", lineno, f"bad or duplicate name or gid: {f[0]!r} {gid}")
            continue
        names.add(f[0])
        gids.add(gid)
        site.groups.append((f[0], str(gid)))
        for member in dict.fromkeys(m for m in f[3].split(",") if m):
            if member in users:
                site.members.append((f[0], member))
            else:
                site.skip("group members", lineno, f"{member!r} in {f[0]} is not a user")


def parse_mailhosts(site: Site, lines: Iterable[str]) -> None:
    for lineno, line in _lines(lines):
        w = line.split("#", 1)[0].split()
        if len(w) not in (2, 3) or (len(w) == 3 and w[2] != "frozen"):
            site.skip("mailhosts", lineno, "not 'user host [frozen]'")
        elif w[0] in site.mailhosts:
            site.skip("mailhosts", lineno, f"duplicate name {w[0]!r}")
        else:
            site.mailhosts[w[0]] = (w[1], len(w) == 3)


def opened(path: str):
    """A file read line by line (newline="": a CR is kept, then stripped, as
    pwserver does)."""
    return open(path, encoding="utf-8", errors="surrogateescape", newline="")


def read_side_files(shadow: str | None, mailhosts: str | None) -> Site:
    """A Site with the shadow and mailhosts maps (paths; None = not given),
    to be joined to passwd as it is read."""
    site = Site()
    for path, parse in ((shadow, parse_shadow), (mailhosts, parse_mailhosts)):
        if path:
            with opened(path) as f:
                parse(site, f)
    return site


def drop_orphans(site: Site) -> None:
    """Once passwd is read: shadow and mailhosts lines of names it lacks are
    skipped (counted, as pwserver does)."""
    for what, entries in (("shadow", site.shadow), ("mailhosts", site.mailhosts)):
        for name in set(entries) - site.names:
            del entries[name]
            site.skip(what, 0, f"{name!r} is not in passwd")


class StagedFiles:
    """Files written beside their final paths and renamed over them all at
    once, each after an fsync, then the folder fsynced: readers such as a
    file-source pwserver see each old file or its new one, never half of one;
    if anything fails before commit() nothing is replaced."""

    def __init__(self, folder: pathlib.Path) -> None:
        self.folder = folder
        self._staged: list[tuple[pathlib.Path, pathlib.Path]] = []

    def open(self, name: str, mode: int):
        path = self.folder / name
        tmp = path.with_name(f".{name}.tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        os.fchmod(fd, mode)  # the umask may have taken bits away
        self._staged.append((tmp, path))
        return os.fdopen(fd, "wb", buffering=1 << 20)

    @staticmethod
    def _fsync(path: pathlib.Path, flags: int) -> None:
        fd = os.open(path, flags | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def commit(self) -> None:
        for tmp, _ in self._staged:
            self._fsync(tmp, os.O_RDONLY)
        for tmp, path in self._staged:
            os.rename(tmp, path)
        self._fsync(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        self._staged = []

    def abort(self) -> None:
        for tmp, _ in self._staged:
            tmp.unlink(missing_ok=True)
        self._staged = []
