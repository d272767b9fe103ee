"""pwserver's TCP side against hostile clients (issue 13, docs/pwserver.md
"TCP connections"): trickling senders, more connections than the limits from
one and from several addresses, clients that pipeline without reading. A
real pwserver on loopback; other 127.x.y.z addresses stand for other hosts."""

import select
import socket
import struct
import subprocess
import threading
import time

import msgpack
import pytest

from pwcache.tcp_server import TCP_DEFAULTS
from pwmail.base.errors import EX_CONFIG
from tests.support.pwserver_util import (
    OK,
    TcpConn,
    request,
    rss_bytes,
    stats,
    udp_query,
    write_many_users,
    write_sources,
)
from tests.support.pwtest import BIN, PwServer, wait_for

USERS = [(f"user{i:04d}", 10000 + i) for i in range(50)]
FRAME_TIMEOUT = TCP_DEFAULTS["tcp_frame_timeout"]
IDLE_TIMEOUT = TCP_DEFAULTS["tcp_idle_timeout"]
LEGIT_SECONDS = 5.0  # "within a few seconds": an answer takes milliseconds


@pytest.fixture
def sources(tmp_path):
    return write_sources(tmp_path, USERS)


def with_settings(tmp_path, **tcp) -> list[str]:
    conf = tmp_path / "pwmail.toml"
    conf.write_text("[pwserver]\n" + "".join(f"{k} = {v!r}\n" for k, v in tcp.items()))
    return ["--config", str(conf)]


