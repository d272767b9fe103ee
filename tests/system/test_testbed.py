"""The test bed itself: hosts reach each other, a cut link drops silently
(timeouts, not refusals), restore, kill/restart, the central log, and
teardown that leaves nothing behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from pwmail.testbed import SUBNET, LoopbackBed, TestBed, cleanup_stale, namespace_support
from pwmail.testbed.syslogd import format_line
from tests.support.pwtest import wait_for

ECHO = r"""
import socket, sys, threading
addr, port = sys.argv[1], int(sys.argv[2])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind((addr, port))
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); t.bind((addr, port)); t.listen()
def serve():
    while True:
        c, _ = t.accept(); c.sendall(b"hello " + sys.argv[3].encode()); c.close()
threading.Thread(target=serve, daemon=True).start()
print("echo: ready", flush=True)
while True:
    d, a = u.recvfrom(1000); u.sendto(d, a)
"""
PORT = 9999


def _need_namespaces():
    reason = namespace_support()
    if reason:
        pytest.skip(reason)


def _netns_list() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def start_echo(bed, host, addr=None):
    bed.run(host, [sys.executable, "-c", ECHO, addr or bed.addr(host), str(PORT), host], name="echo")
    bed.wait_for(host, "echo", "echo: ready")


def udp_echo(bed, src, dst_addr, timeout=1.0) -> bytes:
    s = bed.udp_socket(src)
    try:
        s.settimeout(timeout)
        s.sendto(b"ping", (dst_addr, PORT))
        return s.recvfrom(100)[0]
    finally:
        s.close()


def tcp_hello(bed, src, dst_addr, timeout=2.0) -> bytes:
    with bed.connect(src, dst_addr, PORT, timeout=timeout) as c:
        return c.recv(100)


@pytest.fixture(scope="module")
def bed():
    _need_namespaces()
    with TestBed(["a1", "b1", "c1", "log1"]) as b:
        for h in ("a1", "b1", "c1"):
            start_echo(b, h)
        yield b


def test_addresses_are_in_the_private_range(bed):
    import ipaddress

    net = ipaddress.ip_network(SUBNET)
    addrs = [bed.addr(h) for h in bed.names()]
    assert len(set(addrs)) == len(addrs)
    assert all(ipaddress.ip_address(a) in net for a in addrs)
    out = bed.exec("a1", ["ip", "-o", "-4", "addr", "show"]).stdout.decode()
    assert f"inet {bed.addr('a1')}/24" in out
    assert "inet 127.0.0.1/8" in out


def test_hosts_reach_each_other_udp_and_tcp(bed):
    for src in ("a1", "b1", "c1"):
        for dst in ("a1", "b1", "c1"):
            assert udp_echo(bed, src, bed.addr(dst)) == b"ping"
            assert tcp_hello(bed, src, bed.addr(dst)) == b"hello " + dst.encode()


def test_loopback_is_up_inside_each_host(bed):
    code = (
        "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); s.listen();"
        "c=socket.create_connection(s.getsockname(),timeout=2); print('lo ok')"
    )
    for h in bed.names():
        r = bed.exec(h, [sys.executable, "-c", code], timeout=10)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == b"lo ok"


def test_host_names_resolve_inside_the_bed_only(bed):
    code = "import socket,sys; print(socket.gethostbyname(sys.argv[1]))"
    r = bed.exec("a1", [sys.executable, "-c", code, "c1"])
    assert r.stdout.decode().strip() == bed.addr("c1")
    with open("/etc/hosts") as f:
        assert bed.addr("c1") + "\tc1" not in f.read()


def test_processes_run_inside_their_namespace(bed):
    r = bed.exec("b1", ["ip", "netns", "identify", str(os.getpid())])
    assert r.stdout.strip() == b""  # this process: the machine's own namespace
    pid = bed.proc("b1", "echo").pid
    r = bed.exec("a1", ["ip", "netns", "identify", str(pid)])
    assert r.stdout.decode().strip() == bed.ns("b1")


def test_closed_port_is_refused_but_cut_host_is_silent(bed):
    # A live host without a listener refuses at once ...
    t0 = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        bed.connect("a1", bed.addr("b1"), PORT + 1, timeout=2.0)
    assert time.monotonic() - t0 < 1.0
    bed.cut("b1")
    try:
        assert bed.is_cut("b1")
        # ... a cut one says nothing: both ways, UDP and TCP time out.
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            udp_echo(bed, "a1", bed.addr("b1"), timeout=0.5)
        with pytest.raises(TimeoutError):
            tcp_hello(bed, "a1", bed.addr("b1"), timeout=1.0)
        with pytest.raises(TimeoutError):
            bed.connect("a1", bed.addr("b1"), PORT + 1, timeout=1.0)
        with pytest.raises(TimeoutError):
            udp_echo(bed, "b1", bed.addr("c1"), timeout=0.5)
        with pytest.raises(TimeoutError):
            tcp_hello(bed, "b1", bed.addr("a1"), timeout=1.0)
        assert time.monotonic() - t0 >= 3.9
        # A UDP sender on a connected socket gets no ICMP error either.
        s = bed.udp_socket("c1")
        s.connect((bed.addr("b1"), PORT))
        s.settimeout(0.3)
        for _ in range(3):
            s.send(b"x")
            with pytest.raises(TimeoutError):
                s.recv(10)
        s.close()
        # The rest of the network and the cut host's own loopback go on.
        assert udp_echo(bed, "a1", bed.addr("c1")) == b"ping"
        assert tcp_hello(bed, "b1", bed.addr("b1")) == b"hello b1"
    finally:
        bed.restore("b1")
    assert not bed.is_cut("b1")
    assert udp_echo(bed, "a1", bed.addr("b1")) == b"ping"
    assert tcp_hello(bed, "c1", bed.addr("b1")) == b"hello b1"
    assert udp_echo(bed, "b1", bed.addr("c1")) == b"ping"


def test_inside_is_per_thread_and_restores(bed):
    import threading

    before = os.stat("/proc/thread-self/ns/net").st_ino
    errors, seen = [], []

    def work(host):
        try:
            mine = os.stat("/proc/thread-self/ns/net").st_ino
            for _ in range(20):
                with bed.inside(host):
                    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    s.bind((bed.addr(host), 0))  # only possible inside host
                    s.close()
                assert os.stat("/proc/thread-self/ns/net").st_ino == mine
            seen.append(host)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(h,)) for h in ("a1", "b1", "c1", "a1")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert sorted(seen) == ["a1", "a1", "b1", "c1"]
    assert os.stat("/proc/thread-self/ns/net").st_ino == before


def test_kill_and_restart(bed):
    old = bed.proc("c1", "echo").pid
    status = bed.kill("c1", "echo", signal.SIGKILL)
    assert status == -signal.SIGKILL
    with pytest.raises(ConnectionRefusedError):
        tcp_hello(bed, "a1", bed.addr("c1"))
    new = bed.restart("c1", "echo")
    assert new.pid != old
    assert bed.proc("c1", "echo").starts == 2
    bed.wait_port("a1", bed.addr("c1"), PORT, timeout=10)
    assert tcp_hello(bed, "a1", bed.addr("c1")) == b"hello c1"


def test_central_log_names_the_sending_host(bed):
    code = (
        "from pwmail.base.logsetup import setup_logging; import logging;"
        "log = setup_logging('probe'); log.info('testbed probe from %s', 'here');"
        "logging.shutdown()"
    )
    for h in ("a1", "c1"):
        r = bed.exec(h, [sys.executable, "-c", code])
        assert r.returncode == 0, r.stderr
    probe_lines = lambda: [x for x in bed.log_lines() if "testbed probe" in x]  # noqa: E731
    wait_for(lambda: len(probe_lines()) >= 2, 5)
    lines = probe_lines()
    hosts = sorted(line.split()[1] for line in lines)
    assert hosts == ["a1", "c1"]
    assert all(" mail.info probe[" in line for line in lines)


def test_syslog_line_format():
    import datetime

    now = datetime.datetime(2026, 11, 30, 1, 2, 3, 4, tzinfo=datetime.UTC)
    assert (
        format_line(b"<22>pdeliveryd[7]: INFO ok\x00", "store1", now)
        == "2026-11-30T01:02:03.000004Z store1 mail.info pdeliveryd[7]: INFO ok\n"
    )
    assert format_line(b"no pri\nsecond", "x", now).endswith(" x user.notice no pri\\nsecond\n")
    assert format_line(b"<999>odd", "x", now).endswith(" x user.notice odd\n")


def test_teardown_leaves_nothing_even_on_failure():
    _need_namespaces()
    links_before = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    with pytest.raises(RuntimeError, match="boom"):
        with TestBed(["x1", "y1"]) as b:
            start_echo(b, "x1")
            pid = b.proc("x1", "echo").pid
            names = [b.ns("x1"), b.ns("y1"), b.switch]
            workdir = b.workdir
            assert set(names) <= set(_netns_list())
            raise RuntimeError("boom")
    assert not set(names) & set(_netns_list())
    assert not os.path.exists(f"/proc/{pid}")
    assert not workdir.exists()
    links_after = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert len(links_after.splitlines()) == len(links_before.splitlines())


def test_leftovers_of_a_dead_run_are_removed():
    _need_namespaces()
    p = subprocess.Popen(["true"])
    p.wait()  # its pid is now a dead run's
    stale = f"pwtb{p.pid}-zz"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    sleeper = subprocess.Popen(["ip", "netns", "exec", stale, "sleep", "60"])
    try:
        time.sleep(0.2)
        assert stale in cleanup_stale()
        assert stale not in _netns_list()
        assert sleeper.wait(5) == -signal.SIGKILL
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
        if stale in _netns_list():
            subprocess.run(["ip", "netns", "delete", stale])


def test_parallel_beds_do_not_collide():
    _need_namespaces()
    with TestBed(["p1", "q1"]) as one, TestBed(["p1", "q1"]) as two:
        # Same addresses, each on its own bridge: both work side by side.
        assert one.addr("p1") == two.addr("p1")
        assert one.ns("p1") != two.ns("p1")
        start_echo(one, "p1")
        start_echo(two, "p1")
        assert tcp_hello(one, "q1", one.addr("p1")) == b"hello p1"
        assert tcp_hello(two, "q1", two.addr("p1")) == b"hello p1"
        one.cut("p1")
        with pytest.raises(TimeoutError):
            udp_echo(one, "q1", one.addr("p1"), timeout=0.3)
        assert udp_echo(two, "q1", two.addr("p1")) == b"ping"
    left = [n for n in _netns_list() if n.startswith((one.tag + "-", two.tag + "-"))]
    assert left == []


def test_loopback_bed_runs_processes_without_namespaces():
    with LoopbackBed(["s1", "t1"]) as b:
        assert b.addr("s1").startswith("127.77.0.")
        start_echo(b, "s1")
        assert udp_echo(b, "t1", b.addr("s1")) == b"ping"
        assert tcp_hello(b, "t1", b.addr("s1")) == b"hello s1"
        with pytest.raises(NotImplementedError):
            b.cut("s1")
        workdir = b.workdir
    assert not workdir.exists()
