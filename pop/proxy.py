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

import argparse
import asyncio
import logging
import os
import socket
import ssl
from collections import Counter

from pwcache.client import AsyncClient, PwError, Unavailable
from pwmail.base import cli, daemon
from pwmail.base.errors import ConfigError, exit_on_config_error
from pwmail.base.logsetup import setup_logging

from . import config as popconfig
from . import engine as popengine
from .backend import BackendError, BackendLogin, response_code
from .protocol import (NEED_DATA, NEED_REPLY, Closed, Login, RemoteProtocolError, ServerConnection,
                       StartTLS)
from .relay import HAVE_SPLICE, SpliceRelay, TransportRelay
from . import throttle as popthrottle

log = logging.getLogger("pop-proxy")

GREETING = "POP3 ready."
AUTH_FAILED = "Authentication failed."
TOO_MANY = b"-ERR [SYS/TEMP] Too many connections, try again later.\r\n"
TLS_HANDSHAKE_TIMEOUT = 30.0
# Codes a backend may give after a good password; passed on to the client.
PASSED_CODES = {"IN-USE", "LOGIN-DELAY", "SYS/TEMP", "SYS/PERM"}
MAX_MAILHOSTS = 4096        # parsed backend addresses kept


# Settings a SIGHUP cannot change: they shape the listeners and the engine.
RESTART_ONLY = ("listen", "tls_listen", "plaintext_auth", "backend_tls", "engine", "splice", "lookup_threads")


def backend_login(cfg: dict) -> BackendLogin:
    backend_ctx = None
    if cfg["backend_tls"] != "none":
        backend_ctx = ssl.create_default_context(cafile=cfg["backend_ca"] or None)
        if not cfg["backend_verify"]:
            backend_ctx.check_hostname = False
            backend_ctx.verify_mode = ssl.CERT_NONE
    return BackendLogin(tls=cfg["backend_tls"], ssl_context=backend_ctx,
                        connect_timeout=cfg["backend_connect_timeout"],
                        retries=cfg["backend_retries"], retry_delay=cfg["backend_retry_delay"],
                        timeout=cfg["backend_timeout"])


