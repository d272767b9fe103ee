"""pop-proxy under SIGHUP and SIGTERM, as a sysadmin sends them: a reload
sends new sessions to the new settings while open ones go on where they
were; a stop refuses new connections at once and lets open sessions end
(within shutdown_grace). With the engine (default) and without it."""

from __future__ import annotations

import poplib
import signal
import socket
import ssl
import time

import pytest

from tests.support.pop_util import (
    deliver,
    make_root,
    message,
    read_reply,
    self_signed,
    start_pop3d,
    start_proxy,
    users_pwserver,
)

pytestmark = pytest.mark.slow

USERS = {"ana": ("ana-pw", "store"), "beto": ("beto-pw", "store"), "caro": ("caro-pw", "store")}
COMMON = (
    "auth_failure_delay = 0.05\nbackend_retries = 0\nbackend_connect_timeout = 1.0\nmax_connections_per_ip = 1000\n"
)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """One pwserver, two storage servers; each user has a message saying which."""
    tmp = tmp_path_factory.mktemp("signals")
    with users_pwserver(tmp, USERS) as conf:
        servers = {}
        for n, host in ((1, "127.0.0.2"), (2, "127.0.0.3")):
            layout = make_root(tmp / f"store{n}")
            for user in USERS:
                for i in range(3):
                    deliver(layout, user, message(f"{user} {i} on store{n}"))
            servers[n] = start_pop3d(tmp, tmp / f"store{n}", conf, host=host, trusted=["127.0.0.0/8"])
        try:
            yield {
                "tmp": tmp,
                "conf": conf,
                "store": servers,
                "backend": {n: f'"{s.host}:{s.port}"' for n, s in servers.items()},
            }
        finally:
            for s in servers.values():
                s.stop()


def proxy_for(stores, name: str, extra: str = ""):
    settings = f"backends = {{ store = {stores['backend'][1]} }}\n" + COMMON + extra
    return start_proxy(stores["tmp"], stores["conf"], settings, name=name)


def rewrite(stores, name: str, text: str) -> None:
    (stores["tmp"] / f"pwmail-{name}.toml").write_text("[pop]\n" + text)


def login(proxy, user: str) -> poplib.POP3:
    p = poplib.POP3(*proxy.address, timeout=10)
    p.user(user)
    p.pass_(USERS[user][0])
    return p


def subject(p: poplib.POP3, n: int = 1) -> str:
    lines = p.retr(n)[1]
    return next(x.decode() for x in lines if x.startswith(b"Subject: "))


def wait_exit(proxy, timeout: float) -> int | None:
    try:
        return proxy.proc.wait(timeout)
    except Exception:
        return None


ENGINE = pytest.mark.parametrize("engine", ["true", "false"])


@ENGINE
def test_sighup_new_sessions_get_the_new_backend_open_ones_stay(stores, engine):
    name = f"hup-{engine}"
    with proxy_for(stores, name, f"engine = {engine}\n") as proxy:
        before = login(proxy, "ana")
        assert subject(before) == "Subject: ana 0 on store1"
        base = threads(proxy.proc.pid)
        rewrite(stores, name, f"backends = {{ store = {stores['backend'][2]} }}\n" + COMMON + f"engine = {engine}\n")
        proxy.signal(signal.SIGHUP)
        proxy.wait_line("reloaded settings", "the reload")
        if engine == "true":  # the old engine (a thread, 4 lookup workers) drains beside the new one
            assert threads(proxy.proc.pid) >= base + 5
        after = login(proxy, "beto")
        assert subject(after) == "Subject: beto 0 on store2"
        # The session opened before goes on with its backend.
        assert subject(before, 2) == "Subject: ana 1 on store1"
        assert before.quit().startswith(b"+OK")
        assert after.quit().startswith(b"+OK")
        assert proxy.proc.poll() is None
        # Again: a second reload while nothing is open, and the first engine is gone.
        proxy.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while proxy.output().count("reloaded settings") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proxy.output().count("reloaded settings") == 2
        again = login(proxy, "ana")
        assert subject(again) == "Subject: ana 0 on store2"
        again.quit()
        # An engine is a thread and its lookup workers: the drained ones are freed.
        deadline = time.monotonic() + 10
        while threads(proxy.proc.pid) > base and time.monotonic() < deadline:
            time.sleep(0.1)
        assert threads(proxy.proc.pid) <= base
        assert "Traceback" not in proxy.output()


def threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))


def test_sighup_with_a_bad_file_keeps_the_old_settings(stores):
    name = "hup-bad"
    with proxy_for(stores, name) as proxy:
        rewrite(stores, name, "this is [not toml\n")
        proxy.signal(signal.SIGHUP)
        proxy.wait_line("reload failed, keeping the old settings", "the failed reload")
        p = login(proxy, "caro")
        assert subject(p) == "Subject: caro 0 on store1"
        p.quit()
        # A key only a restart can change is kept, and the log says so.
        rewrite(stores, name, f"backends = {{ store = {stores['backend'][1]} }}\n" + COMMON + "engine = false\n")
        proxy.signal(signal.SIGHUP)
        proxy.wait_line("engine changed; it takes effect at restart", "the restart-only warning")
        proxy.wait_line("reloaded settings", "the reload")
        p = login(proxy, "caro")
        p.quit()
        assert proxy.proc.poll() is None


def test_throttle_blocks_reach_the_new_engine(stores):
    """A blocked address stays blocked across a reload: the new engine must
    not log it in by itself."""
    name = "hup-throttle"
    extra = "throttle_ip_failures = 2\nthrottle_window = 600\n"
    with proxy_for(stores, name, extra) as proxy:
        for _ in range(2):
            p = poplib.POP3(*proxy.address, timeout=10)
            p.user("ana")
            with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
                p.pass_("wrong")
            p.close()

        def blocked() -> bool:
            p = poplib.POP3(*proxy.address, timeout=10)
            p.user("ana")
            try:
                p.pass_(USERS["ana"][0])
            except poplib.error_proto as e:
                assert b"[LOGIN-DELAY]" in e.args[0]
                return True
            finally:
                p.close()
            return False

        assert blocked()
        rewrite(stores, name, f"backends = {{ store = {stores['backend'][1]} }}\n" + COMMON + extra)
        proxy.signal(signal.SIGHUP)
        proxy.wait_line("reloaded settings", "the reload")
        assert blocked()


@ENGINE
def test_sigterm_lets_an_open_session_finish(stores, engine):
    layout_root = stores["tmp"] / "store1"
    with proxy_for(stores, f"term-{engine}", f"engine = {engine}\n") as proxy:
        p = login(proxy, "caro")
        count = p.stat()[0]
        proxy.signal(signal.SIGTERM)
        proxy.wait_line("waiting up to 30 s", "the drain")
        with pytest.raises(OSError):  # refused at once, not queued
            socket.create_connection(proxy.address, timeout=2).close()
        assert subject(p, count).startswith("Subject: caro")
        p.dele(count)
        assert p.quit().startswith(b"+OK")
        t0 = time.monotonic()
        assert wait_exit(proxy, 10) == 0
        assert time.monotonic() - t0 < 5  # not the whole grace
        assert "stopping: 0 sessions cut" in proxy.output()
        # The deletion reached the mailbox.
        p = poplib.POP3(*stores["store"][1].address, timeout=10)
        p.user("caro")
        p.pass_(USERS["caro"][0])
        assert p.stat()[0] == count - 1
        p.quit()
        assert layout_root.exists()


