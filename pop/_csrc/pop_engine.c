/*
 * pop_engine.c - pop-proxy's engine (see pop_engine.h, docs/pop.md).
 *
 * One epoll thread owns every session it accepted until it hands one over
 * or closes it; worker threads only run mailhost lookups. A session moves
 * through these states:
 *
 *   PRELOGIN   reading commands: CAPA, USER, QUIT answered here, PASS
 *              starts the login, anything else is handed over
 *   LOOKUP     a worker asks the password server for the mailhost
 *   CONNECTING the backend's TCP handshake
 *   BACKEND    greeting, XCLIENT and login answers
 *   RELAY      splice(2) backend -> pipe -> client; client -> backend copied
 *   GONE       closed or handed over; freed after the current epoll batch,
 *              which may still hold events for it
 *
 * Each state with a deadline keeps its sessions on a list in deadline
 * order (the timeout is the same for all of them, so appending keeps the
 * order): the earliest deadline is always a list head.
 */
#define _GNU_SOURCE
#include "pop_engine.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <stdarg.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "pw_client.h"  /* pwc_query: the C client of the wire protocol */
#include "pw_wire.h"

#define HISTORY_MAX 1024        /* client bytes before login; past it Python takes over */
#define LINE_ARG_MAX 255        /* USER and PASS arguments (RFC 2449), as pop/protocol.py */
#define BACKEND_LINE_MAX 4096   /* as pop/backend.py MAX_BACKEND_LINE */
#define COPY_CHUNK 16384        /* client -> backend, per read */
#define PIPE_DEFAULT 65536
#define MAX_EPOLL_EVENTS 256
#define MAX_QUEUED_LOOKUPS 4096 /* past it, logins go to Python's own client */
#define MAX_BACKENDS 4096       /* [pop] backends entries */
#define THROTTLE_BUCKETS 65536
#define THROTTLE_KEY_MAX 1024
#define MAP_BUCKETS 16384

enum { PRELOGIN, LOOKUP, CONNECTING, BACKEND, RELAY, GONE };
enum { END_CLIENT, END_BACKEND, END_LISTEN, END_WAKE };
enum { ST_CONNECTIONS, ST_REFUSED, ST_HANDOFFS, ST_LOGINS, ST_PRELOGIN_TIMEOUT, ST_RELAY_ERRORS,
       ST_IDLE_TIMEOUT };

typedef struct pe_conn pe_conn;

typedef struct {
    pe_conn *conn;
    int kind;
} pe_end;

typedef struct {
    pe_conn *head, *tail;
    double timeout;
} pe_tlist;

struct pe_conn {
    pe_end cend, bend;
    int cfd, bfd;
    int state;
    int dead;                   /* the client went away during the lookup */
    char addr[PE_ADDR_MAX];
    int port;
    struct sockaddr_storage peer;
    socklen_t peerlen;
    char user[PE_NAME_MAX];
    char pass[PE_NAME_MAX];
    char mailhost[PE_NAME_MAX];
    int have_user;
    int attempt;                /* began in the throttle, not yet ended */
    char user_key[PE_NAME_MAX]; /* ... for user, lower-cased */
    double started, login_at;
    /* Client bytes before login: answered ones, then unanswered ones. */
    uint8_t in[HISTORY_MAX];
    size_t in_len, answered;
    /* Deadline list. */
    pe_conn *tprev, *tnext;
    pe_tlist *tlist;
    double deadline;
    pe_conn *gnext;             /* on the engine's graveyard (GONE) */
    /* Backend exchange. */
    char *bline;
    size_t blen;
    int bstep;                  /* 0 greeting, 1 XCLIENT answer, 2 login answer */
    /* Relay. */
    int pr, pw;                 /* backend -> client pipe */
    size_t in_pipe, pipe_cap;
    int pipe_grown;
    uint8_t *up, *down;         /* bytes waiting to go to the backend / to the client */
    size_t up_len, up_off, down_len, down_off;
    int up_eof, up_shut, down_eof;
    int c_readable, c_writable, b_readable, b_writable;   /* edge-triggered readiness */
    /* Whether a short read may leave something behind: a FIN that came with
     * the data (EPOLLRDHUP), or anything that came while the login did not
     * read. Until the next EAGAIN, reads go on to it. */
    int c_unsure, b_unsure;
    int in_ready;               /* on the engine's ready list */
    pe_conn *rnext;
    uint64_t bytes_up, bytes_down;
};

/* A small string map (connections per address). */
typedef struct pe_entry {
    struct pe_entry *next;
    double value;
    char key[];
} pe_entry;

typedef struct {
    pe_entry *buckets[MAP_BUCKETS];
    size_t size;
} pe_map;

typedef struct {
    char name[PE_NAME_MAX];
    struct sockaddr_storage addr;
    socklen_t addrlen;          /* 0: not numeric, hand over */
} pe_backend;

typedef struct pe_job {
    struct pe_job *next;
    pe_conn *conn;
    char user[PE_NAME_MAX];
    int rc;                     /* 0 found, -ENOENT, or another negative errno */
    int frozen;
    char host[PE_NAME_MAX];
} pe_job;

typedef struct {
    char user[PE_NAME_MAX], keep[PE_NAME_MAX], farewell[PE_NAME_MAX];
} pe_kick_req;

typedef struct pe_qevent {
    struct pe_qevent *next;
    pe_event ev;
} pe_qevent;

struct pe_engine {
    pe_config cfg;
    char *texts[7];             /* our copies of the cfg strings */
    int epfd, listen_fd, wake_fd, event_fd;
    volatile int stopping;
    volatile int draining;
    int listener_nodelay;       /* accepted sockets inherit TCP_NODELAY */
    pe_end lend, wend;
    pe_tlist prelogin, connecting, backend, relay;
    double now;
    int pid;                    /* for log records */
    uint64_t stats[PE_NSTATS];
    size_t connections;
    pe_conn *graveyard;
    pe_conn *ready;             /* relays that used their budget: more next round */
    pe_map per_ip;
    pe_backend *backends;
    size_t nbackends;
    /* Lookups: jobs to the workers, results back. */
    pthread_mutex_t jlock;
    pthread_cond_t jcond;
    pe_job *jobs, *jobs_tail, *done;
    size_t queued;
    pthread_t *workers;
    int nworkers;
    /* Events to Python. */
    pthread_mutex_t qlock;
    pe_qevent *events, *events_tail;
    /* Kicks: relayed sessions per user, and the kicks asked for (klock). */
    pthread_mutex_t klock;
    pe_map relay_users;
    pe_kick_req kicks[PE_KICKS_MAX], kicking[PE_KICKS_MAX];
    size_t nkicks;
    uint8_t scratch[COPY_CHUNK];
};

