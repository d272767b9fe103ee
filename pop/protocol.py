"""POP3 server side, sans-I/O: bytes in, events out, bytes to send.

Shared by `pop-proxy` (which uses only the AUTHORIZATION state and then
relays bytes) and `pop3d` (which uses the whole session). Nothing here
reads a socket, a clock or a file: the daemons feed `receive_data()`, take
events from `next_event()`, answer with the `reply_*` methods and write what
`data_to_send()` returns. The protocol is RFC 1939 with CAPA and response
codes (RFC 2449, RFC 3206), STLS (RFC 2595), AUTH PLAIN (RFC 5034) and
Dovecot's XCLIENT; docs/pop.md says which parts each daemon offers.

The connection answers by itself what needs no policy: CAPA, USER, syntax
errors, unknown commands, QUIT before login, AUTH continuations. Everything
that needs a decision is an event:

    Login(user, password, mechanism)   -> accept_login() / reject_login()
    StartTLS()                         -> accept_stls() / reply_err()
    XClient(attributes)                -> reply_ok() / reply_err()
    Command(verb, args)                -> reply_ok(), reply_err(), reply_lines(),
                                          or start_body() send_body()* end_body()

Until the application has answered an event, `next_event()` returns
NEED_REPLY (commands are answered in order even when a client pipelines).

Two error types, as in h11: RemoteProtocolError is the peer's fault and ends
the session (its final `-ERR` is already queued in `data_to_send()`);
LocalProtocolError is a bug in the caller (answering twice, for instance).
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

# --- Limits (DESIGN decision 10: every size or count a peer controls) ----------
MAX_LINE = 1024  # bytes of one input line with its CRLF; RFC 2449 says
# 255 for commands, but an AUTH PLAIN initial response
# with a 255-byte name and password needs ~700
MAX_ARG = 255  # bytes of one argument (RFC 2449)
MAX_VERB = 16  # letters of a command keyword (XCLIENT is 7)
MAX_NUMBER_DIGITS = 9  # message numbers and TOP line counts
MAX_BAD_COMMANDS = 10  # unknown or malformed commands before we hang up
MAX_AUTH_ATTEMPTS = 3  # failed logins on one connection before we hang up
MAX_XCLIENT_ATTRS = 8
MAX_PENDING_INPUT = 64 * 1024  # unparsed input (pipelined commands) held before more is refused

NEED_DATA = "NEED_DATA"  # sentinels returned by next_event()
NEED_REPLY = "NEED_REPLY"


class PopError(Exception):
    pass


class RemoteProtocolError(PopError):
    """The peer broke the protocol badly enough that the session ends."""


class LocalProtocolError(PopError):
    """The application used this object wrongly."""


class State(enum.Enum):
    AUTHORIZATION = "AUTHORIZATION"
    TRANSACTION = "TRANSACTION"
    CLOSED = "CLOSED"


# --- Events ------------------------------------------------------------------------
@dataclass(frozen=True)
class Login:
    user: str
    password: str = field(repr=False)  # never in a repr, hence never in a log
    mechanism: str = "USER"  # "USER" (USER/PASS) or "PLAIN"


@dataclass(frozen=True)
class StartTLS:
    pass


@dataclass(frozen=True)
class XClient:
    attributes: dict


@dataclass(frozen=True)
class Command:
    verb: str
    args: tuple = ()


@dataclass(frozen=True)
class Closed:
    """The session is over (QUIT before login): flush data_to_send(), close."""


# Commands of the TRANSACTION state: verb -> (min args, max args); every
# argument is a decimal number. QUIT ends the session after the application
# has done the UPDATE state's work.
TRANSACTION_COMMANDS = {
    "STAT": (0, 0),
    "LIST": (0, 1),
    "RETR": (1, 1),
    "DELE": (1, 1),
    "NOOP": (0, 0),
    "RSET": (0, 0),
    "TOP": (2, 2),
    "UIDL": (0, 1),
    "QUIT": (0, 0),
}

_CONTROL = re.compile("[\x00-\x1f\x7f]")
_OK = b"+OK"
_ERR = b"-ERR"


def _response(status: bytes, text: str, code: str | None) -> bytes:
    parts = [status]
    if code:
        parts.append(f"[{code}]".encode())
    if text:
        parts.append(text.encode("utf-8", "replace"))
    return b" ".join(parts) + b"\r\n"


def _number(arg: str) -> int | None:
    if not arg or len(arg) > MAX_NUMBER_DIGITS or not arg.isascii() or not arg.isdigit():
        return None
    return int(arg)


def parse_plain(response: bytes) -> tuple[str, str, str]:
    """RFC 4616 message: authzid NUL authcid NUL passwd -> (authzid, user, password).

    Raises ValueError when malformed."""
    parts = response.split(b"\0")
    if len(parts) != 3:
        raise ValueError("PLAIN message needs exactly two NULs")
    authzid, authcid, passwd = (p.decode("utf-8") for p in parts)
    if not authcid or not passwd or len(authcid.encode()) > MAX_ARG:
        raise ValueError("empty or too long user or password")
    return authzid, authcid, passwd


def encode_plain(user: str, password: str) -> str:
    """Base64 of an AUTH PLAIN message (empty authzid), for replaying a login."""
    return base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode()).decode("ascii")


class MultilineEncoder:
    """Turns message bytes (LF or CRLF line ends) into a POP3 multi-line body:
    CRLF line ends and dot-stuffing, chunk by chunk with O(1) state."""

    __slots__ = ("_at_line_start", "_pending_cr")

    def __init__(self) -> None:
        self._at_line_start = True
        self._pending_cr = False

    def feed(self, chunk: bytes) -> bytes:
        if self._pending_cr:
            chunk = b"\r" + chunk
            self._pending_cr = False
        if chunk.endswith(b"\r"):
            self._pending_cr = True
            chunk = chunk[:-1]
        if not chunk:
            return b""
        if b"\r" in chunk:  # the common LF-only file skips a pass
            chunk = chunk.replace(b"\r\n", b"\n")
        data = chunk.replace(b"\n", b"\r\n")
        if b"\n." in data:
            data = data.replace(b"\n.", b"\n..")
        if self._at_line_start and data[:1] == b".":
            data = b"." + data
        self._at_line_start = data.endswith(b"\n")
        return data

    def finish(self) -> bytes:
        tail = b""
        if self._pending_cr:
            self._pending_cr = False
            tail = b"\r\n"
        elif not self._at_line_start:
            tail = b"\r\n"
        self._at_line_start = True
        return tail + b".\r\n"


def crlf_size(data: bytes) -> int:
    """Octets of `data` once every line end is CRLF."""
    return len(data) + data.count(b"\n") - data.count(b"\r\n")


class MessageSize:
    """The size LIST and STAT give for stored message bytes: what
    MultilineEncoder sends for them, before dot-stuffing and without the
    final ".CRLF" (RFC 1939). That is every line end as CRLF, plus the CRLF
    finish() adds to a last line without one (a final bare CR becomes
    CRLF). Fed chunk by chunk, as the encoder is."""

    __slots__ = ("_size", "_last")

    def __init__(self) -> None:
        self._size = 0
        self._last = b""  # the last byte fed so far

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        self._size += crlf_size(chunk)
        if self._last == b"\r" and chunk[:1] == b"\n":  # a CRLF split between chunks
            self._size -= 1
        self._last = chunk[-1:]

    @property
    def size(self) -> int:
        return self._size + _UNENDED_LAST_LINE.get(self._last, 2)


# What a message's last byte adds to its size at the end (see MessageSize).
_UNENDED_LAST_LINE = {b"": 0, b"\n": 0, b"\r": 1}


class LineConnection:
    """The buffers of a sans-I/O server connection, line by line: input
    held with a cap, output handed over. Shared by this POP3 machine and
    imap_protocol's; each says its limits, its fatal answer and while
    which states it still parses input."""

    max_line = MAX_LINE
    max_pending_input = MAX_PENDING_INPUT
    limit_code: str | None = None  # the response code of a broken limit

    def __init__(self) -> None:
        self._in = bytearray()
        self._out = bytearray()
        self._eof = False

    def _parsing(self) -> bool:
        raise NotImplementedError

    def _fatal(self, text: str, code: str | None = None):
        raise NotImplementedError

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; b"" means the peer closed."""
        if not data:
            self._eof = True
            return
        # A cap on input we hold unparsed: past it the application kept
        # feeding us while an answer was pending (one read may exceed it).
        if len(self._in) > self.max_pending_input and self._parsing():
            self._fatal("Too much pipelined input", self.limit_code)
        self._in += data

    def data_to_send(self) -> bytearray:
        """Everything queued to send (handed over, not copied)."""
        out, self._out = self._out, bytearray()
        return out

    def trailing_data(self) -> bytes:
        """Input received but not parsed (the proxy forwards it after login)."""
        data = bytes(self._in)
        self._in.clear()
        return data

    def _take_line(self) -> bytes | None:
        """The next line without its line end (CRLF or a bare LF), or None."""
        i = self._in.find(b"\n", 0, self.max_line)
        if i < 0:
            if len(self._in) >= self.max_line:
                self._fatal("Line too long", self.limit_code)
            return None
        line = bytes(self._in[:i])
        del self._in[: i + 1]
        if line.endswith(b"\r"):
            line = line[:-1]
        return line


