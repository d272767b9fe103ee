"""The whole pwmail system started on a bed (namespaces or loopback):

    pw1, pw2      pwserver, primary and secondary, on the same generated users
    mx1           the MX: real Sendmail (where installed, on the namespace bed)
                  with pdelivery as its local mailer; pdelivery also runs there
                  directly, as Sendmail runs it
    store1..N     pdeliveryd + pop3d over one hashed Maildir tree each
    pop1          pop-proxy
    client1       where POP clients and lookups come from
    log1          the syslog collector every daemon logs to

Used by `pwmail demo` and by the fault tests (tests/system/test_system*.py). Each
part is started through its command line only; a part whose code has not
landed gives PartMissing ("part X not available yet"), never a stand-in.
"""

from __future__ import annotations

import contextlib
import imaplib
import importlib.util
import os
import poplib
import re
import shutil
import smtplib
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import nss_module
from pwcache import config as client_config

from .bed import LoopbackBed, TestBed, _Bed

NSS_DIR = Path(nss_module.__file__).resolve().parent  # the checkout's or the installed package's
NSS_LIB = NSS_DIR / "libnss_pwserver.so.2"

# part -> (module that holds it, what to call it in messages)
PARTS = {
    "gen-users": ("pwmail.genusers", "`pwmail gen-users` (issue 2)"),
    "pwserver": ("pwcache.server", "the password server `pwserver` (issue 2)"),
    "client": ("pwcache.client", "the Python pwserver client (issue 2)"),
    "layout": ("delivery.layout", "the mailbox layout (issue 4)"),
    "pdeliveryd": ("delivery.pdeliveryd", "the LMTP server `pdeliveryd` (issue 4)"),
    "pdelivery": ("delivery.pdelivery", "the local mailer `pdelivery` (issue 4)"),
    "pop3d": ("pop.pop3d", "the POP3 server `pop3d` (issue 5)"),
    "pop-proxy": ("pop.proxy", "the POP distributor `pop-proxy` (issue 5)"),
    "imap-proxy": ("pop.imap_proxy", "the IMAP distributor `imap-proxy` (issue 16)"),
}
PROGRAMS = {
    "pwserver": "pwserver",
    "pdeliveryd": "pdeliveryd",
    "pdelivery": "pdelivery",
    "pop3d": "pop3d",
    "pop-proxy": "pop-proxy",
    "imap-proxy": "imap-proxy",
    "gen-users": "pwmail",
}

DEFAULT_STORES = ("store1", "store2")
START_TIMEOUT_S = 60.0


class PartMissing(RuntimeError):
    """A part of pwmail this needs has not landed yet."""


class SystemError_(RuntimeError):
    """A part is there but did not do its job (the text says which and why)."""


def part_available(part: str) -> bool:
    if part == "nss":
        return NSS_LIB.exists()
    module = PARTS[part][0]
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def require(*parts: str) -> None:
    missing = [p for p in parts if not part_available(p)]
    if missing:
        what = "\n  ".join(
            f"part {p} not available yet ({NSS_LIB} is not built: `make nss`)"
            if p == "nss"
            else f"part {p} not available yet ({PARTS[p][1]}: no module {PARTS[p][0]})"
            for p in missing
        )
        raise PartMissing(what if len(missing) == 1 else "\n  " + what)


def program(name: str) -> str:
    """The console script `name` of this installation."""
    exe = Path(sys.executable).parent / name
    if exe.exists():
        return str(exe)
    found = shutil.which(name)
    if not found:
        raise PartMissing(f"the command {name} is not installed (run `make build`)")
    return found


@dataclass(frozen=True)
class Ports:
    pwserver: int
    lmtp: int
    pop3d: int
    proxy: int
    smtp: int
    imap: int  # Dovecot IMAP on the stores and imap-proxy on pop1


