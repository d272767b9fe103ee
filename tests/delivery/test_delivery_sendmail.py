"""Real Sendmail (Debian sendmail-bin) with pdelivery as its local mailer,
built from the m4 definition shipped in docs/delivery.md.

Sendmail runs as a foreground daemon on 127.0.0.1:<high port> with its
private /etc/mail, /etc/hosts, host name and /dev/log, as set up by
pwmail/testbed/sendmail.py (which names the traps it solves; the test bed runs
the same on mx1).
Storage: a real pwserver and two real pdeliveryd (127.0.0.2, 127.0.0.3).
"""

import os
import pathlib
import re
import shutil
import smtplib
import socket
import subprocess
import tempfile
import time

import pytest

from pwmail.testbed import sendmail as testbed_sendmail
from pwmail.testbed.sendmail import CF_M4, SENDMAIL, SendmailDir, SyslogSink, enter, message
from tests.support import pwtest
from tests.support.delivery_util import (
    LmtpProxy,
    Pdeliveryd,
    free_port,
    messages,
    stop_process,
    two_stores,
    wait_for,
)

STORES = ["127.0.0.2", "127.0.0.3"]

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount namespace)"),
    pytest.mark.skipif(
        not os.path.exists(CF_M4) or not os.path.exists(SENDMAIL),
        reason="sendmail-bin / sendmail-cf not installed (deps/debian-packages.txt)",
    ),
]


class SendmailMX:
    def __init__(
        self,
        d: pathlib.Path,
        port: int,
        lmtp_port: int,
        pw_address: str,
        block: str = "sendmail-mailer",
        target: str | None = None,
    ):
        self.d, self.port = d, port
        self.dir = SendmailDir(
            d,
            port=port,
            block=block,
            pdelivery=str(pwtest.BIN / "pdelivery"),
            direct_target=target or f"{STORES[0]} {lmtp_port}",
            pwserver_conf=f"server {pw_address}\ntimeout_ms 500\nhedge_ms 100\n",
            pwmail_toml=f"[delivery]\nlmtp_port = {lmtp_port}\nconnect_timeout = 2.0\n",
            hosts="127.0.0.1 localhost\n127.0.0.1 mx.pwmail.test mx\n",
        )
        self.syslog = SyslogSink(self.dir.log_socket, d / "maillog")
        self.log = open(d / "sendmail.out", "w+b")
        self.proc = subprocess.Popen(
            self.dir.daemon_argv, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **self.dir.env}
        )
        try:
            wait_for(self._listening, timeout=60, step=0.2)
        except AssertionError:
            self.stop()
            raise RuntimeError(f"sendmail not listening:\n{self.output()}") from None

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"sendmail exited {self.proc.returncode}:\n{self.output()}")
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def output(self) -> str:
        """Everything Sendmail and pdelivery said: stdout/stderr and syslog."""
        self.log.flush()
        return pathlib.Path(self.log.name).read_text(errors="replace") + "\n".join(self.syslog.lines)

    def in_namespace(self, *argv, timeout=120) -> subprocess.CompletedProcess:
        return subprocess.run(enter(self.proc.pid, *argv), capture_output=True, text=True, timeout=timeout)

    def queue_files(self, prefix="qf") -> list[pathlib.Path]:
        return self.dir.queue_files(prefix)

    def stop(self) -> None:
        stop_process(self.proc, 15)
        self.log.close()
        self.syslog.close()


def _bed(tmp_path_factory, block, proxy: str = ""):
    """Sendmail with the mailer `block`, two stores; with `proxy` ("tcp" or
    "unix") an lmtp-proxy in front of them, the [IPC] mailer's target."""
    with two_stores(tmp_path_factory.mktemp("sendmail"), STORES) as bed:
        bed["lmtp_port"] = bed["port"]
        m = None
        try:
            target = None
            if proxy == "unix":
                # Sendmail refuses a socket below a world-writable folder (/tmp): one of ours in /run
                bed["run"] = pathlib.Path(tempfile.mkdtemp(prefix="pwmail-test-", dir="/run"))
            if proxy:
                unix = bed["run"] / "lmtp-proxy.sock" if proxy == "unix" else None
                bed["proxy"] = start_proxy(bed, free_port(), unix)
                target = str(bed["proxy"].unix) if proxy == "unix" else f"127.0.0.1 {bed['proxy'].port}"
            bed["mx"] = m = SendmailMX(bed["d"] / "mx", free_port(), bed["port"], bed["pw"].address, block, target)
            yield bed
        finally:
            if m is not None:
                m.stop()
            if bed.get("proxy"):
                bed["proxy"].stop()
            if bed.get("run"):
                shutil.rmtree(bed["run"], ignore_errors=True)


