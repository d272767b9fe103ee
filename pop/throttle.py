"""Failed-login throttling (docs/pop.md, "Throttling"): one table in C
(pop/_csrc/pop_engine.c, pe_throttle_*) that the Python proxy and every
engine share, so the same policy decides every login, and a reload
keeps what was counted.

An attempt counts from its start: `begin()` refuses a login whose
address, (user, address) or user name already has `limit` failures plus
attempts in flight, so parallel attempts cannot pass a limit. `end()`
gives the verdict: a failure adds one to each of the three leaky buckets
(each drains at `limit / window` per second), a success clears the
(user, address) one. Memory is bounded: past `max_keys` an idle key goes."""

from __future__ import annotations

import time

from ._engine import ffi, lib

MAX_KEYS = 100_000
ADMITTED = lib.PE_ADMITTED
VERDICT_NONE, VERDICT_OK, VERDICT_FAILED = lib.PE_VERDICT_NONE, lib.PE_VERDICT_OK, lib.PE_VERDICT_FAILED
# pe_throttle_begin()'s refusals, as the log names them.
REFUSED_BY = {
    lib.PE_THROTTLED_ADDRESS: "address",
    lib.PE_THROTTLED_USER_ADDRESS: "user+address",
    lib.PE_THROTTLED_USER: "user",
    lib.PE_THROTTLED_FULL: "table-full",
}


def user_key(user: str) -> bytes:
    return user.lower().encode("utf-8", "replace")


class LoginThrottle:
    def __init__(self, cfg: dict, max_keys: int = MAX_KEYS):
        t = lib.pe_throttle_new(max_keys)
        if t == ffi.NULL:
            raise MemoryError("login throttle")
        self.handle = ffi.gc(t, lib.pe_throttle_free)  # engines get it in pe_config
        self.configure(cfg)

    def configure(self, cfg: dict) -> None:
        """New limits (SIGHUP); what was counted so far stays."""
        lib.pe_throttle_configure(
            self.handle,
            cfg["throttle_ip_failures"],
            cfg["throttle_user_ip_failures"],
            cfg["throttle_user_failures"],
            cfg["throttle_window"],
        )

    def begin(self, addr: str, user: str, now: float | None = None) -> int:
        """ADMITTED (now in flight: end() it), or which limit refused it."""
        return lib.pe_throttle_begin(
            self.handle, addr.encode(), user_key(user), time.monotonic() if now is None else now
        )

    def end(self, addr: str, user: str, verdict: int, now: float | None = None) -> None:
        lib.pe_throttle_end(
            self.handle, addr.encode(), user_key(user), verdict, time.monotonic() if now is None else now
        )

    def evicted(self) -> int:
        return lib.pe_throttle_evicted(self.handle)

    def __len__(self) -> int:
        return lib.pe_throttle_keys(self.handle)
