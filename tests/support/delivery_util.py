"""Helpers for the delivery tests: users served by a real pwserver, real
`pdeliveryd` processes on loopback addresses, Maildir inspection."""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import socket
import subprocess

from tests.support import pwtest
from tests.support.pwtest import free_port, stop_process, wait_for  # noqa: F401 (re-exported for the tests)

BIN = pwtest.BIN

USERS = {  # name: (uid, gid, mailhost, frozen)
    "juan": (2001, 2001, "127.0.0.2", False),
    "pepe": (2002, 2002, "127.0.0.3", False),
    "ana": (2003, 2003, "127.0.0.2", False),
    "mudando": (2004, 2004, "127.0.0.2", True),
    "jo": (2005, 2005, "127.0.0.3", False),
}


def write_users(d: pathlib.Path, users=USERS) -> pathlib.Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "passwd").write_text("".join(f"{n}:x:{u}:{g}::/home/{n}:/bin/sh\n" for n, (u, g, _, _) in users.items()))
    (d / "mailhosts").write_text("".join(f"{n} {h}{' frozen' if f else ''}\n" for n, (_, _, h, f) in users.items()))
    return d


def client_conf(path: pathlib.Path, servers: list[str], timeout_ms: int = 300) -> pathlib.Path:
    """pwserver.conf with the delivery tests' short timeouts."""
    return pwtest.client_conf(
        path, servers, timeout_ms=timeout_ms, hedge_ms=50, recheck_s=1, health_file=path.parent / "pwserver-health"
    )


@contextlib.contextmanager
def users_served(d: pathlib.Path):
    """USERS served by a real pwserver: yields it, the client configuration
    (pwserver.conf in `d`) and an environment naming that configuration."""
    with pwtest.PwServer(write_users(d / "users")) as pw:
        conf = client_conf(d / "pwserver.conf", [pw.address])
        yield pw, conf, env_with(conf)


