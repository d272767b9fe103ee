"""lmtp-proxy: LMTP from the MTA, relayed per recipient to the user's storage host.

    lmtp-proxy [--listen HOST:PORT] [--unix PATH] [--config FILE] [--hostname NAME] [--log-stderr]

A long-running process in front of the pdeliveryd stores (what Dovecot's
`lmtp_proxy = yes` does), so that an MX pays no start-up per message. Each
RCPT is answered at once from the password server (asyncio client): the
user's mailhost, as `[hosts]` maps it (else the name + `mailhost_suffix`
by DNS, port `lmtp_port`), is where its copy goes; unknown `550 5.1.1`, frozen `450 4.2.1`, password server down
`451 4.4.3`. The message data is spooled as it arrives (spool.WireBody:
`spool_memory_max` bytes in memory, the rest in an unnamed file in
`proxy_spool_dir`) and, after the client's end of data, sent to every store
holding a recipient at once, over pooled connections (delivery/storepool.py).
DSN is announced: RET, ENVID, NOTIFY and ORCPT go on to the stores that
announce DSN too (pdeliveryd does), and are dropped for the others.
Each accepted recipient gets its store's own reply, in RCPT order; a store
down or too slow (`connect_timeout`, `timeout` per reply) gives `451 4.4.1`
to its recipients only. No recipient hears `250` before its store said it.

Settings: `[delivery]` (delivery/config.py; flags override). SIGHUP re-reads
them (limits, timeouts, pool; not the listening addresses); SIGTERM stops
listening, lets open transactions finish for `shutdown_grace` seconds, then
closes what is left. docs/delivery.md, "lmtp-proxy".
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
from dataclasses import dataclass

from delivery import config as dconfig
from delivery.layout import LayoutError, check_user
from delivery.lmtp import MessageReceived, RcptRequest, Reply
from delivery.lmtpclient import LMTPUnavailable
from delivery.lmtpsessions import READ_SIZE, LMTPSessions, reader_memory_bound
from delivery.message import HEADER_SCAN_MAX
from delivery.metrics import collector as delivery_metrics
from delivery.pdelivery import refused_rcpt
from delivery.replies import (
    R_BAD_ADDRESS,
    R_FROZEN,
    R_LOCAL_ERROR,
    R_LOOKUP_DOWN,
    R_NO_ROUTE,
    R_NO_USER,
    R_RCPT_OK,
    store_unavailable,
)
from delivery.spool import WireBody, open_unnamed
from delivery.storepool import SEND_CHUNK, Envelope, Recipient, StorePool
from delivery.users import LookupUnavailable, PwserverLookup, user_from_address
from pwmail.base import daemon, hostmap, metrics
from pwmail.base.errors import exit_on_config_error
from pwmail.base.logsetup import setup_logging

log = logging.getLogger("lmtp-proxy")

RESTART_ONLY = ("proxy_listen", "proxy_unix", "proxy_unix_mode")
# the client's MAIL parameters passed on as they came (to a store offering DSN);
# SIZE, BODY and XQUEUEID the proxy sets itself for each store
DSN_MAIL_PARAMS = ("RET", "ENVID")
# asyncio's write buffer to a store before drain() waits (its default high-water mark)
STORE_WRITE_BUFFER = 64 * 1024


def session_memory_bound(cfg: dict, stores: int = 1) -> int:
    """Bytes a session holds at most, whatever its messages' size
    (docs/delivery.md, "lmtp-proxy"): its input (lmtpsessions), the body's
    bytes in memory and its head, and per store the message is being sent
    to at once: one spool read, the transport's copy of what the socket did
    not take of it, and the write buffer drain() lets fill."""
    return (
        reader_memory_bound()
        + int(cfg["spool_memory_max"])
        + HEADER_SCAN_MAX
        + stores * (2 * SEND_CHUNK + STORE_WRITE_BUFFER)
    )


@dataclass(frozen=True)
class Routed:
    """An accepted recipient: its RCPT for the store, and which store."""

    host: str
    port: int
    rcpt: Recipient


def _param_text(params: dict[str, str]) -> str:
    """RFC 3461 parameters as lmtp.py checked them, as " K=V" text."""
    return "".join(f" {k}={v}" for k, v in params.items())


class LMTPProxy(LMTPSessions):
    greeting = "LMTP lmtp-proxy ready"
    # DSN announced, its parameters passed on to the stores that announce it too
    dsn = True

    def __init__(self, cfg: dict, users, *, hostname: str | None = None, config_path: str | None = None):
        self.users = users
        self.config_path = config_path  # where [placement] is read too
        super().__init__(cfg, hostname or socket.getfqdn())
        self.pool = StorePool(self.hostname, **self._pool_settings(cfg))
        self.apply(cfg)

    @staticmethod
    def _pool_settings(cfg: dict) -> dict:
        return {
            "pool_size": int(cfg["proxy_pool_size"]),
            "pool_idle": float(cfg["proxy_pool_idle"]),
            "connections_max": int(cfg["proxy_store_connections_max"]),
            "connect_timeout": float(cfg["connect_timeout"]),
            "timeout": float(cfg["timeout"]),
        }

    def apply(self, cfg: dict) -> None:
        placement = dconfig.placement_rule(self.config_path)  # may raise: nothing changed yet
        hosts = hostmap.load(self.config_path)
        super().apply(cfg)
        self.pool.configure(**self._pool_settings(cfg))
        self.placement, self.hosts = placement, hosts

    def mailhost(self, rec) -> str | None:
        """The user's mailhost, else the [placement] rule's pick (as pdelivery)."""
        if rec.mailhost:
            return rec.mailhost
        try:
            return self.placement.pick(rec.name)
        except Exception as e:
            log.error("placement rule: %s", e)
            return None

    def new_body(self) -> WireBody:
        spool_dir = self.cfg["proxy_spool_dir"]
        return WireBody(lambda: open_unnamed(spool_dir), int(self.cfg["spool_memory_max"]))

    async def rcpt(self, ev: RcptRequest, accepted: list) -> Reply:
        refusal = refused_rcpt(ev)  # what cannot go on a command line to a store
        if refusal is not None:
            return refusal
        user = user_from_address(ev.address, self.cfg["recipient_delimiter"])
        try:
            check_user(user)
        except LayoutError:
            return R_BAD_ADDRESS
        try:
            rec = await self.users.lookup(user)
        except LookupUnavailable as e:
            log.warning("lookup of %s: %s", user, e)
            return R_LOOKUP_DOWN
        if rec is None:
            return R_NO_USER
        if rec.frozen:
            return R_FROZEN
        host = self.mailhost(rec)
        if not host:
            return R_NO_ROUTE
        host, port = dconfig.store_address(self.hosts, self.cfg, host)
        accepted.append(Routed(host, port, Recipient(ev.address, _param_text(ev.params))))
        return R_RCPT_OK

    async def message(self, ev: MessageReceived, accepted: list[Routed]) -> list[Reply]:
        replies: list[Reply] = [R_LOCAL_ERROR] * len(accepted)
        body = ev.body
        if getattr(body, "error", None) is not None:
            log.error("qid=%s: spool: %s", ev.queue_id or "-", body.error)
            return replies
        dsn = {k: ev.params[k] for k in DSN_MAIL_PARAMS if k in ev.params}
        env = Envelope(ev.sender, ev.queue_id, ev.params.get("BODY", ""), _param_text(dsn))
        by_host: dict[tuple[str, int], list[int]] = {}
        for i, r in enumerate(accepted):
            by_host.setdefault((r.host, r.port), []).append(i)

        async def relay(store: tuple[str, int], idx: list[int]) -> None:
            host, port = store
            try:
                got = await self.pool.deliver(host, port, env, [accepted[i].rcpt for i in idx], body)
            except LMTPUnavailable as e:
                log.warning("store %s:%d: %s", host, port, e)
                got = [store_unavailable(host, e)] * len(idx)
            except OSError as e:  # the spool could not be read
                log.error("qid=%s: spool: %s", ev.queue_id or "-", e)
                got = [R_LOCAL_ERROR] * len(idx)
            for i, r in zip(idx, got):
                replies[i] = r

        await asyncio.gather(*(relay(h, idx) for h, idx in by_host.items()))
        for r, reply in zip(accepted, replies):
            log.log(
                logging.INFO if reply.ok else logging.WARNING,
                "qid=%s to=%s via %s: %s",
                ev.queue_id or "-",
                r.rcpt.address,
                r.host,
                reply,
            )
        return replies

    def session_ended(self, peer, messages: int) -> None:
        log.info("%s: session ended after %d message(s)", peer or "unix", messages)


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="lmtp-proxy",
        description="LMTP proxy: each recipient to its storage host. "
        "SIGHUP re-reads [delivery]; SIGTERM stops listening and lets open "
        "transactions finish for shutdown_grace seconds.",
    )
    p.add_argument("--listen", help="HOST:PORT (default [delivery] proxy_listen)")
    p.add_argument("--unix", help="also listen on this UNIX socket (default [delivery] proxy_unix)")
    p.add_argument("--config", help="settings file (default $PWMAIL_CONF or /etc/pwmail.toml)")
    p.add_argument("--hostname", help="name in the greeting and in LHLO to the stores")
    p.add_argument("--log-stderr", action="store_true")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def effective_config(args) -> dict:
    cfg = dconfig.load(args.config)
    if args.listen:
        cfg["proxy_listen"] = args.listen
    if args.unix:
        cfg["proxy_unix"] = args.unix
    return cfg


async def _unix_server(proxy: LMTPProxy, path: str, mode: int):
    if os.path.exists(path) and not os.path.isdir(path):
        os.unlink(path)  # left by a previous run
    srv = await asyncio.start_unix_server(proxy.session, path=path, limit=READ_SIZE, backlog=daemon.LISTEN_BACKLOG)
    os.chmod(path, mode)
    return srv


async def serve(cfg: dict, args) -> int:
    proxy = LMTPProxy(cfg, PwserverLookup(), hostname=args.hostname, config_path=args.config)
    sock = daemon.listening_socket(cfg["proxy_listen"], int(cfg["lmtp_port"]))
    servers = [await asyncio.start_server(proxy.session, sock=sock, limit=READ_SIZE, backlog=daemon.LISTEN_BACKLOG)]
    unix = cfg["proxy_unix"]
    if unix:
        servers.append(await _unix_server(proxy, unix, int(cfg["proxy_unix_mode"])))
    proxy.start_sweeper()
    exporter = metrics.optional(
        cfg["proxy_metrics_listen"], delivery_metrics(proxy), name="lmtp-proxy", loop=asyncio.get_running_loop()
    )

    def reload() -> None:
        new = daemon.reread_settings(lambda: effective_config(args), proxy.cfg, RESTART_ONLY)
        setup_logging("lmtp-proxy", stderr=args.log_stderr, level=args.log_level.upper())
        proxy.apply(new)
        log.info("reloaded settings")

    stop = daemon.handle_signals(on_reload=reload, clients=proxy.users.clients)
    log.info(
        "listening on %s%s; message data: %.1f MiB per session at most (one store), the rest spooled in %s",
        sock.getsockname(),
        f" and {unix}" if unix else "",
        session_memory_bound(cfg) / 2**20,
        cfg["proxy_spool_dir"],
    )
    daemon.announce("lmtp-proxy", sock)
    try:
        await daemon.wait_for_signal(stop)
        for srv in servers:
            srv.close()  # no new sessions from here on
        proxy.request_stop()
        left = await daemon.drain(lambda: len(proxy.sessions), float(proxy.cfg["shutdown_grace"]), "sessions")
        if left:
            log.warning("stopping: %d session(s) still open after the grace are cut", left)
        proxy.abort_all()
        log.info("stopped")
    finally:
        for srv in servers:
            srv.close()
        if unix and os.path.exists(unix):
            os.unlink(unix)
        proxy.pool.close()
        if exporter is not None:
            exporter.close()
        await proxy.users.close()
    return 0


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging("lmtp-proxy", stderr=args.log_stderr, level=args.log_level.upper())
    try:
        cfg = effective_config(args)
        daemon.parse_listen(cfg["proxy_listen"], int(cfg["lmtp_port"]))
        hostmap.load(args.config)
    except Exception as e:
        print(f"lmtp-proxy: {e}", file=sys.stderr)
        return 78  # EX_CONFIG
    daemon.raise_nofile()
    # a listener that cannot bind (the metrics address busy): one line, EX_CONFIG
    return exit_on_config_error("lmtp-proxy", lambda: daemon.run(serve(cfg, args)))


if __name__ == "__main__":
    sys.exit(main())
