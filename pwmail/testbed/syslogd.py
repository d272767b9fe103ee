"""A small syslog collector (the paper's III.B central log host): receives
syslog datagrams (RFC 3164 as sent by Python's SysLogHandler, or RFC 5424)
over UDP and appends one line per message to a file:

    2026-11-30T00:01:02.123456Z store1 mail.info pdeliveryd[412]: INFO delivered ...

The sending host is named from its source address (`--name ADDR=HOST`, the
address itself otherwise). Each line is flushed as it arrives. Runs until
SIGTERM or SIGINT.

    python syslogd.py --listen 10.77.0.8:5514 --out messages [--name 10.77.0.2=pw1 ...]

`--relay PATH` is a host's local syslog instead: a datagram socket at PATH
(what a host's /dev/log is; programs like Sendmail log nowhere else) whose
messages are appended to --out and forwarded unchanged to the collector
(`--to HOST:PORT`), as a real host's syslogd forwards to the log host:

    python syslogd.py --relay DIR/log.sock --out DIR/maillog --to 10.77.0.8:5514
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import re
import signal
import socket
import sys

MAX_DATAGRAM = 65535
MAX_LINE = 8192  # longer messages are cut, not dropped
FACILITIES = [
    "kern",
    "user",
    "mail",
    "daemon",
    "auth",
    "syslog",
    "lpr",
    "news",
    "uucp",
    "cron",
    "authpriv",
    "ftp",
    "ntp",
    "audit",
    "alert",
    "clock",
] + [f"local{i}" for i in range(8)]
SEVERITIES = ["emerg", "alert", "crit", "err", "warning", "notice", "info", "debug"]
_PRI = re.compile(rb"^<(\d{1,3})>")


def format_line(data: bytes, host: str, now: datetime.datetime | None = None) -> str:
    """One log line for one datagram."""
    now = now or datetime.datetime.now(datetime.UTC)
    data = data.rstrip(b"\x00\r\n")
    pri = "user.notice"
    m = _PRI.match(data)
    if m:
        value = int(m.group(1))
        fac, sev = divmod(value, 8)
        if fac < len(FACILITIES):
            pri = f"{FACILITIES[fac]}.{SEVERITIES[sev]}"
        data = data[m.end() :]
    text = data[:MAX_LINE].decode("utf-8", "replace")
    if text.startswith("\ufeff"):
        text = text[1:]
    text = text.replace("\n", "\\n").replace("\r", "\\r")
    stamp = now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return f"{stamp} {host} {pri} {text}\n"


def serve(sock: socket.socket, out_path: str, ready: str, handle) -> int:
    """Receive datagrams on sock until SIGTERM or SIGINT; handle(data,
    source address, out file) each, then flush the file."""
    stopping: list[int] = []

    def on_signal(signum, frame):
        stopping.append(signum)
        sock.close()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with open(out_path, "a", encoding="utf-8") as out:
        print(ready, file=sys.stderr, flush=True)
        while not stopping:
            try:
                data, src = sock.recvfrom(MAX_DATAGRAM)
            except OSError:
                break
            handle(data, src, out)
            out.flush()
    return 0


def relay(path: str, out_path: str, to: str | None) -> int:
    """--relay: a local /dev/log socket, copied to out_path and forwarded to `to`."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock.bind(path)
    os.chmod(path, 0o666)  # programs log as other users (Sendmail's mailer runs as mail)
    fwd = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dest = (to.rsplit(":", 1)[0], int(to.rsplit(":", 1)[1])) if to else None

    def handle(data, src, out):
        out.write(format_line(data, "localhost"))
        if dest:
            with contextlib.suppress(OSError):  # the log host may be cut: the local copy stays
                fwd.sendto(data.rstrip(b"\x00\n"), dest)

    return serve(sock, out_path, f"syslogd: relay ready on {path}" + (f", forwarding to {to}" if to else ""), handle)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="syslogd", description=__doc__.split("\n\n")[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--listen", metavar="HOST:PORT")
    where.add_argument("--relay", metavar="PATH", help="a local /dev/log socket at PATH")
    ap.add_argument("--to", metavar="HOST:PORT", help="with --relay: the collector to forward to")
    ap.add_argument("--out", required=True)
    ap.add_argument("--name", action="append", default=[], metavar="ADDR=HOST")
    args = ap.parse_args(argv)
    if args.relay:
        return relay(args.relay, args.out, args.to)
    names = dict(n.split("=", 1) for n in args.name)
    host, port = args.listen.rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, int(port)))
    return serve(
        sock,
        args.out,
        f"syslogd: ready on {host}:{port}, writing {args.out}",
        lambda data, src, out: out.write(format_line(data, names.get(src[0], src[0]))),
    )


if __name__ == "__main__":
    sys.exit(main())
