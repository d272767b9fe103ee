"""The default placement rule (docs/placement.md), in Python.

The twin of pwcache/_csrc/pw_placement.c; both are tested against
tests/vectors/placement.json. `PlacementRule.from_settings` reads the
`[placement]` section of pwmail.toml; the server hands the same rule to C.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pwmail.base import settings
from pwmail.base.errors import ConfigError

DEFAULTS: dict = {"rule": "ranges", "ranges": [], "hosts": []}
# the file's [placement]; from_settings checks the entries themselves
SECTION = settings.Section("placement", DEFAULTS, {"rule": settings.one_of("ranges", "hash")})

FNV_BASIS = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
MAX_HOST_LEN = 255


class PlacementError(ConfigError):
    """The [placement] settings cannot be used."""


def fnv1a64(data: bytes) -> int:
    h = FNV_BASIS
    for byte in data:
        h = ((h ^ byte) * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return h


def rendezvous_score(host: str, name: bytes, weight: float) -> float:
    x = fnv1a64(host.encode() + b"\0" + name)
    u = ((x >> 11) + 0.5) / 2.0**53
    return -weight / math.log(u)


@dataclass(frozen=True)
class PlacementRule:
    kind: str  # "ranges" or "hash"
    hosts: tuple[tuple[str, float], ...]  # (host, weight), in order
    ranges: tuple[tuple[int, int, int], ...] = ()  # (first byte, last byte, host index)

    @classmethod
    def from_settings(cls, section: dict) -> PlacementRule:
        kind = section.get("rule", "ranges")
        if kind == "hash":
            return cls("hash", tuple(_parse_weighted(h) for h in _strings(section, "hosts")))
        if kind != "ranges":
            raise PlacementError(f"[placement] rule must be 'ranges' or 'hash', not {kind!r}")
        hosts: list[str] = []
        ranges = []
        for entry in _strings(section, "ranges"):
            first, last, host = _parse_range(entry)
            if host not in hosts:
                hosts.append(host)
            ranges.append((first, last, hosts.index(host)))
        return cls("ranges", tuple((h, 1.0) for h in hosts), tuple(ranges))

    def pick(self, name: str | bytes) -> str | None:
        """The host for `name`, or None when the rule names no host."""
        raw = name.encode() if isinstance(name, str) else name
        if not self.hosts:
            return None
        if self.kind == "ranges":
            c = raw[0] if raw else 0
            if ord("A") <= c <= ord("Z"):
                c += 32
            for first, last, host in self.ranges:
                if first <= c <= last:
                    return self.hosts[host][0]
            weights = [1.0] * len(self.hosts)  # fallback: hash, equal weights
        else:
            weights = [w for _, w in self.hosts]
        best, best_score = None, 0.0
        for (host, _), w in zip(self.hosts, weights):
            s = rendezvous_score(host, raw, w)
            if best is None or s > best_score:  # ties: the first listed wins
                best, best_score = host, s
        return best


def _strings(section: dict, key: str) -> list[str]:
    value = section.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PlacementError(f"[placement] {key} must be a list of strings")
    return value


def _check_host(host: str) -> str:
    if not host or len(host.encode()) > MAX_HOST_LEN or any(c.isspace() or c == "\0" for c in host):
        raise PlacementError(f"[placement] bad host name {host!r}")
    return host


def _parse_weighted(entry: str) -> tuple[str, float]:
    host, sep, weight = entry.rpartition(":")
    if not sep:
        return _check_host(entry), 1.0
    try:
        w = float(weight)
    except ValueError:
        raise PlacementError(f"[placement] bad weight in {entry!r}") from None
    if not (w > 0 and math.isfinite(w)):
        raise PlacementError(f"[placement] weight must be > 0 in {entry!r}")
    return _check_host(host), w


def _parse_range(entry: str) -> tuple[int, int, str]:
    parts = entry.split()
    if len(parts) != 2:
        raise PlacementError(f"[placement] range must be 'FIRST-LAST HOST', not {entry!r}")
    letters, host = parts
    if len(letters) == 1:
        first = last = letters
    elif len(letters) == 3 and letters[1] == "-":
        first, last = letters[0], letters[2]
    else:
        raise PlacementError(f"[placement] bad letter range in {entry!r}")
    a, b = ord(first.lower()), ord(last.lower())
    if a > 127 or b > 127 or a > b:
        raise PlacementError(f"[placement] bad letter range in {entry!r}")
    return a, b, _check_host(host)
