"""The flags every daemon shares, spelled the same everywhere: --config
(pwmail.toml), --pwserver-conf (the client configuration) and --log-stderr.
Older spellings stay accepted, hidden from --help."""

from __future__ import annotations

import argparse


def add_common_flags(parser: argparse.ArgumentParser, *, pwserver_conf: bool = True) -> None:
    """`pwserver_conf`: the daemon asks the password server (pwserver itself does not)."""
    parser.add_argument(
        "--config", metavar="F", help="settings file (default $PWMAIL_CONF or /etc/pwmail.toml); re-read on SIGHUP"
    )
    if pwserver_conf:
        parser.add_argument(
            "--pwserver-conf", metavar="F", help="client configuration (default $PWSERVER_CONF or /etc/pwserver.conf)"
        )
    parser.add_argument("--log-stderr", action="store_true", help="also log to stderr")
    # pop3d's and pop-proxy's first spelling
    parser.add_argument("--stderr", dest="log_stderr", action="store_true", help=argparse.SUPPRESS)
