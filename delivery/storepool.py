"""lmtp-proxy's side towards the stores: pooled LMTP client connections over asyncio.

One `StorePool` holds, per store (host, port), up to `proxy_pool_size` idle
connections that have spoken LHLO, for `proxy_pool_idle` seconds; at most
`proxy_store_connections_max` transactions are on a store's connections at
once (the others wait for a place, up to `timeout`, so that the proxy stays
below the store's sessions_per_address_max). A transaction takes an idle
connection (or opens one),
sends `RSET` first when it was used before, then MAIL, the RCPTs (pipelined
when the store offers PIPELINING; the client's DSN parameters on both when
the store offers DSN, else none) and the body from its spool (`BDAT n LAST`
with CHUNKING, else DATA, dot-stuffed as it goes), and reads one reply per
accepted recipient. With both PIPELINING and CHUNKING (pdeliveryd) the whole
transaction goes in one write, BDAT and the body's first piece with the
commands, and the replies are read after it: one round trip a message, not
two (RFC 3030 lets BDAT be pipelined; with no recipient accepted the store
answers BDAT once, its refusal). Replies are checked as lmtpclient checks
them (each one must be one its command can have, in order).

A pooled connection the store closed (its idle timeout, a restart) is
dropped unused when its end of file is already in; one found closed only
once the transaction went (the store closed it as it came, or was killed)
is retried once on a new connection, and only when the store answered
nothing of that transaction and closed the connection (never after a
timeout: a slow store may still be storing it). The store then cannot have
said `250`, and it stores nothing before it has a whole message; if it was
killed between storing one and answering, its durable duplicate table
(queue id, recipient, digest) answers the retry without a second copy, as
it does the MTA's own retry. The idle connections of that store are dropped
too. Nothing else is retried (a 451 to the MTA, which retries).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass

from delivery.lmtp import Reply
from delivery.lmtpclient import (
    REPLY_LINE_MAX,
    LMTPProtocolError,
    LMTPUnavailable,
    check_fits,
    command_line,
    continues,
    extensions,
    mail_params,
    parse_reply,
)
from delivery.spool import SpooledBody

log = logging.getLogger("lmtp-proxy.stores")

SEND_CHUNK = 256 * 1024  # bytes of a body read from the spool and written to a store at once
# a body's first piece up to this size goes out in the same write as the pipelined commands (one
# system call, one segment); a bigger one on its own, so no copy of SEND_CHUNK is made to join them
JOIN_MAX = 64 * 1024


@dataclass(frozen=True)
class Envelope:
    """What a MAIL command to a store carries (SIZE is the body's; the
    rest is offered only where the store announces it)."""

    sender: str
    queue_id: str | None = None
    body_type: str = ""  # BODY= as the client gave it
    dsn: str = ""  # the client's RFC 3461 MAIL parameters, " RET=... ENVID=...", for a store offering DSN


@dataclass(frozen=True)
class Recipient:
    """A RCPT for a store: the address, and the client's RFC 3461 parameters
    (" NOTIFY=... ORCPT=...") for a store offering DSN. A store without DSN
    gets the bare address: it would refuse them (555), and the notices they
    ask for are the MTA's to send anyway."""

    address: str
    dsn: str = ""


class DotStuffer:
    """Dot-stuffs a body given in pieces of any size (for a store without CHUNKING)."""

    def __init__(self):
        self._tail = b"\r\n"  # the last two bytes seen: the start is a line start

    def __call__(self, piece: bytes) -> bytes:
        joined = self._tail + piece
        out = joined.replace(b"\r\n.", b"\r\n..")[len(self._tail) :]
        self._tail = joined[-2:]
        return out

    def end(self) -> bytes:
        return (b"" if self._tail == b"\r\n" else b"\r\n") + b".\r\n"


class StoreClosed(LMTPUnavailable):
    """The store closed the connection (end of file, reset)."""


