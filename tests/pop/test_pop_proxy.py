"""pop-proxy end to end: real pwserver, two pop3d backends on their own
loopback addresses, the proxy in front; clients are poplib and raw sockets."""

from __future__ import annotations

import base64
import poplib
import random
import re
import signal
import socket
import ssl
import time

import pytest

from tests.support.pop_util import (
    client_conf,
    deliver,
    make_root,
    message,
    read_reply,
    self_signed,
    start_pop3d,
    start_proxy,
    write_users,
)
from tests.support.pwtest import PwServer, free_port, write_key

DELAY = 0.5
pytestmark = pytest.mark.slow

USERS = {
    "ana": ("ana-secret", "store1"),
    "alberto": ("alb pw", "store1"),
    "bruno": ("bruno-secret", "store2"),
    "beatriz": ("bea-secret", "store2"),
    "frozen": ("frozen-pw", "store1"),
    "victim": ("victim-pw", "store1"),
    "lost": ("lost-pw", "deadstore"),
    "carla": ("carla-pw", "store3"),
    "tls": ("tls-pw", "store2"),
    "big": ("big-pw", "store1"),
    "byaddr": ("byaddr-pw", "127.0.0.2"),  # a mailhost given as an address: --backend-port
}


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("proxy")
    users = write_users(tmp / "users", USERS, frozen={"frozen"})
    key = tmp / "shadow.key"
    write_key(key)
    cert, certkey = self_signed(tmp)
    layouts = {s: make_root(tmp / s) for s in ("store1", "store2", "store3")}
    with PwServer(users, shadow_key=key) as pws:
        conf = client_conf(tmp / "pwserver.conf", pws.address, key)
        s1 = start_pop3d(tmp, tmp / "store1", conf, host="127.0.0.2", trusted=["127.0.0.0/8"])
        s2 = start_pop3d(tmp, tmp / "store2", conf, host="127.0.0.3", trusted=["127.0.0.0/8"])
        backends = {
            "store1": f"127.0.0.2:{s1.port}",
            "store2": f"127.0.0.3:{s2.port}",
            "deadstore": f"127.0.0.1:{free_port()}",
            "store3": "127.0.0.4:1",
        }
        settings = (
            "backends = {" + ", ".join(f'{k} = "{v}"' for k, v in backends.items()) + "}\n"
            f"auth_failure_delay = {DELAY}\nprelogin_timeout = 2.0\nbackend_retries = 2\n"
            "backend_retry_delay = 0.1\nbackend_connect_timeout = 1.0\n"
            "throttle_user_failures = 4\nthrottle_ip_failures = 1000\nmax_connections_per_ip = 1000\n"
            f'tls_cert = "{cert}"\ntls_key = "{certkey}"\n'
        )
        with s1, s2, start_proxy(tmp, conf, settings) as proxy:
            yield {
                "tmp": tmp,
                "conf": conf,
                "proxy": proxy,
                "layouts": layouts,
                "stores": {"store1": s1, "store2": s2},
                "settings": settings,
                "cert": cert,
                "certkey": certkey,
            }


def pop(bed, *, timeout: float = 10) -> poplib.POP3:
    return poplib.POP3(*bed["proxy"].address, timeout=timeout)


def login(bed, user, password=None) -> poplib.POP3:
    p = pop(bed)
    p.user(user)
    p.pass_(password if password is not None else USERS[user][0])
    return p


def tls_context(bed) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=bed["cert"])
    ctx.check_hostname = False
    return ctx