static double monotonic(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* ---- log records ---------------------------------------------------------- */

#define LOG_INFO_LEVEL 20       /* Python's logging.INFO */
#define LOG_WARNING_LEVEL 30

/* One record, formatted as pwcache/logsetup.py's handlers do:
 * syslog "<PRI>IDENT[PID]: LEVEL message\0", stderr "TIME IDENT[PID]: LEVEL message\n". */
__attribute__((format(printf, 3, 4)))
static void log_record(pe_engine *e, int level, const char *fmt, ...)
{
    if (level < e->cfg.log_level || (e->cfg.syslog_fd < 0 && e->cfg.stderr_fd < 0))
        return;
    char msg[1024], line[1200];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    const char *name = level >= LOG_WARNING_LEVEL ? "WARNING" : "INFO";
    if (e->cfg.syslog_fd >= 0) {
        int severity = level >= LOG_WARNING_LEVEL ? 4 : 6;
        int n = snprintf(line, sizeof line, "<%d>%s[%d]: %s %s", e->cfg.syslog_facility | severity,
                         e->cfg.log_ident, e->pid, name, msg);
        if (n >= (int)sizeof line)
            n = sizeof line - 1;
        send(e->cfg.syslog_fd, line, n + 1, MSG_NOSIGNAL | MSG_DONTWAIT);    /* with its NUL */
    }
    if (e->cfg.stderr_fd >= 0) {
        struct timeval tv;
        struct tm tm;
        gettimeofday(&tv, NULL);
        localtime_r(&tv.tv_sec, &tm);
        int n = (int)strftime(line, sizeof line, "%Y-%m-%d %H:%M:%S", &tm);
        n += snprintf(line + n, sizeof line - n, ",%03d %s[%d]: %s %s\n", (int)(tv.tv_usec / 1000),
                      e->cfg.log_ident, e->pid, name, msg);
        if (n >= (int)sizeof line)
            n = sizeof line - 1;
        ssize_t w = write(e->cfg.stderr_fd, line, n);
        (void)w;
    }
}

/* ---- string map -------------------------------------------------------- */

static size_t map_hash(const char *s)
{
    size_t h = 1469598103934665603ULL;
    while (*s)
        h = (h ^ (unsigned char)*s++) * 1099511628211ULL;
    return h % MAP_BUCKETS;
}

static pe_entry **map_slot(pe_map *m, const char *key)
{
    pe_entry **p = &m->buckets[map_hash(key)];
    while (*p && strcmp((*p)->key, key) != 0)
        p = &(*p)->next;
    return p;
}

static pe_entry *map_get(pe_map *m, const char *key)
{
    return *map_slot(m, key);
}

static pe_entry *map_put(pe_map *m, const char *key, double value)
{
    pe_entry **p = map_slot(m, key);
    if (!*p) {
        size_t n = strlen(key) + 1;
        pe_entry *e = malloc(sizeof *e + n);
        if (!e)
            return NULL;
        e->next = NULL;
        memcpy(e->key, key, n);
        *p = e;
        m->size++;
    }
    (*p)->value = value;
    return *p;
}

static void map_del(pe_map *m, const char *key)
{
    pe_entry **p = map_slot(m, key);
    if (*p) {
        pe_entry *e = *p;
        *p = e->next;
        free(e);
        m->size--;
    }
}

/* Drops entries whose value is below `floor` (expired blocks). */
static void map_prune(pe_map *m, double floor)
{
    for (size_t i = 0; i < MAP_BUCKETS; i++) {
        pe_entry **p = &m->buckets[i];
        while (*p) {
            if ((*p)->value < floor) {
                pe_entry *e = *p;
                *p = e->next;
                free(e);
                m->size--;
            } else {
                p = &(*p)->next;
            }
        }
    }
}

static void map_clear(pe_map *m)
{
    map_prune(m, 1e300);
}

/* ---- the login throttle --------------------------------------------------- */

enum { TK_ADDRESS, TK_USER_ADDRESS, TK_USER, TK_KINDS };

typedef struct pt_entry {
    struct pt_entry *next;
    double level, then;         /* failures, drained up to `then` */
    int inflight;
    char key[];
} pt_entry;

struct pe_throttle {
    pthread_mutex_t lock;
    int limit[TK_KINDS];
    double window;
    size_t size, max_keys, cursor;
    uint64_t evicted;
    pt_entry *buckets[THROTTLE_BUCKETS];
};

pe_throttle *pe_throttle_new(size_t max_keys)
{
    pe_throttle *t = calloc(1, sizeof *t);
    if (!t)
        return NULL;
    pthread_mutex_init(&t->lock, NULL);
    t->max_keys = max_keys;
    return t;
}

void pe_throttle_configure(pe_throttle *t, int per_address, int per_user_address, int per_user, double window)
{
    pthread_mutex_lock(&t->lock);
    t->limit[TK_ADDRESS] = per_address;
    t->limit[TK_USER_ADDRESS] = per_user_address;
    t->limit[TK_USER] = per_user;
    t->window = window;
    pthread_mutex_unlock(&t->lock);
}

/* "A addr", "B addr user", "C user": an address holds no space. */
static void throttle_keys(char keys[TK_KINDS][THROTTLE_KEY_MAX], const char *addr, const char *user)
{
    snprintf(keys[TK_ADDRESS], THROTTLE_KEY_MAX, "A %s", addr);
    snprintf(keys[TK_USER_ADDRESS], THROTTLE_KEY_MAX, "B %s %s", addr, user);
    snprintf(keys[TK_USER], THROTTLE_KEY_MAX, "C %s", user);
}

static pt_entry **throttle_slot(pe_throttle *t, const char *key)
{
    size_t h = 1469598103934665603ULL;
    for (const char *p = key; *p; p++)
        h = (h ^ (unsigned char)*p) * 1099511628211ULL;
    pt_entry **p = &t->buckets[h % THROTTLE_BUCKETS];
    while (*p && strcmp((*p)->key, key) != 0)
        p = &(*p)->next;
    return p;
}

/* The failures left after draining at `limit / window` per second. */
static double throttle_level(pe_throttle *t, int kind, pt_entry *x, double now)
{
    if (t->limit[kind] <= 0 || t->window <= 0)
        return 0;
    double level = x->level - (now - x->then) * t->limit[kind] / t->window;
    return level > 0 ? level : 0;
}

/* Full: an idle key goes (the next one from a moving cursor, so about the
 * oldest); 0, or -1 when every key has an attempt in flight. */
static int throttle_evict(pe_throttle *t)
{
    for (size_t n = 0; n < THROTTLE_BUCKETS; n++, t->cursor = (t->cursor + 1) % THROTTLE_BUCKETS)
        for (pt_entry **p = &t->buckets[t->cursor]; *p; p = &(*p)->next)
            if ((*p)->inflight == 0) {
                pt_entry *x = *p;
                *p = x->next;
                free(x);
                t->size--;
                t->evicted++;
                return 0;
            }
    return -1;
}

int pe_throttle_begin(pe_throttle *t, const char *addr, const char *user, double now)
{
    char keys[TK_KINDS][THROTTLE_KEY_MAX];
    pt_entry *x[TK_KINDS];
    throttle_keys(keys, addr, user);
    pthread_mutex_lock(&t->lock);
    int verdict = PE_ADMITTED;
    /* In flight counts as failed: parallel attempts cannot pass the limit. */
    for (int k = 0; k < TK_KINDS && verdict == PE_ADMITTED; k++) {
        x[k] = *throttle_slot(t, keys[k]);
        if (t->limit[k] > 0 && x[k] && throttle_level(t, k, x[k], now) + x[k]->inflight > t->limit[k] - 1)
            verdict = PE_THROTTLED_ADDRESS + k;
    }
    for (int k = 0; k < TK_KINDS && verdict == PE_ADMITTED; k++) {
        x[k] = *throttle_slot(t, keys[k]);      /* again: making room may have evicted it */
        if (!x[k]) {
            size_t n = strlen(keys[k]) + 1;
            if ((t->size >= t->max_keys && throttle_evict(t) < 0) || !(x[k] = malloc(sizeof *x[k] + n))) {
                for (int j = 0; j < k; j++)
                    x[j]->inflight--;       /* (idle now: evictable) */
                verdict = PE_THROTTLED_FULL;
                break;
            }
            memcpy(x[k]->key, keys[k], n);
            x[k]->level = 0;
            x[k]->then = now;
            x[k]->inflight = 0;
            pt_entry **slot = throttle_slot(t, keys[k]);
            x[k]->next = *slot;
            *slot = x[k];
            t->size++;
        }
        x[k]->inflight++;
    }
    pthread_mutex_unlock(&t->lock);
    return verdict;
}

void pe_throttle_end(pe_throttle *t, const char *addr, const char *user, int verdict, double now)
{
    char keys[TK_KINDS][THROTTLE_KEY_MAX];
    throttle_keys(keys, addr, user);
    pthread_mutex_lock(&t->lock);
    for (int k = 0; k < TK_KINDS; k++) {
        pt_entry **p = throttle_slot(t, keys[k]);
        pt_entry *x = *p;
        if (!x)
            continue;
        if (x->inflight > 0)
            x->inflight--;
        x->level = throttle_level(t, k, x, now);
        x->then = now;
        if (verdict == PE_VERDICT_FAILED)
            x->level += 1;
        else if (verdict == PE_VERDICT_OK && k == TK_USER_ADDRESS)
            x->level = 0;       /* the owner, from there: a fresh start */
        if (x->inflight == 0 && x->level <= 0) {     /* nothing to remember */
            *p = x->next;
            free(x);
            t->size--;
        }
    }
    pthread_mutex_unlock(&t->lock);
}

size_t pe_throttle_keys(pe_throttle *t)
{
    pthread_mutex_lock(&t->lock);
    size_t n = t->size;
    pthread_mutex_unlock(&t->lock);
    return n;
}

uint64_t pe_throttle_evicted(pe_throttle *t)
{
    pthread_mutex_lock(&t->lock);
    uint64_t n = t->evicted;
    pthread_mutex_unlock(&t->lock);
    return n;
}

void pe_throttle_free(pe_throttle *t)
{
    if (!t)
        return;
    for (size_t i = 0; i < THROTTLE_BUCKETS; i++)
        for (pt_entry *x = t->buckets[i]; x;) {
            pt_entry *next = x->next;
            free(x);
            x = next;
        }
    pthread_mutex_destroy(&t->lock);
    free(t);
}

/* The throttle's user key: the name lower-cased (ASCII: the engine takes no other). */
static void user_key(char out[PE_NAME_MAX], const char *user)
{
    for (size_t i = 0; i < PE_NAME_MAX; i++)
        if (!(out[i] = tolower((unsigned char)user[i])))
            break;
    out[PE_NAME_MAX - 1] = 0;
}

/* An attempt the engine began and ends itself (a success, a client gone). */
static void attempt_end(pe_engine *e, pe_conn *c, int verdict)
{
    if (c->attempt && e->cfg.throttle)
        pe_throttle_end(e->cfg.throttle, c->addr, c->user_key, verdict, e->now);
    c->attempt = 0;
}

/* ---- deadlines ---------------------------------------------------------- */

static void timer_stop(pe_conn *c)
{
    pe_tlist *l = c->tlist;
    if (!l)
        return;
    if (c->tprev)
        c->tprev->tnext = c->tnext;
    else
        l->head = c->tnext;
    if (c->tnext)
        c->tnext->tprev = c->tprev;
    else
        l->tail = c->tprev;
    c->tprev = c->tnext = NULL;
    c->tlist = NULL;
}

/* (Re)starts the session's deadline on list `l`. */
static void timer_start(pe_engine *e, pe_conn *c, pe_tlist *l)
{
    timer_stop(c);
    if (l->timeout <= 0)
        return;
    c->deadline = e->now + l->timeout;
    c->tlist = l;
    c->tprev = l->tail;
    if (l->tail)
        l->tail->tnext = c;
    else
        l->head = c;
    l->tail = c;
}

/* ---- events to Python --------------------------------------------------- */

static pe_qevent *event_new(int kind, pe_conn *c)
{
    pe_qevent *q = calloc(1, sizeof *q);
    if (!q)
        return NULL;
    q->ev.kind = kind;
    q->ev.fd = -1;
    memcpy(q->ev.addr, c->addr, sizeof c->addr);
    q->ev.port = c->port;
    memcpy(q->ev.user, c->user, sizeof c->user);
    memcpy(q->ev.mailhost, c->mailhost, sizeof c->mailhost);
    return q;
}

static void event_push(pe_engine *e, pe_qevent *q)
{
    pthread_mutex_lock(&e->qlock);
    int was_empty = e->events == NULL;
    if (e->events_tail)
        e->events_tail->next = q;
    else
        e->events = q;
    e->events_tail = q;
    pthread_mutex_unlock(&e->qlock);
    if (was_empty) {
        uint64_t one = 1;
        ssize_t r = write(e->event_fd, &one, sizeof one);
        (void)r;
    }
}

int pe_next_event(pe_engine *e, pe_event *ev)
{
    pthread_mutex_lock(&e->qlock);
    pe_qevent *q = e->events;
    if (q) {
        e->events = q->next;
        if (!e->events)
            e->events_tail = NULL;
    }
    pthread_mutex_unlock(&e->qlock);
    if (!q) {
        uint64_t n;
        ssize_t r = read(e->event_fd, &n, sizeof n);   /* rearm: nothing is left */
        (void)r;
        pthread_mutex_lock(&e->qlock);
        int more = e->events != NULL;
        pthread_mutex_unlock(&e->qlock);
        if (more) {
            uint64_t one = 1;
            r = write(e->event_fd, &one, sizeof one);
        }
        return 0;
    }
    *ev = q->ev;
    free(q);
    return 1;
}

void pe_event_release(pe_event *ev)
{
    free(ev->history);
    ev->history = NULL;
}

/* ---- epoll ---------------------------------------------------------------- */

/* Each socket is registered once, edge-triggered for reading and writing:
 * events only say "something changed", and the handlers read or write
 * until EAGAIN (or until the state has no use for more). close() takes a
 * socket out of the set; only a handed-over one needs EPOLL_CTL_DEL. */
#define WATCH (EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET)

static int watch(pe_engine *e, int fd, pe_end *end)
{
    struct epoll_event ev = {.events = WATCH, .data.ptr = end};
    return epoll_ctl(e->epfd, EPOLL_CTL_ADD, fd, &ev);
}

/* ---- ending a session ---------------------------------------------------- */

static void close_fd(int *fd)
{
    if (*fd >= 0) {
        close(*fd);
        *fd = -1;
    }
}

static void release_count(pe_engine *e, pe_conn *c)
{
    e->connections--;
    pe_entry *n = map_get(&e->per_ip, c->addr);
    if (n && --n->value <= 0)
        map_del(&e->per_ip, c->addr);
}

/* Releases everything but the client socket (closed or handed over); the
 * struct itself waits on the graveyard until the epoll batch is done. */
static void relay_count(pe_engine *e, pe_conn *c, int delta);

static void conn_free(pe_engine *e, pe_conn *c)
{
    if (c->state == RELAY)
        relay_count(e, c, -1);
    attempt_end(e, c, PE_VERDICT_NONE);
    timer_stop(c);
    close_fd(&c->bfd);
    if (c->pr >= 0) {
        close(c->pr);
        close(c->pw);
        c->pr = c->pw = -1;
    }
    free(c->bline);
    free(c->up);
    free(c->down);
    c->bline = NULL;
    c->up = c->down = NULL;
    explicit_bzero(c->pass, sizeof c->pass);
    c->state = GONE;
    c->gnext = e->graveyard;
    e->graveyard = c;
}

static void bury(pe_engine *e)
{
    pe_conn *keep = NULL;
    while (e->graveyard) {
        pe_conn *c = e->graveyard;
        e->graveyard = c->gnext;
        if (c->in_ready) {      /* still on the ready list: next round */
            c->gnext = keep;
            keep = c;
        } else {
            free(c);
        }
    }
    e->graveyard = keep;
}

static void conn_close(pe_engine *e, pe_conn *c)
{
    release_count(e, c);
    if (c->state == LOOKUP) {
        /* A worker holds the session: it is freed when the answer comes. */
        close_fd(&c->cfd);
        timer_stop(c);
        c->dead = 1;
        return;
    }
    close_fd(&c->cfd);
    conn_free(e, c);
}

/* Gives the session to Python: its socket, what it sent, how far the
 * engine answered, and how a login went if one was tried. */
static void handoff(pe_engine *e, pe_conn *c, int outcome, const char *text)
{
    pe_qevent *q = event_new(PE_EV_HANDOFF, c);
    if (q && c->in_len) {
        q->ev.history = malloc(c->in_len);
        if (!q->ev.history) {
            free(q);
            q = NULL;
        }
    }
    if (!q) {
        conn_close(e, c);       /* out of memory: drop it rather than half-answer */
        return;
    }
    if (c->in_len)
        memcpy(q->ev.history, c->in, c->in_len);
    q->ev.history_len = c->in_len;
    q->ev.answered = c->answered;
    q->ev.started = c->started;
    q->ev.outcome = outcome;
    q->ev.attempt = c->attempt;     /* Python gives the verdict */
    c->attempt = 0;
    if (text)
        snprintf(q->ev.text, sizeof q->ev.text, "%s", text);
    epoll_ctl(e->epfd, EPOLL_CTL_DEL, c->cfd, NULL);
    q->ev.fd = c->cfd;
    c->cfd = -1;
    e->stats[ST_HANDOFFS]++;
    release_count(e, c);
    conn_free(e, c);
    event_push(e, q);
}

/* ---- sending ----------------------------------------------------------------- */

/* A short answer before login. The socket's buffer is empty or nearly
 * (the engine keeps at most HISTORY_MAX bytes of commands), so anything
 * but a whole write means the client is gone. */
static int send_all(int fd, const char *s, size_t n)
{
    ssize_t w = send(fd, s, n, MSG_NOSIGNAL | MSG_DONTWAIT);
    return w == (ssize_t)n ? 0 : -1;
}

static int send_text(pe_conn *c, const char *s)
{
    return send_all(c->cfd, s, strlen(s));
}

/* ---- accept ----------------------------------------------------------------- */

static void peer_name(pe_conn *c)
{
    struct sockaddr *sa = (struct sockaddr *)&c->peer;
    c->addr[0] = '?';
    c->addr[1] = 0;
    if (sa->sa_family == AF_INET) {
        struct sockaddr_in *in = (struct sockaddr_in *)sa;
        inet_ntop(AF_INET, &in->sin_addr, c->addr, sizeof c->addr);
        c->port = ntohs(in->sin_port);
    } else if (sa->sa_family == AF_INET6) {
        struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)sa;
        inet_ntop(AF_INET6, &in6->sin6_addr, c->addr, sizeof c->addr);
        c->port = ntohs(in6->sin6_port);
    }
}

