"""LMTP server protocol, sans-I/O (bytes in, events out, bytes to send).

RFC 2033 (LMTP) with PIPELINING (2920), SIZE (1870), 8BITMIME (6152),
ENHANCEDSTATUSCODES (2034, 3463), CHUNKING (3030, BDAT) and, with `dsn=True`,
DSN (3461: its parameters are checked and handed on, `params` of the events;
the notices themselves are the MTA's job), plus one extension parameter of ours,
`XQUEUEID=<id>` on MAIL, which lets `pdelivery -i QUEUEID` name the sender's
queue id for duplicate detection.

The machine answers every command itself except two decisions that are
policy: whether a recipient is accepted (`RcptRequest`, answered with
`answer_rcpt`) and what became of a complete message for each accepted
recipient (`MessageReceived`, answered with `answer_message`, one reply per
recipient in RCPT order, as LMTP requires). A message's data is not kept
here: it goes, unstuffed, piece by piece as it arrives, to a `Body` from the
`new_body` factory (delivery/body.py; in memory by default, pdeliveryd's
spools to disk), so the machine's buffers never grow with the message. The
I/O glue loops:

    conn = LMTPServerConnection("host.example")
    out = conn.data_to_send()            # the 220 greeting
    while (ev := conn.next_event()) is not CLOSED:
        if ev is NEED_DATA: send(conn.data_to_send()); conn.receive_data(recv())
        elif isinstance(ev, RcptRequest): conn.answer_rcpt(decide(ev))
        elif isinstance(ev, MessageReceived): conn.answer_message(store(ev))

Two error types, as in h11: `PeerError` when the peer's input forces the
session to end (its `.reply` is the last thing to send), `LocalProtocolError`
when the caller misuses the machine. Every limit a peer controls is a field
of `Limits`; docs/delivery.md lists them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from delivery.body import Body, MemoryBody

# -- limits ------------------------------------------------------------------
COMMAND_LINE_MAX = 2048  # RFC 5321 says 512 for the command + room for parameters
MESSAGE_SIZE_MAX = 50 * 1024 * 1024
MESSAGE_LINE_MAX = 64 * 1024  # longer lines than this are refused (RFC 5321: 1000)
RECIPIENTS_MAX = 1000  # per transaction (RFC 5321 minimum: 100)
BAD_COMMANDS_MAX = 20  # syntax errors before the session is dropped
ADDRESS_MAX = 512
ENVID_MAX = 100  # RFC 3461 4.4: characters of ENVID's xtext
ORCPT_MAX = 500  # RFC 3461 4.2: characters of ORCPT's value


@dataclass(frozen=True)
class Limits:
    command_line_max: int = COMMAND_LINE_MAX
    message_size_max: int = MESSAGE_SIZE_MAX
    message_line_max: int = MESSAGE_LINE_MAX
    recipients_max: int = RECIPIENTS_MAX
    bad_commands_max: int = BAD_COMMANDS_MAX


# -- errors --------------------------------------------------------------------
class PeerError(Exception):
    """The peer broke the protocol beyond repair: send data_to_send() (it
    ends with `.reply`), then close."""

    def __init__(self, reply: Reply):
        super().__init__(str(reply))
        self.reply = reply


class LocalProtocolError(Exception):
    """The caller used the machine wrongly (a bug on our side)."""


# -- replies -------------------------------------------------------------------
@dataclass(frozen=True)
class Reply:
    code: int
    status: str
    text: str

    def __bytes__(self) -> bytes:
        text = self.text.replace("\r", " ").replace("\n", " ")
        return f"{self.code} {self.status} {text}\r\n".encode("utf-8", "replace")

    def __str__(self) -> str:
        return f"{self.code} {self.status} {self.text}"

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500


OK = Reply(250, "2.0.0", "OK")
R_SENDER_OK = Reply(250, "2.1.0", "sender OK")
R_NEED_LHLO = Reply(503, "5.5.1", "send LHLO first")
R_BAD_SEQUENCE = Reply(503, "5.5.1", "bad sequence of commands")
R_NESTED_MAIL = Reply(503, "5.5.1", "sender already given")
R_NEED_MAIL = Reply(503, "5.5.1", "need MAIL first")
R_NEED_RCPT = Reply(503, "5.5.1", "need RCPT first")
R_NO_VALID_RCPT = Reply(554, "5.5.1", "no valid recipients")
R_SYNTAX = Reply(501, "5.5.4", "syntax error in parameters")
R_UNKNOWN_CMD = Reply(500, "5.5.1", "command not recognized")
R_NOT_LMTP = Reply(500, "5.5.1", "this is LMTP: use LHLO")
R_LINE_TOO_LONG = Reply(500, "5.5.2", "line too long")
R_PARAM = Reply(555, "5.5.4", "unsupported parameter")
R_TOO_BIG = Reply(552, "5.3.4", "message too big")
R_LONG_LINES = Reply(554, "5.6.0", "message has lines longer than allowed")
R_TOO_MANY_RCPT = Reply(452, "4.5.3", "too many recipients")
R_TOO_MANY_ERRORS = Reply(421, "4.7.0", "too many errors, closing")
R_BYE = Reply(221, "2.0.0", "bye")
R_START_DATA = Reply(354, "", "end data with <CR><LF>.<CR><LF>")
R_VRFY = Reply(252, "2.5.0", "cannot verify, send mail to find out")


# -- events --------------------------------------------------------------------
class _Sentinel:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = _Sentinel("NEED_DATA")  # give it more bytes (after sending data_to_send())
CLOSED = _Sentinel("CLOSED")  # send data_to_send(), then close


@dataclass
class RcptRequest:
    address: str
    sender: str
    params: dict[str, str] = field(default_factory=dict)  # NOTIFY, ORCPT (upper-case names), as given


@dataclass
class MessageReceived:
    sender: str
    recipients: list[str]
    body: Body  # the data as on the wire after unstuffing, CRLF line ends
    queue_id: str | None = None
    params: dict[str, str] = field(default_factory=dict)  # MAIL's (SIZE, BODY, RET, ENVID...)
    rcpt_params: list[dict[str, str]] = field(default_factory=list)  # each recipient's RCPT parameters

    @property
    def data(self) -> bytes:
        """The bytes of a MemoryBody (the default)."""
        return self.body.data


# What a piece of DATA may end with that a terminator ("\r\n.\r\n") or a
# stuffed dot ("\r\n..") could continue: held back until more comes, so
# both are found across any split of the input. Longest first.
_HOLD_BACK = (b"\r\n.\r", b"\r\n.", b"\r\n", b"\r")


_PATH_RE = re.compile(r"^\s*<([^<>]*)>\s*(.*)$")
_XTEXT_RE = re.compile(r"^[!-~]{1,128}$")
# RFC 3461 4: xtext is printable ASCII but "+" and "=", which is written "+XX"
_DSN_XTEXT = r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})+"
_ENVID_RE = re.compile(_DSN_XTEXT)
_ORCPT_RE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+;" + _DSN_XTEXT)  # addr-type ";" xtext
_NOTIFY_WORDS = {"SUCCESS", "FAILURE", "DELAY"}


def _dsn_param_ok(name: str, value: str) -> bool:
    """The syntax of an RFC 3461 parameter's value (4.1-4.4)."""
    if name == "NOTIFY":
        words = value.upper().split(",")
        return words == ["NEVER"] or (len(set(words)) == len(words) and set(words) <= _NOTIFY_WORDS)
    if name == "ORCPT":
        return len(value) <= ORCPT_MAX and _ORCPT_RE.fullmatch(value) is not None
    if name == "RET":
        return value.upper() in ("FULL", "HDRS")
    if name == "ENVID":
        return len(value) <= ENVID_MAX and _ENVID_RE.fullmatch(value) is not None
    raise LocalProtocolError(f"{name} is no DSN parameter")


