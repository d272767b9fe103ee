"""pwmail move under real POP3 sessions: poplib clients through pop-proxy
to pop3d on two storage addresses while the mailboxes move from one to
the other. Frozen users get [IN-USE]; afterwards every UIDL is the same as
before (nothing to download twice) and deleted messages stay deleted."""

from __future__ import annotations

import poplib
import random
import subprocess
import threading
import time

import pytest

from pwmail.placement.move import MailhostsFile, is_maildir
from tests.support import pwtest
from tests.support.pop_util import client_conf, deliver, make_root, message, start_pop3d, start_proxy, write_users

pytestmark = pytest.mark.slow
N = 40
USERS = {f"popmove{i:02d}": (f"pw-{i}", "store1") for i in range(N)}


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("movepop")
    users = write_users(tmp / "users", USERS)
    key = tmp / "shadow.key"
    pwtest.write_key(key)
    layouts = {s: make_root(tmp / s) for s in ("store1", "store2")}
    with pwtest.PwServer(users, shadow_key=key) as pws:
        conf = client_conf(tmp / "pwserver.conf", pws.address, key)
        s1 = start_pop3d(tmp, tmp / "store1", conf, host="127.0.0.2")
        s2 = start_pop3d(tmp, tmp / "store2", conf, host="127.0.0.3")
        settings = (
            f'backends = {{ store1 = "127.0.0.2:{s1.port}", store2 = "127.0.0.3:{s2.port}" }}\n'
            "auth_failure_delay = 0.05\nthrottle_user_failures = 1000\nthrottle_user_ip_failures = 1000\nthrottle_ip_failures = 100000\n"
            "max_connections_per_ip = 1000\n"
        )
        with s1, s2, start_proxy(tmp, conf, settings) as proxy:
            yield {"tmp": tmp, "pw": pws, "proxy": proxy, "layouts": layouts, "users": users}


def login(bed, user) -> poplib.POP3 | None:
    """A session through the proxy, or None when the answer is [IN-USE]."""
    p = poplib.POP3(*bed["proxy"].address, timeout=20)
    try:
        p.user(user)
        p.pass_(USERS[user][0])
    except poplib.error_proto as e:
        p.close()
        if b"[IN-USE]" in e.args[0]:
            return None
        raise
    return p


def uidls(bed, user) -> list[str] | None:
    p = login(bed, user)
    if p is None:
        return None
    try:
        return sorted(line.split()[1].decode() for line in p.uidl()[1])
    finally:
        p.quit()


class Client(threading.Thread):
    """Logs in again and again: UIDL, RETR one, sometimes DELE one, QUIT."""

    def __init__(self, bed, seed):
        super().__init__(daemon=True)
        self.bed, self.rng = bed, random.Random(seed)
        self.stop = threading.Event()
        self.sessions = self.in_use = 0
        self.deleted: dict[str, set[str]] = {}
        self.errors: list[str] = []

    def run(self):
        while not self.stop.is_set():
            user = self.rng.choice(list(USERS))
            try:
                p = login(self.bed, user)
            except (poplib.error_proto, OSError) as e:
                self.errors.append(f"{user}: {e}")
                continue
            if p is None:
                self.in_use += 1
                continue
            try:
                listing = [line.split() for line in p.uidl()[1]]
                doomed = None
                if listing:
                    num, uid = self.rng.choice(listing)
                    p.retr(int(num))
                    if self.rng.random() < 0.3:
                        p.dele(int(num))
                        doomed = uid.decode()
                p.quit()  # deletions happen here (UPDATE)
                self.sessions += 1
                if doomed:
                    self.deleted.setdefault(user, set()).add(doomed)
            except (poplib.error_proto, OSError) as e:
                self.errors.append(f"{user}: {e}")


def test_pop_sessions_go_on_while_mailboxes_move(bed):
    for user in USERS:
        for i in range(5):
            deliver(bed["layouts"]["store1"], user, message(f"{user} {i}"))
    before = {u: uidls(bed, u) for u in USERS}
    assert all(len(v) == 5 for v in before.values())
    clients = [Client(bed, s) for s in range(3)]
    for c in clients:
        c.start()
    time.sleep(1)
    r = subprocess.run(
        [
            str(pwtest.BIN / "pwmail"),
            "move",
            *USERS,
            "--to",
            "store2",
            "--mailhosts",
            str(bed["users"] / "mailhosts"),
            "--server",
            bed["pw"].address,
            "--pwserver-pid",
            str(bed["pw"].proc.pid),
            "--journal-dir",
            str(bed["tmp"] / "journal"),
            "--root",
            f"store1={bed['tmp'] / 'store1'}",
            "--root",
            f"store2={bed['tmp'] / 'store2'}",
            "--settle",
            "1",
            "--batch",
            "10",
            "--pop-wait",
            "30",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    time.sleep(0.5)
    for c in clients:
        c.stop.set()
    for c in clients:
        c.join(60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not [e for c in clients for e in c.errors]
    assert sum(c.sessions for c in clients) > 50
    assert sum(c.in_use for c in clients) > 0, "no session met a frozen mailbox"
    mapped = MailhostsFile(bed["users"] / "mailhosts").read()
    for user in USERS:
        assert mapped[user] == ("store2", False)
        assert not is_maildir(bed["layouts"]["store1"].path(user))
        deleted = set().union(*(c.deleted.get(user, set()) for c in clients))
        assert uidls(bed, user) == sorted(set(before[user]) - deleted), user
    print(
        f"{sum(c.sessions for c in clients)} POP sessions, {sum(c.in_use for c in clients)} [IN-USE], "
        f"{sum(len(d) for c in clients for d in c.deleted.values())} deleted during the move"
    )
