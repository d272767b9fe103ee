"""`pwmail status`: is everything this host relies on up?

Checks, each with a verdict:
* every password server of /etc/pwserver.conf: answers PING and STATS
  (generation, users, refused reloads from the reload guard);
* the shared health record: servers the clients on this host marked down;
* every storage host the settings name (`[placement]` hosts and ranges,
  `[hosts]`, `[pop] backends`, `--store`): its LMTP port greets with 220
  and its POP port with +OK, at the `[hosts]` address when it has one;
* every proxy given with `--proxy HOST:PORT`: greets with +OK.

Exit 0 only when every check passed, 1 otherwise (EX_CONFIG 78 for
settings that cannot be read). `--json` prints the same as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from dataclasses import asdict, dataclass, field

import delivery.config
import pop.config
from pwcache import config as client_config
from pwcache.client import Client, PwError
from pwcache.health import HealthRecord
from pwcache.placement import DEFAULTS as PLACEMENT_DEFAULTS
from pwcache.placement import PlacementError, PlacementRule
from pwmail.base import hostmap, hostport, settings
from pwmail.base.errors import ConfigError

GREETING_MAX = 512  # bytes of a greeting line read at most
EX_CONFIG = 78
# last_refusal_reason in STATS (docs/pwserver.md, "The reload guard")
REFUSAL_REASONS = {1: "no users", 2: "too many users lost", 3: "too many bad lines"}


@dataclass
class Check:
    kind: str  # pwserver, health, lmtp, pop, proxy
    target: str  # what was checked (HOST:PORT, a file)
    ok: bool
    detail: str
    facts: dict = field(default_factory=dict)


def greeting(address: tuple[str, int], expect: bytes, timeout: float) -> tuple[bool, str]:
    """Connect and read the first line; (it starts with `expect`, the line or the error)."""
    start = time.monotonic()
    try:
        with socket.create_connection(address, timeout=timeout) as s:
            s.settimeout(max(0.1, timeout - (time.monotonic() - start)))
            line = b""
            while b"\n" not in line and len(line) < GREETING_MAX:
                chunk = s.recv(GREETING_MAX - len(line))
                if not chunk:
                    break
                line += chunk
    except OSError as e:
        return False, f"{type(e).__name__}: {e.strerror or e}"
    text = line.split(b"\n", 1)[0].decode("utf-8", "replace").strip()
    if not line.startswith(expect):
        return False, f"unexpected greeting {text!r}" if text else "closed without a greeting"
    return True, text


def check_pwserver(server: tuple[str, int], cfg: client_config.ClientConfig) -> Check:
    target = hostport.format_hostport(server)
    client = Client([target], timeout_ms=cfg.timeout_ms, hedge_ms=cfg.timeout_ms, keyfile=cfg.keyfile, health_file=None)
    try:
        with client:
            client.ping()
            stats = client.stats()
    except PwError as e:
        return Check("pwserver", target, False, str(e))
    facts = {
        k: stats.get(k, 0)
        for k in (
            "generation",
            "users",
            "groups",
            "shadows",
            "load_ms",
            "loaded_time",
            "reloads_refused",
            "last_refusal_time",
            "last_refusal_reason",
        )
    }
    loaded = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(facts["loaded_time"]))
    detail = f"generation {facts['generation']} loaded {loaded}, {facts['users']} users"
    problems = []
    if facts["users"] == 0:
        problems.append("serves no users")
    # A refusal since the served generation: the files on disk are not what is served.
    if facts["reloads_refused"] and facts["last_refusal_time"] >= facts["loaded_time"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(facts["last_refusal_time"]))
        reason = REFUSAL_REASONS.get(facts["last_refusal_reason"], f"reason {facts['last_refusal_reason']}")
        problems.append(f"the sources were refused at {when} ({reason}): an older generation is served")
    elif facts["reloads_refused"]:
        detail += f"; {facts['reloads_refused']} reload(s) refused before it"
    return Check("pwserver", target, not problems, "; ".join([detail, *problems]), facts)


def check_health(cfg: client_config.ClientConfig) -> Check:
    record = HealthRecord(cfg.health_file, cfg.recheck_s)
    now = time.time()
    down = [hostport.format_hostport(s) for s in cfg.servers if record.is_down(hostport.format_hostport(s), now)]
    if down:
        return Check("health", cfg.health_file, False, "marked down by this host's clients: " + ", ".join(down))
    return Check("health", cfg.health_file, True, "no server marked down")


def storage_hosts(placement: dict, pop_cfg: dict, extra: list[str], hosts: hostmap.HostMap | None = None) -> list[str]:
    """Storage host names in the order the settings give them, once each."""
    names: list[str] = []
    try:
        names += [h for h, _ in PlacementRule.from_settings(placement).hosts]
    except PlacementError as e:
        raise ConfigError(str(e)) from e
    names += list(hosts.hosts if hosts is not None else ())
    names += list(pop_cfg["backends"])
    names += extra
    return list(dict.fromkeys(names))


def pop_address(name: str, port: int, mapped: str | None = None) -> tuple[str, int]:
    """Where pop-proxy would reach `name`'s POP: its backends/[hosts] target, else the name."""
    return hostport.parse_hostport(mapped or name, port)


