"""pdeliveryd against hostile clients (issue 13): trickled message data,
many sessions from one address, one mailbox named many times."""

import socket
import time

import pytest

from delivery.layout import MailboxLayout
from tests.support import pwtest
from tests.support.delivery_util import (
    Pdeliveryd,
    client_conf,
    codes,
    env_with,
    free_port_on,
    lmtp_session,
    messages,
    write_users,
)

STORE = "127.0.0.21"
TRICKLER = "127.0.0.22"  # every trickling session comes from here
LEGIT = "127.0.0.23"  # the honest client's source address
PER_ADDRESS = 3


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    users = write_users(d / "users")
    settings = d / "pwmail.toml"
    settings.write_text(
        f"[delivery]\nsessions_max = 6\nsessions_per_address_max = {PER_ADDRESS}\n"
        "data_timeout = 3.0\nidle_timeout = 60.0\n"
    )
    with pwtest.PwServer(users) as pw:
        env = env_with(client_conf(d / "pwserver.conf", [pw.address]), settings)
        port = free_port_on([STORE])
        with Pdeliveryd(d / "root", STORE, port, env) as srv:
            yield {"srv": srv, "port": port, "layout": MailboxLayout(d / "root")}


def connect_from(source: str, port: int) -> socket.socket:
    s = socket.socket()
    s.settimeout(20)
    s.bind((source, 0))
    s.connect((STORE, port))
    return s


def test_tricklers_are_capped_per_address_and_cut(bed):
    port = bed["port"]
    tricklers = []
    try:
        for _ in range(PER_ADDRESS):
            s = connect_from(TRICKLER, port)
            assert pwtest.read_reply(s, 20).startswith(b"220")
            s.sendall(b"LHLO t\r\nMAIL FROM:<t@x>\r\nRCPT TO:<ana@x>\r\nDATA\r\n")
            tricklers.append(s)
        for s in tricklers:
            got = b""
            while got.count(b"\r\n354 ") == 0 and not got.startswith(b"354"):
                got += s.recv(4096)
        # more from the same address: refused at once, though sessions_max has room
        for _ in range(2):
            extra = connect_from(TRICKLER, port)
            assert pwtest.read_reply(extra, 20).startswith(b"421 4.7.0")
            extra.close()
        # an honest client from another address still delivers
        legit = connect_from(LEGIT, port)
        legit.sendall(
            b"LHLO l\r\nMAIL FROM:<l@x>\r\nRCPT TO:<juan@x>\r\nDATA\r\nSubject: ok\r\n\r\nhi\r\n.\r\nQUIT\r\n"
        )
        out = b""
        while chunk := legit.recv(4096):
            out += chunk
        legit.close()
        assert codes(out) == ["220", "250", "250", "250", "354", "250", "221"]
        assert len(messages(bed["layout"].path("juan"))) == 1
        # the tricklers send a byte every 0.5 s (never idle) and are cut after data_timeout
        t0 = time.monotonic()
        cut = {}
        while len(cut) < len(tricklers) and time.monotonic() - t0 < 30:
            for i, s in enumerate(tricklers):
                if i in cut:
                    continue
                try:
                    s.sendall(b"x")
                    s.settimeout(0.01)
                    data = s.recv(4096)
                    cut[i] = data
                except TimeoutError:
                    pass
                except OSError as e:
                    cut[i] = repr(e).encode()
                finally:
                    s.settimeout(20)
            time.sleep(0.5)
        elapsed = time.monotonic() - t0
        assert len(cut) == len(tricklers), cut
        assert all(v.startswith(b"421 4.4.2") for v in cut.values()), cut
        assert elapsed < 25
    finally:
        for s in tricklers:
            s.close()
    # nothing of the cut transactions was stored, and their slots are free again
    assert messages(bed["layout"].path("ana")) == []
    assert not (bed["layout"].path("ana") / "tmp").exists() or list((bed["layout"].path("ana") / "tmp").iterdir()) == []
    again = connect_from(TRICKLER, port)
    assert pwtest.read_reply(again, 20).startswith(b"220")
    again.close()


def test_one_copy_per_mailbox_per_transaction(bed):
    n = 300
    rcpts = b"".join(b"RCPT TO:<pepe@x>\r\n" if i % 2 else b"RCPT TO:<pepe+t%d@x>\r\n" % i for i in range(n))
    out = lmtp_session(
        STORE,
        bed["port"],
        b"LHLO a\r\nMAIL FROM:<s@x>\r\n" + rcpts + b"RCPT TO:<jo@x>\r\n"
        b"DATA\r\nSubject: many\r\n\r\nonce\r\n.\r\nQUIT\r\n",
        timeout=30,
    )
    assert codes(out) == ["220", "250", "250"] + ["250"] * (n + 1) + ["354"] + ["250"] * (n + 1) + ["221"]
    files = messages(bed["layout"].path("pepe"))
    assert len(files) == 1
    assert files[0].read_bytes().startswith(b"Return-Path: <s@x>\nDelivered-To: pepe+t0@x\n")
    assert len(messages(bed["layout"].path("jo"))) == 1
