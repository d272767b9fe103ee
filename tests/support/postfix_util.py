"""Real Postfix (Debian's 3.7) as the MX in front of lmtp-proxy, for
tests/delivery/test_delivery_postfix.py.

Postfix's package conflicts with sendmail-bin (installed for the Sendmail
tests), so it is not installed: `apt-get download postfix` and `dpkg -x`
unpack it into a private root (tests/support/debroot.py; `make build` does
it once). Its programs look for their shared libraries in /usr/lib/postfix
(RUNPATH), absent here: LD_LIBRARY_PATH names the private root's, and
`import_environment` hands it to every daemon, with the folder of
libnss_pwserver.so.2 and PWSERVER_CONF.

The master runs in the foreground (`master -d`) in a private mount
namespace whose /etc/nsswitch.conf adds pwserver (local_recipient_maps and
local(8) resolve users through NSS) and whose /etc/passwd and /etc/group add
Postfix's own user and groups (the package's postinst makes them). Every
other path (configuration, queue, data, programs) is set in main.cf and lies
under the instance's folder or the private root. main.cf and master.cf end
with the blocks of docs/delivery.md ("Postfix through lmtp-proxy",
pwmail/testbed/mailers/postfix-*.cf), used verbatim but for the address of
lmtp-proxy; the lines before them only make the private instance.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import subprocess

from pwmail.testbed.sendmail import MAILERS
from tests.support import debroot, pwtest
from tests.support.pop_util import NSS_DIR, nsswitch_with_pwserver

DOCUMENTED_TARGET = "lmtp:inet:127.0.0.1:24"  # mailbox_transport in postfix-main.cf
OWNER, POSTDROP = "pwpostfix", "pwpostdrop"  # mail_owner, setgid_group in the private /etc/passwd, /etc/group
# queue folders (Postfix's postfix-files): name -> (mode, group is setgid_group)
QUEUE_DIRS = {
    **{
        n: (0o700, False)
        for n in ("active", "bounce", "corrupt", "defer", "deferred", "flush", "hold", "incoming", "private", "saved")
    },
    "trace": (0o700, False),
    "maildrop": (0o730, True),
    "public": (0o710, True),
}


def unavailable() -> str | None:
    """None when Postfix can run here, else the reason."""
    if os.geteuid() != 0:
        return "Postfix's master needs root (and a mount namespace)"
    for tool in ("unshare", "nsenter", "setsid", "apt-get", "dpkg"):
        if shutil.which(tool) is None:
            return f"the command {tool} is not installed"
    if not (NSS_DIR / "libnss_pwserver.so.2").exists():
        return "libnss_pwserver.so.2 not built (make nss)"
    return None


def documented(name: str) -> str:
    """A Postfix block of docs/delivery.md: "main" or "master"."""
    return (MAILERS / f"postfix-{name}.cf").read_text()


def _free_id(taken: set[int], start: int = 2900) -> int:
    while start in taken:
        start += 1
    return start


def _private_accounts(d: pathlib.Path) -> tuple[int, int, int]:
    """passwd and group files: the machine's plus Postfix's user and groups
    (bound over /etc/passwd and /etc/group in the namespace only)."""
    passwd = pathlib.Path("/etc/passwd").read_text()
    group = pathlib.Path("/etc/group").read_text()
    uids = {int(line.split(":")[2]) for line in passwd.splitlines() if line.count(":") >= 6}
    gids = {int(line.split(":")[2]) for line in group.splitlines() if line.count(":") >= 3}
    uid = _free_id(uids | set(range(2000, 2100)))  # not a test user's either
    gid = _free_id(gids | {uid} | set(range(2000, 2100)), uid)
    drop = _free_id(gids | {gid} | set(range(2000, 2100)), gid + 1)
    (d / "passwd").write_text(passwd + f"{OWNER}:x:{uid}:{gid}::/nonexistent:/usr/sbin/nologin\n")
    (d / "group").write_text(group + f"{OWNER}:x:{gid}:\n{POSTDROP}:x:{drop}:\n")
    return uid, gid, drop


NAMESPACE_SETUP = """set -e
mount --bind "$D/nsswitch.conf" /etc/nsswitch.conf
mount --bind "$D/passwd" /etc/passwd
mount --bind "$D/group" /etc/group
# its own process group: the master's SIGTERM handler signals its group (its daemons)
exec setsid "$@"
"""


class Postfix(pwtest.Process):
    """Postfix on 127.0.0.1:`smtp_port`, local mailboxes to lmtp-proxy at
    `lmtp` ("inet:HOST:PORT" or "unix:PATH"). `d` must be traversable by
    Postfix's user (not below pytest's 0700 folders)."""

    def __init__(self, d: pathlib.Path, *, smtp_port: int, lmtp: str, pwserver_conf: pathlib.Path):
        self.d, self.host, self.port = d, "127.0.0.1", smtp_port
        self.root = debroot.unpacked("postfix", debroot.PACKAGES["postfix"])
        self.etc, self.queue_dir, data = d / "etc", d / "queue", d / "data"
        for p in (d, self.etc, self.queue_dir, data, d / "state"):
            p.mkdir(parents=True, exist_ok=True)
            p.chmod(0o755)
        (d / "state").chmod(0o1777)
        uid, gid, drop = _private_accounts(d)
        for name, (mode, postdrop) in QUEUE_DIRS.items():
            (self.queue_dir / name).mkdir(exist_ok=True)
            os.chown(self.queue_dir / name, uid, drop if postdrop else gid)
            (self.queue_dir / name).chmod(mode)
        (self.queue_dir / "pid").mkdir(exist_ok=True)
        os.chown(data, uid, gid)
        data.chmod(0o700)
        conf = [
            line
            for line in pwserver_conf.read_text().splitlines()
            if not line.split()[:1] or line.split()[0] not in ("health_file", "shadow_keyfile")
        ]
        (d / "pwserver.conf").write_text("\n".join([*conf, f"health_file {d}/state/pwserver-health"]) + "\n")
        nsswitch_with_pwserver(d / "nsswitch.conf")
        (d / "ns.sh").write_text(NAMESPACE_SETUP)
        self.libs = f"{self.root}/usr/lib/postfix:{NSS_DIR}"
        self.maillog = d / "maillog"
        (self.etc / "main.cf").write_text(self._main_cf(lmtp, data))
        (self.etc / "master.cf").write_text(self._master_cf())
        self.env = {"D": str(d), "MAIL_CONFIG": str(self.etc), "LD_LIBRARY_PATH": self.libs}
        self.env["PWSERVER_CONF"] = str(d / "pwserver.conf")
        argv = ["unshare", "--mount", "--propagation", "private", "sh", str(d / "ns.sh")]
        super().__init__([*argv, f"{self.root}/usr/lib/postfix/sbin/master", "-d"], d / "master.out", env=self.env)
        try:
            self.wait_until(self._greets, "postfix", timeout=60)
        except RuntimeError as e:
            raise RuntimeError(f"{e}\n{self.log()}") from None

    def _main_cf(self, lmtp: str, data: pathlib.Path) -> str:
        r = self.root
        block = documented("main")
        assert block.count(DOCUMENTED_TARGET) == 1
        return f"""# the private instance (tests/support/postfix_util.py)
