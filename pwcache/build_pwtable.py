"""cffi build script for pwcache._pwtable (API mode, plain C, no Python.h).

Build options are read here, in one place. The C sources live in _csrc/;
CDEF lists only what Python calls.
"""
import os
import pathlib

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
# setuptools wants source paths relative to the project root (its cwd).
CSRC = pathlib.Path(os.path.relpath(HERE / "_csrc"))
SOURCES = ["pw_wire.c", "pw_seal.c"]
EXTRA_COMPILE_ARGS = ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-fvisibility=hidden"]
if os.environ.get("PWMAIL_DEBUG_C"):
    EXTRA_COMPILE_ARGS += ["-O0", "-g", "-fsanitize=address,undefined"]

CDEF = """
typedef struct { uint64_t id; int op; int arg_kind; const char *name;
                 uint32_t name_len; uint64_t num; } pw_request;
int pw_encode_request(void *out, size_t cap, const pw_request *req, size_t pad_to);
int pw_decode_request(const void *data, size_t len, pw_request *req, int *id_known);
int pw_valid_name(const char *s, size_t n);
int pw_seal_available(void);
int pw_parse_key(const char *text, size_t len, uint8_t key[32]);
int pw_seal(const uint8_t key[32], int key_id, const uint8_t *in, size_t len,
            uint8_t *out, size_t cap);
int pw_unseal(const uint8_t key[32], const uint8_t *in, size_t len,
              uint8_t *out, size_t cap);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "pwcache._pwtable",
    '#include "pw_wire.h"\n#include "pw_seal.h"\n',
    sources=[str(CSRC / s) for s in SOURCES],
    include_dirs=[str(CSRC)],
    extra_compile_args=EXTRA_COMPILE_ARGS,
    libraries=["dl", "pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
