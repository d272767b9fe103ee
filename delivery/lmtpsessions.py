"""LMTP sessions over asyncio: what pdeliveryd and lmtp-proxy share as servers.

The LMTP machine (delivery/lmtp.py) answers the protocol; this drives it
over a socket and applies the session rules both daemons keep (docs/delivery.md,
"Slow clients"): `sessions_max`, `sessions_per_address_max`, `idle_timeout`
(silence), `data_timeout` (the whole data of one message), 421 to idle
sessions at shutdown. A subclass decides the two policy events: `rcpt()`
(a recipient, answered at once) and `message()` (one reply per accepted
recipient), and makes the bodies (`new_body`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket

from delivery import config as dconfig
from delivery.body import Body
from delivery.lmtp import CLOSED, NEED_DATA, LMTPServerConnection, MessageReceived, PeerError, RcptRequest, Reply
from delivery.metrics import DeliveryCounts

log = logging.getLogger("delivery.sessions")

READ_SIZE = 256 * 1024
TRANSPORT_READ = 256 * 1024  # what asyncio's socket transport reads at once (its max_size)
R_TOO_MANY_SESSIONS = Reply(421, "4.3.2", "too many sessions, try again later")
R_IDLE = Reply(421, "4.4.2", "idle timeout, closing")
R_DATA_TIMEOUT = Reply(421, "4.4.2", "message data too slow, closing")
R_TOO_MANY_FROM_ADDRESS = Reply(421, "4.7.0", "too many sessions from your address, try again later")
R_SHUTDOWN = Reply(421, "4.3.2", "shutting down, try again later")


def ack_now(writer: asyncio.StreamWriter) -> None:
    """ACK what was read at once instead of after Linux's delayed-ACK timer
    (40 ms). A client that writes a message in pieces without TCP_NODELAY
    (Sendmail's LMTP mailer: 4096 bytes, the rest, then the final dot)
    holds each small piece back until the previous one is ACKed (Nagle), so
    a delayed ACK cost every message 40 ms. The kernel clears the flag as it
    goes, hence once per read of message data (a command read is ACKed by
    its reply; each call is a system call); a UNIX socket has no ACKs."""
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        except OSError:  # the connection is already gone: the next read says so
            pass


def reader_memory_bound() -> int:
    """Bytes of a session's input held at most: the stream reader's buffer
    (it stops the socket past 2 x READ_SIZE, plus the read in flight) and
    the LMTP machine's input (one read; the held DATA is a few bytes)."""
    return 2 * READ_SIZE + TRANSPORT_READ + READ_SIZE


class LMTPSessions:
    """The sessions of one LMTP server; subclasses give the policy."""

    greeting = "LMTP ready"
    dsn = False  # accept RFC 3461 parameters on MAIL and RCPT (lmtp.py)

    def __init__(self, cfg: dict, hostname: str):
        # the subclass calls self.apply(cfg) once its own parts exist
        self.hostname = hostname
        # open sessions -> when their pending read began (None: not reading)
        self.sessions: dict[asyncio.StreamWriter, float | None] = {}
        # sessions in a message's data -> when that data began (data_timeout)
        self.in_data: dict[asyncio.StreamWriter, float] = {}
        # client address -> its open sessions (sessions_per_address_max)
        self.per_address: collections.Counter[str] = collections.Counter()
        self.busy: set[asyncio.StreamWriter] = set()  # sessions whose message is being delivered
        self.conns: dict[asyncio.StreamWriter, LMTPServerConnection] = {}
        self.stopping = False
        self.refused_sessions = 0
        self.counts = DeliveryCounts()  # replies and latency (delivery/metrics.py)
        self._sweeper: asyncio.Task | None = None
        self.cfg = cfg

    def apply(self, cfg: dict) -> None:
        """Settings that may change at run time (SIGHUP)."""
        self.cfg = cfg
        self.limits = dconfig.limits_from(cfg)
        if int(cfg["sessions_per_address_max"]) >= int(cfg["sessions_max"]):
            log.warning(
                "sessions_per_address_max %s is not below sessions_max %s: one client address can take every session",
                cfg["sessions_per_address_max"],
                cfg["sessions_max"],
            )

    # -- policy (subclasses) -----------------------------------------------------
    def new_body(self) -> Body:
        raise NotImplementedError

    async def rcpt(self, ev: RcptRequest, accepted: list) -> Reply:
        """The answer to one RCPT; append what message() needs of an accepted one to `accepted`."""
        raise NotImplementedError

    async def message(self, ev: MessageReceived, accepted: list) -> list[Reply]:
        """One reply per recipient of `ev` (`accepted` holds theirs, in order)."""
        raise NotImplementedError

    # -- sessions ----------------------------------------------------------------
    def start_sweeper(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self.sweep_idle())

    def _refusal(self, client: str) -> Reply | None:
        if self.stopping:
            return R_SHUTDOWN
        if len(self.sessions) >= int(self.cfg["sessions_max"]):
            return R_TOO_MANY_SESSIONS
        if self.per_address[client] >= int(self.cfg["sessions_per_address_max"]):
            # below sessions_max, so one address cannot take every slot
            return R_TOO_MANY_FROM_ADDRESS
        return None

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        client = peer[0] if isinstance(peer, tuple) else str(peer or "unix")
        refusal = self._refusal(client)
        if refusal is not None:
            self.refused_sessions += 1
            writer.write(bytes(refusal))
            await close_writer(writer)
            return
        self.sessions[writer] = None
        self.per_address[client] += 1
        conn = LMTPServerConnection(self.hostname, self.limits, self.greeting, new_body=self.new_body, dsn=self.dsn)
        self.conns[writer] = conn
        accepted: list = []  # what rcpt() kept of each accepted RCPT, in order
        messages = 0
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    ev = conn.next_event()
                except PeerError as e:
                    log.info("%s: %s", peer, e)
                    writer.write(conn.data_to_send())
                    break
                if ev is CLOSED:
                    writer.write(conn.data_to_send())
                    break
                if ev is NEED_DATA:
                    out = conn.data_to_send()
                    if out:
                        writer.write(out)
                        await writer.drain()
                    if self.stopping and conn.phase == conn.READY:
                        writer.write(bytes(R_SHUTDOWN))
                        break
                    in_message = conn.phase in (conn.DATA, conn.BDAT) or conn.in_transaction_data
                    if in_message:
                        # the data clock starts once and runs to the end of the message
                        self.in_data.setdefault(writer, loop.time())
                    else:
                        self.in_data.pop(writer, None)
                    self.sessions[writer] = loop.time()  # the idle sweeper watches from here
                    data = await reader.read(READ_SIZE)
                    if in_message:  # where a client writes pieces with no reply between them
                        ack_now(writer)
                    self.sessions[writer] = None
                    conn.receive_data(data)
                elif isinstance(ev, RcptRequest):
                    conn.answer_rcpt(await self.rcpt(ev, accepted))
                elif isinstance(ev, MessageReceived):
                    self.in_data.pop(writer, None)
                    self.busy.add(writer)
                    started = loop.time()
                    try:
                        replies = await self.message(ev, accepted[-len(ev.recipients) :])
                    finally:
                        self.busy.discard(writer)
                    self.counts.delivered(replies, loop.time() - started)
                    accepted.clear()
                    messages += 1
                    conn.answer_message(replies)
                if conn.phase == conn.READY and not conn.recipients:
                    accepted.clear()  # RSET, LHLO or a refused transaction
        except (ConnectionError, OSError) as e:
            log.info("%s: connection lost: %s", peer, e)
        finally:
            conn.close()
            self.conns.pop(writer, None)
            self.sessions.pop(writer, None)
            self.in_data.pop(writer, None)
            self.per_address[client] -= 1
            if self.per_address[client] <= 0:
                del self.per_address[client]
            self.session_ended(peer, messages)
            await close_writer(writer)

    def session_ended(self, peer, messages: int) -> None:
        """Hook: a session closed after `messages` messages."""

    async def sweep_idle(self) -> None:
        """Say 421 to and close sessions silent for idle_timeout, or whose
        message data has taken longer than data_timeout in all (a client
        trickling a byte now and then restarts the idle clock, not this one).
        One timer for all sessions instead of a timeout per read."""
        loop = asyncio.get_running_loop()
        while not self.stopping:
            idle = float(self.cfg["idle_timeout"])
            data_max = float(self.cfg["data_timeout"])
            await asyncio.sleep(min(1.0, idle / 4, data_max / 4))
            now = loop.time()
            for w, since in list(self.sessions.items()):
                if since is None:
                    continue  # not reading: delivering or writing
                if now - since > idle:
                    self._cut(w, R_IDLE)
                elif now - self.in_data.get(w, now) > data_max:
                    log.info("%s: message data took over %.0f s: cut", w.get_extra_info("peername"), data_max)
                    self._cut(w, R_DATA_TIMEOUT)

    def _cut(self, w: asyncio.StreamWriter, reply: Reply) -> None:
        """421 and close: the pending read sees EOF, and the unfinished
        transaction is dropped with the session (nothing of it was kept)."""
        self.sessions[w] = None
        self.in_data.pop(w, None)
        w.write(bytes(reply))
        w.transport.close()

    def request_stop(self) -> None:
        """Stop taking sessions (the caller closes its listeners): idle
        sessions get 421 now, the others when their transaction is over."""
        if self.stopping:
            return
        self.stopping = True
        log.info("stopping: %d session(s) open, %d delivering", len(self.sessions), len(self.busy))
        for w in list(self.sessions):
            conn = self.conns.get(w)
            if w not in self.busy and (conn is None or conn.phase in (conn.INIT, conn.READY)):
                # between transactions: tell it, and end its read with EOF
                try:
                    w.write(bytes(R_SHUTDOWN))
                except Exception:
                    pass
                w.transport.close()

    def abort_all(self) -> None:
        """After the grace: close what is still open."""
        for w in list(self.sessions):
            w.transport.abort()


async def close_writer(writer: asyncio.StreamWriter) -> None:
    try:
        writer.close()
        await writer.wait_closed()
    except (ConnectionError, OSError):
        pass
