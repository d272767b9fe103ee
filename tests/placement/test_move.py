"""pwmail move / rebalance end to end: a real pwserver, real pdeliveryd on
two storage addresses (127.0.0.2, 127.0.0.3), deliveries through
pdelivery's router over LMTP and a POP-like reader while 1,000 mailboxes
move; a crash at every failure point, then a rerun."""

import os
import pathlib
import random
import re
import subprocess
import threading
import time

import pytest

from delivery import config as dconfig
from delivery.layout import MailboxLayout
from delivery.lmtpclient import crlf
from delivery.maildir import ROOT_MARKER, MaildirWriter
from delivery.pdelivery import Router, send
from pwcache.client import Client
from pwmail.genusers import make_names
from pwmail.placement.move import FAIL_EXIT, FAIL_POINTS, MailhostsFile, is_maildir, scan
from tests.support import pwtest
from tests.support.delivery_util import Pdeliveryd, env_with, free_port_on, write_users

S2, S3, S4 = "127.0.0.2", "127.0.0.3", "127.0.0.4"
N_USERS = 1000
CRASH_USERS = {p: f"crash{i:03d}" for i, p in enumerate(FAIL_POINTS)}
MSGID = re.compile(rb"^Message-ID: <([^>]+)>", re.M)


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    d = tmp_path_factory.mktemp("move")
    names = make_names(N_USERS, random.Random(7))
    extra = ["j", "jjota", "popopen1", "popopen2", "throttled", "refusal1", *CRASH_USERS.values()]
    users = {n: (30000 + i, 30000, S2, False) for i, n in enumerate(names + extra)}
    write_users(d / "users", users)
    with open(d / "users" / "passwd", "a") as f:  # no line in the map: the default rule places it
        f.write("defrule1:x:39999:30000::/home/defrule1:/bin/sh\n")
    roots = {h: d / f"store-{h}" for h in (S2, S3, S4)}
    port = free_port_on([S2, S3])
    settings = d / "pwmail.toml"
    settings.write_text(
        f"[delivery]\nlmtp_port = {port}\nconnect_timeout = 2.0\ntimeout = 20.0\n"
        f'[placement]\nrule = "hash"\nhosts = ["{S2}"]\n'
    )
    (roots[S4]).mkdir()
    (roots[S4] / ROOT_MARKER).touch()
    with pwtest.PwServer(d / "users", env={"PWMAIL_CONF": str(settings)}) as pw:
        conf = pwtest.client_conf(d / "pwserver.conf", [pw.address], timeout_ms=300, recheck_s=1)
        env = env_with(conf, settings)
        with Pdeliveryd(roots[S2], S2, port, env), Pdeliveryd(roots[S3], S3, port, env):
            yield {
                "d": d,
                "names": names,
                "roots": roots,
                "pw": pw,
                "env": env,
                "settings": settings,
                "map": MailhostsFile(d / "users" / "mailhosts"),
            }


def pwmail(bed, *args, fail=None, timeout=600):
    env = dict(bed["env"])
    env.pop("PWMAIL_MOVE_FAIL", None)
    if fail:
        env["PWMAIL_MOVE_FAIL"] = fail
    return subprocess.run(_argv(bed, *args), capture_output=True, text=True, env=env, timeout=timeout)


def _argv(bed, *args):
    argv = [
        str(pwtest.BIN / "pwmail"),
        *args,
        "--mailhosts",
        str(bed["map"].path),
        "--server",
        bed["pw"].address,
        "--pwserver-pid",
        str(bed["pw"].proc.pid),
        "--journal-dir",
        str(bed["d"] / "journal"),
        "--layout",
        "first3",
    ]
    for host, root in bed["roots"].items():
        argv += ["--root", f"{host}={root}"]
    return argv


def layout(bed, host):
    return MailboxLayout(bed["roots"][host])


def msgid(path: pathlib.Path) -> str:
    return MSGID.search(path.read_bytes()).group(1).decode()


