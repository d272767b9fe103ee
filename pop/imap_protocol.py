"""IMAP server side before login, sans-I/O: bytes in, events out, bytes to send.

Used by `imap-proxy`, which speaks IMAP itself only in the not-authenticated
state (RFC 9051 section 3.1, the same in RFC 3501) and relays bytes after
login. Nothing here reads a socket or a clock: the proxy feeds
`receive_data()`, takes events from `next_event()`, answers them and writes
what `data_to_send()` returns, as with pop/protocol.py.

The connection answers by itself what needs no policy: CAPABILITY, NOOP,
LOGOUT, ID (RFC 2971), syntax errors, commands of other states, the `+`
continuation of a synchronising literal and of AUTHENTICATE. Events:

    Login(user, password, mechanism, tag) -> accept_login() / reject_login()
    StartTLS(tag)                          -> accept_stls()
    Closed()                               the session is over: flush and close

Commands are strings of atoms, quoted strings (with \\" and \\\\ escapes) and
literals: synchronising `{n}` (the server sends "+ " before the client sends
the n octets) and non-synchronising LITERAL+ `{n+}` (RFC 7888). LOGIN,
AUTHENTICATE PLAIN (RFC 4959 SASL-IR or a continuation, `*` cancels), ID
and STARTTLS are offered; before TLS, when plaintext_auth is off, the
capabilities say LOGINDISABLED and logins get [PRIVACYREQUIRED]. Errors
carry RFC 5530 response codes.

RemoteProtocolError is the peer's fault and ends the session (its `* BYE`
is already queued); LocalProtocolError is a bug in the caller.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from dataclasses import dataclass, field

from .protocol import LineConnection, LocalProtocolError, RemoteProtocolError, parse_plain

__all__ = [
    "ServerConnection",
    "Login",
    "StartTLS",
    "Closed",
    "NEED_DATA",
    "NEED_REPLY",
    "RemoteProtocolError",
    "LocalProtocolError",
]

# --- Limits (DESIGN decision 10: every size or count a peer controls) ----------
MAX_LINE = 8192  # octets of one line with its CRLF (RFC 7162 section 4 suggests 8192)
MAX_LITERAL = 1024  # octets of one literal: before login a literal carries a name,
# a password or an ID value (RFC 2971: values up to 1024)
MAX_COMMAND = 16384  # octets of one command, its lines and literals together
MAX_TOKENS = 128  # strings and parentheses in one command (ID has at most 30 pairs)
MAX_TAG = 64  # octets of a tag
MAX_CREDENTIAL = 255  # octets of a user name or password (as pop/protocol.py's MAX_ARG)
MAX_ID_PAIRS = 30  # RFC 2971: at most 30 field-value pairs
MAX_ID_FIELD = 30  # RFC 2971: field names up to 30 octets
MAX_BAD_COMMANDS = 10  # malformed or out-of-state commands before we hang up
MAX_AUTH_ATTEMPTS = 3  # failed logins on one connection before we hang up
MAX_PENDING_INPUT = 64 * 1024  # unparsed input (pipelined commands) held before more is refused

NEED_DATA = "NEED_DATA"  # sentinels returned by next_event()
NEED_REPLY = "NEED_REPLY"

IMPLEMENTATION_ID = ("name", "pwmail imap-proxy")  # our answer to ID


class State(enum.Enum):
    NOT_AUTHENTICATED = "NOT_AUTHENTICATED"
    AUTHENTICATED = "AUTHENTICATED"  # handed over: the proxy relays from here
    CLOSED = "CLOSED"


# --- Events ------------------------------------------------------------------------
@dataclass(frozen=True)
class Login:
    user: str
    password: str = field(repr=False)  # never in a repr, hence never in a log
    mechanism: str = "LOGIN"  # "LOGIN" or "PLAIN"
    tag: str = "*"


@dataclass(frozen=True)
class StartTLS:
    tag: str = "*"


@dataclass(frozen=True)
class Closed:
    """The session is over (LOGOUT, or a fatal error): flush data_to_send(), close."""


@dataclass(frozen=True)
class _Literal:
    """A literal's announcement at the end of a line: {size} or {size+}."""

    size: int
    synchronising: bool


