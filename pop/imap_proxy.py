"""`imap-proxy`: the IMAP distributor, pop-proxy's twin on the same core
(pop/proxy_core.py).

    imap-proxy --listen HOST:PORT [--tls-listen HOST:PORT] [--backend-port N] [--tls-cert F --tls-key F]

Before login it speaks IMAP itself (pop/imap_protocol.py): greeting with
CAPABILITY, CAPABILITY, NOOP, LOGOUT, ID, STARTTLS, LOGIN, AUTHENTICATE
PLAIN. With the credentials it asks the password server for the user's
mailhost, logs in to that backend (pop/imap_backend.py) and relays bytes
both ways; the client's tagged OK carries the backend's capabilities.
Refusals carry RFC 5530 codes: [AUTHENTICATIONFAILED] for a wrong
password and an unknown user alike (same text, same delay),
[UNAVAILABLE] when the password server or the backend is down or the
client is throttled, [INUSE] while the mailbox is being moved.

Everything runs in Python (pop-proxy's C engine is POP3 only). Settings in
[imap] (docs/imap.md); SIGHUP and SIGTERM as for pop-proxy.
"""

from __future__ import annotations

import logging

from pwmail.base import daemon
from pwmail.base.errors import exit_on_config_error

from . import config as popconfig
from . import proxy_core as core
from .imap_backend import ImapBackendLogin, status
from .imap_protocol import Closed, Login, ServerConnection, StartTLS, login_ok

log = logging.getLogger("imap-proxy")

GREETING = "IMAP ready."
TOO_MANY = b"* BYE [UNAVAILABLE] Too many connections, try again later.\r\n"
KICKED = b"* BYE [UNAVAILABLE] Mailbox is being moved, log in again in a few minutes.\r\n"
# The core's codes as RFC 5530 response codes (others pass as they are).
IMAP_CODES = {
    core.FAILED: "AUTHENTICATIONFAILED",
    core.TEMPORARY: "UNAVAILABLE",
    core.IN_USE: "INUSE",
    core.THROTTLED: "UNAVAILABLE",
}
# Codes a backend may give after a good password; passed on to the client.
PASSED_CODES = {"UNAVAILABLE", "INUSE", "LIMIT", "EXPIRED", "CONTACTADMIN"}


class ImapProxyServer(core.ProxyCore):
    name = "imap-proxy"

    def make_backend(self, cfg: dict) -> ImapBackendLogin:
        return ImapBackendLogin(
            tls=cfg["backend_tls"],
            ssl_context=core.backend_ssl_context(cfg),
            connect_timeout=cfg["backend_connect_timeout"],
            retries=cfg["backend_retries"],
            retry_delay=cfg["backend_retry_delay"],
            timeout=cfg["backend_timeout"],
            forward_id=cfg["backend_id"],
        )

    def logged_in(self, answer: bytes) -> bool:
        return status(answer)[1] == b"OK"

    def refused(self, answer: bytes) -> tuple:
        _, _, code, text = status(answer)
        if code in PASSED_CODES:
            return ("err", code, text.decode("utf-8", "replace") or "Try again later.", False)
        return self.failed()

    def protocol(self) -> ImapClientSide:
        return ImapClientSide(self)

    def tls_protocol(self) -> ImapClientSide:
        return ImapClientSide(self, implicit_tls=True)


class ImapClientSide(core.FrontSession):
    """One client connection: IMAP before login, relay after."""

    Login, StartTLS, Closed = Login, StartTLS, Closed
    too_many = TOO_MANY
    farewell = KICKED
    greeting = GREETING

    def new_conn(self) -> ServerConnection:
        return ServerConnection(
            starttls=self.server.tls_context is not None,
            tls_active=self.implicit_tls,
            plaintext_auth=self.server.cfg["plaintext_auth"],
        )

    def connection_made(self, transport) -> None:
        if self.start(transport, admitted=False):
            self._flush()

    def other_event(self, event) -> None:  # the state machine has no other events
        raise AssertionError(f"unexpected event {event!r}")

    def reject(self, code: str, text: str) -> None:
        self.conn.reject_login(text, IMAP_CODES.get(code, code))

    def login_answer(self, event: Login, answer: bytes) -> bytes:
        """The backend's tagged OK with the client's tag."""
        _, _, _, text = status(answer)
        caps = answer.split(b"[CAPABILITY ", 1)[1].split(b"]", 1)[0].decode("ascii", "replace")
        return login_ok(event.tag, caps, text.decode("utf-8", "replace") or "Logged in.")


def settings(args) -> dict:
    """[imap] from the settings file, with the command line's flags over it."""
    return core.with_flags(popconfig.IMAP_SECTION, popconfig.load_imap(args.config), args)


def main(argv: list[str] | None = None) -> int:
    p = core.arg_parser(
        "imap-proxy",
        "IMAP distributor: relays each user to their mailhost. SIGHUP re-reads "
        "the settings for new sessions; SIGTERM stops accepting and gives open sessions shutdown_grace "
        "seconds to end.",
        "imap",
        "STARTTLS",
        "IMAPS",
    )
    args = p.parse_args(argv)
    return exit_on_config_error("imap-proxy", lambda: start(args))


def start(args) -> int:
    cfg = settings(args)
    core.setup_process("imap-proxy", args)
    daemon.run(core.serve(args, cfg, ImapProxyServer, lambda: settings(args), ports=(143, 993), tls_name="IMAPS"))
    return 0
