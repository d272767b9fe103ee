"""`pwserver`: the password server daemon (docs/pwserver.md).

Python keeps configuration, loading, reloads, signals, statistics and
logging; receiving, looking up and answering run in C with the GIL released
(pwcache/_csrc/pw_server.c): one `pws_serve_udp` loop per serving thread on
a shared UDP socket, and one TCP thread (pwcache/tcp_server.py) that hands
each framed request to the same C answer function.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import socket
import stat
import sys
import threading
import time
from dataclasses import dataclass

from pwcache._pwtable import ffi, lib
from pwcache.placement import SECTION as PLACEMENT
from pwcache.placement import PlacementError, PlacementRule
from pwcache.reload_guard import GUARD_DEFAULTS, GuardLimits, Reason, Refusal
from pwcache.source_sql import SOURCE_DEFAULTS, check_source_uri
from pwcache.table import CHandle, Table, TableError
from pwcache.tcp_server import TCP_DEFAULTS, TcpLimits, TcpServer
from pwmail.base import cli, settings
from pwmail.base.errors import ConfigError, exit_on_config_error, listen_error
from pwmail.base.hostport import parse_hostport
from pwmail.base.logsetup import setup_logging
from pwmail.base.sdnotify import notify_ready

DEFAULT_PORT = 7773
DEFAULTS: dict = {
    **TCP_DEFAULTS,  # tcp_* (pwcache/tcp_server.py)
    **GUARD_DEFAULTS,  # reload_max_*, allow_empty (pwcache/reload_guard.py)
    "listen": f"127.0.0.1:{DEFAULT_PORT}",
    "passwd": "",
    "shadow": "",
    "group": "",
    "mailhosts": "",
    "shadow_key": "",
    "network_key": "",
    "allow": ["127.0.0.0/8", "::1/128"],
    "threads": 1,
    "busy_poll_us": 50,
    "poll_seconds": 2.0,
    "syslog": "",
    "metrics_listen": "",  # HOST:PORT for Prometheus metrics (pwcache/server_metrics.py); "" = off
    **SOURCE_DEFAULTS,  # source, source_* (pwcache/source_sql.py)
}
SECTION = settings.Section(
    "pwserver",
    DEFAULTS,
    {
        "listen": settings.address(port_zero=True),
        "metrics_listen": settings.address(empty=True, port_zero=True),
        "allow": settings.networks,
        "threads": settings.between(1, 32),
        "busy_poll_us": settings.between(0, 10000),
        "poll_seconds": settings.positive,
        **{
            key: settings.positive
            for key in ("tcp_max_connections", "tcp_max_per_source", "tcp_frame_timeout", "tcp_idle_timeout")
        },
        "tcp_max_queued": settings.non_negative,
        "source": check_source_uri,
        "source_reconnect_max": settings.positive,
        "source_full_reload_changes": settings.positive,
    },
)
SOURCES = ("passwd", "shadow", "group", "mailhosts")
UDP_RCVBUF = 4 * 1024 * 1024
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux
RELOAD_NICE = 10
COUNTERS_LOG_SECONDS = 600  # the packet counters go to the log this often

log = logging.getLogger("pwserver")


# ---- the C server ---------------------------------------------------------


def _swap_table(server_ptr, table_ptr, generation: int, load_ms: int) -> None:
    """Publishes a table (or NULL) and frees the one it replaces, once no
    serving thread can still read it."""
    old = lib.pws_swap_table(server_ptr, table_ptr, generation, load_ms)
    if old != ffi.NULL:
        lib.pwt_free(old)


class ServerCore(CHandle):
    """The C serving state (pws_server): keys, allowlist, current table,
    counters. close() frees it and the table it holds."""

    what = "server"

    def __init__(self):
        super().__init__(lib.pws_new())
        self.generation = 0
        # One writer at a time (a reload, changes, a fold: pwcache/changes.py);
        # the serving threads never take it.
        self.lock = threading.Lock()
        self.table_ptr = ffi.NULL  # the table served (owned by the C server)
        self.installs = 0  # whole tables installed: a fold of an older one is dropped
        self.load_ms = 0
        self.counter_ids = {ffi.string(lib.pws_counter_name(i)).decode(): i for i in range(lib.pws_ncounters())}

    def set_keys(self, network_key: bytes | None, shadow_key: bytes | None) -> None:
        # the C side copies the keys
        lib.pws_set_keys(self.ptr, *(ffi.new("uint8_t[32]", k) if k else ffi.NULL for k in (network_key, shadow_key)))

    def allow(self, cidr: str) -> None:
        try:
            net = ipaddress.ip_network(cidr, strict=False)
        except ValueError as e:
            raise ConfigError(f"bad --allow network {cidr!r}: {e}") from None
        if lib.pws_allow(self.ptr, net.version, net.network_address.packed, net.prefixlen) < 0:
            raise ConfigError(f"cannot allow {cidr!r} (too many networks?)")

    def source_allowed(self, slot: int, host: str) -> bool:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
        return bool(lib.pws_source_allowed(self.ptr, slot, addr.version, addr.packed))

    def install(self, table: Table, load_ms: int) -> None:
        """Publishes `table` (the server takes it) and frees the previous
        one once no serving thread can still read it."""
        with self.lock:
            self.installs += 1
            self.load_ms = load_ms
            self.publish(table.detach())

    def publish(self, table_ptr, new_generation: bool = True) -> None:
        """(self.lock held) Serves a C table as the next generation (or the
        same one: records unchanged, counters only) and frees the previous
        one once no serving thread can still read it."""
        self.generation += 1 if new_generation else 0
        self.table_ptr = table_ptr
        _swap_table(self.ptr, table_ptr, self.generation, self.load_ms)

    def slot(self) -> int:
        slot = lib.pws_slot_acquire(self.ptr)
        if slot < 0:
            raise RuntimeError("no free serving slot")
        return slot

    def release(self, slot: int) -> None:
        lib.pws_slot_release(self.ptr, slot)

    def answerer(self, tcp: bool) -> Answerer:
        return Answerer(self, tcp)

    def counters(self) -> dict[str, int]:
        return {name: lib.pws_counter(self.ptr, i) for name, i in self.counter_ids.items()}

    def serve_udp(self, fd: int, slot: int) -> int:
        return lib.pws_serve_udp(self.ptr, fd, slot)

    def stop(self) -> None:
        lib.pws_stop(self.ptr)

    def set_busy_poll(self, usec: int) -> None:
        lib.pws_set_busy_poll(self.ptr, usec)

    def set_refusals(self, count: int, last: Refusal) -> None:
        """What STATS says of refused loads: how many, and the last one."""
        lib.pws_set_refusals(
            self.ptr,
            ffi.new(
                "pws_refusals *",
                {
                    "count": count,
                    "time": int(time.time()),
                    "reason": int(last.reason),
                    "users": last.users,
                    "bad_lines": last.bad_lines,
                },
            ),
        )

    def _release(self, ptr) -> None:
        _swap_table(ptr, ffi.NULL, self.generation, 0)
        lib.pws_free(ptr)


_raw_alloc = ffi.new_allocator(should_clear_after_alloc=False)


class Answerer:
    """One thread's way to the C answer function: a slot and an output
    buffer (untouched pages cost no memory)."""

    def __init__(self, core: ServerCore, tcp: bool):
        self.core = core
        self.tcp = 1 if tcp else 0
        self.cap = (lib.PW_MAX_TCP_ANSWER + lib.PW_SEAL_OVERHEAD) if tcp else lib.PW_MAX_UDP_ANSWER
        self.out = _raw_alloc("uint8_t[]", self.cap)
        self.slot = core.slot()

    def answer(self, request: bytes) -> bytes | None:
        """The answer packet, or None when the request is dropped."""
        n = lib.pws_answer(self.core.ptr, self.slot, request, len(request), self.tcp, self.out, self.cap)
        return ffi.buffer(self.out, n)[:] if n else None

    def count(self, counter: str) -> None:
        """Counts an event the caller decided (one of STATS' counters)."""
        lib.pws_count(self.core.ptr, self.slot, self.core.counter_ids[counter])

    def close(self) -> None:
        if self.slot is not None:
            self.core.release(self.slot)
            self.slot = None


# ---- configuration --------------------------------------------------------


@dataclass
class Config:
    listen: tuple[str, int]
    sources: dict[str, str]
    shadow_key: bytes | None
    network_key: bytes | None
    allow: list[str]
    tcp: TcpLimits
    threads: int
    poll_seconds: float
    busy_poll_us: int
    syslog: str
    rule: PlacementRule
    guard: GuardLimits
    accept_shrink: bool  # serve the first load even if the guard refuses it
    metrics_listen: str = ""  # "" = no metrics
    source: str = ""  # a PostgreSQL URI instead of the files (pwcache/pgsource.py)
    source_reconnect_max: float = SOURCE_DEFAULTS["source_reconnect_max"]
    source_full_reload_changes: int = SOURCE_DEFAULTS["source_full_reload_changes"]


def parse_listen(text: str) -> tuple[str, int]:
    """--listen / listen: HOST:PORT, an empty host meaning every address."""
    return parse_hostport(text, default_host="0.0.0.0", port_zero=True)


def read_key(path: str, what: str) -> bytes:
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            text = f.read(200)
    except OSError as e:
        raise ConfigError(f"{what} key {path}: {e.strerror}") from None
    key = ffi.new("uint8_t[32]")
    if lib.pw_parse_key(text, len(text), key) < 0:
        raise ConfigError(f"{what} key {path}: not 64 hexadecimal characters")
    if what == "shadow" and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("shadow key %s is readable by others than its owner (mode %o)", path, st.st_mode & 0o777)
    return bytes(key)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pwserver",
        description="The pwmail password server: answers passwd, group, shadow, initgroups and "
        "mailhost lookups over UDP (and TCP on the same port) from tables held in memory. "
        "Runs in the foreground; SIGHUP or a change of a source file reloads (a load that is empty, "
        "lost more than reload_max_shrink of the users or holds too many malformed lines is refused); "
        "SIGUSR1 reloads and serves the result even so; SIGTERM stops.",
        epilog="Settings also come from [pwserver] in pwmail.toml (--config, $PWMAIL_CONF, "
        "/etc/pwmail.toml); flags override them. See docs/pwserver.md.",
    )
    p.add_argument(
        "--listen", metavar="HOST:PORT", help=f"address to serve (default {DEFAULTS['listen']}; port 0 picks one)"
    )
    p.add_argument(
        "--source",
        metavar="URI",
        help="follow a PostgreSQL user database (postgresql://...; docs/pwserver.md) instead of the files",
    )
    p.add_argument("--passwd", metavar="F", help="passwd(5) file (required here or in the settings, without --source)")
    p.add_argument("--shadow", metavar="F", help="shadow(5) file")
    p.add_argument("--group", metavar="F", help="group(5) file")
    p.add_argument("--mailhosts", metavar="F", help="mailhosts map: 'user host [frozen]' a line")
    p.add_argument("--shadow-key", metavar="F", help="shadow key file: shadow answers only to requests sealed with it")
    p.add_argument("--network-key", metavar="F", help="network key file: drop every packet not sealed")
    p.add_argument(
        "--allow",
        metavar="CIDR",
        action="append",
        help="client network allowed to ask (repeatable; default loopback only)",
    )
    p.add_argument("--threads", metavar="N", type=int, help=f"UDP serving threads (default {DEFAULTS['threads']})")
    p.add_argument(
        "--busy-poll-us",
        metavar="US",
        type=int,
        help=f"after answering, keep receiving without blocking this long, yielding the CPU "
        f"(0..10000 µs, default {DEFAULTS['busy_poll_us']}; 0: always block)",
    )
    p.add_argument(
        "--allow-empty",
        action="store_true",
        default=None,
        help="serve sources without any user (otherwise such a load is refused: at start, pwserver exits 1)",
    )
    p.add_argument(
        "--accept-shrink",
        action="store_true",
        help="serve the first load even if the reload guard refuses it (too many malformed lines, "
        "no users); on a running server, SIGUSR1 reloads and serves the result whatever it holds",
    )
    cli.add_common_flags(p, pwserver_conf=False)
    return p