def is_closed(sock: socket.socket) -> bool:
    """Whether the server closed `sock` (EOF or reset waiting to be read)."""
    if not select.select([sock], [], [], 0)[0]:
        return False
    try:
        return sock.recv(1, socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


class Tricklers:
    """Connections that send one byte of a never-ending request frame now and
    then (the attack of the issue: the idle clock restarted on every byte)."""

    HEADER = struct.pack(">I", 1000)  # a frame of 1000 bytes that never comes

    def __init__(self, addr, sources: list[str], interval: float = 1.0):
        self.socks = []
        for src in sources:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((src, 0))
            s.connect(addr)
            self.socks.append(s)
        self.sent = {s: 0 for s in self.socks}
        self.interval = interval
        self._stop = threading.Event()
        self._trickle()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _trickle(self) -> None:
        for s in self.socks:
            try:
                s.send(bytes([self.HEADER[self.sent[s] % 4]]), socket.MSG_DONTWAIT)
                self.sent[s] += 1
            except OSError:
                pass  # closed by the server

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._trickle()

    def open(self) -> int:
        return sum(not is_closed(s) for s in self.socks)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for s in self.socks:
            s.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def legit_ping(server, source: str = "127.0.0.1") -> float:
    """A client that means well: connects, asks, is answered; the seconds it took."""
    t0 = time.monotonic()
    with TcpConn(server.addr, timeout=LEGIT_SECONDS, source=source) as c:
        assert c.query("ping")[2] == OK
    return time.monotonic() - t0


def refused_at_once(server, source: str) -> bool:
    """Whether a connection from `source` is closed by the server without
    an answer, within a few seconds (not left waiting)."""
    with TcpConn(server.addr, timeout=LEGIT_SECONDS, source=source) as c:
        try:
            c.s.sendall(struct.pack(">I", len(request("ping", pad=0))) + request("ping", pad=0))
            return c.s.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True


def test_trickling_from_one_address_leaves_the_port_open(sources):
    # more tricklers than the whole limit (256), from one address: it keeps
    # its share (32), the rest are closed at once; others are answered
    limit, share = TCP_DEFAULTS["tcp_max_connections"], TCP_DEFAULTS["tcp_max_per_source"]
    with PwServer(sources) as server, Tricklers(server.addr, ["127.0.0.2"] * (limit + 4)):
        assert legit_ping(server) < LEGIT_SECONDS
        assert udp_query(server.addr, "passwd", "user0001")[2] == OK
        assert stats(server.addr)["tcp_refused_source"] == limit + 4 - share


def test_trickling_from_several_addresses_leaves_the_port_open(sources):
    # 9 addresses x 32 connections, more than the 256 places: newcomers from
    # addresses holding fewer still get in, in place of the longest-waiting
    # connection of the busiest address
    limit, share = TCP_DEFAULTS["tcp_max_connections"], TCP_DEFAULTS["tcp_max_per_source"]
    addresses = [f"127.0.0.{i}" for i in range(2, 11)]
    with PwServer(sources) as server, Tricklers(server.addr, addresses * share) as tr:
        wait_for(lambda: tr.open() <= limit, timeout=20, describe=lambda: f"{tr.open()} tricklers open")
        for source in ("127.0.0.1", "127.0.1.1"):
            assert legit_ping(server, source) < LEGIT_SECONDS
            assert udp_query(server.addr, "passwd", "user0002")[2] == OK
        counters = stats(server.addr)
        assert counters["tcp_evicted"] >= 1
        assert counters["tcp_evicted"] + counters["tcp_refused_full"] >= len(addresses) * share - limit


def test_limits_close_excess_connections_at_once(sources, tmp_path):
    args = with_settings(tmp_path, tcp_max_connections=4, tcp_max_per_source=3, tcp_frame_timeout=60)
    with PwServer(sources, *args) as server:
        conns = [TcpConn(server.addr, source=src) for src in ("127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.3")]
        try:
            for c in conns:  # all four places taken, in this order
                assert c.query("ping")[2] == OK
            # as busy as the busiest address: no place to free for it
            assert refused_at_once(server, "127.0.0.2")
            # fewer than the busiest: the longest-waiting connection makes room
            with TcpConn(server.addr, timeout=LEGIT_SECONDS, source="127.0.0.4") as newcomer:
                assert newcomer.query("ping")[2] == OK
                wait_for(lambda: is_closed(conns[0].s), timeout=10)
                assert not any(is_closed(c.s) for c in conns[1:])
                assert conns[1].query("ping")[2] == OK
            counters = stats(server.addr)
            assert (counters["tcp_refused_full"], counters["tcp_evicted"], counters["tcp_refused_source"]) == (1, 1, 0)
        finally:
            for c in conns:
                c.close()
    args = with_settings(tmp_path, tcp_max_per_source=2)
    with PwServer(sources, *args) as server:
        with TcpConn(server.addr, source="127.0.0.2"), TcpConn(server.addr, source="127.0.0.2"):
            assert refused_at_once(server, "127.0.0.2")  # its share is 2, places are left
            assert legit_ping(server, "127.0.0.3") < LEGIT_SECONDS
        assert stats(server.addr)["tcp_refused_source"] == 1


@pytest.mark.parametrize("frame_timeout", [None, 2.0])
def test_a_trickler_is_cut_at_the_frame_deadline(sources, tmp_path, frame_timeout):
    args = with_settings(tmp_path, tcp_frame_timeout=frame_timeout) if frame_timeout else []
    deadline = frame_timeout or FRAME_TIMEOUT
    assert deadline < IDLE_TIMEOUT  # else the idle clock could be what cuts it
    with PwServer(sources, *args) as server:
        with Tricklers(server.addr, ["127.0.0.2"], interval=0.3) as tr:
            t0 = time.monotonic()
            cut = wait_for(lambda: tr.open() == 0 and time.monotonic(), timeout=deadline + IDLE_TIMEOUT + 5)
            assert deadline * 0.9 <= cut - t0 <= deadline + 5
            assert tr.sent[tr.socks[0]] >= deadline / 0.3 * 0.5  # it kept trickling meanwhile
        assert stats(server.addr)["tcp_frame_timeouts"] == 1


def test_the_frame_clock_is_per_frame(sources, tmp_path):
    # a frame sent in two pieces within the deadline is answered; frames one
    # after another on one connection each get their own deadline
    args = with_settings(tmp_path, tcp_frame_timeout=1.5, tcp_idle_timeout=30)
    with PwServer(sources, *args) as server, TcpConn(server.addr) as c:
        t0 = time.monotonic()
        for i in range(4):
            packet = struct.pack(">I", len(request("ping", rid=i, pad=0))) + request("ping", rid=i, pad=0)
            c.s.sendall(packet[:5])
            time.sleep(0.5)
            c.s.sendall(packet[5:])
            head = c.recv_exact(4)
            assert msgpack.unpackb(c.recv_exact(struct.unpack(">I", head)[0]))[:3] == [1, i, OK]
            time.sleep(0.5)
        assert time.monotonic() - t0 > 1.5 * 2  # longer than a frame may take


def test_non_reading_pipeliners_keep_memory_bounded(tmp_path):
    # 100 clients pipeline enumeration requests and never read: each one's
    # queued answers stop at tcp_max_queued (plus one page), and they are
    # closed once they have taken nothing for tcp_idle_timeout
    paths = write_many_users(tmp_path, 3000)
    clients, requests_each = 100, 200
    addresses = [f"127.0.0.{2 + i % 4}" for i in range(clients)]  # 25 an address, within the share
    with PwServer(paths) as server:
        with TcpConn(server.addr) as c:  # touch what one enumeration needs, then measure
            page = c.exchange(request("passwd_enum", 0, pad=0))
        assert msgpack.unpackb(page)[2] == OK
        before = rss_bytes(server.proc.pid)
        frames = struct.pack(">I", len(request("passwd_enum", 0, pad=0))) + request("passwd_enum", 0, pad=0)
        socks = []
        try:
            for src in addresses:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # reads nothing, holds little
                s.bind((src, 0))
                s.connect(server.addr)
                s.sendall(frames * requests_each)
                socks.append(s)
            peak = [0]

            def rss() -> int:
                peak[0] = max(peak[0], rss_bytes(server.proc.pid))
                return peak[0]

            # until the server stops answering them (each STATS counts itself)
            last = [-1]

            def settled() -> bool:
                rss()
                n = stats(server.addr)["tcp_requests"]
                done, last[0] = n == last[0] + 1, n
                return done

            bound = clients * (TCP_DEFAULTS["tcp_max_queued"] + 2 * len(page)) + 32 * 2**20

            def check_peak() -> None:
                assert peak[0] - before < bound, f"grew {(peak[0] - before) >> 20} MiB, bound {bound >> 20} MiB"

            wait_for(settled, timeout=60, step=1.0)
            check_peak()
            assert udp_query(server.addr, "passwd", "auser0000000")[2] == OK
            assert legit_ping(server) < LEGIT_SECONDS
            wait_for(
                lambda: rss() and stats(server.addr)["tcp_send_timeouts"] == clients,
                timeout=IDLE_TIMEOUT + 30,
                step=0.5,
            )
            check_peak()
        finally:
            for s in socks:
                s.close()


@pytest.mark.parametrize(
    "toml",
    [
        "tcp_max_per_source = 0",
        "tcp_max_per_source = 300",
        'tcp_max_connections = "many"',
        "tcp_frame_timeout = 0",
        "tcp_idle_timeout = -1",
        "tcp_max_queued = -1",
    ],
)
def test_bad_tcp_settings_exit_ex_config(sources, tmp_path, toml):
    conf = tmp_path / "pwmail.toml"
    conf.write_text(f"[pwserver]\n{toml}\n")
    run = subprocess.run(
        [str(BIN / "pwserver"), "--config", str(conf), "--passwd", str(sources["passwd"]), "--listen", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == EX_CONFIG and "tcp_" in run.stderr