static void on_accept(pe_engine *e)
{
    for (;;) {
        struct sockaddr_storage peer;
        socklen_t len = sizeof peer;
        int fd = accept4(e->listen_fd, (struct sockaddr *)&peer, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0)
            return;     /* EAGAIN, or EMFILE & co: the next round tries again */
        pe_conn *c = calloc(1, sizeof *c);
        if (!c) {
            close(fd);
            continue;
        }
        c->cend = (pe_end){c, END_CLIENT};
        c->bend = (pe_end){c, END_BACKEND};
        c->cfd = fd;
        c->bfd = c->pr = c->pw = -1;
        c->peer = peer;
        c->peerlen = len;
        peer_name(c);
        e->stats[ST_CONNECTIONS]++;
        pe_entry *n = map_get(&e->per_ip, c->addr);
        if (e->connections >= (size_t)e->cfg.max_connections ||
            (n && n->value >= e->cfg.max_connections_per_ip)) {
            e->stats[ST_REFUSED]++;
            send_text(c, e->cfg.refuse_err);
            close(fd);
            free(c);
            continue;
        }
        if (!map_put(&e->per_ip, c->addr, n ? n->value + 1 : 1)) {
            close(fd);
            free(c);
            continue;
        }
        e->connections++;
        if (send_text(c, e->cfg.greeting) < 0) {
            conn_close(e, c);
            continue;
        }
        if (watch(e, fd, &c->cend) < 0) {
            conn_close(e, c);
            continue;
        }
        timer_start(e, c, &e->prelogin);
    }
}

