"""Helpers of the IMAP tests: Dovecot IMAP with docs/imap.md's
configuration block as it stands, and imap-proxy processes on loopback."""

from __future__ import annotations

import os
import pathlib
import re

from delivery.layout import MailboxLayout
from tests.support.pop_util import NSS_DIR, ROOT, Daemon, Dovecot, free_port

DOCS = ROOT / "docs" / "imap.md"


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
