"""Who a recipient is: the user lookup pdeliveryd and pdelivery depend on.

`UserLookup` is the interface (one coroutine); `PwserverLookup` is the
production one, over pwcache's AsyncClient (uid, gid and mailhost from the
passwd answer, the frozen flag from MAILHOST). `PasswdFileLookup` reads a
passwd(5) file, for a storage host that has no password server at hand.

A lookup returns a `Recipient`, None when the user does not exist, and
raises `LookupUnavailable` when nobody could say (never "unknown user").
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol


class LookupUnavailable(Exception):
    """No answer about the user: a temporary failure."""


@dataclass(frozen=True)
class Recipient:
    name: str
    uid: int
    gid: int
    mailhost: str = ""
    frozen: bool = False  # mailbox being moved: defer (4.2.1 / EX_TEMPFAIL)


class UserLookup(Protocol):
    async def lookup(self, name: str) -> Recipient | None: ...

    async def close(self) -> None: ...


def user_from_address(address: str, delimiter: str = "+") -> str:
    """`Juan+tag@example.com` -> `juan` (local part, detail dropped, lower case)."""
    addr = address.strip().strip("<>")
    local = addr.rpartition("@")[0] if "@" in addr else addr
    if delimiter and delimiter in local:
        local = local.split(delimiter, 1)[0]
    return local.lower()


class PwserverLookup:
    """Users from the password server (pwcache.client.AsyncClient)."""

    def __init__(self, client=None, pwserver_conf: str | None = None):
        if client is None:
            from pwcache.client import AsyncClient

            client = AsyncClient.from_config(pwserver_conf)
        self.client = client
        self.clients = (client,)  # what SIGHUP re-configures (daemon.reconfigure_clients)

    async def lookup(self, name: str) -> Recipient | None:
        from pwcache.client import PwError

        try:
            pw, mh = await asyncio.gather(self.client.passwd_by_name(name), self.client.mailhost(name))
        except PwError as e:  # Unavailable, or a refusal we cannot act on
            raise LookupUnavailable(f"password server: {e}") from e
        if pw is None:
            return None
        host = mh.host if mh is not None else pw.mailhost
        return Recipient(pw.name, pw.uid, pw.gid, host, bool(mh and mh.frozen))

    async def close(self) -> None:
        await self.client.close()


class PasswdFileLookup:
    """Users from a passwd(5) file, re-read when it changes."""

    RECHECK = 1.0  # seconds between checks that the file changed

    clients = ()  # no pwserver client: SIGHUP has none to re-configure

    def __init__(self, path: str):
        self.path = path
        self._users: dict[str, Recipient] = {}
        self._stamp = None
        self._checked = float("-inf")

    def _load(self) -> None:
        import os
        import time

        now = time.monotonic()
        if now - self._checked < self.RECHECK:
            return
        self._checked = now
        try:
            st = os.stat(self.path)
        except OSError as e:
            raise LookupUnavailable(f"{self.path}: {e}") from e
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return
        users = {}
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.rstrip("\n").split(":")
                if len(parts) >= 7 and parts[2].isdigit() and parts[3].isdigit():
                    users[parts[0]] = Recipient(parts[0], int(parts[2]), int(parts[3]))
        self._users, self._stamp = users, stamp

    async def lookup(self, name: str) -> Recipient | None:
        self._load()
        return self._users.get(name)

    async def close(self) -> None:
        pass
