"""The Python client of pwserver, synchronous (`Client`) and asyncio
(`AsyncClient`).

Both follow docs/protocol.md and share one sans-I/O plan (`QueryPlan`) for
choosing servers: the first live server at once, the next one after
`hedge_ms` without an answer (a hedged request), each try waiting at most
`timeout_ms`. Servers found dead are remembered in the process and in the
shared health record, so the next lookup (in any process on the host) goes
straight to a live one; a dead server is tried again after `recheck_s`.

`None` means the server said NOTFOUND; `Unavailable` means no server
answered. The two are never confused.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

from . import config as config_mod
from .health import HealthRecord
from .protocol import (
    KEY_NETWORK,
    KEY_SHADOW,
    MAX_TCP_ANSWER,
    SHADOW_OPS,
    Answer,
    GroupEntry,
    MailhostEntry,
    Op,
    PasswdEntry,
    ProtocolError,
    ShadowEntry,
    Status,
    decode_answer,
    encode_request,
    frame,
    new_request_id,
    parse_payload,
    read_keyfile,
    seal,
    sealed_key_id,
    unseal,
)

__all__ = [
    "Client",
    "AsyncClient",
    "PwError",
    "Unavailable",
    "Denied",
    "BadRequest",
    "PasswdEntry",
    "GroupEntry",
    "ShadowEntry",
    "MailhostEntry",
]

MAX_UDP_PACKET = 65536
ASYNC_RCVBUF = 4 * 1024 * 1024  # capped by net.core.rmem_max


class PwError(Exception):
    """Base of the client's errors."""


class Unavailable(PwError):
    """No server answered (timeouts, errors): a temporary failure."""


class Denied(PwError):
    """The server refused the request (shadow without the shadow key)."""


class BadRequest(PwError):
    """The server found the request malformed (a bug, or a bad name)."""


Server = tuple[str, int]

# Statuses after which the query is over, whatever other servers would say.
FINAL = {Status.OK, Status.NOTFOUND, Status.DENIED, Status.BADREQUEST}


class QueryPlan:
    """Which server to ask when, for one query (sans-I/O).

    `servers` are in priority order; those the health record says are down
    go last. Server k (in that order) is asked `k * hedge` seconds after the
    start, or at once when every server asked so far has failed; each try
    lasts `timeout` seconds. Within a try the request is sent again after
    RETRANSMIT_FIRST seconds, then at doubling intervals, so one lost
    datagram costs a fraction of the timeout rather than all of it.
    """

    RETRANSMIT_FIRST = 0.2

    def __init__(self, servers: list[Server], health: HealthRecord, timeout: float, hedge: float, now: float):
        wall = time.time()
        live = [s for s in servers if not health.is_down(key(s), wall)]
        down = [s for s in servers if s not in live]
        self.order = live + down
        self.timeout = timeout
        self.hedge = hedge
        self.start = now
        self.sent: dict[Server, float] = {}  # first send of each try
        self.resend: dict[Server, tuple[float, float]] = {}  # next resend, interval
        self.failed: set[Server] = set()

    def _in_flight(self, now: float) -> list[Server]:
        return [s for s in self.sent if s not in self.failed and now < self.sent[s] + self.timeout]

    def _next_new(self) -> float | None:
        """When the next server not yet asked is due (None: all asked)."""
        k = len(self.sent)
        return self.start + k * self.hedge if k < len(self.order) else None

    def due(self, now: float) -> list[Server]:
        """Servers to send to now (new tries and retransmissions)."""
        in_flight = self._in_flight(now)
        out = []
        for srv in in_flight:
            at, interval = self.resend[srv]
            if now >= at:
                out.append(srv)
                self.resend[srv] = (now + 2 * interval, 2 * interval)
        nxt = self._next_new()
        if nxt is not None and (not in_flight or now >= nxt):
            srv = self.order[len(self.sent)]
            self.sent[srv] = now
            self.resend[srv] = (now + self.RETRANSMIT_FIRST, self.RETRANSMIT_FIRST)
            out.append(srv)
        return out

    def wait(self, now: float) -> float | None:
        """Seconds until something is due; None when the query has failed."""
        in_flight = self._in_flight(now)
        nxt = self._next_new()
        if not in_flight:
            return None if nxt is None else 0.0
        events = [self.sent[s] + self.timeout for s in in_flight]
        events += [self.resend[s][0] for s in in_flight]
        if nxt is not None:
            events.append(nxt)
        return max(0.0, min(events) - now)

    def failure(self, srv: Server) -> None:
        self.failed.add(srv)

    def settle(self, health: HealthRecord, winner: Server | None) -> None:
        """Record who was dead: servers asked before the winner that did not
        answer in time, or every server asked when nobody answered."""
        for srv, _ in sorted(self.sent.items(), key=lambda kv: kv[1]):
            if srv == winner:
                if health.down_until(key(srv)):
                    health.mark_up(key(srv))
                break
            health.mark_down(key(srv))


