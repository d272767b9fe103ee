"""examples/: the settings file lists exactly the code's keys and defaults,
the client configuration parses to the client's defaults, the systemd units
pass `systemd-analyze verify`, and every daemon with a Type=notify unit
really sends READY=1."""

from __future__ import annotations

import pathlib
import re
import shutil
import socket
import subprocess
import tomllib

import pytest

import delivery.config
import pop.config
import pwcache.config
import pwcache.placement
import pwcache.server
import pwmail.db.connect
import pwmail.placement.move
from pwmail.base import hostmap, settings
from tests.support.pwtest import BIN, ROOT

EXAMPLES = ROOT / "examples"
SECTIONS = {
    "pwserver": pwcache.server.DEFAULTS,
    "placement": pwcache.placement.DEFAULTS,
    "hosts": hostmap.DEFAULTS,
    "delivery": delivery.config.DEFAULTS,
    "pop": pop.config.DEFAULTS,
    "imap": pop.config.IMAP_DEFAULTS,
    "move": pwmail.placement.move.DEFAULTS,
    "db": pwmail.db.connect.DEFAULTS,
}
UNITS = sorted((EXAMPLES / "systemd").glob("*.service"))


def uncommented_settings() -> str:
    """examples/pwmail.toml with every `# key = value` line made live."""
    lines = []
    for line in (EXAMPLES / "pwmail.toml").read_text().splitlines():
        m = re.match(r"# (\w+ = .*?)(\s+#.*)?$", line)
        lines.append(m.group(1) if m else line)
    return "\n".join(lines) + "\n"


def test_settings_example_lists_every_key_with_its_default():
    shown = tomllib.loads(uncommented_settings())
    assert set(shown) == set(SECTIONS)
    for name, defaults in SECTIONS.items():
        assert shown[name] == defaults, name


def test_settings_example_as_installed_changes_nothing(tmp_path):
    assert tomllib.loads((EXAMPLES / "pwmail.toml").read_text()) == {name: {} for name in SECTIONS}
    live = tmp_path / "pwmail.toml"
    live.write_text(uncommented_settings())
    assert delivery.config.load(str(live)) == delivery.config.load(str(tmp_path / "absent.toml"))
    assert pop.config.load(str(live)) == pop.config.load(str(tmp_path / "absent.toml"))
    assert pop.config.load_imap(str(live)) == pop.config.load_imap(str(tmp_path / "absent.toml"))
    assert settings.section("pwserver", pwcache.server.DEFAULTS, str(live)) == pwcache.server.DEFAULTS


def test_hosts_example_entries_load(tmp_path):
    """The [hosts] section's two example forms, made live, are what the loader takes."""
    text = (EXAMPLES / "pwmail.toml").read_text()
    entries = re.findall(r"^#   (store\d = .*)$", text, re.M)
    live = tmp_path / "pwmail.toml"
    live.write_text("[hosts]\n" + "\n".join(entries) + "\n")
    hosts = hostmap.load(str(live))
    assert hosts.address("store1", "pop", 110) == ("10.0.0.11", 110)
    assert hosts.address("store2", "imap", 993) == ("10.0.0.12", 143)
    assert hosts.address("store3", "lmtp", 24) is None


def test_client_configuration_example_is_the_clients_defaults():
    text = (EXAMPLES / "pwserver.conf").read_text()
    live = "\n".join(
        re.sub(r"^# (\w+ \S+)\s*(#.*)?$", r"\1", line) for line in text.splitlines() if not line.startswith("# server ")
    )
    cfg = pwcache.config.parse(live, "examples/pwserver.conf")
    default = pwcache.config.ClientConfig()
    assert cfg.servers == default.servers
    for key in ("timeout_ms", "hedge_ms", "enumerate", "health_file", "recheck_s"):
        assert getattr(cfg, key) == getattr(default, key), key
    assert cfg.keyfile and cfg.shadow_keyfile  # shown, commented out, with where they usually live


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="needs systemd-analyze (systemd)")
def test_units_pass_systemd_analyze_verify(tmp_path):
    assert {u.stem for u in UNITS} >= {"pwserver", "pdeliveryd", "pop3d", "pop-proxy", "imap-proxy", "lmtp-proxy"}
    for unit in UNITS:
        # the units name /usr/local/bin (pip install as root); here the commands are in the venv
        (tmp_path / unit.name).write_text(unit.read_text().replace("/usr/local/bin/", f"{BIN}/"))
        assert f"/usr/local/bin/{unit.stem} " in unit.read_text()
    run = subprocess.run(
        ["systemd-analyze", "verify", *(str(tmp_path / u.name) for u in UNITS)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0 and run.stdout + run.stderr == "", run.stdout + run.stderr


def daemon_argv(name: str, tmp: pathlib.Path) -> list[str]:
    passwd = tmp / "passwd"
    passwd.write_text("ana:x:5000:5000::/home/ana:/bin/sh\n")
    root = tmp / "spool"
    root.mkdir(exist_ok=True)
    (root / ".pwmail-root").touch()
    return {
        "pwserver": ["--listen", "127.0.0.1:0", "--passwd", str(passwd), "--log-stderr"],
        "pdeliveryd": ["--listen", "127.0.0.1:0", "--root", str(root), "--users", f"passwd:{passwd}", "--log-stderr"],
        "pop3d": ["--listen", "127.0.0.1:0", "--root", str(root), "--stderr"],
        "pop-proxy": ["--listen", "127.0.0.1:0", "--stderr"],
        "imap-proxy": ["--listen", "127.0.0.1:0", "--stderr"],
        "lmtp-proxy": ["--listen", "127.0.0.1:0", "--log-stderr"],
    }[name]


@pytest.mark.parametrize("unit", [u.stem for u in UNITS])
def test_every_notify_unit_gets_ready(unit, tmp_path):
    assert "Type=notify" in (EXAMPLES / "systemd" / f"{unit}.service").read_text()
    notify_path = tmp_path / "notify"
    (tmp_path / "pwmail.toml").write_text("")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(60)
        env = {
            "PATH": "/usr/bin:/bin",
            "NOTIFY_SOCKET": str(notify_path),
            "PWMAIL_CONF": str(tmp_path / "pwmail.toml"),
            "PWSERVER_CONF": str(tmp_path / "pwserver.conf"),
        }
        with open(tmp_path / "log", "wb") as log:
            proc = subprocess.Popen([str(BIN / unit), *daemon_argv(unit, tmp_path)], env=env, stdout=log, stderr=log)
        try:
            message = notify.recv(4096)
        except TimeoutError:
            message = b""
        finally:
            proc.terminate()
            proc.wait(30)
        assert message == b"READY=1", (tmp_path / "log").read_text()[-2000:]
        assert proc.returncode == 0, (tmp_path / "log").read_text()[-2000:]
