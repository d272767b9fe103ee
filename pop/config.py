"""The `[pop]` section of /etc/pwmail.toml, shared by pop-proxy and pop3d
(one section, so one table of defaults, and CHECKS: the values refused),
and imap-proxy's `[imap]`, whose proxy settings are the same keys.
Command-line flags override them (SECTION.override checks them too);
docs/pop.md describes every key."""

from __future__ import annotations

import ipaddress
from typing import Any

from delivery.layout import SCHEMES
from pwmail.base import settings
from pwmail.base.hostport import parse_hostport  # noqa: F401  (pop's modules take it from here)

# Both proxies' settings (pop-proxy's in [pop], imap-proxy's in [imap]): POP's values here.
PROXY_DEFAULTS: dict[str, Any] = {
    "shutdown_grace": 30.0,  # seconds sessions get to end after SIGTERM, then they are closed
    "listen": "0.0.0.0:110",
    "tls_cert": "",  # PEM certificate chain: offer STLS / STARTTLS when set
    "tls_key": "",
    "tls_listen": "",  # "HOST:PORT" for implicit TLS (POP3S 995, IMAPS 993); needs tls_cert
    "plaintext_auth": True,  # logins before STLS / STARTTLS
    "backend_port": 110,  # for mailhosts given without a port
    "backends": {},  # mailhost name -> "HOST:PORT" (optional map)
    "backend_tls": "none",  # "none", "tls" (implicit) or "stls" (POP) / "starttls" (IMAP)
    "backend_ca": "",  # CA file to verify backends ("" = system store)
    "backend_verify": True,
    "backend_connect_timeout": 3.0,  # seconds, one try
    "backend_retries": 2,  # extra tries after the first, then [SYS/TEMP] / [UNAVAILABLE]
    "backend_retry_delay": 0.25,  # seconds, doubled after each try
    "backend_timeout": 15.0,  # seconds for the backend's greeting and login answer
    "auth_failure_delay": 2.0,  # every failed login is answered this long after the credentials
    "prelogin_timeout": 60.0,  # seconds without a complete command before login
    "idle_timeout": 600.0,  # seconds without a byte either way after login (RFC 1939: >= 10 min)
    "max_connections": 20000,
    "max_connections_per_ip": 50,
    "throttle_ip_failures": 20,  # failed logins from one address ...
    "throttle_user_ip_failures": 10,  # ... or for one user name from one address ...
    "throttle_user_failures": 100,  # ... or for one user name from anywhere ...
    "throttle_window": 300.0,  # ... within this many seconds: refused
    "relay_buffer": 1048576,  # bytes buffered per direction after login
    "splice": True,  # zero-copy relay (Linux) when neither side is TLS
    "metrics_listen": "",  # HOST:PORT for Prometheus metrics (pop/metrics.py); "" = off
    "kick_check_interval": 3.0,  # seconds between checks for moved users' sessions (0 = no kicks)
}

DEFAULTS: dict[str, Any] = {
    **PROXY_DEFAULTS,
    # pop-proxy
    "engine": True,  # the common plain session in C (pop/engine.py); needs splice
    "lookup_threads": 4,  # the engine's mailhost lookups at a time
    # pop3d
    "pop3d_listen": "0.0.0.0:110",
    "root": "/var/spool/mail",
    "layout": "first3",
    "trusted_networks": [],  # proxies allowed XCLIENT, exempt from pop3d's failure delay
    "pop3d_failure_delay": 2.0,  # for peers outside trusted_networks
    "pop3d_timeout": 600.0,
    "pop3d_dummy_hash": "",  # method and cost for unknown users ("" = the first real user's)
    "pop3d_metrics_listen": "",  # pop3d's metrics_listen (the one above is pop-proxy's)
}

# imap-proxy's [imap] section (docs/imap.md).
IMAP_DEFAULTS: dict[str, Any] = {
    **PROXY_DEFAULTS,
    "listen": "0.0.0.0:143",
    "backend_port": 143,
    "idle_timeout": 1800.0,  # RFC 9051 5.4: an autologout timer of at least 30 minutes (IDLE)
    "backend_id": True,  # the client's address to the backend in ID (x-originating-ip)
}


CHECKS: dict[str, settings.Check] = {
    "listen": settings.address(port_zero=True),
    "pop3d_listen": settings.address(port_zero=True),
    "tls_listen": settings.address(empty=True, port_zero=True),
    "metrics_listen": settings.address(empty=True, port_zero=True),
    "pop3d_metrics_listen": settings.address(empty=True, port_zero=True),
    "backend_port": settings.port,
    "backends": settings.each(settings.address()),
    "backend_tls": settings.one_of("none", "tls", "stls"),
    "layout": settings.one_of(*SCHEMES),
    "trusted_networks": settings.networks,
    **{
        key: settings.positive
        for key in (
            "backend_connect_timeout",
            "backend_timeout",
            "prelogin_timeout",
            "idle_timeout",
            "pop3d_timeout",
            "max_connections",
            "max_connections_per_ip",
            "throttle_ip_failures",
            "throttle_user_ip_failures",
            "throttle_user_failures",
            "throttle_window",
            "relay_buffer",
            "lookup_threads",
        )
    },
    **{
        key: settings.non_negative
        for key in (
            "shutdown_grace",
            "backend_retries",
            "backend_retry_delay",
            "auth_failure_delay",
            "pop3d_failure_delay",
            "kick_check_interval",
        )
    },
}
SECTION = settings.Section("pop", DEFAULTS, CHECKS)


def load(path: str | None = None) -> dict[str, Any]:
    return SECTION.load(path)


IMAP_CHECKS: dict[str, settings.Check] = {
    **{key: check for key, check in CHECKS.items() if key in IMAP_DEFAULTS},
    "backend_tls": settings.one_of("none", "tls", "starttls"),
}
IMAP_SECTION = settings.Section("imap", IMAP_DEFAULTS, IMAP_CHECKS)


def load_imap(path: str | None = None) -> dict[str, Any]:
    return IMAP_SECTION.load(path)


def networks(items) -> list:
    return [ipaddress.ip_network(n, strict=False) for n in items]


def address_in(addr: str, nets) -> bool:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return any(ip in n for n in nets)
