"""Shared pytest set-up. Tests import their helpers from the tests.support
package (pytest puts the checkout's root on sys.path: tests/ is a package)."""

import os
import pathlib

import pytest

from tests.support import pwtest


@pytest.fixture(scope="module")
def shadow_key(tmp_path_factory) -> tuple[bytes, pathlib.Path]:
    """A shadow key file for a test module: (the key, its path)."""
    path = tmp_path_factory.mktemp("keys") / "shadow.key"
    return pwtest.write_key(path), path


# ---- in CI a skipped test fails the run -------------------------------------------
# Tests skip themselves when Dovecot, Sendmail, gcc, root or the NSS library is
# missing. Outside CI that is a convenience (the reasons are listed by -ra);
# in CI (CI=true) a skip would hide a whole part behind a missing package.

_skipped: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("CI") == "true" and _skipped and exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if os.environ.get("CI") == "true" and _skipped:
        terminalreporter.write_line(
            f"CI=true: {len(_skipped)} test(s) skipped, which fails the run (first: {_skipped[0]})", red=True
        )
