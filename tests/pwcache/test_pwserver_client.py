"""pwserver through the project's Python client (pwcache/client.py): the
client's view of every operation, TCP fallback, keys, enumeration."""

import pytest

from pwcache.client import Client, Denied
from tests.support.pwserver_util import write_sources
from tests.support.pwtest import PwServer, write_key

USERS = [(f"cl{i:03d}", 20000 + i) for i in range(1500)]
BIG = [n for n, _ in USERS]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("client")
    paths = write_sources(
        d, USERS, [("small", 70, ["cl000", "cl001"]), ("everyone", 71, BIG)], mailhosts={"cl000": "store1"}
    )
    write_key(d / "shadow.key")
    write_key(d / "network.key")
    return d, paths


def test_client_sees_every_operation(setup):
    d, paths = setup
    with PwServer(paths, "--shadow-key", str(d / "shadow.key")) as s:
        with Client([f"127.0.0.1:{s.port}"], timeout_ms=2000, shadow_keyfile=str(d / "shadow.key")) as c:
            pw = c.passwd_by_name("cl007")
            assert (pw.name, pw.passwd, pw.uid, pw.gid, pw.dir) == ("cl007", "x", 20007, 100, "/home/cl007")
            assert c.passwd_by_uid(20007) == pw
            assert c.passwd_by_name("nobody") is None
            assert c.group_by_name("small").members == ("cl000", "cl001")
            assert list(c.group_by_gid(71).members) == BIG  # too big for UDP: over TCP
            assert sorted(c.initgroups("cl001")) == [70, 71]
            assert tuple(c.mailhost("cl000")) == ("store1", False)
            assert c.shadow_by_name("cl002").hash == "$6$salt$cl002hash"
            assert c.ping()[2] == len(USERS)
            assert c.stats()["users"] == len(USERS)
            assert [e.name for e in c.enumerate()] == [n for n, _ in USERS]  # two pages
        with Client([f"127.0.0.1:{s.port}"], timeout_ms=2000) as plain:
            with pytest.raises(Denied):
                plain.shadow_by_name("cl002")


def test_client_with_the_network_key(setup):
    d, paths = setup
    with PwServer(paths, "--network-key", str(d / "network.key")) as s:
        with Client([f"127.0.0.1:{s.port}"], timeout_ms=2000, keyfile=str(d / "network.key")) as c:
            assert c.passwd_by_name("cl010").uid == 20010
            assert len(c.group_by_name("everyone").members) == len(BIG)
