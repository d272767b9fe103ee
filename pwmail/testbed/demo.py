"""`pwmail demo [--once]`: the whole system on this machine (docs/demo.md).

100,000 generated users over two storage servers, both password servers,
the delivery path and the POP distributor, each on its own host: a network
namespace on a private bridge when run as root, a loopback address
(127.77.0.x) otherwise. It delivers a handful of messages through
`pdelivery` (and, where Sendmail is installed and the hosts are
namespaces, one over SMTP through real Sendmail on mx1, which runs
pdelivery), fetches them through `pop-proxy` with poplib (and, on the
namespace bed with Dovecot IMAP, lists them through `imap-proxy` with
imaplib), resolves a user
with `getent` through the NSS module, prints what went where, and keeps
running until Ctrl-C (`--once`: exits 0 when every check passed).

The hosts and the way the parts are started live in the test bed
(pwmail/testbed/), shared with the whole-system tests, so the demo runs
exactly what the tests check.
"""

from __future__ import annotations

import argparse
import random
import signal
import smtplib
import sys
import time
from pathlib import Path

EXIT_FAILED = 1
EXIT_MISSING = 3


class DemoFailure(Exception):
    """A check of the demo failed (the text says which)."""


def _testbed():
    """The test bed (pwmail/testbed/system.py), imported on use: its
    imports reach every part."""
    from pwmail.testbed import system

    return system


def say(text: str = "") -> None:
    print(text, flush=True)


def describe_hosts(sysm) -> None:
    bed = sysm.bed
    mx = (
        "Sendmail (SMTP, port 25) running pdelivery as its local mailer"
        if sysm.sendmail_wanted()
        else "pdelivery (the MX's local mailer)"
    )
    imap = sysm.imap_unavailable() is None
    roles = {
        "pw1": "pwserver (primary)",
        "pw2": "pwserver (secondary)",
        "mx1": mx,
        "pop1": "pop-proxy (the POP distributor)" + (" + imap-proxy (the IMAP one)" if imap else ""),
        "client1": "POP and IMAP client, lookups" if imap else "POP client, lookups",
        "log1": "syslog collector (central log)",
    }
    for s in sysm.stores:
        roles[s] = "pdeliveryd (LMTP) + pop3d" + (" + Dovecot IMAP" if imap else "") + " over a hashed Maildir tree"
    if sysm.netns:
        say(f"hosts: network namespaces on one private bridge, {bed.subnet} (exists only inside them)")
    else:
        say(f"hosts: loopback addresses {bed.subnet} (not root: no namespaces, no link cuts)")
    for h in bed.names():
        say(f"  {h:<8} {bed.addr(h):<12} {roles.get(h, '')}")


def imap_check(sysm, sent: dict[str, list[str]]) -> None:
    """The same messages through imap-proxy to Dovecot IMAP, on the Maildirs POP just read."""
    say("IMAP: imaplib on client1 -> imap-proxy on pop1 -> Dovecot IMAP on the user's store")
    for user, subjects in sent.items():
        t0 = time.monotonic()
        got = sysm.imap_subjects(user)
        ms = (time.monotonic() - t0) * 1000
        if sorted(got) != sorted(subjects):
            raise DemoFailure(f"{user}: IMAP shows subjects {got}, expected {subjects}")
        say(f"  {user:<12} {len(got)} message{'s' * (len(got) > 1)} in INBOX, subjects match ({ms:.0f} ms)")


