"""libnss_pwserver.so.2 inside hostile or busy programs: 16 threads and
forked children at once, valgrind memcheck, and a fuzz test of the reply
parser (garbage, truncated, wrong id, wrong source) run in a child process
so that a crash would show as its exit status."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import sys

import msgpack
import pytest

from tests.support import nss_util as u
from tests.support.pwtest import client_conf


@pytest.fixture(scope="module", autouse=True)
def lib():
    return u.build_module()


# ---- threads and fork --------------------------------------------------------------

THREADS_AND_FORK = f"""
import os, random, sys, threading
sys.path.insert(0, {str(u.ROOT)!r})
from tests.support import nss_util as u
nss = u.ffi.dlopen(str(u.LIB))
users = u.parse_passwd(u.PASSWD)
groups = [g for g in u.parse_group(u.GROUP) if g[0] != "pwbig"]
errors = []

def check(rng):
    r = rng.choice(users)
    kind = rng.choice(["passwd", "uid", "group", "gid"])
    if kind in ("passwd", "uid"):
        got = u.lookup(nss, kind, r[0] if kind == "passwd" else str(r[2]))
        return got == [1, 0, r]
    g = rng.choice(groups)
    got = u.lookup(nss, kind, g[0] if kind == "group" else str(g[2]))
    return got == [1, 0, g]

def worker(seed):
    rng = random.Random(seed)
    for _ in range(150):
        if not check(rng):
            errors.append(seed)

threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
for t in threads:
    t.start()
children = []
for i in range(8):
    pid = os.fork()
    if pid == 0:
        rng = random.Random(1000 + i)
        ok = all(check(rng) for _ in range(20))
        os._exit(0 if ok else 1)
    children.append(pid)
for t in threads:
    t.join()
bad_children = [pid for pid in children if os.waitpid(pid, 0)[1] != 0]
print(len(errors), len(bad_children))
"""


def test_sixteen_threads_and_forked_children(tmp_path):
    with u.FakePwServer(u.PASSWD, u.GROUP, u.SHADOW) as server:
        conf = client_conf(tmp_path / "pwserver.conf", [server.address])
        r = subprocess.run(
            [sys.executable, "-c", THREADS_AND_FORK],
            env=u.module_env(conf),
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.split() == ["0", "0"]
        assert server.answered >= 16 * 150 + 8 * 20


def test_descriptors_cached_per_thread_closed_at_exit_and_checked(tmp_path):
    """Each thread keeps one connected socket per server (close-on-exec),
    closed when the thread exits. A program that closes that descriptor and
    reuses its number is never written to: the module checks it first."""
    script = f"""
import fcntl, os, sys, threading
sys.path.insert(0, {str(u.ROOT)!r})
from tests.support import nss_util as u
nss = u.ffi.dlopen(str(u.LIB))
def fds():
    out = {{}}
    for f in os.listdir("/proc/self/fd"):
        try:
            out[int(f)] = os.readlink(f"/proc/self/fd/{{f}}")
        except FileNotFoundError:  # listdir's own descriptor
            pass
    return out
before = fds()
def work():
    for name in ("alice", "nosuch", "pwbig"):
        u.lookup(nss, "group" if name == "pwbig" else "passwd", name)
t = threading.Thread(target=work); t.start(); t.join()
# join() returns when Python is done with the thread; the module's
# thread-exit destructor runs after that, in pthread_exit: wait for it.
import time
deadline = time.monotonic() + 20
while fds() != before and time.monotonic() < deadline:
    time.sleep(0.01)
