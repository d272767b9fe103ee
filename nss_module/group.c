/*
 * group.c - the group map: getgrnam_r, getgrgid_r, and enumeration.
 * Big groups (50,000 members) come over TCP (TRUNCATED, see pwcache/_csrc/pw_transport.c).
 */
#define _GNU_SOURCE
#include <grp.h>
#include <stdint.h>

#include "nss_pwserver.h"

/* Packs a group record: the member pointer array first (aligned), then the
 * strings. Sizes are summed before anything is written. */
static int pack_group(pwp_reader *r, void *result, char *buf, size_t buflen)
{
    struct group *gr = result;
    pw_group_view v;
    pw_str m;
    if (pw_get_group(r, &v) < 0)
        return -EAGAIN;
    size_t misalign = (uintptr_t)buf % __alignof__(char *);
    size_t pad = misalign ? __alignof__(char *) - misalign : 0;
    size_t need = pad + ((size_t)v.nmembers + 1) * sizeof(char *) + pwnss_str_size(v.name) +
                  pwnss_str_size(v.passwd);
    pw_group_view count = v;
    while (pw_group_next_member(&count, &m) == 0)
        need += pwnss_str_size(m);
    if (need > buflen)
        return -ERANGE;
    char **members = (char **)(void *)(buf + pad);
    pwnss_pack k = {(char *)(members + v.nmembers + 1), buf + buflen};
    gr->gr_name = pwnss_put_str(&k, v.name);
    gr->gr_passwd = pwnss_put_str(&k, v.passwd);
    gr->gr_gid = (gid_t)v.gid;
    size_t i = 0;
    while (pw_group_next_member(&v, &m) == 0)
        members[i++] = pwnss_put_str(&k, m);
    members[i] = NULL;
    gr->gr_mem = members;
    return 0;
}

PWNSS_EXPORT enum nss_status _nss_pwserver_getgrnam_r(const char *name, struct group *gr,
                                                      char *buf, size_t buflen, int *errnop)
{
    int saved = pwnss_enter();
    int rc = pwc_lookup(PW_OP_GROUP_BY_NAME, name, 0, pack_group, gr, buf, buflen);
    return pwnss_status(rc, errnop, saved);
}

PWNSS_EXPORT enum nss_status _nss_pwserver_getgrgid_r(gid_t gid, struct group *gr, char *buf,
                                                      size_t buflen, int *errnop)
{
    int saved = pwnss_enter();
    int rc = pwc_lookup(PW_OP_GROUP_BY_GID, NULL, gid, pack_group, gr, buf, buflen);
    return pwnss_status(rc, errnop, saved);
}

PWNSS_ENUM_FUNCTIONS(gr, struct group, pwnss_enum_group, pack_group)
