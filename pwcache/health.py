"""The shared health record, /run/pwserver/health (docs/protocol.md).

Every client process on a host (libnss_pwserver.so.2 and the Python client)
reads it so that a server one process found dead costs the others nothing
until it is due for a recheck. One line per server known down:

    down HOST:PORT UNTIL_EPOCH_SECONDS
"""

from __future__ import annotations

import os
import tempfile
import time

MAX_FILE = 4096  # bytes read at most; the file holds a few lines


class HealthRecord:
    """Down-until times per server, in this process and in the shared file."""

    def __init__(self, path: str | None, recheck_s: float = 5.0):
        self.path = path
        self.recheck_s = recheck_s
        self._local: dict[str, float] = {}
        self._file_key: tuple[int, int, int] | None = None
        self._file: dict[str, float] = {}

    # -- reading ---------------------------------------------------------
    def _read_file(self) -> dict[str, float]:
        if not self.path:
            return {}
        try:
            st = os.stat(self.path)
        except OSError:
            self._file_key, self._file = None, {}
            return {}
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key != self._file_key:
            try:
                with open(self.path, "rb") as f:
                    self._file = parse(f.read(MAX_FILE).decode("utf-8", "replace"))
            except OSError:
                self._file = {}
            self._file_key = key
        return self._file

    def down_until(self, server: str) -> float:
        """Epoch seconds until which `server` is known down (0: not down)."""
        return max(self._local.get(server, 0.0), self._read_file().get(server, 0.0))

    def is_down(self, server: str, now: float | None = None) -> bool:
        return self.down_until(server) > (time.time() if now is None else now)

    # -- writing ---------------------------------------------------------
    def mark_down(self, server: str, now: float | None = None) -> None:
        until = (time.time() if now is None else now) + self.recheck_s
        self._local[server] = until
        entries = dict(self._read_file())
        entries[server] = until
        self._write(entries)

    def mark_up(self, server: str) -> None:
        self._local.pop(server, None)
        entries = self._read_file()
        if server in entries:
            entries = {k: v for k, v in entries.items() if k != server}
            self._write(entries)

    def _write(self, entries: dict[str, float]) -> None:
        """Atomically replace the file; quietly keep the record in-process
        when the folder is not writable (an unprivileged program)."""
        if not self.path:
            return
        folder = os.path.dirname(self.path) or "."
        now = time.time()
        text = "".join(f"down {srv} {int(until)}\n" for srv, until in sorted(entries.items()) if until > now)
        try:
            os.makedirs(folder, mode=0o755, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".health.", dir=folder)
            try:
                os.write(fd, text.encode())
                os.fchmod(fd, 0o644)
            finally:
                os.close(fd)
            os.rename(tmp, self.path)
        except OSError:
            return
        self._file_key = None


def parse(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "down":
            try:
                out[parts[1]] = float(parts[2])
            except ValueError:
                continue
    return out