def test_routes_each_user_to_their_backend(bed):
    layouts = bed["layouts"]
    for user in ("ana", "bruno"):
        deliver(layouts[USERS[user][1]], user, message(f"for {user}"))
    for user in ("ana", "bruno"):
        p = login(bed, user)
        count, _ = p.stat()
        assert count == 1
        _, lines, _ = p.retr(1)
        assert f"Subject: for {user}".encode() in lines
        p.quit()
    # the backend saw the client's own address and port (XCLIENT), not the proxy's socket
    client = pop(bed)
    port = client.sock.getsockname()[1]
    client.user("bruno")
    client.pass_(USERS["bruno"][0])
    client.quit()
    time.sleep(0.2)
    assert f"login user=bruno from=127.0.0.1:{port}" in bed["stores"]["store2"].output()
    assert "user=bruno" not in bed["stores"]["store1"].output()
    assert re.search(
        rf"logout user=bruno from=127\.0\.0\.1:{port} backend=store2 seconds=\S+ in=\d+ out=\d+", bed["proxy"].output()
    )


def test_prelogin_capa(bed):
    p = pop(bed)
    assert p.getwelcome() == b"+OK POP3 ready."
    caps = p.capa()
    assert set(caps) == {"TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "USER", "SASL", "STLS"}
    assert caps["SASL"] == ["PLAIN"]
    p.quit()


def failed_login(bed, user, password) -> tuple[bytes, float]:
    p = pop(bed)
    p.user(user)
    t0 = time.monotonic()
    try:
        p.pass_(password)
    except poplib.error_proto as e:
        return e.args[0], time.monotonic() - t0
    finally:
        p.close()
    raise AssertionError(f"{user} logged in with {password!r}")


def test_unknown_user_looks_like_wrong_password(bed):
    results = [
        failed_login(bed, u, pw)
        for u, pw in [
            ("alberto", "wrong"),
            ("nosuchuser", "wrong"),
            ("alberto", "wrong"),
            ("no:such", "x"),
            ("x" * 200, "wrong"),
        ]
    ]
    assert {text for text, _ in results} == {b"-ERR [AUTH] Authentication failed."}
    times = [t for _, t in results]
    # all at the same moment after PASS (slack for a loaded machine); the
    # wrong passwords went to a backend that checked a yescrypt hash
    assert all(DELAY <= t < DELAY + 0.8 for t in times), times
    assert max(times) - min(times) < 0.5, times


def test_failures_are_throttled_per_user(bed):
    for _ in range(4):
        assert failed_login(bed, "victim", "guess")[0] == b"-ERR [AUTH] Authentication failed."
    text, t = failed_login(bed, "victim", USERS["victim"][0])  # even the right password
    assert text.startswith(b"-ERR [LOGIN-DELAY]")
    # other users are not affected
    login(bed, "alberto").quit()


def test_failures_are_throttled_per_address(bed):
    settings = bed["settings"].replace("throttle_ip_failures = 1000", "throttle_ip_failures = 3")
    with start_proxy(bed["tmp"], bed["conf"], settings, name="proxy-ip") as proxy:
        for user in ("u1", "u2", "u3"):
            p = poplib.POP3(*proxy.address, timeout=10)
            p.user(user)
            with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
                p.pass_("x")
            p.close()
        p = poplib.POP3(*proxy.address, timeout=10)
        p.user("ana")
        with pytest.raises(poplib.error_proto, match=r"\[LOGIN-DELAY\]"):
            p.pass_(USERS["ana"][0])


def test_three_failures_on_one_connection_hang_up(bed):
    p = pop(bed)
    for _attempt in range(3):
        p.user("beatriz")
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            p.pass_("nope")
    with pytest.raises((poplib.error_proto, OSError)):
        p.noop()


def test_frozen_mailbox_is_in_use(bed):
    text, t = failed_login(bed, "frozen", USERS["frozen"][0])
    assert text.startswith(b"-ERR [IN-USE]")


def test_backend_down_is_sys_temp_after_bounded_retries(bed):
    text, t = failed_login(bed, "lost", USERS["lost"][0])
    assert text.startswith(b"-ERR [SYS/TEMP]")
    assert 0.3 <= t < 3.0  # tries at 0, 0.1, 0.3 s, then gives up
    assert "backend deadstore for user=lost" in bed["proxy"].output()


def test_password_server_down_is_sys_temp(bed):
    dead = client_conf(bed["tmp"] / "dead.conf", f"127.0.0.1:{free_port()}")
    with start_proxy(bed["tmp"], dead, bed["settings"], name="proxy-nopw") as proxy:
        p = poplib.POP3(*proxy.address, timeout=10)
        p.user("ana")
        with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
            p.pass_(USERS["ana"][0])


def test_slow_client_that_never_finishes_a_line_is_dropped(bed):
    with socket.create_connection(bed["proxy"].address, timeout=10) as s:
        assert read_reply(s).startswith(b"+OK")
        t0 = time.monotonic()
        s.sendall(b"USER ana")  # no line end, ever
        for ch in b"xxxxxx":  # a byte now and then does not keep it alive
            time.sleep(0.3)
            try:
                s.sendall(bytes([ch]))
            except OSError:
                break
        assert read_reply(s) == b"-ERR Disconnected for inactivity.\r\n"
        assert s.recv(10) == b""
        assert 1.9 < time.monotonic() - t0 < 6.0


def test_line_too_long_is_refused(bed):
    with socket.create_connection(bed["proxy"].address, timeout=10) as s:
        read_reply(s)
        s.sendall(b"USER " + b"a" * 5000 + b"\r\n")
        assert read_reply(s) == b"-ERR Line too long\r\n"
        assert s.recv(10) == b""


def test_client_that_never_reads_cannot_fill_the_proxy(bed):
    """CAPA answers are 15 times longer than the command: a client that
    sends and never reads must be stopped by flow control, not buffered."""
    proxy = bed["proxy"]
    rss0 = rss_kib(proxy.proc.pid)
    with socket.create_connection(proxy.address, timeout=10) as s:
        s.setblocking(False)
        sent, chunk = 0, b"CAPA\r\n" * 10_000
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and sent < 200 << 20:
            try:
                sent += s.send(chunk)
            except BlockingIOError:
                time.sleep(0.01)
        assert sent < 32 << 20  # the proxy stopped reading
        assert rss_kib(proxy.proc.pid) - rss0 < 64 << 10
    login(bed, "alberto").quit()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_connections_per_address_are_limited(bed):
    settings = bed["settings"].replace("max_connections_per_ip = 1000", "max_connections_per_ip = 3")
    with start_proxy(bed["tmp"], bed["conf"], settings, name="proxy-limit") as proxy:
        held = [socket.create_connection(proxy.address, timeout=10) for _ in range(3)]
        for s in held:
            assert read_reply(s).startswith(b"+OK")
        with socket.create_connection(proxy.address, timeout=10) as s:
            assert read_reply(s) == b"-ERR [SYS/TEMP] Too many connections, try again later.\r\n"
        held.pop().close()
        time.sleep(0.2)
        with socket.create_connection(proxy.address, timeout=10) as s:
            assert read_reply(s).startswith(b"+OK POP3")
        for s in held:
            s.close()


def test_auth_plain_and_pipelined_commands(bed):
    with socket.create_connection(bed["proxy"].address, timeout=10) as s:
        read_reply(s)
        token = base64.b64encode(b"\0alberto\0" + USERS["alberto"][0].encode()).decode()
        s.sendall(f"AUTH PLAIN {token}\r\nSTAT\r\nQUIT\r\n".encode())
        data = b""
        while data.count(b"\r\n") < 3:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        lines = data.split(b"\r\n")
        assert lines[0].startswith(b"+OK Logged in")
        assert lines[1].startswith(b"+OK ") and lines[2] == b"+OK Bye."
        assert s.recv(10) == b""


def test_auth_plain_with_continuation(bed):
    with socket.create_connection(bed["proxy"].address, timeout=10) as s:
        read_reply(s)
        s.sendall(b"AUTH PLAIN\r\n")
        assert read_reply(s) == b"+ \r\n"
        s.sendall(base64.b64encode(b"\0alberto\0" + USERS["alberto"][0].encode()) + b"\r\n")
        assert read_reply(s).startswith(b"+OK Logged in")
        s.sendall(b"QUIT\r\n")
        assert read_reply(s) == b"+OK Bye.\r\n"


def test_stls_and_login_inside_tls(bed):
    deliver(bed["layouts"]["store2"], "tls", message("secret mail"))
    p = pop(bed)
    p.stls(tls_context(bed))
    assert "STLS" not in p.capa()
    p.user("tls")
    p.pass_(USERS["tls"][0])
    _, lines, _ = p.retr(1)
    assert b"Subject: secret mail" in lines
    p.quit()


def test_pop3s_implicit_tls(bed, tmp_path):
    settings = bed["settings"] + 'tls_listen = "127.0.0.1:0"\n'
    with start_proxy(bed["tmp"], bed["conf"], settings, name="proxy-pop3s") as proxy:
        m = re.search(r"pop-proxy \(POP3S\): ready on (\S+):(\d+)", proxy.output())
        p = poplib.POP3_SSL(m.group(1), int(m.group(2)), context=tls_context(bed), timeout=10)
        caps = p.capa()
        assert "STLS" not in caps and "USER" in caps
        p.user("tls")
        p.pass_(USERS["tls"][0])
        assert p.stat()[0] >= 0
        p.quit()


def test_stls_command_injection_is_ignored(bed):
    with socket.create_connection(bed["proxy"].address, timeout=10) as raw:
        read_reply(raw)
        raw.sendall(b"STLS\r\nCAPA\r\n")  # CAPA in clear text, before the handshake
        assert read_reply(raw) == b"+OK Begin TLS negotiation now.\r\n"
        s = tls_context(bed).wrap_socket(raw, server_hostname="localhost")
        s.sendall(b"NOOP\r\n")
        assert read_reply(s) == b"-ERR Not logged in\r\n"  # the first answer is to NOOP, not to CAPA
        s.sendall(b"QUIT\r\n")
        assert read_reply(s) == b"+OK Bye.\r\n"


@pytest.mark.parametrize("mode", ["plain", "stls"])
def test_large_retr_through_the_relay(bed, mode):
    body = b"".join(b"%07d " % i + b"y" * 70 + b"\n" for i in range(100_000))  # ~7.8 MB
    deliver(bed["layouts"]["store1"], "big", body)
    p = pop(bed, timeout=60)
    if mode == "stls":
        p.stls(tls_context(bed))
    p.user("big")
    p.pass_(USERS["big"][0])
    n, _ = p.stat()
    _, lines, octets = p.retr(n)
    assert b"\n".join(lines) + b"\n" == body
    p.dele(n)
    p.quit()


def start_store3(bed):
    tmp = bed["tmp"]
    return start_pop3d(tmp, tmp / "store3", bed["conf"], host="127.0.0.4", trusted=["127.0.0.0/8"])


@pytest.mark.parametrize("mode", ["plain", "stls"])
def test_backend_killed_mid_session_closes_the_client(bed, mode):
    settings = bed["settings"].replace('store3 = "127.0.0.4:1"', 'store3 = "127.0.0.4:{port}"')
    deliver(bed["layouts"]["store3"], "carla", message("hi"))
    with start_store3(bed) as store3:
        with start_proxy(
            bed["tmp"], bed["conf"], settings.replace("{port}", str(store3.port)), name=f"proxy-kill-{mode}"
        ) as proxy:
            p = poplib.POP3(*proxy.address, timeout=10)
            if mode == "stls":
                p.stls(tls_context(bed))
            p.user("carla")
            p.pass_(USERS["carla"][0])
            assert p.stat()[0] >= 1
            store3.proc.send_signal(signal.SIGKILL)
            store3.proc.wait()
            t0 = time.monotonic()
            with pytest.raises((poplib.error_proto, OSError, EOFError)):
                p.stat()
            assert time.monotonic() - t0 < 5.0
            # the proxy goes on serving others
            login(bed, "alberto").quit()


def test_mailhost_by_address_with_backend_port_flag(bed):
    deliver(bed["layouts"]["store1"], "byaddr", message("by address"))
    port = bed["stores"]["store1"].port
    with start_proxy(bed["tmp"], bed["conf"], "", argv=["--backend-port", str(port)], name="proxy-port") as proxy:
        p = poplib.POP3(*proxy.address, timeout=10)
        p.user("byaddr")
        p.pass_(USERS["byaddr"][0])
        assert b"Subject: by address" in p.retr(1)[1]
        p.quit()


@pytest.mark.parametrize("mode", ["plain", "stls"])
def test_idle_session_after_login_is_closed(bed, mode):
    settings = bed["settings"] + "idle_timeout = 1.0\n"
    with start_proxy(bed["tmp"], bed["conf"], settings, name=f"proxy-idle-{mode}") as proxy:
        p = poplib.POP3(*proxy.address, timeout=10)
        if mode == "stls":
            p.stls(tls_context(bed))
        p.user("alberto")
        p.pass_(USERS["alberto"][0])
        p.noop()
        time.sleep(0.6)
        p.noop()  # traffic keeps it alive
        time.sleep(0.6)
        p.noop()
        t0 = time.monotonic()
        try:
            line = p.file.readline()  # nothing more is said: the proxy just closes
        except OSError:
            line = b""
        assert line == b""
        assert 0.5 < time.monotonic() - t0 < 5.0


def test_many_idle_connections_then_all_served(bed):
    held = []
    try:
        for _ in range(300):
            held.append(socket.create_connection(bed["proxy"].address, timeout=10))
        for s in held:
            assert read_reply(s).startswith(b"+OK")
        for s in held:
            s.sendall(b"CAPA\r\n")
        for s in held:
            data = b""
            while not data.endswith(b".\r\n"):
                data += s.recv(4096)
            assert b"SASL PLAIN" in data
    finally:
        for s in held:
            s.close()
    login(bed, "alberto").quit()


def test_random_bytes_never_take_the_proxy_down(bed):
    """Garbage from many clients (also inside a TLS session and after a
    login): each gets answers or a close, and the proxy goes on serving."""
    rnd = random.Random(5)
    words = [
        b"USER ana\r\n",
        b"PASS x\r\n",
        b"AUTH PLAIN\r\n",
        b"CAPA\r\n",
        b"\r\n",
        b"\x00\xff",
        b"STLS\r\n",
        b"AUTH PLAIN =\r\n",
        b"*\r\n",
        b"QUIT",
    ]
    for i in range(60):
        blob = b"".join(
            rnd.choice(words) if rnd.random() < 0.5 else rnd.randbytes(rnd.randint(1, 300))
            for _ in range(rnd.randint(1, 30))
        )
        with socket.create_connection(bed["proxy"].address, timeout=10) as s:
            read_reply(s)
            if i % 3 == 0:
                s.sendall(f"USER alberto\r\nPASS {USERS['alberto'][0]}\r\n".encode())
                assert read_reply(s).startswith(b"+OK")
            try:
                s.sendall(blob)
                s.shutdown(socket.SHUT_WR)
                s.settimeout(5)
                while s.recv(65536):
                    pass
            except OSError:
                pass
    assert bed["proxy"].proc.poll() is None and bed["stores"]["store1"].proc.poll() is None
    assert "Traceback" not in bed["proxy"].output() + bed["stores"]["store1"].output()
    login(bed, "alberto").quit()


def test_passwords_never_logged(bed):
    login(bed, "ana").quit()
    time.sleep(0.2)
    logs = bed["proxy"].output() + "".join(s.output() for s in bed["stores"].values())
    assert "login user=ana" in logs
    for pw, _ in USERS.values():
        assert pw not in logs
