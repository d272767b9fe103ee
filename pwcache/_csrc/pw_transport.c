/*
 * pw_transport.c - the C client's exchange with one server: request
 * packets (ids, sealing), this thread's UDP socket for it, and TCP for an
 * answer too big for a datagram (docs/protocol.md, "Transport"; docs/nss.md,
 * "Inside programs").
 */
#define _GNU_SOURCE
#include "pw_client_int.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include "pw_seal.h"

#define PWC_ID_BATCH 32         /* request ids drawn per getrandom() */

/* ---- packets ------------------------------------------------------------ */

/* Request ids come from getrandom(), drawn PWC_ID_BATCH at a time per
 * thread; a forked child never reuses its parent's batch. */
uint64_t pwc_random_id(void)
{
    static __thread struct {
        uint64_t ids[PWC_ID_BATCH];
        int left;
        unsigned generation;
    } pool;
    unsigned gen = pwc_generation();
    if (pool.left == 0 || pool.generation != gen) {
        pool.left = 0;
        pool.generation = gen;
        if (getrandom(pool.ids, sizeof pool.ids, GRND_NONBLOCK) == (ssize_t)sizeof pool.ids) {
            pool.left = PWC_ID_BATCH;
        } else {
            /* no entropy yet (early boot): one id from the clock and pid */
            static uint64_t counter;
            struct timespec ts;
            clock_gettime(CLOCK_MONOTONIC, &ts);
            return ((uint64_t)ts.tv_nsec << 20) ^ (uint64_t)ts.tv_sec ^ ((uint64_t)getpid() << 40) ^
                   __atomic_add_fetch(&counter, 0x9e3779b97f4a7c15ull, __ATOMIC_RELAXED);
        }
    }
    uint64_t id = pool.ids[--pool.left];
    pool.ids[pool.left] = 0;
    return id;
}

/* A request packet, sealed with `key` (key_id != 0) or plain. */
int pwc_build_request(uint8_t *out, size_t cap, uint64_t id, int op, const char *name,
                      uint64_t num, size_t pad, int key_id, const uint8_t *key)
{
    pw_request req = {0};
    uint8_t plain[PW_MAX_REQUEST];
    req.id = id;
    req.op = op;
    req.arg_kind = pw_op_arg_kind(op);
    if (req.arg_kind == PW_ARG_STR) {
        req.name = name;
        req.name_len = (uint32_t)strlen(name);
    } else {
        req.num = num;
    }
    if (!key_id)
        return pw_encode_request(out, cap, &req, pad);
    /* A sealed request is exempt from the amplification rule, but the
     * padding costs nothing and keeps requests of one size. */
    size_t ppad = pad > PW_SEAL_OVERHEAD ? pad - PW_SEAL_OVERHEAD : 0;
    int n = pw_encode_request(plain, sizeof plain, &req, ppad);
    if (n < 0)
        return -1;
    return pw_seal(key, key_id, plain, (size_t)n, out, cap);
}

/* ---- TCP ---------------------------------------------------------------- */

static int wait_fd(int fd, short events, int64_t deadline)
{
    for (;;) {
        int64_t left = deadline - pwc_now_ms();
        if (left <= 0)
            return -1;
        struct pollfd p = {fd, events, 0};
        int r = poll(&p, 1, (int)left);
        if (r > 0)
            return (p.revents & (events | POLLHUP | POLLERR)) ? 0 : -1;
        if (r < 0 && errno != EINTR)
            return -1;
    }
}

static int io_full(int fd, uint8_t *p, size_t n, int writing, int64_t deadline)
{
    while (n > 0) {
        ssize_t r = writing ? send(fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT)
                            : recv(fd, p, n, MSG_DONTWAIT);
        if (r > 0) {
            p += r;
            n -= (size_t)r;
            continue;
        }
        if (r == 0)
            return -1; /* peer closed early */
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK)
            return -1;
        if (wait_fd(fd, writing ? POLLOUT : POLLIN, deadline) < 0)
            return -1;
    }
    return 0;
}

/* One request over TCP to server `s`. On 0, ans->heap holds the answer and
 * *status / ans->payload are set. */
