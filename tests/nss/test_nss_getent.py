"""libnss_pwserver.so.2 through real glibc: getent -s pwserver, id, and
Python's pwd/grp in a subprocess, compared field by field with the source
files the server was given."""

from __future__ import annotations

import ctypes
import json
import pathlib
import subprocess
import sys

import pytest

from tests.support import nss_util as u
from tests.support.pwtest import client_conf, write_key


@pytest.fixture(scope="module")
def lib():
    return u.build_module()


@pytest.fixture(scope="module")
def server(lib, shadow_key, tmp_path_factory):
    """The real pwserver, on loopback, stopped by PID at the end."""
    with u.real_server(tmp_path_factory.mktemp("src"), shadow_keyfile=shadow_key[1]) as s:
        yield s


@pytest.fixture
def conf(tmp_path, server):
    return client_conf(tmp_path / "pwserver.conf", [server.address])


def tcp_requests(server) -> int:
    return u.server_stats(server)["tcp_requests"] - 1  # this STATS came over TCP


def test_exports_only_nss_entry_points(lib):
    out = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True, check=True)
    names = [line.split()[-1] for line in out.stdout.splitlines() if line.strip()]
    assert names and all(n.startswith("_nss_pwserver_") for n in names), names
    soname = subprocess.run(["objdump", "-p", str(lib)], capture_output=True, text=True).stdout
    assert "SONAME               libnss_pwserver.so.2" in soname
    needed = [line.split()[-1] for line in soname.splitlines() if "NEEDED" in line]
    assert sorted(needed) == ["ld-linux-x86-64.so.2", "libc.so.6"], needed  # libsodium: dlopen only
    handle = ctypes.CDLL(str(lib))
    for name in (
        "getpwnam_r",
        "getpwuid_r",
        "setpwent",
        "getpwent_r",
        "endpwent",
        "getgrnam_r",
        "getgrgid_r",
        "setgrent",
        "getgrent_r",
        "endgrent",
        "initgroups_dyn",
        "getspnam_r",
        "setspent",
        "getspent_r",
        "endspent",
    ):
        assert getattr(handle, "_nss_pwserver_" + name) is not None


def passwd_line(r) -> str:
    return ":".join(str(x) for x in r)


@pytest.mark.parametrize("name", ["alice", "bob", "carol.d-x", "dave", "user0000", "user2499"])
def test_getent_passwd_by_name_and_uid(conf, name):
    src = next(r for r in u.parse_passwd(u.PASSWD) if r[0] == name)
    for key in (name, str(src[2])):
        r = u.getent(conf, "passwd", key)
        assert r.returncode == 0, r.stderr
        assert r.stdout.rstrip("\n").split(":") == [str(x) for x in src]


def test_getent_unknown_is_notfound(conf):
    for args in (
        ["passwd", "nosuchuser"],
        ["passwd", "424242"],
        ["group", "nosuch"],
        ["passwd", "bad:name"],
        ["shadow", "nosuch"],
    ):
        r = u.getent(conf, *args)
        assert r.returncode == 2 and r.stdout == "", args


@pytest.mark.parametrize("name", ["pwstaff", "pwmail", "pwempty", "alice"])
def test_getent_group(conf, name):
    src = next(g for g in u.parse_group(u.GROUP) if g[0] == name)
    for key in (name, str(src[2])):
        r = u.getent(conf, "group", key)
        assert r.returncode == 0, r.stderr
        gname, gpw, gid, members = r.stdout.rstrip("\n").split(":")
        assert [gname, gpw, int(gid), [m for m in members.split(",") if m]] == src


def test_getent_group_with_50000_members_over_tcp(conf, server):
    before = tcp_requests(server)
    r = u.getent(conf, "group", "pwbig")
    assert r.returncode == 0
    name, _, gid, members = r.stdout.rstrip("\n").split(":")
    assert (name, int(gid)) == ("pwbig", 3003)
    assert members.split(",") == u.BIG_GROUP_MEMBERS
    assert tcp_requests(server) > before  # TRUNCATED over UDP, then TCP


def test_getent_initgroups(conf):
    for user, want in (("alice", [3000, 3001]), ("carol.d-x", [3001]), ("bob", [3000]), ("user0001", [])):
        r = u.getent(conf, "initgroups", user)
        assert r.returncode == 0, (user, r.stderr)
        fields = r.stdout.split()
        assert fields[0] == user and sorted(int(g) for g in fields[1:]) == want


