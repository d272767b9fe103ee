"""The batch a run of change-log rows becomes (pwcache/pgsource.py), and a
database source's settings; no database needed."""

from __future__ import annotations

import subprocess

import pytest

from pwcache.pgsource import plan_changes, render_batch
from pwcache.source_sql import check_source_uri, copy_single_bytea, log_kept
from tests.support.pwtest import BIN, free_port


def test_first_row_of_a_name_says_whether_the_table_held_it():
    rows = [
        (1, "user", "insert", "new", None),
        (2, "user", "update", "new", None),  # inserted then changed: still not held before
        (3, "user", "update", "old", None),
        (4, "user", "update", "renamed", "was"),  # a rename: the old name was held, the new one not
        (5, "user", "delete", "gone", None),
        (6, "member", "insert", "staff", None),  # a membership: its group changes
        (7, "group", "insert", "fresh", None),
        (8, "member", "insert", "fresh", None),
    ]
    plan = plan_changes(rows)
    assert plan.users == {"new", "old", "renamed", "was", "gone"}
    assert plan.users_before == {"old", "was", "gone"}
    assert plan.groups == {"staff", "fresh"} and plan.groups_before == {"staff"}


def test_the_batch_deletes_what_was_held_first_then_puts_back_what_is():
    plan = plan_changes([(1, "user", "update", "a", None), (2, "user", "update", "b", None)])
    users = [("b", "b:x:1:1::/h:/s", None, None), ("a", "a:x:2:1::/h:/s", "a:$y$h:1::::::", "a store1 frozen")]
    batch, lost = render_batch(plan, users, [])
    # a uid swap: both deletes come before either passwd line
    assert batch == [
        ("del_user", "a"),
        ("del_user", "b"),
        ("passwd", "a:x:2:1::/h:/s"),
        ("shadow", "a:$y$h:1::::::"),
        ("mailhosts", "a store1 frozen"),
        ("passwd", "b:x:1:1::/h:/s"),
    ]
    assert lost == 0
    assert render_batch(plan, users[:1], [])[1] == 1  # a is gone from the database


def test_a_pruned_log_is_seen():
    assert log_kept(10, True, 50)  # a row at or below 10 is left: nothing after it went
    assert log_kept(10, False, 11) and log_kept(10, False, None)
    assert not log_kept(10, False, 12)


@pytest.mark.parametrize("value", ["host=db1 dbname=pwmail", "mysql://db1/pwmail", "/srv/users"])
def test_source_must_be_a_postgresql_uri(value, tmp_path):
    assert check_source_uri(value)
    proc = subprocess.run(
        [str(BIN / "pwserver"), "--source", value, "--log-stderr"],
        capture_output=True,
        text=True,
        env={"PWMAIL_CONF": "/nonexistent", "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert proc.returncode == 78 and "PostgreSQL URI" in proc.stderr, proc.stderr
    conf = tmp_path / "pwmail.toml"
    conf.write_text(f'[pwserver]\nsource = "{value}"\n')
    proc = subprocess.run([str(BIN / "pwserver"), "--config", str(conf)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 78 and "[pwserver] source" in proc.stderr, proc.stderr


def test_source_and_files_together_are_a_configuration_error(tmp_path):
    (tmp_path / "passwd").write_text("a:x:1:1::/h:/s\n")
    proc = subprocess.run(
        [str(BIN / "pwserver"), "--source", "postgresql://db1/pwmail", "--passwd", str(tmp_path / "passwd")],
        capture_output=True,
        text=True,
        env={"PWMAIL_CONF": "/nonexistent", "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert proc.returncode == 78 and "use one or the other" in proc.stderr, proc.stderr


def test_one_bytea_out_of_copys_binary_format():
    row = (1).to_bytes(2, "big") + (5).to_bytes(4, "big") + b"a:x\n\\"
    data = b"PGCOPY\n\xff\r\n\x00" + bytes(4) + (2).to_bytes(4, "big") + b"xx" + row + b"\xff\xff"
    assert copy_single_bytea(data) == b"a:x\n\\"  # the header extension skipped, nothing unescaped
    for bad in (b"COPY", data[:-8]):
        with pytest.raises(ValueError):
            copy_single_bytea(bad)


def test_a_database_out_of_reach_at_start_exits_1_without_binding():
    uri = f"postgresql://pwmail@127.0.0.1:{free_port()}/pwmail"
    proc = subprocess.run(
        [str(BIN / "pwserver"), "--source", uri, "--listen", "127.0.0.1:0", "--log-stderr"],
        capture_output=True,
        text=True,
        env={"PWMAIL_CONF": "/nonexistent", "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert proc.returncode == 1 and "cannot reach the database" in proc.stderr, proc.stderr
    assert "ready on" not in proc.stderr
