"""Every daemon's Prometheus metrics (`metrics_listen`, pwmail/base/metrics.py;
docs/operations.md, "Metrics"): each is started with metrics on a port the
kernel picks, does real work, and its counters move by exactly that work."""

from __future__ import annotations

import os
import poplib
import re
import socket
import subprocess
import sys
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from delivery.maildir import ROOT_MARKER
from tests.support import imap_util, pop_util, pwtest
from tests.support.delivery_util import LmtpProxy, Pdeliveryd, codes, free_port_on, lmtp_session, users_served
from tests.support.pwserver_util import passwd_line, udp_exchange, udp_query

pytestmark = pytest.mark.slow

METRICS = re.compile(r"(\S+): metrics on (\S+):(\d+)")
ANY_PORT = "127.0.0.1:0"


def metrics_address(process: pwtest.Process, name: str) -> tuple[str, int]:
    """Where the daemon serves its metrics: its "NAME: metrics on HOST:PORT" line."""
    m = process.wait_line(rf"{re.escape(name)}: metrics on (\S+):(\d+)", f"{name}'s metrics")
    return m.group(1), int(m.group(2))


def scrape(address: tuple[str, int]) -> dict[tuple, float]:
    """{(sample name, ((label, value), ...)): value} of one scrape, parsed as Prometheus does."""
    with urllib.request.urlopen(f"http://{address[0]}:{address[1]}/metrics", timeout=20) as r:
        assert r.status == 200
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def moved(before: dict, after: dict) -> dict[tuple, float]:
    """The daemon's samples whose value changed, and by how much (not the process_* ones: memory, CPU)."""
    return {
        k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0) and not k[0].startswith("process_")
    }


def key(name: str, **labels) -> tuple:
    return (name, tuple(sorted(labels.items())))


def settings_file(tmp_path, text: str):
    path = tmp_path / "pwmail.toml"
    path.write_text(text)
    return path


# ---- pwserver ---------------------------------------------------------------------------


def test_pwserver_counts_lookups_by_result_and_reloads(tmp_path):
    users = tmp_path / "users"
    users.mkdir()
    (users / "passwd").write_text(passwd_line("ana", 3001) + passwd_line("bruno", 3002))
    conf = settings_file(tmp_path, f'[pwserver]\nmetrics_listen = "{ANY_PORT}"\n')
    with pwtest.PwServer(users, env={"PWMAIL_CONF": str(conf)}) as pws:
        address = metrics_address(pws, "pwserver")
        before = scrape(address)
        assert before[key("pwserver_generation")] == 1
        assert before[key("pwserver_users")] == 2
        assert before[key("process_resident_memory_bytes")] > 0 and before[key("process_open_fds")] > 0
        for name in ("ana", "bruno", "ana"):
            assert udp_query(pws.addr, "passwd", name)[2] == 0
        for name in ("nobody", "nadie"):
            assert udp_query(pws.addr, "passwd", name)[2] == 1
        assert udp_query(pws.addr, "shadow", "ana")[2] == 3  # unsealed: denied
        assert udp_exchange(pws.addr, b"\x00garbage", timeout=0.5) is None  # dropped
        assert moved(before, scrape(address)) == {
            key("pwserver_requests_total"): 7,
            key("pwserver_lookups_total", result="ok"): 3,
            key("pwserver_lookups_total", result="notfound"): 2,
            key("pwserver_lookups_total", result="denied"): 1,
            key("pwserver_dropped_total", reason="bad_packet"): 1,
        }

        # a source replaced (atomically, as docs/operations.md says): the poll reloads it once
        replace(users / "passwd", passwd_line("ana", 3001) + passwd_line("bruno", 3002) + passwd_line("c", 3003))
        after = pwtest.wait_for(
            lambda: (s := scrape(address))[key("pwserver_generation")] == 2 and s, describe=pws.output
        )
        assert after[key("pwserver_users")] == 3
        assert after[key("pwserver_reloads_total")] == 1
        assert after[key("pwserver_reloads_refused_total")] == 0
        assert after[key("pwserver_loaded_timestamp_seconds")] >= before[key("pwserver_loaded_timestamp_seconds")]
        replace(users / "passwd", "")  # emptied: the reload guard refuses it
        refused = pwtest.wait_for(
            lambda: (s := scrape(address))[key("pwserver_reloads_refused_total")] == 1 and s, describe=pws.output
        )
        assert refused[key("pwserver_generation")] == 2 and refused[key("pwserver_users")] == 3


