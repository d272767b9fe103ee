/*
 * pw_client.c - the C client's hedged exchange (docs/nss.md, "Failover"):
 * one request sent to the servers in priority order, the next one asked
 * when the previous stays silent for hedge_ms, the first good answer kept,
 * and what was learnt about each server written to the health record.
 *
 * No socket is shared between threads (pw_transport.c); the configuration
 * and the health record are behind pwc_lock (pw_client_int.h).
 */
#define _GNU_SOURCE
#include "pw_client_int.h"

#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "pw_seal.h"

/* The first wait of a lookup is a blocking recv when it is at least
 * PWC_FAST_MIN_MS; it ends PWC_FAST_SLACK_MS early (kernel tick rounding). */
#define PWC_FAST_MIN_MS 10
#define PWC_FAST_SLACK_MS 5

pthread_mutex_t pwc_lock = PTHREAD_MUTEX_INITIALIZER;

/* ---- fork safety -------------------------------------------------------- */

unsigned pwc_fork_generation = 1;

static void atfork_prepare(void) { pthread_mutex_lock(&pwc_lock); }
static void atfork_parent(void) { pthread_mutex_unlock(&pwc_lock); }
static void atfork_child(void)
{
    __atomic_add_fetch(&pwc_fork_generation, 1, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&pwc_lock);
}

/* Registered before the library's users register theirs (priority 101 runs
 * before every plain constructor, whatever the link order): prepare
 * handlers run in reverse order, so pwc_lock is taken last at fork, after
 * the locks a user holds while it calls the client (nss_module/enum.c's). */
__attribute__((constructor(101))) static void pwc_init(void)
{
    pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}

/* ---- the hedged exchange -------------------------------------------------- */

typedef struct {
    int idx;          /* index in the configuration */
    int fd;           /* -1 before it was sent to */
    int64_t sent_at;
    int done;         /* answered, or failed: no longer waited for */
    int silent;       /* sent, and nothing came back */
    int refused;      /* could not send, or ICMP unreachable */
} pwc_try;

void pwc_answer_free(pwc_answer *ans)
{
    free(ans->heap);
    ans->heap = NULL;
}