class _Bad(Exception):
    """A malformed command: answered with a tagged (or untagged) BAD."""

    def __init__(self, text: str, code: str | None = None):
        super().__init__(text)
        self.text, self.code = text, code


# ATOM-CHAR: any CHAR except atom-specials ( ) { SP CTL % * " \ ]
_ATOM = re.compile(rb'[^(){ \x00-\x1f\x7f%*"\\\]\x80-\xff]+')
_ASTRING_EXTRA = re.compile(rb'[^(){ \x00-\x1f\x7f%*"\\\x80-\xff]+')  # atoms plus "]"
_LITERAL_AT_END = re.compile(rb"\{(\d{1,10})(\+?)\}$")
_QUOTED_ESCAPE = re.compile(rb"\\(.)")
_LIST_OPEN, _LIST_CLOSE = object(), object()


def quoted(text: str) -> bytes:
    """A quoted string (for ID answers and the backend's LOGIN)."""
    return b'"' + text.encode("utf-8").replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _tokens(segment: bytes, out: list) -> None:
    """Atoms, quoted strings and parentheses of one line piece (no literal in it)."""
    i, n = 0, len(segment)
    while i < n:
        c = segment[i : i + 1]
        if c == b" ":
            i += 1
        elif c == b"(":
            out.append(_LIST_OPEN)
            i += 1
        elif c == b")":
            out.append(_LIST_CLOSE)
            i += 1
        elif c == b'"':
            j, value = i + 1, bytearray()
            while True:
                if j >= n:
                    raise _Bad("Unterminated quoted string")
                ch = segment[j : j + 1]
                if ch == b"\\":
                    esc = segment[j + 1 : j + 2]
                    if esc not in (b"\\", b'"'):
                        raise _Bad("Invalid escape in quoted string")
                    value += esc
                    j += 2
                elif ch == b'"':
                    break
                elif ch in (b"\r", b"\n", b"\0"):
                    raise _Bad("Invalid character in quoted string")
                else:
                    value += ch
                    j += 1
            out.append(bytes(value))
            i = j + 1
        else:
            m = _ASTRING_EXTRA.match(segment, i)
            if m is None:
                raise _Bad("Invalid characters in command")
            out.append(_Atom(m.group()))
            i = m.end()
        if len(out) > MAX_TOKENS:
            raise _Bad("Too many arguments", "LIMIT")


class _Atom(bytes):
    """An atom (as opposed to a quoted string or a literal, which are plain bytes)."""


def _text(value: bytes) -> str:
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        raise _Bad("Invalid UTF-8 in string") from None
    if "\0" in text:
        raise _Bad("NUL in string")
    return text


def _nstring_list(tokens: list) -> list | None:
    """ID's argument: NIL or a parenthesised list of strings (no nesting)."""
    if len(tokens) == 1 and isinstance(tokens[0], _Atom) and tokens[0].upper() == b"NIL":
        return None
    if not tokens or tokens[0] is not _LIST_OPEN or tokens[-1] is not _LIST_CLOSE:
        raise _Bad("ID needs NIL or a parenthesised list")
    items = tokens[1:-1]
    if any(t is _LIST_OPEN or t is _LIST_CLOSE for t in items) or len(items) % 2:
        raise _Bad("ID needs field-value pairs")
    if len(items) // 2 > MAX_ID_PAIRS:
        raise _Bad("Too many ID fields", "LIMIT")
    return items