/* ---- before login ------------------------------------------------------------- */

static int verb_is(const uint8_t *line, size_t n, const char *verb)
{
    size_t v = strlen(verb);
    return n >= v && strncasecmp((const char *)line, verb, v) == 0 && (n == v || line[v] == ' ');
}

/* An argument the engine takes as plainly valid: 1..255 bytes, printable
 * ASCII, spaces only when `spaces`. Anything else goes to Python. */
static int plain_arg(const uint8_t *s, size_t n, int spaces)
{
    if (n == 0 || n > LINE_ARG_MAX)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (s[i] < (spaces ? 0x20 : 0x21) || s[i] > 0x7e)
            return 0;
    return 1;
}

static void start_login(pe_engine *e, pe_conn *c);

static int prelogin_lines(pe_engine *e, pe_conn *c);

/* Edge-triggered: a read shorter than the room took all there was, but a
 * FIN that came with the data (EPOLLRDHUP) is seen only by one more read. */
static void prelogin_read(pe_engine *e, pe_conn *c, int peer_closed)
{
    for (;;) {
        size_t room = HISTORY_MAX - c->in_len;
        if (room == 0) {
            handoff(e, c, PE_OUTCOME_NONE, NULL);
            return;
        }
        ssize_t n = recv(c->cfd, c->in + c->in_len, room, 0);
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            return;
        if (n <= 0) {
            conn_close(e, c);       /* closed or reset before login: nothing to say */
            return;
        }
        c->in_len += n;
        if (prelogin_lines(e, c) < 0 || ((size_t)n < room && !peer_closed))
            return;
    }
}

/* Answers the complete lines read: 0 when waiting for more, -1 when the
 * session left this state (login, handoff, close). */
static int prelogin_lines(pe_engine *e, pe_conn *c)
{
    for (;;) {
        uint8_t *line = c->in + c->answered;
        uint8_t *nl = memchr(line, '\n', c->in_len - c->answered);
        if (!nl) {
            if (c->in_len < HISTORY_MAX)
                return 0;
            handoff(e, c, PE_OUTCOME_NONE, NULL);
            return -1;
        }
        size_t len = nl - line;
        size_t next = c->answered + len + 1;
        if (len && line[len - 1] == '\r')
            len--;
        timer_start(e, c, &e->prelogin);
        if (len == 4 && verb_is(line, len, "CAPA")) {
            if (send_text(c, e->cfg.capa) < 0) {
                conn_close(e, c);
                return -1;
            }
        } else if (len == 4 && verb_is(line, len, "QUIT")) {
            send_text(c, e->cfg.quit_ok);
            conn_close(e, c);
            return -1;
        } else if (e->cfg.user_ok && len > 5 && verb_is(line, len, "USER") && plain_arg(line + 5, len - 5, 0)) {
            memcpy(c->user, line + 5, len - 5);
            c->user[len - 5] = 0;
            c->have_user = 1;
            if (send_text(c, e->cfg.user_ok) < 0) {
                conn_close(e, c);
                return -1;
            }
        } else if (e->cfg.user_ok && c->have_user && len > 5 && verb_is(line, len, "PASS") &&
                   plain_arg(line + 5, len - 5, 1)) {
            memcpy(c->pass, line + 5, len - 5);
            c->pass[len - 5] = 0;
            c->answered = next;
            start_login(e, c);
            return -1;
        } else {
            handoff(e, c, PE_OUTCOME_NONE, NULL);
            return -1;
        }
        c->answered = next;
    }
}

/* ---- the login: lookup ----------------------------------------------------- */

static void start_login(pe_engine *e, pe_conn *c)
{
    c->started = e->now;
    user_key(c->user_key, c->user);
    /* A throttled login goes to Python, which answers it (the same table
     * refuses it there too). */
    if (e->queued >= MAX_QUEUED_LOOKUPS || !e->cfg.throttle ||
        pe_throttle_begin(e->cfg.throttle, c->addr, c->user_key, e->now) != PE_ADMITTED) {
        handoff(e, c, PE_OUTCOME_NONE, NULL);
        return;
    }
    c->attempt = 1;
    pe_job *j = calloc(1, sizeof *j);
    if (!j) {
        handoff(e, c, PE_OUTCOME_NONE, NULL);
        return;
    }
    j->conn = c;
    memcpy(j->user, c->user, sizeof j->user);
    /* The client is not read during the login (as Python pauses reading):
     * commands it pipelines wait in the socket for the relay or for Python,
     * and a client that left is noticed at the next write. */
    timer_stop(c);
    c->state = LOOKUP;
    pthread_mutex_lock(&e->jlock);
    if (e->jobs_tail)
        e->jobs_tail->next = j;
    else
        e->jobs = j;
    e->jobs_tail = j;
    e->queued++;
    pthread_cond_signal(&e->jcond);
    pthread_mutex_unlock(&e->jlock);
}

static void lookup_one(pe_job *j, pwc_answer *ans)
{
    j->rc = pwc_query(PW_OP_MAILHOST, j->user, 0, ans);
    if (j->rc == 0)
        j->rc = pwc_answer_mailhost(ans, j->host, sizeof j->host, &j->frozen);
    pwc_answer_free(ans);
}

static void *lookup_worker(void *arg)
{
    pe_engine *e = arg;
    pwc_answer *ans = malloc(sizeof *ans);
    for (;;) {
        pthread_mutex_lock(&e->jlock);
        while (!e->jobs && !e->stopping)
            pthread_cond_wait(&e->jcond, &e->jlock);
        if (e->stopping) {
            pthread_mutex_unlock(&e->jlock);
            break;
        }
        pe_job *j = e->jobs;
        e->jobs = j->next;
        if (!e->jobs)
            e->jobs_tail = NULL;
        pthread_mutex_unlock(&e->jlock);

        if (ans)
            lookup_one(j, ans);
        else
            j->rc = -ENOMEM;

        pthread_mutex_lock(&e->jlock);
        int was_empty = e->done == NULL;
        j->next = e->done;
        e->done = j;
        pthread_mutex_unlock(&e->jlock);
        if (was_empty) {
            uint64_t one = 1;
            ssize_t r = write(e->wake_fd, &one, sizeof one);
            (void)r;
        }
    }
    free(ans);
    return NULL;
}

/* The backend's address: the [pop] backends map, else the mailhost itself
 * when it is a numeric HOST, HOST:PORT or [V6]:PORT. 0, or -1 for Python. */