NETNS_PORTS = Ports(pwserver=7773, lmtp=24, pop3d=110, proxy=110, smtp=25, imap=143)
LOOPBACK_PORTS = Ports(pwserver=7773, lmtp=2424, pop3d=1110, proxy=1110, smtp=2525, imap=1143)
# The mail domain of the generated users (user@example.org) and the MX's name.
MAIL_DOMAIN = "example.org"


def hosts_for(stores: Sequence[str] = DEFAULT_STORES) -> list[str]:
    return ["pw1", "pw2", "mx1", *stores, "pop1", "client1", "log1"]


def make_bed(stores: Sequence[str] = DEFAULT_STORES, *, loopback: bool = False, **kw) -> _Bed:
    """A TestBed when namespaces are allowed (and not loopback), else a LoopbackBed."""
    from .bed import namespace_support

    if not loopback and namespace_support() is None:
        return TestBed(hosts_for(stores), **kw)
    return LoopbackBed(hosts_for(stores), **kw)


class PwmailSystem:
    """Start and drive the parts on `bed`. `users_dir` may hold users made
    earlier by `pwmail gen-users` (same count and hosts), else they are
    generated in the bed's work folder."""

    def __init__(
        self,
        bed: _Bed,
        *,
        users: int = 100_000,
        stores: Sequence[str] = DEFAULT_STORES,
        users_dir: str | os.PathLike | None = None,
        timeout_ms: int = 2000,
        hedge_ms: int = 50,
        recheck_s: int = 5,
        sendmail: bool | None = None,
    ):
        """sendmail: None starts real Sendmail on mx1 when it can run here
        (namespace bed, root, sendmail-bin installed), True requires it
        (PartMissing otherwise), False never starts it."""
        self.bed = bed
        self.want_sendmail = sendmail
        self.sendmail = None  # sendmail.SendmailDir once started
        self.n_users = users
        self.stores = list(stores)
        self.netns = isinstance(bed, TestBed)
        self.ports = NETNS_PORTS if self.netns else LOOPBACK_PORTS
        self.users_dir = Path(users_dir) if users_dir else bed.workdir / "users"
        self.timeout_ms = timeout_ms
        self.hedge_ms = hedge_ms
        self.recheck_s = recheck_s
        self.shadow_key = bed.workdir / "shadow.key"
        self.settings = bed.workdir / "pwmail.toml"
        self.imap = False  # Dovecot IMAP on the stores and imap-proxy on pop1, once started
        self._passwords: dict[str, str] | None = None
        self._mailhosts: dict[str, str] | None = None

    # -- set-up ----------------------------------------------------------
    def mailhost_label(self, store: str) -> str:
        """What the mailhosts map names a store by: its name where the bed
        resolves names (/etc/hosts overlay), else its address."""
        return store if self.netns else self.bed.addr(store)

    def store_of_label(self, label: str) -> str:
        return label if self.netns else (self.bed.host_of(label) or label)

    def generate_users(self) -> float:
        require("gen-users")
        if (self.users_dir / "passwords").exists() and (self.users_dir / "mailhosts").exists():
            return 0.0
        t0 = time.monotonic()
        hosts = ",".join(self.mailhost_label(s) for s in self.stores)
        r = subprocess.run(
            [program("pwmail"), "gen-users", str(self.n_users), "--out", str(self.users_dir), "--hosts", hosts],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if r.returncode != 0:
            raise SystemError_(f"pwmail gen-users failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
        return time.monotonic() - t0

    def write_configs(self) -> None:
        from pwcache import keys

        if not self.shadow_key.exists():
            keys.write_key(str(self.shadow_key))
        self.settings.write_text(f"[delivery]\nlmtp_port = {self.ports.lmtp}\n")
        servers = [f"{self.bed.addr(pw)}:{self.ports.pwserver}" for pw in ("pw1", "pw2")]
        for h in self.bed.names():
            # One health record per host, as on real machines (all the
            # namespaces share one file system).
            client_config.write(
                self.client_conf(h),
                servers,
                timeout_ms=self.timeout_ms,
                hedge_ms=self.hedge_ms,
                recheck_s=self.recheck_s,
                shadow_keyfile=self.shadow_key,
                health_file=self.bed.dir(h) / "pwserver-health",
            )

    def client_conf(self, host: str) -> Path:
        return self.bed.dir(host) / "pwserver.conf"

    def env(self, host: str) -> dict[str, str]:
        env = {"PWSERVER_CONF": str(self.client_conf(host)), "PWMAIL_CONF": str(self.settings)}
        if NSS_LIB.exists():
            env["LD_LIBRARY_PATH"] = str(NSS_DIR)
        return env

    def spool(self, store: str) -> Path:
        return self.bed.dir(store) / "spool"

    @property
    def client_networks(self) -> str:
        """Where lookups come from: the bed's range; on loopback, clients
        send from 127.0.0.1 whatever 127.x address they talk to."""
        return self.bed.subnet if self.netns else "127.0.0.0/8"

    # -- daemons ---------------------------------------------------------
    def start_pwserver(self, host: str) -> None:
        require("pwserver")
        u = self.users_dir
        argv = [
            program("pwserver"),
            "--listen",
            f"{self.bed.addr(host)}:{self.ports.pwserver}",
            "--passwd",
            str(u / "passwd"),
            "--shadow",
            str(u / "shadow"),
            "--group",
            str(u / "group"),
            "--mailhosts",
            str(u / "mailhosts"),
            "--shadow-key",
            str(self.shadow_key),
            "--allow",
            self.client_networks,
            "--log-stderr",
        ]
        self.bed.run(host, argv, name="pwserver", env=self.env(host))
        self.bed.wait_for(host, "pwserver", r"pwserver: ready on \S+ \((\d+) users\)", timeout=START_TIMEOUT_S)

    def start_store(self, store: str) -> None:
        require("pdeliveryd", "pop3d")
        root = self.spool(store)
        root.mkdir(parents=True, exist_ok=True)
        addr = self.bed.addr(store)
        # pdeliveryd delivers only under a root it was told is mounted (its marker file).
        r = self.bed.exec(store, [program("pdeliveryd"), "--root", str(root), "--init-root"], env=self.env(store))
        if r.returncode != 0:
            raise SystemError_(
                f"pdeliveryd --init-root on {store} failed ({r.returncode}): "
                f"{r.stderr.decode(errors='replace')[-2000:]}"
            )
        self.bed.run(
            store,
            [program("pdeliveryd"), "--listen", f"{addr}:{self.ports.lmtp}", "--root", str(root), "--log-stderr"],
            name="pdeliveryd",
            env=self.env(store),
        )
        # The proxy passes the client's address on (XCLIENT): pop3d trusts pop1 only.
        self.bed.run(
            store,
            [
                program("pop3d"),
                "--listen",
                f"{addr}:{self.ports.pop3d}",
                "--root",
                str(root),
                "--trusted",
                f"{self.bed.addr('pop1')}/32" if self.netns else "127.0.0.0/8",
                "--stderr",
            ],
            name="pop3d",
            env=self.env(store),
        )
        self.wait_listening(store, "pdeliveryd", self.ports.lmtp)
        self.wait_listening(store, "pop3d", self.ports.pop3d)

    def sendmail_unavailable(self) -> str | None:
        """None when real Sendmail can run on mx1, else why not."""
        if not self.netns:
            return "Sendmail runs on the namespace bed only (as root), not on loopback addresses"
        if "mx1" not in self.bed.hosts:
            return "the bed has no host mx1"
        from . import sendmail

        return sendmail.unavailable()

    def imap_unavailable(self) -> str | None:
        """None when Dovecot IMAP (and so imap-proxy) can run on the bed, else why not."""
        if not self.netns:
            return "Dovecot IMAP runs on the namespace bed only (as root), not on loopback addresses"
        if not part_available("imap-proxy") or not NSS_LIB.exists():
            return "imap-proxy or libnss_pwserver.so.2 is not there"
        from . import dovecot

        return dovecot.unavailable()

    def start_imap(self) -> None:
        """Dovecot IMAP on every store (the same Maildirs as pop3d), imap-proxy on pop1."""
        from delivery.layout import MailboxLayout

        from . import dovecot

        reason = self.imap_unavailable()
        if reason:
            raise PartMissing(f"IMAP: {reason}")
        for store in self.stores:
            # Dovecot's mail processes run as the user: the way down to the spool must be open.
            for p in (self.bed.workdir, self.bed.dir(store), self.spool(store)):
                p.chmod(p.stat().st_mode | 0o011)
            d = self.bed.dir(store) / "dovecot"
            conf = dovecot.config(
                d,
                listen=self.bed.addr(store),
                port=self.ports.imap,
                mail_location=MailboxLayout(self.spool(store)).dovecot_location(),
                proxy=self.bed.addr("pop1"),
                env=self.env(store),
            )
            self.bed.run(store, dovecot.command(d, conf), name="dovecot", env=self.env(store))
        for store in self.stores:
            self.wait_listening(store, "dovecot", self.ports.imap)
        self.run_proxy("imap-proxy", self.ports.imap, self.ports.imap)
        self.imap = True

    def sendmail_wanted(self) -> bool:
        """Whether start() starts Sendmail on mx1."""
        return bool(self.want_sendmail) or (self.want_sendmail is None and self.sendmail_unavailable() is None)

    def start_sendmail(self, host: str = "mx1") -> None:
        """Real Sendmail on host:25, its local mailer the documented
        pdelivery block (docs/delivery.md), finding pw1/pw2 through a copy of
        host's pwserver.conf. Its /dev/log is a relay (syslogd.py --relay) to
        the central log; everything is in <workdir>/<host>/sendmail/."""
        reason = self.sendmail_unavailable()
        if reason:
            raise PartMissing(f"real Sendmail: {reason}")
        require("pdelivery")
        from . import sendmail as su

        d = self.bed.dir(host) / "sendmail"
        addr, name = self.bed.addr(host), f"{host}.{MAIL_DOMAIN}"
        hosts = "127.0.0.1\tlocalhost\n" + "".join(
            f"{self.bed.addr(h)}\t{name} {h}\n" if h == host else f"{self.bed.addr(h)}\t{h}\n" for h in self.bed.names()
        )
        # Bounces to unknown senders end with the postmaster: the first user of the first store.
        postmaster = self.users_on(self.stores[0], 1)[0]
        sd = su.SendmailDir(
            d,
            port=self.ports.smtp,
            addr=addr,
            hostname=name,
            domain=MAIL_DOMAIN,
            pdelivery=program("pdelivery"),
            pwserver_conf=self.client_conf(host).read_text(),
            pwmail_toml=self.settings.read_text(),
            hosts=hosts,
            aliases=f"postmaster: {postmaster}\nMAILER-DAEMON: postmaster\n",
        )
        relay = [
            sys.executable,
            str(Path(__file__).with_name("syslogd.py")),
            "--relay",
            str(sd.log_socket),
            "--out",
            str(d / "maillog"),
        ]
        if self.bed.syslog_address:
            relay += ["--to", self.bed.syslog_address]
        self.bed.run(host, relay, name="devlog")
        self.bed.wait_for(host, "devlog", r"relay ready on", timeout=START_TIMEOUT_S)
        self.bed.run(host, sd.daemon_argv, name="sendmail", env=sd.env)
        self.wait_listening(host, "sendmail", self.ports.smtp)
        self.sendmail = sd

    def sendmail_queue_run(self, host: str = "mx1", timeout: float = 120.0) -> subprocess.CompletedProcess:
        """`sendmail -q` on host, in the daemon's namespaces (its queue and config)."""
        from . import sendmail as su

        pid = self.bed.proc(host, "sendmail").pid
        return self.bed.exec(host, su.enter(pid, su.SENDMAIL, "-q"), timeout=timeout)

    def sendmail_queue(self) -> list[Path]:
        """The queue files (qf*) of Sendmail on mx1: messages still to deliver."""
        return self.sendmail.queue_files() if self.sendmail else []

    def start_proxy(self) -> None:
        require("pop-proxy")
        self.run_proxy("pop-proxy", self.ports.proxy, self.ports.pop3d)

    def run_proxy(self, name: str, port: int, backend_port: int) -> None:
        """A distributor (pop-proxy, imap-proxy) on pop1:port, to the stores' backend_port."""
        listen = f"{self.bed.addr('pop1')}:{port}"
        argv = [program(name), "--listen", listen, "--backend-port", str(backend_port), "--stderr"]
        self.bed.run("pop1", argv, name=name, env=self.env("pop1"))
        self.wait_listening("pop1", name, port)

    def wait_listening(self, host: str, name: str, port: int, timeout: float = START_TIMEOUT_S) -> None:
        try:
            self.bed.wait_port("client1", self.bed.addr(host), port, timeout, proc=(host, name))
        except RuntimeError as e:
            raise SystemError_(str(e)) from None

    def start(self) -> None:
        """Everything, in dependency order. Checks every part first, so a
        missing one is reported before anything is started."""
        require("gen-users", "pwserver", "client", "layout", "pdeliveryd", "pdelivery", "pop3d", "pop-proxy")
        self.generate_users()
        self.write_configs()
        for pw in ("pw1", "pw2"):
            self.start_pwserver(pw)
        for s in self.stores:
            self.start_store(s)
        self.start_proxy()
        if self.imap_unavailable() is None:
            self.start_imap()
        if self.sendmail_wanted():
            self.start_sendmail()

    # -- users -----------------------------------------------------------
    @property
    def passwords(self) -> dict[str, str]:
        if self._passwords is None:
            with open(self.users_dir / "passwords") as f:
                self._passwords = dict(line.rstrip("\n").split(" ", 1) for line in f if line.strip())
        return self._passwords

    @property
    def mailhosts(self) -> dict[str, str]:
        if self._mailhosts is None:
            m = {}
            with open(self.users_dir / "mailhosts") as f:
                for line in f:
                    line = line.split("#", 1)[0].split()
                    if len(line) == 2:
                        m[line[0]] = self.store_of_label(line[1])
            self._mailhosts = m
        return self._mailhosts

    def users_on(self, store: str, n: int) -> list[str]:
        """The first n users (file order) whose mailbox is on store."""
        out = [u for u, h in self.mailhosts.items() if h == store][:n]
        if len(out) < n:
            raise SystemError_(f"fewer than {n} users on {store} in {self.users_dir / 'mailhosts'}")
        return out

    def mailbox(self, user: str, store: str | None = None) -> Path:
        require("layout")
        from delivery.layout import MailboxLayout

        return MailboxLayout(self.spool(store or self.mailhosts[user])).path(user)

    def messages_on_disk(self, user: str, store: str | None = None) -> list[Path]:
        box = self.mailbox(user, store)
        return sorted(p for sub in ("new", "cur") if (box / sub).is_dir() for p in (box / sub).iterdir())

    # -- traffic ---------------------------------------------------------
    @staticmethod
    def message(user: str, subject: str, body: str, sender: str = "demo@example.org") -> bytes:
        m = EmailMessage()
        m["From"] = sender
        m["To"] = f"{user}@example.org"
        m["Subject"] = subject
        m["Message-ID"] = f"<{subject.replace(' ', '.')}.{os.getpid()}@pwmail.test>"
        m.set_content(body)
        return m.as_bytes()

    def deliver(
        self, user: str, data: bytes, sender: str = "demo@example.org", host: str = "mx1", timeout: float = 60.0
    ) -> subprocess.CompletedProcess:
        """pdelivery on the MX, as Sendmail's local mailer would run it."""
        require("pdelivery")
        return self.bed.exec(
            host, [program("pdelivery"), "-f", sender, "-d", user], input=data, env=self.env(host), timeout=timeout
        )

    def smtp_send(
        self, sender: str, rcpts: Sequence[str], data: bytes, host: str = "client1", timeout: float = 60.0
    ) -> dict:
        """One SMTP transaction from host to Sendmail on mx1 (smtplib, in
        host's network); returns smtplib's refused-recipients dict. Bare
        LF line ends become CRLF (Sendmail refuses bare LF)."""
        if not self.sendmail:
            raise PartMissing("real Sendmail is not running on mx1")
        data = re.sub(rb"(?<!\r)\n", b"\r\n", data)
        with self.bed.inside(host):
            smtp = smtplib.SMTP(self.bed.addr("mx1"), self.ports.smtp, timeout=timeout)
        with smtp:
            return smtp.sendmail(sender, list(rcpts), data)

    def pop_fetch(
        self, user: str, password: str | None = None, host: str = "client1", delete: bool = False, timeout: float = 20.0
    ) -> list[bytes]:
        """Log in through pop-proxy with poplib, RETR every message."""
        password = self.passwords[user] if password is None else password
        with self.bed.inside(host):
            pop = poplib.POP3(self.bed.addr("pop1"), self.ports.proxy, timeout=timeout)
        try:
            pop.user(user)
            pop.pass_(password)
            count, _ = pop.stat()
            msgs = []
            for i in range(1, count + 1):
                _, lines, _ = pop.retr(i)
                msgs.append(b"\r\n".join(lines) + b"\r\n")
                if delete:
                    pop.dele(i)
            pop.quit()
        finally:
            with contextlib.suppress(Exception):
                pop.close()
        return msgs

    def imap_subjects(self, user: str, host: str = "client1", timeout: float = 20.0) -> list[str]:
        """Log in through imap-proxy with imaplib; the Subject of every message in INBOX."""
        with self.bed.inside(host):
            imap = imaplib.IMAP4(self.bed.addr("pop1"), self.ports.imap, timeout=timeout)
        try:
            imap.login(user, self.passwords[user])
            count = int(imap.select("INBOX", readonly=True)[1][0])
            subjects = []
            if count:
                _, data = imap.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
                for item in data:
                    if isinstance(item, tuple):
                        subjects.append(item[1].decode(errors="replace").partition(":")[2].strip())
            imap.logout()
        finally:
            with contextlib.suppress(Exception):
                imap.shutdown()
        return subjects

    def getent(self, user: str, host: str = "mx1", database: str = "passwd") -> tuple[int, str, float]:
        """`getent -s pwserver DATABASE USER` through the NSS module; returns
        (exit status, output, seconds including the process start)."""
        require("nss")
        t0 = time.monotonic()
        r = self.bed.exec(host, ["getent", "-s", "pwserver", database, user], env=self.env(host), timeout=30)
        return r.returncode, r.stdout.decode(errors="replace").strip(), time.monotonic() - t0

    def lookup_latencies(self, names: Sequence[str], host: str = "client1") -> list[float]:
        """Seconds per passwd lookup with the Python client from host."""
        require("client")
        from pwcache.client import Client

        times = []
        with self.bed.inside(host):
            with Client.from_config(str(self.client_conf(host))) as c:
                for n in names:
                    t0 = time.perf_counter()
                    entry = c.passwd_by_name(n)
                    times.append(time.perf_counter() - t0)
                    if entry is None:
                        raise SystemError_(f"pwserver does not know {n}")
        return times


def summarize(seconds: Sequence[float]) -> str:
    """'median 123 µs, p99 456 µs' for a list of durations."""
    s = sorted(seconds)
    p99 = s[min(len(s) - 1, int(len(s) * 0.99))]
    return f"median {statistics.median(s) * 1e6:.0f} µs, p99 {p99 * 1e6:.0f} µs over {len(s)}"