def start_proxy(bed, port: int, unix: pathlib.Path | None = None) -> LmtpProxy:
    return LmtpProxy(bed["d"] / "proxy", port, bed["conf"], {"lmtp_port": bed["lmtp_port"]}, unix=unix)


@pytest.fixture(scope="module")
def mx(tmp_path_factory):
    yield from _bed(tmp_path_factory, "sendmail-mailer")


@pytest.fixture(scope="module")
def mx_lmtp(tmp_path_factory):
    yield from _bed(tmp_path_factory, "sendmail-mailer-lmtp")


@pytest.fixture(scope="module")
def mx_direct(tmp_path_factory):
    yield from _bed(tmp_path_factory, "sendmail-mailer-direct")


@pytest.fixture(scope="module")
def mx_flag_p(tmp_path_factory):
    """The one-user mailer with Sendmail's default `P` kept: Sendmail adds its own `Return-Path: <$g>`."""
    documented = testbed_sendmail.documented_mailer

    def with_p(block: str) -> str:
        text = documented(block)
        assert "`lsDFMA5:/|@qn')" in text
        return text.replace("`lsDFMA5:/|@qn')", "`lsDFMA5:/|@qnP')")

    bed = _bed(tmp_path_factory, "sendmail-mailer")
    with pytest.MonkeyPatch.context() as mp:  # only while this bed's sendmail.cf is made
        mp.setattr(testbed_sendmail, "documented_mailer", with_p)
        started = next(bed)
    yield started
    bed.close()  # _bed's finally: everything stopped


@pytest.fixture(scope="module", params=["tcp", "unix"])
def mx_proxy(tmp_path_factory, request):
    yield from _bed(
        tmp_path_factory, f"sendmail-mailer-proxy{'-unix' if request.param == 'unix' else ''}", proxy=request.param
    )


def smtp_send(mx, sender, rcpts, data):
    with smtplib.SMTP("127.0.0.1", mx.port, timeout=60) as s:
        return s.sendmail(sender, rcpts, data)


def test_message_lands_byte_for_byte_in_hashed_maildir(mx):
    data = message("byte for byte", "juan@pwmail.test")
    assert smtp_send(mx["mx"], "ana@pwmail.test", ["juan@pwmail.test"], data) == {}
    box = mx["layout"]["127.0.0.2"].path("juan")
    assert box.parts[-4:] == ("j", "u", "a", "juan")
    files = wait_for(lambda: messages(box), timeout=60)
    assert len(files) == 1, mx["mx"].output()
    stored = files[0].read_bytes()
    head, sep, rest = stored.partition(b"\nReceived: ")
    assert head.startswith(b"Return-Path: <ana@pwmail.test>\nDelivered-To: juan")
    # Sendmail's Received header (with its queue id), then the message unchanged
    assert rest.endswith(data.replace(b"\r\n", b"\n"))
    received = rest[: len(rest) - len(data.replace(b"\r\n", b"\n"))]
    assert re.search(rb"by mx\.pwmail\.test .*id [0-9A-Za-z]+", received.replace(b"\n\t", b" "))
    assert not mx["layout"]["127.0.0.3"].path("juan").exists()
    assert wait_for(lambda: mx["mx"].queue_files() == [], timeout=30)
    # both log through /dev/log: Sendmail's verdict, pdelivery's delivery line with the queue id
    qid = re.search(rb"id ([0-9A-Za-z]+)", received.replace(b"\n\t", b" ")).group(1).decode()
    assert wait_for(
        lambda: any(qid in line and "mailer=local" in line and "stat=Sent" in line for line in mx["mx"].syslog.lines),
        timeout=10,
    ), mx["mx"].output()
    assert any("pdelivery[" in line and f"qid={qid} to=juan" in line for line in mx["mx"].syslog.lines)


def test_unknown_user_bounces_with_511(mx):
    box = mx["layout"]["127.0.0.2"].path("ana")
    before = len(messages(box))
    assert smtp_send(mx["mx"], "ana@pwmail.test", ["nadie@pwmail.test"], message("to nobody", "nadie")) == {}
    files = wait_for(lambda: messages(box)[before:], timeout=60)
    assert files, mx["mx"].output()
    dsn = files[0].read_bytes()
    assert b"Final-Recipient: RFC822; nadie@pwmail.test" in dsn and b"Status: 5.1.1" in dsn
    assert b"Action: failed" in dsn
    # Sendmail's $g for the null sender of its bounce is MAILER-DAEMON
    assert dsn.startswith(b"Return-Path: <MAILER-DAEMON>\nDelivered-To: ana\n")
    assert wait_for(lambda: mx["mx"].queue_files() == [], timeout=30)


