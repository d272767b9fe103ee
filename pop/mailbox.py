"""A POP3 session's view of one Maildir (pop3d's TRANSACTION and UPDATE
states). No sockets here: pop3d asks, this reads and renames files.

* Opening takes an exclusive flock on the Maildir directory (one POP
  session per mailbox, also across pop3d processes: -ERR [IN-USE]), moves
  every message of new/ into cur/ (`name` -> `name:2,`), and lists cur/.
* UIDL is the Maildir base name (the name without `:2,flags`): it does not
  change when the message moves to cur/ or the mailbox to another server.
* LIST and STAT sizes are what RETR sends for the file (protocol.MessageSize:
  CRLF line ends, and the CRLF RETR adds to a last line without one),
  computed from the bytes, never taken from the `S=`/`W=` of the name (whose
  writers count otherwise: delivery/maildir.py counts a CR before an LF
  twice and no final line end). Maildir message files never change, so a
  size is read once per process and remembered by file identity.
* DELE only marks; files are unlinked at QUIT (`commit()`); RSET unmarks.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

from .protocol import MessageSize

READ_CHUNK = 256 * 1024
MAX_MESSAGES = 1_000_000  # a session lists at most this many (bounded memory)
MAX_TOP_LINE = 64 * 1024  # TOP reads lines of at most this many bytes
# Mailboxes open in this process: also covers a Maildir that does not exist
# yet (nothing to flock); the flock covers other processes.
_open_here: set[str] = set()
_open_lock = threading.Lock()
# Sizes of message files already read, by (device, inode, bytes, mtime):
# a login then reads only the messages it has not seen. Least recently used
# entries go first past the cap (about 150 bytes each).
SIZE_CACHE_ENTRIES = 200_000
_sizes: OrderedDict[tuple[int, int, int, int], int] = OrderedDict()
_sizes_lock = threading.Lock()


class MailboxBusy(Exception):
    """Another session holds this mailbox."""


@dataclass
class Message:
    uidl: str
    path: str
    size: int
    deleted: bool = False


_DIGITS = re.compile(r"(\d+)")


def delivery_order(name: str) -> tuple:
    """Sort key of a Maildir name with its numbers compared as numbers:
    writers (ours, Dovecot's) do not zero-pad `M<usec>`, so as text
    `1.M99999` would sort after `1.M100000`."""
    return tuple(int(part) if i % 2 else part for i, part in enumerate(_DIGITS.split(name)))


def base_name(filename: str) -> str:
    return filename.split(":", 1)[0]


def pop_size(path: str, st: os.stat_result) -> int:
    """The POP size of the message file at `path` (stat `st`). Raises OSError."""
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    with _sizes_lock:
        size = _sizes.get(key)
        if size is not None:
            _sizes.move_to_end(key)
            return size
    counter = MessageSize()
    with open(path, "rb") as f:
        while chunk := f.read(READ_CHUNK):
            counter.feed(chunk)
    with _sizes_lock:
        _sizes[key] = counter.size
        while len(_sizes) > SIZE_CACHE_ENTRIES:
            _sizes.popitem(last=False)
    return counter.size


class MaildirMailbox:
    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.messages: list[Message] = []
        self._lock_fd: int | None = None
        self._registered = False

    # --- opening and closing ---------------------------------------------------------
    def open(self) -> None:
        """Lock, move new/ to cur/, list. Raises MailboxBusy."""
        with _open_lock:
            if self.path in _open_here:
                raise MailboxBusy(self.path)
            _open_here.add(self.path)
            self._registered = True
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            return  # no Maildir yet: an empty mailbox
        except BaseException:
            self.close()
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            self.close()
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise MailboxBusy(self.path) from None
            raise
        self._lock_fd = fd
        try:
            self._move_new()
            self._scan_cur()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._registered:
            self._registered = False
            _open_here.discard(self.path)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def __enter__(self):
        self.open()
        return self

    def __exit__(self, *exc):
        self.close()

    def _move_new(self) -> None:
        new, cur = os.path.join(self.path, "new"), os.path.join(self.path, "cur")
        try:
            names = os.listdir(new)
        except FileNotFoundError:
            return
        for name in names:
            if name.startswith("."):
                continue
            try:
                os.rename(os.path.join(new, name), os.path.join(cur, base_name(name) + ":2,"))
            except FileNotFoundError:
                continue  # moved by someone else meanwhile

    def _scan_cur(self) -> None:
        cur = os.path.join(self.path, "cur")
        try:
            entries = list(os.scandir(cur))
        except FileNotFoundError:
            return
        found = []
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
                mtime, size = st.st_mtime, pop_size(entry.path, st)
            except OSError:
                continue
            found.append((mtime, delivery_order(entry.name), entry.name, entry.path, size))
            if len(found) >= MAX_MESSAGES:
                break
        # Oldest first. File times are coarse (a clock tick), so ties are
        # broken by the delivery time written in the name.
        found.sort()
        self.messages = [Message(base_name(name), path, size) for _, _, name, path, size in found]

    # --- TRANSACTION -----------------------------------------------------------------------
    def get(self, number: int) -> Message | None:
        """Message `number` (1-based) unless deleted or out of range."""
        if 1 <= number <= len(self.messages):
            msg = self.messages[number - 1]
            if not msg.deleted:
                return msg
        return None

    def live(self):
        return [(i, m) for i, m in enumerate(self.messages, 1) if not m.deleted]

    def stat(self) -> tuple[int, int]:
        live = self.live()
        return len(live), sum(m.size for _, m in live)

    def delete(self, number: int) -> bool:
        msg = self.get(number)
        if msg is None:
            return False
        msg.deleted = True
        return True

    def reset(self) -> None:
        for m in self.messages:
            m.deleted = False

    def read_chunks(self, msg: Message):
        """The raw file in chunks (the caller dot-stuffs them). Raises OSError."""
        with open(msg.path, "rb") as f:
            while chunk := f.read(READ_CHUNK):
                yield chunk

    def top(self, msg: Message, lines: int) -> bytes:
        """The header, the blank line and the first `lines` body lines, raw."""
        out = []
        with open(msg.path, "rb") as f:
            in_header = True
            body_lines = 0
            while in_header or body_lines < lines:
                line = f.readline(MAX_TOP_LINE)
                if not line:
                    break
                out.append(line)
                if in_header:
                    in_header = line not in (b"\n", b"\r\n")
                elif line.endswith(b"\n"):
                    body_lines += 1
        return b"".join(out)

    # --- UPDATE ---------------------------------------------------------------------------
    def commit(self) -> int:
        """Remove the messages marked deleted; the count that could not be."""
        failed = 0
        for m in self.messages:
            if m.deleted:
                try:
                    os.unlink(m.path)
                except FileNotFoundError:
                    pass
                except OSError:
                    failed += 1
        return failed