def seed(bed, user, n, host=S2):
    """n messages already in the mailbox (one read by POP: in cur/ with flags)."""
    w = MaildirWriter(layout(bed, host))
    paths = [
        pathlib.Path(w.deliver(user, f"Message-ID: <seed-{user}-{i}>\nSubject: {i}\n\nold\n".encode()))
        for i in range(n)
    ]
    if n:
        os.rename(paths[0], paths[0].parent.parent / "cur" / (paths[0].name + ":2,S"))
    return {k: v[0] for k, v in scan(layout(bed, host).path(user)).items()}


def live_host(bed, user):
    return bed["map"].read()[user][0]


class Deliverer(threading.Thread):
    """Mail keeps coming: pdelivery's routing and LMTP to the real pdeliveryd;
    a temporary answer (frozen: 4.2.1) puts the message back in the queue,
    as Sendmail does."""

    def __init__(self, bed, users):
        super().__init__(daemon=True)
        self.cfg = dconfig.load(str(bed["settings"]))
        self.addr = bed["pw"].address
        self.users, self.rng = users, random.Random(3)
        self.stop, self.done = threading.Event(), threading.Event()
        self.delivered: dict[str, str] = {}
        self.queue: list[tuple[str, str]] = []
        self.deferred = 0
        self.errors: list[str] = []

    def run(self):
        n = 0
        with Client([self.addr]) as c:
            router = Router(self.cfg, client=c)
            while not (self.stop.is_set() and not self.queue):
                if self.queue and (self.stop.is_set() or self.rng.random() < 0.3):
                    mid, user = self.queue.pop(0)
                else:
                    n += 1
                    mid, user = f"live-{n}", self.rng.choice(self.users)
                data = crlf(f"Message-ID: <{mid}>\nSubject: live\n\nhello {user}\n".encode())
                route = router.route(user)
                [reply] = send(self.cfg, [route], [user], "a@example.org", data, mid)
                if reply.ok:
                    self.delivered[mid] = user
                elif 400 <= reply.code < 500:
                    self.deferred += 1
                    self.queue.append((mid, user))
                    time.sleep(0.01)
                else:
                    self.errors.append(f"{mid} {user}: {reply}")
        self.done.set()


class Reader(threading.Thread):
    """POP sessions on the live mailbox with pop3d's own Maildir code
    (pop/mailbox.py: session flock, new/ -> cur/, RETR, DELE, QUIT), kept
    away from frozen mailboxes as pop3d does ([IN-USE])."""

    def __init__(self, bed, users):
        super().__init__(daemon=True)
        self.bed, self.users, self.rng = bed, users, random.Random(5)
        self.stop = threading.Event()
        self.deleted: set[str] = set()
        self.read = 0
        self.busy = 0

    def run(self):
        from pop.mailbox import MailboxBusy, MaildirMailbox

        with Client([self.bed["pw"].address]) as c:
            while not self.stop.is_set():
                user = self.rng.choice(self.users)
                mh = c.mailhost(user)
                if mh.frozen:
                    continue
                session = MaildirMailbox(layout(self.bed, mh.host).path(user))
                try:
                    session.open()
                except MailboxBusy:
                    self.busy += 1
                    continue
                try:
                    doomed = []
                    for n, m in enumerate(session.messages, 1):
                        mid = MSGID.search(b"".join(session.read_chunks(m))).group(1).decode()
                        self.read += 1
                        if self.rng.random() < 0.2:
                            session.delete(n)
                            doomed.append(mid)
                    time.sleep(0.01)
                    assert session.commit() == 0
                    self.deleted.update(doomed)
                finally:
                    session.close()


