"""RFC 3461 (DSN) parameters in the LMTP machine (delivery/lmtp.py): accepted
with a valid syntax, refused with 501 5.5.4 otherwise, announced in LHLO and
handed on in the events (a proxy passes them on, pdeliveryd logs ORCPT)."""

import os
import shutil
import socket
import subprocess

import pytest

from delivery.layout import MailboxLayout
from delivery.lmtp import ENVID_MAX, ORCPT_MAX
from tests.delivery.test_delivery_lmtp import feeds, run
from tests.support.delivery_util import codes, free_port, lmtp_session, messages, one_store, wait_for

# exactly what Dovecot's LMTP proxy sends (lmtp_proxy = yes)
DOVECOT_RCPT = b"RCPT TO:<user@example.org> ORCPT=rfc822;user@example.org\r\n"


def session(mail: bytes = b"MAIL FROM:<s@x>", rcpts: list[bytes] = (b"RCPT TO:<u@x>",)) -> bytes:
    return (
        b"LHLO a\r\n"
        + mail
        + b"\r\n"
        + b"".join(r if r.endswith(b"\n") else r + b"\r\n" for r in rcpts)
        + b"DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n"
    )


def test_dsn_announced_in_lhlo():
    _, _, _, out = run([b"LHLO a\r\nQUIT\r\n"], dsn=True)
    assert b"250-DSN\r\n" in out
    _, _, _, out = run([b"LHLO a\r\nQUIT\r\n"])  # off by default (pdelivery -l, as its C twin)
    assert b"DSN" not in out


def test_without_dsn_its_parameters_stay_unsupported():
    codes, _, _, _ = run([b"LHLO a\r\nMAIL FROM:<s@x> RET=FULL\r\nMAIL FROM:<s@x>\r\n" + DOVECOT_RCPT + b"QUIT\r\n"])
    assert codes == ["220", "250", "555", "250", "555", "221"]


def test_dovecot_proxy_rcpt_accepted_and_orcpt_handed_on():
    for chunks in feeds(session(rcpts=[DOVECOT_RCPT])):
        codes, messages, _, _ = run(chunks, dsn=True)
        assert codes == ["220", "250", "250", "250", "354", "250", "221"]
        [m] = messages
        assert m.recipients == ["user@example.org"]
        assert m.rcpt_params == [{"ORCPT": "rfc822;user@example.org"}]


def test_all_dsn_parameters_kept_per_recipient():
    data = session(
        b"MAIL FROM:<s@x> RET=HDRS ENVID=QQ314159+2B1",
        [
            b"RCPT TO:<a@x> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;A+2Bx@y",
            b"RCPT TO:<nobody@x> NOTIFY=NEVER",
            b"RCPT TO:<b@x> notify=never",
        ],
    )
    codes, [m], _, _ = run([data], dsn=True)
    assert codes == ["220", "250", "250", "250", "550", "250", "354", "250", "250", "221"]
    assert m.params == {"RET": "HDRS", "ENVID": "QQ314159+2B1"}
    assert m.recipients == ["a@x", "b@x"]
    assert m.rcpt_params == [{"NOTIFY": "SUCCESS,DELAY", "ORCPT": "rfc822;A+2Bx@y"}, {"NOTIFY": "never"}]


BAD = [
    b"MAIL FROM:<s@x> RET=BODY",
    b"MAIL FROM:<s@x> RET=FULL RET=HDRS",
    b"MAIL FROM:<s@x> ENVID=",
    b"MAIL FROM:<s@x> ENVID=a=b",  # "=" must be written +3D
    b"MAIL FROM:<s@x> ENVID=a+3d",  # hex digits are upper case
    b"MAIL FROM:<s@x> ENVID=" + b"e" * (ENVID_MAX + 1),
    b"RCPT TO:<u@x> NOTIFY=NEVER,SUCCESS",
    b"RCPT TO:<u@x> NOTIFY=SOMETIMES",
    b"RCPT TO:<u@x> NOTIFY=",
    b"RCPT TO:<u@x> NOTIFY=DELAY,DELAY",
    b"RCPT TO:<u@x> ORCPT=user@example.org",  # no address type
    b"RCPT TO:<u@x> ORCPT=rfc822;",
    "RCPT TO:<u@x> ORCPT=rfc822;josé@x".encode(),  # xtext is ASCII
    b"RCPT TO:<u@x> ORCPT=rfc822;" + b"o" * ORCPT_MAX,
    b"RCPT TO:<u@x> NOTIFY=NEVER NOTIFY=NEVER",
]


@pytest.mark.parametrize("command", BAD, ids=[c.decode()[:40] for c in BAD])
def test_bad_dsn_values_are_501_5_5_4(command):
    if command.startswith(b"MAIL"):
        data = b"LHLO a\r\n" + command + b"\r\nQUIT\r\n"
        expect = ["220", "250", "501", "221"]
    else:
        data = b"LHLO a\r\nMAIL FROM:<s@x>\r\n" + command + b"\r\nQUIT\r\n"
        expect = ["220", "250", "250", "501", "221"]
    codes, _, _, out = run([data], dsn=True)
    assert codes == expect
    assert b"501 5.5.4 " in out


