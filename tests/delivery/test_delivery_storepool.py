"""lmtp-proxy's store client (delivery/storepool.py) against a scripted store
that offers neither PIPELINING nor CHUNKING: DATA dot-stuffed across any
split of the spooled body, RSET before a reused connection's next
transaction, one reply per recipient in order."""

import asyncio
import socket
import threading

import pytest

from delivery import storepool
from delivery.lmtpclient import dot_stuff
from delivery.spool import WireBody, open_unnamed
from delivery.storepool import DotStuffer, Envelope, Recipient, StorePool

BODY = b".first line dotted\r\nmiddle\r\n.\r\n..two dots\r\n\r\n.\r\nlast\r\n"


def test_dot_stuffer_matches_dot_stuff_over_every_split():
    for text in (BODY, BODY[:-2], b"", b".", b"\r\n.\r\n", b"a\r\n.b"):
        for cut in range(len(text) + 1):
            for cut2 in range(cut, len(text) + 1):
                stuff = DotStuffer()
                got = stuff(text[:cut]) + stuff(text[cut:cut2]) + stuff(text[cut2:]) + stuff.end()
                assert got == dot_stuff(text), (text, cut, cut2)


class ScriptedStore:
    """One connection at a time, LHLO offering only ENHANCEDSTATUSCODES;
    `nobody` is refused at RCPT. Records every line and each message's data."""

    def __init__(self, extensions: bytes = b"250 ENHANCEDSTATUSCODES\r\n"):
        self.extensions = extensions  # the LHLO reply's lines after the first
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.lines: list[bytes] = []
        self.data: list[bytes] = []
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn, conn.makefile("rb") as f:
                self._session(conn, f)

    def _session(self, conn, f):
        conn.sendall(b"220 scripted\r\n")
        accepted = 0
        while line := f.readline():
            self.lines.append(line)
            verb = line[:4].upper()
            if verb == b"LHLO":
                conn.sendall(b"250-scripted\r\n" + self.extensions)
            elif verb in (b"MAIL", b"RSET"):
                accepted = 0
                conn.sendall(b"250 2.1.0 ok\r\n" if verb == b"MAIL" else b"250 2.0.0 ok\r\n")
            elif verb == b"RCPT":
                if b"nobody" in line:
                    conn.sendall(b"550 5.1.1 no such user\r\n")
                else:
                    accepted += 1
                    conn.sendall(b"250 2.1.5 ok\r\n")
            elif verb == b"DATA":
                conn.sendall(b"354 go on\r\n")
                stuffed = b""
                while (part := f.readline()) != b".\r\n":
                    stuffed += part
                self.data.append(stuffed.replace(b"\r\n..", b"\r\n.")[1 if stuffed.startswith(b"..") else 0 :])
                conn.sendall(b"".join(b"250 2.0.0 stored %d\r\n" % i for i in range(accepted)))
            elif verb == b"QUIT":
                conn.sendall(b"221 bye\r\n")
                return
            else:
                conn.sendall(b"500 5.5.1 what\r\n")

    def close(self):
        self.sock.close()


@pytest.fixture
def store():
    s = ScriptedStore()
    yield s
    s.close()


DSN_STORE = b"250-ENHANCEDSTATUSCODES\r\n250 DSN\r\n"


def one_transaction(store, tmp_path) -> list[bytes]:
    """A message with the client's DSN parameters (MAIL and RCPT) through the pool: the lines the store got."""

    async def run():
        pool = StorePool(
            "proxy.test", pool_size=1, pool_idle=60.0, connections_max=1, connect_timeout=5.0, timeout=10.0
        )
        env = Envelope("s@x", None, "", " RET=HDRS ENVID=e+2B1")
        rcpts = [Recipient("user@example.org", " ORCPT=rfc822;user@example.org"), Recipient("b@x", " NOTIFY=NEVER")]
        replies = await pool.deliver("127.0.0.1", store.port, env, rcpts, spooled(tmp_path, BODY))
        pool.close()
        return replies

    assert [r.code for r in asyncio.run(run())] == [250, 250]
    return store.lines[1:4]


@pytest.mark.parametrize(
    "extensions, expected",
    [
        (
            DSN_STORE,
            [
                b"MAIL FROM:<s@x> RET=HDRS ENVID=e+2B1\r\n",
                b"RCPT TO:<user@example.org> ORCPT=rfc822;user@example.org\r\n",
                b"RCPT TO:<b@x> NOTIFY=NEVER\r\n",
            ],
        ),
        (
            b"250 ENHANCEDSTATUSCODES\r\n",
            [b"MAIL FROM:<s@x>\r\n", b"RCPT TO:<user@example.org>\r\n", b"RCPT TO:<b@x>\r\n"],
        ),
    ],
    ids=["store-offers-dsn", "store-without-dsn"],
)
def test_dsn_parameters_only_to_a_store_offering_dsn(tmp_path, extensions, expected):
    store = ScriptedStore(extensions)
    try:
        assert one_transaction(store, tmp_path) == expected
    finally:
        store.close()


def spooled(tmp_path, data: bytes) -> WireBody:
    body = WireBody(lambda: open_unnamed(tmp_path), memory_max=8)  # past 8 bytes: a spool file
    for i in range(0, len(data), 5):
        body.write(data[i : i + 5])
    body.finish()
    assert body.spooled
    return body


def test_data_without_chunking_or_pipelining_and_rset_on_reuse(store, tmp_path, monkeypatch):
    monkeypatch.setattr(storepool, "SEND_CHUNK", 3)  # pieces that split every terminator and dot
    body = spooled(tmp_path, BODY)

    async def run():
        pool = StorePool(
            "proxy.test", pool_size=2, pool_idle=60.0, connections_max=4, connect_timeout=5.0, timeout=10.0
        )
        env = Envelope("s@x", "Q1", "8BITMIME")
        first = await pool.deliver(
            "127.0.0.1", store.port, env, [Recipient("a@x"), Recipient("nobody@x"), Recipient("b@x")], body
        )
        second = await pool.deliver("127.0.0.1", store.port, env, [Recipient("c@x")], body)
        pool.close()
        return first, second

    first, second = asyncio.run(run())
    assert [(r.code, r.status) for r in first] == [(250, "2.0.0"), (550, "5.1.1"), (250, "2.0.0")]
    assert [r.text for r in first] == ["stored 0", "no such user", "stored 1"]
    assert [(r.code, r.status) for r in second] == [(250, "2.0.0")]
    assert store.data == [BODY, BODY]
    assert store.connections == 1
    verbs = [line.split(b" ")[0].split(b":")[0].rstrip(b"\r\n") for line in store.lines]
    assert verbs == [b"LHLO", b"MAIL", b"RCPT", b"RCPT", b"RCPT", b"DATA", b"RSET", b"MAIL", b"RCPT", b"DATA"]
    # SIZE and XQUEUEID are offered only where the store announces them; BODY needs 8BITMIME
    assert store.lines[1] == b"MAIL FROM:<s@x>\r\n"
