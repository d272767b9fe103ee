"""The C client library of the wire protocol (pwcache/_csrc/pw_client.h) on
its own: built from its source list alone (no NSS glue), warning-free, and
its MAILHOST reader against a peer; and the two builds that link it
(nss_module/Makefile, pop/build_engine.py) compiling the same list.

The NSS maps over it are tested in test_nss_*.py, the POP engine over it in
test_pop_engine.py.
"""

from __future__ import annotations

import subprocess

import msgpack
import pytest
from cffi import FFI

from tests.support import nss_util as u
from tests.support.pwtest import ROOT, client_conf

CSRC = ROOT / "pwcache" / "_csrc"
ENOENT, EAGAIN, EINVAL = 2, 11, 22
PW_OK, PW_NOTFOUND, PW_OP_MAILHOST, PW_OP_PASSWD_BY_NAME = 0, 1, 7, 1

CDEF = """
typedef struct { const uint8_t *p; const uint8_t *end; } pwp_reader;
typedef struct { int status; pwp_reader payload; uint8_t *heap; uint8_t udp[PWC_UDP_BUF]; } pwc_answer;
int pwc_query(int op, const char *name, uint64_t num, pwc_answer *ans);
void pwc_answer_free(pwc_answer *ans);
int pwc_answer_mailhost(const pwc_answer *ans, char *host, size_t cap, int *frozen);
""".replace("PWC_UDP_BUF", str(8192 + 2 + 24 + 16))  # PW_MAX_UDP_ANSWER + PW_SEAL_OVERHEAD


def client_sources() -> list[str]:
    lines = (CSRC / "client-sources.txt").read_text().splitlines()
    return [name for name in (line.split("#", 1)[0].strip() for line in lines) if name]


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    """The library alone, as a shared object: every symbol it needs is its
    own or libc's (--no-undefined), and -Werror holds. Never unloaded, as
    the NSS module: its fork and thread-exit hooks point into it."""
    out = tmp_path_factory.mktemp("pwclient") / "libpwclient.so"
    subprocess.run(
        [
            "cc",
            "-std=gnu11",
            "-O2",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-D_FORTIFY_SOURCE=2",
            "-shared",
            "-fPIC",
            "-Wl,--no-undefined",
            "-Wl,-z,nodelete",
            f"-I{CSRC}",
            "-o",
            str(out),
            *(str(CSRC / s) for s in client_sources()),
            "-ldl",
            "-lpthread",
        ],
        check=True,
    )
    ffi = FFI()
    ffi.cdef(CDEF)
    return ffi, ffi.dlopen(str(out))


def mailhost_of(lib, user: str, cap: int = 128):
    """(pwc_query's rc, pwc_answer_mailhost's rc, host, frozen)."""
    ffi, c = lib
    ans = ffi.new("pwc_answer *")
    host, frozen = ffi.new("char[]", cap), ffi.new("int *", -1)
    try:
        rc = c.pwc_query(PW_OP_MAILHOST, user.encode(), 0, ans)
        if rc < 0:
            return rc, None, None, None
        got = c.pwc_answer_mailhost(ans, host, cap, frozen)
        return rc, got, ffi.string(host).decode() if got == 0 else None, frozen[0]
    finally:
        c.pwc_answer_free(ans)


@pytest.mark.parametrize("frozen", [False, True])
def test_mailhost_reader(lib, tmp_path, monkeypatch, frozen):
    with u.FakePwServer(u.PASSWD, mailhost="store7.example:1110", frozen=frozen) as server:
        monkeypatch.setenv("PWSERVER_CONF", str(client_conf(tmp_path / "pwserver.conf", [server.address])))
        assert mailhost_of(lib, "alice") == (0, 0, "store7.example:1110", int(frozen))
        # NOTFOUND is an answer (rc 0) that the reader reports as ENOENT
        assert mailhost_of(lib, "nosuchuser")[:2] == (0, -ENOENT)


def test_mailhost_longer_than_the_callers_buffer_is_refused(lib, tmp_path, monkeypatch):
    host = "store7.example:1110"
    with u.FakePwServer(u.PASSWD, mailhost=host) as server:
        monkeypatch.setenv("PWSERVER_CONF", str(client_conf(tmp_path / "pwserver.conf", [server.address])))
        assert mailhost_of(lib, "alice", cap=len(host))[:3] == (0, -EINVAL, None)  # no room for the NUL
        assert mailhost_of(lib, "alice", cap=len(host) + 1)[:3] == (0, 0, host)


@pytest.mark.parametrize(
    "payload",
    [["store1"], ["store1", 0], [b"store1", False], ["store1", False, 1], "store1"],
    ids=["one-field", "int-frozen", "bin-host", "three-fields", "bare-string"],
)
def test_malformed_mailhost_answer_is_dropped(lib, tmp_path, monkeypatch, payload):
    """An answer of another shape is not an answer: the lookup keeps
    waiting and ends UNAVAIL (-EAGAIN), never with a half-read host."""

    def hook(server, pkt, addr):
        req = msgpack.unpackb(pkt)
        server.udp.sendto(msgpack.packb([1, req[1], PW_OK, payload], use_bin_type=True), addr)
        return True

    with u.FakePwServer(u.PASSWD, hook=hook) as server:
        conf = client_conf(tmp_path / "pwserver.conf", [server.address], timeout_ms=300)
        monkeypatch.setenv("PWSERVER_CONF", str(conf))
        assert mailhost_of(lib, "alice")[0] == -EAGAIN
        assert server.requests >= 1


def test_a_passwd_answer_is_not_a_mailhost(lib, tmp_path, monkeypatch):
    """The reader reads only what pwc_query checked for MAILHOST: asked with
    another op, the answer's payload is refused, not misread."""
    ffi, c = lib
    with u.FakePwServer(u.PASSWD) as server:
        monkeypatch.setenv("PWSERVER_CONF", str(client_conf(tmp_path / "pwserver.conf", [server.address])))
        ans = ffi.new("pwc_answer *")
        host, frozen = ffi.new("char[]", 128), ffi.new("int *")
        try:
            assert c.pwc_query(PW_OP_PASSWD_BY_NAME, b"alice", 0, ans) == 0
            assert ans.status == PW_OK
            assert c.pwc_answer_mailhost(ans, host, 128, frozen) == -EINVAL
        finally:
            c.pwc_answer_free(ans)


# ---- the builds that link it ------------------------------------------------------


def test_nss_module_and_pop_engine_compile_the_same_client():
    from pop import build_engine

    expect = [str((CSRC / s).resolve()) for s in client_sources()]
    engine = [str((ROOT / s).resolve()) for s in build_engine.SOURCES]
    assert engine == [str(ROOT / "pop" / "_csrc" / "pop_engine.c")] + expect
    assert not any("nss_module" in str((ROOT / d).resolve()) for d in build_engine.INCLUDE_DIRS)

    dry = subprocess.run(
        ["make", "-n", "-B", "-C", str(ROOT / "nss_module")], check=True, capture_output=True, text=True
    ).stdout
    words = dry.split()
    nss = [str((ROOT / "nss_module" / w).resolve()) for w in words if w.endswith(".c")]
    assert [p for p in nss if "/_csrc/" in p] == expect
    glue = sorted(p.rsplit("/", 1)[1] for p in nss if "/_csrc/" not in p)
    assert glue == ["enum.c", "group.c", "initgroups.c", "passwd.c", "shadow.c"]
    assert sorted(p.name for p in (ROOT / "nss_module").glob("*.c")) == glue
