"""The LMTP servers' metrics (pdeliveryd, lmtp-proxy; docs/operations.md,
"Metrics"): replies to each message by class, delivery latency, sessions,
message data being received, and pdeliveryd's duplicate table."""

from __future__ import annotations

import collections

from pwmail.base.hostport import format_hostport
from pwmail.base.metrics import Collected, Histogram, Metric

# lmtp-proxy's per-store figures (StorePool.depths) -> (metric, kind, help)
STORE_DEPTHS = {
    "in_use": ("lmtp_proxy_store_transactions", "gauge", "transactions on the store's connections now"),
    "waiting": (
        "lmtp_proxy_store_waiting",
        "gauge",
        "transactions waiting for a connection to the store (proxy_store_connections_max reached)",
    ),
    "idle": ("lmtp_proxy_store_idle_connections", "gauge", "idle connections kept for the store"),
    "opened": ("lmtp_proxy_store_connections_opened", "counter", "connections opened to the store"),
}


class DeliveryCounts:
    """What the sessions count as messages pass (lmtpsessions.LMTPSessions)."""

    def __init__(self):
        self.replies: collections.Counter[str] = collections.Counter()  # "2xx", "4xx", "5xx"
        self.latency = Histogram(
            "lmtp_delivery_seconds", "time from a message's end of data to its replies (all its recipients)"
        )

    def delivered(self, replies, seconds: float) -> None:
        """One message's replies (one per recipient), given `seconds` after its data ended."""
        for reply in replies:
            self.replies[f"{reply.code // 100}xx"] += 1
        self.latency.observe(seconds)


def collector(server):
    """collect() over a running LMTPSessions (pdeliveryd's DeliveryServer or
    the LMTPProxy); called in its event loop."""

    def collect() -> Collected:
        counts: DeliveryCounts = server.counts
        replies = Metric("lmtp_deliveries", "counter", "replies to messages, one per recipient, by class", ("class",))
        for cls in ("2xx", "4xx", "5xx"):
            replies.samples[(cls,)] = counts.replies[cls]
        found = [
            replies,
            counts.latency.metric(),
            Metric.one("lmtp_sessions_open", "gauge", "LMTP sessions open", len(server.sessions)),
            Metric.one(
                "lmtp_sessions_refused",
                "counter",
                "sessions refused at connect (limits, shutdown)",
                server.refused_sessions,
            ),
            Metric.one(
                "lmtp_spool_bytes",
                "gauge",
                "message data held for messages still being received",
                sum(conn.data_size for conn in server.conns.values()),
            ),
        ]
        found.append(
            Metric.one(
                "lmtp_messages_delivering",
                "gauge",
                "messages whose data is in and whose replies are not",
                len(server.busy),
            )
        )
        pool = getattr(server, "pool", None)  # lmtp-proxy's connections to the stores
        if pool is not None:
            depths = pool.depths()
            for figure, (name, kind, help) in STORE_DEPTHS.items():
                metric = Metric(name, kind, help, ("store",))
                for addr, of_store in depths.items():
                    metric.samples[(format_hostport(addr),)] = of_store[figure]
                found.append(metric)
        store = getattr(server, "store", None)  # pdeliveryd's; the proxy keeps no duplicate table
        if store is not None:
            found += [
                Metric.one("lmtp_dedup_entries", "gauge", "(queue id, mailbox) pairs remembered", len(store.dedup)),
                Metric.one("lmtp_dedup_hits", "counter", "messages acknowledged as duplicates", store.dedup.hits),
            ]
        return found

    return collect
