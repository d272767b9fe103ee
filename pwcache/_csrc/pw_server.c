/*
 * pw_server.c - the pwserver hot path (see pw_server.h).
 */
#define _GNU_SOURCE
#include "pw_server.h"

#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdalign.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sched.h>
#include <time.h>

#include "pw_seal.h"
#include "pw_wire.h"

/* Counters; every dropped or refused packet lands in one of them. */
#define COUNTERS(X)                                                          \
    X(requests)           /* packets received, UDP and TCP */                \
    X(tcp_requests)                                                          \
    /* TCP connections closed by the limits (pwcache/tcp_server.py) */       \
    X(tcp_refused_source) /* at once: its address holds its share */         \
    X(tcp_refused_full)   /* at once: every place taken, none to free */     \
    X(tcp_evicted)        /* the longest-waiting of the busiest address */   \
    X(tcp_frame_timeouts) /* a request frame not whole in time */            \
    X(tcp_send_timeouts)  /* answers not taken in time */                    \
    X(ok) X(notfound) X(truncated) X(denied) X(bad_request) X(bad_version)   \
    X(unavailable)                                                           \
    X(bad_packet)         /* dropped: not a request, id unreadable */        \
    X(oversize)           /* dropped: > PW_MAX_REQUEST */                    \
    X(not_allowed_source) /* dropped: source not in the allowlist */         \
    X(bad_seal)           /* dropped: sealed with no/another key, forged */  \
    X(unsealed)           /* dropped: plain while a network key is set */    \
    X(too_big)            /* TCP answer past PW_MAX_TCP_ANSWER */            \
    X(send_errors)

enum {
#define X(name) C_##name,
    COUNTERS(X)
#undef X
    NCOUNTERS
};

static const char *const counter_names[NCOUNTERS] = {
#define X(name) #name,
    COUNTERS(X)
#undef X
};

typedef struct {
    alignas(64) _Atomic uint64_t seq; /* odd while reading the table */
    _Atomic int used;
    _Atomic uint64_t c[NCOUNTERS];
} slot_t;

typedef struct {
    int family; /* 4 or 6 */
    int prefix;
    uint8_t addr[16];
} net_t;

struct pws_server {
    _Atomic(pwt_table *) table;
    _Atomic uint64_t generation, load_ms;
    _Atomic uint64_t loaded_time; /* Unix time the served generation was put in place */
    pthread_mutex_t refusals_lock; /* the reload thread writes, STATS reads */
    pws_refusals refusals;
    _Atomic uint64_t source_seq, source_connected; /* pws_set_source */
    _Atomic int stopping;
    _Atomic unsigned busy_poll_us; /* 0: always block */
    _Atomic int spinner;           /* a thread is in its busy-poll window */
    int has_network_key, has_shadow_key;
    uint8_t network_key[PW_KEY_BYTES], shadow_key[PW_KEY_BYTES];
    net_t allow[PWS_MAX_ALLOW];
    int nallow;
    slot_t slots[PWS_MAX_SLOTS];
};

/* Single writer per slot: a plain add, visible to STATS without a lock. */
static inline void bump(slot_t *sl, int c)
{
    atomic_store_explicit(&sl->c[c], atomic_load_explicit(&sl->c[c], memory_order_relaxed) + 1,
                          memory_order_relaxed);
}

pws_server *pws_new(void)
{
    pws_server *s = aligned_alloc(64, (sizeof(pws_server) + 63) & ~(size_t)63);
    if (s) {
        memset(s, 0, sizeof *s);
        pthread_mutex_init(&s->refusals_lock, NULL);
    }
    return s;
}

void pws_free(pws_server *s)
{
    if (s) {
        pthread_mutex_destroy(&s->refusals_lock);
        explicit_bzero(s, sizeof *s);
    }
    free(s);
}

void pws_set_refusals(pws_server *s, const pws_refusals *r)
{
    pthread_mutex_lock(&s->refusals_lock);
    s->refusals = *r;
    pthread_mutex_unlock(&s->refusals_lock);
}

void pws_set_source(pws_server *s, uint64_t seq, int connected)
{
    atomic_store(&s->source_seq, seq);
    atomic_store(&s->source_connected, connected ? 1 : 0);
}

