"""A mailbox moved by the real `pwmail move` while an IMAP session is open
through imap-proxy (the bed of tests/support/imap_util.py: Dovecot IMAP on
two stores): the session is closed by the proxy with `* BYE [UNAVAILABLE]`
while the move waits in `settle`, the move finishes, and the next login
lands on the new store with every message."""

from __future__ import annotations

import imaplib
import socket
import subprocess

import pytest

from tests.support import pwtest
from tests.support.imap_util import DOVECOT_IMAP_MARKS, imap_bed, put
from tests.support.pop_util import message

pytestmark = DOVECOT_IMAP_MARKS

TIMEOUT = 20
SETTLE = 8.0  # pwmail move --settle: above the proxy's kick_check_interval (3 s by default)
USERS = {"mover": ("mover-imap", "store1"), "stayer": ("stayer-imap", "store1")}


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    with imap_bed(tmp_path_factory.mktemp("imapmove"), USERS, delay=0.2) as b:
        yield b


def move(bed, user: str, to: str) -> subprocess.Popen:
    argv = pwtest.move_argv(
        [user],
        to,
        mailhosts=bed["users_dir"] / "mailhosts",
        pwserver=bed["pwserver"],
        journal=bed["tmp"] / "journal",
        roots={store: layout.root for store, layout in bed["layouts"].items()},
    )
    argv += ["--settle", str(SETTLE), "--layout", "first3"]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def login(bed, user: str) -> socket.socket:
    s = socket.create_connection(bed["proxy"].address, timeout=TIMEOUT)
    s.recv(4096)
    s.sendall(b"a1 LOGIN %s %s\r\na2 SELECT INBOX\r\n" % (user.encode(), USERS[user][0].encode()))
    data = b""
    while b"a2 OK" not in data:
        chunk = s.recv(65536)
        assert chunk, data
        data += chunk
    return s


def test_open_session_is_kicked_by_the_move(bed):
    bodies = [message(f"moving {i}") for i in range(3)]
    for body in bodies:
        put(bed, "mover", body)
    put(bed, "stayer", message("staying"))
    mover, stayer = login(bed, "mover"), login(bed, "stayer")

    proc = move(bed, "mover", "store2")
    mover.settimeout(SETTLE + 30)
    seen = b""
    while chunk := mover.recv(65536):  # the proxy closes it while the move settles
        seen += chunk
    assert seen.endswith(b"* BYE [UNAVAILABLE] Mailbox is being moved, log in again in a few minutes.\r\n"), seen
    assert proc.poll() is None, "the move finished before the session was kicked"
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out + err

    stayer.sendall(b"n1 NOOP\r\n")  # the other user's session is untouched
    assert b"n1 OK" in stayer.recv(65536)
    stayer.close()

    m = imaplib.IMAP4(*bed["proxy"].address, timeout=TIMEOUT)
    m.login("mover", USERS["mover"][0])
    n = int(m.select("INBOX", readonly=True)[1][0])
    got = [m.fetch(str(i), "(BODY.PEEK[])")[1][0][1].replace(b"\r\n", b"\n") for i in range(1, n + 1)]
    m.logout()
    assert sorted(got) == sorted(bodies)
    assert "Login: user=<mover>" in bed["dove"]["store2"].output()
    assert "kick user=mover" in bed["proxy"].output()
