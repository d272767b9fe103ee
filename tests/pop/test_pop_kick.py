"""Kicks on move: the sessions of a user that `pwmail move` freezes (or
moves to another mailhost) are closed by imap-proxy and pop-proxy within
`kick_check_interval`, with `* BYE [UNAVAILABLE]` / `-ERR [IN-USE]`;
other users' sessions go on. A real pwserver (its mailhosts file rewritten
and reloaded, as pwmail move does); the backends are small fakes that
log anyone in and answer NOOP, so the test needs neither root nor Dovecot."""

from __future__ import annotations

import re
import signal
import socket
import socketserver
import ssl
import threading
import time

import pytest

from tests.support.imap_util import start_imap_proxy
from tests.support.pop_util import client_conf, self_signed, start_proxy, write_users
from tests.support.pwtest import PwServer, read_reply, wait_for, write_key

INTERVAL = 0.5  # kick_check_interval of the proxies under test
DEADLINE = 20.0  # how long a kick may take on a loaded machine (many intervals)
TIMEOUT = 20
USERS = {"ana": ("ana-pw", "store1"), "bea": ("bea-pw", "store1")}

# What the fake backends answer: (greeting, {command: answer}); "{tag}" is the command's tag.
FAKE = {
    "imap": (
        b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN ID] fake\r\n",
        {
            b"ID": b"* ID NIL\r\n{tag} OK ID done\r\n",
            b"AUTHENTICATE": b"{tag} OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n",
            b"NOOP": b"{tag} OK NOOP done\r\n",
        },
    ),
    "pop": (b"+OK fake\r\n", {b"AUTH": b"+OK logged in\r\n", b"NOOP": b"+OK\r\n"}),
}


