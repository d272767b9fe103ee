"""Real Postfix through lmtp-proxy to two real pdeliveryd stores (127.0.0.2
holds juan, ana and mudando, frozen; 127.0.0.3 holds pepe and jo), users
from a real pwserver through NSS. Postfix runs from its unpacked package in
a private mount namespace (tests/support/postfix_util.py) with the main.cf
and master.cf blocks of docs/delivery.md."""

import os
import pathlib
import re
import smtplib
import tempfile

import pytest

from tests.support import postfix_util
from tests.support.delivery_util import LmtpProxy, Pdeliveryd, free_port, messages, two_stores, wait_for

STORES = ["127.0.0.2", "127.0.0.3"]
HOME = {"juan": STORES[0], "ana": STORES[0], "mudando": STORES[0], "pepe": STORES[1], "jo": STORES[1]}

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(postfix_util.unavailable() is not None, reason=postfix_util.unavailable() or ""),
]


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    with two_stores(tmp_path_factory.mktemp("postfix"), STORES) as bed:
        proxy = LmtpProxy(
            bed["d"] / "proxy", free_port(), bed["conf"], {"lmtp_port": bed["port"], "connect_timeout": 2.0}
        )
        # Postfix's user must reach its folder: not below pytest's 0700 ones
        with proxy, tempfile.TemporaryDirectory(prefix="pwmail-postfix-", dir="/tmp") as work:
            os.chmod(work, 0o755)
            lmtp = f"inet:{proxy.host}:{proxy.port}"
            with postfix_util.Postfix(
                pathlib.Path(work) / "postfix", smtp_port=free_port(), lmtp=lmtp, pwserver_conf=bed["conf"]
            ) as pf:
                yield {**bed, "proxy": proxy, "postfix": pf, "work": pathlib.Path(work)}


def box(bed, user: str):
    return bed["layout"][HOME[user]].path(user)


def counts(bed, users) -> dict[str, int]:
    return {u: len(messages(box(bed, u))) for u in users}


def message(subject: str, to: str) -> bytes:
    return (
        f"From: ana@example.net\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}@example.net>\r\n\r\n"
        "Hola,\r\n.a line with a dot\r\n"
    ).encode()


def send(bed, rcpts: list[str], subject: str, pf=None) -> dict:
    """SMTP to Postfix (the bed's, else `pf`); the refused recipients (smtplib's dict) are returned."""
    pf = pf or bed["postfix"]
    with smtplib.SMTP(pf.host, pf.port, timeout=60) as s:
        return s.sendmail("ana@example.net", rcpts, message(subject, ", ".join(rcpts)))


def queue_empty(bed) -> bool:
    return bed["postfix"].queue() == []


def deferred_recipients(bed) -> list[dict]:
    """The recipients in Postfix's queue that were tried and deferred (with a delay_reason)."""
    return [r for m in bed["postfix"].queue() for r in m["recipients"] if "delay_reason" in r]


def test_delivers_to_users_on_both_stores(bed):
    before = counts(bed, ["juan", "pepe", "ana"])
    assert send(bed, ["juan@example.org", "pepe@example.org", "ana@example.org"], "to both stores") == {}
    assert wait_for(lambda: counts(bed, ["juan", "pepe", "ana"]) == {u: n + 1 for u, n in before.items()}, 60)
    assert wait_for(lambda: queue_empty(bed), 30)
    for u in ("juan", "pepe", "ana"):
        stored = messages(box(bed, u))[-1].read_bytes()
        # one Return-Path, one Delivered-To: the final delivery's (docs/delivery.md, trace headers)
        assert stored.startswith(f"Return-Path: <ana@example.net>\nDelivered-To: {u}@example.org\n".encode())
        assert stored.count(b"\nReturn-Path:") == 0 and stored.count(b"Delivered-To:") == 1
        assert b"\n..a line with a dot\n" not in stored and b"\n.a line with a dot\n" in stored
        assert b"Received: from " in stored  # Postfix's own trace
    # each through the proxy, each on its own store only
    assert "to=juan@example.org via 127.0.0.2: 250" in bed["proxy"].output()
    assert "to=pepe@example.org via 127.0.0.3: 250" in bed["proxy"].output()
    assert not bed["layout"][STORES[1]].path("juan").exists()
    # lmtp-proxy announces DSN: Postfix's ORCPT goes through it to the store's log
    bed["stores"][STORES[1]].wait_line(r"delivered qid=\S+ to=pepe .* orcpt=rfc822;pepe@example\.org", "orcpt", 10)


