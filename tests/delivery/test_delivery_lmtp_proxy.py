"""lmtp-proxy end to end: a real pwserver, two real pdeliveryd stores
(127.0.0.2 holds juan, ana and mudando; 127.0.0.3 holds pepe and jo), the
proxy as a process, and LMTP clients (smtplib.LMTP, raw pipelined sessions)."""

import os
import shutil
import signal
import smtplib
import socket
import subprocess
import time

import pytest

from delivery.lmtpclient import dot_stuff
from tests.support import pwtest
from tests.support.delivery_util import (
    CountingRelay,
    LmtpProxy,
    Pdeliveryd,
    client_conf,
    codes,
    free_port,
    free_port_on,
    lmtp_session,
    messages,
    two_stores,
    wait_for,
)

STORES = ["127.0.0.2", "127.0.0.3"]


def msg(subject: str, size: int = 0) -> bytes:
    head = f"From: a@example.org\r\nSubject: {subject}\r\n\r\n".encode()
    return head + b".dotted first\r\n\xc3\xb1 8bit\r\n" + b"x" * size + (b"\r\n" if size else b"")


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    with two_stores(tmp_path_factory.mktemp("lmtp-proxy"), STORES) as bed:
        yield bed


def restart_store(bed, host: str) -> None:
    old = bed["stores"][host]
    old.stop()
    bed["stores"][host] = Pdeliveryd(old.root, host, bed["port"], bed["env"], init_root=False)


def box(bed, user: str):
    host = "127.0.0.3" if user in ("pepe", "jo") else "127.0.0.2"
    return bed["layout"][host].path(user)


@pytest.fixture
def proxy(bed, tmp_path):
    """A proxy to the stores of `bed`; call it with [delivery] settings."""
    started = []

    def start(conf=None, other_sections="", **settings):
        p = LmtpProxy(
            tmp_path,
            free_port(),
            conf or bed["conf"],
            {"lmtp_port": bed["port"], **settings},
            other_sections=other_sections,
        )
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


def lmtp(p) -> smtplib.LMTP:
    """smtplib's LMTP client, for one recipient per message (its sendmail reads one reply after the data)."""
    return smtplib.LMTP(p.host, p.port, timeout=60)


def transaction(rcpts: list[str], data: bytes, params: str = "") -> bytes:
    """MAIL, RCPTs and DATA (dot-stuffed) of one message, for a pipelined script."""
    return (
        f"MAIL FROM:<s@example.org>{params}\r\n".encode()
        + b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in rcpts)
        + b"DATA\r\n"
        + dot_stuff(data)
    )


def session(p, *transactions: bytes, timeout: float = 60) -> bytes:
    return lmtp_session(p.host, p.port, b"LHLO mx\r\n" + b"".join(transactions) + b"QUIT\r\n", timeout=timeout)


def test_recipients_routed_to_their_stores_in_one_message(bed, proxy):
    p = proxy()
    data = msg("to both stores")
    before = {u: len(messages(box(bed, u))) for u in ("juan", "pepe", "ana")}
    out = session(p, transaction(["juan@example.org", "pepe@example.org", "ana@example.org"], data))
    for ext in (b"PIPELINING", b"8BITMIME", b"ENHANCEDSTATUSCODES", b"SIZE", b"CHUNKING", b"XQUEUEID"):
        assert b"250-" + ext in out or b"250 " + ext in out
    assert codes(out) == ["220", "250", "250", "250", "250", "250", "354", "250", "250", "250", "221"]
    for u in ("juan", "pepe", "ana"):
        files = messages(box(bed, u))
        assert len(files) == before[u] + 1
        stored = files[-1].read_bytes()
        assert stored.startswith(f"Return-Path: <s@example.org>\nDelivered-To: {u}@example.org\n".encode())
        assert stored.endswith(data.replace(b"\r\n", b"\n"))
    # each user only on its own store
    assert not bed["layout"]["127.0.0.3"].path("juan").exists()
    assert not bed["layout"]["127.0.0.2"].path("pepe").exists()


def test_rcpt_answers_unknown_frozen_and_replies_in_order(bed, proxy):
    p = proxy()
    out = session(
        p, transaction(["nadie@example.org", "mudando@example.org", "jo@example.org", "juan@example.org"], msg("order"))
    )
    text = out.decode()
    assert codes(out) == ["220", "250", "250", "550", "450", "250", "250", "354", "250", "250", "221"]
    assert "550 5.1.1" in text and "450 4.2.1" in text
    assert not messages(box(bed, "mudando"))


