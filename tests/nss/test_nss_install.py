"""`pwmail nss install|uninstall [--dry-run]`, run for real inside a private
mount namespace with overlays on /etc and the system library folder: the
machine's own files are never touched."""

from __future__ import annotations

import hashlib
import os
import pathlib
import subprocess
import sys

import pytest

from nss_module import install
from tests.support import nss_util as u
from tests.support.pwtest import client_conf

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mount namespaces need root")


def test_add_and_remove_service_text():
    text = (
        "# comment: passwd: files\npasswd:   files systemd\ngroup: compat [NOTFOUND=return] ldap # x\n"
        "shadow:files\nhosts: files dns\ngshadow: files\n"
    )
    added = install.add_service(text)
    assert added == (
        "# comment: passwd: files\npasswd:   files pwserver systemd\n"
        "group: compat [NOTFOUND=return] pwserver ldap # x\nshadow:files pwserver\n"
        "hosts: files dns\ngshadow: files\n"
    )
    assert install.add_service(added) == added  # idempotent
    assert install.remove_service(added) == text
    assert install.add_service("passwd: ldap\n") == "passwd: ldap pwserver\n"


def sha(path) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


SCENARIO = r"""
set -e
work="$1"; libdir="$2"; shift 2
for d in etc lib; do mkdir -p "$work/$d.up" "$work/$d.work"; done
mount -t overlay overlay -o "lowerdir=/etc,upperdir=$work/etc.up,workdir=$work/etc.work" /etc
mount -t overlay overlay -o "lowerdir=$libdir,upperdir=$work/lib.up,workdir=$work/lib.work" "$libdir"
pwmail() { "$PYTHON" -c 'import sys; from pwmail.admin import main; sys.exit(main(sys.argv[1:]))' "$@"; }
cp /etc/nsswitch.conf "$work/orig"
echo "== dry-run"; pwmail nss install --dry-run
cmp /etc/nsswitch.conf "$work/orig"; test ! -e "$libdir/libnss_pwserver.so.2"
echo "== install"; pwmail nss install
cp /etc/nsswitch.conf "$work/after1"
pwmail nss install >/dev/null
cmp /etc/nsswitch.conf "$work/after1"
cmp /etc/nsswitch.conf.pwserver-backup "$work/orig"
stat -c '%a' "$libdir/libnss_pwserver.so.2" > "$work/mode"
ldconfig -p | grep -c libnss_pwserver.so.2 > "$work/ldcache" || true
echo "== lookup"; env -u LD_LIBRARY_PATH getent passwd alice > "$work/alice"
env -u LD_LIBRARY_PATH id -Gn alice > "$work/id" || true
echo "== uninstall"; pwmail nss uninstall
cmp /etc/nsswitch.conf "$work/orig"
test ! -e /etc/nsswitch.conf.pwserver-backup
test ! -e "$libdir/libnss_pwserver.so.2"
pwmail nss uninstall >/dev/null
cmp /etc/nsswitch.conf "$work/orig"
echo "== edited"; pwmail nss install >/dev/null
echo "netgroup: files # added by the admin" >> /etc/nsswitch.conf
pwmail nss uninstall >/dev/null
grep -q "added by the admin" /etc/nsswitch.conf
! grep -q pwserver /etc/nsswitch.conf
echo "== done"
"""


def test_install_uninstall_in_private_mount_namespace(tmp_path):
    libdir = install.system_libdir()
    real_nsswitch, real_lib = sha("/etc/nsswitch.conf"), (libdir / install.SONAME).exists()
    u.build_module()
    with u.FakePwServer(u.PASSWD, u.GROUP, u.SHADOW) as server:
        conf = client_conf(tmp_path / "pwserver.conf", [server.address])
        env = dict(os.environ, PWSERVER_CONF=str(conf), PYTHON=sys.executable, PYTHONPATH=str(u.ROOT))
        work = tmp_path / "ns"
        work.mkdir()
        r = subprocess.run(
            ["unshare", "-m", "sh", "-c", SCENARIO, "sh", str(work), str(libdir)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "+passwd:" in r.stdout and "pwserver" in r.stdout  # the dry-run diff
    assert r.stdout.rstrip().endswith("== done")
    assert (work / "mode").read_text().strip() == "644"
    assert int((work / "ldcache").read_text()) >= 1
    assert (work / "alice").read_text().startswith("alice:x:2001:2001:")
    assert set((work / "id").read_text().split()) >= {"pwstaff", "pwmail"}
    # the machine's own files did not change
    assert sha("/etc/nsswitch.conf") == real_nsswitch
    assert (libdir / install.SONAME).exists() == real_lib
    assert not pathlib.Path("/etc/nsswitch.conf.pwserver-backup").exists()