static int backend_address(pe_engine *e, const char *mailhost, struct sockaddr_storage *ss, socklen_t *len)
{
    for (size_t i = 0; i < e->nbackends; i++)
        if (strcmp(e->backends[i].name, mailhost) == 0) {
            if (!e->backends[i].addrlen)
                return -1;
            *ss = e->backends[i].addr;
            *len = e->backends[i].addrlen;
            return 0;
        }
    char host[PE_NAME_MAX];
    int port = e->cfg.backend_port;
    const char *colon = strchr(mailhost, ':');
    if (mailhost[0] == '[') {
        const char *end = strchr(mailhost, ']');
        if (!end || (size_t)(end - mailhost - 1) >= sizeof host)
            return -1;
        memcpy(host, mailhost + 1, end - mailhost - 1);
        host[end - mailhost - 1] = 0;
        colon = end[1] == ':' ? end + 1 : NULL;
        if (end[1] && !colon)
            return -1;
    } else if (colon && !strchr(colon + 1, ':')) {
        if ((size_t)(colon - mailhost) >= sizeof host)
            return -1;
        memcpy(host, mailhost, colon - mailhost);
        host[colon - mailhost] = 0;
    } else {
        snprintf(host, sizeof host, "%s", mailhost);
        colon = NULL;
    }
    if (colon) {
        char *endp;
        long p = strtol(colon + 1, &endp, 10);
        if (*endp || endp == colon + 1 || p <= 0 || p >= 65536)
            return -1;
        port = (int)p;
    }
    struct sockaddr_in *in = (struct sockaddr_in *)ss;
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)ss;
    memset(ss, 0, sizeof *ss);
    if (inet_pton(AF_INET, host, &in->sin_addr) == 1) {
        in->sin_family = AF_INET;
        in->sin_port = htons(port);
        *len = sizeof *in;
        return 0;
    }
    if (inet_pton(AF_INET6, host, &in6->sin6_addr) == 1) {
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons(port);
        *len = sizeof *in6;
        return 0;
    }
    return -1;      /* a name: Python resolves it */
}

static void lookup_done(pe_engine *e, pe_job *j)
{
    pe_conn *c = j->conn;
    e->queued--;
    if (c->dead) {
        conn_free(e, c);
        return;
    }
    c->state = PRELOGIN;
    struct sockaddr_storage ss;
    socklen_t len;
    if (j->rc < 0 || j->frozen || backend_address(e, j->host, &ss, &len) < 0) {
        /* Unknown user, moving mailbox, no password server, a mailhost
         * by name: Python answers these (with its timing and texts). */
        handoff(e, c, PE_OUTCOME_NONE, NULL);
        return;
    }
    snprintf(c->mailhost, sizeof c->mailhost, "%s", j->host);
    c->bfd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->bfd < 0 || (connect(c->bfd, (struct sockaddr *)&ss, len) < 0 && errno != EINPROGRESS)) {
        handoff(e, c, PE_OUTCOME_NONE, NULL);   /* Python retries, then [SYS/TEMP] */
        return;
    }
    if (watch(e, c->bfd, &c->bend) < 0) {
        close_fd(&c->bfd);
        handoff(e, c, PE_OUTCOME_NONE, NULL);
        return;
    }
    c->state = CONNECTING;
    timer_start(e, c, &e->connecting);
}

static void drain_lookups(pe_engine *e)
{
    uint64_t n;
    ssize_t r = read(e->wake_fd, &n, sizeof n);
    (void)r;
    pthread_mutex_lock(&e->jlock);
    pe_job *j = e->done;
    e->done = NULL;
    pthread_mutex_unlock(&e->jlock);
    while (j) {
        pe_job *next = j->next;
        lookup_done(e, j);
        explicit_bzero(j, sizeof *j);
        free(j);
        j = next;
    }
}

/* ---- the login: backend ------------------------------------------------------ */

static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static size_t base64(const uint8_t *in, size_t n, char *out)
{
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = in[i] << 16 | (i + 1 < n ? in[i + 1] << 8 : 0) | (i + 2 < n ? in[i + 2] : 0);
        out[o++] = B64[v >> 18 & 63];
        out[o++] = B64[v >> 12 & 63];
        out[o++] = i + 1 < n ? B64[v >> 6 & 63] : '=';
        out[o++] = i + 2 < n ? B64[v & 63] : '=';
    }
    out[o] = 0;
    return o;
}

static void backend_failed(pe_engine *e, pe_conn *c, const char *what)
{
    char text[PE_TEXT_MAX];
    snprintf(text, sizeof text, "%s", what);
    close_fd(&c->bfd);
    handoff(e, c, PE_OUTCOME_ERROR, text);
}

/* The handshake's outcome: an error (refused: Python retries) or a
 * connection, whose greeting may have come with the same event. */
static int backend_connected(pe_engine *e, pe_conn *c, uint32_t ev)
{
    if (ev & (EPOLLERR | EPOLLHUP)) {
        close_fd(&c->bfd);
        handoff(e, c, PE_OUTCOME_NONE, NULL);
        return -1;
    }
    c->bline = malloc(BACKEND_LINE_MAX);
    if (!c->bline) {
        backend_failed(e, c, "out of memory");
        return -1;
    }
    c->state = BACKEND;
    timer_start(e, c, &e->backend);
    return 0;
}

/* XCLIENT (when the greeting offers it) and AUTH PLAIN, in one packet. */
static int send_login(pe_conn *c, int xclient)
{
    uint8_t plain[2 * PE_NAME_MAX + 2];
    size_t ul = strlen(c->user), pl = strlen(c->pass);
    plain[0] = 0;
    memcpy(plain + 1, c->user, ul);
    plain[1 + ul] = 0;
    memcpy(plain + 2 + ul, c->pass, pl);
    char b64[((2 * PE_NAME_MAX + 2) / 3 + 1) * 4 + 1];
    base64(plain, ul + pl + 2, b64);
    explicit_bzero(plain, sizeof plain);
    explicit_bzero(c->pass, sizeof c->pass);
    char out[PE_ADDR_MAX + sizeof b64 + 64];
    int n = 0;
    if (xclient)
        n = snprintf(out, sizeof out, "XCLIENT ADDR=%s PORT=%d\r\n", c->addr, c->port);
    n += snprintf(out + n, sizeof out - n, "AUTH PLAIN %s\r\n", b64);
    int rc = send_all(c->bfd, out, n);
    explicit_bzero(out, sizeof out);
    explicit_bzero(b64, sizeof b64);
    return rc;
}

static void start_relay(pe_engine *e, pe_conn *c, const char *first, size_t n);

static void backend_lines(pe_engine *e, pe_conn *c);

/* Edge-triggered: a read that fills the buffer may leave more behind. */
static void backend_read(pe_engine *e, pe_conn *c, int peer_closed)
{
    size_t room;
    do {
        room = BACKEND_LINE_MAX - c->blen;
        ssize_t n = recv(c->bfd, c->bline + c->blen, room, 0);
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            return;
        if (n < 0) {
            char what[128];
            snprintf(what, sizeof what, "backend read: %s", strerror(errno));
            backend_failed(e, c, what);
            return;
        }
        if (n == 0) {
            backend_failed(e, c, "backend closed the connection");
            return;
        }
        c->blen += n;
        backend_lines(e, c);
        if ((size_t)n < room && !peer_closed)
            return;
    } while (c->state == BACKEND);
}

/* The complete lines of the login exchange. */
static void backend_lines(pe_engine *e, pe_conn *c)
{
    for (;;) {
        char *nl = memchr(c->bline, '\n', c->blen);
        if (!nl) {
            if (c->blen == BACKEND_LINE_MAX)
                backend_failed(e, c, "backend line too long");
            return;
        }
        size_t len = nl - c->bline + 1;
        int ok = len >= 3 && memcmp(c->bline, "+OK", 3) == 0;
        if (c->bstep == 0) {
            if (!ok) {
                backend_failed(e, c, "backend greeting is not +OK");
                return;
            }
            size_t head = len < 32 ? len : 32;
            int xclient = memmem(c->bline, head, "[XCLIENT]", 9) != NULL;
            if (send_login(c, xclient) < 0) {
                backend_failed(e, c, "backend write failed");
                return;
            }
            c->bstep = xclient ? 1 : 2;
        } else if (c->bstep == 1) {
            if (!ok) {
                backend_failed(e, c, "backend refused XCLIENT");
                return;
            }
            c->bstep = 2;
        } else if (ok) {
            /* Logged in: the answer and whatever followed go to the client. */
            start_relay(e, c, c->bline, c->blen);
            return;
        } else {
            char text[PE_TEXT_MAX];
            size_t tl = len < sizeof text - 1 ? len : sizeof text - 1;
            memcpy(text, c->bline, tl);
            text[tl] = 0;
            send_all(c->bfd, "QUIT\r\n", 6);
            close_fd(&c->bfd);
            handoff(e, c, PE_OUTCOME_ANSWER, text);
            return;
        }
        c->blen -= len;
        memmove(c->bline, c->bline + len, c->blen);
    }
}