class ProxyServer:
    def __init__(self, cfg: dict, pw: AsyncClient, tls_context: ssl.SSLContext | None = None):
        self.cfg = cfg
        self.pw = pw
        self.tls_context = tls_context
        self.backend = backend_login(cfg)
        self.throttle = popthrottle.LoginThrottle(cfg)     # shared with the engines
        self.connections = 0
        self.per_ip: Counter[str] = Counter()
        self.stats: Counter[str] = Counter()
        self._addresses: dict[str, tuple[str, int] | None] = {}
        self.use_splice = bool(cfg["splice"]) and HAVE_SPLICE and cfg["backend_tls"] == "none"
        self.engine: popengine.Engine | None = None
        self.listen_sock: socket.socket | None = None     # the engine's listener
        self.old_engines: list[popengine.Engine] = []      # draining after a reload

    # --- SIGHUP and SIGTERM ----------------------------------------------------------------
    def reload(self, new: dict) -> None:
        """New settings for new sessions; open sessions keep theirs. What can
        fail comes first, so a failed reload changes nothing."""
        renew = self.tls_context is not None and new["tls_cert"]
        if renew:
            tls_context(new["tls_cert"], new["tls_key"])        # a bad certificate or key raises here
        elif bool(new["tls_cert"]) != (self.tls_context is not None):
            log.warning("reload: tls_cert turns STLS and POP3S on or off; that takes effect at restart")
        backend = backend_login(new)
        engine = None
        if self.engine is not None:
            # A new engine takes the listener with the new settings; the old
            # one stops accepting and carries its sessions to their end.
            engine = start_engine(self, self.listen_sock, new, stls=self.tls_context is not None)
        if renew:
            self.tls_context.load_cert_chain(new["tls_cert"], new["tls_key"] or None)
        self.cfg, self.backend = new, backend
        self._addresses.clear()
        self.throttle.configure(new)        # the new engine shares the same table: nothing to carry over
        if engine is not None:
            old, self.engine = self.engine, engine
            old.drain()
            self.old_engines.append(old)
        log.info("reloaded settings: %d backends mapped", len(new["backends"]))

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

    def protocol(self) -> "ClientSide":
        return ClientSide(self)

    def tls_protocol(self) -> "ClientSide":
        return ClientSide(self, implicit_tls=True)

    def backend_address(self, mailhost: str) -> tuple[str, int] | None:
        # Parsed once per mailhost: there are a few, and logins many.
        try:
            return self._addresses[mailhost]
        except KeyError:
            pass
        target = self.cfg["backends"].get(mailhost, mailhost)
        try:
            address = popconfig.parse_hostport(target, self.cfg["backend_port"])
        except ValueError:
            address = None
        if len(self._addresses) >= MAX_MAILHOSTS:
            self._addresses.clear()
        self._addresses[mailhost] = address
        return address

    # --- the login decision ------------------------------------------------------------
    async def login(self, session: "ClientSide", event: Login):
        """Returns ("ok", backend, answer) or ("err", code, text, delayed).
        The attempt is counted by the throttle from here to its verdict."""
        refused = self.throttle.begin(session.addr, event.user)
        if refused != popthrottle.ADMITTED:
            self.stats["throttled"] += 1
            log.info("throttled user=%s from=%s by=%s", event.user, session.addr, popthrottle.REFUSED_BY[refused])
            return ("err", "LOGIN-DELAY", "Too many failed logins, try again later.", True)
        result = None
        try:
            result = await self._decide(session, event)
            return result
        finally:             # (also when the client leaves and the task is cancelled)
            self.throttle.end(session.addr, event.user, verdict(result))

    async def _decide(self, session: "ClientSide", event: Login):
        try:
            entry = await self.pw.mailhost(event.user)
        except Unavailable as e:
            log.warning("password server unavailable: %s", e)
            self.stats["pwserver_unavailable"] += 1
            return ("err", "SYS/TEMP", "Authentication service unavailable, try again later.", False)
        except (PwError, ValueError):
            entry = None               # a name the server refuses: as unknown
        if entry is None:
            return self.failed()
        if entry.frozen:
            self.stats["frozen"] += 1
            return ("err", "IN-USE", "Mailbox is being moved, try again in a few minutes.", True)
        address = self.backend_address(entry.host)
        if address is None:
            log.error("user=%s has an unusable mailhost %r", event.user, entry.host)
            self.stats["backend_down"] += 1
            return ("err", "SYS/TEMP", "Mail server unavailable, try again later.", False)
        host, port = address
        try:
            backend, answer = await self.backend.login(host, port, event.user, event.password,
                                                       (session.addr, session.port))
        except BackendError as e:
            return self.backend_failed(entry.host, event.user, e)
        if answer.startswith(b"+OK"):
            session.backend_name = entry.host
            return ("ok", backend, answer)
        return self.refused(answer)

    def outcome(self, h: popengine.Handoff):
        """The result of a login the engine tried (handed over with its outcome)."""
        if h.outcome == popengine.OUTCOME_ERROR:
            return self.backend_failed(h.mailhost, h.user, h.text)
        return self.refused(h.text.encode("utf-8", "replace"))

    def backend_failed(self, mailhost: str, user: str, error) -> tuple:
        log.warning("backend %s for user=%s: %s", mailhost, user, error)
        self.stats["backend_down"] += 1
        return ("err", "SYS/TEMP", "Mail server unavailable, try again later.", False)

    def refused(self, answer: bytes) -> tuple:
        """A backend's -ERR to the login: its code passed on, or a failure."""
        code = response_code(answer)
        if code in PASSED_CODES:
            text = answer.split(b"]", 1)[-1].strip().decode("utf-8", "replace") or "Try again later."
            return ("err", code, text, False)
        return self.failed()

    def failed(self) -> tuple:
        self.stats["login_failed"] += 1
        return ("err", "AUTH", AUTH_FAILED, True)

    # --- sessions the engine hands over --------------------------------------------------
    def engine_handoff(self, h: popengine.Handoff) -> None:
        if h.outcome != popengine.OUTCOME_NONE:
            h.result = self.outcome(h)
        if h.attempt:
            # The engine began this attempt in the throttle; its verdict is
            # given here, at once (not when the session is adopted, which
            # may never happen). A login without an outcome is redone.
            self.throttle.end(h.addr, h.user, verdict(h.result))
        asyncio.get_running_loop().create_task(self._take_over(h))

    async def _take_over(self, h: popengine.Handoff) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: ClientSide(self, handoff=h), h.sock)
        except OSError as e:            # out of descriptors, for one: the client gets a close
            log.warning("client %s:%s: cannot take over from the engine: %s", h.addr, h.port, e)
            self.stats["handoff_failed"] += 1
            h.sock.close()


