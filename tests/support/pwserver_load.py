"""A steady query load in its own process (so the test's own work cannot
delay it): `python pwserver_load.py HOST PORT N THREADS`; runs until its
stdin closes, then prints a JSON summary. Users are those of
pwserver_util.write_many_users; every answer is checked."""

import json
import random
import secrets
import socket
import sys
import threading
import time

import msgpack

from tests.support.pwserver_util import OK, request


def run(addr, n: int, seed: int, stop: threading.Event, out: dict) -> None:
    rnd = random.Random(seed)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2.0)
        while not stop.is_set():
            i = rnd.randrange(n)
            name = f"{chr(97 + i % 26)}user{i:07d}"
            by_uid = rnd.random() < 0.3
            rid = secrets.randbits(64)
            t0 = time.monotonic()
            s.sendto(request("uid" if by_uid else "passwd", 10000 + i if by_uid else name, rid=rid), addr)
            try:
                while True:  # a late answer to an earlier query would be skipped
                    answer = msgpack.unpackb(s.recv(9000))
                    if answer[1] == rid:
                        break
            except TimeoutError:
                out["failures"].append(f"timeout: {name}")
                continue
            latency = time.monotonic() - t0
            out["max_latency_ms"] = max(out["max_latency_ms"], latency * 1000)
            if latency > 0.1:
                out["over_100ms"] += 1
            if answer[2] != OK or answer[3][0] != name or answer[3][2] != 10000 + i:
                out["failures"].append(f"bad answer for {name}: {answer}")
            else:
                out["ok"] += 1


def main() -> None:
    host, port, n, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    stop = threading.Event()
    outs = [{"ok": 0, "failures": [], "max_latency_ms": 0.0, "over_100ms": 0} for _ in range(threads)]
    ts = [threading.Thread(target=run, args=((host, port), n, k, stop, outs[k]), daemon=True) for k in range(threads)]
    for t in ts:
        t.start()
    print("started", flush=True)
    sys.stdin.read()
    stop.set()
    for t in ts:
        t.join(10)
    print(
        json.dumps(
            {
                "ok": sum(o["ok"] for o in outs),
                "failures": sum((o["failures"] for o in outs), [])[:20],
                "max_latency_ms": max(o["max_latency_ms"] for o in outs),
                "over_100ms": sum(o["over_100ms"] for o in outs),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
