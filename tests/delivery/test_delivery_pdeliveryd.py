"""pdeliveryd end to end: real processes (pwserver, pdeliveryd), real LMTP
clients (smtplib.LMTP and raw pipelined sessions)."""

import os
import signal
import smtplib
import socket
import subprocess
import time

import pytest

from delivery.layout import MailboxLayout
from tests.support import pwtest
from tests.support.delivery_util import (
    NAME_RE,
    Pdeliveryd,
    client_conf,
    codes,
    env_with,
    free_port_on,
    lmtp_session,
    messages,
    users_served,
    wait_for,
    write_users,
)

STORE = "127.0.0.2"
MSG = b"From: a@example.org\r\nSubject: hola\r\n\r\nline 1\r\n.dotted\r\n\xc3\xb1 8bit\r\n"


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    d = tmp_path_factory.mktemp("pdeliveryd")
    with users_served(d) as (pw, conf, env):
        port = free_port_on([STORE])
        with Pdeliveryd(d / "root", STORE, port, env) as srv:
            yield {
                "dir": d,
                "pw": pw,
                "env": env,
                "conf": conf,
                "srv": srv,
                "port": port,
                "layout": MailboxLayout(d / "root"),
            }


def lmtp(bed):
    return smtplib.LMTP(STORE, bed["port"], timeout=10)


def test_delivers_durably_into_hashed_maildir(bed):
    with lmtp(bed) as c:
        refused = c.sendmail("a@example.org", ["juan@example.org"], MSG)
    assert refused == {}
    box = bed["layout"].path("juan")
    assert box == bed["dir"] / "root/j/u/a/juan"
    files = messages(box)
    assert len(files) == 1
    content = files[0].read_bytes()
    assert content == (b"Return-Path: <a@example.org>\nDelivered-To: juan@example.org\n" + MSG.replace(b"\r\n", b"\n"))
    m = NAME_RE.match(files[0].name)
    assert m and int(m.group(6)) == len(content) and int(m.group(7)) == len(content) + content.count(b"\n")
    assert int(m.group(3)) == bed["srv"].proc.pid
    st = os.stat(box)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (2001, 2001, 0o700)
    for sub in ("cur", "new", "tmp"):
        s = os.stat(box / sub)
        assert (s.st_uid, s.st_gid, s.st_mode & 0o777) == (2001, 2001, 0o700)
    f = os.stat(files[0])
    assert (f.st_uid, f.st_gid, f.st_mode & 0o777) == (2001, 2001, 0o600)
    assert list((box / "tmp").iterdir()) == []


def test_per_recipient_answers_pipelined_data_and_bdat(bed):
    script = (
        b"LHLO mx\r\nMAIL FROM:<s@x> BODY=8BITMIME\r\nRCPT TO:<ana@x>\r\nRCPT TO:<nadie@x>\r\n"
        b"RCPT TO:<mudando@x>\r\nRCPT TO:<Ana+list@y>\r\nRCPT TO:<../etc@x>\r\nDATA\r\n"
        b"Subject: p\r\n\r\n..x\r\n.\r\n"
        b"MAIL FROM:<s@x>\r\nRCPT TO:<ana@x>\r\nBDAT 6\r\nabc\r\n.BDAT 4 LAST\r\nxyz\nQUIT\r\n"
    )
    before = len(messages(bed["layout"].path("ana")))
    out = lmtp_session(STORE, bed["port"], script)
    assert codes(out) == [
        "220",
        "250",
        "250",
        "250",
        "550",
        "450",
        "250",
        "550",
        "354",
        "250",
        "250",
        "250",
        "250",
        "250",
        "250",
        "221",
    ], out
    assert b"550 5.1.1" in out and b"450 4.2.1" in out and b"550 5.1.3" in out
    got = [p.read_bytes() for p in messages(bed["layout"].path("ana"))[before:]]
    # ana@x and Ana+list@y name one mailbox: one copy of that transaction (issue 13)
    assert len(got) == 2
    bodies = sorted(g.split(b"\n", 2)[2] for g in got)
    assert bodies == sorted([b"Subject: p\n\n.x\n", b"abc\n.xyz\n"])
    assert not bed["layout"].path("mudando").exists()


def test_loop_refused(bed):
    looped = b"Delivered-To: JUAN@other.example\r\nSubject: l\r\n\r\nx\r\n"
    with lmtp(bed) as c:
        with pytest.raises(smtplib.SMTPDataError) as e:
            c.sendmail("a@x", ["juan@x"], looped)
    assert e.value.smtp_code == 550 and b"5.4.6" in e.value.smtp_error


