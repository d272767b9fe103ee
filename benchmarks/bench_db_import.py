"""`pwmail db import` and `pwmail db export` of a generated site against a
PostgreSQL 15 started for the run (tests/support/pg_util.py: as nobody, in a
temporary folder, fsync off as in the tests), one run each; prints wall
time, CPU time and peak memory of the pwmail process (GNU time) and checks
that the export gives the imported files back.

    .venv/bin/python benchmarks/bench_db_import.py --users 1000000
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support import pg_util  # noqa: E402  (found through the line above)

PWMAIL = str(pathlib.Path(sys.executable).parent / "pwmail")
TIME_FORMAT = "wall %e s, CPU %U s user + %S s system, peak RSS %M KiB"


def timed(*args: str) -> None:
    subprocess.run(["/usr/bin/time", "-f", f"  {TIME_FORMAT}", PWMAIL, *args], check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=1_000_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-db-") as tmp:
        site, out = pathlib.Path(tmp, "site"), pathlib.Path(tmp, "out")
        out.mkdir()
        subprocess.run([PWMAIL, "gen-users", str(args.users), "--out", str(site)], check=True)
        server = pg_util.PostgresServer()
        try:
            dsn = server.start().create_database("bench")
            subprocess.run([PWMAIL, "db", "init", dsn], check=True)
            timed(
                "db",
                "import",
                dsn,
                *(x for f in ("passwd", "shadow", "group", "mailhosts") for x in (f"--{f}", str(site / f))),
            )
            timed("db", "export", dsn, "--dir", str(out))
        finally:
            server.stop()
        for name in ("passwd", "shadow", "group"):
            same = (site / name).read_bytes() == (out / name).read_bytes()
            print(f"  {name}: {'identical' if same else 'DIFFERENT'} after import and export")
    return 0


if __name__ == "__main__":
    sys.exit(main())
