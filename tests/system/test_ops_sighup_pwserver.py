"""SIGHUP re-reads /etc/pwserver.conf in every daemon that asks pwserver
(pwmail/base/daemon.py reconfigure_clients over pwcache/client.py
AsyncClient.reconfigure; pop-proxy's C engine through the C client, which
re-reads a changed file by itself). Each daemon starts with a client
configuration naming a dead server only, and without the shadow key:
lookups fail with a temporary error. The file is replaced by one adding a
live pwserver and the key, SIGHUP: the same lookups succeed."""

from __future__ import annotations

import os
import pathlib
import poplib
import re
import signal
import socket

import pytest

from tests.support import pwtest
from tests.support.delivery_util import LmtpProxy, Pdeliveryd, env_with, lmtp_session
from tests.support.imap_util import start_imap_proxy
from tests.support.pop_util import deliver, make_root, message, start_pop3d, start_proxy, write_users
from tests.support.pwtest import free_port, wait_for

USERS = {"ana": ("ana-pw", "127.0.0.2")}  # her mailhost an address: the proxies need no map
DEADLINE = 30.0  # seconds for a lookup to succeed after SIGHUP (the C client re-reads within 1 s)


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sighup-pwserver")
    key = tmp / "shadow.key"
    pwtest.write_key(key)
    layout = make_root(tmp / "store")
    deliver(layout, "ana", message("after the reload"))
    with pwtest.PwServer(write_users(tmp / "users", USERS), shadow_key=key) as pw:
        live = pwtest.client_conf(tmp / "live.conf", [pw.address], timeout_ms=500, hedge_ms=100, shadow_keyfile=key)
        # the proxies' backend: a pop3d that can look users up from the start
        with start_pop3d(tmp, tmp / "store", live, host="127.0.0.2", trusted=["127.0.0.0/8"]) as store:
            yield {"tmp": tmp, "pw": pw, "key": key, "store": store}


@pytest.fixture
def conf(bed, tmp_path):
    """A client configuration with a dead server only; `.revive()` replaces
    it (a rename, as an operator's tools do) by one adding the live server
    and the shadow key."""
    dead = f"127.0.0.1:{free_port()}"
    path = tmp_path / "pwserver.conf"
    pwtest.client_conf(path, [dead], timeout_ms=300, hedge_ms=100, health_file=tmp_path / "health")

    def revive():
        new = tmp_path / "pwserver.conf.new"
        pwtest.client_conf(
            new,
            [dead, bed["pw"].address],
            timeout_ms=500,
            hedge_ms=100,
            shadow_keyfile=bed["key"],
            health_file=tmp_path / "health",
        )
        os.replace(new, path)

    return path, revive


def reloads_to_success(daemon: pwtest.Process, revive, attempt) -> None:
    """`attempt()` fails (returns False), then the file is replaced and
    SIGHUP sent; it succeeds before DEADLINE."""
    assert not attempt(), "a lookup succeeded with only a dead pwserver configured"
    revive()
    daemon.signal(signal.SIGHUP)
    wait_for(attempt, timeout=DEADLINE, step=0.2, describe=lambda: daemon.output()[-3000:])


def rcpt(host: str, port: int) -> bool:
    out = lmtp_session(host, port, b"LHLO mx\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<ana>\r\nQUIT\r\n")
    if b"451 4.4.3" in out:
        return False
    assert b"250 2.1.5" in out, out
    return True


def pop_login(address) -> bool:
    c = poplib.POP3(*address, timeout=20)
    try:
        c.user("ana")
        c.pass_("ana-pw")
    except poplib.error_proto as e:
        assert b"SYS/TEMP" in e.args[0], e
        return False
    finally:
        c.close()
    return True


def test_pdeliveryd(bed, conf, tmp_path):
    path, revive = conf
    port = free_port()
    with Pdeliveryd(tmp_path / "root", "127.0.0.1", port, env_with(path)) as d:
        reloads_to_success(d, revive, lambda: rcpt("127.0.0.1", port))


def test_lmtp_proxy(bed, conf, tmp_path):
    path, revive = conf
    p = LmtpProxy(tmp_path, free_port(), path, {"lmtp_port": bed["store"].port})
    try:
        reloads_to_success(p, revive, lambda: rcpt(p.host, p.port))
        assert re.search(r"reloaded the pwserver client configuration: 2 server", p.output())
    finally:
        p.stop()


def test_pop3d(bed, conf, tmp_path):
    path, revive = conf
    with start_pop3d(tmp_path, bed["tmp"] / "store", path, trusted=["127.0.0.0/8"]) as d:
        reloads_to_success(d, revive, lambda: pop_login(d.address))


@pytest.mark.parametrize("engine", ["true", "false"])
def test_pop_proxy(bed, conf, tmp_path, engine):
    path, revive = conf
    settings = f"engine = {engine}\nbackend_port = {bed['store'].port}\nauth_failure_delay = 0\nbackend_retries = 0\n"
    with start_proxy(tmp_path, path, settings, name=f"pop-proxy-{engine}") as p:
        reloads_to_success(p, revive, lambda: pop_login(p.address))


def test_imap_proxy(bed, conf, tmp_path):
    """No IMAP store here: a lookup that succeeds shows as the store being
    down ("Mail server unavailable") instead of "Authentication service"."""
    path, revive = conf
    settings = f"backend_port = {free_port('127.0.0.2')}\nauth_failure_delay = 0\nbackend_retries = 0\n"

    with start_imap_proxy(tmp_path, path, settings) as p:

        def login() -> bool:
            with socket.create_connection(p.address, timeout=20) as s:
                assert s.recv(4096).startswith(b"* OK")
                s.sendall(b"a1 LOGIN ana ana-pw\r\n")
                answer = b""
                while not answer.endswith(b"\r\n"):
                    chunk = s.recv(4096)
                    assert chunk, answer
                    answer += chunk
            if b"Authentication service" in answer:
                return False
            assert answer.startswith(b"a1 NO [UNAVAILABLE] Mail server unavailable"), answer
            return True

        reloads_to_success(p, revive, login)


def test_a_bad_new_file_keeps_the_old_configuration(bed, conf, tmp_path):
    path, _ = conf
    good = tmp_path / "good.conf"
    pwtest.client_conf(good, [bed["pw"].address], timeout_ms=500, health_file=tmp_path / "health")
    os.replace(good, path)
    port = free_port()
    with Pdeliveryd(tmp_path / "root", "127.0.0.1", port, env_with(path)) as d:
        assert rcpt("127.0.0.1", port)
        pathlib.Path(path).write_text("server nowhere:notaport\n")
        d.signal(signal.SIGHUP)
        d.wait_line(r"reload of the pwserver client configuration failed, keeping the old one", "pdeliveryd", 20)
        assert rcpt("127.0.0.1", port)
