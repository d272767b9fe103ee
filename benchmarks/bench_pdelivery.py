#!/usr/bin/env python3
"""CPU per run of `pdelivery -d USER`, Sendmail's local mailer: the C
program (delivery/_csrc, the venv's `pdelivery`) against the Python one it
replaces (delivery/pdelivery.py, `python -m delivery.pdelivery`), in the
same run, against the same pwserver and the same pdeliveryd.

    .venv/bin/python benchmarks/bench_pdelivery.py [--messages 100] [--size 3072]

Each message is one process, as Sendmail runs the mailer: a 3 KiB message
on stdin (LF line ends), `-f SENDER -i QUEUEID -d USER` (a user of 100,
each message to the next), exit 0 only once pdeliveryd's 250 is in (the
message is durable). The CPU of a run is the child's own user + system
time (wait4's rusage), so neither pdeliveryd nor pwserver is counted; wall
time includes them (and pdeliveryd's fsyncs). The Python start-up alone
(`python -c 'import delivery.pdelivery'`) is measured too: it is most of
the old cost. Results: a Markdown table on stdout (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.support: the test helpers start the daemons

from tests.support.delivery_util import Pdeliveryd, client_conf, env_with, free_port, messages, write_users  # noqa: E402
from tests.support.pwtest import BIN, PwServer  # noqa: E402

USERS = 100


def make_message(size: int) -> bytes:
    head = b"From: bench@example.org\nTo: someone@example.org\nSubject: benchmark\n\n"
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcd\n"
    return (head + line * (size // len(line) + 1))[: size - 1] + b"\n"


def run_once(argv: list[str], data: bytes, env: dict, log: pathlib.Path) -> tuple[int, float, float]:
    """(exit status, CPU seconds of the child, wall seconds)."""
    with open(log, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err, env=env)
        proc.stdin.write(data)
        proc.stdin.close()
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4, not by Popen
    return proc.returncode, ru.ru_utime + ru.ru_stime, wall


def measure(name: str, argv_for, data: bytes | None, env: dict, n: int, work: pathlib.Path) -> dict:
    cpu, wall = [], []
    for i in range(n):
        argv = argv_for(i)
        rc, c, w = run_once(argv, data or b"", env, work / "stderr.log")
        if rc != 0:
            raise SystemExit(f"{name}: {' '.join(argv)} exited {rc}: {(work / 'stderr.log').read_text()}")
        cpu.append(c)
        wall.append(w)
    return {
        "name": name,
        "cpu_ms": 1000 * statistics.mean(cpu),
        "cpu_p50": 1000 * statistics.median(cpu),
        "cpu_max": 1000 * max(cpu),
        "wall_ms": 1000 * statistics.mean(wall),
        "per_s": n / sum(wall),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=100)
    p.add_argument("--size", type=int, default=3072)
    args = p.parse_args(argv)
    data = make_message(args.size)
    with tempfile.TemporaryDirectory(prefix="bench-pdelivery-") as tmp:
        work = pathlib.Path(tmp)
        users = {f"user{i:03d}": (3000 + i, 3000 + i, "127.0.0.1", False) for i in range(USERS)}
        port = free_port()
        settings = work / "pwmail.toml"
        settings.write_text(f"[delivery]\nlmtp_port = {port}\n")
        with PwServer(write_users(work / "users", users)) as pw:
            env = env_with(client_conf(work / "pwserver.conf", [pw.address]), settings)
            env.pop("PWMAIL_SYSLOG", None)
            store = Pdeliveryd(work / "store", "127.0.0.1", port, env)
            try:

                def mailer(prog: list[str], tag: str):
                    return lambda i: [
                        *prog,
                        "-f",
                        "bench@example.org",
                        "-i",
                        f"{tag}{i:05d}",
                        "-d",
                        f"user{i % USERS:03d}",
                    ]

                rows = [
                    measure(
                        "C `pdelivery -d USER`", mailer([str(BIN / "pdelivery")], "C"), data, env, args.messages, work
                    ),
                    measure(
                        "Python `python -m delivery.pdelivery -d USER`",
                        mailer([sys.executable, "-m", "delivery.pdelivery"], "P"),
                        data,
                        env,
                        args.messages,
                        work,
                    ),
                    measure(
                        "Python start-up alone: `python -c 'import delivery.pdelivery'`",
                        lambda i: [sys.executable, "-c", "import delivery.pdelivery"],
                        None,
                        env,
                        args.messages,
                        work,
                    ),
                ]
            finally:
                store.stop()
            stored = sum(len(messages(d)) for d in (work / "store").rglob("user*") if (d / "new").is_dir())
    assert stored == 2 * args.messages, f"{stored} messages stored, expected {2 * args.messages}"
    print(f"{args.messages} messages of {args.size} bytes, one process each; {os.cpu_count()} CPUs\n")
    print("| program | CPU ms/run (mean) | median | max | wall ms/run | messages/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['name']} | {r['cpu_ms']:.2f} | {r['cpu_p50']:.2f} | {r['cpu_max']:.2f} | {r['wall_ms']:.1f} | "
            f"{r['per_s']:.1f} |"
        )
    c, py = rows[0], rows[1]
    print(f"\nC/Python CPU per run: 1/{py['cpu_ms'] / c['cpu_ms']:.0f}; messages/s {c['per_s'] / py['per_s']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
