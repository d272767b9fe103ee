"""Fuzzing the server's decoder and answer path: any packet is dropped or
answered with a well-formed answer, within the size rules, never a crash."""

import random
import socket
import struct

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pwcache.server import ServerCore
from pwcache.table import Table
from tests.support.pwserver_util import OK, TcpConn, request, seal, udp_query, write_sources
from tests.support.pwtest import PwServer

KEY = bytes(range(32))
PASSWD = "".join(f"u{i}:x:{i}:1:gecos {i}:/home/u{i}:/bin/sh\n" for i in range(50)).encode()
GROUP = b"g:x:1:" + b",".join(b"u%d" % i for i in range(50)) + b"\n"


@pytest.fixture(scope="module")
def core():
    with ServerCore() as c:
        c.set_keys(None, KEY)
        c.install(Table.from_bytes(PASSWD, group=GROUP), 0)
        udp, tcp = c.answerer(tcp=False), c.answerer(tcp=True)
        yield c, udp, tcp
        udp.close()
        tcp.close()


def check_answer(packet: bytes, answer: bytes | None, tcp: bool) -> None:
    if answer is None:
        return
    sealed = answer[0] == 0xC1
    if not tcp:
        assert len(answer) <= 8192
        if not sealed:
            assert len(answer) <= 3 * len(packet)
    if sealed:
        return
    version, rid, status, payload = msgpack.unpackb(answer)
    assert version == 1 and 0 <= status <= 6 and isinstance(rid, int)


valid_ops = st.builds(
    lambda op, arg, rid: request(op, arg, rid=rid),
    st.integers(0, 14),
    st.one_of(st.none(), st.integers(-5, 2**33), st.text(max_size=20), st.binary(max_size=10)),
    st.integers(0, 2**64 - 1),
)


def mutate(data: bytes, cuts: list[int]) -> bytes:
    b = bytearray(data)
    for c in cuts:
        if b:
            b[c % len(b)] ^= 1 << (c % 8)
    return bytes(b)


packets = st.one_of(
    st.binary(max_size=1100),
    valid_ops,
    st.builds(lambda p, n: p[:n], valid_ops, st.integers(0, 300)),  # truncated
    st.builds(mutate, valid_ops, st.lists(st.integers(0, 10_000), max_size=4)),  # bit flips
    st.builds(
        lambda obj: msgpack.packb(obj),
        st.recursive(
            st.one_of(
                st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.text(max_size=8), st.binary(max_size=8)
            ),
            lambda inner: st.lists(inner, max_size=6),
            max_leaves=12,
        ),
    ),
    st.builds(lambda p: seal(KEY, 2, p), valid_ops),
    st.builds(lambda p: b"\xc1" + p, st.binary(max_size=80)),
)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(packets)
def test_any_packet_is_dropped_or_answered(core, packet):
    _, udp, tcp = core
    check_answer(packet, udp.answer(packet), tcp=False)
    check_answer(packet, tcp.answer(packet), tcp=True)


def test_counts_add_up(core):
    c, udp, _ = core
    before = c.counters()
    udp.answer(b"garbage")
    udp.answer(request("passwd", "u1"))
    after = c.counters()
    assert after["requests"] == before["requests"] + 2
    assert after["bad_packet"] == before["bad_packet"] + 1
    assert after["ok"] == before["ok"] + 1


def test_live_server_survives_garbage(tmp_path):
    paths = write_sources(tmp_path, [(f"u{i}", i) for i in range(20)])
    rnd = random.Random(7)
    with PwServer(paths) as s:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            for i in range(3000):
                kind = i % 3
                if kind == 0:
                    p = rnd.randbytes(rnd.randrange(0, 1500))
                else:
                    p = request(rnd.randrange(0, 14), rnd.choice([None, "u1", 3, "é", ""]))
                    p = p[: rnd.randrange(1, len(p) + 1)] if kind == 1 else mutate(p, [rnd.randrange(10_000)])
                u.sendto(p, s.addr)
        for _ in range(50):  # TCP: random frames, bad lengths, half frames
            with socket.create_connection(s.addr) as t:
                n = rnd.choice([0, 3, 2000, 2**31, rnd.randrange(0, 100)])
                try:
                    t.sendall(struct.pack(">I", n) + rnd.randbytes(rnd.randrange(0, 200)))
                except OSError:
                    pass
        assert udp_query(s.addr, "passwd", "u3")[2] == OK
        with TcpConn(s.addr) as c:
            assert c.query("passwd", "u4")[2] == OK
        assert s.proc.poll() is None
        assert s.stop() == 0
