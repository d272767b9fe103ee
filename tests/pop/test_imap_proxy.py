"""imap-proxy in front of real Dovecot 2.3 IMAP (docs/imap.md's block,
verbatim): userdb passwd and passdb shadow through libnss_pwserver in a
private mount namespace, the hashed Maildirs that delivery writes. Real
clients: Python's imaplib and curl."""

from __future__ import annotations

import base64
import imaplib
import os
import pathlib
import poplib
import re
import signal
import socket
import ssl
import subprocess
import time

import pytest

from tests.support import imap_util
from tests.support.imap_util import DOVECOT_IMAP_MARKS, DovecotImap, docs_block, imap_bed, put, start_imap_proxy
from tests.support.pop_util import (
    UID0,
    deliver,
    make_root,
    message,
)

pytestmark = DOVECOT_IMAP_MARKS

DELAY = 0.5
TIMEOUT = 20
USERS = {
    "ana": ("ana imap", "store1"),
    "bruno": ("bruno-imap", "store2"),
    "carla": ('ca"rla\\', "store1"),
    "dario": ("dario-imap", "doomed"),
    "elena": ("elena-imap", "store1"),
    "frozen": ("frozen-imap", "store1"),
    "gone": ("gone-imap", "nowhere"),
}


def uid_of(user: str) -> int:
    return imap_util.uid_of(USERS, user)


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    with imap_bed(tmp_path_factory.mktemp("imap"), USERS, frozen={"frozen"}, delay=DELAY) as b:
        yield b


class SourcedIMAP4(imaplib.IMAP4):
    """imaplib from a chosen loopback address (one Dovecot can learn only through ID)."""

    def __init__(self, address: tuple[str, int], source: str):
        self.source = source
        super().__init__(*address, timeout=TIMEOUT)

    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout, source_address=(self.source, 0))


def descendants(pid: int) -> list[int]:
    """The processes below `pid` (ours: the test started it), by /proc."""
    parents = {}
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        found += kids
        frontier += kids
    return found


def raw(bed, address=None) -> socket.socket:
    s = socket.create_connection(address or bed["proxy"].address, timeout=TIMEOUT)
    assert read_until(s, b"\r\n").startswith(b"* OK [CAPABILITY ")
    return s


def read_until(s: socket.socket, end: bytes, limit: int = 1 << 20) -> bytes:
    data = b""
    while not data.endswith(end):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
        assert len(data) < limit
    return data


def tagged(s: socket.socket, tag: bytes) -> bytes:
    """Everything up to and with the tagged answer to `tag`."""
    data = b""
    while not re.search(rb"(^|\r\n)" + re.escape(tag) + rb" (OK|NO|BAD)[^\r\n]*\r\n$", data):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_dovecot_runs_the_documented_block(bed):
    dove = bed["dove"]["store1"]
    documented = dove.workdir / "local-imap.conf"
    assert documented.read_text() == docs_block()
    assert f"!include {documented}\n" in dove.conf.read_text()
    r = subprocess.run(
        ["doveconf", "-c", str(dove.conf), "-h", "protocols"], capture_output=True, text=True, timeout=30
    )
    assert r.stdout.split() == ["imap", "pop3"], r.stderr


def test_login_select_fetch_through_proxy(bed):
    body = message("imap one")
    put(bed, "ana", body)
    m = SourcedIMAP4(bed["proxy"].address, "127.0.0.9")
    typ, caps = m.login("ana", USERS["ana"][0])
    assert typ == "OK"
    # CAPABILITY now goes to Dovecot: post-login ones the proxy never offers itself.
    caps = m.capability()[1][0].split()
    assert b"SORT" in caps and b"AUTH=PLAIN" not in caps
    typ, data = m.select("INBOX")
    assert typ == "OK" and int(data[0]) >= 1
    typ, data = m.fetch(data[0].decode(), "(RFC822)")
    assert typ == "OK" and data[0][1].replace(b"\r\n", b"\n") == body
    m.logout()
    log = bed["dove"]["store1"].output()
    assert re.search(r"imap-login: Info: Login: user=<ana>.*rip=127\.0\.0\.9", log), log[-2000:]