@pytest.mark.slow
def test_move_1000_mailboxes_while_mail_flows(bed):
    names = bed["names"]
    t_seed = time.monotonic()
    before = {}
    for u in names:
        box = layout(bed, S2).path(u)
        before[u] = {key: msgid(box / rel) for key, rel in seed(bed, u, 2).items()}
    t_seed = time.monotonic() - t_seed
    deliverer, reader = Deliverer(bed, names), Reader(bed, names)
    deliverer.start()
    reader.start()
    time.sleep(1)
    t0 = time.monotonic()
    r = pwmail(
        bed, "move", *names, "--to", S3, "--settle", "1", "--batch", "250", "--bwlimit", "0", "--files-per-second", "0"
    )
    took = time.monotonic() - t0
    reader.stop.set()
    reader.join(30)
    time.sleep(0.5)
    deliverer.stop.set()
    assert deliverer.done.wait(120), "deliveries did not drain"
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{N_USERS} move(s) done" in r.stdout
    assert not deliverer.errors
    assert deliverer.deferred > 0, "no delivery met a frozen mailbox"
    assert len(deliverer.delivered) > 50 and reader.read > 50 and reader.deleted

    seen: dict[str, str] = {}
    with Client([bed["pw"].address]) as c:
        for u in names:
            assert tuple(c.mailhost(u)) == (S3, False)
            assert not is_maildir(layout(bed, S2).path(u)), f"{u}: old copy left"
            box = layout(bed, S3).path(u)
            for rel, *_ in scan(box).values():
                mid = msgid(box / rel)
                assert mid not in seen, f"{mid} twice: {seen[mid]} and {u}/{rel}"
                seen[mid] = u
            # every old message kept its Maildir base name (its UIDL)
            now = {k: v[0] for k, v in scan(box).items()}
            for key, mid in before[u].items():
                if mid not in reader.deleted:
                    assert key in now and msgid(box / now[key]) == mid
    seeded = {f"seed-{u}-{i}": u for u in names for i in range(2)}
    expected = {m: u for m, u in {**seeded, **deliverer.delivered}.items() if m not in reader.deleted}
    assert seen == expected
    assert not list((bed["d"] / "journal").glob("*.json"))
    print(
        f"seeded in {t_seed:.1f} s; moved {N_USERS} mailboxes in {took:.1f} s; {len(deliverer.delivered)} delivered during the run, "
        f"{deliverer.deferred} deferred while frozen, {reader.read} read, {len(reader.deleted)} deleted"
    )


