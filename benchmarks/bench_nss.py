"""getpwnam latency through glibc, one peer per NSS service, same names,
same run: files (/etc/passwd scanned linearly), libnss-extrausers, libnss-db,
libnss-cache (with its sorted index), nscd hits, pwserver (libnss_pwserver.so.2 + the real server), and a minimal
C UDP echo round trip (the physical limit of any network lookup).

Run by hand, as root (private mount namespaces: the machine's own
/etc/passwd and nsswitch.conf are never touched):

    apt-get install nscd libnss-extrausers libnss-db libnss-cache   # services kept stopped
    .venv/bin/python benchmarks/bench_nss.py [--sizes 10000,100000,1000000]
    .venv/bin/python benchmarks/bench_nss.py --network-only --pwserver-arg=--busy-poll-us=0   # pwserver and echo only

Each local service is measured by benchmarks/nss_latency.c (getpwnam_r
timed per call) pinned to CPU 0. pwserver and the echo round trip are
measured together by benchmarks/rtt_breakdown.c, call by call in turn (so
the machine's noise falls on both alike), chrooted where
/etc/nsswitch.conf is a plain file (in_plain_root); their servers run
pinned to CPU 1 ("cross") and to CPU 0 ("same"). Results go to stdout as a
Markdown table, for benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
PYBIN = pathlib.Path(sys.executable).parent
READY = re.compile(r"pwserver: ready on (\S+):(\d+) \((\d+) users\)")
DRIVER_CPU = "0"


def build(work: pathlib.Path) -> dict[str, pathlib.Path]:
    subprocess.run(["make", "-s", "-C", str(ROOT / "nss_module")], check=True)
    out = {}
    for name in ("nss_latency", "udp_echo"):
        out[name] = work / name
        subprocess.run(["cc", "-O2", "-o", str(out[name]), str(HERE / f"{name}.c")], check=True)
    csrc = ROOT / "pwcache" / "_csrc"
    out["rtt_breakdown"] = work / "rtt_breakdown"
    subprocess.run(
        [
            "cc",
            "-O2",
            f"-I{csrc}",
            "-o",
            str(out["rtt_breakdown"]),
            str(HERE / "rtt_breakdown.c"),
            str(csrc / "pw_wire.c"),
            "-ldl",
        ],
        check=True,
    )
    return out


def gen_users(n: int, cache: pathlib.Path) -> pathlib.Path:
    d = cache / f"u{n}"
    if not (d / "passwd").exists():
        subprocess.run([str(PYBIN / "pwmail"), "gen-users", str(n), "--out", str(d)], check=True)
    return d


def pick_names(users: pathlib.Path, k: int, work: pathlib.Path) -> pathlib.Path:
    names = [line.split(":", 1)[0] for line in (users / "passwd").read_text().splitlines()]
    rng = random.Random(1)
    path = work / f"names.{len(names)}"
    path.write_text("\n".join(rng.sample(names, k)) + "\n")
    return path


def in_namespace(setup: str, argv: list[str], env: dict | None = None, nsswitch: str = "files") -> str:
    """Runs argv (pinned to DRIVER_CPU) after `setup` in a private mount
    namespace whose /etc/nsswitch.conf names `nsswitch` for passwd."""
    with tempfile.NamedTemporaryFile("w", suffix=".nsswitch", delete=False) as f:
        f.write(f"passwd: {nsswitch}\ngroup: files\nshadow: files\n")
    script = f"""set -e
