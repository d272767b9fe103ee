"""Helpers for the NSS module's tests (tests/nss/test_nss*.py).

`FakePwServer` is a small, real peer that speaks docs/protocol.md over UDP
and TCP with the `msgpack` package, built from passwd/group/shadow files.
Its `mode` makes it misbehave on purpose: "drop" reads every request and
never answers (a silently dead server, not one that refuses), and `hook`
lets a test send garbage, wrong ids or packets from another address.
"""

from __future__ import annotations

import os
import pathlib
import selectors
import socket
import struct
import subprocess
import threading

import cffi
import msgpack

from tests.support.pwserver_util import (
    BADREQUEST,
    DENIED,
    KEY_NETWORK,
    KEY_SHADOW,
    NOTFOUND,
    OK,
    TRUNCATED,
    recv_exact,
    seal,
    stats,
    unseal,
)
from tests.support.pwtest import ROOT, PwServer

NSS_DIR = ROOT / "nss_module"
LIB = NSS_DIR / "libnss_pwserver.so.2"

MAX_UDP_ANSWER = 8192
AMPLIFICATION = 3
ENUM_PAGE = 1000


def build_module() -> pathlib.Path:
    subprocess.run(["make", "-s", "-C", str(NSS_DIR)], check=True)
    return LIB


# ---- source files ------------------------------------------------------------


def parse_passwd(text: str) -> list[list]:
    out = []
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, pw, uid, gid, gecos, home, shell = line.split(":")
            out.append([name, pw, int(uid), int(gid), gecos, home, shell])
    return out


def parse_group(text: str) -> list[list]:
    out = []
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, pw, gid, members = line.split(":")
            out.append([name, pw, int(gid), [m for m in members.split(",") if m]])
    return out


def parse_shadow(text: str) -> list[list]:
    out = []
    for line in text.splitlines():
        if line and not line.startswith("#"):
            f = line.split(":")
            out.append([f[0], f[1]] + [int(x) if x else -1 for x in f[2:9]])
    return out


# ---- the fake server -------------------------------------------------------------


