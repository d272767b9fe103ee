/*
 * passwd.c - the passwd map: getpwnam_r, getpwuid_r, and enumeration.
 */
#define _GNU_SOURCE
#include <pwd.h>

#include "nss_pwserver.h"

/* Packs a passwd record into *pw and buf (two passes: size, then copy). */
static int pack_passwd(pwp_reader *r, void *result, char *buf, size_t buflen)
{
    struct passwd *pw = result;
    pw_passwd_view v;
    if (pw_get_passwd(r, &v) < 0)
        return -EAGAIN;
    size_t need = pwnss_str_size(v.name) + pwnss_str_size(v.passwd) + pwnss_str_size(v.gecos) +
                  pwnss_str_size(v.dir) + pwnss_str_size(v.shell);
    if (need > buflen)
        return -ERANGE;
    pwnss_pack k = {buf, buf + buflen};
    pw->pw_name = pwnss_put_str(&k, v.name);
    pw->pw_passwd = pwnss_put_str(&k, v.passwd);
    pw->pw_uid = (uid_t)v.uid;
    pw->pw_gid = (gid_t)v.gid;
    pw->pw_gecos = pwnss_put_str(&k, v.gecos);
    pw->pw_dir = pwnss_put_str(&k, v.dir);
    pw->pw_shell = pwnss_put_str(&k, v.shell);
    return 0;
}

PWNSS_EXPORT enum nss_status _nss_pwserver_getpwnam_r(const char *name, struct passwd *pw,
                                                      char *buf, size_t buflen, int *errnop)
{
    int saved = pwnss_enter();
    int rc = pwc_lookup(PW_OP_PASSWD_BY_NAME, name, 0, pack_passwd, pw, buf, buflen);
    return pwnss_status(rc, errnop, saved);
}

PWNSS_EXPORT enum nss_status _nss_pwserver_getpwuid_r(uid_t uid, struct passwd *pw, char *buf,
                                                      size_t buflen, int *errnop)
{
    int saved = pwnss_enter();
    int rc = pwc_lookup(PW_OP_PASSWD_BY_UID, NULL, uid, pack_passwd, pw, buf, buflen);
    return pwnss_status(rc, errnop, saved);
}

PWNSS_ENUM_FUNCTIONS(pw, struct passwd, pwnss_enum_passwd, pack_passwd)
