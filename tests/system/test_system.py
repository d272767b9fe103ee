"""The whole system across hosts (issue 6): pwmail on the namespace test bed,
end to end and under faults. Each test is bounded in time; the bed tears
everything down even when one fails."""

from __future__ import annotations

import os
import re
import signal
import smtplib
import threading
import time
from email.parser import BytesParser

import pytest

from pwmail.testbed import TestBed, namespace_support
from pwmail.testbed.system import PartMissing, PwmailSystem, hosts_for
from tests.support.pwtest import wait_for

USERS = 3000
TIMEOUT_MS = 1000  # per-try timeout of every pwserver client on the bed
HEDGE_MS = 50
RECHECK_S = 2

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.fixture(scope="module")
def system():
    reason = namespace_support()
    if reason:
        pytest.skip(reason)
    with TestBed(hosts_for()) as bed:
        # PWMAIL_TESTBED_USERS: a folder of users made earlier by `pwmail gen-users`.
        s = PwmailSystem(
            bed,
            users=USERS,
            timeout_ms=TIMEOUT_MS,
            hedge_ms=HEDGE_MS,
            recheck_s=RECHECK_S,
            users_dir=os.environ.get("PWMAIL_TESTBED_USERS"),
        )
        try:
            s.start()
        except PartMissing as e:
            pytest.skip(str(e))
        yield s


_taken: set[str] = set()


def fresh(s: PwmailSystem, store: str, n: int) -> list[str]:
    """n users on store that no other test of this module has used."""
    pool = [u for u in s.users_on(store, len(_taken) + n + 1) if u not in _taken][:n]
    _taken.update(pool)
    return pool


def message_ids_on_disk(s: PwmailSystem, user: str) -> list[str]:
    ids = []
    for f in s.messages_on_disk(user):
        msg = BytesParser().parsebytes(f.read_bytes(), headersonly=True)
        ids.append(msg["Message-ID"])
    return ids


def requests_seen(s: PwmailSystem, pw: str) -> int:
    """pwserver's `requests` counter on host pw (this query included)."""
    from pwcache.client import Client

    with s.bed.inside("client1"), Client([f"{s.bed.addr(pw)}:{s.ports.pwserver}"], timeout_ms=TIMEOUT_MS) as c:
        return c.stats()["requests"]


def mk(s: PwmailSystem, user: str, tag: str) -> tuple[bytes, str]:
    data = s.message(user, tag, f"body of {tag}\n")
    mid = BytesParser().parsebytes(data, headersonly=True)["Message-ID"]
    return data, mid


@pytest.mark.timeout(120)
def test_delivery_and_pop_end_to_end(system):
    s = system
    for store in s.stores:
        user = fresh(s, store, 1)[0]
        data, mid = mk(s, user, f"e2e {store}")
        r = s.deliver(user, data)
        assert r.returncode == 0, r.stderr
        assert message_ids_on_disk(s, user).count(mid) == 1
        others = [o for o in s.stores if o != store]
        assert all(not s.mailbox(user, o).exists() for o in others)
        msgs = s.pop_fetch(user)
        assert any(mid.encode() in m for m in msgs)


