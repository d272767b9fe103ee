"""pdeliveryd's duplicate table: (queue id, mailbox, digest) delivered recently.

A client that loses a `250` sends the message again; a key seen within
`window` seconds is acknowledged without a second copy (store.MailStore).
The table is kept across restarts in `DEDUP_FILE` at the top of the storage
root, one line per delivery, appended once the copy is durable and before
its `250`:

    <unix time, 3 decimals> SP <queue id> SP <mailbox> SP <digest, 32 hex digits> LF

(queue ids and mailbox names have no spaces: lmtp.py and layout.check_user
see to it). Its fsync goes through the writer's group commit
(maildir.GroupSync), shared with the directory fsyncs of the deliveries
around it. At start (when the root is mounted) the file is read, records
older than `window` and all but the newest `max_entries` are dropped, and it
is rewritten (a torn last line after a crash goes too); while running it is
rewritten from memory when it holds twice the records kept at the last
rewrite (COMPACT_SLACK at least), so it stays under 2 x max_entries +
COMPACT_SLACK lines. A record is written after the copy is durable, never
before: a crash in between costs a second copy on the retry, never a lost
message. A file that cannot be written is logged and the delivery is still
acknowledged (the copy is durable); the table then lasts until the restart.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
import time
from collections.abc import Callable

from delivery.spool import write_all

log = logging.getLogger("pdeliveryd")

DEDUP_FILE = ".pwmail-dedup"
DEDUP_FILE_MODE = 0o600
COMPACT_SLACK = 1000  # records appended past the kept ones before the file is rewritten

Key = tuple[str, str, bytes]  # (queue id, mailbox, digest)


def _line(key: Key, t: float) -> bytes:
    qid, user, digest = key
    return f"{t:.3f} {qid} {user} {digest.hex()}\n".encode()


def _fsync_dir_of(path: str) -> None:
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _parse(line: bytes) -> tuple[Key, float] | None:
    parts = line.split()
    if len(parts) != 4 or not line.endswith(b"\n"):
        return None
    try:
        t = float(parts[0])
        digest = bytes.fromhex(parts[3].decode("ascii"))
        return (parts[1].decode("ascii"), parts[2].decode("ascii"), digest), t
    except ValueError:
        return None


class DedupTable:
    """Keys in memory (OrderedDict, oldest first) and, with `path`, in the
    file. seen() runs on the event loop, remember() in I/O threads: one lock."""

    def __init__(
        self,
        window: float,
        max_entries: int,
        path: str | os.PathLike | None = None,
        usable: Callable[[], bool] = lambda: True,
        sync: Callable[[str, int], None] = lambda path, fd: os.fsync(fd),
    ):
        self.window = window
        self.max_entries = max_entries
        self.path = os.fspath(path) if path is not None else None
        self._usable = usable  # False while the storage root is not mounted
        self._sync = sync  # maildir.GroupSync.sync in pdeliveryd
        self._done: collections.OrderedDict[Key, float] = collections.OrderedDict()
        self._cond = threading.Condition()
        self._fd = -1
        self._loaded = False
        self._broken = False  # the file failed: memory only until restart
        self._records = 0  # lines in the file
        self._compact_at = COMPACT_SLACK
        self._syncing = 0  # remember() calls between their append and their fsync's end
        self.hits = 0
        # keys being delivered (event loop only): a concurrent retry waits for the first
        self.inflight: dict[Key, asyncio.Future] = {}

    # -- the table -------------------------------------------------------------
    def seen(self, key: Key) -> bool:
        with self._cond:
            self._open()
            now = time.time()
            self._expire(now)
            t = self._done.get(key)
            return t is not None and now - t <= self.window

    def remember(self, key: Key) -> None:
        """After the copy for `key` is durable, before its 250."""
        now = time.time()
        with self._cond:
            self._open()
            self._done[key] = now
            self._done.move_to_end(key)
            self._expire(now)
            if not self._loaded or self._broken:
                return
            try:
                if self._fd < 0:
                    self._create()
                fd = self._fd
                os.write(fd, _line(key, now))
            except OSError as e:
                self._fail(e)
                return
            self._records += 1
            self._syncing += 1
        try:
            self._sync(self.path, fd)
        except OSError as e:
            with self._cond:
                self._fail(e)
        finally:
            with self._cond:
                self._syncing -= 1
                self._cond.notify_all()
                if self._broken:
                    self._close_fd()
                elif self._records >= self._compact_at:
                    self._rewrite()

    def load(self) -> None:
        """Read the file now (at start) rather than at the first use."""
        with self._cond:
            self._open()

    def close(self) -> None:
        with self._cond:
            self._close_fd()

    def __len__(self) -> int:
        return len(self._done)

    # -- internals (with the lock held) -----------------------------------------
    def _expire(self, now: float) -> None:
        while self._done:
            key, t = next(iter(self._done.items()))
            if now - t <= self.window and len(self._done) <= self.max_entries:
                break
            self._done.popitem(last=False)

    def _open(self) -> None:
        """Load and rewrite the file, the first time the root is there (a
        file that is not there yet is made at the first record)."""
        if self.path is None or self._loaded or self._broken or not self._usable():
            return
        self._loaded = True
        try:
            with open(self.path, "rb") as f:
                for line in f:
                    parsed = _parse(line)
                    if parsed is not None:
                        self._done[parsed[0]] = parsed[1]
                        self._done.move_to_end(parsed[0])
        except FileNotFoundError:
            return
        except OSError as e:
            self._fail(e)
            return
        self._expire(time.time())
        log.info("duplicate table: %d entries from %s", len(self._done), self.path)
        self._rewrite()

    def _create(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, DEDUP_FILE_MODE)
        try:
            _fsync_dir_of(self.path)  # the new name is durable before its first record
        except OSError:
            os.close(fd)
            raise
        self._fd = fd

    def _rewrite(self) -> None:
        """The file := the table (write a new one, fsync, rename over), once
        no remember() is between its append and its fsync (they use the old
        descriptor)."""
        while self._syncing:
            self._cond.wait()
        new = self.path + ".new"
        try:
            fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, DEDUP_FILE_MODE)
            try:
                write_all(fd, b"".join(_line(k, t) for k, t in self._done.items()))
                os.fsync(fd)
                os.rename(new, self.path)
                _fsync_dir_of(self.path)
            except OSError:
                os.close(fd)
                raise
        except OSError as e:
            self._fail(e)
            return
        self._close_fd()
        self._fd = fd
        self._records = len(self._done)
        self._compact_at = max(2 * self._records, self._records + COMPACT_SLACK)

    def _fail(self, e: OSError) -> None:
        if not self._broken:
            log.error("duplicate table %s: %s; duplicates are remembered in memory only until restart", self.path, e)
        self._broken = True
        self._close_fd()

    def _close_fd(self) -> None:
        """Close the file once no fsync of it is pending (the last one closes it)."""
        if self._fd >= 0 and not self._syncing:
            os.close(self._fd)
            self._fd = -1
