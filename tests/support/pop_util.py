"""Helpers of the POP tests: users with known passwords, Maildir messages,
and pop3d / pop-proxy processes on loopback that stop by themselves."""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import socket
import subprocess

from delivery.layout import MailboxLayout
from delivery.maildir import ROOT_MARKER, MaildirWriter
from pop.crypt import hash_password
from tests.support import pwtest
from tests.support.pwtest import BIN, ROOT, Process, free_port, read_reply  # noqa: F401  (the POP tests take it from here)

UID0 = 20000


def write_users(
    out: pathlib.Path, users: dict[str, tuple[str, str]], frozen: set[str] = frozenset(), prefix: str = "$y$"
) -> pathlib.Path:
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
    """Only for benchmarks/bench_pop.py (being edited elsewhere) until it
    uses pwtest.write_key: a new key file; returns its path."""
    pwtest.write_key(path)
    return str(path)


def client_conf(path: pathlib.Path, pwserver: str, shadow_key: os.PathLike | str | None = None) -> str:
    """The POP tests' client configuration: one server, short timeouts."""
    return str(pwtest.client_conf(path, [pwserver], timeout_ms=500, hedge_ms=100, shadow_keyfile=shadow_key))


@contextlib.contextmanager
def users_pwserver(tmp: pathlib.Path, users: dict[str, tuple[str, str]], frozen: set[str] = frozenset()):
    """A running pwserver over write_users(tmp / "users", ...) with a shadow
    key (tmp / "shadow.key"); yields the client configuration's path."""
    key = tmp / "shadow.key"
    pwtest.write_key(key)
    with pwtest.PwServer(write_users(tmp / "users", users, frozen), shadow_key=key) as pws:
        yield client_conf(tmp / "pwserver.conf", pws.address, key)


def make_root(root: pathlib.Path) -> MailboxLayout:
    root.mkdir(parents=True, exist_ok=True)
    (root / ROOT_MARKER).touch()
    return MailboxLayout(root)


def deliver(layout: MailboxLayout, user: str, body: bytes, uid: int = -1, gid: int = -1) -> str:
    """A message put in new/ by delivery's own writer; returns its path."""
    return MaildirWriter(layout, host="test").deliver(user, body, uid, gid)


def message(subject: str, lines: int = 3, extra: bytes = b"") -> bytes:
    body = b"".join(b"line %d of %s\n" % (i, subject.encode()) for i in range(lines))
    return b"From: a@example.org\nTo: b@example.org\nSubject: " + subject.encode() + b"\n\n" + body + extra


class PopServer(Process):
    """A POP3 server of ours, at `address`."""

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port


class Daemon(PopServer):
    """pop3d or pop-proxy with --stderr; waits for "NAME: ready on HOST:PORT"."""

    def __init__(self, name: str, argv: list[str], env: dict, log: pathlib.Path, timeout: float = 30.0):
        super().__init__([str(BIN / name), *argv, "--stderr"], log, env)
        m = self.wait_line(rf"{re.escape(name)}: ready on (\S+):(\d+)", name, timeout)
        self.host, self.port = m.group(1), int(m.group(2))


def start_pop3d(
    tmp: pathlib.Path,
    root: pathlib.Path,
    conf: os.PathLike | str,
    host: str = "127.0.0.1",
    trusted: list[str] = (),
    settings: str = "",
) -> Daemon:
    cfg = tmp / f"pwmail-pop3d-{host}.toml"
    cfg.write_text("[pop]\n" + settings)
    argv = ["--listen", f"{host}:0", "--root", str(root)]
    for net in trusted:
        argv += ["--trusted", net]
    return Daemon("pop3d", argv, {"PWSERVER_CONF": str(conf), "PWMAIL_CONF": str(cfg)}, tmp / f"pop3d-{host}.log")


def start_proxy(
    tmp: pathlib.Path,
    conf: os.PathLike | str,
    settings: str = "",
    argv: list[str] = (),
    name: str = "proxy",
    env: dict | None = None,
) -> Daemon:
    cfg = tmp / f"pwmail-{name}.toml"
    cfg.write_text("[pop]\n" + settings)
    return Daemon(
        "pop-proxy",
        ["--listen", "127.0.0.1:0", *argv],
        {"PWSERVER_CONF": str(conf), "PWMAIL_CONF": str(cfg), **(env or {})},
        tmp / f"{name}.log",
    )