void pws_set_keys(pws_server *s, const uint8_t *network_key, const uint8_t *shadow_key)
{
    s->has_network_key = network_key != NULL;
    if (network_key)
        memcpy(s->network_key, network_key, PW_KEY_BYTES);
    s->has_shadow_key = shadow_key != NULL;
    if (shadow_key)
        memcpy(s->shadow_key, shadow_key, PW_KEY_BYTES);
}

int pws_allow(pws_server *s, int family, const uint8_t *addr, int prefix)
{
    int bits = family == 4 ? 32 : family == 6 ? 128 : -1;
    if (bits < 0 || prefix < 0 || prefix > bits || s->nallow >= PWS_MAX_ALLOW)
        return -1;
    net_t *n = &s->allow[s->nallow++];
    n->family = family;
    n->prefix = prefix;
    memset(n->addr, 0, sizeof n->addr);
    memcpy(n->addr, addr, (size_t)bits / 8);
    return 0;
}

static int prefix_match(const uint8_t *a, const uint8_t *b, int prefix)
{
    int full = prefix / 8, rest = prefix % 8;
    if (memcmp(a, b, (size_t)full) != 0)
        return 0;
    if (!rest)
        return 1;
    uint8_t mask = (uint8_t)(0xff << (8 - rest));
    return (a[full] & mask) == (b[full] & mask);
}

static int allowed(const pws_server *s, const void *sa, size_t len)
{
    const uint8_t *addr;
    int family;
    const struct sockaddr *g = sa;
    if (len >= sizeof(struct sockaddr_in) && g->sa_family == AF_INET) {
        addr = (const uint8_t *)&((const struct sockaddr_in *)sa)->sin_addr;
        family = 4;
    } else if (len >= sizeof(struct sockaddr_in6) && g->sa_family == AF_INET6) {
        addr = (const uint8_t *)&((const struct sockaddr_in6 *)sa)->sin6_addr;
        family = 6;
        static const uint8_t v4mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
        if (memcmp(addr, v4mapped, 12) == 0) {
            addr += 12;
            family = 4;
        }
    } else {
        return 0;
    }
    for (int i = 0; i < s->nallow; i++)
        if (s->allow[i].family == family && prefix_match(addr, s->allow[i].addr, s->allow[i].prefix))
            return 1;
    return 0;
}

int pws_source_allowed(pws_server *s, int slot, int family, const uint8_t *addr)
{
    struct sockaddr_in6 a6 = {.sin6_family = AF_INET6};
    struct sockaddr_in a4 = {.sin_family = AF_INET};
    int ok = 0;
    if (family == 4) {
        memcpy(&a4.sin_addr, addr, 4);
        ok = allowed(s, &a4, sizeof a4);
    } else if (family == 6) {
        memcpy(&a6.sin6_addr, addr, 16);
        ok = allowed(s, &a6, sizeof a6);
    }
    if (!ok)
        bump(&s->slots[slot], C_not_allowed_source);
    return ok;
}

/* ---- slots and the grace period ---------------------------------------- */

int pws_slot_acquire(pws_server *s)
{
    for (int i = 0; i < PWS_MAX_SLOTS; i++) {
        int expected = 0;
        if (atomic_compare_exchange_strong(&s->slots[i].used, &expected, 1))
            return i;
    }
    return -1;
}

void pws_slot_release(pws_server *s, int slot)
{
    /* counters stay: STATS keeps counting what the slot did */
    atomic_store(&s->slots[slot].used, 0);
}

static inline const pwt_table *read_begin(pws_server *s, slot_t *sl)
{
    uint64_t v = atomic_load_explicit(&sl->seq, memory_order_relaxed);
    atomic_store_explicit(&sl->seq, v + 1, memory_order_relaxed);
    /* the writer must see us reading before we load the pointer */
    atomic_thread_fence(memory_order_seq_cst);
    return atomic_load_explicit(&s->table, memory_order_acquire);
}

static inline void read_end(slot_t *sl)
{
    uint64_t v = atomic_load_explicit(&sl->seq, memory_order_relaxed);
    atomic_store_explicit(&sl->seq, v + 1, memory_order_release);
}