/* ---- kicks on move ----------------------------------------------------------------- */

/* The relayed sessions per user and mailhost, for pe_relay_users (out of
 * memory: the pair goes unlisted, and unkicked). Neither a user name (a
 * command line's) nor a mailhost holds a newline. */
static void relay_count(pe_engine *e, pe_conn *c, int delta)
{
    char key[2 * PE_NAME_MAX];
    snprintf(key, sizeof key, "%s\n%s", c->user, c->mailhost);
    pthread_mutex_lock(&e->klock);
    pe_entry *x = map_get(&e->relay_users, key);
    double n = (x ? x->value : 0) + delta;
    if (n > 0)
        map_put(&e->relay_users, key, n);
    else
        map_del(&e->relay_users, key);
    pthread_mutex_unlock(&e->klock);
}

size_t pe_relay_users(pe_engine *e, char *buf, size_t cap)
{
    size_t len = 0;
    pthread_mutex_lock(&e->klock);
    for (size_t i = 0; i < MAP_BUCKETS; i++)
        for (pe_entry *x = e->relay_users.buckets[i]; x; x = x->next) {
            size_t n = strlen(x->key) + 1;
            if (len + n <= cap) {
                memcpy(buf + len, x->key, n);
                len += n;
            }
        }
    pthread_mutex_unlock(&e->klock);
    return len;
}

int pe_kick(pe_engine *e, const char *user, const char *keep, const char *farewell)
{
    pthread_mutex_lock(&e->klock);
    if (e->nkicks >= PE_KICKS_MAX) {
        pthread_mutex_unlock(&e->klock);
        return -1;
    }
    pe_kick_req *k = &e->kicks[e->nkicks++];
    snprintf(k->user, sizeof k->user, "%s", user);
    snprintf(k->keep, sizeof k->keep, "%s", keep);
    snprintf(k->farewell, sizeof k->farewell, "%s", farewell);
    pthread_mutex_unlock(&e->klock);
    uint64_t one = 1;
    ssize_t r = write(e->wake_fd, &one, sizeof one);
    (void)r;
    return 0;
}

static void relay_close(pe_engine *e, pe_conn *c, const char *error);

/* In the engine thread, woken by pe_kick. Relayed sessions are all on
 * the relay deadline list (idle_timeout is positive). */
static void run_kicks(pe_engine *e)
{
    pthread_mutex_lock(&e->klock);
    size_t n = e->nkicks;
    memcpy(e->kicking, e->kicks, n * sizeof e->kicks[0]);
    e->nkicks = 0;
    pthread_mutex_unlock(&e->klock);
    for (size_t i = 0; i < n; i++) {
        pe_kick_req *k = &e->kicking[i];
        for (pe_conn *c = e->relay.head, *next; c; c = next) {
            next = c->tnext;
            if (c->state != RELAY || strcmp(c->user, k->user) != 0 || (k->keep[0] && !strcmp(c->mailhost, k->keep)))
                continue;
            log_record(e, LOG_INFO_LEVEL, "kick user=%s from=%s:%d backend=%s", c->user, c->addr, c->port,
                       c->mailhost);
            shutdown(c->bfd, SHUT_RDWR);    /* nothing more reaches the old copy */
            ssize_t r = send(c->cfd, k->farewell, strlen(k->farewell), MSG_NOSIGNAL | MSG_DONTWAIT);
            (void)r;
            relay_close(e, c, NULL);
        }
    }
}

/* ---- relay ---------------------------------------------------------------------- */

static void relay_close(pe_engine *e, pe_conn *c, const char *error)
{
    if (error) {
        e->stats[ST_RELAY_ERRORS]++;
        log_record(e, LOG_WARNING_LEVEL, "relay %s:%d <-> %s: %s", c->addr, c->port, c->mailhost, error);
    }
    log_record(e, LOG_INFO_LEVEL, "logout user=%s from=%s:%d backend=%s seconds=%.1f in=%llu out=%llu", c->user,
               c->addr, c->port, c->mailhost, e->now - c->login_at, (unsigned long long)c->bytes_up,
               (unsigned long long)c->bytes_down);
    conn_close(e, c);
}

static int gone(int err)
{
    return err == ECONNRESET || err == EPIPE || err == ENOTCONN || err == ETIMEDOUT || err == EHOSTUNREACH;
}

static void relay_error(pe_engine *e, pe_conn *c, const char *where)
{
    char text[160];
    int err = errno;
    if (gone(err)) {
        relay_close(e, c, NULL);
        return;
    }
    snprintf(text, sizeof text, "%s: %s", where, strerror(err));
    relay_close(e, c, text);
}

/* The relay runs edge-triggered: both sockets are registered once for
 * reading and writing, each event only sets readiness flags, and the pump
 * moves bytes until a system call says EAGAIN, so no epoll_ctl is made
 * while a session lasts. A pump that used its budget goes on the ready
 * list and continues in the next round (others get their turn). */
#define PUMP_BUDGET (4u << 20)  /* bytes moved per session per round */

static void make_ready(pe_engine *e, pe_conn *c)
{
    if (!c->in_ready) {
        c->in_ready = 1;
        c->rnext = e->ready;
        e->ready = c;
    }
}

static int hold(uint8_t **buf, size_t *len, size_t *off, const uint8_t *data, size_t n)
{
    uint8_t *b = realloc(*buf, n ? n : 1);
    if (!b)
        return -1;
    memcpy(b, data, n);
    *buf = b;
    *len = n;
    *off = 0;
    return 0;
}

/* One side's read of `asked` bytes returned `n` (errno as it left it):
 * bytes read; 0 for EAGAIN (the side is drained) or for the end (*eof
 * set); -1 after the relay was closed on an error. A short read took all
 * there was, unless the side is unsure (see pe_conn). */
static ssize_t after_read(pe_engine *e, pe_conn *c, ssize_t n, size_t asked, int *readable, int *unsure,
                          int *eof, const char *what)
{
    if (n < 0) {
        if (errno == EAGAIN) {
            *readable = *unsure = 0;
            return 0;
        }
        relay_error(e, c, what);
        return -1;
    }
    if (n == 0)
        *eof = 1;
    else if ((size_t)n < asked && !*unsure)
        *readable = 0;
    return n;
}

static ssize_t copy_in(pe_engine *e, pe_conn *c)
{
    ssize_t n = after_read(e, c, recv(c->bfd, e->scratch, sizeof e->scratch, 0), sizeof e->scratch,
                           &c->b_readable, &c->b_unsure, &c->down_eof, "backend read");
    if (n <= 0)
        return n < 0 ? -1 : c->down_eof;   /* the end is progress too */
    if (hold(&c->down, &c->down_len, &c->down_off, e->scratch, n) < 0) {
        relay_close(e, c, "out of memory");
        return -1;
    }
    if ((size_t)n == sizeof e->scratch) {
        int fds[2];
        if (pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0) {
            relay_close(e, c, "out of descriptors");
            return -1;
        }
        c->pr = fds[0];
        c->pw = fds[1];
        c->pipe_cap = PIPE_DEFAULT;
    }
    return n;
}

/* One side's write of `want` bytes returned `w` (errno as it left it):
 * bytes written; 0 for EAGAIN; -1 after the relay was closed on an error.
 * EAGAIN or a short write means the socket is full until the next event. */
static ssize_t after_write(pe_engine *e, pe_conn *c, ssize_t w, size_t want, int *writable, const char *what)
{
    if (w < 0) {
        if (errno == EAGAIN) {
            *writable = 0;
            return 0;
        }
        relay_error(e, c, what);
        return -1;
    }
    if ((size_t)w < want)
        *writable = 0;
    return w;
}

/* Backend -> client: the copied bytes first, then the pipe.
 * Returns bytes moved, 0 when blocked or nothing to do, -1 when closed. */
static ssize_t pump_down(pe_engine *e, pe_conn *c)
{
    ssize_t w;
    if (!c->c_writable)
        return 0;
    if (c->down_off < c->down_len) {
        size_t want = c->down_len - c->down_off;
        w = after_write(e, c, send(c->cfd, c->down + c->down_off, want, MSG_NOSIGNAL | MSG_DONTWAIT), want,
                        &c->c_writable, "client write");
        if (w > 0)
            c->down_off += w;
    } else if (c->in_pipe) {
        w = after_write(e, c, splice(c->pr, NULL, c->cfd, NULL, c->in_pipe, SPLICE_F_MOVE | SPLICE_F_NONBLOCK),
                        c->in_pipe, &c->c_writable, "client write");
        if (w > 0)
            c->in_pipe -= w;
    } else {
        return 0;
    }
    if (w > 0)
        c->bytes_down += w;
    return w;
}

