"""pop-proxy's engine: the common session in C (pop/_csrc/pop_engine.c).

The engine accepts on the plain listening socket and carries a session
from greeting to close when it goes the common way (CAPA, USER, PASS,
QUIT; mailhost lookup; backend login; splice relay), in a thread of its
own without the GIL, and writes that session's log records itself, to the
places and in the format of pwmail/base/logsetup.py. Everything else is
handed over to the asyncio loop (through an eventfd): the proxy adopts
the socket, replays what the engine read through pop/protocol.py and goes
on from there.

The engine's answers are texts made here by pop/protocol.py, so a client
cannot tell which side answered. docs/pop.md ("The engine") has the rest.
"""

from __future__ import annotations

import asyncio
import logging
import logging.handlers
import os
import socket
import sys
import threading
from dataclasses import dataclass, field

from ._engine import ffi, lib
from .protocol import Closed, ServerConnection

# pe_stats() order (ST_* in pop_engine.c).
STAT_NAMES = (
    "connections",
    "refused_limit",
    "handoffs",
    "login_ok",
    "prelogin_timeout",
    "relay_errors",
    "idle_timeout",
)

READ_AT_HANDOFF = 262144  # as much as one read of an asyncio transport
RELAY_USERS_BUFFER = 1 << 20  # bytes of user names per kick check (past it, users wait for a later check)
OUTCOME_NONE, OUTCOME_ANSWER, OUTCOME_ERROR = lib.PE_OUTCOME_NONE, lib.PE_OUTCOME_ANSWER, lib.PE_OUTCOME_ERROR


@dataclass
class Handoff:
    """A session the engine began and gives to Python."""

    sock: socket.socket
    addr: str
    port: int
    history: bytes = field(repr=False)  # every byte the client sent so far (may hold a password)
    answered: int  # ... of which the engine answered this many
    outcome: int  # OUTCOME_*: how the engine's login attempt ended
    text: str  # the backend's answer line, or what failed
    mailhost: str
    started: float  # CLOCK_MONOTONIC seconds of the PASS (0: none)
    user: str = ""  # the USER of the login the engine tried
    attempt: bool = False  # that login is in flight in the throttle: Python ends it
    result: tuple | None = None  # what Python made of the engine's outcome
    eof: bool = False  # the client has closed its side
    more: bytearray = field(default_factory=bytearray, repr=False)  # read by Python before adopting


def _read_waiting(sock: socket.socket) -> tuple[bytes, bool]:
    """What the client sent beyond the engine's history, as one asyncio read
    would take it: Python must see a too-long line whole, and answer it
    with nothing left unread (closing a socket with unread input resets
    the connection, and the client would lose the answer)."""
    sock.setblocking(False)
    try:
        data = sock.recv(READ_AT_HANDOFF)
    except (BlockingIOError, InterruptedError):
        return b"", False
    except OSError:
        return b"", True
    return data, not data


def answers(greeting: str, *, stls: bool, plaintext_auth: bool) -> dict[str, bytes]:
    """The engine's answers, written by the state machine Python uses."""

    def run(lines: bytes) -> bytes:
        conn = ServerConnection(stls=stls, plaintext_auth=plaintext_auth)
        conn.receive_data(lines)
        while not isinstance(conn.next_event(), (str, Closed)):
            pass
        return bytes(conn.data_to_send())

    conn = ServerConnection(stls=stls, plaintext_auth=plaintext_auth)
    conn.send_greeting(greeting)
    timeout = ServerConnection()
    timeout.abort("Disconnected for inactivity.")
    return {
        "greeting": bytes(conn.data_to_send()),
        "capa": run(b"CAPA\r\n"),
        "user_ok": run(b"USER x\r\n") if plaintext_auth else b"",
        "quit_ok": run(b"QUIT\r\n"),
        "timeout_err": bytes(timeout.data_to_send()),
    }


def log_targets() -> tuple[int, int, int, int]:
    """(level, syslog fd, facility << 3, stderr fd) of the root logger's
    handlers (pwmail/base/logsetup.py): descriptors of the engine's own, -1
    for none."""
    root = logging.getLogger()
    syslog_fd = stderr_fd = -1
    facility = 0
    for h in root.handlers:
        if isinstance(h, logging.handlers.SysLogHandler) and syslog_fd < 0:
            if h.unixsocket:
                syslog_fd = os.dup(h.socket.fileno())
            else:  # a remote collector: a connected socket of our own
                family, kind, proto, _, address = socket.getaddrinfo(*h.address, type=socket.SOCK_DGRAM)[0]
                s = socket.socket(family, kind, proto)
                s.connect(address)
                syslog_fd = s.detach()
            facility = h.facility << 3
        elif isinstance(h, logging.StreamHandler) and h.stream in (sys.stderr, sys.__stderr__) and stderr_fd < 0:
            stderr_fd = os.dup(h.stream.fileno())
    return root.getEffectiveLevel(), syslog_fd, facility, stderr_fd


def usable(cfg: dict) -> bool:
    """The engine relays plain TCP only: backends over TLS stay in Python."""
    return bool(cfg["engine"]) and bool(cfg["splice"]) and cfg["backend_tls"] == "none"


