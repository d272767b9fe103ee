#!/usr/bin/env python3
"""The MX path end to end: a full Sendmail queue to all durable in the
stores, messages/s, through each way of delivering, in the same run.

    sudo .venv/bin/python benchmarks/bench_mx.py [--messages 2000] [--rounds 3] [--seconds 5] [--json FILE]

The same pwserver and the same two pdeliveryd stores (127.0.0.2 and
127.0.0.3, each user's mailhost one of them at random) serve every path:

- `pdelivery`: Sendmail -> `pdelivery -f $g -i $i -d $u` (the C program,
  one process per message: the paper's local mailer);
- `lmtp-proxy`: Sendmail -> LMTP ([IPC] mailer) -> lmtp-proxy -> the stores;
- `dovecot-proxy` (the peer): Sendmail -> LMTP -> Dovecot's LMTP proxy
  (`lmtp_proxy = yes`, a passwd-file passdb giving each user's host) -> the stores;
- `direct` (the limit): Sendmail -> LMTP straight into one pdeliveryd (no routing).

Each path has its own Sendmail (its sendmail.cf from the documented mailer
blocks, pwmail/testbed/sendmail.py, in a private mount namespace), started
as `sendmail -bD -odq`: the --messages messages (4 KiB, each to one random
user) are submitted over one SMTP session and only queued. The timed part
is one `sendmail -q` queue run, until every message is a file in its
store's new/ folder. Then every message is checked to be there exactly once
(by its Message-ID), outside the timing.

Then lmtp-proxy alone: 16 concurrent LMTP clients (bench_delivery's loop:
MAIL, RCPT, DATA pipelined, the message, the final 250) for --seconds into
lmtp-proxy, against the same 16 clients straight into the stores (8 each,
each with its store's users). The order of the paths alternates every
round; ratios are taken within a round (the machine is shared and noisy),
and the medians are reported.

BENCH_MX_WRAP, if set, is put before the timed `sendmail -q` (e.g.
`strace -f -tt -o FILE`: how the 40 ms a message of delayed ACKs was found).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import pathlib
import random
import re
import shutil
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.support: the test helpers start the daemons

import bench_delivery  # noqa: E402 (beside this file)

from delivery.layout import MailboxLayout  # noqa: E402
from pwmail.testbed import sendmail as testbed_sendmail  # noqa: E402
from pwmail.testbed.sendmail import SENDMAIL, SendmailDir, SyslogSink, enter  # noqa: E402
from tests.support.delivery_util import (  # noqa: E402
    LmtpProxy,
    Pdeliveryd,
    client_conf,
    free_port,
    free_port_on,
    stop_process,
    write_users,
)
from tests.support.pwtest import BIN, PwServer  # noqa: E402

STORES = ["127.0.0.2", "127.0.0.3"]
DOMAIN = "pwmail.test"
SENDER = f"bench@{DOMAIN}"
MESSAGE_SIZE = 4096
LOAD_CLIENTS = 16
# path name: (Sendmail's local mailer block, what its LMTP target is)
PATHS = {
    "pdelivery": ("sendmail-mailer", None),
    "lmtp-proxy": ("sendmail-mailer-proxy", "proxy"),
    "dovecot-proxy": ("sendmail-mailer-proxy", "dovecot"),
    "direct": ("sendmail-mailer-direct", "store"),
}
QUEUE_RUN_TIMEOUT = 3600.0  # seconds one queue run may take before the benchmark gives up
MESSAGE_ID_RE = re.compile(rb"^Message-ID: <([^>]+)>", re.M | re.I)


def make_message(msgid: str, to: str, size: int = MESSAGE_SIZE) -> bytes:
    """`size` bytes with CRLF line ends, told apart by its Message-ID."""
    head = (
        f"From: {SENDER}\r\nTo: {to}\r\nSubject: mx benchmark\r\nMessage-ID: <{msgid}>\r\n"
        "Date: Tue, 08 Dec 2026 00:00:00 +0000\r\n\r\n"
    ).encode()
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcd\r\n"
    return (head + line * (size // len(line) + 1))[: size - 2] + b"\r\n"


class Stores:
    """The two pdeliveryd stores and what is in their users' new/ folders."""

    def __init__(self, work: pathlib.Path, users: dict[str, str], port: int, env: dict):
        self.users, self.port = users, port  # user -> its store's address
        self.layout = {h: MailboxLayout(work / f"store-{h}") for h in STORES}
        self.procs = {h: Pdeliveryd(work / f"store-{h}", h, port, env) for h in STORES}

    def box(self, user: str, host: str | None = None) -> pathlib.Path:
        return self.layout[host or self.users[user]].path(user) / "new"

    def snapshot(self, boxes) -> dict[pathlib.Path, set[str]]:
        return {b: set(os.listdir(b)) if b.is_dir() else set() for b in boxes}

    def new_files(self, before: dict[pathlib.Path, set[str]]) -> list[pathlib.Path]:
        return [b / n for b, names in before.items() if b.is_dir() for n in set(os.listdir(b)) - names]

    def count_new(self, before: dict[pathlib.Path, set[str]]) -> int:
        return sum(len(os.listdir(b)) - len(names) for b, names in before.items() if b.is_dir())

    def stop(self) -> None:
        for p in self.procs.values():
            p.stop()