int pwc_query(int op, const char *name, uint64_t num, pwc_answer *ans)
{
    pwc_config c;
    uint8_t shadow_key[PW_KEY_BYTES];
    int key_id = 0;
    const uint8_t *key = NULL;
    int rc = -EAGAIN;

    ans->heap = NULL;
    ans->status = PW_NOTFOUND;
    int64_t until[PWC_MAX_SERVERS];
    pthread_mutex_lock(&pwc_lock);
    pwc_config_current(&c);
    pwc_health_snapshot(&c, until);
    pthread_mutex_unlock(&pwc_lock);

    if (op == PW_OP_SHADOW_BY_NAME || op == PW_OP_SHADOW_ENUM) {
        /* Only a process that can read the root-only key may ask. */
        if (!c.shadow_keyfile[0] || pw_read_keyfile(c.shadow_keyfile, shadow_key) < 0) {
            explicit_bzero(c.netkey, sizeof c.netkey);
            return -EACCES;
        }
        key_id = PW_KEY_SHADOW;
        key = shadow_key;
    } else if (c.has_netkey) {
        key_id = PW_KEY_NETWORK;
        key = c.netkey;
    }

    uint8_t pkt[PW_MAX_REQUEST];
    uint64_t id = pwc_random_id();
    int plen = pwc_build_request(pkt, sizeof pkt, id, op, name, num, PW_REQUEST_PAD, key_id, key);
    if (plen < 0) {
        rc = key_id ? -EAGAIN : -ENOENT; /* no libsodium / a name too long */
        goto out;
    }

    /* Order: servers not known down in priority order, then the ones known
     * down (still used when no other is left). */
    int64_t epoch = pwc_now_epoch();
    pwc_try tries[PWC_MAX_SERVERS];
    int ntries = 0, nlive = 0;
    for (int pass = 0; pass < 2; pass++)
        for (int i = 0; i < c.nservers; i++)
            if ((until[i] > epoch) == pass) {
                tries[ntries++] = (pwc_try){.idx = i, .fd = -1};
                nlive += !pass;
            }

    int64_t start = pwc_now_ms();
    int64_t deadline = start + c.timeout_ms;
    int hedge = c.hedge_ms;
    if (nlive == 0) {
        /* Every server is known down: try them all at once, briefly, so
         * that a server that came back is found without costing a full
         * timeout per lookup. */
        int quick = hedge > 10 ? hedge : 10;
        if (quick < c.timeout_ms)
            deadline = start + quick;
        hedge = 0;
    }
    int next = 0, winner = -1, final_rc = 0, fast_tried = 0;
    int64_t next_send = start;

    while (winner < 0 && !final_rc) {
        int64_t t = pwc_now_ms();
        /* Send to the next server when the hedge delay passed, or at once
         * when every server asked so far has failed. */
        int pending = 0;
        for (int k = 0; k < next; k++)
            pending += !tries[k].done;
        while (next < ntries && (t >= next_send || pending == 0)) {
            pwc_try *tr = &tries[next++];
            const pwc_server *s = &c.servers[tr->idx];
            if (until[tr->idx] && until[tr->idx] <= epoch)
                /* expired: claim the re-probe so other processes keep
                 * skipping it until we know */
                pwc_health_mark(&c, s->name, epoch + c.recheck_s);
            tr->fd = pwc_udp_send(tr->idx, s, pkt, (size_t)plen);
            tr->sent_at = t;
            if (tr->fd < 0) {
                tr->done = tr->refused = 1;
            } else {
                tr->silent = 1;
                pending++;
            }
            next_send = t + hedge;
        }
        if (pending == 0 && next >= ntries)
            break; /* all failed */
        if (t >= deadline)
            break;
        int64_t wake = deadline;
        if (next < ntries && next_send < wake)
            wake = next_send;
        struct pollfd pfd[PWC_MAX_SERVERS];
        int map[PWC_MAX_SERVERS], np = 0;
        for (int k = 0; k < next; k++)
            if (!tries[k].done) {
                pfd[np] = (struct pollfd){tries[k].fd, POLLIN, 0};
                map[np++] = k;
            }
        /* Fast path: right after the first send, with one socket to wait
         * on, a blocking recv (SO_RCVTIMEO) instead of poll + recv: one
         * system call less. It gives up PWC_FAST_SLACK_MS early (the
         * kernel rounds the timeout up to its tick); the poll below then
         * waits out the rest exactly as before. The wait is counted from
         * `start` so that it stays the same from one lookup to the next. */
        int fast = 0, r;
        if (np == 1 && !fast_tried) {
            fast_tried = 1;
            int64_t wait = wake - start - PWC_FAST_SLACK_MS;
            if (wait >= PWC_FAST_MIN_MS && wait <= INT_MAX &&
                pwc_udp_wait_ms(tries[map[0]].idx, (int)wait) == 0) {
                fast = 1;
                pfd[0].revents = POLLIN;
            }
        }
        if (fast)
            r = 1;
        else
            r = poll(pfd, (nfds_t)np, (int)(wake - t > 0 ? wake - t : 0));
        if (r < 0 && errno != EINTR)
            break;
        for (int j = 0; j < np && r > 0 && winner < 0 && !final_rc; j++) {
            if (!pfd[j].revents)
                continue;
            pwc_try *tr = &tries[map[j]];
            const pwc_server *s = &c.servers[tr->idx];
            int status;
            int rx = pwc_udp_receive(tr->fd, key_id, key, id, op, ans, &status, fast);
            if (rx == PWC_RX_NOTHING)
                continue;
            tr->done = 1;
            if (rx == PWC_RX_FAILED) {
                tr->refused = 1; /* nobody listens there: down */
                continue;
            }
            tr->silent = 0;
            if (status == PW_TRUNCATED) {
                int tst;
                /* the full timeout, even in the brief all-down probe: this
                 * server has just answered */
                if (pwc_tcp_exchange(s, op, name, num, key_id, key, start + c.timeout_ms, ans, &tst) < 0 ||
                    tst == PW_TRUNCATED)
                    continue; /* try the others */
                status = tst;
            }
            switch (status) {
            case PW_OK:
            case PW_NOTFOUND:
                ans->status = status;
                winner = map[j];
                break;
            case PW_DENIED:
                final_rc = -EACCES;
                break;
            case PW_BADREQUEST:
                final_rc = -EINVAL;
                break;
            default: /* UNAVAILABLE, BADVERSION: alive, but no answer */
                pwc_answer_free(ans);
                break;
            }
            if (status != PW_OK && status != PW_NOTFOUND)
                pwc_answer_free(ans);
        }
    }

    /* Health: a server that answered is up; one that stayed silent for
     * the whole wait (or at least hedge_ms while another answered) or
     * refused is down for recheck_s. */
    int64_t end = pwc_now_ms();
    for (int k = 0; k < next; k++) {
        pwc_try *tr = &tries[k];
        const pwc_server *s = &c.servers[tr->idx];
        int slow = tr->silent && (winner < 0 || end - tr->sent_at >= c.hedge_ms);
        if (!tr->silent && !tr->refused) {
            if (until[tr->idx])
                pwc_health_mark(&c, s->name, 0);
        } else if (slow || tr->refused) {
            if (!(until[tr->idx] > epoch))
                pwc_health_mark(&c, s->name, pwc_now_epoch() + c.recheck_s);
        }
        if (tr->fd >= 0)
            pwc_udp_release(tr->idx, !tr->silent && !tr->refused);
    }
    if (winner >= 0)
        rc = 0;
    else if (final_rc)
        rc = final_rc;
out:
    explicit_bzero(c.netkey, sizeof c.netkey);
    explicit_bzero(shadow_key, sizeof shadow_key);
    return rc;
}

int pwc_lookup(int op, const char *name, uint64_t num, pwc_pack_fn pack, void *result,
               char *buf, size_t buflen)
{
    if (name ? !pw_valid_name(name, strlen(name)) : num > PW_MAX_ID)
        return -ENOENT; /* no server can have it */
    pwc_answer ans;
    int rc = pwc_query(op, name, num, &ans);
    if (rc == 0)
        rc = ans.status == PW_OK ? pack(&ans.payload, result, buf, buflen) : -ENOENT;
    pwc_answer_free(&ans);
    return rc;
}