def _check_rset(reply: Reply) -> None:
    if reply.code == 421:  # said while the connection sat in the pool (a restart): nothing of ours was taken
        raise StoreClosed(f"store closing the connection: {reply}")
    if not reply.ok:
        raise LMTPUnavailable("RSET refused")


class StoreConnection:
    """One LMTP session with a store, between transactions or in one."""

    def __init__(
        self, host: str, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float
    ):
        self.host, self.port = host, port
        self.reader, self.writer = reader, writer
        self.timeout = timeout
        self.ext: set[str] = set()
        self.used = False  # a transaction ran on it: RSET before the next
        self.data_sent = False  # the current transaction's data began to go
        self.answered = False  # the store replied to something of the current transaction
        self.idle_since = 0.0

    @classmethod
    async def open(cls, host: str, port: int, helo: str, connect_timeout: float, timeout: float):
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, limit=REPLY_LINE_MAX), connect_timeout
            )
        except (TimeoutError, OSError) as e:
            raise LMTPUnavailable(f"connect to {host}:{port}: {e or 'timed out'}") from e
        conn = cls(host, port, reader, writer, timeout)
        try:
            greeting, _ = await conn.answer("greeting")
            if greeting.code != 220:
                raise LMTPUnavailable(f"greeting: {greeting}")
            await conn.send(command_line(f"LHLO {helo}"))
            lhlo, lines = await conn.answer("LHLO")
            if lhlo.code != 250:
                raise LMTPUnavailable(f"LHLO: {lhlo}")
        except BaseException:
            conn.close()
            raise
        conn.ext = extensions(lines)
        return conn

    @property
    def enhanced(self) -> bool:
        return "ENHANCEDSTATUSCODES" in self.ext

    async def _line(self) -> str:
        try:
            line = await asyncio.wait_for(self.reader.readline(), self.timeout)
        except TimeoutError:
            raise LMTPUnavailable(f"no reply in {self.timeout:g} s") from None
        except ValueError:  # longer than the reader's limit
            raise LMTPUnavailable("reply line too long") from None
        except OSError as e:
            raise StoreClosed(str(e)) from e
        if not line.endswith(b"\n"):
            raise StoreClosed("connection closed by the server")
        return line.rstrip(b"\r\n").decode("utf-8", "replace")

    async def answer(self, command: str) -> tuple[Reply, list[str]]:
        raw = [await self._line()]
        while continues(raw[-1], len(raw)):
            raw.append(await self._line())
        reply, lines = parse_reply(raw)
        # a 421 closes the channel (RFC 5321 3.8): what came after it was not taken
        self.answered = self.answered or reply.code != 421
        check_fits(command, reply, self.enhanced)
        return reply, lines

    async def send(self, data: bytes) -> None:
        try:
            self.writer.write(data)
            await asyncio.wait_for(self.writer.drain(), self.timeout)
        except TimeoutError:
            raise LMTPUnavailable(f"store took nothing for {self.timeout:g} s") from None
        except OSError as e:
            raise StoreClosed(str(e)) from e

    def mail_line(self, env: Envelope, size: int) -> bytes:
        params = mail_params(self.ext, size, env.queue_id, env.body_type) + (env.dsn if "DSN" in self.ext else "")
        return command_line(f"MAIL FROM:<{env.sender}>{params}")

    def rcpt_line(self, rcpt: Recipient) -> bytes:
        return command_line(f"RCPT TO:<{rcpt.address}>{rcpt.dsn if 'DSN' in self.ext else ''}")

    async def transaction(self, env: Envelope, rcpts: list[Recipient], body: SpooledBody) -> list[Reply]:
        """One reply per recipient: its refusal, or the store's reply after the data."""
        self.data_sent = self.answered = False
        mail = self.mail_line(env, body.size)
        cmds = [("RSET", b"RSET\r\n")] if self.used else []
        cmds += [("MAIL", mail)] + [("RCPT", self.rcpt_line(r)) for r in rcpts]
        self.used = True
        if "PIPELINING" in self.ext and "CHUNKING" in self.ext:
            return await self._pipelined(cmds, body)
        replies = []
        if "PIPELINING" in self.ext:
            await self.send(b"".join(c for _, c in cmds))
            for verb, _ in cmds:
                replies.append((await self.answer(verb))[0])
        else:
            for verb, c in cmds:
                await self.send(c)
                replies.append((await self.answer(verb))[0])
        if cmds[0][0] == "RSET":
            _check_rset(replies.pop(0))
        mail_reply, rcpt_replies = replies[0], replies[1:]
        if not mail_reply.ok:
            return [mail_reply] * len(rcpts)
        accepted = [i for i, r in enumerate(rcpt_replies) if r.ok]
        if accepted:
            go = await self._send_body(body)
            if go is not None:
                return [go if r.ok else r for r in rcpt_replies]
            for i in accepted:
                rcpt_replies[i] = (await self.answer("message"))[0]
        return rcpt_replies

    async def _pipelined(self, cmds: list[tuple[str, bytes]], body: SpooledBody) -> list[Reply]:
        """The commands, `BDAT size LAST` and the body in one go, then the replies."""
        pieces = body.chunks(SEND_CHUNK)
        head = b"".join(c for _, c in cmds) + b"BDAT %d LAST\r\n" % body.size
        first = next(pieces, b"")
        self.data_sent = True
        if len(first) <= JOIN_MAX:
            await self.send(head + first)
        else:
            await self.send(head)
            await self.send(first)
        for piece in pieces:
            await self.send(piece)
        replies = [(await self.answer(verb))[0] for verb, _ in cmds]
        if cmds[0][0] == "RSET":
            _check_rset(replies.pop(0))
        mail_reply, rcpt_replies = replies[0], replies[1:]
        accepted = [i for i, r in enumerate(rcpt_replies) if r.ok]
        if not mail_reply.ok and accepted:
            raise LMTPProtocolError(f"RCPT accepted after MAIL was refused ({mail_reply})")
        if not accepted:
            await self.answer("message")  # BDAT's one refusal (need MAIL, no valid recipients)
            return rcpt_replies if mail_reply.ok else [mail_reply] * len(rcpt_replies)
        for i in accepted:
            rcpt_replies[i] = (await self.answer("message"))[0]
        return rcpt_replies

    async def _send_body(self, body: SpooledBody) -> Reply | None:
        """Send the data; a refusal of DATA is returned, else None."""
        if "CHUNKING" in self.ext:
            self.data_sent = True
            await self.send(b"BDAT %d LAST\r\n" % body.size)
            for piece in body.chunks(SEND_CHUNK):
                await self.send(piece)
            return None
        await self.send(b"DATA\r\n")
        go, _ = await self.answer("DATA")
        if go.code != 354:
            return go
        self.data_sent = True
        stuff = DotStuffer()
        for piece in body.chunks(SEND_CHUNK):
            await self.send(stuff(piece))
        await self.send(stuff.end())
        return None

    def closed_by_store(self) -> bool:
        """Its end of file (or a reset) is in already: nothing more can go on it."""
        return self.reader.at_eof() or self.reader.exception() is not None or self.writer.is_closing()

    def close(self) -> None:
        self.writer.transport.abort()