def test_password_server_down_is_451_443(bed, proxy, tmp_path):
    dead = client_conf(tmp_path / "dead.conf", [f"127.0.0.1:{free_port()}"])
    p = proxy(conf=dead)
    out = lmtp_session(p.host, p.port, b"LHLO mx\r\nMAIL FROM:<s@x>\r\nRCPT TO:<juan@x>\r\nQUIT\r\n")
    assert codes(out) == ["220", "250", "250", "451", "221"]
    assert b"451 4.4.3" in out


def test_placement_rule_when_the_server_names_no_host(bed, proxy, tmp_path):
    """A password server without a mailhosts map answers an empty host: the
    proxy applies [placement] (as pdelivery does)."""
    users = tmp_path / "users"
    users.mkdir()
    (users / "passwd").write_text((bed["d"] / "users" / "passwd").read_text())
    with pwtest.PwServer(users, env={"PWMAIL_CONF": str(tmp_path / "absent.toml")}) as pw:
        conf = client_conf(tmp_path / "pw.conf", [pw.address])
        p = proxy(
            conf=conf, other_sections=f'[placement]\nrule = "ranges"\nranges = ["a-i {STORES[1]}", "j-z {STORES[0]}"]\n'
        )
        ana3, pepe2 = bed["layout"]["127.0.0.3"].path("ana"), bed["layout"]["127.0.0.2"].path("pepe")
        n_ana3, n_pepe2 = len(messages(ana3)), len(messages(pepe2))
        out = session(p, transaction(["ana@x", "pepe@x"], msg("placed")))
    assert codes(out) == ["220", "250", "250", "250", "250", "354", "250", "250", "221"]
    assert len(messages(ana3)) == n_ana3 + 1 and len(messages(pepe2)) == n_pepe2 + 1


def test_store_down_defers_only_its_recipients_then_retry_delivers_once(bed, proxy):
    p = proxy(connect_timeout=2.0)
    data = msg("store down")
    juan, pepe = box(bed, "juan"), box(bed, "pepe")
    n_juan, n_pepe = len(messages(juan)), len(messages(pepe))
    bed["stores"]["127.0.0.3"].stop()
    try:
        out = session(p, transaction(["juan@x", "pepe@x"], data, " XQUEUEID=q1down"))
        assert codes(out) == ["220", "250", "250", "250", "250", "354", "250", "451", "221"]
        assert b"451 4.4.1" in out
        assert len(messages(juan)) == n_juan + 1 and len(messages(pepe)) == n_pepe
    finally:
        restart_store(bed, "127.0.0.3")
    # the MTA retries the deferred recipient only
    for _ in range(2):
        out = session(p, transaction(["pepe@x"], data, " XQUEUEID=q1down"))
        assert codes(out) == ["220", "250", "250", "250", "354", "250", "221"]
    assert len(messages(pepe)) == n_pepe + 1 and len(messages(juan)) == n_juan + 1


def test_slow_store_times_out_with_451_and_the_other_store_delivers(bed, proxy):
    p = proxy(timeout=2.0)
    slow = bed["stores"]["127.0.0.3"]
    n_jo, n_ana = len(messages(box(bed, "jo"))), len(messages(box(bed, "ana")))
    slow.signal(signal.SIGSTOP)
    try:
        out = session(p, transaction(["jo@x", "ana@x"], msg("slow store")))
    finally:
        slow.signal(signal.SIGCONT)
    assert codes(out) == ["220", "250", "250", "250", "250", "354", "451", "250", "221"]
    assert b"451 4.4.1" in out
    assert len(messages(box(bed, "ana"))) == n_ana + 1
    time.sleep(1)  # the store, running again, stores nothing late
    assert len(messages(box(bed, "jo"))) == n_jo


def test_pipelined_transactions_reuse_pooled_connections(bed, proxy):
    relay_port = free_port_on(STORES)
    relays = {h: CountingRelay((h, relay_port), (h, bed["port"])) for h in STORES}
    try:
        p = proxy(lmtp_port=relay_port)
        n = 20
        n_juan, n_jo = len(messages(box(bed, "juan"))), len(messages(box(bed, "jo")))
        out = session(p, *(transaction(["juan@x", "jo@x"], msg(f"pooled {i}")) for i in range(n)))
        assert codes(out) == ["220", "250"] + ["250", "250", "250", "354", "250", "250"] * n + ["221"]
        # a second session of the MTA uses the same store connections
        assert codes(session(p, transaction(["juan@x", "jo@x"], msg("second session"))))[-3:] == ["250", "250", "221"]
        assert len(messages(box(bed, "juan"))) == n_juan + n + 1 and len(messages(box(bed, "jo"))) == n_jo + n + 1
        assert {h: r.accepted for h, r in relays.items()} == {h: 1 for h in STORES}
        # the store closes the pooled connection (a restart): the next transaction opens a new one
        restart_store(bed, "127.0.0.2")
        assert codes(session(p, transaction(["juan@x", "jo@x"], msg("after restart"))))[-3:] == ["250", "250", "221"]
        assert len(messages(box(bed, "juan"))) == n_juan + n + 2
        assert relays["127.0.0.2"].accepted == 2 and relays["127.0.0.3"].accepted == 1
    finally:
        for r in relays.values():
            r.close()


