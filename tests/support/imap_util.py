"""Helpers of the IMAP tests: Dovecot IMAP with docs/imap.md's
configuration block as it stands, and imap-proxy processes on loopback."""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import shutil
import tempfile

import pytest

from delivery.layout import MailboxLayout
from tests.support.pop_util import (
    NSS_DIR,
    ROOT,
    UID0,
    Daemon,
    Dovecot,
    client_conf,
    deliver,
    free_port,
    make_root,
    self_signed,
    write_users,
)
from tests.support.pwtest import PwServer, write_key

DOCS = ROOT / "docs" / "imap.md"

# The marks of a test module that runs Dovecot IMAP (as root, with the NSS module built).
DOVECOT_IMAP_MARKS = [
    pytest.mark.slow,
    pytest.mark.root,
    pytest.mark.skipif(
        not shutil.which("dovecot") or not pathlib.Path("/usr/lib/dovecot/imap").exists(),
        reason="dovecot-imapd not installed (deps/debian-packages.txt)",
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="Dovecot's master and mount namespaces need root"),
    pytest.mark.skipif(
        not (NSS_DIR / "libnss_pwserver.so.2").exists(), reason="libnss_pwserver.so.2 not built (make nss)"
    ),
]


def docs_block(name: str = "dovecot-imap") -> str:
    """A configuration block of docs/imap.md, marked <!-- name -->."""
    m = re.search(rf"<!-- {re.escape(name)} -->\s*```\n(.*?)```", DOCS.read_text(), re.S)
    assert m, f"docs/imap.md has no {name} block"
    return m.group(1)


class DovecotImap(Dovecot):
    """Dovecot 2.3 with IMAP and POP3 from docs/imap.md's block (included
    verbatim), the test's own paths, addresses and ports set after it."""

    GREETING = b"* OK"

    def __init__(self, workdir: pathlib.Path, layout: MailboxLayout, pwserver_conf: str, host: str, **kwargs):
        self.pop3_port = free_port(host)
        super().__init__(workdir, layout, pwserver_conf, host, **kwargs)

    @property
    def imaps_port(self) -> int:
        return self.pop3s_port

    def config_text(self, layout: MailboxLayout, pwserver_conf: str, first_valid_uid: int, ssl_conf: str) -> str:
        workdir, host = self.workdir, self.host
        documented = workdir / "local-imap.conf"
        documented.write_text(docs_block())
        return f"""base_dir = {workdir}/run
state_dir = {workdir}/state
instance_name = pwmail-imap-{host}
log_path = {self.log_path_dovecot}
!include {documented}
# the test's own, after the documented block:
listen = {host}
{ssl_conf}mail_location = {layout.dovecot_location()}
login_trusted_networks = 127.0.0.0/8
first_valid_uid = {first_valid_uid}
import_environment = TZ LD_LIBRARY_PATH={NSS_DIR} PWSERVER_CONF={pwserver_conf}
service imap-login {{
  inet_listener imap {{
    port = {self.port}
  }}
  inet_listener imaps {{
    port = {self.pop3s_port}
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    port = {self.pop3_port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
"""


def start_imap_proxy(
    tmp: pathlib.Path,
    conf: os.PathLike | str,
    settings: str = "",
    argv: list[str] = (),
    name: str = "imap-proxy",
    env: dict | None = None,
) -> Daemon:
    cfg = tmp / f"pwmail-{name}.toml"
    cfg.write_text("[imap]\n" + settings)
    return Daemon(
        "imap-proxy",
        ["--listen", "127.0.0.1:0", *argv],
        {"PWSERVER_CONF": str(conf), "PWMAIL_CONF": str(cfg), **(env or {})},
        tmp / f"{name}.log",
    )


@contextlib.contextmanager
def imap_bed(tmp: pathlib.Path, users: dict[str, tuple[str, str]], *, frozen: set[str] = frozenset(), delay: float):
    """Two stores (Dovecot IMAP+POP3 on 127.0.0.6 with TLS and on
    127.0.0.7) behind a pwserver with `users` ({name: (password, mailhost)};
    "nowhere" is a mailhost nobody listens on) and one imap-proxy (plain
    with STARTTLS, and IMAPS). Yields the pieces as a dict."""
    # Dovecot's login and mail processes must reach base_dir and the Maildirs.
    shared = pathlib.Path(tempfile.mkdtemp(prefix="imap-dovecot-", dir="/tmp"))
    shared.chmod(0o755)
    try:
        users_dir = write_users(tmp / "users", users, frozen=frozen)
        key = tmp / "shadow.key"
        write_key(key)
        cert, certkey = self_signed(shared, ips=("127.0.0.1", "127.0.0.6"))
        layouts = {name: make_root(shared / name) for name in ("store1", "store2")}
        with PwServer(users_dir, shadow_key=key) as pws:
            conf = client_conf(tmp / "pwserver.conf", pws.address, key)
            with (
                DovecotImap(shared / "dove1", layouts["store1"], conf, "127.0.0.6", tls=(cert, certkey)) as d1,
                DovecotImap(shared / "dove2", layouts["store2"], conf, "127.0.0.7") as d2,
            ):
                settings = (
                    f'backends = {{store1 = "127.0.0.6:{d1.port}", store2 = "127.0.0.7:{d2.port}", '
                    f'nowhere = "127.0.0.1:{free_port()}"}}\nauth_failure_delay = {delay}\n'
                    f'backend_retries = 0\ntls_cert = "{cert}"\ntls_key = "{certkey}"\n'
                    'tls_listen = "127.0.0.1:0"\n'
                )
                with start_imap_proxy(tmp, conf, settings) as proxy:
                    m = re.search(r"imap-proxy \(IMAPS\): ready on (\S+):(\d+)", proxy.output())
                    yield {
                        "tmp": tmp,
                        "shared": shared,
                        "users": users,
                        "users_dir": users_dir,
                        "pwserver": pws,
                        "layouts": layouts,
                        "dove": {"store1": d1, "store2": d2},
                        "proxy": proxy,
                        "imaps": (m.group(1), int(m.group(2))),
                        "cert": cert,
                        "certkey": certkey,
                        "conf": conf,
                        "settings": settings,
                    }
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def uid_of(users: dict, user: str) -> int:
    return UID0 + sorted(users).index(user)  # as write_users numbers them


def put(bed: dict, user: str, body: bytes) -> str:
    """Delivers `body` into `user`'s Maildir on their store (as delivery's writer does); its path."""
    users = bed["users"]
    return deliver(bed["layouts"][users[user][1]], user, body, uid_of(users, user), UID0)
