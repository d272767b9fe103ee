"""Shared pytest set-up: tests import their helpers (pwtest, testbed, ...)
from this folder."""
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import pwtest  # noqa: E402  (found through the line above)


@pytest.fixture(scope="module")
def shadow_key(tmp_path_factory) -> tuple[bytes, pathlib.Path]:
    """A shadow key file for a test module: (the key, its path)."""
    path = tmp_path_factory.mktemp("keys") / "shadow.key"
    return pwtest.write_key(path), path
