#!/usr/bin/env python3
"""Durable LMTP delivery rate: pdeliveryd against Dovecot's LMTP server,
both writing hashed Maildirs (first3) on the same disk, in the same run,
with the raw cost of that disk alongside (create, write, fsync, rename,
fsync the directory: one file at a time).

    sudo .venv/bin/python benchmarks/bench_delivery.py [--seconds 8] [--dir /var/tmp]

Cells: 4 KiB and 100 KiB messages x 1 and 16 concurrent LMTP clients.
Each client loops: MAIL, RCPT (a random one of --users users), DATA
pipelined, the message, wait for the final 250 (the durable commit). Both
servers log every delivery to a file (no syslog here); Dovecot runs with
its default `mail_fsync = optimized` (message file and new/ fsynced) and
keeps its index files, as deployed; pdeliveryd reads users from a passwd
file, as Dovecot reads its static userdb (no network lookup in either).
Results: a Markdown table on stdout; paste it into benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
UID = GID = 2000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_message(size: int) -> bytes:
    head = (
        b"From: bench@example.org\r\nTo: someone@example.org\r\nSubject: benchmark\r\n"
        b"Message-ID: <x@example.org>\r\n\r\n"
    )
    line = (string.ascii_letters * 2)[:76].encode() + b"\r\n"
    body = line * ((size - len(head)) // len(line) + 1)
    return (head + body)[: size - 2] + b"\r\n"


# -- the disk's own rate ------------------------------------------------------
def raw_loop(d: str, size: int, seconds: float) -> float:
    for sub in ("tmp", "new"):
        os.makedirs(os.path.join(d, sub), exist_ok=True)
    data = os.urandom(size)
    n = 0
    t0 = time.monotonic()
    dfd = os.open(os.path.join(d, "new"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        while time.monotonic() - t0 < seconds:
            tmp = os.path.join(d, "tmp", f"f{n}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, data)
            os.fsync(fd)
            os.close(fd)
            os.rename(tmp, os.path.join(d, "new", f"f{n}"))
            os.fsync(dfd)
            n += 1
    finally:
        os.close(dfd)
    return n / (time.monotonic() - t0)


# -- load generator -------------------------------------------------------------
async def _reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("server closed")
        if line[3:4] != b"-":
            return line


async def _client(
    port: int, users, stuffed: bytes, deadline: float, counts: list[int], i: int, host: str = "127.0.0.1"
):
    reader, writer = await asyncio.open_connection(host, port)
    await _reply(reader)
    writer.write(b"LHLO bench.example\r\n")
    await _reply(reader)
    rnd = random.Random(i)
    loop = asyncio.get_running_loop()
    while loop.time() < deadline:
        if isinstance(users, list):
            u = rnd.choice(users)
        else:  # an iterator shared by the clients: each user once
            u = next(users, None)
            if u is None:
                break
        writer.write(b"MAIL FROM:<bench@example.org>\r\nRCPT TO:<" + u + b"@example.org>\r\nDATA\r\n")
        for want in (b"250", b"250", b"354"):
            r = await _reply(reader)
            if not r.startswith(want):
                raise RuntimeError(f"unexpected reply {r!r}")
        writer.write(stuffed)
        r = await _reply(reader)
        if not r.startswith(b"250"):
            raise RuntimeError(f"delivery failed: {r!r}")
        counts[i] += 1
    writer.write(b"QUIT\r\n")
    await writer.drain()
    writer.close()


async def _load(port: int, clients: int, users: list[bytes], msg: bytes, seconds: float) -> float:
    stuffed = msg.replace(b"\r\n.", b"\r\n..") + b".\r\n"
    counts = [0] * clients
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await asyncio.gather(*(_client(port, users, stuffed, t0 + seconds, counts, i) for i in range(clients)))
    return sum(counts) / (loop.time() - t0)


def load(port, clients, users, msg, seconds) -> float:
    return asyncio.run(_load(port, clients, users, msg, seconds))


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {port}")


# -- the two servers ------------------------------------------------------------
class Pdeliveryd:
    def __init__(self, work: str, users: list[str]):
        self.root = os.path.join(work, "pdeliveryd-root")
        os.makedirs(self.root)
        passwd = os.path.join(work, "passwd")
        with open(passwd, "w") as f:
            f.writelines(f"{u}:x:{UID}:{GID}::/nonexistent:/bin/false\n" for u in users)
        subprocess.run([os.path.join(BIN, "pdeliveryd"), "--root", self.root, "--init-root"], check=True)
        self.port = free_port()
        self.log = open(os.path.join(work, "pdeliveryd.log"), "wb")
        self.proc = subprocess.Popen(
            [
                os.path.join(BIN, "pdeliveryd"),
                "--listen",
                f"127.0.0.1:{self.port}",
                "--root",
                self.root,
                "--users",
                f"passwd:{passwd}",
                "--log-stderr",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PWMAIL_CONF": os.path.join(work, "none.toml")},
        )
        wait_port(self.port, self.proc)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


class DovecotLMTP:
    def __init__(self, work: str):
        d = os.path.join(work, "dovecot")
        self.root = os.path.join(work, "dovecot-root")
        for p in (d, self.root, f"{d}/run", f"{d}/state"):
            os.makedirs(p, exist_ok=True)
        os.chown(self.root, UID, GID)
        self.port = free_port()
        self.conf = os.path.join(d, "dovecot.conf")
        loc = f"{self.root}/%1n/%1.1n/%2.1n/%n"
        with open(self.conf, "w") as f:
            f.write(f"""base_dir = {d}/run
