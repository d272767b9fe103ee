"""pop-proxy's cost: logins per second and RETR throughput through the
proxy against straight to the backend, in the same run (interleaved
rounds, medians), and N idle client connections held with the proxy's
memory. Run by hand (results in benchmarks/README.md):

    .venv/bin/python benchmarks/bench_pop.py [--backend pop3d|dovecot|both]

Everything runs on loopback: a real pwserver, the backend on 127.0.0.2
(pop3d) or 127.0.0.6 (Dovecot, through libnss_pwserver; needs root), the
proxy on 127.0.0.1. Users get real crypt(3) hashes (yescrypt, Debian's
default, or --hash sha512 for a cheaper check that makes the proxy's share
larger). `--peer nginx` measures nginx's mail proxy in the same rounds
(benchmarks/nginx_peer.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import pathlib
import resource
import shutil
import socket
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.support: the test helpers start the daemons

from nginx_peer import NginxMailProxy  # noqa: E402

from tests.support.pop_util import (  # noqa: E402
    UID0,
    Dovecot,
    client_conf,
    deliver,
    make_root,
    start_pop3d,
    start_proxy,
    write_key,
    write_users,
)
from tests.support.pwtest import PwServer  # noqa: E402


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU of a process and all its descendants, live or reaped (Dovecot
    forks a process per session: their time lands in the parent's cutime)."""
    parent, ticks = {}, {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                f = _stat(int(d))
            except OSError:
                continue
            parent[int(d)] = int(f[1])
            ticks[int(d)] = sum(int(x) for x in f[11:15])  # utime stime cutime cstime
    total, todo = 0, [pid]
    children: dict[int, list[int]] = {}
    for c, p in parent.items():
        children.setdefault(p, []).append(c)
    while todo:
        p = todo.pop()
        total += ticks.get(p, 0)
        todo.extend(children.get(p, []))
    return total / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                children.setdefault(int(_stat(int(d))[1]), []).append(int(d))
            except OSError:
                continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def pin_tree(pid: int, cpus: set[int]) -> None:
    """A process, its threads and its children on `cpus` (new children inherit it)."""
    for p in descendants(pid):
        for tid in os.listdir(f"/proc/{p}/task"):
            try:
                os.sched_setaffinity(int(tid), cpus)
            except OSError:
                pass


class SystemCPU:
    """CPU seconds spent by everything in the test, by part: this client,
    the backend, the password server and the proxy."""

    def __init__(self, parts: dict[str, int]):
        self.parts = parts

    def __call__(self) -> dict[str, float]:
        got = {name: tree_cpu_seconds(pid) for name, pid in self.parts.items()}
        got["client"] = time.process_time()
        return got


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


# --- load generators ------------------------------------------------------------------------------
async def _login_worker(addr, creds, deadline, counts, limit: float = float("inf")) -> None:
    """Logins one after another; `addr` may be a list of addresses, taken in turn."""
    loop = asyncio.get_running_loop()
    addrs = addr if isinstance(addr, list) else [addr]
    i = 0
    while loop.time() < deadline and i < limit:
        user, password = creds[i % len(creds)]
        r, w = await asyncio.open_connection(*addrs[i % len(addrs)])
        i += 1
        try:
            assert (await r.readline()).startswith(b"+OK")
            w.write(f"USER {user}\r\n".encode())
            assert (await r.readline()).startswith(b"+OK")
            w.write(f"PASS {password}\r\n".encode())
            answer = await r.readline()
            if not answer.startswith(b"+OK"):
                raise RuntimeError(f"login of {user} failed: {answer!r}")
            w.write(b"QUIT\r\n")
            await r.readline()
        finally:
            w.close()
        counts[0] += 1


def logins_per_second(addr, creds, concurrency: int, seconds: float) -> float:
    async def run():
        loop = asyncio.get_running_loop()
        counts = [0]
        per = [creds[k::concurrency] for k in range(concurrency)]  # a user is never logged in twice at once
        t0 = loop.time()
        await asyncio.gather(*(_login_worker(addr, per[k], t0 + seconds, counts) for k in range(concurrency)))
        return counts[0] / (loop.time() - t0)

    return asyncio.run(run())


def _line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise RuntimeError("closed")
        data += chunk
    return data


def retr_throughput(addr, user, password, seconds: float) -> float:
    """Bytes per second of RETR 1 repeated for `seconds` on one session."""
    s = socket.create_connection(addr)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    try:
        _line(s)
        s.sendall(f"USER {user}\r\n".encode())
        _line(s)
        s.sendall(f"PASS {password}\r\n".encode())
        assert _line(s).startswith(b"+OK")
        buf = bytearray(4 << 20)
        view = memoryview(buf)
        total = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            s.sendall(b"RETR 1\r\n")
            tail = b""
            while True:
                n = s.recv_into(view)
                if not n:
                    raise RuntimeError("closed during RETR")
                total += n
                tail = (tail + bytes(view[max(0, n - 5) : n]))[-5:]
                if tail == b"\r\n.\r\n":
                    break
        elapsed = time.perf_counter() - t0
        s.sendall(b"QUIT\r\n")
        return total / elapsed
    finally:
        s.close()


def hold_idle(addr, count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        s = socket.create_connection(addr)
        socks.append(s)
    for s in socks:
        assert _line(s).startswith(b"+OK")
    return socks


# --- set-up ----------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=["pop3d", "dovecot", "both"], default="both")
    ap.add_argument("--hash", choices=["yescrypt", "sha512"], default="yescrypt")
    ap.add_argument("--users", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=1.5, help="length of one measurement")
    # 40: the median of 15 pairs moved by +-0.03 from run to run (the
    # backend's hash costs +-7 % a login on these shared cores).
    ap.add_argument(
        "--pairs", type=int, default=40, help="rounds: direct and each proxy back to back, the order rotating"
    )
    ap.add_argument(
        "--peer",
        choices=["none", "nginx"],
        default="none",
        help="also measure nginx's mail proxy in the same rounds (fetched from the Debian "
        "archive into /var/cache/pwmail-test; benchmarks/nginx_peer.py)",
    )
    ap.add_argument(
        "--measure",
        default="logins,retr",
        type=lambda v: v.split(","),
        help="what to measure: logins, retr or both (comma-separated)",
    )
    ap.add_argument("--retr-mb", type=int, default=32, help="size of the RETR message")
    ap.add_argument("--idle", type=int, default=5000, help="idle connections to hold")
    ap.add_argument(
        "--pin",
        action="store_true",
        help="the proxy alone on CPU 1, everything else on CPU 0 (the proxy on a host of its own)",
    )
    ap.add_argument(
        "--proxy-setting",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help='one more [pop] line for the proxy, e.g. "splice = false" (repeatable)',
    )
    ap.add_argument(
        "--cpu",
        type=int,
        metavar="N",
        help="only the proxy's CPU per login: N logins one after another, then N with "
        "--concurrency clients (pop3d backend; use --hash sha512 to make it quick)",
    )
    ap.add_argument("--cpu-rounds", type=int, default=5, help="with --cpu: rounds of N logins each")
    ap.add_argument(
        "--cpu-against",
        metavar="DIR",
        help="with --cpu: also a proxy running the code in DIR (PYTHONPATH, e.g. "
        "`git archive OLD pop pwcache | tar -x -C DIR`), logins alternating between the two",
    )
    ap.add_argument(
        "--cpu-hold",
        type=float,
        default=0.0,
        metavar="S",
        help="with --cpu: keep logging in for S more seconds after the measurement "
        "(attach perf or strace to the printed proxy PID meanwhile)",
    )
    args = ap.parse_args(argv)
    if args.cpu:
        backends = ["pop3d"]

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if not args.cpu:
        backends = ["pop3d", "dovecot"] if args.backend == "both" else [args.backend]
    if "dovecot" in backends and (os.geteuid() != 0 or not shutil.which("dovecot")):
        print("dovecot needs root and dovecot-pop3d; skipping it", file=sys.stderr)
        backends.remove("dovecot")

    work = pathlib.Path(tempfile.mkdtemp(prefix="bench-pop-", dir="/tmp"))
    work.chmod(0o755)
    results = {}
    try:
        names = [f"user{i:04d}" for i in range(args.users)]
        users = {n: (f"pw-{n}", "store") for n in names}
        users["big"] = ("pw-big", "store")
        prefix = "$y$" if args.hash == "yescrypt" else "$6$"
        write_users(work / "users", users, prefix=prefix)
        key = write_key(work / "shadow.key")
        layout = make_root(work / "spool")
        uids = {n: UID0 + i for i, n in enumerate(sorted(users))}
        line = b"x" * 75 + b"\n"
        big = b"Subject: big\n\n" + line * (args.retr_mb * (1 << 20) // len(line))
        for n in users:
            deliver(layout, n, big if n == "big" else b"Subject: hi\n\nhello\n", uids[n], UID0)
        creds = [(n, users[n][0]) for n in names]
        with PwServer(work / "users", shadow_key=key) as pws:
            conf = client_conf(work / "pwserver.conf", pws.address, key)
            for backend in backends:
                if backend == "pop3d":
                    server = start_pop3d(work, work / "spool", conf, host="127.0.0.2", trusted=["127.0.0.0/8"])
                else:
                    server = Dovecot(work / "dovecot", layout, conf, "127.0.0.6")
                with server:
                    settings = (
                        f'backends = {{store = "{server.address[0]}:{server.address[1]}"}}\n'
                        f"max_connections_per_ip = {args.idle + 100}\n"
                        f"max_connections = {args.idle + 1000}\n" + "".join(f"{x}\n" for x in args.proxy_setting)
                    )
                    with start_proxy(work, conf, settings, name=f"proxy-{backend}") as proxy:
                        if args.pin:
                            pin_tree(proxy.proc.pid, {1})
                            for pid in (server.proc.pid, pws.proc.pid, os.getpid()):
                                pin_tree(pid, {0})
                        if args.cpu:
                            proxies = {"this tree": proxy}
                            with contextlib.ExitStack() as more:
                                if args.cpu_against:
                                    env = {"PYTHONPATH": str(pathlib.Path(args.cpu_against).resolve())}
                                    proxies[args.cpu_against] = more.enter_context(
                                        start_proxy(work, conf, settings, name="proxy-against", env=env)
                                    )
                                cpu_per_login(args, proxies, creds)
                            continue
                        with contextlib.ExitStack() as more:
                            fronts = {"proxy": proxy}
                            if args.peer == "nginx":
                                fronts["nginx"] = more.enter_context(
                                    NginxMailProxy(
                                        work / f"nginx-{backend}",
                                        server.address,
                                        "127.0.0.1",
                                        connections=2 * args.idle + 1000,
                                    )
                                )
                            system = SystemCPU(
                                {
                                    "backend": server.proc.pid,
                                    "pwserver": pws.proc.pid,
                                    **{name: f.proc.pid for name, f in fronts.items()},
                                }
                            )
                            results[backend] = measure(args, server.address, fronts, creds, system)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if results:
        report(args, results)
    return 0


def count_logins(addr, creds, concurrency: int, total: int) -> None:
    """Exactly `total` logins (connect, USER, PASS, QUIT) from `concurrency` clients."""

    async def run():
        per = [creds[k::concurrency] for k in range(concurrency)]
        share = [total // concurrency + (k < total % concurrency) for k in range(concurrency)]
        await asyncio.gather(*(_login_worker(addr, per[k], float("inf"), [0], share[k]) for k in range(concurrency)))

    asyncio.run(run())


def cpu_per_login(args, proxies: dict, creds) -> None:
    """The proxy's own CPU (utime + stime from /proc) per login, without the
    noise of the backend's password check in a throughput ratio. With two
    proxies (--cpu-against), the logins alternate between them: CPU time per
    login drifts with what else runs on the machine."""
    for proxy in proxies.values():
        count_logins(proxy.address, creds, args.concurrency, 200)  # warm-up
        print(f"{proxy.proc.pid}: {' '.join(proxy.proc.args[:1])}")
    # Each client takes the proxies in turn, login after login: both see the
    # same neighbours at the same moment.
    got = {(name, conc): [] for name in proxies for conc in (1, args.concurrency)}
    addrs = [p.address for p in proxies.values()]
    for _round in range(args.cpu_rounds):
        for conc in (1, args.concurrency):
            total = args.cpu * len(proxies)
            shares = [total // conc + (k < total % conc) for k in range(conc)]  # as count_logins
            c0 = {name: cpu_seconds(p.proc.pid) for name, p in proxies.items()}
            count_logins(addrs, creds, conc, total)
            for j, (name, p) in enumerate(proxies.items()):
                logins = sum(len(range(j, n, len(proxies))) for n in shares)
                got[name, conc].append(1000 * (cpu_seconds(p.proc.pid) - c0[name]) / logins)
    print(
        f"\nproxy CPU per login, ms: median (min-max) of {args.cpu_rounds} rounds of {args.cpu} logins "
        f"per proxy ({os.sysconf('SC_CLK_TCK')} ticks/s)\n"
    )
    print("| proxy | 1 client | " + f"{args.concurrency} clients |")
    print("|---|---|---|")
    for name in proxies:
        cells = [
            f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})"
            for v in (got[name, 1], got[name, args.concurrency])
        ]
        print(f"| {name} | {cells[0]} | {cells[1]} |", flush=True)
    if args.cpu_hold > 0:
        proxy = next(iter(proxies.values()))
        print(f"holding: logins for {args.cpu_hold:g} s more through PID {proxy.proc.pid}", flush=True)
        logins_per_second(proxy.address, creds, args.concurrency, args.cpu_hold)


def measure(args, direct, fronts: dict, creds, system: SystemCPU) -> dict:
    """`fronts`: name -> a running proxy in front of `direct` (pop-proxy,
    and nginx with --peer nginx). Each round measures direct and every
    front back to back, the order rotating from round to round."""
    kinds = [k for k in ("logins", "retr") if k in args.measure]
    targets = {"direct": direct, **{name: f.address for name, f in fronts.items()}}
    out = {kind: {t: [] for t in targets} for kind in kinds}
    out["cost"] = {kind: {t: [{}, 0.0] for t in targets} for kind in kinds}
    out["pairs"] = {kind: {name: [] for name in fronts} for kind in kinds}
    out["front_cpu"] = {kind: {name: [0.0, 0.0] for name in fronts} for kind in kinds}
    for f in fronts.values():
        logins_per_second(f.address, creds, args.concurrency, 1.0)  # warm-up
    runs = {
        "logins": lambda addr: logins_per_second(addr, creds, args.concurrency, args.seconds),
        "retr": lambda addr: retr_throughput(addr, "big", "pw-big", args.seconds),
    }
    # Short measurements back to back: the machine is shared, and a round
    # sees the same neighbours; each ratio reported is the median of the
    # rounds' ratios.
    names = list(targets)
    for kind in kinds:
        for r in range(args.pairs):
            order = names[r % len(names) :] + names[: r % len(names)]
            got = {}
            for t in order:
                c0, s0 = (tree_cpu_seconds(fronts[t].proc.pid) if t in fronts else 0.0), system()
                got[t] = runs[kind](targets[t])
                units = got[t] * args.seconds / (2**20 if kind == "retr" else 1)
                cost = out["cost"][kind][t]
                for part, seconds in system().items():
                    cost[0][part] = cost[0].get(part, 0.0) + seconds - s0[part]
                cost[1] += units
                if t in fronts:
                    spent = out["front_cpu"][kind][t]
                    spent[0] += tree_cpu_seconds(fronts[t].proc.pid) - c0
                    spent[1] += units
                out[kind][t].append(got[t])
            for name in fronts:
                out["pairs"][kind][name].append(got[name] / got["direct"])
    out["idle"] = {}
    for name, f in fronts.items():
        base = tree_rss_kib(f.proc.pid)
        socks = hold_idle(f.address, args.idle)
        time.sleep(1.0)
        held = tree_rss_kib(f.proc.pid)
        still = logins_per_second(f.address, creds, 2, 1.0)
        for s in socks:
            s.close()
        out["idle"][name] = {
            "count": args.idle,
            "rss_before_kib": base,
            "rss_held_kib": held,
            "logins_while_held": still,
        }
        time.sleep(0.5)
    return out


def tree_rss_kib(pid: int) -> int:
    """nginx's worker is a child of its master."""
    total = 0
    for p in descendants(pid):
        try:
            total += rss_kib(p)
        except (OSError, RuntimeError):
            pass
    return total


def report(args, results) -> None:
    print(
        f"\nPOP proxy benchmark{' (proxy pinned to CPU 1, the rest to CPU 0)' if args.pin else ''}: "
        f"{args.hash} hashes, {args.concurrency} concurrent login clients, "
        f"{args.pairs} rounds of {args.seconds:g} s each way, RETR of {args.retr_mb} MiB\n"
    )
    print(
        "| backend | in front | logins/s direct | logins/s through it | ratio (median of rounds) "
        "| RETR MiB/s direct | RETR MiB/s through it | ratio (median of rounds) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for backend, r in results.items():
        for name in FRONT_NAMES:
            if not any(name in r["pairs"][kind] for kind in r["pairs"]):
                continue
            cells = []
            for kind, scale in (("logins", 1), ("retr", 2**20)):
                if kind in r["pairs"]:
                    cells += [f"{statistics.median(r[kind][t]) / scale:.1f}" for t in ("direct", name)]
                    cells.append(f"{statistics.median(r['pairs'][kind][name]):.3f}")
                else:
                    cells += ["-", "-", "-"]
            print(f"| {backend} | {FRONT_NAMES[name]} | " + " | ".join(cells) + " |")
    print()
    for backend, r in results.items():
        for name, i in r["idle"].items():
            per = (i["rss_held_kib"] - i["rss_before_kib"]) / max(i["count"], 1)
            print(
                f"{backend}, {FRONT_NAMES[name]}: {i['count']} idle connections held; RSS "
                f"{i['rss_before_kib'] / 1024:.1f} MiB -> {i['rss_held_kib'] / 1024:.1f} MiB "
                f"({per:.2f} KiB per connection); {i['logins_while_held']:.1f} logins/s meanwhile (2 clients)"
            )
        for kind, unit in (("logins", "login"), ("retr", "MiB")):
            if kind not in r["pairs"]:
                continue
            c = r["cost"][kind]
            per_unit = {t: {part: 1000 * v / max(c[t][1], 1e-9) for part, v in c[t][0].items()} for t in c}
            d = sum(per_unit["direct"].values())
            for name in r["pairs"][kind]:
                spent, units = r["front_cpu"][kind][name]
                p = sum(per_unit[name].values())
                print(
                    f"{backend}, {FRONT_NAMES[name]}: its own CPU {1000 * spent / max(units, 1e-9):.2f} ms per "
                    f"{unit}; whole-system CPU per {unit} direct {d:.2f} ms, through it {p:.2f} ms "
                    f"(ratio when CPU-bound {d / p:.3f}); by part, direct -> through it: "
                    + ", ".join(
                        f"{part} {per_unit['direct'].get(part, 0):.2f} -> {per_unit[name][part]:.2f}"
                        for part in per_unit[name]
                        if per_unit[name][part] or per_unit["direct"].get(part)
                    )
                )
                pairs = r["pairs"][kind][name]
                q = statistics.quantiles(pairs, n=4) if len(pairs) > 1 else [pairs[0]] * 3
                print(
                    f"{backend}, {FRONT_NAMES[name]}: {kind} round ratios: quartiles {q[0]:.3f} / {q[1]:.3f} / "
                    f"{q[2]:.3f}, min {min(pairs):.3f}, max {max(pairs):.3f}"
                )


FRONT_NAMES = {"proxy": "pop-proxy", "nginx": "nginx 1.22 mail proxy"}

if __name__ == "__main__":
    sys.exit(main())