def test_storage_down_stays_queued_then_delivered_once(mx):
    store = mx["stores"]["127.0.0.3"]
    box = mx["layout"]["127.0.0.3"].path("pepe")
    assert len(messages(box)) == 0
    store.stop()
    try:
        assert smtp_send(mx["mx"], "ana@pwmail.test", ["pepe@pwmail.test"], message("while down", "pepe")) == {}

        def tried():
            qf = mx["mx"].queue_files()
            return qf and re.search(rb"^N[1-9]", qf[0].read_bytes(), re.M)

        assert wait_for(tried, timeout=60), mx["mx"].output()
        assert len(mx["mx"].queue_files()) == 1 and messages(box) == []
    finally:
        mx["stores"]["127.0.0.3"] = store = Pdeliveryd(
            store.root, "127.0.0.3", mx["lmtp_port"], mx["env"], init_root=False
        )
    run = mx["mx"].in_namespace(SENDMAIL, "-q")
    assert run.returncode == 0, run.stderr
    assert wait_for(lambda: mx["mx"].queue_files() == [] and messages(box), timeout=60)
    assert len(messages(box)) == 1
    mx["mx"].in_namespace(SENDMAIL, "-q")  # another queue run changes nothing
    time.sleep(0.5)
    assert len(messages(box)) == 1
    assert messages(box)[0].read_bytes().endswith(message("while down", "pepe").replace(b"\r\n", b"\n"))


def test_lmtp_mailer_gives_per_recipient_status(mx_lmtp):
    """F=z (pdelivery -l): one message to a deliverable, an unknown and a
    deferred user: the first is stored, the second bounced, the third stays
    queued and a queue run delivers it without a second copy for the first."""
    m, layout = mx_lmtp["mx"], mx_lmtp["layout"]
    juan, pepe, ana = (
        layout["127.0.0.2"].path("juan"),
        layout["127.0.0.3"].path("pepe"),
        layout["127.0.0.2"].path("ana"),
    )
    store = mx_lmtp["stores"]["127.0.0.3"]
    store.stop()
    try:
        data = message("three ways", "staff@pwmail.test")
        assert (
            smtp_send(m, "ana@pwmail.test", ["juan@pwmail.test", "nadie@pwmail.test", "pepe@pwmail.test"], data) == {}
        )
        assert wait_for(lambda: messages(juan), timeout=60), m.output()
        bounce = wait_for(lambda: messages(ana), timeout=60)
        assert bounce and b"Status: 5.1.1" in bounce[0].read_bytes()
        assert b"nadie@pwmail.test" in bounce[0].read_bytes()
        assert wait_for(lambda: m.queue_files(), timeout=30)
    finally:
        mx_lmtp["stores"]["127.0.0.3"] = Pdeliveryd(
            store.root, "127.0.0.3", mx_lmtp["lmtp_port"], mx_lmtp["env"], init_root=False
        )
    run = m.in_namespace(SENDMAIL, "-q")
    assert run.returncode == 0, run.stderr
    assert wait_for(lambda: m.queue_files() == [] and messages(pepe), timeout=60)
    assert len(messages(juan)) == 1 and len(messages(pepe)) == 1 and len(messages(ana)) == 1
    assert messages(pepe)[0].read_bytes().endswith(data.replace(b"\r\n", b"\n"))


def test_sendmail_lmtp_straight_to_pdeliveryd(mx_direct):
    """Sendmail's own LMTP client ([IPC] local mailer) talking to pdeliveryd."""
    m, layout = mx_direct["mx"], mx_direct["layout"]["127.0.0.2"]
    data = message("direct lmtp", "juan@pwmail.test")
    assert smtp_send(m, "ana@pwmail.test", ["juan@pwmail.test", "nadie@pwmail.test"], data) == {}
    files = wait_for(lambda: messages(layout.path("juan")), timeout=60)
    assert files, m.output()
    stored = files[0].read_bytes()
    assert stored.startswith(b"Return-Path: <ana@pwmail.test>\nDelivered-To: juan\n")
    assert stored.endswith(data.replace(b"\r\n", b"\n"))
    bounce = wait_for(lambda: messages(layout.path("ana")), timeout=60)
    assert bounce and b"Status: 5.1.1" in bounce[0].read_bytes(), m.output()
    assert wait_for(lambda: m.queue_files() == [], timeout=30)
    assert any("mailer=local" in line and "stat=Sent" in line and "juan@pwmail.test" in line for line in m.syslog.lines)