def self_signed(tmp: pathlib.Path, cn: str = "localhost", ips: tuple = ("127.0.0.1",)) -> tuple[str, str]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    san = ",".join([f"DNS:{cn}"] + [f"IP:{ip}" for ip in ips])
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN={cn}",
            "-addext",
            f"subjectAltName={san}",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return str(cert), str(key)


# --- real POP3 clients ------------------------------------------------------------------------
def curl_pop(
    address: tuple[str, int],
    user: str,
    password: str,
    path: str = "",
    *,
    cafile: str | None = None,
    request: str | None = None,
    timeout: float = 30,
) -> subprocess.CompletedProcess:
    """curl pop3://...; with cafile, STLS is required (--ssl-reqd); request:
    another command (-X UIDL)."""
    argv = [
        "curl",
        "-sS",
        "--max-time",
        str(int(timeout)),
        "-u",
        f"{user}:{password}",
        f"pop3://{address[0]}:{address[1]}/{path}",
        *(["-X", request] if request else []),
    ]
    if cafile:
        argv[1:1] = ["--ssl-reqd", "--cacert", cafile]
    return subprocess.run(argv, capture_output=True, timeout=timeout + 5)


def mpop_fetch(
    workdir: pathlib.Path,
    address: tuple[str, int],
    user: str,
    password: str,
    *,
    keep: bool = True,
    cafile: str | None = None,
    timeout: float = 60,
) -> tuple[int, list[bytes], str]:
    """mpop into a Maildir of its own; (exit status, messages got so far, output)."""
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    # In clear text mpop wants the method named (USER/PASS here); with TLS it picks SASL PLAIN.
    tls = f"tls on\ntls_starttls on\ntls_trust_file {cafile}\n" if cafile else "tls off\nauth user\n"
    rc = workdir / "mpoprc"
    rc.write_text(
        f"defaults\naccount test\nhost {address[0]}\nport {address[1]}\nuser {user}\n"
        f"password {password}\n{tls}keep {'on' if keep else 'off'}\n"
        f"uidls_file {workdir / 'uidls'}\ndelivery maildir {out}\nreceived_header off\n"
        f"timeout {int(timeout)}\n"
    )
    rc.chmod(0o600)
    r = subprocess.run(["mpop", "-C", str(rc), "-q", "test"], capture_output=True, timeout=timeout + 5)
    msgs = [p.read_bytes() for p in sorted((out / "new").iterdir())]
    return r.returncode, msgs, (r.stdout + r.stderr).decode(errors="replace")


def fetchmail_fetch(
    workdir: pathlib.Path,
    address: tuple[str, int],
    user: str,
    password: str,
    *,
    keep: bool = True,
    cafile: str | None = None,
    timeout: float = 60,
) -> tuple[int, list[bytes], str]:
    """fetchmail (POP3, UIDL tracking) handing each message to a tiny MDA
    that writes one file; (exit status, messages got so far, output)."""
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / "got"
    out.mkdir(exist_ok=True)
    mda = workdir / "mda.sh"
    mda.write_text('#!/bin/sh\nexec cat > "$1/$(date +%s%N).$$"\n')
    mda.chmod(0o755)
    tls = (
        f" sslproto 'tls1.2+' sslcertck sslcertfile '{cafile}' sslcommonname 'localhost'" if cafile else " sslproto ''"
    )
    rc = workdir / "fetchmailrc"
    rc.write_text(
        f"set no bouncemail\npoll {address[0]} with proto POP3 port {address[1]} uidl timeout {int(timeout)}\n"
        f"  user '{user}' there with password '{password}' is root here"
        f"{' keep' if keep else ' nokeep'}{tls}\n  mda '{mda} {out}'\n"
    )
    rc.chmod(0o600)
    r = subprocess.run(
        ["fetchmail", "-f", str(rc), "--nosyslog", "-v"],
        capture_output=True,
        timeout=timeout + 5,
        env={**os.environ, "FETCHMAILHOME": str(workdir)},
    )
    msgs = [p.read_bytes() for p in sorted(out.iterdir())]
    return r.returncode, msgs, (r.stdout + r.stderr).decode(errors="replace")


