"""`pop-proxy`: the POP distributor (the paper's III.H).

    pop-proxy --listen HOST:PORT [--backend-port N] [--tls-cert F --tls-key F]

One asyncio process. Before login it speaks POP3 itself (pop/protocol.py):
greeting, CAPA, STLS, USER/PASS, AUTH PLAIN, QUIT. With the credentials in
hand it asks the password server for the user's mailhost, logs in to that
backend (pop/backend.py), and relays bytes both ways (pop/relay.py).
Policy lives here: limits, throttling, timing of failures, error codes.

On the plain listener the engine (pop/engine.py, a C thread) carries the
common session itself and hands everything else over to the same code
below (`ClientSide(handoff=...)`). docs/pop.md describes the configuration
and the error answers.

SIGHUP re-reads the settings: new sessions get them, open ones keep
theirs (a new engine takes the listener, the old one drains). SIGTERM
stops accepting, gives the open sessions `shutdown_grace` seconds, then
closes the rest and exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

from pwcache.client import AsyncClient
from pwmail.base import daemon
from pwmail.base.errors import exit_on_config_error

from . import config as popconfig
from . import engine as popengine
from . import proxy_core as core
from .backend import BackendLogin, response_code
from .protocol import NEED_DATA, NEED_REPLY, Closed, Login, RemoteProtocolError, ServerConnection, StartTLS

log = logging.getLogger("pop-proxy")

GREETING = "POP3 ready."
TOO_MANY = b"-ERR [SYS/TEMP] Too many connections, try again later.\r\n"
KICKED = b"-ERR [IN-USE] Mailbox is being moved, log in again in a few minutes.\r\n"
# Codes a backend may give after a good password; passed on to the client.
PASSED_CODES = {"IN-USE", "LOGIN-DELAY", "SYS/TEMP", "SYS/PERM"}


def backend_login(cfg: dict) -> BackendLogin:
    return BackendLogin(
        tls=cfg["backend_tls"],
        ssl_context=core.backend_ssl_context(cfg),
        connect_timeout=cfg["backend_connect_timeout"],
        retries=cfg["backend_retries"],
        retry_delay=cfg["backend_retry_delay"],
        timeout=cfg["backend_timeout"],
    )


class ProxyServer(core.ProxyCore):
    """The proxy core with POP3's backend login and the C engine on the plain listener."""

    name = "pop-proxy"
    # Settings a SIGHUP cannot change: they shape the listeners and the engine.
    restart_only = core.ProxyCore.restart_only + ("engine", "lookup_threads")

    def __init__(self, cfg: dict, pw: AsyncClient, tls_context=None):
        super().__init__(cfg, pw, tls_context)  # the throttle is shared with the engines
        self.engine: popengine.Engine | None = None
        self.listen_sock: socket.socket | None = None  # the engine's listener
        self.old_engines: list[popengine.Engine] = []  # draining after a reload

    def make_backend(self, cfg: dict) -> BackendLogin:
        return backend_login(cfg)

    def logged_in(self, answer: bytes) -> bool:
        return answer.startswith(b"+OK")

    def refused(self, answer: bytes) -> tuple:
        """A backend's -ERR to the login: its code passed on, or a failure."""
        code = response_code(answer)
        if code in PASSED_CODES:
            text = answer.split(b"]", 1)[-1].strip().decode("utf-8", "replace") or "Try again later."
            return ("err", code, text, False)
        return self.failed()

    # --- SIGHUP and SIGTERM: the engines ------------------------------------------------------
    def prepare_reload(self, new: dict):
        # A new engine takes the listener with the new settings; the old
        # one stops accepting and carries its sessions to their end.
        if self.engine is None:
            return None
        return start_engine(self, self.listen_sock, new, stls=self.tls_context is not None)

    def finish_reload(self, engine) -> None:
        if engine is not None:
            old, self.engine = self.engine, engine
            old.drain()
            self.old_engines.append(old)

    def take_listener(self, sock: socket.socket) -> bool:
        if not popengine.usable(self.cfg):
            return False
        self.listen_sock = sock
        self.engine = start_engine(self, sock, self.cfg, stls=self.tls_context is not None)
        return True

    def stop_accepting(self) -> None:
        for engine in self.engines():
            engine.drain()

    def finish(self) -> None:
        for engine in self.engines():
            self.retire(engine)
        self.engine = None

    def engine_finished(self) -> None:
        """A draining engine's last session ended: free it."""
        for old in [e for e in self.old_engines if e.open_sessions() == 0]:
            self.retire(old)

    def retire(self, engine: popengine.Engine) -> None:
        for name, n in engine.stats().items():
            self.stats[name] += n
        engine.stop()
        if engine in self.old_engines:
            self.old_engines.remove(engine)

    def engines(self) -> list[popengine.Engine]:
        return ([self.engine] if self.engine is not None else []) + self.old_engines

    def open_sessions(self) -> int:
        return self.connections + sum(e.open_sessions() for e in self.engines())

    # --- kicks on move: the engines' sessions ---------------------------------------------------
    def engine_sessions(self) -> dict[str, set[str]]:
        sessions: dict[str, set[str]] = {}
        for engine in self.engines():
            for user, host in engine.relay_users():
                sessions.setdefault(user, set()).add(host)
        return sessions

    def kick_engine_sessions(self, user: str, keep: str, why: str) -> None:
        # (the engine logs each session it closes)
        log.info("kick user=%s: mailbox %s; the engine closes the user's sessions", user, why)
        self.stats["kicked_engine"] += 1
        for engine in self.engines():
            if not engine.kick(user, keep, KICKED):
                log.warning("kick user=%s: the engine has too many kicks pending; at the next check", user)

    def protocol(self) -> ClientSide:
        return ClientSide(self)

    def tls_protocol(self) -> ClientSide:
        return ClientSide(self, implicit_tls=True)

    def outcome(self, h: popengine.Handoff):
        """The result of a login the engine tried (handed over with its outcome)."""
        if h.outcome == popengine.OUTCOME_ERROR:
            return self.backend_failed(h.mailhost, h.user, h.text)
        return self.refused(h.text.encode("utf-8", "replace"))

    # --- sessions the engine hands over --------------------------------------------------
    def engine_handoff(self, h: popengine.Handoff) -> None:
        if h.outcome != popengine.OUTCOME_NONE:
            h.result = self.outcome(h)
        if h.attempt:
            # The engine began this attempt in the throttle; its verdict is
            # given here, at once (not when the session is adopted, which
            # may never happen). A login without an outcome is redone.
            self.throttle.end(h.addr, h.user, core.verdict(h.result))
        asyncio.get_running_loop().create_task(self._take_over(h))

    async def _take_over(self, h: popengine.Handoff) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: ClientSide(self, handoff=h), h.sock)
        except OSError as e:  # out of descriptors, for one: the client gets a close
            log.warning("client %s:%s: cannot take over from the engine: %s", h.addr, h.port, e)
            self.stats["handoff_failed"] += 1
            h.sock.close()


