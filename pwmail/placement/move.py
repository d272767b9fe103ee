"""`pwmail move USER --to HOST` and `pwmail rebalance --add HOST`: move
mailboxes between storage servers while they stay in use (docs/moving.md).

Each move goes through these steps, recorded in a journal file per move
(`<journal-dir>/<user>.json`, written atomically) after each one is done:

  start     journal written
  copied    live copy of the mailbox to the new root (two passes)
  frozen    `user OLD frozen` in the mailhosts file, every pwserver answers it
            (then `settle` seconds, so deliveries already routed finish)
  synced    exact mirror old -> new (deletions and flag changes included),
            file names kept (UIDLs unchanged); the message names are saved
  flipped   `user NEW frozen` in the mailhosts file, confirmed
  unfrozen  `user NEW` in the mailhosts file, confirmed
  (done)    late arrivals in the old copy moved over, old copy removed,
            journal removed

Every step is idempotent given the previous one, so a rerun after a crash
(any point, even between a write and its journal entry) resumes from the
journal and ends in the same state. The mailhosts file is the only switch:
at any time exactly one host is live for the user, and the old copy is
removed only after the map points at the new one.

Both storage roots must be reachable as paths where this runs (local, bind
mounts or NFS during the move); each root must hold the `.pwmail-root`
marker (not mounted = refused).

Crash tests set PWMAIL_MOVE_FAIL to a failure point name (FAIL_POINTS): the
process exits at once with status 70, as a crash would leave things.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from delivery.layout import DEFAULT_SCHEME, SCHEMES, MailboxLayout, check_user
from delivery.maildir import ROOT_MARKER, MaildirWriter, fsync_dir
from pwmail.base.errors import ConfigError
from pwmail.placement.journal import Journal
from pwmail.placement.ratelimit import Throttle

log = logging.getLogger("pwmail-move")

FAIL_ENV = "PWMAIL_MOVE_FAIL"
FAIL_POINTS = (
    "after-start",
    "mid-copy",
    "after-copy",
    "after-freeze-write",
    "after-freeze",
    "mid-sync",
    "after-sync",
    "after-flip-write",
    "after-flip",
    "after-unfreeze-write",
    "after-unfreeze",
    "after-trash",
    "mid-remove",
)
FAIL_EXIT = 70
COPY_SUFFIX = ".pwmove"  # files being copied, in the new box's tmp/
DEFAULTS = {
    "roots": {},  # host -> storage root path as seen here
    "journal_dir": "/var/lib/pwmail/moves",
    "bytes_per_second": 20_000_000,
    "files_per_second": 2000,
    "settle_seconds": 5.0,
    "confirm_timeout": 60.0,
    "batch": 50,
    "pop_wait_seconds": 600.0,
    "jobs": 4,
}
CHUNK = 1 << 20
JOURNAL_WRITERS = 16


class MoveError(Exception):
    """A move cannot go on; its journal stays, a rerun resumes it."""


def failpoint(name: str) -> None:
    if os.environ.get(FAIL_ENV) == name:
        log.error("failure point %s: exiting as a crash would", name)
        os._exit(FAIL_EXIT)


# ---- small file helpers ----------------------------------------------------


def write_atomic(path: pathlib.Path, data: bytes, like: pathlib.Path | None = None, sync_dir: bool = True) -> None:
    """tmp file in the same folder, fsync, rename, fsync the folder (unless
    the caller syncs it once for many files)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        if like is not None and like.exists():
            st = like.stat()
            os.fchmod(fd, st.st_mode & 0o7777)
            if os.geteuid() == 0:
                os.fchown(fd, st.st_uid, st.st_gid)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    if sync_dir:
        fsync_dir(path.parent)


