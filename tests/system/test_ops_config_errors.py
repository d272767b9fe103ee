"""Configuration mistakes, the way an operator meets them: the real commands
as subprocesses, each given a bad pwmail.toml with --config (or a bad flag,
or a busy address). Every one says what is wrong in one line naming the
file and the key (or the flag, or the address) and exits EX_CONFIG (78),
never a traceback."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import time

import pytest

from tests.support.pwserver_util import write_sources
from tests.support.pwtest import BIN, Process, PwServer, client_conf, wait_for

EX_CONFIG = 78  # sysexits.h, documented in every part's docs

SYSLOG_NOTE = "cannot log to syslog"
RUN_TIMEOUT = 20  # a daemon that wrongly starts is killed after this (and the test fails)


def run(argv: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PWMAIL_CONF": "/nonexistent", "PWSERVER_CONF": "/nonexistent", **(env or {})}
    try:
        return subprocess.run(
            [str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True, timeout=RUN_TIMEOUT, env=env
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{argv[0]} did not refuse its configuration (still running after {RUN_TIMEOUT} s): {e.stderr}")


def said(r: subprocess.CompletedProcess, prog: str) -> list[str]:
    """What the command itself said on stderr (not log records, not the note
    that there is no syslog on this machine)."""
    return [line for line in r.stderr.splitlines() if line.startswith(f"{prog}: ") and SYSLOG_NOTE not in line]


def assert_one_line(r: subprocess.CompletedProcess, prog: str, *wanted: str) -> str:
    assert r.returncode == EX_CONFIG, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = said(r, prog)
    assert len(lines) == 1, r.stderr
    for text in wanted:
        assert text in lines[0], (text, lines[0])
    return lines[0]


@pytest.fixture
def users(tmp_path):
    return write_sources(tmp_path, [("alice", 1001), ("bob", 1002)])


def daemon_argv(name: str, tmp_path, users) -> list[str]:
    """What each daemon needs to start at all, besides --config."""
    conf = client_conf(tmp_path / "pwserver.conf", ["127.0.0.1:1"])
    return {
        "pdeliveryd": ["pdeliveryd", "--root", str(tmp_path), "--users", f"passwd:{users['passwd']}"],
        "pop3d": ["pop3d", "--root", str(tmp_path), "--pwserver-conf", str(conf)],
        "pop-proxy": ["pop-proxy", "--pwserver-conf", str(conf)],
        "pwserver": ["pwserver", "--passwd", str(users["passwd"])],
    }[name]


# (daemon, file's text, what the line must name besides the file)
FILE_MISTAKES = [
    ("pdeliveryd", '[delivery]\nlmtp_port = "12024x"\n', ["[delivery] lmtp_port", "12024x", "integer"]),
    ("pdeliveryd", "[delivery]\nlmtp_port = 70000\n", ["[delivery] lmtp_port", "1..65535"]),
    ("pdeliveryd", "[delivery]\nidle_timeout = -1\n", ["[delivery] idle_timeout", "above 0"]),
    ("pdeliveryd", "[delivery]\nsessions_max = 0\n", ["[delivery] sessions_max"]),
    ("pdeliveryd", '[delivery]\nlisten = "0.0.0.0:port"\n', ["[delivery] listen"]),
    ("pdeliveryd", '[delivery]\nusers = "ldap"\n', ["[delivery] users", "passwd:FILE"]),
    ("pop-proxy", "[pop]\nbackend_port = -5\n", ["[pop] backend_port", "1..65535"]),
    ("pop-proxy", '[pop]\nlisten = "127.0.0.1:99999"\n', ["[pop] listen", "99999"]),
    ("pop-proxy", '[pop]\nbackends = {store1 = "10.0.0.1:pop"}\n', ["[pop] backends", "store1"]),
    ("pop-proxy", '[pop]\nbackend_tls = "yes"\n', ["[pop] backend_tls", "none, tls, stls"]),
    ("pop-proxy", "[pop]\nbackend_timeout = 0\n", ["[pop] backend_timeout"]),
    ("pop-proxy", "[pop]\nbackend_prot = 110\n", ["[pop]", "backend_prot"]),
    ("pop3d", "[pop]\npop3d_timeout = 0\n", ["[pop] pop3d_timeout"]),
    ("pop3d", '[pop]\ntrusted_networks = ["10.0.0.0/33"]\n', ["[pop] trusted_networks", "10.0.0.0/33"]),
    ("pop3d", '[pop]\nlayout = "first4"\n', ["[pop] layout", "first3"]),
    ("pop3d", "[pop]\nshutdown_grace = -1\n", ["[pop] shutdown_grace"]),
    ("pwserver", "[pwserver]\nthreads = 0\n", ["[pwserver] threads", "1..32"]),
    ("pwserver", '[pwserver]\nlisten = "127.0.0.1:99999"\n', ["[pwserver] listen"]),
    ("pwserver", '[pwserver]\nallow = ["10.0.0.0/33"]\n', ["[pwserver] allow", "10.0.0.0/33"]),
    ("pwserver", '[placement]\nrule = "nearest"\n', ["[placement] rule", "nearest"]),
    ("pwserver", "[pwserver]\ntcp_max_per_source = 300\n", ["[pwserver]", "tcp_max_per_source"]),
    ("pwserver", "not toml [\n", []),
]


@pytest.mark.parametrize(
    "name,text,wanted", FILE_MISTAKES, ids=[f"{n}-{t.split(chr(10))[1] or t.strip()}" for n, t, _ in FILE_MISTAKES]
)
def test_file_mistake_one_line_naming_file_and_key(tmp_path, users, name, text, wanted):
    conf = tmp_path / "bad-pwmail.toml"
    conf.write_text(text)
    r = run(daemon_argv(name, tmp_path, users) + ["--listen", "127.0.0.1:0", "--config", str(conf)])
    line = assert_one_line(r, name, str(conf), *wanted)
    assert "--" not in line.split(str(conf), 1)[1], f"a file's value reported as a flag: {line}"


@pytest.mark.parametrize(
    "text,wanted",
    [
        ('[pop]\ntls_listen = "127.0.0.1:0"\n', ["tls_listen needs tls_cert"]),
        ('[pop]\ntls_cert = "/nonexistent/cert.pem"\n', ["tls_cert /nonexistent/cert.pem"]),
    ],
)
def test_proxy_tls_mistakes_one_line(tmp_path, users, text, wanted):
    conf = tmp_path / "bad-pwmail.toml"
    conf.write_text(text)
    assert_one_line(
        run(daemon_argv("pop-proxy", tmp_path, users) + ["--listen", "127.0.0.1:0", "--config", str(conf)]),
        "pop-proxy",
        *wanted,
    )


@pytest.mark.parametrize(
    "name,flags,wanted",
    [
        ("pdeliveryd", ["--lmtp-port", "0"], "--lmtp-port 0"),
        ("pdeliveryd", ["--listen", "127.0.0.1:99999"], "--listen 127.0.0.1:99999"),
        ("pop-proxy", ["--backend-port", "70000"], "--backend-port 70000"),
        ("pop3d", ["--listen", "127.0.0.1:99999"], "--listen 127.0.0.1:99999"),
        ("pop3d", ["--trusted", "10.0.0.0/33"], "--trusted"),
        ("pwserver", ["--threads", "0"], "--threads 0"),
        ("pwserver", ["--allow", "10.0.0.0/33"], "--allow"),
    ],
)
def test_flag_mistake_named_as_the_flag(tmp_path, users, name, flags, wanted):
    conf = tmp_path / "empty.toml"
    conf.write_text("")
    listen = [] if "--listen" in flags else ["--listen", "127.0.0.1:0"]
    assert_one_line(run(daemon_argv(name, tmp_path, users) + listen + flags + ["--config", str(conf)]), name, wanted)


@pytest.mark.parametrize("name", ["pdeliveryd", "pop3d", "pop-proxy", "pwserver"])
def test_busy_address_one_line(tmp_path, users, name):
    conf = tmp_path / "empty.toml"
    conf.write_text("")
    with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        port = tcp.getsockname()[1]
        udp.bind(("127.0.0.1", port))  # pwserver's UDP side too
        r = run(daemon_argv(name, tmp_path, users) + ["--listen", f"127.0.0.1:{port}", "--config", str(conf)])
    assert_one_line(r, name, f"cannot listen on 127.0.0.1:{port}", "in use")


def test_bad_client_configuration_exit_78(tmp_path, users):
    bad = tmp_path / "bad-pwserver.conf"
    bad.write_text("server 127.0.0.1:77x3\n")
    assert_one_line(run(["pwquery", "--pwserver-conf", str(bad), "ping"]), "pwquery", f"{bad}:1", "77x3")
    conf = tmp_path / "empty.toml"
    conf.write_text("")
    argv = ["pdeliveryd", "--root", str(tmp_path), "--users", "pwserver", "--pwserver-conf", str(bad)]
    assert_one_line(run(argv + ["--listen", "127.0.0.1:0", "--config", str(conf)]), "pdeliveryd", f"{bad}:1")


def test_admin_command_settings_mistake_exit_78(tmp_path, users):
    conf = tmp_path / "bad-pwmail.toml"
    conf.write_text('[placement]\nrule = "nearest"\n')
    r = run(
        ["pwmail", "placement-report", "--passwd", str(users["passwd"]), "--users-only"], env={"PWMAIL_CONF": str(conf)}
    )
    assert_one_line(r, "pwmail placement-report", str(conf), "[placement] rule")


def test_section_types_from_defaults(tmp_path):
    """The typed loader: a value's type is its default's (an integer where a
    float is the default is taken, as a float); true is not an integer."""
    from pwmail.base import settings

    section = settings.Section("t", {"n": 1, "x": 1.5, "on": True, "name": "", "hosts": []}, {"n": settings.positive})
    path = tmp_path / "t.toml"
    path.write_text("[t]\nx = 2\n")
    assert section.load(str(path))["x"] == 2.0 and isinstance(section.load(str(path))["x"], float)
    for text, wanted in (
        ("n = true", "n = True: want an integer"),
        ("n = 1.5", "n = 1.5: want an integer"),
        ("on = 1", "on = 1: want true or false"),
        ('hosts = "a"', "hosts = 'a': want a list"),
        ("n = 0", "n = 0: must be above 0"),
        ("x = 'fast'", "x = 'fast': want a number"),
    ):
        path.write_text(f"[t]\n{text}\n")
        with pytest.raises(settings.SettingsError, match=re.escape(f"{path}: [t] {wanted}")):
            section.load(str(path))


# ---- silent misconfigurations --------------------------------------------


def test_shadow_without_key_warns_at_start(tmp_path, users):
    with PwServer(users) as s:  # passwd and shadow, no --shadow-key
        out = s.output()
    assert "shadow lookups are not enabled on this server" in out and str(users["shadow"]) in out


def test_skipped_lines_located_first_few(tmp_path, users):
    """Every skipped line is counted; the first PWT_SKIP_NOTES (5) of a load
    are logged with their file and line number."""
    lines = users["passwd"].read_text().splitlines()
    bad = {3: "broken line", 5: "nouid:x::1::/:/bin/sh", 6: "a:b", 9: "x" * 10, 10: "no:colons", 12: "late:one"}
    out, good = [], iter(lines + [f"user{i}:x:{2000 + i}:100::/home/u{i}:/bin/sh" for i in range(20)])
    for n in range(1, 14):
        out.append(bad.get(n) or next(good))
    users["passwd"].write_text("\n".join(out) + "\n")
    users["shadow"].write_text(users["shadow"].read_text() + "ghost:x:1:0:99999:7:::\n")
    with PwServer(users) as s:
        log = s.output()
    located = re.findall(rf"{re.escape(str(users['passwd']))}:(\d+): line skipped \((.+?)\)", log)
    assert [int(n) for n, _ in located] == [3, 5, 6, 9, 10] and {w for _, w in located} == {"malformed"}, log
    assert "passwd_bad=6" in log  # all counted, the sixth not located
    assert f"{users['shadow']}:" not in log  # the load's five notes were used up by passwd


def test_table_locates_skipped_lines_in_every_source():
    from pwcache.table import Table

    ok = "a:x:1:1::/:/bin/sh\n"
    t = Table.from_bytes(
        passwd=ok.encode(), shadow=b"# c\nghost:x:1:0:9:7:::\n", group=b"g:x:5:\n\ng:x:6:\n", mailhosts=b"a\n"
    )
    assert sorted(t.skipped_lines()) == [
        ("group", 3, "duplicate name"),
        ("mailhosts", 1, "malformed"),
        ("shadow", 2, "no such user in passwd"),
    ]
    t.close()
    t = Table.from_bytes(passwd=(ok + "bad\n" * 9).encode())
    assert t.skipped_lines() == [("passwd", n, "malformed") for n in range(2, 7)]  # the first five only
    assert t.stats()["passwd_bad"] == 9
    t.close()


def test_no_syslog_said_once_on_stderr(tmp_path, users):
    """A daemon without a syslog socket says so once, at start, not again at
    each SIGHUP's re-opening of the log."""
    conf = tmp_path / "pwmail.toml"
    conf.write_text("")
    missing = tmp_path / "no-such-log-socket"
    argv = daemon_argv("pop3d", tmp_path, users) + ["--listen", "127.0.0.1:0", "--config", str(conf)]
    d = Process([str(BIN / argv[0]), *argv[1:]], tmp_path / "pop3d.log", {"PWMAIL_SYSLOG": str(missing)})
    try:
        d.wait_line(r"pop3d: ready on", "pop3d")
        d.signal(signal.SIGHUP)
        d.wait_line(r"reloaded settings", "pop3d reload")
    finally:
        d.stop()
    notes = [line for line in d.output().splitlines() if SYSLOG_NOTE in line]
    assert len(notes) == 1 and str(missing) in notes[0], d.output()


