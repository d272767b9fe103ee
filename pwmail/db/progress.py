"""A progress bar on stderr for long imports, drawn only when stderr is a
terminal (logs and pipes get the summary line alone)."""

from __future__ import annotations

import sys
import time

WIDTH = 30
REDRAW_S = 0.2  # at most five redraws a second: drawing must not cost the import


class Progress:
    def __init__(self, total: int, label: str, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.total = max(total, 1)
        self.label = label
        self.done = 0
        self._start = time.monotonic()
        self._drawn = 0.0

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and now - self._drawn >= REDRAW_S:
            self._drawn = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        frac = min(self.done / self.total, 1.0)
        bar = "#" * int(frac * WIDTH)
        rate = self.done / max(now - self._start, 1e-6)
        self.stream.write(f"\r{self.label} [{bar:<{WIDTH}}] {frac:4.0%} {self.done:,}/{self.total:,} ({rate:,.0f}/s)")
        self.stream.flush()

    def finish(self) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()
