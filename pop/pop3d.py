"""`pop3d`: a small POP3 server over the hashed Maildirs of a storage host.

    pop3d --listen HOST:PORT --root DIR [--layout SCHEME] [--trusted NET ...]

The protocol is pop/protocol.py; the mailbox is pop/mailbox.py; passwords
are checked with crypt(3) (pop/crypt.py) against the shadow hash from the
password server (which needs the root-only shadow key in
/etc/pwserver.conf). This file is the asyncio glue and the policy.

Settings come from `[pop]` in /etc/pwmail.toml (pop/config.py); flags
override. SIGTERM or SIGINT: stop listening at once (new connections are
refused), let open sessions go on, QUIT and its deletions included, for up
to `shutdown_grace` seconds, then close the rest (nothing of theirs is
deleted) and exit 0. SIGHUP: re-read `[pop]` and re-open logging; new
sessions get the new trusted_networks, pop3d_failure_delay,
pop3d_timeout and pop3d_dummy_hash, open ones keep theirs; pop3d_listen, root and layout need a
restart; a bad file is logged and the old settings stay.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import time

from delivery.layout import SCHEMES, LayoutError, MailboxLayout, check_user
from pwcache.client import AsyncClient, Denied, PwError, Unavailable
from pwmail.base import cli, daemon, metrics
from pwmail.base.errors import exit_on_config_error
from pwmail.base.logsetup import setup_logging

from . import config as popconfig
from . import crypt
from . import metrics as popmetrics
from .mailbox import MailboxBusy, MaildirMailbox
from .protocol import NEED_DATA, NEED_REPLY, Closed, Command, Login, RemoteProtocolError, ServerConnection, XClient

log = logging.getLogger("pop3d")
READ_SIZE = 65536
DRAIN_ABOVE = 256 * 1024  # write buffer allowed before awaiting drain
RESTART_ONLY = ("pop3d_listen", "root", "layout")  # SIGHUP warns and keeps these


class Pop3Server:
    def __init__(
        self,
        layout: MailboxLayout,
        pw: AsyncClient,
        *,
        trusted=(),
        failure_delay: float = 2.0,
        timeout: float = 600.0,
        dummy_hash: str = "",
    ):
        self.layout = layout
        self.pw = pw
        self.dummy_model: str | None = None
        self.configure(trusted=trusted, failure_delay=failure_delay, timeout=timeout, dummy_hash=dummy_hash)
        self.tasks: set[asyncio.Task] = set()
        self.logins: collections.Counter[str] = collections.Counter()  # by result (pop/metrics.py)

    def configure(self, *, trusted, failure_delay: float, timeout: float, dummy_hash: str = "") -> None:
        """New values for sessions that start from now on (a session copies
        them when it starts). Checks everything before changing anything."""
        nets = popconfig.networks(trusted)
        failure_delay, timeout = float(failure_delay), float(timeout)
        dummy = self.dummy if dummy_hash == self.dummy_model else crypt.DummyHash(dummy_hash)
        self.trusted, self.failure_delay, self.timeout = nets, failure_delay, timeout
        self.dummy, self.dummy_model = dummy, dummy_hash

    @property
    def sessions(self) -> int:
        return len(self.tasks)

    async def cut(self) -> None:
        """End every open session now (shutdown): each logs "ended:
        shutdown", deletes nothing and releases its mailbox."""
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        session = Pop3Session(self, reader, writer, peer[0], peer[1])
        task = asyncio.current_task()
        self.tasks.add(task)
        try:
            await session.run()
        except (ConnectionError, OSError) as e:
            log.info("session %s:%s ended: %s", session.addr, session.port, e)
        except asyncio.CancelledError:
            # Shutting down: end quietly (asyncio's stream callback would
            # otherwise log the cancellation as an error). Nothing is deleted.
            log.info("session %s:%s ended: shutdown", session.addr, session.port)
        except Exception:
            log.exception("session %s:%s failed", session.addr, session.port)
        finally:
            self.tasks.discard(task)
            if session.mailbox is not None:
                session.mailbox.close()
            writer.close()

    # --- authentication ---------------------------------------------------------------
    async def authenticate(self, user: str, password: str) -> tuple[str | None, str]:
        """(None, "") on success, else (RFC 3206 code, text)."""
        loop = asyncio.get_running_loop()
        try:
            check_user(user)
            entry = await self.pw.shadow_by_name(user)
        except LayoutError:
            entry = None
        except Unavailable:
            return "SYS/TEMP", "Authentication service unavailable, try again later."
        except (Denied, PwError) as e:
            log.error("shadow lookup refused (is shadow_keyfile set and readable?): %s", e)
            return "SYS/TEMP", "Authentication service unavailable, try again later."
        # No such user: checked against the dummy, as long as a wrong password.
        hashed = entry.hash if entry is not None else None
        ok = await loop.run_in_executor(None, self.dummy.check, password, hashed)
        if ok and entry.expire is not None and entry.expire > 0 and time.time() // 86400 >= entry.expire:
            ok = False  # expired account (shadow(5); 0 means none, as in shadow-utils)
        if not ok:
            return "AUTH", "Authentication failed."
        try:
            host = await self.pw.mailhost(user)
        except Unavailable:
            return "SYS/TEMP", "Authentication service unavailable, try again later."
        if host is not None and host.frozen:
            return "IN-USE", "Mailbox is being moved, try again later."
        return None, ""


