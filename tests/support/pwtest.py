"""Test helpers shared by every part's tests: users on disk, key files and
client configurations, a process of ours that stops by PID, and a real
`pwserver` on loopback."""

from __future__ import annotations

import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

BIN = pathlib.Path(sys.executable).parent
ROOT = pathlib.Path(__file__).resolve().parents[2]  # the checkout


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP on `host` (pwserver uses both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind((host, 0))
            port = u.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind((host, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


def wait_for(cond, timeout: float = 20.0, step: float = 0.05, describe=None):
    """Polls cond() until it returns something true, which is returned;
    AssertionError when the time runs out (its text from describe() if
    given)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(describe() if describe else "condition not met in time")


def read_reply(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """One reply line (up to CRLF) of a line protocol (POP3, LMTP), or what
    came before the peer closed."""
    sock.settimeout(timeout)
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def gen_users(out: pathlib.Path, count: int, hosts: str = "store1,store2", seed: int = 1) -> pathlib.Path:
    """`pwmail gen-users` into `out`; returns `out`."""
    from pwmail.genusers import generate, parse_hosts

    generate(count, str(out), parse_hosts(hosts), groups=max(3, min(300, count // 10)), seed=seed)
    return out


def read_passwords(users_dir: pathlib.Path) -> dict[str, str]:
    pairs = (line.split(" ", 1) for line in (users_dir / "passwords").read_text().splitlines())
    return {name: pw for name, pw in pairs}


def write_key(path: os.PathLike | str) -> bytes:
    """A new key file (`pwmail gen-key`'s writer; replaces a file there);
    returns the key."""
    from pwcache import keys

    keys.write_key(str(path), force=True)
    return read_key(path)


def read_key(path: os.PathLike | str) -> bytes:
    return bytes.fromhex(pathlib.Path(path).read_text().strip())


def client_conf(path: pathlib.Path, servers: list[str], **options) -> pathlib.Path:
    """A client configuration (pwserver.conf, docs/protocol.md): pwcache.config.write."""
    from pwcache import config

    return config.write(path, servers, **options)


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> int:
    """SIGTERM a process we started (by PID), SIGKILL after `timeout`."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class Process:
    """A process of ours with its output (stdout and stderr) in a file;
    stopped by PID (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, argv: list[str], log: pathlib.Path, env: dict | None = None):
        self.log_path = pathlib.Path(log)
        self.log_file = open(self.log_path, "w+b")
        self.proc = subprocess.Popen(
            argv, stdout=self.log_file, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )

    def wait_until(self, ready, what: str, timeout: float = 30.0):
        """Polls ready() until it returns something true, which is
        returned; stops the process and raises if it exits or the time
        runs out."""
        deadline = time.monotonic() + timeout
        while True:
            got = ready()
            if got:
                return got
            if self.proc.poll() is not None or time.monotonic() > deadline:
                out = self.output()
                self.stop()
                raise RuntimeError(f"{what} did not start (exit status {self.proc.returncode}):\n{out}")
            time.sleep(0.05)

    def wait_line(self, pattern: str | re.Pattern, what: str, timeout: float = 30.0) -> re.Match:
        """wait_until the output matches `pattern`; returns the match."""
        regex = re.compile(pattern)
        return self.wait_until(lambda: regex.search(self.output()), what, timeout)

    def output(self) -> str:
        if not self.log_file.closed:
            self.log_file.flush()
        return self.log_path.read_bytes().decode(errors="replace")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)
        if sig == signal.SIGSTOP:
            # kill() returns before every thread has stopped: under load a
            # thread may still answer a request sent right after it.
            wait_for(self.stopped, timeout=20, describe=lambda: f"pid {self.proc.pid} stopped by SIGSTOP")

    def stopped(self) -> bool:
        """Every thread of the process is stopped (state T in /proc)."""
        tasks = pathlib.Path(f"/proc/{self.proc.pid}/task")
        try:
            states = [(t / "stat").read_text().rsplit(")", 1)[1].split()[0] for t in tasks.iterdir()]
        except (FileNotFoundError, ProcessLookupError):
            return False
        return bool(states) and all(state == "T" for state in states)

    def stop(self, timeout: float = 15.0) -> int:
        stop_process(self.proc, timeout)
        if not self.log_file.closed:
            self.log_file.close()
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


SOURCES = ("passwd", "shadow", "group", "mailhosts")
READY = re.compile(r"pwserver: ready on (\S+):(\d+) \((\d+) users\)")


class PwServer(Process):
    """A running `pwserver` serving `sources`: a folder (the files of
    SOURCES in it) or {name: path}. With port 0 in `listen` the server picks
    one; host, port and users come from its "ready" line. The log lies
    beside passwd (or in `log_dir`: a database source, `--source URI` in
    `args`, has no passwd); PWMAIL_CONF is /nonexistent unless `env` names one."""

    def __init__(
        self,
        sources: pathlib.Path | dict[str, pathlib.Path],
        *args: str,
        listen: str = "127.0.0.1:0",
        shadow_key: os.PathLike | str | None = None,
        network_key: os.PathLike | str | None = None,
        env: dict | None = None,
        timeout: float = 60.0,
        log_dir: pathlib.Path | None = None,
    ):
        if isinstance(sources, dict):
            paths = sources
        else:
            paths = {name: sources / name for name in SOURCES if (sources / name).exists()}
        argv = [str(BIN / "pwserver"), "--listen", listen, "--log-stderr"]
        for name, path in paths.items():
            argv += [f"--{name}", str(path)]
        if shadow_key:
            argv += ["--shadow-key", str(shadow_key)]
        if network_key:
            argv += ["--network-key", str(network_key)]
        fd, log = tempfile.mkstemp(prefix="pwserver-", suffix=".log", dir=log_dir or paths["passwd"].parent)
        os.close(fd)
        super().__init__(argv + list(args), pathlib.Path(log), {"PWMAIL_CONF": "/nonexistent", **(env or {})})
        m = self.wait_line(READY, "pwserver", timeout)
        self.host, self.port, self.users = m.group(1), int(m.group(2)), int(m.group(3))

    @property
    def addr(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def address(self) -> str:
        """HOST:PORT as a client configuration names it ([HOST]:PORT for IPv6)."""
        host = self.host.strip("[]")
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def client(self, **kw):
        from pwcache.client import Client

        return Client([self.address], **kw)


def move_argv(
    users: list[str], to: str, *, mailhosts: pathlib.Path, pwserver: PwServer, journal: pathlib.Path, roots: dict
) -> list[str]:
    """`pwmail move USERS --to TO` on a test's mailhosts file, pwserver, journal folder and {host: root}."""
    argv = [str(BIN / "pwmail"), "move", *users, "--to", to, "--mailhosts", str(mailhosts)]
    argv += ["--server", pwserver.address, "--pwserver-pid", str(pwserver.proc.pid), "--journal-dir", str(journal)]
    for host, root in roots.items():
        argv += ["--root", f"{host}={root}"]
    return argv