def key(srv: Server) -> str:
    return config_mod.format_hostport(srv)


class _Base:
    def __init__(
        self,
        servers: list[str] | None = None,
        *,
        timeout_ms: int | None = None,
        hedge_ms: int | None = None,
        keyfile: str | None = None,
        shadow_keyfile: str | None = None,
        health_file: str | None = "",
        recheck_s: float | None = None,
        config: config_mod.ClientConfig | None = None,
    ):
        # What the caller gave stays over whatever the file says, at every reconfigure().
        self._overrides = {
            "servers": servers,
            "timeout_ms": timeout_ms,
            "hedge_ms": hedge_ms,
            "keyfile": keyfile,
            "shadow_keyfile": shadow_keyfile,
            "health_file": health_file,
            "recheck_s": recheck_s,
        }
        self._config_path: str | None = None  # from_config's file, re-read by reconfigure()
        self.health: HealthRecord | None = None
        self._apply(config or config_mod.ClientConfig(), **self._overrides)

    def _apply(
        self,
        cfg: config_mod.ClientConfig,
        *,
        servers,
        timeout_ms,
        hedge_ms,
        keyfile,
        shadow_keyfile,
        health_file,
        recheck_s,
    ) -> None:
        """The configuration in use from now on; everything that can fail
        (a key file) comes first, so a failure changes nothing."""
        if servers:
            cfg.servers = [config_mod.parse_hostport(s) for s in servers]
            if health_file == "":
                health_file = None  # explicit servers: no shared record unless asked
        keyfile = keyfile or cfg.keyfile
        shadow_keyfile = shadow_keyfile or cfg.shadow_keyfile
        network_key = read_keyfile(keyfile) if keyfile else None
        shadow_key = None
        if shadow_keyfile:
            try:
                shadow_key = read_keyfile(shadow_keyfile)
            except PermissionError:
                shadow_key = None  # not root: shadow lookups will be denied
        health_path = cfg.health_file if health_file == "" else health_file
        recheck = recheck_s if recheck_s is not None else cfg.recheck_s
        self.servers: list[Server] = list(cfg.servers)
        self.timeout = (timeout_ms if timeout_ms is not None else cfg.timeout_ms) / 1000.0
        self.hedge = (hedge_ms if hedge_ms is not None else cfg.hedge_ms) / 1000.0
        self.network_key, self.shadow_key = network_key, shadow_key
        if self.health is None or (self.health.path, self.health.recheck_s) != (health_path, recheck):
            self.health = HealthRecord(health_path, recheck)  # else what it learnt is kept
        self._addr_cache: dict[Server, tuple[int, Any]] = {}

    @classmethod
    def from_config(cls, path: str | None = None, **overrides):
        client = cls(config=config_mod.load(path), **overrides)
        client._config_path = path or ""
        return client

    def reconfigure(self) -> bool:
        """Re-reads the client configuration file (SIGHUP: servers, timeouts,
        keys, the health record), the constructor's arguments still over it.
        Queries in flight finish with what they started with. False for a
        client not made by from_config (nothing to re-read); a file or key
        that cannot be used raises (ConfigError, OSError) and changes nothing."""
        if self._config_path is None:
            return False
        self._apply(config_mod.load(self._config_path or None), **self._overrides)
        return True

    # -- packets ---------------------------------------------------------
    def _key_for(self, op: Op) -> tuple[int, bytes | None]:
        if op in SHADOW_OPS and self.shadow_key:
            return KEY_SHADOW, self.shadow_key
        if self.network_key:
            return KEY_NETWORK, self.network_key
        return 0, None

    def _packet(self, op: Op, arg: Any, rid: int, pad: bool = True) -> bytes:
        key_id, k = self._key_for(op)
        if k is None:
            return encode_request(op, arg, rid, pad_to=256 if pad else 0)
        return seal(k, key_id, encode_request(op, arg, rid, pad_to=0))

    def _decode(self, packet: bytes) -> tuple[int, Answer]:
        """(key id, answer) of a packet from a server; raises ProtocolError."""
        key_id = sealed_key_id(packet)
        if key_id:
            k = {KEY_NETWORK: self.network_key, KEY_SHADOW: self.shadow_key}.get(key_id)
            if k is None:
                raise ProtocolError(f"answer sealed with key {key_id}, which we do not hold")
            packet = unseal(k, packet)
        return key_id, decode_answer(packet)

    def _open(self, op: Op, packet: bytes) -> Answer:
        key_id, ans = self._decode(packet)
        self._check_key(op, key_id)
        return ans

    def _check_key(self, op: Op, key_id: int) -> None:
        if key_id != self._key_for(op)[0]:
            raise ProtocolError("answer not sealed with the request's key")

    def _resolve(self, srv: Server):
        """(family, sockaddr) of a server, resolved once."""
        hit = self._addr_cache.get(srv)
        if hit is None:
            fam, _, _, _, sa = socket.getaddrinfo(srv[0], srv[1], type=socket.SOCK_DGRAM)[0]
            hit = self._addr_cache[srv] = (fam, sa)
        return hit

    def _tcp_result(self, srv: Server, op: Op, rid: int, ans: Answer) -> Any:
        """The result of an answer over TCP, where anything but a final
        answer to our own request means the server is unusable."""
        if ans.request_id != rid:
            raise Unavailable(f"{key(srv)} over TCP: wrong request id")
        if ans.status not in FINAL:
            raise Unavailable(f"{key(srv)} over TCP: {ans.status.name}")
        return self._result(op, ans)

    @staticmethod
    def _result(op: Op, ans: Answer) -> Any:
        if ans.status == Status.OK:
            return parse_payload(op, ans.payload)
        if ans.status == Status.NOTFOUND:
            return None
        if ans.status == Status.DENIED:
            raise Denied(f"{op.name} denied by the server")
        raise BadRequest(f"{op.name} refused as a bad request")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return bytes(buf)


