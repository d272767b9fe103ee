"""What pop-proxy and pop3d share as processes: raising the descriptor
limit, binding, the "ready" line, and running until SIGTERM/SIGINT."""
from __future__ import annotations

import asyncio
import os
import resource
import signal
import socket
import sys

from .config import parse_hostport

# Connections the kernel completes before we accept them. asyncio re-listens
# with its own default (100) unless given this too: a burst of clients then
# overflows the queue and waits a SYN retransmission (1 s) each.
LISTEN_BACKLOG = 4096


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (thousands of sessions)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def parse_listen(text: str, default_port: int) -> tuple[str, int]:
    """HOST:PORT as parse_hostport, and port 0 (pick one) allowed."""
    host, sep, port = text.strip().rpartition(":")
    if sep and port == "0":
        return parse_hostport(host, default_port)[0], 0
    return parse_hostport(text, default_port)


def listening_socket(listen: str, default_port: int) -> socket.socket:
    host, port = parse_listen(listen, default_port)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


def announce(name: str, sock: socket.socket) -> None:
    """One line on stderr once serving (tests and scripts wait for it)."""
    host, port = sock.getsockname()[:2]
    print(f"{name}: ready on {host}:{port}", file=sys.stderr, flush=True)


async def wait_for_signal() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def run(main) -> None:
    """asyncio.run, on uvloop when it is installed (about half the event
    loop's CPU per connection); PWMAIL_EVENT_LOOP=asyncio forces the stdlib loop."""
    if os.environ.get("PWMAIL_EVENT_LOOP") != "asyncio":
        try:
            import uvloop
        except ImportError:
            uvloop = None
        if uvloop is not None:
            uvloop.run(main)
            return
    asyncio.run(main)
