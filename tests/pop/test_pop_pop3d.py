"""pop3d: crypt(3) checks, the Maildir mailbox, and the daemon with poplib
against a real pwserver."""

from __future__ import annotations

import base64
import os
import poplib
import socket
import statistics
import subprocess
import sys
import threading
import time

import pytest

from pop import crypt
from pop.mailbox import MailboxBusy, MaildirMailbox
from tests.support.pop_util import client_conf, deliver, make_root, message, read_reply, start_pop3d, write_users
from tests.support.pwtest import PwServer, free_port, write_key

FAILURE_DELAY = 0.4


# --- crypt -------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix", ["$y$", "$6$"])
def test_crypt_checks_yescrypt_and_sha512(prefix):
    h = crypt.hash_password("correct horse", prefix)
    assert h.startswith(prefix)
    assert crypt.check_password("correct horse", h)
    assert not crypt.check_password("correct horsE", h)
    assert not crypt.check_password("", h)


@pytest.mark.parametrize("hashed", ["", "*", "!", "!!", "x", "!$y$j9T$abc$def", "$1$abc$def", "abXYZ12345678"])
def test_crypt_locked_and_weak_hashes_never_match(hashed):
    assert not crypt.check_password("anything", hashed)
    assert not crypt.check_password("", hashed)


def test_crypt_unknown_user_costs_like_a_real_check():
    real = crypt.hash_password("pw", "$y$")

    def fastest(hashed: str) -> float:  # the least disturbed of 5 runs
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            crypt.check_password("wrong", hashed)
            times.append(time.perf_counter() - t0)
        return min(times)

    assert 0.5 < fastest("!") / fastest(real) < 2.0


def test_dummy_hash_learns_the_method_and_cost_of_the_first_real_user():
    dummy = crypt.DummyHash()
    assert dummy.hash.startswith("$y$") and not dummy.settled  # libxcrypt's default until then
    real = crypt.hash_password("pw", "$6$", 20000)
    assert not dummy.check("pw", None)  # no user: never matches
    dummy.learn("!")  # a locked account teaches nothing
    assert not dummy.settled
    assert not dummy.check("wrong", real)
    assert dummy.hash.startswith("$6$rounds=20000$") and dummy.hash != real
    dummy.learn(crypt.hash_password("pw", "$y$"))  # once: the first one decides
    assert dummy.hash.startswith("$6$rounds=20000$")
    assert dummy.check("pw", real) and not dummy.check("pw", None) and not dummy.check("pw", "!")


def test_dummy_hash_configured_model():
    model = crypt.hash_password("anything", "$y$", 7)
    dummy = crypt.DummyHash(model)
    assert dummy.hash.startswith(model[:7]) and dummy.hash != model and dummy.settled
    dummy.learn(crypt.hash_password("pw", "$6$"))  # a configured model stays
    assert dummy.hash.startswith(model[:7])
    for bad in ("!", "$1$abc$def", "$y$nonsense"):
        with pytest.raises(crypt.CryptError):
            crypt.DummyHash(bad)