# ---- pwmail gen-users -----------------------------------------------------


def test_gen_users_private_files_0600(tmp_path):
    out = tmp_path / "users"
    out.mkdir()
    (out / "shadow").write_text("old\n")
    (out / "shadow").chmod(0o644)  # there before, readable by all: tightened too
    r = subprocess.run(
        [str(BIN / "pwmail"), "gen-users", "30", "--out", str(out)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    for name in ("shadow", "passwords"):
        assert (out / name).stat().st_mode & 0o777 == 0o600, name
    assert "0600" in r.stdout
    assert (out / "shadow").read_text().count("\n") == 30


# ---- pwquery moves on from a port that refuses ---------------------------


def refusing_port() -> int:
    """A loopback UDP port nobody listens on (the kernel answers ICMP port unreachable)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TIMEOUT_MS = 5000


def test_pwquery_refused_port_fails_at_once(tmp_path):
    conf = client_conf(tmp_path / "pwserver.conf", [f"127.0.0.1:{refusing_port()}"], timeout_ms=TIMEOUT_MS)
    t0 = time.monotonic()
    r = run(["pwquery", "--pwserver-conf", str(conf), "passwd", "alice"])
    took = time.monotonic() - t0
    assert r.returncode == 75, r.stderr
    assert took < TIMEOUT_MS / 1000 / 2, f"waited {took:.1f} s on a refusing port"


def test_pwquery_refused_primary_next_server_at_once(tmp_path, users):
    """The secondary is asked as soon as the primary refuses, not after
    hedge_ms (set as long as the timeout here)."""
    with PwServer(users) as s:
        conf = client_conf(
            tmp_path / "pwserver.conf",
            [f"127.0.0.1:{refusing_port()}", s.address],
            timeout_ms=TIMEOUT_MS,
            hedge_ms=TIMEOUT_MS - 1000,
        )
        t0 = time.monotonic()
        r = run(["pwquery", "--pwserver-conf", str(conf), "passwd", "alice"])
        took = time.monotonic() - t0
    assert r.returncode == 0 and r.stdout.startswith("alice:"), r.stderr
    assert took < TIMEOUT_MS / 1000 / 2, f"took {took:.1f} s"


# ---- the same flags everywhere -------------------------------------------


@pytest.mark.parametrize("name", ["pdeliveryd", "pop3d", "pop-proxy", "pwserver"])
def test_common_flags_in_help(name):
    r = run([name, "--help"])
    assert r.returncode == 0
    flags = set(re.findall(r"--[a-z-]+", r.stdout))
    assert {"--config", "--log-stderr"} <= flags
    assert ("--pwserver-conf" in flags) == (name != "pwserver")  # pwserver asks no password server
    assert "--stderr" not in flags  # the old spelling is hidden


@pytest.mark.parametrize("name", ["pop3d", "pop-proxy"])
def test_log_stderr_and_old_spelling(tmp_path, users, name):
    conf = tmp_path / "pwmail.toml"
    conf.write_text("")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:  # syslog elsewhere: stderr only by the flag
        sink.bind(("127.0.0.1", 0))
        for flag in ("--log-stderr", "--stderr"):
            start_with_stderr_log(tmp_path, users, name, flag, f"127.0.0.1:{sink.getsockname()[1]}")


def start_with_stderr_log(tmp_path, users, name: str, flag: str, syslog: str) -> None:
    """`name` started with `flag`, syslog going to `syslog`: its records
    (timestamped) show on stderr too."""
    argv = daemon_argv(name, tmp_path, users) + ["--listen", "127.0.0.1:0", "--config", str(tmp_path / "pwmail.toml")]
    d = Process([str(BIN / argv[0]), *argv[1:], flag], tmp_path / f"{name}{flag}.log", {"PWMAIL_SYSLOG": syslog})
    try:
        d.wait_line(rf"{name}: ready on", name)
        record = re.compile(rf"^\d{{4}}-\d\d-\d\d .*{re.escape(name)}\[\d+\]: INFO ", re.M)
        assert wait_for(lambda: record.search(d.output()), describe=d.output)
    finally:
        d.stop()
