"""Direct calls into libnss_pwserver.so.2 through cffi (ABI mode), as glibc
makes them: return codes, *errnop, errno, and the ERANGE path with a 1-byte
buffer growing until the entry fits (the same entry comes back)."""

from __future__ import annotations

import pytest

from tests.support import nss_util as u
from tests.support.nss_util import EACCES, EAGAIN, ENOENT, ffi, group_tuple, grow, passwd_tuple, shadow_tuple
from tests.support.nss_util import NSS_NOTFOUND as NOTFOUND
from tests.support.nss_util import NSS_SUCCESS as SUCCESS
from tests.support.nss_util import NSS_UNAVAIL as UNAVAIL
from tests.support.pwtest import client_conf


@pytest.fixture(scope="module")
def nss():
    lib_path = u.build_module()
    return ffi.dlopen(str(lib_path))


@pytest.fixture(scope="module")
def libc():
    return ffi.dlopen(None)


@pytest.fixture(scope="module")
def server(shadow_key, tmp_path_factory):
    """The real pwserver, on loopback, stopped by PID at the end."""
    with u.real_server(tmp_path_factory.mktemp("src"), shadow_keyfile=shadow_key[1]) as s:
        yield s


@pytest.fixture
def conf(tmp_path, server, shadow_key, monkeypatch):
    path = client_conf(tmp_path / "pwserver.conf", [server.address], enumerate_=True, shadow_keyfile=shadow_key[1])
    monkeypatch.setenv("PWSERVER_CONF", str(path))
    return path


@pytest.fixture
def plain_conf(tmp_path, server, monkeypatch):
    """A configuration without the shadow key and without enumeration."""
    path = client_conf(tmp_path / "plain.conf", [server.address])
    monkeypatch.setenv("PWSERVER_CONF", str(path))
    return path


def test_getpwnam_erange_then_same_entry(nss, conf):
    for src in u.parse_passwd(u.PASSWD)[:6]:
        st, err, pw, eranges = grow(
            lambda r, b, n, e: nss._nss_pwserver_getpwnam_r(src[0].encode(), r, b, n, e), "struct passwd *"
        )
        assert st == SUCCESS and eranges >= 1
        assert passwd_tuple(pw) == src
        st, err, pw, _ = grow(lambda r, b, n, e: nss._nss_pwserver_getpwuid_r(src[2], r, b, n, e), "struct passwd *")
        assert st == SUCCESS and passwd_tuple(pw) == src


def test_notfound_sets_errnop(nss, conf):
    pw = ffi.new("struct passwd *")
    buf = ffi.new("char[]", 1024)
    err = ffi.new("int *", 0)
    assert nss._nss_pwserver_getpwnam_r(b"nosuchuser", pw, buf, 1024, err) == NOTFOUND
    assert err[0] == ENOENT
    err[0] = 0
    assert nss._nss_pwserver_getpwuid_r(4294967295, pw, buf, 1024, err) == NOTFOUND
    assert err[0] == ENOENT
    err[0] = 0
    assert nss._nss_pwserver_getpwnam_r(b"", pw, buf, 1024, err) == NOTFOUND and err[0] == ENOENT


def test_unavail_when_no_server_answers(nss, tmp_path, monkeypatch):
    dead = u.FakePwServer(mode="drop")
    try:
        path = client_conf(tmp_path / "dead.conf", [dead.address], timeout_ms=200, hedge_ms=50)
        monkeypatch.setenv("PWSERVER_CONF", str(path))
        pw = ffi.new("struct passwd *")
        buf = ffi.new("char[]", 1024)
        err = ffi.new("int *", 0)
        assert nss._nss_pwserver_getpwnam_r(b"alice", pw, buf, 1024, err) == UNAVAIL
        assert err[0] == EAGAIN and ffi.errno == EAGAIN
        assert dead.requests >= 1
    finally:
        dead.stop()


