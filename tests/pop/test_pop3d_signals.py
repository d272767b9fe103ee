"""pop3d and its signals: SIGHUP re-reads [pop] for new sessions, SIGTERM
stops listening and lets open sessions finish within shutdown_grace. Each
test runs its own pop3d (it gets signals) against one real pwserver, with
poplib or a plain socket as the client."""

from __future__ import annotations

import os
import poplib
import signal
import socket
import subprocess
import time

import pytest

from tests.support.pop_util import deliver, make_root, message, read_reply, start_pop3d, users_pwserver
from tests.support.pwtest import wait_for

USERS = {"juan": ("juan-pw", "127.0.0.1"), "maria": ("maria pw", "127.0.0.1")}
HOST = "127.0.0.1"
OTHER = "127.0.0.2"  # a second client address on loopback (a "proxy" for trusted_networks)


@pytest.fixture(scope="module")
def pwserver(tmp_path_factory):
    with users_pwserver(tmp_path_factory.mktemp("pop3d-signals"), USERS) as conf:
        yield conf


@pytest.fixture
def bed(tmp_path, pwserver):
    """start(settings) -> a pop3d of this test over its own spool; the
    settings file is bed["settings"]; every pop3d started is stopped."""
    layout = make_root(tmp_path / "spool")
    started = []

    def start(settings: str = ""):
        d = start_pop3d(tmp_path, tmp_path / "spool", pwserver, host=HOST, settings=settings)
        started.append(d)
        return d

    # the file start_pop3d writes and names in PWMAIL_CONF
    yield {"layout": layout, "start": start, "settings": tmp_path / f"pwmail-pop3d-{HOST}.toml"}
    for d in started:
        d.stop(timeout=5)


def connect(d, source: str = HOST) -> tuple[socket.socket, bytes]:
    """A session from `source` and its greeting: (socket, greeting)."""
    s = socket.create_connection(d.address, timeout=10, source_address=(source, 0))
    return s, read_reply(s)


def command(s: socket.socket, line: str) -> bytes:
    s.sendall(line.encode() + b"\r\n")
    return read_reply(s)


def login(d, user: str, password: str | None = None) -> poplib.POP3:
    p = poplib.POP3(*d.address, timeout=10)
    p.user(user)
    p.pass_(password or USERS[user][0])
    return p


def failed_login_time(p: poplib.POP3) -> float:
    p.user("juan")
    t0 = time.monotonic()
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        p.pass_("wrong")
    return time.monotonic() - t0


def hup_and_wait(d, line: str) -> None:
    """SIGHUP, then wait until the log has one more `line` than before."""
    before = d.output().count(line)
    d.signal(signal.SIGHUP)
    wait_for(
        lambda: d.output().count(line) > before, timeout=10, describe=lambda: f"no {line!r} after SIGHUP:\n{d.output()}"
    )


def refused(address) -> bool:
    try:
        socket.create_connection(address, timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def exit_status(d, timeout: float) -> int:
    """pop3d's exit status once it ended by itself within `timeout`."""
    try:
        return d.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"pop3d still running after {timeout} s:\n{d.output()}") from None


# --- SIGHUP -------------------------------------------------------------------------------------
def test_sighup_applies_new_settings_to_new_sessions_only(bed):
    d = bed["start"]("pop3d_failure_delay = 1.0\n")
    old_proxy, greeting = connect(d, OTHER)
    assert greeting.startswith(b"+OK") and b"[XCLIENT]" not in greeting
    old_client = poplib.POP3(*d.address, timeout=10)
    bed["settings"].write_text(
        f'[pop]\ntrusted_networks = ["{OTHER}/32"]\npop3d_failure_delay = 0.0\npop3d_timeout = 1.0\n'
    )
    hup_and_wait(d, "reloaded settings")
    assert d.proc.poll() is None

    # new sessions: OTHER is a trusted proxy, failures answer at once, 1 s of silence ends a session
    new_proxy, greeting = connect(d, OTHER)
    assert greeting.startswith(b"+OK [XCLIENT]")
    assert command(new_proxy, "XCLIENT ADDR=192.0.2.7 PORT=4000") == b"+OK\r\n"
    assert command(new_proxy, "USER juan").startswith(b"+OK")
    assert command(new_proxy, "PASS juan-pw").startswith(b"+OK Logged in")
    assert command(new_proxy, "QUIT") == b"+OK Bye.\r\n"
    new_proxy.close()
    wait_for(lambda: "login user=juan from=192.0.2.7:4000" in d.output(), timeout=5)
    new_client = poplib.POP3(*d.address, timeout=10)
    assert failed_login_time(new_client) < 0.5
    new_client.quit()
    idle, _ = connect(d)
    t0 = time.monotonic()
    assert read_reply(idle, timeout=10) == b"-ERR Disconnected for inactivity.\r\n"
    assert 0.8 < time.monotonic() - t0 < 5
    idle.close()

    # sessions open before the SIGHUP keep what they started with
    assert command(old_proxy, "XCLIENT ADDR=192.0.2.8 PORT=4001").startswith(b"-ERR")
    assert failed_login_time(old_client) >= 1.0
    assert "USER" in old_client.capa()  # idle > 1 s, still open
    old_proxy.close()
    old_client.quit()


