/*
 * pd_route.c - user -> mailhost, as delivery/pdelivery.py's Router: the
 * user's name from the address, PASSWD_BY_NAME (exists? its host) and
 * MAILHOST (frozen? its host) through the shared C client
 * (pwcache/_csrc/pw_client.h), else the [placement] rule.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "pd.h"
#include "pw_client.h"
#include "pw_placement.h"

/* delivery/users.py user_from_address: `Juan+tag@example.com` -> `juan`. */
static void user_from_address(const char *address, const char *delimiter, char *out, size_t cap)
{
    const char *a = address, *end = address + strlen(address);
    while (a < end && strchr(" \t\r\n\f\v", *a))
        a++;
    while (end > a && strchr(" \t\r\n\f\v", end[-1]))
        end--;
    while (a < end && (*a == '<' || *a == '>'))
        a++;
    while (end > a && (end[-1] == '<' || end[-1] == '>'))
        end--;
    for (const char *p = end; p > a; p--)       /* the local part: before the last @ */
        if (p[-1] == '@') {
            end = p - 1;
            break;
        }
    size_t dn = strlen(delimiter);
    if (dn)
        for (const char *p = a; p + dn <= end; p++)
            if (!memcmp(p, delimiter, dn)) {
                end = p;
                break;
            }
    size_t n = (size_t)(end - a);
    if (n >= cap)
        n = cap - 1;   /* too long to be a user: check_user refuses it below */
    for (size_t i = 0; i < n; i++)
        out[i] = (char)(a[i] >= 'A' && a[i] <= 'Z' ? a[i] + 32 : a[i]);
    out[n] = 0;
}

/* delivery/layout.py check_user: printable ASCII, no '/', no leading '.'. */
static int usable_user(const char *user)
{
    size_t n = strlen(user);
    if (n == 0 || n > PD_USER_MAX || user[0] == '.')
        return 0;
    for (size_t i = 0; i < n; i++)
        if (user[i] < '!' || user[i] > '~' || user[i] == '/')
            return 0;
    return 1;
}

typedef struct {
    char host[PD_HOST_MAX];
} passwd_host;

/* The host of a passwd answer (the rest of the record is not needed). */
static int pack_host(pwp_reader *r, void *result, char *buf, size_t buflen)
{
    (void)buf, (void)buflen;
    passwd_host *out = result;
    pw_passwd_view v;
    if (pw_get_passwd(r, &v) < 0)
        return -EAGAIN;
    if (v.mailhost.n >= sizeof out->host)
        return -EINVAL;
    memcpy(out->host, v.mailhost.p, v.mailhost.n);
    out->host[v.mailhost.n] = 0;
    return 0;
}

static const char *lookup_error(int rc)
{
    switch (rc) {
    case -EAGAIN: return "no password server answered";
    case -EACCES: return "refused by the password server";
    case -EINVAL: return "bad request, or an answer that does not fit";
    case -ENOMEM: return "out of memory";
    default: return strerror(-rc);
    }
}

void pd_route_user(const pd_conf *c, const char *address, pd_route *out)
{
    char user[PD_USER_MAX + 2];
    passwd_host pw = {""};
    char mh[PD_HOST_MAX] = "";
    int frozen = 0;
    out->host[0] = 0;
    user_from_address(address, c->recipient_delimiter, user, sizeof user);
    if (!usable_user(user)) {
        pd_reply_set(&out->reply, 550, "5.1.3", "bad recipient address");
        return;
    }
    char scratch[1];
    int rc = pwc_lookup(PW_OP_PASSWD_BY_NAME, user, 0, pack_host, &pw, scratch, sizeof scratch);
    if (rc == -ENOENT) {
        pd_reply_set(&out->reply, 550, "5.1.1", "no such user");
        return;
    }
    if (rc == 0) {
        pwc_answer ans;
        rc = pwc_query(PW_OP_MAILHOST, user, 0, &ans);
        if (rc == 0 && ans.status == PW_OK)
            rc = pwc_answer_mailhost(&ans, mh, sizeof mh, &frozen);
        pwc_answer_free(&ans);
    }
    if (rc < 0) {
        pd_log(PD_LOG_WARNING, "lookup of %s: %s", user, lookup_error(rc));
        pd_reply_set(&out->reply, 451, "4.4.3", "user directory unavailable, try again later");
        return;
    }
    if (frozen) {
        pd_reply_set(&out->reply, 450, "4.2.1", "mailbox being moved, try again later");
        return;
    }
    const char *host = mh[0] ? mh : pw.host;
    size_t hn = strlen(host);
    if (!hn) {
        int k = pwpl_pick(c->placement, user, strlen(user));
        host = k >= 0 ? pwpl_host(c->placement, k, &hn) : "";
        if (k < 0)
            hn = 0;
    }
    if (!hn || hn + strlen(c->mailhost_suffix) >= sizeof out->host) {
        pd_reply_set(&out->reply, 451, "4.4.0", "no mailhost for user");
        return;
    }
    out->port = 0;
    snprintf(out->host, sizeof out->host, "%.*s%s", (int)hn, host, c->mailhost_suffix);
    for (int k = 0; k < c->nhosts; k++)      /* the [hosts] map first; DNS (with the suffix) otherwise */
        if (strlen(c->hosts[k].name) == hn && !memcmp(c->hosts[k].name, host, hn)) {
            snprintf(out->host, sizeof out->host, "%s", c->hosts[k].address);
            out->port = c->hosts[k].lmtp_port;
            break;
        }
    pd_reply_set(&out->reply, 250, "2.1.5", "recipient OK");
}