def load_config(args: argparse.Namespace) -> Config:
    """[pwserver] and [placement], the flags over them; every value checked
    (settings.SettingsError, a ConfigError, names the file's key or the flag)."""
    cfg = SECTION.override(
        SECTION.load(args.config),
        {
            key: getattr(args, key)
            for key in (
                "listen",
                "source",
                "passwd",
                "shadow",
                "group",
                "mailhosts",
                "shadow_key",
                "network_key",
                "allow",
                "threads",
                "busy_poll_us",
                "allow_empty",
            )
        },
    )
    path = args.config or settings.settings_path()
    try:
        rule = PlacementRule.from_settings(PLACEMENT.load(args.config))
    except PlacementError as e:
        raise ConfigError(f"{path}: {e}") from None
    if cfg["source"] and any(cfg[k] for k in SOURCES):
        given = ", ".join(k for k in SOURCES if cfg[k])
        raise ConfigError(f"a database source (--source) and source files ({given}) given: use one or the other")
    if not cfg["passwd"] and not cfg["source"]:
        raise ConfigError("no passwd file: give --passwd F (or passwd in [pwserver]), or --source URI")
    threads, poll_seconds, busy_poll_us, allow = cfg["threads"], cfg["poll_seconds"], cfg["busy_poll_us"], cfg["allow"]
    try:
        tcp = TcpLimits.from_settings(cfg)
        guard = GuardLimits.from_settings(cfg)
    except ValueError as e:
        raise ConfigError(f"{path}: [pwserver] {e}") from None
    return Config(
        listen=parse_listen(cfg["listen"]),
        sources={k: os.path.abspath(cfg[k]) if cfg[k] else "" for k in SOURCES},
        shadow_key=read_key(cfg["shadow_key"], "shadow") if cfg["shadow_key"] else None,
        network_key=read_key(cfg["network_key"], "network") if cfg["network_key"] else None,
        allow=list(allow),
        tcp=tcp,
        threads=threads,
        poll_seconds=poll_seconds,
        busy_poll_us=busy_poll_us,
        syslog=cfg["syslog"],
        rule=rule,
        guard=guard,
        accept_shrink=args.accept_shrink,
        metrics_listen=cfg["metrics_listen"],
        source=cfg["source"],
        source_reconnect_max=float(cfg["source_reconnect_max"]),
        source_full_reload_changes=int(cfg["source_full_reload_changes"]),
    )


