"""The protocol-independent core of the distributors (the paper's III.H):
`pop-proxy` (pop/proxy.py) and `imap-proxy` (pop/imap_proxy.py) are two
front ends of what is here.

ProxyCore: the policy of a login, whatever the protocol: connection limits,
the shared failure throttle (pop/throttle.py), the mailhost lookup in the
password server, the backend's address, the backend login (a front end's
`make_backend`), and the verdict. Results are ("ok", backend, answer) or
("err", code, text, delayed), the code in the core's vocabulary below,
which each front end turns into its protocol's response codes.

FrontSession: one client connection, given a sans-I/O state machine of the
front end's protocol (pop/protocol.py, pop/imap_protocol.py) with the same
shape: receive_data / next_event / data_to_send, Login and StartTLS
events, accept_login / reject_login / accept_stls / abort. It does the
pre-login timeout, STARTTLS, the failure delay, and after the login the
byte relay (pop/relay.py).

Kicks on move: the core keeps the logged-in sessions by user and, every
`kick_check_interval` seconds, asks the password server for the mailhost
of each user with a session open (one lookup per user, not per session).
A user now frozen (`pwmail move` copying the mailbox) or on another
mailhost (moved) has their sessions closed, each with its protocol's
farewell (docs/moving.md); pop-proxy's engine reports and closes the
sessions it relays itself (engine_sessions, kick_engine_sessions).

serve(): listeners (plain and implicit TLS), SIGHUP reload, SIGTERM drain.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import ssl
from collections import Counter
from collections.abc import Callable

from pwcache.client import AsyncClient, PwError, Unavailable
from pwmail.base import cli, daemon, hostmap, metrics
from pwmail.base.errors import ConfigError
from pwmail.base.hostport import parse_hostport
from pwmail.base.logsetup import setup_logging
from pwmail.base.settings import Section

from . import metrics as popmetrics
from . import throttle as popthrottle
from .backend import BackendError
from .protocol import RemoteProtocolError
from .relay import HAVE_SPLICE, SpliceRelay, TransportRelay

log = logging.getLogger("proxy")

TLS_HANDSHAKE_TIMEOUT = 30.0
MAX_MAILHOSTS = 4096  # parsed backend addresses kept
KICK_LOOKUPS_AT_ONCE = 64  # mailhost lookups in flight per kick check
KICK_OFF_RECHECK = 1.0  # seconds between looks at kick_check_interval while it is 0 (off)

# The core's result codes (POP's RFC 2449/3206 names; imap-proxy maps them to RFC 5530's).
FAILED = "AUTH"  # wrong password or unknown user: the one failure the throttle counts
TEMPORARY = "SYS/TEMP"  # password server or backend down
IN_USE = "IN-USE"  # the mailbox is being moved
THROTTLED = "LOGIN-DELAY"  # too many failures

AUTH_FAILED_TEXT = "Authentication failed."


def backend_ssl_context(cfg: dict) -> ssl.SSLContext | None:
    if cfg["backend_tls"] == "none":
        return None
    ctx = ssl.create_default_context(cafile=cfg["backend_ca"] or None)
    if not cfg["backend_verify"]:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cert, key or None)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load tls_cert {cert} / tls_key {key or cert}: {e}") from None
    return ctx


def verdict(result: tuple | None) -> int:
    """What a login's result tells the throttle: FAILED (wrong password,
    unknown user) is the one failure; a code for anything else is none."""
    if result is None:
        return popthrottle.VERDICT_NONE
    if result[0] == "ok":
        return popthrottle.VERDICT_OK
    return popthrottle.VERDICT_FAILED if result[1] == FAILED else popthrottle.VERDICT_NONE


class ProxyCore:
    """What every session of one proxy shares. A front end subclasses it
    with make_backend(), logged_in() and refused()."""

    name = "proxy"
    restart_only = ("listen", "tls_listen", "plaintext_auth", "backend_tls", "splice")

    def __init__(self, cfg: dict, pw: AsyncClient, tls_context: ssl.SSLContext | None = None):
        self.cfg = cfg
        self.pw = pw
        self.tls_context = tls_context
        self.backend = self.make_backend(cfg)
        self.throttle = popthrottle.LoginThrottle(cfg)
        self.connections = 0
        self.per_ip: Counter[str] = Counter()
        self.stats: Counter[str] = Counter()
        self._addresses: dict[str, tuple[str, int] | None] = {}
        self.by_user: dict[str, set[FrontSession]] = {}  # logged-in sessions (for kicks)
        self._watch: asyncio.Task | None = None
        self.use_splice = bool(cfg["splice"]) and HAVE_SPLICE and cfg["backend_tls"] == "none"

    # --- what a front end says -------------------------------------------------------------
    def make_backend(self, cfg: dict):
        """The backend login of this protocol (from the settings)."""
        raise NotImplementedError

    def logged_in(self, answer: bytes) -> bool:
        """Whether the backend's answer to the login is a success."""
        raise NotImplementedError

    def refused(self, answer: bytes) -> tuple:
        """A backend's refusal of the login: its code passed on, or a failure."""
        raise NotImplementedError

    # --- SIGHUP ---------------------------------------------------------------------------
    def reload(self, new: dict) -> None:
        """New settings for new sessions; open sessions keep theirs. What can
        fail comes first, so a failed reload changes nothing."""
        renew = self.tls_context is not None and new["tls_cert"]
        if renew:
            tls_context(new["tls_cert"], new["tls_key"])  # a bad certificate or key raises here
        elif bool(new["tls_cert"]) != (self.tls_context is not None):
            log.warning("reload: tls_cert turns STARTTLS and implicit TLS on or off; that takes effect at restart")
        backend = self.make_backend(new)
        prepared = self.prepare_reload(new)
        if renew:
            self.tls_context.load_cert_chain(new["tls_cert"], new["tls_key"] or None)
        self.cfg, self.backend = new, backend
        self._addresses.clear()
        self.throttle.configure(new)
        self.finish_reload(prepared)
        log.info("reloaded settings: %d backends mapped", len(new["backends"]))

    def prepare_reload(self, new: dict):
        """A front end's part of a reload that can fail (before anything changed)."""
        return None

    def finish_reload(self, prepared) -> None:
        pass

    # --- connections ----------------------------------------------------------------------
    def admit(self, addr: str) -> bool:
        if self.connections >= self.cfg["max_connections"] or self.per_ip[addr] >= self.cfg["max_connections_per_ip"]:
            self.stats["refused_limit"] += 1
            return False
        return True

    def count(self, addr: str) -> None:
        self.connections += 1
        self.per_ip[addr] += 1

    def release(self, addr: str) -> None:
        self.connections -= 1
        self.per_ip[addr] -= 1
        if self.per_ip[addr] <= 0:
            del self.per_ip[addr]

    def open_sessions(self) -> int:
        return self.connections

    def backend_address(self, mailhost: str) -> tuple[str, int] | None:
        # Parsed once per mailhost: there are a few, and logins many.
        try:
            return self._addresses[mailhost]
        except KeyError:
            pass
        target = self.cfg["backends"].get(mailhost, mailhost)
        try:
            address = parse_hostport(target, self.cfg["backend_port"])
        except ValueError:
            address = None
        if len(self._addresses) >= MAX_MAILHOSTS:
            self._addresses.clear()
        self._addresses[mailhost] = address
        return address

    # --- kicks on move ---------------------------------------------------------------------
    def track(self, session: FrontSession) -> None:
        self.by_user.setdefault(session.user, set()).add(session)

    def untrack(self, session: FrontSession) -> None:
        sessions = self.by_user.get(session.user)
        if sessions is not None:
            sessions.discard(session)
            if not sessions:
                del self.by_user[session.user]

    def start_watch(self) -> None:
        self._watch = asyncio.get_running_loop().create_task(self._watch_moves())

    def stop_watch(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None

    async def _watch_moves(self) -> None:
        while True:
            interval = self.cfg["kick_check_interval"]  # (re-read each round: SIGHUP may change it)
            await asyncio.sleep(interval if interval > 0 else KICK_OFF_RECHECK)
            if interval > 0:
                try:
                    await self.kick_moved()
                except Exception:
                    log.exception("kick check failed")

    async def kick_moved(self) -> int:
        """Close the sessions of users frozen or moved to another mailhost
        since their login; the number of users kicked. Users the password
        server cannot answer for keep their sessions (until the next check)."""
        engine = self.engine_sessions()
        users, kicked, unavailable = list(set(self.by_user) | set(engine)), 0, 0
        for i in range(0, len(users), KICK_LOOKUPS_AT_ONCE):
            batch = users[i : i + KICK_LOOKUPS_AT_ONCE]
            answers = await asyncio.gather(*(self.pw.mailhost(u) for u in batch), return_exceptions=True)
            for user, entry in zip(batch, answers, strict=True):
                if isinstance(entry, Unavailable):
                    unavailable += 1
                elif entry is not None and not isinstance(entry, BaseException):  # (None: deleted, not moved)
                    kicked += self.kick_user(user, "" if entry.frozen else entry.host, engine.get(user, ()))
        if unavailable:
            log.warning("kick check: password server unavailable for %d users", unavailable)
        return kicked

    def kick_user(self, user: str, keep: str, engine_hosts=()) -> bool:
        """Close `user`'s sessions on a mailhost other than `keep` ("": all,
        the user is frozen); engine_hosts: the mailhosts of the user's
        sessions in an engine."""
        why = f"moved to {keep}" if keep else "frozen"
        doomed = [s for s in self.by_user.get(user, ()) if not keep or (s.backend_name and s.backend_name != keep)]
        for session in doomed:
            log.info(
                "kick user=%s from=%s:%s backend=%s: mailbox %s",
                user,
                session.addr,
                session.port,
                session.backend_name,
                why,
            )
            session.kick()
        self.stats["kicked"] += len(doomed)
        in_engine = any(not keep or host != keep for host in engine_hosts)
        if in_engine:
            self.kick_engine_sessions(user, keep, why)
        return bool(doomed) or in_engine

    def engine_sessions(self) -> dict[str, set[str]]:
        """{user: mailhosts} of the sessions a front end relays outside Python (pop-proxy's engine)."""
        return {}

    def kick_engine_sessions(self, user: str, keep: str, why: str) -> None:
        pass

    # --- the login decision ---------------------------------------------------------------
    async def login(self, session: FrontSession, event) -> tuple:
        """Returns ("ok", backend, answer) or ("err", code, text, delayed).
        The attempt is counted by the throttle from here to its verdict."""
        refused = self.throttle.begin(session.addr, event.user)
        if refused != popthrottle.ADMITTED:
            self.stats["throttled"] += 1
            log.info("throttled user=%s from=%s by=%s", event.user, session.addr, popthrottle.REFUSED_BY[refused])
            return ("err", THROTTLED, "Too many failed logins, try again later.", True)
        result = None
        try:
            result = await self._decide(session, event)
            return result
        finally:  # (also when the client leaves and the task is cancelled)
            self.throttle.end(session.addr, event.user, verdict(result))

    async def _decide(self, session: FrontSession, event) -> tuple:
        try:
            entry = await self.pw.mailhost(event.user)
        except Unavailable as e:
            log.warning("password server unavailable: %s", e)
            self.stats["pwserver_unavailable"] += 1
            return ("err", TEMPORARY, "Authentication service unavailable, try again later.", False)
        except (PwError, ValueError):
            entry = None  # a name the server refuses: as unknown
        if entry is None:
            return self.failed()
        if entry.frozen:
            self.stats["frozen"] += 1
            return ("err", IN_USE, "Mailbox is being moved, try again in a few minutes.", True)
        address = self.backend_address(entry.host)
        if address is None:
            log.error("user=%s has an unusable mailhost %r", event.user, entry.host)
            self.stats["backend_down"] += 1
            return ("err", TEMPORARY, "Mail server unavailable, try again later.", False)
        host, port = address
        try:
            backend, answer = await self.backend.login(
                host, port, event.user, event.password, (session.addr, session.port)
            )
        except BackendError as e:
            return self.backend_failed(entry.host, event.user, e)
        if self.logged_in(answer):
            session.backend_name = entry.host
            return ("ok", backend, answer)
        return self.refused(answer)

    def backend_failed(self, mailhost: str, user: str, error) -> tuple:
        log.warning("backend %s for user=%s: %s", mailhost, user, error)
        self.stats["backend_down"] += 1
        return ("err", TEMPORARY, "Mail server unavailable, try again later.", False)

    def failed(self) -> tuple:
        self.stats["login_failed"] += 1
        return ("err", FAILED, AUTH_FAILED_TEXT, True)

    # --- serving --------------------------------------------------------------------------
    def protocol(self) -> FrontSession:
        raise NotImplementedError

    def tls_protocol(self) -> FrontSession:
        raise NotImplementedError

    def take_listener(self, sock: socket.socket) -> bool:
        """A front end may serve the plain listener itself (pop-proxy's C engine)."""
        return False

    def stop_accepting(self) -> None:
        pass

    def finish(self) -> None:
        pass


class FrontSession(asyncio.Protocol):
    """One client connection: the front end's protocol before login, relay after.
    A front end sets the event types of its state machine and new_conn()."""

    Login: type = object
    StartTLS: type = object
    Closed: type = object
    too_many = b""  # the answer to a connection over the limits
    farewell = b""  # the last line of a session kicked for a move
    greeting = ""

    def __init__(self, server: ProxyCore, implicit_tls: bool = False):
        self.server = server
        self.implicit_tls = implicit_tls  # TLS from the first byte
        self.transport = None
        self.conn = None
        self.addr, self.port = "?", 0
        self.timer: asyncio.TimerHandle | None = None
        self.active_at = 0.0  # last complete command (prelogin_timeout counts from here)
        self.task: asyncio.Task | None = None
        self.relay = None
        self.backend_name = ""
        self.user = ""
        self.logged_in_at = 0.0
        self.counted = False
        self.detached = False
        self.closing = False
        self.tls_pending = False  # between the answer to STARTTLS and start_tls() returning
        self.write_paused = False

    # --- what a front end says -------------------------------------------------------------
    def new_conn(self):
        raise NotImplementedError

    def other_event(self, event) -> None:
        """An event the core does not handle."""
        raise NotImplementedError

    def reject(self, code: str, text: str) -> None:
        """Answer a refused login (code in the core's vocabulary)."""
        self.conn.reject_login(text, code)

    def login_answer(self, event, answer: bytes) -> bytes:
        """What the client gets for a successful login, from the backend's answer."""
        return answer

    # --- asyncio callbacks -----------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.start(transport, admitted=False)

    def start(self, transport, *, admitted: bool) -> bool:
        """Set the session up; False when it was refused. admitted: already
        counted against the limits elsewhere."""
        self.transport = transport
        peer = transport.get_extra_info("peername") or ("?", 0)
        self.addr, self.port = peer[0], peer[1]
        srv, cfg = self.server, self.server.cfg
        if not admitted:
            srv.stats["connections"] += 1
            if not srv.admit(self.addr):
                transport.write(self.too_many)
                transport.close()
                return False
        srv.count(self.addr)
        self.counted = True
        self.conn = self.new_conn()
        self.conn.send_greeting(self.greeting)
        loop = asyncio.get_running_loop()
        self.active_at = loop.time()
        self.timer = loop.call_later(cfg["prelogin_timeout"], self._timed_out)
        return True

    def data_received(self, data: bytes) -> None:
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
        if not self.tls_pending:  # else _start_tls processes it on the new transport
            self._process()

    def eof_received(self):
        if self.relay is not None:
            return self.relay.client_eof()
        if self.conn is not None:
            self.conn.receive_data(b"")
            self._process()
        return False

    def connection_lost(self, exc) -> None:
        if self.detached:
            return  # the socket lives on in a SpliceRelay
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
            if self.conn is not None:
                self._process()  # the commands left when writing paused
            busy = self.task is not None and not self.task.done()
            if not (self.closing or self.tls_pending or self.write_paused or busy):
                self.transport.resume_reading()

    # --- pre-login ---------------------------------------------------------------------------
    def _release(self) -> None:
        if self.counted:
            self.counted = False
            self.server.release(self.addr)

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
            if event == "NEED_DATA" or event == "NEED_REPLY":
                break
            progressed = True
            if isinstance(event, self.Closed):
                self._close()
                return
            if isinstance(event, self.StartTLS):
                conn.accept_stls()
                self._flush()
                self.transport.pause_reading()
                self.tls_pending = True
                self.task = asyncio.get_running_loop().create_task(self._start_tls())
                break
            if isinstance(event, self.Login):
                self.transport.pause_reading()
                self.task = asyncio.get_running_loop().create_task(self._login(event))
                break
            self.other_event(event)
            # Answer by answer: a client that sends and does not read is
            # stopped at the transport's high-water mark, the rest of its
            # commands wait in the machine (one read at most; resume_writing).
            self._flush()
            if self.write_paused:
                break
        if self._flush() or progressed:
            self._arm_timer()

    async def _start_tls(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self.transport = await loop.start_tls(
                self.transport,
                self,
                self.server.tls_context,
                server_side=True,
                ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT,
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as e:
            log.info("client %s:%s: TLS handshake failed: %s", self.addr, self.port, e)
            self.transport.abort()
            return
        self.tls_pending = False
        self.write_paused = False
        self.server.stats["stls"] += 1
        self._arm_timer()
        self._process()

    async def _login(self, event, result: tuple | None = None, started: float | None = None) -> None:
        """Decide a login (or take a `result` decided elsewhere) and answer it."""
        loop = asyncio.get_running_loop()
        started = started or loop.time()
        srv = self.server
        try:
            if result is None:
                result = await srv.login(self, event)
        except Exception:
            log.exception("login of user=%s failed", event.user)
            result = ("err", TEMPORARY, "Internal error, try again later.", False)
        if result[0] == "ok":
            srv.stats["login_ok"] += 1
            log.info("login user=%s from=%s:%s backend=%s", event.user, self.addr, self.port, self.backend_name)
            self.user, self.logged_in_at = event.user, loop.time()
            self._start_relay(result[1], self.login_answer(event, result[2]))
            return
        _, code, text, delayed = result
        log.info("login failed user=%s from=%s:%s code=%s", event.user, self.addr, self.port, code)
        if delayed:
            # Every refusal that could tell an unknown user from a wrong
            # password leaves at the same moment after the credentials.
            await asyncio.sleep(max(0.0, started + srv.cfg["auth_failure_delay"] - loop.time()))
        if self.transport.is_closing():
            return
        self.reject(code, text)
        self._flush()
        if not self.write_paused:
            self.transport.resume_reading()
        self._arm_timer()
        self._process()

    # --- after login -------------------------------------------------------------------------
    def kick(self) -> None:
        """The user's mailbox is being moved: end the session (the core's kick check)."""
        if self.relay is not None:
            self.relay.kick(self.farewell)

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
        plain = (
            self.transport.get_extra_info("sslcontext") is None
            and backend.transport.get_extra_info("sslcontext") is None
        )
        if self.server.use_splice and plain and self.transport.get_write_buffer_size() == 0:
            backend.transport.pause_reading()
            csock = _dup_socket(self.transport)
            bsock = _dup_socket(backend.transport)
            self.detached = True
            backend.relay = _Detached()
            self.transport.abort()
            backend.transport.abort()
            self.relay = SpliceRelay(
                loop,
                csock,
                bsock,
                to_client=to_client,
                to_backend=to_backend,
                pipe_size=cfg["relay_buffer"],
                idle_timeout=cfg["idle_timeout"],
                on_close=self._relay_closed,
            )
            self.server.track(self)
            self.relay.start()
            return
        relay = TransportRelay(
            loop,
            self.transport,
            backend.transport,
            buffer=cfg["relay_buffer"],
            idle_timeout=cfg["idle_timeout"],
            on_close=self._relay_closed,
        )
        self.relay = relay
        backend.relay = relay
        self.server.track(self)
        relay.from_backend(to_client)
        if to_backend:
            relay.from_client(to_backend)
        self.transport.resume_reading()
        backend.transport.resume_reading()  # in case the login exchange paused it

    def _relay_closed(self, error) -> None:
        if error is not None:
            log.warning("relay %s:%s <-> %s: %s", self.addr, self.port, self.backend_name, error)
        log.info(
            "logout user=%s from=%s:%s backend=%s seconds=%.1f in=%d out=%d",
            self.user,
            self.addr,
            self.port,
            self.backend_name,
            asyncio.get_running_loop().time() - self.logged_in_at,
            self.relay.bytes_up,
            self.relay.bytes_down,
        )
        self.server.stats["bytes_up"] += self.relay.bytes_up  # (metrics: proxy_relayed_bytes_total)
        self.server.stats["bytes_down"] += self.relay.bytes_down
        self.server.untrack(self)
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


# --- the daemon ------------------------------------------------------------------------------
def arg_parser(prog: str, description: str, section: str, protocol: str, tls_name: str) -> argparse.ArgumentParser:
    """The flags both proxies take, over their settings section."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--listen", help=f"HOST:PORT (default [{section}] listen)")
    p.add_argument(
        "--backend-port", type=int, help=f"port of backends given without one (default [{section}] backend_port)"
    )
    p.add_argument("--tls-cert", help=f"PEM certificate chain for {protocol} (default [{section}] tls_cert)")
    p.add_argument("--tls-key", help=f"PEM private key for {protocol} (default [{section}] tls_key)")
    p.add_argument(
        "--tls-listen", help=f"HOST:PORT for {tls_name}, TLS from the start (default [{section}] tls_listen, off)"
    )
    cli.add_common_flags(p)
    return p


def with_flags(section: Section, cfg: dict, args) -> dict:
    """The settings section with the command line's flags over it (checked as the file's values are),
    and the [hosts] map under its `backends` (this protocol's port of each; `backends` wins)."""
    cfg = section.override(
        cfg, {key: getattr(args, key) for key in ("listen", "tls_listen", "tls_cert", "tls_key", "backend_port")}
    )
    hosts = hostmap.load(args.config).targets(section.name, cfg["backend_port"])
    cfg["backends"] = {**hosts, **cfg["backends"]}
    if cfg["tls_listen"] and not cfg["tls_cert"]:
        raise ConfigError(f"tls_listen needs tls_cert and tls_key (in [{section.name}], or --tls-cert and --tls-key)")
    return cfg


def setup_process(name: str, args) -> None:
    setup_logging(name, stderr=args.log_stderr, daemon=True)
    # Two records per session: skip what the format never shows (the
    # caller's file and line cost a frame walk per record; thread names).
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    daemon.raise_nofile()


async def serve(
    args,
    cfg: dict,
    make_server: Callable[[dict, AsyncClient, ssl.SSLContext | None], ProxyCore],
    settings: Callable[[], dict],
    *,
    ports: tuple[int, int],
    tls_name: str,
) -> None:
    """Run a proxy until SIGTERM: the plain listener (STARTTLS when a
    certificate is set), the implicit-TLS one when tls_listen is set."""
    pw = AsyncClient.from_config(args.pwserver_conf)
    cert = cfg["tls_cert"]
    ctx = tls_context(cert, cfg["tls_key"]) if cert else None
    server = make_server(cfg, pw, ctx)
    name = server.name
    sock = daemon.listening_socket(cfg["listen"], ports[0])
    loop = asyncio.get_running_loop()
    servers = []
    if not server.take_listener(sock):
        servers.append(await loop.create_server(server.protocol, sock=sock, backlog=daemon.LISTEN_BACKLOG))
    tls_listen = cfg["tls_listen"]
    if tls_listen:
        tls_sock = daemon.listening_socket(tls_listen, ports[1])
        servers.append(
            await loop.create_server(
                server.tls_protocol,
                sock=tls_sock,
                ssl=ctx,
                backlog=daemon.LISTEN_BACKLOG,
                ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT,
            )
        )

    exporter = metrics.optional(cfg["metrics_listen"], popmetrics.proxy_collector(server), name=name, loop=loop)

    def reload() -> None:
        new = daemon.reread_settings(settings, server.cfg, server.restart_only)
        setup_logging(name, stderr=args.log_stderr, daemon=True)
        server.reload(new)

    stop = daemon.handle_signals(on_reload=reload, clients=[pw])
    server.start_watch()
    if tls_listen:
        daemon.announce(f"{name} ({tls_name})", tls_sock)
    daemon.announce(name, sock)
    log.info(
        "serving on %s (STARTTLS %s, %s %s, splice %s)",
        sock.getsockname(),
        "on" if ctx else "off",
        tls_name,
        tls_listen or "off",
        "on" if server.use_splice else "off",
    )
    cut = 0
    try:
        await daemon.wait_for_signal(stop)
        # SIGTERM: no new connections; the open sessions get shutdown_grace to end.
        for s in servers:
            s.close()
        server.stop_accepting()
        try:
            # Stops listening now, for the engines' copies too (Linux): the
            # connections still in the backlog are refused, not left waiting.
            sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass
        sock.close()
        cut = await daemon.drain(server.open_sessions, server.cfg["shutdown_grace"], "sessions")
    finally:
        server.stop_watch()
        server.finish()
        if server.throttle.evicted():
            server.stats["throttle_evicted"] = server.throttle.evicted()
        log.info("stopping: %d sessions cut; %s", cut, dict(server.stats))
        if exporter is not None:
            exporter.close()
        await pw.close()