pwt_table *pws_swap_table(pws_server *s, pwt_table *t, uint64_t generation, uint64_t load_ms)
{
    pwt_table *old = atomic_exchange(&s->table, t);
    atomic_store(&s->generation, generation);
    atomic_store(&s->load_ms, load_ms);
    atomic_store(&s->loaded_time, (uint64_t)time(NULL));
    atomic_thread_fence(memory_order_seq_cst);
    for (int i = 0; i < PWS_MAX_SLOTS; i++) {
        uint64_t v = atomic_load(&s->slots[i].seq);
        if (!(v & 1))
            continue;
        /* a reader in its section: one batch, microseconds */
        while (atomic_load(&s->slots[i].seq) == v) {
            struct timespec ts = {0, 20000};
            nanosleep(&ts, NULL);
        }
    }
    return old;
}

/* ---- answers ------------------------------------------------------------- */

int pws_ncounters(void)
{
    return NCOUNTERS;
}

const char *pws_counter_name(int i)
{
    return i >= 0 && i < NCOUNTERS ? counter_names[i] : NULL;
}

uint64_t pws_counter(pws_server *s, int i)
{
    uint64_t sum = 0;
    if (i < 0 || i >= NCOUNTERS)
        return 0;
    for (int k = 0; k < PWS_MAX_SLOTS; k++)
        sum += atomic_load_explicit(&s->slots[k].c[i], memory_order_relaxed);
    return sum;
}

void pws_count(pws_server *s, int slot, int i)
{
    if (i >= 0 && i < NCOUNTERS)
        bump(&s->slots[slot], i);
}

static void put_key(pwp_buf *b, const char *name, uint64_t v)
{
    pwp_put_str(b, name, strlen(name));
    pwp_put_uint(b, v);
}

static void put_stats(pws_server *s, const pwt_table *t, pwp_buf *b)
{
    pwt_load_stats st = {0};
    if (t)
        pwt_get_stats(t, &st);
    pws_refusals rf;
    pthread_mutex_lock(&s->refusals_lock);
    rf = s->refusals;
    pthread_mutex_unlock(&s->refusals_lock);
    const struct {
        const char *name;
        uint64_t v;
    } tv[] = {
        {"users", st.users}, {"groups", st.groups}, {"shadows", st.shadows},
        {"generation", atomic_load(&s->generation)},
        {"load_ms", atomic_load(&s->load_ms)}, {"loaded_time", atomic_load(&s->loaded_time)},
        {"table_bytes", st.bytes},
        {"passwd_bad", st.passwd_bad}, {"passwd_dup_name", st.passwd_dup_name},
        {"passwd_dup_uid", st.passwd_dup_uid}, {"shadow_bad", st.shadow_bad},
        {"shadow_dup", st.shadow_dup}, {"shadow_orphan", st.shadow_orphan},
        {"group_bad", st.group_bad}, {"group_dup_name", st.group_dup_name},
        {"group_dup_gid", st.group_dup_gid}, {"group_bad_member", st.group_bad_member},
        {"mailhosts_bad", st.mailhosts_bad}, {"mailhosts_dup", st.mailhosts_dup},
        {"mailhosts_unknown", st.mailhosts_unknown},
        {"too_many_groups", st.too_many_groups},
        {"changes_applied", st.changes_applied}, {"changes_refused", st.changes_refused},
        {"delete_unknown", st.delete_unknown}, {"delta_entries", st.delta_entries},
        {"reloads_refused", rf.count}, {"last_refusal_time", rf.time},
        {"last_refusal_reason", rf.reason}, {"last_refused_users", rf.users},
        {"last_refused_bad_lines", rf.bad_lines},
        {"source_seq", atomic_load(&s->source_seq)},
        {"source_connected", atomic_load(&s->source_connected)},
    };
    size_t ntv = sizeof tv / sizeof tv[0];
    pwp_put_map(b, (uint32_t)(NCOUNTERS + ntv));
    for (int i = 0; i < NCOUNTERS; i++)
        put_key(b, counter_names[i], pws_counter(s, i));
    for (size_t i = 0; i < ntv; i++)
        put_key(b, tv[i].name, tv[i].v);
}

static void put_enum_page(const pwt_table *t, int map, uint64_t index, pwp_buf *b)
{
    uint32_t size = pwt_enum_size(t, map), len, count = 0;
    uint64_t i;
    for (i = index; i < size && count < PW_ENUM_PAGE; i++)
        if (pwt_enum_record(t, map, (uint32_t)i, &len))
            count++;
    pwp_put_array(b, 2);
    if (i < size)
        pwp_put_uint(b, i);
    else
        pwp_put_nil(b);
    pwp_put_array(b, count);
    for (uint64_t k = index; k < i; k++) {
        const uint8_t *rec = pwt_enum_record(t, map, (uint32_t)k, &len);
        if (rec)
            pwp_put_raw(b, rec, len);
    }
}

