"""The PostgreSQL server of the database tests: one for the session
(tests/support/pg_util.py), each test makes its own database in it."""

from __future__ import annotations

import pytest

from tests.support import pg_util


@pytest.fixture(scope="session")
def pg():
    server = pg_util.PostgresServer()
    try:
        yield server.start()
    finally:
        server.stop()
