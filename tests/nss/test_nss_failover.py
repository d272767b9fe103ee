"""Failover of libnss_pwserver.so.2 through real glibc (getent): a primary
that silently drops packets, the shared health record, both servers down,
and the primary coming back."""

from __future__ import annotations

import os
import pathlib
import socket
import stat
import subprocess
import time

import pytest

from tests.support import nss_util as u
from tests.support.pwtest import client_conf, write_key

TIMEOUT_MS = 2000
HEDGE_MS = 50


@pytest.fixture(scope="module", autouse=True)
def lib():
    return u.build_module()


@pytest.fixture
def pair():
    primary = u.FakePwServer(u.PASSWD, u.GROUP, u.SHADOW, mode="drop")
    secondary = u.FakePwServer(u.PASSWD, u.GROUP, u.SHADOW)
    yield primary, secondary
    primary.stop()
    secondary.stop()


def conf_for(tmp_path, servers, **kw):
    kw.setdefault("timeout_ms", TIMEOUT_MS)
    kw.setdefault("hedge_ms", HEDGE_MS)
    return client_conf(
        tmp_path / "pwserver.conf", [s.address for s in servers], health_file=tmp_path / "run" / "health", **kw
    )


def health_lines(tmp_path) -> list[list[str]]:
    path = tmp_path / "run" / "health"
    if not path.exists():
        return []
    return [line.split() for line in path.read_text().splitlines()]


def timed_getent(conf, *args):
    t = time.monotonic()
    r = u.getent(conf, *args)
    return r, time.monotonic() - t


def test_dropping_primary_secondary_answers_and_health_is_shared(tmp_path, pair):
    primary, secondary = pair
    conf = conf_for(tmp_path, pair)
    r, took = timed_getent(conf, "passwd", "alice")
    assert r.returncode == 0 and r.stdout.startswith("alice:x:2001:")
    assert primary.requests == 1 and secondary.answered == 1
    assert took < TIMEOUT_MS / 1000 / 2  # the hedge, not the timeout
    # the record: one line "down HOST:PORT UNTIL", written atomically, 0644
    (line,) = health_lines(tmp_path)
    assert line[0] == "down" and line[1] == primary.address
    assert time.time() < int(line[2]) <= time.time() + 5 + 1
    mode = stat.S_IMODE(os.stat(tmp_path / "run" / "health").st_mode)
    assert mode == 0o644
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["health"]  # no temporary left
    # the next process skips the primary entirely
    r, took = timed_getent(conf, "group", "pwstaff")
    assert r.returncode == 0 and primary.requests == 1


def test_refusing_primary_fails_over_at_once(tmp_path, pair):
    _, secondary = pair
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nobody listens: ICMP port unreachable

    class Closed:
        address = f"127.0.0.1:{port}"

    conf = conf_for(tmp_path, [Closed, secondary], hedge_ms=1000)
    r, took = timed_getent(conf, "passwd", "bob")
    assert r.returncode == 0 and took < 0.9  # did not wait for the 1 s hedge
    assert health_lines(tmp_path)[0][1] == Closed.address


def run_many(conf, n):
    """n lookups in n separate short-lived processes; returns seconds."""
    env = u.module_env(conf)
    t = time.monotonic()
    for i in range(n):
        r = subprocess.run(
            ["getent", "-s", "pwserver", "passwd", f"user{i:04d}"], env=env, stdout=subprocess.PIPE, timeout=30
        )
        assert r.returncode == 0 and r.stdout.startswith(f"user{i:04d}:".encode())
    return time.monotonic() - t


def test_100_processes_while_primary_down_cost_at_most_one_timeout(tmp_path, pair):
    primary, secondary = pair
    primary.mode = "serve"
    normal = run_many(conf_for(tmp_path, pair), 100)
    assert primary.answered >= 95  # (a loaded machine may hedge a few)
    primary.mode = "drop"
    (tmp_path / "run" / "health").unlink(missing_ok=True)
    before = primary.requests
    down = run_many(conf_for(tmp_path, pair), 100)
    assert down < TIMEOUT_MS / 1000 + normal, (down, normal)
    assert primary.requests - before <= 2  # marked down after the first
    assert secondary.answered >= 98


def test_both_down_is_unavail_within_the_timeout_and_files_still_resolve(tmp_path, pair):
    primary, secondary = pair
    secondary.mode = "drop"
    conf = conf_for(tmp_path, pair)
    r, took = timed_getent(conf, "passwd", "alice")
    assert r.returncode == 2 and r.stdout == ""
    assert took < TIMEOUT_MS / 1000 + 0.5
    assert sorted(line[1] for line in health_lines(tmp_path)) == sorted([primary.address, secondary.address])
    # known down: later lookups do not wait a full timeout each
    r, took = timed_getent(conf, "passwd", "alice")
    assert r.returncode == 2 and took < TIMEOUT_MS / 1000 / 2
    # users from files resolve through nsswitch.conf "files pwserver"
    ns = tmp_path / "nsswitch.conf"
    ns.write_text("passwd: files pwserver\ngroup: files pwserver\n")
    script = 'mount --bind "$0" /etc/nsswitch.conf && getent passwd root && id -u root && exec id alice'
    t = time.monotonic()
    r = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, str(ns)],
        env=u.module_env(conf),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.stdout.splitlines()[:2] == ["root:x:0:0:root:/root:/bin/bash", "0"]
    assert r.returncode == 1 and "no such user" in r.stderr
    assert time.monotonic() - t < TIMEOUT_MS / 1000 + 0.5


