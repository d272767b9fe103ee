"""The Python client and pwquery against a real pwserver on loopback."""

import asyncio
import socket
import subprocess
import sys
import time

import pytest

from pwcache.client import AsyncClient, Client, Denied, Unavailable
from pwcache.keys import write_key
from tests.support.pwtest import BIN, PwServer, free_port, gen_users


@pytest.fixture(scope="module")
def users(tmp_path_factory):
    d = gen_users(tmp_path_factory.mktemp("users"), 300, hosts="store1,store2,store3")
    # one big group, too big for a UDP answer: the client must go to TCP
    names = [line.split(":")[0] for line in (d / "passwd").read_text().splitlines()]
    big = ",".join(f"member{i:05d}" for i in range(50_000))
    with open(d / "group", "a") as f:
        f.write(f"biggroup:x:29999:{big}\n")
        f.write(f"smallgroup:x:29998:{names[0]},{names[1]}\n")
    write_key(str(d / "shadow.key"))
    return d


@pytest.fixture(scope="module")
def server(users):
    with PwServer(users, shadow_key=str(users / "shadow.key")) as s:
        yield s


def source(users, name):
    return {
        line.split(":")[0]: line.split(":")
        for line in (users / name).read_text().splitlines()
        if line and not line.startswith("#")
    }


def test_every_operation_matches_the_source_files(server, users):
    passwd, shadow, group = source(users, "passwd"), source(users, "shadow"), source(users, "group")
    mailhosts = dict(
        line.split() for line in (users / "mailhosts").read_text().splitlines() if not line.startswith("#")
    )
    with Client([server.address], shadow_keyfile=str(users / "shadow.key")) as c:
        for name in list(passwd)[:60]:
            e = c.passwd_by_name(name)
            assert e.getent_line() == ":".join(passwd[name])
            assert e.mailhost == mailhosts[name]
            assert c.passwd_by_uid(e.uid) == e
            assert c.mailhost(name) == (mailhosts[name], False)
            assert c.shadow_by_name(name).getent_line() == ":".join(shadow[name])
            expect = sorted(int(g[2]) for g in group.values() if name in g[3].split(","))
            assert sorted(c.initgroups(name)) == expect
        for gname in list(group)[:20]:
            g = c.group_by_name(gname)
            assert g.getent_line() == ":".join(group[gname])
            assert c.group_by_gid(g.gid) == g


def test_not_found_is_not_unavailable(server):
    with server.client() as c:
        assert c.passwd_by_name("nosuchuser") is None
        assert c.passwd_by_uid(4_000_000) is None
        assert c.group_by_name("nosuchgroup") is None
        assert c.mailhost("nosuchuser") is None
    with Client([f"127.0.0.1:{free_port()}"], timeout_ms=200) as dead:
        with pytest.raises(Unavailable):
            dead.passwd_by_name("root")


def test_big_group_comes_over_tcp(server):
    with server.client() as c:
        g = c.group_by_name("biggroup")
        assert len(g.members) == 50_000 and g.members[-1] == "member49999"


def test_shadow_needs_the_shadow_key(server, users):
    name = next(iter(source(users, "passwd")))
    with server.client() as c:
        with pytest.raises(Denied):
            c.shadow_by_name(name)
    wrong = users / "wrong.key"
    if not wrong.exists():
        write_key(str(wrong))
    with server.client(shadow_keyfile=str(wrong), timeout_ms=300) as c:
        with pytest.raises(Unavailable):  # a packet that does not authenticate is dropped
            c.shadow_by_name(name)


def test_async_client_many_queries_at_once(server, users):
    names = list(source(users, "passwd"))

    async def run():
        async with AsyncClient([server.address]) as ac:
            got = await asyncio.gather(*(ac.passwd_by_name(n) for n in names))
            missing = await ac.passwd_by_name("nosuchuser")
            big = await ac.group_by_name("biggroup")
            return got, missing, big

    got, missing, big = asyncio.run(run())
    assert [e.name for e in got] == names
    assert missing is None
    assert len(big.members) == 50_000


