"""Delivery policy of pdeliveryd: recipients in, per-recipient replies out.

Protocol-free (the LMTP machine is in lmtp.py, the sockets in pdeliveryd.py):
`RecipientCheck` turns an address into a reply and a Recipient;
`MailStore` stores one message for its accepted recipients and says, for
each, what happened. Durability: nothing is acknowledged before the file is
fsynced, renamed into new/ and new/ is fsynced; the directory fsyncs of
concurrent deliveries are shared (maildir.GroupSync, group commit), all in
one trip to the I/O thread pool per recipient.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from delivery import message as msg
from delivery.dedup import DEDUP_FILE, DedupTable
from delivery.layout import LayoutError, check_user
from delivery.lmtp import MessageReceived, Reply
from delivery.maildir import ROOT_MARKER, MaildirWriter, StorageFull, StorageUnavailable
from delivery.replies import (
    R_BAD_ADDRESS,
    R_FROZEN,
    R_LOCAL_ERROR,
    R_LOOKUP_DOWN,
    R_LOOP,
    R_NO_USER,
    R_RCPT_OK,
    R_STORAGE_DOWN,
    R_STORAGE_FULL,
    R_WRONG_HOST,
)
from delivery.spool import SPOOL_MEMORY_MAX, SpooledBody, StoredCopy
from delivery.users import LookupUnavailable, Recipient, UserLookup, user_from_address

log = logging.getLogger("pdeliveryd")

TMP_CLEAN_EVERY = 12 * 3600  # seconds between tmp/ scans of one mailbox
TMP_CLEAN_TRACKED = 100_000  # mailboxes whose last scan time is remembered


class RecipientCheck:
    def __init__(self, users: UserLookup, mailhost_names=(), delimiter: str = "+"):
        self.users = users
        self.mailhost_names = {h.lower() for h in mailhost_names}
        self.delimiter = delimiter

    async def check(self, address: str) -> tuple[Reply, Recipient | None]:
        name = user_from_address(address, self.delimiter)
        try:
            check_user(name)
        except LayoutError:
            return R_BAD_ADDRESS, None
        try:
            rec = await self.users.lookup(name)
        except LookupUnavailable as e:
            log.warning("lookup of %s failed: %s", name, e)
            return R_LOOKUP_DOWN, None
        if rec is None:
            return R_NO_USER, None
        if rec.frozen:
            return R_FROZEN, None
        if self.mailhost_names and rec.mailhost and rec.mailhost.lower() not in self.mailhost_names:
            log.warning("%s lives on %s, not here", name, rec.mailhost)
            return R_WRONG_HOST, None
        return R_RCPT_OK, rec


class MailStore:
    def __init__(
        self,
        writer: MaildirWriter,
        *,
        io_threads: int = 32,
        dedup_window: float = 86400,
        dedup_max: int = 200_000,
        tmp_max_age: float = 36 * 3600,
        spool_memory_max: int = SPOOL_MEMORY_MAX,
    ):
        self.writer = writer
        self.executor = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="pdeliveryd-io")
        root = writer.layout.root
        # kept across restarts in the root, fsynced in the writer's group commits
        self.dedup = DedupTable(
            dedup_window, dedup_max, root / DEDUP_FILE, usable=(root / ROOT_MARKER).exists, sync=writer.group.sync
        )
        self.tmp_max_age = tmp_max_age
        self._cleaned: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._cleaned_lock = threading.Lock()
        self.delivered = 0
        # RecipientCheck.check, to look each recipient up again before writing
        self.recheck = None
        # True when this is the only session: write without the thread pool
        self.alone = None
        self.spool_memory_max = spool_memory_max

    def new_body(self) -> SpooledBody:
        """The body the LMTP machine writes a message's data to as it arrives."""
        return SpooledBody(self.writer.open_spool, self.spool_memory_max)

    async def deliver(self, ev: MessageReceived, recipients: list[Recipient]) -> list[Reply]:
        """ev.body is a SpooledBody (new_body())."""
        if ev.body.error is not None:
            # the data could not be spooled (disk full, root unmounted)
            return [_failure_reply(ev.body.error, "spooling the message")] * len(recipients)
        head = ev.body.head
        qid = ev.queue_id or msg.received_queue_id(head)
        digest = ev.body.digest() if qid else b""
        # one copy per distinct mailbox: a user named by several RCPTs (the
        # same address again, or user+tag) gets the copy of the first, and
        # every one of those RCPTs gets that copy's reply
        first: dict[str, tuple[str, Recipient]] = {}
        for addr, rec in zip(ev.recipients, recipients):
            first.setdefault(rec.name, (addr, rec))
        if len(first) == 1:
            # a lone session with a lone mailbox: nothing to share a
            # commit with, so no trip to an I/O thread (two wake-ups less)
            inline = self.alone is not None and self.alone()
            ((addr, rec),) = first.values()
            reply = await self._one(ev, head, addr, rec, qid, digest, inline)
            return [reply] * len(recipients)
        replies = await asyncio.gather(*(self._one(ev, head, addr, rec, qid, digest) for addr, rec in first.values()))
        by_name = dict(zip(first, replies))
        return [by_name[rec.name] for rec in recipients]

    async def _one(
        self,
        ev: MessageReceived,
        head: bytes,
        address: str,
        rec: Recipient,
        qid: str | None,
        digest: bytes,
        inline: bool = False,
    ) -> Reply:
        if self.recheck is not None:
            # asked again now that the data is in: a mailbox frozen for a move
            # since RCPT (a slow client, a long message) is deferred, not
            # written to the copy being moved away
            reply, fresh = await self.recheck(address)
            if fresh is None:
                return reply
            rec = fresh
        if msg.is_loop(head, rec.name):
            log.warning("loop: %s already delivered to %s (qid %s)", address, rec.name, qid)
            return R_LOOP
        key = (qid, rec.name, digest) if qid else None
        if key is not None:
            if self.dedup.seen(key):
                self.dedup.hits += 1
                log.info("duplicate of qid=%s for %s acknowledged without a copy", qid, rec.name)
                return Reply(250, "2.0.0", f"{rec.name} already delivered (duplicate)")
            inflight = self.dedup.inflight.get(key)
            if inflight is not None:
                return await asyncio.shield(inflight)
            fut = asyncio.get_running_loop().create_future()
            self.dedup.inflight[key] = fut
        reply = R_LOCAL_ERROR
        try:
            reply = await self._store(ev, address, rec, qid, key, inline)
            return reply
        finally:
            if key is not None:
                self.dedup.inflight.pop(key, None)
                fut.set_result(reply)

    async def _store(
        self,
        ev: MessageReceived,
        address: str,
        rec: Recipient,
        qid: str | None,
        key: tuple | None,
        inline: bool = False,
    ) -> Reply:
        loop = asyncio.get_running_loop()
        content = ev.body.stored_with(msg.trace_headers(ev.sender, address), address)
        try:
            if inline:
                path = self._write(rec, content, key)
            else:
                path = await loop.run_in_executor(self.executor, self._write, rec, content, key)
        except OSError as e:
            return _failure_reply(e, f"delivering to {rec.name}")
        self.delivered += 1
        name = os.path.basename(path)
        log.info(
            "delivered qid=%s to=%s from=<%s> size=%d file=%s%s",
            qid or "-",
            rec.name,
            ev.sender,
            content.size,
            name,
            _orcpt_note(ev, address),
        )
        return Reply(250, "2.0.0", f"{rec.name} delivered {name.split(',')[0]}")

    def _write(self, rec: Recipient, content: StoredCopy, key: tuple | None) -> str:
        """In an I/O thread: everything up to the durable commit, then the
        duplicate table's record of it (durable too, before the 250)."""
        path = self.writer.deliver(rec.name, content, rec.uid, rec.gid)
        if key is not None:
            self.dedup.remember(key)
        self._maybe_clean(rec.name)
        return path

    def _maybe_clean(self, user: str) -> None:
        """In an I/O thread: scan the user's tmp/ at most every TMP_CLEAN_EVERY."""
        now = time.monotonic()
        with self._cleaned_lock:
            last = self._cleaned.get(user)
            if last is not None and now - last < TMP_CLEAN_EVERY:
                return
            self._cleaned[user] = now
            self._cleaned.move_to_end(user)
            while len(self._cleaned) > TMP_CLEAN_TRACKED:
                self._cleaned.popitem(last=False)
        n = self.writer.clean_tmp(user, self.tmp_max_age)
        if n:
            log.info("removed %d stale file(s) from the tmp/ of %s", n, user)

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        self.dedup.close()


def _orcpt_note(ev: MessageReceived, address: str) -> str:
    """` orcpt=...` for the log when the MTA gave the recipient's original
    address (RFC 3461 ORCPT: before its aliases and forwards). Delivered-To
    keeps the RCPT address: the mailbox delivered to, which the loop check
    looks for."""
    for addr, params in zip(ev.recipients, ev.rcpt_params):
        if addr == address and "ORCPT" in params:
            return f" orcpt={params['ORCPT']}"
    return ""


def _failure_reply(e: OSError, doing: str) -> Reply:
    """The reply to an I/O failure (all temporary), logged."""
    if isinstance(e, StorageUnavailable):
        log.error("storage unavailable %s: %s", doing, e)
        return R_STORAGE_DOWN
    if isinstance(e, StorageFull) or e.errno in (errno.ENOSPC, errno.EDQUOT):
        log.error("storage full %s: %s", doing, e)
        return R_STORAGE_FULL
    log.error("I/O error %s: %s", doing, e)
    return R_LOCAL_ERROR