def test_connections_to_a_store_are_bounded(bed, proxy):
    """proxy_store_connections_max = 1: a second transaction for a busy store
    waits for the connection instead of opening another; both are delivered."""
    relay_port = free_port_on(STORES)
    relay = CountingRelay(("127.0.0.2", relay_port), ("127.0.0.2", bed["port"]))
    store = bed["stores"]["127.0.0.2"]
    p = proxy(lmtp_port=relay_port, proxy_store_connections_max=1, timeout=60.0)
    n = len(messages(box(bed, "ana")))
    clients = []
    store.signal(signal.SIGSTOP)  # the first transaction holds its connection
    try:
        for i in range(2):
            c = socket.create_connection((p.host, p.port), timeout=60)
            c.sendall(b"LHLO mx\r\n" + transaction(["ana@x"], msg(f"bounded {i}")) + b"QUIT\r\n")
            clients.append(c)
        assert wait_for(lambda: relay.accepted >= 1, timeout=30)
        time.sleep(1)  # room for a second connection, were there no bound
    finally:
        store.signal(signal.SIGCONT)
    outs = []
    for c in clients:
        out = b""
        while chunk := c.recv(65536):
            out += chunk
        c.close()
        outs.append(out)
    relay.close()
    assert [codes(o) for o in outs] == [["220", "250", "250", "250", "354", "250", "221"]] * 2
    assert relay.accepted == 1
    assert len(messages(box(bed, "ana"))) == n + 2


