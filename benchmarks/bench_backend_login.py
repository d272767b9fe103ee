"""A backend's own CPU per login, by the way the login is sent: as a client
sends it (USER, PASS) and as pop-proxy replays it (XCLIENT and AUTH PLAIN
in one packet), rounds alternating. Tells whether the proxy's way of
logging in costs the backend more (benchmarks/README.md, section POP).

    .venv/bin/python benchmarks/bench_backend_login.py [--backend pop3d|dovecot]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import pathlib
import shutil
import statistics
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.support
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_pop import cpu_seconds, tree_cpu_seconds  # noqa: E402

from tests.support.pop_util import UID0, Dovecot, client_conf, deliver, make_root, start_pop3d, write_key, write_users  # noqa: E402
from tests.support.pwtest import PwServer  # noqa: E402

MODES = {
    "USER, PASS": (False, False),
    "XCLIENT, AUTH PLAIN": (True, True),
    "AUTH PLAIN": (False, True),
    "XCLIENT, USER, PASS": (True, False),
}


async def _logins(addr, creds, n: int, xclient: bool, plain: bool) -> None:
    for i in range(n):
        user, password = creds[i % len(creds)]
        r, w = await asyncio.open_connection(*addr)
        try:
            assert (await r.readline()).startswith(b"+OK")
            head = f"XCLIENT ADDR=127.0.0.1 PORT={40000 + i}\r\n" if xclient else ""
            if plain:
                token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
                w.write(f"{head}AUTH PLAIN {token}\r\n".encode())
            else:
                w.write(f"{head}USER {user}\r\n".encode())
            if xclient:
                assert (await r.readline()).startswith(b"+OK")
            if not plain:
                assert (await r.readline()).startswith(b"+OK")
                w.write(f"PASS {password}\r\n".encode())
            answer = await r.readline()
            assert answer.startswith(b"+OK"), answer
            w.write(b"QUIT\r\n")
            await r.readline()
        finally:
            w.close()


def logins(addr, creds, total: int, concurrency: int, xclient: bool, plain: bool) -> None:
    per = [creds[k::concurrency] for k in range(concurrency)]  # a user is never logged in twice at once

    async def run():
        await asyncio.gather(*(_logins(addr, per[k], total // concurrency, xclient, plain) for k in range(concurrency)))

    asyncio.run(run())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=["pop3d", "dovecot"], default="pop3d")
    ap.add_argument("--logins", type=int, default=120, help="logins per round and way")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument(
        "--hash",
        choices=["yescrypt", "sha512"],
        default="yescrypt",
        help="sha512 makes the hash cheap, so differences of a tenth of a millisecond show",
    )
    args = ap.parse_args(argv)
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench-backend-", dir="/tmp"))
    work.chmod(0o755)
    try:
        names = [f"user{i:04d}" for i in range(4 * args.concurrency)]
        users = {n: (f"pw-{n}", "store") for n in names}
        write_users(work / "users", users, prefix="$y$" if args.hash == "yescrypt" else "$6$")
        key = write_key(work / "shadow.key")
        layout = make_root(work / "spool")
        for i, n in enumerate(sorted(users)):
            deliver(layout, n, b"Subject: hi\n\nhello\n", UID0 + i, UID0)
        creds = [(n, users[n][0]) for n in names]
        with PwServer(work / "users", shadow_key=key) as pws:
            conf = client_conf(work / "pwserver.conf", pws.address, key)
            if args.backend == "pop3d":
                server = start_pop3d(work, work / "spool", conf, host="127.0.0.2", trusted=["127.0.0.0/8"])
                cpu = cpu_seconds
            else:
                server = Dovecot(work / "dovecot", layout, conf, "127.0.0.6")
                cpu = tree_cpu_seconds  # a process per session
            got: dict[str, list[float]] = {m: [] for m in MODES}
            with server:
                for _ in range(args.rounds):
                    for mode, (xclient, plain) in MODES.items():
                        c0 = cpu(server.proc.pid)
                        logins(server.address, creds, args.logins, args.concurrency, xclient, plain)
                        got[mode].append(1000 * (cpu(server.proc.pid) - c0) / args.logins)
        print(
            f"\n{args.backend}: CPU per login, ms, median (min-max) of {args.rounds} rounds of "
            f"{args.logins} logins, {args.concurrency} clients\n"
        )
        print("| login sent as | CPU per login |\n|---|---|")
        for mode, v in got.items():
            print(f"| {mode} | {statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f}) |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
