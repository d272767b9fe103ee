"""Client configuration: /etc/pwserver.conf (docs/protocol.md).

The same file is read by libnss_pwserver.so.2 (nss_module/) and by the
Python client; this is the Python reader. `PWSERVER_CONF` names another file.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

from pwmail.base import hostport
from pwmail.base.errors import ConfigError

from .protocol import DEFAULT_PORT

DEFAULT_PATH = "/etc/pwserver.conf"
MAX_SERVERS = 8


@dataclasses.dataclass
class ClientConfig:
    servers: list[tuple[str, int]] = dataclasses.field(default_factory=lambda: [("127.0.0.1", DEFAULT_PORT)])
    timeout_ms: int = 2000
    hedge_ms: int = 50
    keyfile: str | None = None
    shadow_keyfile: str | None = None
    enumerate: bool = False
    health_file: str = "/run/pwserver/health"
    recheck_s: int = 5


def parse_hostport(text: str) -> tuple[str, int]:
    """A `server` line's address; the port defaults to pwserver's."""
    return hostport.parse_hostport(text, DEFAULT_PORT)


format_hostport = hostport.format_hostport


def _positive(key: str, value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise ConfigError(f"{key}: not a number: {value!r}") from None
    if n < 0:
        raise ConfigError(f"{key}: must not be negative")
    return n


def parse(text: str, origin: str = "<config>") -> ClientConfig:
    cfg = ClientConfig(servers=[])
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key, _, value = line.partition(" ")
        value = value.strip()
        where = f"{origin}:{lineno}"
        if not value:
            raise ConfigError(f"{where}: {key} needs a value")
        try:
            if key == "server":
                if len(cfg.servers) >= MAX_SERVERS:
                    raise ConfigError(f"at most {MAX_SERVERS} servers")
                cfg.servers.append(parse_hostport(value))
            elif key == "timeout_ms":
                cfg.timeout_ms = max(1, _positive(key, value))
            elif key == "hedge_ms":
                cfg.hedge_ms = _positive(key, value)
            elif key == "keyfile":
                cfg.keyfile = value
            elif key == "shadow_keyfile":
                cfg.shadow_keyfile = value
            elif key == "enumerate":
                if value not in ("yes", "no"):
                    raise ConfigError("enumerate is yes or no")
                cfg.enumerate = value == "yes"
            elif key == "health_file":
                cfg.health_file = value
            elif key == "recheck_s":
                cfg.recheck_s = _positive(key, value)
            else:
                raise ConfigError(f"unknown key {key!r}")
        except ConfigError as e:
            if str(e).startswith(where):
                raise
            raise ConfigError(f"{where}: {e}") from None
    if not cfg.servers:
        cfg.servers = ClientConfig().servers
    return cfg


def write(
    path: os.PathLike | str,
    servers: list[str],
    *,
    timeout_ms: int | None = None,
    hedge_ms: int | None = None,
    recheck_s: int | None = None,
    enumerate_: bool = False,
    shadow_keyfile: os.PathLike | str | None = None,
    keyfile: os.PathLike | str | None = None,
    health_file: os.PathLike | str | None = None,
) -> pathlib.Path:
    """Writes a client configuration (the test bed's hosts, tests); an
    option left out takes the client's default, the health file is beside it."""
    path = pathlib.Path(path)
    lines = [f"server {s}" for s in servers]
    for name, value in (
        ("timeout_ms", timeout_ms),
        ("hedge_ms", hedge_ms),
        ("recheck_s", recheck_s),
        ("shadow_keyfile", shadow_keyfile),
        ("keyfile", keyfile),
    ):
        if value is not None:
            lines.append(f"{name} {value}")
    if enumerate_:
        lines.append("enumerate yes")
    lines.append(f"health_file {health_file or path.parent / 'health'}")
    path.write_text("\n".join(lines) + "\n")
    return path


def config_path() -> str:
    return os.environ.get("PWSERVER_CONF") or DEFAULT_PATH


def load(path: str | None = None) -> ClientConfig:
    """The client configuration; defaults when the file does not exist."""
    path = path or config_path()
    try:
        with open(path, encoding="utf-8") as f:
            return parse(f.read(), path)
    except FileNotFoundError:
        return ClientConfig()