def test_primary_back_traffic_returns(tmp_path, pair):
    primary, secondary = pair
    # a long hedge: a busy test machine must not make the primary look slow
    conf = conf_for(tmp_path, pair, recheck_s=1, hedge_ms=500)
    r, _ = timed_getent(conf, "passwd", "alice")
    assert r.returncode == 0 and health_lines(tmp_path)[0][1] == primary.address
    primary.mode = "serve"
    time.sleep(1.2)  # past recheck_s: one lookup probes the primary again
    for _ in range(3):
        r, _ = timed_getent(conf, "passwd", "alice")
        assert r.returncode == 0
    assert health_lines(tmp_path) == []
    p, s = primary.answered, secondary.answered
    for _ in range(5):
        assert timed_getent(conf, "passwd", "bob")[0].returncode == 0
    assert primary.answered == p + 5 and secondary.answered == s


def test_unprivileged_process_keeps_health_in_memory(pair):
    """A process that may not write the health record (not root) still
    fails over, remembers the dead primary for itself, leaves no file, and
    cannot ask for shadow entries without reading the root-only key."""
    import json
    import shutil
    import sys
    import tempfile

    primary, secondary = pair
    d = pathlib.Path(tempfile.mkdtemp(prefix="nss-nobody-"))
    try:
        d.chmod(0o755)
        (d / "run").mkdir(mode=0o755)
        write_key(d / "shadow.key")  # mode 0600, root's
        conf = client_conf(
            d / "pwserver.conf",
            [primary.address, secondary.address],
            health_file=d / "run" / "health",
            shadow_keyfile=d / "shadow.key",
            timeout_ms=TIMEOUT_MS,
            hedge_ms=HEDGE_MS,
        )
        conf.chmod(0o644)
        queries = [["passwd", "alice"], ["passwd", "bob"], ["uid", "2003"], ["shadow", "alice"]]
        r = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", u.DRIVER],
            input="".join(json.dumps(q) + "\n" for q in queries),
            env=u.module_env(conf),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        results = [json.loads(line) for line in r.stdout.splitlines()]
        assert [x[0] for x in results] == [u.NSS_SUCCESS] * 3 + [u.NSS_UNAVAIL]
        assert results[3][1] == u.EACCES
        assert primary.requests == 1  # skipped after the first lookup
        assert not (d / "run" / "health").exists()
    finally:
        shutil.rmtree(d)


def test_real_pwservers_hung_primary_then_back(tmp_path):
    """Two real pwservers; the primary is stopped (SIGSTOP: it drops
    nothing, answers nothing, like a hung host) -> the secondary answers;
    continued -> after recheck_s traffic returns to the primary."""
    import signal

    def ok_count(server):
        return u.server_stats(server)["ok"]

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with u.real_server(tmp_path / "a") as primary, u.real_server(tmp_path / "b") as secondary:
        conf = conf_for(tmp_path, [primary, secondary], recheck_s=1, hedge_ms=300)
        base = ok_count(primary)
        assert timed_getent(conf, "passwd", "alice")[0].returncode == 0
        assert ok_count(primary) - base in (1, 2)  # (the STATS answer may count itself)
        primary.signal(signal.SIGSTOP)
        try:
            r, took = timed_getent(conf, "passwd", "bob")
            assert r.returncode == 0 and r.stdout.startswith("bob:x:2002:")
            assert took < TIMEOUT_MS / 1000 / 2
            assert health_lines(tmp_path)[0][1] == primary.address
            before = ok_count(secondary)
            for _ in range(5):
                assert timed_getent(conf, "group", "pwstaff")[0].returncode == 0
            assert ok_count(secondary) >= before + 5
        finally:
            primary.signal(signal.SIGCONT)
        time.sleep(1.2)
        for _ in range(3):
            assert timed_getent(conf, "passwd", "alice")[0].returncode == 0
        assert health_lines(tmp_path) == []
        p = ok_count(primary)
        for _ in range(5):
            assert timed_getent(conf, "passwd", "dave")[0].returncode == 0
        assert ok_count(primary) - p in (5, 6)


def test_messy_config_and_health_files(tmp_path, pair):
    """Comments, unknown keys, bad and overlong lines are ignored; a health
    file with garbage is read for what it has; a server recorded down far
    into the future, but alive, answers the all-down probe and is cleared."""
    _, secondary = pair
    run = tmp_path / "run"
    run.mkdir()
    (run / "health").write_text(
        "garbage line\n\x00\x01binary\ndown\ndown 1.2.3.4:5 notanumber\n"
        f"down {secondary.address} {int(time.time()) + 100000}\n" + "x" * 10000 + "\n"
    )
    conf = tmp_path / "pwserver.conf"
    conf.write_text(
        "# a comment\n\n   \nunknown_key value\nserver\nserver not-an-address:xx\n"
        "server [::1\ntimeout_ms banana\nhedge_ms -5\n" + "server 127.0.0.1:1" + "1" * 600 + "\n"
        f"server {secondary.address}   # the only good one\n"
        f"timeout_ms 3000\nhealth_file {run / 'health'}\n"
    )
    r, took = timed_getent(conf, "passwd", "carol.d-x")
    assert r.returncode == 0 and r.stdout.startswith("carol.d-x:x:2003:")
    assert took < 1.0  # the all-down probe waits hedge_ms, not the timeout
    assert all(line[1] != secondary.address for line in health_lines(tmp_path) if len(line) > 1)
