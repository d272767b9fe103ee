"""Readiness for the service manager, alone in its module: pwserver imports
it without pulling in asyncio (its memory budget counts megabytes)."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify_ready() -> None:
    """sd_notify(READY=1) when started by a service manager that asks
    (systemd's Type=notify sets NOTIFY_SOCKET)."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(b"READY=1", path)
    except OSError as e:
        log.warning("NOTIFY_SOCKET: %s", e)