def test_unknown_user_refused_at_smtp_time_through_nss(bed):
    """local_recipient_maps = proxy:unix:passwd.byname: getpwnam through
    libnss_pwserver, answered while the client is still connected."""
    before = counts(bed, ["jo"])
    refused = send(bed, ["nadie@example.org", "jo@example.org"], "unknown user")
    assert list(refused) == ["nadie@example.org"]
    code, text = refused["nadie@example.org"]
    assert code == 550 and text.startswith(b"5.1.1 ")
    assert wait_for(lambda: counts(bed, ["jo"]) == {"jo": before["jo"] + 1}, 60)
    assert "nadie" not in bed["proxy"].output()  # never got as far as the proxy


def test_store_down_defers_its_recipient_then_delivers_it_once(bed):
    before = counts(bed, ["juan", "pepe"])
    store = bed["stores"][STORES[1]]
    store.stop()
    try:
        assert send(bed, ["juan@example.org", "pepe@example.org"], "store down") == {}
        assert wait_for(lambda: counts(bed, ["juan"]) == {"juan": before["juan"] + 1}, 60)

        deferred = wait_for(lambda: deferred_recipients(bed), 60)
        assert [r["address"] for r in deferred] == ["pepe@example.org"]
        assert "4.4.1" in deferred[0]["delay_reason"]
        assert counts(bed, ["pepe"]) == {"pepe": before["pepe"]}
    finally:
        bed["stores"][STORES[1]] = Pdeliveryd(store.root, store.host, store.port, bed["env"], init_root=False)
    bed["postfix"].flush()
    assert wait_for(lambda: counts(bed, ["pepe"]) == {"pepe": before["pepe"] + 1}, 60)
    assert wait_for(lambda: queue_empty(bed), 30)
    bed["postfix"].flush()  # nothing left to deliver a second time
    assert counts(bed, ["juan", "pepe"]) == {"juan": before["juan"] + 1, "pepe": before["pepe"] + 1}


def deferrals(bed, user: str) -> int:
    """Postfix's log lines deferring `user`'s copy."""
    return len(re.findall(rf"to=<{user}@example\.org>.*status=deferred", bed["postfix"].log()))


def test_frozen_user_deferred_in_postfix_queue(bed):
    before = counts(bed, ["mudando", "ana"])
    assert send(bed, ["mudando@example.org", "ana@example.org"], "frozen") == {}
    assert wait_for(lambda: counts(bed, ["ana"]) == {"ana": before["ana"] + 1}, 60)
    [rec] = wait_for(lambda: deferred_recipients(bed), 60)
    assert rec["address"] == "mudando@example.org" and "450 4.2.1" in rec["delay_reason"]
    # retried while still frozen: deferred again, still nothing stored
    tries = deferrals(bed, "mudando")
    bed["postfix"].flush()
    assert wait_for(lambda: deferrals(bed, "mudando") > tries, 60)
    assert counts(bed, ["mudando"]) == {"mudando": 0}
    bed["postfix"].run("postsuper", "-d", "ALL")  # an empty queue for the tests after this one
    assert wait_for(lambda: queue_empty(bed), 30)


def test_over_lmtp_proxys_unix_socket(bed):
    """mailbox_transport = lmtp:unix:PATH (docs/delivery.md's alternative),
    the socket opened to Postfix's user by proxy_unix_mode."""
    sock = bed["work"] / "lmtp-proxy.sock"
    settings = {"lmtp_port": bed["port"], "proxy_unix_mode": 0o666}
    before = counts(bed, ["jo", "juan"])
    with (
        LmtpProxy(bed["d"] / "proxy-unix", free_port(), bed["conf"], settings, unix=sock) as proxy,
        postfix_util.Postfix(
            bed["work"] / "postfix-unix", smtp_port=free_port(), lmtp=f"unix:{sock}", pwserver_conf=bed["conf"]
        ) as pf,
    ):
        assert send(bed, ["jo@example.org", "juan@example.org"], "over the unix socket", pf) == {}
        assert wait_for(lambda: counts(bed, ["jo", "juan"]) == {u: n + 1 for u, n in before.items()}, 60)
        assert "to=jo@example.org via 127.0.0.3: 250" in proxy.output()
        assert re.search(r"to=<jo@example\.org>, relay=\S*lmtp-proxy\.sock.*status=sent", pf.log()), pf.log()
