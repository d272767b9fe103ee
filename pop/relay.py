"""Byte relays between a logged-in client and its backend (pop-proxy).

SpliceRelay: both sides plain TCP. The proxy gives up the asyncio
transports (their sockets are dup'ed first) and moves the backend's
answers with splice(2) through a pipe, so the data never enters user
space: this is what keeps RETR through the proxy close to direct (nginx's
mail proxy copies through a 4 KiB buffer by default). The client's
commands, a few bytes each, are copied.

TransportRelay: either side is TLS. Bytes pass through the asyncio
transports; each side's write buffer may grow to `buffer` bytes before the
other side's reading is paused (flow control both ways).

Both close both sides when the backend closes (after flushing to the
client), when either side fails, or after `idle_timeout` seconds with no
byte either way. A client that half-closes gets its half-close passed on.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket

F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
PIPE_DEFAULT = 65536  # Linux's pipe size
COPY_CHUNK = 16384  # client -> backend is copied, at most this much per read
SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
HAVE_SPLICE = hasattr(os, "splice")
_GONE = (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ETIMEDOUT, errno.EHOSTUNREACH)


class _IdleWatch:
    """Calls `expire` once no `touch()` happened for `timeout` seconds."""

    def __init__(self, loop, timeout: float, expire):
        self.loop = loop
        self.timeout = timeout
        self.expire = expire
        self.last = loop.time()
        self.handle = loop.call_later(timeout, self._check) if timeout > 0 else None

    def touch(self) -> None:
        self.last = self.loop.time()

    def _check(self) -> None:
        left = self.last + self.timeout - self.loop.time()
        if left <= 0:
            self.handle = None
            self.expire()
        else:
            self.handle = self.loop.call_later(left, self._check)

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


class _Direction:
    """src socket -> dst socket, plus bytes to send first (`pending`).

    With a pipe (the backend's answers): splice(2) src -> pipe -> dst. The
    pipe starts at Linux's default size and grows to `pipe_size` the first
    time one read fills it: a session that only logs in and out never pays
    for the big pipe.
    Without one (the client's commands, a few bytes each): recv and send,
    which costs fewer system calls than a pipe's creation and splices."""

    def __init__(
        self, relay: SpliceRelay, src: socket.socket, dst: socket.socket, pending: bytes, pipe_size: int, name: str
    ):
        self.relay = relay
        self.src, self.dst = src, dst
        self.pending = memoryview(pending) if pending else None
        self.name = name
        if pipe_size:
            self.rfd, self.wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        else:
            self.rfd = self.wfd = -1
        self.capacity = PIPE_DEFAULT
        self.pipe_size = max(pipe_size, PIPE_DEFAULT)
        self.in_pipe = 0
        self.total = 0  # bytes delivered to dst
        self.eof = False
        self.reading = False
        self.writing = False

    def start(self) -> None:
        if not self.flush():
            return
        self._want_read(True)

    def _want_read(self, on: bool) -> None:
        loop = self.relay.loop
        if on and not self.reading and not self.eof:
            loop.add_reader(self.src.fileno(), self.on_readable)
            self.reading = True
        elif not on and self.reading:
            loop.remove_reader(self.src.fileno())
            self.reading = False

    def _want_write(self, on: bool) -> None:
        loop = self.relay.loop
        if on and not self.writing:
            loop.add_writer(self.dst.fileno(), self.on_writable)
            self.writing = True
        elif not on and self.writing:
            loop.remove_writer(self.dst.fileno())
            self.writing = False

    def on_readable(self) -> None:
        try:
            if self.rfd < 0:
                data = self.src.recv(COPY_CHUNK)
                n = len(data)
                if n:
                    self.pending = memoryview(data)
            else:
                room = self.capacity - self.in_pipe
                if room <= 0:
                    self._want_read(False)
                    return
                n = os.splice(self.src.fileno(), self.wfd, room, flags=SPLICE_FLAGS)
                self.in_pipe += n
                if n == room and self.capacity < self.pipe_size:
                    self._grow()  # more is waiting: a big answer (RETR)
        except BlockingIOError:
            return
        except OSError as e:
            self.relay.close(None if e.errno in _GONE else e)
            return
        if n == 0:
            self.eof = True
            self._want_read(False)
        else:
            self.relay.idle.touch()
        if self.flush() and not self.eof:
            return
        # dst is full: read no more until it drains (a copy holds one chunk
        # at a time; a pipe at most its capacity).
        if self.pending is not None or self.in_pipe >= self.capacity:
            self._want_read(False)

    def _grow(self) -> None:
        """A read filled the pipe: up to its full size, once."""
        try:
            self.capacity = fcntl.fcntl(self.wfd, F_SETPIPE_SZ, self.pipe_size)
        except OSError:
            pass
        self.pipe_size = self.capacity

    def on_writable(self) -> None:
        if self.flush() and not self.eof:
            self._want_write(False)
            self._want_read(True)

    def flush(self) -> bool:
        """Send what is pending; True when everything went out. On EOF with
        nothing left, tell the relay."""
        try:
            while self.pending is not None:
                n = self.dst.send(self.pending)
                self.total += n
                self.pending = self.pending[n:] if n < len(self.pending) else None
            while self.in_pipe:
                n = os.splice(self.rfd, self.dst.fileno(), self.in_pipe, flags=SPLICE_FLAGS)
                self.in_pipe -= n
                self.total += n
                self.relay.idle.touch()
        except BlockingIOError:
            self._want_write(True)
            return False
        except OSError as e:
            self.relay.close(None if e.errno in _GONE else e)
            return False
        if self.eof:
            self._want_write(False)
            self.relay.direction_done(self)
        return True

    def close(self) -> None:
        self._want_read(False)
        self._want_write(False)
        for fd in (self.rfd, self.wfd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.rfd = self.wfd = -1


class SpliceRelay:
    def __init__(
        self,
        loop,
        client: socket.socket,
        backend: socket.socket,
        *,
        to_client: bytes = b"",
        to_backend: bytes = b"",
        pipe_size: int = 1 << 20,
        idle_timeout: float = 600.0,
        on_close=None,
    ):
        self.loop = loop
        self.client, self.backend = client, backend
        self.on_close = on_close
        self.closed = False
        self.idle = _IdleWatch(loop, idle_timeout, self.close)
        self.up = _Direction(self, client, backend, to_backend, 0, "up")
        self.down = _Direction(self, backend, client, to_client, pipe_size, "down")

    def start(self) -> None:
        self.down.start()
        if not self.closed:
            self.up.start()

    @property
    def bytes_up(self) -> int:
        return self.up.total

    @property
    def bytes_down(self) -> int:
        return self.down.total

    def direction_done(self, d: _Direction) -> None:
        if d is self.down:
            self.close()  # the backend closed: the session is over
        else:
            try:
                self.backend.shutdown(socket.SHUT_WR)  # pass the client's half-close on
            except OSError:
                self.close()

    def kick(self, farewell: bytes) -> None:
        """End the session from the proxy's side: the backend is cut at
        once (nothing more reaches it), the client gets `farewell` (best
        effort: what the pipe still held for it is dropped)."""
        if self.closed:
            return
        try:
            self.backend.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.client.send(farewell)
        except OSError:
            pass
        self.close()

    def close(self, error: Exception | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        self.idle.cancel()
        self.up.close()
        self.down.close()
        for s in (self.client, self.backend):
            try:
                s.close()
            except OSError:
                pass
        if self.on_close is not None:
            self.on_close(error)


class TransportRelay:
    """Relay through asyncio transports (used when either side is TLS)."""

    def __init__(
        self,
        loop,
        client_transport,
        backend_transport,
        *,
        buffer: int = 1 << 20,
        idle_timeout: float = 600.0,
        on_close=None,
    ):
        self.loop = loop
        self.ct, self.bt = client_transport, backend_transport
        self.on_close = on_close
        self.closed = False
        self.bytes_up = self.bytes_down = 0
        self.idle = _IdleWatch(loop, idle_timeout, self.close)
        for t in (self.ct, self.bt):
            t.set_write_buffer_limits(high=buffer)

    def from_client(self, data: bytes) -> None:
        self.idle.touch()
        self.bytes_up += len(data)
        self.bt.write(data)

    def from_backend(self, data: bytes) -> None:
        self.idle.touch()
        self.bytes_down += len(data)
        self.ct.write(data)

    def client_eof(self) -> bool:
        """Pass a half-close on when both sides can; True keeps the client
        transport open for the backend's last answer."""
        if self.ct.get_extra_info("sslcontext") is None and self.bt.can_write_eof():
            self.bt.write_eof()
            return True
        self.close()
        return False

    def backend_eof(self) -> None:
        self.close()

    # The backend's write buffer is full: stop reading the client, and back.
    def pause_client(self) -> None:
        self.ct.pause_reading()

    def resume_client(self) -> None:
        self.ct.resume_reading()

    def pause_backend(self) -> None:
        self.bt.pause_reading()

    def resume_backend(self) -> None:
        self.bt.resume_reading()

    def kick(self, farewell: bytes) -> None:
        """End the session from the proxy's side: the backend is cut at
        once, the client gets what was buffered for it, then `farewell`."""
        if self.closed:
            return
        self.bt.abort()
        self.ct.write(farewell)
        self.close()

    def close(self, error: Exception | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        self.idle.cancel()
        self.ct.close()  # close() sends what is buffered first
        self.bt.close()
        if self.on_close is not None:
            self.on_close(error)