@pytest.mark.timeout(180)
def test_pw1_cut_lookups_deliveries_and_logins_go_on_through_pw2(system):
    s, bed = system, system.bed
    names = fresh(s, s.stores[0], 40)
    base = sum(s.lookup_latencies(names[:20]))
    bed.cut("pw1")
    try:
        # One long-lived client (as pop-proxy holds): every lookup answered;
        # the extra cost is bounded per change of state, not per lookup.
        t0 = time.monotonic()
        lat = s.lookup_latencies(names)
        total = time.monotonic() - t0
        assert len(lat) == len(names)
        assert total < TIMEOUT_MS / 1000 + len(names) * (HEDGE_MS / 1000) + 2 * base + 1.0
        # Short-lived processes (pdelivery per message, getent): each goes on.
        user = names[0]
        deliveries, getents = [], []
        for i in range(3):
            data, mid = mk(s, user, f"pw1 cut {i}")
            t0 = time.monotonic()
            r = s.deliver(user, data)
            deliveries.append(time.monotonic() - t0)
            assert r.returncode == 0, r.stderr
            assert deliveries[-1] < TIMEOUT_MS / 1000 + 5
            assert message_ids_on_disk(s, user).count(mid) == 1
        for _ in range(3):
            rc, out, secs = s.getent(user)
            getents.append(secs)
            assert rc == 0 and out.startswith(user + ":")
            assert secs < TIMEOUT_MS / 1000 + 1.0
        t0 = time.monotonic()
        assert len(s.pop_fetch(user)) >= 3
        login = time.monotonic() - t0
        print(
            f"\nFIGURE pw1 cut (timeout {TIMEOUT_MS} ms, hedge {HEDGE_MS} ms): {len(names)} lookups from one "
            f"client in {total * 1000:.0f} ms (20 before the cut: {base * 1000:.0f} ms), slowest "
            f"{max(lat) * 1000:.0f} ms; pdelivery processes {', '.join(f'{x * 1000:.0f}' for x in deliveries)} ms; "
            f"getent processes {', '.join(f'{x * 1000:.0f}' for x in getents)} ms; POP login+fetch {login * 1000:.0f} ms"
        )
    finally:
        bed.restore("pw1")
    # pw1 is back: after the recheck interval, traffic goes back to it
    # (from a long-lived client and from short-lived getent processes).
    time.sleep(RECHECK_S + 0.5)
    before = {pw: requests_seen(s, pw) for pw in ("pw1", "pw2")}
    s.lookup_latencies(names[:20])
    for _ in range(5):
        assert s.getent(names[1])[0] == 0
    after = {pw: requests_seen(s, pw) for pw in ("pw1", "pw2")}
    assert after["pw1"] - before["pw1"] >= 25
    # pw2 sees at most hedges (a slow answer under load) and probes, not the traffic
    assert 2 * (after["pw2"] - before["pw2"]) < after["pw1"] - before["pw1"]


@pytest.mark.timeout(300)
def test_store2_cut_defers_its_users_then_every_message_exactly_once(system):
    s, bed = system, system.bed
    u1 = fresh(s, "store1", 1)[0]
    u2 = fresh(s, "store2", 1)[0]
    sent = {u1: [], u2: []}
    deferred = []
    waits: dict[str, list[float]] = {}
    bed.cut("store2")
    try:
        for i in range(2):
            for user in (u1, u2):
                data, mid = mk(s, user, f"store2 cut {i} {user}")
                t0 = time.monotonic()
                r = s.deliver(user, data, timeout=120)
                waits.setdefault(user, []).append(time.monotonic() - t0)
                sent[user].append(mid)
                if user == u1:
                    assert r.returncode == 0, r.stderr
                else:
                    assert r.returncode == 75, (r.returncode, r.stderr)  # EX_TEMPFAIL: kept for retry
                    deferred.append((user, data))
    finally:
        bed.restore("store2")
    for user, data in deferred:  # the MTA's queue run
        r = s.deliver(user, data)
        assert r.returncode == 0, r.stderr
    for user, mids in sent.items():
        on_disk = message_ids_on_disk(s, user)
        assert sorted(m for m in on_disk if m in mids) == sorted(mids)
        assert all(on_disk.count(m) == 1 for m in mids)
    print(
        f"\nFIGURE store2 cut: store1 user delivered in {', '.join(f'{x * 1000:.0f}' for x in waits[u1])} ms; "
        f"store2 user got 75 after {', '.join(f'{x:.1f}' for x in waits[u2])} s; after restore "
        f"{len(deferred)} retries delivered, every message once"
    )