def test_large_message_streamed_with_bounded_memory(bed, proxy, tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    p = proxy(proxy_spool_dir=str(spool))
    size = 50 * 2**20 - 64 * 1024
    line = b"y" * 998 + b"\r\n"
    body = b"From: a@x\r\nSubject: big\r\n\r\n" + line * ((size - 32) // len(line))
    base = p.rss_peak_kib()
    out = lmtp_session(
        p.host,
        p.port,
        b"LHLO mx\r\nMAIL FROM:<s@x>\r\nRCPT TO:<ana@x>\r\nRCPT TO:<pepe@x>\r\n"
        + b"BDAT %d LAST\r\n" % len(body)
        + body
        + b"QUIT\r\n",
        timeout=120,
    )
    assert codes(out) == ["220", "250", "250", "250", "250", "250", "250", "221"]
    growth = p.rss_peak_kib() - base
    assert growth < 20 * 1024, f"proxy peak RSS grew {growth} KiB for a {len(body) >> 20} MiB message"
    for u in ("ana", "pepe"):
        stored = messages(box(bed, u))[-1]
        assert stored.stat().st_size > len(body) - body.count(b"\r\n")
        assert stored.read_bytes().endswith(body[-5000:].replace(b"\r\n", b"\n"))
    assert list(spool.iterdir()) == []  # unnamed spool files: nothing left


def test_slow_client_cut_by_data_timeout(bed, proxy):
    p = proxy(data_timeout=2.0, idle_timeout=30.0)
    n = len(messages(box(bed, "juan")))
    with socket.create_connection((p.host, p.port), timeout=30) as s:
        s.sendall(b"LHLO mx\r\nMAIL FROM:<s@x>\r\nRCPT TO:<juan@x>\r\nDATA\r\nSubject: slow\r\n\r\n")
        got = b""
        deadline = time.monotonic() + 20
        while b"421" not in got and time.monotonic() < deadline:
            try:
                s.sendall(b"z")  # a byte now and then keeps the idle clock happy
                s.settimeout(0.5)
                chunk = s.recv(4096)
                if not chunk:
                    break
                got += chunk
            except TimeoutError:
                pass
            except OSError:
                break
    assert b"421 4.4.2" in got
    assert len(messages(box(bed, "juan"))) == n


def test_sigterm_lets_an_open_transaction_finish_and_sighup_reloads(bed, proxy):
    p = proxy(message_size_max=1000)
    assert b"250-SIZE 1000\r\n" in lmtp_session(p.host, p.port, b"LHLO a\r\nQUIT\r\n")
    p.write_settings({"lmtp_port": bed["port"], "message_size_max": 100000})
    p.signal(signal.SIGHUP)
    assert wait_for(lambda: "reloaded settings" in p.output())
    assert b"250-SIZE 100000\r\n" in lmtp_session(p.host, p.port, b"LHLO a\r\nQUIT\r\n")
    n = len(messages(box(bed, "juan")))
    with socket.create_connection((p.host, p.port), timeout=30) as s:
        s.sendall(b"LHLO mx\r\nMAIL FROM:<s@x>\r\nRCPT TO:<juan@x>\r\nDATA\r\n")
        got = b""
        while b"354 " not in got:
            got += s.recv(4096)
        p.signal(signal.SIGTERM)
        assert wait_for(lambda: "stopping" in p.output())
        s.sendall(msg("during shutdown") + b".\r\n")
        rest = b""
        while chunk := s.recv(4096):
            rest += chunk
    assert rest.startswith(b"250 ") and b"421 4.3.2" in rest
    assert p.proc.wait(20) == 0
    assert len(messages(box(bed, "juan"))) == n + 1
    with pytest.raises(OSError):
        socket.create_connection((p.host, p.port), timeout=1)


def test_unix_socket(bed, tmp_path):
    path = tmp_path / "lmtp.sock"
    with LmtpProxy(tmp_path, free_port(), bed["conf"], {"lmtp_port": bed["port"]}, unix=path) as p:
        assert os.stat(path).st_mode & 0o777 == 0o660
        n = len(messages(box(bed, "jo")))
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(str(path))
            s.sendall(b"LHLO mx\r\nMAIL FROM:<s@x>\r\nRCPT TO:<jo@x>\r\nBDAT 4 LAST\r\nab\r\nQUIT\r\n")
            out = b""
            while chunk := s.recv(4096):
                out += chunk
        assert codes(out) == ["220", "250", "250", "250", "250", "221"], out
        assert len(messages(box(bed, "jo"))) == n + 1
        p.stop()
    assert not path.exists()


def test_dsn_parameters_of_dovecots_proxy_passed_on_to_the_store(bed, proxy):
    """The RCPT Dovecot's LMTP proxy sends (ORCPT always), and RET/ENVID:
    lmtp-proxy announces DSN, accepts them and gives them to pdeliveryd,
    which announces DSN too and logs the ORCPT."""
    p = proxy()
    n = len(messages(box(bed, "juan")))
    out = lmtp_session(
        p.host,
        p.port,
        b"LHLO mx\r\nMAIL FROM:<s@example.org> RET=HDRS ENVID=env+2B1\r\n"
        b"RCPT TO:<juan@example.org> ORCPT=rfc822;juan@example.org\r\n"
        b"DATA\r\nSubject: dsn through the proxy\r\n\r\nx\r\n.\r\nQUIT\r\n",
    )
    assert b"250-DSN\r\n" in out
    assert codes(out) == ["220", "250", "250", "250", "354", "250", "221"], out
    assert len(messages(box(bed, "juan"))) == n + 1
    bed["stores"]["127.0.0.2"].wait_line(r"delivered qid=- to=juan .* orcpt=rfc822;juan@example\.org", "orcpt", 10)


@pytest.mark.skipif(not shutil.which("swaks"), reason="swaks not installed (deps/debian-packages.txt)")
def test_swaks_as_a_second_lmtp_client(bed, proxy):
    """swaks (another LMTP client than smtplib's): one message to users on
    both stores and an unknown one, one reply per accepted recipient."""
    p = proxy()
    n_jo, n_ana = len(messages(box(bed, "jo"))), len(messages(box(bed, "ana")))
    r = subprocess.run(
        [
            "swaks",
            "--protocol",
            "LMTP",
            "--server",
            f"{p.host}:{p.port}",
            "--from",
            "s@example.org",
            "--to",
            "jo@example.org,nadie@example.org,ana@example.org",
            "--header",
            "Subject: via swaks",
            "--body",
            ".dotted line from swaks",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    replies = [line for line in r.stdout.splitlines() if line.startswith("<")]
    assert any("550 5.1.1" in line for line in replies), r.stdout
    # after the data: one reply per accepted recipient, in RCPT order
    after_data = [line.split()[1:4] for line in replies if " delivered " in line]
    assert after_data == [["250", "2.0.0", "jo"], ["250", "2.0.0", "ana"]], r.stdout
    assert len(messages(box(bed, "jo"))) == n_jo + 1 and len(messages(box(bed, "ana"))) == n_ana + 1
    stored = messages(box(bed, "ana"))[-1].read_bytes()
    assert b"Subject: via swaks\n" in stored and b"\n.dotted line from swaks\n" in stored
