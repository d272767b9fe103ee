"""`pwmail status` against real daemons: two password servers, two stores
(pdeliveryd and pop3d each) and a pop-proxy. All up: exit 0. Then one thing
at a time goes wrong and status names it and exits 1: a store's pdeliveryd
stopped, a reload refused by the guard, a password server stopped."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from tests.support.delivery_util import Pdeliveryd, client_conf, free_port_on, write_users
from tests.support.pop_util import start_pop3d, start_proxy
from tests.support.pwtest import BIN, PwServer, wait_for

pytestmark = pytest.mark.slow
STORES = ["127.0.0.2", "127.0.0.3"]


def status(bed, *extra) -> tuple[int, dict]:
    run = subprocess.run(
        [
            str(BIN / "pwmail"),
            "status",
            "--json",
            "--timeout",
            "5",
            "--config",
            str(bed["settings"]),
            "--pwserver-conf",
            str(bed["conf"]),
            "--proxy",
            bed["proxy"],
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.stderr == "", run.stderr
    return run.returncode, json.loads(run.stdout)


def failed(report: dict) -> list[tuple[str, str]]:
    return [(c["kind"], c["target"]) for c in report["checks"] if not c["ok"]]


@pytest.fixture
def bed(tmp_path):
    users = write_users(tmp_path / "users")
    with PwServer(users) as pws1, PwServer(users) as pws2:
        conf = client_conf(tmp_path / "pwserver.conf", [pws1.address, pws2.address])
        env = {"PWSERVER_CONF": str(conf), "PWMAIL_CONF": "/nonexistent"}
        port = free_port_on(STORES)
        stores = {h: Pdeliveryd(tmp_path / f"store-{h}", h, port, env) for h in STORES}
        pop3ds = {h: start_pop3d(tmp_path, tmp_path / f"store-{h}", conf, host=h) for h in STORES}
        proxy = start_proxy(tmp_path, conf)
        backends = ", ".join(f'"{h}" = "{h}:{d.port}"' for h, d in pop3ds.items())
        settings = tmp_path / "pwmail.toml"
        settings.write_text(
            f'[placement]\nrule = "hash"\nhosts = {json.dumps(STORES)}\n'
            f"[delivery]\nlmtp_port = {port}\n[pop]\nbackends = {{ {backends} }}\n"
        )
        try:
            yield {
                "settings": settings,
                "conf": conf,
                "pwservers": [pws1, pws2],
                "stores": stores,
                "users": users,
                "proxy": f"{proxy.host}:{proxy.port}",
            }
        finally:
            for p in [proxy, *pop3ds.values(), *stores.values()]:
                p.stop()


def test_all_well_then_each_fault_named(bed):
    rc, report = status(bed)
    assert (rc, report["ok"], failed(report)) == (0, True, [])
    kinds = [c["kind"] for c in report["checks"]]
    assert kinds.count("pwserver") == 2 and kinds.count("lmtp") == 2 and kinds.count("pop") == 2
    assert kinds.count("proxy") == 1
    assert all(c["facts"]["users"] == 5 for c in report["checks"] if c["kind"] == "pwserver")

    # a store's delivery daemon goes away: only that check fails
    bed["stores"]["127.0.0.3"].stop()
    rc, report = status(bed)
    assert rc == 1 and [k for k, t in failed(report)] == ["lmtp"]
    assert failed(report)[0][1].startswith("127.0.0.3 ")

    # an emptied passwd is refused by both servers: status says the sources are not served
    (bed["users"] / "passwd.tmp").write_text("")
    (bed["users"] / "passwd.tmp").rename(bed["users"] / "passwd")
    for pws in bed["pwservers"]:
        wait_for(lambda pws=pws: "reload refused" in pws.output(), timeout=30)
    rc, report = status(bed)
    bad = [c for c in report["checks"] if c["kind"] == "pwserver"]
    assert rc == 1 and all(not c["ok"] and "refused" in c["detail"] for c in bad)
    assert all(c["facts"]["users"] == 5 for c in bad)  # still serving the old generation

    # a password server stopped
    bed["pwservers"][1].stop()
    rc, report = status(bed)
    down = [c for c in report["checks"] if c["kind"] == "pwserver" and "no password server answered" in c["detail"]]
    assert rc == 1 and [c["target"] for c in down] == [bed["pwservers"][1].address]


def test_text_output_and_bad_settings(bed, tmp_path):
    run = subprocess.run(
        [str(BIN / "pwmail"), "status", "--config", str(bed["settings"]), "--pwserver-conf", str(bed["conf"])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0 and run.stdout.splitlines()[-1] == "all well", run.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[delivery]\nlmtp_prot = 24\n")
    run = subprocess.run(
        [str(BIN / "pwmail"), "status", "--config", str(bad), "--pwserver-conf", str(bed["conf"])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 78 and "lmtp_prot" in run.stderr and len(run.stderr.splitlines()) == 1


def test_stores_named_in_hosts_are_checked_at_their_mapped_addresses(bed, tmp_path):
    """[hosts] names DNS does not know: their LMTP and POP ports are checked
    at the mapped address (a bad entry: one line, 78)."""
    pop_ports = {}
    for backend in re.findall(r'"([\d.]+)" = "[\d.]+:(\d+)"', bed["settings"].read_text()):
        pop_ports[backend[0]] = int(backend[1])
    lmtp_port = bed["stores"]["127.0.0.2"].port
    mapped = tmp_path / "mapped.toml"
    mapped.write_text(
        f"[delivery]\nlmtp_port = {lmtp_port}\n[hosts]\n"
        + "".join(f'store{i} = {{ address = "{h}", pop = {pop_ports[h]} }}\n' for i, h in enumerate(STORES, 1))
    )
    rc, report = status({**bed, "settings": mapped})
    assert (rc, failed(report)) == (0, []), report
    targets = {(c["kind"], c["target"]) for c in report["checks"]}
    assert ("lmtp", f"store1 (127.0.0.2:{lmtp_port})") in targets
    assert ("pop", f"store2 (127.0.0.3:{pop_ports['127.0.0.3']})") in targets
    mapped.write_text('[hosts]\nstore1 = { address = "127.0.0.2", lmtp = 0 }\n')
    run = subprocess.run(
        [str(BIN / "pwmail"), "status", "--config", str(mapped), "--pwserver-conf", str(bed["conf"])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 78 and "store1.lmtp" in run.stderr and len(run.stderr.splitlines()) == 1