class ServerConnection(LineConnection):
    """One IMAP session before login, server side.

    starttls: offer STARTTLS (a certificate is configured and TLS is not on).
    plaintext_auth: allow LOGIN and AUTHENTICATE PLAIN without TLS.
    """

    max_line = MAX_LINE
    max_pending_input = MAX_PENDING_INPUT
    limit_code = "LIMIT"

    def __init__(self, *, starttls: bool = False, tls_active: bool = False, plaintext_auth: bool = True) -> None:
        super().__init__()
        self.state = State.NOT_AUTHENTICATED
        self.tls_active = tls_active
        self._starttls_offered = starttls and not tls_active
        self._plaintext_auth = plaintext_auth
        self._awaiting: object | None = None  # event waiting for the application's reply
        self._tokens: list = []  # of the command being read (across literals)
        self._command_size = 0
        self._literal: _Literal | None = None  # announced, its octets not all here yet
        self._auth_tag: str | None = None  # sent "+ " for AUTHENTICATE, waiting for the response
        self.client_id: dict[str, str | None] = {}  # what the client said in ID (not forwarded)
        self.bad_commands = 0
        self.failed_logins = 0

    def _parsing(self) -> bool:
        return self.state is State.NOT_AUTHENTICATED

    @property
    def auth_allowed(self) -> bool:
        return self._plaintext_auth or self.tls_active

    # --- Greeting and capabilities -------------------------------------------------
    def capabilities(self) -> list[str]:
        caps = ["IMAP4rev1", "SASL-IR", "LITERAL+", "ID", "ENABLE", "IDLE"]
        if self._starttls_offered:
            caps.append("STARTTLS")
        caps.append("AUTH=PLAIN" if self.auth_allowed else "LOGINDISABLED")
        return caps

    def send_greeting(self, text: str = "IMAP ready.") -> None:
        self._out += f"* OK [CAPABILITY {' '.join(self.capabilities())}] {text}\r\n".encode()

    # --- Events --------------------------------------------------------------------
    def next_event(self):
        """The next event, NEED_DATA, or NEED_REPLY. Raises RemoteProtocolError."""
        while True:
            if self.state is State.CLOSED:
                return Closed()
            if self._awaiting is not None:
                return NEED_REPLY
            if self.state is State.AUTHENTICATED:
                return NEED_DATA
            event = self._step()
            if event is NEED_DATA:
                if self._eof:
                    self.state = State.CLOSED
                    return Closed()
                return NEED_DATA
            if event is not None:
                if not isinstance(event, Closed):
                    self._awaiting = event
                return event

    def _step(self):
        """Consume one line or literal; an event, None (go on) or NEED_DATA."""
        if self._literal is not None:
            size = self._literal.size
            if len(self._in) < size:
                return NEED_DATA
            self._tokens.append(bytes(self._in[:size]))
            del self._in[:size]
            self._literal = None
            return None
        line = self._take_line()
        if line is None:
            return NEED_DATA
        if self._auth_tag is not None:
            tag, self._auth_tag = self._auth_tag, None
            return self._sasl_response(tag, line.strip())
        self._command_size += len(line) + 2
        m = _LITERAL_AT_END.search(line)
        try:
            if self._command_size > MAX_COMMAND:
                raise _Bad("Command too long", "LIMIT")
            if m is not None:
                _tokens(line[: m.start()], self._tokens)
                literal = _Literal(int(m.group(1)), not m.group(2))
                self._command_size += literal.size
                if literal.size > MAX_LITERAL or self._command_size > MAX_COMMAND:
                    raise _Bad("Literal too big", "LIMIT")
                self._literal = literal
                if literal.synchronising:
                    self._out += b"+ Ready for literal data\r\n"
                return None
            _tokens(line, self._tokens)
        except _Bad as e:
            if m is not None and m.group(2) == b"+":
                # A non-synchronising literal's octets are on the way: they
                # must not be read as commands, and cannot be skipped blind.
                self._fatal(e.text, e.code)
            return self._bad_command(e)
        tokens, self._tokens, self._command_size = self._tokens, [], 0
        return self._command(tokens)

    def _bad_command(self, e: _Bad):
        """The command being read is malformed: answer BAD with its tag (when
        it had one) and forget it."""
        tokens, self._tokens, self._command_size = self._tokens, [], 0
        tag = tokens[0].decode("ascii") if tokens and _is_tag(tokens[0]) else "*"
        return self._bad(tag, e.text, e.code)

    # --- Answers it gives by itself ---------------------------------------------------
    def _respond(self, tag: str, status: str, text: str, code: str | None = None) -> None:
        parts = [tag, status] + ([f"[{code}]"] if code else []) + [text]
        self._out += " ".join(parts).encode("utf-8", "replace") + b"\r\n"

    def _bad(self, tag: str, text: str, code: str | None = None):
        self.bad_commands += 1
        if self.bad_commands >= MAX_BAD_COMMANDS:
            self._fatal("Too many bad commands")
        self._respond(tag, "BAD", text, code)
        return None

    def _fatal(self, text: str, code: str | None = None):
        self._respond("*", "BYE", text, code)
        self.state = State.CLOSED
        self._in.clear()
        raise RemoteProtocolError(text)

    def _command(self, tokens: list):
        if not tokens:
            return self._bad("*", "Empty command")
        if not _is_tag(tokens[0]):
            return self._bad("*", "Invalid tag")
        tag = tokens[0].decode("ascii")
        if len(tokens) < 2 or not isinstance(tokens[1], _Atom):
            return self._bad(tag, "Missing command")
        verb = tokens[1].decode("ascii").upper()
        args = tokens[2:]
        handler = _HANDLERS.get(verb)
        if handler is None:
            if verb in _LATER_STATES:
                return self._bad(tag, "Not logged in")
            return self._bad(tag, "Unknown command")
        try:
            return handler(self, tag, args)
        except _Bad as e:
            return self._bad(tag, e.text, e.code)

    def _capability(self, tag: str, args: list):
        _no_args(args)
        self._out += f"* CAPABILITY {' '.join(self.capabilities())}\r\n".encode()
        self._respond(tag, "OK", "Capability completed.")

    def _noop(self, tag: str, args: list):
        _no_args(args)
        self._respond(tag, "OK", "NOOP completed.")

    def _logout(self, tag: str, args: list):
        _no_args(args)
        self._respond("*", "BYE", "Logging out.")
        self._respond(tag, "OK", "Logout completed.")
        self.state = State.CLOSED
        return Closed()

    def _id(self, tag: str, args: list):
        items = _nstring_list(args) or []
        self.client_id = {}
        for name, value in zip(items[::2], items[1::2], strict=True):
            if isinstance(name, _Atom) or len(name) > MAX_ID_FIELD:
                raise _Bad("ID field names are strings of up to 30 octets")
            nil = isinstance(value, _Atom) and value.upper() == b"NIL"
            if isinstance(value, _Atom) and not nil:
                raise _Bad("ID values are strings or NIL")
            self.client_id[_text(name).lower()] = None if nil else _text(value)
        self._out += b"* ID (" + b" ".join(quoted(t) for t in IMPLEMENTATION_ID) + b")\r\n"
        self._respond(tag, "OK", "ID completed.")

    def _starttls(self, tag: str, args: list):
        _no_args(args)
        if not self._starttls_offered:
            raise _Bad("TLS already active" if self.tls_active else "STARTTLS not available")
        return StartTLS(tag)

    def _login(self, tag: str, args: list):
        if len(args) != 2 or any(a is _LIST_OPEN or a is _LIST_CLOSE for a in args):
            raise _Bad("LOGIN needs a user name and a password")
        if not self.auth_allowed:
            self._respond(tag, "NO", "Plaintext authentication disallowed, use STARTTLS first.", "PRIVACYREQUIRED")
            return None
        user, password = (_text(a) for a in args)
        if not user or not password or len(args[0]) > MAX_CREDENTIAL or len(args[1]) > MAX_CREDENTIAL:
            raise _Bad("Invalid user name or password")
        return Login(user, password, "LOGIN", tag)

    def _authenticate(self, tag: str, args: list):
        if not 1 <= len(args) <= 2 or not all(isinstance(a, _Atom) for a in args):
            raise _Bad("AUTHENTICATE needs a mechanism and at most an initial response")
        if not self.auth_allowed:
            self._respond(tag, "NO", "Plaintext authentication disallowed, use STARTTLS first.", "PRIVACYREQUIRED")
            return None
        if args[0].upper() != b"PLAIN":
            self._respond(tag, "NO", "Unsupported authentication mechanism.")
            return None
        if len(args) == 2:  # SASL-IR (RFC 4959)
            return self._sasl_response(tag, bytes(args[1]))
        self._auth_tag = tag
        self._out += b"+ \r\n"
        return None

    def _sasl_response(self, tag: str, data: bytes):
        if data == b"*":
            return self._bad(tag, "Authentication cancelled.")
        try:
            decoded = b"" if data == b"=" else base64.b64decode(data, validate=True)
            authzid, user, password = parse_plain(decoded)
        except (binascii.Error, ValueError):
            return self._bad(tag, "Invalid AUTHENTICATE PLAIN response.")
        if authzid and authzid != user:
            self.failed_logins += 1
            self._respond(tag, "NO", "Authorization identity not supported.", "AUTHORIZATIONFAILED")
            return None
        if len(password.encode()) > MAX_CREDENTIAL:
            return self._bad(tag, "Invalid user name or password")
        return Login(user, password, "PLAIN", tag)

    # --- Replies ---------------------------------------------------------------------
    def _take_awaiting(self, kind: type):
        event, self._awaiting = self._awaiting, None
        if not isinstance(event, kind):
            self._awaiting = event
            raise LocalProtocolError(f"no {kind.__name__} is waiting for a reply")
        return event

    def accept_login(self, text: str = "Logged in.", *, send: bool = True) -> None:
        """Login succeeded: from here on the proxy relays. send=False when the
        tagged OK comes from elsewhere (the proxy builds it with the backend's
        capabilities)."""
        event = self._take_awaiting(Login)
        if send:
            self._respond(event.tag, "OK", text)
        self.state = State.AUTHENTICATED

    def reject_login(self, text: str = "Authentication failed.", code: str | None = "AUTHENTICATIONFAILED") -> None:
        event = self._take_awaiting(Login)
        self.failed_logins += 1
        self._respond(event.tag, "NO", text, code)
        if self.failed_logins >= MAX_AUTH_ATTEMPTS:
            self._respond("*", "BYE", "Too many failed logins.")
            self.state = State.CLOSED
            self._in.clear()

    def accept_stls(self) -> None:
        """Queue the tagged OK to STARTTLS; the caller starts TLS once it is
        sent. Input already buffered came in clear text before the handshake
        and is dropped (the STARTTLS command injection attack, RFC 9051 11.1)."""
        event = self._take_awaiting(StartTLS)
        self._respond(event.tag, "OK", "Begin TLS negotiation now.")
        self._in.clear()
        self.tls_active = True
        self._starttls_offered = False

    def abort(self, text: str, code: str | None = None) -> None:
        """End the session on our side (timeout, shutdown): an untagged BYE."""
        self._respond("*", "BYE", text, code)
        self.state = State.CLOSED
        self._awaiting = None


