"""`pwmail db` and `pwmail user` against a real PostgreSQL 15 started by the
tests (tests/support/pg_util.py): the schema, its constraints and change log, and
whole sites moved from files to the database and back."""

from __future__ import annotations

import itertools
import stat
import subprocess

import pytest

from tests.support import pg_util
from tests.support.pg_util import pwmail, user
from tests.support.pwtest import gen_users

psycopg = pytest.importorskip("psycopg")
from pop import crypt  # noqa: E402
from pwmail.db.files import valid_name  # noqa: E402

pytestmark = pytest.mark.skipif(not pg_util.available(), reason="needs root, setpriv and PostgreSQL 15")

_db_numbers = itertools.count(1)


@pytest.fixture
def dsn(pg) -> str:
    """A new empty database with the schema."""
    dsn = pg.create_database(f"t{next(_db_numbers)}")
    assert pwmail("db", "init", dsn).returncode == 0
    return dsn


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def query(dsn: str, sql: str, params=None) -> list[tuple]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


# ---- the schema ---------------------------------------------------------------


def test_init_twice_keeps_the_data(pg):
    dsn = pg.create_database("init_twice")
    assert pwmail("db", "init", dsn).returncode == 0
    assert user(dsn, "add", "jgarcia", "--no-password").returncode == 0
    second = pwmail("db", "init", dsn)
    assert second.returncode == 0, second.stderr
    assert query(dsn, "SELECT name FROM pwmail.users") == [("jgarcia",)]
    assert query(dsn, "SELECT count(*) FROM pwmail.changes") == [(1,)]


def test_a_database_without_the_schema_says_so(pg):
    dsn = pg.create_database("no_schema")
    assert "run `pwmail db init DSN` first" in one_line_error(user(dsn, "show", "jgarcia"))


def test_python_name_rule_is_the_schema_rule(dsn):
    names = [
        "jgarcia",
        "Juan",
        "a",
        "x" * 255,
        "x" * 256,
        "j.garcia",
        "j_g-1+2",
        "a/b",
        "a:b",
        "a b",
        ".hidden",
        "+nis",
        "-nis",
        "ñandu",
        "tab\there",
        "",
        "semi;colon",
        "#hash",
        "~tilde",
    ]
    from_sql = dict(query(dsn, "SELECT n, pwmail.valid_name(n) FROM unnest(%s::text[]) n", (names,)))
    assert {n: valid_name(n) for n in names} == from_sql
    assert from_sql["jgarcia"] and not from_sql["a/b"]


@pytest.mark.parametrize(
    "row, constraint",
    [
        (("a/b", 1), "users_name_valid"),
        (("juan", -1), "users_uid_range"),
        (("juan", 2**32), "users_uid_range"),
    ],
)
def test_database_refuses_bad_rows_from_any_writer(dsn, row, constraint):
    with psycopg.connect(dsn, autocommit=True) as conn, pytest.raises(psycopg.errors.CheckViolation) as e:
        conn.execute("INSERT INTO pwmail.users (name, uid, gid, home) VALUES (%s, %s, 1, '/h')", row)
    assert e.value.diag.constraint_name == constraint


def test_frozen_needs_a_mailhost(dsn):
    assert user(dsn, "add", "jgarcia", "--no-password").returncode == 0
    line = one_line_error(user(dsn, "freeze", "jgarcia"))
    assert "only a user with a mailhost can be frozen" in line
    assert query(dsn, "SELECT frozen FROM pwmail.users") == [(False,)]


# ---- constraints through `pwmail user` ------------------------------------------


def test_duplicates_refused_with_one_line(dsn):
    assert user(dsn, "add", "jgarcia", "--no-password", "--uid", "20001").returncode == 0
    assert "a user of that name exists" in one_line_error(user(dsn, "add", "jgarcia", "--no-password"))
    assert "other letter case" in one_line_error(user(dsn, "add", "JGarcia", "--no-password"))
    assert "uid belongs to another user" in one_line_error(
        user(dsn, "add", "mlopez", "--no-password", "--uid", "20001")
    )
    assert query(dsn, "SELECT name, uid FROM pwmail.users") == [("jgarcia", 20001)]