def test_getent_shadow_needs_the_shadow_key(tmp_path, server, shadow_key):
    plain = client_conf(tmp_path / "nokey.conf", [server.address])
    assert u.getent(plain, "shadow", "alice").returncode == 2
    keyed = client_conf(tmp_path / "key.conf", [server.address], shadow_keyfile=shadow_key[1])
    for src in u.parse_shadow(u.SHADOW):
        r = u.getent(keyed, "shadow", src[0])
        assert r.returncode == 0, r.stderr
        got = r.stdout.rstrip("\n").split(":")
        want = [src[0], src[1]] + ["" if x == -1 else str(x) for x in src[2:]]
        assert got == want
    # a wrong key: the server cannot open the request and stays silent
    write_key(tmp_path / "wrong.key")
    wrong = client_conf(
        tmp_path / "wrong.conf", [server.address], timeout_ms=300, shadow_keyfile=tmp_path / "wrong.key"
    )
    assert u.getent(wrong, "shadow", "alice").returncode == 2


def test_enumeration_only_when_enabled(tmp_path, server, shadow_key):
    off = client_conf(tmp_path / "off.conf", [server.address])
    r = u.getent(off, "passwd")
    assert r.returncode == 0 and r.stdout == ""
    on = client_conf(tmp_path / "on.conf", [server.address], enumerate_=True, shadow_keyfile=shadow_key[1])
    before = tcp_requests(server)
    r = u.getent(on, "passwd")
    assert r.returncode == 0
    assert [line.split(":") for line in r.stdout.splitlines()] == [
        [str(x) for x in rec] for rec in u.parse_passwd(u.PASSWD)
    ]
    assert tcp_requests(server) - before >= 3  # 2504 users: three pages over TCP
    r = u.getent(on, "group")
    assert [line.split(":")[0] for line in r.stdout.splitlines()] == [g[0] for g in u.parse_group(u.GROUP)]
    r = u.getent(on, "shadow")
    assert [line.split(":")[0] for line in r.stdout.splitlines()] == [s[0] for s in u.parse_shadow(u.SHADOW)]


# ---- through nsswitch.conf, in a private mount namespace -------------------------


