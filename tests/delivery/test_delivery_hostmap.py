"""The [hosts] map (pwmail/base/hostmap.py): mailhost names DNS does not
know reach their store through it, in the C pdelivery, its Python reference
and lmtp-proxy; a bad entry is one line and exit 78 (the C pdelivery and
lmtp-proxy: the Python reference answers every surprise with 75)."""

import subprocess

import pytest

from delivery.layout import MailboxLayout
from tests.support import pwtest
from tests.support.delivery_util import (
    LmtpProxy,
    Pdeliveryd,
    client_conf,
    env_with,
    free_port,
    free_port_on,
    lmtp_session,
    messages,
    write_users,
)

USERS = {  # name: (uid, gid, mailhost, frozen): names no resolver knows
    "ana": (2003, 2003, "store1", False),
    "pepe": (2002, 2002, "store2", False),
}
MSG = b"From: a@example.org\nSubject: by the host map\n\nhello\n"


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    """store1 on 127.0.0.2 at a port of its own ([hosts] store1.lmtp),
    store2 on 127.0.0.3 at [delivery] lmtp_port (the short form)."""
    d = tmp_path_factory.mktemp("hostmap")
    with pwtest.PwServer(write_users(d / "users", USERS)) as pw:
        conf = client_conf(d / "pwserver.conf", [pw.address])
        p1, p2 = free_port_on(["127.0.0.2"]), free_port_on(["127.0.0.3"])
        stores = [
            Pdeliveryd(d / "store1", "127.0.0.2", p1, env_with(conf)),
            Pdeliveryd(d / "store2", "127.0.0.3", p2, env_with(conf)),
        ]
        hosts = f'[hosts]\nstore1 = {{ address = "127.0.0.2", lmtp = {p1} }}\nstore2 = "127.0.0.3"\n'
        settings = d / "pwmail.toml"
        settings.write_text(f"[delivery]\nlmtp_port = {p2}\nconnect_timeout = 2.0\n\n{hosts}")
        unmapped = d / "unmapped.toml"
        unmapped.write_text(f"[delivery]\nlmtp_port = {p2}\nconnect_timeout = 2.0\n")
        try:
            yield {
                "d": d,
                "conf": conf,
                "p2": p2,
                "hosts": hosts,
                "env": env_with(conf, settings),
                "unmapped": env_with(conf, unmapped),
                "boxes": {
                    "ana": MailboxLayout(d / "store1").path("ana"),
                    "pepe": MailboxLayout(d / "store2").path("pepe"),
                },
            }
        finally:
            for s in stores:
                s.stop()


PDELIVERY = {"c": [str(pwtest.BIN / "pdelivery")], "python": [str(pwtest.BIN / "python"), "-m", "delivery.pdelivery"]}


def run_pdelivery(which: str, env: dict, *args: str):
    argv = [*PDELIVERY[which], *args]
    return subprocess.run(argv, input=MSG, capture_output=True, env=env, timeout=60)


@pytest.mark.parametrize("which", PDELIVERY)
def test_pdelivery_reaches_mapped_names(bed, which):
    before = {u: len(messages(b)) for u, b in bed["boxes"].items()}
    r = run_pdelivery(which, bed["env"], "-f", "a@example.org", "-d", "ana", "pepe")
    assert r.returncode == 0, r.stderr
    for user, box in bed["boxes"].items():
        assert len(messages(box)) == before[user] + 1, user


@pytest.mark.parametrize("which", PDELIVERY)
def test_without_the_map_the_name_goes_to_dns_and_fails(bed, which):
    r = run_pdelivery(which, bed["unmapped"], "-f", "a@example.org", "-d", "ana")
    assert r.returncode == 75 and b"4.4.1" in r.stderr and b"store1" in r.stderr


def test_lmtp_proxy_reaches_mapped_names(bed):
    p = LmtpProxy(bed["d"] / "proxy", free_port(), bed["conf"], {"lmtp_port": bed["p2"]}, other_sections=bed["hosts"])
    try:
        before = {u: len(messages(b)) for u, b in bed["boxes"].items()}
        script = (
            b"LHLO mx\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<ana>\r\nRCPT TO:<pepe>\r\nDATA\r\n"
            + MSG.replace(b"\n", b"\r\n")
            + b".\r\nQUIT\r\n"
        )
        out = lmtp_session(p.host, p.port, script)
        assert out.count(b"250 2.") >= 4, out
        for user, box in bed["boxes"].items():
            assert len(messages(box)) == before[user] + 1, (user, out)
    finally:
        p.stop()


BAD_HOSTS = {
    "port-range": ('store1 = { address = "127.0.0.2", lmtp = 0 }', "store1.lmtp"),
    "pop-port-range": ('store1 = { address = "127.0.0.2", pop = 70000 }', "store1.pop"),
    "port-type": ('store1 = { address = "127.0.0.2", lmtp = "24" }', "store1.lmtp"),
    "no-address": ("store1 = { lmtp = 24 }", "store1.address"),
    "address-with-space": ('store1 = "10.0.0.1 x"', "store1"),
    "unknown-key": ('store1 = { address = "127.0.0.2", smtp = 25 }', "smtp"),
    "not-a-table": ("store1 = 24", "store1"),
}


@pytest.mark.parametrize("text,key", BAD_HOSTS.values(), ids=BAD_HOSTS.keys())
def test_a_bad_entry_is_78_naming_it(bed, tmp_path, text, key):
    settings = tmp_path / "pwmail.toml"
    settings.write_text(f"[hosts]\n{text}\n")
    env = env_with(bed["conf"], settings)
    runs = {
        "c": [*PDELIVERY["c"], "-f", "a@x", "-d", "ana"],
        "lmtp-proxy": [str(pwtest.BIN / "lmtp-proxy"), "--listen", f"127.0.0.1:{free_port()}", "--log-stderr"],
    }
    for name, argv in runs.items():
        r = subprocess.run(argv, input=MSG, capture_output=True, env=env, timeout=60)
        line = r.stderr.decode()
        assert r.returncode == 78, (name, line)
        assert str(settings) in line and "[hosts]" in line and key in line, (name, line)