mount --bind {f.name} /etc/nsswitch.conf
{setup}
taskset -c {DRIVER_CPU} "$@"
"""
    try:
        r = subprocess.run(
            ["unshare", "-m", "sh", "-c", script, "sh", *argv],
            env=env or os.environ,
            capture_output=True,
            text=True,
            timeout=3600,
        )
    finally:
        os.unlink(f.name)
    if r.returncode != 0:
        raise RuntimeError(f"{nsswitch}: {r.stderr[-2000:]}")
    return r.stdout.strip().splitlines()[-1]


PLAIN_ROOT_SCRIPT = """set -e
root=$1; shift
mount --bind /usr "$root/usr"
for d in $PWBENCH_BINDS; do mkdir -p "$root$d"; mount --bind "$d" "$root$d"; done
exec chroot "$root" taskset -c {cpu} "$@"
"""


def in_plain_root(argv: list[str], env: dict, binds: list[pathlib.Path], nsswitch: str = "pwserver") -> str:
    """Runs argv (pinned to DRIVER_CPU) chrooted into a private root whose
    /etc/nsswitch.conf is a plain file on the root file system, as on a
    real host. glibc stat()s /etc/nsswitch.conf on every lookup; through a
    bind mount onto it (in_namespace) that stat costs about 0.4 µs more
    here (1.85 against 1.47 µs), which would be charged to the service.
    `binds`: folders seen at the same path inside (tools, configuration,
    the module). Returns stdout."""
    root = pathlib.Path(tempfile.mkdtemp(prefix="nssroot.", dir="/var/tmp"))  # the root file system
    try:
        (root / "etc").mkdir()
        (root / "usr").mkdir()
        for link in ("bin", "sbin", "lib", "lib64"):
            if (pathlib.Path("/") / link).is_symlink():  # merged /usr (Debian 12)
                (root / link).symlink_to(os.readlink(pathlib.Path("/") / link))
        shutil.copy("/etc/ld.so.cache", root / "etc")
        (root / "etc" / "nsswitch.conf").write_text(f"passwd: {nsswitch}\ngroup: files\nshadow: files\n")
        env = {**env, "PWBENCH_BINDS": " ".join(str(b) for b in binds)}
        r = subprocess.run(
            ["unshare", "-m", "sh", "-c", PLAIN_ROOT_SCRIPT.format(cpu=DRIVER_CPU), "sh", str(root), *argv],
            env=env,
            capture_output=True,
            text=True,
            timeout=3600,
        )
        if r.returncode != 0:
            raise RuntimeError(f"{argv[0]}: {r.stderr[-2000:]}")
        return r.stdout
    finally:
        shutil.rmtree(root)  # the bind mounts went with the namespace


def breakdown(passwd, names, cpu, tools, work, rounds, server_args=(), nss_dir=ROOT / "nss_module") -> dict:
    """pwserver and the echo server pinned to `cpu`, and
    benchmarks/rtt_breakdown.c in a plain root (in_plain_root) timing, per
    name and in turn, the echo round trip, a raw request to pwserver, the
    module called directly and getpwnam_r through glibc: interleaving puts
    the machine's noise on all four alike. Returns {peer: (median_us,
    p99_us)} for echo, raw, module, glibc."""
    srv = Proc(
        [str(PYBIN / "pwserver"), "--listen", "127.0.0.1:0", "--passwd", str(passwd), *server_args, "--log-stderr"],
        cpu,
        READY,
        env={**os.environ, "PWMAIL_CONF": "/nonexistent"},
    )
    eport = free_port()
    echo = Proc([str(tools["udp_echo"]), "server", str(eport)], cpu)
    try:
        time.sleep(0.2)
        conf = work / "pwserver.conf"
        conf.write_text(f"server 127.0.0.1:{srv.port}\nhealth_file {work}/health\n")
        lib = pathlib.Path(nss_dir).resolve() / "libnss_pwserver.so.2"
        env = {**os.environ, "PWSERVER_CONF": str(conf), "LD_LIBRARY_PATH": str(lib.parent)}
        out = in_plain_root(
            [str(tools["rtt_breakdown"]), str(eport), str(srv.port), str(names), str(rounds), str(lib)],
            env,
            [work, lib.parent],
        )
        res = {}
        for line in out.splitlines():
            if line.strip():
                peer, samples, med, p99 = line.split()
                res[peer] = (int(med) / 1000, int(p99) / 1000)
        return res
    finally:
        srv.stop()
        echo.stop()


def measure(tool, names, rounds, setup, nsswitch, env=None, warm=False) -> dict:
    argv = [str(tool), str(names), str(rounds)] + (["warm"] if warm else [])
    samples, found, med, p99 = map(int, in_namespace(setup, argv, env, nsswitch).split())
    return {"samples": samples, "found": found, "median_us": med / 1000, "p99_us": p99 / 1000}


def makedb_input(passwd: pathlib.Path, out: pathlib.Path) -> None:
    """What /var/lib/misc/Makefile feeds makedb for passwd.db."""
    with open(passwd) as src, open(out, "w") as dst:
        for i, line in enumerate(src):
            line = line.rstrip("\n")
            if not line or line.lstrip().startswith("#"):
                continue
            f = line.split(":")
            dst.write(f"0{i} {line}\n.{f[0]} {line}\n={f[2]} {line}\n")


def write_nss_cache(passwd: pathlib.Path, d: pathlib.Path) -> None:
    """libnss-cache's files as nsscache writes them: passwd.cache and its
    sorted index passwd.cache.ixname (fixed-size lines "name\\0offset",
    NUL-padded), newer than the cache; plus an nsswitch.conf naming it. The
    folder is laid over /etc as an overlay's top layer."""
    d.mkdir()
    data = passwd.read_bytes()
    (d / "passwd.cache").write_bytes(data)
    index, pos = {}, 0
    for line in data.splitlines(keepends=True):
        index[line.split(b":", 1)[0]] = pos
        pos += len(line)
    recs = [k + b"\x00" + b"%d" % index[k] for k in sorted(index)]
    width = max(len(r) for r in recs)
    (d / "passwd.cache.ixname").write_bytes(b"".join(r + b"\x00" * (width - len(r)) + b"\n" for r in recs))
    (d / "nsswitch.conf").write_text("passwd: cache\ngroup: files\nshadow: files\n")


