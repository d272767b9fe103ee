"""imap-proxy's answers that need no backend: RFC 5530 codes for an
unknown user, a throttled client, pwserver down, a mailbox being moved,
LOGINDISABLED before STARTTLS, the connection limits. A real pwserver on
loopback; no Dovecot (tests/test_imap_proxy.py has the logins that work)."""

from __future__ import annotations

import re
import signal
import socket
import ssl
import time

import pytest

from tests.support.imap_util import start_imap_proxy
from tests.support.pop_util import client_conf, free_port, self_signed, users_pwserver

DELAY = 0.3
TIMEOUT = 20
USERS = {"ana": ("ana-pw", "store1"), "moving": ("moving-pw", "store1")}


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("imap-errors")
    cert, key = self_signed(tmp)
    with users_pwserver(tmp, USERS, frozen={"moving"}) as conf:
        settings = (
            f'backends = {{store1 = "127.0.0.1:{free_port()}"}}\nauth_failure_delay = {DELAY}\n'
            f'backend_retries = 0\ntls_cert = "{cert}"\ntls_key = "{key}"\n'
            "throttle_user_ip_failures = 3\n"
        )
        with start_imap_proxy(tmp, conf, settings) as proxy:
            yield {"tmp": tmp, "conf": conf, "proxy": proxy, "settings": settings, "cert": cert}


def greet(address) -> socket.socket:
    s = socket.create_connection(address, timeout=TIMEOUT)
    assert s.recv(4096).startswith(b"* OK [CAPABILITY ")
    return s


def ask(s: socket.socket, tag: bytes, command: bytes) -> bytes:
    s.sendall(tag + b" " + command + b"\r\n")
    data = b""
    while not re.search(rb"(^|\n)" + re.escape(tag) + rb" (OK|NO|BAD)[^\r\n]*\r\n$", data):
        chunk = s.recv(4096)
        assert chunk, data
        data += chunk
    return data


def test_unknown_user_is_a_failed_login_after_the_delay(bed):
    s = greet(bed["proxy"].address)
    started = time.monotonic()
    assert ask(s, b"u1", b"LOGIN nosuch pw") == b"u1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
    assert time.monotonic() - started >= DELAY
    s.close()


def test_frozen_mailbox_is_inuse(bed):
    s = greet(bed["proxy"].address)
    assert ask(s, b"m1", b"LOGIN moving moving-pw").startswith(b"m1 NO [INUSE] ")
    s.close()


def test_backend_down_is_unavailable(bed):
    s = greet(bed["proxy"].address)
    assert ask(s, b"b1", b"LOGIN ana ana-pw") == b"b1 NO [UNAVAILABLE] Mail server unavailable, try again later.\r\n"
    s.close()


def test_pwserver_down_is_unavailable(bed):
    dead = client_conf(bed["tmp"] / "dead.conf", f"127.0.0.1:{free_port()}")
    with start_imap_proxy(bed["tmp"], dead, bed["settings"], name="imap-proxy-nopw") as proxy:
        s = greet(proxy.address)
        assert ask(s, b"p1", b"LOGIN ana ana-pw").startswith(b"p1 NO [UNAVAILABLE] Authentication service")
        s.close()


def test_throttled_by_the_shared_throttle(bed):
    answers = []
    for n in range(5):  # three failures for (user, address), then refused: a new connection each
        s = greet(bed["proxy"].address)
        answers.append(ask(s, b"t%d" % n, b"LOGIN throttled wrong"))
        s.close()
    assert all(a.endswith(b"NO [AUTHENTICATIONFAILED] Authentication failed.\r\n") for a in answers[:3])
    assert all(a.endswith(b"NO [UNAVAILABLE] Too many failed logins, try again later.\r\n") for a in answers[3:])
    assert "by=user+address" in bed["proxy"].output()


def test_logindisabled_until_starttls(bed):
    with start_imap_proxy(
        bed["tmp"], bed["conf"], bed["settings"] + "plaintext_auth = false\n", name="imap-proxy-tlsonly"
    ) as proxy:
        s = socket.create_connection(proxy.address, timeout=TIMEOUT)
        greeting = s.recv(4096)
        assert b"LOGINDISABLED" in greeting and b"STARTTLS" in greeting and b"AUTH=PLAIN" not in greeting
        assert ask(s, b"l1", b"LOGIN ana ana-pw").startswith(b"l1 NO [PRIVACYREQUIRED] ")
        assert ask(s, b"l2", b"STARTTLS") == b"l2 OK Begin TLS negotiation now.\r\n"
        t = ssl.create_default_context(cafile=bed["cert"]).wrap_socket(s, server_hostname="localhost")
        caps = ask(t, b"l3", b"CAPABILITY")
        assert b"AUTH=PLAIN" in caps and b"LOGINDISABLED" not in caps and b"STARTTLS" not in caps
        # After TLS the login goes on to the lookup (and the dead backend).
        assert ask(t, b"l4", b"LOGIN ana ana-pw").startswith(b"l4 NO [UNAVAILABLE] ")
        t.close()


def test_too_many_connections_per_address(bed):
    with start_imap_proxy(
        bed["tmp"], bed["conf"], bed["settings"] + "max_connections_per_ip = 2\n", name="imap-proxy-few"
    ) as proxy:
        held = [greet(proxy.address) for _ in range(2)]
        s = socket.create_connection(proxy.address, timeout=TIMEOUT)
        assert s.recv(4096) == b"* BYE [UNAVAILABLE] Too many connections, try again later.\r\n"
        s.close()
        for h in held:
            h.close()


def test_sighup_rereads_imap_and_sigterm_drains(bed):
    settings = bed["tmp"] / "pwmail-imap-proxy-signals.toml"
    with start_imap_proxy(bed["tmp"], bed["conf"], bed["settings"], name="imap-proxy-signals") as proxy:
        held = greet(proxy.address)
        settings.write_text("[imap]\n" + bed["settings"] + "max_connections_per_ip = 1\n")
        proxy.signal(signal.SIGHUP)
        proxy.wait_line(r"reloaded settings", "the reload")
        s = socket.create_connection(proxy.address, timeout=TIMEOUT)  # a second one: over the new limit
        assert s.recv(4096) == b"* BYE [UNAVAILABLE] Too many connections, try again later.\r\n"
        s.close()
        held.close()
        proxy.signal(signal.SIGTERM)
        assert proxy.proc.wait(timeout=30) == 0
        assert "stopping: 0 sessions cut" in proxy.output()
