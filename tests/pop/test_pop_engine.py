"""pop-proxy's engine (pop/engine.py, pop/_csrc/pop_engine.c) against the
Python proxy alone: the same client bytes must get the same answers, byte
for byte, whichever side answers them. Two proxies on one pwserver and one
pop3d: `engine = true` (the default) and `engine = false`."""

from __future__ import annotations

import base64
import random
import socket
import threading
import time

import pytest

from tests.support.pop_util import (
    client_conf,
    deliver,
    make_root,
    message,
    read_reply,
    start_pop3d,
    start_proxy,
    write_users,
)
from tests.support.pwtest import PwServer, write_key

pytestmark = pytest.mark.slow

USERS = {
    "ana": ("ana-secret", "store1"),
    "beto": ("beto pw", "store1"),
    "frozen": ("frozen-pw", "store1"),
    "remote": ("remote-pw", "mail.example.invalid"),
}


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("engine")
    users = write_users(tmp / "users", USERS, frozen={"frozen"})
    key = tmp / "shadow.key"
    write_key(key)
    layout = make_root(tmp / "store1")
    for user in ("ana", "beto"):
        for i in range(3):
            deliver(layout, user, message(f"{user} {i}"))
    with PwServer(users, shadow_key=key) as pws:
        conf = client_conf(tmp / "pwserver.conf", pws.address, key)
        store = start_pop3d(tmp, tmp / "store1", conf, host="127.0.0.2", trusted=["127.0.0.0/8"])
        settings = (
            f'backends = {{ store1 = "127.0.0.2:{store.port}" }}\n'
            "auth_failure_delay = 0.05\nprelogin_timeout = 5.0\nbackend_retries = 0\n"
            "backend_connect_timeout = 1.0\nthrottle_user_failures = 100000\n"
            "throttle_ip_failures = 100000\nthrottle_user_ip_failures = 100000\nmax_connections_per_ip = 1000\n"
        )
        with (
            store,
            start_proxy(tmp, conf, settings, name="engine") as engine,
            start_proxy(tmp, conf, settings + "engine = false\n", name="python") as python,
        ):
            yield {
                "tmp": tmp,
                "conf": conf,
                "engine": engine,
                "python": python,
                "store": store,
                "settings": settings,
                "pw": pws,
                "key": key,
            }


def session(address, data: bytes, *, timeout: float = 10.0) -> bytes:
    """Everything the proxy says to `data` sent at once and a half-close."""
    with socket.create_connection(address, timeout=timeout) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


# Lines a client may send before and after login (no DELE: both proxies
# must find the same mailbox).
WORDS = [
    "CAPA",
    "capa",
    "CAPA now",
    "QUIT",
    "quit",
    "NOOP",
    "STAT",
    "LIST",
    "UIDL",
    "RETR 1",
    "TOP 2 0",
    "USER ana",
    "user ana",
    "USER beto",
    "USER nobody",
    "USER frozen",
    "USER remote",
    "USER  ana",
    "USER ana x",
    "USER",
    "USER añá",
    "USER " + "a" * 300,
    "USER \x01ana",
    "PASS ana-secret",
    "pass ana-secret",
    "PASS beto pw",
    "PASS  beto pw",
    "PASS wrong",
    "PASS frozen-pw",
    "PASS remote-pw",
    "PASS",
    "PASS " + "p" * 300,
    "PASS tab\there",
    f"AUTH PLAIN {plain('ana', 'ana-secret')}",
    f"AUTH PLAIN {plain('beto', 'nope')}",
    "AUTH",
    "AUTH PLAIN",
    "",
    "\x00",
    "XCLIENT ADDR=10.1.2.3",
    "APOP ana 0123456789abcdef",
    "STLS ",
]


def script(rnd: random.Random) -> bytes:
    lines = [rnd.choice(WORDS) for _ in range(rnd.randint(1, 7))]
    if rnd.random() < 0.3:
        lines.insert(0, "USER ana" if rnd.random() < 0.5 else "USER beto")
        lines.insert(1, "PASS ana-secret" if lines[0] == "USER ana" else "PASS beto pw")
    ends = [rnd.choice(["\r\n", "\r\n", "\n"]) for _ in lines]
    data = "".join(line + end for line, end in zip(lines, ends)).encode()
    if rnd.random() < 0.1:
        data = data[:-1]  # the last line never ends
    return data


def test_engine_and_python_answer_alike(bed):
    rnd = random.Random(11)
    for i in range(80):
        data = script(rnd)
        want = session(bed["python"].address, data)
        got = session(bed["engine"].address, data)
        assert got == want, f"script {i}: {data!r}"
        assert want.startswith(b"+OK POP3 ready.\r\n")
    assert "Traceback" not in bed["engine"].output() + bed["python"].output()


@pytest.mark.parametrize(
    "data",
    [
        b"CAPA\r\n" * 300,  # past the engine's 1 KiB of history
        b"USER ana\r\n" + b"CAPA\r\n" * 170 + b"PASS ana-secret\r\nSTAT\r\nQUIT\r\n",
        b"USER ana\r\nPASS ana-secret\r\n" + b"NOOP\r\n" * 400 + b"QUIT\r\n",  # pipelined past the login
        b"USER ana\r\n" + b"x" * 2000 + b"\r\n",  # a long line that starts inside the history
    ],
    ids=["many-capa", "capa-then-login", "pipelined-after-login", "long-line"],
)
def test_long_pipelines_answer_alike(bed, data):
    assert session(bed["engine"].address, data) == session(bed["python"].address, data)