/* Backend -> client. Small answers are copied (recv, send: no pipe for a
 * session that only logs in and out); the first read that fills the copy
 * buffer makes the pipe, and from then on splice(2) moves the bytes
 * without them entering user space (a RETR). */
static ssize_t pump_in(pe_engine *e, pe_conn *c)
{
    if (!c->b_readable || c->down_eof || c->down_off < c->down_len)
        return 0;
    if (c->pr < 0)
        return copy_in(e, c);
    size_t room = c->pipe_cap - c->in_pipe;
    if (room == 0)
        return 0;
    ssize_t n = after_read(e, c, splice(c->bfd, NULL, c->pw, NULL, room, SPLICE_F_MOVE | SPLICE_F_NONBLOCK), room,
                           &c->b_readable, &c->b_unsure, &c->down_eof, "backend read");
    if (n <= 0)
        return n < 0 ? -1 : c->down_eof;
    c->in_pipe += n;
    if ((size_t)n == room && !c->pipe_grown) {
        /* A read filled the pipe: grow it, once. */
        c->pipe_grown = 1;
        int cap = fcntl(c->pw, F_SETPIPE_SZ, e->cfg.relay_buffer);
        if (cap > 0)
            c->pipe_cap = cap;
    }
    return n;
}

/* Client -> backend: what is held first, then a new read (copied). */
static ssize_t pump_up(pe_engine *e, pe_conn *c)
{
    ssize_t w;
    if (c->up_off < c->up_len) {
        if (!c->b_writable)
            return 0;
        size_t want = c->up_len - c->up_off;
        w = after_write(e, c, send(c->bfd, c->up + c->up_off, want, MSG_NOSIGNAL | MSG_DONTWAIT), want,
                        &c->b_writable, "backend write");
        if (w > 0) {
            c->up_off += w;
            c->bytes_up += w;
        }
        return w;
    }
    if (c->up_eof) {
        if (!c->up_shut) {      /* pass the client's half-close on */
            c->up_shut = 1;
            /* (Unless the backend has closed too: close() is next, and says it.) */
            if (!c->down_eof && shutdown(c->bfd, SHUT_WR) < 0 && errno != ENOTCONN) {
                relay_error(e, c, "backend shutdown");
                return -1;
            }
        }
        return 0;
    }
    if (!c->c_readable)
        return 0;
    ssize_t n = after_read(e, c, recv(c->cfd, e->scratch, sizeof e->scratch, 0), sizeof e->scratch,
                           &c->c_readable, &c->c_unsure, &c->up_eof, "client read");
    if (n <= 0)
        return n < 0 ? -1 : c->up_eof;
    w = after_write(e, c, send(c->bfd, e->scratch, n, MSG_NOSIGNAL | MSG_DONTWAIT), n, &c->b_writable,
                    "backend write");
    if (w < 0)
        return -1;
    c->bytes_up += w;
    if (w < n && hold(&c->up, &c->up_len, &c->up_off, e->scratch + w, n - w) < 0) {
        relay_close(e, c, "out of memory");
        return -1;
    }
    return n;
}

static void relay_pump(pe_engine *e, pe_conn *c)
{
    size_t budget = PUMP_BUDGET;
    int moved_any = 0;
    for (;;) {
        ssize_t a = pump_in(e, c);
        if (a < 0)
            return;
        ssize_t b = pump_down(e, c);
        if (b < 0)
            return;
        ssize_t u = pump_up(e, c);
        if (u < 0)
            return;
        if (c->down_eof && c->in_pipe == 0 && c->down_off == c->down_len) {
            relay_close(e, c, NULL);       /* the backend closed: the session is over */
            return;
        }
        if (a + b + u == 0)
            break;
        moved_any = 1;
        if ((size_t)(a + b + u) >= budget) {
            make_ready(e, c);
            break;
        }
        budget -= a + b + u;
    }
    if (moved_any)
        timer_start(e, c, &e->relay);
}