@contextlib.contextmanager
def pop_sessions_closed(box: pathlib.Path, timeout: float):
    """Hold the flock pop3d takes on a Maildir for each session (pop/mailbox.py):
    new sessions are refused while frozen, this waits for those already open."""
    try:
        fd = os.open(box, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        yield
        return
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise MoveError(
                        f"a POP session on {box} is still open after {timeout:g} s "
                        f"(the user stays frozen; run again to resume)"
                    ) from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def flocked(path: pathlib.Path, blocking: bool = True):
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            raise MoveError(f"{path} is locked: another pwmail move is running") from None
        yield
    finally:
        os.close(fd)


# ---- the mailhosts map (docs/placement.md) ---------------------------------


class MailhostsFile:
    """The `user host [frozen]` source file the password servers load.
    Changes rewrite it atomically under a lock (`<file>.lock`), keeping
    comments and order; a changed user's later duplicate lines are dropped."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)

    def read(self) -> dict[str, tuple[str, bool]]:
        out: dict[str, tuple[str, bool]] = {}
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return out
        for line in text.splitlines():
            w = line.split("#", 1)[0].split()
            if len(w) in (2, 3) and w[0] not in out:
                out[w[0]] = (w[1], len(w) == 3 and w[2] == "frozen")
        return out

    def update(self, changes: dict[str, tuple[str, bool]]) -> None:
        if not changes:
            return
        with flocked(self.path.with_name(self.path.name + ".lock")):
            try:
                lines = self.path.read_text().splitlines()
            except FileNotFoundError:
                lines = []
            done: set[str] = set()
            out = []
            for line in lines:
                w = line.split("#", 1)[0].split()
                if w and w[0] in changes:
                    if w[0] in done:
                        continue
                    host, frozen = changes[w[0]]
                    line = f"{w[0]} {host}" + (" frozen" if frozen else "")
                    done.add(w[0])
                out.append(line)
            for user, (host, frozen) in changes.items():
                if user not in done:
                    out.append(f"{user} {host}" + (" frozen" if frozen else ""))
            write_atomic(self.path, ("\n".join(out) + "\n").encode(), like=self.path)


class PasswordServers:
    """Makes the running password servers reload, and waits until every one
    of them answers the expected mailhost for every user concerned."""

    def __init__(
        self, addresses: list[str], pids: list[int] = (), reload_cmd: str | None = None, timeout: float = 60.0
    ):
        self.addresses = addresses
        self.pids = list(pids)
        self.reload_cmd = reload_cmd
        self.timeout = timeout

    def reload(self) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGHUP)
            except ProcessLookupError:
                log.warning("pwserver pid %d is gone; relying on its file watch", pid)
        if self.reload_cmd:
            subprocess.run(self.reload_cmd, shell=True, check=False)

    def confirm(self, expected: dict[str, tuple[str, bool]]) -> None:
        from pwcache.client import Client, PwError

        deadline = time.monotonic() + self.timeout
        for addr in self.addresses:
            with Client([addr], timeout_ms=500, hedge_ms=500) as c:
                pending = list(expected.items())
                while pending:
                    user, want = pending[-1]
                    try:
                        got = c.mailhost(user)
                    except PwError:
                        got = None
                    if got is not None and (got.host, got.frozen) == want:
                        pending.pop()
                        continue
                    if time.monotonic() > deadline:
                        raise MoveError(
                            f"pwserver {addr} still answers {user} -> {got} "
                            f"(want {want[0]}{' frozen' if want[1] else ''}) after {self.timeout} s"
                        )
                    time.sleep(0.05)

    def current(self, user: str) -> tuple[str, bool] | None:
        """What the first server answers (the default rule applies there)."""
        from pwcache.client import Client

        with Client(self.addresses) as c:
            if c.passwd_by_name(user) is None:
                return None
            got = c.mailhost(user)
        return None if got is None else (got.host, got.frozen)


# ---- copying mailboxes -----------------------------------------------------


def message_key(rel: str) -> str:
    """A Maildir message is named by its base name (its UIDL) whatever its
    flags or whether it is in new/ or cur/; other files by their path."""
    folder, _, name = rel.rpartition("/")
    sub = folder.rpartition("/")[2]
    if sub in ("new", "cur"):
        return f"{folder[:-3]}msg/{name.split(':', 1)[0]}"
    return rel


def _maildir_subdirs(rel_dir: str, name: str) -> bool:
    """Which directories of a box belong to it: cur/ and new/, and at the
    top the Maildir++ folders (`.Sent`). Anything else is not the user's:
    under `first3` the box of a one-letter user doubles as the hash level of
    longer names (j/j holds j/j/a/jja), so it is never walked into."""
    if name in ("cur", "new"):
        return True
    return rel_dir == "" and name.startswith(".") and name not in (".", "..")


def scan(box: pathlib.Path) -> dict[str, tuple[str, int, int]]:
    """key -> (relative path, size, mtime_ns) of every file of the box (tmp/ skipped)."""
    out = {}
    if not box.is_dir():
        return out
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        try:
            it = os.scandir(box / rel_dir if rel_dir else box)
        except (FileNotFoundError, NotADirectoryError):
            continue
        with it:
            for e in it:
                rel = f"{rel_dir}/{e.name}" if rel_dir else e.name
                try:
                    if e.is_dir(follow_symlinks=False):
                        if _maildir_subdirs(rel_dir, e.name):
                            stack.append(rel)
                    elif e.is_file(follow_symlinks=False):
                        st = e.stat(follow_symlinks=False)
                        out[message_key(rel)] = (rel, st.st_size, st.st_mtime_ns)
                except FileNotFoundError:
                    continue
    return out


def remove_maildir(box: pathlib.Path) -> None:
    """Remove what `scan` counts as the box (and tmp/), never a foreign
    subdirectory; the box folder itself goes when nothing else is left."""
    with os.scandir(box) as it:
        entries = list(it)
    for e in entries:
        path = box / e.name
        if e.is_dir(follow_symlinks=False):
            if e.name == "tmp" or _maildir_subdirs("", e.name):
                shutil.rmtree(path)
        else:
            path.unlink()
    with contextlib.suppress(OSError):
        box.rmdir()  # fails when foreign hash levels live inside it
    fsync_dir(box.parent)


def is_maildir(box: pathlib.Path) -> bool:
    return any((box / sub).is_dir() for sub in ("cur", "new", "tmp"))


def foreign_subdirs(box: pathlib.Path) -> bool:
    with os.scandir(box) as it:
        return any(e.is_dir(follow_symlinks=False) and e.name != "tmp" and not _maildir_subdirs("", e.name) for e in it)


def _make_dirs(src: pathlib.Path, dst: pathlib.Path, rel_dir: str, touched: set) -> None:
    """Create dst/rel_dir and its parents inside the box like the source's."""
    parts = [p for p in rel_dir.split("/") if p]
    s, d = src, dst
    for p in parts:
        s, d = s / p, d / p
        if not d.is_dir():
            st = s.stat()
            os.mkdir(d, st.st_mode & 0o7777)
            os.chmod(d, st.st_mode & 0o7777)
            if os.geteuid() == 0:
                os.chown(d, st.st_uid, st.st_gid)
            touched.add(d.parent)
            if len(parts) == 1 and p.startswith("."):  # a Maildir++ folder is a Maildir
                for sub in ("cur", "new", "tmp"):
                    if (s / sub).is_dir() and not (d / sub).is_dir():
                        os.mkdir(d / sub, st.st_mode & 0o7777)
                touched.add(d)


def copy_file(src: pathlib.Path, dst: pathlib.Path, tmp_dir: pathlib.Path, throttle: Throttle) -> bool:
    """Copy keeping name, mode, owner and times: tmp_dir first, fsync, rename.
    False when the source vanished meanwhile (moved or deleted)."""
    tmp_dir.mkdir(mode=0o700, exist_ok=True)
    tmp = tmp_dir / (dst.name.split(":", 1)[0] + COPY_SUFFIX)
    try:
        fin = open(src, "rb")
    except FileNotFoundError:
        return False
    with fin:
        st = os.fstat(fin.fileno())
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            while True:
                chunk = fin.read(CHUNK)
                if not chunk:
                    break
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
                throttle.spend(len(chunk))
            os.fchmod(fd, st.st_mode & 0o7777)
            if os.geteuid() == 0:
                os.fchown(fd, st.st_uid, st.st_gid)
            os.fsync(fd)
        finally:
            os.close(fd)
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.rename(tmp, dst)
    throttle.spend(0, 1)
    return True


@dataclasses.dataclass
class SyncResult:
    copied: int = 0
    renamed: int = 0
    deleted: int = 0
    bytes: int = 0


def sync_box(
    src: pathlib.Path,
    dst: pathlib.Path,
    throttle: Throttle,
    *,
    delete: bool,
    only: set[str] | None = None,
    fail_midway: str | None = None,
) -> SyncResult:
    """Make dst hold what src holds: copy what is missing, rename what changed
    place or flags, and (delete=True) remove what src no longer has.
    `only`: restrict to these keys. Directories touched are fsynced."""
    res = SyncResult()
    s_files, d_files = scan(src), scan(dst)
    touched: set[pathlib.Path] = set()
    for i, (key, (rel, size, mtime)) in enumerate(sorted(s_files.items())):
        if only is not None and key not in only:
            continue
        if fail_midway and i == len(s_files) // 2:
            failpoint(fail_midway)
        have = d_files.get(key)
        rel_dir = rel.rpartition("/")[0]
        _make_dirs(src, dst, rel_dir, touched)
        if have is not None:
            if have[0] == rel and (key != rel or (have[1], have[2]) == (size, mtime)):
                continue
            if key != rel and have[0] != rel:  # a message: same content, new place or flags
                os.rename(dst / have[0], dst / rel)
                touched.update({(dst / have[0]).parent, (dst / rel).parent})
                res.renamed += 1
                continue
        if copy_file(src / rel, dst / rel, dst / "tmp", throttle):
            touched.add((dst / rel).parent)
            res.copied += 1
            res.bytes += size
    if delete:
        for key, (rel, _, _) in d_files.items():
            if key not in s_files and (only is None or key in only):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(dst / rel)
                touched.add((dst / rel).parent)
                res.deleted += 1
    for d in touched:
        with contextlib.suppress(FileNotFoundError):
            fsync_dir(d)
    return res


def clean_copy_leftovers(box: pathlib.Path) -> None:
    tmp = box / "tmp"
    if tmp.is_dir():
        for p in tmp.glob("*" + COPY_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


# ---- one move --------------------------------------------------------------


@dataclasses.dataclass
class MoveSettings:
    roots: dict[str, str]
    scheme: str
    journal_dir: pathlib.Path
    mailhosts: MailhostsFile
    servers: PasswordServers
    bytes_per_second: float
    files_per_second: float
    settle: float
    batch: int
    pop_wait: float = DEFAULTS["pop_wait_seconds"]
    jobs: int = DEFAULTS["jobs"]


class Mover:
    def __init__(self, cfg: MoveSettings):
        self.cfg = cfg
        self.throttle = Throttle(cfg.bytes_per_second, cfg.files_per_second)
        self.refused: list[tuple[str, str]] = []

    # journals
    def jpath(self, user: str) -> pathlib.Path:
        return self.cfg.journal_dir / f"{user}.json"

    def save(self, jobs: list[Journal], step: str | None = None) -> None:
        """Record a step of several moves; durable before the next step
        starts (the folder is fsynced once for all of them)."""

        def write(j: Journal) -> None:
            if step:
                j.step = step
            write_atomic(self.jpath(j.user), json.dumps(dataclasses.asdict(j)).encode(), sync_dir=False)

        # concurrent fsyncs share the file system's journal commits
        with ThreadPoolExecutor(min(JOURNAL_WRITERS, max(1, len(jobs)))) as pool:
            list(pool.map(write, jobs))
        for j in jobs:
            log.info("move %s %s -> %s: %s", j.user, j.src, j.dst, j.step)
        if jobs:
            fsync_dir(self.cfg.journal_dir)

    def pending(self) -> list[Journal]:
        return [Journal.load(p) for p in sorted(self.cfg.journal_dir.glob("*.json"))]

    def root(self, host: str) -> str:
        root = self.cfg.roots.get(host)
        if not root:
            raise MoveError(f"no storage root known for host {host!r}: give --root {host}=DIR")
        if not (pathlib.Path(root) / ROOT_MARKER).exists():
            raise MoveError(f"storage root {root} of {host} is missing or not mounted (no {ROOT_MARKER})")
        return root

    def plan(self, user: str, dst: str, current: dict[str, tuple[str, bool]]) -> Journal | None:
        """A journal for a new move of `user` to `dst`; None when already there."""
        check_user(user)
        served = self.cfg.servers.current(user)
        if served is None:
            raise MoveError(f"no such user: {user}")
        src, frozen = current.get(user, served)
        if frozen:
            raise MoveError(
                f"{user} is frozen in the map but has no journal here: another move tool? "
                f"(fix the mailhosts line by hand)"
            )
        if src == dst:
            return None
        j = Journal(user, src, dst, self.root(src), self.root(dst), self.cfg.scheme, started=time.time())
        if j.dst_box().exists() and scan(j.dst_box()):
            raise MoveError(
                f"{user} already has a mailbox on {dst} ({j.dst_box()}): a stray copy? "
                f"`pwmail placement-report --strays` lists them; remove or merge it first"
            )
        return j

    def check_map(self, jobs: list[Journal]) -> None:
        """Both roots must be there (a move never copies from an unmounted
        root), and the map must agree with each journal (a crash leaves it
        one step ahead at most)."""
        current = self.cfg.mailhosts.read()
        for j in jobs:
            for root in (j.src_root, j.dst_root):
                if not (pathlib.Path(root) / ROOT_MARKER).exists():
                    raise MoveError(
                        f"move of {j.user}: storage root {root} is missing or not mounted (no {ROOT_MARKER})"
                    )
            host = current.get(j.user, (None, False))[0]
            if host is None and not j.at_least("frozen"):
                continue  # placed by the default rule until the freeze writes its line
            if host not in (j.src, j.dst):
                raise MoveError(
                    f"{j.user}: the mailhosts map says {host}, the journal moves {j.src} -> {j.dst}; fix one of them"
                )

    def switch(self, jobs: list[Journal], host_of, frozen: bool, step: str, fail_write: str, fail_done: str) -> None:
        todo = [j for j in jobs if not j.at_least(step)]
        if not todo:
            return
        want = {j.user: (host_of(j), frozen) for j in todo}
        self.cfg.mailhosts.update(want)
        failpoint(fail_write)
        self.cfg.servers.reload()
        self.cfg.servers.confirm(want)
        self.save(todo, step)
        failpoint(fail_done)

    def run(self, jobs: list[Journal]) -> None:
        """Take a batch through every remaining step, in lockstep."""
        self.check_map(jobs)
        to_copy = [j for j in jobs if not j.at_least("copied")]
        self.each(to_copy, lambda j: self.mirror(j, "live copy", "mid-copy", passes=2))  # pass 2 catches up
        self.save(to_copy, "copied")
        failpoint("after-copy")
        self.switch(jobs, lambda j: j.src, True, "frozen", "after-freeze-write", "after-freeze")
        to_sync = [j for j in jobs if not j.at_least("synced")]
        if to_sync and self.cfg.settle > 0:
            time.sleep(self.cfg.settle)  # deliveries routed before the freeze finish

        def frozen_sync(j: Journal) -> None:
            with pop_sessions_closed(j.src_box(), self.cfg.pop_wait):
                self.mirror(j, "frozen sync", "mid-sync", passes=1)
            j.manifest = sorted(k for k in scan(j.dst_box()) if "msg/" in k)

        self.each(to_sync, frozen_sync)
        self.save(to_sync, "synced")
        failpoint("after-sync")
        self.switch(jobs, lambda j: j.dst, True, "flipped", "after-flip-write", "after-flip")
        self.switch(jobs, lambda j: j.dst, False, "unfrozen", "after-unfreeze-write", "after-unfreeze")
        self.each(jobs, self.remove_old)
        fsync_dir(self.cfg.journal_dir)
        for j in jobs:
            log.info("move %s %s -> %s: done, old copy removed", j.user, j.src, j.dst)

    def each(self, jobs: list[Journal], fn) -> None:
        """fn(job) for every job, `jobs` threads at a time (copies wait on
        fsyncs, not on the CPU); the first error is raised once all are done."""
        with ThreadPoolExecutor(max(1, min(self.cfg.jobs, len(jobs) or 1))) as pool:
            futures = [pool.submit(fn, j) for j in jobs]
        for f in futures:
            f.result()

    def mirror(self, j: Journal, what: str, fail_point: str, passes: int) -> None:
        """Make the new box an exact copy of the old one (not live yet)."""
        src, dst = j.src_box(), j.dst_box()
        if not is_maildir(src):
            return  # no mailbox yet: nothing to copy
        MaildirWriter(MailboxLayout(j.dst_root, j.scheme)).ensure_maildir(j.user, *_owner(src))
        clean_copy_leftovers(dst)
        for n in range(passes):
            r = sync_box(src, dst, self.throttle, delete=True, fail_midway=fail_point if n == 0 else None)
            log.info(
                "move %s: %s pass %d: %d copied (%d bytes), %d renamed, %d deleted",
                j.user,
                what,
                n + 1,
                r.copied,
                r.bytes,
                r.renamed,
                r.deleted,
            )

    def remove_old(self, j: Journal) -> None:
        """Late arrivals in the old copy (messages it has that the frozen
        mirror did not) go to the new box; then the old copy goes."""
        box, trash = j.src_box(), j.trash()
        while True:
            if trash.is_dir():
                self.sweep(j, trash)
            elif is_maildir(box) and not foreign_subdirs(box):
                os.rename(box, trash)  # a delivery still racing now fails and is retried
                fsync_dir(trash.parent)
                failpoint("after-trash")
                continue
            elif is_maildir(box):
                self.sweep(j, box)
            if not is_maildir(box):
                break
        self.jpath(j.user).unlink()

    def sweep(self, j: Journal, old: pathlib.Path) -> None:
        known = set(j.manifest or [])
        late = {k for k in scan(old) if "msg/" in k and k not in known}
        if late:
            MaildirWriter(MailboxLayout(j.dst_root, j.scheme)).ensure_maildir(j.user, *_owner(old))
            r = sync_box(old, j.dst_box(), self.throttle, delete=False, only=late)
            log.warning("move %s: %d late arrival(s) in the old copy moved over", j.user, r.copied + r.renamed)
        failpoint("mid-remove")
        remove_maildir(old)

    def move_all(self, wanted: list[tuple[str, str]]) -> int:
        """Resume unfinished moves, then move each (user, host) in batches.
        Returns the number of moves finished; users refused (unknown, stray
        copy, no root...) are in `self.refused`, the others still move."""
        self.cfg.journal_dir.mkdir(parents=True, exist_ok=True)
        done = 0
        with flocked(self.cfg.journal_dir / ".lock", blocking=False):
            for p in self.cfg.journal_dir.glob(".*.json.tmp*"):
                p.unlink()  # a journal write cut short
            resumed = self.pending()
            if resumed:
                log.info("resuming %d unfinished move(s)", len(resumed))
                for i in range(0, len(resumed), self.cfg.batch):
                    self.run(resumed[i : i + self.cfg.batch])
                done += len(resumed)
            by_user = {j.user: j.dst for j in resumed}
            todo = [(u, h) for u, h in wanted if by_user.get(u) != h]
            for i in range(0, len(todo), self.cfg.batch):
                current = self.cfg.mailhosts.read()
                batch = []
                for user, host in todo[i : i + self.cfg.batch]:
                    try:
                        j = self.plan(user, host, current)
                    except (MoveError, ValueError) as e:  # this user only; the others go on
                        log.error("move %s: refused: %s", user, e)
                        self.refused.append((user, str(e)))
                        continue
                    if j is None:
                        log.info("move %s: already on %s", user, host)
                        continue
                    batch.append(j)
                self.save(batch)
                failpoint("after-start")
                if batch:
                    self.run(batch)
                done += len(batch)
        return done


def _owner(path: pathlib.Path) -> tuple[int, int]:
    if os.geteuid() != 0:
        return -1, -1
    st = path.stat()
    return st.st_uid, st.st_gid


# ---- command line ----------------------------------------------------------


def _common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--root",
        action="append",
        default=[],
        metavar="HOST=DIR",
        help="storage root of HOST as reachable here (repeatable; or [move] roots)",
    )
    ap.add_argument("--layout", choices=SCHEMES, help="mailbox layout scheme (default [delivery] layout or first3)")
    ap.add_argument("--mailhosts", metavar="F", help="mailhosts source file (default [pwserver] mailhosts)")
    ap.add_argument(
        "--server",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="password server to confirm changes on (repeatable; default /etc/pwserver.conf)",
    )
    ap.add_argument(
        "--pwserver-pid",
        type=int,
        action="append",
        default=[],
        metavar="PID",
        help="send SIGHUP to this pwserver after each change (else its file watch reloads)",
    )
    ap.add_argument("--reload-cmd", metavar="CMD", help="shell command run after each change (e.g. rsync the map)")
    ap.add_argument("--journal-dir", metavar="DIR", help=f"journals of moves (default {DEFAULTS['journal_dir']})")
    ap.add_argument("--bwlimit", type=float, metavar="BYTES/S", help="copy at most this many bytes a second")
    ap.add_argument("--files-per-second", type=float, metavar="N", help="copy at most N files a second")
    ap.add_argument("--settle", type=float, metavar="S", help="wait after freezing (in-flight deliveries)")
    ap.add_argument("--batch", type=int, metavar="N", help="moves frozen and flipped together")
    ap.add_argument("--jobs", type=int, metavar="N", help="mailboxes copied at the same time (default 4)")
    ap.add_argument(
        "--pop-wait", type=float, metavar="S", help="how long to wait for POP sessions open on a frozen mailbox to end"
    )
    ap.add_argument("--log-stderr", action="store_true", help="also log to stderr")


def move_section(data: dict) -> dict:
    """[move] over DEFAULTS (unknown keys are an error: typos)."""
    cfg = dict(DEFAULTS)
    section = data.get("move", {})
    unknown = set(section) - set(DEFAULTS)
    if unknown:
        raise MoveError(f"unknown key(s) in [move]: {', '.join(sorted(unknown))}")
    cfg.update(section)
    return cfg


def storage_roots(data: dict, flags: list[str]) -> dict[str, str]:
    """host -> storage root: this host's own (`[delivery] root` for each of
    its `mailhost_names`), then [move] roots, then --root HOST=DIR flags."""
    delivery = data.get("delivery", {})
    roots = {h: delivery["root"] for h in delivery.get("mailhost_names", []) if delivery.get("root")}
    roots.update(move_section(data)["roots"])
    for item in flags:
        host, sep, path = item.partition("=")
        if not sep or not host or not path:
            raise MoveError(f"--root wants HOST=DIR, not {item!r}")
        roots[host] = path
    return roots


def layout_scheme(data: dict, flag: str | None) -> str:
    return flag or data.get("delivery", {}).get("layout", DEFAULT_SCHEME)


def build_settings(args: argparse.Namespace) -> MoveSettings:
    from pwcache import config as client_config
    from pwmail.base import settings
    from pwmail.base.logsetup import setup_logging

    setup_logging("pwmail-move", stderr=args.log_stderr)
    data = settings.load()
    cfg = move_section(data)
    roots = storage_roots(data, args.root)
    mailhosts = args.mailhosts or data.get("pwserver", {}).get("mailhosts")
    if not mailhosts:
        raise MoveError("no mailhosts file: give --mailhosts F (or mailhosts in [pwserver])")
    servers = args.server or [client_config.format_hostport(s) for s in client_config.load().servers]
    return MoveSettings(
        roots=roots,
        scheme=layout_scheme(data, args.layout),
        journal_dir=pathlib.Path(args.journal_dir or cfg["journal_dir"]),
        mailhosts=MailhostsFile(mailhosts),
        servers=PasswordServers(servers, args.pwserver_pid, args.reload_cmd, float(cfg["confirm_timeout"])),
        bytes_per_second=args.bwlimit if args.bwlimit is not None else float(cfg["bytes_per_second"]),
        files_per_second=args.files_per_second if args.files_per_second is not None else float(cfg["files_per_second"]),
        settle=args.settle if args.settle is not None else float(cfg["settle_seconds"]),
        batch=max(1, args.batch or int(cfg["batch"])),
        pop_wait=args.pop_wait if args.pop_wait is not None else float(cfg["pop_wait_seconds"]),
        jobs=max(1, args.jobs or int(cfg["jobs"])),
    )


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="pwmail move", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("users", nargs="*", metavar="USER", help="users to move (none: only resume unfinished moves)")
    ap.add_argument("--to", metavar="HOST", help="destination storage host")
    _common_args(ap)
    args = ap.parse_args(argv)
    if args.users and not args.to:
        ap.error("--to HOST is required with USER")
    return _run(args, lambda cfg: [(u, args.to) for u in args.users], "move")


def rebalance_candidates(
    users: list[str], current: dict[str, tuple[str, bool]], hosts: list[tuple[str, float]], new_host: str, weight: float
) -> list[str]:
    """Users whose rendezvous winner becomes `new_host` once it joins (docs/placement.md)."""
    from pwcache.placement import PlacementRule

    rule = PlacementRule("hash", tuple(hosts) + ((new_host, weight),))
    return [u for u in users if current.get(u, ("", False))[0] != new_host and rule.pick(u) == new_host]


def rebalance_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="pwmail rebalance",
        description="Move to a new storage host the mailboxes that weighted rendezvous "
        "hashing gives it (about w_new/sum(w) of them), through `pwmail move`.",
    )
    ap.add_argument("--add", required=True, metavar="HOST", help="the new storage host")
    ap.add_argument("--weight", type=float, default=1.0, help="its weight (default 1)")
    ap.add_argument(
        "--hosts",
        metavar="H[:W],...",
        help="current hosts with weights (default [placement] hosts, else the hosts in the map)",
    )
    ap.add_argument("--passwd", metavar="F", help="passwd file listing the users (default [pwserver] passwd)")
    ap.add_argument("--max-moves", type=int, metavar="N", help="move at most N mailboxes this run")
    ap.add_argument("--dry-run", action="store_true", help="list the moves, do nothing")
    _common_args(ap)
    args = ap.parse_args(argv)

    def plan(cfg: MoveSettings) -> list[tuple[str, str]]:
        from pwcache.placement import PlacementRule
        from pwmail.base import settings
        from pwmail.genusers import parse_hosts

        data = settings.load()
        current = cfg.mailhosts.read()
        if args.hosts:
            hosts = parse_hosts(args.hosts)
        elif data.get("placement", {}).get("hosts"):
            hosts = list(PlacementRule.from_settings({"rule": "hash", "hosts": data["placement"]["hosts"]}).hosts)
        else:
            hosts = [(h, 1.0) for h in dict.fromkeys(h for h, _ in current.values())]
        hosts = [(h, w) for h, w in hosts if h != args.add]
        passwd = args.passwd or data.get("pwserver", {}).get("passwd")
        users = (
            [line.split(":", 1)[0] for line in open(passwd) if line.strip() and not line.startswith("#")]
            if passwd
            else list(current)
        )
        moves = rebalance_candidates(users, current, hosts, args.add, args.weight)
        log.info(
            "rebalance: %d of %d users belong on %s; moving %s",
            len(moves),
            len(users),
            args.add,
            args.max_moves if args.max_moves is not None else "all",
        )
        if args.max_moves is not None:
            moves = moves[: args.max_moves]
        if args.dry_run:
            for u in moves:
                print(f"{u} {current.get(u, ('?', False))[0]} -> {args.add}")
            return []
        return [(u, args.add) for u in moves]

    return _run(args, plan, "rebalance")


def _run(args: argparse.Namespace, plan, what: str) -> int:
    try:
        cfg = build_settings(args)
        moves = plan(cfg)
    except ConfigError:
        raise  # one line and EX_CONFIG (pwmail/admin.py)
    except (MoveError, OSError, ValueError) as e:
        print(f"pwmail {what}: {e}", file=sys.stderr)
        return 1
    if getattr(args, "dry_run", False):
        return 0
    mover = Mover(cfg)
    try:
        done = mover.move_all(moves)
    except (MoveError, OSError, ValueError) as e:
        log.error("%s", e)
        print(f"pwmail {what}: {e} (unfinished moves keep their journal; run again to resume)", file=sys.stderr)
        return 1
    for user, why in mover.refused:
        print(f"pwmail {what}: {user} not moved: {why}", file=sys.stderr)
    print(f"pwmail {what}: {done} move(s) done" + (f", {len(mover.refused)} refused" if mover.refused else ""))
    return 1 if mover.refused else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