def test_engine_logs_like_python(bed):
    for name in ("engine", "python"):
        p = bed[name]
        with socket.create_connection(p.address, timeout=10) as s:
            port = s.getsockname()[1]
            read_reply(s)
            s.sendall(b"USER ana\r\nPASS ana-secret\r\nQUIT\r\n")
            while s.recv(4096):
                pass
        deadline = time.monotonic() + 5
        while f"logout user=ana from=127.0.0.1:{port} backend=store1" not in p.output():
            assert time.monotonic() < deadline, p.output()[-2000:]
            time.sleep(0.05)
        out = p.output()
        login = next(line for line in out.splitlines() if f"login user=ana from=127.0.0.1:{port} " in line)
        # "2026-11-30 03:52:01,091 pop-proxy[17464]: INFO login user=..."
        assert login.split(" ", 2)[2].startswith(f"pop-proxy[{p.proc.pid}]: INFO login user=ana ")


def test_throttle_blocks_reach_the_engine(bed):
    settings = bed["settings"].replace("throttle_user_failures = 100000", "throttle_user_failures = 2")
    with start_proxy(bed["tmp"], bed["conf"], settings, name="engine-throttle") as proxy:
        for _ in range(2):
            answer = session(proxy.address, b"USER beto\r\nPASS guess\r\nQUIT\r\n")
            assert b"-ERR [AUTH] Authentication failed." in answer
        # Python counted the failures and told the engine: even the right
        # password is refused now, without reaching the backend.
        before = bed["store"].output().count("login user=beto")
        answer = session(proxy.address, b"USER beto\r\nPASS beto pw\r\nQUIT\r\n")
        assert b"-ERR [LOGIN-DELAY]" in answer
        assert bed["store"].output().count("login user=beto") == before
        assert session(proxy.address, b"USER ana\r\nPASS ana-secret\r\nQUIT\r\n").count(b"+OK") >= 3


def test_clients_that_leave_mid_login_do_not_hurt(bed):
    """Clients vanish at every step of the engine's login; it goes on."""

    def leave(step: int):
        s = socket.create_connection(bed["engine"].address, timeout=10)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # close = RST
        s.sendall(b"USER ana\r\nPASS ana-secret\r\n" if step else b"USER ana\r\n")
        if step > 1:
            time.sleep(0.001 * step)
        s.close()

    threads = [threading.Thread(target=leave, args=(i % 12,)) for i in range(60)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # The logins the leavers started go on at the backend (a hash each) and
    # hold ana's mailbox a moment: [IN-USE] until they are done.
    deadline = time.monotonic() + 30
    while True:
        answer = session(bed["engine"].address, b"USER ana\r\nPASS ana-secret\r\nSTAT\r\nQUIT\r\n")
        if b"[IN-USE]" not in answer or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert answer.startswith(b"+OK POP3 ready.\r\n+OK\r\n+OK"), answer
    assert bed["engine"].proc.poll() is None


def test_stop_log_counts_the_engine(bed):
    settings = bed["settings"]
    with start_proxy(bed["tmp"], bed["conf"], settings, name="engine-stop") as proxy:
        session(proxy.address, b"USER ana\r\nPASS ana-secret\r\nQUIT\r\n")
        session(proxy.address, b"NOOP\r\n")  # handed over
    out = proxy.output()
    stopping = next(line for line in out.splitlines() if "stopping:" in line)
    assert "'login_ok': 1" in stopping and "'handoffs': 1" in stopping and "'connections': 2" in stopping


@pytest.mark.parametrize("first", ["silent", "refusing"])
def test_lookups_fail_over_to_the_next_password_server(bed, first):
    """The engine's MAILHOST lookups go through libnss_pwserver's client:
    a first server that stays silent or refuses is passed over, and the
    login still goes through the engine (no handover)."""
    from tests.support import pwtest

    blackhole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # bound, never answers
    blackhole.bind(("127.0.0.1", 0))
    port = blackhole.getsockname()[1]
    if first == "refusing":
        blackhole.close()  # nothing listens: ICMP port unreachable
    try:
        conf = pwtest.client_conf(
            bed["tmp"] / f"pwserver-{first}.conf",
            [f"127.0.0.1:{port}", bed["pw"].address],
            timeout_ms=500,
            hedge_ms=100,
            shadow_keyfile=bed["key"],
        )
        with start_proxy(bed["tmp"], conf, bed["settings"], name=f"engine-{first}") as proxy:
            for _ in range(3):
                answer = session(proxy.address, b"USER ana\r\nPASS ana-secret\r\nSTAT\r\nQUIT\r\n")
                assert answer.startswith(b"+OK POP3 ready.\r\n+OK\r\n+OK"), answer
        stopping = next(line for line in proxy.output().splitlines() if "stopping:" in line)
        assert "'login_ok': 3" in stopping and "'handoffs'" not in stopping
    finally:
        blackhole.close()
