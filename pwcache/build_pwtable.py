"""cffi build script for pwcache._pwtable (API mode, plain C, no Python.h).

Build options are read here, in one place. The C sources live in _csrc/;
CDEF lists only what Python calls. cffi releases the GIL around every call,
so the serving loop and table builds run beside the Python threads.
"""
import os
import pathlib

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
# setuptools wants source paths relative to the project root (its cwd).
CSRC = pathlib.Path(os.path.relpath(HERE / "_csrc"))
SOURCES = ["pw_wire.c", "pw_seal.c", "pw_placement.c", "pw_table.c", "pw_server.c"]
EXTRA_COMPILE_ARGS = ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-fvisibility=hidden"]
if os.environ.get("PWMAIL_DEBUG_C"):
    EXTRA_COMPILE_ARGS += ["-O0", "-g", "-fsanitize=address,undefined"]

CDEF = """
#define PW_MAX_REQUEST 1024
#define PW_MAX_UDP_ANSWER 8192
#define PW_MAX_TCP_ANSWER 16777216
#define PW_SEAL_OVERHEAD 42
#define PW_KEY_BYTES 32

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

/* pw_placement.h */
#define PWPL_RANGES 0
#define PWPL_HASH 1
typedef struct pwpl_rule pwpl_rule;
pwpl_rule *pwpl_new(int kind);
void pwpl_free(pwpl_rule *r);
int pwpl_add_host(pwpl_rule *r, const char *name, size_t n, double weight);
int pwpl_add_range(pwpl_rule *r, int first, int last, int host);
int pwpl_pick(const pwpl_rule *r, const char *name, size_t n);

/* pw_table.h */
typedef struct pwt_table pwt_table;
typedef struct {
    uint64_t users, groups, shadows;
    uint64_t passwd_bad, passwd_dup_name, passwd_dup_uid;
    uint64_t shadow_bad, shadow_dup, shadow_orphan;
    uint64_t group_bad, group_dup_name, group_dup_gid, group_bad_member;
    uint64_t mailhosts_bad, mailhosts_dup, mailhosts_unknown;
    uint64_t too_many_groups;
    uint64_t bytes;
} pwt_load_stats;
pwt_table *pwt_build(const char *passwd, size_t passwd_len,
                     const char *shadow, size_t shadow_len,
                     const char *group, size_t group_len,
                     const char *mailhosts, size_t mailhosts_len,
                     const pwpl_rule *rule, char *err, size_t errcap);
pwt_table *pwt_load_files(const char *passwd, const char *shadow,
                          const char *group, const char *mailhosts,
                          const pwpl_rule *rule, char *err, size_t errcap);
void pwt_free(pwt_table *t);
void pwt_get_stats(const pwt_table *t, pwt_load_stats *st);
const uint8_t *pwt_passwd_by_name(const pwt_table *t, const char *name, size_t n, uint32_t *len);
const uint8_t *pwt_passwd_by_uid(const pwt_table *t, uint32_t uid, uint32_t *len);
const uint8_t *pwt_shadow_by_name(const pwt_table *t, const char *name, size_t n, uint32_t *len);
const uint8_t *pwt_group_by_name(const pwt_table *t, const char *name, size_t n, uint32_t *len);
const uint8_t *pwt_group_by_gid(const pwt_table *t, uint32_t gid, uint32_t *len);
int pwt_mailhost(const pwt_table *t, const char *name, size_t n,
                 const char **host, size_t *host_len, int *frozen);
int pwt_initgroups(const pwt_table *t, const char *name, size_t n,
                   const uint32_t **gids, uint32_t *count);

/* pw_server.h */
typedef struct pws_server pws_server;
pws_server *pws_new(void);
void pws_free(pws_server *s);
void pws_set_keys(pws_server *s, const uint8_t *network_key, const uint8_t *shadow_key);
int pws_allow(pws_server *s, int family, const uint8_t *addr, int prefix);
int pws_source_allowed(pws_server *s, int slot, int family, const uint8_t *addr);
pwt_table *pws_swap_table(pws_server *s, pwt_table *t, uint64_t generation, uint64_t load_ms);
int pws_slot_acquire(pws_server *s);
void pws_slot_release(pws_server *s, int slot);
size_t pws_answer(pws_server *s, int slot, const uint8_t *req, size_t len,
                  int tcp, uint8_t *out, size_t cap);
int pws_serve_udp(pws_server *s, int fd, int slot);
void pws_stop(pws_server *s);
int pws_ncounters(void);
const char *pws_counter_name(int i);
uint64_t pws_counter(pws_server *s, int i);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "pwcache._pwtable",
    '#include "pw_wire.h"\n#include "pw_seal.h"\n#include "pw_placement.h"\n'
    '#include "pw_table.h"\n#include "pw_server.h"\n',
    sources=[str(CSRC / s) for s in SOURCES],
    include_dirs=[str(CSRC)],
    extra_compile_args=EXTRA_COMPILE_ARGS,
    libraries=["dl", "pthread", "m"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
