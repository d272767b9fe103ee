"""pdelivery end to end: real pwserver, real pdeliveryd on two storage
addresses (127.0.0.2, 127.0.0.3) sharing one LMTP port, sysexits only."""
import subprocess

import pytest

from tests.support import pwtest
from delivery.layout import MailboxLayout
from tests.support.delivery_util import Pdeliveryd, client_conf, codes, env_with, free_port_on, messages, write_users

STORES = ["127.0.0.2", "127.0.0.3"]
MSG = b"From: a@example.org\nSubject: via pdelivery\n\nhello\n.\n..two dots\n"


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    d = tmp_path_factory.mktemp("pdelivery")
    users = write_users(d / "users")
    port = free_port_on(STORES)
    settings = d / "pwmail.toml"
    settings.write_text(f"[delivery]\nlmtp_port = {port}\nconnect_timeout = 2.0\n")
    with pwtest.PwServer(users) as pw:
        conf = client_conf(d / "pwserver.conf", [pw.address])
        env = env_with(conf, settings)
        b = {"d": d, "env": env, "port": port, "conf": conf, "settings": settings,
             "l2": MailboxLayout(d / "store2"), "l3": MailboxLayout(d / "store3")}
        try:
            b["s2"] = Pdeliveryd(d / "store2", STORES[0], port, env)
            b["s3"] = Pdeliveryd(d / "store3", STORES[1], port, env)
            yield b
        finally:
            for key in ("s2", "s3"):          # the current ones: a test may have restarted them
                if key in b:
                    b[key].stop()


def pdelivery(bed, *args, stdin=MSG, env=None):
    return subprocess.run([str(pwtest.BIN / "pdelivery"), *args], input=stdin, capture_output=True,
                          env=env or bed["env"], timeout=60)


def test_routes_each_user_to_its_mailhost(bed):
    r = pdelivery(bed, "-f", "a@example.org", "-i", "4AU1Q1", "-d", "juan")
    assert r.returncode == 0, r.stderr
    r = pdelivery(bed, "-f", "a@example.org", "-i", "4AU1Q2", "-d", "jo")
    assert r.returncode == 0, r.stderr
    [f] = messages(bed["l2"].path("juan"))
    assert f.read_bytes() == b"Return-Path: <a@example.org>\nDelivered-To: juan\n" + MSG
    assert len(messages(bed["l3"].path("jo"))) == 1
    assert not bed["l3"].path("juan").exists() and not bed["l2"].path("jo").exists()


def test_unknown_user_is_67_with_511(bed):
    r = pdelivery(bed, "-f", "a@x", "-d", "nadie")
    assert r.returncode == 67 and b"5.1.1" in r.stderr


def test_frozen_mailbox_is_75(bed):
    r = pdelivery(bed, "-f", "a@x", "-d", "mudando")
    assert r.returncode == 75 and b"4.2.1" in r.stderr


def test_pwserver_down_is_75(bed, tmp_path):
    conf = client_conf(tmp_path / "dead.conf", ["127.0.0.1:9"], timeout_ms=200)
    r = pdelivery(bed, "-f", "a@x", "-d", "juan", env=env_with(conf, bed["settings"]))
    assert r.returncode == 75 and b"4.4.3" in r.stderr


def test_usage_errors_stay_in_sysexits(bed):
    assert pdelivery(bed, "-d").returncode == 75
    assert pdelivery(bed, "--bogus").returncode == 75
    assert pdelivery(bed, "-l", "juan").returncode == 75


def test_lmtp_port_flag_overrides_settings(bed):
    r = pdelivery(bed, "--lmtp-port", "9", "-f", "a@x", "-d", "juan")
    assert r.returncode == 75 and b"4.4.1" in r.stderr


def test_storage_down_then_retry_delivers_once(bed):
    """Two users on two hosts, one host down: 75; retry after it returns:
    the copy already stored is acknowledged, not stored twice."""
    n_ana, n_pepe = len(messages(bed["l2"].path("ana"))), len(messages(bed["l3"].path("pepe")))
    bed["s3"].stop()
    try:
        r = pdelivery(bed, "-f", "a@x", "-i", "4AU1Q9", "-d", "ana", "pepe")
        assert r.returncode == 75 and b"pepe" in r.stderr
        assert len(messages(bed["l2"].path("ana"))) == n_ana + 1
    finally:
        bed["s3"] = Pdeliveryd(bed["d"] / "store3", STORES[1], bed["port"], bed["env"], init_root=False)
    r = pdelivery(bed, "-f", "a@x", "-i", "4AU1Q9", "-d", "ana", "pepe")
    assert r.returncode == 0, r.stderr
    assert len(messages(bed["l2"].path("ana"))) == n_ana + 1
    assert len(messages(bed["l3"].path("pepe"))) == n_pepe + 1


