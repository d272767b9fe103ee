"""Settings of the Python daemons and tools: /etc/pwmail.toml.

One reader for the format. `PWMAIL_CONF` names another file. Each part
asks for its own section with its defaults next to the code that uses them:

    cfg = settings.section("delivery", {"lmtp_port": 24})

A missing file gives the defaults; a malformed one raises SettingsError
with the file and the reason. Command-line flags override what this returns.
"""
from __future__ import annotations

import os
import tomllib
from typing import Any

from .errors import ConfigError

DEFAULT_PATH = "/etc/pwmail.toml"


class SettingsError(ConfigError):
    """The settings file exists but cannot be used."""


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


def section(name: str, defaults: dict[str, Any], path: str | None = None) -> dict[str, Any]:
    """Section `name` over `defaults`; unknown keys are an error (typos)."""
    data = load(path).get(name, {})
    if not isinstance(data, dict):
        raise SettingsError(f"{path or settings_path()}: [{name}] is not a table")
    unknown = sorted(set(data) - set(defaults))
    if unknown:
        raise SettingsError(f"{path or settings_path()}: unknown key(s) in [{name}]: {', '.join(unknown)}")
    merged = dict(defaults)
    merged.update(data)
    return merged
