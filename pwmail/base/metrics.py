"""Prometheus text metrics, the one exporter of every daemon (docs/operations.md, "Metrics").

A daemon keeps counting in its own plain counters (dicts, C counters) and
gives a `collect()` that turns them into `Metric`s when scraped; `serve()`
answers `GET /metrics` on its `metrics_listen` from a thread of its own.
prometheus_client is imported only by `serve()`: a daemon without
`metrics_listen` neither loads it nor pays for it (pwserver's memory budget).

    exporter = metrics.serve("127.0.0.1:9101", collect, loop=asyncio.get_running_loop())
    ...
    exporter.close()

With `loop`, collect() runs in that event loop's thread (the daemon's
counters change there: reading them from another thread could see a dict
change size); without it, in the exporter's thread (pwserver: C counters
and plain integers).
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .daemon import parse_listen
from .errors import listen_error
from .hostport import format_hostport

COLLECT_TIMEOUT = 5.0  # seconds a scrape waits for the event loop to collect
# Delivery latencies, seconds: from a local fsync (ms) to a slow store or a 300 s timeout.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


@dataclass
class Metric:
    """One metric family: `kind` counter or gauge; `samples` maps a tuple of
    (label, value) pairs (() for none) to the value. A counter's name has no
    `_total`: the text format adds it."""

    name: str
    kind: str
    help: str
    labels: tuple[str, ...] = ()
    samples: dict[tuple[str, ...], float] = field(default_factory=dict)

    @classmethod
    def one(cls, name: str, kind: str, help: str, value: float) -> Metric:
        return cls(name, kind, help, (), {(): value})


class Histogram:
    """Observations counted into cumulative buckets (upper bounds, seconds),
    kept by the daemon itself; `metric()` gives them to the exporter."""

    def __init__(self, name: str, help: str, buckets: Iterable[float] = LATENCY_BUCKETS):
        self.name, self.help = name, help
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)  # the last: above every bound (+Inf)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def metric(self) -> HistogramSnapshot:
        return HistogramSnapshot(self.name, self.help, self.bounds, tuple(self.counts), self.total)


@dataclass
class HistogramSnapshot:
    name: str
    help: str
    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    total: float


Collected = list["Metric | HistogramSnapshot"]


def _families(collected: Collected):
    """prometheus_client's metric families for what collect() gave."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    for m in collected:
        if isinstance(m, HistogramSnapshot):
            running, buckets = 0, []
            for bound, n in zip((*m.bounds, float("inf")), m.counts):
                running += n
                buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
            yield HistogramMetricFamily(m.name, m.help, buckets=buckets, sum_value=m.total)
            continue
        family = (CounterMetricFamily if m.kind == "counter" else GaugeMetricFamily)(m.name, m.help, labels=m.labels)
        for labels, value in m.samples.items():
            family.add_metric(list(labels), value)
        yield family


class Exporter:
    """The HTTP exporter of one daemon; `address` is where it listens (the
    port the kernel picked when asked for port 0)."""

    def __init__(self, httpd, thread, address: tuple[str, int]):
        self._httpd, self._thread, self.address = httpd, thread, address

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def serve(
    listen: str, collect: Callable[[], Collected], *, name: str, loop: asyncio.AbstractEventLoop | None = None
) -> Exporter:
    """Starts answering `GET /metrics` on `listen` (HOST:PORT, port 0 picks
    one) with what `collect()` says; a busy address is a ConfigError naming
    it. Says "NAME: metrics on HOST:PORT" on stderr."""
    from prometheus_client import ProcessCollector, start_http_server
    from prometheus_client.registry import Collector, CollectorRegistry

    def current() -> Collected:
        if loop is None:
            return collect()
        # the daemon's counters are read in the thread that changes them
        future = concurrent.futures.Future()
        loop.call_soon_threadsafe(lambda: future.set_result(collect()) if not future.done() else None)
        return future.result(timeout=COLLECT_TIMEOUT)

    class DaemonCollector(Collector):
        def collect(self):
            yield from _families(current())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector())
    ProcessCollector(registry=registry)  # process_*: resident memory, CPU seconds, open descriptors (sizing)
    host, port = parse_listen(listen, 0)
    try:
        httpd, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        raise listen_error(host, port, e) from None
    address = httpd.server_address[:2]
    print(f"{name}: metrics on {format_hostport(address)}", file=sys.stderr, flush=True)
    return Exporter(httpd, thread, address)


def counter_families(
    counts: dict[str, int], table: dict[str, tuple[str, str, tuple[str, ...], tuple[str, ...]]], prefix: str
) -> Collected:
    """A daemon's named counters as metrics: `table` maps a counter's name to
    (metric, help, label names, label values); a name not in it becomes
    `PREFIX_NAME` (a counter added later is exported all the same)."""
    families: dict[str, Metric] = {}
    for metric, help, labels, _ in table.values():
        families.setdefault(metric, Metric(metric, "counter", help, labels))
    for key, value in counts.items():
        metric, help, labels, values = table.get(key, (f"{prefix}_{key}", f"{key} (see docs/operations.md)", (), ()))
        family = families.setdefault(metric, Metric(metric, "counter", help, labels))
        family.samples[values] = family.samples.get(values, 0) + value
    return list(families.values())


def optional(
    listen: str, collect: Callable[[], Collected], *, name: str, loop: asyncio.AbstractEventLoop | None = None
) -> Exporter | None:
    """serve() when `listen` is set (the daemon's metrics_listen), else None."""
    return serve(listen, collect, name=name, loop=loop) if listen else None
