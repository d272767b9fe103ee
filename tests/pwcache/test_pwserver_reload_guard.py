"""The reload guard (docs/pwserver.md, "Reloading"): pwserver refuses a load
that would turn an operator's mistake into bounces (an empty, shrunken or
garbage passwd), keeps serving the old generation, says so at ERROR once and
counts it in STATS; SIGUSR1 serves it on purpose, once. A pwserver that
would serve nothing does not start. A missing source is logged once, and
once when it is back. A real pwserver on loopback, its files replaced as
operators do, and real lookups (raw UDP, the Python client, pwquery)."""

import os
import random
import signal
import subprocess
import time

import pytest

from pwmail.base.errors import EX_CONFIG
from tests.support.pwserver_util import NOTFOUND, OK, passwd_line, stats, udp_query, write_sources
from tests.support.pwtest import BIN, PwServer, wait_for

USERS = [(f"user{i:04d}", 10000 + i) for i in range(40)]
POLL = 0.1  # s between checks of the sources: a "once" that is not shows up as many lines
QUIET = 2.0  # s to let the poll run after an event (about 20 polls)
REFUSED = "reload refused"
# no /dev/log here: without a syslog the log goes to stderr too; a UDP syslog
# nobody reads leaves stderr to what pwserver prints itself
QUIET_SYSLOG = {"PWMAIL_SYSLOG": "127.0.0.1:9", "PWMAIL_CONF": "/nonexistent"}