int pwc_tcp_exchange(const pwc_server *s, int op, const char *name, uint64_t num,
                     int key_id, const uint8_t *key, int64_t deadline,
                     pwc_answer *ans, int *status)
{
    uint8_t frame[4 + PW_MAX_REQUEST];
    uint64_t id = pwc_random_id();
    int n = pwc_build_request(frame + 4, sizeof frame - 4, id, op, name, num, 0, key_id, key);
    if (n < 0)
        return -1;
    frame[0] = (uint8_t)((uint32_t)n >> 24);
    frame[1] = (uint8_t)((uint32_t)n >> 16);
    frame[2] = (uint8_t)((uint32_t)n >> 8);
    frame[3] = (uint8_t)n;
    int fd = socket(s->addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0)
        return -1;
    int rc = -1;
    uint8_t *body = NULL, *plain = NULL;
    if (connect(fd, (const struct sockaddr *)&s->addr, s->addrlen) < 0) {
        if (errno != EINPROGRESS || wait_fd(fd, POLLOUT, deadline) < 0)
            goto out;
        int err = 0;
        socklen_t el = sizeof err;
        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el) < 0 || err)
            goto out;
    }
    uint8_t hdr[4];
    if (io_full(fd, frame, 4 + (size_t)n, 1, deadline) < 0 ||
        io_full(fd, hdr, 4, 0, deadline) < 0)
        goto out;
    uint32_t len = (uint32_t)hdr[0] << 24 | (uint32_t)hdr[1] << 16 | (uint32_t)hdr[2] << 8 | hdr[3];
    if (len == 0 || len > PW_MAX_TCP_ANSWER + PW_SEAL_OVERHEAD)
        goto out;
    body = malloc(len);
    if (!body || io_full(fd, body, len, 0, deadline) < 0)
        goto out;
    if (key_id) {
        plain = malloc(len);
        if (!plain)
            goto out;
    }
    if (pwc_answer_check(body, len, key_id ? plain : body, len, key_id, key, id, op, status,
                         &ans->payload) < 0)
        goto out;
    if (key_id) {
        ans->heap = plain;
        plain = NULL;
    } else {
        ans->heap = body;
        body = NULL;
    }
    rc = 0;
out:
    free(body);
    free(plain);
    close(fd);
    return rc;
}

/* ---- per-thread UDP sockets -------------------------------------------------
 *
 * Each thread keeps its own connected UDP socket per server (never shared
 * between threads or processes): a new socket per lookup costs three system
 * calls and about 20 us here. Before each use the descriptor is checked with
 * fstat() against the socket's inode, so a program that closed it (or
 * reused its number for something else) is never written to; a forked
 * child drops its parent's sockets; a thread's sockets are closed when it
 * exits. Only a socket whose last exchange went well is kept.
 */

typedef struct {
    int fd; /* -1: none */
    dev_t dev;
    ino_t ino;
    int rcvtimeo_ms; /* SO_RCVTIMEO set on it (0: none) */
    struct sockaddr_storage addr;
    socklen_t addrlen;
} pwc_sock;

typedef struct {
    pwc_sock s[PWC_MAX_SERVERS];
    unsigned generation; /* pwc_fork_generation when the sockets were made */
    int registered;      /* thread exit hook set */
} pwc_socks;

static __thread pwc_socks t_socks;
static pthread_key_t g_socks_key;
static int g_socks_key_ok;

/* Whether fd is still the socket we opened. */
static int sock_is_ours(const pwc_sock *k)
{
    struct stat sb;
    return k->fd >= 0 && fstat(k->fd, &sb) == 0 && S_ISSOCK(sb.st_mode) && sb.st_dev == k->dev &&
           sb.st_ino == k->ino;
}

static void sock_drop(pwc_sock *k, int close_it)
{
    if (k->fd >= 0 && close_it && sock_is_ours(k))
        close(k->fd);
    k->fd = -1;
}

static void socks_thread_exit(void *p)
{
    pwc_socks *ts = p;
    for (int i = 0; i < PWC_MAX_SERVERS; i++)
        sock_drop(&ts->s[i], ts->generation == pwc_generation());
}

__attribute__((constructor)) static void pwc_socks_init(void)
{
    g_socks_key_ok = pthread_key_create(&g_socks_key, socks_thread_exit) == 0;
}

/* This thread's socket for server slot `idx`, connected to s->addr;
 * *cached tells whether it was reused. */