def test_sighup_with_a_bad_file_keeps_the_old_settings(bed):
    deliver(bed["layout"], "juan", message("kept"))
    d = bed["start"](f'trusted_networks = ["{OTHER}/32"]\n')
    for bad in (
        "trusted_networks = [\n",  # not TOML
        'trusted_networks = ["not a network"]\n',  # TOML, but no network
        "pop3d_timeout = 1\nno_such_key = 2\n",
    ):  # a typo in a key
        bed["settings"].write_text("[pop]\n" + bad)
        hup_and_wait(d, "reload failed, keeping the old settings")
        assert d.proc.poll() is None
        s, greeting = connect(d, OTHER)
        assert greeting.startswith(b"+OK [XCLIENT]")
        s.close()
        s, greeting = connect(d, HOST)
        assert greeting.startswith(b"+OK") and b"[XCLIENT]" not in greeting
        s.close()
    out = d.output()
    assert "reloaded settings" not in out
    assert out.count("reload failed, keeping the old settings") == 3
    assert f"SettingsError: {bed['settings']}" in out  # each reason is logged
    assert "'not a network' does not appear to be an IPv4 or IPv6 network" in out
    assert "unknown key(s) in [pop]: no_such_key" in out
    p = login(d, "juan")
    assert p.stat()[0] == 1
    p.quit()


def test_sighup_root_change_is_restart_only(bed, tmp_path):
    deliver(bed["layout"], "juan", message("stays"))
    d = bed["start"]()
    other_root = tmp_path / "other-spool"
    make_root(other_root)
    bed["settings"].write_text(f'[pop]\nroot = "{other_root}"\nlayout = "hash2"\n')
    hup_and_wait(d, "reloaded settings")
    out = d.output()
    assert "reload: root changed; it takes effect at restart" in out
    assert "reload: layout changed; it takes effect at restart" in out
    p = login(d, "juan")  # still the first spool
    assert p.stat()[0] == 1
    p.quit()
    # the file's root stays ignored on the next reload too (no new warning)
    bed["settings"].write_text("[pop]\npop3d_timeout = 100.0\n")
    hup_and_wait(d, "reloaded settings")
    assert d.output().count("root changed") == 1


# --- SIGTERM ------------------------------------------------------------------------------------
def test_sigterm_lets_open_sessions_finish(bed):
    layout = bed["layout"]
    paths = [deliver(layout, "juan", message(s)) for s in ("one", "two")]
    deliver(layout, "maria", message("hers"))
    d = bed["start"]()  # shutdown_grace: the default, 30 s
    juan = login(d, "juan")
    maria = poplib.POP3(*d.address, timeout=10)  # connected, not yet logged in
    d.signal(signal.SIGTERM)
    d.wait_line(r"stopping: 2 sessions open", "the drain", timeout=10)
    assert refused(d.address)

    maria.user("maria")
    maria.pass_(USERS["maria"][0])
    assert maria.stat()[0] == 1
    maria.quit()
    _, lines, _ = juan.retr(1)
    assert b"\n".join(lines) + b"\n" == message("one")
    juan.dele(1)
    assert d.proc.poll() is None  # juan's session still open
    juan.quit()
    ended = time.monotonic()
    assert exit_status(d, 10) == 0
    assert time.monotonic() - ended < 5  # the grace is 30 s
    cur = layout.path("juan") / "cur"
    assert [n.split(":")[0] for n in os.listdir(cur)] == [os.path.basename(paths[1])]
    out = d.output()
    assert "logout user=juan deleted=1 failed=0" in out
    assert "are cut" not in out and "ended: shutdown" not in out


def test_sigterm_cuts_idle_sessions_after_the_grace(bed):
    path = deliver(bed["layout"], "juan", message("kept"))
    d = bed["start"]("shutdown_grace = 1\n")
    juan = login(d, "juan")
    juan.dele(1)
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    assert exit_status(d, 10) == 0
    assert 0.9 < time.monotonic() - t0 < 5
    juan.sock.settimeout(5)
    assert juan.file.readline() == b""  # closed by pop3d, nothing more said
    juan.close()
    assert os.listdir(bed["layout"].path("juan") / "cur") == [os.path.basename(path) + ":2,"]
    out = d.output()
    assert "stopping: 1 session(s) still open after 1 s are cut" in out
    assert "ended: shutdown" in out and "logout" not in out
