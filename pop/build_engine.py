"""cffi build script for pop._engine: pop-proxy's engine (pop/_csrc), with
libnss_pwserver's client (nss_module/client.c) and the wire format
(pwcache/_csrc) compiled in for the mailhost lookups. API mode, plain C;
cffi releases the GIL around every call, so pe_run() runs in a thread of
its own beside the asyncio loop."""
import os
import pathlib
import re

from cffi import FFI

ROOT = pathlib.Path(__file__).resolve().parent.parent


def rel(*parts: str) -> str:
    # setuptools wants source paths relative to the project root (its cwd).
    return os.path.relpath(ROOT.joinpath(*parts))


SOURCES = [rel("pop", "_csrc", "pop_engine.c"), rel("nss_module", "client.c"),
           rel("pwcache", "_csrc", "pw_wire.c"), rel("pwcache", "_csrc", "pw_seal.c")]
INCLUDE_DIRS = [rel("pop", "_csrc"), rel("nss_module"), rel("pwcache", "_csrc")]
EXTRA_COMPILE_ARGS = ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-fvisibility=hidden"]
if os.environ.get("PWMAIL_DEBUG_C"):
    EXTRA_COMPILE_ARGS += ["-O0", "-g", "-fsanitize=address,undefined"]

HEADER = ROOT / "pop" / "_csrc" / "pop_engine.h"
CFFI_REGION = re.compile(r"/\* cffi: begin \*/\n(.*?)/\* cffi: end \*/", re.S)

ffibuilder = FFI()
ffibuilder.cdef(CFFI_REGION.search(HEADER.read_text()).group(1))
ffibuilder.set_source("pop._engine", '#include "pop_engine.h"\n', sources=SOURCES, include_dirs=INCLUDE_DIRS,
                      extra_compile_args=EXTRA_COMPILE_ARGS, libraries=["dl", "pthread"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