def run_checks(args) -> list[Check]:
    cfg = client_config.load(args.pwserver_conf)
    dcfg = delivery.config.load(args.config)
    pcfg = pop.config.load(args.config)
    placement = settings.section("placement", PLACEMENT_DEFAULTS, args.config)
    hosts = hostmap.load(args.config)
    checks = [check_pwserver(s, cfg) for s in cfg.servers]
    checks.append(check_health(cfg))
    pop_backends = {**hosts.targets("pop", int(pcfg["backend_port"])), **pcfg["backends"]}  # as pop-proxy
    for name in storage_hosts(placement, pcfg, args.store, hosts):
        lmtp = delivery.config.store_address(hosts, dcfg, name)  # as pdelivery and lmtp-proxy reach it
        ok, text = greeting(lmtp, b"220", args.timeout)
        checks.append(Check("lmtp", f"{name} ({hostport.format_hostport(lmtp)})", ok, text))
        pop_addr = pop_address(name, int(pcfg["backend_port"]), pop_backends.get(name))
        ok, text = greeting(pop_addr, b"+OK", args.timeout)
        checks.append(Check("pop", f"{name} ({hostport.format_hostport(pop_addr)})", ok, text))
    for proxy in args.proxy:
        address = hostport.parse_hostport(proxy, 110)
        ok, text = greeting(address, b"+OK", args.timeout)
        checks.append(Check("proxy", hostport.format_hostport(address), ok, text))
    return checks


def render(checks: list[Check]) -> str:
    width = max(len(c.target) for c in checks)
    lines = [f"{'ok' if c.ok else 'FAIL':<4} {c.kind:<8} {c.target:<{width}}  {c.detail}" for c in checks]
    failed = sum(not c.ok for c in checks)
    lines.append("all well" if not failed else f"{failed} of {len(checks)} checks failed")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="pwmail status",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit 0 when every check passed, 1 when one failed, 78 for bad settings.",
    )
    ap.add_argument("--json", action="store_true", help="one JSON object: {ok, checks: [...]}")
    ap.add_argument("--config", help="settings file (default $PWMAIL_CONF or /etc/pwmail.toml)")
    ap.add_argument("--pwserver-conf", help="client configuration (default $PWSERVER_CONF or /etc/pwserver.conf)")
    ap.add_argument(
        "--store", action="append", default=[], metavar="HOST", help="another storage host to check (repeatable)"
    )
    ap.add_argument(
        "--proxy", action="append", default=[], metavar="HOST:PORT", help="a pop-proxy to check (repeatable)"
    )
    ap.add_argument("--timeout", type=float, default=3.0, metavar="S", help="seconds per network check (default 3)")
    args = ap.parse_args(argv)
    try:
        checks = run_checks(args)
    except (ConfigError, ValueError) as e:
        print(f"pwmail status: {e}", file=sys.stderr)
        return EX_CONFIG
    ok = all(c.ok for c in checks)
    if args.json:
        print(json.dumps({"ok": ok, "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        print(render(checks))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