def in_namespace(tmp_path, conf, argv, nsswitch="files pwserver"):
    """Runs argv with an nsswitch.conf naming pwserver bind-mounted over
    /etc/nsswitch.conf in a private mount namespace (the real one is never
    touched)."""
    ns = tmp_path / "nsswitch.conf"
    ns.write_text(f"passwd: {nsswitch}\ngroup: {nsswitch}\nshadow: {nsswitch}\n")
    script = 'mount --bind "$0" /etc/nsswitch.conf && exec "$@"'
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", script, str(ns), *argv],
        env=u.module_env(conf),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_id_through_nsswitch(tmp_path, conf):
    r = in_namespace(tmp_path, conf, ["id", "alice"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "uid=2001(alice) gid=2001(alice) groups=2001(alice),3000(pwstaff),3001(pwmail)"
    r = in_namespace(tmp_path, conf, ["id", "carol.d-x"])
    assert r.stdout.strip() == "uid=2003(carol.d-x) gid=2003 groups=2003,3001(pwmail)"
    r = in_namespace(tmp_path, conf, ["id", "nosuchuser"])
    assert r.returncode == 1 and "no such user" in r.stderr
    # files still comes first
    r = in_namespace(tmp_path, conf, ["id", "-u", "root"])
    assert r.stdout.strip() == "0"


PY_PROBE = """
import grp, json, pwd, sys
out = {"pw": [list(pwd.getpwnam(n)) for n in sys.argv[1:]],
       "uid": [list(pwd.getpwuid(pwd.getpwnam(n).pw_uid)) for n in sys.argv[1:]],
       "gr": [list(grp.getgrnam(g)) for g in ("pwstaff", "pwmail", "pwempty", "pwbig")],
       "gid": list(grp.getgrgid(3001))}
try:
    pwd.getpwnam("nosuchuser")
except KeyError:
    out["missing"] = True
print(json.dumps(out))
"""


def test_python_pwd_grp_through_nsswitch(tmp_path, conf):
    names = ["alice", "bob", "carol.d-x", "dave", "user1234"]
    r = in_namespace(tmp_path, conf, [sys.executable, "-c", PY_PROBE, *names])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    src = {p[0]: p for p in u.parse_passwd(u.PASSWD)}
    assert out["pw"] == [src[n] for n in names]
    assert out["uid"] == [src[n] for n in names]
    groups = {g[0]: g for g in u.parse_group(u.GROUP)}
    assert out["gr"] == [groups[g] for g in ("pwstaff", "pwmail", "pwempty", "pwbig")]
    assert out["gid"] == groups["pwmail"]
    assert out["missing"] is True


def test_network_key_seals_every_packet(tmp_path):
    """A server with a network key drops plain packets; with the key in the
    config (keyfile) the module seals requests, including the TCP ones."""
    write_key(tmp_path / "net.key")
    with u.real_server(tmp_path, "--network-key", str(tmp_path / "net.key")) as server:
        plain = client_conf(tmp_path / "plain.conf", [server.address], timeout_ms=300)
        assert u.getent(plain, "passwd", "alice").returncode == 2
        sealed = client_conf(tmp_path / "sealed.conf", [server.address], keyfile=tmp_path / "net.key")
        r = u.getent(sealed, "passwd", "alice")
        assert r.returncode == 0 and r.stdout.startswith("alice:x:2001:2001:")
        r = u.getent(sealed, "group", "pwbig")
        assert r.returncode == 0 and r.stdout.rstrip("\n").split(":")[3].split(",") == u.BIG_GROUP_MEMBERS


def test_ipv6_server_udp_and_tcp(tmp_path):
    with u.real_server(tmp_path, "--allow", "::1/128", listen="[::1]:0") as server:
        assert server.address.startswith("[::1]:")
        conf = client_conf(tmp_path / "v6.conf", [server.address])
        r = u.getent(conf, "passwd", "alice")
        assert r.returncode == 0 and r.stdout.startswith("alice:x:2001:")
        r = u.getent(conf, "group", "pwbig")  # TRUNCATED, then TCP over IPv6
        assert r.returncode == 0 and len(r.stdout.rstrip("\n").split(":")[3].split(",")) == 50000


PROBE_C = r"""
#include <pwd.h>
#include <stdio.h>
int main(int argc, char **argv)
{
    struct passwd *pw = getpwnam(argv[1]);
    printf("%s\n", pw ? pw->pw_dir : "none");
    return 0;
}
"""

SETUID_SCENARIO = r"""
set -e
work="$1"; libdir="$2"; lib="$3"; conf="$4"
for d in etc lib; do mkdir -p "$work/$d.up" "$work/$d.work"; done
mount -t overlay overlay -o "lowerdir=/etc,upperdir=$work/etc.up,workdir=$work/etc.work" /etc
mount -t overlay overlay -o "lowerdir=$libdir,upperdir=$work/lib.up,workdir=$work/lib.work" "$libdir"
cp "$lib" "$libdir/"
printf 'passwd: files pwserver\ngroup: files\nshadow: files\n' > /etc/nsswitch.conf
printf 'server 127.0.0.1:9\ntimeout_ms 200\nhealth_file %s/health\n' "$work" > /etc/pwserver.conf
nobody() { setpriv --reuid=65534 --regid=65534 --clear-groups "$@"; }
echo "plain $(PWSERVER_CONF=$conf nobody "$work/bin/probe" alice)"
echo "setuid $(PWSERVER_CONF=$conf nobody "$work/bin/probe-suid" alice)"
"""


def test_pwserver_conf_from_environment_ignored_in_setuid_programs(server):
    """PWSERVER_CONF is read with secure_getenv: a setuid program uses
    /etc/pwserver.conf whatever its caller's environment says. (The module
    sits in the system library folder of a private mount namespace, since a
    setuid program ignores LD_LIBRARY_PATH too.)"""
    import shutil
    import tempfile

    work = pathlib.Path(tempfile.mkdtemp(prefix="nss-suid-"))  # readable by nobody
    try:
        check_setuid(work, server)
    finally:
        shutil.rmtree(work)


def check_setuid(work, server):
    from nss_module import install

    (work / "bin").mkdir()
    for p in (work, work / "bin"):
        p.chmod(0o755)
    src = work / "probe.c"
    src.write_text(PROBE_C)
    subprocess.run(["cc", "-O2", "-o", str(work / "bin" / "probe"), str(src)], check=True)
    subprocess.run(["cp", str(work / "bin" / "probe"), str(work / "bin" / "probe-suid")], check=True)
    (work / "bin" / "probe-suid").chmod(0o4755)
    conf = client_conf(work / "pwserver.conf", [server.address], health_file=work / "health")
    conf.chmod(0o644)
    r = subprocess.run(
        [
            "unshare",
            "-m",
            "sh",
            "-c",
            SETUID_SCENARIO,
            "sh",
            str(work),
            str(install.system_libdir()),
            str(u.LIB),
            str(conf),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["plain /home/alice", "setuid none"]