class FakeBackend(socketserver.ThreadingTCPServer):
    """Logs every user in; counts the connections still open."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, protocol: str):
        self.greeting, self.answers = FAKE[protocol]
        self.imap = protocol == "imap"
        self.open = 0
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), FakeHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def address(self) -> str:
        host, port = self.server_address
        return f"{host}:{port}"


class FakeHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        srv = self.server
        with srv.lock:
            srv.open += 1
        try:
            self.wfile.write(srv.greeting)
            for line in self.rfile:
                words = line.split()
                tag, command = (words[0], words[1:2]) if srv.imap else (b"", words[:1])
                answer = srv.answers.get(command[0].upper() if command else b"")
                if answer is not None:
                    self.wfile.write(answer.replace(b"{tag}", tag))
        except OSError:
            pass
        finally:
            with srv.lock:
                srv.open -= 1


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kick")
    key = tmp / "shadow.key"
    write_key(key)
    cert, certkey = self_signed(tmp)
    backends = {"imap": FakeBackend("imap"), "pop": FakeBackend("pop")}
    with PwServer(write_users(tmp / "users", USERS), shadow_key=key) as pws:
        yield {
            "tmp": tmp,
            "pwserver": pws,
            "conf": client_conf(tmp / "pwserver.conf", pws.address, key),
            "backends": backends,
            "cert": (cert, certkey),
        }
    for b in backends.values():
        b.shutdown()
        b.server_close()


@pytest.fixture
def mailhosts(bed):
    """Set the mailhosts as pwmail move does (the file, then SIGHUP), confirmed by pwserver."""

    def set_to(hosts: dict[str, str], frozen: set[str] = frozenset()) -> None:
        users = {u: (USERS[u][0], hosts.get(u, USERS[u][1])) for u in USERS}
        write_users(bed["tmp"] / "users", users, frozen)
        bed["pwserver"].signal(signal.SIGHUP)
        with bed["pwserver"].client() as c:
            for u, (_, host) in users.items():
                wait_for(lambda u=u, host=host: (lambda e: (e.host, e.frozen))(c.mailhost(u)) == (host, u in frozen))

    yield set_to
    set_to({})  # back as it was for the next test


def proxy_settings(bed, protocol: str, extra: str = "", interval: float = INTERVAL) -> str:
    cert, key = bed["cert"]
    return (
        f'backends = {{store1 = "{bed["backends"][protocol].address}", '
        f'store2 = "{bed["backends"][protocol].address}"}}\n'
        f"kick_check_interval = {interval}\nbackend_retries = 0\nauth_failure_delay = 0\n"
        f'tls_cert = "{cert}"\ntls_key = "{key}"\ntls_listen = "127.0.0.1:0"\n' + extra
    )


class Session:
    """One logged-in client session through a proxy (plain, or TLS from the start)."""

    def __init__(self, protocol: str, address: tuple[str, int], user: str, tls: ssl.SSLContext | None = None):
        self.imap = protocol == "imap"
        self.sock = socket.create_connection(address, timeout=TIMEOUT)
        if tls is not None:
            self.sock = tls.wrap_socket(self.sock, server_hostname="localhost")
        assert read_reply(self.sock, TIMEOUT).startswith(b"* OK" if self.imap else b"+OK")
        if self.imap:
            assert self.ask(b"a1 LOGIN %s %s" % (user.encode(), USERS[user][0].encode())).startswith(b"a1 OK ")
        else:
            assert self.ask(b"USER " + user.encode()).startswith(b"+OK")
            assert self.ask(b"PASS " + USERS[user][0].encode()).startswith(b"+OK")

    def ask(self, command: bytes) -> bytes:
        self.sock.sendall(command + b"\r\n")
        return read_reply(self.sock, TIMEOUT)

    def alive(self) -> bool:
        return self.ask(b"n1 NOOP" if self.imap else b"NOOP").startswith(b"n1 OK" if self.imap else b"+OK")

    def farewell(self) -> bytes:
        """What the proxy sends until it closes the connection (within DEADLINE)."""
        self.sock.settimeout(DEADLINE)
        data = b""
        while chunk := self.sock.recv(4096):
            data += chunk
        return data

    def close(self) -> None:
        self.sock.close()


def start(bed, protocol: str, extra: str = "", interval: float = INTERVAL):
    settings = proxy_settings(bed, protocol, extra, interval)
    if protocol == "imap":
        return start_imap_proxy(bed["tmp"], bed["conf"], settings, name="imap-proxy-kick")
    return start_proxy(bed["tmp"], bed["conf"], settings, name="pop-proxy-kick")


def tls_address(proxy, protocol: str) -> tuple[str, int]:
    name = "imap-proxy \\(IMAPS\\)" if protocol == "imap" else "pop-proxy \\(POP3S\\)"
    m = re.search(name + r": ready on (\S+):(\d+)", proxy.output())
    return m.group(1), int(m.group(2))


FAREWELL = {
    "imap": b"* BYE [UNAVAILABLE] Mailbox is being moved, log in again in a few minutes.\r\n",
    "pop": b"-ERR [IN-USE] Mailbox is being moved, log in again in a few minutes.\r\n",
}
CASES = [
    ("imap", "plain", ""),  # relayed by splice(2)
    ("imap", "tls", ""),  # relayed by asyncio transports
    ("pop", "plain", "engine = false\n"),
    ("pop", "plain", ""),  # relayed by the C engine
    ("pop", "tls", ""),  # implicit TLS: Python, whatever the engine setting
]


@pytest.mark.parametrize("protocol,transport,extra", CASES)
def test_frozen_user_is_kicked_others_are_not(bed, mailhosts, protocol, transport, extra):
    with start(bed, protocol, extra) as proxy:
        tls = None
        address = proxy.address
        if transport == "tls":
            tls = ssl.create_default_context(cafile=bed["cert"][0])
            address = tls_address(proxy, protocol)
        backend = bed["backends"][protocol]
        before = backend.open
        ana = Session(protocol, address, "ana", tls)
        bea = Session(protocol, address, "bea", tls)
        assert ana.alive() and bea.alive()
        wait_for(lambda: backend.open == before + 2)

        mailhosts({}, frozen={"ana"})
        started = time.monotonic()
        assert ana.farewell() == FAREWELL[protocol]
        assert time.monotonic() - started < DEADLINE
        wait_for(lambda: backend.open == before + 1)  # ana's backend connection is cut too
        assert bea.alive()  # the other user's session is untouched
        kick = f"kick user=ana from=127.0.0.1:{ana.sock.getsockname()[1]} backend=store1"
        assert kick in proxy.output() and "mailbox frozen" in proxy.output()
        assert "kick user=bea" not in proxy.output()
        ana.close()
        bea.close()


@pytest.mark.parametrize("protocol", ["imap", "pop"])  # (pop: plain, in the C engine)
def test_user_moved_to_another_mailhost_is_kicked(bed, mailhosts, protocol):
    # (a freeze shorter than the interval: the session is on the old store)
    with start(bed, protocol) as proxy:
        ana = Session(protocol, proxy.address, "ana")
        bea = Session(protocol, proxy.address, "bea")
        mailhosts({"ana": "store2"})
        assert ana.farewell() == FAREWELL[protocol]
        assert bea.alive()
        assert "mailbox moved to store2" in proxy.output()
        # A new login goes to the new mailhost and stays.
        again = Session(protocol, proxy.address, "ana")
        time.sleep(INTERVAL * 4)
        assert again.alive()
        for s in (ana, bea, again):
            s.close()


def test_no_kicks_when_the_interval_is_zero(bed, mailhosts):
    with start(bed, "imap", interval=0) as proxy:
        ana = Session("imap", proxy.address, "ana")
        mailhosts({}, frozen={"ana"})
        time.sleep(INTERVAL * 6)
        assert ana.alive()
        assert "kick user=" not in proxy.output()
        ana.close()
