"""pop-proxy's login throttle (pop/throttle.py, pe_throttle_* in
pop/_csrc/pop_engine.c) under parallel attempts, with the engine on and
off: a real pwserver, a real pop3d backend, the proxy in front. Attempts
count from their start, so parallel ones cannot pass a limit; the limit
per (user, address) comes before the much higher one per user, so an
attacker's address does not lock the owner out."""

from __future__ import annotations

import socket
import threading

import pytest

from pop.throttle import ADMITTED, VERDICT_FAILED, VERDICT_OK, LoginThrottle
from tests.support.pop_util import make_root, read_reply, start_pop3d, start_proxy, users_pwserver

pytestmark = pytest.mark.slow

USERS = {"victim": ("victim-pw", "store1"), **{f"u{i}": (f"u{i}-pw", "store1") for i in range(24)}}
ENGINE = pytest.mark.parametrize("engine", ["true", "false"])


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("throttle")
    make_root(tmp / "store1")
    with users_pwserver(tmp, USERS) as conf:
        store = start_pop3d(tmp, tmp / "store1", conf, host="127.0.0.2", trusted=["127.0.0.0/8"])
        settings = (
            f'backends = {{ store1 = "127.0.0.2:{store.port}" }}\n'
            "auth_failure_delay = 0.2\nbackend_retries = 0\nmax_connections_per_ip = 1000\n"
        )
        with store:
            yield {"tmp": tmp, "conf": conf, "store": store, "settings": settings}


