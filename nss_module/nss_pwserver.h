/*
 * nss_pwserver.h - what the maps of libnss_pwserver.so.2 share: the glue
 * between glibc's NSS interface and the C client of the wire protocol
 * (pwcache/_csrc/pw_client.h, which does the lookups).
 *
 * Internal functions return 0 or a negative errno (pw_client.h); only the
 * exported _nss_pwserver_* functions map them to NSS_STATUS_*, through
 * pwnss_status.
 */
#ifndef NSS_PWSERVER_H
#define NSS_PWSERVER_H

#include <errno.h>
#include <nss.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "pw_client.h"

#define PWNSS_EXPORT __attribute__((visibility("default")))

/* Type-checks every _nss_pwserver_* definition against glibc's nss.h. */
NSS_DECLARE_MODULE_FUNCTIONS(pwserver)

/* Saves errno at the start of an exported function. */
static inline int pwnss_enter(void)
{
    return errno;
}

/* Maps an internal result to NSS_STATUS_*, sets *errnop, and restores errno
 * (to `saved_errno` on success, to *errnop on failure). */
static inline enum nss_status pwnss_status(int rc, int *errnop, int saved_errno)
{
    enum nss_status st;
    switch (rc) {
    case 0:
        errno = saved_errno;
        return NSS_STATUS_SUCCESS;
    case -ENOENT:
        st = NSS_STATUS_NOTFOUND;
        break;
    case -ERANGE: /* glibc calls again with a bigger buffer */
    case -ENOMEM:
        st = NSS_STATUS_TRYAGAIN;
        break;
    default:
        st = NSS_STATUS_UNAVAIL;
        break;
    }
    *errnop = -rc;
    errno = -rc;
    return st;
}

/* ---- enumeration (setXXent / getXXent_r / endXXent, enum.c) ----------- */

typedef struct pwnss_enum pwnss_enum;
extern pwnss_enum pwnss_enum_passwd, pwnss_enum_group, pwnss_enum_shadow;

/* setXXent / endXXent: back to the first record; always SUCCESS, errno
 * untouched. */
enum nss_status pwnss_enum_reset(pwnss_enum *e);
/* Next record; on -ERANGE the same record comes back on the next call. */
int pwnss_enum_next(pwnss_enum *e, pwc_pack_fn pack, void *result, char *buf, size_t buflen);

/* Defines _nss_pwserver_setXXent, getXXent_r and endXXent for one map. */
#define PWNSS_ENUM_FUNCTIONS(map, type, state, pack)                                      \
    PWNSS_EXPORT enum nss_status _nss_pwserver_set##map##ent(int stayopen)                \
    {                                                                                     \
        (void)stayopen;                                                                   \
        return pwnss_enum_reset(&(state));                                                \
    }                                                                                     \
    PWNSS_EXPORT enum nss_status _nss_pwserver_get##map##ent_r(type *result, char *buf,   \
                                                               size_t buflen, int *errnop) \
    {                                                                                     \
        int saved = pwnss_enter();                                                        \
        int rc = pwnss_enum_next(&(state), (pack), result, buf, buflen);                  \
        return pwnss_status(rc, errnop, saved);                                           \
    }                                                                                     \
    PWNSS_EXPORT enum nss_status _nss_pwserver_end##map##ent(void)                        \
    {                                                                                     \
        return pwnss_enum_reset(&(state));                                                \
    }

/* ---- packing into the caller's buffer (two passes: size, then copy) --- */

typedef struct {
    char *p;
    char *end;
} pwnss_pack;

/* Size a string takes in the buffer (with its NUL). */
static inline size_t pwnss_str_size(pw_str s)
{
    return (size_t)s.n + 1;
}

/* Copies a string; the caller has checked the room. */
static inline char *pwnss_put_str(pwnss_pack *k, pw_str s)
{
    char *out = k->p;
    if (s.n)
        memcpy(out, s.p, s.n);
    out[s.n] = '\0';
    k->p += s.n + 1;
    return out;
}

#endif /* NSS_PWSERVER_H */