class FakePwServer:
    """A pwserver peer on 127.0.0.1 (UDP and TCP on one port), in threads."""

    def __init__(
        self,
        passwd: str = "",
        group: str = "",
        shadow: str = "",
        *,
        mode: str = "serve",
        shadow_key: bytes | None = None,
        network_key: bytes | None = None,
        mailhost: str = "store1",
        frozen: bool = False,
        port: int = 0,
        hook=None,
    ):
        self.users = parse_passwd(passwd)
        self.groups = parse_group(group)
        self.shadows = parse_shadow(shadow)
        self.mode = mode
        self.shadow_key = shadow_key
        self.network_key = network_key
        self.mailhost = mailhost
        self.frozen = frozen  # MAILHOST's second field, for every user
        self.hook = hook
        self.requests = 0  # UDP requests received (answered or not)
        self.answered = 0  # UDP + TCP answers sent
        self.tcp_requests = 0
        for attempt in range(50):  # a UDP port whose TCP twin is free too
            self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.udp.bind(("127.0.0.1", port))
            self.port = self.udp.getsockname()[1]
            self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                self.tcp.bind(("127.0.0.1", self.port))
                break
            except OSError:
                self.udp.close()
                self.tcp.close()
                if port or attempt == 49:
                    raise
        self.tcp.listen(64)
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._serve_udp, daemon=True),
            threading.Thread(target=self._serve_tcp, daemon=True),
        ]
        for t in self._threads:
            t.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)
        self.udp.close()
        self.tcp.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    # -- answers ----------------------------------------------------------------

    def record(self, op: int, arg):
        """(status, payload) for a decoded request."""
        u = lambda r: r + [self.mailhost]  # noqa: E731
        if op == 1:
            hit = [u(r) for r in self.users if r[0] == arg]
        elif op == 2:
            hit = [u(r) for r in self.users if r[2] == arg]
        elif op == 3:
            hit = [g for g in self.groups if g[0] == arg]
        elif op == 4:
            hit = [g for g in self.groups if g[2] == arg]
        elif op == 5:
            if not any(r[0] == arg for r in self.users):
                return NOTFOUND, None
            return OK, [g[2] for g in self.groups if arg in g[3]]
        elif op == 6:
            hit = [s for s in self.shadows if s[0] == arg]
        elif op == 7:
            hit = [[self.mailhost, self.frozen] for r in self.users if r[0] == arg]
        elif op in (10, 11, 12):
            rows = {10: [u(r) for r in self.users], 11: self.groups, 12: self.shadows}[op]
            page = rows[arg : arg + ENUM_PAGE]
            nxt = arg + ENUM_PAGE if arg + ENUM_PAGE < len(rows) else None
            return OK, [nxt, page]
        elif op == 9:
            return OK, ["fake", 1, len(self.users)]
        else:
            return BADREQUEST, None
        return (OK, hit[0]) if hit else (NOTFOUND, None)

    def answer(self, pkt: bytes, udp: bool) -> bytes | None:
        key_id = 0
        if pkt[:1] == b"\xc1":
            key_id = pkt[1]
            key = {KEY_NETWORK: self.network_key, KEY_SHADOW: self.shadow_key}.get(key_id)
            if key is None:
                return None
            try:
                body = unseal(key, pkt)
            except Exception:
                return None
        elif self.network_key is not None:
            return None
        else:
            body = pkt
        try:
            req = msgpack.unpackb(body)
            version, rid, op, arg = req[:4]
        except Exception:
            return None
        if op in (6, 12) and key_id != KEY_SHADOW:
            status, payload = DENIED, None
        elif udp and op in (10, 11, 12):
            status, payload = TRUNCATED, None
        else:
            status, payload = self.record(op, arg)
        out = msgpack.packb([1, rid, status, payload])
        if udp and (len(out) > MAX_UDP_ANSWER or (not key_id and len(out) > AMPLIFICATION * len(pkt))):
            out = msgpack.packb([1, rid, TRUNCATED, None])
        if key_id:
            out = seal(key, key_id, out)
        return out

    # -- loops --------------------------------------------------------------------

    def _serve_udp(self) -> None:
        self.udp.settimeout(0.1)
        while not self._stop.is_set():
            try:
                pkt, addr = self.udp.recvfrom(2048)
            except (TimeoutError, OSError):
                continue
            self.requests += 1
            if self.mode == "drop":
                continue
            if self.hook is not None:
                if self.hook(self, pkt, addr):
                    continue
            out = self.answer(pkt, udp=True)
            if out is not None:
                self.answered += 1  # counted first: a test may look right after
                self.udp.sendto(out, addr)

    def _serve_tcp(self) -> None:
        sel = selectors.DefaultSelector()
        self.tcp.setblocking(False)
        sel.register(self.tcp, selectors.EVENT_READ)
        while not self._stop.is_set():
            for key, _ in sel.select(0.1):
                if key.fileobj is self.tcp:
                    try:
                        conn, _ = self.tcp.accept()
                    except OSError:
                        continue
                    if self.mode == "drop":
                        conn.close()
                        continue
                    threading.Thread(target=self._tcp_conn, args=(conn,), daemon=True).start()
        sel.close()

    def _tcp_conn(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            while True:
                head = recv_exact(conn, 4)
                if head is None:
                    return
                (n,) = struct.unpack(">I", head)
                if n > 1024:
                    return
                pkt = recv_exact(conn, n)
                if pkt is None:
                    return
                self.tcp_requests += 1
                out = self.answer(pkt, udp=False)
                if out is None:
                    return
                self.answered += 1
                conn.sendall(struct.pack(">I", len(out)) + out)
        except OSError:
            return
        finally:
            conn.close()


# ---- configuration and running ----------------------------------------------------


def module_env(conf) -> dict:
    env = dict(os.environ)
    env["PWSERVER_CONF"] = str(conf)
    env["LD_LIBRARY_PATH"] = str(NSS_DIR)
    return env


def getent(conf, *args, timeout=30) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["getent", "-s", "pwserver", *args], env=module_env(conf), capture_output=True, text=True, timeout=timeout
    )


