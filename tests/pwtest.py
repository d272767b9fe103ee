"""Test helpers shared by every part's tests: users on disk and a real
`pwserver` process on loopback that stops by itself."""
from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import time

BIN = pathlib.Path(sys.executable).parent
ROOT = pathlib.Path(__file__).resolve().parent.parent


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


def gen_users(out: pathlib.Path, count: int, hosts: str = "store1,store2", seed: int = 1) -> pathlib.Path:
    """`pwmail gen-users` into `out`; returns `out`."""
    from pwcache.genusers import generate, parse_hosts

    generate(count, str(out), parse_hosts(hosts), groups=max(3, min(300, count // 10)), seed=seed)
    return out


def read_passwords(users_dir: pathlib.Path) -> dict[str, str]:
    pairs = (line.split(" ", 1) for line in (users_dir / "passwords").read_text().splitlines())
    return {name: pw for name, pw in pairs}


class PwServer:
    """A running `pwserver`; use as a context manager (it is stopped by PID
    on exit, SIGTERM then SIGKILL)."""

    def __init__(self, users_dir: pathlib.Path, *, host: str = "127.0.0.1", port: int | None = None,
                 shadow_key: str | None = None, network_key: str | None = None,
                 extra: list[str] | None = None, ready_timeout: float = 60.0, env: dict | None = None):
        self.host, self.port = host, port or free_port(host)
        self.users_dir = users_dir
        argv = [str(BIN / "pwserver"), "--listen", f"{host}:{self.port}", "--log-stderr",
                "--passwd", str(users_dir / "passwd")]
        for flag, name in (("--shadow", "shadow"), ("--group", "group"), ("--mailhosts", "mailhosts")):
            if (users_dir / name).exists():
                argv += [flag, str(users_dir / name)]
        if shadow_key:
            argv += ["--shadow-key", shadow_key]
        if network_key:
            argv += ["--network-key", network_key]
        self.argv = argv + (extra or [])
        self.log = open(users_dir / f"pwserver-{self.port}.log", "w+b")
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        self._wait_ready(ready_timeout)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _wait_ready(self, timeout: float) -> None:
        from pwcache.client import Client, Unavailable

        deadline = time.monotonic() + timeout
        with Client([self.address], timeout_ms=200, hedge_ms=200) as c:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"pwserver exited with {self.proc.returncode}:\n{self.output()}")
                try:
                    c.ping()
                    return
                except Unavailable:
                    time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"pwserver not ready after {timeout} s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def client(self, **kw):
        from pwcache.client import Client

        return Client([self.address], **kw)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
