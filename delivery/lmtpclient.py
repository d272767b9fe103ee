"""A small blocking LMTP client (pdelivery's side of the wire).

One transaction per call: LHLO, MAIL, the RCPTs and the message are sent
pipelined when the server offers PIPELINING; the message goes as one
`BDAT n LAST` when it offers CHUNKING (no dot-stuffing), else as DATA.
`deliver()` returns one Reply per recipient; a refused RCPT is that
recipient's reply, the rest get theirs after the data, as LMTP says.
Transport failures raise LMTPUnavailable (always a temporary failure).
"""
from __future__ import annotations

import socket

from delivery.lmtp import Reply

REPLY_LINE_MAX = 4096
REPLY_LINES_MAX = 100


class LMTPUnavailable(Exception):
    """The server could not be reached or broke off: try again later."""


class _Reader:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()

    def line(self) -> bytes:
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = bytes(self.buf[:i]).rstrip(b"\r")
                del self.buf[:i + 1]
                return line
            if len(self.buf) > REPLY_LINE_MAX:
                raise LMTPUnavailable("reply line too long")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise LMTPUnavailable("connection closed by the server")
            self.buf += chunk

    def reply(self) -> tuple[Reply, list[str]]:
        lines = []
        while True:
            line = self.line().decode("utf-8", "replace")
            if len(line) < 3 or not line[:3].isdigit():
                raise LMTPUnavailable(f"malformed reply {line[:80]!r}")
            lines.append(line[4:])
            if line[3:4] != "-":
                break
            if len(lines) > REPLY_LINES_MAX:
                raise LMTPUnavailable("reply too long")
        code = int(line[:3])
        text = lines[-1]
        status = ""
        first = text.split(" ", 1)
        if first and first[0][:1] in "245" and first[0].count(".") == 2:
            status = first[0]
            text = first[1] if len(first) > 1 else ""
        return Reply(code, status, text), lines


def crlf(data: bytes) -> bytes:
    """LF or CRLF line ends -> CRLF (messages from Sendmail's stdin use LF)."""
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def dot_stuff(data: bytes) -> bytes:
    out = (b"\r\n" + data).replace(b"\r\n.", b"\r\n..")[2:]
    if out and not out.endswith(b"\r\n"):
        out += b"\r\n"
    return out + b".\r\n"


def deliver(host: str, port: int, sender: str, recipients: list[str], data: bytes, *,
            queue_id: str | None = None, connect_timeout: float = 10.0, timeout: float = 300.0,
            helo: str | None = None) -> list[Reply]:
    """Deliver `data` (CRLF line ends) to each recipient; one Reply each."""
    try:
        sock = socket.create_connection((host, port), timeout=connect_timeout)
    except OSError as e:
        raise LMTPUnavailable(f"connect to {host}:{port}: {e}") from e
    try:
        sock.settimeout(timeout)
        return _transaction(sock, sender, recipients, data, queue_id, helo or socket.gethostname())
    except (OSError, socket.timeout) as e:
        raise LMTPUnavailable(f"{host}:{port}: {e}") from e
    finally:
        sock.close()


def _transaction(sock, sender, recipients, data, queue_id, helo) -> list[Reply]:
    rd = _Reader(sock)
    greeting, _ = rd.reply()
    if greeting.code != 220:
        raise LMTPUnavailable(f"greeting: {greeting}")
    sock.sendall(f"LHLO {helo}\r\n".encode())
    lhlo, lines = rd.reply()
    if lhlo.code != 250:
        raise LMTPUnavailable(f"LHLO: {lhlo}")
    ext = {line.split(" ", 1)[0].upper() for line in lines[1:]} | {lines[-1].split(" ", 1)[0].upper()}
    params = f" SIZE={len(data)}" if "SIZE" in ext else ""
    if "8BITMIME" in ext:
        params += " BODY=8BITMIME"
    if queue_id and "XQUEUEID" in ext:
        params += f" XQUEUEID={queue_id}"
    cmds = [f"MAIL FROM:<{sender}>{params}\r\n".encode()]
    cmds += [f"RCPT TO:<{r}>\r\n".encode() for r in recipients]
    chunking = "CHUNKING" in ext
    pipelining = "PIPELINING" in ext
    if pipelining:
        sock.sendall(b"".join(cmds))
        replies = [rd.reply()[0] for _ in cmds]
    else:
        replies = []
        for c in cmds:
            sock.sendall(c)
            replies.append(rd.reply()[0])
    mail, rcpt_replies = replies[0], replies[1:]
    if not mail.ok:
        return [mail] * len(recipients)
    accepted = [i for i, r in enumerate(rcpt_replies) if r.ok]
    result = list(rcpt_replies)
    if not accepted:
        sock.sendall(b"RSET\r\nQUIT\r\n")
        return result
    if chunking:
        sock.sendall(b"BDAT %d LAST\r\n" % len(data) + data)
    else:
        sock.sendall(b"DATA\r\n")
        go, _ = rd.reply()
        if go.code != 354:
            return [go if i in accepted else r for i, r in enumerate(result)]
        sock.sendall(dot_stuff(data))
    for i in accepted:
        result[i] = rd.reply()[0]
    try:
        sock.sendall(b"QUIT\r\n")
        rd.reply()
    except (OSError, LMTPUnavailable):
        pass  # the answers are in; a lost 221 changes nothing
    return result