def login_ok(tag: str, capabilities: str, text: str = "Logged in.") -> bytes:
    """The tagged OK that ends a login, the backend's capabilities in it
    (as Dovecot's proxy and nginx do), so clients need not ask again."""
    code = f" [CAPABILITY {capabilities}]" if capabilities else ""
    return f"{tag} OK{code} {text}\r\n".encode("utf-8", "replace")


def _is_tag(token) -> bool:
    return (
        isinstance(token, _Atom)
        and 0 < len(token) <= MAX_TAG
        and b"+" not in token
        and _ATOM.fullmatch(token.replace(b"]", b"a")) is not None
    )


def _no_args(args: list) -> None:
    if args:
        raise _Bad("This command takes no arguments")


_HANDLERS = {
    "CAPABILITY": ServerConnection._capability,
    "NOOP": ServerConnection._noop,
    "LOGOUT": ServerConnection._logout,
    "ID": ServerConnection._id,
    "STARTTLS": ServerConnection._starttls,
    "LOGIN": ServerConnection._login,
    "AUTHENTICATE": ServerConnection._authenticate,
}
# Commands of the authenticated and selected states: "Not logged in".
_LATER_STATES = frozenset(
    """ENABLE SELECT EXAMINE CREATE DELETE RENAME SUBSCRIBE UNSUBSCRIBE LIST LSUB
NAMESPACE STATUS APPEND IDLE CHECK CLOSE UNSELECT EXPUNGE SEARCH FETCH STORE COPY MOVE UID""".split()
)
