/*
 * shadow.c - the shadow map: getspnam_r and enumeration. Requests are
 * sealed with the shadow key, which only root can read
 * (pwcache/_csrc/pw_client.c); without it the answer is UNAVAIL with
 * EACCES and nothing is sent.
 */
#define _GNU_SOURCE
#include <shadow.h>

#include "nss_pwserver.h"

static int pack_shadow(pwp_reader *r, void *result, char *buf, size_t buflen)
{
    struct spwd *sp = result;
    pw_shadow_view v;
    if (pw_get_shadow(r, &v) < 0)
        return -EAGAIN;
    if (pwnss_str_size(v.name) + pwnss_str_size(v.hash) > buflen)
        return -ERANGE;
    pwnss_pack k = {buf, buf + buflen};
    sp->sp_namp = pwnss_put_str(&k, v.name);
    sp->sp_pwdp = pwnss_put_str(&k, v.hash);
    /* -1 on the wire is an empty field, as shadow(5) and glibc use -1 */
    sp->sp_lstchg = (long)v.lastchg;
    sp->sp_min = (long)v.min;
    sp->sp_max = (long)v.max;
    sp->sp_warn = (long)v.warn;
    sp->sp_inact = (long)v.inact;
    sp->sp_expire = (long)v.expire;
    sp->sp_flag = (unsigned long)(long)v.flag;
    return 0;
}

PWNSS_EXPORT enum nss_status _nss_pwserver_getspnam_r(const char *name, struct spwd *sp,
                                                      char *buf, size_t buflen, int *errnop)
{
    int saved = pwnss_enter();
    int rc = pwc_lookup(PW_OP_SHADOW_BY_NAME, name, 0, pack_shadow, sp, buf, buflen);
    return pwnss_status(rc, errnop, saved);
}

PWNSS_ENUM_FUNCTIONS(sp, struct spwd, pwnss_enum_shadow, pack_shadow)