def test_authenticate_plain_with_continuation(bed):
    put(bed, "elena", message("plain"))
    m = imaplib.IMAP4(*bed["proxy"].address, timeout=TIMEOUT)
    typ, _ = m.authenticate("PLAIN", lambda _: b"\0elena\0" + USERS["elena"][0].encode())
    assert typ == "OK"
    assert m.select("INBOX")[0] == "OK"
    m.logout()


def test_authenticate_plain_sasl_ir_and_quoted_password(bed):
    put(bed, "carla", message("authenticate_plain_sasl_ir_and_quoted_password"))
    s = raw(bed)
    ir = base64.b64encode(b"\0carla\0" + USERS["carla"][0].encode())
    s.sendall(b"x1 AUTHENTICATE PLAIN " + ir + b"\r\n")
    # The tagged OK carries the backend's post-login capabilities (SORT is not the proxy's).
    assert re.match(rb"x1 OK \[CAPABILITY [^\]]*SORT", tagged(s, b"x1"))
    s.sendall(b"x2 LOGOUT\r\n")
    assert b"x2 OK" in tagged(s, b"x2")
    s.close()
    m = imaplib.IMAP4(*bed["proxy"].address, timeout=TIMEOUT)
    assert m.login("carla", USERS["carla"][0])[0] == "OK"  # imaplib quotes the " and \
    m.logout()


def test_literals_sync_and_nonsync_login(bed):
    put(bed, "ana", message("literals_sync_and_nonsync_login"))
    s = raw(bed)
    pw = USERS["ana"][0].encode()
    s.sendall(b"l1 LOGIN {3}\r\n")
    assert read_until(s, b"\r\n").startswith(b"+ ")
    s.sendall(b"ana {%d+}\r\n%s\r\n" % (len(pw), pw))
    assert re.match(rb"l1 OK \[CAPABILITY ", tagged(s, b"l1"))
    s.sendall(b"l2 SELECT INBOX\r\n")
    assert b"l2 OK" in tagged(s, b"l2")
    s.close()


def test_starttls_then_login(bed):
    put(bed, "ana", message("starttls_then_login"))
    ctx = ssl.create_default_context(cafile=bed["cert"])
    m = imaplib.IMAP4(*bed["proxy"].address, timeout=TIMEOUT)
    assert "STARTTLS" in m.capabilities
    m.starttls(ctx)
    assert "STARTTLS" not in m.capabilities
    assert m.login("ana", USERS["ana"][0])[0] == "OK"
    assert m.select("INBOX")[0] == "OK"
    m.logout()


def test_imaps(bed):
    put(bed, "ana", message("imaps"))
    ctx = ssl.create_default_context(cafile=bed["cert"])
    m = imaplib.IMAP4_SSL(*bed["imaps"], ssl_context=ctx, timeout=TIMEOUT)
    assert m.login("ana", USERS["ana"][0])[0] == "OK"
    assert m.select("INBOX")[0] == "OK"
    m.logout()


def test_idle_woken_by_delivery(bed):
    s = raw(bed)
    put(bed, "bruno", message("before idle"))
    s.sendall(b"i1 LOGIN bruno bruno-imap\r\ni2 SELECT INBOX\r\n")
    sel = tagged(s, b"i2")
    assert b"i1 OK" in sel
    exists = int(re.search(rb"\* (\d+) EXISTS", sel).group(1))
    s.sendall(b"i3 IDLE\r\n")
    assert read_until(s, b"\r\n").startswith(b"+ ")
    put(bed, "bruno", message("wake up"))
    s.settimeout(60)  # Dovecot notices new mail through inotify, at worst at its next check
    seen = b""
    while not re.search(rb"\* %d EXISTS\r\n" % (exists + 1), seen):
        chunk = s.recv(65536)
        assert chunk, seen
        seen += chunk
    s.sendall(b"DONE\r\n")
    assert b"i3 OK" in tagged(s, b"i3")
    s.close()


