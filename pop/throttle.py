"""Failed-login throttling: a leaky bucket per key (client address, user
name). Each failure adds one; the level drains at `limit / window` per
second; a key whose next failure would pass `limit` is refused until it
has drained by one (window / limit seconds after the last failure).
Memory is bounded: past `max_keys`, the least recently failed key goes."""
from __future__ import annotations

from collections import OrderedDict

MAX_KEYS = 100_000


class FailureThrottle:
    def __init__(self, limit: int, window: float, max_keys: int = MAX_KEYS):
        self.configure(limit, window)
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def configure(self, limit: int, window: float) -> None:
        """New numbers (SIGHUP); the failures counted so far stay."""
        self.limit = limit
        self.rate = limit / window if window > 0 else float("inf")

    def level(self, key: str, now: float) -> float:
        hit = self._buckets.get(key)
        if hit is None:
            return 0.0
        level, then = hit
        return max(0.0, level - (now - then) * self.rate)

    def blocked(self, key: str, now: float) -> bool:
        return self.limit > 0 and self.level(key, now) > self.limit - 1

    def blocked_until(self, key: str, now: float) -> float | None:
        """When a blocked key drains below the limit again (None: not blocked)."""
        if not self.blocked(key, now):
            return None
        return now + (self.level(key, now) - (self.limit - 1)) / self.rate

    def blocked_keys(self, now: float):
        """(key, until) of every key blocked now."""
        for key in list(self._buckets):
            until = self.blocked_until(key, now)
            if until is not None:
                yield key, until

    def failure(self, key: str, now: float) -> None:
        level = self.level(key, now) + 1.0
        self._buckets[key] = (level, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)
