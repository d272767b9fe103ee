"""pwserver --source postgresql://...: real pwserver processes following a
real PostgreSQL 15 (tests/support/pg_util.py) by its change log, checked
against a file-source pwserver loading `pwmail db export` of the same
database (record by record)."""

from __future__ import annotations

import itertools
import random
import signal
import threading
import time

import pytest

from pwcache.client import Client
from pwcache.keys import write_key
from pwcache.protocol import Op
from tests.support import pg_util
from tests.support.nss_util import build_module, getent
from tests.support.pg_util import pwmail, user
from tests.support.pwserver_util import stats
from tests.support.pwtest import PwServer, client_conf, gen_users, wait_for

psycopg = pytest.importorskip("psycopg")

pytestmark = pytest.mark.skipif(not pg_util.available(), reason="needs root, setpriv and PostgreSQL 15")

_db_numbers = itertools.count(1)
VISIBLE = 30.0  # seconds a change may take to be served (the goal is well under one: the machine is shared)


class Site:
    """A database with generated users, and what pwserver needs to follow it."""

    def __init__(self, pg, tmp_path, users: int):
        name = f"src{next(_db_numbers)}"
        self.dsn = pg.create_database(name)
        self.uri = pg.uri(name)
        self.dir = tmp_path
        assert pwmail("db", "init", self.dsn).returncode == 0
        if users:
            src = gen_users(tmp_path / "gen", users)
            files = [f"--{f}={src / f}" for f in ("passwd", "shadow", "group", "mailhosts")]
            proc = pwmail("db", "import", self.dsn, *files)
            assert proc.returncode == 0, proc.stderr
        self.key = tmp_path / "shadow.key"
        write_key(str(self.key))

    def server(self, *args: str) -> PwServer:
        return PwServer({}, "--source", self.uri, *args, shadow_key=self.key, log_dir=self.dir)

    def exported(self) -> PwServer:
        """A file-source pwserver on the database's export now."""
        out = self.dir / f"export{next(_db_numbers)}"
        out.mkdir()
        proc = pwmail("db", "export", self.dsn, "--dir", str(out))
        assert proc.returncode == 0, proc.stderr
        return PwServer(out, "--allow-empty", shadow_key=self.key)

    def sql(self, *statements: tuple[str, tuple] | str) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn, conn.transaction():
            for st in statements:
                conn.execute(*((st,) if isinstance(st, str) else st))

    def last_seq(self) -> int:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return conn.execute("SELECT coalesce(max(seq), 0) FROM pwmail.changes").fetchone()[0]


def served(server: PwServer, key) -> dict:
    """Everything a server answers, by name (enumeration order aside)."""
    with Client([server.address], shadow_keyfile=str(key)) as c:
        users = sorted(c.enumerate(Op.PASSWD_ENUM))
        return {
            "passwd": users,
            "by_name": [c.passwd_by_name(u.name) for u in users],
            "by_uid": [c.passwd_by_uid(u.uid) for u in users],
            "group": sorted(c.enumerate(Op.GROUP_ENUM)),
            "shadow": sorted(c.enumerate(Op.SHADOW_ENUM)),
            "mailhost": [c.mailhost(u.name) for u in users],
            "initgroups": [sorted(c.initgroups(u.name) or []) for u in users],
        }


def assert_serves_the_database(site: Site, *servers: PwServer) -> None:
    """Once caught up with the log, each server answers what a load of the
    exported files answers."""
    last = site.last_seq()
    for s in servers:
        wait_for(lambda s=s: stats(s.addr)["source_seq"] >= last, timeout=VISIBLE, describe=s.output)
    with site.exported() as files:
        want = served(files, site.key)
    assert want["passwd"], "the database is empty"
    for s in servers:
        got = served(s, site.key)
        for what in want:
            assert got[what] == want[what], f"{what} differs from the database's export"


@pytest.fixture
def site(pg, tmp_path):
    return Site(pg, tmp_path, 300)


def test_start_up_serves_what_the_exported_files_serve(site):
    with site.server() as s:
        assert s.users == 300
        st = stats(s.addr)
        assert st["source_connected"] == 1 and st["source_seq"] == site.last_seq() > 0
        assert_serves_the_database(site, s)


