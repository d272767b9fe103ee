"""The pwmail test bed: hosts as network namespaces (or loopback addresses),
a central syslog collector, and the whole system started on them.
See docs/testbed.md."""

from .bed import (
    LOOPBACK_SUBNET,
    SUBNET,
    SYSLOG_HOST,
    BedUnavailable,
    LoopbackBed,
    TestBed,
    cleanup_stale,
    namespace_support,
)

__all__ = [
    "TestBed",
    "LoopbackBed",
    "BedUnavailable",
    "namespace_support",
    "cleanup_stale",
    "SUBNET",
    "LOOPBACK_SUBNET",
    "SYSLOG_HOST",
]
