"""The reload guard: which loads pwserver refuses to serve (docs/pwserver.md,
"Reloading").

An empty, shrunken or garbled passwd is an operator's mistake (a truncated
copy, a file written over by something else) far more often than real
deletions, and serving it turns every lookup into NOTFOUND: MTAs bounce the
mail of every user it lost, for good. Refused, the old generation keeps
being served and mail is at worst deferred while the operator looks.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

GUARD_DEFAULTS: dict = {
    # a load is refused when it lost more than this share of the users of
    # the generation served (0.10: more than 10 %)
    "reload_max_shrink": 0.10,
    # ... or holds more malformed lines than this, in all sources
    # (a healthy source has next to none; garbage has thousands)
    "reload_max_bad_lines": 1000,
    # ... or holds no user at all, unless this is true
    "allow_empty": False,
}
# load statistics (pwt_load_stats) that count malformed lines; duplicates
# and orphans are well-formed, so not counted here
BAD_LINE_KINDS = ("passwd_bad", "shadow_bad", "group_bad", "mailhosts_bad")


class Reason(enum.IntEnum):
    """Why a load was refused; the values are STATS' last_refusal_reason."""

    EMPTY = 1
    SHRINK = 2
    BAD_LINES = 3


@dataclass(frozen=True)
class Refusal:
    reason: Reason
    users: int  # users the refused load held
    bad_lines: int  # malformed lines it held
    text: str  # for the log and the error message


def bad_lines_of(stats: dict[str, int]) -> int:
    return sum(stats[k] for k in BAD_LINE_KINDS)


@dataclass(frozen=True)
class GuardLimits:
    max_shrink: float
    max_bad_lines: int
    allow_empty: bool

    @classmethod
    def from_settings(cls, cfg: dict) -> GuardLimits:
        """From the keys of GUARD_DEFAULTS in [pwserver]; ValueError says
        what is wrong."""
        max_shrink, max_bad, allow_empty = cfg["reload_max_shrink"], cfg["reload_max_bad_lines"], cfg["allow_empty"]
        if isinstance(max_shrink, bool) or not isinstance(max_shrink, (int, float)) or not 0 <= max_shrink <= 1:
            raise ValueError("reload_max_shrink must be a share of the users, 0..1 (0.1: 10 %)")
        if isinstance(max_bad, bool) or not isinstance(max_bad, int) or max_bad < 0:
            raise ValueError("reload_max_bad_lines must be an integer >= 0")
        if not isinstance(allow_empty, bool):
            raise ValueError("allow_empty must be true or false")
        return cls(float(max_shrink), max_bad, allow_empty)

    def check(self, stats: dict[str, int], served_users: int) -> Refusal | None:
        """Why a load with statistics `stats` (Table.stats()) must not
        replace a generation of `served_users` users (0: none served yet,
        so nothing can be lost), or None when it may."""
        users, bad = stats["users"], bad_lines_of(stats)

        def refuse(reason: Reason, text: str) -> Refusal:
            return Refusal(reason, users, bad, text)

        if bad > self.max_bad_lines:
            return refuse(
                Reason.BAD_LINES,
                f"{bad} malformed lines, more than reload_max_bad_lines ({self.max_bad_lines}); {users} users",
            )
        if users == 0 and not self.allow_empty:
            return refuse(Reason.EMPTY, "no users in the sources")
        lost = served_users - users
        if lost > served_users * self.max_shrink:
            return refuse(
                Reason.SHRINK,
                f"{users} users where {served_users} are served: "
                f"{lost * 100 / served_users:.1f} % lost, more than reload_max_shrink "
                f"({self.max_shrink * 100:g} %)",
            )
        return None