def test_an_empty_database_is_refused_at_start_unless_allowed(pg, tmp_path):
    empty = Site(pg, tmp_path, 0)
    with pytest.raises(RuntimeError, match="no users"):
        empty.server()
    with empty.server("--allow-empty") as s:
        assert s.users == 0
        empty.sql(
            "INSERT INTO pwmail.users (name, uid, gid, home) VALUES ('first', 5000, 100, '/home/first')",
        )
        wait_for(lambda: s.client().passwd_by_name("first"), timeout=VISIBLE, describe=s.output)


def test_user_add_passwd_and_del_are_served_without_a_reload(site):
    with site.server() as s, Client([s.address], shadow_keyfile=str(site.key)) as c:
        generation = stats(s.addr)["generation"]
        proc = user(site.dsn, "add", "newbie", "--password-stdin", "--mailhost", "store9", stdin="first secret\n")
        assert proc.returncode == 0, proc.stderr
        entry = wait_for(lambda: c.passwd_by_name("newbie"), timeout=VISIBLE, describe=s.output)
        assert c.passwd_by_uid(entry.uid) == entry and c.mailhost("newbie") == ("store9", False)
        first_hash = c.shadow_by_name("newbie").hash
        assert first_hash.startswith("$y$")

        conf = client_conf(site.dir / "pwserver.conf", [s.address])
        got = getent(conf, "passwd", "newbie")
        assert got.returncode == 0 and got.stdout.startswith(f"newbie:x:{entry.uid}:"), got

        assert user(site.dsn, "passwd", "newbie", "--password-stdin", stdin="second secret\n").returncode == 0
        wait_for(lambda: c.shadow_by_name("newbie").hash != first_hash, timeout=VISIBLE, describe=s.output)
        assert user(site.dsn, "freeze", "newbie").returncode == 0
        wait_for(lambda: c.mailhost("newbie") == ("store9", True), timeout=VISIBLE, describe=s.output)

        assert user(site.dsn, "del", "newbie").returncode == 0
        wait_for(lambda: c.passwd_by_name("newbie") is None, timeout=VISIBLE, describe=s.output)
        assert c.passwd_by_uid(entry.uid) is None and c.shadow_by_name("newbie") is None
        assert getent(conf, "passwd", "newbie").returncode == 2
        st = stats(s.addr)
        assert st["loaded_time"] and st["generation"] > generation and st["changes_refused"] == 0
        assert "loaded generation" not in s.output().split("ready on", 1)[1], "a full reload happened"
        assert_serves_the_database(site, s)


def test_renames_uid_swaps_and_memberships_follow(site):
    with site.server() as s:
        a, b = (r[0] for r in _rows(site, "SELECT name FROM pwmail.users ORDER BY uid LIMIT 2"))
        group = _rows(site, "SELECT name FROM pwmail.groups ORDER BY gid LIMIT 1")[0][0]
        site.sql(
            ("UPDATE pwmail.users SET uid = uid + 1000000 WHERE name = %s", (a,)),
            (
                "UPDATE pwmail.users SET uid = (SELECT uid - 1000000 FROM pwmail.users WHERE name = %s) "
                "WHERE name = %s",
                (a, b),
            ),
            ("UPDATE pwmail.users SET name = 'renamed', uid = uid + 7 WHERE name = %s", (a,)),
            (
                "INSERT INTO pwmail.members (group_name, user_name) VALUES (%s, 'renamed') ON CONFLICT DO NOTHING",
                (group,),
            ),
            ("UPDATE pwmail.users SET password_hash = NULL, mailhost = NULL, frozen = false WHERE name = %s", (b,)),
        )
        assert_serves_the_database(site, s)
        assert s.client().passwd_by_name(a) is None


def _rows(site: Site, sql: str) -> list[tuple]:
    with psycopg.connect(site.dsn, autocommit=True) as conn:
        return conn.execute(sql).fetchall()