class DovecotProxy:
    """Dovecot's LMTP proxy on 127.0.0.1: a passwd-file passdb gives each
    user's store (`proxy=y host=... port=...`), as test_delivery_dsn.py's."""

    def __init__(self, work: pathlib.Path, users: dict[str, str], store_port: int):
        d = work / "dovecot"
        for sub in ("run", "state"):
            (d / sub).mkdir(parents=True)
        (d / "passdb").write_text(
            "".join(f"{u}:::::::proxy=y nopassword=y host={h} port={store_port}\n" for u, h in users.items())
        )
        self.port = free_port()
        self.conf = d / "dovecot.conf"
        self.conf.write_text(f"""base_dir = {d}/run
state_dir = {d}/state
instance_name = pwmail-bench-mx-{os.getpid()}
protocols = lmtp
listen = 127.0.0.1
log_path = {d}/log
ssl = no
hostname = proxy.{DOMAIN}
postmaster_address = postmaster@{DOMAIN}
lmtp_proxy = yes
passdb {{
  driver = passwd-file
  args = username_format=%n {d}/passdb
}}
userdb {{
  driver = static
  args = uid=2000 gid=2000 home=/nonexistent
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {self.port}
  }}
  process_min_avail = 1
}}
""")
        subprocess.run(["dovecot", "-c", str(self.conf)], check=True, timeout=60)
        bench_delivery.wait_port(self.port)

    def stop(self) -> None:
        subprocess.run(["dovecot", "-c", str(self.conf), "stop"], timeout=60)


