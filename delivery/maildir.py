"""Durable Maildir delivery (the paper's III.D: one file per message).

A message is durable before anyone is told so: the file is created in
`tmp/` with O_EXCL, written, fsynced and closed, renamed into `new/`, and
`new/` is fsynced. Concurrent deliveries (threads) share the last step:
one fsync of a directory serves every rename done before it started
(`GroupSync`, group commit); `deliver()` does all of it in one call. What
is written is bytes or a `Content` (pdeliveryd's: trace headers, then a body
copied from its spool file, spool.StoredCopy).

File names: `<time>.M<usec>P<pid>Q<n>.<host>,S=<size>,W=<size with CRLF>`,
the Dovecot/Courier form; `<n>` counts deliveries in this process, and `/`
and `:` in the host name are written `\\057` and `\\072`.

Failures: a missing storage root (or one without its marker file, i.e. not
mounted) raises StorageUnavailable; ENOSPC/EDQUOT raise StorageFull; any
other OSError is passed on. In every case the temporary file is removed and
nothing appears in `new/`.
"""

from __future__ import annotations

import errno
import itertools
import os
import pathlib
import socket
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from delivery.layout import MailboxLayout
from delivery.spool import open_unnamed, write_all

# Present at the top of a storage root only when the right file system is
# mounted there: an empty mount point is refused instead of filled.
ROOT_MARKER = ".pwmail-root"
TMP_MAX_AGE = 36 * 3600  # seconds; Maildir's customary limit for tmp/ leftovers
MAILDIR_MODE = 0o700
FILE_MODE = 0o600
LEVEL_MODE = 0o755

_counter = itertools.count(1)
_pid = os.getpid()  # one system call less per message; kept right across fork()


def _after_fork() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork)


class StorageUnavailable(OSError):
    """The storage root is missing or not mounted: try again later."""


class StorageFull(OSError):
    """No space or quota left: try again later (452)."""


def maildir_host() -> str:
    return socket.gethostname().replace("/", "\\057").replace(":", "\\072")


def unique_name(size: int, wsize: int, host: str | None = None) -> str:
    now = time.time()
    sec = int(now)
    usec = int((now - sec) * 1_000_000)
    return f"{sec}.M{usec}P{_pid}Q{next(_counter)}.{host or maildir_host()},S={size},W={wsize}"


