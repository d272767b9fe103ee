"""The copy rate limit of a mailbox move: bytes and files per second."""

from __future__ import annotations

import threading
import time


class Throttle:
    """At most `bps` bytes and `fps` files per second, averaged; shared by
    the copying threads."""

    def __init__(self, bps: float, fps: float):
        self.bps, self.fps = bps, fps
        self.t0 = time.monotonic()
        self.bytes = 0
        self.files = 0
        self._lock = threading.Lock()

    def spend(self, nbytes: int = 0, nfiles: int = 0) -> None:
        with self._lock:
            self.bytes += nbytes
            self.files += nfiles
            need = max(self.bytes / self.bps if self.bps > 0 else 0, self.files / self.fps if self.fps > 0 else 0)
        ahead = need - (time.monotonic() - self.t0)
        if ahead > 0:
            time.sleep(ahead)
