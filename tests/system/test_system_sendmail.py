"""Real Sendmail on mx1 of the namespace test bed (issue 6): SMTP from
client1 to Sendmail on mx1:25, which runs pdelivery (the documented mailer
block of docs/delivery.md) for local users; pdelivery finds the user on
pw1/pw2 and hands the message over LMTP to pdeliveryd on the user's store.
Each test is bounded in time; the bed tears everything down."""

from __future__ import annotations

import re
import time

import pytest

from pwmail.testbed import TestBed, namespace_support, sendmail
from pwmail.testbed.sendmail import message
from pwmail.testbed.system import MAIL_DOMAIN, PwmailSystem, hosts_for
from tests.support.delivery_util import wait_for

USERS = 3000
SENDER = f"ana@{MAIL_DOMAIN}"

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.fixture(scope="module")
def system():
    reason = namespace_support() or sendmail.unavailable()
    if reason:
        pytest.skip(reason)
    with TestBed(hosts_for()) as bed:
        s = PwmailSystem(bed, users=USERS, timeout_ms=1000, hedge_ms=50, recheck_s=2, sendmail=True)
        s.start()
        yield s


_taken: set[str] = set()


def fresh(s: PwmailSystem, store: str) -> str:
    """A user on store no other test of this module has used."""
    user = next(u for u in s.users_on(store, len(_taken) + 2) if u not in _taken)
    _taken.add(user)
    return user


def sendmail_said(s: PwmailSystem) -> str:
    """Sendmail's output and its local log, for failure messages."""
    return (
        s.bed.output("mx1", "sendmail")[-2000:]
        + "\n"
        + s.bed.output("mx1", "devlog")[-500:]
        + "\n"
        + "\n".join(s.bed.dir("mx1").joinpath("sendmail", "maillog").read_text().splitlines()[-20:])
    )


def queue_id(stored: bytes) -> str:
    """Sendmail's queue id from its Received header in a stored message."""
    m = re.search(rb"\nReceived: from .*?by mx1\.example\.org .*?id ([0-9A-Za-z]+)", stored.replace(b"\n\t", b" "))
    assert m, stored[:600]
    return m.group(1).decode()


@pytest.mark.timeout(120)
def test_smtp_from_client1_lands_once_byte_for_byte_on_the_users_store(system):
    s, bed = system, system.bed
    for store in s.stores:
        user = fresh(s, store)
        rcpt = f"{user}@{MAIL_DOMAIN}"
        data = message(f"smtp via mx1 to {store}", rcpt)
        assert s.smtp_send(SENDER, [rcpt], data) == {}
        files = wait_for(lambda: s.messages_on_disk(user, store), 60)
        assert len(files) == 1, sendmail_said(s)
        path = files[0].relative_to(s.spool(store))
        assert path.parts[:4] == (user[0], user[1], user[2], user) and path.parts[4] == "new"
        assert all(not s.mailbox(user, o).exists() for o in s.stores if o != store)
        stored = files[0].read_bytes()
        # pdeliveryd's two headers, Sendmail's Received, then the message unchanged (LF line ends)
        assert stored.startswith(f"Return-Path: <{SENDER}>\nDelivered-To: {user}\nReceived: ".encode())
        body = data.replace(b"\r\n", b"\n")
        assert stored.endswith(body)
        received = stored[len(f"Return-Path: <{SENDER}>\nDelivered-To: {user}\n") : -len(body)]
        assert re.fullmatch(
            rb"Received: from [^\n]*\[" + bed.addr("client1").encode() + rb"\][^\n]*\n"
            rb"(\t[^\n]*\n)+",
            received,
        ), received
        qid = queue_id(stored)
        # the queue is empty, and the central log has the delivery from mx1 (Sendmail and pdelivery) and the store
        assert wait_for(lambda: s.sendmail_queue() == [], 30), sendmail_said(s)
        want = [
            ("mx1", rf"sendmail\[\d+\]: {qid}: to=<{rcpt}>.* mailer=local, .*stat=Sent"),
            ("mx1", rf"pdelivery\[\d+\]: .*delivered qid={qid} to={user}\b"),
            (store, rf"pdeliveryd\[\d+\]: .*delivered .*to={user}\b"),
        ]

        def logged():
            lines = bed.log_lines()
            return all(any(line.split(" ", 2)[1] == h and re.search(rx, line) for line in lines) for h, rx in want)

        assert wait_for(logged, 10), (want, bed.log_lines()[-20:])
        # one delivery line per host, not more
        assert sum(1 for line in bed.log_lines() if re.search(want[1][1], line)) == 1


