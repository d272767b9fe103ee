"""Changes to the served table, one user or group at a time, without a
reload (docs/pwserver.md, "Changes").

Each batch of changes makes a new C table (the base shared, a small delta
on top: pwcache/_csrc/pw_delta.c) published as the next generation with
the same swap a reload uses: a lookup sees the table before the batch or
after it, never a part. When the delta holds more than `fold_entries`
users and groups, a background thread folds it into a new base (a rebuild
from the table's own records); the batches applied meanwhile are applied
again to the folded table before it is served.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

from pwcache._pwtable import ffi, lib
from pwcache.placement import PlacementRule
from pwcache.table import Change, TableError, apply_changes_to, fold_table

# Users and groups the delta may hold before a fold starts: lookups in it
# stay a hash probe, each batch copies its index (8 bytes an entry).
DELTA_FOLD_ENTRIES = 4096

log = logging.getLogger("pwserver")


class TableChanges:
    """Applies batches of changes to what a ServerCore serves."""

    def __init__(self, core, rule: PlacementRule | None = None, fold_entries: int = DELTA_FOLD_ENTRIES):
        if fold_entries < 1:
            raise ValueError("fold_entries must be at least 1")
        self.core = core
        self.rule = rule
        self.fold_entries = fold_entries
        self._fold_thread: threading.Thread | None = None
        self._since_snapshot: list[list[Change]] | None = None  # batches a running fold must apply again
        self.folds = 0

    def apply(self, changes: Iterable[Change]) -> list[str]:
        """Applies a batch in order (one new generation if any change is
        applied); returns each change's status (pwcache.table.CHANGE_STATUS).
        A refused change is counted in STATS and skipped."""
        batch = list(changes)
        if not batch:
            return []
        core = self.core
        with core.lock:
            if core.table_ptr == ffi.NULL:
                raise TableError("no table is served yet")
            new, status = apply_changes_to(core.table_ptr, batch, self.rule)
            if "applied" not in status:
                # refusals only: counted in STATS, the records and the generation stay
                core.publish(new, new_generation=False)
                return status
            core.publish(new)
            if self._since_snapshot is not None:
                self._since_snapshot.append(batch)
            elif lib.pwt_delta_entries(new) > self.fold_entries:
                self._start_fold()
        return status

    def delta_entries(self) -> int:
        with self.core.lock:
            return lib.pwt_delta_entries(self.core.table_ptr) if self.core.table_ptr != ffi.NULL else 0

    def _start_fold(self) -> None:
        """(core.lock held) Folds a snapshot of the served table in a thread."""
        snapshot = lib.pwt_share(self.core.table_ptr)
        if snapshot == ffi.NULL:
            log.error("cannot fold the table's changes: out of memory")
            return
        self._since_snapshot = []
        self._fold_thread = threading.Thread(
            target=self._fold, args=(snapshot, self.core.installs), name="pwserver-fold", daemon=True
        )
        self._fold_thread.start()

    def _fold(self, snapshot, installs: int) -> None:
        core = self.core
        folded = ffi.NULL
        try:
            try:
                folded = fold_table(snapshot, self.rule)  # seconds at a million users: no lock held
            finally:
                lib.pwt_free(snapshot)
            with core.lock:
                if core.installs != installs:
                    return  # a reload replaced the whole table meanwhile
                for batch in self._since_snapshot or []:
                    again, _ = apply_changes_to(folded, batch, self.rule)
                    lib.pwt_free(folded)
                    folded = again
                core.publish(folded)
                folded = ffi.NULL
                self.folds += 1
        except (TableError, MemoryError) as e:
            log.error("cannot fold the table's changes (the delta keeps them): %s", e)
        finally:
            if folded != ffi.NULL:
                lib.pwt_free(folded)
            with core.lock:
                self._since_snapshot = None

    def close(self, timeout: float | None = 60) -> None:
        """Waits for a running fold (call before closing the core)."""
        self.wait_folded(timeout)

    def wait_folded(self, timeout: float | None = None) -> bool:
        """Waits for a running fold; True when none runs any more."""
        thread = self._fold_thread
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True
