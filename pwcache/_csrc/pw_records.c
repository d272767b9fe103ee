/*
 * pw_records.c - what a server's answer must look like (docs/protocol.md,
 * "Answer" and "Records"), checked before any of it is used: opened when
 * sealed, the header for our request id, and the payload in the shape the
 * op answers with, read with pw_wire.h's reader for each record type; and
 * the readers that hand a checked answer's record to the client's users.
 */
#include "pw_client_int.h"

#include <errno.h>
#include <string.h>

#include "pw_seal.h"

/* Record strings become C strings: valid UTF-8 without NUL. */
static int strs_valid(const pw_str *s, int n)
{
    for (int i = 0; i < n; i++)
        if (!pw_valid_utf8(s[i].p, s[i].n))
            return 0;
    return 1;
}

static int passwd_valid(pwp_reader *r)
{
    pw_passwd_view v;
    return pw_get_passwd(r, &v) == 0 &&
           strs_valid((pw_str[]){v.name, v.passwd, v.gecos, v.dir, v.shell, v.mailhost}, 6);
}

static int group_valid(pwp_reader *r)
{
    pw_group_view v;
    pw_str m;
    if (pw_get_group(r, &v) < 0 || !strs_valid((pw_str[]){v.name, v.passwd}, 2))
        return 0;
    while (pw_group_next_member(&v, &m) == 0)
        if (!strs_valid(&m, 1))
            return 0;
    return 1;
}

static int shadow_valid(pwp_reader *r)
{
    pw_shadow_view v;
    return pw_get_shadow(r, &v) == 0 && strs_valid((pw_str[]){v.name, v.hash}, 2);
}

/* Whether the payload has the shape `op` answers with, and nothing after. */
static int mailhost_valid(pwp_reader *r)
{
    pw_mailhost_view v;
    return pw_get_mailhost(r, &v) == 0;
}

static int gids_valid(pwp_reader *r)
{
    pw_gids_view v;
    return pw_get_gids(r, &v) == 0;
}

/* The records of a page, each read with the map's reader. */
static int page_valid(pwp_reader *r, int (*record_valid)(pwp_reader *))
{
    pw_page_view v;
    if (pw_get_page(r, &v) < 0)
        return 0;
    while (v.count--)
        if (!record_valid(&v.records))
            return 0;
    return 1;
}

/* Whether the payload has the shape `op` answers with, and nothing after. */
static int payload_valid(int op, pwp_reader r)
{
    int ok;
    switch (op) {
    case PW_OP_PASSWD_BY_NAME:
    case PW_OP_PASSWD_BY_UID:
        ok = passwd_valid(&r);
        break;
    case PW_OP_GROUP_BY_NAME:
    case PW_OP_GROUP_BY_GID:
        ok = group_valid(&r);
        break;
    case PW_OP_SHADOW_BY_NAME:
        ok = shadow_valid(&r);
        break;
    case PW_OP_INITGROUPS:
        ok = gids_valid(&r);
        break;
    case PW_OP_MAILHOST: /* pop-proxy's engine asks this */
        ok = mailhost_valid(&r);
        break;
    case PW_OP_PASSWD_ENUM:
        ok = page_valid(&r, passwd_valid);
        break;
    case PW_OP_GROUP_ENUM:
        ok = page_valid(&r, group_valid);
        break;
    case PW_OP_SHADOW_ENUM:
        ok = page_valid(&r, shadow_valid);
        break;
    default:
        ok = 0;
        break;
    }
    return ok && r.p == r.end;
}

int pwc_answer_check(const uint8_t *pkt, size_t len, uint8_t *plain, size_t plaincap,
                     int key_id, const uint8_t *key, uint64_t id, int op,
                     int *status, pwp_reader *payload)
{
    if (key_id) {
        if (pw_sealed_key_id(pkt, len) != key_id)
            return -1;
        int n = pw_unseal(key, pkt, len, plain, plaincap);
        if (n < 0)
            return -1;
        len = (size_t)n;
    } else {
        if (pw_sealed_key_id(pkt, len) != 0)
            return -1;
        if (plain != pkt) {
            if (len > plaincap)
                return -1;
            memcpy(plain, pkt, len);
        }
    }
    pwp_reader r;
    uint64_t got_id;
    int st;
    pwp_reader_init(&r, plain, len);
    if (pw_get_answer_header(&r, &got_id, &st) < 0 || got_id != id)
        return -1;
    if (st == PW_OK) {
        if (!payload_valid(op, r))
            return -1;
    } else if (st != PW_BADVERSION) {
        if (pwp_get_nil(&r) < 0 || r.p != r.end)
            return -1;
    }
    *status = st;
    *payload = r;
    return 0;
}

int pwc_answer_mailhost(const pwc_answer *ans, char *host, size_t cap, int *frozen)
{
    if (ans->status != PW_OK)
        return -ENOENT;
    pwp_reader r = ans->payload;
    pw_mailhost_view v;
    if (pw_get_mailhost(&r, &v) < 0 || v.host.n >= cap)
        return -EINVAL;
    memcpy(host, v.host.p, v.host.n);
    host[v.host.n] = '\0';
    *frozen = v.frozen;
    return 0;
}