def test_duplicate_queue_id_acknowledged_once(bed):
    box = bed["layout"].path("pepe")
    # pepe lives on 127.0.0.3, but this store accepts all (no mailhost_names)
    n0 = len(messages(box))
    for _ in range(3):
        out = lmtp_session(
            STORE,
            bed["port"],
            b"LHLO mx\r\nMAIL FROM:<s@x> XQUEUEID=4AU0Q1a\r\n"
            b"RCPT TO:<pepe@x>\r\nDATA\r\nSubject: d\r\n\r\nsame\r\n.\r\nQUIT\r\n",
        )
        assert codes(out)[-2:] == ["250", "221"]
    assert len(messages(box)) == n0 + 1
    # the queue id from the MTA's Received header works too; other bytes are another message
    rcvd = b"Received: from a by mx.example (8.17.1/8.17.1) with ESMTP id 4AU0Q2b for <pepe>;\r\n x\r\n"
    for body in (b"one", b"one", b"two"):
        with lmtp(bed) as c:
            assert c.sendmail("a@x", ["pepe@x"], rcvd + b"Subject: r\r\n\r\n" + body + b"\r\n") == {}
    assert len(messages(box)) == n0 + 3


def test_many_sessions_at_once(bed):
    import concurrent.futures as cf

    def one(i):
        with lmtp(bed) as c:
            return c.sendmail("a@x", ["jo@x"], b"Subject: %d\r\n\r\nbody %d\r\n" % (i, i))

    n0 = len(messages(bed["layout"].path("jo")))
    with cf.ThreadPoolExecutor(64) as ex:
        assert all(r == {} for r in ex.map(one, range(200)))
    files = messages(bed["layout"].path("jo"))
    assert len(files) == n0 + 200
    assert len({f.name for f in files}) == len(files)


def test_tmp_cleaned_after_36_hours(tmp_path, bed):
    with lmtp(bed) as c:
        c.sendmail("a@x", ["ana@x"], b"Subject: first\r\n\r\nx\r\n")  # the Maildir exists
    box = bed["layout"].path("ana")
    old, fresh = box / "tmp" / "old.M1P1Q1.h", box / "tmp" / "fresh.M1P1Q2.h"
    old.write_bytes(b"x")
    fresh.write_bytes(b"y")
    t = time.time() - 37 * 3600
    os.utime(old, (t, t))
    # a fresh pdeliveryd has not scanned ana's tmp/ yet: its first delivery does
    port = free_port_on(["127.0.0.4"])
    with Pdeliveryd(bed["dir"] / "root", "127.0.0.4", port, bed["env"], init_root=False):
        with smtplib.LMTP("127.0.0.4", port) as c:
            c.sendmail("a@x", ["ana@x"], b"Subject: t\r\n\r\nx\r\n")
    assert not old.exists() and fresh.exists()
    fresh.unlink()


def test_unmounted_or_missing_root_is_temporary(tmp_path, bed):
    empty = tmp_path / "mnt"  # a mount point with nothing mounted: no marker
    empty.mkdir()
    port = free_port_on(["127.0.0.5"])
    with Pdeliveryd(empty, "127.0.0.5", port, bed["env"], init_root=False) as srv:
        with smtplib.LMTP("127.0.0.5", port) as c:
            with pytest.raises(smtplib.SMTPDataError) as e:
                c.sendmail("a@x", ["juan@x"], b"Subject: t\r\n\r\nx\r\n")
        assert e.value.smtp_code == 451
        assert list(empty.iterdir()) == []  # no tree created
        os.rmdir(empty)  # root gone altogether
        with smtplib.LMTP("127.0.0.5", port) as c:
            with pytest.raises(smtplib.SMTPDataError) as e:
                c.sendmail("a@x", ["juan@x"], b"Subject: t\r\n\r\nx\r\n")
        assert e.value.smtp_code == 451
        assert "storage root" in srv.output()


