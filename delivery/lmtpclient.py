"""A small blocking LMTP client (pdelivery's side of the wire).

One transaction per call: LHLO, MAIL, the RCPTs and the message are sent
pipelined when the server offers PIPELINING; the message goes as one
`BDAT n LAST` when it offers CHUNKING (no dot-stuffing), else as DATA.
`deliver()` returns one Reply per recipient; a refused RCPT is that
recipient's reply, the rest get theirs after the data, as LMTP says.
Transport failures raise LMTPUnavailable (always a temporary failure).

What goes on a command line is checked first: the sender, the recipients
and the queue id must fit the grammar below (`check_address`,
`check_queue_id`, InvalidArgument otherwise), and no command with CR, LF or
NUL is ever written, whatever the caller passed (`_command`). What comes
back is checked too: every reply must be one the command it answers can
have, in the order the commands were sent, and the server's `221` to QUIT
must come exactly where it belongs, so an extra reply or a missing one
anywhere in the session is an LMTPProtocolError (temporary), never a
delivery. docs/delivery.md, "pdelivery".
"""

from __future__ import annotations

import re
import socket
import unicodedata

from delivery.lmtp import ADDRESS_MAX, Reply

REPLY_LINE_MAX = 4096
REPLY_LINES_MAX = 100
QUEUE_ID_MAX = 128  # as pdeliveryd's XQUEUEID (delivery/lmtp.py)

# Queue ids of Sendmail and Postfix are letters and digits, Exim's add `-`;
# nothing here needs xtext encoding (RFC 3461: no `+`, `=`, controls).
_QUEUE_ID_RE = re.compile(r"[A-Za-z0-9._-]+")
# Never in an address on a command line: controls (CR, LF, NUL, ...), lone
# surrogates (undecodable argv bytes), spaces and line/paragraph separators.
_ADDRESS_BAD_CATEGORIES = frozenset({"Cc", "Cs", "Zs", "Zl", "Zp"})


class LMTPUnavailable(Exception):
    """The server could not be reached or broke off: try again later."""


class LMTPProtocolError(LMTPUnavailable):
    """The server's replies do not match the commands sent (an extra reply,
    a missing one, one out of order): nothing it said can be trusted."""


class InvalidArgument(ValueError):
    """A sender, recipient or queue id that cannot go on an LMTP command line."""


def _shown(text: str) -> str:
    """`text` for a one-line message: escaped, and cut if long."""
    return repr(text if len(text) <= 80 else text[:80] + "...")


def check_address(text: str, what: str = "recipient", *, empty_ok: bool = False) -> str:
    """The address to put between `<` and `>`, or raise InvalidArgument.

    One enclosing pair of angle brackets is taken off (`<a@x>`, `<>`);
    any other `<` or `>`, a control character (CR, LF, NUL...), a space or
    more than ADDRESS_MAX bytes of UTF-8 is refused: pdeliveryd would
    refuse it too, or it would end the command early."""
    addr = text[1:-1] if len(text) >= 2 and text[0] == "<" and text[-1] == ">" else text
    if not addr and not empty_ok:
        raise InvalidArgument(f"empty {what} address")
    for c in addr:
        if c in "<>" or unicodedata.category(c) in _ADDRESS_BAD_CATEGORIES:
            raise InvalidArgument(f"{what} address {_shown(text)} contains {c!r}")
    if len(addr.encode("utf-8")) > ADDRESS_MAX:
        raise InvalidArgument(f"{what} address longer than {ADDRESS_MAX} bytes: {_shown(text)}")
    return addr


def check_queue_id(text: str) -> str:
    """`text` if it can be an XQUEUEID (letters, digits, `.`, `_`, `-`,
    1 to QUEUE_ID_MAX), else raise InvalidArgument."""
    if len(text) > QUEUE_ID_MAX or not _QUEUE_ID_RE.fullmatch(text):
        raise InvalidArgument(f"queue id {_shown(text)} is not 1 to {QUEUE_ID_MAX} letters, digits, '.', '_', '-'")
    return text


