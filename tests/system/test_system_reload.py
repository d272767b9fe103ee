"""pwserver reloaded with 1,000,000 users while another host queries it
steadily: not one lookup fails (issue 6)."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest

from pwmail.testbed import TestBed, namespace_support
from pwmail.testbed.system import PartMissing, PwmailSystem, require

USERS = int(os.environ.get("PWMAIL_RELOAD_USERS", "1000000"))
pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.mark.timeout(600)
def test_reload_of_a_million_users_under_query_load_from_another_host():
    reason = namespace_support()
    if reason:
        pytest.skip(reason)
    try:
        require("gen-users", "pwserver", "client")
    except PartMissing as e:
        pytest.skip(str(e))
    from pwcache.client import Client, PwError

    with TestBed(["pw1", "pw2", "client1", "log1"]) as bed:
        s = PwmailSystem(
            bed, users=USERS, stores=["store1", "store2"], users_dir=os.environ.get("PWMAIL_TESTBED_USERS_1M")
        )
        s.generate_users()
        s.write_configs()
        s.start_pwserver("pw1")
        names = random.Random(3).sample(list(s.passwords), 20000)
        server = f"{bed.addr('pw1')}:{s.ports.pwserver}"
        stop = threading.Event()
        counts = {"ok": 0, "failed": 0, "during": 0}
        slowest = [0.0]
        failures: list[str] = []
        reloading = threading.Event()

        def load():
            i = 0
            with bed.inside("client1"), Client([server], timeout_ms=1000, hedge_ms=1000) as c:
                while not stop.is_set():
                    name = names[i % len(names)]
                    i += 1
                    t0 = time.perf_counter()
                    try:
                        entry = c.passwd_by_name(name)
                    except PwError as e:
                        entry, err = None, repr(e)
                    else:
                        err = None if entry is not None else "NOTFOUND"
                    dt = time.perf_counter() - t0
                    if err:
                        counts["failed"] += 1
                        failures.append(f"{name}: {err}")
                    else:
                        counts["ok"] += 1
                        if reloading.is_set():
                            counts["during"] += 1
                            slowest[0] = max(slowest[0], dt)

        t = threading.Thread(target=load)
        t.start()
        try:
            time.sleep(1.0)
            before = counts["ok"]
            assert before > 100, "no steady load before the reload"
            reloading.set()
            t0 = time.monotonic()
            bed.send_signal("pw1", "pwserver", signal.SIGHUP)
            bed.wait_for("pw1", "pwserver", r"loaded generation 2\b", timeout=120)
            reload_s = time.monotonic() - t0
            reloading.clear()
            time.sleep(1.0)
        finally:
            stop.set()
            t.join(30)
        with bed.inside("client1"), Client([server], timeout_ms=1000) as c:
            version, generation, users = c.ping()
        assert failures == []
        assert counts["failed"] == 0
        assert generation == 2 and users == USERS
        assert counts["during"] > 0
        print(
            f"\nFIGURE reload: {USERS:,} users reloaded in {reload_s:.2f} s under load from client1; "
            f"{counts['ok']:,} lookups, {counts['during']:,} during the reload, 0 failed, "
            f"slowest during the reload {slowest[0] * 1000:.1f} ms"
        )
