"""The sans-I/O IMAP pre-login state machine (pop/imap_protocol.py):
table-driven cases fed whole and one byte at a time, literals, the limits,
and a Hypothesis fuzz (random bytes and mutated valid commands)."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pop import imap_protocol as I
from pop.imap_protocol import (
    NEED_DATA,
    NEED_REPLY,
    Closed,
    LocalProtocolError,
    Login,
    RemoteProtocolError,
    ServerConnection,
    StartTLS,
    State,
)
from tests.support import sansio_util

CAPS = b"IMAP4rev1 SASL-IR LITERAL+ ID ENABLE IDLE"


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def drive(conn: ServerConnection, data: bytes, *, bytewise: bool = False):
    return sansio_util.drive(conn, data, Closed, bytewise=bytewise)


CASES = [
    (b"a1 CAPABILITY\r\n", [], b"* CAPABILITY " + CAPS + b" AUTH=PLAIN\r\na1 OK Capability completed.\r\n"),
    (b"a2 noop\r\n", [], b"a2 OK NOOP completed.\r\n"),
    (b"a3 LOGOUT\r\nb NOOP\r\n", [Closed()], b"* BYE Logging out.\r\na3 OK Logout completed.\r\n"),
    (b"a4 LOGIN juan secret\r\n", [Login("juan", "secret", "LOGIN", "a4")], b""),
    (b'a5 LOGIN "ju an" "s\\"e\\\\c"\r\n', [Login("ju an", 's"e\\c', "LOGIN", "a5")], b""),
    (
        b"a6 LOGIN {4}\r\njuan {2}\r\npw\r\n",
        [Login("juan", "pw", "LOGIN", "a6")],
        b"+ Ready for literal data\r\n+ Ready for literal data\r\n",
    ),
    (b"a7 LOGIN {4+}\r\njuan {2+}\r\npw\r\n", [Login("juan", "pw", "LOGIN", "a7")], b""),
    (b"a8 LOGIN juan\r\n", [], b"a8 BAD LOGIN needs a user name and a password\r\n"),
    (b'a9 LOGIN "juan pw\r\n', [], b"a9 BAD Unterminated quoted string\r\n"),
    (b'b1 LOGIN "j\\x" pw\r\n', [], b"b1 BAD Invalid escape in quoted string\r\n"),
    (b"b2 AUTHENTICATE PLAIN " + b64(b"\0juan\0pw") + b"\r\n", [Login("juan", "pw", "PLAIN", "b2")], b""),
    (b"b3 authenticate plain\r\n" + b64(b"juan\0juan\0pw") + b"\r\n", [Login("juan", "pw", "PLAIN", "b3")], b"+ \r\n"),
    (b"b4 AUTHENTICATE PLAIN\r\n*\r\n", [], b"+ \r\nb4 BAD Authentication cancelled.\r\n"),
    (
        b"b5 AUTHENTICATE PLAIN " + b64(b"admin\0juan\0pw") + b"\r\n",
        [],
        b"b5 NO [AUTHORIZATIONFAILED] Authorization identity not supported.\r\n",
    ),
    (b"b6 AUTHENTICATE PLAIN !!!\r\n", [], b"b6 BAD Invalid AUTHENTICATE PLAIN response.\r\n"),
    (b"b7 AUTHENTICATE CRAM-MD5\r\n", [], b"b7 NO Unsupported authentication mechanism.\r\n"),
    (b'b8 ID ("name" "mutt" "version" NIL)\r\n', [], b'* ID ("name" "pwmail imap-proxy")\r\nb8 OK ID completed.\r\n'),
    (b"b9 ID NIL\r\n", [], b'* ID ("name" "pwmail imap-proxy")\r\nb9 OK ID completed.\r\n'),
    (b'c1 ID ("name")\r\n', [], b"c1 BAD ID needs field-value pairs\r\n"),
    (b"c2 SELECT INBOX\r\n", [], b"c2 BAD Not logged in\r\n"),
    (b"c3 FROB\r\n", [], b"c3 BAD Unknown command\r\n"),
    (b"c4 STARTTLS\r\n", [], b"c4 BAD STARTTLS not available\r\n"),
    (b"\r\n", [], b"* BAD Empty command\r\n"),
    (b"+x NOOP\r\n", [], b"* BAD Invalid tag\r\n"),
    (b"c5\r\n", [], b"c5 BAD Missing command\r\n"),
    (b"c6 LOGIN {2000}\r\n", [], b"c6 BAD [LIMIT] Literal too big\r\n"),
    (b"c7 LOGIN \xff pw\r\n", [], b"c7 BAD Invalid characters in command\r\n"),
    (b"c8 NOOP\nc9 NOOP\n", [], b"c8 OK NOOP completed.\r\nc9 OK NOOP completed.\r\n"),  # bare LF accepted
]


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize("data,events,output", CASES, ids=[repr(c[0][:24]) for c in CASES])
def test_cases(data, events, output, bytewise):
    conn = ServerConnection()
    got_events, got_out = drive(conn, data, bytewise=bytewise)
    assert got_events == events
    assert bytes(got_out) == output


def test_greeting_has_capabilities_and_starttls_when_offered():
    conn = ServerConnection(starttls=True)
    conn.send_greeting()
    assert bytes(conn.data_to_send()) == b"* OK [CAPABILITY " + CAPS + b" STARTTLS AUTH=PLAIN] IMAP ready.\r\n"


def test_logindisabled_before_tls_when_plaintext_is_off():
    conn = ServerConnection(starttls=True, plaintext_auth=False)
    assert conn.capabilities()[-2:] == ["STARTTLS", "LOGINDISABLED"]
    _, out = drive(conn, b"a LOGIN juan pw\r\nb AUTHENTICATE PLAIN " + b64(b"\0juan\0pw") + b"\r\n")
    assert out == (
        b"a NO [PRIVACYREQUIRED] Plaintext authentication disallowed, use STARTTLS first.\r\n"
        b"b NO [PRIVACYREQUIRED] Plaintext authentication disallowed, use STARTTLS first.\r\n"
    )
    events, out = drive(conn, b"c STARTTLS\r\nd LOGIN injected pw\r\n")
    assert events == [StartTLS("c")]
    conn.accept_stls()
    # The clear-text line sent after STARTTLS is dropped, never a login.
    assert conn.data_to_send() == b"c OK Begin TLS negotiation now.\r\n" and conn.trailing_data() == b""
    assert "LOGINDISABLED" not in conn.capabilities() and "STARTTLS" not in conn.capabilities()
    events, _ = drive(conn, b"e LOGIN juan pw\r\n")
    assert events == [Login("juan", "pw", "LOGIN", "e")]


def test_password_never_in_repr():
    assert "secret" not in repr(Login("juan", "secret", "LOGIN", "a"))


def test_rejections_echo_the_tag_and_end_after_max_attempts():
    conn = ServerConnection()
    for n in range(I.MAX_AUTH_ATTEMPTS):
        events, _ = drive(conn, b"t%d LOGIN juan pw\r\n" % n)
        assert events == [Login("juan", "pw", "LOGIN", f"t{n}")]
        conn.reject_login()
        out = bytes(conn.data_to_send())
        assert out.startswith(b"t%d NO [AUTHENTICATIONFAILED] Authentication failed.\r\n" % n)
    assert out.endswith(b"* BYE Too many failed logins.\r\n")
    assert isinstance(conn.next_event(), Closed)


def test_accept_login_keeps_pipelined_input_for_the_backend():
    conn = ServerConnection()
    events, _ = drive(conn, b"a LOGIN juan pw\r\nb SELECT INBOX\r\nc FETCH 1 BODY[]\r\n")
    assert events == [Login("juan", "pw", "LOGIN", "a")]
    conn.accept_login(send=False)
    assert conn.state is State.AUTHENTICATED and conn.next_event() is NEED_DATA
    assert conn.trailing_data() == b"b SELECT INBOX\r\nc FETCH 1 BODY[]\r\n"


def test_misuse_is_a_local_error():
    conn = ServerConnection()
    with pytest.raises(LocalProtocolError):
        conn.accept_login()
    with pytest.raises(LocalProtocolError):
        conn.accept_stls()


def test_login_ok_carries_the_capabilities():
    assert I.login_ok("a1", "IMAP4rev1 IDLE") == b"a1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in.\r\n"


def test_line_too_long_is_fatal_and_bounded():
    conn = ServerConnection()
    with pytest.raises(RemoteProtocolError):
        conn.receive_data(b"a LOGIN " + b"x" * I.MAX_LINE)
        conn.next_event()
    assert bytes(conn.data_to_send()) == b"* BYE [LIMIT] Line too long\r\n"
    assert conn.state is State.CLOSED and isinstance(conn.next_event(), Closed)


def test_nonsync_literal_over_the_limit_is_fatal():
    conn = ServerConnection()
    conn.receive_data(b"a LOGIN {%d+}\r\n" % (I.MAX_LITERAL + 1))
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    assert bytes(conn.data_to_send()) == b"* BYE [LIMIT] Literal too big\r\n"


def test_literal_at_the_limit_is_accepted():
    conn = ServerConnection()
    user = b"u" * I.MAX_CREDENTIAL
    events, _ = drive(conn, b"a LOGIN {%d+}\r\n%s pw\r\n" % (len(user), user))
    assert events == [Login(user.decode(), "pw", "LOGIN", "a")]


def test_command_over_the_total_limit_is_refused():
    conn = ServerConnection()
    part = b"{%d+}\r\n%s " % (I.MAX_LITERAL, b"v" * I.MAX_LITERAL)
    data = b'a ID ("f" ' + part * (I.MAX_COMMAND // I.MAX_LITERAL + 1)
    conn.receive_data(data)
    with pytest.raises(RemoteProtocolError):  # a LITERAL+ that would pass the total: fatal
        for _ in range(100):
            conn.next_event()
    assert b"[LIMIT]" in bytes(conn.data_to_send())


def test_too_many_bad_commands_end_the_session():
    conn = ServerConnection()
    with pytest.raises(RemoteProtocolError):
        drive(conn, b"x FROB\r\n" * I.MAX_BAD_COMMANDS)
    assert bytes(conn.data_to_send()).endswith(b"* BYE Too many bad commands\r\n")


def test_too_much_pipelined_input_is_fatal():
    conn = ServerConnection()
    drive(conn, b"a LOGIN juan pw\r\n")  # waiting for the answer: nothing more is parsed
    conn.receive_data(b"b NOOP\r\n" * (I.MAX_PENDING_INPUT // 8 + 1))
    with pytest.raises(RemoteProtocolError):
        conn.receive_data(b"c NOOP\r\n")


def test_id_limits():
    conn = ServerConnection()
    pairs = b" ".join(b'"f%d" "v"' % i for i in range(I.MAX_ID_PAIRS + 1))
    _, out = drive(conn, b"a ID (" + pairs + b")\r\n")
    assert out == b"a BAD [LIMIT] Too many ID fields\r\n"
    _, out = drive(conn, b'b ID ("' + b"n" * (I.MAX_ID_FIELD + 1) + b'" "v")\r\n')
    assert out == b"b BAD ID field names are strings of up to 30 octets\r\n"


# --- Fuzz: parse, or raise the peer-error type, nothing else; always bounded --------------------
VALID = [
    b"a LOGIN juan pw\r\n",
    b'b LOGIN "j\\"u" {2+}\r\npw\r\n',
    b"c LOGIN {4}\r\njuan pw\r\n",
    b"d AUTHENTICATE PLAIN " + b64(b"\0juan\0pw") + b"\r\n",
    b"e AUTHENTICATE PLAIN\r\n=\r\n",
    b'f ID ("name" "x" "os" NIL)\r\n',
    b"g CAPABILITY\r\n",
    b"h STARTTLS\r\n",
    b"i NOOP\r\n",
    b"j LOGOUT\r\n",
    b"k AUTHENTICATE PLAIN\r\n*\r\n",
]
WORDS = [
    b"{",
    b"}",
    b"+}",
    b"{5}",
    b"{0+}",
    b"(",
    b")",
    b'"',
    b"\\",
    b" ",
    b"\r\n",
    b"\n",
    b"\r",
    b"\x00",
    b"\xff",
    b"NIL",
    b"*",
    b"]",
    b"{99999999999}",
]


def mutate(rnd, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rnd.randint(1, 4)):
        op = rnd.randrange(3)
        pos = rnd.randint(0, len(data))
        if op == 0 and data:
            del data[min(pos, len(data) - 1)]
        elif op == 1:
            data[pos:pos] = rnd.choice(WORDS)
        elif data:
            data[min(pos, len(data) - 1)] = rnd.randrange(256)
    return bytes(data)


fuzz_input = st.one_of(
    st.binary(max_size=400),
    st.lists(st.one_of(st.sampled_from(VALID + WORDS), st.binary(max_size=30)), max_size=40).map(b"".join),
    st.tuples(st.lists(st.sampled_from(VALID), min_size=1, max_size=8), st.randoms()).map(
        lambda t: b"".join(mutate(t[1], v) for v in t[0])
    ),
)


@settings(max_examples=500, deadline=None)
@given(fuzz_input, st.booleans(), st.booleans(), st.integers(min_value=1, max_value=64), st.randoms())
def test_fuzz_parser_only_events_or_peer_errors(data, starttls, plaintext, chunk, rnd):
    conn = ServerConnection(starttls=starttls, plaintext_auth=plaintext)
    conn.send_greeting()
    conn.data_to_send()
    sent = 0
    try:
        for i in range(0, len(data) + 1, chunk):
            conn.receive_data(data[i : i + chunk] if i < len(data) else b"")
            for _ in range(1000):
                ev = conn.next_event()
                assert len(conn._in) <= I.MAX_PENDING_INPUT + chunk  # buffered input stays bounded
                if ev is NEED_DATA:
                    break
                assert ev is not NEED_REPLY, "NEED_REPLY with every event answered"
                assert isinstance(ev, (Login, StartTLS, Closed))
                if isinstance(ev, Closed):
                    return
                if isinstance(ev, Login):
                    assert ev.user and ev.password and len(ev.user.encode()) <= I.MAX_CREDENTIAL
                    conn.reject_login()  # accept_login would end the pre-login part
                else:
                    conn.accept_stls()
                out = bytes(conn.data_to_send())
                sent += len(out)
                assert not out or out.endswith(b"\r\n")
            else:
                pytest.fail("next_event never asked for data")
        # Output is bounded by the input: a few answers per line at most.
        assert sent <= 200 * (data.count(b"\n") + 2)
    except RemoteProtocolError:
        assert conn.state is State.CLOSED
        assert bytes(conn.data_to_send()).endswith(b"\r\n") and isinstance(conn.next_event(), Closed)


def test_bad_line_announcing_a_nonsync_literal_is_fatal():
    """Its octets are already on the way: read as commands they would be an
    injection (the client's, but still), so the session ends."""
    for line in (b'a LOGIN "unterminated {5+}\r\n', b"a LOGIN \x01 {5+}\r\n"):
        conn = ServerConnection()
        conn.receive_data(line + b"b NOOP\r\n")
        with pytest.raises(RemoteProtocolError):
            conn.next_event()
        assert bytes(conn.data_to_send()).startswith(b"* BYE ")


def test_command_over_the_total_limit_announcing_a_nonsync_literal_is_fatal():
    conn = ServerConnection()
    x = b"x" * 8000
    conn.receive_data(b"a ID (" + x + b" {1}\r\nz " + x + b" {1}\r\nz " + x + b" {1+}\r\nz)\r\n")
    with pytest.raises(RemoteProtocolError):
        for _ in range(10):
            conn.next_event()
    assert bytes(conn.data_to_send()).endswith(b"* BYE [LIMIT] Command too long\r\n")
