"""AsyncClient.reconfigure (SIGHUP in the daemons): the client configuration
file again, servers, timeouts and keys, the constructor's arguments over it;
a file that cannot be used changes nothing."""

import pytest

from pwcache import config
from pwcache.client import AsyncClient, Client
from pwmail.base.errors import ConfigError
from tests.support import pwtest


def test_servers_timeouts_and_keys_are_read_again(tmp_path):
    path = tmp_path / "pwserver.conf"
    config.write(path, ["127.0.0.1:9"], timeout_ms=300)
    c = AsyncClient.from_config(str(path))
    assert c.servers == [("127.0.0.1", 9)] and c.timeout == 0.3 and c.shadow_key is None
    key = tmp_path / "shadow.key"
    pwtest.write_key(key)
    config.write(path, ["127.0.0.1:9", "127.0.0.1:7773"], timeout_ms=800, shadow_keyfile=key)
    assert c.reconfigure()
    assert c.servers == [("127.0.0.1", 9), ("127.0.0.1", 7773)] and c.timeout == 0.8
    assert c.shadow_key == pwtest.read_key(key)


def test_the_constructors_arguments_stay_over_the_file(tmp_path):
    path = tmp_path / "pwserver.conf"
    config.write(path, ["127.0.0.1:9"], timeout_ms=300)
    c = AsyncClient.from_config(str(path), timeout_ms=50)
    config.write(path, ["127.0.0.1:10"], timeout_ms=900)
    c.reconfigure()
    assert c.servers == [("127.0.0.1", 10)] and c.timeout == 0.05


def test_a_bad_file_changes_nothing(tmp_path):
    path = tmp_path / "pwserver.conf"
    config.write(path, ["127.0.0.1:9"])
    c = AsyncClient.from_config(str(path))
    path.write_text("server 127.0.0.1:10\nkeyfile /nonexistent/key\n")
    with pytest.raises(OSError):
        c.reconfigure()
    path.write_text("server 127.0.0.1:10\ntimeout_ms many\n")
    with pytest.raises(ConfigError):
        c.reconfigure()
    assert c.servers == [("127.0.0.1", 9)]


def test_a_client_not_made_from_a_file_has_nothing_to_reread():
    assert Client(["127.0.0.1:9"]).reconfigure() is False
