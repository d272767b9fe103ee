"""The sans-I/O POP3 state machine (pop/protocol.py): table-driven cases fed
whole, one byte at a time and with trailing data; invariants by Hypothesis."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pop import protocol as P
from pop.protocol import (
    NEED_DATA,
    NEED_REPLY,
    Closed,
    Command,
    LocalProtocolError,
    Login,
    MultilineEncoder,
    RemoteProtocolError,
    ServerConnection,
    StartTLS,
    State,
    XClient,
)
from tests.support import sansio_util


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


PLAIN_JUAN = b64(b"\0juan\0pw")
PLAIN_SAME_AUTHZ = b64(b"juan\0juan\0pw")
PLAIN_OTHER_AUTHZ = b64(b"admin\0juan\0pw")


def drive(conn: ServerConnection, data: bytes, *, bytewise: bool = False):
    return sansio_util.drive(conn, data, Closed, bytewise=bytewise)


# (input, expected events, expected output) in the AUTHORIZATION state.
AUTH_CASES = [
    (
        b"CAPA\r\n",
        [],
        b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nUSER\r\nSASL PLAIN\r\n.\r\n",
    ),
    (b"USER juan\r\n", [], b"+OK\r\n"),
    (b"user juan\r\nPASS se cret\r\n", [Login("juan", "se cret", "USER")], b"+OK\r\n"),
    (b"USER juan\nPASS x\n", [Login("juan", "x", "USER")], b"+OK\r\n"),  # bare LF accepted
    (b"PASS x\r\n", [], b"-ERR No user given, send USER first\r\n"),
    (b"USER\r\n", [], b"-ERR Invalid user name\r\n"),
    (b"USER a b\r\n", [], b"-ERR Invalid user name\r\n"),
    (b"STAT\r\n", [], b"-ERR Not logged in\r\n"),
    (b"APOP juan 0123\r\n", [], b"-ERR Unknown command\r\n"),
    (b"\r\n", [], b"-ERR Unknown command\r\n"),
    (b"US3R x\r\n", [], b"-ERR Unknown command\r\n"),
    (b"USER j\x00x\r\n", [], b"-ERR Invalid characters in command\r\n"),
    (b"USER \xff\r\n", [], b"-ERR Invalid characters in command\r\n"),
    (b"STLS\r\n", [], b"-ERR STLS not available\r\n"),
    (b"XCLIENT ADDR=1.2.3.4\r\n", [], b"-ERR Unknown command\r\n"),  # not a trusted peer
    (b"AUTH\r\n", [], b"+OK\r\nPLAIN\r\n.\r\n"),
    (b"AUTH LOGIN\r\n", [], b"-ERR Unsupported authentication mechanism\r\n"),
    (f"AUTH PLAIN {PLAIN_JUAN}\r\n".encode(), [Login("juan", "pw", "PLAIN")], b""),
    (f"AUTH plain {PLAIN_SAME_AUTHZ}\r\n".encode(), [Login("juan", "pw", "PLAIN")], b""),
    (f"AUTH PLAIN {PLAIN_OTHER_AUTHZ}\r\n".encode(), [], b"-ERR [AUTH] Authorization identity not supported\r\n"),
    (f"AUTH PLAIN\r\n{PLAIN_JUAN}\r\n".encode(), [Login("juan", "pw", "PLAIN")], b"+ \r\n"),
    (b"AUTH PLAIN\r\n*\r\n", [], b"+ \r\n-ERR Authentication cancelled\r\n"),
    (b"AUTH PLAIN !!!!\r\n", [], b"-ERR [AUTH] Invalid AUTH PLAIN response\r\n"),
    (b"AUTH PLAIN =\r\n", [], b"-ERR [AUTH] Invalid AUTH PLAIN response\r\n"),
    (f"AUTH PLAIN {b64(b'juan')}\r\n".encode(), [], b"-ERR [AUTH] Invalid AUTH PLAIN response\r\n"),
    (b"QUIT\r\n", [Closed()], b"+OK Bye.\r\n"),
    (b"quit\r\nUSER x\r\n", [Closed()], b"+OK Bye.\r\n"),
]


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize("data,events,output", AUTH_CASES, ids=[repr(c[0][:24]) for c in AUTH_CASES])
def test_authorization_cases(data, events, output, bytewise):
    conn = ServerConnection()
    got_events, got_out = drive(conn, data, bytewise=bytewise)
    assert got_events == events
    assert got_out == output


def test_trailing_data_after_login_is_kept_for_the_backend():
    conn = ServerConnection()
    events, out = drive(conn, b"USER juan\r\nPASS pw\r\nSTAT\r\nLIST\r\n")
    assert events == [Login("juan", "pw")]
    assert conn.next_event() is NEED_REPLY  # nothing parsed past the login
    conn.accept_login(send=False)
    assert conn.state is State.TRANSACTION
    assert conn.trailing_data() == b"STAT\r\nLIST\r\n"


def test_password_never_in_repr():
    ev = Login("juan", "hunter2")
    assert "hunter2" not in repr(ev) and "hunter2" not in str(ev)


def test_rejected_login_returns_to_authorization_and_ends_after_max_attempts():
    conn = ServerConnection()
    for _attempt in range(1, P.MAX_AUTH_ATTEMPTS + 1):
        events, _ = drive(conn, b"USER juan\r\nPASS bad\r\n")
        assert events == [Login("juan", "bad")]
        conn.reject_login()
        assert conn.data_to_send() == b"-ERR [AUTH] Authentication failed.\r\n"
    assert conn.state is State.CLOSED
    assert isinstance(conn.next_event(), Closed)


def test_line_too_long_is_fatal_and_bounded():
    conn = ServerConnection()
    conn.receive_data(b"USER " + b"a" * (P.MAX_LINE + 10))  # never a line end
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    assert conn.data_to_send() == b"-ERR Line too long\r\n"
    assert conn.state is State.CLOSED


def test_line_just_below_the_limit_is_parsed():
    conn = ServerConnection()
    conn.receive_data(b"NOOP " + b"x" * (P.MAX_LINE - 7) + b"\r\n")
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send().startswith(b"-ERR")


def test_too_many_bad_commands_end_the_session():
    conn = ServerConnection()
    with pytest.raises(RemoteProtocolError):
        drive(conn, b"BOGUS\r\n" * P.MAX_BAD_COMMANDS)
    assert conn.data_to_send().endswith(b"-ERR Too many bad commands\r\n")


def test_too_much_pipelined_input_is_fatal():
    conn = ServerConnection()
    drive(conn, b"USER a\r\nPASS b\r\n")
    conn.receive_data(b"NOOP\r\n" * (P.MAX_PENDING_INPUT // 6 + 1))  # one big read is taken
    with pytest.raises(RemoteProtocolError):
        conn.receive_data(b"NOOP\r\n")  # more while still unanswered is not
    assert conn.data_to_send().endswith(b"-ERR Too much pipelined input\r\n")


def test_stls_drops_plaintext_sent_after_it():
    """STARTTLS command injection: commands sent in clear text after STLS
    must not be run inside the TLS session."""
    conn = ServerConnection(stls=True)
    drive(conn, b"CAPA\r\n")
    events, out = drive(conn, b"STLS\r\nUSER evil\r\nPASS evil\r\n")
    assert events == [StartTLS()]
    conn.accept_stls()
    assert conn.data_to_send() == b"+OK Begin TLS negotiation now.\r\n"
    assert conn.next_event() is NEED_DATA  # the injected lines are gone
    assert conn.tls_active and "STLS" not in conn.capabilities()
    events, out = drive(conn, b"PASS x\r\n")
    assert out == b"-ERR No user given, send USER first\r\n"


def test_capabilities_follow_tls_and_plaintext_policy():
    conn = ServerConnection(stls=True, plaintext_auth=False)
    caps = conn.capabilities()
    assert "STLS" in caps and "USER" not in caps and "SASL PLAIN" not in caps
    _, out = drive(conn, b"USER juan\r\n")
    assert out == b"-ERR [AUTH] Plaintext authentication disallowed, use STLS first\r\n"
    drive(conn, b"STLS\r\n")
    conn.accept_stls()
    assert "USER" in conn.capabilities() and "SASL PLAIN" in conn.capabilities()
    assert not any(c.startswith(("PIPELINING", "APOP")) for c in conn.capabilities())


def test_xclient_for_trusted_peers_only_once():
    conn = ServerConnection(xclient=True)
    conn.send_greeting("hi")
    assert conn.data_to_send() == b"+OK [XCLIENT] hi\r\n"
    events, _ = drive(conn, b"XCLIENT ADDR=192.0.2.7 PORT=4711 JUNK\r\n")
    assert events == [XClient({"ADDR": "192.0.2.7", "PORT": "4711"})]
    conn.reply_ok()
    assert conn.data_to_send() == b"+OK\r\n"
    _, out = drive(conn, b"XCLIENT ADDR=10.0.0.1\r\n")
    assert out == b"-ERR Unknown command\r\n"


def logged_in() -> ServerConnection:
    conn = ServerConnection()
    drive(conn, b"USER juan\r\nPASS pw\r\n")
    conn.accept_login()
    assert conn.data_to_send() == b"+OK Logged in.\r\n"
    return conn


TRANSACTION_CASES = [
    (b"STAT\r\n", Command("STAT", ()), b""),
    (b"LIST\r\n", Command("LIST", ()), b""),
    (b"list 3\r\n", Command("LIST", (3,)), b""),
    (b"RETR 1\r\n", Command("RETR", (1,)), b""),
    (b"TOP 2 0\r\n", Command("TOP", (2, 0)), b""),
    (b"UIDL 12\r\n", Command("UIDL", (12,)), b""),
    (b"DELE 1\r\n", Command("DELE", (1,)), b""),
    (b"QUIT\r\n", Command("QUIT", ()), b""),
    (b"RETR\r\n", None, b"-ERR Wrong number of arguments for RETR\r\n"),
    (b"RETR x\r\n", None, b"-ERR Invalid number\r\n"),
    (b"RETR -1\r\n", None, b"-ERR Invalid number\r\n"),
    (b"RETR 0\r\n", None, b"-ERR No such message\r\n"),
    (b"RETR 1234567890\r\n", None, b"-ERR Invalid number\r\n"),
    (b"TOP 1\r\n", None, b"-ERR Wrong number of arguments for TOP\r\n"),
    (b"STAT 1\r\n", None, b"-ERR Wrong number of arguments for STAT\r\n"),
    (b"USER x\r\n", None, b"-ERR Already logged in\r\n"),
    (b"FOO\r\n", None, b"-ERR Unknown command\r\n"),
]


@pytest.mark.parametrize("data,event,output", TRANSACTION_CASES, ids=[repr(c[0]) for c in TRANSACTION_CASES])
def test_transaction_cases(data, event, output):
    conn = logged_in()
    events, out = drive(conn, data)
    assert events == ([event] if event else [])
    assert out == output


def test_replies_in_order_and_quit_closes():
    conn = logged_in()
    events, _ = drive(conn, b"STAT\r\nNOOP\r\nQUIT\r\n")
    assert events == [Command("STAT")]
    assert conn.next_event() is NEED_REPLY
    conn.reply_ok("2 10")
    assert conn.next_event() == Command("NOOP")
    conn.reply_ok()
    assert conn.next_event() == Command("QUIT")
    conn.reply_ok("Bye.")
    assert isinstance(conn.next_event(), Closed)
    assert conn.data_to_send() == b"+OK 2 10\r\n+OK\r\n+OK Bye.\r\n"


def test_multiline_reply_and_misuse():
    conn = logged_in()
    with pytest.raises(LocalProtocolError):
        conn.reply_ok()  # nothing to answer
    drive(conn, b"LIST\r\n")
    conn.reply_lines("2 messages", ["1 10", "2 20", ".3 dot"])
    assert conn.data_to_send() == b"+OK 2 messages\r\n1 10\r\n2 20\r\n..3 dot\r\n.\r\n"
    drive(conn, b"RETR 1\r\n")
    conn.start_body("5 octets")
    with pytest.raises(LocalProtocolError):
        conn.reply_ok()
    assert conn.next_event() is NEED_REPLY
    conn.send_body(b"a\n.b\n")
    conn.end_body()
    assert conn.data_to_send() == b"+OK 5 octets\r\na\r\n..b\r\n.\r\n"
    with pytest.raises(LocalProtocolError):
        conn.end_body()


def test_crlf_in_pre_login_capa_after_login():
    conn = logged_in()
    _, out = drive(conn, b"CAPA\r\n")
    assert b"USER\r\n" in out and b"STLS" not in out and b"SASL" not in out


# --- MultilineEncoder -------------------------------------------------------------------------
ENCODER_CASES = [
    (b"", b".\r\n"),
    (b"a\n", b"a\r\n.\r\n"),
    (b"a\r\nb\r\n", b"a\r\nb\r\n.\r\n"),
    (b"a", b"a\r\n.\r\n"),
    (b".\n..\nx.\n", b"..\r\n...\r\nx.\r\n.\r\n"),
    (b"a\rb\n", b"a\rb\r\n.\r\n"),
    (b"a\r", b"a\r\n.\r\n"),
    (b"\n\n", b"\r\n\r\n.\r\n"),
]


def reference_encode(data: bytes) -> bytes:
    lines = data.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] in (b"", b"\r"):
        last = lines.pop()
        if last == b"\r":
            lines.append(b"")
    return b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines) + b".\r\n"


@pytest.mark.parametrize("data,expected", ENCODER_CASES)
def test_multiline_encoder_cases(data, expected):
    enc = MultilineEncoder()
    assert enc.feed(data) + enc.finish() == expected
    enc = MultilineEncoder()
    assert b"".join(enc.feed(data[i : i + 1]) for i in range(len(data))) + enc.finish() == expected


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.lists(st.integers(min_value=0, max_value=200), max_size=6))
def test_multiline_encoder_chunking_does_not_matter(data, cuts):
    """Any split of the input gives the same bytes, and the result reads
    back as the original lines (dot-unstuffed, CRLF)."""
    enc = MultilineEncoder()
    whole = enc.feed(data) + enc.finish()
    enc = MultilineEncoder()
    pieces, last = [], 0
    for cut in sorted(set(min(c, len(data)) for c in cuts)):
        pieces.append(enc.feed(data[last:cut]))
        last = cut
    pieces.append(enc.feed(data[last:]))
    assert b"".join(pieces) + enc.finish() == whole
    assert whole.endswith(b"\r\n.\r\n") or whole == b".\r\n"
    body = whole[:-3]
    for line in body.split(b"\r\n")[:-1]:
        assert not line.startswith(b".") or line.startswith(b"..")
    if b"\r" not in data:
        assert whole == reference_encode(data)


def test_crlf_size():
    assert P.crlf_size(b"a\nb\r\n") == 6
    assert P.crlf_size(b"") == 0


# --- Fuzz: parse, or raise the peer-error type, nothing else -----------------------------------
COMMAND_WORDS = [
    b"USER",
    b"PASS",
    b"AUTH",
    b"PLAIN",
    b"CAPA",
    b"QUIT",
    b"STLS",
    b"STAT",
    b"LIST",
    b"RETR",
    b"DELE",
    b"TOP",
    b"UIDL",
    b"NOOP",
    b"RSET",
    b"XCLIENT",
    b"=",
    b"*",
    b"1",
    b" ",
    b"\r\n",
    b"\n",
    b"\r",
    b"\x00",
    b"\xff",
    b"AGp1YW4AcHc=",
]
fuzz_input = st.lists(st.one_of(st.sampled_from(COMMAND_WORDS), st.binary(max_size=40)), max_size=60).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(fuzz_input, st.booleans(), st.booleans(), st.integers(min_value=1, max_value=50), st.randoms())
def test_fuzz_parser_only_events_or_peer_errors(data, stls, xclient, chunk, rnd):
    conn = ServerConnection(stls=stls, xclient=xclient)
    conn.send_greeting()
    allowed = (Login, StartTLS, XClient, Command, Closed)
    try:
        for i in range(0, len(data) + 1, chunk):
            conn.receive_data(data[i : i + chunk] if i < len(data) else b"")
            for _ in range(1000):
                ev = conn.next_event()
                if ev is NEED_DATA:
                    break
                if ev is NEED_REPLY:
                    pytest.fail("NEED_REPLY with every event answered")
                assert isinstance(ev, allowed)
                if isinstance(ev, Closed):
                    return
                # answer like a daemon would, at random
                if isinstance(ev, Login):
                    if rnd.random() < 0.5:
                        conn.accept_login()
                    else:
                        conn.reject_login()
                elif isinstance(ev, StartTLS):
                    conn.accept_stls()
                elif isinstance(ev, Command) and ev.verb in ("LIST", "UIDL") and not ev.args:
                    conn.reply_lines("", ["1 1"])
                else:
                    conn.reply_ok()
                out = conn.data_to_send()
                assert out.endswith(b"\r\n")
    except RemoteProtocolError:
        assert conn.state is State.CLOSED
        assert conn.data_to_send().endswith(b"\r\n") and isinstance(conn.next_event(), Closed)
