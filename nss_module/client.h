/*
 * client.h - the part of libnss_pwserver.so.2 that every map shares:
 * configuration (/etc/pwserver.conf), the shared health record, and one
 * hedged request/answer exchange with the password servers.
 *
 * The wire format is docs/protocol.md, implemented once in
 * pwcache/_csrc/pw_wire.c; the client behaviour (failover, health record)
 * is described in docs/nss.md.
 *
 * Internal functions return 0 or a negative errno:
 *   -ENOENT  a server said NOTFOUND (or the key can never exist)
 *   -ERANGE  the caller's buffer is too small
 *   -EAGAIN  no server answered (NSS_STATUS_UNAVAIL)
 *   -EACCES  shadow without the shadow key, or DENIED
 *   -EINVAL  a server said BADREQUEST
 *   -ENOMEM  out of memory
 * Only the exported _nss_pwserver_* functions map them to NSS_STATUS_*.
 */
#ifndef PWNSS_CLIENT_H
#define PWNSS_CLIENT_H

#include <errno.h>
#include <nss.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "pw_wire.h"

#define PWNSS_EXPORT __attribute__((visibility("default")))

/* Type-checks every _nss_pwserver_* definition against glibc's nss.h. */
NSS_DECLARE_MODULE_FUNCTIONS(pwserver)

/* Room for the largest datagram a server may send (sealed or not). */
#define PWC_UDP_BUF (PW_MAX_UDP_ANSWER + PW_SEAL_OVERHEAD)

typedef struct {
    int status;            /* PW_OK or PW_NOTFOUND */
    pwp_reader payload;    /* at the payload object (valid when PW_OK) */
    uint8_t *heap;         /* TCP answers; NULL for UDP */
    uint8_t udp[PWC_UDP_BUF];
} pwc_answer;

/* One lookup: `name` for string ops (NUL-terminated), `num` for int ops.
 * On 0, *ans holds a checked answer (its payload has the shape `op`
 * expects); release it with pwc_answer_free whatever the result. */
int pwc_query(int op, const char *name, uint64_t num, pwc_answer *ans);
void pwc_answer_free(pwc_answer *ans);

/* Whether `enumerate yes` is configured. */
int pwc_enumerate_enabled(void);

/* Maps an internal result to NSS_STATUS_*, sets *errnop, and restores errno
 * (to `saved_errno` on success, to *errnop on failure). */
enum nss_status pwc_status(int rc, int *errnop, int saved_errno);

/* Saves errno at the start of an exported function. */
static inline int pwc_enter(void)
{
    return errno;
}

/* ---- enumeration (setXXent / getXXent_r / endXXent) ------------------- */

/* Packs one record (reader at it) into the caller's struct and buffer:
 * 0, -ERANGE, or -EAGAIN when the record is malformed. */
typedef int (*pwc_pack_fn)(pwp_reader *rec, void *result, char *buf, size_t buflen);

/* A lookup by name (name != NULL, checked first) or by number, packed with
 * `pack`: 0, -ENOENT, -ERANGE, -EAGAIN, ... */
int pwc_lookup(int op, const char *name, uint64_t num, pwc_pack_fn pack, void *result,
               char *buf, size_t buflen);

typedef struct pwc_enum pwc_enum;
extern pwc_enum pwc_enum_passwd, pwc_enum_group, pwc_enum_shadow;

/* setXXent / endXXent: back to the first record; always SUCCESS, errno
 * untouched. */
enum nss_status pwc_enum_reset(pwc_enum *e);
/* Next record; on -ERANGE the same record comes back on the next call. */
int pwc_enum_next(pwc_enum *e, pwc_pack_fn pack, void *result, char *buf, size_t buflen);

/* Defines _nss_pwserver_setXXent, getXXent_r and endXXent for one map. */
#define PWNSS_ENUM_FUNCTIONS(map, type, state, pack)                                      \
    PWNSS_EXPORT enum nss_status _nss_pwserver_set##map##ent(int stayopen)                \
    {                                                                                     \
        (void)stayopen;                                                                   \
        return pwc_enum_reset(&(state));                                                  \
    }                                                                                     \
    PWNSS_EXPORT enum nss_status _nss_pwserver_get##map##ent_r(type *result, char *buf,   \
                                                               size_t buflen, int *errnop) \
    {                                                                                     \
        int saved = pwc_enter();                                                          \
        int rc = pwc_enum_next(&(state), (pack), result, buf, buflen);                    \
        return pwc_status(rc, errnop, saved);                                             \
    }                                                                                     \
    PWNSS_EXPORT enum nss_status _nss_pwserver_end##map##ent(void)                        \
    {                                                                                     \
        return pwc_enum_reset(&(state));                                                  \
    }

/* ---- packing into the caller's buffer (two passes: size, then copy) --- */

typedef struct {
    char *p;
    char *end;
} pwc_pack;

/* Size a string takes in the buffer (with its NUL). */
static inline size_t pwc_str_size(pw_str s)
{
    return (size_t)s.n + 1;
}

/* Copies a string; the caller has checked the room. */
static inline char *pwc_put_str(pwc_pack *k, pw_str s)
{
    char *out = k->p;
    if (s.n)
        memcpy(out, s.p, s.n);
    out[s.n] = '\0';
    k->p += s.n + 1;
    return out;
}

#endif /* PWNSS_CLIENT_H */
