"""Dovecot 2.3 IMAP on a storage host of the namespace bed, behind
imap-proxy: the store's hashed Maildir tree (the one pdeliveryd writes and
pop3d reads), users through libnss_pwserver (`userdb passwd`, `passdb
shadow`), the proxy's ID x-originating-ip believed. The settings are those
of docs/imap.md's block with the bed's paths, addresses and ports.

Dovecot runs as root with a private /etc/nsswitch.conf naming pwserver
(bind-mounted inside the host's mount namespace, which `ip netns exec`
makes private), so it needs the namespace bed (as root)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

IMAP_BINARY = Path("/usr/lib/dovecot/imap")  # Debian's dovecot-imapd
FIRST_VALID_UID = 10000  # pwmail gen-users hands out uids from 10000


def unavailable() -> str | None:
    """None when Dovecot IMAP is installed, else why not."""
    if os.geteuid() != 0:
        return "Dovecot runs as root"
    if not shutil.which("dovecot") or not IMAP_BINARY.exists():
        return "dovecot-imapd is not installed (deps/debian-packages.txt)"
    return None


def nsswitch(path: Path) -> Path:
    """The machine's nsswitch.conf with pwserver added to passwd, group and shadow."""
    out = []
    for line in Path("/etc/nsswitch.conf").read_text().splitlines():
        if line.split(":", 1)[0].strip() in ("passwd", "group", "shadow") and "pwserver" not in line:
            line = line.rstrip() + " pwserver"
        out.append(line)
    path.write_text("\n".join(out) + "\n")
    return path


def config(d: Path, *, listen: str, port: int, mail_location: str, proxy: str, env: dict[str, str]) -> Path:
    """dovecot.conf in `d` for one store; `proxy` is imap-proxy's address."""
    for sub in ("run", "state"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    imported = " ".join(f"{k}={env[k]}" for k in ("LD_LIBRARY_PATH", "PWSERVER_CONF") if k in env)
    conf = d / "dovecot.conf"
    conf.write_text(f"""base_dir = {d}/run
state_dir = {d}/state
instance_name = pwmail-demo-{listen}
log_path = {d}/dovecot.log
protocols = imap
listen = {listen}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
passdb {{
  driver = shadow
}}
userdb {{
  driver = passwd
}}
mail_location = {mail_location}
login_trusted_networks = {proxy}/32
auth_failure_delay = 0
first_valid_uid = {FIRST_VALID_UID}
import_environment = TZ {imported}
service imap-login {{
  inet_listener imap {{
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
""")
    return conf


def command(d: Path, conf: Path) -> list[str]:
    """Dovecot in the foreground, with the private nsswitch.conf."""
    nss = nsswitch(d / "nsswitch.conf")
    return ["sh", "-c", f"mount --bind {nss} /etc/nsswitch.conf && exec dovecot -F -c {conf}"]