class QueueingSendmail:
    """A Sendmail daemon of ours that only queues (`-bD -odq`), with the
    mailer `block` pointed at `target` ("HOST PORT")."""

    def __init__(self, d: pathlib.Path, block: str, target: str | None, pw_address: str, lmtp_port: int):
        self.port = free_port()
        self.dir = SendmailDir(
            d,
            port=self.port,
            block=block,
            pdelivery=str(BIN / "pdelivery"),
            direct_target=target,
            pwserver_conf=f"server {pw_address}\ntimeout_ms 1000\nhedge_ms 100\n",
            pwmail_toml=f"[delivery]\nlmtp_port = {lmtp_port}\nconnect_timeout = 5.0\n",
            hosts=f"127.0.0.1 localhost\n127.0.0.1 mx.{DOMAIN} mx\n",
            domain=DOMAIN,
        )
        self.syslog = SyslogSink(self.dir.log_socket, d / "maillog")
        self.log = open(d / "sendmail.out", "w+b")
        self.proc = subprocess.Popen(
            self.dir.argv(SENDMAIL, "-bD", "-odq"),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.dir.env},
        )
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sendmail exited {self.proc.returncode}: {self.output()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"sendmail not listening: {self.output()}") from None
                time.sleep(0.2)

    def output(self) -> str:
        self.log.flush()
        return pathlib.Path(self.log.name).read_text(errors="replace") + "\n".join(self.syslog.lines[-50:])

    def submit(self, messages: list[tuple[str, bytes]]) -> None:
        """Every (recipient, data) over one SMTP session; each only queued."""
        with smtplib.SMTP("127.0.0.1", self.port, timeout=120) as s:
            for rcpt, data in messages:
                refused = s.sendmail(SENDER, [rcpt], data)
                if refused:
                    raise RuntimeError(f"sendmail refused {refused}")
        queued = len(self.dir.queue_files())
        if queued != len(messages):
            raise RuntimeError(f"{queued} messages queued of {len(messages)}: {self.output()}")

    def queue_run(self) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*os.environ.get("BENCH_MX_WRAP", "").split(), *enter(self.proc.pid, SENDMAIL, "-q")],
            capture_output=True,
            text=True,
            timeout=QUEUE_RUN_TIMEOUT,
        )

    def stop(self) -> None:
        stop_process(self.proc, 15)
        self.log.close()
        self.syslog.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU of process `pid` so far (/proc/PID/stat)."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_per_message(daemons: dict[str, int], before: dict[str, float], n: int) -> dict[str, float]:
    """ms of CPU per message of each long-running daemon since `before`."""
    return {name: round(1000 * (cpu_seconds(pid) - before[name]) / max(n, 1), 3) for name, pid in daemons.items()}


def run_path(
    name: str, mx: QueueingSendmail, stores: Stores, users: list[str], n: int, rnd, tag: str, daemons: dict[str, int]
) -> dict:
    """Queue n messages, time one queue run to all durable, check them."""
    expected = {f"{tag}.{i}@{DOMAIN}": rnd.choice(users) for i in range(n)}
    target_host = STORES[0] if name == "direct" else None  # the limit: every message into one store
    boxes = {stores.box(u, target_host) for u in set(expected.values())}
    before = stores.snapshot(boxes)
    mx.submit([(f"{u}@{DOMAIN}", make_message(m, f"{u}@{DOMAIN}")) for m, u in expected.items()])
    cpu0 = {d: cpu_seconds(pid) for d, pid in daemons.items()}
    t0 = time.perf_counter()
    run = mx.queue_run()
    deadline = time.monotonic() + QUEUE_RUN_TIMEOUT
    while stores.count_new(before) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name}: only {stores.count_new(before)} of {n} delivered: {mx.output()}")
        time.sleep(0.05)
    seconds = time.perf_counter() - t0
    cpu = cpu_per_message(daemons, cpu0, n)
    if run.returncode != 0:
        raise RuntimeError(f"{name}: sendmail -q exited {run.returncode}: {run.stderr}")
    check = verify(stores, before, {m: stores.box(u, target_host) for m, u in expected.items()})
    # the queue run's child removes a message's queue file just after the store's 250
    drained = time.monotonic() + 60
    while (left := len(mx.dir.queue_files())) and time.monotonic() < drained:
        time.sleep(0.05)
    return {"rate": n / seconds, "seconds": seconds, "left_in_queue": left, "cpu_ms": cpu, **check}


def verify(stores: Stores, before, expected_box: dict[str, pathlib.Path]) -> dict:
    """Each expected Message-ID exactly once and in its box; nothing else new."""
    seen: collections.Counter[str] = collections.Counter()
    misplaced = 0
    for f in stores.new_files(before):
        m = MESSAGE_ID_RE.search(f.read_bytes().partition(b"\n\n")[0])
        msgid = m.group(1).decode() if m else f"?{f}"
        seen[msgid] += 1
        if msgid in expected_box and f.parent != expected_box[msgid]:
            misplaced += 1
    return {
        "delivered": sum(seen.values()),
        "missing": sum(1 for m in expected_box if m not in seen),
        "doubled": sum(n - 1 for m, n in seen.items() if m in expected_box and n > 1),
        "stray": sum(n for m, n in seen.items() if m not in expected_box),
        "misplaced": misplaced,
    }


