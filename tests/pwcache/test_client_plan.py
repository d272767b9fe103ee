"""The client's server-choice plan (sans-I/O), its configuration reader and
the shared health record."""

import os

import pytest

from pwcache import config
from pwcache.client import QueryPlan
from pwcache.health import HealthRecord

A, B, C = ("10.0.0.1", 7773), ("10.0.0.2", 7773), ("10.0.0.3", 7773)


def plan(servers=(A, B, C), health=None, timeout=2.0, hedge=0.05):
    return QueryPlan(list(servers), health or HealthRecord(None), timeout, hedge, now=100.0)


def test_first_server_at_once_then_hedges_one_by_one():
    p = plan()
    assert p.due(100.0) == [A]
    assert p.due(100.01) == []
    assert p.wait(100.01) == pytest.approx(0.04)
    assert p.due(100.05) == [B]
    assert p.due(100.10) == [C]
    assert p.due(100.15) == []
    # the last try ends timeout seconds after it was sent
    assert p.wait(102.11) is None


def test_lost_datagrams_are_sent_again_at_doubling_intervals():
    p = plan(servers=(A,), timeout=2.0)
    assert p.due(100.0) == [A]
    assert p.wait(100.0) == pytest.approx(0.2)
    assert p.due(100.2) == [A]
    assert p.wait(100.2) == pytest.approx(0.4)
    assert p.due(100.5) == []
    assert p.due(100.61) == [A]
    assert p.due(101.42) == [A]
    assert p.wait(101.42) == pytest.approx(0.58)  # the try's end comes first
    assert p.due(101.99) == []
    assert p.wait(102.0) is None


def test_a_failed_server_skips_the_hedge_delay():
    p = plan()
    p.due(100.0)
    p.failure(A)
    assert p.wait(100.001) == 0.0
    assert p.due(100.001) == [B]


def test_no_answer_marks_every_asked_server_down(tmp_path):
    h = HealthRecord(str(tmp_path / "health"), recheck_s=5)
    p = plan(servers=(A, B), health=h)
    p.due(100.0)
    p.due(100.05)
    p.settle(h, None)
    assert h.is_down("10.0.0.1:7773") and h.is_down("10.0.0.2:7773")


def test_winner_after_hedge_marks_only_earlier_servers_down(tmp_path):
    h = HealthRecord(str(tmp_path / "health"), recheck_s=5)
    p = plan(health=h)
    p.due(100.0)
    p.due(100.05)
    p.settle(h, B)
    assert h.is_down("10.0.0.1:7773")
    assert not h.is_down("10.0.0.2:7773")
    # the next plan, in another process, starts with the live server
    other = HealthRecord(str(tmp_path / "health"), recheck_s=5)
    assert plan(health=other).order == [B, C, A]


def test_dead_server_is_retried_after_recheck(tmp_path):
    h = HealthRecord(str(tmp_path / "health"), recheck_s=5)
    h.mark_down("10.0.0.1:7773", now=0)  # long ago
    assert plan(health=h).order[0] == A


def test_answer_from_a_down_server_marks_it_up(tmp_path):
    h = HealthRecord(str(tmp_path / "health"), recheck_s=5)
    h.mark_down("10.0.0.1:7773")
    p = plan(servers=(A,), health=h)
    p.due(100.0)
    p.settle(h, A)
    assert not h.is_down("10.0.0.1:7773")
    assert "10.0.0.1" not in (tmp_path / "health").read_text()


def test_health_file_is_atomic_and_world_readable(tmp_path):
    path = tmp_path / "run" / "health"
    h = HealthRecord(str(path), recheck_s=5)
    h.mark_down("[::1]:7773")
    assert oct(os.stat(path).st_mode & 0o777) == "0o644"
    text = path.read_text()
    assert text.startswith("down [::1]:7773 ")
    assert not [f for f in os.listdir(path.parent) if f.startswith(".health.")]


def test_unwritable_health_file_keeps_the_record_in_process(tmp_path):
    h = HealthRecord("/proc/no/such/dir/health", recheck_s=5)
    h.mark_down("10.0.0.1:7773")
    assert h.is_down("10.0.0.1:7773")


def test_config_parsing():
    cfg = config.parse("""
# comment
server 10.0.0.1:7000
server [::1]:7001   # trailing comment
server pw2
timeout_ms 500
hedge_ms 20
keyfile /etc/pwserver.key
shadow_keyfile /etc/pwserver.shadow.key
enumerate yes
""")
    assert cfg.servers == [("10.0.0.1", 7000), ("::1", 7001), ("pw2", 7773)]
    assert (cfg.timeout_ms, cfg.hedge_ms, cfg.enumerate) == (500, 20, True)
    assert cfg.keyfile == "/etc/pwserver.key"
    assert config.parse("").servers == [("127.0.0.1", 7773)]


@pytest.mark.parametrize(
    "text",
    [
        "server",
        "server host:99999",
        "timeout_ms x",
        "bogus 1",
        "enumerate maybe",
        "hedge_ms -1",
        "\n".join(f"server h{i}" for i in range(9)),
    ],
)
def test_config_errors_name_the_line(text):
    with pytest.raises(config.ConfigError, match="<config>:"):
        config.parse(text)


def test_config_from_env(tmp_path, monkeypatch):
    f = tmp_path / "pw.conf"
    f.write_text("server 127.0.0.9:1234\n")
    monkeypatch.setenv("PWSERVER_CONF", str(f))
    assert config.load().servers == [("127.0.0.9", 1234)]
    monkeypatch.setenv("PWSERVER_CONF", str(tmp_path / "missing"))
    assert config.load().servers == [("127.0.0.1", 7773)]
