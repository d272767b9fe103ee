"""pwserver end to end: a real process on loopback, raw UDP and TCP packets."""

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import msgpack
import pytest

from pwmail.base.errors import EX_CONFIG
from tests.support.pwserver_util import (
    BADREQUEST,
    BADVERSION,
    DENIED,
    KEY_NETWORK,
    KEY_SHADOW,
    NOTFOUND,
    OK,
    TRUNCATED,
    TcpConn,
    passwd_line,
    request,
    seal,
    stats,
    udp_exchange,
    udp_query,
    unseal,
    write_sources,
)
from tests.support.pwtest import BIN, PwServer, wait_for, write_key

USERS = [(f"user{i:04d}", 10000 + i) for i in range(200)]
BIG = [f"member{i:05d}" for i in range(50_000)]
GROUPS = [("staff", 50, ["user0000", "user0001"]), ("dev", 51, ["user0001", "ghost"]), ("biggroup", 29999, BIG)]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    paths = write_sources(d, USERS, GROUPS, mailhosts={"user0000": "store9"})
    with open(paths["passwd"], "a") as f:
        f.write(passwd_line("longgecos", 9999, gecos="G" * 200))
    return d, paths


@pytest.fixture(scope="module")
def keys(sources):
    d, _ = sources
    return {
        "shadow": (d / "shadow.key", write_key(d / "shadow.key")),
        "network": (d / "network.key", write_key(d / "network.key")),
    }


@pytest.fixture(scope="module")
def server(sources, keys):
    _, paths = sources
    with PwServer(paths, "--shadow-key", str(keys["shadow"][0]), "--config", str(sources[0] / "pwmail.toml")) as s:
        yield s


def test_ready_line_counts_users(server):
    assert server.users == len(USERS) + 1
    assert server.port > 0


def test_every_lookup_over_udp(server):
    a = server.addr
    assert udp_query(a, "passwd", "user0007")[2:] == [
        OK,
        ["user0007", "x", 10007, 100, "", "/home/user0007", "/bin/sh", ""],
    ]
    assert udp_query(a, "uid", 10007)[3][0] == "user0007"
    assert udp_query(a, "group", "staff")[2:] == [OK, ["staff", "x", 50, ["user0000", "user0001"]]]
    assert udp_query(a, "gid", 51)[3] == ["dev", "x", 51, ["user0001", "ghost"]]
    assert sorted(udp_query(a, "initgroups", "user0001")[3]) == [50, 51]
    assert udp_query(a, "initgroups", "ghost")[2:] == [OK, [51]]
    assert udp_query(a, "initgroups", "user0100")[2:] == [OK, []]
    assert udp_query(a, "mailhost", "user0000")[2:] == [OK, ["store9", False]]
    assert udp_query(a, "passwd", "user0000")[3][7] == "store9"
    assert udp_query(a, "ping")[3] == ["pwserver 0.1.0", 1, len(USERS) + 1]
    for op, arg in (
        ("passwd", "nobody"),
        ("uid", 5),
        ("group", "nogroup"),
        ("gid", 7),
        ("initgroups", "nobody"),
        ("mailhost", "nobody"),
        ("passwd", "ghost"),
    ):
        assert udp_query(a, op, arg)[2:] == [NOTFOUND, None], (op, arg)


def test_big_group_truncated_over_udp_then_whole_over_tcp(server):
    assert udp_query(server.addr, "group", "biggroup")[2:] == [TRUNCATED, None]
    assert udp_query(server.addr, "gid", 29999)[2] == TRUNCATED
    with TcpConn(server.addr) as c:
        status, rec = c.query("group", "biggroup")[2:]
        assert status == OK and rec[3] == BIG
        # many requests on one connection, in order
        for name, uid in USERS[:20]:
            assert c.query("passwd", name)[3][2] == uid


def test_enumeration_pages_over_tcp_only(server):
    assert udp_query(server.addr, "passwd_enum", 0)[2] == TRUNCATED
    names, index = [], 0
    with TcpConn(server.addr) as c:
        while index is not None:
            status, (index, page) = c.query("passwd_enum", index)[2:]
            assert status == OK and len(page) <= 1000
            names += [r[0] for r in page]
        assert c.query("shadow_enum", 0)[2] == DENIED
        status, (nxt, groups) = c.query("group_enum", 0)[2:]
    assert names == [n for n, _ in USERS] + ["longgecos"]
    assert nxt is None and [g[0] for g in groups] == ["staff", "dev", "biggroup"]


