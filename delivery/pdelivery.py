"""pdelivery: Sendmail's local mailer (the paper's III.F), a client of pdeliveryd.

The installed `pdelivery` command is the C program in delivery/_csrc (same
command line, settings, log lines and exit codes, plus 78 for settings it
cannot use), because starting this module costs about 100 ms of CPU a
message. This module stays as its reference: the tests compare the two, the
benchmark measures both, and Router/send serve tests/placement/test_move.py.

    pdelivery [-f SENDER] [-i QUEUEID] [--lmtp-port N] -d USER [USER...] < message
    pdelivery [-f SENDER] [-i QUEUEID] [--lmtp-port N] -l          (LMTP on stdin/stdout)

Each user is looked up in the password server; the message goes over LMTP
to the user's mailhost (from the password server, else the `[placement]`
default rule), at its `[hosts]` address (pwmail/base/hostmap.py), else the
name + `mailhost_suffix` by DNS, port `lmtp_port` of `[delivery]` (default 24).

Exit codes (sysexits, and only these): 0 when every user's copy is durable
(pdeliveryd said 250, and its replies matched the commands sent, to the
221 of QUIT); 64 (EX_USAGE) when an argument cannot go on an LMTP command
line (`-f`, `-d`, `-i` outside the grammar of lmtpclient.check_address and
check_queue_id: CR, LF, NUL, `<`, `>`, too long), refused before anything
is sent (with `-l`, such a MAIL, RCPT or XQUEUEID in the input is
answered 501, never relayed, and the session ends with 64); 67
(EX_NOUSER) when a user does not exist or the message was refused for
good (the status, e.g. `5.1.1`, is on stderr); 75 (EX_TEMPFAIL) for
everything temporary: password server unavailable, mailbox frozen,
storage host down, timeouts, replies out of step with the commands, any
surprise. With several
users, any temporary failure gives 75 and the whole message is retried;
pdeliveryd acknowledges the copies it already holds (same queue id, same
recipient, same bytes) without storing them twice. Sendmail's mailer is
defined without `m` (one user per run), or with `-l` (`F=z`) for
per-recipient answers: see docs/delivery.md.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from dataclasses import dataclass

from delivery import config as dconfig
from delivery.layout import LayoutError, check_user
from delivery.lmtp import CLOSED, NEED_DATA, LMTPServerConnection, MessageReceived, PeerError, RcptRequest, Reply
from delivery.lmtpclient import InvalidArgument, LMTPUnavailable, check_address, check_queue_id, crlf, deliver
from delivery.replies import R_BAD_ADDRESS, R_FROZEN, R_LOOKUP_DOWN, R_NO_ROUTE, R_NO_USER, store_unavailable
from delivery.replies import R_RCPT_OK as R_OK
from delivery.users import user_from_address
from pwmail.base import hostmap
from pwmail.base.logsetup import setup_logging

EX_OK = 0
EX_USAGE = 64
EX_NOUSER = 67
EX_TEMPFAIL = 75

log = logging.getLogger("pdelivery")

R_READ_LIMIT = Reply(552, "5.3.4", "message too big")
# -l input whose MAIL, RCPT or XQUEUEID could not be relayed as one command line
R_BAD_SENDER_SYNTAX = Reply(501, "5.1.7", "bad sender address syntax")
R_BAD_RCPT_SYNTAX = Reply(501, "5.1.3", "bad recipient address syntax")
R_BAD_QUEUE_ID = Reply(501, "5.5.4", "bad XQUEUEID")


@dataclass
class Route:
    user: str
    host: str | None  # the store's address (the [hosts] map's, or the mailhost + mailhost_suffix)
    reply: Reply  # R_OK when routable
    port: int | None = None  # its LMTP port; None: [delivery] lmtp_port


class Router:
    """User -> mailhost, through the password server (pwcache.client.Client)."""

    def __init__(self, cfg: dict, client=None, placement=None, hosts: hostmap.HostMap | None = None):
        self.cfg = cfg
        self.hosts = hosts if hosts is not None else hostmap.load()
        if client is None:
            from pwcache.client import Client

            client = Client.from_config()
        self.client = client
        self._placement = placement

    def placement(self):
        if self._placement is None:
            self._placement = dconfig.placement_rule()
        return self._placement

    def route(self, address: str) -> Route:
        from pwcache.client import PwError

        user = user_from_address(address, self.cfg["recipient_delimiter"])
        try:
            check_user(user)
        except LayoutError:
            return Route(user, None, R_BAD_ADDRESS)
        try:
            pw = self.client.passwd_by_name(user)
            if pw is None:
                return Route(user, None, R_NO_USER)
            mh = self.client.mailhost(user)
        except PwError as e:
            log.warning("lookup of %s: %s", user, e)
            return Route(user, None, R_LOOKUP_DOWN)
        if mh is not None and mh.frozen:
            return Route(user, None, R_FROZEN)
        host = (mh.host if mh is not None else "") or pw.mailhost
        if not host:
            try:
                host = self.placement().pick(user)
            except Exception as e:
                log.error("placement rule: %s", e)
                host = None
        if not host:
            return Route(user, None, R_NO_ROUTE)
        host, port = dconfig.store_address(self.hosts, self.cfg, host)
        return Route(user, host, R_OK, port)


def send(
    cfg: dict, routes: list[Route], addresses: list[str], sender: str, data: bytes, queue_id: str | None
) -> list[Reply]:
    """Deliver to every routable address, one LMTP session per mailhost."""
    replies: list[Reply | None] = [None] * len(routes)
    by_host: dict[tuple[str, int], list[int]] = {}
    for i, r in enumerate(routes):
        if r.reply.ok:
            by_host.setdefault((r.host, r.port or int(cfg["lmtp_port"])), []).append(i)
        else:
            replies[i] = r.reply
    for (host, port), idx in by_host.items():
        try:
            got = deliver(
                host,
                port,
                sender,
                [addresses[i] for i in idx],
                data,
                queue_id=queue_id,
                connect_timeout=float(cfg["connect_timeout"]),
                timeout=float(cfg["timeout"]),
            )
        except LMTPUnavailable as e:
            log.warning("%s:%d: %s", host, port, e)
            got = [store_unavailable(host, e)] * len(idx)
        for i, r in zip(idx, got):
            replies[i] = r
    return replies  # type: ignore[return-value]


def exit_code(replies: list[Reply]) -> int:
    if any(not (r.ok or 500 <= r.code < 600) for r in replies):
        return EX_TEMPFAIL
    if any(not r.ok for r in replies):
        return EX_NOUSER
    return EX_OK


def read_message(stream, limit: int) -> bytes | None:
    data = stream.read(limit + 1)
    return None if len(data) > limit else data


def run_users(cfg: dict, router: Router, users: list[str], sender: str, queue_id: str | None, stdin) -> int:
    data = read_message(stdin, int(cfg["message_size_max"]))
    if data is None:
        print(f"pdelivery: {R_READ_LIMIT}", file=sys.stderr)
        return EX_NOUSER
    data = crlf(data)
    routes = [router.route(u) for u in users]
    replies = send(cfg, routes, users, sender, data, queue_id)
    for u, r in zip(users, replies):
        if r.ok:
            log.info("delivered qid=%s to=%s: %s", queue_id or "-", u, r)
        else:
            print(f"pdelivery: {u}: {r}", file=sys.stderr)
            log.warning("qid=%s to=%s: %s", queue_id or "-", u, r)
    return exit_code(replies)


def _fits(check, *args, **kwargs) -> bool:
    """Whether -l input passes `check` (lmtpclient's grammar); a refusal is logged."""
    try:
        check(*args, **kwargs)
        return True
    except InvalidArgument as e:
        log.warning("-l input: %s", e)
        return False


def refused_rcpt(ev: RcptRequest) -> Reply | None:
    """The refusal of a -l RCPT whose sender or address is outside the
    grammar (it is never relayed), None if both may be sent."""
    if not _fits(check_address, ev.sender, "sender", empty_ok=True):
        return R_BAD_SENDER_SYNTAX
    if not _fits(check_address, ev.address):
        return R_BAD_RCPT_SYNTAX
    return None


def run_lmtp(cfg: dict, router: Router, queue_id: str | None, stdin, stdout) -> int:
    """Speak LMTP on stdin/stdout (Sendmail F=z), relaying to the mailhosts.
    Input that cannot be relayed as it came (see refused_rcpt) is answered
    501 and the session ends with EX_USAGE instead of EX_OK."""
    conn = LMTPServerConnection(socket.getfqdn(), dconfig.limits_from(cfg), "LMTP pdelivery ready")
    routes: list[Route] = []
    bad_input = False
    while True:
        try:
            ev = conn.next_event()
        except PeerError:
            stdout.write(conn.data_to_send())
            stdout.flush()
            return EX_TEMPFAIL
        if ev is CLOSED:
            stdout.write(conn.data_to_send())
            stdout.flush()
            return EX_USAGE if bad_input else EX_OK
        if ev is NEED_DATA:
            stdout.write(conn.data_to_send())
            stdout.flush()
            conn.receive_data(stdin.read1(65536) if hasattr(stdin, "read1") else stdin.read(65536))
        elif isinstance(ev, RcptRequest):
            refusal = refused_rcpt(ev)
            bad_input |= refusal is not None
            route = router.route(ev.address) if refusal is None else None
            if route is not None and route.reply.ok:
                routes.append(route)
            conn.answer_rcpt(refusal or route.reply)
        elif isinstance(ev, MessageReceived):
            mine = routes[-len(ev.recipients) :]
            routes.clear()
            qid = queue_id or ev.queue_id
            if qid and not _fits(check_queue_id, qid):
                bad_input = True
                replies = [R_BAD_QUEUE_ID] * len(ev.recipients)
            else:
                replies = send(cfg, mine, ev.recipients, ev.sender, ev.data, qid)
            for a, r in zip(ev.recipients, replies):
                log.log(logging.INFO if r.ok else logging.WARNING, "qid=%s to=%s: %s", qid or "-", a, r)
            conn.answer_message(replies)
        if conn.phase == conn.READY and not conn.recipients:
            routes.clear()


def parse_args(argv):
    p = argparse.ArgumentParser(prog="pdelivery", description="Sendmail local mailer: LMTP to the user's storage host")
    p.add_argument("-f", dest="sender", default="", help="envelope sender")
    p.add_argument("-i", dest="queue_id", help="the MTA's queue id (duplicate detection)")
    p.add_argument("-d", dest="deliver", action="store_true", help="deliver to the USERs named after it")
    p.add_argument("-l", dest="lmtp", action="store_true", help="LMTP on stdin/stdout")
    p.add_argument("--lmtp-port", type=int, help="port of pdeliveryd on the mailhosts")
    p.add_argument("--config", help="settings file (default $PWMAIL_CONF or /etc/pwmail.toml)")
    p.add_argument("--log-stderr", action="store_true")
    p.add_argument("users", nargs="*")
    return p.parse_args(argv)


def main(argv=None) -> int:
    try:
        return _main(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:  # argparse: a usage error is the MTA's config, keep the mail
        return EX_TEMPFAIL if e.code not in (0, None) else EX_OK
    except InvalidArgument as e:  # an argument that cannot go on a command line (checked first thing)
        print(f"pdelivery: 5.5.4 {e}", file=sys.stderr)
        return EX_USAGE
    except Exception as e:  # never an exit code outside sysexits
        print(f"pdelivery: 4.3.0 internal error: {e!r}", file=sys.stderr)
        return EX_TEMPFAIL


def _main(argv) -> int:
    args = parse_args(argv)
    setup_logging("pdelivery", stderr=args.log_stderr)
    cfg = dconfig.load(args.config)
    if args.lmtp_port:
        cfg["lmtp_port"] = args.lmtp_port
    if args.lmtp == bool(args.deliver) or (args.deliver and not args.users) or (args.lmtp and args.users):
        print("pdelivery: usage: pdelivery [-f SENDER] [-i QUEUEID] (-d USER... | -l)", file=sys.stderr)
        return EX_TEMPFAIL
    # Whatever reaches an LMTP command line is checked before anything is
    # read or sent: an argument with CR or LF would be commands of its own.
    # InvalidArgument -> EX_USAGE in main().
    sender = check_address(args.sender, "sender", empty_ok=True)
    users = [check_address(u) for u in args.users]
    queue_id = check_queue_id(args.queue_id) if args.queue_id else None
    router = Router(cfg, hosts=hostmap.load(args.config))
    if args.lmtp:
        return run_lmtp(cfg, router, queue_id, sys.stdin.buffer, sys.stdout.buffer)
    return run_users(cfg, router, users, sender, queue_id, sys.stdin.buffer)


if __name__ == "__main__":
    sys.exit(main())