class Pop3Session:
    def __init__(self, server: Pop3Server, reader, writer, addr: str, port: int):
        self.server = server
        self.reader = reader
        self.writer = writer
        self.addr, self.port = addr, port
        # The settings as they are now: a SIGHUP later changes only new sessions.
        self.trusted = popconfig.address_in(addr, server.trusted)
        self.failure_delay, self.timeout = server.failure_delay, server.timeout
        self.conn = ServerConnection(xclient=self.trusted, implementation="pwmail-pop3d")
        self.mailbox: MaildirMailbox | None = None
        self.user: str | None = None

    async def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.writer.write(data)
            if self.writer.transport.get_write_buffer_size() > DRAIN_ABOVE:
                await self.writer.drain()

    async def run(self) -> None:
        conn = self.conn
        conn.send_greeting("pwmail pop3d ready.")
        while True:
            try:
                event = conn.next_event()
            except RemoteProtocolError as e:
                log.info("%s:%s: %s", self.addr, self.port, e)
                break
            if event is NEED_DATA:
                await self.flush()
                await self.writer.drain()
                try:
                    data = await asyncio.wait_for(self.reader.read(READ_SIZE), self.timeout)
                except TimeoutError:
                    conn.abort("Disconnected for inactivity.")
                    break
                try:
                    conn.receive_data(data)
                except RemoteProtocolError as e:
                    log.info("%s:%s: %s", self.addr, self.port, e)
                    break
            elif isinstance(event, Closed):
                break
            elif isinstance(event, Login):
                await self.login(event)
            elif isinstance(event, XClient):
                self.addr = event.attributes.get("ADDR", self.addr)
                self.port = event.attributes.get("PORT", self.port)
                conn.reply_ok()
            elif isinstance(event, Command):
                await self.command(event)
            elif event is NEED_REPLY:  # pragma: no cover - every event above is answered
                raise AssertionError("unanswered event")
            else:
                conn.reply_err("Not supported.")
        data = conn.data_to_send()
        if data:
            self.writer.write(data)
            await self.writer.drain()

    async def login(self, event: Login) -> None:
        server = self.server
        started = time.monotonic()
        code, text = await server.authenticate(event.user, event.password)
        if code is None:
            box = MaildirMailbox(server.layout.path(event.user))
            try:
                await asyncio.get_running_loop().run_in_executor(None, box.open)
            except MailboxBusy:
                code, text = "IN-USE", "Mailbox is locked by another POP3 session."
            except OSError as e:
                log.error("%s: cannot open %s: %s", event.user, box.path, e)
                code, text = "SYS/TEMP", "Mailbox unavailable, try again later."
        server.logins[popmetrics.POP3D_RESULTS.get(code, "unavailable")] += 1
        if code is None:
            self.mailbox, self.user = box, event.user
            count, size = box.stat()
            log.info(
                "login user=%s from=%s:%s method=%s messages=%d",
                event.user,
                self.addr,
                self.port,
                event.mechanism,
                count,
            )
            self.conn.accept_login(f"Logged in, {count} messages ({size} octets).")
            return
        log.info("login failed user=%s from=%s:%s code=%s", event.user, self.addr, self.port, code)
        if code == "AUTH" and not self.trusted:
            await asyncio.sleep(max(0.0, started + self.failure_delay - time.monotonic()))
        self.conn.reject_login(text, code)

    async def command(self, event: Command) -> None:
        conn, box = self.conn, self.mailbox
        verb, args = event.verb, event.args
        if verb == "QUIT":
            deleted = sum(m.deleted for m in box.messages)
            failed = box.commit()
            box.close()
            log.info("logout user=%s deleted=%d failed=%d", self.user, deleted, failed)
            if failed:
                conn.reply_err("Some deleted messages were not removed.", "SYS/TEMP")
            else:
                conn.reply_ok("Bye.")
            return
        if verb == "STAT":
            conn.reply_ok("{} {}".format(*box.stat()))
        elif verb == "NOOP":
            conn.reply_ok()
        elif verb == "RSET":
            box.reset()
            conn.reply_ok(f"{box.stat()[0]} messages")
        elif verb in ("LIST", "UIDL"):
            field = (lambda m: m.size) if verb == "LIST" else (lambda m: m.uidl)
            if args:
                msg = box.get(args[0])
                if msg is None:
                    conn.reply_err("No such message.")
                else:
                    conn.reply_ok(f"{args[0]} {field(msg)}")
            else:
                conn.reply_lines("", (f"{i} {field(m)}" for i, m in box.live()))
        elif verb == "DELE":
            if box.delete(args[0]):
                conn.reply_ok("Marked to be deleted.")
            else:
                conn.reply_err("No such message.")
        elif verb == "RETR":
            await self.retr(args[0])
        elif verb == "TOP":
            msg = box.get(args[0])
            if msg is None:
                conn.reply_err("No such message.")
                return
            try:
                body = box.top(msg, args[1])
            except OSError as e:
                log.error("%s: cannot read %s: %s", self.user, msg.path, e)
                conn.reply_err("Cannot read message.", "SYS/TEMP")
                return
            conn.start_body()
            conn.send_body(body)
            conn.end_body()
        else:
            conn.reply_err("Not supported.")

    async def retr(self, number: int) -> None:
        conn, box = self.conn, self.mailbox
        msg = box.get(number)
        if msg is None:
            conn.reply_err("No such message.")
            return
        try:
            chunks = box.read_chunks(msg)
            first = next(chunks, b"")
        except OSError as e:
            log.error("%s: cannot read %s: %s", self.user, msg.path, e)
            conn.reply_err("Cannot read message.", "SYS/TEMP")
            return
        conn.start_body(f"{msg.size} octets")
        conn.send_body(first)
        await self.flush()
        for chunk in chunks:  # an error past this point closes the session: the reply has begun
            conn.send_body(chunk)
            await self.flush()
        conn.end_body()