def _classify(e: OSError) -> OSError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(e.errno, f"storage full: {e.strerror}", e.filename)
    return e


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class GroupSync:
    """Group commit of directory fsyncs among threads (leader/follower).

    A thread that needs `new/` durable joins the next batch; the first
    thread of a batch to find no sync running becomes its leader, fsyncs
    every directory of the batch once and wakes the others. A batch is
    closed when its leader takes it, so every sync starts after the
    renames it covers.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._pending: dict[str, int | None] = {}  # directory -> a descriptor of it
        self._open = 1  # the batch new arrivals join
        self._done = 0  # the last batch whose fsyncs are over
        self._leading = False
        self._errors: dict[int, dict[str, OSError]] = {}
        self.batches = 0
        self.syncs = 0

    def sync(self, path: str, fd: int | None = None) -> None:
        """Return once `path` (through `fd` when given, held open by the
        caller until then) was fsynced after this call began."""
        with self._cond:
            batch = self._open
            if self._pending.get(path) is None:
                self._pending[path] = fd
            while self._done < batch:
                if not self._leading:
                    self._lead()
                else:
                    self._cond.wait()
            err = self._errors.get(batch, {}).get(path)
        if err is not None:
            raise err

    def _lead(self) -> None:
        # called with the lock held; releases it around the fsyncs
        self._leading = True
        batch, paths = self._open, self._pending
        self._open, self._pending = batch + 1, {}
        self._cond.release()
        errors = {}
        try:
            for p, fd in paths.items():
                try:
                    if fd is None:
                        fsync_dir(p)
                    else:
                        os.fsync(fd)
                except OSError as e:
                    errors[p] = e
        finally:
            self._cond.acquire()
            self.batches += 1
            self.syncs += len(paths)
            if errors:
                self._errors[batch] = errors
            self._errors.pop(batch - 1000, None)
            self._done = batch
            self._leading = False
            self._cond.notify_all()


class Content(Protocol):
    """What stage() writes: `size` bytes with `newlines` LFs (the S= and W=
    of the name), put into a descriptor by write_to()."""

    size: int
    newlines: int

    def write_to(self, fd: int) -> None: ...


class BytesContent:
    def __init__(self, data: bytes):
        self.data = data
        self.size = len(data)
        self.newlines = data.count(b"\n")

    def write_to(self, fd: int) -> None:
        write_all(fd, self.data)


@dataclass
class Staged:
    """A message written and fsynced in tmp/, not yet visible. Holds the
    tmp/ and new/ directory descriptors until commit() or withdraw()."""

    name: str
    tmp_fd: int
    new_fd: int
    new_dir: str
    published: bool = False

    @property
    def new_path(self) -> str:
        return f"{self.new_dir}/{self.name}"

    def close(self) -> None:
        for fd in (self.tmp_fd, self.new_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        self.tmp_fd = self.new_fd = -1


# Inside a Maildir the user owns, files are reached through descriptors of
# tmp/ and new/ opened without following links: a user who swaps tmp/ or
# new/ for a link cannot make the root-run daemon write, rename or delete
# anywhere else. A Maildir sits in a root-owned hash level, which its user
# cannot change, except below a one-character user's Maildir (layout's
# nested()): those paths are walked one descriptor at a time from the root.
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_subdirs(box: str | os.PathLike, *names: str) -> list[int]:
    fds: list[int] = []
    try:
        for name in names:
            fds.append(os.open(f"{box}/{name}", _DIR_FLAGS))
    except OSError:
        for fd in fds:
            os.close(fd)
        raise
    return fds


class MaildirWriter:
    def __init__(self, layout: MailboxLayout, host: str | None = None):
        self.layout = layout
        self.host = host or maildir_host()
        self.group = GroupSync()

    # -- mailboxes -------------------------------------------------------
    def check_root(self) -> None:
        root = self.layout.root
        if not (root / ROOT_MARKER).exists():
            raise StorageUnavailable(
                errno.ENOENT, f"storage root {root} missing or not mounted (no {ROOT_MARKER})", str(root)
            )

    def ensure_maildir(self, user: str, uid: int = -1, gid: int = -1) -> pathlib.Path:
        """The user's Maildir, created (owned by uid:gid, mode 0700) if absent.

        Hash levels are created as needed (root-owned, 0755); a missing root
        is never created. A new Maildir gets its cur/ new/ tmp/ before it is
        handed to the user. The walk goes through descriptors from the root,
        never following a link; every new directory entry is fsynced.
        """
        box = self.layout.path(user)
        self.check_root()
        parts = self.layout.relative(user).parts
        try:
            fd = os.open(self.layout.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                for i, comp in enumerate(parts):
                    last = i == len(parts) - 1
                    made = _mkdirat(fd, comp, MAILDIR_MODE if last else LEVEL_MODE)
                    child = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                    if made:
                        os.fsync(fd)
                    os.close(fd)
                    fd = child
                made_box = made
                made = False
                for sub in ("cur", "new", "tmp"):
                    if _mkdirat(fd, sub, MAILDIR_MODE):
                        made = True
                        sfd = os.open(sub, _DIR_FLAGS, dir_fd=fd)
                        try:
                            if uid >= 0 or gid >= 0:
                                os.fchown(sfd, uid, gid)
                        finally:
                            os.close(sfd)
                if made:
                    os.fsync(fd)
                if made_box and (uid >= 0 or gid >= 0):
                    os.fchown(fd, uid, gid)  # handed over once complete
            finally:
                os.close(fd)
        except OSError as e:
            raise _classify(e) from e
        return box

    def open_dirs(self, user: str, box: str | os.PathLike | None = None) -> list[int]:
        """Descriptors of the user's tmp/ and new/, opened without following
        links (the whole path for a nested() Maildir, else the last step:
        the levels above are root's)."""
        box = box or self.layout.path(user)
        if not self.layout.nested(user):
            return _open_subdirs(box, "tmp", "new")
        fd = os.open(self.layout.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for comp in self.layout.relative(user).parts:
                child = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = child
            tmp_fd = os.open("tmp", _DIR_FLAGS, dir_fd=fd)
            try:
                return [tmp_fd, os.open("new", _DIR_FLAGS, dir_fd=fd)]
            except OSError:
                os.close(tmp_fd)
                raise
        finally:
            os.close(fd)

    # -- messages --------------------------------------------------------
    def stage(self, user: str, content: bytes | Content, uid: int = -1, gid: int = -1) -> Staged:
        """Write `content` (LF line ends) to the user's tmp/ and fsync it."""
        if isinstance(content, (bytes, bytearray)):
            content = BytesContent(content)
        name = unique_name(content.size, content.size + content.newlines, self.host)
        box = self.layout.path(user)
        try:
            tmp_fd, new_fd = self.open_dirs(user, box)
        except OSError as e:
            raise _classify(e) from e
        staged = Staged(name, tmp_fd, new_fd, f"{box}/new")
        try:
            fd = os.open(
                name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE, dir_fd=tmp_fd
            )
        except OSError as e:
            staged.close()
            raise _classify(e) from e
        try:
            try:
                if uid >= 0 or gid >= 0:
                    os.fchown(fd, uid, gid)
                content.write_to(fd)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            self.withdraw(staged)
            raise _classify(e) from e
        return staged

    def publish(self, staged: Staged) -> None:
        """Move a staged message into new/ (visible; durable after the sync)."""
        try:
            os.rename(staged.name, staged.name, src_dir_fd=staged.tmp_fd, dst_dir_fd=staged.new_fd)
            staged.published = True
        except OSError as e:
            self.withdraw(staged)
            raise _classify(e) from e

    def withdraw(self, staged: Staged) -> None:
        """Remove a staged or published message that cannot be acknowledged."""
        if staged.tmp_fd < 0:
            return
        _unlink_quietly(staged.name, staged.new_fd if staged.published else staged.tmp_fd)
        staged.close()

    def commit(self, staged: Staged) -> None:
        """publish(), then make new/ durable (shared with concurrent commits)."""
        self.publish(staged)
        try:
            self.group.sync(staged.new_dir, staged.new_fd)
        except OSError as e:
            self.withdraw(staged)
            raise _classify(e) from e
        staged.close()

    def clean_tmp(self, user: str, max_age: float = TMP_MAX_AGE) -> int:
        """clean_tmp() on the user's Maildir, reached as deliveries reach it."""
        try:
            tmp_fd, new_fd = self.open_dirs(user)
        except OSError:
            return 0
        os.close(new_fd)
        return clean_tmp(self.layout.path(user), max_age, tmp_fd=tmp_fd)

    def deliver(self, user: str, content: bytes | Content, uid: int = -1, gid: int = -1) -> str:
        """Write, publish and sync into the user's Maildir (created on first
        use): returns the path in new/. Thread-safe; concurrent calls share
        directory fsyncs."""
        try:
            staged = self.stage(user, content, uid, gid)
        except FileNotFoundError:
            self.ensure_maildir(user, uid, gid)
            staged = self.stage(user, content, uid, gid)
        self.commit(staged)
        return staged.new_path

    def open_spool(self) -> int:
        """An unnamed read-write file on the storage root's file system, for
        a message on its way (spool.py); StorageUnavailable when the root is
        not mounted, so nothing fills the mount point."""
        self.check_root()
        try:
            return open_unnamed(self.layout.root)
        except OSError as e:
            raise _classify(e)


def _mkdirat(dir_fd: int, name: str, mode: int) -> bool:
    """mkdir relative to a directory descriptor, tolerating a concurrent
    creator; True when we made it (its mode then set despite the umask)."""
    try:
        os.mkdir(name, mode, dir_fd=dir_fd)
    except FileExistsError:
        return False
    fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    return True


def _unlink_quietly(name: str, dir_fd: int | None = None) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


def clean_tmp(
    box: str | os.PathLike, max_age: float = TMP_MAX_AGE, now: float | None = None, tmp_fd: int | None = None
) -> int:
    """Remove regular files in box/tmp (or the directory `tmp_fd`, which is
    then closed) older than max_age seconds; returns the count."""
    now = time.time() if now is None else now
    removed = 0
    if tmp_fd is None:
        try:
            [tmp_fd] = _open_subdirs(box, "tmp")
        except OSError:
            return 0
    try:
        with os.scandir(tmp_fd) as entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                    if entry.is_file(follow_symlinks=False) and now - st.st_mtime > max_age:
                        os.unlink(entry.name, dir_fd=tmp_fd)
                        removed += 1
                except OSError:
                    continue
    finally:
        os.close(tmp_fd)
    return removed


def walk_maildirs(root: str | os.PathLike, max_depth: int = 4):
    """Yield every Maildir (a directory holding tmp/ and new/) under root."""
    root = os.fspath(root)
    stack = [(root, 0)]
    while stack:
        path, depth = stack.pop()
        try:
            with os.scandir(path) as it:
                subdirs = [e.path for e in it if e.is_dir(follow_symlinks=False)]
        except OSError:
            continue
        names = {os.path.basename(p) for p in subdirs}
        if "tmp" in names and "new" in names:
            yield path
        if depth < max_depth:
            stack.extend((p, depth + 1) for p in subdirs if os.path.basename(p) not in ("tmp", "new", "cur"))


def clean_tree(root: str | os.PathLike, max_age: float = TMP_MAX_AGE, max_depth: int = 5) -> int:
    """clean_tmp() in every Maildir under root, walking by descriptors that
    never follow a link (for `pdeliveryd --clean-tmp`); returns the count."""
    removed = 0

    def visit(fd: int, depth: int) -> None:
        nonlocal removed
        with os.scandir(fd) as it:
            subdirs = [e.name for e in it if e.is_dir(follow_symlinks=False)]
        if "tmp" in subdirs and "new" in subdirs:
            try:
                tmp_fd = os.open("tmp", _DIR_FLAGS, dir_fd=fd)
            except OSError:
                tmp_fd = None
            if tmp_fd is not None:
                removed += clean_tmp("", max_age, tmp_fd=tmp_fd)
        if depth >= max_depth:
            return
        for name in subdirs:
            if name in ("tmp", "new", "cur"):
                continue
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError:
                continue
            try:
                visit(child, depth + 1)
            finally:
                os.close(child)

    top = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        visit(top, 0)
    finally:
        os.close(top)
    return removed
