"""pdeliveryd's message bodies: the Maildir form, spooled to a file past a small size.

A message is written to no mailbox before its data is complete and checked
(size, line length, recipients asked again), so its bytes wait somewhere:
the first `memory_max` bytes in memory (most mail is that small and never
touches the spool), then the whole of it in an unnamed file on the storage
root's file system (O_TMPFILE: nothing to clean after a crash). Each
recipient's copy is its own trace headers followed by the body (its header
section from memory when trace fields in it are replaced), copied from
that file by the kernel (copy_file_range, which may share extents on
XFS/Btrfs; sendfile, then read/write, where it cannot). Memory per session
is bounded by memory_max and the read buffers, never by the message.

(`WireBody` keeps the wire form instead, for lmtp-proxy.) The bytes of a
SpooledBody are stored with CRLF turned into LF as they arrive (a CR at the
end of a piece waits for the next one), so the file holds exactly what
message.for_maildir() would have made of the whole message after its trace.
A failure to spool (disk full, root not mounted) is kept in `error` and
answered for every recipient at the end of the data.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable

from delivery import message as msg
from delivery.body import Body

SPOOL_MEMORY_MAX = 128 * 1024  # bytes of a message kept in memory before it goes to a spool file
SPOOL_FILE_MODE = 0o600
COPY_CHUNK = 1024 * 1024  # bytes per read/write when the kernel cannot copy

# copy_file_range / sendfile refuse these pairs of files: try the next way
_NO_KERNEL_COPY = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF}


def open_unnamed(directory: str | os.PathLike) -> int:
    """A read-write descriptor of a file without a name in `directory`:
    O_TMPFILE, or a file created and unlinked at once where the file system
    lacks it (the name then exists for an instant)."""
    try:
        return os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, SPOOL_FILE_MODE)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
    fd, name = tempfile.mkstemp(prefix=".pdeliveryd-spool-", dir=directory)
    os.unlink(name)
    return fd


def write_all(fd: int, *parts: bytes | memoryview) -> None:
    """Write every part, in one writev when the kernel takes them at once."""
    views = [memoryview(p) for p in parts if len(p)]
    while views:
        n = os.writev(fd, views)
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


def copy_range(src: int, dst: int, count: int, offset: int = 0) -> None:
    """Append `count` bytes of `src` from `offset` to `dst` (at its file
    position), leaving src's position alone: several threads copy one spool."""
    done = 0
    for how in (_copy_file_range, _sendfile, _pread_write):
        try:
            while done < count:
                n = how(src, dst, count - done, offset + done)
                if n <= 0:
                    raise OSError(errno.EIO, f"spool file ended {count - done} bytes early")
                done += n
            return
        except OSError as e:
            # only a refusal before the first byte falls back (a partial
            # copy followed by another way would still be exact, but a
            # refusal after bytes went is a real I/O error)
            if done or e.errno not in _NO_KERNEL_COPY or how is _pread_write:
                raise


def _copy_file_range(src: int, dst: int, count: int, offset: int) -> int:
    return os.copy_file_range(src, dst, count, offset_src=offset)


def _sendfile(src: int, dst: int, count: int, offset: int) -> int:
    return os.sendfile(dst, src, offset, count)


def _pread_write(src: int, dst: int, count: int, offset: int) -> int:
    data = os.pread(src, min(count, COPY_CHUNK), offset)
    if data:
        write_all(dst, data)
    return len(data)