def test_mailer_flag_p_still_gives_one_return_path(mx_flag_p):
    """Sendmail's F=P Return-Path (seen doubled before, issue 15) is replaced by pdeliveryd's."""
    m, layout = mx_flag_p["mx"], mx_flag_p["layout"]["127.0.0.2"]
    data = message("flag P", "juan@pwmail.test")
    assert smtp_send(m, "ana@pwmail.test", ["juan@pwmail.test"], data) == {}
    files = wait_for(lambda: messages(layout.path("juan")), timeout=60)
    assert len(files) == 1, m.output()
    stored = files[0].read_bytes()
    header = stored.partition(b"\n\n")[0].split(b"\n")
    assert [line for line in header if line.lower().startswith(b"return-path:")] == [b"Return-Path: <ana@pwmail.test>"]
    assert stored.startswith(b"Return-Path: <ana@pwmail.test>\nDelivered-To: juan\nReceived: ")
    assert stored.endswith(data.replace(b"\r\n", b"\n"))


def test_sendmail_through_lmtp_proxy_to_two_stores(mx_proxy):
    """Sendmail's [IPC] LMTP mailer to lmtp-proxy: one message to users on
    both stores and an unknown one: each copy on its user's store, the
    unknown bounced at RCPT (5.1.1)."""
    m, layout = mx_proxy["mx"], mx_proxy["layout"]
    juan, pepe, ana = (
        layout["127.0.0.2"].path("juan"),
        layout["127.0.0.3"].path("pepe"),
        layout["127.0.0.2"].path("ana"),
    )
    data = message("through the proxy", "staff@pwmail.test")
    assert smtp_send(m, "ana@pwmail.test", ["juan@pwmail.test", "pepe@pwmail.test", "nadie@pwmail.test"], data) == {}
    for b in (juan, pepe):
        files = wait_for(lambda: messages(b), timeout=60)
        assert len(files) == 1, m.output()
        stored = files[0].read_bytes()
        assert stored.startswith(b"Return-Path: <ana@pwmail.test>\nDelivered-To: ")
        assert stored.endswith(data.replace(b"\r\n", b"\n"))
    bounce = wait_for(lambda: messages(ana), timeout=60)
    assert bounce and b"Status: 5.1.1" in bounce[0].read_bytes(), m.output()
    assert not layout["127.0.0.3"].path("juan").exists() and not layout["127.0.0.2"].path("pepe").exists()
    assert wait_for(lambda: m.queue_files() == [], timeout=30)


def test_sendmail_queue_run_is_one_proxy_connection(mx_proxy):
    """Proxy down: Sendmail queues; proxy back, one queue run delivers every
    message over one LMTP connection to the proxy, and each exactly once."""
    m, layout = mx_proxy["mx"], mx_proxy["layout"]
    boxes = [layout["127.0.0.2"].path("juan"), layout["127.0.0.3"].path("jo"), layout["127.0.0.3"].path("pepe")]
    before = [len(messages(b)) for b in boxes]
    proxy = mx_proxy["proxy"]
    proxy.stop()
    try:
        for i, to in enumerate(["juan", "jo", "pepe"]):
            assert smtp_send(m, "ana@pwmail.test", [f"{to}@pwmail.test"], message(f"queued {i}", to)) == {}

        def all_tried():
            qf = m.queue_files()
            return len(qf) == 3 and all(re.search(rb"^N[1-9]", q.read_bytes(), re.M) for q in qf)

        assert wait_for(all_tried, timeout=60), m.output()
    finally:
        mx_proxy["proxy"] = proxy = start_proxy(mx_proxy, proxy.port, proxy.unix)
    run = m.in_namespace(SENDMAIL, "-q")
    assert run.returncode == 0, run.stderr
    assert wait_for(lambda: m.queue_files() == [], timeout=60), m.output()
    assert [len(messages(b)) for b in boxes] == [n + 1 for n in before]
    sessions = wait_for(lambda: re.findall(r"session ended after (\d+) message", proxy.output()), timeout=30)
    assert sessions == ["3"], proxy.output()