async def _load(targets: list[tuple[str, int, list[bytes]]], seconds: float) -> tuple[float, int]:
    """bench_delivery's client loop, one client per target (host, port, its
    users): messages/s and how many got their 250."""
    msg = bench_delivery.make_message(MESSAGE_SIZE)
    stuffed = msg.replace(b"\r\n.", b"\r\n..") + b".\r\n"
    counts = [0] * len(targets)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await asyncio.gather(
        *(
            bench_delivery._client(port, users, stuffed, t0 + seconds, counts, i, host=host)
            for i, (host, port, users) in enumerate(targets)
        )
    )
    return sum(counts) / (loop.time() - t0), sum(counts)


def run_load(targets, stores: Stores, seconds: float, daemons: dict[str, int]) -> dict:
    boxes = {stores.box(u) for u in stores.users}
    before = stores.snapshot(boxes)
    cpu0 = {d: cpu_seconds(pid) for d, pid in daemons.items()}
    rate, ok = asyncio.run(_load(targets, seconds))
    cpu = cpu_per_message(daemons, cpu0, ok)
    stored = stores.count_new(before)
    return {"rate": rate, "delivered": ok, "stored": stored, "cpu_ms": cpu}


def ratios(rounds: list[dict], a: str, b: str) -> list[float]:
    return [r[a]["rate"] / r[b]["rate"] for r in rounds if a in r and b in r]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=2000, help="messages per path and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=5.0, help="per cell of lmtp-proxy alone (0: skip it)")
    ap.add_argument("--paths", default=",".join(PATHS), help="comma-separated, of " + ", ".join(PATHS))
    ap.add_argument("--json", help="write every round's figures and checks here")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args(argv)
    reason = testbed_sendmail.unavailable()
    paths = [p for p in args.paths.split(",") if p]
    if reason is None and "dovecot-proxy" in paths and not shutil.which("dovecot"):
        reason = "dovecot-core is not installed (deps/debian-packages.txt)"
    if reason:
        print(reason, file=sys.stderr)
        return 1
    rnd = random.Random(15)
    users = {f"u{i:05d}": rnd.choice(STORES) for i in range(args.users)}
    names = sorted(users)
    work = pathlib.Path(tempfile.mkdtemp(prefix="pwmail-bench-mx-", dir="/var/tmp"))
    os.chmod(work, 0o755)
    started: list = []
    rounds: list[dict] = []
    try:
        table = {u: (5000 + i, 5000 + i, h, False) for i, (u, h) in enumerate(sorted(users.items()))}
        pw = PwServer(write_users(work / "users", table))
        started.append(pw)
        conf = client_conf(work / "pwserver.conf", [pw.address], timeout_ms=1000)
        env = {**os.environ, "PWSERVER_CONF": str(conf), "PWMAIL_CONF": str(work / "none.toml")}
        env.pop("PWMAIL_SYSLOG", None)
        lmtp_port = free_port_on(STORES)
        stores = Stores(work, users, lmtp_port, env)
        started.append(stores)
        proxy = LmtpProxy(work / "proxy", free_port(), conf, {"lmtp_port": lmtp_port})
        started.append(proxy)
        targets = {"proxy": f"127.0.0.1 {proxy.port}", "store": f"{STORES[0]} {lmtp_port}"}
        if "dovecot-proxy" in paths:
            dovecot = DovecotProxy(work, users, lmtp_port)
            started.append(dovecot)
            targets["dovecot"] = f"127.0.0.1 {dovecot.port}"
        mxs = {}
        for p in paths:
            block, target = PATHS[p]
            mxs[p] = QueueingSendmail(work / f"mx-{p}", block, targets.get(target), pw.address, lmtp_port)
            started.append(mxs[p])
        # whose CPU per message is reported (Dovecot's are several processes: not counted)
        daemons = {"lmtp-proxy": proxy.proc.pid, **{f"pdeliveryd {h}": s.proc.pid for h, s in stores.procs.items()}}
        by_store = {h: [u.encode() for u in names if users[u] == h] for h in STORES}
        load_cells = {
            "proxy-16": [("127.0.0.1", proxy.port, [u.encode() for u in names])] * LOAD_CLIENTS,
            "direct-16": [(STORES[i % 2], lmtp_port, by_store[STORES[i % 2]]) for i in range(LOAD_CLIENTS)],
        }
        # every mailbox exists before the timed runs (a first delivery makes its folders): each user
        # once through the proxy, and once into the first store (where the no-routing path puts all)
        for host, port in (("127.0.0.1", proxy.port), (STORES[0], lmtp_port)):
            each = iter([u.encode() for u in names])
            asyncio.run(_load([(host, port, each)] * LOAD_CLIENTS, QUEUE_RUN_TIMEOUT))
        for r in range(args.rounds):
            order = paths if r % 2 == 0 else list(reversed(paths))
            result: dict = {}
            for p in order:
                result[p] = run_path(p, mxs[p], stores, names, args.messages, rnd, f"r{r}.{p}", daemons)
                print(f"# round {r + 1}: {p}: {result[p]['rate']:.1f} messages/s {result[p]}", file=sys.stderr)
            if args.seconds > 0:
                cells = list(load_cells.items()) if r % 2 == 0 else list(reversed(load_cells.items()))
                for cell, cell_targets in cells:
                    result[cell] = run_load(cell_targets, stores, args.seconds, daemons)
                    print(f"# round {r + 1}: {cell}: {result[cell]['rate']:.1f} messages/s", file=sys.stderr)
            rounds.append(result)
    finally:
        for s in reversed(started):
            s.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report(args, paths, rounds)
    bad = [
        (i, p, v)
        for i, r in enumerate(rounds)
        for p, v in r.items()
        if ("missing" in v and (v["missing"] or v["doubled"] or v["stray"] or v["misplaced"] or v["left_in_queue"]))
        or ("stored" in v and v["stored"] != v["delivered"])
    ]
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"args": vars(args), "rounds": rounds, "bad": bad}, indent=1))
    if bad:
        print(f"NOT every message exactly once: {bad}", file=sys.stderr)
        return 2
    return 0