# ---- a small user base used by the tests -----------------------------------------

BIG_GROUP_MEMBERS = [f"m{i:05d}" for i in range(50000)]

PASSWD = "".join(
    [
        "alice:x:2001:2001:Alice Example,Room 1,,:/home/alice:/bin/bash\n",
        "bob:x:2002:100::/home/bob:/bin/sh\n",
        "carol.d-x:x:2003:2003:Carol \u00e9\u00e8 \u4e2d:/var/mail/c/a/carol:/usr/sbin/nologin\n",
        "dave:x:2004:2004:Dave:/home/dave:\n",
    ]
    + [f"user{i:04d}:x:{5000 + i}:{5000 + i}:User {i}:/home/user{i:04d}:/bin/sh\n" for i in range(2500)]
)
GROUP = (
    "pwstaff:x:3000:alice,bob\n"
    "pwmail:x:3001:alice,carol.d-x,dave\n"
    "pwempty:x:3002:\n"
    "pwbig:x:3003:" + ",".join(BIG_GROUP_MEMBERS) + "\n"
    "alice:x:2001:\n"
)
SHADOW = "alice:$6$salt$hashhashhash:19000:0:99999:7:::\nbob:!:19001:1:2:3:4:20000:\ncarol.d-x:$y$j9T$abc$def:::::::\n"


def write_sources(d) -> dict:
    d = pathlib.Path(d)
    paths = {}
    for name, text in (("passwd", PASSWD), ("group", GROUP), ("shadow", SHADOW)):
        paths[name] = d / name
        paths[name].write_text(text)
    return paths


# ---- direct calls into the module (cffi ABI mode), as glibc makes them -----------

# enum nss_status (the wire statuses above are OK, NOTFOUND, ...)
NSS_SUCCESS, NSS_NOTFOUND, NSS_UNAVAIL, NSS_TRYAGAIN = 1, 0, -1, -2
ERANGE, ENOENT, EAGAIN, EACCES = 34, 2, 11, 13

CDEF = """
struct passwd { char *pw_name; char *pw_passwd; uint32_t pw_uid; uint32_t pw_gid;
                char *pw_gecos; char *pw_dir; char *pw_shell; };
struct group { char *gr_name; char *gr_passwd; uint32_t gr_gid; char **gr_mem; };
struct spwd { char *sp_namp; char *sp_pwdp; long sp_lstchg; long sp_min; long sp_max;
              long sp_warn; long sp_inact; long sp_expire; unsigned long sp_flag; };
int _nss_pwserver_getpwnam_r(const char *, struct passwd *, char *, size_t, int *);
int _nss_pwserver_getpwuid_r(uint32_t, struct passwd *, char *, size_t, int *);
int _nss_pwserver_setpwent(int);
int _nss_pwserver_getpwent_r(struct passwd *, char *, size_t, int *);
int _nss_pwserver_endpwent(void);
int _nss_pwserver_getgrnam_r(const char *, struct group *, char *, size_t, int *);
int _nss_pwserver_getgrgid_r(uint32_t, struct group *, char *, size_t, int *);
int _nss_pwserver_setgrent(int);
int _nss_pwserver_getgrent_r(struct group *, char *, size_t, int *);
int _nss_pwserver_endgrent(void);
int _nss_pwserver_initgroups_dyn(const char *, uint32_t, long *, long *, uint32_t **, long, int *);
int _nss_pwserver_getspnam_r(const char *, struct spwd *, char *, size_t, int *);
void *malloc(size_t);
void free(void *);
"""

ffi = cffi.FFI()
ffi.cdef(CDEF)


def s(p) -> str:
    return ffi.string(p).decode(errors="surrogateescape")