def test_curl_imap(bed):
    body = message("for curl")
    put(bed, "elena", body)
    m = imaplib.IMAP4(*bed["proxy"].address, timeout=TIMEOUT)
    m.login("elena", USERS["elena"][0])
    n = int(m.select("INBOX")[1][0])
    m.logout()
    r = subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            str(TIMEOUT),
            "-u",
            f"elena:{USERS['elena'][0]}",
            f"imap://{bed['proxy'].address[0]}:{bed['proxy'].address[1]}/INBOX;MAILINDEX={n}",
        ],
        capture_output=True,
        timeout=TIMEOUT + 5,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.replace(b"\r\n", b"\n") == body
    r = subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            str(TIMEOUT),
            "-u",
            "elena:wrong",
            f"imap://{bed['proxy'].address[0]}:{bed['proxy'].address[1]}/INBOX",
        ],
        capture_output=True,
        timeout=TIMEOUT + 5,
    )
    assert r.returncode == 67, r  # CURLE_LOGIN_DENIED


def _failed_login(bed, user: str, password: str) -> tuple[bytes, float]:
    s = raw(bed)
    started = time.monotonic()
    s.sendall(b"f1 LOGIN " + user.encode() + b" " + password.encode() + b"\r\n")
    answer = tagged(s, b"f1")
    took = time.monotonic() - started
    s.close()
    return answer, took


def test_wrong_password_and_unknown_user_look_the_same(bed):
    wrong, t_wrong = _failed_login(bed, "ana", "not-it")
    unknown, t_unknown = _failed_login(bed, "nosuchuser", "not-it")
    assert wrong == unknown == b"f1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
    # Both leave auth_failure_delay after the credentials (generous upper bound for a loaded machine).
    assert DELAY <= t_wrong < DELAY + 10 and DELAY <= t_unknown < DELAY + 10


def test_unavailable_and_inuse_codes(bed):
    gone, _ = _failed_login(bed, "gone", USERS["gone"][0])
    assert gone.startswith(b"f1 NO [UNAVAILABLE] ")
    frozen, _ = _failed_login(bed, "frozen", USERS["frozen"][0])
    assert frozen.startswith(b"f1 NO [INUSE] ")


def test_two_stores_each_user_routed_to_theirs(bed):
    a_body, b_body = message("for ana on store1"), message("for bruno on store2")
    put(bed, "ana", a_body)
    put(bed, "bruno", b_body)
    for user, body, store in (("ana", a_body, "store1"), ("bruno", b_body, "store2")):
        m = imaplib.IMAP4(*bed["proxy"].address, timeout=TIMEOUT)
        m.login(user, USERS[user][0])
        n = m.select("INBOX")[1][0].decode()
        got = m.fetch(n, "(RFC822)")[1][0][1].replace(b"\r\n", b"\n")
        m.logout()
        assert got == body
        log = bed["dove"][store].output()
        assert f"Login: user=<{user}>" in log
        other = bed["dove"]["store2" if store == "store1" else "store1"].output()
        assert f"Login: user=<{user}>" not in other


def test_imap_deletion_seen_by_pop(bed):
    body = message("delete me")
    path = put(bed, "elena", body)
    m = imaplib.IMAP4(*bed["proxy"].address, timeout=TIMEOUT)
    m.login("elena", USERS["elena"][0])
    m.select("INBOX")
    typ, nums = m.search(None, "SUBJECT", '"delete me"')
    assert typ == "OK" and nums[0]
    m.store(nums[0].split()[-1].decode(), "+FLAGS", "\\Deleted")
    m.expunge()
    m.logout()
    dove = bed["dove"]["store1"]
    p = poplib.POP3(dove.host, dove.pop3_port, timeout=TIMEOUT)
    p.user("elena")
    p.pass_(USERS["elena"][0])
    uidls = [u.split()[1].decode() for u in p.uidl()[1]]
    p.quit()
    assert os.path.basename(path) not in uidls and uidls


def test_unfinished_literal_is_cut_by_prelogin_timeout(bed, tmp_path):
    with start_imap_proxy(
        tmp_path, bed["conf"], bed["settings"].replace('tls_listen = "127.0.0.1:0"\n', "") + "prelogin_timeout = 1.0\n"
    ) as proxy:
        s = raw(bed, proxy.address)
        s.sendall(b"t1 LOGIN {64}\r\n")
        assert read_until(s, b"\r\n").startswith(b"+ ")
        s.sendall(b"only a few")
        started = time.monotonic()
        rest = read_until(s, b"\x00")  # until the proxy closes
        assert rest == b"* BYE Disconnected for inactivity.\r\n"
        assert time.monotonic() - started < 15
        s.close()