def replace(path, text: str) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_pwserver_without_metrics_does_not_load_the_exporter():
    # the 1M-user memory budget (tests/pwcache) holds because nothing of it is imported unless asked
    exporter = ("prometheus_client", "pwmail.base.metrics")
    code = f"import sys, pwcache.server; sys.exit(any(m in sys.modules for m in {exporter!r}))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_a_busy_metrics_address_is_one_line_and_exit_78(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        users = tmp_path / "users"
        users.mkdir()
        (users / "passwd").write_text(passwd_line("ana", 3001))
        conf = settings_file(tmp_path, f'[pwserver]\nmetrics_listen = "127.0.0.1:{port}"\n')
        r = subprocess.run(
            [str(pwtest.BIN / "pwserver"), "--listen", ANY_PORT, "--passwd", str(users / "passwd"), "--log-stderr"],
            env={**os.environ, "PWMAIL_CONF": str(conf)},
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert r.returncode == 78
    assert f"pwserver: cannot listen on 127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "section, key_, prog",
    [
        ("pwserver", "metrics_listen", "pwserver"),
        ("delivery", "metrics_listen", "pdeliveryd"),
        ("pop", "pop3d_metrics_listen", "pop3d"),
    ],
)
def test_a_bad_metrics_address_names_the_key(tmp_path, section, key_, prog):
    conf = settings_file(tmp_path, f'[{section}]\n{key_} = "127.0.0.1:99999"\n')
    r = subprocess.run(
        [str(pwtest.BIN / prog), "--log-stderr"],
        env={**os.environ, "PWMAIL_CONF": str(conf)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 78
    assert f"[{section}] {key_} = '127.0.0.1:99999'" in r.stderr


# ---- pdeliveryd and lmtp-proxy --------------------------------------------------------

STORE = "127.0.0.2"
LOOPED = b"Delivered-To: JUAN@other.example\r\nSubject: l\r\n\r\nx\r\n"


def transaction(rcpts: list[str], data: bytes, params: str = "") -> bytes:
    return (
        f"MAIL FROM:<s@example.org>{params}\r\n".encode()
        + b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in rcpts)
        + b"DATA\r\n"
        + data
        + b".\r\n"
    )


def open_data(host: str, port: int, body: bytes) -> socket.socket:
    """A session left in the middle of a message's data (`body` sent of it)."""
    s = socket.create_connection((host, port), timeout=20)
    s.sendall(b"LHLO mx\r\nMAIL FROM:<s@x>\r\nRCPT TO:<juan@x>\r\nDATA\r\n" + body)
    return s


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("metrics-delivery")
    with users_served(d) as (_, conf, env):
        yield d, conf, env


def test_pdeliveryd_counts_deliveries_by_class_latency_sessions_and_duplicates(served, tmp_path):
    d, _, env = served
    port = free_port_on([STORE])
    conf = settings_file(tmp_path, f'[delivery]\nmetrics_listen = "{ANY_PORT}"\n')
    root = tmp_path / "root"
    with Pdeliveryd(root, STORE, port, {**env, "PWMAIL_CONF": str(conf)}) as store:
        address = metrics_address(store, "pdeliveryd")
        before = scrape(address)
        once = transaction(["juan@x", "ana@x"], b"Subject: m\r\n\r\nsame\r\n", " XQUEUEID=4AU0Q1a")
        out = lmtp_session(STORE, port, b"LHLO mx\r\n" + once + once + transaction(["juan@x"], LOOPED) + b"QUIT\r\n")
        assert codes(out).count("550") == 1 and codes(out)[-2:] == ["550", "221"]
        (root / ROOT_MARKER).unlink()  # unmounted: a new mailbox is deferred
        out = lmtp_session(
            STORE, port, b"LHLO mx\r\n" + transaction(["jo@x"], b"Subject: t\r\n\r\nx\r\n") + b"QUIT\r\n"
        )
        assert codes(out)[-2:] == ["451", "221"]
        after = pwtest.wait_for(lambda: (s := scrape(address))[key("lmtp_sessions_open")] == 0 and s)
        changed = moved(before, after)
        assert changed.pop(key("lmtp_delivery_seconds_sum")) > 0
        buckets = [changed.pop(k, 0) for k in sorted(bucket_keys(after), key=lambda k: float(dict(k[1])["le"]))]
        assert buckets == sorted(buckets) and buckets[-1] == 4  # cumulative, +Inf last: the four messages
        assert changed == {
            key("lmtp_deliveries_total", **{"class": "2xx"}): 4,  # one per recipient, the duplicates too
            key("lmtp_deliveries_total", **{"class": "4xx"}): 1,
            key("lmtp_deliveries_total", **{"class": "5xx"}): 1,
            key("lmtp_delivery_seconds_count"): 4,
            key("lmtp_dedup_entries"): 2,
            key("lmtp_dedup_hits_total"): 2,
        }

        half = b"Subject: half\r\n\r\n" + b"x" * 998 + b"\r\n"
        with open_data(STORE, port, half) as s:
            pwtest.read_reply(s)
            # all of it but the last CRLF, held until the next line shows it does not end the data
            during = pwtest.wait_for(
                lambda: (m := scrape(address))[key("lmtp_spool_bytes")] == len(half) - 2 and m,
                describe=lambda: str(scrape(address)[key("lmtp_spool_bytes")]),
            )
            assert during[key("lmtp_sessions_open")] == 1
        pwtest.wait_for(lambda: scrape(address)[key("lmtp_sessions_open")] == 0)


def bucket_keys(samples: dict) -> list[tuple]:
    return [k for k in samples if k[0] == "lmtp_delivery_seconds_bucket"]


def test_lmtp_proxy_counts_the_stores_replies(served, tmp_path):
    d, conf, env = served
    port = free_port_on([STORE])
    with Pdeliveryd(tmp_path / "root", STORE, port, env):
        settings = {"lmtp_port": port, "proxy_metrics_listen": ANY_PORT}
        with LmtpProxy(tmp_path / "proxy", pwtest.free_port(), conf, settings) as proxy:
            address = metrics_address(proxy, "lmtp-proxy")
            before = scrape(address)
            script = transaction(["juan@x", "ana@x"], b"Subject: p\r\n\r\nx\r\n") + transaction(["juan@x"], LOOPED)
            out = lmtp_session(proxy.host, proxy.port, b"LHLO mx\r\n" + script + b"QUIT\r\n")
            assert codes(out).count("550") == 1 and codes(out)[-2:] == ["550", "221"]
            after = pwtest.wait_for(lambda: (s := scrape(address))[key("lmtp_sessions_open")] == 0 and s)
            changed = moved(before, after)
            assert {
                k: v for k, v in changed.items() if k[0] in ("lmtp_deliveries_total", "lmtp_delivery_seconds_count")
            } == {
                key("lmtp_deliveries_total", **{"class": "2xx"}): 2,
                key("lmtp_deliveries_total", **{"class": "5xx"}): 1,
                key("lmtp_delivery_seconds_count"): 2,
            }
            assert key("lmtp_dedup_entries") not in after  # the proxy keeps no duplicate table
            # both messages over one connection to the store, kept idle after them
            store = f"{STORE}:{port}"
            assert {k: v for k, v in after.items() if k[0].startswith("lmtp_proxy_store_")} == {
                key("lmtp_proxy_store_transactions", store=store): 0,
                key("lmtp_proxy_store_waiting", store=store): 0,
                key("lmtp_proxy_store_idle_connections", store=store): 1,
                key("lmtp_proxy_store_connections_opened_total", store=store): 1,
            }
            assert after[key("lmtp_messages_delivering")] == 0


# ---- pop3d, pop-proxy, imap-proxy -------------------------------------------------------

POP_USERS = {"ana": ("ana-secret", "store1"), "lost": ("lost-pw", "deadstore"), "eve": ("eve-pw", "store1")}


@pytest.fixture(scope="module")
def pop_bed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("metrics-pop")
    with pop_util.users_pwserver(tmp, POP_USERS) as conf:
        pop_util.make_root(tmp / "store1")
        yield tmp, conf


def pop_login(address, user: str, password: str) -> str:
    """USER/PASS; the answer to PASS (+OK or -ERR ...)."""
    p = poplib.POP3(*address, timeout=30)
    try:
        p.user(user)
        try:
            answer = p.pass_(password).decode()
        except poplib.error_proto as e:
            answer = e.args[0].decode()
        p.quit()
    finally:
        p.close()
    return answer


def test_pop3d_counts_logins_by_result_and_sessions(pop_bed):
    tmp, conf = pop_bed
    settings = f'pop3d_metrics_listen = "{ANY_PORT}"\npop3d_failure_delay = 0.1\n'
    with pop_util.start_pop3d(tmp, tmp / "store1", conf, settings=settings) as pop3d:
        address = metrics_address(pop3d, "pop3d")
        before = scrape(address)
        assert pop_login(pop3d.address, "ana", "ana-secret").startswith("+OK")
        assert pop_login(pop3d.address, "ana", "wrong").startswith("-ERR")
        assert pop_login(pop3d.address, "nobody", "x").startswith("-ERR")
        with socket.create_connection(pop3d.address, timeout=30) as s:
            pwtest.read_reply(s)  # the greeting: the session is open
            during = pwtest.wait_for(lambda: (s := scrape(address))[key("pop3d_sessions_open")] == 1 and s)
        assert moved(before, during) == {
            key("pop3d_logins_total", result="ok"): 1,
            key("pop3d_logins_total", result="failed"): 2,
            key("pop3d_sessions_open"): 1,
        }


PROXY_SETTINGS = (
    "auth_failure_delay = 0.1\nthrottle_user_failures = 2\nthrottle_ip_failures = 1000\n"
    "backend_retries = 0\nbackend_connect_timeout = 1.0\n"
)


@pytest.mark.parametrize("engine", [True, False])
def test_pop_proxy_counts_logins_throttled_backend_failures_and_bytes(pop_bed, engine):
    tmp, conf = pop_bed
    with pop_util.start_pop3d(tmp, tmp / "store1", conf, host="127.0.0.2", trusted=["127.0.0.0/8"]) as store:
        backends = f'backends = {{ store1 = "127.0.0.2:{store.port}", deadstore = "127.0.0.1:{pwtest.free_port()}" }}\n'
        settings = f'metrics_listen = "{ANY_PORT}"\nengine = {str(engine).lower()}\n' + PROXY_SETTINGS + backends
        with pop_util.start_proxy(tmp, conf, settings, name=f"proxy-{engine}") as proxy:
            address = metrics_address(proxy, "proxy")
            before = scrape(address)
            assert pop_login(proxy.address, "ana", "ana-secret").startswith("+OK")
            for _ in range(2):
                assert pop_login(proxy.address, "eve", "wrong").startswith("-ERR [AUTH]")
            assert pop_login(proxy.address, "eve", "wrong").startswith("-ERR")  # the third: throttled
            assert pop_login(proxy.address, "lost", "lost-pw").startswith("-ERR [SYS/TEMP]")
            after = pwtest.wait_for(lambda: (s := scrape(address))[key("proxy_sessions_open")] == 0 and s)
            changed = moved(before, after)
            assert {k: v for k, v in changed.items() if k[0] == "proxy_logins_total"} == {
                key("proxy_logins_total", result="ok"): 1,
                key("proxy_logins_total", result="failed"): 2,
                key("proxy_logins_total", result="throttled"): 1,
                key("proxy_logins_total", result="backend_down"): 1,
            }
            assert changed[key("proxy_connections_total")] == 5
            relayed = {k: v for k, v in changed.items() if k[0] == "proxy_relayed_bytes_total"}
            if engine:  # the C engine relays in the kernel and counts no bytes (docs/operations.md)
                assert relayed == {}
            else:  # the relayed session's QUIT up and the backend's answer down, counted as it ended
                assert relayed[key("proxy_relayed_bytes_total", direction="up")] == len(b"QUIT\r\n")
                assert relayed[key("proxy_relayed_bytes_total", direction="down")] > 0


def test_imap_proxy_counts_logins_throttled_and_backend_failures(pop_bed):
    tmp, conf = pop_bed
    backends = (
        f'backends = {{ store1 = "127.0.0.1:{pwtest.free_port()}", deadstore = "127.0.0.1:{pwtest.free_port()}" }}\n'
    )
    settings = f'metrics_listen = "{ANY_PORT}"\n' + PROXY_SETTINGS + backends
    with imap_util.start_imap_proxy(tmp, conf, settings) as proxy:
        address = metrics_address(proxy, "imap-proxy")
        before = scrape(address)
        logins = [("nobody", "x"), ("nobody", "x"), ("nobody", "x"), ("lost", "lost-pw")]  # the third: throttled
        answers = [imap_login(proxy.address, user, pw) for user, pw in logins]
        assert [a.split()[1] for a in answers] == ["NO"] * 4
        assert "[AUTHENTICATIONFAILED]" in answers[0] and "[UNAVAILABLE]" in answers[3]
        after = pwtest.wait_for(lambda: (s := scrape(address))[key("proxy_sessions_open")] == 0 and s)
        assert {k: v for k, v in moved(before, after).items() if k[0] == "proxy_logins_total"} == {
            key("proxy_logins_total", result="failed"): 2,
            key("proxy_logins_total", result="throttled"): 1,
            key("proxy_logins_total", result="backend_down"): 1,
        }


def imap_login(address, user: str, password: str) -> str:
    """One LOGIN on a fresh connection; the tagged answer line."""
    with socket.create_connection(address, timeout=30) as s:
        f = s.makefile("rwb")
        f.readline()  # greeting
        f.write(f'a1 LOGIN "{user}" "{password}"\r\n'.encode())
        f.flush()
        while not (line := f.readline().decode()).startswith("a1 "):
            assert line, "connection closed"
        return line.strip()
