"""The [hosts] map (pwmail/base/hostmap.py) in pop-proxy (the C engine and
the Python path) and imap-proxy: a mailhost name DNS does not know reaches
its store at the mapped address and this protocol's port; a bad entry is
one line and exit 78."""

from __future__ import annotations

import poplib
import socket
import subprocess
import threading

import pytest

from tests.support.imap_util import start_imap_proxy
from tests.support.pop_util import deliver, make_root, message, start_pop3d, start_proxy, users_pwserver
from tests.support.pwtest import BIN, free_port

USERS = {"ana": ("ana-pw", "store1")}  # store1: no resolver knows it


class FakeImapStore:
    """A listener on 127.0.0.2 that counts the connections it gets and greets
    like an IMAP server (the login then waits: the proxy's backend_timeout)."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.2", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.seen = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            self.seen.set()
            conn.sendall(b"* OK [CAPABILITY IMAP4rev1] fake\r\n")
            threading.Timer(10, conn.close).start()

    def close(self):
        self.sock.close()


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pop-hostmap")
    layout = make_root(tmp / "store1")
    deliver(layout, "ana", message("by the host map"))
    imap = FakeImapStore()
    with users_pwserver(tmp, USERS) as conf:
        with start_pop3d(tmp, tmp / "store1", conf, host="127.0.0.2", trusted=["127.0.0.0/8"]) as store:
            hosts = f'[hosts]\nstore1 = {{ address = "127.0.0.2", pop = {store.port}, imap = {imap.port} }}\n'
            try:
                yield {"tmp": tmp, "conf": conf, "hosts": hosts, "imap": imap}
            finally:
                imap.close()


@pytest.mark.parametrize("engine", ["true", "false"])
def test_pop_proxy_reaches_a_mapped_name(bed, engine):
    settings = f"engine = {engine}\nbackend_retries = 0\n\n" + bed["hosts"]
    with start_proxy(bed["tmp"], bed["conf"], settings, name=f"pop-proxy-engine-{engine}") as proxy:
        c = poplib.POP3(*proxy.address, timeout=20)
        c.user("ana")
        assert c.pass_("ana-pw").startswith(b"+OK")
        assert c.stat()[0] == 1
        c.quit()


def test_pop_proxy_without_the_map_cannot_reach_it(bed):
    with start_proxy(bed["tmp"], bed["conf"], "backend_retries = 0\n", name="pop-proxy-unmapped") as proxy:
        c = poplib.POP3(*proxy.address, timeout=20)
        c.user("ana")
        with pytest.raises(poplib.error_proto, match=r"SYS/TEMP"):
            c.pass_("ana-pw")


def test_imap_proxy_reaches_a_mapped_name_at_its_imap_port(bed):
    imap = bed["imap"]
    before = imap.connections
    imap.seen.clear()
    settings = "backend_retries = 0\nbackend_timeout = 2.0\n\n" + bed["hosts"]
    with start_imap_proxy(bed["tmp"], bed["conf"], settings) as proxy:
        s = socket.create_connection(proxy.address, timeout=20)
        assert s.recv(4096).startswith(b"* OK")
        s.sendall(b"a1 LOGIN ana ana-pw\r\n")
        assert imap.seen.wait(20)
        assert imap.connections == before + 1
        s.close()


BAD_HOSTS = {
    "port-range": ('store1 = { address = "127.0.0.2", pop = 0 }', "store1.pop"),
    "imap-port-range": ('store1 = { address = "127.0.0.2", imap = 65536 }', "store1.imap"),
    "no-address": ("store1 = { pop = 110 }", "store1.address"),
    "unknown-key": ('store1 = { address = "127.0.0.2", pop3 = 110 }', "pop3"),
}


@pytest.mark.parametrize("text,key", BAD_HOSTS.values(), ids=BAD_HOSTS.keys())
@pytest.mark.parametrize("daemon,section", [("pop-proxy", "pop"), ("imap-proxy", "imap")])
def test_a_bad_entry_is_78_naming_it(bed, tmp_path, daemon, section, text, key):
    settings = tmp_path / "pwmail.toml"
    settings.write_text(f"[{section}]\n\n[hosts]\n{text}\n")
    r = subprocess.run(
        [str(BIN / daemon), "--listen", f"127.0.0.1:{free_port()}", "--stderr"],
        capture_output=True,
        env={"PWSERVER_CONF": str(bed["conf"]), "PWMAIL_CONF": str(settings)},
        timeout=60,
    )
    line = r.stderr.decode()
    assert r.returncode == 78, line
    assert len(line.strip().splitlines()) == 1 and str(settings) in line and key in line, line