compatibility_level = 3.6
config_directory = {self.etc}
queue_directory = {self.queue_dir}
data_directory = {data}
meta_directory = {self.etc}
daemon_directory = {r}/usr/lib/postfix/sbin
command_directory = {r}/usr/sbin
shlib_directory = {r}/usr/lib/postfix
sendmail_path = {r}/usr/sbin/sendmail
newaliases_path = {r}/usr/bin/newaliases
mailq_path = {r}/usr/bin/mailq
mail_owner = {OWNER}
setgid_group = {POSTDROP}
myhostname = mx.example.org
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
biff = no
maillog_file = {self.maillog}
maillog_file_prefixes = {self.d}
import_environment = MAIL_CONFIG MAIL_DEBUG MAIL_LOGTAG TZ LANG=C
    LD_LIBRARY_PATH={self.libs} PWSERVER_CONF={self.d}/pwserver.conf
# the deferred recipients wait for `postqueue -f`
queue_run_delay = 3600s
minimal_backoff_time = 3600s
maximal_backoff_time = 3600s
# docs/delivery.md, "Postfix through lmtp-proxy":
""" + block.replace(DOCUMENTED_TARGET, f"lmtp:{lmtp}")

    def _master_cf(self) -> str:
        return f"""# the private instance's services (none chrooted: the queue is not a chroot)
{self.host}:{self.port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
smtp      unix  -       -       n       -       -       smtp
# docs/delivery.md, "Postfix through lmtp-proxy":
""" + documented("master")

    def _greets(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=2) as s:
                return s.recv(100).startswith(b"220")
        except OSError:
            return False

    def run(self, command: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """A Postfix command (postqueue, postconf...) in the master's namespace."""
        argv = ["nsenter", "-t", str(self.proc.pid), "--mount", f"{self.root}/usr/sbin/{command}", *args]
        return subprocess.run(
            argv, env={**os.environ, **self.env}, capture_output=True, text=True, timeout=timeout, check=True
        )

    def flush(self) -> None:
        """postqueue -f: deliver the deferred mail now."""
        self.run("postqueue", "-f")

    def queue(self) -> list[dict]:
        """The queue (postqueue -j): one dict per message, its recipients with their delay reasons."""
        return [json.loads(line) for line in self.run("postqueue", "-j").stdout.splitlines() if line.strip()]

    def log(self) -> str:
        return self.maillog.read_text(errors="replace") if self.maillog.exists() else ""

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM: the master stops its daemons and exits."""
        return super().stop(timeout)
