"""A PostgreSQL source: pwserver loads the user database once and then
follows its change log (docs/pwserver.md, "A PostgreSQL source";
docs/database.md, "How pwserver follows it").

Start-up (and SIGHUP, SIGUSR1, a pruned log, a long backlog) reads one
REPEATABLE READ snapshot with COPY, rendered as the four sources the C
loader reads (pwcache/source_sql.py), and remembers the log's last sequence
number of that snapshot. Then one thread LISTENs on `pwmail_changes` and,
on each notification and every `poll_seconds`, reads the log past that
number in a snapshot together with the rows it names, and applies them as
one batch of changes (pwcache/changes.py): a lookup sees the table before
the batch or after it. While the database is away the last table is
served; the thread reconnects with back-off and catches up from its number.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import select
import time
from concurrent.futures import ThreadPoolExecutor

from pwcache._pwtable import lib
from pwcache.changes import TableChanges
from pwcache.reload_guard import Reason, Refusal
from pwcache.server import Config, Loader, ServerCore, SourceUnreachable
from pwcache.source_sql import (
    CHANGES_AFTER,
    GROUPS_BY_NAME,
    LAST_SEQ,
    LOG_AROUND,
    SOURCE_COPIES,
    USERS_BY_NAME,
    copy_single_bytea,
    log_kept,
)
from pwcache.table import Change, Table, stats_of

CHANNEL = "pwmail_changes"
CONNECT_TIMEOUT = 10  # seconds (libpq connect_timeout)
RECONNECT_FIRST = 0.5  # seconds before the first try to reconnect; doubles up to source_reconnect_max

log = logging.getLogger("pwserver")


@dataclasses.dataclass
class Plan:
    """What a run of change-log rows touched: the users and groups to read
    now, and those of them the table held before (each is deleted and put
    back from what the database holds now: uids and gids may move between
    them in one batch)."""

    users: set[str] = dataclasses.field(default_factory=set)
    users_before: set[str] = dataclasses.field(default_factory=set)
    groups: set[str] = dataclasses.field(default_factory=set)
    groups_before: set[str] = dataclasses.field(default_factory=set)


def plan_changes(rows) -> Plan:
    """rows: (seq, kind, op, name, old_name) in seq order. A name's first
    row says whether it existed before: an insert (or a rename's new name)
    did not, anything else did. A membership changes its group only
    (INITGROUPS lists come from the group lines)."""
    plan = Plan()
    seen: set[tuple[str, str]] = set()

    def touch(kind: str, name: str, existed: bool) -> None:
        names, before = (plan.users, plan.users_before) if kind == "user" else (plan.groups, plan.groups_before)
        if (kind, name) not in seen:
            seen.add((kind, name))
            names.add(name)
            if existed:
                before.add(name)

    for _seq, kind, op, name, old_name in rows:
        if kind == "member":  # its group exists (a new group's own insert comes first)
            touch("group", name, True)
            continue
        if old_name:
            touch(kind, old_name, True)
        touch(kind, name, op != "insert" and not old_name)
    return plan


def render_batch(plan: Plan, user_rows, group_rows) -> tuple[list[Change], int]:
    """The batch of changes making the table hold what the database holds
    now for the plan's names, and how many users it loses. user_rows:
    (name, passwd, shadow or None, mailhosts or None); group_rows: (name, line)."""
    batch: list[Change] = [("del_group", name) for name in sorted(plan.groups_before)]
    batch += [("del_user", name) for name in sorted(plan.users_before)]
    present = set()
    for name, passwd, shadow, mailhosts in sorted(user_rows):
        present.add(name)
        batch.append(("passwd", passwd))
        if shadow is not None:
            batch.append(("shadow", shadow))
        if mailhosts is not None:
            batch.append(("mailhosts", mailhosts))
    batch += [("group", line) for _name, line in sorted(group_rows)]
    return batch, len(plan.users_before - present)


def _copy(cur, name: str) -> bytes:
    """A whole source (SOURCE_COPIES) in the cursor's snapshot."""
    with cur.copy(SOURCE_COPIES[name]) as copy:
        return copy_single_bytea(b"".join(copy))


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class DbSource(Loader):
    """The Loader of a database source: load() takes a snapshot; its thread
    follows the change log."""

    def __init__(self, core: ServerCore, cfg: Config):
        super().__init__(core, cfg)
        self.changes = TableChanges(core, cfg.rule)
        self.last = 0  # the change log's last sequence number the table holds
        self.conn = None
        self._notified = False  # a notification came in during a query (the socket will not show it)
        self._lost_at: float | None = None  # monotonic time the connection was lost (logged once)
        self._held: int | None = None  # the last seq of a batch the guard holds back (logged once)
        self._needs_whole = False  # changes cannot be applied (a pruned log...): a whole load is due
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    # -- the connection ----------------------------------------------------

    def _connection(self):
        if self.conn is not None:
            return self.conn
        import psycopg  # on use: a file-source pwserver does not load it

        try:
            conn = self._connect(psycopg)
        except psycopg.Error as e:
            raise SourceUnreachable(f"cannot reach the database: {_one_line(e)}") from None
        conn.add_notify_handler(self._on_notify)
        try:
            conn.execute(f"LISTEN {CHANNEL}")
        except psycopg.Error as e:
            conn.close()
            raise SourceUnreachable(f"cannot listen on {CHANNEL}: {_one_line(e)}") from None
        self.conn = conn
        self._publish_state()
        return conn

    def _connect(self, psycopg):
        """A connection whose transactions are read-only snapshots."""
        conn = psycopg.connect(
            self.cfg.source, autocommit=True, connect_timeout=CONNECT_TIMEOUT, application_name="pwserver"
        )
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        return conn

    def _on_notify(self, _notify) -> None:
        self._notified = True

    def _drop_connection(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:  # closing a broken connection may fail: it is gone either way
                pass
            self.conn = None
        self._publish_state()

    def _publish_state(self) -> None:
        """What STATS says of the source: source_seq, source_connected."""
        lib.pws_set_source(self.core.ptr, self.last, 1 if self.conn is not None else 0)

    def _read(self, work):
        """Runs work(cursor) in one read-only REPEATABLE READ snapshot;
        SourceUnreachable when the database cannot answer."""
        import psycopg

        conn = self._connection()
        self._notified = False  # the snapshot holds what was notified so far; what comes now wakes us again
        try:
            with conn.transaction(), conn.cursor() as cur:
                return work(cur)
        except psycopg.Error as e:
            self._drop_connection()
            raise SourceUnreachable(f"database: {_one_line(e)}") from None

    # -- full loads ----------------------------------------------------------

    def load(self, accept: bool = False) -> None:
        """Loads the whole database from a new snapshot and serves it
        through the reload guard (Loader.install_checked)."""
        t0, cpu0 = time.monotonic(), time.thread_time()

        def snapshot(cur):
            last = cur.execute(LAST_SEQ).fetchone()[0]
            # the other sources are built at the same time by the database, on
            # connections of their own sharing this snapshot
            shared = cur.execute("SELECT pg_export_snapshot()").fetchone()[0]
            first, *others = SOURCE_COPIES
            with ThreadPoolExecutor(len(others), thread_name_prefix="pwserver-copy") as pool:
                pending = {name: pool.submit(self._copy_in, shared, name) for name in others}
                texts = {first: _copy(cur, first)}
                texts.update((name, f.result()) for name, f in pending.items())
            return last, texts

        last, texts = self._read(snapshot)
        table = Table.from_bytes(**texts, rule=self.cfg.rule)
        del texts
        self.install_checked(table, ("database", last), accept, t0, cpu0)
        self.last, self._held = last, None
        self._publish_state()
        log.info("database source: holds the change log up to seq %d", last)

    def _copy_in(self, snapshot_id: str, name: str) -> bytes:
        """One source read on a connection of its own, in the snapshot `snapshot_id`."""
        import psycopg
        from psycopg import sql

        with self._connect(psycopg) as conn, conn.transaction(), conn.cursor() as cur:
            cur.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot_id)))
            return _copy(cur, name)

    # -- following -----------------------------------------------------------

    def catch_up(self) -> bool:
        """Applies the changes logged after `last`; False when a full load
        is needed instead (the log pruned past `last`, or more pending than
        source_full_reload_changes)."""
        limit = self.cfg.source_full_reload_changes

        def read(cur):
            older_kept, first_after = cur.execute(LOG_AROUND, (self.last, self.last)).fetchone()
            if not log_kept(self.last, older_kept, first_after):
                log.warning("the change log no longer holds the changes after seq %d: loading it whole", self.last)
                return None
            rows = cur.execute(CHANGES_AFTER, (self.last, limit + 1)).fetchall()
            if len(rows) > limit:
                log.info("more than %d changes pending: loading the database whole", limit)
                return None
            if not rows:
                return rows, [], []
            plan = plan_changes(rows)
            users = cur.execute(USERS_BY_NAME, (list(plan.users),)).fetchall() if plan.users else []
            groups = cur.execute(GROUPS_BY_NAME, (list(plan.groups),)).fetchall() if plan.groups else []
            return rows, users, groups

        got = self._read(read)
        if got is None:
            return False
        rows, users, groups = got
        if not rows:
            return True
        last = rows[-1][0]
        plan = plan_changes(rows)
        batch, lost = render_batch(plan, users, groups)
        if lost > self.users * self.cfg.guard.max_shrink:  # SIGUSR1: a full load, served whatever it holds
            self._hold(last, lost)
            return True
        status = self.changes.apply(batch)
        with self.core.lock:
            self.users = stats_of(self.core.table_ptr)["users"]
        self.last, self._held = last, None
        self._publish_state()
        refused = len(status) - status.count("applied")
        log.log(
            logging.WARNING if refused else logging.DEBUG,
            "applied changes up to seq %d (%d rows, %d table changes, %d refused): generation %d, %d users",
            last,
            len(rows),
            len(batch),
            refused,
            self.core.generation,
            self.users,
        )
        return True

    def _load_whole(self, unless_refused: bool = False) -> None:
        """A whole load instead of changes, until one is served. The guard
        refused the database as it is: tried again (`unless_refused`) only
        once its log moved on, or on SIGHUP or SIGUSR1, not on every poll."""
        self._needs_whole = True
        if unless_refused and self._refused_signature == (
            "database",
            self._read(lambda cur: cur.execute(LAST_SEQ).fetchone()[0]),
        ):
            return
        self.load_logged()
        self._needs_whole = self._refused_signature is not None

    def _hold(self, last: int, lost: int) -> None:
        """The guard holds back a batch that loses too many users (ERROR once)."""
        if self._held is not None:
            self._held = last
            return
        self._held = last
        self.note_refusal(Refusal(Reason.SHRINK, self.users - lost, 0, ""))
        log.error(
            "changes up to seq %d held back, still serving generation %d (%d users): they delete %d users, "
            "more than reload_max_shrink (%g %%); send SIGUSR1 to load the database as it is",
            last,
            self.core.generation,
            self.users,
            lost,
            self.cfg.guard.max_shrink * 100,
        )

    def _run(self) -> None:
        self.lower_priority()
        backoff = RECONNECT_FIRST
        while not self._stop:
            try:
                was_lost = self._lost_at is not None
                if self._wanted.is_set():
                    self._wanted.clear()
                    self._load_whole()
                elif self._needs_whole or not self.catch_up():
                    self._load_whole(unless_refused=True)
                if was_lost:
                    log.info(
                        "database connection back after %.0f s; caught up to seq %d",
                        time.monotonic() - self._lost_at,
                        self.last,
                    )
                    self._lost_at = None
                backoff = RECONNECT_FIRST
                self._wait(self.cfg.poll_seconds)
            except SourceUnreachable as e:
                self._drop_connection()
                if self._lost_at is None:
                    self._lost_at = time.monotonic()
                    log.error(
                        "database source lost, still serving generation %d (%d users, up to seq %d): %s; "
                        "reconnecting (said once)",
                        self.core.generation,
                        self.users,
                        self.last,
                        e,
                    )
                self._wait(backoff, connection=False)
                backoff = min(backoff * 2, self.cfg.source_reconnect_max)
            except Exception:  # keep following; the served generation stays
                log.exception("database source: following failed, still serving generation %d", self.core.generation)
                self._wait(self.cfg.poll_seconds, connection=False)

    def _wait(self, seconds: float, connection: bool = True) -> None:
        """Until a notification, a request (request(), stop()) or `seconds`."""
        if connection and self._notified:
            return
        fds = [self._wake]
        if connection and self.conn is not None:
            fds.append(self.conn.fileno())
        readable, _, _ = select.select(fds, [], [], seconds)
        if self._wake in readable:
            try:
                os.eventfd_read(self._wake)
            except BlockingIOError:
                pass

    def request(self, accept: bool = False) -> None:
        super().request(accept)
        os.eventfd_write(self._wake, 1)

    def changed(self) -> bool:
        return False  # the thread follows the database itself

    def stop(self) -> None:
        self._stop = True
        os.eventfd_write(self._wake, 1)
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self.changes.close()
        self._drop_connection()
        os.close(self._wake)
