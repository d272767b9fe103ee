"""HOST:PORT, the one reader: `host:port`, `[v6]:port`, `[v6]`, `host`, or
a bare IPv6 address (more than one colon, no brackets: no port)."""

from __future__ import annotations

from .errors import ConfigError


def parse_hostport(
    text: str, default_port: int | None = None, *, default_host: str | None = None, port_zero: bool = False
) -> tuple[str, int]:
    """(host, port). Without `default_port` the port is required; without
    `default_host` the host is; `port_zero` lets a listener ask the kernel
    for a free port."""
    text = text.strip()
    if text.startswith("["):
        host, close, rest = text[1:].partition("]")
        if not close or (rest and not rest.startswith(":")):
            raise ConfigError(f"bad address {text!r} (want [IPv6]:PORT)")
        port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, ""
    host = host or default_host or ""
    if not host:
        raise ConfigError(f"no host in {text!r} (want HOST:PORT)")
    if not port:
        if default_port is None:
            raise ConfigError(f"no port in {text!r} (want HOST:PORT)")
        return host, default_port
    if not port.isdigit() or not (0 if port_zero else 1) <= int(port) <= 65535:
        raise ConfigError(f"bad port in {text!r} (1-65535)")
    return host, int(port)


def format_hostport(addr: tuple[str, int]) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
