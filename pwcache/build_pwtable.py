"""cffi build script for pwcache._pwtable (API mode, plain C, no Python.h).

Build options are read here, in one place. The C sources live in _csrc/;
CDEF lists only what Python calls. cffi releases the GIL around every call,
so the serving loop and table builds run beside the Python threads.
"""

import os
import pathlib
import re

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
# setuptools wants source paths relative to the project root (its cwd).
CSRC = pathlib.Path(os.path.relpath(HERE / "_csrc"))
SOURCES = ["pw_wire.c", "pw_seal.c", "pw_placement.c", "pw_table.c", "pw_delta.c", "pw_server.c"]
EXTRA_COMPILE_ARGS = ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-fvisibility=hidden"]
if os.environ.get("PWMAIL_DEBUG_C"):
    EXTRA_COMPILE_ARGS += ["-O0", "-g", "-fsanitize=address,undefined"]

HEADERS = ["pw_wire.h", "pw_placement.h", "pw_table.h", "pw_server.h"]
CFFI_REGION = re.compile(r"/\* cffi: begin.*?\*/\n(.*?)/\* cffi: end \*/", re.S)

# Constants (values from the C headers) and the seal functions, whose
# header sizes arrays with a macro that cdef cannot read.
CDEF_EXTRA = """
#define PW_MAX_REQUEST ...
#define PW_MAX_UDP_ANSWER ...
#define PW_MAX_TCP_ANSWER ...
#define PW_SEAL_OVERHEAD ...
#define PW_KEY_BYTES ...
int pw_valid_name(const char *s, size_t n);
int pw_seal_available(void);
int pw_parse_key(const char *text, size_t len, uint8_t key[32]);
int pw_seal(const uint8_t key[32], int key_id, const uint8_t *in, size_t len,
            uint8_t *out, size_t cap);
int pw_unseal(const uint8_t key[32], const uint8_t *in, size_t len,
              uint8_t *out, size_t cap);
"""


def cdef_from_headers() -> str:
    """The header is the cdef: each header marks what Python may call
    between `/* cffi: begin */` and `/* cffi: end */`."""
    parts = []
    for name in HEADERS:
        text = (HERE / "_csrc" / name).read_text()
        regions = CFFI_REGION.findall(text)
        if not regions:
            raise RuntimeError(f"{name}: no cffi region")
        parts += regions
    return "\n".join(parts) + CDEF_EXTRA


CDEF = cdef_from_headers()

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "pwcache._pwtable",
    "".join(f'#include "{h}"\n' for h in HEADERS + ["pw_seal.h"]),
    sources=[str(CSRC / s) for s in SOURCES],
    include_dirs=[str(CSRC)],
    extra_compile_args=EXTRA_COMPILE_ARGS,
    libraries=["dl", "pthread", "m"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
