"""The `[delivery]` section of /etc/pwmail.toml, with its defaults.

Read by pdeliveryd, pdelivery and lmtp-proxy (one section for the part);
command line flags override (SECTION.override checks them as the file's values).
docs/delivery.md describes each key; CHECKS says which values are refused.
"""

from __future__ import annotations

from typing import Any

from delivery import lmtp, spool
from delivery.layout import DEFAULT_SCHEME, SCHEMES
from pwmail.base import hostmap, settings
from pwmail.base.hostport import parse_hostport  # noqa: F401  (delivery's modules take it from here)

DEFAULTS: dict[str, Any] = {
    # where LMTP lives on every storage host (pdelivery connects to MAILHOST:lmtp_port)
    "lmtp_port": 24,
    # pdeliveryd
    "listen": "",  # HOST:PORT; empty = 0.0.0.0:lmtp_port
    "root": "/var/spool/mail",
    "layout": DEFAULT_SCHEME,
    "users": "pwserver",  # or "passwd:/path/to/passwd"
    "mailhost_names": [],  # names of this host in the mailhosts map; [] = accept all
    "recipient_delimiter": "+",
    "message_size_max": lmtp.MESSAGE_SIZE_MAX,
    "message_line_max": lmtp.MESSAGE_LINE_MAX,
    "recipients_max": lmtp.RECIPIENTS_MAX,
    "command_line_max": lmtp.COMMAND_LINE_MAX,
    "bad_commands_max": lmtp.BAD_COMMANDS_MAX,
    "sessions_max": 1000,
    "idle_timeout": 300.0,  # seconds without a byte from the peer
    "data_timeout": 600.0,  # seconds from DATA / first BDAT to the end of the message
    "sessions_per_address_max": 200,  # open sessions from one client address (an MTA runs many)
    "dedup_window": 86400.0,  # seconds a (queue id, recipient) is remembered
    "dedup_max": 200_000,  # entries remembered at most
    "tmp_max_age": 36 * 3600.0,
    "spool_memory_max": spool.SPOOL_MEMORY_MAX,  # bytes of a message in memory; the rest in a spool file
    "io_threads": 32,
    # pdelivery
    "connect_timeout": 10.0,
    "timeout": 300.0,  # per LMTP reply
    "mailhost_suffix": "",  # appended to the mailhost name before resolving it
    # lmtp-proxy (also uses the limits, sessions, timeouts, spool_memory_max and pdelivery's keys above)
    "proxy_listen": "127.0.0.1:24",  # HOST:PORT (--listen)
    "proxy_unix": "",  # path of a UNIX socket to listen on as well (--unix); "" = none
    "proxy_unix_mode": 0o660,  # its permissions
    "proxy_pool_size": 4,  # idle LMTP connections kept per store
    "proxy_pool_idle": 60.0,  # seconds one is kept idle (below the stores' idle_timeout)
    "proxy_store_connections_max": 100,  # connections to one store at once (below its sessions_per_address_max)
    "proxy_spool_dir": "/var/tmp",  # where message data past spool_memory_max waits (unnamed files)
    "shutdown_grace": 30.0,  # seconds open transactions may take after SIGTERM
    # Prometheus metrics (delivery/metrics.py): HOST:PORT; "" = off
    "metrics_listen": "",  # pdeliveryd's
    "proxy_metrics_listen": "",  # lmtp-proxy's
}


def _users(v: str) -> str | None:
    return None if v == "pwserver" or v.startswith("passwd:") else "want 'pwserver' or 'passwd:FILE'"


CHECKS: dict[str, settings.Check] = {
    "lmtp_port": settings.port,
    "listen": settings.address(empty=True, port_zero=True),
    "layout": settings.one_of(*SCHEMES),
    "metrics_listen": settings.address(empty=True, port_zero=True),
    "proxy_metrics_listen": settings.address(empty=True, port_zero=True),
    "users": _users,
    "mailhost_names": settings.each(lambda v: None if isinstance(v, str) else "want a string"),
    **{
        key: settings.positive
        for key in (
            "message_size_max",
            "message_line_max",
            "recipients_max",
            "command_line_max",
            "bad_commands_max",
            "sessions_max",
            "idle_timeout",
            "data_timeout",
            "sessions_per_address_max",
            "dedup_window",
            "dedup_max",
            "tmp_max_age",
            "spool_memory_max",
            "io_threads",
            "connect_timeout",
            "timeout",
        )
    },
}
SECTION = settings.Section("delivery", DEFAULTS, CHECKS)


def load(path: str | None = None) -> dict[str, Any]:
    return SECTION.load(path)


def limits_from(cfg: dict[str, Any]) -> lmtp.Limits:
    return lmtp.Limits(
        command_line_max=int(cfg["command_line_max"]),
        message_size_max=int(cfg["message_size_max"]),
        message_line_max=int(cfg["message_line_max"]),
        recipients_max=int(cfg["recipients_max"]),
        bad_commands_max=int(cfg["bad_commands_max"]),
    )


def placement_rule(path: str | None = None):
    """The `[placement]` rule (docs/placement.md): where a user goes whose
    mailhost the password server leaves empty (pdelivery, lmtp-proxy)."""
    from pwcache import placement

    return placement.PlacementRule.from_settings(settings.section("placement", placement.DEFAULTS, path))


def store_address(hosts: hostmap.HostMap, cfg: dict[str, Any], mailhost: str) -> tuple[str, int]:
    """Where the LMTP of `mailhost` is: its [hosts] entry, else the name with
    `mailhost_suffix` (resolved by DNS) and `lmtp_port` (pdelivery, lmtp-proxy)."""
    port = int(cfg["lmtp_port"])
    return hosts.address(mailhost, "lmtp", port) or (mailhost + cfg["mailhost_suffix"], port)