def passwd_tuple(pw):
    return [s(pw.pw_name), s(pw.pw_passwd), pw.pw_uid, pw.pw_gid, s(pw.pw_gecos), s(pw.pw_dir), s(pw.pw_shell)]


def group_tuple(gr):
    members, i = [], 0
    while gr.gr_mem[i] != ffi.NULL:
        members.append(s(gr.gr_mem[i]))
        i += 1
    return [s(gr.gr_name), s(gr.gr_passwd), gr.gr_gid, members]


def shadow_tuple(sp):
    return [
        s(sp.sp_namp),
        s(sp.sp_pwdp),
        sp.sp_lstchg,
        sp.sp_min,
        sp.sp_max,
        sp.sp_warn,
        sp.sp_inact,
        sp.sp_expire,
        -1 if sp.sp_flag == 2**64 - 1 else sp.sp_flag,
    ]


_KEEP: list = []


def grow(call, result_type):
    """Calls with a 1-byte buffer, doubling it on TRYAGAIN/ERANGE, as glibc
    does. Returns (status, errno, result, number of ERANGE answers)."""
    size, eranges = 1, 0
    while True:
        buf = ffi.new("char[]", size)
        result = ffi.new(result_type)
        err = ffi.new("int *", 0)
        ffi.errno = 4242
        st = call(result, buf, size, err)
        if st == NSS_TRYAGAIN and err[0] == ERANGE:
            eranges += 1
            size *= 2
            assert size < 64 << 20
            continue
        if st == NSS_SUCCESS:
            assert ffi.errno == 4242  # errno preserved on success
        _KEEP.append(buf)  # the result's strings live in buf
        return st, err[0], result, eranges


def lookup(nss, kind: str, key: str):
    """[status, errno, record or None] for one lookup through the module's
    functions, with a buffer grown from 1 byte. kind: passwd, uid, group,
    gid, shadow."""
    calls = {
        "passwd": ("struct passwd *", nss._nss_pwserver_getpwnam_r, str, passwd_tuple),
        "uid": ("struct passwd *", nss._nss_pwserver_getpwuid_r, int, passwd_tuple),
        "group": ("struct group *", nss._nss_pwserver_getgrnam_r, str, group_tuple),
        "gid": ("struct group *", nss._nss_pwserver_getgrgid_r, int, group_tuple),
        "shadow": ("struct spwd *", nss._nss_pwserver_getspnam_r, str, shadow_tuple),
    }
    ctype, fn, conv, tup = calls[kind]
    arg = key.encode() if conv is str else int(key)
    st, err, res, _ = grow(lambda r, b, n, e: fn(arg, r, b, n, e), ctype)
    return [st, err, tup(res) if st == NSS_SUCCESS else None]


# A child process that runs lookups read as JSON lines [kind, key] on stdin
# and prints [status, errno, record] for each: a crash shows as its exit
# status, never in the test runner.
DRIVER = f"""
import json, sys
sys.path.insert(0, {str(ROOT)!r})
from tests.support import nss_util as u
nss = u.ffi.dlopen(str(u.LIB))
for line in sys.stdin:
    kind, key = json.loads(line)
    print(json.dumps(u.lookup(nss, kind, key)), flush=True)
"""


def run_driver(conf, queries, timeout=120) -> list:
    import json
    import sys

    r = subprocess.run(
        [sys.executable, "-c", DRIVER],
        input="".join(json.dumps(q) + "\n" for q in queries),
        env=module_env(conf),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    return [json.loads(line) for line in r.stdout.splitlines()]


def real_server(d, *args, shadow_keyfile=None, listen="127.0.0.1:0") -> PwServer:
    """The real `pwserver` (pwcache/server.py) serving the test sources
    written into d."""
    return PwServer(write_sources(d), *args, shadow_key=shadow_keyfile, listen=listen)


def server_stats(server) -> dict:
    """The real pwserver's STATS (asked over TCP)."""
    return stats(server.addr)
