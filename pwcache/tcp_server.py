"""pwserver's TCP side (docs/pwserver.md, "TCP connections"; framing in
docs/protocol.md): one thread (selectors) frames requests and hands each
to the C answer function.

UDP is served by other threads, in C without the GIL (pws_serve_udp):
nothing here can make a UDP lookup wait. What a TCP peer can hold is
bounded here:
- places: `tcp_max_connections` in all, `tcp_max_per_source` per client
  address; when every place is taken, a newcomer from an address holding
  fewer connections than the busiest one takes the place of that address's
  longest-waiting connection, so no set of addresses can shut others out;
- time: a request frame must arrive whole within `tcp_frame_timeout` of its
  first byte (trickling a byte at a time does not keep a connection), and a
  connection that neither sends nor takes anything for `tcp_idle_timeout`
  is closed (also one whose client stopped reading its answers);
- memory: no further request of a connection is read or answered while
  more than `tcp_max_queued` bytes of its answers are unsent
  (back-pressure), so a connection holds at most that plus one answer.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass
from itertools import islice

from pwcache._pwtable import lib

TCP_DEFAULTS: dict = {
    "tcp_max_connections": 256,
    "tcp_max_per_source": 32,
    "tcp_frame_timeout": 5.0,
    "tcp_idle_timeout": 10.0,
    "tcp_max_queued": 256 * 1024,
}
RECV_BYTES = 65536
ACCEPT_BATCH = 64  # connections taken from the backlog per wake-up
SEND_BUFFERS = 64  # queued pieces handed to one sendmsg
SWEEP_SECONDS = 0.25  # deadlines are checked this often
STOP = object()

log = logging.getLogger("pwserver")


@dataclass(frozen=True)
class TcpLimits:
    max_connections: int
    max_per_source: int
    frame_timeout: float
    idle_timeout: float
    max_queued: int

    @classmethod
    def from_settings(cls, cfg: dict) -> TcpLimits:
        """From the tcp_* keys of [pwserver] (TCP_DEFAULTS); ValueError
        says what is wrong."""
        try:
            limits = cls(
                int(cfg["tcp_max_connections"]),
                int(cfg["tcp_max_per_source"]),
                float(cfg["tcp_frame_timeout"]),
                float(cfg["tcp_idle_timeout"]),
                int(cfg["tcp_max_queued"]),
            )
        except (TypeError, ValueError):
            raise ValueError(
                "tcp_max_connections, tcp_max_per_source and tcp_max_queued must be integers, "
                "tcp_frame_timeout and tcp_idle_timeout numbers"
            ) from None
        if not 1 <= limits.max_per_source <= limits.max_connections:
            raise ValueError("tcp_max_per_source must be 1..tcp_max_connections")
        if not (limits.frame_timeout > 0 and limits.idle_timeout > 0) or limits.max_queued < 0:
            raise ValueError("tcp_frame_timeout and tcp_idle_timeout must be > 0, tcp_max_queued >= 0")
        return limits


def source_of(host: str) -> str:
    """The client address connections are counted by (an IPv4 address
    mapped into IPv6 counts as itself)."""
    addr = ipaddress.ip_address(host.split("%", 1)[0])
    return str(getattr(addr, "ipv4_mapped", None) or addr)


class Connection:
    """One client connection: unanswered input, unsent answers, and the
    clocks its deadlines run on."""

    def __init__(self, sock: socket.socket, source: str, now: float):
        self.sock = sock
        self.source = source
        self.inbuf = bytearray()
        self.out: collections.deque[memoryview] = collections.deque()
        self.queued = 0  # bytes in out
        self.frame_started: float | None = None  # while a partial frame is being read
        self.active = now  # last byte received or sent
        self.sent_at = now  # last progress of the output, while there is some
        self.events = selectors.EVENT_READ

    def queue(self, answer: bytes, now: float) -> None:
        if not self.out:
            self.sent_at = now
        self.out.append(memoryview(struct.pack(">I", len(answer))))
        self.out.append(memoryview(answer))
        self.queued += 4 + len(answer)

    def consume(self, n: int) -> None:
        """Drops n sent bytes from the front of the output."""
        self.queued -= n
        while n:
            head = self.out[0]
            if n < len(head):
                self.out[0] = head[n:]
                return
            n -= len(head)
            self.out.popleft()

    def waiting_since(self) -> float:
        """Since when the connection has been waiting for its client."""
        if self.frame_started is not None:
            return self.frame_started
        return self.sent_at if self.out else self.active


class TcpServer:
    """TCP on the serving port: 4-byte big-endian framing, many requests per
    connection, within `limits` (module docstring)."""

    def __init__(self, core, sock: socket.socket, stop_fd: int, limits: TcpLimits):
        self.core = core
        self.sock = sock
        self.stop_fd = stop_fd
        self.limits = limits
        self.sel = selectors.DefaultSelector()
        self.conns: dict[socket.socket, Connection] = {}
        self.per_source: collections.Counter[str] = collections.Counter()
        self.answerer = None
        self.thread = threading.Thread(target=self._run, name="pwserver-tcp", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def join(self) -> None:
        self.thread.join(timeout=10)

    def _run(self) -> None:
        self.answerer = self.core.answerer(tcp=True)
        try:
            self._loop()
        except Exception:
            log.exception("TCP server failed")
        finally:
            for conn in list(self.conns.values()):
                self._close(conn)
            self.answerer.close()
            self.sel.close()

    def _loop(self) -> None:
        self.sock.setblocking(False)
        self.sel.register(self.sock, selectors.EVENT_READ, None)
        self.sel.register(self.stop_fd, selectors.EVENT_READ, STOP)
        next_sweep = 0.0
        while True:
            for key, events in self.sel.select(timeout=SWEEP_SECONDS):
                if key.data is STOP:
                    return
                now = time.monotonic()
                if key.data is None:
                    self._accept(now)
                else:
                    self._serve(key.data, events, now)
            now = time.monotonic()
            if now >= next_sweep:
                next_sweep = now + SWEEP_SECONDS
                self._sweep(now)

    # ---- places ------------------------------------------------------------

    def _accept(self, now: float) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("accept: %s", e)
                return
            if not self.core.source_allowed(self.answerer.slot, addr[0]):
                sock.close()
                continue
            source = source_of(addr[0])
            if not self._make_room(source, now):
                sock.close()  # at once: the client tries its next server
                continue
            sock.setblocking(False)
            conn = Connection(sock, source, now)
            self.conns[sock] = conn
            self.per_source[source] += 1
            self.sel.register(sock, conn.events, conn)

    def _make_room(self, source: str, now: float) -> bool:
        """Whether a new connection from `source` may stay; when all places
        are taken, frees one of the busiest address if it holds more than
        `source`."""
        held = self.per_source[source]
        if held >= self.limits.max_per_source or len(self.conns) >= self.limits.max_connections:
            self._catch_up(now)  # peers may have closed meanwhile: not theirs to count
            held = self.per_source[source]
        if held >= self.limits.max_per_source:
            self.answerer.count("tcp_refused_source")
            return False
        if len(self.conns) < self.limits.max_connections:
            return True
        busiest = max(self.per_source.values())
        if busiest <= held:
            self.answerer.count("tcp_refused_full")
            return False
        victim = min(
            (c for c in self.conns.values() if self.per_source[c.source] == busiest), key=Connection.waiting_since
        )
        self.answerer.count("tcp_evicted")
        self._close(victim)
        return True

    def _catch_up(self, now: float) -> None:
        """Serves what the connections have ready now (ends among them)."""
        for key, events in self.sel.select(timeout=0):
            if isinstance(key.data, Connection):
                self._serve(key.data, events, now)

    def _sweep(self, now: float) -> None:
        for conn in list(self.conns.values()):
            if conn.frame_started is not None and now - conn.frame_started > self.limits.frame_timeout:
                self.answerer.count("tcp_frame_timeouts")
                self._close(conn)
            elif conn.out and now - conn.sent_at > self.limits.idle_timeout:
                self.answerer.count("tcp_send_timeouts")
                self._close(conn)
            elif now - conn.active > self.limits.idle_timeout:
                self._close(conn)

    def _close(self, conn: Connection) -> None:
        if self.conns.pop(conn.sock, None) is None:
            return
        self.per_source[conn.source] -= 1
        if not self.per_source[conn.source]:
            del self.per_source[conn.source]
        self.sel.unregister(conn.sock)
        conn.sock.close()

    # ---- one connection ----------------------------------------------------

    def _serve(self, conn: Connection, events: int, now: float) -> None:
        if conn.sock not in self.conns:
            return  # closed earlier in this round
        try:
            self._service(conn, events, now)
        except Exception:  # one connection's bug must not stop TCP
            log.exception("TCP connection failed")
            self._close(conn)

    def _service(self, conn: Connection, events: int, now: float) -> None:
        if events & selectors.EVENT_READ and not self._receive(conn, now):
            self._close(conn)
            return
        while True:
            if not self._answer_frames(conn, now):
                self._close(conn)
                return
            sent = self._send(conn, now) if conn.out else 0
            if sent is None:
                self._close(conn)
                return
            # more answers while the client takes them and frames wait
            if not sent or conn.queued > self.limits.max_queued or not _frame_ready(conn.inbuf):
                break
        self._rearm(conn, now)

    def _receive(self, conn: Connection, now: float) -> bool:
        try:
            data = conn.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        if not data:
            return False
        conn.inbuf += data
        conn.active = now
        return True

    def _answer_frames(self, conn: Connection, now: float) -> bool:
        """Answers whole frames while the unsent output is within the bound;
        False closes the connection."""
        buf, start = conn.inbuf, 0
        while conn.queued <= self.limits.max_queued and len(buf) - start >= 4:
            (n,) = struct.unpack_from(">I", buf, start)
            if n > lib.PW_MAX_REQUEST:
                self.answerer.answer(bytes(lib.PW_MAX_REQUEST + 1))  # counted as oversize
                return False
            if len(buf) - start < 4 + n:
                break
            answer = self.answerer.answer(bytes(buf[start + 4 : start + 4 + n]))
            start += 4 + n
            if answer is None:
                return False
            conn.queue(answer, now)
        if start:
            del buf[:start]
            conn.frame_started = None  # the next frame's clock starts when it is read
        return True

    def _send(self, conn: Connection, now: float) -> int | None:
        """Bytes the kernel took (0: its buffer is full), None on error."""
        try:
            sent = conn.sock.sendmsg(list(islice(conn.out, SEND_BUFFERS)))
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:
            return None
        conn.consume(sent)
        if sent:
            conn.active = conn.sent_at = now
        return sent

    def _rearm(self, conn: Connection, now: float) -> None:
        # Back-pressure: past the bound nothing more is read. A partial
        # frame's clock runs only while it is being read: its rest may be
        # waiting in the kernel while we do not read.
        reading = conn.queued <= self.limits.max_queued
        if reading and conn.inbuf:
            if conn.frame_started is None:
                conn.frame_started = now
        else:
            conn.frame_started = None
        events = (selectors.EVENT_READ if reading else 0) | (selectors.EVENT_WRITE if conn.out else 0)
        if events != conn.events:
            conn.events = events
            self.sel.modify(conn.sock, events, conn)


def _frame_ready(buf: bytearray) -> bool:
    """Whether buf starts with a whole frame (or a length past the limit)."""
    if len(buf) < 4:
        return False
    (n,) = struct.unpack_from(">I", buf)
    return n > lib.PW_MAX_REQUEST or len(buf) >= 4 + n
