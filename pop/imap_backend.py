"""imap-proxy's login to a backend IMAP server (Dovecot): the connection
from pop/backend.py, then the greeting, STARTTLS when asked, the client's
address in ID (RFC 2971 x-originating-ip, which Dovecot takes from peers
in its login_trusted_networks), the login replayed with AUTHENTICATE PLAIN
(SASL-IR when offered, so any password octets pass), and the backend's
post-login capabilities for the client's tagged OK.

The tags are ours (the client's tag goes on the OK the proxy sends); the
backend's answers are read line by line with bounded lines and a bounded
number of them."""

from __future__ import annotations

from .backend import BackendConnector, BackendError, BackendSide
from .imap_protocol import quoted
from .protocol import encode_plain

MAX_LOGIN_LINES = 64  # untagged lines the backend may send before its tagged answer
TAG_STARTTLS, TAG_ID, TAG_LOGIN, TAG_CAPABILITY, TAG_LOGOUT = b"p0", b"p1", b"p2", b"p3", b"p4"


def status(line: bytes) -> tuple[bytes, bytes, str | None, bytes]:
    """(tag, status, response code, text) of a response line."""
    tag, _, rest = line.rstrip(b"\r\n").partition(b" ")
    word, _, text = rest.partition(b" ")
    code = None
    if text.startswith(b"[") and b"]" in text:
        inner, _, text = text[1:].partition(b"]")
        code = inner.split(b" ", 1)[0].decode("ascii", "replace").upper()
        text = text.strip()
    return tag, word.upper(), code, text


def capability_code(line: bytes) -> str | None:
    """The capabilities in "[CAPABILITY ...]" of a response line, or in "* CAPABILITY ..."."""
    body = line.rstrip(b"\r\n")
    if body[:13].upper() == b"* CAPABILITY ":
        return body[13:].decode("ascii", "replace")
    i = body.upper().find(b"[CAPABILITY ")
    if i < 0:
        return None
    end = body.find(b"]", i)
    return body[i + 12 : end if end > 0 else len(body)].decode("ascii", "replace")


class ImapBackendLogin(BackendConnector):
    TLS_MODES = ("none", "tls", "starttls")

    def __init__(self, *, forward_id: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.forward_id = forward_id

    async def login(
        self, host: str, port: int, user: str, password: str, client_addr: tuple[str, int]
    ) -> tuple[BackendSide, bytes]:
        """Connect and log in; returns (backend, answer): answer is the
        tagged OK with the backend's capabilities in it ("p2 OK [CAPABILITY
        ...] text"), or the backend's tagged NO/BAD (the backend is then
        closed already). Raises BackendError."""
        proto = await self.connect(host, port)
        async with self.exchange(proto, host, port):
            greeting = await proto.read_line()
            if not greeting.startswith(b"* OK"):
                raise BackendError(f"backend greeting: {greeting[:80]!r}")
            capabilities = capability_code(greeting)
            if self.tls == "starttls":
                proto.send(TAG_STARTTLS + b" STARTTLS\r\n")
                if (await _tagged(proto, TAG_STARTTLS))[1] != b"OK":
                    raise BackendError("backend refused STARTTLS")
                await self.start_tls(proto, host)
                capabilities = None  # what was said before TLS no longer holds
            answer, capabilities = await self._login(proto, user, password, client_addr, capabilities)
        tag, word, _, text = status(answer)
        if word != b"OK":
            proto.send(TAG_LOGOUT + b" LOGOUT\r\n")
            proto.close()
            return proto, answer
        return proto, b"%s OK [CAPABILITY %s] %s\r\n" % (tag, capabilities.encode(), text)

    async def _login(
        self, proto: BackendSide, user: str, password: str, client_addr: tuple[str, int], capabilities: str | None
    ) -> tuple[bytes, str]:
        # ID and the login go in one packet (one round trip less); Dovecot
        # reads pipelined commands before login in order.
        sasl_ir = capabilities is not None and "SASL-IR" in capabilities.upper().split()
        commands = b""
        if self.forward_id:
            fields = ("x-originating-ip", client_addr[0], "x-originating-port", str(client_addr[1]))
            commands += TAG_ID + b" ID (" + b" ".join(quoted(f) for f in fields) + b")\r\n"
        plain = encode_plain(user, password).encode()
        commands += TAG_LOGIN + b" AUTHENTICATE PLAIN" + ((b" " + plain) if sasl_ir else b"") + b"\r\n"
        proto.send(commands)
        seen = None
        for _ in range(MAX_LOGIN_LINES):
            line = await proto.read_line()
            if line.startswith(b"+") and not sasl_ir:
                proto.send(plain + b"\r\n")
                sasl_ir = True  # (one continuation only)
                continue
            if line.startswith(b"* "):
                seen = capability_code(line) or seen
                continue
            if line.split(b" ", 1)[0] == TAG_LOGIN:
                break
        else:
            raise BackendError("backend sent too many lines before its login answer")
        seen = capability_code(line) or seen
        if status(line)[1] == b"OK" and seen is None:
            proto.send(TAG_CAPABILITY + b" CAPABILITY\r\n")
            for _ in range(MAX_LOGIN_LINES):
                reply = await proto.read_line()
                seen = capability_code(reply) or seen
                if reply.split(b" ", 1)[0] == TAG_CAPABILITY:
                    break
            else:
                raise BackendError("backend sent too many lines to CAPABILITY")
        return line, seen or "IMAP4rev1"


async def _tagged(proto: BackendSide, tag: bytes) -> tuple[bytes, bytes, str | None, bytes]:
    for _ in range(MAX_LOGIN_LINES):
        line = await proto.read_line()
        if line.split(b" ", 1)[0] == tag:
            return status(line)
    raise BackendError(f"backend sent too many lines before answering {tag.decode()}")