@pytest.mark.parametrize("name", ["a/b", ".hidden", "a:b", "with space", "-rf", "x" * 256, "ñandu"])
def test_bad_names_refused_with_one_line(dsn, name):
    line = one_line_error(user(dsn, "add", "--no-password", "--", name))  # `--`: "-rf" is not an option
    assert "cannot be a mailbox name" in line
    assert query(dsn, "SELECT count(*) FROM pwmail.users") == [(0,)]


def test_rename_to_a_bad_name_refused_by_the_database(dsn):
    assert user(dsn, "add", "jgarcia", "--no-password").returncode == 0
    assert "cannot be a mailbox name" in one_line_error(user(dsn, "set", "jgarcia", "name=../etc"))
    assert "no such user" in one_line_error(user(dsn, "del", "nobody-here"))


# ---- passwords ------------------------------------------------------------------


def test_password_hash_is_yescrypt_and_verifies(dsn):
    assert user(dsn, "add", "jgarcia", "--password-stdin", stdin="first secret\n").returncode == 0
    [(hashed,)] = query(dsn, "SELECT password_hash FROM pwmail.users WHERE name = 'jgarcia'")
    assert hashed.startswith("$y$")
    assert crypt.check_password("first secret", hashed)
    assert not crypt.check_password("first secreT", hashed)
    # not a terminal: passwd reads stdin without the flag too
    assert user(dsn, "passwd", "jgarcia", stdin="second secret\n").returncode == 0
    [(new,)] = query(dsn, "SELECT password_hash FROM pwmail.users WHERE name = 'jgarcia'")
    assert crypt.check_password("second secret", new) and not crypt.check_password("first secret", new)
    shown = user(dsn, "show", "jgarcia")
    assert "password=set (y)" in shown.stdout and new not in shown.stdout


@pytest.mark.parametrize(
    "args",
    [
        ("add", "mlopez", "--password", "hunter2"),
        ("add", "mlopez", "--password=hunter2"),
        ("add", "mlopez", "hunter2"),
        ("add", "mlopez", "--password-stdin", "hunter2"),
        ("passwd", "jgarcia", "hunter2"),
        ("passwd", "jgarcia", "--password", "hunter2"),
        ("set", "jgarcia", "password=hunter2"),
        ("set", "jgarcia", "password_hash=hunter2"),
    ],
)
def test_password_never_accepted_as_an_argument(dsn, args):
    assert user(dsn, "add", "jgarcia", "--password-stdin", stdin="the real one\n").returncode == 0
    before = query(dsn, "SELECT name, password_hash FROM pwmail.users ORDER BY name")
    proc = user(dsn, *args, stdin="from stdin\n")
    assert proc.returncode != 0
    assert query(dsn, "SELECT name, password_hash FROM pwmail.users ORDER BY name") == before


def test_empty_password_refused(dsn):
    assert "empty password" in one_line_error(user(dsn, "add", "jgarcia", "--password-stdin", stdin="\n"))


# ---- the change log and NOTIFY ----------------------------------------------------


def test_every_change_is_logged_in_order_and_notified(dsn):
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute("LISTEN pwmail_changes")
        steps = [
            (("add", "jgarcia", "--password-stdin", "--mailhost", "store1", "--quota", "500M"), "insert"),
            (("passwd", "jgarcia"), "update"),
            (("freeze", "jgarcia"), "update"),
            (("set", "jgarcia", "mailhost=store2", "quota=2G"), "update"),
            (("unfreeze", "jgarcia"), "update"),
            (("del", "jgarcia"), "delete"),
        ]
        for args, _ in steps:
            proc = user(dsn, *args, stdin="pw for the test\n")
            assert proc.returncode == 0, proc.stderr
        notified = [int(n.payload) for n in listener.notifies(timeout=30, stop_after=len(steps))]
        log = listener.execute("SELECT seq, kind, op, name FROM pwmail.changes ORDER BY seq").fetchall()
    assert [(kind, op, name) for _, kind, op, name in log] == [("user", op, "jgarcia") for _, op in steps]
    seqs = [seq for seq, *_ in log]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert notified == seqs  # one notification per transaction, carrying its last seq


