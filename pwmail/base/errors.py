"""The one error type for a configuration mistake, shared by every part,
and the one way it ends a process: a single line on stderr and EX_CONFIG."""

from __future__ import annotations

import sys
from collections.abc import Callable

# sysexits.h: "something was found in an unconfigured or misconfigured state"
EX_CONFIG = 78


class ConfigError(ValueError):
    """A setting, flag or configuration file is wrong; the text says which
    and why."""


def listen_error(host: str, port: int, e: OSError) -> ConfigError:
    """A listener that cannot bind: the address and the reason (in use, not ours)."""
    shown = f"[{host}]" if ":" in host else host
    return ConfigError(f"cannot listen on {shown}:{port}: {e.strerror or e}")


def exit_on_config_error(prog: str, main: Callable[[], int | None]) -> int:
    """Runs `main`; a ConfigError from anywhere in it becomes one line
    ("prog: file: [section] key = value: what is wrong") and EX_CONFIG.
    Printed here only, so no daemon or tool prints it twice."""
    try:
        return main() or 0
    except ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr, flush=True)
        return EX_CONFIG