static void start_relay(pe_engine *e, pe_conn *c, const char *first, size_t n)
{
    c->state = RELAY;
    relay_count(e, c, +1);
    c->login_at = e->now;
    e->stats[ST_LOGINS]++;
    attempt_end(e, c, PE_VERDICT_OK);
    log_record(e, LOG_INFO_LEVEL, "login user=%s from=%s:%d backend=%s", c->user, c->addr, c->port, c->mailhost);
    if (hold(&c->down, &c->down_len, &c->down_off, (const uint8_t *)first, n) < 0 ||
        hold(&c->up, &c->up_len, &c->up_off, c->in + c->answered, c->in_len - c->answered) < 0) {
        relay_close(e, c, "out of memory");
        return;
    }
    free(c->bline);
    c->bline = NULL;
    timer_start(e, c, &e->relay);
    /* Loopback's segment is 64 KiB: with Nagle the tail of every splice
     * would wait for an ACK. The client's socket has it from the listener
     * when that has it (Linux copies it at accept: pop/daemon.py sets it). */
    int one = 1;
    if (!e->listener_nodelay)
        setsockopt(c->cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(c->bfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->c_readable = c->c_writable = c->b_readable = c->b_writable = 1;   /* EAGAIN will say otherwise */
    c->c_unsure = c->b_unsure = 1;
    relay_pump(e, c);
}

static void relay_event(pe_engine *e, pe_conn *c, int kind, uint32_t ev)
{
    int readable = (ev & (EPOLLIN | EPOLLERR | EPOLLHUP)) != 0;
    int writable = (ev & (EPOLLOUT | EPOLLERR | EPOLLHUP)) != 0;
    int closed = (ev & (EPOLLRDHUP | EPOLLERR | EPOLLHUP)) != 0;
    if (kind == END_CLIENT) {
        c->c_readable |= readable;
        c->c_writable |= writable;
        c->c_unsure |= closed;
    } else {
        c->b_readable |= readable;
        c->b_writable |= writable;
        c->b_unsure |= closed;
    }
    relay_pump(e, c);
}

static void run_ready(pe_engine *e)
{
    pe_conn *c = e->ready;
    e->ready = NULL;
    while (c) {
        pe_conn *next = c->rnext;
        c->in_ready = 0;
        if (c->state == RELAY)
            relay_pump(e, c);
        c = next;
    }
}

/* ---- dispatch ---------------------------------------------------------------- */

static void conn_event(pe_engine *e, pe_end *end, uint32_t ev)
{
    pe_conn *c = end->conn;
    int readable = (ev & (EPOLLIN | EPOLLERR | EPOLLHUP | EPOLLRDHUP)) != 0;
    int peer_closed = (ev & (EPOLLERR | EPOLLHUP | EPOLLRDHUP)) != 0;
    switch (c->state) {
    case PRELOGIN:
        if (readable)
            prelogin_read(e, c, peer_closed);
        break;
    case CONNECTING:
        /* (The client's events during the login are dropped: the relay
         * starts by reading it anyway, and Python does after a handoff.) */
        if (end->kind == END_BACKEND && backend_connected(e, c, ev) == 0 && readable)
            backend_read(e, c, peer_closed);
        break;
    case BACKEND:
        if (end->kind == END_BACKEND && readable)
            backend_read(e, c, peer_closed);
        break;
    case RELAY:
        relay_event(e, c, end->kind, ev);
        break;
    default:            /* LOOKUP, GONE */
        break;
    }
}

static void expire(pe_engine *e)
{
    pe_conn *c;
    while ((c = e->prelogin.head) && c->deadline <= e->now) {
        e->stats[ST_PRELOGIN_TIMEOUT]++;
        send_text(c, e->cfg.timeout_err);
        conn_close(e, c);
    }
    while ((c = e->connecting.head) && c->deadline <= e->now) {
        close_fd(&c->bfd);
        handoff(e, c, PE_OUTCOME_NONE, NULL);   /* Python tries again, then [SYS/TEMP] */
    }
    while ((c = e->backend.head) && c->deadline <= e->now)
        backend_failed(e, c, "backend timed out");
    while ((c = e->relay.head) && c->deadline <= e->now) {
        e->stats[ST_IDLE_TIMEOUT]++;
        relay_close(e, c, NULL);
    }
}

static int next_timeout_ms(pe_engine *e)
{
    double first = 0;
    pe_tlist *lists[] = {&e->prelogin, &e->connecting, &e->backend, &e->relay};
    for (size_t i = 0; i < 4; i++)
        if (lists[i]->head && (first == 0 || lists[i]->head->deadline < first))
            first = lists[i]->head->deadline;
    if (first == 0)
        return -1;
    double ms = (first - e->now) * 1000.0 + 1;
    return ms < 0 ? 0 : ms > 60000 ? 60000 : (int)ms;
}

/* Draining: no more accepts; done when no session and no lookup is left. */
static int drained(pe_engine *e)
{
    if (e->listen_fd >= 0) {
        epoll_ctl(e->epfd, EPOLL_CTL_DEL, e->listen_fd, NULL);
        close(e->listen_fd);
        e->listen_fd = -1;
    }
    return e->connections == 0 && e->queued == 0 && e->graveyard == NULL;
}

int pe_run(pe_engine *e)
{
    struct epoll_event evs[MAX_EPOLL_EVENTS];
    for (int i = 0; i < e->nworkers; i++)
        if (pthread_create(&e->workers[i], NULL, lookup_worker, e) != 0) {
            e->nworkers = i;
            break;
        }
    e->now = monotonic();
    while (!e->stopping) {
        int n = epoll_wait(e->epfd, evs, MAX_EPOLL_EVENTS, e->ready ? 0 : next_timeout_ms(e));
        e->now = monotonic();
        if (n < 0 && errno != EINTR)
            return -1;
        for (int i = 0; i < n; i++) {
            pe_end *end = evs[i].data.ptr;
            if (end->kind == END_LISTEN)
                on_accept(e);
            else if (end->kind == END_WAKE) {
                drain_lookups(e);
                run_kicks(e);
            }
            else
                conn_event(e, end, evs[i].events);
        }
        run_ready(e);
        expire(e);
        bury(e);
        if (e->draining && drained(e))
            break;
    }
    return 0;
}

/* ---- life cycle ---------------------------------------------------------------- */

static char *copy_text(pe_engine *e, int slot, const char *s)
{
    if (!s)
        return NULL;
    e->texts[slot] = strdup(s);
    return e->texts[slot];
}

pe_engine *pe_new(const pe_config *cfg, int listen_fd)
{
    pe_engine *e = calloc(1, sizeof *e);
    if (!e)
        return NULL;
    e->cfg = *cfg;
    e->cfg.greeting = copy_text(e, 0, cfg->greeting);
    e->cfg.capa = copy_text(e, 1, cfg->capa);
    e->cfg.user_ok = copy_text(e, 2, cfg->user_ok);
    e->cfg.quit_ok = copy_text(e, 3, cfg->quit_ok);
    e->cfg.timeout_err = copy_text(e, 4, cfg->timeout_err);
    e->cfg.refuse_err = copy_text(e, 5, cfg->refuse_err);
    e->cfg.log_ident = copy_text(e, 6, cfg->log_ident ? cfg->log_ident : "pop-proxy");
    e->prelogin.timeout = cfg->prelogin_timeout;
    e->connecting.timeout = cfg->connect_timeout;
    e->backend.timeout = cfg->backend_timeout;
    e->relay.timeout = cfg->idle_timeout;
    e->listen_fd = listen_fd;
    socklen_t optlen = sizeof e->listener_nodelay;
    if (getsockopt(listen_fd, IPPROTO_TCP, TCP_NODELAY, &e->listener_nodelay, &optlen) < 0)
        e->listener_nodelay = 0;
    e->pid = getpid();
    e->nworkers = cfg->lookup_threads > 0 ? cfg->lookup_threads : 1;
    e->workers = calloc(e->nworkers, sizeof *e->workers);
    e->backends = calloc(MAX_BACKENDS, sizeof *e->backends);
    e->epfd = epoll_create1(EPOLL_CLOEXEC);
    e->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    e->event_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    pthread_mutex_init(&e->jlock, NULL);
    pthread_cond_init(&e->jcond, NULL);
    pthread_mutex_init(&e->qlock, NULL);
    pthread_mutex_init(&e->klock, NULL);
    e->lend = (pe_end){NULL, END_LISTEN};
    e->wend = (pe_end){NULL, END_WAKE};
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = &e->lend};
    struct epoll_event wev = {.events = EPOLLIN, .data.ptr = &e->wend};
    if (!e->workers || !e->backends || e->epfd < 0 || e->wake_fd < 0 || e->event_fd < 0 ||
        !e->cfg.log_ident || !e->cfg.greeting || !e->cfg.capa || !e->cfg.quit_ok || !e->cfg.timeout_err || !e->cfg.refuse_err ||
        epoll_ctl(e->epfd, EPOLL_CTL_ADD, listen_fd, &lev) < 0 ||
        epoll_ctl(e->epfd, EPOLL_CTL_ADD, e->wake_fd, &wev) < 0) {
        int err = errno ? errno : ENOMEM;
        e->listen_fd = e->cfg.syslog_fd = e->cfg.stderr_fd = -1;     /* still the caller's */
        pe_free(e);
        errno = err;
        return NULL;
    }
    return e;
}

int pe_add_backend(pe_engine *e, const char *mailhost, const char *ip, int port)
{
    if (e->nbackends >= MAX_BACKENDS || strlen(mailhost) >= PE_NAME_MAX)
        return -1;
    pe_backend *b = &e->backends[e->nbackends++];
    snprintf(b->name, sizeof b->name, "%s", mailhost);
    b->addrlen = 0;
    struct sockaddr_in *in = (struct sockaddr_in *)&b->addr;
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&b->addr;
    if (port > 0 && inet_pton(AF_INET, ip, &in->sin_addr) == 1) {
        in->sin_family = AF_INET;
        in->sin_port = htons(port);
        b->addrlen = sizeof *in;
    } else if (port > 0 && inet_pton(AF_INET6, ip, &in6->sin6_addr) == 1) {
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons(port);
        b->addrlen = sizeof *in6;
    }
    return 0;
}

void pe_stop(pe_engine *e)
{
    e->stopping = 1;
    uint64_t one = 1;
    ssize_t r = write(e->wake_fd, &one, sizeof one);
    (void)r;
}

void pe_drain(pe_engine *e)
{
    e->draining = 1;
    uint64_t one = 1;
    ssize_t r = write(e->wake_fd, &one, sizeof one);
    (void)r;
}

size_t pe_open_sessions(pe_engine *e)
{
    return __atomic_load_n(&e->connections, __ATOMIC_RELAXED);
}

int pe_event_fd(pe_engine *e)
{
    return e->event_fd;
}

void pe_stats(pe_engine *e, uint64_t *out)
{
    memcpy(out, e->stats, sizeof e->stats);
}

void pe_free(pe_engine *e)
{
    if (!e)
        return;
    pthread_mutex_lock(&e->jlock);
    e->stopping = 1;
    pthread_cond_broadcast(&e->jcond);
    pthread_mutex_unlock(&e->jlock);
    for (int i = 0; i < e->nworkers; i++)
        if (e->workers[i])
            pthread_join(e->workers[i], NULL);
    /* Sessions still open end with the process (as asyncio's do). */
    for (pe_job *j = e->jobs; j;) {
        pe_job *next = j->next;
        free(j);
        j = next;
    }
    for (pe_job *j = e->done; j;) {
        pe_job *next = j->next;
        free(j);
        j = next;
    }
    pe_event ev;
    while (e->event_fd >= 0 && pe_next_event(e, &ev)) {
        if (ev.fd >= 0)
            close(ev.fd);
        if (ev.attempt && e->cfg.throttle) {
            char user[PE_NAME_MAX];
            user_key(user, ev.user);
            pe_throttle_end(e->cfg.throttle, ev.addr, user, PE_VERDICT_NONE, monotonic());
        }
        pe_event_release(&ev);
    }
    map_clear(&e->per_ip);
    map_clear(&e->relay_users);
    for (int i = 0; i < 7; i++)
        free(e->texts[i]);
    if (e->cfg.syslog_fd >= 0)
        close(e->cfg.syslog_fd);
    if (e->cfg.stderr_fd >= 0)
        close(e->cfg.stderr_fd);
    if (e->listen_fd >= 0)
        close(e->listen_fd);
    if (e->epfd >= 0)
        close(e->epfd);
    if (e->wake_fd >= 0)
        close(e->wake_fd);
    if (e->event_fd >= 0)
        close(e->event_fd);
    free(e->workers);
    free(e->backends);
    free(e);
}