def free_port_on(hosts: list[str]) -> int:
    """A TCP port free on every address in `hosts`."""
    for _ in range(100):
        port = free_port(hosts[0])
        try:
            for h in hosts[1:]:
                with socket.socket() as s:
                    s.bind((h, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no common free port")


class Pdeliveryd(pwtest.Process):
    """A running pdeliveryd (stopped by PID: SIGTERM, then SIGKILL)."""

    def __init__(
        self,
        root: pathlib.Path,
        host: str,
        port: int,
        env: dict,
        *,
        extra=(),
        init_root=True,
        layout: str | None = None,
        wrap: list[str] | None = None,
        prestart: str = "",
    ):
        self.root, self.host, self.port = root, host, port
        root.mkdir(parents=True, exist_ok=True)
        if init_root and not wrap:
            subprocess.run([str(BIN / "pdeliveryd"), "--root", str(root), "--init-root"], check=True, env=env)
        argv = [
            str(BIN / "pdeliveryd"),
            "--listen",
            f"{host}:{port}",
            "--root",
            str(root),
            "--log-stderr",
            *(["--layout", layout] if layout else []),
            *extra,
        ]
        if wrap:  # e.g. unshare --mount, with a shell prelude that mounts something first
            argv = [*wrap, "sh", "-c", prestart + ' exec "$@"', "sh", *argv]
        super().__init__(argv, root.parent / f"pdeliveryd-{host}-{port}.log", env=env)
        self.wait_line(r"pdeliveryd: ready on", "pdeliveryd", 30)

    def stop(self, timeout: float = 20) -> int:
        return super().stop(timeout)


def messages(box: pathlib.Path) -> list[pathlib.Path]:
    return sorted((box / "new").iterdir()) if (box / "new").is_dir() else []


NAME_RE = re.compile(r"^(\d+)\.M(\d+)P(\d+)Q(\d+)\.([^,/]+),S=(\d+),W=(\d+)$")


def lmtp_session(host: str, port: int, script: bytes, timeout: float = 10) -> bytes:
    """Send `script` at once (pipelined) and read until the server closes."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(script)
        out = bytearray()
        while True:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            out += chunk
        return bytes(out)


def codes(transcript: bytes) -> list[str]:
    return [line[:3].decode() for line in transcript.split(b"\r\n") if line[3:4] == b" "]


def env_with(conf: pathlib.Path, settings: pathlib.Path | None = None, **extra) -> dict:
    env = {**os.environ, "PWSERVER_CONF": str(conf), **extra}
    if settings is not None:
        env["PWMAIL_CONF"] = str(settings)
    return env


@contextlib.contextmanager
def pwserver_env(d: pathlib.Path):
    """A real pwserver serving USERS; yields the environment that points clients (pdeliveryd) at it."""
    with pwtest.PwServer(write_users(d / "users")) as pw:
        yield env_with(client_conf(d / "pwserver.conf", [pw.address]))


@contextlib.contextmanager
def one_store(d: pathlib.Path, host: str):
    """pwserver_env() and one pdeliveryd on `host` with its root in d/root: yields (pdeliveryd, its port)."""
    with pwserver_env(d) as env:
        port = free_port_on([host])
        with Pdeliveryd(d / "root", host, port, env) as srv:
            yield srv, port


STORES = ("127.0.0.2", "127.0.0.3")  # USERS' mailhosts


@contextlib.contextmanager
def two_stores(d: pathlib.Path, hosts=STORES):
    """users_served() and a pdeliveryd on each of `hosts` (one port, roots
    d/store-HOST): yields {"d", "pw", "conf", "env", "port", "stores", "layout"}.
    A test may replace a store in "stores" (a restart): the ones there at
    the end are stopped."""
    from delivery.layout import MailboxLayout

    with users_served(d) as (pw, conf, env):
        port = free_port_on(list(hosts))
        stores = {h: Pdeliveryd(d / f"store-{h}", h, port, env) for h in hosts}
        bed = {
            "d": d,
            "pw": pw,
            "conf": conf,
            "env": env,
            "port": port,
            "stores": stores,
            "layout": {h: MailboxLayout(d / f"store-{h}") for h in hosts},
        }
        try:
            yield bed
        finally:
            for s in bed["stores"].values():
                s.stop()


class LmtpProxy(pwtest.Process):
    """A running lmtp-proxy on HOST:PORT (and `unix` if given), with `settings`
    as its [delivery] section (TOML values), then `other_sections`."""

    def __init__(
        self,
        d: pathlib.Path,
        port: int,
        conf: pathlib.Path,
        settings: dict,
        *,
        host: str = "127.0.0.1",
        unix: pathlib.Path | None = None,
        other_sections: str = "",
    ):
        self.host, self.port, self.unix = host, port, unix
        d.mkdir(parents=True, exist_ok=True)
        self.settings = d / f"lmtp-proxy-{port}.toml"
        self.other_sections = other_sections  # TOML of sections besides [delivery]
        self.write_settings(settings)
        argv = [
            str(BIN / "lmtp-proxy"),
            "--listen",
            f"{host}:{port}",
            "--log-stderr",
            *(["--unix", str(unix)] if unix else []),
        ]
        super().__init__(argv, d / f"lmtp-proxy-{port}.log", env=env_with(conf, self.settings))
        self.wait_line(r"lmtp-proxy: ready on", "lmtp-proxy", 30)

    def write_settings(self, settings: dict) -> None:
        import json

        lines = "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items())
        self.settings.write_text(f"[delivery]\n{lines}\n{self.other_sections}")

    def rss_peak_kib(self) -> int:
        """VmHWM: the most resident memory the process has had."""
        status = pathlib.Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1))


class CountingRelay:
    """A TCP relay from `listen` to `target` that counts the connections it
    accepts: a store's connection count, seen from the store's side."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int]):
        import threading

        self.target = target
        self.accepted = 0
        self.sock = socket.create_server(listen)
        self._threading = threading
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            for a, b in ((client, upstream), (upstream, client)):
                self._threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()