@pytest.mark.parametrize("point", FAIL_POINTS)
def test_crash_at_each_step_then_rerun(bed, point):
    user = CRASH_USERS[point]
    before = seed(bed, user, 4)
    box = layout(bed, S2).path(user)
    (box / "dovecot-uidlist").write_text("3 V1 N5\n")
    before["dovecot-uidlist"] = "dovecot-uidlist"
    r = pwmail(bed, "move", user, "--to", S3, "--settle", "0.2", fail=point)
    assert r.returncode == FAIL_EXIT, r.stdout + r.stderr
    # after the crash: the map names one host, and that host has the whole mailbox
    host = live_host(bed, user)
    assert host in (S2, S3)
    assert {k: v[0] for k, v in scan(layout(bed, host).path(user)).items()} == before
    assert (bed["d"] / "journal" / f"{user}.json").exists()
    if point in ("after-freeze", "mid-sync", "after-sync", "after-flip"):  # confirmed by the server
        with Client([bed["pw"].address]) as c:
            assert c.mailhost(user).frozen is True
    r = pwmail(bed, "move", user, "--to", S3, "--settle", "0.2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert bed["map"].read()[user] == (S3, False)
    with Client([bed["pw"].address]) as c:
        assert tuple(c.mailhost(user)) == (S3, False)
    assert {k: v[0] for k, v in scan(layout(bed, S3).path(user)).items()} == before
    assert not box.exists() and not box.with_name(box.name + " pwmove-old").exists()
    assert not (bed["d"] / "journal" / f"{user}.json").exists()


def test_one_letter_user_leaves_longer_names_alone(bed):
    """first3 puts `jjota` at j/j/o/jjota, inside the Maildir of `j` (j/j)."""
    j = seed(bed, "j", 3)
    jjota = seed(bed, "jjota", 2)
    r = pwmail(bed, "move", "j", "--to", S3, "--settle", "0")
    assert r.returncode == 0, r.stdout + r.stderr
    assert {k: v[0] for k, v in scan(layout(bed, S3).path("j")).items()} == j
    assert not is_maildir(layout(bed, S2).path("j"))
    assert {k: v[0] for k, v in scan(layout(bed, S2).path("jjota")).items()} == jjota
    assert not (layout(bed, S3).path("j") / "o").exists()


def test_move_refuses_a_stray_copy_and_unknown_users(bed):
    MaildirWriter(layout(bed, S3)).deliver("jjota", b"Message-ID: <stray>\n\nx\n")
    r = pwmail(bed, "move", "jjota", "--to", S3, "--settle", "0")
    assert r.returncode == 1 and "already has a mailbox" in r.stderr
    assert live_host(bed, "jjota") == S2
    r = pwmail(bed, "move", "nobody99", "--to", S3, "--settle", "0")
    assert r.returncode == 1 and "no such user" in r.stderr
    r = pwmail(bed, "move", "j", "--to", "store9", "--settle", "0")
    assert r.returncode == 1 and "no storage root" in r.stderr
    # one refused user does not stop the others
    seed(bed, "refusal1", 1)
    r = pwmail(bed, "move", "nobody99", "refusal1", "--to", S3, "--settle", "0")
    assert r.returncode == 1 and "nobody99 not moved: no such user" in r.stderr
    assert "1 move(s) done, 1 refused" in r.stdout
    assert bed["map"].read()["refusal1"] == (S3, False)


def test_rebalance_moves_what_the_new_host_wins(bed):
    from pwcache.placement import PlacementRule

    r = pwmail(
        bed,
        "rebalance",
        "--add",
        S4,
        "--hosts",
        f"{S2},{S3}",
        "--passwd",
        str(bed["d"] / "users" / "passwd"),
        "--dry-run",
    )
    assert r.returncode == 0, r.stderr
    planned = [line.split()[0] for line in r.stdout.splitlines() if "->" in line]
    rule = PlacementRule("hash", ((S2, 1.0), (S3, 1.0), (S4, 1.0)))
    users = [line.split(":")[0] for line in (bed["d"] / "users" / "passwd").read_text().splitlines()]
    hosts = {u: bed["map"].read().get(u, (S2, False))[0] for u in users}
    assert planned == [u for u in users if rule.pick(u) == S4 and hosts[u] != S4]
    assert 0.25 < len(planned) / len(users) < 0.42  # about a third
    r = pwmail(
        bed,
        "rebalance",
        "--add",
        S4,
        "--hosts",
        f"{S2},{S3}",
        "--passwd",
        str(bed["d"] / "users" / "passwd"),
        "--max-moves",
        "10",
        "--settle",
        "0",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "10 move(s) done" in r.stdout
    now = bed["map"].read()
    for u in planned[:10]:
        assert now[u] == (S4, False)
        assert not is_maildir(layout(bed, hosts[u]).path(u))
    assert all(now.get(u, (S2, False))[0] != S4 for u in planned[10:])


def _journal_step(bed, user):
    import json

    try:
        return json.loads((bed["d"] / "journal" / f"{user}.json").read_text())["step"]
    except FileNotFoundError:
        return None


def test_frozen_sync_waits_for_an_open_pop_session(bed):
    from pop.mailbox import MaildirMailbox

    seed(bed, "popopen1", 3)
    session = MaildirMailbox(layout(bed, S2).path("popopen1"))
    session.open()  # pop3d's session lock; it also moves new/ to cur/
    before = {k: v[0] for k, v in scan(layout(bed, S2).path("popopen1")).items()}
    env = dict(bed["env"])
    proc = subprocess.Popen(
        [*_argv(bed, "move", "popopen1", "--to", S3, "--settle", "0")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        pwtest.wait_for(
            lambda: _journal_step(bed, "popopen1") == "frozen",
            60,
            describe=lambda: f"the move is at {_journal_step(bed, 'popopen1')!r}, not frozen",
        )
        time.sleep(1)
        assert proc.poll() is None, "the move did not wait for the POP session"
        assert bed["map"].read()["popopen1"] == (S2, True)
    finally:
        session.close()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out + err
    assert {k: v[0] for k, v in scan(layout(bed, S3).path("popopen1")).items()} == before


def test_pop_session_that_stays_open_stops_the_move_frozen_then_rerun(bed):
    from pop.mailbox import MaildirMailbox

    seed(bed, "popopen2", 2)
    session = MaildirMailbox(layout(bed, S2).path("popopen2"))
    session.open()
    try:
        r = pwmail(bed, "move", "popopen2", "--to", S3, "--settle", "0", "--pop-wait", "0.5")
        assert r.returncode == 1 and "POP session" in r.stderr
        assert bed["map"].read()["popopen2"] == (S2, True)  # frozen: mail waits, nothing lost
    finally:
        session.close()
    r = pwmail(bed, "move", "--settle", "0")  # no user: resume only
    assert r.returncode == 0, r.stdout + r.stderr
    assert bed["map"].read()["popopen2"] == (S3, False)


def test_user_placed_by_the_default_rule_gets_a_line(bed):
    assert "defrule1" not in bed["map"].read()
    with Client([bed["pw"].address]) as c:
        assert tuple(c.mailhost("defrule1")) == (S2, False)
    before = seed(bed, "defrule1", 2)
    r = pwmail(bed, "move", "defrule1", "--to", S3, "--settle", "0", fail="after-copy")
    assert r.returncode == FAIL_EXIT
    r = pwmail(bed, "move", "--settle", "0")
    assert r.returncode == 0, r.stdout + r.stderr
    assert bed["map"].read()["defrule1"] == (S3, False)
    assert {k: v[0] for k, v in scan(layout(bed, S3).path("defrule1")).items()} == before


def test_resume_refuses_an_unmounted_root(bed):
    seed(bed, "jjota", 0)
    r = pwmail(bed, "move", "jjota", "--to", S4, "--settle", "0", fail="after-freeze")
    assert r.returncode == FAIL_EXIT
    marker = bed["roots"][S2] / ROOT_MARKER
    marker.unlink()
    try:
        r = pwmail(bed, "move", "--settle", "0")
        assert r.returncode == 1 and "not mounted" in r.stderr
        assert bed["map"].read()["jjota"] == (S2, True)
    finally:
        marker.touch()
    r = pwmail(bed, "move", "--settle", "0")
    assert r.returncode == 0, r.stdout + r.stderr
    assert bed["map"].read()["jjota"] == (S4, False)


def test_throttled_and_every_step_logged_to_syslog(bed, tmp_path):
    port = pwtest.free_port()
    out = tmp_path / "messages"
    syslogd = [
        str(pwtest.BIN / "python"),
        str(pwtest.ROOT / "pwmail/testbed/syslogd.py"),
        "--listen",
        f"127.0.0.1:{port}",
        "--out",
        str(out),
    ]
    with pwtest.Process(syslogd, tmp_path / "syslogd.log"):
        w = MaildirWriter(layout(bed, S2))
        for i in range(4):
            w.deliver("throttled", f"Message-ID: <big-{i}>\n\n".encode() + b"x" * 100_000)
        time.sleep(0.3)
        env = {**bed["env"], "PWMAIL_SYSLOG": f"127.0.0.1:{port}"}
        t0 = time.monotonic()
        r = subprocess.run(
            [*_argv(bed, "move", "throttled", "--to", S3, "--settle", "0", "--bwlimit", "200000")],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        took = time.monotonic() - t0
        assert r.returncode == 0, r.stdout + r.stderr
        assert took >= 1.9, f"400 KB at 200 KB/s took {took:.2f} s"
        lines = [line for line in wait_lines(out, "done, old copy removed") if "pwmail-move[" in line]
        assert all(" mail.info " in line or " mail.warning " in line for line in lines)
        for step in ("start", "copied", "frozen", "synced", "flipped", "unfrozen"):
            assert any(f"move throttled {S2} -> {S3}: {step}" in line for line in lines), step


def wait_lines(path, needle, timeout=10.0):
    text = lambda: path.read_text() if path.exists() else ""  # noqa: E731
    pwtest.wait_for(lambda: needle in text(), timeout, describe=lambda: f"{needle!r} never logged:\n{text()}")
    return text().splitlines()