def verdict(result: tuple | None) -> int:
    """What a login's result tells the throttle: [AUTH] is the one failure
    (wrong password, unknown user); a code for anything else is none."""
    if result is None:
        return popthrottle.VERDICT_NONE
    if result[0] == "ok":
        return popthrottle.VERDICT_OK
    return popthrottle.VERDICT_FAILED if result[1] == "AUTH" else popthrottle.VERDICT_NONE


class ClientSide(asyncio.Protocol):
    """One client connection: POP3 before login, relay after."""

    def __init__(self, server: ProxyServer, implicit_tls: bool = False,
                 handoff: popengine.Handoff | None = None):
        self.server = server
        self.implicit_tls = implicit_tls   # POP3S: TLS from the first byte
        self.handoff = handoff             # a session the engine began
        self.transport = None
        self.conn: ServerConnection | None = None
        self.addr, self.port = "?", 0
        self.timer: asyncio.TimerHandle | None = None
        self.active_at = 0.0         # last complete command (prelogin_timeout counts from here)
        self.task: asyncio.Task | None = None
        self.relay = None
        self.backend_name = ""
        self.user = ""
        self.logged_in_at = 0.0
        self.counted = False
        self.detached = False
        self.closing = False
        self.tls_pending = False     # between "+OK" to STLS and start_tls() returning
        self.write_paused = False

    # --- asyncio callbacks -----------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername") or ("?", 0)
        self.addr, self.port = peer[0], peer[1]
        srv, cfg = self.server, self.server.cfg
        if self.handoff is None:        # (the engine counted and admitted handed-over ones)
            srv.stats["connections"] += 1
            if srv.connections >= cfg["max_connections"] or srv.per_ip[self.addr] >= cfg["max_connections_per_ip"]:
                srv.stats["refused_limit"] += 1
                transport.write(TOO_MANY)
                transport.close()
                return
        srv.connections += 1
        srv.per_ip[self.addr] += 1
        self.counted = True
        self.conn = ServerConnection(stls=self.server.tls_context is not None, tls_active=self.implicit_tls,
                                     plaintext_auth=cfg["plaintext_auth"])
        self.conn.send_greeting(GREETING)
        loop = asyncio.get_running_loop()
        self.active_at = loop.time()
        self.timer = loop.call_later(cfg["prelogin_timeout"], self._timed_out)
        if self.handoff is not None:
            # After connection_made: the transport is set up once it returns
            # (STLS needs that, and uvloop starts reading then whatever
            # pause_reading() said; data_received keeps what comes meanwhile).
            loop.call_soon(self._adopt, self.handoff)
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
                conn.receive_data(h.history[:h.answered])
                while (event := conn.next_event()) is not NEED_DATA and event is not NEED_REPLY:
                    login = event
            conn.data_to_send()
            rest = h.history[h.answered:] + h.more     # one feed: the input cap counts before each
            if rest:
                conn.receive_data(rest)
            if h.eof:
                conn.receive_data(b"")
        except RemoteProtocolError as e:      # cannot happen for bytes the engine answered
            self._protocol_error(e)
            return
        self.transport.pause_reading()     # (as the login and STLS below expect)
        if isinstance(login, Login):
            result = h.result
            self.task = asyncio.get_running_loop().create_task(
                self._login(login, result, h.started or None))
            return
        self._process()
        if not (self.closing or self.tls_pending or self.write_paused or self.task is not None):
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.handoff is not None:      # before _adopt
            self.handoff.more += data
            return
        if self.relay is not None:
            self.relay.from_client(data)
            return
        if self.conn is None or self.closing:
            return
        try:
            self.conn.receive_data(data)
        except RemoteProtocolError as e:
            self._protocol_error(e)
            return
        if not self.tls_pending:       # else _start_tls processes it on the new transport
            self._process()

    def eof_received(self):
        if self.handoff is not None:
            self.handoff.eof = True
            return True
        if self.relay is not None:
            return self.relay.client_eof()
        if self.conn is not None:
            self.conn.receive_data(b"")
            self._process()
        return False

    def connection_lost(self, exc) -> None:
        if self.detached:
            return          # the socket lives on in a SpliceRelay
        if self.task is not None and not self.task.done():
            self.task.cancel()
        if self.relay is not None:
            self.relay.close()
        self._cancel_timer()
        self._release()

    # The client does not read what we send: stop reading its commands too
    # (before login), or stop reading the backend (after).
    def pause_writing(self) -> None:
        self.write_paused = True
        if self.relay is not None:
            self.relay.pause_backend()
        elif not self.closing:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.relay is not None:
            self.relay.resume_backend()
        elif not self.closing and not self.tls_pending and (self.task is None or self.task.done()):
            self.transport.resume_reading()

    # --- pre-login ---------------------------------------------------------------------------
    def _release(self) -> None:
        if self.counted:
            self.counted = False
            srv = self.server
            srv.connections -= 1
            srv.per_ip[self.addr] -= 1
            if srv.per_ip[self.addr] <= 0:
                del srv.per_ip[self.addr]

    def _arm_timer(self) -> None:
        # One timer per connection, re-armed only when it fires early:
        # creating and cancelling one per command costs more than the check.
        self.active_at = asyncio.get_running_loop().time()

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _timed_out(self) -> None:
        self.timer = None
        if self.relay is None and self.conn is not None:
            loop = asyncio.get_running_loop()
            left = self.active_at + self.server.cfg["prelogin_timeout"] - loop.time()
            if left > 0:
                self.timer = loop.call_later(left, self._timed_out)
                return
            self.server.stats["prelogin_timeout"] += 1
            self.conn.abort("Disconnected for inactivity.")
            self._close()

    def _flush(self) -> bool:
        data = self.conn.data_to_send()
        if data:
            self.transport.write(data)
        return bool(data)

    def _close(self) -> None:
        self._flush()
        self.closing = True
        self.transport.close()

    def _protocol_error(self, e: RemoteProtocolError) -> None:
        log.info("client %s:%s: %s", self.addr, self.port, e)
        self.server.stats["protocol_error"] += 1
        self._close()

    def _process(self) -> None:
        conn = self.conn
        progressed = False
        while True:
            try:
                event = conn.next_event()
            except RemoteProtocolError as e:
                self._protocol_error(e)
                return
            if event is NEED_DATA or event is NEED_REPLY:
                break
            progressed = True
            if isinstance(event, Closed):
                self._close()
                return
            if isinstance(event, StartTLS):
                conn.accept_stls()
                self._flush()
                self.transport.pause_reading()
                self.tls_pending = True
                self.task = asyncio.get_running_loop().create_task(self._start_tls())
                break
            if isinstance(event, Login):
                self.transport.pause_reading()
                self.task = asyncio.get_running_loop().create_task(self._login(event))
                break
            conn.reply_err("Not supported.")  # XClient is never offered to clients
        if self._flush() or progressed:
            self._arm_timer()

    async def _start_tls(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self.transport = await loop.start_tls(self.transport, self, self.server.tls_context,
                                                  server_side=True, ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as e:
            log.info("client %s:%s: TLS handshake failed: %s", self.addr, self.port, e)
            self.transport.abort()
            return
        self.tls_pending = False
        self.write_paused = False
        self.server.stats["stls"] += 1
        self._arm_timer()
        self._process()

    async def _login(self, event: Login, result: tuple | None = None, started: float | None = None) -> None:
        """Decide a login (or take the engine's `result`) and answer it."""
        loop = asyncio.get_running_loop()
        started = started or loop.time()
        srv = self.server
        try:
            if result is None:
                result = await srv.login(self, event)
        except Exception:
            log.exception("login of user=%s failed", event.user)
            result = ("err", "SYS/TEMP", "Internal error, try again later.", False)
        if result[0] == "ok":
            srv.stats["login_ok"] += 1
            log.info("login user=%s from=%s:%s backend=%s", event.user, self.addr, self.port, self.backend_name)
            self.user, self.logged_in_at = event.user, loop.time()
            self._start_relay(result[1], result[2])
            return
        _, code, text, delayed = result
        log.info("login failed user=%s from=%s:%s code=%s", event.user, self.addr, self.port, code)
        if delayed:
            # Every refusal that could tell an unknown user from a wrong
            # password leaves at the same moment after PASS.
            await asyncio.sleep(max(0.0, started + srv.cfg["auth_failure_delay"] - loop.time()))
        if self.transport.is_closing():
            return
        self.conn.reject_login(text, code)
        self._flush()
        if not self.write_paused:
            self.transport.resume_reading()
        self._arm_timer()
        self._process()

    # --- after login -------------------------------------------------------------------------
    def _start_relay(self, backend, answer: bytes) -> None:
        self.conn.accept_login(send=False)
        self._cancel_timer()
        loop = asyncio.get_running_loop()
        cfg = self.server.cfg
        to_client = answer + bytes(backend.buf)
        backend.buf.clear()
        to_backend = self.conn.trailing_data()
        if self.transport.is_closing() or backend.transport.is_closing():
            backend.close()
            self.transport.close()
            return
        plain = self.transport.get_extra_info("sslcontext") is None and \
            backend.transport.get_extra_info("sslcontext") is None
        if self.server.use_splice and plain and self.transport.get_write_buffer_size() == 0:
            backend.transport.pause_reading()
            csock = _dup_socket(self.transport)
            bsock = _dup_socket(backend.transport)
            self.detached = True
            backend.relay = _Detached()
            self.transport.abort()
            backend.transport.abort()
            self.relay = SpliceRelay(loop, csock, bsock, to_client=to_client, to_backend=to_backend,
                                     pipe_size=cfg["relay_buffer"], idle_timeout=cfg["idle_timeout"],
                                     on_close=self._relay_closed)
            self.relay.start()
            return
        relay = TransportRelay(loop, self.transport, backend.transport, buffer=cfg["relay_buffer"],
                               idle_timeout=cfg["idle_timeout"], on_close=self._relay_closed)
        self.relay = relay
        backend.relay = relay
        relay.from_backend(to_client)
        if to_backend:
            relay.from_client(to_backend)
        self.transport.resume_reading()
        backend.transport.resume_reading()   # in case the login exchange paused it

    def _relay_closed(self, error) -> None:
        if error is not None:
            log.warning("relay %s:%s <-> %s: %s", self.addr, self.port, self.backend_name, error)
        log.info("logout user=%s from=%s:%s backend=%s seconds=%.1f in=%d out=%d", self.user, self.addr,
                 self.port, self.backend_name, asyncio.get_running_loop().time() - self.logged_in_at,
                 self.relay.bytes_up, self.relay.bytes_down)
        self._release()


def _dup_socket(transport) -> socket.socket:
    """A socket object of our own on the transport's connection (the
    transport can then be dropped without closing the connection)."""
    sock = transport.get_extra_info("socket")
    dup = socket.socket(sock.family, socket.SOCK_STREAM, 0, os.dup(sock.fileno()))
    dup.setblocking(False)
    return dup


class _Detached:
    """Stands in for the relay on a BackendSide whose socket moved to a
    SpliceRelay: its transport's last callbacks are ignored."""

    def from_backend(self, data):
        pass

    def backend_eof(self):
        pass

    def close(self):
        pass

    def pause_client(self):
        pass

    def resume_client(self):
        pass


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cert, key or None)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load tls_cert {cert} / tls_key {key or cert}: {e}") from None
    return ctx


def settings(args) -> dict:
    """[pop] from the settings file, with the command line's flags over it."""
    cfg = popconfig.SECTION.override(popconfig.load(args.config), {
        key: getattr(args, key) for key in ("listen", "tls_listen", "tls_cert", "tls_key", "backend_port")})
    if cfg["tls_listen"] and not cfg["tls_cert"]:
        raise ConfigError("tls_listen needs tls_cert and tls_key (in [pop], or --tls-cert and --tls-key)")
    return cfg


async def serve(args, cfg) -> None:
    pw = AsyncClient.from_config(args.pwserver_conf)
    cert = cfg["tls_cert"]
    ctx = tls_context(cert, cfg["tls_key"]) if cert else None
    server = ProxyServer(cfg, pw, ctx)
    sock = daemon.listening_socket(cfg["listen"], 110)
    loop = asyncio.get_running_loop()
    servers = []
    if popengine.usable(cfg):
        server.listen_sock = sock
        server.engine = start_engine(server, sock, cfg, stls=ctx is not None)
    else:
        servers.append(await loop.create_server(server.protocol, sock=sock, backlog=daemon.LISTEN_BACKLOG))
    tls_listen = cfg["tls_listen"]
    if tls_listen:
        tls_sock = daemon.listening_socket(tls_listen, 995)
        servers.append(await loop.create_server(server.tls_protocol, sock=tls_sock, ssl=ctx,
                                                backlog=daemon.LISTEN_BACKLOG,
                                                ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT))

    def reload() -> None:
        new = daemon.reread_settings(lambda: settings(args), server.cfg, RESTART_ONLY)
        setup_logging("pop-proxy", stderr=args.log_stderr, daemon=True)
        server.reload(new)
    stop = daemon.handle_signals(on_reload=reload)
    if tls_listen:
        daemon.announce("pop-proxy (POP3S)", tls_sock)
    daemon.announce("pop-proxy", sock)
    log.info("serving on %s (STLS %s, POP3S %s, splice %s, engine %s)", sock.getsockname(),
             "on" if ctx else "off", tls_listen or "off", "on" if server.use_splice else "off",
             "on" if server.engine else "off")
    cut = 0
    try:
        await daemon.wait_for_signal(stop)
        # SIGTERM: no new connections; the open sessions get shutdown_grace to end.
        for s in servers:
            s.close()
        for engine in server.engines():
            engine.drain()
        try:
            # Stops listening now, for the engines' copies too (Linux): the
            # connections still in the backlog are refused, not left waiting.
            sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass
        sock.close()
        cut = await daemon.drain(server.open_sessions, server.cfg["shutdown_grace"], "sessions")
    finally:
        for engine in server.engines():
            server.retire(engine)
        server.engine = None
        if server.throttle.evicted():
            server.stats["throttle_evicted"] = server.throttle.evicted()
        log.info("stopping: %d sessions cut; %s", cut, dict(server.stats))
        await pw.close()


def start_engine(server: ProxyServer, sock: socket.socket, cfg: dict, *, stls: bool) -> popengine.Engine:
    """The C engine on the plain listener; Python keeps everything it hands over."""
    backends = {}
    for name, target in cfg["backends"].items():
        try:
            host, port = popconfig.parse_hostport(target, cfg["backend_port"])
            socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
            backends[name] = (host, port)
        except (ValueError, OSError):
            backends[name] = None          # a name to resolve: logins to it go to Python
    texts = popengine.answers(GREETING, stls=stls, plaintext_auth=cfg["plaintext_auth"])
    engine = popengine.Engine(cfg, sock, texts, TOO_MANY, backends, throttle=server.throttle,
                              on_handoff=server.engine_handoff)
    engine.start(on_exit=server.engine_finished)
    return engine


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="pop-proxy", description="POP3 distributor: relays each user to their mailhost. SIGHUP re-reads "
        "the settings for new sessions; SIGTERM stops accepting and gives open sessions shutdown_grace "
        "seconds to end.")
    p.add_argument("--listen", help="HOST:PORT (default [pop] listen)")
    p.add_argument("--backend-port", type=int, help="port of backends given without one (default [pop] backend_port)")
    p.add_argument("--tls-cert", help="PEM certificate chain for STLS (default [pop] tls_cert)")
    p.add_argument("--tls-key", help="PEM private key for STLS (default [pop] tls_key)")
    p.add_argument("--tls-listen", help="HOST:PORT for POP3S, TLS from the start (default [pop] tls_listen, off)")
    cli.add_common_flags(p)
    args = p.parse_args(argv)
    return exit_on_config_error("pop-proxy", lambda: start(args))


def start(args) -> int:
    cfg = settings(args)
    if args.pwserver_conf:      # the engine's lookups read it from the environment, as NSS does
        os.environ["PWSERVER_CONF"] = args.pwserver_conf
    setup_logging("pop-proxy", stderr=args.log_stderr, daemon=True)
    # Two records per session: skip what the format never shows (the
    # caller's file and line cost a frame walk per record; thread names).
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    daemon.raise_nofile()
    daemon.run(serve(args, cfg))
    return 0