class StorePool:
    """Idle store connections by (host, port), and how many were opened (logged, tested)."""

    def __init__(
        self,
        helo: str,
        *,
        pool_size: int,
        pool_idle: float,
        connections_max: int,
        connect_timeout: float,
        timeout: float,
    ):
        self.helo = helo
        self._idle: dict[tuple[str, int], list[StoreConnection]] = collections.defaultdict(list)
        self.opened: collections.Counter[tuple[str, int]] = collections.Counter()
        self._in_use: collections.Counter[tuple[str, int]] = collections.Counter()
        self._waiting: collections.Counter[tuple[str, int]] = collections.Counter()  # for a place (metrics)
        self._freed: dict[tuple[str, int], asyncio.Condition] = {}
        self.configure(
            pool_size=pool_size,
            pool_idle=pool_idle,
            connections_max=connections_max,
            connect_timeout=connect_timeout,
            timeout=timeout,
        )

    def configure(
        self, *, pool_size: int, pool_idle: float, connections_max: int, connect_timeout: float, timeout: float
    ) -> None:
        self.pool_size, self.pool_idle, self.connections_max = pool_size, pool_idle, max(1, connections_max)
        self.connect_timeout, self.timeout = connect_timeout, timeout

    async def _take_slot(self, key: tuple[str, int]) -> None:
        """Wait (up to `timeout`) until fewer than connections_max
        transactions are on the store's connections, and take a place."""
        cond = self._freed.setdefault(key, asyncio.Condition())
        async with cond:
            self._waiting[key] += 1
            try:
                await asyncio.wait_for(cond.wait_for(lambda: self._in_use[key] < self.connections_max), self.timeout)
            except TimeoutError:
                raise LMTPUnavailable(f"all {self.connections_max} connections busy for {self.timeout:g} s") from None
            finally:
                self._waiting[key] -= 1
            self._in_use[key] += 1

    def depths(self) -> dict[tuple[str, int], dict[str, int]]:
        """Per store: transactions on its connections, transactions waiting
        for a place, idle connections kept, connections opened so far."""
        keys = set(self.opened) | set(self._in_use) | set(self._waiting)
        return {
            key: {
                "in_use": self._in_use[key],
                "waiting": self._waiting[key],
                "idle": len(self._idle.get(key, ())),
                "opened": self.opened[key],
            }
            for key in keys
        }

    async def _give_slot(self, key: tuple[str, int]) -> None:
        cond = self._freed[key]
        async with cond:
            self._in_use[key] -= 1
            cond.notify()

    async def _acquire(self, key: tuple[str, int]) -> StoreConnection:
        idle = self._idle[key]
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if now - conn.idle_since <= self.pool_idle and not conn.closed_by_store():
                conn.timeout = self.timeout
                return conn
            conn.close()
        conn = await StoreConnection.open(*key, self.helo, self.connect_timeout, self.timeout)
        self.opened[key] += 1
        log.info("store %s:%d: connected (%d connection(s) opened to it so far)", *key, self.opened[key])
        return conn

    def _release(self, key: tuple[str, int], conn: StoreConnection) -> None:
        idle = self._idle[key]
        if len(idle) >= self.pool_size:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        idle.append(conn)

    def _drop_idle(self, key: tuple[str, int]) -> None:
        for conn in self._idle.pop(key, []):
            conn.close()

    async def deliver(
        self, host: str, port: int, env: Envelope, rcpts: list[Recipient], body: SpooledBody
    ) -> list[Reply]:
        """One reply per recipient, from the store; LMTPUnavailable when it could not answer."""
        key = (host, port)
        await self._take_slot(key)
        try:
            return await self._deliver(key, env, rcpts, body)
        finally:
            await self._give_slot(key)

    async def _deliver(self, key: tuple[str, int], env: Envelope, rcpts: list[Recipient], body: SpooledBody):
        while True:
            conn = await self._acquire(key)
            reused = conn.used
            try:
                replies = await conn.transaction(env, rcpts, body)
            except LMTPUnavailable as e:
                conn.close()
                if reused and (not conn.data_sent or (isinstance(e, StoreClosed) and not conn.answered)):
                    # closed by the store while pooled: its other idle ones are likely closed too
                    log.info("store %s:%d: pooled connection unusable (%s), opening a new one", *key, e)
                    self._drop_idle(key)
                    continue
                raise
            except BaseException:
                conn.close()
                raise
            self._release(key, conn)
            return replies

    def close(self) -> None:
        for key in list(self._idle):
            self._drop_idle(key)