def replace(path, data: bytes) -> None:
    """As `... > passwd.tmp && mv passwd.tmp passwd`: a new inode in one rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.rename(path)


def passwd_of(users) -> bytes:
    return "".join(passwd_line(n, u) for n, u in users).encode()


@pytest.fixture
def server(tmp_path):
    paths = write_sources(tmp_path, USERS, shadow=False)
    conf = tmp_path / "pwmail.toml"
    conf.write_text(f"[pwserver]\npoll_seconds = {POLL}\n")
    with PwServer(paths, "--config", str(conf)) as s:
        s.paths = paths
        yield s


def generation(s) -> int:
    return udp_query(s.addr, "ping")[3][1]


def lines_with(s, text: str) -> list[str]:
    return [line for line in s.output().splitlines() if text in line]


def refused_once(s, why: str, reason_code: int) -> dict:
    """Waits for the refusal, lets the poll run, checks it was logged once,
    at ERROR, and is in STATS; returns the STATS map."""
    wait_for(lambda: lines_with(s, REFUSED), describe=s.output)
    time.sleep(QUIET)
    lines = lines_with(s, REFUSED)
    assert len(lines) == 1, lines
    assert " ERROR " in lines[0] and why in lines[0], lines[0]
    st = stats(s.addr)
    assert st["reloads_refused"] == 1
    assert st["last_refusal_reason"] == reason_code
    assert abs(st["last_refusal_time"] - time.time()) < 600
    assert st["generation"] == 1 and st["users"] == len(USERS)
    return st


def still_served(s) -> None:
    """Every user resolves, through every kind of client."""
    for name, _ in USERS:
        assert udp_query(s.addr, "passwd", name)[2] == OK
    with s.client() as c:
        assert c.passwd_by_name(USERS[-1][0]).uid == USERS[-1][1]
    run = subprocess.run(
        [str(BIN / "pwquery"), "--server", s.address, "passwd", USERS[0][0]], capture_output=True, text=True, timeout=30
    )
    assert run.returncode == 0 and run.stdout.startswith(USERS[0][0] + ":"), run


def test_truncated_passwd_is_refused_and_users_still_resolve(server):
    replace(server.paths["passwd"], b"")  # `: > passwd.tmp && mv passwd.tmp passwd`
    st = refused_once(server, "no users", 1)
    assert st["last_refused_users"] == 0 and st["last_refused_bad_lines"] == 0
    still_served(server)


def test_sighup_on_refused_files_is_refused_again_without_a_new_error(server):
    replace(server.paths["passwd"], b"")
    refused_once(server, "no users", 1)
    server.signal(signal.SIGHUP)  # asked again, same files: same answer
    wait_for(lambda: stats(server.addr)["reloads_refused"] == 2)
    assert len(lines_with(server, REFUSED)) == 2 and len(lines_with(server, "reload refused again")) == 1
    assert " ERROR " not in lines_with(server, "reload refused again")[0]
    still_served(server)


def test_ten_megabytes_of_garbage_are_refused(server):
    replace(server.paths["passwd"], random.Random(13).randbytes(10 * 1024 * 1024))
    st = refused_once(server, "malformed lines", 3)
    assert st["last_refused_bad_lines"] > 1000
    still_served(server)


def test_half_the_users_gone_is_refused_then_served_on_sigusr1_once(server):
    replace(server.paths["passwd"], passwd_of(USERS[:20]))
    st = refused_once(server, "50.0 % lost", 2)
    assert st["last_refused_users"] == 20
    still_served(server)

    server.signal(signal.SIGUSR1)  # the operator means it
    wait_for(lambda: generation(server) == 2)
    assert udp_query(server.addr, "passwd", USERS[-1][0])[2] == NOTFOUND
    assert udp_query(server.addr, "passwd", USERS[0][0])[2] == OK
    assert lines_with(server, "serving a load the reload guard refuses")
    assert stats(server.addr)["users"] == 20

    # the override was for that load only: the next bad one is refused again
    replace(server.paths["passwd"], passwd_of(USERS[:5]))
    wait_for(lambda: stats(server.addr)["reloads_refused"] == 2)
    time.sleep(QUIET)
    assert generation(server) == 2 and stats(server.addr)["users"] == 20
    assert udp_query(server.addr, "passwd", USERS[19][0])[2] == OK


def test_a_few_users_gone_is_served(server):
    replace(server.paths["passwd"], passwd_of(USERS[:38]))  # 5 % lost: within 10 %
    wait_for(lambda: generation(server) == 2)
    assert udp_query(server.addr, "passwd", USERS[-1][0])[2] == NOTFOUND
    assert udp_query(server.addr, "passwd", USERS[0][0])[2] == OK
    assert stats(server.addr)["reloads_refused"] == 0 and not lines_with(server, REFUSED)


def test_garbage_lines_beside_every_user_are_refused(server):
    garbage = "".join(f"not a passwd line {i}\n" for i in range(1001))  # default limit: 1000
    replace(server.paths["passwd"], passwd_of(USERS) + garbage.encode())
    refused_once(server, "1001 malformed lines", 3)
    replace(server.paths["passwd"], passwd_of(USERS) + garbage.encode()[: -len("not a passwd line 1000\n")])
    wait_for(lambda: generation(server) == 2)  # 1000: at the limit, served


def test_limits_from_the_settings_file(tmp_path):
    paths = write_sources(tmp_path, USERS)
    conf = tmp_path / "pwmail.toml"
    conf.write_text(f"[pwserver]\npoll_seconds = {POLL}\nreload_max_shrink = 0.6\nreload_max_bad_lines = 2\n")
    with PwServer(paths, "--config", str(conf)) as s:
        replace(paths["passwd"], passwd_of(USERS[:20]) + b"bad\nbad\n")  # 50 % lost, 2 bad lines: served
        wait_for(lambda: generation(s) == 2)
        replace(paths["passwd"], passwd_of(USERS[:20]) + b"bad\nbad\nbad\n")
        wait_for(lambda: stats(s.addr)["reloads_refused"] == 1)
        assert stats(s.addr)["last_refused_bad_lines"] == 3
        assert lines_with(s, "3 malformed lines, more than reload_max_bad_lines (2)")


def start(paths, *args) -> subprocess.CompletedProcess:
    """pwserver expected to refuse to start: its exit status and output."""
    return subprocess.run(
        [str(BIN / "pwserver"), "--passwd", str(paths["passwd"]), "--listen", "127.0.0.1:0", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=os.environ | QUIET_SYSLOG,
    )


@pytest.mark.parametrize(
    "toml",
    [
        "reload_max_shrink = 1.5",
        "reload_max_shrink = -0.1",
        'reload_max_shrink = "10%"',
        "reload_max_bad_lines = -1",
        "reload_max_bad_lines = 1.5",
        'allow_empty = "yes"',
    ],
)
def test_bad_guard_settings_exit_ex_config(tmp_path, toml):
    paths = write_sources(tmp_path, USERS[:2])
    conf = tmp_path / "pwmail.toml"
    conf.write_text(f"[pwserver]\n{toml}\n")
    run = start(paths, "--config", str(conf))
    assert run.returncode == EX_CONFIG and f"{conf}: [pwserver] {toml.split()[0]} " in run.stderr, run.stderr


def test_nothing_to_serve_refuses_to_start(tmp_path):
    paths = write_sources(tmp_path, [])
    run = start(paths)
    assert run.returncode == 1
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("pwserver: refusing to serve the tables: no users")
    assert "--allow-empty" in run.stderr
    with PwServer(paths, "--allow-empty") as s:  # a server meant to be empty
        assert s.users == 0
        assert udp_query(s.addr, "passwd", "anyone")[2] == NOTFOUND


def test_garbage_at_start_refuses_to_start_unless_accepted(tmp_path):
    paths = write_sources(tmp_path, USERS[:3])
    paths["passwd"].write_bytes(passwd_of(USERS[:3]) + b"garbage\n" * 1001)
    run = start(paths)
    assert run.returncode == 1 and run.stderr.count("\n") == 1 and "1001 malformed lines" in run.stderr
    with PwServer(paths, "--accept-shrink") as s:  # the operator means it
        assert s.users == 3
        assert udp_query(s.addr, "passwd", USERS[0][0])[2] == OK


def test_missing_source_logged_once_and_once_when_back(server):
    saved = server.paths["passwd"].read_bytes()
    server.paths["passwd"].unlink()
    wait_for(lambda: lines_with(server, "is missing"), describe=server.output)
    time.sleep(QUIET)
    missing = lines_with(server, "is missing")
    assert len(missing) == 1 and " ERROR " in missing[0] and "reload failed" in missing[0]
    assert len(lines_with(server, "reload failed")) == 1
    still_served(server)
    replace(server.paths["passwd"], saved + passwd_line("newbie", 5000).encode())
    wait_for(lambda: udp_query(server.addr, "passwd", "newbie")[2] == OK)
    time.sleep(QUIET)
    assert len(lines_with(server, f"passwd file {server.paths['passwd']} is back")) == 1
    assert len(lines_with(server, "is missing")) == 1
    assert generation(server) == 2


def test_override_is_spent_by_the_load_it_asks_for_even_a_failed_one(server):
    server.paths["passwd"].unlink()
    wait_for(lambda: lines_with(server, "is missing"), describe=server.output)
    server.signal(signal.SIGUSR1)  # its load fails: the file is still missing
    wait_for(lambda: lines_with(server, "reload skipped"), describe=server.output)
    replace(server.paths["passwd"], b"")  # a later mistake is not served on the old override
    wait_for(lambda: lines_with(server, REFUSED), describe=server.output)
    assert stats(server.addr)["reloads_refused"] == 1 and generation(server) == 1
    still_served(server)