def test_deleting_a_user_logs_their_memberships_going(dsn):
    for name in ("jgarcia", "mlopez"):
        assert user(dsn, "add", name, "--no-password").returncode == 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO pwmail.groups VALUES ('staff', 50)")
        conn.execute(
            "INSERT INTO pwmail.members (group_name, user_name) VALUES ('staff', 'jgarcia'), ('staff', 'mlopez')"
        )
    [(last,)] = query(dsn, "SELECT max(seq) FROM pwmail.changes")
    assert user(dsn, "set", "mlopez", "name=mlopez2").returncode == 0
    assert user(dsn, "del", "jgarcia").returncode == 0
    assert query(
        dsn, "SELECT kind, op, name, member, old_name FROM pwmail.changes WHERE seq > %s ORDER BY seq", (last,)
    ) == [
        ("user", "update", "mlopez2", None, "mlopez"),
        ("member", "delete", "staff", "mlopez", None),
        ("member", "insert", "staff", "mlopez2", None),
        ("user", "delete", "jgarcia", None, None),
        ("member", "delete", "staff", "jgarcia", None),
    ]
    assert query(dsn, "SELECT group_name, user_name FROM pwmail.members") == [("staff", "mlopez2")]
    assert "groups=staff" in user(dsn, "show", "mlopez2").stdout


def test_values_set_are_what_show_prints(dsn):
    assert user(dsn, "add", "jgarcia", "--no-password", "--mailhost", "store1", "--uid", "12345").returncode == 0
    assert user(dsn, "set", "jgarcia", "quota=2G", "gecos=Juan Garcia", "frozen=true").returncode == 0
    shown = dict(line.split("=", 1) for line in user(dsn, "show", "jgarcia").stdout.splitlines())
    assert shown["uid"] == "12345" and shown["quota"] == str(2 << 30) and shown["frozen"] == "true"
    assert shown["gecos"] == "Juan Garcia" and shown["mailhost"] == "store1" and shown["password"] == "locked"
    assert shown["home"] == "/var/spool/mail/j/g/a/jgarcia"
    assert user(dsn, "show", "nobody-here").returncode == 2


def test_db_settings_from_pwmail_toml(dsn, tmp_path):
    conf = tmp_path / "pwmail.toml"
    conf.write_text(
        f'[db]\ndsn = "{dsn}"\nfirst_uid = 70000\ngid = 500\nshell = "/bin/false"\n'
        '[delivery]\nroot = "/srv/mail"\nlayout = "first2last"\n'
    )
    proc = pwmail("user", "add", "mlopez", "--no-password", conf=str(conf))
    assert proc.returncode == 0, proc.stderr
    assert query(dsn, "SELECT uid, gid, shell, home FROM pwmail.users") == [
        (70000, 500, "/bin/false", "/srv/mail/m/l/z/mlopez")
    ]
    conf.write_text('[db]\ndns = "typo"\n')
    assert "unknown key(s) in [db]: dns" in one_line_error(pwmail("user", "show", "mlopez", conf=str(conf)))


def test_new_uids_follow_the_highest(dsn):
    for name in ("aaaaaaa", "bbbbbbb"):
        assert user(dsn, "add", name, "--no-password").returncode == 0
    assert user(dsn, "add", "ccccccc", "--no-password", "--uid", "50000").returncode == 0
    assert user(dsn, "add", "ddddddd", "--no-password").returncode == 0
    assert query(dsn, "SELECT name, uid FROM pwmail.users ORDER BY uid") == [
        ("aaaaaaa", 10000),
        ("bbbbbbb", 10001),
        ("ccccccc", 50000),
        ("ddddddd", 50001),
    ]


# ---- whole sites: import and export ---------------------------------------------------


@pytest.fixture
def site(tmp_path):
    """A generated site with a frozen user and a gecos COPY must escape."""
    src = gen_users(tmp_path / "src", 3000)
    mh = (src / "mailhosts").read_text().splitlines(keepends=True)
    mh[5] = mh[5].rstrip("\n") + " frozen\n"
    (src / "mailhosts").write_text("".join(mh))
    with open(src / "passwd", "a") as f:
        f.write("odd1user:x:99999:10000:Back\\slash\tand tab:/var/spool/mail/o/d/d/odd1user:/bin/false\n")
    return src


def _import(dsn, src, *extra):
    return pwmail(
        "db",
        "import",
        dsn,
        "--passwd",
        str(src / "passwd"),
        "--shadow",
        str(src / "shadow"),
        "--group",
        str(src / "group"),
        "--mailhosts",
        str(src / "mailhosts"),
        *extra,
    )


def _data_lines(path):
    return [line for line in path.read_text().splitlines() if not line.startswith("#")]