class ClientSide(core.FrontSession):
    """One client connection: POP3 before login, relay after."""

    Login, StartTLS, Closed = Login, StartTLS, Closed
    too_many = TOO_MANY
    farewell = KICKED
    greeting = GREETING

    def __init__(self, server: ProxyServer, implicit_tls: bool = False, handoff: popengine.Handoff | None = None):
        super().__init__(server, implicit_tls)
        self.handoff = handoff  # a session the engine began

    def new_conn(self) -> ServerConnection:
        return ServerConnection(
            stls=self.server.tls_context is not None,
            tls_active=self.implicit_tls,
            plaintext_auth=self.server.cfg["plaintext_auth"],
        )

    def other_event(self, event) -> None:
        self.conn.reply_err("Not supported.")  # XClient is never offered to clients

    def connection_made(self, transport) -> None:
        # (the engine counted and admitted handed-over ones)
        if not self.start(transport, admitted=self.handoff is not None):
            return
        if self.handoff is not None:
            # After connection_made: the transport is set up once it returns
            # (STLS needs that, and uvloop starts reading then whatever
            # pause_reading() said; data_received keeps what comes meanwhile).
            asyncio.get_running_loop().call_soon(self._adopt, self.handoff)
        else:
            self._flush()

    def _adopt(self, h: popengine.Handoff) -> None:
        """Go on with a session the engine began: replay what it already
        answered (its answers came from this state machine's texts, so the
        replay's output is dropped), then take the rest as new input."""
        self.handoff = None
        if self.transport.is_closing():
            return
        conn, login = self.conn, None
        try:
            if h.answered:
                conn.receive_data(h.history[: h.answered])
                while (event := conn.next_event()) is not NEED_DATA and event is not NEED_REPLY:
                    login = event
            conn.data_to_send()
            rest = h.history[h.answered :] + h.more  # one feed: the input cap counts before each
            if rest:
                conn.receive_data(rest)
            if h.eof:
                conn.receive_data(b"")
        except RemoteProtocolError as e:  # cannot happen for bytes the engine answered
            self._protocol_error(e)
            return
        self.transport.pause_reading()  # (as the login and STLS below expect)
        if isinstance(login, Login):
            result = h.result
            self.task = asyncio.get_running_loop().create_task(self._login(login, result, h.started or None))
            return
        self._process()
        if not (self.closing or self.tls_pending or self.write_paused or self.task is not None):
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.handoff is not None:  # before _adopt
            self.handoff.more += data
            return
        super().data_received(data)

    def eof_received(self):
        if self.handoff is not None:
            self.handoff.eof = True
            return True
        return super().eof_received()


def settings(args) -> dict:
    """[pop] from the settings file, with the command line's flags over it."""
    return core.with_flags(popconfig.SECTION, popconfig.load(args.config), args)


def start_engine(server: ProxyServer, sock: socket.socket, cfg: dict, *, stls: bool) -> popengine.Engine:
    """The C engine on the plain listener; Python keeps everything it hands over."""
    backends = {}
    for name, target in cfg["backends"].items():
        try:
            host, port = popconfig.parse_hostport(target, cfg["backend_port"])
            socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
            backends[name] = (host, port)
        except (ValueError, OSError):
            backends[name] = None  # a name to resolve: logins to it go to Python
    texts = popengine.answers(GREETING, stls=stls, plaintext_auth=cfg["plaintext_auth"])
    engine = popengine.Engine(
        cfg, sock, texts, TOO_MANY, backends, throttle=server.throttle, on_handoff=server.engine_handoff
    )
    engine.start(on_exit=server.engine_finished)
    return engine


def main(argv: list[str] | None = None) -> int:
    p = core.arg_parser(
        "pop-proxy",
        "POP3 distributor: relays each user to their mailhost. SIGHUP re-reads "
        "the settings for new sessions; SIGTERM stops accepting and gives open sessions shutdown_grace "
        "seconds to end.",
        "pop",
        "STLS",
        "POP3S",
    )
    args = p.parse_args(argv)
    return exit_on_config_error("pop-proxy", lambda: start(args))


def start(args) -> int:
    cfg = settings(args)
    if args.pwserver_conf:  # the engine's lookups read it from the environment, as NSS does
        os.environ["PWSERVER_CONF"] = args.pwserver_conf
    core.setup_process("pop-proxy", args)
    daemon.run(core.serve(args, cfg, ProxyServer, lambda: settings(args), ports=(110, 995), tls_name="POP3S"))
    return 0
