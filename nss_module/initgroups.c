/*
 * initgroups.c - the initgroups map (initgroups_dyn): the supplementary
 * groups of a user, in one request instead of a scan of every group.
 */
#define _GNU_SOURCE
#include <grp.h>
#include <stdlib.h>

#include "nss_pwserver.h"

/* Appends gid to the caller's array unless present; grows it up to limit
 * (limit <= 0: no limit). Returns 0, or -ENOMEM. */
static int add_gid(gid_t gid, long *start, long *size, gid_t **groupsp, long limit)
{
    for (long i = 0; i < *start; i++)
        if ((*groupsp)[i] == gid)
            return 0;
    if (*start == *size) {
        if (limit > 0 && *size >= limit)
            return 0; /* full: glibc caps the list at limit */
        long newsize = *size ? 2 * *size : 16;
        if (limit > 0 && newsize > limit)
            newsize = limit;
        gid_t *grown = realloc(*groupsp, (size_t)newsize * sizeof **groupsp);
        if (!grown)
            return -ENOMEM;
        *groupsp = grown;
        *size = newsize;
    }
    (*groupsp)[(*start)++] = gid;
    return 0;
}

PWNSS_EXPORT enum nss_status _nss_pwserver_initgroups_dyn(const char *user, gid_t group,
                                                          long *start, long *size,
                                                          gid_t **groupsp, long limit,
                                                          int *errnop)
{
    int saved = pwnss_enter();
    int rc = -ENOENT;
    if (pw_valid_name(user, strlen(user))) {
        pwc_answer ans;
        rc = pwc_query(PW_OP_INITGROUPS, user, 0, &ans);
        if (rc == 0 && ans.status != PW_OK)
            rc = -ENOENT;
        if (rc == 0) {
            /* shape checked by pwc_query */
            pwp_reader r = ans.payload;
            pw_gids_view gids;
            uint64_t gid;
            if (pw_get_gids(&r, &gids) < 0)
                rc = -EAGAIN;
            while (rc == 0 && pw_gids_next(&gids, &gid) == 0)
                if ((gid_t)gid != group)
                    rc = add_gid((gid_t)gid, start, size, groupsp, limit);
        }
        pwc_answer_free(&ans);
    }
    return pwnss_status(rc, errnop, saved);
}