def test_backend_killed_mid_session_closes_client(bed):
    layout = make_root(bed["shared"] / "doomed")
    deliver(layout, "dario", message("doomed"), uid_of("dario"), UID0)  # (the Maildir, owned by dario)
    with DovecotImap(bed["shared"] / "dove-doomed", layout, bed["conf"], "127.0.0.8") as dove:
        settings = bed["settings"].replace("store1 =", f'doomed = "127.0.0.8:{dove.port}", store1 =')
        settings = settings.replace('tls_listen = "127.0.0.1:0"\n', "")
        with start_imap_proxy(bed["tmp"], bed["conf"], settings, name="imap-proxy-doomed") as proxy:
            s = raw(bed, proxy.address)
            s.sendall(b"k1 LOGIN dario dario-imap\r\nk2 SELECT INBOX\r\n")
            answers = tagged(s, b"k2")
            assert b"k1 OK" in answers and b"k2 OK" in answers
            # The store crashes: Dovecot's master and every process under it (the session's imap).
            for pid in [dove.proc.pid, *descendants(dove.proc.pid)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            s.settimeout(30)
            tail = b""
            while chunk := s.recv(65536):  # the proxy closes the client's side: EOF, not a hang
                tail += chunk
                assert len(tail) < 65536
            s.close()
            assert proxy.proc.poll() is None
            assert "Traceback" not in proxy.output()


def test_long_literals_both_ways(bed):
    """A 3 MiB APPEND literal up and its FETCH down pass the relay untouched."""
    big = message("big", lines=3) + b"".join(b"%07d %s\r\n" % (i, b"x" * 60) for i in range(3 * 1024 * 1024 // 70))
    big = big.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    put(bed, "elena", message("before the big one"))  # (the Maildir, owned by elena)
    m = imaplib.IMAP4(*bed["proxy"].address, timeout=60)
    m.login("elena", USERS["elena"][0])
    typ, data = m.append("INBOX", None, None, big)
    assert typ == "OK", data
    uid = re.search(rb"\[APPENDUID \d+ (\d+)\]", data[0]).group(1).decode()  # (UIDPLUS)
    m.select("INBOX")
    typ, data = m.uid("FETCH", uid, "(BODY.PEEK[])")
    m.logout()
    assert typ == "OK" and data[0][1] == big


@pytest.mark.parametrize("mode", ["tls", "starttls"])
def test_backend_over_tls(bed, tmp_path, mode):
    put(bed, "ana", message(f"over {mode}"))
    dove = bed["dove"]["store1"]
    port = dove.imaps_port if mode == "tls" else dove.port
    settings = bed["settings"].replace(f'store1 = "127.0.0.6:{dove.port}"', f'store1 = "127.0.0.6:{port}"')
    settings = settings.replace('tls_listen = "127.0.0.1:0"\n', "")
    settings += f'backend_tls = "{mode}"\nbackend_ca = "{bed["cert"]}"\n'
    with start_imap_proxy(tmp_path, bed["conf"], settings, name=f"imap-proxy-{mode}") as proxy:
        m = imaplib.IMAP4(*proxy.address, timeout=TIMEOUT)
        assert m.login("ana", USERS["ana"][0])[0] == "OK"
        assert m.select("INBOX")[0] == "OK"
        m.logout()
    assert re.search(r"Login: user=<ana>.*, TLS", dove.output())


def test_curl_imaps(bed):
    put(bed, "ana", message("curl imaps"))
    r = subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            str(TIMEOUT),
            "--cacert",
            bed["cert"],
            "-u",
            f"ana:{USERS['ana'][0]}",
            f"imaps://{bed['imaps'][0]}:{bed['imaps'][1]}/",
            "-X",
            "EXAMINE INBOX",
        ],
        capture_output=True,
        timeout=TIMEOUT + 5,
    )
    assert r.returncode == 0, r.stderr
    assert re.search(rb"\* \d+ EXISTS", r.stdout), r.stdout