def run_checks(sysm, n_messages: int = 6) -> dict:
    """Deliver, fetch, resolve, time; raise DemoFailure on any wrong result."""
    from pwmail.testbed.system import summarize

    bed = sysm.bed
    counts: dict[str, int] = {}
    for h in sysm.mailhosts.values():
        counts[h] = counts.get(h, 0) + 1
    say(
        f"users: {len(sysm.mailhosts):,} generated; "
        + ", ".join(f"{s} holds {counts.get(s, 0):,} mailboxes" for s in sysm.stores)
    )

    # A handful of messages, spread over users on every store.
    per_store = 2
    users = [u for s in sysm.stores for u in sysm.users_on(s, per_store)]
    plan = [users[i % len(users)] for i in range(max(n_messages, len(users)))]
    say("")
    say("delivery: pdelivery on mx1 -> pwserver lookup -> LMTP -> pdeliveryd on the user's store")
    sent: dict[str, list[str]] = {}
    for i, user in enumerate(plan):
        subject = f"pwmail demo {i + 1} for {user}"
        t0 = time.monotonic()
        r = sysm.deliver(user, sysm.message(user, subject, f"Hello {user}, this is demo message {i + 1}.\n"))
        ms = (time.monotonic() - t0) * 1000
        if r.returncode != 0:
            raise DemoFailure(f"pdelivery -d {user} exited {r.returncode}: {r.stderr.decode(errors='replace').strip()}")
        sent.setdefault(user, []).append(subject)
        say(f"  {user:<12} exit 0 in {ms:5.0f} ms (the whole pdelivery process)")
    say("")
    if sysm.sendmail:
        smtp_check(sysm, users[-1], sent)
    else:
        say(f"SMTP: no Sendmail on mx1 ({sysm.sendmail_unavailable() or 'not asked for'})")
    say("")
    say("where it went (hashed Maildir on the user's storage server):")
    for user, subjects in sent.items():
        store = sysm.mailhosts[user]
        files = sysm.messages_on_disk(user, store)
        if len(files) != len(subjects):
            raise DemoFailure(
                f"{user}: {len(subjects)} delivered but {len(files)} files in {sysm.mailbox(user, store)}"
            )
        for other in sysm.stores:
            if other != store and sysm.mailbox(user, other).exists():
                raise DemoFailure(f"{user}: a mailbox also exists on {other}, not its mailhost {store}")
        rel = files[0].relative_to(sysm.spool(store))
        say(f"  {user:<12} {store}:<spool>/{rel}  ({len(files)} message{'s' * (len(files) > 1)})")

    say("")
    say("POP: poplib on client1 -> pop-proxy on pop1 -> pop3d on the user's store")
    for user, subjects in sent.items():
        t0 = time.monotonic()
        msgs = sysm.pop_fetch(user)
        ms = (time.monotonic() - t0) * 1000
        got = sorted(s for s in subjects if any(f"Subject: {s}".encode() in m for m in msgs))
        if len(msgs) != len(subjects) or got != sorted(subjects):
            raise DemoFailure(
                f"{user}: POP returned {len(msgs)} messages, expected {len(subjects)} with subjects {subjects}"
            )
        say(f"  {user:<12} {len(msgs)} message{'s' * (len(msgs) > 1)} fetched, subjects match ({ms:.0f} ms)")

    say("")
    if sysm.imap:
        imap_check(sysm, sent)
    else:
        say(f"IMAP: no Dovecot IMAP on the stores ({sysm.imap_unavailable() or 'not started'})")

    say("")
    user = users[0]
    rc, out, secs = sysm.getent(user)
    expected = next(line.rstrip("\n") for line in open(sysm.users_dir / "passwd") if line.startswith(user + ":"))
    if rc != 0 or out != expected:
        raise DemoFailure(f"getent -s pwserver passwd {user} on mx1: exit {rc}, {out!r} (expected {expected!r})")
    say(f"NSS: getent -s pwserver passwd {user} on mx1 (libnss_pwserver.so.2):")
    say(f"  {out}")
    say(f"  {secs * 1000:.1f} ms for the whole getent process")

    names = random.Random(7).sample(list(sysm.mailhosts), 1000)
    lat = sysm.lookup_latencies(names)
    say(f"lookups: Python client on client1 -> pwserver, {summarize(lat)}")

    time.sleep(0.3)  # let the last datagrams reach the collector
    lines = bed.log_lines()
    by_host: dict[str, int] = {}
    for line in lines:
        parts = line.split(" ", 2)
        if len(parts) > 1:
            by_host[parts[1]] = by_host.get(parts[1], 0) + 1
    say(
        f"central log on log1 ({bed.syslog_file()}): {len(lines)} lines from "
        + ", ".join(f"{h} {n}" for h, n in sorted(by_host.items()))
    )
    return {"sent": sent, "users": users}


def smtp_check(sysm, user: str, sent: dict[str, list[str]], timeout: float = 60.0) -> None:
    """One message over SMTP from client1 to Sendmail on mx1, which runs
    pdelivery for it; it must land in the user's Maildir."""
    subject = f"pwmail demo over SMTP for {user}"
    store = sysm.mailhosts[user]
    before = len(sysm.messages_on_disk(user, store))
    say("SMTP: smtplib on client1 -> Sendmail on mx1:25 -> pdelivery (its local mailer) -> LMTP -> pdeliveryd")
    t0 = time.monotonic()
    try:
        refused = sysm.smtp_send(
            "demo@example.org",
            [f"{user}@example.org"],
            sysm.message(user, subject, f"Hello {user}, this one came through Sendmail.\n"),
        )
    except (smtplib.SMTPException, OSError) as e:
        raise DemoFailure(f"SMTP to Sendmail on mx1 for {user}: {e}") from None
    if refused:
        raise DemoFailure(f"Sendmail on mx1 refused {user}: {refused}")
    while len(sysm.messages_on_disk(user, store)) == before:
        if time.monotonic() - t0 > timeout:
            raise DemoFailure(
                f"Sendmail on mx1 accepted a message for {user} but it did not reach {store} "
                f"within {timeout:.0f} s (queue: {len(sysm.sendmail_queue())} files; "
                f"log {sysm.bed.dir('mx1') / 'sendmail' / 'maillog'})"
            )
        time.sleep(0.05)
    sent.setdefault(user, []).append(subject)
    say(
        f"  {user:<12} accepted by Sendmail and in its Maildir on {store} after {(time.monotonic() - t0) * 1000:.0f} ms"
    )