def command_line(text: str) -> bytes:
    """One command line. The arguments were checked already; this is the
    last guard: a command that would be two is never written."""
    if any(c in text for c in "\r\n\0"):
        raise InvalidArgument(f"refusing to send a command containing CR, LF or NUL: {_shown(text)}")
    return text.encode("utf-8") + b"\r\n"


# The replies each command can have besides a 4xx/5xx refusal (which any
# command but QUIT can get). The key is what was sent ("greeting" for the
# connection, "message" for each recipient's answer after the data).
_SUCCESS_CODES = {
    "greeting": {220},
    "LHLO": {250},
    "MAIL": {250},
    "RCPT": {250, 251},
    "DATA": {354},
    "message": {250},
    "RSET": {250},
    "QUIT": {221},
}
_ADDRESS_COMMANDS = {"MAIL", "RCPT"}  # their success is an address status, 2.1.x (RFC 3463)


def continues(line: str, count: int) -> bool:
    """Whether reply line number `count` (`line`, without its CRLF) has
    another after it; raises LMTPUnavailable on a malformed or endless reply."""
    if len(line) < 3 or not line[:3].isdigit():
        raise LMTPUnavailable(f"malformed reply {line[:80]!r}")
    if line[3:4] != "-":
        return False
    if count > REPLY_LINES_MAX:
        raise LMTPUnavailable("reply too long")
    return True


def parse_reply(raw: list[str]) -> tuple[Reply, list[str]]:
    """The Reply of a complete reply's lines, and their texts (past the code)."""
    lines = [line[4:] for line in raw]
    code = int(raw[-1][:3])
    text = lines[-1]
    status = ""
    first = text.split(" ", 1)
    if first and first[0][:1] in "245" and first[0].count(".") == 2:
        status = first[0]
        text = first[1] if len(first) > 1 else ""
    return Reply(code, status, text), lines


def check_fits(command: str, reply: Reply, enhanced: bool) -> None:
    """Raise LMTPProtocolError unless `reply` is one `command` can have."""
    fits = reply.code in _SUCCESS_CODES[command] or (command != "QUIT" and 400 <= reply.code < 600)
    if fits and enhanced and reply.status:
        fits = reply.status[0] == str(reply.code)[0] and (
            not (reply.ok and command in _ADDRESS_COMMANDS) or reply.status[1:3] == ".1"
        )
    if not fits:
        raise LMTPProtocolError(f"reply {str(reply)[:80]!r} cannot answer {command}: replies out of step")


def extensions(lhlo_lines: list[str]) -> set[str]:
    """The extension keywords of a LHLO reply's lines (the first is the host name)."""
    return {line.split(" ", 1)[0].upper() for line in lhlo_lines[1:]}


def mail_params(ext: set[str], size: int, queue_id: str | None, body: str = "8BITMIME") -> str:
    """The MAIL parameters worth sending to a server offering `ext`."""
    params = f" SIZE={size}" if "SIZE" in ext else ""
    if "8BITMIME" in ext and body:
        params += f" BODY={body}"
    if queue_id and "XQUEUEID" in ext:
        params += f" XQUEUEID={queue_id}"
    return params


class _Reader:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()
        self.enhanced = False  # the server offered ENHANCEDSTATUSCODES

    def line(self) -> bytes:
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = bytes(self.buf[:i]).rstrip(b"\r")
                del self.buf[: i + 1]
                return line
            if len(self.buf) > REPLY_LINE_MAX:
                raise LMTPUnavailable("reply line too long")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise LMTPUnavailable("connection closed by the server")
            self.buf += chunk

    def reply(self) -> tuple[Reply, list[str]]:
        raw = []
        while True:
            raw.append(self.line().decode("utf-8", "replace"))
            if not continues(raw[-1], len(raw)):
                break
        return parse_reply(raw)

    def answer(self, command: str) -> tuple[Reply, list[str]]:
        """The reply to `command`, which must be one it can have."""
        reply, lines = self.reply()
        check_fits(command, reply, self.enhanced)
        return reply, lines

    def expect_silence(self) -> None:
        """Every command sent so far is answered: anything already received
        is a reply to nothing."""
        if self.buf:
            raise LMTPProtocolError(f"reply to no command: {bytes(self.buf[:80])!r}")