def test_crypt_in_threads():
    h = crypt.hash_password("pw", "$6$")
    results = []
    threads = [threading.Thread(target=lambda: results.append(crypt.check_password("pw", h))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 8


# --- mailbox ----------------------------------------------------------------------------------
def test_mailbox_moves_new_to_cur_and_keeps_uidl(tmp_path):
    layout = make_root(tmp_path / "spool")
    p1 = deliver(layout, "juan", message("one"))
    p2 = deliver(layout, "juan", b"no final newline\n\nbody")
    box_path = layout.path("juan")
    with MaildirMailbox(box_path) as box:
        assert [m.uidl for m in box.messages] == [os.path.basename(p1), os.path.basename(p2)]
        assert os.listdir(box_path / "new") == []
        assert sorted(os.listdir(box_path / "cur")) == sorted(os.path.basename(p) + ":2," for p in (p1, p2))
        assert box.messages[0].size == len(message("one")) + message("one").count(b"\n")
        assert box.stat() == (2, sum(m.size for m in box.messages))
    with MaildirMailbox(box_path) as box:  # a second session: same UIDLs from cur/
        assert [m.uidl for m in box.messages] == [os.path.basename(p1), os.path.basename(p2)]


def test_mailbox_size_without_w_field(tmp_path):
    box_path = tmp_path / "box"
    for sub in ("cur", "new", "tmp"):
        (box_path / sub).mkdir(parents=True)
    data = b"a\nb\r\n" * 100_000 + b"c"  # CRLF split across read chunks somewhere
    (box_path / "new" / "1700000000.M1P1Q1.host").write_bytes(data)
    with MaildirMailbox(box_path) as box:
        # + the CRLF that RETR adds after the last line "c"
        assert box.messages[0].size == len(data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")) + 2
        assert box.messages[0].uidl == "1700000000.M1P1Q1.host"


def test_mailbox_orders_by_delivery_time_when_file_times_tie(tmp_path):
    """File times tick coarsely; the names' M<usec> is not zero-padded, so
    it must be compared as a number (M99999 is older than M100000)."""
    box_path = tmp_path / "box"
    for sub in ("cur", "new", "tmp"):
        (box_path / sub).mkdir(parents=True)
    names = [
        "1700000000.M99999P7Q1.host",
        "1700000000.M100000P7Q2.host",
        "1700000000.M100000P7Q10.host",
        "1700000001.M5P7Q11.host",
    ]
    for name in reversed(names):
        (box_path / "new" / name).write_bytes(name.encode() + b"\n")
        os.utime(box_path / "new" / name, (1700000005, 1700000005))
    with MaildirMailbox(box_path) as box:
        assert [m.uidl for m in box.messages] == names


def test_mailbox_deletes_only_at_commit_and_one_session(tmp_path):
    layout = make_root(tmp_path / "spool")
    paths = [deliver(layout, "maria", message(str(i))) for i in range(3)]
    box = MaildirMailbox(layout.path("maria"))
    box.open()
    with pytest.raises(MailboxBusy):
        MaildirMailbox(layout.path("maria")).open()
    assert box.delete(2) and not box.delete(2) and not box.delete(9)
    assert box.get(2) is None and box.stat()[0] == 2
    box.reset()
    assert box.stat()[0] == 3
    box.delete(1)
    assert len(os.listdir(layout.path("maria") / "cur")) == 3  # nothing removed before commit
    assert box.commit() == 0
    box.close()
    assert len(os.listdir(layout.path("maria") / "cur")) == 2
    with MaildirMailbox(layout.path("maria")) as again:
        assert [m.uidl for m in again.messages] == [os.path.basename(p) for p in paths[1:]]


def test_mailbox_lock_holds_across_processes(tmp_path):
    layout = make_root(tmp_path / "spool")
    deliver(layout, "juan", message("x"))
    box = str(layout.path("juan"))
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, box], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"locked\n"
        with pytest.raises(MailboxBusy):
            MaildirMailbox(box).open()
    finally:
        holder.kill()
        holder.wait()
    with MaildirMailbox(box) as again:
        assert again.stat()[0] == 1


HOLD_LOCK = """
import sys, time
from pop.mailbox import MaildirMailbox
box = MaildirMailbox(sys.argv[1]); box.open(); print("locked", flush=True); time.sleep(30)
"""


def test_mailbox_missing_maildir_is_empty(tmp_path):
    with MaildirMailbox(tmp_path / "nobody") as box:
        assert box.stat() == (0, 0)


def test_mailbox_top(tmp_path):
    layout = make_root(tmp_path / "spool")
    deliver(layout, "juan", message("t", lines=5))
    with MaildirMailbox(layout.path("juan")) as box:
        assert box.top(box.messages[0], 0).endswith(b"Subject: t\n\n")
        assert box.top(box.messages[0], 2).endswith(b"\n\nline 0 of t\nline 1 of t\n")
        assert box.top(box.messages[0], 99).endswith(b"line 4 of t\n")


# --- the daemon ---------------------------------------------------------------------------------
USERS = {
    "juan": ("juan-pw", "127.0.0.1"),
    "maria": ("maria pw", "127.0.0.1"),
    "moved": ("moved-pw", "127.0.0.1"),
    "sha": ("sha-pw", "127.0.0.1"),
}


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pop3d")
    users = write_users(tmp / "users", {k: v for k, v in USERS.items() if k != "sha"}, frozen={"moved"})
    # one sha512-crypt user too
    with open(users / "shadow", "a") as sh, open(users / "passwd", "a") as pw, open(users / "mailhosts", "a") as mh:
        sh.write(f"sha:{crypt.hash_password('sha-pw', '$6$')}:19000:0:99999:7:::\n")
        pw.write("sha:x:20100:20000::/var/spool/mail/sha:/usr/sbin/nologin\n")
        mh.write("sha 127.0.0.1\n")
        sh.write(f"old:{crypt.hash_password('old-pw', '$6$')}:19000:0:99999:7::19001:\n")  # expired in 2022
        pw.write("old:x:20101:20000::/var/spool/mail/old:/usr/sbin/nologin\n")
        mh.write("old 127.0.0.1\n")
    key = tmp / "shadow.key"
    write_key(key)
    layout = make_root(tmp / "spool")
    with PwServer(users, shadow_key=key) as pws:
        conf = client_conf(tmp / "pwserver.conf", pws.address, key)
        with start_pop3d(tmp, tmp / "spool", conf, settings=f"pop3d_failure_delay = {FAILURE_DELAY}\n") as d:
            yield {"tmp": tmp, "layout": layout, "pop3d": d, "conf": conf, "pwserver": pws}


def login(bed, user, password=None):
    p = poplib.POP3(*bed["pop3d"].address, timeout=10)
    p.user(user)
    p.pass_(password or USERS[user][0])
    return p


def test_pop3d_capa_and_greeting(bed):
    p = poplib.POP3(*bed["pop3d"].address, timeout=10)
    assert p.getwelcome().startswith(b"+OK")
    assert b"[XCLIENT]" not in p.getwelcome()  # we are not a trusted proxy
    caps = p.capa()
    assert {"TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "USER"} <= set(caps)
    assert caps["SASL"] == ["PLAIN"] and "PIPELINING" not in caps and "APOP" not in caps
    p.quit()


def test_pop3d_session(bed):
    layout = bed["layout"]
    bodies = [message("first"), message("second", extra=b".starts with a dot\n..two\n"), (b"x" * 70 + b"\n") * 5000]
    paths = [deliver(layout, "juan", b) for b in bodies]
    p = login(bed, "juan")
    count, size = p.stat()
    assert count == 3
    assert size == sum(len(b) + b.count(b"\n") for b in bodies)
    _, listing, _ = p.list()
    assert [int(x.split()[1]) for x in listing] == [len(b) + b.count(b"\n") for b in bodies]
    _, uidls, _ = p.uidl()
    assert [x.split()[1].decode() for x in uidls] == [os.path.basename(x) for x in paths]
    assert p.uidl(2).split()[2].decode() == os.path.basename(paths[1])
    for i, body in enumerate(bodies, 1):
        _, lines, octets = p.retr(i)
        assert b"\n".join(lines) + b"\n" == body
    _, lines, _ = p.top(2, 1)
    assert lines[-1] == b"line 0 of second"
    p.dele(1)
    with pytest.raises(poplib.error_proto, match="No such message"):
        p.retr(1)
    p.rset()
    assert p.stat()[0] == 3
    p.dele(1)
    p.dele(3)
    assert p.stat()[0] == 1
    p.quit()
    cur = layout.path("juan") / "cur"
    assert [n.split(":")[0] for n in os.listdir(cur)] == [os.path.basename(paths[1])]
    # a session that ends without QUIT deletes nothing
    p = login(bed, "juan")
    p.dele(1)
    p.close()  # no QUIT
    time.sleep(0.3)
    p = login(bed, "juan")
    assert p.stat()[0] == 1
    p.dele(1)
    p.quit()


def test_pop3d_one_session_per_mailbox(bed):
    p = login(bed, "maria")
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        login(bed, "maria")
    p.quit()
    login(bed, "maria").quit()


def test_pop3d_wrong_password_and_unknown_user_look_the_same(bed):
    answers, times = [], []
    for user, pw in (("juan", "wrong"), ("nosuchuser", "wrong"), ("juan", ""), ("bad/name", "x"), ("old", "old-pw")):
        p = poplib.POP3(*bed["pop3d"].address, timeout=10)
        p.user(user)
        t0 = time.monotonic()
        with pytest.raises(poplib.error_proto) as e:
            p.pass_(pw or "x")
        times.append(time.monotonic() - t0)
        answers.append(e.value.args[0])
        p.close()
    assert set(answers) == {b"-ERR [AUTH] Authentication failed."}
    assert all(FAILURE_DELAY <= t < FAILURE_DELAY + 1.0 for t in times), times


def test_pop3d_sha512_user_and_auth_plain(bed):
    login(bed, "sha").quit()
    with socket.create_connection(bed["pop3d"].address, timeout=10) as s:
        assert read_reply(s).startswith(b"+OK")
        token = base64.b64encode(b"\0maria\0maria pw").decode()
        s.sendall(f"AUTH PLAIN {token}\r\n".encode())
        assert read_reply(s).startswith(b"+OK Logged in")
        s.sendall(b"QUIT\r\n")
        assert read_reply(s) == b"+OK Bye.\r\n"


def test_pop3d_frozen_mailbox_is_in_use(bed):
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        login(bed, "moved")


def test_pop3d_xclient_from_trusted_proxy(bed):
    tmp = bed["tmp"]
    with start_pop3d(tmp, tmp / "spool", bed["conf"], host="127.0.0.4", trusted=["127.0.0.0/8"]) as d:
        with socket.create_connection(d.address, timeout=10) as s:
            assert read_reply(s).startswith(b"+OK [XCLIENT]")
            s.sendall(b"XCLIENT ADDR=192.0.2.9 PORT=4242\r\nUSER juan\r\nPASS juan-pw\r\nQUIT\r\n")
            data = b""
            while data.count(b"\r\n") < 4:
                data += s.recv(4096)
        assert data.split(b"\r\n")[:4] == [b"+OK", b"+OK", data.split(b"\r\n")[2], b"+OK Bye."]
        assert data.split(b"\r\n")[2].startswith(b"+OK Logged in")
        time.sleep(0.2)
        assert "from=192.0.2.9:4242" in d.output()


def test_pop3d_password_server_down_is_sys_temp(bed):
    tmp = bed["tmp"]
    dead = client_conf(tmp / "dead.conf", f"127.0.0.1:{free_port()}", str(tmp / "shadow.key"))
    with start_pop3d(tmp, tmp / "spool", dead, host="127.0.0.5") as d:
        p = poplib.POP3(*d.address, timeout=10)
        p.user("juan")
        with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
            p.pass_("juan-pw")


def test_pop3d_never_logs_passwords(bed):
    out = bed["pop3d"].output()
    assert "login user=juan" in out
    for _, (pw, _) in USERS.items():
        assert pw not in out


# --- timing of unknown users (no failure delay) ---------------------------------------------------
SLOW_COST = 7  # yescrypt cost above libxcrypt's default (5): ~4 times as slow


def timed_pass(address, user: str, password: str) -> float:
    """Seconds from PASS to its -ERR answer."""
    p = poplib.POP3(*address, timeout=30)
    try:
        p.user(user)
        t0 = time.perf_counter()
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            p.pass_(password)
        return time.perf_counter() - t0
    finally:
        p.close()


@pytest.mark.parametrize("dummy", ["learned", "configured"])
def test_pop3d_unknown_user_takes_as_long_as_a_wrong_password(tmp_path, dummy):
    """Where no failure delay hides it, an unknown user must cost the hash a
    real user costs: same method and cost (here a slower yescrypt than
    libxcrypt's default, so a fixed default dummy would show too)."""
    users = write_users(tmp_path / "users", {"slowpoke": ("slow-pw", "127.0.0.1")})
    shadow = (users / "shadow").read_text().split(":")
    shadow[1] = crypt.hash_password("slow-pw", "$y$", SLOW_COST)
    (users / "shadow").write_text(":".join(shadow))
    settings = "pop3d_failure_delay = 0\n"
    if dummy == "configured":
        settings += f'pop3d_dummy_hash = "{crypt.hash_password("x", "$y$", SLOW_COST)}"\n'
    key = tmp_path / "shadow.key"
    write_key(key)
    make_root(tmp_path / "spool")
    with PwServer(users, shadow_key=key) as pws:
        conf = client_conf(tmp_path / "pwserver.conf", pws.address, key)
        with start_pop3d(tmp_path, tmp_path / "spool", conf, settings=settings) as d:
            if dummy == "learned":  # the first real user looked up gives the shape
                timed_pass(d.address, "slowpoke", "warm-up")
            unknown, wrong = [], []
            for i in range(7):  # interleaved, so load changes hit both alike
                unknown.append(timed_pass(d.address, f"nobody{i}", "wrong"))
                wrong.append(timed_pass(d.address, "slowpoke", "wrong"))
    # Generous: the bug was a factor of 100 (a refused hash), a default-cost
    # dummy would be a factor of 4; medians drop the odd disturbed attempt.
    ratio = statistics.median(unknown) / statistics.median(wrong)
    assert 0.5 < ratio < 2.0, (unknown, wrong)
