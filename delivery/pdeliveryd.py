"""pdeliveryd: the LMTP server of a storage host (the paper's III.F).

    pdeliveryd --listen HOST:PORT --root DIR [--layout SCHEME] [--users pwserver|passwd:FILE]

Settings come from `[delivery]` in /etc/pwmail.toml (delivery/config.py);
flags override. SIGTERM: stop listening, finish the transactions in flight,
say 421 to idle sessions, exit 0. SIGHUP: re-read the settings (limits,
timeouts, mailhost names) and re-open logging. `--clean-tmp` removes stale
tmp/ files under the whole root once and exits (for cron); deliveries also
clean each mailbox's tmp/ as they pass. Message data is spooled as it
arrives (delivery/spool.py): memory per session is session_memory_bound().
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys

from delivery import config as dconfig
from delivery.layout import SCHEMES, MailboxLayout
from delivery.lmtp import MessageReceived, RcptRequest, Reply
from delivery.lmtpsessions import READ_SIZE, LMTPSessions, reader_memory_bound
from delivery.maildir import ROOT_MARKER, MaildirWriter, clean_tree
from delivery.message import HEADER_SCAN_MAX
from delivery.metrics import collector as delivery_metrics
from delivery.store import MailStore, RecipientCheck
from delivery.users import PasswdFileLookup, PwserverLookup
from pwmail.base import cli, daemon, metrics
from pwmail.base.errors import exit_on_config_error
from pwmail.base.logsetup import setup_logging
from pwmail.base.sdnotify import notify_ready

log = logging.getLogger("pdeliveryd")


def session_memory_bound(cfg: dict) -> int:
    """Bytes a session holds at most, whatever the size of its messages
    (docs/delivery.md, "Memory"): its input buffers (lmtpsessions), the
    body's bytes kept in memory (spool_memory_max) and its head (HEADER_SCAN_MAX)."""
    return reader_memory_bound() + int(cfg["spool_memory_max"]) + HEADER_SCAN_MAX


def make_users(spec: str, pwserver_conf: str | None = None):
    """`spec` as the [delivery] users key (checked by delivery/config.py)."""
    if spec.startswith("passwd:"):
        return PasswdFileLookup(spec[len("passwd:") :])
    return PwserverLookup(pwserver_conf=pwserver_conf)