def test_amplification_rule_for_plain_udp(server):
    # an unpadded request is small: its answer may be at most 3 times bigger
    small = request("passwd", "longgecos", pad=0)
    answer = msgpack.unpackb(udp_exchange(server.addr, small))
    assert answer[2] == TRUNCATED
    assert len(msgpack.packb(answer)) <= 3 * len(small)
    assert udp_query(server.addr, "passwd", "longgecos", pad=256)[2] == OK


def test_shadow_only_with_the_shadow_key(server, keys):
    assert udp_query(server.addr, "shadow", "user0002")[2:] == [DENIED, None]
    key = keys["shadow"][1]
    for transport in ("udp", "tcp"):
        packet = seal(key, KEY_SHADOW, request("shadow", "user0002", rid=99, pad=0))
        if transport == "udp":
            raw = udp_exchange(server.addr, packet)
        else:
            with TcpConn(server.addr) as c:
                raw = c.exchange(packet)
        assert raw[:2] == bytes([0xC1, KEY_SHADOW])  # sealed with the request's key
        answer = msgpack.unpackb(unseal(key, raw))
        assert answer == [1, 99, OK, ["user0002", "$6$salt$user0002hash", 19000, 0, 99999, 7, -1, -1, -1]]
    # sealed with the shadow key, passwd works too (and is sealed)
    raw = udp_exchange(server.addr, seal(key, KEY_SHADOW, request("passwd", "user0002", rid=5, pad=0)))
    assert msgpack.unpackb(unseal(key, raw))[2] == OK
    # a wrong key, or the network key this server does not have: dropped
    before = stats(server.addr)["bad_seal"]
    assert udp_exchange(server.addr, seal(bytes(32), KEY_SHADOW, request("shadow", "user0002")), timeout=0.5) is None
    assert udp_exchange(server.addr, seal(key, KEY_NETWORK, request("shadow", "user0002")), timeout=0.5) is None
    assert stats(server.addr)["bad_seal"] == before + 2


def test_passwd_answers_never_hold_a_hash(server):
    assert udp_query(server.addr, "passwd", "user0004")[3][1] == "x"


@pytest.mark.parametrize(
    "packet, counter",
    [
        (b"", "bad_packet"),
        (b"\xff\xfe garbage", "bad_packet"),
        (b"\x94", "bad_packet"),  # truncated msgpack
        (msgpack.packb([1]), "bad_packet"),
        (bytes(2000), "oversize"),
        (b"\xc1\x01" + bytes(60), "bad_seal"),
    ],
)
def test_dropped_packets_are_counted(server, packet, counter):
    before = stats(server.addr)[counter]
    assert udp_exchange(server.addr, packet, timeout=0.3) is None
    assert stats(server.addr)[counter] == before + 1


@pytest.mark.parametrize(
    "packet, status",
    [
        (msgpack.packb([2, 7, 1, "user0001", bytes(100)]), BADVERSION),
        (msgpack.packb([1, 7, 99, "x", bytes(100)]), BADREQUEST),  # unknown op
        (msgpack.packb([1, 7, 1, 5, bytes(100)]), BADREQUEST),  # int for a name
        (msgpack.packb([1, 7, 1, "a:b", bytes(100)]), BADREQUEST),
        (b"\x95\x01\x07\x01\xa2\xc3\x28\xc4\x64" + bytes(100), BADREQUEST),  # bad UTF-8
        (msgpack.packb([1, 7, 1, "x" * 256, bytes(100)]), BADREQUEST),  # name too long
        (msgpack.packb([1, 7, 2, 2**32 - 1, bytes(100)]), BADREQUEST),  # uid out of range
    ],
)
def test_bad_requests_get_an_error_answer(server, packet, status):
    counter = "bad_version" if status == BADVERSION else "bad_request"
    before = stats(server.addr)[counter]
    answer = msgpack.unpackb(udp_exchange(server.addr, packet))
    assert answer[:3] == [1, 7, status]
    assert answer[3] == (1 if status == BADVERSION else None)
    assert stats(server.addr)[counter] == before + 1


def test_stats_counts_and_table_figures(server):
    s = stats(server.addr)
    assert s["users"] == len(USERS) + 1 and s["groups"] == 3 and s["generation"] >= 1
    assert s["requests"] >= s["ok"] > 0 and s["notfound"] > 0
    assert all(isinstance(k, str) and isinstance(v, int) for k, v in s.items())


