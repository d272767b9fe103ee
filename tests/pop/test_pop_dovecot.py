"""Dovecot 2.3 as the backend behind pop-proxy: userdb passwd and passdb
shadow through libnss_pwserver (nsswitch.conf overlaid in a private mount
namespace, never the real one), mail_location on the same hashed Maildirs
that delivery writes, XCLIENT from the proxy. Real clients: poplib, curl,
mpop, fetchmail."""

from __future__ import annotations

import os
import pathlib
import poplib
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

from tests.support.pop_util import (
    NSS_DIR,
    UID0,
    Dovecot,
    client_conf,
    curl_pop,
    deliver,
    fetchmail_fetch,
    make_root,
    message,
    mpop_fetch,
    self_signed,
    start_proxy,
    write_users,
)
from tests.support.pwtest import PwServer, write_key

pytestmark = [
    pytest.mark.slow,
    pytest.mark.root,
    pytest.mark.skipif(not shutil.which("dovecot"), reason="dovecot-pop3d not installed (deps/debian-packages.txt)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="Dovecot's master and mount namespaces need root"),
    pytest.mark.skipif(
        not (NSS_DIR / "libnss_pwserver.so.2").exists(), reason="libnss_pwserver.so.2 not built (make nss)"
    ),
]

DELAY = 0.5
USERS = {
    "ana": ("ana dove", "dove"),
    "bruno": ("bruno-dove", "dove"),
    "carla": ("carla-dove", "dove"),
    "dario": ("dario-dove", "dove"),
    "elena": ("elena-dove", "dove"),
    "yroot": ("yroot-dove", "dove"),
    "zlow": ("zlow-dove", "dove"),
}
LOW_UID = 500  # below first_valid_uid


def uid_of(user: str) -> int:
    return UID0 + sorted(USERS).index(user)  # as write_users numbers them


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dovecot")
    # Dovecot's login processes (dovenull) and mail processes (the users'
    # uids) must reach base_dir and the Maildirs: not under pytest's 0700 tree.
    shared = pathlib.Path(tempfile.mkdtemp(prefix="pop-dovecot-", dir="/tmp"))
    shared.chmod(0o755)
    try:
        users = write_users(tmp / "users", USERS)
        passwd = (users / "passwd").read_text().replace(f"zlow:x:{uid_of('zlow')}:", f"zlow:x:{LOW_UID}:")
        (users / "passwd").write_text(passwd)
        key = tmp / "shadow.key"
        write_key(key)
        cert, certkey = self_signed(shared, ips=("127.0.0.1", "127.0.0.6"))
        layout = make_root(shared / "spool")
        with PwServer(users, shadow_key=key) as pws:
            conf = client_conf(tmp / "pwserver.conf", pws.address, key)
            with Dovecot(shared / "dovecot", layout, conf, "127.0.0.6", tls=(cert, certkey)) as dove:
                settings = (
                    f'backends = {{dove = "127.0.0.6:{dove.port}"}}\nauth_failure_delay = {DELAY}\n'
                    f'tls_cert = "{cert}"\ntls_key = "{certkey}"\n'
                )
                with start_proxy(tmp, conf, settings) as proxy:
                    yield {"tmp": tmp, "layout": layout, "dovecot": dove, "proxy": proxy, "cert": cert, "conf": conf}
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def put(bed, user, body) -> str:
    uid = uid_of(user)
    return deliver(bed["layout"], user, body, uid, UID0)


def test_dovecot_sees_users_through_nss(bed):
    r = subprocess.run(
        ["doveadm", "-c", str(bed["dovecot"].conf), "user", "ana"], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0, r.stderr + bed["dovecot"].output()
    fields = dict(line.split(None, 1) for line in r.stdout.splitlines() if len(line.split(None, 1)) == 2)
    assert fields["uid"] == str(uid_of("ana"))
    assert os.path.normpath(fields["mail"].removeprefix("maildir:")) == str(bed["layout"].path("ana"))


def test_poplib_through_proxy_to_dovecot(bed):
    bodies = [message("dove one"), message("dove two", extra=b".dot\n")]
    paths = [put(bed, "ana", b) for b in bodies]
    src = socket.socket()
    src.bind(("127.0.0.9", 0))  # a client address the backend can only learn by XCLIENT
    src.settimeout(10)
    src.connect(bed["proxy"].address)
    p = poplib.POP3.__new__(poplib.POP3)
    p.host, p.port, p._tls_established, p._debugging = bed["proxy"].address[0], bed["proxy"].address[1], False, 0
    p.sock, p.file = src, src.makefile("rb")
    p.welcome = p._getresp()
    p.user("ana")
    assert p.pass_(USERS["ana"][0]).startswith(b"+OK")
    count, size = p.stat()
    assert count == 2 and size == sum(len(b) + b.count(b"\n") for b in bodies)
    _, uidls, _ = p.uidl()
    assert [u.split()[1].decode() for u in uidls] == [os.path.basename(x) for x in paths]
    for i, b in enumerate(bodies, 1):
        assert b"\n".join(p.retr(i)[1]) + b"\n" == b
    p.dele(1)
    p.quit()
    time.sleep(0.3)
    left = os.listdir(bed["layout"].path("ana") / "cur")
    assert [n.split(":")[0] for n in left] == [os.path.basename(paths[1])]
    assert "rip=127.0.0.9" in bed["dovecot"].output()


def test_uidl_same_as_pop3d_would_give(bed):
    """Moving a user between a pop3d store and a Dovecot store keeps UIDLs:
    both give the Maildir base name."""
    from pop.mailbox import MaildirMailbox

    put(bed, "elena", message("uidl"))
    p = poplib.POP3(*bed["proxy"].address, timeout=10)
    p.user("elena")
    p.pass_(USERS["elena"][0])
    dove_uidls = [u.split()[1].decode() for u in p.uidl()[1]]
    p.quit()
    with MaildirMailbox(bed["layout"].path("elena")) as box:
        assert [m.uidl for m in box.messages] == dove_uidls


def test_failures_through_proxy_to_dovecot_look_the_same(bed):
    answers, times = [], []
    for user, pw in (("bruno", "wrong"), ("nosuchuser", "wrong")):
        p = poplib.POP3(*bed["proxy"].address, timeout=10)
        p.user(user)
        t0 = time.monotonic()
        with pytest.raises(poplib.error_proto) as e:
            p.pass_(pw)
        times.append(time.monotonic() - t0)
        answers.append(e.value.args[0])
        p.close()
    assert answers == [b"-ERR [AUTH] Authentication failed."] * 2
    assert all(DELAY <= t < DELAY + 1.0 for t in times), times


@pytest.mark.parametrize("stls", [False, True], ids=["plain", "stls"])
def test_curl_to_dovecot(bed, stls):
    body = message(f"curl dove {stls}")
    put(bed, "bruno", body)
    cafile = bed["cert"] if stls else None
    r = curl_pop(bed["proxy"].address, "bruno", USERS["bruno"][0], "", cafile=cafile)
    assert r.returncode == 0, r.stderr
    n = len(r.stdout.strip().split(b"\r\n"))
    r = curl_pop(bed["proxy"].address, "bruno", USERS["bruno"][0], str(n), cafile=cafile)
    assert r.returncode == 0, r.stderr
    assert r.stdout == body.replace(b"\n", b"\r\n")


def test_mpop_to_dovecot(bed, tmp_path):
    bodies = [message(f"mpop dove {i}") for i in range(2)]
    for b in bodies:
        put(bed, "carla", b)
    rc, msgs, out = mpop_fetch(
        tmp_path, bed["proxy"].address, "carla", USERS["carla"][0], keep=False, cafile=bed["cert"]
    )
    assert rc == 0, out + bed["dovecot"].output()[-2000:]
    assert msgs == bodies
    assert os.listdir(bed["layout"].path("carla") / "cur") == []


def test_fetchmail_to_dovecot(bed, tmp_path):
    for i in range(2):
        put(bed, "dario", message(f"fetchmail dove {i}"))
    rc, msgs, out = fetchmail_fetch(tmp_path, bed["proxy"].address, "dario", USERS["dario"][0])
    assert rc == 0, out
    assert len(msgs) == 2
    rc, msgs, out = fetchmail_fetch(tmp_path, bed["proxy"].address, "dario", USERS["dario"][0])
    assert rc == 1, out  # UIDL remembered: nothing new


def test_trap_uid_below_first_valid_uid_is_refused(bed):
    put(bed, "zlow", message("never read"))
    p = poplib.POP3(*bed["proxy"].address, timeout=10)
    p.user("zlow")
    with pytest.raises(poplib.error_proto) as e:
        p.pass_(USERS["zlow"][0])
    assert e.value.args[0].startswith(b"-ERR [SYS/TEMP]")  # Dovecot's answer, passed on
    time.sleep(0.3)
    assert "Mail access for users with UID 500 not permitted" in bed["dovecot"].output()


def test_trap_root_owned_maildir_is_refused(bed):
    deliver(bed["layout"], "yroot", message("root owned"))  # no uid given: root-owned, 0700
    p = poplib.POP3(*bed["proxy"].address, timeout=10)
    p.user("yroot")
    with pytest.raises(poplib.error_proto) as e:
        p.pass_(USERS["yroot"][0])  # Dovecot may say +OK and then fail to open INBOX
        p.stat()
    assert e.value.args[0].startswith(b"-ERR [SYS/TEMP]")
    time.sleep(0.3)
    assert "dir owned by 0:0 mode=0700" in bed["dovecot"].output()


@pytest.mark.parametrize("mode", ["stls", "tls"])
def test_proxy_to_dovecot_over_tls(bed, mode):
    """backend_tls: STLS on the POP3 port, or implicit TLS on POP3S; the
    backend's certificate is verified against backend_ca."""
    dove = bed["dovecot"]
    port = dove.port if mode == "stls" else dove.pop3s_port
    settings = f'backends = {{dove = "127.0.0.6:{port}"}}\nbackend_tls = "{mode}"\nbackend_ca = "{bed["cert"]}"\n'
    body = message(f"over {mode}")
    put(bed, "bruno", body)
    with start_proxy(bed["tmp"], bed["conf"], settings, name=f"proxy-{mode}") as proxy:
        p = poplib.POP3(*proxy.address, timeout=10)
        p.user("bruno")
        p.pass_(USERS["bruno"][0])
        n, _ = p.stat()
        assert b"\n".join(p.retr(n)[1]) + b"\n" == body
        p.quit()
    wrong_ca = (
        f'backends = {{dove = "127.0.0.6:{port}"}}\nbackend_tls = "{mode}"\n'
        f'backend_ca = "/etc/ssl/certs/ca-certificates.crt"\nbackend_retries = 0\n'
    )
    with start_proxy(bed["tmp"], bed["conf"], wrong_ca, name=f"proxy-{mode}-badca") as proxy:
        p = poplib.POP3(*proxy.address, timeout=10)
        p.user("bruno")
        with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
            p.pass_(USERS["bruno"][0])


def test_dovecot_logged_no_errors(bed):
    log = bed["dovecot"].output()
    assert "Login: user=<ana>" in log
    bad = [
        ln
        for ln in log.splitlines()
        if (": Error:" in ln or ": Fatal:" in ln or ": Panic:" in ln) and "zlow" not in ln and "yroot" not in ln
    ]
    assert bad == []
    for pw, _ in USERS.values():
        assert pw not in log