KEYS_SQL = (
    "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE connamespace = 'pwmail'::regnamespace "
    "UNION ALL SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid) FROM pg_index "
    "WHERE indrelid::regclass::text LIKE 'pwmail.%' ORDER BY 1"
)


def test_import_then_export_gives_the_same_files(dsn, site, tmp_path):
    keys = query(dsn, KEYS_SQL)
    proc = _import(dsn, site)
    assert proc.returncode == 0, proc.stderr
    # the import drops keys and indexes for the load: all of them are back, and hold
    assert query(dsn, KEYS_SQL) == keys and len(keys) > 15
    first = site.joinpath("passwd").read_text().split(":")[0]
    assert "other letter case" in one_line_error(user(dsn, "add", first.upper(), "--no-password"))
    assert "imported 3,001 users" in proc.stdout
    out = tmp_path / "out"
    out.mkdir()
    proc = pwmail("db", "export", dsn, "--dir", str(out))
    assert proc.returncode == 0, proc.stderr
    for name in ("passwd", "shadow", "group"):
        assert (out / name).read_bytes() == (site / name).read_bytes(), name
    assert _data_lines(out / "mailhosts") == _data_lines(site / "mailhosts")
    assert stat.S_IMODE((out / "shadow").stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "passwd").stat().st_mode) == 0o644
    assert sorted(p.name for p in out.iterdir()) == ["group", "mailhosts", "passwd", "shadow"]  # no temporaries
    # every imported row is in the change log, for a follower starting from 0
    assert query(dsn, "SELECT kind, count(*) FROM pwmail.changes GROUP BY kind ORDER BY kind") == [
        ("group", len(_data_lines(site / "group"))),
        (
            "member",
            sum(len(line.split(":")[3].split(",")) for line in _data_lines(site / "group") if line.split(":")[3]),
        ),
        ("user", 3001),
    ]


def test_progress_bar_only_on_a_terminal():
    import io

    from pwmail.db.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stream, drawn in ((Terminal(), True), (io.StringIO(), False)):
        bar = Progress(1000, "importing", stream)
        bar.advance(500)
        bar.advance(500)
        bar.finish()
        assert ("1,000/1,000" in stream.getvalue()) is drawn and ("[" in stream.getvalue()) is drawn


def test_import_refuses_a_database_that_holds_users(dsn, site):
    assert user(dsn, "add", "zzexisting", "--no-password").returncode == 0
    assert "--replace" in one_line_error(_import(dsn, site))
    assert query(dsn, "SELECT count(*) FROM pwmail.users") == [(1,)]
    proc = _import(dsn, site, "--replace")
    assert proc.returncode == 0, proc.stderr
    assert query(dsn, "SELECT count(*), count(*) FILTER (WHERE name = 'zzexisting') FROM pwmail.users") == [(3001, 0)]


def test_import_skips_and_counts_what_the_database_would_refuse(dsn, tmp_path):
    (tmp_path / "passwd").write_text(
        "# comment\njgarcia:x:10000:10000::/h:/bin/sh\nJGarcia:x:10001:10000::/h:/s\n"
        "a/b:x:10002:10000::/h:/s\nmlopez:x:10000:10000::/h:/s\nshort:x:1\n"
    )
    (tmp_path / "group").write_text("staff:x:50:jgarcia,ghost\n")
    proc = pwmail("db", "import", dsn, "--passwd", str(tmp_path / "passwd"), "--group", str(tmp_path / "group"))
    assert proc.returncode == 0, proc.stderr
    assert "skipped 4 passwd line(s) (first: line 3: duplicate name 'JGarcia')" in proc.stderr
    assert "skipped 1 group members line(s)" in proc.stderr
    assert query(dsn, "SELECT name FROM pwmail.users") == [("jgarcia",)]
    assert query(dsn, "SELECT group_name, user_name FROM pwmail.members") == [("staff", "jgarcia")]


def test_export_failure_leaves_the_old_files(dsn, tmp_path, pg):
    out = tmp_path / "out"
    out.mkdir()
    (out / "passwd").write_text("old\n")
    proc = pwmail("db", "export", pg.dsn("no_such_database"), "--dir", str(out))
    assert proc.returncode == 1 and "cannot reach the database" in one_line_error(proc)
    assert [p.name for p in out.iterdir()] == ["passwd"] and (out / "passwd").read_text() == "old\n"
