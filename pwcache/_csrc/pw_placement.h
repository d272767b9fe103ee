/*
 * pw_placement.h - the default placement rule (docs/placement.md): which
 * storage host holds the mailbox of a user that the mailhosts map omits.
 *
 * The twin in Python is pwcache/placement.py; both are checked against
 * tests/vectors/placement.json.
 */
#ifndef PW_PLACEMENT_H
#define PW_PLACEMENT_H

#include <stddef.h>
#include <stdint.h>

#define PWPL_MAX_HOSTS 1024
#define PWPL_MAX_RANGES 256
#define PWPL_MAX_HOST_LEN 255

/* cffi: begin (build_pwtable.py reads this part as its cdef) */
enum pwpl_kind { PWPL_RANGES = 0, PWPL_HASH = 1 };

typedef struct pwpl_rule pwpl_rule;

/* An empty rule of `kind` (no hosts: pwpl_pick returns -1). */
pwpl_rule *pwpl_new(int kind);
void pwpl_free(pwpl_rule *r);
/* Adds a host (weight > 0; for "ranges" weights are ignored). Returns its
 * index, or -1 (too many, bad name, bad weight). */
int pwpl_add_host(pwpl_rule *r, const char *name, size_t n, double weight);
/* For "ranges": first..last (bytes, lowercase) go to host index `host`. */
int pwpl_add_range(pwpl_rule *r, int first, int last, int host);
int pwpl_nhosts(const pwpl_rule *r);
const char *pwpl_host(const pwpl_rule *r, int i, size_t *n);
/* Index of the host for `name`, or -1 when the rule has no host. */
int pwpl_pick(const pwpl_rule *r, const char *name, size_t n);
/* cffi: end */

/* FNV-1a 64 (also the table's name hash). */
static inline uint64_t pw_fnv1a(uint64_t h, const void *p, size_t n)
{
    const uint8_t *b = p;
    for (size_t i = 0; i < n; i++) {
        h ^= b[i];
        h *= 0x100000001b3ull;
    }
    return h;
}
#define PW_FNV_BASIS 0xcbf29ce484222325ull

#endif /* PW_PLACEMENT_H */
