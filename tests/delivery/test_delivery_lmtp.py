"""The sans-I/O LMTP state machine (delivery/lmtp.py): table-driven sessions
fed whole, one byte at a time and with trailing data; a property test that
any input parses or raises PeerError, nothing else."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from delivery.lmtp import (
    CLOSED,
    NEED_DATA,
    Limits,
    LMTPServerConnection,
    LocalProtocolError,
    MessageReceived,
    PeerError,
    RcptRequest,
    Reply,
)

ACCEPT = Reply(250, "2.1.5", "recipient OK")
UNKNOWN = Reply(550, "5.1.1", "no such user")
STORED = Reply(250, "2.0.0", "stored")


DEFAULT_LIMITS = Limits()


def run(chunks, limits=DEFAULT_LIMITS, dsn=False):
    """Drive a session; recipients named 'nobody' are refused. Returns
    (reply codes in order, messages, closed)."""
    conn = LMTPServerConnection("store1.example", limits, dsn=dsn)
    out = bytearray(conn.data_to_send())
    messages = []
    chunks = list(chunks)
    closed = False
    while True:
        try:
            ev = conn.next_event()
        except PeerError as e:
            out += conn.data_to_send()
            assert out.endswith(bytes(e.reply))  # the last words are queued for us
            closed = True
            break
        if ev is CLOSED:
            closed = True
            break
        if ev is NEED_DATA:
            out += conn.data_to_send()
            conn.receive_data(chunks.pop(0) if chunks else b"")
        elif isinstance(ev, RcptRequest):
            conn.answer_rcpt(UNKNOWN if ev.address.startswith("nobody") else ACCEPT)
        elif isinstance(ev, MessageReceived):
            messages.append(ev)
            conn.answer_message([STORED] * len(ev.recipients))
    out += conn.data_to_send()
    lines = bytes(out).split(b"\r\n")
    codes = [line[:3].decode() for line in lines if line[3:4] == b" "]
    return codes, messages, closed, bytes(out)


def feeds(data: bytes):
    """The same input whole, byte by byte, and split in two odd places."""
    yield [data]
    yield [data[i : i + 1] for i in range(len(data))]
    yield [data[:7], data[7 : len(data) // 2], data[len(data) // 2 :]]


SIMPLE = (
    b"LHLO mx.example\r\nMAIL FROM:<a@x>\r\nRCPT TO:<juan@x>\r\nRCPT TO:<nobody@x>\r\n"
    b"RCPT TO:<pepe@x>\r\nDATA\r\nSubject: hi\r\n\r\n..dot\r\nbody\r\n.\r\nQUIT\r\n"
)

CASES = [
    # name, input, expected reply codes (final lines), expected message bodies
    (
        "simple",
        SIMPLE,
        ["220", "250", "250", "250", "550", "250", "354", "250", "250", "221"],
        [b"Subject: hi\r\n\r\n.dot\r\nbody\r\n"],
    ),
    (
        "empty message",
        b"LHLO a\r\nMAIL FROM:<>\r\nRCPT TO:<u>\r\nDATA\r\n.\r\nQUIT\r\n",
        ["220", "250", "250", "250", "354", "250", "221"],
        [b""],
    ),
    (
        "leading dot line",
        b"LHLO a\r\nMAIL FROM:<>\r\nRCPT TO:<u>\r\nDATA\r\n..x\r\n.\r\nQUIT\r\n",
        ["220", "250", "250", "250", "354", "250", "221"],
        [b".x\r\n"],
    ),
    (
        "bdat chunks",
        b"LHLO a\r\nMAIL FROM:<s> BODY=8BITMIME SIZE=10\r\nRCPT TO:<u>\r\nBDAT 5\r\nab\r\n.BDAT 3 LAST\r\nxyzQUIT\r\n",
        ["220", "250", "250", "250", "250", "250", "221"],
        [b"ab\r\n.xyz"],
    ),
    (
        "bdat no recipients",
        b"LHLO a\r\nMAIL FROM:<s>\r\nRCPT TO:<nobody>\r\nBDAT 4 LAST\r\nRSETQUIT\r\n",
        ["220", "250", "250", "550", "554", "221"],
        [],
    ),
    (
        "data no recipients",
        b"LHLO a\r\nMAIL FROM:<s>\r\nRCPT TO:<nobody>\r\nDATA\r\nQUIT\r\n",
        ["220", "250", "250", "550", "554", "221"],
        [],
    ),
    ("need lhlo", b"MAIL FROM:<s>\r\nHELO a\r\nEHLO a\r\nQUIT\r\n", ["220", "503", "500", "500", "221"], []),
    (
        "sequence",
        b"LHLO a\r\nRCPT TO:<u>\r\nDATA\r\nMAIL FROM:<s>\r\nMAIL FROM:<s>\r\nQUIT\r\n",
        ["220", "250", "503", "503", "250", "503", "221"],
        [],
    ),
    (
        "size param too big",
        b"LHLO a\r\nMAIL FROM:<s> SIZE=999999999999\r\nNOOP\r\nQUIT\r\n",
        ["220", "250", "552", "250", "221"],
        [],
    ),
    (
        "unknown params",
        b"LHLO a\r\nMAIL FROM:<s> FOO=1\r\nMAIL FROM:<s> BODY=BINARYMIME\r\nMAIL FROM:<s>\r\n"
        b"RCPT TO:<u> NOTIFY=NEVER\r\nQUIT\r\n",
        ["220", "250", "555", "501", "250", "555", "221"],
        [],
    ),
    (
        "rset clears",
        b"LHLO a\r\nMAIL FROM:<s>\r\nRCPT TO:<u>\r\nRSET\r\nDATA\r\nQUIT\r\n",
        ["220", "250", "250", "250", "250", "503", "221"],
        [],
    ),
    ("bare lf commands", b"LHLO a\nNOOP\nVRFY x\nHELP\nQUIT\n", ["220", "250", "250", "252", "214", "221"], []),
    (
        "queue id",
        b"LHLO a\r\nMAIL FROM:<s> XQUEUEID=4ATQ1x\r\nRCPT TO:<u>\r\nDATA\r\nx\r\n.\r\nQUIT\r\n",
        ["220", "250", "250", "250", "354", "250", "221"],
        [b"x\r\n"],
    ),
    (
        "eof mid data",
        b"LHLO a\r\nMAIL FROM:<s>\r\nRCPT TO:<u>\r\nDATA\r\npartial\r\n",
        ["220", "250", "250", "250", "354"],
        [],
    ),
]


@pytest.mark.parametrize("name,data,codes,bodies", CASES, ids=[c[0] for c in CASES])
def test_sessions(name, data, codes, bodies):
    for chunks in feeds(data):
        got_codes, messages, closed, _ = run(chunks)
        assert got_codes == codes, (name, chunks[:3])
        assert [m.data for m in messages] == bodies
        assert closed


@pytest.mark.parametrize("name,data,codes,bodies", CASES[:4], ids=[c[0] for c in CASES[:4]])
def test_trailing_data_after_quit_ignored(name, data, codes, bodies):
    got_codes, messages, _, _ = run([data + b"NOOP\r\nGARBAGE\x00\xff"])
    assert got_codes == codes
    assert [m.data for m in messages] == bodies


def test_per_recipient_answers_and_params():
    _, messages, _, out = run([SIMPLE])
    m = messages[0]
    assert m.recipients == ["juan@x", "pepe@x"] and m.sender == "a@x"
    # two accepted recipients -> two answers after the data
    assert out.count(b"250 2.0.0 stored\r\n") == 2
    assert b"250-PIPELINING\r\n" in out and b"250-CHUNKING\r\n" in out and b"250-ENHANCEDSTATUSCODES" in out
    assert b"250-8BITMIME\r\n" in out and b"250-SIZE " in out
    _, messages, _, _ = run([b"LHLO a\r\nMAIL FROM:<s> XQUEUEID=4ATQ1x\r\nRCPT TO:<u>\r\nDATA\r\nx\r\n.\r\n"])
    assert messages[0].queue_id == "4ATQ1x"


def test_limit_message_size_data_and_bdat():
    lim = Limits(message_size_max=100)
    big = b"x" * 60 + b"\r\n"
    data = b"LHLO a\r\nMAIL FROM:<s>\r\nRCPT TO:<u>\r\nRCPT TO:<v>\r\nDATA\r\n" + big * 50 + b".\r\nNOOP\r\n"
    codes, messages, _, _ = run([data], lim)
    assert codes == ["220", "250", "250", "250", "250", "354", "552", "552", "250"]
    assert messages == []
    data = (
        b"LHLO a\r\nMAIL FROM:<s>\r\nRCPT TO:<u>\r\nBDAT 80\r\n"
        + b"y" * 80
        + b"BDAT 80 LAST\r\n"
        + b"z" * 80
        + b"NOOP\r\n"
    )
    codes, messages, _, _ = run([data], lim)
    assert codes == ["220", "250", "250", "250", "250", "552", "250"] and messages == []


def test_limit_message_line_length():
    lim = Limits(message_line_max=50)
    data = b"LHLO a\r\nMAIL FROM:<s>\r\nRCPT TO:<u>\r\nDATA\r\n" + b"x" * 51 + b"\r\n.\r\n"
    codes, messages, _, _ = run([data], lim)
    assert codes[-1] == "554" and messages == []
    data = b"LHLO a\r\nMAIL FROM:<s>\r\nRCPT TO:<u>\r\nDATA\r\n" + b"x" * 50 + b"\r\n.\r\n"
    assert run([data], lim)[0][-1] == "250"


def test_limit_recipients():
    lim = Limits(recipients_max=3)
    data = b"LHLO a\r\nMAIL FROM:<s>\r\n" + b"".join(b"RCPT TO:<u%d>\r\n" % i for i in range(5))
    codes, _, _, _ = run([data], lim)
    assert codes[3:] == ["250", "250", "250", "452", "452"]


def test_limit_command_line():
    lim = Limits(command_line_max=64)
    codes, _, closed, _ = run([b"LHLO a\r\nNOOP " + b"x" * 100 + b"\r\nNOOP\r\n"], lim)
    assert codes == ["220", "250", "500", "250"]
    codes, _, closed, _ = run([b"LHLO a\r\n" + b"x" * 100], lim)  # no line end: cannot resync
    assert codes[-1] == "500" and closed


def test_limit_bad_commands():
    codes, _, closed, _ = run([b"BAD\r\n" * 30], Limits(bad_commands_max=5))
    assert codes == ["220", "500", "500", "500", "500", "421"] and closed


def test_bdat_bad_size_is_fatal():
    codes, _, closed, _ = run([b"LHLO a\r\nMAIL FROM:<s>\r\nRCPT TO:<u>\r\nBDAT x\r\nNOOP\r\n"])
    assert codes[-1] == "501" and closed


def test_caller_misuse_is_local_error():
    conn = LMTPServerConnection("h")
    with pytest.raises(LocalProtocolError):
        conn.answer_rcpt(ACCEPT)
    conn.receive_data(b"LHLO a\r\nMAIL FROM:<s>\r\nRCPT TO:<u>\r\n")
    assert isinstance(conn.next_event(), RcptRequest)
    with pytest.raises(LocalProtocolError):
        conn.next_event()
    conn.answer_rcpt(ACCEPT)
    conn.receive_data(b"DATA\r\nx\r\n.\r\n")
    assert isinstance(conn.next_event(), MessageReceived)
    with pytest.raises(LocalProtocolError):
        conn.answer_message([])


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=40),
            st.sampled_from(
                [
                    b"LHLO a\r\n",
                    b"MAIL FROM:<s>\r\n",
                    b"RCPT TO:<u>\r\n",
                    b"RCPT TO:<nobody>\r\n",
                    b"DATA\r\n",
                    b".\r\n",
                    b"BDAT 3\r\n",
                    b"BDAT 2 LAST\r\n",
                    b"RSET\r\n",
                    b"\r\n",
                    b"..\r\n",
                    b"BDAT 99999999999999999999\r\n",
                    b"MAIL FROM:<s> SIZE=x\r\n",
                ]
            ),
        ),
        max_size=30,
    )
)
def test_any_input_parses_or_raises_peer_error(chunks):
    lim = Limits(command_line_max=64, message_size_max=200, recipients_max=4, bad_commands_max=10)
    codes, messages, closed, out = run(chunks, lim)  # anything but PeerError propagates and fails
    assert closed
    assert codes[0] == "220"
    for m in messages:
        assert len(m.data) <= 200 and m.recipients