@pytest.mark.timeout(120)
def test_unknown_user_bounces_with_511_to_the_sender(system):
    s = system
    sender = fresh(s, "store1")
    before = len(s.messages_on_disk(sender))
    nobody = f"nadie-que-exista@{MAIL_DOMAIN}"
    assert s.smtp_send(f"{sender}@{MAIL_DOMAIN}", [nobody], message("to nobody", nobody)) == {}
    files = wait_for(lambda: s.messages_on_disk(sender)[before:], 60)
    assert len(files) == 1, sendmail_said(s)
    dsn = files[0].read_bytes()
    assert f"Final-Recipient: RFC822; {nobody}".encode() in dsn and b"Status: 5.1.1" in dsn
    assert b"Action: failed" in dsn
    assert dsn.startswith(f"Return-Path: <MAILER-DAEMON>\nDelivered-To: {sender}\n".encode())
    assert wait_for(lambda: s.sendmail_queue() == [], 30), sendmail_said(s)
    assert not s.mailbox("nadie-que-exista", "store1").exists()
    assert not s.mailbox("nadie-que-exista", "store2").exists()


@pytest.mark.timeout(240)
def test_store2_cut_stays_queued_in_sendmail_then_one_queue_run_delivers_once(system):
    s, bed = system, system.bed
    user = fresh(s, "store2")
    rcpt = f"{user}@{MAIL_DOMAIN}"
    data = message("while store2 is cut", rcpt)
    bed.cut("store2")
    try:
        t0 = time.monotonic()
        assert s.smtp_send(SENDER, [rcpt], data) == {}

        def tried():  # the queue file records one delivery attempt (pdelivery exited 75)
            qf = s.sendmail_queue()
            return qf and re.search(rb"^N[1-9]", qf[0].read_bytes(), re.M)

        assert wait_for(tried, 90), sendmail_said(s)
        deferred_after = time.monotonic() - t0
        assert len(s.sendmail_queue()) == 1
        assert s.messages_on_disk(user, "store2") == []
    finally:
        bed.restore("store2")
    t0 = time.monotonic()
    run = s.sendmail_queue_run()
    assert run.returncode == 0, run.stderr
    assert wait_for(lambda: s.sendmail_queue() == [] and s.messages_on_disk(user, "store2"), 60), sendmail_said(s)
    delivered_after = time.monotonic() - t0
    assert len(s.messages_on_disk(user, "store2")) == 1
    assert s.messages_on_disk(user, "store2")[0].read_bytes().endswith(data.replace(b"\r\n", b"\n"))
    run = s.sendmail_queue_run()  # another queue run changes nothing
    assert run.returncode == 0, run.stderr
    time.sleep(0.5)
    assert len(s.messages_on_disk(user, "store2")) == 1
    assert not s.mailbox(user, "store1").exists()
    # Sendmail logged the deferral and then the delivery, through mx1's relay to log1
    lines = [line for line in bed.log_lines() if line.split(" ", 2)[1] == "mx1" and f"to=<{rcpt}>" in line]
    assert any("stat=Deferred" in line for line in lines), lines
    assert sum("stat=Sent" in line for line in lines) == 1, lines
    print(
        f"\nFIGURE sendmail on mx1, store2 cut: queued (pdelivery 75) after {deferred_after:.1f} s; "
        f"after restore one queue run delivered it in {delivered_after:.1f} s, once"
    )