def test_group_erange_including_50000_members(nss, conf, server):
    groups = {g[0]: g for g in u.parse_group(u.GROUP)}
    for name in ("pwstaff", "pwempty", "pwbig"):
        before = u.server_stats(server)["tcp_requests"] + 1  # the STATS itself
        st, err, gr, eranges = grow(
            lambda r, b, n, e: nss._nss_pwserver_getgrnam_r(name.encode(), r, b, n, e), "struct group *"
        )
        assert st == SUCCESS and eranges >= 1
        assert group_tuple(gr) == groups[name]
        if name == "pwbig":
            assert u.server_stats(server)["tcp_requests"] > before
        st, err, gr, _ = grow(
            lambda r, b, n, e: nss._nss_pwserver_getgrgid_r(groups[name][2], r, b, n, e), "struct group *"
        )
        assert st == SUCCESS and group_tuple(gr) == groups[name]


def test_shadow_erange_and_empty_fields(nss, conf):
    for src in u.parse_shadow(u.SHADOW):
        st, err, sp, eranges = grow(
            lambda r, b, n, e: nss._nss_pwserver_getspnam_r(src[0].encode(), r, b, n, e), "struct spwd *"
        )
        assert st == SUCCESS and eranges >= 1
        assert shadow_tuple(sp) == src


def test_shadow_without_key_is_unavail_eacces(nss, server, plain_conf):
    sp = ffi.new("struct spwd *")
    buf = ffi.new("char[]", 1024)
    err = ffi.new("int *", 0)
    before = u.server_stats(server)["requests"] + 1
    assert nss._nss_pwserver_getspnam_r(b"alice", sp, buf, 1024, err) == UNAVAIL
    assert err[0] == EACCES
    assert u.server_stats(server)["requests"] == before  # nothing sent without the key


def test_getpwent_erange_returns_the_same_entry(nss, conf):
    """Enumeration with a 1-byte buffer for every entry: each one first
    answers ERANGE, then comes back whole; none skipped, none repeated."""
    got = []
    assert nss._nss_pwserver_setpwent(0) == SUCCESS
    while True:
        st, err, pw, eranges = grow(lambda r, b, n, e: nss._nss_pwserver_getpwent_r(r, b, n, e), "struct passwd *")
        if st == NOTFOUND:
            assert err == ENOENT
            break
        assert st == SUCCESS and eranges >= 1
        got.append(passwd_tuple(pw))
    nss._nss_pwserver_endpwent()
    assert got == u.parse_passwd(u.PASSWD)


def test_getgrent_erange_returns_the_same_entry(nss, conf):
    got = []
    nss._nss_pwserver_setgrent(0)
    while True:
        st, err, gr, eranges = grow(lambda r, b, n, e: nss._nss_pwserver_getgrent_r(r, b, n, e), "struct group *")
        if st != SUCCESS:
            assert st == NOTFOUND
            break
        got.append(group_tuple(gr))
    nss._nss_pwserver_endgrent()
    assert got == u.parse_group(u.GROUP)


def test_enumeration_off_is_notfound(nss, plain_conf):
    pw = ffi.new("struct passwd *")
    buf = ffi.new("char[]", 4096)
    err = ffi.new("int *", 0)
    nss._nss_pwserver_setpwent(0)
    assert nss._nss_pwserver_getpwent_r(pw, buf, 4096, err) == NOTFOUND and err[0] == ENOENT


def test_initgroups_dyn_grows_and_respects_limit(nss, conf, libc):
    start = ffi.new("long *", 1)
    size = ffi.new("long *", 1)
    groups = ffi.new("uint32_t **", ffi.cast("uint32_t *", libc.malloc(4)))
    groups[0][0] = 2001
    err = ffi.new("int *", 0)
    try:
        assert nss._nss_pwserver_initgroups_dyn(b"alice", 2001, start, size, groups, -1, err) == SUCCESS
        assert sorted(groups[0][i] for i in range(start[0])) == [2001, 3000, 3001]
        assert size[0] >= start[0]
        # already present gids are not added twice
        assert nss._nss_pwserver_initgroups_dyn(b"alice", 2001, start, size, groups, -1, err) == SUCCESS
        assert start[0] == 3
    finally:
        libc.free(groups[0])
    start[0], size[0] = 0, 1
    groups[0] = ffi.cast("uint32_t *", libc.malloc(4))
    try:
        assert nss._nss_pwserver_initgroups_dyn(b"alice", 0, start, size, groups, 1, err) == SUCCESS
        assert start[0] == 1 and size[0] == 1
    finally:
        libc.free(groups[0])
    assert nss._nss_pwserver_initgroups_dyn(b"nosuchuser", 0, start, size, groups, -1, err) == NOTFOUND
