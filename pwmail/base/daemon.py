"""What every daemon shares as a process: raising the descriptor limit,
binding (a busy address is a ConfigError, which errors.exit_on_config_error
around each main turns into one line and EX_CONFIG), readiness (the "ready"
line, sd_notify), running until SIGTERM/SIGINT, re-reading the settings and
the pwserver client configuration on SIGHUP, letting sessions finish at
shutdown, and the choice of event loop."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable

from .errors import ConfigError, listen_error
from .hostport import parse_hostport
from .sdnotify import notify_ready

log = logging.getLogger(__name__)

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
    return parse_hostport(text, default_port, port_zero=True)


def listening_socket(listen: str, default_port: int) -> socket.socket:
    return bind_listener(*parse_listen(listen, default_port))


def bind_listener(host: str, port: int) -> socket.socket:
    """A non-blocking TCP listener; an address busy or not ours is a
    ConfigError naming it (one line and EX_CONFIG, not a traceback)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted sockets inherit it (Linux): the engine's relay wants it and
        # need not set it per connection; asyncio sets it anyway.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except OSError as e:
        sock.close()
        raise listen_error(host, port, e) from None
    sock.setblocking(False)
    return sock


def announce(name: str, sock: socket.socket) -> None:
    """Once serving: one line on stderr (tests and scripts wait for it) and
    READY=1 to the service manager."""
    host, port = sock.getsockname()[:2]
    print(f"{name}: ready on {host}:{port}", file=sys.stderr, flush=True)
    notify_ready()


def reconfigure_clients(clients: Iterable) -> None:
    """SIGHUP's second half: each pwserver client (pwcache.client's
    `reconfigure()`) re-reads /etc/pwserver.conf (servers, timeouts, keys).
    Apart from the settings: a bad pwserver.conf keeps the old client
    configuration (logged) and does not undo the settings' reload."""
    for client in clients:
        try:
            if client.reconfigure():
                log.info("reloaded the pwserver client configuration: %d server(s)", len(client.servers))
        except (ConfigError, OSError) as e:
            log.error("reload of the pwserver client configuration failed, keeping the old one: %s", e)
        except Exception:
            log.exception("reload of the pwserver client configuration failed, keeping the old one")


def handle_signals(on_reload: Callable[[], None] | None = None, clients: Iterable = ()) -> asyncio.Event:
    """Installs the handlers; returns the event SIGTERM or SIGINT sets.
    Call it before announce(): a signal sent as soon as the "ready" line
    shows must find them. SIGHUP calls on_reload (an error there is logged
    and the old settings stay), then reconfigure_clients(clients); it never
    ends the process."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    clients = list(clients)

    def on_hup() -> None:
        if on_reload is None and not clients:
            log.info("SIGHUP: nothing to reload")
            return
        try:
            if on_reload is not None:
                on_reload()
        except ConfigError as e:  # the file's mistake, in one line
            log.error("reload failed, keeping the old settings: %s: %s", type(e).__name__, e)
        except Exception:
            log.exception("reload failed, keeping the old settings")
        reconfigure_clients(clients)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    return stop


async def wait_for_signal(stop: asyncio.Event) -> None:
    """Until SIGTERM or SIGINT (handle_signals' event); SIGHUP is ignored from then on."""
    await stop.wait()
    asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # still not fatal while sessions drain


def reread_settings(source: Callable[[], dict], running: dict, restart_only: tuple[str, ...]) -> dict:
    """The settings again, as `source()` reads them (the section with the
    command line's flags), for SIGHUP. Keys in `restart_only` keep their
    running values (a warning says so when the file changed them). Raises
    (settings.SettingsError & co) when the file is bad: the caller keeps
    the old settings."""
    new = source()
    for key in restart_only:
        if new[key] != running[key]:
            log.warning("reload: %s changed; it takes effect at restart", key)
            new[key] = running[key]
    return new


async def drain(open_sessions: Callable[[], int], grace: float, what: str) -> int:
    """After the listeners closed (SIGTERM): waits until no session is open
    or `grace` seconds passed. Returns how many are still open (the caller
    closes them)."""
    deadline = time.monotonic() + grace
    left = open_sessions()
    if left:
        log.info(
            "stopping: %d %s open, waiting up to %g s for them to end (another SIGTERM ends them now)",
            left,
            what,
            grace,
        )
    hurry = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, hurry.set)
    while left and time.monotonic() < deadline and not hurry.is_set():
        await asyncio.sleep(0.05)
        left = open_sessions()
    return left


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