async def serve(args, cfg) -> None:
    """cfg: the [pop] section as read from the file (flags not applied), so
    that a SIGHUP compares file with file."""
    layout = MailboxLayout(args.root or cfg["root"], args.layout or cfg["layout"])
    pw = AsyncClient.from_config(args.pwserver_conf)
    server = Pop3Server(
        layout,
        pw,
        trusted=args.trusted or cfg["trusted_networks"],
        failure_delay=cfg["pop3d_failure_delay"],
        timeout=cfg["pop3d_timeout"],
        dummy_hash=cfg["pop3d_dummy_hash"],
    )
    grace = float(cfg["shutdown_grace"])
    sock = daemon.listening_socket(args.listen or cfg["pop3d_listen"], 110)
    srv = await asyncio.start_server(server.handle, sock=sock, limit=READ_SIZE, backlog=daemon.LISTEN_BACKLOG)

    def reload() -> None:
        nonlocal cfg, grace
        new = daemon.reread_settings(lambda: popconfig.load(args.config), cfg, RESTART_ONLY)
        new_grace = float(new["shutdown_grace"])
        server.configure(
            trusted=args.trusted or new["trusted_networks"],
            failure_delay=new["pop3d_failure_delay"],
            timeout=new["pop3d_timeout"],
            dummy_hash=new["pop3d_dummy_hash"],
        )
        cfg, grace = new, new_grace
        setup_logging("pop3d", stderr=args.log_stderr, daemon=True)
        log.info("reloaded settings")

    stop = daemon.handle_signals(on_reload=reload, clients=[pw])
    exporter = metrics.optional(
        cfg["pop3d_metrics_listen"], popmetrics.pop3d_collector(server), name="pop3d", loop=asyncio.get_running_loop()
    )
    daemon.announce("pop3d", sock)
    log.info("serving %s on %s", layout, sock.getsockname())
    try:
        await daemon.wait_for_signal(stop)
        srv.close()  # new connections are refused from here on
        left = await daemon.drain(lambda: server.sessions, grace, "sessions")
        if left:
            log.warning("stopping: %d session(s) still open after %g s are cut", left, grace)
        await server.cut()
        log.info("stopped")
    finally:
        srv.close()
        if exporter is not None:
            exporter.close()
        await pw.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="pop3d",
        description="POP3 server over hashed Maildirs. SIGTERM: stop listening, let open sessions "
        "finish for up to [pop] shutdown_grace seconds, then close them. SIGHUP: re-read [pop] (for new "
        "sessions) and re-open logging.",
    )
    p.add_argument("--listen", help="HOST:PORT (default [pop] pop3d_listen)")
    p.add_argument("--root", help="storage root (default [pop] root)")
    p.add_argument("--layout", choices=SCHEMES, help="hash scheme (default [pop] layout)")
    p.add_argument(
        "--trusted",
        action="append",
        help="network allowed XCLIENT (a proxy); repeatable; replaces [pop] trusted_networks",
    )
    cli.add_common_flags(p)
    args = p.parse_args(argv)
    return exit_on_config_error("pop3d", lambda: start(args))


def start(args) -> int:
    cfg = popconfig.load(args.config)
    # the flags checked only: serve() applies them, cfg stays the file's (SIGHUP compares file with file)
    popconfig.SECTION.override(
        dict(cfg),
        {"pop3d_listen": args.listen, "trusted_networks": args.trusted},
        names={"pop3d_listen": "--listen", "trusted_networks": "--trusted"},
    )
    setup_logging("pop3d", stderr=args.log_stderr, daemon=True)
    daemon.raise_nofile()
    daemon.run(serve(args, cfg))
    return 0