@ENGINE
def test_sigterm_closes_what_is_left_after_the_grace(stores, engine):
    with proxy_for(stores, f"grace-{engine}", f"engine = {engine}\nshutdown_grace = 1.0\n") as proxy:
        p = login(proxy, "beto")
        count = p.stat()[0]
        p.dele(1)
        t0 = time.monotonic()
        proxy.signal(signal.SIGTERM)
        assert wait_exit(proxy, 10) == 0
        assert 0.9 <= time.monotonic() - t0 < 5
        assert "stopping: 1 sessions cut" in proxy.output()
        p.sock.settimeout(5)
        assert p.sock.recv(100) == b""  # closed, not hanging
        p.close()
    # The DELE was never committed: no QUIT reached the backend.
    deadline = time.monotonic() + 10
    while True:  # the backend notices the closed session and unlocks the mailbox
        try:
            q = poplib.POP3(*stores["store"][1].address, timeout=10)
            q.user("beto")
            q.pass_(USERS["beto"][0])
            break
        except poplib.error_proto:
            q.close()
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert q.stat()[0] == count
    q.quit()


def test_sigterm_before_login_answers_nothing_odd(stores):
    """A client between greeting and login during the drain can still log in."""
    with proxy_for(stores, "term-prelogin") as proxy:
        s = socket.create_connection(proxy.address, timeout=10)
        assert read_reply(s).startswith(b"+OK")
        proxy.signal(signal.SIGTERM)
        proxy.wait_line("waiting up to", "the drain")
        s.sendall(b"USER ana\r\n")
        assert read_reply(s).startswith(b"+OK")
        s.sendall(b"PASS ana-pw\r\n")
        assert read_reply(s).startswith(b"+OK")
        s.sendall(b"QUIT\r\n")
        assert read_reply(s).startswith(b"+OK")
        s.close()
        assert wait_exit(proxy, 10) == 0


def test_a_second_sigterm_ends_the_drain(stores):
    with proxy_for(stores, "term-twice") as proxy:
        p = login(proxy, "ana")
        proxy.signal(signal.SIGTERM)
        proxy.wait_line("waiting up to 30 s", "the drain")
        t0 = time.monotonic()
        proxy.signal(signal.SIGTERM)
        assert wait_exit(proxy, 10) == 0
        assert time.monotonic() - t0 < 5
        assert "stopping: 1 sessions cut" in proxy.output()
        p.close()


def test_sighup_loads_a_renewed_certificate(stores):
    """cert renewal: the next STLS shows the new certificate; a bad one is refused and the old stays."""
    old_dir, new_dir = stores["tmp"] / "cert-old", stores["tmp"] / "cert-new"
    old_dir.mkdir()
    new_dir.mkdir()
    old_cert, old_key = self_signed(old_dir, cn="old.example")
    new_cert, new_key = self_signed(new_dir, cn="new.example")
    name = "hup-cert"
    base = f"backends = {{ store = {stores['backend'][1]} }}\n" + COMMON

    def served() -> str:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        p = poplib.POP3(*proxy.address, timeout=10)
        p.stls(ctx)
        der = p.sock.getpeercert(binary_form=True)
        p.quit()
        return ssl.DER_cert_to_PEM_cert(der)

    def pem(path: str) -> str:
        return ssl.DER_cert_to_PEM_cert(ssl.PEM_cert_to_DER_cert(open(path).read()))

    with proxy_for(stores, name, f'tls_cert = "{old_cert}"\ntls_key = "{old_key}"\n') as proxy:
        assert served() == pem(old_cert)
        rewrite(stores, name, base + f'tls_cert = "{new_cert}"\ntls_key = "{old_key}"\n')  # key does not match
        proxy.signal(signal.SIGHUP)
        proxy.wait_line("reload failed, keeping the old settings", "the failed reload")
        assert served() == pem(old_cert)
        rewrite(stores, name, base + f'tls_cert = "{new_cert}"\ntls_key = "{new_key}"\n')
        proxy.signal(signal.SIGHUP)
        proxy.wait_line("reloaded settings", "the reload")
        assert served() == pem(new_cert)
