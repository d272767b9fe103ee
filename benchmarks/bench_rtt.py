"""Where a getpwnam through libnss_pwserver.so.2 spends its time:
benchmarks/rtt_breakdown.c times, interleaved in one process, the C echo
round trip, a raw request to pwserver (no NSS), the module called directly
and getpwnam_r through glibc, with the servers pinned to CPU 1 ("cross")
or to CPU 0 with the client ("same").

Run by hand, as root (the driver runs chrooted in a private mount namespace
whose /etc/nsswitch.conf, a plain file, names `passwd: pwserver`):

    .venv/bin/python benchmarks/bench_rtt.py --users 10000,1000000 [--threads N] [--busy-poll-us US] [--rounds 10]

Users come from `pwmail gen-users N` (kept in --cache, as bench_nss.py does).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_nss import ROOT, breakdown, build, gen_users, pick_names  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", default="10000,1000000")
    p.add_argument("--names", type=int, default=200)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, help="pwserver --threads (default: pwserver's)")
    p.add_argument("--busy-poll-us", type=int, help="pwserver --busy-poll-us (default: pwserver's)")
    p.add_argument(
        "--nss-dir",
        default=str(ROOT / "nss_module"),
        help="folder holding the libnss_pwserver.so.2 to measure (another build, to compare)",
    )
    p.add_argument("--cache", default="/tmp/nssbench")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("bench_rtt: needs root (private mount namespace)", file=sys.stderr)
        return 1
    cache = pathlib.Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    print("| users | placement | echo | raw pwserver | module | getpwnam_r | raw/echo | getpwnam/echo |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(tmp)
        tools = build(work)
        for n in (int(x) for x in args.users.split(",")):
            for place, cpu in (("cross", "1"), ("same", "0")):
                users = gen_users(n, cache)
                names = pick_names(users, args.names, work)
                flags = [
                    f"--{k.replace('_', '-')}={v}"
                    for k, v in (("threads", args.threads), ("busy_poll_us", args.busy_poll_us))
                    if v is not None
                ]
                r = breakdown(users / "passwd", names, cpu, tools, work, args.rounds, flags, args.nss_dir)
                e = r["echo"][0]
                cells = " | ".join(f"{r[k][0]:.1f} / {r[k][1]:.1f}" for k in ("echo", "raw", "module", "glibc"))
                print(f"| {n:,} | {place} | {cells} | {r['raw'][0] / e:.2f}x | {r['glibc'][0] / e:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
