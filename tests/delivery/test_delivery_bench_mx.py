"""benchmarks/bench_mx.py end to end with a tiny queue (no timing asserted):
real Sendmail, lmtp-proxy, Dovecot's LMTP proxy and two pdeliveryd stores;
every message of every path arrives exactly once, in its user's box."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from pwmail.testbed import sendmail as testbed_sendmail
from tests.support.pwtest import ROOT

MESSAGES = 20
PATHS = ["pdelivery", "lmtp-proxy", "dovecot-proxy", "direct"]

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(testbed_sendmail.unavailable() is not None, reason=str(testbed_sendmail.unavailable())),
    pytest.mark.skipif(not shutil.which("dovecot"), reason="dovecot-core not installed (deps/debian-packages.txt)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (Sendmail's namespaces, Dovecot's master)"),
]


def test_every_path_delivers_every_message_exactly_once(tmp_path):
    out = tmp_path / "mx.json"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_mx.py"),
            "--messages",
            str(MESSAGES),
            "--rounds",
            "1",
            "--users",
            "30",
            "--seconds",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out.read_text())
    assert result["bad"] == []
    [r] = result["rounds"]
    for p in PATHS:
        assert r[p]["delivered"] == MESSAGES, (p, r[p])
        assert (r[p]["missing"], r[p]["doubled"], r[p]["stray"], r[p]["misplaced"]) == (0, 0, 0, 0), (p, r[p])
        assert r[p]["left_in_queue"] == 0, (p, r[p])
        assert r[p]["rate"] > 0
    for cell in ("proxy-16", "direct-16"):
        # each 250 the 16 clients got is one new file in a store, no more
        assert r[cell]["delivered"] > 0 and r[cell]["stored"] == r[cell]["delivered"], (cell, r[cell])
    for p in PATHS:
        assert f"| {p} |" in run.stdout