def _parse_path(rest: str) -> tuple[str, list[str]] | None:
    """`<addr> params...` -> (addr, params), or None on bad syntax."""
    m = _PATH_RE.match(rest)
    if not m:
        # tolerate a bare address without brackets (some old clients)
        parts = rest.split()
        if not parts or "<" in parts[0] or ">" in parts[0]:
            return None
        return parts[0], parts[1:]
    addr = m.group(1)
    if ":" in addr and addr.startswith("@"):  # source route: drop it (RFC 5321 C)
        addr = addr.split(":", 1)[1]
    if any(c in addr for c in " \t\r\n") or len(addr) > ADDRESS_MAX:
        return None
    return addr, m.group(2).split()


class LMTPServerConnection:
    # phases
    INIT, READY, MAIL, DATA, BDAT, WAIT_RCPT, WAIT_MESSAGE, DONE = range(8)

    def __init__(
        self,
        hostname: str,
        limits: Limits = Limits(),
        greeting: str = "LMTP ready",
        new_body: Callable[[], Body] = MemoryBody,
        dsn: bool = False,
    ):
        self.hostname = hostname
        self.limits = limits
        # RFC 3461's parameters accepted and DSN announced (pdeliveryd); off,
        # they are 555 as any unknown parameter (pdelivery -l, whose C twin
        # answers the same)
        self.dsn = dsn
        # makes the Body each message's data is written to as it arrives
        # (pdeliveryd's spools to disk; the default keeps it in memory)
        self._new_body = new_body
        self._body: Body | None = None
        self._in = bytearray()
        self._out = bytearray()
        self._eof = False
        self._bad = 0
        self.phase = self.INIT
        self._reset_transaction()
        self._reply(Reply(220, "", f"{hostname} {greeting}"))

    # -- public API ----------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; b"" means the peer closed."""
        if data:
            self._in += data
        else:
            self._eof = True

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def answer_rcpt(self, reply: Reply) -> None:
        if self.phase != self.WAIT_RCPT:
            raise LocalProtocolError("no recipient is waiting for an answer")
        if reply.ok:
            self._rcpts.append(self._pending_rcpt)
            self._rcpt_params.append(self._pending_params)
        self._pending_rcpt = None
        self._pending_params = {}
        self._reply(reply)
        self.phase = self.MAIL

    def answer_message(self, replies: list[Reply]) -> None:
        if self.phase != self.WAIT_MESSAGE:
            raise LocalProtocolError("no message is waiting for answers")
        if len(replies) != len(self._rcpts):
            raise LocalProtocolError(
                f"{len(self._rcpts)} recipients need {len(self._rcpts)} replies, got {len(replies)}"
            )
        for r in replies:
            self._reply(r)
        self._reset_transaction()
        self.phase = self.READY

    def next_event(self):
        """The next event, NEED_DATA or CLOSED; raises PeerError."""
        while True:
            if self.phase == self.DONE:
                return CLOSED
            if self.phase in (self.WAIT_RCPT, self.WAIT_MESSAGE):
                raise LocalProtocolError("answer the pending event first")
            if self.phase == self.DATA:
                ev = self._data_step()
            elif self.phase == self.BDAT:
                ev = self._bdat_step()
            else:
                ev = self._command_step()
            if ev is not None:
                return ev

    def close(self) -> None:
        """The session is over: release the body of a transaction left
        unfinished (a spool file)."""
        self._drop_body()
        self.phase = self.DONE

    @property
    def recipients(self) -> list[str]:
        return list(self._rcpts)

    @property
    def mail_params(self) -> dict[str, str]:
        """The parameters of the transaction's MAIL (upper-case names), e.g.
        for a proxy opening its own transaction before the data comes."""
        return dict(self._params)

    @property
    def data_size(self) -> int:
        """Bytes of message data received so far for the message not yet
        whole (in memory or its spool file; 0 between messages)."""
        return self._body.size if self._body is not None else 0

    @property
    def in_transaction_data(self) -> bool:
        """Between a first BDAT chunk and BDAT LAST (the commands between
        chunks are part of the message's data time)."""
        return self._bdat_started

    # -- internals -----------------------------------------------------------
    def _reply(self, reply: Reply) -> None:
        if reply.status:
            self._out += bytes(reply)
        else:
            self._out += f"{reply.code} {reply.text}\r\n".encode()

    def _fail(self, reply: Reply) -> None:
        """End the session: the reply is queued in data_to_send(), then PeerError."""
        self._reply(reply)
        self.phase = self.DONE
        raise PeerError(reply)

    def _reset_transaction(self) -> None:
        self._sender: str | None = None
        self._rcpts: list[str] = []
        self._pending_rcpt: str | None = None
        self._pending_params: dict[str, str] = {}
        self._rcpt_params: list[dict[str, str]] = []
        self._queue_id: str | None = None
        self._params: dict[str, str] = {}
        self._drop_body()
        self._stuffed = bytearray()  # DATA not yet unstuffed: at most _HOLD_BACK's longest
        self._fake_crlf = False  # _stuffed begins with a CRLF that is not the message's
        self._too_big = False
        self._bdat_left = 0
        self._bdat_last = False
        self._bdat_started = False

    def _end_of_input(self):
        if self._eof:
            self.phase = self.DONE
            return CLOSED
        return NEED_DATA

    def _bad_command(self, reply: Reply) -> None:
        self._bad += 1
        if self._bad >= self.limits.bad_commands_max:
            self._fail(R_TOO_MANY_ERRORS)
        self._reply(reply)

    def _command_step(self):
        nl = self._in.find(b"\n")
        if nl < 0:
            if len(self._in) > self.limits.command_line_max:
                self._fail(R_LINE_TOO_LONG)
            return self._end_of_input()
        raw = bytes(self._in[:nl])
        del self._in[: nl + 1]
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if len(raw) > self.limits.command_line_max:
            self._bad_command(R_LINE_TOO_LONG)
            return None
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            self._bad_command(R_SYNTAX)
            return None
        verb, _, rest = line.partition(" ")
        verb = verb.upper()
        handler = self._COMMANDS.get(verb)
        if handler is None:
            self._bad_command(R_NOT_LMTP if verb in ("HELO", "EHLO") else R_UNKNOWN_CMD)
            return None
        if self.phase == self.INIT and verb not in ("LHLO", "NOOP", "QUIT", "RSET", "HELP"):
            self._bad_command(R_NEED_LHLO)
            return None
        return handler(self, rest.strip())

    # commands; each returns an event or None
    def _cmd_lhlo(self, arg: str):
        if not arg:
            return self._bad_command(R_SYNTAX)
        self._reset_transaction()
        self.phase = self.READY
        lines = [
            self.hostname,
            "PIPELINING",
            "ENHANCEDSTATUSCODES",
            "8BITMIME",
            f"SIZE {self.limits.message_size_max}",
            "CHUNKING",
            *(["DSN"] if self.dsn else []),
            "XQUEUEID",
        ]
        for i, text in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            self._out += f"250{sep}{text}\r\n".encode()
        return None

    def _cmd_mail(self, arg: str):
        if self._sender is not None:
            return self._bad_command(R_NESTED_MAIL)
        if not arg.upper().startswith("FROM:"):
            return self._bad_command(R_SYNTAX)
        parsed = _parse_path(arg[5:])
        if parsed is None:
            return self._bad_command(R_SYNTAX)
        addr, params = parsed
        opts: dict[str, str] = {}
        for p in params:
            k, _, v = p.partition("=")
            k = k.upper()
            if k == "SIZE":
                if not v.isdigit() or len(v) > 20:
                    return self._bad_command(R_SYNTAX)
                if int(v) > self.limits.message_size_max:
                    self._reply(R_TOO_BIG)
                    return None
            elif k == "BODY":
                if v.upper() not in ("7BIT", "8BITMIME"):
                    return self._bad_command(R_SYNTAX)
            elif k == "XQUEUEID":
                if not _XTEXT_RE.match(v):
                    return self._bad_command(R_SYNTAX)
                self._queue_id = v
            elif k in ("RET", "ENVID") and self.dsn:
                if k in opts or not _dsn_param_ok(k, v):
                    return self._bad_command(R_SYNTAX)
            else:
                self._reply(R_PARAM)
                return None
            opts[k] = v
        self._sender = addr
        self._params = opts
        self.phase = self.MAIL
        self._reply(R_SENDER_OK)
        return None

    def _cmd_rcpt(self, arg: str):
        if self._sender is None:
            return self._bad_command(R_NEED_MAIL)
        if not arg.upper().startswith("TO:"):
            return self._bad_command(R_SYNTAX)
        parsed = _parse_path(arg[3:])
        if parsed is None or not parsed[0]:
            return self._bad_command(R_SYNTAX)
        addr, params = parsed
        opts: dict[str, str] = {}
        for p in params:
            k, _, v = p.partition("=")
            k = k.upper()
            if k not in ("NOTIFY", "ORCPT") or not self.dsn:
                self._reply(R_PARAM)
                return None
            if k in opts or not _dsn_param_ok(k, v):
                return self._bad_command(R_SYNTAX)
            opts[k] = v
        if len(self._rcpts) >= self.limits.recipients_max:
            self._reply(R_TOO_MANY_RCPT)
            return None
        self._pending_rcpt = addr
        self._pending_params = opts
        self.phase = self.WAIT_RCPT
        return RcptRequest(addr, self._sender, dict(opts))

    def _cmd_data(self, arg: str):
        if arg:
            return self._bad_command(R_SYNTAX)
        if self._sender is None:
            return self._bad_command(R_NEED_MAIL)
        if self._bdat_started:
            return self._bad_command(R_BAD_SEQUENCE)
        if not self._rcpts:
            self._reply(R_NO_VALID_RCPT)
            return None
        self._stuffed = bytearray(b"\r\n")  # so a leading "." line is found like any other
        self._fake_crlf = True
        self.phase = self.DATA
        self._reply(R_START_DATA)
        return None

    def _cmd_bdat(self, arg: str):
        parts = arg.split()
        if (
            not parts
            or len(parts) > 2
            or not parts[0].isdigit()
            or len(parts[0]) > 20
            or (len(parts) == 2 and parts[1].upper() != "LAST")
        ):
            # the chunk length is unknown: the rest of the stream cannot be framed
            self._fail(R_SYNTAX)
        self._bdat_left = int(parts[0])
        self._bdat_last = len(parts) == 2
        self.phase = self.BDAT
        return None

    def _cmd_rset(self, arg: str):
        self._reset_transaction()
        if self.phase != self.INIT:
            self.phase = self.READY
        self._reply(OK)
        return None

    def _cmd_noop(self, arg: str):
        self._reply(OK)
        return None

    def _cmd_vrfy(self, arg: str):
        self._reply(R_VRFY)
        return None

    def _cmd_help(self, arg: str):
        self._reply(Reply(214, "2.0.0", "LHLO MAIL RCPT DATA BDAT RSET NOOP VRFY QUIT"))
        return None

    def _cmd_quit(self, arg: str):
        self._reply(R_BYE)
        self.phase = self.DONE
        return CLOSED

    _COMMANDS = {
        "LHLO": _cmd_lhlo,
        "MAIL": _cmd_mail,
        "RCPT": _cmd_rcpt,
        "DATA": _cmd_data,
        "BDAT": _cmd_bdat,
        "RSET": _cmd_rset,
        "NOOP": _cmd_noop,
        "VRFY": _cmd_vrfy,
        "HELP": _cmd_help,
        "QUIT": _cmd_quit,
        "HELO": None,
        "EHLO": None,
    }
    _COMMANDS = {k: v for k, v in _COMMANDS.items() if v is not None}

    # -- message bodies --------------------------------------------------------
    # The data goes to the Body as it comes: nothing here grows with the message.
    def _drop_body(self) -> None:
        if self._body is not None:
            self._body.discard()
            self._body = None

    def _write_body(self, piece: bytes | bytearray) -> None:
        if self._too_big or not piece:
            return
        if self._body is None:
            self._body = self._new_body()
        self._body.write(piece)
        if self._body.size > self.limits.message_size_max:
            # refused at the end of the data; what came is dropped now
            self._too_big = True
            self._drop_body()

    def _unstuff(self, stuffed: bytes | bytearray) -> None:
        """Pass on DATA cut where no terminator or stuffed dot straddles."""
        data = stuffed.replace(b"\r\n..", b"\r\n.")
        if self._fake_crlf and data:
            data = data[2:]
            self._fake_crlf = False
        self._write_body(data)

    def _data_step(self):
        if not self._in:
            return self._end_of_input()
        buf = self._stuffed
        buf += self._in
        self._in.clear()
        end = buf.find(b"\r\n.\r\n")
        if end < 0:
            hold = next((len(h) for h in _HOLD_BACK if buf.endswith(h)), 0)
            self._unstuff(buf[: len(buf) - hold])
            del buf[: len(buf) - hold]
            return None
        # put back what follows the terminator (pipelined commands)
        self._in += buf[end + 5 :]
        self._unstuff(buf[: end + 2])
        buf.clear()
        return self._message_complete()

    def _bdat_step(self):
        if self._bdat_left:
            if not self._in:
                return self._end_of_input()
            take = min(self._bdat_left, len(self._in))
            if self._sender is not None and self._rcpts:
                self._write_body(self._in[:take])
            del self._in[:take]
            self._bdat_left -= take
            if self._bdat_left:
                return None
        # a whole chunk is in
        if self._sender is None:
            self._bad_command(R_NEED_MAIL)
            self._reset_transaction()
            self.phase = self.READY
            return None
        if not self._rcpts:
            self._reply(R_NO_VALID_RCPT)
            self._reset_transaction()
            self.phase = self.READY
            return None
        self._bdat_started = True
        if not self._bdat_last:
            self.phase = self.MAIL
            self._reply(Reply(250, "2.0.0", "chunk received"))
            return None
        return self._message_complete()

    def _message_complete(self):
        failure = None
        if self._body is None and not self._too_big:
            self._body = self._new_body()  # an empty message
        if self._too_big:
            failure = R_TOO_BIG
        else:
            self._body.finish()
            if self._body.longest_line > self.limits.message_line_max + 1:
                failure = R_LONG_LINES
        if failure is not None:
            for _ in self._rcpts:
                self._reply(failure)
            self._reset_transaction()
            self.phase = self.READY
            return None
        self.phase = self.WAIT_MESSAGE
        # the body stays ours: answer_message() releases it
        return MessageReceived(
            self._sender,
            list(self._rcpts),
            self._body,
            self._queue_id,
            dict(self._params),
            [dict(p) for p in self._rcpt_params],
        )