def test_network_key_drops_everything_unsealed(sources, keys, tmp_path):
    _, paths = sources
    nkey = keys["network"][1]
    skey = keys["shadow"][1]
    with PwServer(paths, "--network-key", str(keys["network"][0]), "--shadow-key", str(keys["shadow"][0])) as s:
        assert udp_exchange(s.addr, request("passwd", "user0001"), timeout=0.5) is None
        raw = udp_exchange(s.addr, seal(nkey, KEY_NETWORK, request("passwd", "user0001", rid=3, pad=0)))
        assert raw[1] == KEY_NETWORK
        assert msgpack.unpackb(unseal(nkey, raw))[2:] == [
            OK,
            ["user0001", "x", 10001, 100, "", "/home/user0001", "/bin/sh", ""],
        ]
        # the network key does not open shadow
        raw = udp_exchange(s.addr, seal(nkey, KEY_NETWORK, request("shadow", "user0001", rid=4, pad=0)))
        assert msgpack.unpackb(unseal(nkey, raw))[2] == DENIED
        raw = udp_exchange(s.addr, seal(skey, KEY_SHADOW, request("shadow", "user0001", rid=4, pad=0)))
        assert msgpack.unpackb(unseal(skey, raw))[2] == OK
        with TcpConn(s.addr) as c:  # TCP too
            assert c.exchange(request("ping", pad=0)) is None
        with TcpConn(s.addr) as c:
            st = msgpack.unpackb(unseal(nkey, c.exchange(seal(nkey, KEY_NETWORK, request("stats", pad=0)))))[3]
        assert st["unsealed"] == 2


def test_allowlist_drops_other_sources(sources):
    _, paths = sources
    with PwServer(paths, "--allow", "127.0.0.2/32") as s:
        assert udp_exchange(s.addr, request("ping"), timeout=0.5, source="127.0.0.1") is None
        assert msgpack.unpackb(udp_exchange(s.addr, request("ping"), source="127.0.0.2"))[2] == OK
        with pytest.raises((ConnectionError, OSError)):
            with TcpConn(s.addr) as c:  # closed at once
                assert c.exchange(request("ping")) is None
                raise ConnectionError
        import socket

        with socket.create_connection(s.addr, source_address=("127.0.0.2", 0)) as t:
            packet = request("stats", pad=0)
            t.sendall(len(packet).to_bytes(4, "big") + packet)
            time.sleep(0.2)
            data = t.recv(65536)
            st = msgpack.unpackb(data[4:])[3]
        assert st["not_allowed_source"] == 2


def test_reload_on_sighup_and_on_change(tmp_path):
    paths = write_sources(tmp_path, USERS[:10])
    with PwServer(paths) as s:
        assert udp_query(s.addr, "passwd", "newbie")[2] == NOTFOUND
        new = tmp_path / "passwd.new"
        new.write_text(paths["passwd"].read_text() + "newbie:x:5000:100::/home/newbie:/bin/sh\n")
        new.rename(paths["passwd"])  # the poll notices the new inode
        wait_for(lambda: udp_query(s.addr, "passwd", "newbie")[2] == OK)
        assert udp_query(s.addr, "ping")[3][1] == 2
        s.signal(signal.SIGHUP)
        wait_for(lambda: udp_query(s.addr, "ping")[3][1] == 3)
        # a source that vanished: the old table stays
        paths["passwd"].unlink()
        s.signal(signal.SIGHUP)
        wait_for(lambda: "reload failed" in s.output())
        assert udp_query(s.addr, "passwd", "newbie")[2] == OK
        assert s.stop() == 0


def test_settings_file_and_placement(tmp_path):
    paths = write_sources(tmp_path, [("alice", 1), ("dave", 2), ("zoe", 3)], mailhosts={"zoe": "special"})
    conf = tmp_path / "pwmail.toml"
    conf.write_text('[pwserver]\nthreads = 1\n[placement]\nrule = "ranges"\nranges = ["a-c s1", "d-f s2"]\n')
    with PwServer(paths, "--config", str(conf)) as s:
        assert udp_query(s.addr, "mailhost", "alice")[3] == ["s1", False]
        assert udp_query(s.addr, "mailhost", "dave")[3] == ["s2", False]
        assert udp_query(s.addr, "mailhost", "zoe")[3] == ["special", False]


def test_sigint_stops_cleanly(tmp_path):
    paths = write_sources(tmp_path, USERS[:3])
    s = PwServer(paths)
    s.signal(signal.SIGINT)
    assert s.proc.wait(15) == 0
    assert "stopping" in s.output()


