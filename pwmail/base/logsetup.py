"""Logging for every pwmail daemon and tool: stdlib logging to syslog
(/dev/log, or a remote collector as in the paper's III.B), plus stderr when
asked (foreground runs, tests)."""

from __future__ import annotations

import errno
import logging
import logging.handlers
import os
import socket
import sys

FORMAT = "%(name)s[%(process)d]: %(levelname)s %(message)s"
_told_no_syslog = False  # said once per process, not at every SIGHUP's re-opening


def _say_no_syslog(ident: str, path: str, e: OSError) -> None:
    """Without a syslog socket the log goes to stderr only: say so, once."""
    global _told_no_syslog
    if not _told_no_syslog:
        _told_no_syslog = True
        print(
            f"{ident}: cannot log to syslog at {path} ({e.strerror or e}): logging to stderr only",
            file=sys.stderr,
            flush=True,
        )


def setup_logging(
    ident: str,
    *,
    stderr: bool = False,
    syslog_address: str | None = None,
    level: int | str = logging.INFO,
    facility: int = logging.handlers.SysLogHandler.LOG_MAIL,
    daemon: bool = False,
) -> logging.Logger:
    """Configure the root logger once for process `ident`.

    syslog_address: "HOST:PORT" (UDP) for a remote collector, a socket path,
    or None for /dev/log. Without one (no syslog daemon, a container) the
    records go to stderr, and for a `daemon` one line on stderr says so (a
    delivery agent's stderr goes into bounces: it stays quiet).
    PWMAIL_SYSLOG in the environment overrides it, so a test bed can point
    every daemon at its log host.
    """
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(level)
    syslog_address = os.environ.get("PWMAIL_SYSLOG") or syslog_address
    handler = None
    if syslog_address and ":" in syslog_address and not syslog_address.startswith("/"):
        host, port = syslog_address.rsplit(":", 1)
        handler = logging.handlers.SysLogHandler((host, int(port)), facility=facility, socktype=socket.SOCK_DGRAM)
    else:
        path = syslog_address or "/dev/log"
        try:
            if not os.path.exists(path):  # the handler would only find out at each record
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
            handler = logging.handlers.SysLogHandler(path, facility=facility)
        except OSError as e:
            if daemon:
                _say_no_syslog(ident, path, e)
    if handler is not None:
        handler.setFormatter(logging.Formatter(FORMAT.replace("%(name)s", ident)))
        root.addHandler(handler)
    if stderr or handler is None:
        err = logging.StreamHandler(sys.stderr)
        err.setFormatter(logging.Formatter("%(asctime)s " + FORMAT.replace("%(name)s", ident)))
        root.addHandler(err)
    return logging.getLogger(ident)