class SilentServer:
    """A UDP socket that reads and never answers: a primary whose packets
    are dropped (not refused)."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"

    def received(self) -> int:
        self.sock.setblocking(False)
        n = 0
        while True:
            try:
                self.sock.recv(2048)
                n += 1
            except BlockingIOError:
                return n

    def close(self):
        self.sock.close()


def test_hedged_failover_costs_one_delay_then_nothing(server, tmp_path):
    silent = SilentServer()
    health = str(tmp_path / "health")
    try:
        with Client(
            [silent.address, server.address], timeout_ms=2000, hedge_ms=50, health_file=health, recheck_s=30
        ) as c:
            t0 = time.monotonic()
            assert c.ping()
            first = time.monotonic() - t0
            assert 0.05 <= first < 1.0  # the hedge delay, never the 2 s timeout
        assert "down " + silent.address in open(health).read()
        # another process, sharing only the health file, goes straight to the live server
        code = (
            "import time; from pwcache.client import Client\n"
            f"c = Client([{silent.address!r}, {server.address!r}], health_file={health!r}, hedge_ms=1000)\n"
            "t = time.monotonic(); c.ping(); print(time.monotonic() - t)"
        )
        seen_before = silent.received()
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert float(out.stdout) < 0.5  # hedge_ms is 1 s: it never waited for the dead server
        assert silent.received() == 0, seen_before
    finally:
        silent.close()


def test_both_servers_down_is_unavailable_within_the_timeout(tmp_path):
    a, b = SilentServer(), SilentServer()
    try:
        with Client([a.address, b.address], timeout_ms=300, hedge_ms=50, health_file=str(tmp_path / "h")) as c:
            t0 = time.monotonic()
            with pytest.raises(Unavailable):
                c.passwd_by_name("root")
            assert time.monotonic() - t0 < 0.3 + 0.05 + 0.3
    finally:
        a.close()
        b.close()


def test_forged_answers_are_ignored():
    """An answer with the right id from the wrong address, garbage or a wrong
    id from the right one: none becomes a result; the real answer does."""
    import threading

    import msgpack

    silent, other = SilentServer(), SilentServer()

    def serve():
        silent.sock.settimeout(5)
        data, client = silent.sock.recvfrom(2048)
        rid = msgpack.unpackb(data)[1]
        ok = msgpack.packb([1, rid, 0, ["v", 1, 2]])
        other.sock.sendto(msgpack.packb([1, rid, 0, ["forged", 1, 2]]), client)  # wrong source
        silent.sock.sendto(b"\x94garbage", client)
        silent.sock.sendto(msgpack.packb([1, rid ^ 1, 0, ["wrongid", 1, 2]]), client)
        silent.sock.sendto(msgpack.packb([1, rid, 0]), client)  # malformed
        time.sleep(0.05)
        silent.sock.sendto(ok, client)

    t = threading.Thread(target=serve)
    t.start()
    try:
        with Client([silent.address], timeout_ms=2000, hedge_ms=2000) as c:
            assert c.ping() == ["v", 1, 2]
    finally:
        t.join()
        silent.close()
        other.close()


def pwquery(*args, **kw):
    return subprocess.run([str(BIN / "pwquery"), *args], capture_output=True, text=True, **kw)


def test_pwquery_formats_and_exit_codes(server, users):
    name, line = next(iter(source(users, "passwd").items()))
    r = pwquery("--server", server.address, "passwd", name)
    assert r.returncode == 0 and r.stdout.strip() == ":".join(line)
    r = pwquery("--server", server.address, "passwd", line[2])
    assert r.returncode == 0 and r.stdout.strip() == ":".join(line)
    assert pwquery("--server", server.address, "passwd", "nosuchuser").returncode == 2
    assert pwquery("--server", server.address, "group", "smallgroup").stdout.strip().startswith("smallgroup:x:29998:")
    r = pwquery("--server", server.address, "mailhost", name)
    assert r.returncode == 0 and r.stdout.split()[1] in ("store1", "store2", "store3")
    assert pwquery("--server", server.address, "shadow", name).returncode == 77
    r = pwquery("--server", server.address, "--shadow-key", str(users / "shadow.key"), "shadow", name)
    assert r.returncode == 0 and r.stdout.startswith(name + ":$")
    r = pwquery("--server", server.address, "initgroups", name)
    assert r.returncode == 0 and r.stdout.split()[0] == name
    r = pwquery("--server", server.address, "stats")
    assert r.returncode == 0 and "users" in r.stdout
    dead = f"127.0.0.1:{free_port()}"
    assert pwquery("--server", dead, "--timeout-ms", "200", "passwd", "x").returncode == 75
    assert pwquery("passwd").returncode == 64