static int status_counter(int status)
{
    switch (status) {
    case PW_OK: return C_ok;
    case PW_NOTFOUND: return C_notfound;
    case PW_TRUNCATED: return C_truncated;
    case PW_DENIED: return C_denied;
    case PW_BADVERSION: return C_bad_version;
    case PW_UNAVAILABLE: return C_unavailable;
    default: return C_bad_request;
    }
}

/* Writes [version, id, status, payload] for a decoded request. */
static void put_answer(pws_server *s, const pwt_table *t, const pw_request *rq,
                       int key_id, int tcp, pwp_buf *b)
{
    const uint8_t *rec = NULL;
    uint32_t len = 0;
    const char *nm = rq->name;
    size_t n = rq->name_len;
    if (!t && rq->op != PW_OP_PING && rq->op != PW_OP_STATS) {
        pw_put_answer_header(b, rq->id, PW_UNAVAILABLE);
        pwp_put_nil(b);
        return;
    }
    int shadow_op = rq->op == PW_OP_SHADOW_BY_NAME || rq->op == PW_OP_SHADOW_ENUM;
    int enum_op = rq->op >= PW_OP_PASSWD_ENUM;
    if (shadow_op && key_id != PW_KEY_SHADOW) {
        pw_put_answer_header(b, rq->id, PW_DENIED);
        pwp_put_nil(b);
        return;
    }
    if (enum_op && !tcp) {
        pw_put_answer_header(b, rq->id, PW_TRUNCATED);
        pwp_put_nil(b);
        return;
    }
    switch (rq->op) {
    case PW_OP_PASSWD_BY_NAME: rec = pwt_passwd_by_name(t, nm, n, &len); break;
    case PW_OP_PASSWD_BY_UID: rec = pwt_passwd_by_uid(t, (uint32_t)rq->num, &len); break;
    case PW_OP_GROUP_BY_NAME: rec = pwt_group_by_name(t, nm, n, &len); break;
    case PW_OP_GROUP_BY_GID: rec = pwt_group_by_gid(t, (uint32_t)rq->num, &len); break;
    case PW_OP_SHADOW_BY_NAME: rec = pwt_shadow_by_name(t, nm, n, &len); break;
    case PW_OP_INITGROUPS: {
        const uint32_t *gids;
        uint32_t count;
        if (pwt_initgroups(t, nm, n, &gids, &count) < 0)
            break;
        pw_put_answer_header(b, rq->id, PW_OK);
        pwp_put_array(b, count);
        for (uint32_t i = 0; i < count; i++)
            pwp_put_uint(b, gids[i]);
        return;
    }
    case PW_OP_MAILHOST: {
        const char *host;
        size_t hl;
        int frozen;
        if (pwt_mailhost(t, nm, n, &host, &hl, &frozen) < 0)
            break;
        pw_put_answer_header(b, rq->id, PW_OK);
        pwp_put_array(b, 2);
        pwp_put_str(b, host, hl);
        pwp_put_bool(b, frozen);
        return;
    }
    case PW_OP_STATS:
        pw_put_answer_header(b, rq->id, PW_OK);
        put_stats(s, t, b);
        return;
    case PW_OP_PING: {
        pwt_load_stats st = {0};
        if (t)
            pwt_get_stats(t, &st);
        pw_put_answer_header(b, rq->id, PW_OK);
        pwp_put_array(b, 3);
        pwp_put_str(b, PWS_VERSION_STRING, strlen(PWS_VERSION_STRING));
        pwp_put_uint(b, atomic_load(&s->generation));
        pwp_put_uint(b, st.users);
        return;
    }
    case PW_OP_PASSWD_ENUM:
    case PW_OP_GROUP_ENUM:
    case PW_OP_SHADOW_ENUM:
        if (rq->num > UINT32_MAX) {
            pw_put_answer_header(b, rq->id, PW_BADREQUEST);
            pwp_put_nil(b);
            return;
        }
        pw_put_answer_header(b, rq->id, PW_OK);
        put_enum_page(t, rq->op == PW_OP_PASSWD_ENUM ? PWT_PASSWD
                         : rq->op == PW_OP_GROUP_ENUM ? PWT_GROUP : PWT_SHADOW,
                      rq->num, b);
        return;
    }
    if (rec) {
        pw_put_answer_header(b, rq->id, PW_OK);
        pwp_put_raw(b, rec, len);
    } else {
        pw_put_answer_header(b, rq->id, PW_NOTFOUND);
        pwp_put_nil(b);
    }
}