# ---- loading --------------------------------------------------------------


def source_signature(sources: dict[str, str]) -> tuple:
    sig = []
    for name in SOURCES:
        path = sources[name]
        try:
            st = os.stat(path) if path else None
        except OSError:
            st = None
        sig.append((st.st_ino, st.st_size, st.st_mtime_ns) if st else None)
    return tuple(sig)


class SourceMissing(TableError):
    """A configured source file does not exist; `logged`: the loader just
    said so (it says it once, not on every try)."""

    def __init__(self, text: str, logged: bool):
        super().__init__(text)
        self.logged = logged


class SourceUnreachable(TableError):
    """The database source cannot be read: not reachable, or the
    connection lost (pwcache/pgsource.py reconnects)."""


class Unservable(Exception):
    """At start, the sources cannot be served (unreadable, missing, or
    refused by the reload guard): exit 1, where a configuration error is
    EX_CONFIG."""


class LoadRefused(Exception):
    """The reload guard refuses to serve what the sources hold
    (pwcache/reload_guard.py); `again`: refused for the same files as the
    previous refusal."""

    def __init__(self, refusal: Refusal, again: bool):
        super().__init__(refusal.text)
        self.refusal = refusal
        self.again = again


class Loader:
    """Builds tables from the sources and installs them; one at a time, in
    its own thread so that signals and serving never wait for a build.

    Each state of the source files (source_signature) is loaded once: when
    its load fails or is refused, that is logged once, and the next poll
    does not try (and log) again; a change of the files or SIGHUP does."""

    def __init__(self, core: ServerCore, cfg: Config):
        self.core = core
        self.cfg = cfg
        self.signature = None
        self.users = 0
        self.refused = 0  # loads the guard refused (STATS reloads_refused)
        self.loaded_at = 0.0  # Unix time the last whole load was put in place (metrics)
        self._refused_signature = None  # the files of the last refusal
        self._missing: set[str] = set()  # sources found missing (logged once)
        self._accept = False  # the next load is served whatever the guard says
        self._wanted = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="pwserver-reload", daemon=True)

    def load(self, accept: bool = False) -> None:
        """Loads now (in the calling thread) and serves the result. Raises
        TableError (SourceMissing) when the sources cannot be read, and
        LoadRefused when the guard refuses what they hold, unless `accept`;
        either way the served generation stays."""
        sig = source_signature(self.cfg.sources)
        self.signature = sig
        self._note_missing(sig)
        t0, cpu0 = time.monotonic(), time.thread_time()
        src = self.cfg.sources
        table = Table.from_files(src["passwd"], src["shadow"], src["group"], src["mailhosts"], self.cfg.rule)
        skipped_lines = table.skipped_lines()
        self.install_checked(table, sig, accept, t0, cpu0)
        for source, line, why in skipped_lines:  # the first few, located
            log.warning("%s:%d: line skipped (%s)", src[source], line, why)

    def note_refusal(self, refusal: Refusal) -> None:
        """Counts a refusal of the guard for STATS."""
        self.refused += 1
        self.core.set_refusals(self.refused, refusal)

    def install_checked(self, table: Table, key, accept: bool, t0: float, cpu0: float) -> None:
        """Serves a loaded table unless the reload guard refuses it
        (LoadRefused, unless `accept`); `key` names what was loaded (the
        files' signature): a refusal of the same key again says so."""
        stats = table.stats()
        refusal = self.cfg.guard.check(stats, self.users)
        if refusal and not accept:
            table.close()
            self.note_refusal(refusal)
            again, self._refused_signature = key == self._refused_signature, key
            raise LoadRefused(refusal, again)
        if refusal:
            log.warning("serving a load the reload guard refuses, as the operator asked: %s", refusal.text)
        self._refused_signature = None
        load_ms = int((time.monotonic() - t0) * 1000)
        cpu_ms = int((time.thread_time() - cpu0) * 1000)
        self.core.install(table, load_ms)
        self.users = stats["users"]
        self.loaded_at = time.time()
        skipped = {k: v for k, v in stats.items() if v and k not in ("users", "groups", "shadows", "bytes")}
        log.info(
            "loaded generation %d: %d users, %d groups, %d shadow entries in %d ms (%d ms CPU, %d table bytes)%s",
            self.core.generation,
            stats["users"],
            stats["groups"],
            stats["shadows"],
            load_ms,
            cpu_ms,
            stats["bytes"],
            "; skipped: " + ", ".join(f"{k}={v}" for k, v in skipped.items()) if skipped else "",
        )

    def _note_missing(self, sig: tuple) -> None:
        """Logs a source file that went missing, once, and once when it is
        back; raises SourceMissing while one is missing."""
        missing = {name for name, st in zip(SOURCES, sig, strict=True) if self.cfg.sources[name] and st is None}
        what = {name: f"{name} file {self.cfg.sources[name]}" for name in SOURCES}
        new = missing - self._missing
        if self.core.generation:  # (a first load that fails is reported by serve)
            for name in sorted(new):
                log.error(
                    "reload failed, still serving generation %d: %s is missing (said once; it is loaded "
                    "when it is back)",
                    self.core.generation,
                    what[name],
                )
            for name in sorted(self._missing - missing):
                log.info("%s is back", what[name])
        self._missing = missing
        if missing:
            raise SourceMissing(", ".join(f"{what[name]}: missing" for name in sorted(missing)), bool(new))

    def start(self) -> None:
        self._thread.start()

    def request(self, accept: bool = False) -> None:
        """Asks for a load; `accept`: serve it whatever the guard says (the
        operator's override, for that load only)."""
        if accept:
            self._accept = True
        self._wanted.set()

    def changed(self) -> bool:
        return source_signature(self.cfg.sources) != self.signature

    def stop(self) -> None:
        self._stop = True
        self._wanted.set()
        self._thread.join(timeout=30)

    @staticmethod
    def lower_priority() -> None:
        """Builds yield the CPU to the serving threads (Linux: nice is per thread)."""
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), RELOAD_NICE)
        except OSError as e:
            log.warning("cannot lower the reload thread's priority: %s", e)

    def _run(self) -> None:
        self.lower_priority()
        while True:
            self._wanted.wait()
            self._wanted.clear()
            if self._stop:
                return
            self.load_logged()

    def load_logged(self) -> None:
        """load(), what goes wrong logged (the served generation stays)."""
        accept, self._accept = self._accept, False  # the override is spent by this load, whatever comes of it
        try:
            self.load(accept)
        except SourceUnreachable:
            raise  # the database source reconnects (pwcache/pgsource.py)
        except SourceMissing as e:
            if not e.logged:
                log.info("reload skipped, still serving generation %d: %s", self.core.generation, e)
        except LoadRefused as e:
            # ERROR once for these files; asked again (SIGHUP), the same answer is news to nobody
            log.log(
                logging.INFO if e.again else logging.ERROR,
                "reload refused%s, still serving generation %d (%d users): %s; fix the sources, "
                "or send SIGUSR1 to serve them anyway",
                " again" if e.again else "",
                self.core.generation,
                self.users,
                e,
            )
        except TableError as e:
            log.error("reload failed, still serving generation %d: %s", self.core.generation, e)
        except Exception:  # keep reloading later
            log.exception("reload failed, still serving generation %d", self.core.generation)


