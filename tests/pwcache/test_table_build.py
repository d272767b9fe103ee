"""The build script: its cdef comes from the headers' cffi regions, and the
built module has every function Python calls."""

import pathlib
import re

from pwcache._pwtable import ffi, lib

from pwcache import build_pwtable

PKG = pathlib.Path(build_pwtable.__file__).resolve().parent


def test_cdef_is_read_from_every_header():
    for header in build_pwtable.HEADERS:
        text = (PKG / "_csrc" / header).read_text()
        region = build_pwtable.CFFI_REGION.search(text).group(1)
        first = next(line for line in region.splitlines() if line and not line.startswith(("/*", " *")))
        assert first in build_pwtable.CDEF, header


def test_every_function_python_calls_is_built():
    used = set()
    for module in ("table.py", "server.py"):
        used |= set(re.findall(r"\blib\.(\w+)", (PKG / module).read_text()))
    assert used, "no lib.* calls found"
    for name in sorted(used):
        assert hasattr(lib, name), name


def test_constants_come_from_the_c_headers():
    assert lib.PW_MAX_REQUEST == 1024
    assert lib.PW_MAX_UDP_ANSWER == 8192
    assert lib.PW_MAX_TCP_ANSWER == 16 * 1024 * 1024
    assert lib.PW_SEAL_OVERHEAD == 2 + 24 + 16
    assert ffi.sizeof("pwt_load_stats") == 8 * len(ffi.typeof("pwt_load_stats").fields)