class Proc:
    """A server process pinned to a CPU, stopped by PID."""

    def __init__(self, argv, cpu, ready=None, env=None):
        self.proc = subprocess.Popen(
            ["taskset", "-c", cpu, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
        )
        self.port = None
        if ready:
            for line in self.proc.stderr:
                m = ready.search(line)
                if m:
                    self.port = int(m.group(2))
                    break
            if self.port is None:
                raise RuntimeError("server did not get ready")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_size(n, tools, work, cache, k, local=True, server_args=()) -> dict:
    users = gen_users(n, cache)
    names = pick_names(users, k, work)
    passwd = users / "passwd"
    nl, res = tools["nss_latency"], {}
    if local:
        bench_local(n, nl, names, passwd, work, res)
    bench_network(names, passwd, tools, work, res, server_args)
    return res


def bench_local(n, nl, names, passwd, work, res) -> None:
    """The services without a server: files, extrausers, db, cache, nscd."""
    slow_rounds = 10 if n <= 10000 else 1  # files scans: keep the run short
    res["files"] = measure(nl, names, slow_rounds, f"mount --bind {passwd} /etc/passwd", "files")

    try:
        res["extrausers"] = measure(
            nl,
            names,
            slow_rounds,
            f"mkdir -p /var/lib/extrausers; mount -t tmpfs tmpfs /var/lib/extrausers;"
            f" cp {passwd} /var/lib/extrausers/passwd",
            "extrausers",
        )
    except RuntimeError as e:
        res["extrausers"] = {"error": str(e)[:200]}

    dbin = work / f"makedb.{n}"
    makedb_input(passwd, dbin)
    res["db"] = measure(
        nl, names, 10, f"mount -t tmpfs tmpfs /var/lib/misc; makedb -o /var/lib/misc/passwd.db {dbin}", "db"
    )
    dbin.unlink()

    cdir = work / f"cache.{n}"
    write_nss_cache(passwd, cdir)
    res["cache"] = measure(nl, names, 10, f"mount -t overlay overlay -o lowerdir={cdir}:/etc /etc", "cache")
    shutil.rmtree(cdir)

    nscd_setup = (
        f"mount --bind {passwd} /etc/passwd; mount -t tmpfs tmpfs /run/nscd;"
        " mount -t tmpfs tmpfs /var/cache/nscd;"
        " nscd -d 2>/dev/null & NSCD=$!; trap 'kill $NSCD' EXIT;"
        " i=0; while [ ! -S /run/nscd/socket ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done"
    )
    res["nscd"] = measure(nl, names, 10, nscd_setup, "files", warm=True)


def bench_network(names, passwd, tools, work, res, server_args) -> None:
    """pwserver through glibc and the echo round trip, both placements,
    interleaved call by call in one process (breakdown)."""
    for place, cpu in (("cross", "1"), ("same", "0")):
        r = breakdown(passwd, names, cpu, tools, work, 10, server_args)
        for key, peer in ((f"pwserver_{place}", "glibc"), (f"echo_{place}", "echo")):
            res[key] = {"median_us": r[peer][0], "p99_us": r[peer][1]}


def table(results: dict) -> str:
    rows = ["files", "extrausers", "db", "cache", "nscd", "pwserver_cross", "echo_cross", "pwserver_same", "echo_same"]
    sizes = list(results)
    head = "| service | " + " | ".join(f"{int(s):,} users: median / p99 (µs)" for s in sizes) + " |"
    lines = [head, "|---" * (len(sizes) + 1) + "|"]
    for r in rows:
        cells = []
        for s in sizes:
            v = results[s].get(r, {})
            cells.append("error" if "error" in v or not v else f"{v['median_us']:.1f} / {v['p99_us']:.1f}")
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--names", type=int, default=200, help="distinct names looked up")
    p.add_argument("--cache", default="/tmp/nssbench", help="where generated users are kept")
    p.add_argument("--json", help="also write the raw results here")
    p.add_argument("--network-only", action="store_true", help="only pwserver and the echo round trip")
    p.add_argument(
        "--pwserver-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra pwserver argument, e.g. --pwserver-arg=--busy-poll-us=0 (repeatable)",
    )
    args = p.parse_args()
    if os.geteuid() != 0:
        print("bench_nss: needs root (private mount namespaces)", file=sys.stderr)
        return 1
    cache = pathlib.Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(tmp)
        tools = build(work)
        for n in (int(x) for x in args.sizes.split(",")):
            results[n] = bench_size(n, tools, work, cache, args.names, not args.network_only, args.pwserver_arg)
            print(f"{n}: {json.dumps(results[n])}", file=sys.stderr, flush=True)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=1))
    print(table(results))
    for n, r in results.items():
        files = (
            f"files / pwserver (cross) median = {r['files']['median_us'] / r['pwserver_cross']['median_us']:.0f}x; "
            if "files" in r
            else ""
        )
        print(
            f"\n{n:,} users: {files}"
            f"pwserver / echo: cross {r['pwserver_cross']['median_us'] / r['echo_cross']['median_us']:.2f}x, "
            f"same {r['pwserver_same']['median_us'] / r['echo_same']['median_us']:.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
