"""Settings of the Python daemons and tools: /etc/pwmail.toml.

One reader for the format. `PWMAIL_CONF` names another file. Each part
describes its own section next to the code that uses it, with defaults and
the checks its values must pass:

    SECTION = settings.Section("delivery", {"lmtp_port": 24}, {"lmtp_port": settings.port})
    cfg = SECTION.load(path)                             # the file over the defaults
    cfg = SECTION.override(cfg, {"lmtp_port": args.lmtp_port})  # flags over the file

A missing file gives the defaults. Everything wrong raises SettingsError in
one line naming where the value came from: the file, the section and the key
(`/etc/pwmail.toml: [delivery] lmtp_port = '12024x': want an integer`), or
the flag (`--lmtp-port 0: want a port 1..65535`). A value's type must be its
default's (an integer is taken where a float is the default).
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Callable
from typing import Any

from .errors import ConfigError
from .hostport import parse_hostport

DEFAULT_PATH = "/etc/pwmail.toml"

# A check returns what is wrong with a value, or None when it is fine.
Check = Callable[[Any], "str | None"]


class SettingsError(ConfigError):
    """The settings file exists but cannot be used, or a value is wrong."""


def settings_path() -> str:
    return os.environ.get("PWMAIL_CONF") or DEFAULT_PATH


def load(path: str | None = None) -> dict[str, Any]:
    """The whole file as a dict ({} when there is no file)."""
    path = path or settings_path()
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise SettingsError(f"{path}: {e}") from e


# ---- checks ---------------------------------------------------------------


def between(lo: float, hi: float) -> Check:
    return lambda v: None if lo <= v <= hi else f"want {lo}..{hi}"


def positive(v) -> str | None:
    return None if v > 0 else "must be above 0"


def non_negative(v) -> str | None:
    return None if v >= 0 else "must not be negative"


def port(v) -> str | None:
    return None if 1 <= v <= 65535 else "want a port 1..65535"


def one_of(*choices: str) -> Check:
    return lambda v: None if v in choices else f"want one of {', '.join(choices)}"


def address(*, empty: bool = False, port_zero: bool = False) -> Check:
    """HOST:PORT (the port may be left to the code's default); `empty`:
    "" allowed (off, or a default address)."""

    def check(v: str) -> str | None:
        if empty and not v:
            return None
        try:
            parse_hostport(v, 1, port_zero=port_zero)
        except ConfigError as e:
            return str(e)
        return None

    return check


def networks(v: list) -> str | None:
    """A list of CIDR networks (or single addresses)."""
    for item in v:
        try:
            if not isinstance(item, str):
                raise TypeError(f"{item!r} is not a string")
            ipaddress.ip_network(item, strict=False)
        except (TypeError, ValueError) as e:
            return f"{e} (want CIDR like 10.0.0.0/8)"
    return None


def each(check: Check) -> Check:
    """`check` on every item of a list, or every value of a table."""

    def check_all(v) -> str | None:
        for item in v.values() if isinstance(v, dict) else v:
            problem = check(item)
            if problem:
                return f"{item!r}: {problem}"
        return None

    return check_all


def _type_problem(value: Any, default: Any) -> str | None:
    """What is wrong with the value's type, given its default's."""
    if isinstance(default, bool):
        want, ok = "true or false", isinstance(value, bool)
    elif isinstance(default, int):
        want, ok = "an integer", isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        want, ok = "a number", isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, str):
        want, ok = "a string", isinstance(value, str)
    elif isinstance(default, list):
        want, ok = "a list", isinstance(value, list)
    elif isinstance(default, dict):
        want, ok = "a table", isinstance(value, dict)
    else:
        return None
    return None if ok else f"want {want}"


# ---- sections -------------------------------------------------------------


class Section:
    """One section of the file: its defaults and the checks of its values."""

    def __init__(self, name: str, defaults: dict[str, Any], checks: dict[str, Check] | None = None):
        self.name = name
        self.defaults = defaults
        self.checks = checks or {}
        unknown = set(self.checks) - set(defaults)
        assert not unknown, f"checks for keys [{name}] does not have: {unknown}"

    def problem(self, key: str, value: Any) -> str | None:
        """What is wrong with `value` for `key`, or None."""
        problem = _type_problem(value, self.defaults[key])
        if problem is None and key in self.checks:
            problem = self.checks[key](value)
        return problem

    def load(self, path: str | None = None) -> dict[str, Any]:
        """The section over its defaults; unknown keys are an error (typos)."""
        path = path or settings_path()
        data = load(path).get(self.name, {})
        if not isinstance(data, dict):
            raise SettingsError(f"{path}: [{self.name}] is not a table")
        unknown = sorted(set(data) - set(self.defaults))
        if unknown:
            raise SettingsError(f"{path}: unknown key(s) in [{self.name}]: {', '.join(unknown)}")
        for key, value in data.items():
            problem = self.problem(key, value)
            if problem:
                raise SettingsError(f"{path}: [{self.name}] {key} = {value!r}: {problem}")
        merged = dict(self.defaults)
        merged.update(data)
        for key, default in self.defaults.items():
            if isinstance(default, float):
                merged[key] = float(merged[key])
        return merged

    def override(
        self, cfg: dict[str, Any], flags: dict[str, Any], names: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """`cfg` with the flags given (not None) over it, each checked and,
        when wrong, named as the flag: `--backend-port` for backend_port, or
        as `names` says (pop3d's --listen sets pop3d_listen)."""
        for key, value in flags.items():
            if value is None:
                continue
            problem = self.problem(key, value)
            if problem:
                flag = (names or {}).get(key) or "--" + key.replace("_", "-")
                raise SettingsError(f"{flag} {value}: {problem}")
            cfg[key] = value
        return cfg


def section(name: str, defaults: dict[str, Any], path: str | None = None) -> dict[str, Any]:
    """Section `name` over `defaults`, values checked against their defaults' types."""
    return Section(name, defaults).load(path)
