"""A small syslog collector (the paper's III.B central log host): receives
syslog datagrams (RFC 3164 as sent by Python's SysLogHandler, or RFC 5424)
over UDP and appends one line per message to a file:

    2026-11-30T00:01:02.123456Z store1 mail.info pdeliveryd[412]: INFO delivered ...

The sending host is named from its source address (`--name ADDR=HOST`, the
address itself otherwise). Each line is flushed as it arrives. Runs until
SIGTERM or SIGINT.

    python syslogd.py --listen 10.77.0.8:5514 --out messages [--name 10.77.0.2=pw1 ...]
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import signal
import socket
import sys

MAX_DATAGRAM = 65535
MAX_LINE = 8192          # longer messages are cut, not dropped
FACILITIES = ["kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron",
              "authpriv", "ftp", "ntp", "audit", "alert", "clock"] + [f"local{i}" for i in range(8)]
SEVERITIES = ["emerg", "alert", "crit", "err", "warning", "notice", "info", "debug"]
_PRI = re.compile(rb"^<(\d{1,3})>")


def format_line(data: bytes, host: str, now: datetime.datetime | None = None) -> str:
    """One log line for one datagram."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    data = data.rstrip(b"\x00\r\n")
    pri = "user.notice"
    m = _PRI.match(data)
    if m:
        value = int(m.group(1))
        fac, sev = divmod(value, 8)
        if fac < len(FACILITIES):
            pri = f"{FACILITIES[fac]}.{SEVERITIES[sev]}"
        data = data[m.end():]
    text = data[:MAX_LINE].decode("utf-8", "replace")
    if text.startswith("\ufeff"):
        text = text[1:]
    text = text.replace("\n", "\\n").replace("\r", "\\r")
    stamp = now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return f"{stamp} {host} {pri} {text}\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="syslogd", description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", required=True, metavar="HOST:PORT")
    ap.add_argument("--out", required=True)
    ap.add_argument("--name", action="append", default=[], metavar="ADDR=HOST")
    args = ap.parse_args(argv)
    names = dict(n.split("=", 1) for n in args.name)
    host, port = args.listen.rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, int(port)))
    stop = False

    def on_signal(signum, frame):
        nonlocal stop
        stop = True
        sock.close()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    out = open(args.out, "a", encoding="utf-8")
    print(f"syslogd: ready on {host}:{port}, writing {args.out}", file=sys.stderr, flush=True)
    while not stop:
        try:
            data, (src, _) = sock.recvfrom(MAX_DATAGRAM)
        except OSError:
            break
        out.write(format_line(data, names.get(src, src)))
        out.flush()
    out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