/* Status of a finished answer (the third element). */
static int answer_status(const uint8_t *p, size_t len)
{
    pwp_reader r;
    uint64_t id;
    int status;
    pwp_reader_init(&r, p, len);
    return pw_get_answer_header(&r, &id, &status) == 0 ? status : PW_BADREQUEST;
}

static size_t answer_in(pws_server *s, slot_t *sl, const pwt_table *t,
                        const uint8_t *in, size_t len, int tcp, uint8_t *out, size_t cap)
{
    uint8_t plain[PW_MAX_REQUEST];
    const uint8_t *key = NULL;
    int key_id = 0;
    bump(sl, C_requests);
    if (tcp)
        bump(sl, C_tcp_requests);
    if (len > PW_MAX_REQUEST) {
        bump(sl, C_oversize);
        return 0;
    }
    if (len > 0 && in[0] == PW_SEAL_MARK) {
        key_id = pw_sealed_key_id(in, len);
        if (key_id == PW_KEY_NETWORK && s->has_network_key)
            key = s->network_key;
        else if (key_id == PW_KEY_SHADOW && s->has_shadow_key)
            key = s->shadow_key;
        int n = key ? pw_unseal(key, in, len, plain, sizeof plain) : -1;
        if (n < 0) {
            bump(sl, C_bad_seal);
            return 0;
        }
        in = plain;
        len = (size_t)n;
    } else if (s->has_network_key) {
        bump(sl, C_unsealed);
        return 0;
    }

    pw_request rq;
    int id_known;
    int rc = pw_decode_request(in, len, &rq, &id_known);
    if (rc != PW_OK && !id_known) {
        bump(sl, C_bad_packet);
        return 0;
    }
    /* A sealed answer is written in place behind its seal header. */
    size_t head = key ? 2 + PW_SEAL_NONCE : 0;
    size_t limit = tcp ? PW_MAX_TCP_ANSWER : PW_MAX_UDP_ANSWER;
    if (key)
        limit -= PW_SEAL_OVERHEAD;
    else if (!tcp && limit > PW_AMPLIFICATION * len)
        limit = PW_AMPLIFICATION * len; /* no reflection amplifier */
    if (cap < head + PW_SEAL_TAG + 64)
        return 0;
    if (limit > cap - head - PW_SEAL_TAG)
        limit = cap - head - PW_SEAL_TAG;
    uint8_t *body = out + head;
    pwp_buf b;
    pwp_init(&b, body, limit);
    if (rc == PW_BADVERSION) {
        pw_put_answer_header(&b, rq.id, PW_BADVERSION);
        pwp_put_uint(&b, PW_VERSION);
    } else if (rc != PW_OK) {
        pw_put_answer_header(&b, rq.id, PW_BADREQUEST);
        pwp_put_nil(&b);
    } else {
        put_answer(s, t, &rq, key_id, tcp, &b);
    }
    if (b.overflow) {
        /* tiny: the request holds at least as many bytes as this */
        pwp_init(&b, body, cap - head - PW_SEAL_TAG);
        pw_put_answer_header(&b, rq.id, tcp ? PW_BADREQUEST : PW_TRUNCATED);
        pwp_put_nil(&b);
        if (tcp)
            bump(sl, C_too_big);
    }
    bump(sl, status_counter(answer_status(body, b.len)));
    if (!key)
        return b.len;
    int n = pw_seal(key, key_id, body, b.len, out, cap);
    return n > 0 ? (size_t)n : 0;
}

size_t pws_answer(pws_server *s, int slot, const uint8_t *req, size_t len,
                  int tcp, uint8_t *out, size_t cap)
{
    slot_t *sl = &s->slots[slot];
    const pwt_table *t = read_begin(s, sl);
    size_t n = answer_in(s, sl, t, req, len, tcp, out, cap);
    read_end(sl);
    return n;
}

