"""Real POP3 clients (curl, mpop, fetchmail) through pop-proxy to pop3d,
in clear text and with STLS. (tests/pop/test_pop_dovecot.py runs the same
clients against Dovecot.)"""

from __future__ import annotations

import os

import pytest

from tests.support.pop_util import (
    curl_pop,
    deliver,
    fetchmail_fetch,
    make_root,
    message,
    mpop_fetch,
    self_signed,
    start_pop3d,
    start_proxy,
    users_pwserver,
)

pytestmark = pytest.mark.slow

USERS = {f"user{i}": (f"pw-{i} x", "store1") for i in range(8)}


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clients")
    cert, certkey = self_signed(tmp)
    layout = make_root(tmp / "store1")
    with users_pwserver(tmp, USERS) as conf:
        with start_pop3d(tmp, tmp / "store1", conf, host="127.0.0.2", trusted=["127.0.0.0/8"]) as store:
            settings = (
                f'backends = {{store1 = "127.0.0.2:{store.port}"}}\n'
                f'tls_cert = "{cert}"\ntls_key = "{certkey}"\nauth_failure_delay = 0.2\n'
            )
            with start_proxy(tmp, conf, settings) as proxy:
                yield {"tmp": tmp, "layout": layout, "proxy": proxy, "cert": cert, "store": store}


def crlf(body: bytes) -> bytes:
    return body.replace(b"\n", b"\r\n")


@pytest.mark.parametrize("stls", [False, True], ids=["plain", "stls"])
def test_curl(bed, stls):
    user = "user0" if not stls else "user1"
    bodies = [message(f"curl {stls} {i}", extra=b".leading dot\n") for i in range(2)]
    paths = [deliver(bed["layout"], user, b) for b in bodies]
    cafile = bed["cert"] if stls else None
    listing = curl_pop(bed["proxy"].address, user, USERS[user][0], cafile=cafile)
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.split(b"\r\n")[:2] == [f"{i} {len(crlf(b))}".encode() for i, b in enumerate(bodies, 1)]
    got = curl_pop(bed["proxy"].address, user, USERS[user][0], "2", cafile=cafile)
    assert got.returncode == 0, got.stderr
    assert got.stdout == crlf(bodies[1])
    uidl = curl_pop(bed["proxy"].address, user, USERS[user][0], cafile=cafile, request="UIDL")
    assert uidl.returncode == 0, uidl.stderr
    assert uidl.stdout.split(b"\r\n")[:2] == [f"{i} {os.path.basename(p)}".encode() for i, p in enumerate(paths, 1)]
    bad = curl_pop(bed["proxy"].address, user, "wrong", cafile=cafile)
    assert bad.returncode == 67  # CURLE_LOGIN_DENIED


def test_curl_stls_required_but_not_offered_fails_closed(bed, tmp_path):
    """A backend-facing check that --ssl-reqd is honoured: against pop3d
    directly (no STLS there) curl must refuse to send the password."""
    r = curl_pop(bed["store"].address, "user0", USERS["user0"][0], cafile=bed["cert"])
    assert r.returncode != 0


@pytest.mark.parametrize("stls", [False, True], ids=["plain", "stls"])
def test_mpop(bed, tmp_path, stls):
    user = "user2" if not stls else "user3"
    bodies = [message(f"mpop {i}", lines=20) for i in range(3)]
    for b in bodies:
        deliver(bed["layout"], user, b)
    cafile = bed["cert"] if stls else None
    rc, msgs, out = mpop_fetch(tmp_path / "mpop", bed["proxy"].address, user, USERS[user][0], keep=True, cafile=cafile)
    assert rc == 0, out
    assert msgs == bodies  # mpop stores LF line ends
    rc, msgs, out = mpop_fetch(tmp_path / "mpop", bed["proxy"].address, user, USERS[user][0], keep=False, cafile=cafile)
    assert rc == 0, out
    assert len(msgs) == 3  # UIDL: nothing fetched twice
    assert list((bed["layout"].path(user) / "cur").iterdir()) == []  # keep off: deleted at QUIT
    rc, _, out = mpop_fetch(tmp_path / "bad", bed["proxy"].address, user, "wrong", cafile=cafile)
    assert rc != 0 and "authentication failed" in out.lower()


@pytest.mark.parametrize("stls", [False, True], ids=["plain", "stls"])
def test_fetchmail(bed, tmp_path, stls):
    user = "user4" if not stls else "user5"
    first = [message(f"fetchmail {i}") for i in range(2)]
    for b in first:
        deliver(bed["layout"], user, b)
    cafile = bed["cert"] if stls else None
    rc, msgs, out = fetchmail_fetch(tmp_path, bed["proxy"].address, user, USERS[user][0], cafile=cafile)
    assert rc == 0, out
    # (in either order: the two may carry the same delivery second)
    assert len(msgs) == 2 and all(any(b in m for m in msgs) for b in first)
    rc, msgs, out = fetchmail_fetch(tmp_path, bed["proxy"].address, user, USERS[user][0], cafile=cafile)
    assert rc == 1, out  # 1: no new mail (UIDL remembered)
    later = message("fetchmail later")
    deliver(bed["layout"], user, later)
    rc, msgs, out = fetchmail_fetch(tmp_path, bed["proxy"].address, user, USERS[user][0], cafile=cafile)
    assert rc == 0, out
    assert len(msgs) == 3 and later in msgs[-1]
    if stls:
        assert "STLS" in out or "TLS" in out
