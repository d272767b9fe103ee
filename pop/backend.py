"""The proxies' side of a backend: connect with bounded retries (shared by
both proxies, BackendConnector), and for pop-proxy a POP3 login: swallow
the greeting, pass the client's address (XCLIENT), replay the login with
AUTH PLAIN, and report the answer (imap-proxy's is pop/imap_backend.py).
After a successful login the protocol object is handed to a relay
(pop/relay.py)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl

from .protocol import encode_plain

MAX_BACKEND_LINE = 4096  # a greeting or login answer longer than this is an error


class BackendError(Exception):
    """The backend could not be reached or spoke nonsense: [SYS/TEMP]."""


class BackendSide(asyncio.Protocol):
    """Line reader during the login exchange; pure relay afterwards."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.closed = False
        self._waiter: asyncio.Future | None = None
        self.relay = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.relay is not None:
            self.relay.from_backend(data)
            return
        self.buf += data
        if len(self.buf) > MAX_BACKEND_LINE:
            self.transport.pause_reading()
        self._wake()

    def eof_received(self):
        if self.relay is not None:
            self.relay.backend_eof()
            return False
        self.closed = True
        self._wake()
        return False

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.relay is not None:
            self.relay.close()
        self._wake()

    def pause_writing(self) -> None:
        if self.relay is not None:
            self.relay.pause_client()

    def resume_writing(self) -> None:
        if self.relay is not None:
            self.relay.resume_client()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def read_line(self) -> bytes:
        while True:
            i = self.buf.find(b"\n", 0, MAX_BACKEND_LINE)
            if i >= 0:
                line = bytes(self.buf[: i + 1])
                del self.buf[: i + 1]
                return line
            if len(self.buf) >= MAX_BACKEND_LINE:
                raise BackendError("backend line too long")
            if self.closed:
                raise BackendError("backend closed the connection")
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def response_code(line: bytes) -> str | None:
    """The RFC 2449 response code of "-ERR [CODE] text", or None."""
    parts = line.split(b" ", 2)
    if len(parts) >= 2 and parts[1].startswith(b"[") and b"]" in parts[1]:
        return parts[1][1 : parts[1].index(b"]")].decode("ascii", "replace").upper()
    return None


class BackendConnector:
    """What one login attempt needs to know about backends (from the
    settings), and the connection with its retries; a protocol's login
    subclasses it."""

    TLS_MODES = ("none", "tls", "stls")  # plain, implicit TLS, the protocol's STARTTLS

    def __init__(
        self,
        *,
        tls: str = "none",
        ssl_context: ssl.SSLContext | None = None,
        connect_timeout: float = 3.0,
        retries: int = 2,
        retry_delay: float = 0.25,
        timeout: float = 15.0,
    ):
        if tls not in self.TLS_MODES:
            raise ValueError(f"backend_tls must be one of {', '.join(self.TLS_MODES)}, not {tls!r}")
        self.tls = tls
        self.ssl_context = ssl_context
        self.connect_timeout = connect_timeout
        self.retries = retries
        self.retry_delay = retry_delay
        self.timeout = timeout

    async def connect(self, host: str, port: int) -> BackendSide:
        loop = asyncio.get_running_loop()
        delay = self.retry_delay
        last: Exception | None = None
        for attempt in range(1 + max(0, self.retries)):
            if attempt:
                await asyncio.sleep(delay)
                delay *= 2
            try:
                async with asyncio.timeout(self.connect_timeout):
                    _, proto = await loop.create_connection(
                        BackendSide,
                        host,
                        port,
                        ssl=self.ssl_context if self.tls == "tls" else None,
                        server_hostname=host if self.tls == "tls" else None,
                    )
                return proto
            except (OSError, TimeoutError, ssl.SSLError) as e:
                last = e
        raise BackendError(f"{host}:{port} unreachable after {1 + max(0, self.retries)} tries: {last!r}")

    @contextlib.asynccontextmanager
    async def exchange(self, proto: BackendSide, host: str, port: int):
        """The login exchange on a new connection: bounded by `timeout`; on
        any failure the connection is closed, and network failures are
        BackendError."""
        try:
            async with asyncio.timeout(self.timeout):
                yield
        except (TimeoutError, OSError, ssl.SSLError) as e:
            proto.close()
            raise BackendError(f"{host}:{port}: {e!r}") from None
        except BaseException:
            proto.close()
            raise

    async def start_tls(self, proto: BackendSide, host: str) -> None:
        """TLS on a connection after the protocol's STARTTLS was accepted."""
        loop = asyncio.get_running_loop()
        proto.transport = await loop.start_tls(proto.transport, proto, self.ssl_context, server_hostname=host)


class BackendLogin(BackendConnector):
    """pop-proxy's login to a POP3 backend."""

    async def login(
        self, host: str, port: int, user: str, password: str, client_addr: tuple[str, int]
    ) -> tuple[BackendSide, bytes]:
        """Connect and log in; returns (backend, its answer line). The caller
        looks at the answer: "+OK" means logged in (and the backend is ready
        to relay), anything else is the backend's "-ERR" line (the backend is
        then closed already). Raises BackendError."""
        proto = await self.connect(host, port)
        async with self.exchange(proto, host, port):
            greeting = await proto.read_line()
            if not greeting.startswith(b"+OK"):
                raise BackendError(f"backend greeting: {greeting[:80]!r}")
            if self.tls == "stls":
                proto.send(b"STLS\r\n")
                if not (await proto.read_line()).startswith(b"+OK"):
                    raise BackendError("backend refused STLS")
                await self.start_tls(proto, host)
            # XCLIENT and AUTH go in one packet (one round trip less);
            # both pop3d and Dovecot read pipelined commands in order.
            xclient = b"[XCLIENT]" in greeting[:32]
            commands = f"AUTH PLAIN {encode_plain(user, password)}\r\n".encode()
            if xclient:
                commands = f"XCLIENT ADDR={client_addr[0]} PORT={client_addr[1]}\r\n".encode() + commands
            proto.send(commands)
            if xclient and not (await proto.read_line()).startswith(b"+OK"):
                raise BackendError("backend refused XCLIENT")
            answer = await proto.read_line()
        if not answer.startswith(b"+OK"):
            proto.send(b"QUIT\r\n")
            proto.close()
        return proto, answer
