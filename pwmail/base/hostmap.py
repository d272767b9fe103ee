"""The `[hosts]` section of /etc/pwmail.toml: storage host names -> addresses.

One map for every part that connects to a storage host by its mailhost name
(pdelivery, lmtp-proxy, pop-proxy, imap-proxy, pwmail status). A name in the
map needs no DNS; a name not in it is resolved as before (DNS, with
`[delivery] mailhost_suffix` for LMTP). Two forms, the ports optional, each
protocol's own setting when left out:

    [hosts]
    store1 = "10.0.0.11"
    store2 = { address = "10.0.0.12", lmtp = 12024, pop = 1110, imap = 1143 }

delivery/_csrc/pd_conf.c reads the same section for the C pdelivery, with
the same checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import settings

SECTION_NAME = "hosts"
PROTOCOLS = ("lmtp", "pop", "imap")
HOSTS_MAX = 4096  # entries; pd_conf.c keeps as many
DEFAULTS: dict = {}  # no host mapped: every name is resolved by DNS


@dataclass(frozen=True)
class StoreHost:
    address: str
    ports: dict[str, int] = field(default_factory=dict)  # protocol -> port; missing: the protocol's setting


def _address_problem(v) -> str | None:
    if not isinstance(v, str) or not v or len(v) > 255 or any(c.isspace() for c in v):
        return "want an address (a name or an IP, no port, no spaces)"
    return None


def _entry(name: str, value) -> StoreHost:
    """One entry, or SettingsError's text (without the file) for what is wrong."""
    if isinstance(value, str):
        value = {"address": value}
    if not isinstance(value, dict):
        raise ValueError(f"{name} = {value!r}: want an address or a table {{ address = ..., lmtp = PORT, ... }}")
    unknown = sorted(set(value) - {"address", *PROTOCOLS})
    if unknown:
        raise ValueError(f"unknown key(s) in {name}: {', '.join(unknown)}")
    if "address" not in value:
        raise ValueError(f"{name}.address: missing (want an address)")
    problem = _address_problem(value["address"])
    if problem:
        raise ValueError(f"{name}.address = {value['address']!r}: {problem}")
    ports = {}
    for proto in PROTOCOLS:
        if proto not in value:
            continue
        port = value[proto]
        if not isinstance(port, int) or isinstance(port, bool) or settings.port(port):
            raise ValueError(f"{name}.{proto} = {port!r}: want a port 1..65535")
        ports[proto] = port
    return StoreHost(value["address"], ports)


class HostMap:
    """Where each storage host is: `address(name, protocol, default_port)`."""

    def __init__(self, hosts: dict[str, StoreHost] | None = None):
        self.hosts = hosts or {}

    def __len__(self) -> int:
        return len(self.hosts)

    def address(self, name: str, protocol: str, default_port: int) -> tuple[str, int] | None:
        """(address, port) of a mapped name; None: not mapped (resolve it by DNS)."""
        host = self.hosts.get(name)
        if host is None:
            return None
        return host.address, host.ports.get(protocol, default_port)

    def targets(self, protocol: str, default_port: int) -> dict[str, str]:
        """Every mapped name as "ADDRESS:PORT" for `protocol` (the proxies' backends form)."""
        out = {}
        for name in self.hosts:
            addr, port = self.address(name, protocol, default_port)
            out[name] = f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
        return out


def load(path: str | None = None) -> HostMap:
    """The [hosts] section ({} when there is none); SettingsError in one line
    naming the file and the entry when one is wrong."""
    path = path or settings.settings_path()
    data = settings.load(path).get(SECTION_NAME, {})
    if not isinstance(data, dict):
        raise settings.SettingsError(f"{path}: [{SECTION_NAME}] is not a table")
    if len(data) > HOSTS_MAX:
        raise settings.SettingsError(f"{path}: [{SECTION_NAME}]: more than {HOSTS_MAX} hosts")
    hosts = {}
    for name, value in data.items():
        try:
            hosts[name] = _entry(name, value)
        except ValueError as e:
            raise settings.SettingsError(f"{path}: [{SECTION_NAME}] {e}") from None
    return HostMap(hosts)