def test_cli_help_and_errors(tmp_path):
    out = subprocess.run([str(BIN / "pwserver"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for flag in ("--listen", "--passwd", "--shadow-key", "--network-key", "--allow", "--threads", "--config"):
        assert flag in out.stdout
    bad = subprocess.run(
        [str(BIN / "pwserver"), "--passwd", str(tmp_path / "missing"), "--listen", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 1 and "missing" in bad.stderr
    nopw = subprocess.run(
        [str(BIN / "pwserver")],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PWMAIL_CONF": "/nonexistent", "PATH": "/usr/bin:/bin"},
    )
    assert nopw.returncode == EX_CONFIG and "passwd" in nopw.stderr


def test_tcp_pipelined_big_answers_are_paced(server):
    # 40 requests for a ~600 kB answer in one write: answered in order,
    # while the server holds at most a few MB of output for the connection
    import socket
    import struct

    packet = request("group", "biggroup", rid=1, pad=0)
    with socket.create_connection(server.addr, timeout=20) as t:
        t.sendall((struct.pack(">I", len(packet)) + packet) * 40)
        for _ in range(40):
            head = b""
            while len(head) < 4:
                head += t.recv(4 - len(head))
            n = struct.unpack(">I", head)[0]
            body = bytearray()
            while len(body) < n:
                body += t.recv(min(1 << 20, n - len(body)))
            answer = msgpack.unpackb(bytes(body))
            assert answer[2] == OK and len(answer[3][3]) == len(BIG)


@pytest.mark.slow
def test_tcp_idle_connection_is_closed(server):
    import socket

    with socket.create_connection(server.addr, timeout=30) as t:
        t0 = time.monotonic()
        assert t.recv(10) == b""  # closed by the server
        assert 9 < time.monotonic() - t0 < 20


WILDCARD_CHECK = r"""
import socket, sys
sys.path.insert(0, sys.argv[1])
import msgpack
from tests.support.pwserver_util import request, write_sources
from tests.support.pwtest import PwServer
import pathlib, tempfile
d = pathlib.Path(tempfile.mkdtemp())
paths = write_sources(d, [("alice", 1000)])
for listen in ("0.0.0.0:0", "[::]:0"):  # IPv4, and IPv6 with IPv4 mapped
    with PwServer(paths, "--allow", "127.0.0.0/8", "--allow", "::1/128", listen=listen) as s:
        for family, src_addr, dst in ((socket.AF_INET, "127.0.0.1", "127.0.0.2"),
                                      (socket.AF_INET, "127.0.0.1", "127.0.0.3"),
                                      (socket.AF_INET6, "::1", "::1")):
            if family == socket.AF_INET6 and listen.startswith("0"):
                continue
            with socket.socket(family, socket.SOCK_DGRAM) as u:
                u.bind((src_addr, 0))
                u.settimeout(5)
                u.sendto(request("passwd", "alice"), (dst, s.port))
                data, src = u.recvfrom(9000)
                assert src[:2] == (dst, s.port), (listen, src, dst)
                assert msgpack.unpackb(data)[3][0] == "alice"
print("ok")
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root for a network namespace")
def test_answers_leave_from_the_address_asked(tmp_path):
    # a wildcard listener, inside a private network namespace (loopback only)
    script = tmp_path / "check.py"
    script.write_text(WILDCARD_CHECK)
    run = subprocess.run(
        [
            "unshare",
            "-n",
            "sh",
            "-c",
            f"ip link set lo up && {sys.executable} {script} {pathlib.Path(__file__).parents[2]}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.stdout.strip() == "ok", run.stderr[-2000:]


@pytest.mark.parametrize(
    "toml",
    [
        '[pwserver]\nthreads = "many"\n',
        "[pwserver]\nthreads = 0\n",
        "[pwserver]\nnosuchkey = 1\n",
        '[placement]\nrule = "nearest"\n',
        '[pwserver]\nallow = "10.0.0.0/8"\n',
        "not toml [",
        "[pwserver]\nbusy_poll_us = -1\n",
        "[pwserver]\nbusy_poll_us = 10001\n",
        '[pwserver]\nbusy_poll_us = "fast"\n',
    ],
)
def test_bad_settings_exit_ex_config(tmp_path, toml):
    paths = write_sources(tmp_path, USERS[:2])
    conf = tmp_path / "pwmail.toml"
    conf.write_text(toml)
    run = subprocess.run(
        [str(BIN / "pwserver"), "--config", str(conf), "--passwd", str(paths["passwd"]), "--listen", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == EX_CONFIG and any(line.startswith("pwserver: ") for line in run.stderr.splitlines())
