"""pwserver --source postgresql://... against a PostgreSQL 15 started for the
run (tests/support/pg_util.py, fsync off as in the tests): the load of a
generated site from the database against from the same files (time to
"ready", the load's own figures and RSS), then the propagation of changes
to two replicas: UPDATEs at a steady rate, each one's time from COMMIT
until a lookup on each replica answers it (p50, p99, max).

    .venv/bin/python benchmarks/bench_db_source.py --users 1000000 --rate 100 --seconds 30
"""

from __future__ import annotations

import argparse
import pathlib
import re
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pwcache.client import Client  # noqa: E402  (found through the line above)
from tests.support import pg_util  # noqa: E402
from tests.support.pwserver_util import rss_bytes  # noqa: E402
from tests.support.pwtest import PwServer  # noqa: E402

PWMAIL = str(pathlib.Path(sys.executable).parent / "pwmail")
LOADED = re.compile(r"loaded generation 1: .* in (\d+) ms \((\d+) ms CPU")


def start(what: str, make) -> PwServer:
    t0 = time.monotonic()
    s = make()
    wall = time.monotonic() - t0
    m = LOADED.search(s.output())
    print(
        f"  {what}: ready after {wall:.2f} s (load {m.group(1)} ms, {m.group(2)} ms CPU in the loading thread), "
        f"{s.users} users, RSS {rss_bytes(s.proc.pid) / 2**20:.0f} MiB"
    )
    return s


def propagation(dsn: str, names: list[str], servers: list[PwServer], rate: float, seconds: float) -> None:
    import psycopg

    pending: dict[int, list] = {i: [] for i in range(len(servers))}
    lock = threading.Lock()
    seen: list[list[float]] = [[] for _ in servers]
    done = threading.Event()

    def watch(i: int) -> None:
        with Client([servers[i].address], timeout_ms=2000) as c:
            while not done.is_set() or pending[i]:
                with lock:
                    todo = list(pending[i])
                for item in todo:
                    name, token, committed = item
                    e = c.passwd_by_name(name)
                    if e is not None and e.gecos == token:
                        seen[i].append(time.monotonic() - committed)
                        with lock:
                            pending[i].remove(item)
                if not todo:
                    time.sleep(0.001)

    threads = [threading.Thread(target=watch, args=(i,), daemon=True) for i in range(len(servers))]
    for t in threads:
        t.start()
    with psycopg.connect(dsn, autocommit=True) as conn:
        n = int(rate * seconds)
        t0 = time.monotonic()
        for k in range(n):
            wait = t0 + k / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            name, token = names[k % len(names)], f"bench {k}"
            conn.execute("UPDATE pwmail.users SET gecos = %s WHERE name = %s", (token, name))
            committed = time.monotonic()
            with lock:
                for i in pending:
                    pending[i].append((name, token, committed))
    done.set()
    for t in threads:
        t.join(timeout=60)
    for i, lat in enumerate(seen):
        lat.sort()
        pct = [lat[min(len(lat) - 1, int(len(lat) * q))] * 1000 for q in (0.5, 0.99)]
        print(
            f"  replica {i + 1}: {len(lat)} of {n} changes seen; COMMIT to visible p50 {pct[0]:.1f} ms, "
            f"p99 {pct[1]:.1f} ms, max {lat[-1] * 1000:.1f} ms"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--rate", type=float, default=100.0, help="changes a second")
    ap.add_argument("--seconds", type=float, default=30.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-dbsrc-") as tmp:
        site = pathlib.Path(tmp, "site")
        subprocess.run([PWMAIL, "gen-users", str(args.users), "--out", str(site)], check=True)
        server = pg_util.PostgresServer()
        try:
            server.start()
            dsn = server.create_database("bench")
            subprocess.run([PWMAIL, "db", "init", dsn], check=True)
            files = [x for f in ("passwd", "shadow", "group", "mailhosts") for x in (f"--{f}", str(site / f))]
            subprocess.run([PWMAIL, "db", "import", dsn, *files], check=True, stderr=subprocess.DEVNULL)
            import psycopg

            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("VACUUM ANALYZE")
            print(f"load of {args.users} users:")
            with start("from files", lambda: PwServer(site, timeout=300)):
                pass
            with start(
                "from PostgreSQL", lambda: PwServer({}, "--source", server.uri("bench"), log_dir=site, timeout=300)
            ):
                pass
            names = [line.split(":", 1)[0] for line in (site / "passwd").read_text().splitlines()[:10000]]
            print(f"propagation at {args.rate:g} changes/s for {args.seconds:g} s, two replicas:")
            a = PwServer({}, "--source", server.uri("bench"), log_dir=site, timeout=300)
            b = PwServer({}, "--source", server.uri("bench"), log_dir=site, timeout=300)
            with a, b:
                propagation(dsn, names, [a, b], args.rate, args.seconds)
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
