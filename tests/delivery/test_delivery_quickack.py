"""lmtpsessions ACKs each read at once (TCP_QUICKACK), for clients without
TCP_NODELAY: Sendmail's LMTP mailer writes a message as 4096 bytes, the
rest, then the final dot, and Nagle holds the last pieces until the first is
ACKed; with Linux's delayed ACK that was 40 ms a message (benchmarks/bench_mx.py:
Sendmail -> pdeliveryd went from 20 to about 240 messages/s)."""

import asyncio
import socket

from delivery import config as dconfig
from delivery import lmtpsessions
from delivery.body import MemoryBody
from delivery.lmtp import Reply
from delivery.lmtpsessions import LMTPSessions, ack_now

OK = Reply(250, "2.0.0", "ok")


class AcceptAll(LMTPSessions):
    """Sessions that take every recipient and every message."""

    def __init__(self):
        super().__init__(dict(dconfig.DEFAULTS), "test.example")
        self.apply(self.cfg)

    def new_body(self):
        return MemoryBody()

    async def rcpt(self, ev, accepted):
        accepted.append(ev.address)
        return OK

    async def message(self, ev, accepted):
        return [OK for _ in accepted]


class Recorder:
    def __init__(self):
        self.calls: list[int] = []  # the socket family of each call

    def __call__(self, writer):
        self.calls.append(writer.get_extra_info("socket").family)
        ack_now(writer)  # the real one: it must not fail on a live socket


SENDMAIL_STYLE = [  # the writes of one message, as Sendmail's [IPC] mailer makes them
    b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n",
    b"Subject: x\r\n\r\n" + b"y" * 4080 + b"\r\n",
    b"z" * 193 + b"\r\n",
    b".\r\n",
]


async def _session(start_server, connect, rounds: int) -> bytes:
    sessions = AcceptAll()
    server, address = await start_server(sessions.session)
    try:
        reader, writer = await connect(address)
        writer.write(b"LHLO c\r\n")
        out = b""
        for _ in range(rounds):
            # the commands, then the data once 354 is in: at least two reads on the server's side
            writer.write(SENDMAIL_STYLE[0])
            out += await asyncio.wait_for(reader.readuntil(b"354 "), 30)
            for piece in SENDMAIL_STYLE[1:]:
                writer.write(piece)
                await writer.drain()
            out += await asyncio.wait_for(reader.readuntil(b"250 2.0.0 ok\r\n"), 30)
        writer.write(b"QUIT\r\n")
        out += await asyncio.wait_for(reader.read(), 30)
        writer.close()
        return out
    finally:
        server.close()
        await server.wait_closed()


def _tcp():
    async def start(cb):
        server = await asyncio.start_server(cb, "127.0.0.1", 0)
        return server, server.sockets[0].getsockname()

    async def connect(address):
        return await asyncio.open_connection(*address)

    return start, connect


def _unix(path):
    async def start(cb):
        return await asyncio.start_unix_server(cb, path=str(path)), str(path)

    async def connect(address):
        return await asyncio.open_unix_connection(address)

    return start, connect


def fake_writer(family: int):
    """A stream writer whose socket of `family` records its setsockopt calls."""
    calls: list[tuple] = []

    class Sock:
        def setsockopt(self, *a):
            calls.append(a)

    sock = Sock()
    sock.family = family

    class Writer:
        def get_extra_info(self, name):
            return sock if name == "socket" else None

    return Writer(), calls


def test_every_read_of_message_data_is_acked_at_once(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(lmtpsessions, "ack_now", rec)
    out = asyncio.run(_session(*_tcp(), rounds=3))
    # each RCPT and each message: the answers of AcceptAll
    assert out.count(b"250 2.0.0 ok\r\n") == 2 * 3 and b"\r\n221 " in out, out
    assert len(rec.calls) >= 3, rec.calls  # at least one read of each message's data
    assert set(rec.calls) == {socket.AF_INET}


def test_command_reads_are_not_acked_apart(monkeypatch):
    """A command's read is ACKed by its reply: no system call for it."""
    rec = Recorder()
    monkeypatch.setattr(lmtpsessions, "ack_now", rec)

    async def commands():
        sessions = AcceptAll()
        server = await asyncio.start_server(sessions.session, "127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname())
            codes = [(await reader.readline())[:3]]
            for command in (b"LHLO c", b"MAIL FROM:<a@x>", b"RCPT TO:<b@x>", b"RSET", b"NOOP"):
                writer.write(command + b"\r\n")  # and its whole reply before the next
                while (line := await asyncio.wait_for(reader.readline(), 30))[3:4] == b"-":
                    pass
                codes.append(line[:3])
            writer.close()
            return codes
        finally:
            server.close()
            await server.wait_closed()

    assert asyncio.run(commands()) == [b"220"] + [b"250"] * 5
    assert rec.calls == []


def test_ack_now_leaves_unix_sockets_alone(monkeypatch, tmp_path):
    rec = Recorder()
    monkeypatch.setattr(lmtpsessions, "ack_now", rec)
    writer, calls = fake_writer(socket.AF_UNIX)
    ack_now(writer)
    assert calls == []
    out = asyncio.run(_session(*_unix(tmp_path / "s"), rounds=1))
    assert b"250 2.0.0 ok\r\n" in out
    assert set(rec.calls) == {socket.AF_UNIX}


def test_ack_now_sets_tcp_quickack():
    writer, calls = fake_writer(socket.AF_INET)
    ack_now(writer)
    assert calls == [(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)]