def crlf(data: bytes) -> bytes:
    """LF or CRLF line ends -> CRLF (messages from Sendmail's stdin use LF)."""
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def dot_stuff(data: bytes) -> bytes:
    out = (b"\r\n" + data).replace(b"\r\n.", b"\r\n..")[2:]
    if out and not out.endswith(b"\r\n"):
        out += b"\r\n"
    return out + b".\r\n"


def deliver(
    host: str,
    port: int,
    sender: str,
    recipients: list[str],
    data: bytes,
    *,
    queue_id: str | None = None,
    connect_timeout: float = 10.0,
    timeout: float = 300.0,
    helo: str | None = None,
) -> list[Reply]:
    """Deliver `data` (CRLF line ends) to each recipient; one Reply each.
    Raises InvalidArgument before connecting if an argument cannot be sent."""
    sender = check_address(sender, "sender", empty_ok=True)
    recipients = [check_address(r) for r in recipients]
    if queue_id:
        check_queue_id(queue_id)
    try:
        sock = socket.create_connection((host, port), timeout=connect_timeout)
    except OSError as e:
        raise LMTPUnavailable(f"connect to {host}:{port}: {e}") from e
    try:
        sock.settimeout(timeout)
        return _transaction(sock, sender, recipients, data, queue_id, helo or socket.gethostname())
    except (TimeoutError, OSError) as e:
        raise LMTPUnavailable(f"{host}:{port}: {e}") from e
    finally:
        sock.close()


def _send(sock, rd: _Reader, data: bytes) -> None:
    rd.expect_silence()
    sock.sendall(data)


def _transaction(sock, sender, recipients, data, queue_id, helo) -> list[Reply]:
    rd = _Reader(sock)
    greeting, _ = rd.answer("greeting")
    if greeting.code != 220:
        raise LMTPUnavailable(f"greeting: {greeting}")
    _send(sock, rd, command_line(f"LHLO {helo}"))
    lhlo, lines = rd.answer("LHLO")
    if lhlo.code != 250:
        raise LMTPUnavailable(f"LHLO: {lhlo}")
    ext = extensions(lines)
    rd.enhanced = "ENHANCEDSTATUSCODES" in ext
    params = mail_params(ext, len(data), queue_id)
    cmds = [("MAIL", command_line(f"MAIL FROM:<{sender}>{params}"))]
    cmds += [("RCPT", command_line(f"RCPT TO:<{r}>")) for r in recipients]
    if "PIPELINING" in ext:
        _send(sock, rd, b"".join(c for _, c in cmds))
        replies = [rd.answer(verb)[0] for verb, _ in cmds]
    else:
        replies = []
        for verb, c in cmds:
            _send(sock, rd, c)
            replies.append(rd.answer(verb)[0])
    result = _message(sock, rd, replies[0], replies[1:], data, "CHUNKING" in ext)
    # Only the 221 in its place proves that every reply above answered the
    # command it was taken for: no result is returned without it.
    _send(sock, rd, b"QUIT\r\n")
    rd.answer("QUIT")
    rd.expect_silence()
    return result


def _message(sock, rd: _Reader, mail: Reply, rcpt_replies: list[Reply], data: bytes, chunking: bool) -> list[Reply]:
    """Send the message to the accepted recipients (if any); one Reply per recipient."""
    if not mail.ok:
        return [mail] * len(rcpt_replies)
    accepted = [i for i, r in enumerate(rcpt_replies) if r.ok]
    result = list(rcpt_replies)
    if not accepted:
        _send(sock, rd, b"RSET\r\n")
        rd.answer("RSET")
        return result
    if chunking:
        _send(sock, rd, b"BDAT %d LAST\r\n" % len(data) + data)
    else:
        _send(sock, rd, b"DATA\r\n")
        go, _ = rd.answer("DATA")
        if go.code != 354:
            return [go if i in accepted else r for i, r in enumerate(result)]
        _send(sock, rd, dot_stuff(data))
    for i in accepted:
        result[i] = rd.answer("message")[0]
    return result