/* ---- UDP serving loop ---------------------------------------------------- */

void pws_stop(pws_server *s)
{
    atomic_store(&s->stopping, 1);
}

void pws_set_busy_poll(pws_server *s, unsigned usec)
{
    atomic_store(&s->busy_poll_us, usec > PWS_MAX_BUSY_POLL_US ? PWS_MAX_BUSY_POLL_US : usec);
}

static int64_t mono_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

typedef struct {
    uint8_t in[PWS_BATCH][PW_MAX_REQUEST + 1];
    uint8_t out[PWS_BATCH][PW_MAX_UDP_ANSWER];
    struct sockaddr_storage addr[PWS_BATCH];
    struct iovec iin[PWS_BATCH], iout[PWS_BATCH];
    struct mmsghdr min[PWS_BATCH], mout[PWS_BATCH];
    /* the address each request was sent to, so the answer comes from it */
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(struct in6_pktinfo))];
    } ctl_in[PWS_BATCH], ctl_out[PWS_BATCH];
} batch_t;

/* On a wildcard address, asks for each datagram's destination address
 * (IP_PKTINFO), so that the answer leaves from the address the client
 * asked (clients check it: docs/protocol.md, "Request"). A socket bound to
 * one address answers from it anyway, and skips the control data on every
 * datagram both ways. */
static int want_pktinfo(int fd)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    int on = 1;
    if (getsockname(fd, (struct sockaddr *)&ss, &len) < 0)
        return -1;
    if (ss.ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)&ss;
        if (!IN6_IS_ADDR_UNSPECIFIED(&a->sin6_addr) && !IN6_IS_ADDR_V4MAPPED(&a->sin6_addr))
            return 0;
        return setsockopt(fd, IPPROTO_IPV6, IPV6_RECVPKTINFO, &on, sizeof on);
    }
    if (((const struct sockaddr_in *)&ss)->sin_addr.s_addr != htonl(INADDR_ANY))
        return 0;
    return setsockopt(fd, IPPROTO_IP, IP_PKTINFO, &on, sizeof on);
}

/* Copies the destination of a received datagram into the control data of
 * its answer; returns the control length (0: none). */
static size_t reply_from(struct msghdr *in, void *out, size_t cap)
{
    for (struct cmsghdr *c = CMSG_FIRSTHDR(in); c; c = CMSG_NXTHDR(in, c)) {
        size_t n = 0;
        if (c->cmsg_level == IPPROTO_IP && c->cmsg_type == IP_PKTINFO)
            n = sizeof(struct in_pktinfo);
        else if (c->cmsg_level == IPPROTO_IPV6 && c->cmsg_type == IPV6_PKTINFO)
            n = sizeof(struct in6_pktinfo);
        if (!n || CMSG_SPACE(n) > cap)
            continue;
        memset(out, 0, CMSG_SPACE(n));
        struct cmsghdr *o = out;
        o->cmsg_level = c->cmsg_level;
        o->cmsg_type = c->cmsg_type;
        o->cmsg_len = CMSG_LEN(n);
        memcpy(CMSG_DATA(o), CMSG_DATA(c), n);
        if (c->cmsg_level == IPPROTO_IP) {
            struct in_pktinfo *pi = (struct in_pktinfo *)CMSG_DATA(o);
            pi->ipi_spec_dst = pi->ipi_addr; /* send from the address asked */
            pi->ipi_ifindex = 0;
        }
        return CMSG_SPACE(n);
    }
    return 0;
}