def attempts(address, user_passwords, source: str = "127.0.0.1") -> list[bytes]:
    """One connection per (user, password), all sending PASS at once; their answers."""
    socks = []
    for _ in user_passwords:
        s = socket.create_connection(address, timeout=30, source_address=(source, 0))
        socks.append(s)
        assert read_reply(s, 30).startswith(b"+OK")
    for s, (user, _) in zip(socks, user_passwords):
        s.sendall(f"USER {user}\r\n".encode())
    for s in socks:
        assert read_reply(s, 30).startswith(b"+OK")
    go = threading.Barrier(len(socks))
    answers = [b""] * len(socks)

    def one(i, s, password):
        go.wait()
        s.sendall(f"PASS {password}\r\n".encode())
        answers[i] = read_reply(s, 30)
        s.close()

    threads = [
        threading.Thread(target=one, args=(i, s, pw)) for i, (s, (_, pw)) in enumerate(zip(socks, user_passwords))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


def checked_at_backend(bed, before: str) -> int:
    """Failed logins the backend logged since its output was `before`."""
    return bed["store"].output()[len(before) :].count("login failed user=")


def proxy(bed, engine: str, name: str, extra: str = ""):
    return start_proxy(
        bed["tmp"], bed["conf"], bed["settings"] + f"engine = {engine}\n" + extra, name=f"{name}-{engine}"
    )


@ENGINE
@pytest.mark.parametrize("n", [12, 40])
def test_parallel_wrong_passwords_for_one_user_stop_at_the_limit(bed, engine, n):
    with proxy(bed, engine, f"user{n}", "throttle_user_ip_failures = 10\n") as p:
        before = bed["store"].output()
        answers = attempts(p.address, [("victim", "guess")] * n)
        assert sum(a.startswith(b"-ERR [AUTH]") for a in answers) <= 10, answers
        assert sum(a.startswith(b"-ERR [LOGIN-DELAY]") for a in answers) >= n - 10, answers
        assert checked_at_backend(bed, before) <= 10
        assert "by=user+address" in p.output()


@ENGINE
def test_parallel_failures_from_one_address_stop_at_the_limit(bed, engine):
    with proxy(bed, engine, "addr", "throttle_ip_failures = 20\n") as p:
        before = bed["store"].output()
        answers = attempts(p.address, [(f"u{i}", "guess") for i in range(24)])
        assert sum(a.startswith(b"-ERR [AUTH]") for a in answers) <= 20, answers
        assert sum(a.startswith(b"-ERR [LOGIN-DELAY]") for a in answers) >= 4, answers
        assert checked_at_backend(bed, before) <= 20


@ENGINE
def test_user_alone_has_its_own_higher_limit(bed, engine):
    """From four addresses, ten each: the per-user limit (20) holds them all."""
    with proxy(bed, engine, "useralone", "throttle_user_ip_failures = 10\nthrottle_user_failures = 20\n") as p:
        before = bed["store"].output()
        results = {}

        def from_address(src):
            results[src] = attempts(p.address, [("victim", "guess")] * 10, source=src)

        threads = [threading.Thread(target=from_address, args=(f"127.0.0.{10 + i}",)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        answers = [a for got in results.values() for a in got]
        assert len(answers) == 40
        assert sum(a.startswith(b"-ERR [AUTH]") for a in answers) <= 20, answers
        assert checked_at_backend(bed, before) <= 20


@ENGINE
def test_the_owner_logs_in_from_elsewhere_after_an_attack(bed, engine):
    with proxy(bed, engine, "owner") as p:  # the defaults: 10 per (user, address), 100 per user
        answers = attempts(p.address, [("victim", "guess")] * 12, source="127.0.0.1")
        assert any(a.startswith(b"-ERR [LOGIN-DELAY]") for a in answers), answers
        # The attacker's address is refused even the right password ...
        assert attempts(p.address, [("victim", "victim-pw")], source="127.0.0.1")[0].startswith(b"-ERR [LOGIN-DELAY]")
        # ... the owner, from another address, is not.
        assert attempts(p.address, [("victim", "victim-pw")], source="127.0.0.7")[0].startswith(b"+OK")


def test_throttle_counts_in_flight_and_drains():
    t = LoginThrottle(
        {
            "throttle_ip_failures": 20,
            "throttle_user_ip_failures": 3,
            "throttle_user_failures": 5,
            "throttle_window": 30.0,
        }
    )
    assert [t.begin("10.0.0.1", "Ana", 0) for _ in range(4)][:3] == [ADMITTED] * 3
    assert t.begin("10.0.0.1", "ana", 0) != ADMITTED  # 3 in flight (case folded)
    assert t.begin("10.0.0.2", "ana", 0) == ADMITTED  # another address: 4 of 5 for the user
    for _ in range(3):
        t.end("10.0.0.1", "ana", VERDICT_FAILED, 0)
    assert t.begin("10.0.0.1", "ana", 1) != ADMITTED  # 3 failed
    assert t.begin("10.0.0.1", "ana", 11) == ADMITTED  # one drained (30 s / 3)
    t.end("10.0.0.1", "ana", VERDICT_OK, 11)  # success from there clears (user, address)
    t.end("10.0.0.2", "ana", VERDICT_OK, 11)
    assert [t.begin("10.0.0.1", "ana", 11) for _ in range(3)] == [ADMITTED] * 3
    for _ in range(3):
        t.end("10.0.0.1", "ana", VERDICT_OK, 11)
    # Nothing in flight; the address's 3 failures have drained (20 per 30 s),
    # the user's not yet (5 per 30 s): one key left.
    assert len(t) == 1


def test_throttle_table_is_bounded():
    t = LoginThrottle(
        {
            "throttle_ip_failures": 20,
            "throttle_user_ip_failures": 10,
            "throttle_user_failures": 100,
            "throttle_window": 300.0,
        },
        max_keys=4,
    )
    assert t.begin("10.0.0.1", "ana", 0) == ADMITTED  # 3 keys
    t.end("10.0.0.1", "ana", VERDICT_FAILED, 0)
    assert t.begin("10.0.0.2", "bea", 0) == ADMITTED  # 3 more: idle ones make room
    assert len(t) <= 4 and t.evicted() >= 2
    assert t.begin("10.0.0.3", "cid", 0) != ADMITTED  # all 4 left are in flight (bea's)
    t.end("10.0.0.2", "bea", VERDICT_OK, 0)
    assert t.begin("10.0.0.3", "cid", 0) == ADMITTED
