"""pwserver's metrics (docs/operations.md, "Metrics"): the C counters STATS
shows, the served generation and the reloads, read when scraped.

Imported only when `metrics_listen` is set (pwmail/base/metrics.py)."""

from __future__ import annotations

from pwcache._pwtable import ffi
from pwcache.table import stats_of
from pwmail.base.metrics import Collected, Metric, counter_families

LOOKUPS = "pwserver_lookups", "answers sent, by result", ("result",)
DROPPED = "pwserver_dropped", "requests dropped unanswered, by reason", ("reason",)
TCP_CLOSED = "pwserver_tcp_closed", "TCP connections closed by the limits, by reason", ("reason",)

# C counter (pw_server.c COUNTERS) -> (metric, help, label names, label values); the others are
# exported as pwserver_<counter>_total.
COUNTERS = {
    "requests": ("pwserver_requests", "requests received, UDP and TCP", (), ()),
    "tcp_requests": ("pwserver_tcp_requests", "requests received over TCP", (), ()),
    **{
        name: (*LOOKUPS, (name,))
        for name in ("ok", "notfound", "truncated", "denied", "bad_request", "bad_version", "unavailable")
    },
    **{
        name: (*DROPPED, (name,))
        for name in ("bad_packet", "oversize", "not_allowed_source", "bad_seal", "unsealed", "too_big", "send_errors")
    },
    **{
        "tcp_" + name: (*TCP_CLOSED, (name,))
        for name in ("refused_source", "refused_full", "evicted", "frame_timeouts", "send_timeouts")
    },
}


def collector(core, loader):
    """collect() for the exporter, over the running ServerCore and Loader."""

    def collect() -> Collected:
        with core.lock:  # the served table stays while its figures are read (a reload frees the old one)
            generation, installs, load_ms = core.generation, core.installs, core.load_ms
            users = stats_of(core.table_ptr)["users"] if core.table_ptr != ffi.NULL else 0
        return [
            *counter_families(core.counters(), COUNTERS, "pwserver"),
            Metric.one(
                "pwserver_generation",
                "gauge",
                "generation of the tables served (a load or a batch of live changes makes the next)",
                generation,
            ),
            Metric.one("pwserver_users", "gauge", "users in the tables served", users),
            Metric.one(
                "pwserver_reloads",
                "counter",
                "whole loads served after the first (SIGHUP, SIGUSR1, a source changed)",
                max(0, installs - 1),
            ),
            Metric.one("pwserver_reloads_refused", "counter", "loads the reload guard refused", loader.refused),
            Metric.one("pwserver_load_seconds", "gauge", "time the last whole load took", load_ms / 1000),
            Metric.one(
                "pwserver_loaded_timestamp_seconds",
                "gauge",
                "Unix time the last whole load was put in place",
                loader.loaded_at,
            ),
        ]

    return collect
