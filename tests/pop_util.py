"""Helpers of the POP tests: users with known passwords, Maildir messages,
and pop3d / pop-proxy processes on loopback that stop by themselves."""
from __future__ import annotations

import os
import pathlib
import re
import socket
import subprocess
import sys
import time

from pwtest import BIN, free_port

from delivery.layout import MailboxLayout
from delivery.maildir import MaildirWriter, ROOT_MARKER
from pop.crypt import hash_password

UID0 = 20000


def write_users(out: pathlib.Path, users: dict[str, tuple[str, str]], frozen: set[str] = frozenset(),
                prefix: str = "$y$") -> pathlib.Path:
    """passwd, shadow and mailhosts for {name: (password, mailhost)}."""
    out.mkdir(parents=True, exist_ok=True)
    hashes = {}
    with open(out / "passwd", "w") as pw, open(out / "shadow", "w") as sh, open(out / "mailhosts", "w") as mh:
        for i, (name, (password, host)) in enumerate(sorted(users.items())):
            pw.write(f"{name}:x:{UID0 + i}:{UID0}:Test {name}:/var/spool/mail/{name}:/usr/sbin/nologin\n")
            if password not in hashes:
                hashes[password] = hash_password(password, prefix) if password else "!"
            sh.write(f"{name}:{hashes[password]}:19000:0:99999:7:::\n")
            mh.write(f"{name} {host}{' frozen' if name in frozen else ''}\n")
    with open(out / "group", "w") as g:
        g.write(f"mailusers:x:{UID0}:\n")
    return out


def write_key(path: pathlib.Path) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, (os.urandom(32).hex() + "\n").encode())
    os.close(fd)
    return str(path)


def client_conf(path: pathlib.Path, pwserver: str, shadow_key: str | None = None) -> str:
    text = f"server {pwserver}\ntimeout_ms 500\nhedge_ms 100\nhealth_file {path.parent / 'health'}\n"
    if shadow_key:
        text += f"shadow_keyfile {shadow_key}\n"
    path.write_text(text)
    return str(path)


def make_root(root: pathlib.Path) -> MailboxLayout:
    root.mkdir(parents=True, exist_ok=True)
    (root / ROOT_MARKER).touch()
    return MailboxLayout(root)


def deliver(layout: MailboxLayout, user: str, body: bytes) -> str:
    """A message put in new/ by delivery's own writer; returns its path."""
    return MaildirWriter(layout, host="test").deliver(user, body)


def message(subject: str, lines: int = 3, extra: bytes = b"") -> bytes:
    body = b"".join(b"line %d of %s\n" % (i, subject.encode()) for i in range(lines))
    return b"From: a@example.org\nTo: b@example.org\nSubject: " + subject.encode() + b"\n\n" + body + extra


class Daemon:
    """A pwmail daemon started with its --stderr log; waits for "NAME: ready
    on HOST:PORT"; stopped by PID (SIGTERM, then SIGKILL)."""

    def __init__(self, name: str, argv: list[str], env: dict, log: pathlib.Path, timeout: float = 30.0):
        self.name = name
        self.log_path = log
        self.log = open(log, "w+b")
        self.proc = subprocess.Popen([str(BIN / name), *argv, "--stderr"], stdout=self.log,
                                     stderr=subprocess.STDOUT, env={**os.environ, **env})
        deadline = time.monotonic() + timeout
        pattern = re.compile(rf"{re.escape(name)}: ready on (\S+):(\d+)")
        while True:
            m = pattern.search(self.output())
            if m:
                self.host, self.port = m.group(1), int(m.group(2))
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                out = self.output()
                self.stop()
                raise RuntimeError(f"{name} did not start:\n{out}")
            time.sleep(0.05)

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_bytes().decode(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self.log.closed:
            self.log.close()
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def start_pop3d(tmp: pathlib.Path, root: pathlib.Path, conf: str, host: str = "127.0.0.1",
                trusted: list[str] = (), settings: str = "") -> Daemon:
    cfg = tmp / f"pwmail-pop3d-{host}.toml"
    cfg.write_text("[pop]\n" + settings)
    argv = ["--listen", f"{host}:0", "--root", str(root)]
    for net in trusted:
        argv += ["--trusted", net]
    return Daemon("pop3d", argv, {"PWSERVER_CONF": conf, "PWMAIL_CONF": str(cfg)}, tmp / f"pop3d-{host}.log")


def start_proxy(tmp: pathlib.Path, conf: str, settings: str = "", argv: list[str] = (),
                name: str = "proxy") -> Daemon:
    cfg = tmp / f"pwmail-{name}.toml"
    cfg.write_text("[pop]\n" + settings)
    return Daemon("pop-proxy", ["--listen", "127.0.0.1:0", *argv],
                  {"PWSERVER_CONF": conf, "PWMAIL_CONF": str(cfg)}, tmp / f"{name}.log")


def read_reply(sock: socket.socket, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def self_signed(tmp: pathlib.Path, cn: str = "localhost") -> tuple[str, str]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", f"/CN={cn}", "-addext", f"subjectAltName=DNS:{cn},IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return str(cert), str(key)


def pop3_port() -> int:
    return free_port()


__all__ = ["write_users", "write_key", "client_conf", "make_root", "deliver", "message", "Daemon",
           "start_pop3d", "start_proxy", "read_reply", "self_signed", "sys"]