def test_rcpt_event_carries_params():
    from delivery.lmtp import NEED_DATA, LMTPServerConnection, RcptRequest

    conn = LMTPServerConnection("h", dsn=True)
    conn.receive_data(b"LHLO a\r\nMAIL FROM:<s@x> RET=FULL\r\n" + DOVECOT_RCPT)
    ev = conn.next_event()
    while ev is NEED_DATA:
        ev = conn.next_event()
    assert isinstance(ev, RcptRequest)
    assert ev.params == {"ORCPT": "rfc822;user@example.org"}
    assert conn.mail_params == {"RET": "FULL"}


STORE = "127.0.0.34"


def assert_one_copy_each(root, rcpt_domain: str, users=("juan", "pepe")) -> None:
    """One copy in each user's Maildir, from ana, delivered to user@rcpt_domain."""
    layout = MailboxLayout(root)
    for user in users:
        [f] = messages(layout.path(user))
        assert f.read_bytes().startswith(
            b"Return-Path: <ana@example.org>\nDelivered-To: %s@%s\n" % (user.encode(), rcpt_domain.encode())
        )


def test_pdeliveryd_delivers_what_dovecots_lmtp_proxy_sends_and_logs_orcpt(tmp_path):
    with one_store(tmp_path, STORE) as (srv, port):
        out = lmtp_session(
            STORE,
            port,
            b"LHLO proxy.example\r\nMAIL FROM:<ana@example.org> RET=HDRS "
            b"ENVID=e1\r\nRCPT TO:<juan@example.org> ORCPT=rfc822;juan@example.org\r\n"
            b"RCPT TO:<pepe@example.org> NOTIFY=FAILURE ORCPT=rfc822;Alias+2Bx@lists.example"
            b"\r\nDATA\r\nSubject: dsn\r\n\r\nx\r\n.\r\nQUIT\r\n",
        )
        assert codes(out) == ["220", "250", "250", "250", "250", "354", "250", "250", "221"], out
        assert b"250-DSN\r\n" in out
        # Delivered-To is the RCPT address, not ORCPT
        assert_one_copy_each(tmp_path / "root", "example.org")
        srv.wait_line(r"delivered qid=- to=pepe .* orcpt=rfc822;Alias\+2Bx@lists\.example", "orcpt logged", 10)


PROXIED_STORE = "127.0.0.37"


@pytest.mark.root
@pytest.mark.skipif(not shutil.which("dovecot"), reason="dovecot-core not installed (deps/debian-packages.txt)")
@pytest.mark.skipif(os.geteuid() != 0, reason="Dovecot's master needs root")
def test_dovecot_lmtp_proxy_in_front_of_pdeliveryd(tmp_path):
    """Dovecot's LMTP proxy (lmtp_proxy = yes, the passdb giving the host)
    sends ORCPT when its passdb rewrites the recipient (destuser): the old
    pdeliveryd answered that RCPT 555, and Dovecot passed the refusal on."""
    with one_store(tmp_path, PROXIED_STORE) as (srv, port):
        d = tmp_path / "dovecot"
        (d / "run").mkdir(parents=True)
        (d / "state").mkdir()
        proxy_port = free_port()
        conf = d / "dovecot.conf"
        conf.write_text(f"""base_dir = {d}/run
state_dir = {d}/state
instance_name = pwmail-test-lmtp-proxy
protocols = lmtp
listen = 127.0.0.1
log_path = {d}/log
ssl = no
hostname = proxy.example
postmaster_address = postmaster@example.org
lmtp_proxy = yes
passdb {{
  driver = static
  args = nopassword=y proxy=y host={PROXIED_STORE} port={port} destuser=%n@store.example
}}
userdb {{
  driver = static
  args = uid=2000 gid=2000 home=/nonexistent
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {proxy_port}
  }}
}}
""")
        subprocess.run(["dovecot", "-c", str(conf)], check=True, timeout=30)
        try:
            wait_for(lambda: _connects("127.0.0.1", proxy_port), timeout=30)
            out = lmtp_session(
                "127.0.0.1",
                proxy_port,
                b"LHLO mx\r\nMAIL FROM:<ana@example.org>\r\n"
                b"RCPT TO:<juan@example.org>\r\nRCPT TO:<pepe@example.org>\r\nDATA\r\n"
                b"Subject: via Dovecot\r\n\r\nx\r\n.\r\nQUIT\r\n",
                timeout=30,
            )
        finally:
            subprocess.run(["dovecot", "-c", str(conf), "stop"], timeout=30)
        assert codes(out) == ["220", "250", "250", "250", "250", "354", "250", "250", "221"], out
        assert_one_copy_each(tmp_path / "root", "store.example")
        srv.wait_line(r"delivered qid=\S+ to=juan .* orcpt=rfc822;juan@example\.org", "orcpt logged", 10)


def _connects(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False