state_dir = {d}/state
instance_name = pwmail-bench
protocols = lmtp
listen = 127.0.0.1
log_path = {d}/dovecot.log
ssl = no
hostname = bench.example
postmaster_address = postmaster@example.org
mail_location = maildir:{loc}
first_valid_uid = 1000
passdb {{
  driver = static
  args = nopassword=y
}}
userdb {{
  driver = static
  args = uid={UID} gid={GID} home={loc}
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {self.port}
  }}
  process_min_avail = 4
}}
""")
        subprocess.run(["dovecot", "-c", self.conf], check=True)
        wait_port(self.port)

    def stop(self):
        subprocess.run(["dovecot", "-c", self.conf, "stop"], timeout=30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0, help="per cell")
    ap.add_argument("--dir", default="/var/tmp", help="work folder parent (the disk under test)")
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--sizes", default="4096,102400")
    ap.add_argument("--clients", default="1,16")
    ap.add_argument("--rounds", type=int, default=3, help="the median of this many runs per cell")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (Dovecot's master, mailbox ownership)", file=sys.stderr)
        return 1
    work = tempfile.mkdtemp(prefix="pwmail-bench-delivery-", dir=args.dir)
    os.chmod(work, 0o755)  # Dovecot delivers as the mail uid
    rnd = random.Random(7)
    users = sorted(
        {"".join(rnd.choice(string.ascii_lowercase) for _ in range(rnd.randint(3, 10))) for _ in range(args.users)}
    )
    ubytes = [u.encode() for u in users]
    sizes = [int(s) for s in args.sizes.split(",")]
    clients = [int(c) for c in args.clients.split(",")]
    servers = {}
    rows = []
    try:
        servers["pdeliveryd"] = Pdeliveryd(work, users)
        servers["dovecot"] = DovecotLMTP(work)
        # every mailbox exists (and Dovecot has its index files) before the timed cells
        for s in servers.values():
            load(s.port, 16, iter(ubytes), make_message(1024), 3600.0)
        results: dict[tuple, list[float]] = {}
        for r in range(args.rounds):
            for size in sizes:
                msg = make_message(size)
                raw = raw_loop(os.path.join(work, f"raw-{size}-{r}"), size, args.seconds)
                results.setdefault((size, "raw"), []).append(raw)
                for c in clients:
                    # alternate which server goes first, against drift
                    order = list(servers.items()) if r % 2 == 0 else list(reversed(servers.items()))
                    for name, srv in order:
                        rate = load(srv.port, c, ubytes, msg, args.seconds)
                        results.setdefault((size, c, name), []).append(rate)
                    print(
                        f"# round {r + 1}: {size} B, {c} client(s): pdeliveryd "
                        f"{results[(size, c, 'pdeliveryd')][-1]:.0f}/s, dovecot "
                        f"{results[(size, c, 'dovecot')][-1]:.0f}/s, raw {raw:.0f}/s",
                        file=sys.stderr,
                        flush=True,
                    )
        for size in sizes:
            for c in clients:
                p, d = results[(size, c, "pdeliveryd")], results[(size, c, "dovecot")]
                ratios = [a / b for a, b in zip(p, d)]  # paired: same round, back to back
                rows.append(
                    (
                        size,
                        c,
                        statistics.median(p),
                        statistics.median(d),
                        statistics.median(ratios),
                        min(ratios),
                        statistics.median(results[(size, "raw")]),
                    )
                )
    finally:
        for s in servers.values():
            s.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(
        f"medians of {args.rounds} rounds of {args.seconds:g} s per cell; {len(users)} users; "
        f"ratio = pdeliveryd / Dovecot within a round"
    )
    print(
        "| message | clients | pdeliveryd msg/s | Dovecot LMTP msg/s | ratio (median of rounds) | lowest round "
        "| raw disk loop files/s |"
    )
    print("|---|---|---|---|---|---|---|")
    for size, c, p, d, ratio, low, raw in rows:
        print(f"| {size // 1024} KiB | {c} | {p:.0f} | {d:.0f} | {ratio:.2f}x | {low:.2f}x | {raw:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
