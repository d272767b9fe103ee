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


class PipeliningStore(ScriptedStore):
    """Offers PIPELINING and CHUNKING and answers nothing of a transaction
    before it has all of it (through `BDAT n LAST` and its n bytes): a
    client waiting for the MAIL/RCPT replies before it sends BDAT gets
    nothing. `after_first` says what the first connection does once its
    first transaction is answered: "keep" (serve on), "421" (says so and
    closes while pooled), "close" (takes the next transaction whole, then
    closes without a word), "silent" (takes it and never answers)."""

    def __init__(self, after_first: str = "keep"):
        self.after_first = after_first
        self.transactions: list[list[bytes]] = []  # the command lines of each, as read
        self.hold = threading.Event()  # set to let a "silent" connection go
        super().__init__()

    def _transaction(self, f) -> tuple[list[bytes], bytes] | None:
        lines = []
        while line := f.readline():
            lines.append(line)
            if line.upper().startswith(b"LHLO"):
                return lines, b""
            if line.upper().startswith(b"BDAT"):
                return lines, f.read(int(line.split()[1]))
        return None

    def _session(self, conn, f):
        number = self.connections
        conn.sendall(b"220 pipelining store\r\n")
        served = 0
        while got := self._transaction(f):
            lines, data = got
            if lines[0].upper().startswith(b"LHLO"):
                conn.sendall(b"250-store\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 ENHANCEDSTATUSCODES\r\n")
                continue
            if number == 1 and served == 1 and self.after_first == "close":
                return
            if number == 1 and served == 1 and self.after_first == "silent":
                self.hold.wait(30)
                return
            self.transactions.append(lines)
            self.data.append(data)
            out, accepted = [], 0
            for line in lines[:-1]:
                verb = line[:4].upper()
                if verb == b"RCPT" and b"nobody" in line:
                    out.append(b"550 5.1.1 no such user\r\n")
                elif verb == b"RCPT":
                    accepted += 1
                    out.append(b"250 2.1.5 ok\r\n")
                else:
                    out.append(b"250 2.1.0 ok\r\n" if verb == b"MAIL" else b"250 2.0.0 ok\r\n")
            out += [b"250 2.0.0 stored %d\r\n" % i for i in range(accepted)] or [b"554 5.5.1 no valid recipients\r\n"]
            conn.sendall(b"".join(out))
            served += 1
            if number == 1 and served == 1 and self.after_first == "421":
                conn.sendall(b"421 4.3.2 shutting down\r\n")
                return

    def close(self):
        self.hold.set()
        super().close()


SECOND_RCPTS = (Recipient("c@x"),)


def _two_transactions(port, body, second_rcpts=SECOND_RCPTS, timeout=10.0):
    async def run():
        pool = StorePool(
            "proxy.test", pool_size=2, pool_idle=60.0, connections_max=4, connect_timeout=5.0, timeout=timeout
        )
        env = Envelope("s@x", "Q1", "8BITMIME")
        try:
            first = await pool.deliver(
                "127.0.0.1", port, env, [Recipient("a@x"), Recipient("nobody@x"), Recipient("b@x")], body
            )
            await asyncio.sleep(0.2)  # a 421 and the close of a pooled connection are in before it is reused
            try:
                second = await pool.deliver("127.0.0.1", port, env, list(second_rcpts), body)
            except storepool.LMTPUnavailable as e:
                second = e
            return first, second, pool.opened[("127.0.0.1", port)]
        finally:
            pool.close()

    return asyncio.run(run())


def test_one_write_a_transaction_with_pipelining_and_chunking(tmp_path):
    """MAIL, the RCPTs, BDAT and the body go before any reply is read (the
    old client waited for the RCPT replies first: two round trips a message,
    and against this store no reply at all)."""
    store = PipeliningStore()
    try:
        first, second, opened = _two_transactions(store.port, spooled(tmp_path, BODY), timeout=5.0)
    finally:
        store.close()
    assert [(r.code, r.text) for r in first] == [(250, "stored 0"), (550, "no such user"), (250, "stored 1")]
    assert [(r.code, r.text) for r in second] == [(250, "stored 0")]
    assert store.data == [BODY, BODY] and opened == 1 and store.connections == 1
    verbs = [[line.split(b" ")[0].split(b":")[0].rstrip(b"\r\n") for line in t] for t in store.transactions]
    assert verbs == [[b"MAIL", b"RCPT", b"RCPT", b"RCPT", b"BDAT"], [b"RSET", b"MAIL", b"RCPT", b"BDAT"]]
    assert store.transactions[0][-1] == b"BDAT %d LAST\r\n" % len(BODY)


def test_pipelined_transaction_with_no_recipient_reads_bdats_one_refusal(tmp_path):
    store = PipeliningStore()
    try:
        first, second, _ = _two_transactions(store.port, spooled(tmp_path, BODY), [Recipient("nobody@x")])
    finally:
        store.close()
    assert [(r.code, r.status) for r in second] == [(550, "5.1.1")]


@pytest.mark.parametrize("after_first", ["421", "close"])
def test_pooled_connection_closed_by_the_store_is_retried_once(tmp_path, after_first):
    """Closed while pooled (a 421 first, or the transaction taken and the
    connection closed without a word): the store answered nothing of it, so
    it goes again on a new connection, once."""
    store = PipeliningStore(after_first)
    try:
        first, second, opened = _two_transactions(store.port, spooled(tmp_path, BODY))
    finally:
        store.close()
    assert [r.code for r in first] == [250, 550, 250]
    assert [(r.code, r.text) for r in second] == [(250, "stored 0")], second
    assert opened == 2 and store.connections == 2
    assert store.data == [BODY, BODY]


def test_silent_store_is_not_retried(tmp_path):
    """The transaction went and the store said nothing until the timeout: it
    may still be storing it, so no second try (the MTA hears 451 and retries)."""
    store = PipeliningStore("silent")
    try:
        first, second, opened = _two_transactions(store.port, spooled(tmp_path, BODY), timeout=1.0)
    finally:
        store.close()
    assert [r.code for r in first] == [250, 550, 250]
    assert isinstance(second, storepool.LMTPUnavailable) and "no reply" in str(second)
    assert opened == 1 and store.connections == 1