def instructions(sysm, users: list[str]) -> None:
    bed = sysm.bed
    on = bed.write_on_script({h: sysm.env(h) for h in bed.names()})
    user = users[0]
    pw = sysm.passwords[user]
    bindir = Path(sys.executable).parent
    pop = f"{bed.addr('pop1')}:{sysm.ports.proxy}"
    say("")
    say("The system keeps running. In another terminal" + (" (as root)" if sysm.netns else "") + ", try:")
    say(f"  {on} mx1 getent -s pwserver passwd {user}")
    say(f"  {on} client1 {bindir}/pwquery mailhost {user}")
    say(f"  printf 'Subject: hi\\n\\nhello\\n' | {on} mx1 {bindir}/pdelivery -d {user}")
    if sysm.sendmail:
        say(
            f"  printf 'Subject: hi\\n\\nhello\\n' | {on} client1 curl -s smtp://{bed.addr('mx1')}:{sysm.ports.smtp} "
            f"--mail-from demo@example.org --mail-rcpt {user}@example.org --crlf -T -"
        )
        say(
            f"  {on} mx1 nsenter -t {bed.proc('mx1', 'sendmail').pid} --uts --mount sendmail-mta -bp   "
            "# Sendmail's queue"
        )
    say(f"  {on} client1 curl -s pop3://{user}:{pw}@{pop}/1")
    if sysm.imap:
        say(f"  {on} client1 curl -s 'imap://{user}:{pw}@{bed.addr('pop1')}:{sysm.ports.imap}/INBOX;MAILINDEX=1'")
    say(f"  tail -f {bed.syslog_file()}")
    say(f"  ({on} HOST COMMAND runs a command on any host: {', '.join(bed.names())})")
    say("Ctrl-C stops everything.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pwmail demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--once", action="store_true", help="run the checks, stop everything, exit 0 on success")
    ap.add_argument("--users", type=int, default=100_000, help="generated users (default 100000)")
    ap.add_argument("--messages", type=int, default=6, help="messages to deliver (default 6)")
    ap.add_argument("--loopback", action="store_true", help="loopback addresses even when namespaces are allowed")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (configs, spools, logs)")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    # Explicitly: a demo started in the background inherits SIGINT ignored.
    signal.signal(signal.SIGINT, on_term)
    try:
        ts = _testbed()
    except DemoFailure as e:
        print(f"pwmail demo: {e}", file=sys.stderr)
        return EXIT_FAILED
    try:
        ts.require("gen-users", "pwserver", "client", "layout", "pdeliveryd", "pdelivery", "pop3d", "pop-proxy", "nss")
    except ts.PartMissing as e:
        print(f"pwmail demo: {e}", file=sys.stderr)
        return EXIT_MISSING
    t_start = time.monotonic()
    bed = ts.make_bed(loopback=args.loopback, keep=args.keep)
    try:
        with bed:
            sysm = ts.PwmailSystem(bed, users=args.users)
            say("pwmail demo: the whole system on this machine")
            describe_hosts(sysm)
            say(f"starting: {args.users:,} users, pwserver x2, pdeliveryd + pop3d x{len(sysm.stores)}, pop-proxy ...")
            sysm.start()
            say(f"started in {time.monotonic() - t_start:.1f} s (work folder {bed.workdir})")
            say("")
            result = run_checks(sysm, args.messages)
            say("")
            say("pwmail demo: every check passed")
            if args.once:
                return 0
            instructions(sysm, result["users"])
            while True:
                for h in bed.names():
                    for name, p in bed.hosts[h].procs.items():
                        if not p.running():
                            raise DemoFailure(
                                f"{name} on {h} stopped ({p.popen.returncode}):\n{bed.output(h, name)[-2000:]}"
                            )
                time.sleep(1)
    except KeyboardInterrupt:
        say("\npwmail demo: stopped, everything torn down")
        return 0
    except (DemoFailure, ts.SystemError_, ts.PartMissing) as e:
        print(f"pwmail demo: FAILED: {e}", file=sys.stderr)
        if args.keep:
            print(f"pwmail demo: logs kept in {bed.workdir}", file=sys.stderr)
        return EXIT_MISSING if isinstance(e, ts.PartMissing) else EXIT_FAILED