static int sock_get(int idx, const pwc_server *s, int *cached)
{
    pwc_socks *ts = &t_socks;
    unsigned gen = pwc_generation();
    if (ts->generation != gen) {
        /* new thread (all zero) or a forked child: start with none; a
         * child's inherited copies are closed (they are its own fds) */
        int inherited = ts->generation != 0;
        for (int i = 0; i < PWC_MAX_SERVERS; i++) {
            if (inherited)
                sock_drop(&ts->s[i], 1);
            ts->s[i].fd = -1;
        }
        ts->generation = gen;
    }
    pwc_sock *k = &ts->s[idx];
    *cached = 0;
    if (k->fd >= 0) {
        if (k->addrlen == s->addrlen && memcmp(&k->addr, &s->addr, s->addrlen) == 0 && sock_is_ours(k)) {
            *cached = 1;
            return k->fd;
        }
        sock_drop(k, 1);
    }
    /* A blocking socket, so that the first wait of a lookup can be a
     * blocking recv with SO_RCVTIMEO (no poll); every other send and
     * receive passes MSG_DONTWAIT. */
    int fd = socket(s->addr.ss_family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    /* connect() lets the kernel drop datagrams from other sources and
     * report ICMP port-unreachable; the source is still checked below. */
    struct stat sb;
    if (connect(fd, (const struct sockaddr *)&s->addr, s->addrlen) < 0 || fstat(fd, &sb) < 0) {
        close(fd);
        return -1;
    }
    if (g_socks_key_ok && !ts->registered) {
        pthread_setspecific(g_socks_key, ts);
        ts->registered = 1;
    }
    *k = (pwc_sock){.fd = fd, .dev = sb.st_dev, .ino = sb.st_ino, .addrlen = s->addrlen};
    memcpy(&k->addr, &s->addr, s->addrlen);
    return fd;
}

/* After a lookup: keep the socket if its server answered, else close it. */
void pwc_udp_release(int idx, int keep)
{
    if (!keep)
        sock_drop(&t_socks.s[idx], 1);
}

/* Makes a blocking receive on server slot idx's socket wait at most ms
 * (set once per socket while the wait stays the same). Returns 0 or -1. */
int pwc_udp_wait_ms(int idx, int ms)
{
    pwc_sock *k = &t_socks.s[idx];
    if (k->rcvtimeo_ms == ms)
        return 0;
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    if (setsockopt(k->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) < 0)
        return -1;
    k->rcvtimeo_ms = ms;
    return 0;
}

int pwc_udp_send(int idx, const pwc_server *s, const uint8_t *pkt, size_t len)
{
    int cached;
    int fd = sock_get(idx, s, &cached);
    if (fd < 0)
        return -1;
    (void)cached; /* a late answer to an earlier lookup waiting in a reused
                   * socket carries another id: pwc_udp_receive() skips it */
    if (send(fd, pkt, len, MSG_NOSIGNAL | MSG_DONTWAIT) != (ssize_t)len) {
        pwc_udp_release(idx, 0);
        return -1;
    }
    return fd;
}

/* block: the first read may wait (up to the socket's SO_RCVTIMEO). */
int pwc_udp_receive(int fd, int key_id, const uint8_t *key, uint64_t id, int op,
                    pwc_answer *ans, int *status, int block)
{
    uint8_t raw[PWC_UDP_BUF];
    /* A plain answer is read straight into ans->udp (no copy); a sealed
     * one is opened from raw into it. Both hold PWC_UDP_BUF bytes. */
    uint8_t *buf = key_id ? raw : ans->udp;
    for (int i = 0; i < 64; i++) { /* bounded: a flood cannot keep us here */
        /* The socket is connected: the kernel delivers to it only
         * datagrams from the server's address and port (that is the
         * source check), so no address is asked for. */
        int wait = block && i == 0 ? 0 : MSG_DONTWAIT;
        ssize_t n = recv(fd, buf, PWC_UDP_BUF, wait | MSG_TRUNC);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return PWC_RX_NOTHING;
            return PWC_RX_FAILED; /* ECONNREFUSED & co: nobody listens there */
        }
        if ((size_t)n > PWC_UDP_BUF)
            continue; /* oversize: MSG_TRUNC gives the datagram's real size */
        pwp_reader payload;
        if (pwc_answer_check(buf, (size_t)n, ans->udp, sizeof ans->udp, key_id, key, id, op,
                             status, &payload) < 0)
            continue;
        ans->payload = payload; /* points into ans->udp */
        return PWC_RX_ANSWER;
    }
    return PWC_RX_NOTHING;
}