def test_disk_full_is_452_and_nothing_half_written(tmp_path, bed):
    root = tmp_path / "small"
    port = free_port_on(["127.0.0.6"])
    prelude = f"mount -t tmpfs -o size=256k tmpfs {root} && {pwtest.BIN}/pdeliveryd --root {root} --init-root && "
    with Pdeliveryd(
        root, "127.0.0.6", port, bed["env"], wrap=["unshare", "--mount", "--propagation", "private"], prestart=prelude
    ) as srv:
        inside = f"/proc/{srv.proc.pid}/root{root}"
        with smtplib.LMTP("127.0.0.6", port) as c:
            assert c.sendmail("a@x", ["juan@x"], b"Subject: small\r\n\r\nfits\r\n") == {}
            with pytest.raises(smtplib.SMTPDataError) as e:
                c.sendmail("a@x", ["juan@x"], b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 400)
            assert e.value.smtp_code == 452 and b"4.3.1" in e.value.smtp_error
        box = f"{inside}/j/u/a/juan"
        assert len(os.listdir(f"{box}/new")) == 1
        assert os.listdir(f"{box}/tmp") == []
        with open(os.path.join(f"{box}/new", os.listdir(f"{box}/new")[0]), "rb") as f:
            assert f.read().endswith(b"fits\n")


def test_pwserver_down_is_temporary(tmp_path, bed):
    conf = client_conf(tmp_path / "dead.conf", ["127.0.0.1:9"], timeout_ms=200)
    port = free_port_on(["127.0.0.7"])
    with Pdeliveryd(bed["dir"] / "root", "127.0.0.7", port, env_with(conf), init_root=False):
        out = lmtp_session("127.0.0.7", port, b"LHLO mx\r\nMAIL FROM:<s@x>\r\nRCPT TO:<juan@x>\r\nQUIT\r\n")
    assert codes(out) == ["220", "250", "250", "451", "221"] and b"4.4.3" in out


def test_limits_sessions_idle_size_recipients(tmp_path, bed):
    settings = tmp_path / "pwmail.toml"
    settings.write_text(
        "[delivery]\nsessions_max = 3\nidle_timeout = 1.0\nmessage_size_max = 1000\nrecipients_max = 2\n"
    )
    port = free_port_on(["127.0.0.8"])
    with Pdeliveryd(bed["dir"] / "root", "127.0.0.8", port, env_with(bed["conf"], settings), init_root=False):
        socks = [socket.create_connection(("127.0.0.8", port)) for _ in range(3)]
        for s in socks:
            assert s.recv(100).startswith(b"220")
        extra = lmtp_session("127.0.0.8", port, b"")
        assert extra.startswith(b"421 4.3.2")
        t0 = time.monotonic()
        assert socks[0].recv(100).startswith(b"421 4.4.2")  # idle timeout
        assert time.monotonic() - t0 < 5
        for s in socks:
            s.close()
        time.sleep(0.2)
        out = lmtp_session(
            "127.0.0.8",
            port,
            b"LHLO mx\r\nMAIL FROM:<s@x> SIZE=5000\r\nMAIL FROM:<s@x>\r\n"
            b"RCPT TO:<ana@x>\r\nRCPT TO:<juan@x>\r\nRCPT TO:<jo@x>\r\nDATA\r\n" + b"z" * 2000 + b"\r\n.\r\nQUIT\r\n",
        )
        assert b"250 SIZE 1000" not in out and b"250-SIZE 1000\r\n" in out
        assert codes(out) == ["220", "250", "552", "250", "250", "250", "452", "354", "552", "552", "221"]


def test_sigterm_clean_and_sighup_reload(tmp_path, bed):
    settings = tmp_path / "pwmail.toml"
    settings.write_text("[delivery]\nmessage_size_max = 1000\n")
    port = free_port_on(["127.0.0.9"])
    srv = Pdeliveryd(bed["dir"] / "root", "127.0.0.9", port, env_with(bed["conf"], settings), init_root=False)
    try:
        assert b"250-SIZE 1000\r\n" in lmtp_session("127.0.0.9", port, b"LHLO a\r\nQUIT\r\n")
        settings.write_text("[delivery]\nmessage_size_max = 2000\n")
        srv.signal(signal.SIGHUP)
        assert wait_for(lambda: "reloaded settings" in srv.output())
        assert b"250-SIZE 2000\r\n" in lmtp_session("127.0.0.9", port, b"LHLO a\r\nQUIT\r\n")
        idle = socket.create_connection(("127.0.0.9", port))
        assert idle.recv(100).startswith(b"220")
        srv.signal(signal.SIGTERM)
        assert srv.proc.wait(10) == 0
        assert idle.recv(100).startswith(b"421 4.3.2")
        idle.close()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.9", port), timeout=1)
    finally:
        srv.stop()


def test_mailhost_names_refuse_misrouted(tmp_path, bed):
    settings = tmp_path / "pwmail.toml"
    settings.write_text('[delivery]\nmailhost_names = ["127.0.0.2"]\n')
    port = free_port_on(["127.0.0.10"])
    with Pdeliveryd(bed["dir"] / "root", "127.0.0.10", port, env_with(bed["conf"], settings), init_root=False):
        out = lmtp_session(
            "127.0.0.10", port, b"LHLO a\r\nMAIL FROM:<>\r\nRCPT TO:<juan>\r\nRCPT TO:<pepe>\r\nQUIT\r\n"
        )
    assert codes(out) == ["220", "250", "250", "250", "451", "221"]


