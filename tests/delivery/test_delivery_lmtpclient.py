"""lmtpclient against a scripted fake LMTP server: replies out of step with
the commands (extra, missing, out of order) are a protocol error, never a
delivery; arguments with CR/LF/NUL are refused before connecting."""
import socket
import threading

import pytest

from delivery.lmtpclient import InvalidArgument, LMTPProtocolError, LMTPUnavailable, deliver

LHLO = b"250-fake\r\n250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n250 CHUNKING\r\n"
GOOD = [b"220 fake\r\n", LHLO, b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n", b"250 2.0.0 stored\r\n", b"221 2.0.0 bye\r\n"]


def fake(answers):
    """A server that reads one chunk per step and sends the next canned answer."""
    srv = socket.create_server(("127.0.0.1", 0))
    seen = []

    def run():
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(10)
            try:                          # the client may hang up early: that is the point
                for i, a in enumerate(answers):
                    if i:
                        seen.append(conn.recv(65536))
                    conn.sendall(a)
            except OSError:
                pass
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return srv, seen


def go(answers, timeout=3.0):
    srv, seen = fake(answers)
    with srv:
        return deliver("127.0.0.1", srv.getsockname()[1], "a@x", ["juan"], b"hi\r\n", timeout=timeout)


def test_good_session_delivers():
    assert go(GOOD)[0].ok


@pytest.mark.parametrize("answers", [
    GOOD[:2] + [b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n250 2.1.5 injected\r\n", b"451 4.3.0 failed\r\n", GOOD[4]],
    GOOD[:2] + [b"250 2.1.0 ok\r\n250 2.0.0 stored\r\n", b"250 2.1.5 ok\r\n", GOOD[4]],
    GOOD[:3] + [b"", GOOD[4]],
    GOOD[:3] + [b"250 2.0.0 stored\r\n250 2.0.0 again\r\n", GOOD[4]],
], ids=["extra-250", "out-of-order", "missing", "extra-after-data"])
def test_replies_out_of_step_are_never_a_delivery(answers):
    with pytest.raises(LMTPUnavailable):
        go(answers)


def test_out_of_order_is_protocol_error():
    with pytest.raises(LMTPProtocolError):
        go(GOOD[:2] + [b"250 2.1.0 ok\r\n250 2.0.0 stored\r\n", b"250 2.1.5 ok\r\n", GOOD[4]])


@pytest.mark.parametrize("kw", [{"recipients": ["juan>\r\nRCPT TO:<pepe"]}, {"sender": "a\r\nRSET"},
                                {"queue_id": "Q\nX"}, {"recipients": ["ju\x00an"]}])
def test_bad_arguments_refused_before_connecting(kw):
    args = {"sender": "a@x", "recipients": ["juan"], **kw}
    with pytest.raises(InvalidArgument):
        deliver("127.0.0.1", 9, args["sender"], args["recipients"], b"x\r\n", queue_id=kw.get("queue_id"))
