"""`pwmail demo --once` end to end: on namespaces (as root) and on loopback
addresses, with fewer users than the default to keep it quick."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pwmail.testbed import dovecot, namespace_support, sendmail
from pwmail.testbed.system import PartMissing, require

PWMAIL = str(Path(sys.executable).parent / "pwmail")
pytestmark = pytest.mark.slow


def run_demo(*args: str) -> subprocess.CompletedProcess:
    try:
        require("gen-users", "pwserver", "client", "layout", "pdeliveryd", "pdelivery", "pop3d", "pop-proxy", "nss")
    except PartMissing as e:
        pytest.skip(str(e))
    return subprocess.run(
        [PWMAIL, "demo", "--once", "--users", "5000", *args], capture_output=True, text=True, timeout=240
    )


def check_account(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "pwmail demo: every check passed" in out
    assert "users: 5,000 generated; store1 holds" in out
    assert out.count("exit 0 in") == 6
    assert out.count("fetched, subjects match") == 4
    assert "store1:<spool>/" in out and "store2:<spool>/" in out
    assert "lookups: Python client on client1 -> pwserver, median" in out


@pytest.mark.root
@pytest.mark.timeout(300)
def test_demo_once_on_namespaces():
    reason = namespace_support()
    if reason:
        pytest.skip(reason)
    r = run_demo()
    check_account(r)
    assert "network namespaces on one private bridge, 10.77.0.0/24" in r.stdout
    if sendmail.unavailable() is None:  # one message through real Sendmail on mx1
        assert "mx1      10.77.0.4    Sendmail (SMTP, port 25)" in r.stdout
        assert "-> Sendmail on mx1:25 -> pdelivery" in r.stdout
        assert r.stdout.count("accepted by Sendmail and in its Maildir on store") == 1
    else:
        assert "SMTP: no Sendmail on mx1" in r.stdout
    if dovecot.unavailable() is None:  # every user also through imap-proxy to Dovecot IMAP
        assert "-> imap-proxy on pop1 -> Dovecot IMAP on the user's store" in r.stdout
        assert r.stdout.count("in INBOX, subjects match") == 4
    else:
        assert "IMAP: no Dovecot IMAP on the stores" in r.stdout
    work = r.stdout.split("(work folder ", 1)[1].split(")", 1)[0]
    assert not Path(work).exists()  # torn down
    tag = Path(work).name.rsplit("-", 1)[0]
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert tag + "-" not in left


@pytest.mark.timeout(300)
def test_demo_once_on_loopback():
    r = run_demo("--loopback")
    check_account(r)
    assert "loopback addresses 127.77.0.0/24" in r.stdout
    assert "SMTP: no Sendmail on mx1 (Sendmail runs on the namespace bed only" in r.stdout
    assert "IMAP: no Dovecot IMAP on the stores (Dovecot IMAP runs on the namespace bed only" in r.stdout


def test_demo_names_a_missing_part(tmp_path):
    # The same check the demo makes, for a part that is certainly absent.
    import pwmail.testbed.system as ts

    ts.PARTS["nothing-here"] = ("pwcache.no_such_part", "a part that does not exist")
    try:
        with pytest.raises(PartMissing, match=r"part nothing-here not available yet"):
            require("nothing-here")
    finally:
        del ts.PARTS["nothing-here"]


@pytest.mark.timeout(600)
def test_installed_package_runs_the_demo_outside_the_checkout(tmp_path):
    """`pip install .` into a new virtual environment, then `pwmail demo
    --once` from a folder that is not the checkout: the test bed, the NSS
    module and the Sendmail mailer files come with the package."""
    repo = Path(__file__).resolve().parents[2]
    source = tmp_path / "source"  # pip builds in the tree it is given: not in the checkout
    shutil.copytree(
        repo,
        source,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "build", "*.egg-info", "*.so", "*.so.*", "__pycache__", ".pytest_cache"
        ),
    )
    # Sendmail runs pdelivery as the user mail: the environment must not sit
    # below pytest's private (0700) temporary folder.
    place = Path(tempfile.mkdtemp(prefix="pwmail-installed-"))
    try:
        place.chmod(0o755)
        venv = place / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        build = subprocess.run(
            [str(venv / "bin" / "pip"), "install", "-q", str(source)],
            capture_output=True,
            text=True,
            timeout=400,
            cwd=tmp_path,
        )
        assert build.returncode == 0, build.stderr[-3000:]
        assert "BuildBackendWarning" not in build.stderr, build.stderr[-3000:]  # no setuptools warnings either
        r = subprocess.run(
            [str(venv / "bin" / "pwmail"), "demo", "--once", "--users", "5000"],
            capture_output=True,
            text=True,
            timeout=240,
            cwd=tmp_path,
        )
        check_account(r)
    finally:
        shutil.rmtree(place)
