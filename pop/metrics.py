"""The POP and IMAP daemons' metrics (pop-proxy, imap-proxy, pop3d;
docs/operations.md, "Metrics"): sessions open, logins by result (throttled
ones among them), backend failures, bytes relayed. Read from the counters
the daemons keep anyway (ProxyCore.stats, and the C engine's pe_stats for
pop-proxy's engine), in the daemon's event loop."""

from __future__ import annotations

from pwmail.base.metrics import Collected, Metric, counter_families

LOGINS = "proxy_logins", "logins, by result", ("result",)

# ProxyCore.stats (and the engine's STAT_NAMES) -> (metric, help, label names, label values);
# the others are exported as proxy_<name>_total.
PROXY_COUNTERS = {
    "login_ok": (*LOGINS, ("ok",)),
    "login_failed": (*LOGINS, ("failed",)),  # wrong password or unknown user
    "throttled": (*LOGINS, ("throttled",)),  # refused by the failure throttle
    "frozen": (*LOGINS, ("frozen",)),  # mailbox being moved
    "pwserver_unavailable": (*LOGINS, ("pwserver_unavailable",)),
    "backend_down": (*LOGINS, ("backend_down",)),  # the backend unreachable, or its mailhost unusable
    "connections": ("proxy_connections", "client connections accepted", (), ()),
    "refused_limit": ("proxy_connections_refused", "connections refused by max_connections(_per_ip)", (), ()),
    "bytes_up": ("proxy_relayed_bytes", "bytes relayed by ended sessions, by direction", ("direction",), ("up",)),
    "bytes_down": ("proxy_relayed_bytes", "bytes relayed by ended sessions, by direction", ("direction",), ("down",)),
}

# pop3d's RFC 3206 codes of a refused login -> the result label
POP3D_RESULTS = {None: "ok", "AUTH": "failed", "SYS/TEMP": "unavailable", "IN-USE": "in_use"}


def proxy_collector(server):
    """collect() over a running ProxyCore (pop.proxy.ProxyServer, pop.imap_proxy's)."""

    def collect() -> Collected:
        counts = dict(server.stats)
        for engine in getattr(server, "engines", list)():  # pop-proxy's running C engines
            for name, n in engine.stats().items():
                counts[name] = counts.get(name, 0) + n
        if server.throttle.evicted():
            counts["throttle_evicted"] = server.throttle.evicted()
        return [
            *counter_families(counts, PROXY_COUNTERS, "proxy"),
            Metric.one("proxy_sessions_open", "gauge", "client sessions open", server.open_sessions()),
        ]

    return collect


def pop3d_collector(server):
    """collect() over a running pop3d (pop.pop3d.Pop3Server)."""

    def collect() -> Collected:
        logins = Metric("pop3d_logins", "counter", "logins, by result", ("result",))
        for result in POP3D_RESULTS.values():
            logins.samples[(result,)] = server.logins[result]
        return [logins, Metric.one("pop3d_sessions_open", "gauge", "POP3 sessions open", server.sessions)]

    return collect
