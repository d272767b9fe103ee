"""pwserver throughput against its peers, and its load time and memory.

Run by hand:

    .venv/bin/python benchmarks/bench_pwserver.py [--users 100000] [--seconds 5] [--sizes 100000,1000000]

Throughput: benchmarks/pwserver_loadgen.c (2 client processes, 1 and 16
requests in flight each, 256-byte PASSWD_BY_NAME requests for random users)
against pwserver (--threads 1), a minimal C UDP echo server
(benchmarks/udp_echo.c) and a minimal Python recvfrom loop
(benchmarks/py_recvfrom.py), in one run. The load generator is pinned to
CPU 0; servers to CPU 0 ("same") and to CPU 1 ("cross"). Load time and RSS:
pwserver on generated users (tests/support/pwserver_util.write_many_users). Prints
Markdown tables for benchmarks/README.md; each throughput figure is the
median of 3 runs.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # tests.support

from tests.support.pwserver_util import Server, rss_bytes, stats, write_many_users  # noqa: E402

MiB = 1024 * 1024
RUNS = 3  # each figure is the median of RUNS runs (shared, noisy machine)
CPU_RE = re.compile(r"in (\d+) ms \((\d+) ms CPU")
PORT_RE = re.compile(r"pwserver: ready on \S+:(\d+)")


def build(work: pathlib.Path) -> dict[str, pathlib.Path]:
    out = {}
    for name in ("pwserver_loadgen", "udp_echo"):
        out[name] = work / name
        subprocess.run(["gcc", "-O2", "-o", str(out[name]), str(HERE / f"{name}.c")], check=True)
    return out


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_peer(kind: str, cpu: str, bins: dict, paths: dict) -> tuple[subprocess.Popen, int]:
    if kind == "pwserver":
        argv = [
            "taskset",
            "-c",
            cpu,
            str(pathlib.Path(sys.executable).parent / "pwserver"),
            "--listen",
            "127.0.0.1:0",
            "--threads",
            "1",
            "--log-stderr",
        ]
        for name, path in paths.items():
            argv += [f"--{name}", str(path)]
        p = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env={**os.environ, "PWMAIL_CONF": "/nonexistent"})
        for line in p.stderr:
            m = PORT_RE.search(line)
            if m:
                return p, int(m.group(1))
        raise RuntimeError("pwserver did not start")
    port = free_port()
    if kind == "c-echo":
        argv = [str(bins["udp_echo"]), "server", str(port)]
    else:
        argv = [sys.executable, str(HERE / "py_recvfrom.py"), str(port)]
    p = subprocess.Popen(["taskset", "-c", cpu] + argv)
    time.sleep(0.5)
    return p, port


def throughput(bins, paths, users: int, seconds: float) -> list[tuple]:
    rows = []
    for placement, cpu in (("same", "0"), ("cross", "1")):
        for kind in ("pwserver", "c-echo", "py-recvfrom"):
            proc, port = start_peer(kind, cpu, bins, paths)
            try:
                for inflight in (1, 16):
                    runs = []
                    for _ in range(RUNS):
                        out = subprocess.run(
                            [
                                "taskset",
                                "-c",
                                "0",
                                str(bins["pwserver_loadgen"]),
                                "127.0.0.1",
                                str(port),
                                "2",
                                str(inflight),
                                str(seconds),
                                str(users),
                            ],
                            capture_output=True,
                            text=True,
                            check=True,
                        ).stdout.split()
                        runs.append((int(out[0]), int(out[1])))
                    qps, timeouts = sorted(runs)[RUNS // 2]  # the median run
                    rows.append((placement, kind, inflight, qps, timeouts))
                    print(rows[-1], runs, file=sys.stderr)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(10)
    return rows


def load_and_memory(work: pathlib.Path, sizes: list[int]) -> list[tuple]:
    rows = []
    for n in sizes:
        d = work / f"u{n}"
        d.mkdir()
        paths = write_many_users(d, n)
        source = sum(os.path.getsize(p) for p in paths.values())
        with Server(paths, timeout=300) as s:
            st = stats(s.addr)
            cpu_ms = int(CPU_RE.search(s.log()).group(2))
            rows.append((n, source, st["load_ms"], cpu_ms, rss_bytes(s.proc.pid), st["table_bytes"]))
        print(rows[-1], file=sys.stderr)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--memory-only", action="store_true", help="skip the throughput runs")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(tmp)
        bins = build(work)
        rows = []
        if not args.memory_only:
            src = work / "qps"
            src.mkdir()
            paths = write_many_users(src, args.users)
            rows = throughput(bins, paths, args.users, args.seconds)
        mem = load_and_memory(work, [int(x) for x in args.sizes.split(",") if x])
    print("| placement | server | in flight (x2 procs) | answers/s | windows re-primed |")
    print("|---|---|---|---|---|")
    for placement, kind, inflight, qps, timeouts in rows:
        print(f"| {placement} | {kind} | {inflight} | {qps:,} | {timeouts} |")
    print()
    print(
        "| users | source files | load time (wall) | load time (CPU) | RSS | RSS budget (1.3 x sources + 40 MiB) | table bytes |"
    )
    print("|---|---|---|---|---|---|---|")
    for n, source, load_ms, cpu_ms, rss, table in mem:
        print(
            f"| {n:,} | {source / MiB:.0f} MiB | {load_ms} ms | {cpu_ms} ms | {rss / MiB:.0f} MiB | "
            f"{(1.3 * source + 40 * MiB) / MiB:.0f} MiB | {table / MiB:.0f} MiB |"
        )


if __name__ == "__main__":
    main()