def test_clean_tmp_command(tmp_path, bed):
    with lmtp(bed) as c:
        c.sendmail("a@x", ["juan@x"], b"Subject: first\r\n\r\nx\r\n")  # the Maildir exists
    box = bed["layout"].path("juan")
    old = box / "tmp" / "stale"
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 40 * 3600,) * 2)
    r = subprocess.run(
        [str(pwtest.BIN / "pdeliveryd"), "--root", str(bed["dir"] / "root"), "--clean-tmp", "--log-stderr"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and not old.exists()
    assert "removed 1 stale tmp file" in r.stderr


def test_sigterm_under_load_acknowledges_only_what_is_stored(tmp_path, bed):
    """Clients deliver in a loop while pdeliveryd gets SIGTERM: it exits 0,
    every 250 a client got is a file in new/ (once), nothing is left in tmp/."""
    import threading

    port = free_port_on(["127.0.0.11"])
    root = tmp_path / "root"
    srv = Pdeliveryd(root, "127.0.0.11", port, bed["env"])
    acked, stop = [], threading.Event()

    def client(n):
        i = 0
        try:
            while not stop.is_set():
                with smtplib.LMTP("127.0.0.11", port, timeout=10) as c:
                    while not stop.is_set():
                        subject = f"c{n}-{i}"
                        c.sendmail("a@x", ["ana@x"], f"Subject: {subject}\r\n\r\n".encode() + b"y" * 20000)
                        acked.append(subject)
                        i += 1
        except (smtplib.SMTPException, OSError):
            return

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    assert wait_for(lambda: len(acked) >= 20, timeout=30)
    srv.signal(signal.SIGTERM)
    try:
        assert srv.proc.wait(30) == 0
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        srv.stop()
    box = MailboxLayout(root).path("ana")
    stored = [p.read_bytes().split(b"Subject: ", 1)[1].split(b"\n", 1)[0].decode() for p in messages(box)]
    assert len(stored) == len(set(stored))
    assert set(acked) <= set(stored)
    assert list((box / "tmp").iterdir()) == []
    assert "stopped;" in srv.output()


def test_mailbox_frozen_between_rcpt_and_data_is_deferred(tmp_path):
    """A move freezes the mailbox while a client is still sending: the
    recipient, accepted at RCPT, gets 450 4.2.1 after the data and nothing
    is written; once unfrozen, the retry is stored."""
    users = write_users(tmp_path / "users")
    with pwtest.PwServer(users) as pw:
        conf = client_conf(tmp_path / "pw.conf", [pw.address])
        port = free_port_on(["127.0.0.12"])
        with Pdeliveryd(tmp_path / "root", "127.0.0.12", port, env_with(conf)), pw.client() as c:
            box = MailboxLayout(tmp_path / "root").path("juan")
            mh = users / "mailhosts"

            def set_frozen(frozen):
                line = "juan 127.0.0.2\n"
                text = mh.read_text().replace("juan 127.0.0.2 frozen\n", line)
                mh.write_text(text.replace(line, "juan 127.0.0.2 frozen\n") if frozen else text)
                pw.proc.send_signal(signal.SIGHUP)
                assert wait_for(lambda: c.mailhost("juan").frozen == frozen, timeout=10)

            s = socket.create_connection(("127.0.0.12", port), timeout=10)
            s.sendall(b"LHLO mx\r\nMAIL FROM:<a@x>\r\nRCPT TO:<juan@x>\r\nDATA\r\n")
            out = b""
            while b"354 " not in out:
                chunk = s.recv(4096)
                assert chunk, out
                out += chunk
            set_frozen(True)  # the move starts while the data is on its way
            s.sendall(b"Subject: late\r\n\r\nx\r\n.\r\nQUIT\r\n")
            while not out.endswith(b"221 2.0.0 bye\r\n"):
                chunk = s.recv(4096)
                assert chunk, out
                out += chunk
            s.close()
            assert b"450 4.2.1" in out.split(b"354 ", 1)[1], out
            assert messages(box) == []
            set_frozen(False)
            with smtplib.LMTP("127.0.0.12", port) as lm:
                assert lm.sendmail("a@x", ["juan@x"], b"Subject: late\r\n\r\nx\r\n") == {}
            assert len(messages(box)) == 1