def make_loader(core: ServerCore, cfg: Config) -> Loader:
    """The files' loader, or the database source's follower."""
    if not cfg.source:
        return Loader(core, cfg)
    from pwcache.pgsource import DbSource  # on use: a file-source pwserver does not load psycopg

    return DbSource(core, cfg)


# ---- sockets --------------------------------------------------------------


def bind_sockets(host: str, port: int) -> tuple[socket.socket, socket.socket]:
    """UDP and TCP sockets on the same port (port 0: one free for both)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    for _ in range(50):
        udp = socket.socket(family, socket.SOCK_DGRAM)
        tcp = socket.socket(family, socket.SOCK_STREAM)
        try:
            if family == socket.AF_INET6:
                for s in (udp, tcp):
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:  # past net.core.rmem_max when we may (bursts during a reload)
                udp.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, UDP_RCVBUF)
            except PermissionError:
                udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF)
            udp.bind(addr)
            tcp.bind((addr[0], udp.getsockname()[1]) + tuple(addr[2:]))
            tcp.listen(128)
            return udp, tcp
        except OSError:
            udp.close()
            tcp.close()
            if port != 0:
                raise
    raise OSError("no port free for both UDP and TCP")


# ---- the daemon -----------------------------------------------------------


def format_counters(counters: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in counters.items() if v) or "none"


def start_metrics(listen: str, core: ServerCore, loader: Loader):
    """The metrics exporter when `metrics_listen` is set, else None; imported
    only then (a server without metrics does not load prometheus_client)."""
    if not listen:
        return None
    from pwcache import server_metrics
    from pwmail.base import metrics

    return metrics.serve(listen, server_metrics.collector(core, loader), name="pwserver")


def serve(cfg: Config) -> int:
    core = ServerCore()
    stop_fd = os.eventfd(0, os.EFD_CLOEXEC)
    stopping = threading.Event()
    reload_wanted = threading.Event()
    accept_wanted = threading.Event()  # SIGUSR1: reload, serving whatever the sources hold
    wake = threading.Event()

    def on_stop(signum, frame):
        stopping.set()
        wake.set()

    def on_hup(signum, frame):
        reload_wanted.set()
        wake.set()

    def on_usr1(signum, frame):
        accept_wanted.set()
        wake.set()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    signal.signal(signal.SIGUSR1, on_usr1)

    try:
        core.set_keys(cfg.network_key, cfg.shadow_key)
        core.set_busy_poll(cfg.busy_poll_us)
        if (cfg.network_key or cfg.shadow_key) and lib.pw_seal_available() < 0:
            raise ConfigError("keys given but libsodium (libsodium.so.23) is not installed")
        for cidr in cfg.allow:
            core.allow(cidr)
        loader = make_loader(core, cfg)
        try:
            loader.load(cfg.accept_shrink)  # bind only once there is something to serve
        except TableError as e:
            raise Unservable(f"cannot load the tables: {e}") from None
        except LoadRefused as e:  # nothing served: clients fail over, MTAs defer, nobody gets NOTFOUND
            raise Unservable(
                f"refusing to serve the tables: {e}; "
                + (
                    "--allow-empty serves an empty table"
                    if e.refusal.reason == Reason.EMPTY
                    else "--accept-shrink serves them anyway"
                )
            ) from None
        udp, tcp = bind_sockets(*cfg.listen)
    except (ConfigError, OSError, Unservable) as e:
        core.close()
        os.close(stop_fd)
        if isinstance(e, Unservable):  # the sources' fault, not the configuration's: exit 1
            print(f"pwserver: {e}", file=sys.stderr, flush=True)
            return 1
        if isinstance(e, OSError):  # from binding: the address busy or not ours
            raise listen_error(*cfg.listen, e) from None
        raise
    try:
        exporter = start_metrics(cfg.metrics_listen, core, loader)
    except ConfigError:
        for closing in (udp.close, tcp.close, core.close, lambda: os.close(stop_fd)):
            closing()
        raise

    host, port = udp.getsockname()[:2]
    udp_threads = []
    for i in range(cfg.threads):
        slot = core.slot()

        def run(slot=slot):
            rc = core.serve_udp(udp.fileno(), slot)
            if rc < 0:
                log.error("UDP serving thread stopped: %s", os.strerror(-rc))
                stopping.set()
                wake.set()

        t = threading.Thread(target=run, name=f"pwserver-udp{i}", daemon=True)
        t.start()
        udp_threads.append((t, slot))
    tcp_server = TcpServer(core, tcp, stop_fd, cfg.tcp)
    tcp_server.start()
    loader.start()
    shown = f"[{host}]" if ":" in host else host
    log.info("ready on %s:%d (%d users, %d UDP threads)", shown, port, loader.users, cfg.threads)
    print(f"pwserver: ready on {shown}:{port} ({loader.users} users)", file=sys.stderr, flush=True)
    notify_ready()

    next_poll = time.monotonic() + cfg.poll_seconds
    next_counters = time.monotonic() + COUNTERS_LOG_SECONDS
    while not stopping.is_set():
        wake.wait(timeout=max(0.05, next_poll - time.monotonic()))
        wake.clear()
        if stopping.is_set():
            break
        if reload_wanted.is_set():
            reload_wanted.clear()
            log.info("SIGHUP: reloading")
            loader.request()
        if accept_wanted.is_set():
            accept_wanted.clear()
            log.warning("SIGUSR1: reloading; the result is served even if the reload guard refuses it")
            loader.request(accept=True)
        if time.monotonic() >= next_poll:
            next_poll = time.monotonic() + cfg.poll_seconds
            if loader.changed():
                log.info("a source file changed: reloading")
                loader.request()
        if time.monotonic() >= next_counters:
            next_counters = time.monotonic() + COUNTERS_LOG_SECONDS
            log.info("counters: %s", format_counters(core.counters()))

    log.info("stopping")
    core.stop()
    os.eventfd_write(stop_fd, 1)
    for t, slot in udp_threads:
        t.join(timeout=10)
        core.release(slot)
    tcp_server.join()
    loader.stop()
    if exporter is not None:
        exporter.close()
    log.info("stopped; counters: %s", format_counters(core.counters()))
    udp.close()
    tcp.close()
    core.close()
    os.close(stop_fd)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return exit_on_config_error("pwserver", lambda: start(args))


def start(args: argparse.Namespace) -> int:
    setup_logging("pwserver", stderr=args.log_stderr, daemon=True)
    cfg = load_config(args)
    if cfg.syslog:
        setup_logging("pwserver", stderr=args.log_stderr, daemon=True, syslog_address=cfg.syslog)
    if (cfg.sources["shadow"] or cfg.source) and not cfg.shadow_key:
        # shadow requests must be sealed with a key the server holds: every client would time out
        log.warning(
            "shadow source %s given but no shadow key (--shadow-key): shadow lookups are not enabled "
            "on this server, and its clients will report that no password server answered",
            cfg.sources["shadow"] or "(the database)",
        )
    return serve(cfg)


if __name__ == "__main__":
    sys.exit(main())