class Client(_Base):
    """Synchronous client; safe to share between threads and across fork
    (each thread and process gets its own socket)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._local = threading.local()

    def _sock(self) -> socket.socket:
        loc = self._local
        if getattr(loc, "pid", None) != os.getpid():
            loc.socks = {}
            loc.pid = os.getpid()
        return loc.socks

    def _udp(self, srv: Server) -> socket.socket:
        """This thread's socket connected to `srv`: as in the C client, a
        server whose port refuses (ICMP port unreachable) fails at once
        with ECONNREFUSED instead of after the whole timeout, and only that
        server's answers reach it."""
        socks = self._sock()
        s = socks.get(srv)
        if s is None:
            fam, sa = self._resolve(srv)
            s = socket.socket(fam, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            s.setblocking(False)
            s.connect(sa)
            socks[srv] = s
        return s

    def close(self) -> None:
        for s in getattr(self._local, "socks", {}).values():
            s.close()
        self._local.socks = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def query(self, op: Op, arg: Any = None) -> Any:
        op = Op(op)
        if op in (Op.PASSWD_ENUM, Op.GROUP_ENUM, Op.SHADOW_ENUM):
            return self._tcp_query(self.servers[0], op, arg)
        rid = new_request_id()
        packet = self._packet(op, arg, rid)
        plan = QueryPlan(self.servers, self.health, self.timeout, self.hedge, time.monotonic())
        while True:
            now = time.monotonic()
            for srv in plan.due(now):
                try:
                    self._udp(srv).send(packet)
                except OSError:
                    plan.failure(srv)
            wait = plan.wait(time.monotonic())
            if wait is None:
                plan.settle(self.health, None)
                raise Unavailable(f"no password server answered {op.name} ({', '.join(key(s) for s in plan.sent)})")
            asked = {self._udp(srv): srv for srv in plan.sent if srv not in plan.failed}
            ready, _, _ = select.select(list(asked), [], [], wait)
            for sock in ready:
                srv = asked[sock]
                while True:
                    try:
                        data = sock.recv(MAX_UDP_PACKET)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:  # ECONNREFUSED (nothing on that port) or unreachable: the next one now
                        plan.failure(srv)
                        break
                    try:
                        ans = self._open(op, data)
                    except ProtocolError:
                        continue
                    if ans.request_id != rid:
                        continue  # a late answer to an earlier query
                    if ans.status == Status.TRUNCATED:
                        try:
                            result = self._tcp_query(srv, op, arg)
                        except Unavailable:
                            plan.failure(srv)
                            continue
                        plan.settle(self.health, srv)
                        return result
                    if ans.status not in FINAL:
                        plan.failure(srv)
                        continue
                    plan.settle(self.health, srv)
                    return self._result(op, ans)

    def _tcp_query(self, srv: Server, op: Op, arg: Any) -> Any:
        rid = new_request_id()
        packet = self._packet(op, arg, rid, pad=False)
        try:
            with socket.create_connection(srv, timeout=self.timeout) as s:
                s.sendall(frame(packet))
                (n,) = struct.unpack(">I", _recv_exact(s, 4))
                if n > MAX_TCP_ANSWER + 64:
                    raise ProtocolError(f"TCP answer of {n} bytes")
                ans = self._open(op, _recv_exact(s, n))
        except (OSError, ProtocolError) as e:
            raise Unavailable(f"{key(srv)} over TCP: {e}") from None
        return self._tcp_result(srv, op, rid, ans)

    # -- the operations ----------------------------------------------------
    def passwd_by_name(self, name: str) -> PasswdEntry | None:
        return self.query(Op.PASSWD_BY_NAME, name)

    def passwd_by_uid(self, uid: int) -> PasswdEntry | None:
        return self.query(Op.PASSWD_BY_UID, uid)

    def group_by_name(self, name: str) -> GroupEntry | None:
        return self.query(Op.GROUP_BY_NAME, name)

    def group_by_gid(self, gid: int) -> GroupEntry | None:
        return self.query(Op.GROUP_BY_GID, gid)

    def initgroups(self, name: str) -> list[int] | None:
        return self.query(Op.INITGROUPS, name)

    def shadow_by_name(self, name: str) -> ShadowEntry | None:
        return self.query(Op.SHADOW_BY_NAME, name)

    def mailhost(self, name: str) -> MailhostEntry | None:
        return self.query(Op.MAILHOST, name)

    def stats(self) -> dict[str, int]:
        return self.query(Op.STATS)

    def ping(self) -> Any:
        return self.query(Op.PING)

    def enumerate(self, op: Op = Op.PASSWD_ENUM) -> Iterator[Any]:
        """Every record of a map, page by page over TCP."""
        index: int | None = 0
        while index is not None:
            page = self.query(op, index)
            if page is None:
                return
            index, records = page
            yield from records


class _Inbox:
    """Answers to one asyncio query, and a wait for the next with a timeout
    (an asyncio.Queue under wait_for costs a Task and two more futures per wait)."""

    __slots__ = ("items", "waiter")

    def __init__(self) -> None:
        self.items: list = []
        self.waiter: asyncio.Future | None = None

    def put_nowait(self, item) -> None:
        self.items.append(item)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def get(self, loop: asyncio.AbstractEventLoop, timeout: float):
        """The next answer, or None after `timeout` seconds."""
        if not self.items and timeout > 0:
            self.waiter = loop.create_future()
            timer = loop.call_later(timeout, _wake, self.waiter)
            try:
                await self.waiter
            finally:
                timer.cancel()
                self.waiter = None
        return self.items.pop(0) if self.items else None


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


class AsyncClient(_Base):
    """asyncio client: one UDP socket per client, many queries in flight."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._socks: dict[int, socket.socket] = {}
        self._waiting: dict[int, _Inbox] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def _udp(self, family: int) -> socket.socket:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._close_socks()
            self._loop = loop
        s = self._socks.get(family)
        if s is None:
            s = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            s.setblocking(False)
            # many answers may arrive at once: room for thousands of them
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, ASYNC_RCVBUF)
            loop.add_reader(s.fileno(), self._readable, s)
            self._socks[family] = s
        return s

    def _readable(self, sock: socket.socket) -> None:
        while True:
            try:
                data, sa = sock.recvfrom(MAX_UDP_PACKET)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            try:
                key_id, ans = self._decode(data)
            except ProtocolError:
                continue  # garbage or forged: dropped
            inbox = self._waiting.get(ans.request_id)
            if inbox is not None:
                inbox.put_nowait((sock.family, sa, key_id, ans))

    def _close_socks(self) -> None:
        for s in self._socks.values():
            if self._loop is not None and not self._loop.is_closed():
                try:
                    self._loop.remove_reader(s.fileno())
                except Exception:
                    pass
            s.close()
        self._socks = {}

    async def close(self) -> None:
        self._close_socks()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def query(self, op: Op, arg: Any = None) -> Any:
        op = Op(op)
        if op in (Op.PASSWD_ENUM, Op.GROUP_ENUM, Op.SHADOW_ENUM):
            return await self._tcp_query(self.servers[0], op, arg)
        loop = asyncio.get_running_loop()
        rid = new_request_id()
        packet = self._packet(op, arg, rid)
        inbox = _Inbox()
        self._waiting[rid] = inbox
        plan = QueryPlan(self.servers, self.health, self.timeout, self.hedge, loop.time())
        addrs: dict[Any, Server] = {}
        try:
            while True:
                for srv in plan.due(loop.time()):
                    try:
                        fam, sa = self._resolve(srv)
                        self._udp(fam).sendto(packet, sa)
                        addrs[(fam, sa[:2])] = srv
                    except OSError:
                        plan.failure(srv)
                wait = plan.wait(loop.time())
                if wait is None:
                    plan.settle(self.health, None)
                    raise Unavailable(f"no password server answered {op.name}")
                got = await inbox.get(loop, wait)
                if got is None:
                    continue
                fam, sa, key_id, ans = got
                srv = addrs.get((fam, sa[:2]))
                if srv is None:
                    continue  # right id from the wrong address: forged
                try:
                    self._check_key(op, key_id)
                except ProtocolError:
                    continue
                if ans.status == Status.TRUNCATED:
                    try:
                        result = await self._tcp_query(srv, op, arg)
                    except Unavailable:
                        plan.failure(srv)
                        continue
                    plan.settle(self.health, srv)
                    return result
                if ans.status not in FINAL:
                    plan.failure(srv)
                    continue
                plan.settle(self.health, srv)
                return self._result(op, ans)
        finally:
            del self._waiting[rid]

    async def _tcp_query(self, srv: Server, op: Op, arg: Any) -> Any:
        rid = new_request_id()
        packet = self._packet(op, arg, rid, pad=False)
        writer = None
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_connection(srv[0], srv[1])
                writer.write(frame(packet))
                (n,) = struct.unpack(">I", await reader.readexactly(4))
                if n > MAX_TCP_ANSWER + 64:
                    raise ProtocolError(f"TCP answer of {n} bytes")
                ans = self._open(op, await reader.readexactly(n))
        except (OSError, ProtocolError, asyncio.IncompleteReadError, TimeoutError) as e:
            raise Unavailable(f"{key(srv)} over TCP: {e!r}") from None
        finally:
            if writer is not None:
                writer.close()
        return self._tcp_result(srv, op, rid, ans)

    async def passwd_by_name(self, name: str) -> PasswdEntry | None:
        return await self.query(Op.PASSWD_BY_NAME, name)

    async def passwd_by_uid(self, uid: int) -> PasswdEntry | None:
        return await self.query(Op.PASSWD_BY_UID, uid)

    async def group_by_name(self, name: str) -> GroupEntry | None:
        return await self.query(Op.GROUP_BY_NAME, name)

    async def group_by_gid(self, gid: int) -> GroupEntry | None:
        return await self.query(Op.GROUP_BY_GID, gid)

    async def initgroups(self, name: str) -> list[int] | None:
        return await self.query(Op.INITGROUPS, name)

    async def shadow_by_name(self, name: str) -> ShadowEntry | None:
        return await self.query(Op.SHADOW_BY_NAME, name)

    async def mailhost(self, name: str) -> MailhostEntry | None:
        return await self.query(Op.MAILHOST, name)

    async def stats(self) -> dict[str, int]:
        return await self.query(Op.STATS)

    async def ping(self) -> Any:
        return await self.query(Op.PING)