def test_a_batch_deleting_too_many_users_is_held_until_sigusr1(site):
    with site.server() as s:
        site.sql("DELETE FROM pwmail.users WHERE uid IN (SELECT uid FROM pwmail.users ORDER BY uid LIMIT 100)")
        s.wait_line("held back", "the guard's ERROR", timeout=VISIBLE)
        st = stats(s.addr)
        assert st["users"] == 300 and st["reloads_refused"] == 1 and st["last_refusal_reason"] == 2
        site.sql("INSERT INTO pwmail.users (name, uid, gid, home) VALUES ('late', 99000, 100, '/home/late')")
        time.sleep(3)  # a poll or two: still held, said once
        assert stats(s.addr)["users"] == 300 and s.output().count("held back") == 1
        s.signal(signal.SIGUSR1)
        wait_for(lambda: stats(s.addr)["users"] == 201, timeout=VISIBLE, describe=s.output)
        assert_serves_the_database(site, s)


class Load:
    """Steady lookups of users present throughout, on every server; counts
    what went wrong."""

    def __init__(self, servers, names):
        self.failures: list[str] = []
        self.lookups = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(s, names), daemon=True) for s in servers]

    def _run(self, server, names):
        rng = random.Random(server.port)
        with Client([server.address], timeout_ms=5000) as c:
            while not self._stop.is_set():
                name = rng.choice(names)
                try:
                    if c.passwd_by_name(name) is None:
                        self.failures.append(f"{server.address}: {name} NOTFOUND")
                except Exception as e:
                    self.failures.append(f"{server.address}: {name}: {e!r}")
                self.lookups += 1

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)


def random_changes(site: Site, rng: random.Random, keep: set[str], count: int, start_uid: int) -> None:
    """`count` random changes (inserts, updates, deletes, memberships) by
    direct SQL, a few rows a transaction; users in `keep` are updated, never deleted."""
    uids = itertools.count(start_uid)
    mine: list[str] = []
    groups = [r[0] for r in _rows(site, "SELECT name FROM pwmail.groups")]
    kept = sorted(keep)
    with psycopg.connect(site.dsn, autocommit=True) as conn:
        done = 0
        while done < count:
            with conn.transaction():
                for _ in range(rng.randint(1, 5)):
                    roll = rng.random()
                    if roll < 0.35 or not mine:
                        uid = next(uids)
                        name = f"r{uid}"
                        conn.execute(
                            "INSERT INTO pwmail.users (name, uid, gid, home, password_hash, mailhost) "
                            "VALUES (%s, %s, 100, %s, %s, %s)",
                            (name, uid, f"/home/{name}", f"$y$x{uid}", rng.choice(["store1", "store2", None])),
                        )
                        mine.append(name)
                    elif roll < 0.6:
                        name = mine.pop(rng.randrange(len(mine)))
                        conn.execute("DELETE FROM pwmail.users WHERE name = %s", (name,))
                    elif roll < 0.8:
                        name = rng.choice(kept + mine)
                        conn.execute(
                            "UPDATE pwmail.users SET gecos = %s, password_hash = %s WHERE name = %s",
                            (f"g{rng.random()}", f"$y$h{rng.random()}", name),
                        )
                    else:
                        conn.execute(
                            "INSERT INTO pwmail.members (group_name, user_name) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                            (rng.choice(groups), rng.choice(kept + mine)),
                        )
                    done += 1


@pytest.fixture
def big_site(pg, tmp_path):
    return Site(pg, tmp_path, 2000)


def _two_replicas(site: Site):
    """One replica given --source, the other `source` in its settings."""
    settings = "[pwserver]\nreload_max_shrink = 1.0\nsource_reconnect_max = 1.0\npoll_seconds = 1.0\n"
    flag, conf = site.dir / "flag.toml", site.dir / "conf.toml"
    flag.write_text(settings)
    conf.write_text(settings + f'source = "{site.uri}"\n')
    return (
        site.server("--config", str(flag)),
        PwServer({}, "--config", str(conf), shadow_key=site.key, log_dir=site.dir),
    )


def test_two_replicas_follow_thousands_of_changes_under_load(big_site):
    site = big_site
    names = [r[0] for r in _rows(site, "SELECT name FROM pwmail.users")]
    rng = random.Random(17)
    a, b = _two_replicas(site)
    with a, b:
        with Load([a, b], names) as load:
            random_changes(site, rng, set(names), 3000, 500_000)
            assert_serves_the_database(site, a, b)
        assert load.lookups > 100 and not load.failures, load.failures[:5]
        for s in (a, b):
            assert stats(s.addr)["changes_refused"] == 0


