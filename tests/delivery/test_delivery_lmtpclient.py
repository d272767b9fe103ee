"""lmtpclient, and the C pdelivery end to end, against a scripted fake LMTP
server: replies out of step with the commands (extra, missing, out of
order) are a protocol error, never a delivery (pdelivery: exit 75, never
0); arguments with CR/LF/NUL are refused before connecting."""

import socket
import subprocess
import threading

import pytest

from delivery.lmtpclient import InvalidArgument, LMTPProtocolError, LMTPUnavailable, deliver
from tests.support import pwtest
from tests.support.delivery_util import client_conf, env_with, write_users

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
            try:  # the client may hang up early: that is the point
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


OUT_OF_STEP = pytest.mark.parametrize(
    "answers",
    [
        GOOD[:2] + [b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n250 2.1.5 injected\r\n", b"451 4.3.0 failed\r\n", GOOD[4]],
        GOOD[:2] + [b"250 2.1.0 ok\r\n250 2.0.0 stored\r\n", b"250 2.1.5 ok\r\n", GOOD[4]],
        GOOD[:3] + [b"", GOOD[4]],
        GOOD[:3] + [b"250 2.0.0 stored\r\n250 2.0.0 again\r\n", GOOD[4]],
        GOOD[:4] + [b"221 2.0.0 bye\r\n250 2.0.0 after the end\r\n"],
        GOOD[:4] + [b"250 2.0.0 not a bye\r\n"],
        GOOD[:4],
    ],
    ids=["extra-250", "out-of-order", "missing", "extra-after-data", "extra-after-quit", "wrong-quit", "no-quit"],
)


@OUT_OF_STEP
def test_replies_out_of_step_are_never_a_delivery(answers):
    with pytest.raises(LMTPUnavailable):
        go(answers)


def test_out_of_order_is_protocol_error():
    with pytest.raises(LMTPProtocolError):
        go(GOOD[:2] + [b"250 2.1.0 ok\r\n250 2.0.0 stored\r\n", b"250 2.1.5 ok\r\n", GOOD[4]])


@pytest.mark.parametrize(
    "kw",
    [
        {"recipients": ["juan>\r\nRCPT TO:<pepe"]},
        {"sender": "a\r\nRSET"},
        {"queue_id": "Q\nX"},
        {"recipients": ["ju\x00an"]},
    ],
)
def test_bad_arguments_refused_before_connecting(kw):
    args = {"sender": "a@x", "recipients": ["juan"], **kw}
    with pytest.raises(InvalidArgument):
        deliver("127.0.0.1", 9, args["sender"], args["recipients"], b"x\r\n", queue_id=kw.get("queue_id"))


# ---- the C pdelivery against the same fake ------------------------------------------


@pytest.fixture(scope="module")
def directory(tmp_path_factory):
    """A pwserver whose user juan lives on 127.0.0.1 (where the fakes listen)."""
    d = tmp_path_factory.mktemp("fake-lmtp")
    users = write_users(d / "users", {"juan": (2001, 2001, "127.0.0.1", False)})
    with pwtest.PwServer(users) as pw:
        settings = d / "pwmail.toml"
        settings.write_text("[delivery]\nconnect_timeout = 2.0\ntimeout = 3.0\n")
        yield env_with(client_conf(d / "pwserver.conf", [pw.address]), settings)


def pdelivery_to(env, answers, *args, stdin=b"hi\n"):
    srv, seen = fake(answers)
    with srv:
        r = subprocess.run(
            [str(pwtest.BIN / "pdelivery"), "--lmtp-port", str(srv.getsockname()[1]), "-f", "a@x", *args],
            input=stdin,
            capture_output=True,
            env=env,
            timeout=60,
        )
    return r, seen


def test_pdelivery_good_session_is_0(directory):
    r, seen = pdelivery_to(directory, GOOD, "-i", "Q1", "-d", "juan")
    assert r.returncode == 0, r.stderr
    assert seen[1].startswith(b"MAIL FROM:<a@x>") and b"RCPT TO:<juan>\r\n" in seen[1]
    assert seen[2] == b"BDAT 4 LAST\r\nhi\r\n"  # LF -> CRLF, in one piece
    assert seen[3] == b"QUIT\r\n"


@OUT_OF_STEP
def test_pdelivery_replies_out_of_step_are_75(directory, answers):
    r, _ = pdelivery_to(directory, answers, "-d", "juan")
    assert r.returncode == 75, r.stderr
    assert b"4.4.1" in r.stderr


@OUT_OF_STEP
def test_pdelivery_lmtp_mode_replies_out_of_step_are_451(directory, answers):
    """-l: the recipient whose store answered out of step gets 451, never 250."""
    script = b"LHLO mx\r\nMAIL FROM:<a@x>\r\nRCPT TO:<juan>\r\nDATA\r\nhi\r\n.\r\nQUIT\r\n"
    r, _ = pdelivery_to(directory, answers, "-l", stdin=script)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.split(b"\r\n") if line[3:4] == b" "]
    assert [line[:3] for line in lines] == [b"220", b"250", b"250", b"250", b"354", b"451", b"221"]
    assert lines[5].startswith(b"451 4.4.1 ")


def test_pdelivery_data_is_dot_stuffed_without_chunking(directory):
    lhlo = b"250-fake\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n"
    answers = [GOOD[0], lhlo, GOOD[2], b"354 go\r\n", GOOD[3], GOOD[4]]
    r, seen = pdelivery_to(directory, answers, "-d", "juan", stdin=b".one\n..two\nend")
    assert r.returncode == 0, r.stderr
    assert seen[2] == b"DATA\r\n"
    assert seen[3] == b"..one\r\n...two\r\nend\r\n.\r\n"


def test_pdelivery_refusals_are_per_recipient(directory):
    """A 550 at RCPT is 67 (no data sent: RSET); a 452 after the data is 75."""
    r, seen = pdelivery_to(
        directory,
        GOOD[:2] + [b"250 2.1.0 ok\r\n550 5.1.1 no such user\r\n", b"250 2.0.0 ok\r\n", GOOD[4]],
        "-d",
        "juan",
    )
    assert r.returncode == 67 and b"5.1.1" in r.stderr
    assert seen[2] == b"RSET\r\n"
    r, _ = pdelivery_to(directory, GOOD[:3] + [b"452 4.3.1 full\r\n", GOOD[4]], "-d", "juan")
    assert r.returncode == 75 and b"4.3.1" in r.stderr


def test_pdelivery_without_pipelining_sends_one_command_at_a_time(directory):
    answers = [
        GOOD[0],
        b"250-fake\r\n250 8BITMIME\r\n",
        b"250 2.1.0 ok\r\n",
        b"250 2.1.5 ok\r\n",
        b"354 go\r\n",
        b"250 2.0.0 stored\r\n",
        GOOD[4],
    ]
    r, seen = pdelivery_to(directory, answers, "-i", "Q2", "-d", "juan")
    assert r.returncode == 0, r.stderr
    assert seen == [
        seen[0],
        b"MAIL FROM:<a@x> BODY=8BITMIME\r\n",
        b"RCPT TO:<juan>\r\n",
        b"DATA\r\n",
        b"hi\r\n.\r\n",
        b"QUIT\r\n",
    ]
    assert seen[0].startswith(b"LHLO ")