class ServerConnection(LineConnection):
    """One POP3 session, server side.

    stls: offer STLS (a certificate is configured and TLS is not on yet).
    plaintext_auth: allow USER/PASS and AUTH PLAIN without TLS.
    xclient: the peer is a trusted proxy: greet with [XCLIENT] and accept it.
    """

    def __init__(
        self,
        *,
        stls: bool = False,
        tls_active: bool = False,
        plaintext_auth: bool = True,
        xclient: bool = False,
        implementation: str | None = None,
    ) -> None:
        super().__init__()
        self.state = State.AUTHORIZATION
        self.tls_active = tls_active
        self._stls_offered = stls and not tls_active
        self._plaintext_auth = plaintext_auth
        self._xclient = xclient
        self._implementation = implementation
        self._user: str | None = None  # from USER, waiting for PASS
        self._awaiting: object | None = None  # event waiting for the application's reply
        self._auth_continue = False  # sent "+ ", waiting for the SASL response
        self._in_body: MultilineEncoder | None = None
        self._xclient_done = False
        self.bad_commands = 0
        self.failed_logins = 0

    def _parsing(self) -> bool:
        return self.state is not State.CLOSED

    @property
    def auth_allowed(self) -> bool:
        return self._plaintext_auth or self.tls_active

    # --- Greeting and capabilities -----------------------------------------------------
    def send_greeting(self, text: str = "POP3 ready.") -> None:
        self._out += _response(_OK, text, "XCLIENT" if self._xclient else None)

    def capabilities(self) -> list[str]:
        caps = ["TOP", "UIDL", "RESP-CODES"]
        if self.state is State.AUTHORIZATION:
            caps.append("AUTH-RESP-CODE")
            if self._stls_offered:
                caps.append("STLS")
            if self.auth_allowed:
                caps += ["USER", "SASL PLAIN"]
        else:
            caps.append("USER")
        if self._implementation:
            caps.append(f"IMPLEMENTATION {self._implementation}")
        return caps

    # --- Events ------------------------------------------------------------------------
    def next_event(self):
        """The next event, NEED_DATA, or NEED_REPLY. Raises RemoteProtocolError."""
        while True:
            if self.state is State.CLOSED:
                return Closed()
            if self._awaiting is not None or self._in_body is not None:
                return NEED_REPLY
            line = self._take_line()
            if line is None:
                if self._eof:
                    self.state = State.CLOSED
                    return Closed()
                return NEED_DATA
            event = self._handle_line(line)
            if event is not None:
                if not isinstance(event, Closed):
                    self._awaiting = event
                return event

    def _fatal(self, text: str, code: str | None = None):
        self._out += _response(_ERR, text, code)
        self.state = State.CLOSED
        self._in.clear()
        raise RemoteProtocolError(text)

    def _bad(self, text: str, code: str | None = None) -> None:
        self.bad_commands += 1
        if self.bad_commands >= MAX_BAD_COMMANDS:
            self._fatal("Too many bad commands")
        self._out += _response(_ERR, text, code)

    def _handle_line(self, raw: bytes):
        if self._auth_continue:
            self._auth_continue = False
            return self._sasl_response(raw.strip())
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            return self._bad("Invalid characters in command")
        if _CONTROL.search(line):
            return self._bad("Invalid characters in command")
        verb, _, rest = line.partition(" ")
        if not verb or len(verb) > MAX_VERB or not verb.isascii() or not verb.isalpha():
            return self._bad("Unknown command")
        verb = verb.upper()
        handler = _HANDLERS[self.state].get(verb)
        if handler is None:
            other = State.TRANSACTION if self.state is State.AUTHORIZATION else State.AUTHORIZATION
            if verb in _HANDLERS[other]:
                return self._bad("Not logged in" if self.state is State.AUTHORIZATION else "Already logged in")
            return self._bad("Unknown command")
        return handler(self, verb, rest)

    # AUTHORIZATION state ---------------------------------------------------------------
    def _capa(self, verb: str, rest: str):
        self._reply_capa()
        return None

    def _quit_early(self, verb: str, rest: str):
        self._out += _response(_OK, "Bye.", None)
        self.state = State.CLOSED
        return Closed()

    def _stls(self, verb: str, rest: str):
        if rest:
            return self._bad("STLS takes no argument")
        if not self._stls_offered:
            return self._bad("TLS already active" if self.tls_active else "STLS not available")
        return StartTLS()

    def _user_command(self, verb: str, rest: str):
        if not self.auth_allowed:
            return self._bad("Plaintext authentication disallowed, use STLS first", "AUTH")
        if not rest or " " in rest or len(rest.encode()) > MAX_ARG:
            self._user = None
            return self._bad("Invalid user name")
        self._user = rest
        self._out += _response(_OK, "", None)
        return None

    def _pass_command(self, verb: str, rest: str):
        if not self.auth_allowed:
            return self._bad("Plaintext authentication disallowed, use STLS first", "AUTH")
        user, self._user = self._user, None
        if user is None:
            return self._bad("No user given, send USER first")
        if not rest or len(rest.encode()) > MAX_ARG:
            return self._bad("Invalid password", "AUTH")
        return Login(user, rest, "USER")

    def _auth_command(self, verb: str, rest: str):
        if not self.auth_allowed:
            return self._bad("Plaintext authentication disallowed, use STLS first", "AUTH")
        self._user = None
        mech, _, initial = rest.partition(" ")
        if not mech:
            self._out += b"+OK\r\nPLAIN\r\n.\r\n"
            return None
        if mech.upper() != "PLAIN":
            return self._bad("Unsupported authentication mechanism")
        if " " in initial:
            return self._bad("Invalid AUTH arguments")
        if not initial:
            self._auth_continue = True
            self._out += b"+ \r\n"
            return None
        return self._sasl_response(initial.encode("ascii", "replace"))

    def _sasl_response(self, data: bytes):
        if data == b"*":
            return self._bad("Authentication cancelled")
        try:
            decoded = b"" if data == b"=" else base64.b64decode(data, validate=True)
            authzid, user, password = parse_plain(decoded)
        except (binascii.Error, ValueError):
            return self._bad("Invalid AUTH PLAIN response", "AUTH")
        if authzid and authzid != user:
            return self._bad("Authorization identity not supported", "AUTH")
        return Login(user, password, "PLAIN")

    def _xclient_command(self, verb: str, rest: str):
        if not self._xclient or self._xclient_done or self._user is not None:
            return self._bad("Unknown command")
        attrs = {}
        for item in rest.split(" ")[:MAX_XCLIENT_ATTRS]:
            key, eq, value = item.partition("=")
            if eq and key.isascii() and key.isalpha():
                attrs[key.upper()] = value
        self._xclient_done = True
        return XClient(attrs)

    def _reply_capa(self) -> None:
        self._out += b"+OK Capability list follows\r\n"
        for cap in self.capabilities():
            self._out += cap.encode() + b"\r\n"
        self._out += b".\r\n"

    # TRANSACTION state ------------------------------------------------------------------
    def _transaction(self, verb: str, rest: str):
        lo, hi = TRANSACTION_COMMANDS[verb]
        args = rest.split(" ") if rest else []
        if not lo <= len(args) <= hi:
            return self._bad(f"Wrong number of arguments for {verb}")
        numbers = tuple(_number(a) for a in args)
        if any(n is None for n in numbers):
            return self._bad("Invalid number")
        if numbers and numbers[0] == 0:  # message numbers start at 1
            return self._bad("No such message")
        return Command(verb, numbers)

    # --- Replies -------------------------------------------------------------------------
    def _take_awaiting(self):
        if self._awaiting is None:
            raise LocalProtocolError("no event is waiting for a reply")
        if self._in_body is not None:
            raise LocalProtocolError("a multi-line reply is in progress")
        event, self._awaiting = self._awaiting, None
        return event

    def reply_ok(self, text: str = "", code: str | None = None) -> None:
        event = self._take_awaiting()
        if isinstance(event, (Login, StartTLS)):
            raise LocalProtocolError("use accept_login() / accept_stls()")
        self._out += _response(_OK, text, code)
        if isinstance(event, Command) and event.verb == "QUIT":
            self.state = State.CLOSED

    def reply_err(self, text: str, code: str | None = None) -> None:
        event = self._take_awaiting()
        if isinstance(event, Login):
            raise LocalProtocolError("use reject_login()")
        self._out += _response(_ERR, text, code)
        if isinstance(event, Command) and event.verb == "QUIT":
            self.state = State.CLOSED

    def reply_lines(self, text: str, lines: Iterable[str]) -> None:
        """A whole multi-line reply (LIST, UIDL): lines without line ends."""
        self.start_body(text)
        enc = self._in_body
        self._out += enc.feed("".join(f"{line}\r\n" for line in lines).encode())
        self.end_body()

    def start_body(self, text: str = "") -> None:
        event = self._take_awaiting()
        if not isinstance(event, Command):
            raise LocalProtocolError("only commands have multi-line replies")
        self._out += _response(_OK, text, None)
        self._in_body = MultilineEncoder()

    def send_body(self, chunk: bytes) -> None:
        if self._in_body is None:
            raise LocalProtocolError("no multi-line reply in progress")
        self._out += self._in_body.feed(chunk)

    def end_body(self) -> None:
        if self._in_body is None:
            raise LocalProtocolError("no multi-line reply in progress")
        self._out += self._in_body.finish()
        self._in_body = None

    def abort(self, text: str, code: str | None = None) -> None:
        """End the session on our side (idle timeout, shutdown): a final -ERR."""
        self._out += _response(_ERR, text, code)
        self.state = State.CLOSED
        self._awaiting = None
        self._in_body = None

    def accept_login(self, text: str = "Logged in.", *, send: bool = True) -> None:
        """Login succeeded: enter TRANSACTION. send=False when the +OK line
        comes from elsewhere (the proxy relays the backend's)."""
        event = self._take_awaiting()
        if not isinstance(event, Login):
            raise LocalProtocolError("no login is waiting")
        if send:
            self._out += _response(_OK, text, None)
        self.state = State.TRANSACTION

    def reject_login(self, text: str = "Authentication failed.", code: str | None = "AUTH") -> None:
        event = self._take_awaiting()
        if not isinstance(event, Login):
            raise LocalProtocolError("no login is waiting")
        self.failed_logins += 1
        if self.failed_logins >= MAX_AUTH_ATTEMPTS:
            self._out += _response(_ERR, text, code)
            self.state = State.CLOSED
            self._in.clear()
            return
        self._out += _response(_ERR, text, code)

    def accept_stls(self) -> None:
        """Queue "+OK" for STLS; the caller starts TLS once it is sent. Input
        already buffered was sent in clear text before the handshake and is
        dropped (the STARTTLS command injection attack)."""
        event = self._take_awaiting()
        if not isinstance(event, StartTLS):
            raise LocalProtocolError("no STLS is waiting")
        self._out += _response(_OK, "Begin TLS negotiation now.", None)
        self._in.clear()
        self._user = None
        self.tls_active = True
        self._stls_offered = False


# The state machine: which command is handled how in which state. A verb
# listed only for the other state gets "Not logged in" / "Already logged in".
_HANDLERS = {
    State.AUTHORIZATION: {
        "CAPA": ServerConnection._capa,
        "QUIT": ServerConnection._quit_early,
        "STLS": ServerConnection._stls,
        "XCLIENT": ServerConnection._xclient_command,
        "USER": ServerConnection._user_command,
        "PASS": ServerConnection._pass_command,
        "AUTH": ServerConnection._auth_command,
    },
    State.TRANSACTION: {
        "CAPA": ServerConnection._capa,
        **{verb: ServerConnection._transaction for verb in TRANSACTION_COMMANDS},
    },
    State.CLOSED: {},
}