out = {{"thread_exit_closes": fds() == before}}
assert u.lookup(nss, "passwd", "alice")[0] == 1
new = {{fd: p for fd, p in fds().items() if fd not in before}}
(sock,) = [fd for fd, p in new.items() if p.startswith("socket:")]
out["one_socket"] = len(new) == 1 or list(new) == [sock]
out["cloexec"] = bool(fcntl.fcntl(sock, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
os.close(sock)
# The program reuses the number. dup2 puts the file on exactly that number:
# open() takes the lowest free one, which under load can be a lower number
# freed meanwhile by the interpreter.
opened = os.open({str(tmp_path / "victim")!r}, os.O_RDWR | os.O_CREAT, 0o600)
if opened != sock:
    os.dup2(opened, sock)
    os.close(opened)
with open(sock, "w+b") as victim:
    assert victim.fileno() == sock  # the number is reused by the program
    out["after_close"] = u.lookup(nss, "passwd", "bob")[0] == 1
    victim.seek(0)
    out["victim_untouched"] = victim.read() == b""
print(out)
"""
    with u.FakePwServer(u.PASSWD, u.GROUP, u.SHADOW) as server:
        conf = client_conf(tmp_path / "pwserver.conf", [server.address])
        r = subprocess.run(
            [sys.executable, "-c", script], env=u.module_env(conf), capture_output=True, text=True, timeout=60
        )
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.strip() == str(
            {
                "thread_exit_closes": True,
                "one_socket": True,
                "cloexec": True,
                "after_close": True,
                "victim_untouched": True,
            }
        )


# ---- valgrind ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is in deps/debian-packages.txt")
def test_valgrind_memcheck_clean(tmp_path, shadow_key):
    primary = u.FakePwServer(mode="drop")
    with u.FakePwServer(u.PASSWD, u.GROUP, u.SHADOW, shadow_key=shadow_key[0]) as server:
        try:
            conf = client_conf(
                tmp_path / "pwserver.conf",
                [primary.address, server.address],
                shadow_keyfile=shadow_key[1],
                enumerate_=True,
                timeout_ms=5000,
            )
            for args in (
                ["passwd", "alice"],
                ["passwd", "2003"],
                ["passwd", "nosuch"],
                ["group", "pwbig"],
                ["group", "3001"],
                ["initgroups", "alice"],
                ["shadow", "alice"],
                ["passwd"],
                ["group"],
            ):
                r = subprocess.run(
                    [
                        "valgrind",
                        "-q",
                        "--error-exitcode=99",
                        "--leak-check=full",
                        "--errors-for-leak-kinds=definite,indirect",
                        "--track-fds=no",
                        "getent",
                        "-s",
                        "pwserver",
                        *args,
                    ],
                    env=u.module_env(conf),
                    capture_output=True,
                    text=True,
                    timeout=300,
                )
                missing = args[-1] == "nosuch"
                assert r.returncode == (2 if missing else 0), (args, r.stderr[-3000:])
                assert missing or r.stdout.strip(), args
        finally:
            primary.stop()


# ---- fuzz of the reply parser ----------------------------------------------------


def bad_replies(rng: random.Random, rid: int, good: bytes, sender: socket.socket):
    """Bad datagrams for one request: (bytes, whether sent from the wrong
    address). Each must be ignored."""
    body = msgpack.unpackb(good)
    cases = [
        (rng.randbytes(rng.randint(0, 1500)), False),
        (good[: rng.randint(0, len(good) - 1)], False),  # truncated
        (msgpack.packb([1, rid ^ (1 << rng.randint(0, 63)), *body[2:]]), False),  # wrong id
        (good, True),  # wrong source
        (msgpack.packb([2, rid, *body[2:]]), False),  # wrong version
        (msgpack.packb([1, rid, 0, rng.choice([None, 7, "x", [1, 2], {"a": 1}])]), False),
        (msgpack.packb([1, rid, 0, [(body[3] or ["x"])[0], "x", -1, 2**40, "", "", "", ""]]), False),
        (bytes([0x94, 0x01, 0xCF]) + rid.to_bytes(8, "big") + b"\x00\xdd\xff\xff\xff\xff", False),
        (bytes([0x94, 0x01, 0xCF]) + rid.to_bytes(8, "big") + b"\x00\x98\xdb\xff\xff\xff\xf0", False),
        (bytes([0xC1, 0x01]) + rng.randbytes(60), False),  # sealed, no key
        (good + b"\x00", False),  # trailing byte
        (msgpack.packb([1, rid, 9, None]), False),  # unknown status
    ]
    return rng.sample(cases, rng.randint(1, len(cases)))


def test_fuzz_reply_parser_never_crashes(tmp_path):
    rng = random.Random(20261130)
    wrong = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    wrong.bind(("127.0.0.1", 0))
    stats = {"bad": 0, "mutated": 0}

    def hook(server, pkt, addr):
        req = msgpack.unpackb(pkt)
        good = server.answer(pkt, udp=True)
        for data, from_wrong in bad_replies(rng, req[1], good, wrong):
            (wrong if from_wrong else server.udp).sendto(data, addr)
            stats["bad"] += 1
        if rng.random() < 0.3:
            # a random mutation of the right answer: may parse as some
            # record or be dropped, never crash
            mutated = bytearray(good)
            for _ in range(rng.randint(1, 4)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            server.udp.sendto(bytes(mutated), addr)
            stats["mutated"] += 1
        server.udp.sendto(good, addr)
        return True

    users = u.parse_passwd(u.PASSWD)[:60]
    queries = [["passwd", r[0]] for r in users] + [["uid", str(r[2])] for r in users]
    queries += [["group", "pwstaff"], ["gid", "3001"], ["passwd", "nosuchuser"]] * 10
    with u.FakePwServer(u.PASSWD, u.GROUP, u.SHADOW, hook=hook) as server:
        conf = client_conf(tmp_path / "pwserver.conf", [server.address], timeout_ms=3000)
        results = u.run_driver(conf, queries, timeout=240)
    wrong.close()
    assert len(results) == len(queries)
    exact = 0
    src = {r[0]: r for r in users}
    for (kind, key), (st, err, rec) in zip(queries, results):
        assert st in (u.NSS_SUCCESS, u.NSS_NOTFOUND), (kind, key, st, err)
        if kind == "passwd" and key in src and rec == src[key]:
            exact += 1
    assert stats["bad"] > len(queries)
    # mutations may occasionally win the race with a well-formed record;
    # everything else is the right answer
    assert exact >= len(users) - stats["mutated"]


def test_fuzz_garbage_only_is_unavail_in_time(tmp_path):
    rng = random.Random(7)

    def hook(server, pkt, addr):
        for _ in range(rng.randint(1, 20)):
            server.udp.sendto(rng.randbytes(rng.randint(0, 9000)), addr)
        return True

    with u.FakePwServer(u.PASSWD, hook=hook) as server:
        conf = client_conf(tmp_path / "pwserver.conf", [server.address], timeout_ms=150)
        results = u.run_driver(conf, [["passwd", "alice"]] * 20)
    assert all(r[:2] == [u.NSS_UNAVAIL, u.EAGAIN] for r in results)


def test_fuzz_tcp_answers(tmp_path):
    """TRUNCATED over UDP, then a hostile TCP peer: oversize length, short
    frame, garbage frame, closed connection."""
    rng = random.Random(11)
    import struct
    import threading

    lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lst.bind(("127.0.0.1", 0))
    lst.listen(16)
    port = lst.getsockname()[1]
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", port))
    stop = threading.Event()

    def serve_udp():
        udp.settimeout(0.1)
        while not stop.is_set():
            try:
                pkt, addr = udp.recvfrom(2048)
            except OSError:
                continue
            udp.sendto(msgpack.packb([1, msgpack.unpackb(pkt)[1], 2, None]), addr)

    def serve_tcp():
        lst.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = lst.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(2)
                try:
                    conn.recv(4096)
                    choice = rng.randrange(4)
                    if choice == 0:
                        conn.sendall(struct.pack(">I", 0xFFFFFFFF))
                    elif choice == 1:
                        conn.sendall(struct.pack(">I", 1000) + rng.randbytes(10))
                    elif choice == 2:
                        data = rng.randbytes(rng.randint(1, 3000))
                        conn.sendall(struct.pack(">I", len(data)) + data)
                except OSError:
                    pass

    threads = [threading.Thread(target=serve_udp, daemon=True), threading.Thread(target=serve_tcp, daemon=True)]
    for t in threads:
        t.start()
    try:
        conf = client_conf(tmp_path / "pwserver.conf", [f"127.0.0.1:{port}"], timeout_ms=400)
        results = u.run_driver(conf, [["group", "pwbig"]] * 16, timeout=120)
    finally:
        stop.set()
        for t in threads:
            t.join(2)
        lst.close()
        udp.close()
    assert all(r[0] == u.NSS_UNAVAIL for r in results)


THREADS_C = r"""
#include <dlfcn.h>
#include <nss.h>
#include <pthread.h>
#include <pwd.h>
#include <stdio.h>
#include <string.h>
typedef enum nss_status (*fn_t)(const char *, struct passwd *, char *, size_t, int *);
static fn_t fn;
static int bad;
static void *work(void *arg)
{
    char buf[1024], name[32];
    struct passwd pw;
    int err;
    for (int i = 0; i < 40; i++) {
        snprintf(name, sizeof name, "user%04d", (int)(long)arg * 40 + i);
        if (fn(name, &pw, buf, sizeof buf, &err) != NSS_STATUS_SUCCESS || strcmp(pw.pw_name, name) != 0)
            __atomic_add_fetch(&bad, 1, __ATOMIC_RELAXED);
    }
    return NULL;
}
int main(int argc, char **argv)
{
    void *h = dlopen(argv[1], RTLD_NOW);
    if (!h)
        return 2;
    fn = (fn_t)dlsym(h, "_nss_pwserver_getpwnam_r");
    pthread_t t[8];
    for (long i = 0; i < 8; i++)
        pthread_create(&t[i], NULL, work, (void *)i);
    for (int i = 0; i < 8; i++)
        pthread_join(t[i], NULL);
    printf("bad %d\n", bad);
    return bad != 0;
}
"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is in deps/debian-packages.txt")
def test_helgrind_no_data_race(tmp_path):
    """Eight threads of a C program looking up at once under helgrind: no
    race or lock-order report in the module."""
    src = tmp_path / "threads.c"
    src.write_text(THREADS_C)
    subprocess.run(["cc", "-O1", "-g", "-pthread", "-o", str(tmp_path / "threads"), str(src), "-ldl"], check=True)
    with u.FakePwServer(u.PASSWD, u.GROUP) as server:
        conf = client_conf(tmp_path / "pwserver.conf", [server.address], timeout_ms=20000)
        r = subprocess.run(
            ["valgrind", "--tool=helgrind", "-q", "--error-exitcode=99", str(tmp_path / "threads"), str(u.LIB)],
            env=u.module_env(conf),
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "bad 0"