class DeliveryServer(LMTPSessions):
    """LMTP sessions (lmtpsessions) whose policy is RecipientCheck / MailStore."""

    greeting = "LMTP pdeliveryd ready"
    dsn = True  # RFC 3461 parameters accepted (and logged: ORCPT)

    def __init__(self, cfg: dict, users, *, hostname: str | None = None):
        self.users = users
        self.layout = MailboxLayout(cfg["root"], cfg["layout"])
        self.store = MailStore(
            MaildirWriter(self.layout),
            io_threads=int(cfg["io_threads"]),
            dedup_window=float(cfg["dedup_window"]),
            dedup_max=int(cfg["dedup_max"]),
            tmp_max_age=float(cfg["tmp_max_age"]),
        )
        super().__init__(cfg, hostname or socket.getfqdn())
        self.apply(cfg)
        self.store.alone = lambda: len(self.sessions) == 1
        self.server: asyncio.base_events.Server | None = None

    def apply(self, cfg: dict) -> None:
        """Settings that may change at run time (SIGHUP)."""
        super().apply(cfg)
        self.check = RecipientCheck(self.users, cfg["mailhost_names"], cfg["recipient_delimiter"])
        self.store.recheck = self.check.check
        self.store.dedup.window = float(cfg["dedup_window"])
        self.store.dedup.max_entries = int(cfg["dedup_max"])
        self.store.tmp_max_age = float(cfg["tmp_max_age"])
        self.store.spool_memory_max = int(cfg["spool_memory_max"])

    def new_body(self):
        return self.store.new_body()

    async def rcpt(self, ev: RcptRequest, accepted: list) -> Reply:
        reply, rec = await self.check.check(ev.address)
        if rec is not None:
            accepted.append(rec)
        return reply

    async def message(self, ev: MessageReceived, accepted: list) -> list[Reply]:
        return await self.store.deliver(ev, accepted)

    async def start(self, host: str, port: int) -> None:
        if not (self.layout.root / ROOT_MARKER).exists():
            log.warning(
                "storage root %s has no %s: deliveries get 451 until it is mounted", self.layout.root, ROOT_MARKER
            )
        self.store.dedup.load()
        sock = daemon.bind_listener(host, port)
        self.server = await asyncio.start_server(
            self.session, sock=sock, limit=READ_SIZE, backlog=daemon.LISTEN_BACKLOG
        )
        self.start_sweeper()
        addr = self.server.sockets[0].getsockname()
        log.info("listening on %s:%d root=%s layout=%s", addr[0], addr[1], self.layout.root, self.layout.scheme)
        per_session = session_memory_bound(self.cfg)
        log.info(
            "message data: %.1f MiB per session at most, %.0f MiB for sessions_max %s (the rest spooled in %s)",
            per_session / 2**20,
            per_session * int(self.cfg["sessions_max"]) / 2**20,
            self.cfg["sessions_max"],
            self.layout.root,
        )

    @property
    def port(self) -> int:
        return self.server.sockets[0].getsockname()[1]

    def request_stop(self) -> None:
        if self.server is not None:
            self.server.close()
        super().request_stop()

    async def wait_stopped(self, grace: float = 30.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.sessions and loop.time() < deadline:
            await asyncio.sleep(0.05)
        self.abort_all()
        await self.users.close()
        self.store.close()


def parse_args(argv):
    p = argparse.ArgumentParser(prog="pdeliveryd", description="LMTP delivery into hashed Maildirs")
    p.add_argument("--listen", help="HOST:PORT (default 0.0.0.0:lmtp_port)")
    p.add_argument("--lmtp-port", type=int, help="port when --listen gives none")
    p.add_argument("--root", help=f"storage root (must hold {ROOT_MARKER})")
    p.add_argument("--layout", choices=SCHEMES)
    p.add_argument("--users", help="'pwserver' (default) or 'passwd:FILE'")
    cli.add_common_flags(p)
    p.add_argument("--hostname", help="name in the greeting and in file names")
    p.add_argument("--init-root", action="store_true", help="create the root marker in --root and exit")
    p.add_argument("--clean-tmp", action="store_true", help="remove stale tmp/ files under the root and exit")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def effective_config(args) -> dict:
    """[delivery] from the file, the flags given over it (both checked)."""
    return dconfig.SECTION.override(
        dconfig.load(args.config),
        {key: getattr(args, key) for key in ("root", "layout", "users", "lmtp_port", "listen")},
    )


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return exit_on_config_error("pdeliveryd", lambda: start(args))


def start(args) -> int:
    cfg = effective_config(args)
    setup_logging("pdeliveryd", stderr=args.log_stderr, daemon=True, level=args.log_level.upper())
    if args.init_root:
        os.makedirs(cfg["root"], exist_ok=True)
        open(os.path.join(cfg["root"], ROOT_MARKER), "a").close()
        return 0
    if args.clean_tmp:
        n = clean_tree(cfg["root"], float(cfg["tmp_max_age"]))
        log.info("removed %d stale tmp file(s) under %s", n, cfg["root"])
        return 0
    host, port = dconfig.parse_hostport(cfg["listen"] or "0.0.0.0", int(cfg["lmtp_port"]), port_zero=True)
    return asyncio.run(serve(cfg, host, port, args))


def raise_fd_limit(sessions_max: int) -> None:
    """Each session holds a socket and each delivery a few descriptors: lift
    the soft limit to the hard one when sessions_max needs it."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4 * sessions_max + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < want:
            log.warning("open files limited to %d: sessions_max %d may not be reachable", new, sessions_max)


async def serve(cfg: dict, host: str, port: int, args) -> int:
    raise_fd_limit(int(cfg["sessions_max"]))
    server = DeliveryServer(cfg, make_users(cfg["users"], args.pwserver_conf), hostname=args.hostname)
    await server.start(host, port)
    loop = asyncio.get_running_loop()
    exporter = metrics.optional(cfg["metrics_listen"], delivery_metrics(server), name="pdeliveryd", loop=loop)
    stop = asyncio.Event()

    def on_term():
        server.request_stop()
        stop.set()

    def on_hup():
        try:
            new = effective_config(args)
        except Exception as e:
            log.error("reload failed, keeping the old settings: %s", e)
            daemon.reconfigure_clients(server.users.clients)
            return
        for key in ("root", "layout", "listen", "lmtp_port", "users", "io_threads"):
            if new[key] != server.cfg[key]:
                log.warning("reload: %s changed; it takes effect at restart", key)
                new[key] = server.cfg[key]
        setup_logging("pdeliveryd", stderr=args.log_stderr, daemon=True, level=args.log_level.upper())
        server.apply(new)
        log.info("reloaded settings")
        daemon.reconfigure_clients(server.users.clients)

    loop.add_signal_handler(signal.SIGTERM, on_term)
    loop.add_signal_handler(signal.SIGINT, on_term)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    print(f"pdeliveryd: ready on {host}:{server.port}", file=sys.stderr, flush=True)
    notify_ready()  # systemd Type=notify (examples/systemd/pdeliveryd.service)
    await stop.wait()
    await server.wait_stopped()
    if exporter is not None:
        exporter.close()
    log.info("stopped; %d message(s) delivered", server.store.delivered)
    return 0


if __name__ == "__main__":
    sys.exit(main())
