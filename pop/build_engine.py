"""cffi build script for pop._engine: pop-proxy's engine (pop/_csrc), with
the C client library of the wire protocol (pwcache/_csrc, the sources
listed in its client-sources.txt) compiled in for the mailhost lookups.
API mode, plain C; cffi releases the GIL around every call, so pe_run()
runs in a thread of its own beside the asyncio loop."""

import os
import pathlib
import re

from cffi import FFI

ROOT = pathlib.Path(__file__).resolve().parent.parent


def rel(*parts: str) -> str:
    # setuptools wants source paths relative to the project root (its cwd).
    return os.path.relpath(ROOT.joinpath(*parts))


def client_sources() -> list[str]:
    """The client library's sources, as nss_module/Makefile reads them."""
    listing = ROOT / "pwcache" / "_csrc" / "client-sources.txt"
    names = (line.split("#", 1)[0].strip() for line in listing.read_text().splitlines())
    return [rel("pwcache", "_csrc", name) for name in names if name]


SOURCES = [rel("pop", "_csrc", "pop_engine.c"), *client_sources()]
INCLUDE_DIRS = [rel("pop", "_csrc"), rel("pwcache", "_csrc")]
EXTRA_COMPILE_ARGS = ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-fvisibility=hidden"]
if os.environ.get("PWMAIL_DEBUG_C"):
    EXTRA_COMPILE_ARGS += ["-O0", "-g", "-fsanitize=address,undefined"]

HEADER = ROOT / "pop" / "_csrc" / "pop_engine.h"
CFFI_REGION = re.compile(r"/\* cffi: begin \*/\n(.*?)/\* cffi: end \*/", re.S)

ffibuilder = FFI()
ffibuilder.cdef(CFFI_REGION.search(HEADER.read_text()).group(1))
ffibuilder.set_source(
    "pop._engine",
    '#include "pop_engine.h"\n',
    sources=SOURCES,
    include_dirs=INCLUDE_DIRS,
    extra_compile_args=EXTRA_COMPILE_ARGS,
    libraries=["dl", "pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