class Engine:
    def __init__(
        self,
        cfg: dict,
        sock: socket.socket,
        texts: dict[str, bytes],
        refuse: bytes,
        backends: dict[str, tuple[str, int] | None],
        *,
        throttle,
        on_handoff,
        ident: str = "pop-proxy",
    ):
        self.on_handoff = on_handoff
        self._throttle = throttle  # (kept alive as long as the engine uses it)
        self._keep = {k: ffi.new("char[]", v) for k, v in texts.items() if v}
        self._keep["refuse"] = ffi.new("char[]", refuse)
        self._keep["ident"] = ffi.new("char[]", ident.encode())
        c = ffi.new("pe_config *")
        c.greeting, c.capa, c.quit_ok = self._keep["greeting"], self._keep["capa"], self._keep["quit_ok"]
        c.user_ok = self._keep.get("user_ok", ffi.NULL)
        c.timeout_err, c.refuse_err = self._keep["timeout_err"], self._keep["refuse"]
        c.prelogin_timeout = cfg["prelogin_timeout"]
        c.connect_timeout = cfg["backend_connect_timeout"]
        c.backend_timeout = cfg["backend_timeout"]
        c.idle_timeout = cfg["idle_timeout"]
        c.max_connections = cfg["max_connections"]
        c.max_connections_per_ip = cfg["max_connections_per_ip"]
        c.relay_buffer = cfg["relay_buffer"]
        c.lookup_threads = cfg["lookup_threads"]
        c.backend_port = cfg["backend_port"]
        c.log_ident = self._keep["ident"]
        c.throttle = throttle.handle
        c.log_level, c.syslog_fd, c.syslog_facility, c.stderr_fd = log_targets()
        fd = os.dup(sock.fileno())  # the engine closes its own copies
        self._e = lib.pe_new(c, fd)
        if self._e == ffi.NULL:
            err = ffi.errno
            for own in (fd, c.syslog_fd, c.stderr_fd):
                if own >= 0:
                    os.close(own)
            raise OSError(err, f"pop engine: {os.strerror(err)}")
        for name, address in backends.items():
            host, port = address if address else ("", 0)
            if lib.pe_add_backend(self._e, name.encode(), host.encode(), port) < 0:
                raise ValueError("too many [pop] backends for the engine")
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ev = ffi.new("pe_event *")
        self._stopping = False

    def start(self, on_exit=None) -> None:
        """Runs the engine thread; `on_exit()` is called in the event loop
        when a drained engine has finished its last session."""
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(lib.pe_event_fd(self._e), self._take_handoffs)
        self._thread = threading.Thread(target=self._run, args=(on_exit,), name="pop-engine", daemon=True)
        self._thread.start()

    def _run(self, on_exit) -> None:
        lib.pe_run(self._e)
        if on_exit is not None and not self._stopping:
            self._loop.call_soon_threadsafe(on_exit)

    def drain(self) -> None:
        """Accept no more; the sessions open go on to their end (docs/pop.md, "Signals")."""
        if self._e != ffi.NULL:
            lib.pe_drain(self._e)

    def open_sessions(self) -> int:
        if self._e == ffi.NULL or self._thread is None or not self._thread.is_alive():
            return 0
        return lib.pe_open_sessions(self._e)

    def stop(self) -> None:
        """Ends the engine now (sessions still open are closed) and frees it."""
        if self._thread is None:
            return
        self._stopping = True
        self._take_handoffs()  # the last ones, if it has just finished
        self._loop.remove_reader(lib.pe_event_fd(self._e))
        lib.pe_stop(self._e)
        self._thread.join()
        self._thread = None
        lib.pe_free(self._e)
        self._e = ffi.NULL

    def stats(self) -> dict[str, int]:
        if self._e == ffi.NULL:
            return {}
        out = ffi.new("uint64_t[]", lib.PE_NSTATS)
        lib.pe_stats(self._e, out)
        return {name: out[i] for i, name in enumerate(STAT_NAMES) if out[i]}

    # --- kicks on move (docs/pop.md) ---------------------------------------------------------
    def relay_users(self) -> set[tuple[str, str]]:
        """(user, mailhost) of the sessions the engine relays now."""
        if self._e == ffi.NULL:
            return set()
        buf = ffi.new("char[]", RELAY_USERS_BUFFER)
        n = lib.pe_relay_users(self._e, buf, RELAY_USERS_BUFFER)
        pairs = (item.decode("utf-8", "replace").partition("\n") for item in ffi.buffer(buf, n)[:].split(b"\0"))
        return {(user, host) for user, _, host in pairs if user}

    def kick(self, user: str, keep: str, farewell: bytes) -> bool:
        """Close the relayed sessions of `user` whose mailhost is not `keep`
        ("" = all) after `farewell`, soon (in the engine thread). False when
        too many kicks are pending: ask again at the next check."""
        if self._e == ffi.NULL:
            return True
        return lib.pe_kick(self._e, user.encode(), keep.encode(), farewell) == 0

    def _take_handoffs(self) -> None:
        ev = self._ev
        while self._e != ffi.NULL and lib.pe_next_event(self._e, ev):  # all handoffs
            history = bytes(ffi.buffer(ev.history, ev.history_len)) if ev.history_len else b""
            lib.pe_event_release(ev)
            sock = socket.socket(fileno=ev.fd)
            waiting, eof = _read_waiting(sock)
            self.on_handoff(
                Handoff(
                    sock,
                    ffi.string(ev.addr).decode(),
                    ev.port,
                    history + waiting,
                    ev.answered,
                    ev.outcome,
                    ffi.string(ev.text).decode("utf-8", "replace"),
                    ffi.string(ev.mailhost).decode("utf-8", "replace"),
                    ev.started,
                    ffi.string(ev.user).decode("utf-8", "replace"),
                    bool(ev.attempt),
                    None,
                    eof,
                )
            )