def test_lmtp_mode_per_recipient(bed):
    script = (b"LHLO mx.example\r\nMAIL FROM:<a@x>\r\nRCPT TO:<juan>\r\nRCPT TO:<nadie>\r\n"
              b"RCPT TO:<mudando>\r\nRCPT TO:<pepe>\r\nDATA\r\nSubject: l\r\n\r\nvia -l\r\n.\r\nQUIT\r\n")
    n_juan, pepe_before = len(messages(bed["l2"].path("juan"))), set(messages(bed["l3"].path("pepe")))
    r = pdelivery(bed, "-l", stdin=script)
    assert r.returncode == 0, r.stderr
    assert codes(r.stdout) == ["220", "250", "250", "250", "550", "450", "250", "354", "250", "250", "221"]
    assert len(messages(bed["l2"].path("juan"))) == n_juan + 1
    # the new file, found by difference: Maildir names do not sort by time
    (new,) = set(messages(bed["l3"].path("pepe"))) - pepe_before
    assert new.read_bytes().endswith(b"Subject: l\n\nvia -l\n")


def test_placement_rule_when_the_server_names_no_host(bed, tmp_path):
    """A password server with no mailhosts map and no rule answers an empty
    host: pdelivery then applies [placement] itself (docs/placement.md)."""
    users = tmp_path / "users"
    users.mkdir()
    (users / "passwd").write_text((bed["d"] / "users" / "passwd").read_text())
    settings = tmp_path / "pwmail.toml"
    settings.write_text(f'[delivery]\nlmtp_port = {bed["port"]}\n\n'
                        f'[placement]\nrule = "ranges"\nranges = ["a-i {STORES[1]}", "j-z {STORES[0]}"]\n')
    with pwtest.PwServer(users, env={"PWMAIL_CONF": str(tmp_path / "absent.toml")}) as pw:
        with pw.client() as c:
            assert c.passwd_by_name("ana").mailhost == ""
        conf = client_conf(tmp_path / "pw.conf", [pw.address])
        n_ana3 = len(messages(bed["l3"].path("ana")))
        n_pepe2 = len(messages(bed["l2"].path("pepe")))
        for user in ("ana", "pepe"):
            r = pdelivery(bed, "-f", "a@x", "-d", user, env=env_with(conf, settings))
            assert r.returncode == 0, r.stderr
    assert len(messages(bed["l3"].path("ana"))) == n_ana3 + 1      # a-i -> 127.0.0.3
    assert len(messages(bed["l2"].path("pepe"))) == n_pepe2 + 1    # j-z -> 127.0.0.2


def _all_counts(bed):
    return {(s, u): len(messages(bed[s].path(u))) for s in ("l2", "l3") for u in ("juan", "pepe", "ana", "jo")}


@pytest.mark.parametrize("args", [
    ["-f", "a@x", "-d", "juan@x>\r\nRCPT TO:<pepe"],
    ["-f", "a@x>\r\nRCPT TO:<pepe>", "-d", "juan"],
    ["-f", "a@x", "-i", "Q1\r\nRCPT TO:<pepe>", "-d", "juan"],
    ["-f", "a@x", "-d", "ju\x01an"],
], ids=["-d", "-f", "-i", "control"])
def test_injection_in_arguments_is_64_and_delivers_nothing(bed, args):
    before = _all_counts(bed)
    r = pdelivery(bed, *args)
    assert r.returncode == 64, r.stderr
    assert r.stderr.count(b"\n") == 1 and r.stderr.startswith(b"pdelivery: ")
    assert _all_counts(bed) == before


def test_injection_in_lmtp_input_is_501_and_64(bed):
    before = _all_counts(bed)
    r = pdelivery(bed, "-l", stdin=b"LHLO mx\r\nMAIL FROM:<a@x>\r\nRCPT TO:<juan\x00>\r\nDATA\r\nQUIT\r\n")
    assert r.returncode == 64 and codes(r.stdout) == ["220", "250", "250", "501", "554", "221"]
    r = pdelivery(bed, "-l", "-i", "Q\rX", stdin=b"QUIT\r\n")
    assert r.returncode == 64 and r.stdout == b""
    assert _all_counts(bed) == before