# --- Dovecot as a backend ---------------------------------------------------------------------
NSS_DIR = ROOT / "nss_module"


def nsswitch_with_pwserver(path: pathlib.Path) -> pathlib.Path:
    """The machine's nsswitch.conf with pwserver added to passwd, group and
    shadow: bind-mounted over /etc/nsswitch.conf in a private mount
    namespace only."""
    out = []
    for line in pathlib.Path("/etc/nsswitch.conf").read_text().splitlines():
        db = line.split(":", 1)[0].strip()
        if db in ("passwd", "group", "shadow") and "pwserver" not in line:
            line = line.rstrip() + " pwserver"
        out.append(line)
    path.write_text("\n".join(out) + "\n")
    return path


class Dovecot(PopServer):
    """Dovecot 2.3 (pop3 only) in a private mount namespace whose
    /etc/nsswitch.conf names pwserver; userdb passwd and passdb shadow come
    through libnss_pwserver; mail_location is the hashed Maildir tree.
    Everything lives under `workdir`, which must be traversable by the
    dovenull and mail users (not under pytest's 0700 folders). Subclasses
    (tests/support/imap_util.py) give another config_text() and GREETING."""

    GREETING = b"+OK"

    def __init__(
        self,
        workdir: pathlib.Path,
        layout: MailboxLayout,
        pwserver_conf: str,
        host: str,
        *,
        first_valid_uid: int = 10000,
        tls: tuple[str, str] | None = None,
        timeout: float = 30.0,
    ):
        """tls: (cert, key) to offer STLS and listen for POP3S on `pop3s_port` too."""
        self.workdir, self.host, self.port = workdir, host, free_port(host)
        self.pop3s_port = free_port(host) if tls else 0
        ssl_conf = f"ssl = yes\nssl_cert = <{tls[0]}\nssl_key = <{tls[1]}\n" if tls else "ssl = no\n"
        for sub in ("run", "state"):
            (workdir / sub).mkdir(parents=True, exist_ok=True)
        self.log_path_dovecot = workdir / "dovecot.log"
        self.conf = workdir / "dovecot.conf"
        self.conf.write_text(self.config_text(layout, pwserver_conf, first_valid_uid, ssl_conf))
        nss = nsswitch_with_pwserver(workdir / "nsswitch.conf")
        script = f"mount --bind {nss} /etc/nsswitch.conf && exec dovecot -F -c {self.conf}"
        super().__init__(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script], workdir / "dovecot.stderr"
        )
        self.wait_until(self._greets, "dovecot", timeout)

    def config_text(self, layout: MailboxLayout, pwserver_conf: str, first_valid_uid: int, ssl_conf: str) -> str:
        workdir, host = self.workdir, self.host
        return f"""base_dir = {workdir}/run
state_dir = {workdir}/state
instance_name = pwmail-pop-{host}
protocols = pop3
listen = {host}
log_path = {self.log_path_dovecot}
{ssl_conf}disable_plaintext_auth = no
auth_mechanisms = plain
auth_failure_delay = 0
login_trusted_networks = 127.0.0.0/8
first_valid_uid = {first_valid_uid}
mail_location = {layout.dovecot_location()}
pop3_uidl_format = %f
import_environment = TZ LD_LIBRARY_PATH={NSS_DIR} PWSERVER_CONF={pwserver_conf}
passdb {{
  driver = shadow
}}
userdb {{
  driver = passwd
}}
service pop3-login {{
  inet_listener pop3 {{
    port = {self.port}
  }}
  inet_listener pop3s {{
    port = {self.pop3s_port}
  }}
}}
"""

    def _greets(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=2) as s:
                return read_reply(s, 5).startswith(self.GREETING)
        except OSError:
            return False

    def output(self) -> str:
        log = self.log_path_dovecot.read_bytes().decode(errors="replace") if self.log_path_dovecot.exists() else ""
        return super().output() + log