GOALS = [  # (numerator, denominator, at least, what)
    ("lmtp-proxy", "dovecot-proxy", 1.2, "lmtp-proxy / Dovecot's LMTP proxy"),
    ("lmtp-proxy", "direct", 0.9, "lmtp-proxy / the no-routing limit"),
    ("pdelivery", "lmtp-proxy", 0.5, "pdelivery path / lmtp-proxy path"),
    ("proxy-16", "direct-16", 0.95, "lmtp-proxy alone / direct, 16 clients"),
]


def report(args, paths: list[str], rounds: list[dict]) -> None:
    if not rounds:
        return
    cells = [p for p in [*paths, "proxy-16", "direct-16"] if p in rounds[0]]
    print(
        f"{args.messages} messages of {MESSAGE_SIZE // 1024} KiB per path and round, {args.users} users on "
        f"2 stores, {len(rounds)} round(s), {os.cpu_count()} CPUs, load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end\n"
    )
    daemons = list(rounds[0][cells[0]]["cpu_ms"])
    print(f"| path | messages/s (median) | each round | {' | '.join(f'{d} CPU ms/message' for d in daemons)} |")
    print(f"|---|---:|---|{'---:|' * len(daemons)}")
    for c in cells:
        rates = [r[c]["rate"] for r in rounds]
        cpu = " | ".join(f"{statistics.median(r[c]['cpu_ms'][d] for r in rounds):.2f}" for d in daemons)
        print(f"| {c} | {statistics.median(rates):.1f} | {', '.join(f'{x:.1f}' for x in rates)} | {cpu} |")
    print("\n| ratio (within a round) | median | each round | goal | met |")
    print("|---|---:|---|---:|---|")
    for a, b, goal, what in GOALS:
        rs = ratios(rounds, a, b)
        if rs:
            med = statistics.median(rs)
            print(
                f"| {what} | {med:.2f}x | {', '.join(f'{x:.2f}' for x in rs)} | >= {goal}x | "
                f"{'yes' if med >= goal else 'no'} |"
            )


if __name__ == "__main__":
    sys.exit(main())