class SpooledBody(Body):
    """The Maildir form of a body: in memory up to memory_max bytes, then in
    a spool file from `open_spool()` (which may raise OSError)."""

    def __init__(self, open_spool: Callable[[], int], memory_max: int = SPOOL_MEMORY_MAX):
        super().__init__()
        self._open_spool = open_spool
        self._memory_max = memory_max
        self._memory = bytearray()
        self._fd = -1
        self._stored = 0
        self._held_cr = False
        self.error: OSError | None = None

    @property
    def spooled(self) -> bool:
        return self._fd >= 0

    def _keep(self, piece: bytes) -> None:
        if self.error is not None:
            return
        if self._held_cr:
            self._held_cr = False
            if piece[0] != 0x0A:
                self._store(b"\r")  # a CR alone: kept as it came
        lf = piece.replace(b"\r\n", b"\n")
        if lf.endswith(b"\r"):
            self._held_cr = True  # maybe half of a CRLF
            self._store(memoryview(lf)[:-1])
        else:
            self._store(lf)

    def finish(self) -> None:
        super().finish()
        if self._held_cr:
            self._held_cr = False
            self._store(b"\r")

    def _store(self, data: bytes | memoryview) -> None:
        if self.error is not None or not len(data):
            return
        try:
            if self._fd < 0 and len(self._memory) + len(data) <= self._memory_max:
                self._memory += data
            else:
                if self._fd < 0:
                    self._fd = self._open_spool()
                    write_all(self._fd, self._memory)
                    self._memory = bytearray()
                write_all(self._fd, data)
            self._stored += len(data)
        except OSError as e:
            self.error = e
            self.discard()

    def discard(self) -> None:
        self._memory = bytearray()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def write_to(self, fd: int, before: bytes = b"", skip: int = 0) -> None:
        """Write `before` (the trace headers), then the body from its byte
        `skip` on (of the stored form), to `fd`."""
        if self._fd < 0:
            write_all(fd, before, memoryview(self._memory)[skip:])
            return
        write_all(fd, before)
        copy_range(self._fd, fd, self._stored - skip, skip)

    def head_lines(self) -> bytes:
        """The stored form of the head's whole lines (the header section,
        unless it is longer than HEADER_SCAN_MAX): the first bytes of what
        was stored, since CRLF -> LF keeps a prefix ending in LF a prefix."""
        head = self.head
        return head[: head.rfind(b"\n") + 1].replace(b"\r\n", b"\n")

    def stored_with(self, trace: bytes, delivered_to: str) -> StoredCopy:
        """One recipient's copy: its trace headers, then this body without the
        header fields they replace (message.without_replaced_trace: the
        header section is written from memory, the rest copied)."""
        lines = self.head_lines()
        kept = msg.without_replaced_trace(lines, delivered_to)
        if kept is lines:
            return StoredCopy(self, trace)
        return StoredCopy(self, trace + kept, skip=len(lines), skipped_newlines=lines.count(b"\n"))

    def chunks(self, size: int = COPY_CHUNK):
        """The stored bytes, in pieces of at most `size` (read from the spool
        file by offset: several readers may go through one body at once)."""
        if self._fd < 0:
            for i in range(0, len(self._memory), size):
                yield bytes(self._memory[i : i + size])
            return
        offset = 0
        while offset < self._stored:
            piece = os.pread(self._fd, min(size, self._stored - offset), offset)
            if not piece:
                raise OSError(errno.EIO, f"spool file ended {self._stored - offset} bytes early")
            offset += len(piece)
            yield piece


class WireBody(SpooledBody):
    """A body kept in its wire form (CRLF as it came), for lmtp-proxy, which
    sends it on over LMTP instead of writing a Maildir."""

    def _keep(self, piece: bytes) -> None:
        self._store(piece)


class StoredCopy:
    """What maildir.MaildirWriter.stage() writes for one recipient: sizes
    for the file name, and the bytes: `before`, then the body from its
    byte `skip` on."""

    def __init__(self, body: SpooledBody, before: bytes, skip: int = 0, skipped_newlines: int = 0):
        self.body = body
        self.before = before
        self.skip = skip
        self.size = len(before) + body.lf_size - skip
        self.newlines = before.count(b"\n") + body.newlines - skipped_newlines

    def write_to(self, fd: int) -> None:
        self.body.write_to(fd, self.before, self.skip)
