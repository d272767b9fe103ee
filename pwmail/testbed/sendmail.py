"""Real Sendmail (Debian sendmail-bin) as the MX, with pdelivery as its local
mailer built from the m4 definitions of docs/delivery.md (shipped beside
this file in mailers/, so an installed test bed has them; a test checks
that the two agree). Used by tests/delivery/test_delivery_sendmail.py (Sendmail on
127.0.0.1) and by the test bed (pwmail/testbed/system.py: Sendmail on mx1,
docs/testbed.md).

Sendmail runs with a private /etc/mail (our sendmail.cf, queue, aliases and
the client configurations of its mailer) and a private /etc/hosts, in
`unshare --uts --mount` under a dotted host name, as a foreground daemon
(`-bD`, so the PID we start is the daemon). The traps this solves:

- Sendmail sleeps 60 s when the host name has no dot (`hostname` in a
  private UTS namespace);
- it refuses an alias file below a world-writable folder (/etc/mail is a
  bind mount of a private folder, `sendmail -bi` builds the database);
- it logs only through /dev/log (a private /dev whose `log` is a socket we
  read: `SyslogSink`, or the bed's relay to its log host);
- `OSTYPE` must come before the local mailer settings (Debian's ostype
  defines its own local mailer);
- the local mailer runs as DefaultUser (mail), not root, and gets a cleared
  environment: its configurations are under /etc/mail and named by
  `LOCAL_CONFIG` `E` lines; when the interpreter lives under /root (0700),
  the namespace shows that one folder of /root through a 0755 tmpfs.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import socket
import subprocess
import sys
import threading

SENDMAIL = shutil.which("sendmail-mta") or "/usr/sbin/sendmail-mta"
CF_M4 = "/usr/share/sendmail/cf/m4/cf.m4"
MAILERS = pathlib.Path(__file__).resolve().parent / "mailers"  # the m4 blocks of docs/delivery.md
DOCUMENTED_PDELIVERY = "/usr/local/bin/pdelivery"
# the LMTP target of each [IPC] block, as documented (a test bed puts its own in place)
DOCUMENTED_TARGETS = {
    "sendmail-mailer-direct": "TCP store1.example.org 24",
    "sendmail-mailer-proxy": "TCP 127.0.0.1 24",
    "sendmail-mailer-proxy-unix": "FILE /run/lmtp-proxy.sock",
}


def unavailable() -> str | None:
    """None when real Sendmail can run here, else the reason."""
    if os.geteuid() != 0:
        return "real Sendmail needs root (mount and UTS namespaces)"
    if not os.path.exists(CF_M4) or not os.path.exists(SENDMAIL):
        return "sendmail-bin / sendmail-cf not installed (deps/debian-packages.txt)"
    for tool in ("m4", "unshare", "nsenter", "hostname"):
        if shutil.which(tool) is None:
            return f"the command {tool} is not installed (needed to run Sendmail)"
    return None


def documented_mailer(block: str) -> str:
    """The m4 lines of a local mailer definition, as docs/delivery.md gives them."""
    return (MAILERS / f"{block}.m4").read_text()


def sendmail_mc(
    port: int,
    block: str = "sendmail-mailer",
    *,
    pdelivery: str,
    addr: str = "127.0.0.1",
    domain: str = "pwmail.test",
    direct_target: str | None = None,
) -> str:
    """sendmail.mc: the documented mailer block (only the path of pdelivery,
    and for an [IPC] block the LMTP target, replaced: `direct_target` is
    "HOST PORT", or the path of a UNIX socket), then our private paths, one
    daemon on addr:port, `domain` local."""
    mailer = documented_mailer(block).replace(DOCUMENTED_PDELIVERY, pdelivery)
    if direct_target and block in DOCUMENTED_TARGETS:
        target = f"FILE {direct_target}" if direct_target.startswith("/") else f"TCP {direct_target}"
        mailer = mailer.replace(DOCUMENTED_TARGETS[block], target)
    # OSTYPE first: Debian's ostype sets its own local mailer, ours must come after it
    assert mailer.lstrip().startswith("OSTYPE(")
    return (
        mailer
        + f"""\