@pytest.mark.timeout(300)
def test_pdeliveryd_sigkill_during_burst_keeps_every_acknowledged_message_once(system):
    s, bed = system, system.bed
    users = fresh(s, "store1", 20)
    total, threads_n, kill_after = 1000, 4, 400
    acked: list[tuple[str, str]] = []  # got 250: must be on disk exactly once
    lost: list[tuple[str, str]] = []  # in flight at the kill: on disk at most once
    unsent: list[int] = []
    lock = threading.Lock()

    def connect() -> smtplib.LMTP:
        conn = smtplib.LMTP(timeout=10)
        with bed.inside("mx1"):  # connect() makes the socket
            conn.connect(bed.addr("store1"), s.ports.lmtp)
        return conn

    def sender(k: int):
        conn = None
        for i in range(k, total, threads_n):
            user = users[i % len(users)]
            data, mid = mk(s, user, f"burst {i}")
            deadline = time.monotonic() + 60
            while conn is None:  # while pdeliveryd is down: wait, bounded
                try:
                    conn = connect()
                except OSError:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.1)
            if conn is None:
                with lock:
                    unsent.append(i)
                continue
            try:
                conn.sendmail("burst@example.org", [user], data)
            except (smtplib.SMTPException, OSError):
                conn = None
                with lock:
                    lost.append((user, mid))
                continue
            with lock:
                acked.append((user, mid))

    threads = [threading.Thread(target=sender, args=(k,)) for k in range(threads_n)]
    for t in threads:
        t.start()
    wait_for(lambda: len(acked) >= kill_after, 120, 0.005, describe=lambda: "the burst did not get going")
    bed.kill("store1", "pdeliveryd", signal.SIGKILL)
    at_kill = len(acked)
    bed.restart("store1", "pdeliveryd")
    for t in threads:
        t.join(180)
    assert not any(t.is_alive() for t in threads)
    assert unsent == []
    assert len(acked) + len(lost) == total
    assert 0 < len(lost) <= threads_n
    on_disk: list[str] = []
    for user in users:
        on_disk += message_ids_on_disk(s, user)
    for _, mid in acked:
        assert on_disk.count(mid) == 1, mid
    for _, mid in lost:
        assert on_disk.count(mid) <= 1, mid
    assert len(on_disk) <= len(acked) + len(lost)
    # Nothing partial in new/: each file is whole (its size is in its name).
    for user in users:
        new = s.mailbox(user) / "new"
        for f in new.iterdir() if new.is_dir() else []:
            m = re.search(r",S=(\d+)", f.name)
            assert m, f.name
            assert f.stat().st_size == int(m.group(1)), f.name
    print(
        f"\nFIGURE pdeliveryd SIGKILL: burst of {total} over {threads_n} LMTP sessions, killed after "
        f"{at_kill} acknowledged and restarted; {len(acked)} acknowledged in all, each on disk once; "
        f"{len(lost)} in flight at the kill ({sum(on_disk.count(m) for _, m in lost)} of them committed "
        f"without their 250); no partial file in new/"
    )


@pytest.mark.timeout(120)
def test_pop1_restart_clients_reconnect_and_continue(system):
    s, bed = system, system.bed
    user = fresh(s, "store2", 1)[0]
    data, mid = mk(s, user, "before pop1 restart")
    assert s.deliver(user, data).returncode == 0
    import poplib

    with bed.inside("client1"):
        pop = poplib.POP3(bed.addr("pop1"), s.ports.proxy, timeout=10)
    pop.user(user)
    pop.pass_(s.passwords[user])
    count, _ = pop.stat()
    assert count >= 1
    bed.restart("pop1", "pop-proxy")
    with pytest.raises((poplib.error_proto, OSError, EOFError)):
        pop.stat()
        pop.stat()
    pop.close()
    s.wait_listening("pop1", "pop-proxy", s.ports.proxy)
    # pop3d may still hold the old session's lock for a moment.
    deadline = time.monotonic() + 30
    while True:
        try:
            msgs = s.pop_fetch(user)
            break
        except poplib.error_proto:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    assert any(mid.encode() in m for m in msgs)
    assert len(msgs) == count


def log_count(bed, host: str, pattern: str) -> int:
    rx = re.compile(pattern)
    return sum(1 for line in bed.log_lines() if line.split(" ", 2)[1] == host and rx.search(line))


@pytest.mark.timeout(60)
def test_central_log_has_one_line_per_delivery_and_login_from_every_host(system):
    s, bed = system, system.bed
    for store in s.stores:
        user = fresh(s, store, 1)[0]
        for i in range(3):
            data, _ = mk(s, user, f"logged {i}")
            assert s.deliver(user, data).returncode == 0
        for _ in range(2):
            assert len(s.pop_fetch(user)) == 3
        expect = {
            (store, rf"pdeliveryd\[\d+\]: .*delivered .*to={user}\b"): 3,
            ("mx1", rf"pdelivery\[\d+\]: .*delivered .*to={user}\b"): 3,
            ("pop1", rf"pop-proxy\[\d+\]: .*login user={user}\b"): 2,
            (store, rf"pop3d\[\d+\]: .*login user={user}\b"): 2,
        }
        counts = lambda: {k: log_count(bed, *k) for k in expect}  # noqa: E731
        wait_for(lambda: counts() == expect, 5, 0.1, describe=lambda: f"{counts()} != {expect}")
    hosts = {line.split(" ", 2)[1] for line in bed.log_lines()}
    assert {"pw1", "pw2", "mx1", "pop1", *s.stores} <= hosts