def test_replicas_converge_after_the_database_stops_mid_stream(pg, big_site):
    site = big_site
    names = [r[0] for r in _rows(site, "SELECT name FROM pwmail.users")]
    rng = random.Random(18)
    a, b = _two_replicas(site)
    with a, b, Load([a, b], names) as load:
        random_changes(site, rng, set(names), 500, 600_000)
        pg.pause()
        try:
            for s in (a, b):
                wait_for(lambda s=s: stats(s.addr)["source_connected"] == 0, timeout=VISIBLE, describe=s.output)
            time.sleep(2)  # tries to reconnect fail meanwhile: logged once
        finally:
            pg.resume()
        random_changes(site, rng, set(names), 500, 700_000)
        assert_serves_the_database(site, a, b)
        for s in (a, b):
            assert stats(s.addr)["source_connected"] == 1
            out = s.output()
            assert out.count("database source lost") == 1 and out.count("connection back") == 1, out
    assert not load.failures, load.failures[:5]


def test_a_pruned_change_log_means_a_full_load(site):
    with site.server() as s:
        site.sql("INSERT INTO pwmail.users (name, uid, gid, home) VALUES ('seen', 91000, 100, '/h')")
        last = site.last_seq()
        wait_for(lambda: stats(s.addr)["source_seq"] == last, timeout=VISIBLE, describe=s.output)
        s.signal(signal.SIGSTOP)
        try:  # while it is away, two changes, and the site prunes its log past the first
            for name, uid in (("away1", 91001), ("away2", 91002)):
                site.sql(("INSERT INTO pwmail.users (name, uid, gid, home) VALUES (%s, %s, 100, '/h')", (name, uid)))
            site.sql(("DELETE FROM pwmail.changes WHERE seq <= %s", (last + 1,)))
        finally:
            s.signal(signal.SIGCONT)
        s.wait_line("no longer holds the changes", "a full load", timeout=VISIBLE)
        wait_for(lambda: s.client().passwd_by_name("away1"), timeout=VISIBLE, describe=s.output)
        assert_serves_the_database(site, s)


def test_the_nss_module_sees_a_new_user(site):
    build_module()
    with site.server() as s:
        conf = client_conf(site.dir / "nss.conf", [s.address])
        assert user(site.dsn, "add", "nssuser", "--no-password").returncode == 0
        wait_for(lambda: getent(conf, "passwd", "nssuser").returncode == 0, timeout=VISIBLE, describe=s.output)


def test_a_whole_load_the_guard_refuses_is_not_tried_on_every_poll(site):
    conf = site.dir / "poll.toml"
    conf.write_text("[pwserver]\npoll_seconds = 0.5\n")
    with site.server("--config", str(conf)) as s:
        last = site.last_seq()
        s.signal(signal.SIGSTOP)
        try:  # most users deleted and the log pruned past the server: only a whole load can follow
            site.sql("DELETE FROM pwmail.users WHERE uid IN (SELECT uid FROM pwmail.users ORDER BY uid LIMIT 200)")
            site.sql(("DELETE FROM pwmail.changes WHERE seq <= %s", (last + 1,)))
        finally:
            s.signal(signal.SIGCONT)
        s.wait_line("reload refused", "the guard's refusal", timeout=VISIBLE)
        before = _transactions(site)
        time.sleep(4)  # eight polls, each one look at the log: not a busy loop
        assert _transactions(site) - before < 200
        assert s.output().count("reload refused") == 1 and stats(s.addr)["users"] == 300
        site.sql("INSERT INTO pwmail.users (name, uid, gid, home) VALUES ('later', 95000, 100, '/h')")
        wait_for(lambda: s.output().count("reload refused") == 2, timeout=VISIBLE, describe=s.output)
        s.signal(signal.SIGUSR1)
        wait_for(lambda: stats(s.addr)["users"] == 101, timeout=VISIBLE, describe=s.output)
        assert_serves_the_database(site, s)
        site.sql("INSERT INTO pwmail.users (name, uid, gid, home) VALUES ('after', 95001, 100, '/h')")
        wait_for(lambda: s.client().passwd_by_name("after"), timeout=VISIBLE, describe=s.output)


def _transactions(site: Site) -> int:
    """Transactions the database committed so far (PostgreSQL's statistics)."""
    with psycopg.connect(site.dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_force_next_flush()")
        return conn.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()").fetchone()[0]