define(`confDONT_PROBE_INTERFACES', `True')dnl
define(`confSERVICE_SWITCH_FILE', `/etc/mail/service.switch')dnl
define(`QUEUE_DIR', `/etc/mail/mqueue')dnl
define(`ALIAS_FILE', `/etc/mail/aliases')dnl
define(`STATUS_FILE', `/etc/mail/sendmail.st')dnl
define(`confHOST_STATUS_DIRECTORY', `')dnl
define(`confPID_FILE', `/etc/mail/sendmail.pid')dnl
define(`confDEAD_LETTER_DROP', `/etc/mail/dead.letter')dnl
define(`confTO_IDENT', `0')dnl
define(`confQUEUE_LA', `100')dnl
define(`confREFUSE_LA', `200')dnl
define(`confMIN_QUEUE_AGE', `0')dnl
FEATURE(`accept_unresolvable_domains')dnl
FEATURE(`no_default_msa')dnl
LOCAL_DOMAIN(`{domain}')dnl
DAEMON_OPTIONS(`Port={port}, Addr={addr}, Name=MTA')dnl
LOCAL_CONFIG
EPWSERVER_CONF=/etc/mail/pwserver.conf
EPWMAIL_CONF=/etc/mail/pwmail.toml
MAILER(`local')dnl
MAILER(`smtp')dnl
"""
    )


NAMESPACE_SETUP = """set -e
hostname "$MXNAME"
mount --bind "$D/etcmail" /etc/mail
mount --bind "$D/hosts" /etc/hosts
if [ -n "$ROOT_EXPOSE" ]; then
  mount --bind /root "$D/rootorig"
  mount -t tmpfs -o mode=0755 tmpfs /root
  mkdir "/root/$ROOT_EXPOSE"
  mount --bind "$D/rootorig/$ROOT_EXPOSE" "/root/$ROOT_EXPOSE"
fi
# a private /dev whose /dev/log is our syslog socket (Sendmail logs nowhere else)
mount --rbind /dev "$D/olddev"
mount -t tmpfs -o mode=0755 tmpfs /dev
for n in null zero full random urandom tty; do touch /dev/$n; mount --bind "$D/olddev/$n" /dev/$n; done
ln -s /proc/self/fd /dev/fd
mkdir /dev/shm /dev/pts
touch /dev/log
mount --bind "$D/log.sock" /dev/log
"$SENDMAIL" -bi >/dev/null
exec "$@"
"""


def _root_expose() -> str:
    """The folder of /root holding this interpreter ('' when not under /root)."""
    real = pathlib.Path(os.path.realpath(sys.executable))
    try:
        return real.relative_to("/root").parts[0]
    except (ValueError, IndexError):
        return ""


class SendmailDir:
    """Sendmail's private files under `d` (made here):

        etcmail/     bound over /etc/mail: sendmail.mc/.cf, mqueue/, aliases,
                     pwserver.conf and pwmail.toml for the mailer, state/
        hosts        bound over /etc/hosts
        ns.sh        the namespace set-up, then exec of the command
        log.sock     where /dev/log points (the caller binds a socket there)

    `argv(cmd...)` runs a command in such a namespace; `daemon_argv` is the
    foreground daemon. `pwserver_conf` is the client configuration of the
    mailer (its health_file is put under /etc/mail/state)."""

    def __init__(
        self,
        d: pathlib.Path,
        *,
        port: int,
        pdelivery: str,
        pwserver_conf: str,
        pwmail_toml: str,
        hosts: str,
        addr: str = "127.0.0.1",
        hostname: str = "mx.pwmail.test",
        domain: str = "pwmail.test",
        block: str = "sendmail-mailer",
        direct_target: str | None = None,
        aliases: str = "postmaster: ana\nMAILER-DAEMON: postmaster\n",
    ):
        self.d, self.port, self.addr, self.hostname = d, port, addr, hostname
        self.etcmail = em = d / "etcmail"
        (em / "mqueue").mkdir(parents=True)
        os.chmod(em / "mqueue", 0o700)
        (em / "state").mkdir()
        os.chmod(em / "state", 0o1777)
        (d / "rootorig").mkdir()
        (d / "olddev").mkdir()
        (em / "sendmail.mc").write_text(
            sendmail_mc(port, block, pdelivery=pdelivery, addr=addr, domain=domain, direct_target=direct_target)
        )
        cf = subprocess.run(
            ["m4", CF_M4, str(em / "sendmail.mc")], capture_output=True, text=True, check=True, timeout=60
        )
        (em / "sendmail.cf").write_text(cf.stdout)
        (em / "service.switch").write_text("hosts files\naliases files\n")
        (em / "local-host-names").write_text(f"{domain}\n{hostname}\n")
        (em / "trusted-users").write_text("")
        (em / "relay-domains").write_text("")
        (em / "aliases").write_text(aliases)
        conf = [
            line
            for line in pwserver_conf.splitlines()
            if not line.split()[:1] or line.split()[0] not in ("health_file", "shadow_keyfile")
        ]
        (em / "pwserver.conf").write_text("\n".join(conf + ["health_file /etc/mail/state/pwserver-health"]) + "\n")
        (em / "pwmail.toml").write_text(pwmail_toml)
        for p in em.iterdir():
            if p.is_file():
                os.chmod(p, 0o644)
        (d / "hosts").write_text(hosts)
        (d / "ns.sh").write_text(NAMESPACE_SETUP)
        self.env = {"D": str(d), "SENDMAIL": SENDMAIL, "MXNAME": hostname, "ROOT_EXPOSE": _root_expose()}

    @property
    def log_socket(self) -> pathlib.Path:
        return self.d / "log.sock"

    def argv(self, *cmd: str) -> list[str]:
        return ["unshare", "--uts", "--mount", "--propagation", "private", "sh", str(self.d / "ns.sh"), *cmd]

    @property
    def daemon_argv(self) -> list[str]:
        # unshare and sh exec in place: the PID started is the Sendmail daemon's
        return self.argv(SENDMAIL, "-bD")

    def queue_files(self, prefix: str = "qf") -> list[pathlib.Path]:
        return sorted(p for p in (self.etcmail / "mqueue").iterdir() if p.name.startswith(prefix))


def message(subject: str, to: str, sender: str = "Ana <ana@pwmail.test>") -> bytes:
    """A test message that must arrive unchanged: CRLF line ends, 8 bit,
    lines starting with dots (dot-stuffing on the way)."""
    return (
        f"From: {sender}\r\nTo: {to}\r\nDate: Mon, 30 Nov 2026 00:00:00 +0000\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}@pwmail.test>\r\nSubject: {subject}\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\n"
        "Hola Juan,\r\n.una l\u00ednea con punto\r\n..dos\r\n\r\n" + "x" * 900 + "\r\n"
    ).encode()


def enter(pid: int, *argv: str) -> list[str]:
    """argv run in the UTS and mount namespaces of the Sendmail daemon `pid`
    (its /etc/mail, queue and host name): e.g. enter(pid, SENDMAIL, "-q")."""
    return ["nsenter", "-t", str(pid), "--uts", "--mount", *argv]


class SyslogSink:
    """/dev/log for the namespace: a datagram socket read by a thread."""

    def __init__(self, path: pathlib.Path, out: pathlib.Path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        os.chmod(path, 0o666)  # pdelivery logs as the mail user
        self.sock.settimeout(0.2)
        self.closed = False
        self.lines: list[str] = []
        self.out = open(out, "w")
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.closed:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            line = data.decode(errors="replace").rstrip("\x00\n")
            self.lines.append(line)
            self.out.write(line + "\n")
            self.out.flush()

    def close(self) -> None:
        self.closed = True
        self.thread.join(2)
        self.sock.close()
        self.out.close()
