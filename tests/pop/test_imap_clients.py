"""Real synchronising IMAP clients through imap-proxy in front of Dovecot
(the bed of test_imap_proxy.py, tests/support/imap_util.py): mbsync (isync)
over STARTTLS and offlineimap3 over IMAPS sync a user's INBOX both ways.
Messages delivery's writer puts in the hashed Maildir appear in the local
Maildir; a flag changed, a message deleted and one added locally go back
and are seen through IMAP (through the proxy) and POP (Dovecot's)."""

from __future__ import annotations

import imaplib
import pathlib
import poplib
import re
import ssl
import subprocess

import pytest

from tests.support.imap_util import DOVECOT_IMAP_MARKS, imap_bed, put
from tests.support.pop_util import message

pytestmark = DOVECOT_IMAP_MARKS

TIMEOUT = 20
SYNC_TIMEOUT = 120  # one sync run of a client, on a loaded machine
USERS = {
    "mia": ("mia-imap", "store1"),  # mbsync's
    "olaf": ("olaf-imap", "store2"),  # offlineimap's
}


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    with imap_bed(tmp_path_factory.mktemp("imapc"), USERS, delay=0.2) as b:
        yield b


# --- the clients ---------------------------------------------------------------------------
def mbsync_config(bed, user: str, local: pathlib.Path) -> pathlib.Path:
    _, port = bed["proxy"].address
    conf = local.parent / "mbsyncrc"
    conf.write_text(f"""IMAPAccount proxy
Host localhost
Port {port}
User {user}
Pass {USERS[user][0]}
SSLType STARTTLS
CertificateFile {bed["cert"]}
AuthMechs PLAIN

IMAPStore far
Account proxy

MaildirStore near
Path {local}/
Inbox {local}/INBOX

Channel inbox
Far :far:
Near :near:
Patterns INBOX
Create Near
Expunge Both
Sync All
SyncState *
""")
    return conf


# Both clients match the certificate's names only (not its addresses): "localhost" is its CN.
def mbsync(bed, user: str, local: pathlib.Path) -> None:
    conf = mbsync_config(bed, user, local)
    r = subprocess.run(
        ["mbsync", "-c", str(conf), "inbox"], capture_output=True, text=True, timeout=SYNC_TIMEOUT, cwd=local.parent
    )
    assert r.returncode == 0, r.stdout + r.stderr


def offlineimap(bed, user: str, local: pathlib.Path) -> None:
    _, port = bed["imaps"]
    conf = local.parent / "offlineimaprc"
    conf.write_text(f"""[general]
accounts = proxy
metadata = {local.parent}/offlineimap-meta
ui = basic

[Account proxy]
localrepository = near
remoterepository = far

[Repository near]
type = Maildir
localfolders = {local}

[Repository far]
type = IMAP
remotehost = localhost
remoteport = {port}
remoteuser = {user}
remotepass = {USERS[user][0]}
ssl = yes
sslcacertfile = {bed["cert"]}
folderfilter = lambda folder: folder == "INBOX"
expunge = yes
""")
    r = subprocess.run(
        ["offlineimap", "-c", str(conf), "-o", "-u", "basic"],
        capture_output=True,
        text=True,
        timeout=SYNC_TIMEOUT,
        cwd=local.parent,
    )
    assert r.returncode == 0 and "ERROR" not in r.stdout + r.stderr, r.stdout + r.stderr


# --- the local Maildir -----------------------------------------------------------------------
def local_files(local: pathlib.Path) -> dict[str, pathlib.Path]:
    """{Subject: file} of the messages in the local INBOX."""
    found = {}
    for f in local.rglob("*"):
        if f.is_file() and f.parent.name in ("cur", "new"):
            m = re.search(rb"^Subject: (.*?)\r?$", f.read_bytes(), re.M)
            if m:
                found[m.group(1).decode()] = f
    return found


def set_local_flags(f: pathlib.Path, flags: str) -> None:
    """As a mail reader does: the file into cur/ with the Maildir info `:2,<flags>`."""
    base = f.name.split(":2,", 1)[0]
    f.rename(f.parent.parent / "cur" / f"{base}:2,{flags}")


def add_local(local: pathlib.Path, body: bytes, name: str) -> None:
    box = next(p.parent for p in local.rglob("cur") if p.is_dir())
    (box / "new" / name).write_bytes(body)


# --- what IMAP and POP see -------------------------------------------------------------------
def imap_view(bed, user: str) -> dict[str, bytes]:
    """{Subject: FLAGS} of the user's INBOX through the proxy (STARTTLS)."""
    m = imaplib.IMAP4(*bed["proxy"].address, timeout=TIMEOUT)
    m.starttls(ssl.create_default_context(cafile=bed["cert"]))
    m.login(user, USERS[user][0])
    m.select("INBOX", readonly=True)
    typ, data = m.fetch("1:*", "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    m.logout()
    assert typ == "OK"
    view = {}
    for item in data:
        if isinstance(item, tuple):
            flags = re.search(rb"FLAGS \(([^)]*)\)", item[0]).group(1)
            subject = re.search(rb"Subject: (.*?)\r\n", item[1]).group(1).decode()
            view[subject] = flags
    return view


def pop_subjects(bed, user: str) -> set[str]:
    """Subjects POP sees (Dovecot's POP3 on the user's store, same Maildir)."""
    dove = bed["dove"][USERS[user][1]]
    p = poplib.POP3(dove.host, dove.pop3_port, timeout=TIMEOUT)
    p.user(user)
    p.pass_(USERS[user][0])
    subjects = set()
    for i in range(1, len(p.list()[1]) + 1):
        for line in p.top(i, 0)[1]:
            if line.startswith(b"Subject: "):
                subjects.add(line[9:].decode())
    p.quit()
    return subjects


@pytest.mark.parametrize("client", ["mbsync", "offlineimap"])
def test_sync_both_ways_through_proxy(bed, tmp_path, client):
    user = "mia" if client == "mbsync" else "olaf"
    sync = mbsync if client == "mbsync" else offlineimap
    local = tmp_path / "mail"
    local.mkdir()
    for subject in ("keep", "flag me", "delete me"):
        put(bed, user, message(f"{client} {subject}"))

    sync(bed, user, local)
    got = local_files(local)
    assert {f"{client} keep", f"{client} flag me", f"{client} delete me"} <= set(got), got

    # Locally: one flagged and read, one deleted, one new; and one more delivered meanwhile.
    set_local_flags(got[f"{client} flag me"], "FS")
    got[f"{client} delete me"].unlink()
    add_local(local, message(f"{client} written here"), f"1700000000.local{client}.host")
    put(bed, user, message(f"{client} delivered later"))

    sync(bed, user, local)
    assert f"{client} delivered later" in local_files(local)
    view = imap_view(bed, user)
    assert f"{client} delete me" not in view, view
    assert set(view[f"{client} flag me"].split()) >= {b"\\Flagged", b"\\Seen"}, view
    assert b"\\Flagged" not in view[f"{client} keep"]
    assert f"{client} written here" in view
    pop = pop_subjects(bed, user)
    assert f"{client} delete me" not in pop and {f"{client} keep", f"{client} written here"} <= pop, pop