int pws_serve_udp(pws_server *s, int fd, int slot)
{
    slot_t *sl = &s->slots[slot];
    batch_t *bt = calloc(1, sizeof *bt);
    int rc = 0;
    if (!bt)
        return -ENOMEM;
    /* Blocking receives (two system calls a batch, as a plain echo loop
     * makes) that wake up now and then to see the stop flag. */
    struct timeval tv = {0, PWS_STOP_CHECK_MS * 1000};
    if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) < 0 || want_pktinfo(fd) < 0) {
        free(bt);
        return -errno;
    }
    for (int i = 0; i < PWS_BATCH; i++) {
        bt->iin[i].iov_base = bt->in[i];
        bt->iin[i].iov_len = sizeof bt->in[i];
        bt->min[i].msg_hdr.msg_iov = &bt->iin[i];
        bt->min[i].msg_hdr.msg_iovlen = 1;
        bt->min[i].msg_hdr.msg_name = &bt->addr[i];
        bt->min[i].msg_hdr.msg_control = bt->ctl_in[i].buf;
    }
    /* Busy-poll window (pws_set_busy_poll): after a batch, one thread at a
     * time keeps receiving without blocking (yielding the CPU between
     * tries) for busy_poll_us, so that a client's next request finds it
     * awake instead of paying a wake-up. Only while it has the CPU to
     * itself: a yield that let another task run ends the window. */
    int64_t spin_until = 0;
    int spinning = 0;
    int used = PWS_BATCH; /* entries whose lengths need a reset */
    while (!atomic_load_explicit(&s->stopping, memory_order_relaxed)) {
        for (int i = 0; i < used; i++) {
            bt->min[i].msg_hdr.msg_namelen = sizeof bt->addr[i];
            bt->min[i].msg_hdr.msg_controllen = sizeof bt->ctl_in[i].buf;
        }
        int n;
        if (spinning) {
            n = recvmmsg(fd, bt->min, PWS_BATCH, MSG_DONTWAIT, NULL);
            if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
                used = 1;
                int64_t now = mono_us();
                if (now < spin_until) {
                    sched_yield();
                    /* Something else ran on this CPU meanwhile (the client
                     * itself, when it shares the CPU): spinning would only
                     * compete with it, so block from now on. */
                    if (mono_us() - now < PWS_YIELD_SHARED_US)
                        continue;
                }
                spinning = 0;
                atomic_store_explicit(&s->spinner, 0, memory_order_release);
                continue;
            }
        } else {
            n = recvmmsg(fd, bt->min, PWS_BATCH, MSG_WAITFORONE, NULL);
        }
        if (n < 0) {
            used = 1;
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR ||
                errno == ECONNREFUSED || errno == ENOMEM)
                continue;
            rc = -errno;
            break;
        }
        used = n;
        int k = 0;
        const pwt_table *t = read_begin(s, sl);
        for (int i = 0; i < n; i++) {
            struct msghdr *h = &bt->min[i].msg_hdr;
            size_t len = bt->min[i].msg_len;
            if (!allowed(s, h->msg_name, h->msg_namelen)) {
                bump(sl, C_requests);
                bump(sl, C_not_allowed_source);
                continue;
            }
            if (h->msg_flags & MSG_TRUNC)
                len = PW_MAX_REQUEST + 1; /* counted as oversize */
            size_t alen = answer_in(s, sl, t, bt->in[i], len, 0, bt->out[k], PW_MAX_UDP_ANSWER);
            if (!alen)
                continue;
            bt->iout[k].iov_base = bt->out[k];
            bt->iout[k].iov_len = alen;
            memset(&bt->mout[k], 0, sizeof bt->mout[k]);
            bt->mout[k].msg_hdr.msg_iov = &bt->iout[k];
            bt->mout[k].msg_hdr.msg_iovlen = 1;
            bt->mout[k].msg_hdr.msg_name = h->msg_name;
            bt->mout[k].msg_hdr.msg_namelen = h->msg_namelen;
            size_t ctl = reply_from(h, bt->ctl_out[k].buf, sizeof bt->ctl_out[k].buf);
            bt->mout[k].msg_hdr.msg_control = ctl ? bt->ctl_out[k].buf : NULL;
            bt->mout[k].msg_hdr.msg_controllen = ctl;
            k++;
        }
        read_end(sl);
        for (int sent = 0; sent < k;) {
            int m = sendmmsg(fd, bt->mout + sent, (unsigned)(k - sent), 0);
            if (m < 0) {
                if (errno == EINTR)
                    continue;
                bump(sl, C_send_errors); /* skip the one that failed */
                m = 1;
            }
            sent += m;
        }
        unsigned spin = atomic_load_explicit(&s->busy_poll_us, memory_order_relaxed);
        if (spin) {
            int expected = 0;
            if (spinning || atomic_compare_exchange_strong(&s->spinner, &expected, 1)) {
                spinning = 1;
                spin_until = mono_us() + spin;
            }
        }
    }
    if (spinning)
        atomic_store(&s->spinner, 0);
    free(bt);
    return rc;
}
