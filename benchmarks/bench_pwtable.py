"""pytest-benchmark of table lookups (run by hand, never in make test):

    .venv/bin/pytest benchmarks/bench_pwtable.py --benchmark-columns=min,median,ops

The C table (through the cffi wrapper, so the figures include the Python
call) against a Python dict holding the same packed records: the wrapper
must not cost much more than a dict lookup, and the answer path in C
(ServerCore.answer: decode, look up, encode) is timed too.
"""

import pathlib
import random
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # tests.support

from pwcache.server import ServerCore  # noqa: E402
from pwcache.table import Table  # noqa: E402
from tests.support.pwserver_util import request, write_many_users  # noqa: E402

N = 100_000


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    paths = write_many_users(tmp_path_factory.mktemp("users"), N)
    with Table.from_files(paths["passwd"], paths["shadow"], paths["group"], paths["mailhosts"]) as t:
        yield t


@pytest.fixture(scope="module")
def names():
    rnd = random.Random(1)
    return [f"{chr(97 + i % 26)}user{i:07d}" for i in (rnd.randrange(N) for _ in range(1000))]


def test_c_table_passwd_by_name(benchmark, table, names):
    it = iter(names * 10_000)
    assert benchmark(lambda: table.passwd_by_name(next(it))) is not None


def test_c_table_passwd_by_uid(benchmark, table):
    rnd = random.Random(2)
    it = iter([10000 + rnd.randrange(N) for _ in range(1000)] * 10_000)
    assert benchmark(lambda: table.passwd_by_uid(next(it))) is not None


def test_python_dict_of_the_same_records(benchmark, table, names):
    d = {n: table.passwd_by_name(n) for n in names}
    it = iter(names * 10_000)
    assert benchmark(lambda: d.get(next(it))) is not None


def test_c_answer_path(benchmark, table, names):
    with ServerCore() as core:
        core.install(Table.from_bytes(b"".join(f"{n}:x:{i}:1::/h:/bin/sh\n".encode() for i, n in enumerate(names))), 0)
        udp = core.answerer(tcp=False)
        packets = [request("passwd", n, rid=1) for n in names]
        it = iter(packets * 10_000)
        assert benchmark(lambda: udp.answer(next(it))) is not None
        udp.close()
