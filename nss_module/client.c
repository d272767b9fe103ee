/*
 * client.c - configuration, health record and the hedged exchange shared
 * by every map of libnss_pwserver.so.2 (see client.h, docs/nss.md).
 *
 * Thread safety: no socket is shared; each lookup opens its own and closes
 * it before returning. The only shared state is the parsed configuration
 * and the health record, both behind `g_lock`, which is never held during
 * network I/O and is taken around fork() so a child never inherits it
 * locked.
 */
#define _GNU_SOURCE
#include "client.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <limits.h>
#include <stddef.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "pw_seal.h"

#define PWC_DEFAULT_CONF "/etc/pwserver.conf"
#define PWC_DEFAULT_HEALTH "/run/pwserver/health"
#define PWC_MAX_SERVERS 8
#define PWC_NAME_MAX 80         /* "HOST:PORT" as written in the config */
#define PWC_PATH_MAX 256
#define PWC_LINE_MAX 512
#define PWC_HEALTH_MAX 4096     /* bytes of the health record we read */
#define PWC_MAX_DOWN 16
/* Files are stat()ed at most this often by a long-running process; a new
 * process always reads them on its first lookup. */
#define PWC_RECHECK_FILES_MS 1000
#define PWC_ID_BATCH 32         /* request ids drawn per getrandom() */
/* The first wait of a lookup is a blocking recv when it is at least
 * PWC_FAST_MIN_MS; it ends PWC_FAST_SLACK_MS early (kernel tick rounding). */
#define PWC_FAST_MIN_MS 10
#define PWC_FAST_SLACK_MS 5

typedef struct {
    char name[PWC_NAME_MAX];
    struct sockaddr_storage addr;
    socklen_t addrlen;
} pwc_server;

typedef struct {
    int nservers;
    int timeout_ms, hedge_ms, recheck_s, enumerate;
    int has_netkey;
    uint8_t netkey[PW_KEY_BYTES];
    char shadow_keyfile[PWC_PATH_MAX];
    char health_file[PWC_PATH_MAX];
    /* last: config_copy copies only the nservers in use */
    pwc_server servers[PWC_MAX_SERVERS];
} pwc_config;

typedef struct {
    char name[PWC_NAME_MAX];
    int64_t until;
} pwc_down;

/* A file's identity, to re-read it only when it changed. */
typedef struct {
    int exists;
    dev_t dev;
    ino_t ino;
    off_t size;
    struct timespec mtime;
} pwc_stamp;

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static pwc_config g_conf;
static int g_conf_loaded;
static int64_t g_conf_checked;   /* CLOCK_MONOTONIC_COARSE ms */
static char g_conf_path[PWC_PATH_MAX];
static pwc_stamp g_conf_stamp;
/* Health record: the file's last parsed content, and the part this process
 * could not write to the file (kept in memory only). */
static pwc_down g_file_down[PWC_MAX_DOWN];
static int g_file_ndown;
static pwc_stamp g_health_stamp;
static int64_t g_health_checked;
static char g_health_path[PWC_PATH_MAX];
static pwc_down g_local_down[PWC_MAX_DOWN];
static int g_local_ndown;

/* ---- fork safety -------------------------------------------------------- */

/* Bumped in every forked child: per-thread state made before the fork
 * (buffered request ids) must not be reused by both processes. */
static unsigned g_fork_generation = 1;

static void atfork_prepare(void) { pthread_mutex_lock(&g_lock); }
static void atfork_parent(void) { pthread_mutex_unlock(&g_lock); }
static void atfork_child(void)
{
    __atomic_add_fetch(&g_fork_generation, 1, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&g_lock);
}

__attribute__((constructor)) static void pwc_init(void)
{
    pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}

/* ---- time ---------------------------------------------------------------- */

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Cheap (vDSO, no system call), a few ms coarse: for throttling only. */
static int64_t coarse_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int64_t now_epoch(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec;
}

/* ---- configuration ------------------------------------------------------- */

static void stamp_of(const char *path, pwc_stamp *st)
{
    struct stat sb;
    memset(st, 0, sizeof *st);
    if (stat(path, &sb) == 0) {
        st->exists = 1;
        st->dev = sb.st_dev;
        st->ino = sb.st_ino;
        st->size = sb.st_size;
        st->mtime = sb.st_mtim;
    }
}

static int stamp_equal(const pwc_stamp *a, const pwc_stamp *b)
{
    return a->exists == b->exists && a->dev == b->dev && a->ino == b->ino &&
           a->size == b->size && a->mtime.tv_sec == b->mtime.tv_sec &&
           a->mtime.tv_nsec == b->mtime.tv_nsec;
}

/* "HOST:PORT", "[V6]:PORT" or "HOST" (default port). Numeric addresses are
 * parsed without any lookup; a host name is resolved once, when the
 * configuration is (re)loaded. */
static int parse_server(const char *text, pwc_server *s)
{
    char host[PWC_NAME_MAX], port[16];
    size_t len = strlen(text);
    if (len == 0 || len >= PWC_NAME_MAX)
        return -1;
    memcpy(s->name, text, len + 1);
    const char *colon;
    if (text[0] == '[') {
        const char *close = strchr(text, ']');
        if (!close)
            return -1;
        size_t hl = (size_t)(close - text - 1);
        memcpy(host, text + 1, hl);
        host[hl] = '\0';
        colon = close[1] == ':' ? close + 1 : NULL;
        if (close[1] && !colon)
            return -1;
    } else {
        colon = strrchr(text, ':');
        size_t hl = colon ? (size_t)(colon - text) : len;
        memcpy(host, text, hl);
        host[hl] = '\0';
    }
    if (colon) {
        if (strlen(colon + 1) == 0 || strlen(colon + 1) >= sizeof port)
            return -1;
        strcpy(port, colon + 1);
    } else {
        snprintf(port, sizeof port, "%d", PW_DEFAULT_PORT);
    }
    struct addrinfo hints = {0}, *res = NULL;
    hints.ai_socktype = SOCK_DGRAM;
    hints.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV;
    if (getaddrinfo(host, port, &hints, &res) != 0) {
        hints.ai_flags = AI_NUMERICSERV;
        if (getaddrinfo(host, port, &hints, &res) != 0)
            return -1;
    }
    if (!res || res->ai_addrlen > sizeof s->addr) {
        freeaddrinfo(res);
        return -1;
    }
    memcpy(&s->addr, res->ai_addr, res->ai_addrlen);
    s->addrlen = res->ai_addrlen;
    freeaddrinfo(res);
    return 0;
}

static int parse_int(const char *v, int lo, int hi, int *out)
{
    char *end;
    errno = 0;
    long n = strtol(v, &end, 10);
    if (errno || end == v || *end || n < lo || n > hi)
        return -1;
    *out = (int)n;
    return 0;
}

static void config_defaults(pwc_config *c)
{
    memset(c, 0, sizeof *c);
    c->timeout_ms = 2000;
    c->hedge_ms = 50;
    c->recheck_s = 5;
    strcpy(c->health_file, PWC_DEFAULT_HEALTH);
}

static void config_parse_line(pwc_config *c, char *line)
{
    char *hash = strchr(line, '#');
    if (hash)
        *hash = '\0';
    char *key = strtok(line, " \t\r\n");
    char *val = key ? strtok(NULL, " \t\r\n") : NULL;
    if (!key || !val)
        return;
    if (strcmp(key, "server") == 0) {
        if (c->nservers < PWC_MAX_SERVERS &&
            parse_server(val, &c->servers[c->nservers]) == 0)
            c->nservers++;
    } else if (strcmp(key, "timeout_ms") == 0) {
        parse_int(val, 1, 600000, &c->timeout_ms);
    } else if (strcmp(key, "hedge_ms") == 0) {
        parse_int(val, 0, 600000, &c->hedge_ms);
    } else if (strcmp(key, "recheck_s") == 0) {
        parse_int(val, 1, 86400, &c->recheck_s);
    } else if (strcmp(key, "enumerate") == 0) {
        c->enumerate = strcmp(val, "yes") == 0 || strcmp(val, "true") == 0 ||
                       strcmp(val, "1") == 0;
    } else if (strcmp(key, "keyfile") == 0) {
        /* A key this process cannot read leaves it without the network
         * key: the server will then drop its packets (UNAVAIL). */
        c->has_netkey = pw_read_keyfile(val, c->netkey) == 0;
    } else if (strcmp(key, "shadow_keyfile") == 0) {
        if (strlen(val) < sizeof c->shadow_keyfile)
            strcpy(c->shadow_keyfile, val);
    } else if (strcmp(key, "health_file") == 0) {
        if (strlen(val) < sizeof c->health_file)
            strcpy(c->health_file, val);
    }
}

static void config_load(pwc_config *c, const char *path)
{
    config_defaults(c);
    FILE *f = fopen(path, "re");
    if (f) {
        char line[PWC_LINE_MAX];
        int lines = 0;
        while (lines++ < 10000 && fgets(line, sizeof line, f)) {
            size_t n = strlen(line);
            if (n == sizeof line - 1 && line[n - 1] != '\n') {
                /* overlong line: skip the rest of it, ignore it */
                int ch;
                while ((ch = getc(f)) != EOF && ch != '\n')
                    ;
                continue;
            }
            config_parse_line(c, line);
        }
        fclose(f);
    }
    if (c->nservers == 0)
        parse_server("127.0.0.1:7773", &c->servers[c->nservers++]);
}

/* Every field, and of the servers only those in use (each lookup takes a
 * copy: the 8 server slots are most of the struct). */
static void config_copy(pwc_config *out, const pwc_config *in)
{
    memcpy(out, in, offsetof(pwc_config, servers) + (size_t)in->nservers * sizeof in->servers[0]);
}

/* Copies the current configuration, re-reading the file when it changed.
 * Called with g_lock held. */
static void config_current(pwc_config *out)
{
    const char *path = secure_getenv("PWSERVER_CONF");
    if (!path || !*path || strlen(path) >= sizeof g_conf_path)
        path = PWC_DEFAULT_CONF;
    int64_t t = coarse_ms();
    int same_path = g_conf_loaded && strcmp(path, g_conf_path) == 0;
    if (same_path && t - g_conf_checked < PWC_RECHECK_FILES_MS) {
        config_copy(out, &g_conf);
        return;
    }
    g_conf_checked = t;
    pwc_stamp st;
    stamp_of(path, &st);
    if (!same_path || !stamp_equal(&st, &g_conf_stamp)) {
        explicit_bzero(g_conf.netkey, sizeof g_conf.netkey);
        config_load(&g_conf, path);
        strcpy(g_conf_path, path);
        g_conf_stamp = st;
        g_conf_loaded = 1;
    }
    config_copy(out, &g_conf);
}

int pwc_enumerate_enabled(void)
{
    pwc_config c;
    int saved = errno;
    pthread_mutex_lock(&g_lock);
    config_current(&c);
    pthread_mutex_unlock(&g_lock);
    explicit_bzero(c.netkey, sizeof c.netkey);
    errno = saved;
    return c.enumerate;
}

/* ---- health record (docs/protocol.md, "Health record") ------------------ */

/* Parses "down HOST:PORT UNTIL" lines; anything else (NUL bytes included)
 * is ignored. */
static int health_parse(const char *text, size_t size, pwc_down *out, int max)
{
    int n = 0;
    const char *p = text, *end = text + size;
    while (p < end && n < max) {
        const char *eol = memchr(p, '\n', (size_t)(end - p));
        size_t len = eol ? (size_t)(eol - p) : (size_t)(end - p);
        char line[PWC_NAME_MAX + 64], name[PWC_NAME_MAX];
        long long until;
        if (len < sizeof line && !memchr(p, '\0', len)) {
            memcpy(line, p, len);
            line[len] = '\0';
            if (sscanf(line, "down %79s %lld", name, &until) == 2) {
                strcpy(out[n].name, name);
                out[n].until = until;
                n++;
            }
        }
        p += len + (eol ? 1 : 0);
    }
    return n;
}

static int health_read_file(const char *path, pwc_down *out, int max)
{
    char text[PWC_HEALTH_MAX];
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    if (fd < 0)
        return 0;
    ssize_t got = 0;
    while (got < PWC_HEALTH_MAX) {
        ssize_t r = read(fd, text + got, PWC_HEALTH_MAX - (size_t)got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        got += r;
    }
    close(fd);
    return health_parse(text, (size_t)got, out, max);
}

/* Refreshes g_file_down from the file when it changed. g_lock held. */
static void health_refresh(const pwc_config *c)
{
    int64_t t = coarse_ms();
    int same_path = strcmp(g_health_path, c->health_file) == 0;
    if (same_path && g_health_checked && t - g_health_checked < PWC_RECHECK_FILES_MS)
        return;
    g_health_checked = t;
    pwc_stamp st;
    stamp_of(c->health_file, &st);
    if (strcmp(g_health_path, c->health_file) != 0 ||
        !stamp_equal(&st, &g_health_stamp)) {
        g_file_ndown = st.exists ? health_read_file(c->health_file, g_file_down, PWC_MAX_DOWN) : 0;
        g_health_stamp = st;
        strcpy(g_health_path, c->health_file);
    }
}

static int64_t down_until(const pwc_down *d, int n, const char *name)
{
    for (int i = 0; i < n; i++)
        if (strcmp(d[i].name, name) == 0)
            return d[i].until;
    return 0;
}

/* Sets (until > 0) or removes (until == 0) a server in a list. */
static void down_set(pwc_down *d, int *n, const char *name, int64_t until)
{
    for (int i = 0; i < *n; i++) {
        if (strcmp(d[i].name, name) == 0) {
            if (until)
                d[i].until = until;
            else
                d[i] = d[--*n];
            return;
        }
    }
    if (until && *n < PWC_MAX_DOWN) {
        strcpy(d[*n].name, name);
        d[*n].until = until;
        ++*n;
    }
}

/* Writes the record atomically (temporary file in the same folder, then
 * rename), mode 0644. Returns 0, or -1 when this process may not. */
static int health_write_file(const char *path, const pwc_down *d, int n)
{
    char dir[PWC_PATH_MAX], tmp[PWC_PATH_MAX + 16];
    const char *slash = strrchr(path, '/');
    if (!slash)
        return -1;
    size_t dl = (size_t)(slash - path);
    memcpy(dir, path, dl);
    dir[dl] = '\0';
    if (dl > 0 && mkdir(dir, 0755) < 0 && errno != EEXIST)
        return -1;
    snprintf(tmp, sizeof tmp, "%s/.health.XXXXXX", dl ? dir : "");
    int fd = mkostemp(tmp, O_CLOEXEC);
    if (fd < 0)
        return -1;
    char text[PWC_MAX_DOWN * (PWC_NAME_MAX + 32)];
    size_t len = 0;
    for (int i = 0; i < n; i++)
        len += (size_t)snprintf(text + len, sizeof text - len, "down %s %lld\n",
                                d[i].name, (long long)d[i].until);
    int ok = fchmod(fd, 0644) == 0 && write(fd, text, len) == (ssize_t)len;
    close(fd);
    if (!ok || rename(tmp, path) < 0) {
        unlink(tmp);
        return -1;
    }
    return 0;
}

/* Records that `name` is down until `until` (0: it answered). Re-reads the
 * file first so other processes' entries are kept. */
static void health_mark(const pwc_config *c, const char *name, int64_t until)
{
    pthread_mutex_lock(&g_lock);
    pwc_down d[PWC_MAX_DOWN];
    int n = health_read_file(c->health_file, d, PWC_MAX_DOWN);
    int64_t cur = down_until(d, n, name);
    int changed = until ? cur != until : cur != 0;
    if (changed) {
        down_set(d, &n, name, until);
        if (health_write_file(c->health_file, d, n) == 0) {
            down_set(g_local_down, &g_local_ndown, name, 0);
        } else {
            down_set(g_local_down, &g_local_ndown, name, until);
        }
    } else {
        down_set(g_local_down, &g_local_ndown, name, until);
    }
    g_health_checked = 0; /* what this process learnt counts at once */
    pthread_mutex_unlock(&g_lock);
}

/* For each configured server: the epoch second until which it is known
 * down (0: not known down). g_lock held. */
static void health_snapshot(const pwc_config *c, int64_t until[PWC_MAX_SERVERS])
{
    health_refresh(c);
    for (int i = 0; i < c->nservers; i++) {
        int64_t f = down_until(g_file_down, g_file_ndown, c->servers[i].name);
        int64_t l = down_until(g_local_down, g_local_ndown, c->servers[i].name);
        until[i] = f > l ? f : l;
    }
}

/* ---- packets ------------------------------------------------------------ */

/* Request ids come from getrandom(), drawn PWC_ID_BATCH at a time per
 * thread; a forked child never reuses its parent's batch. */
static uint64_t random_id(void)
{
    static __thread struct {
        uint64_t ids[PWC_ID_BATCH];
        int left;
        unsigned generation;
    } pool;
    unsigned gen = __atomic_load_n(&g_fork_generation, __ATOMIC_RELAXED);
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
static int build_request(uint8_t *out, size_t cap, uint64_t id, int op, const char *name,
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
static int payload_valid(int op, pwp_reader r)
{
    uint32_t n;
    uint64_t u;
    switch (op) {
    case PW_OP_PASSWD_BY_NAME:
    case PW_OP_PASSWD_BY_UID:
        if (!passwd_valid(&r))
            return 0;
        break;
    case PW_OP_GROUP_BY_NAME:
    case PW_OP_GROUP_BY_GID:
        if (!group_valid(&r))
            return 0;
        break;
    case PW_OP_SHADOW_BY_NAME:
        if (!shadow_valid(&r))
            return 0;
        break;
    case PW_OP_INITGROUPS:
        if (pwp_get_array(&r, &n) < 0)
            return 0;
        while (n--)
            if (pwp_get_uint(&r, &u) < 0 || u > PW_MAX_ID)
                return 0;
        break;
    case PW_OP_MAILHOST: {       /* [host, frozen]: pop-proxy's engine asks this */
        const char *host;
        uint32_t hlen;
        int frozen;
        if (pwp_get_array(&r, &n) < 0 || n != 2 || pwp_get_str(&r, &host, &hlen) < 0 ||
            pwp_get_bool(&r, &frozen) < 0)
            return 0;
        break;
    }
    case PW_OP_PASSWD_ENUM:
    case PW_OP_GROUP_ENUM:
    case PW_OP_SHADOW_ENUM:
        if (pwp_get_array(&r, &n) < 0 || n != 2)
            return 0;
        if (pwp_get_nil(&r) < 0 && pwp_get_uint(&r, &u) < 0)
            return 0;
        if (pwp_get_array(&r, &n) < 0 || n > PW_ENUM_PAGE)
            return 0;
        while (n--) {
            int ok = op == PW_OP_PASSWD_ENUM  ? passwd_valid(&r)
                     : op == PW_OP_GROUP_ENUM ? group_valid(&r)
                                              : shadow_valid(&r);
            if (!ok)
                return 0;
        }
        break;
    default:
        return 0;
    }
    return r.p == r.end;
}

/* Opens (if sealed) and checks one answer. On success the plain packet is
 * in `plain` (may be `pkt` itself when not sealed), and *status and
 * *payload are set. Returns 0, or -1 for a packet to ignore. */
static int answer_check(const uint8_t *pkt, size_t len, uint8_t *plain, size_t plaincap,
                        int key_id, const uint8_t *key, uint64_t id, int op,
                        int *status, pwp_reader *payload, size_t *plainlen)
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
    *plainlen = len;
    return 0;
}

/* ---- TCP ---------------------------------------------------------------- */

static int wait_fd(int fd, short events, int64_t deadline)
{
    for (;;) {
        int64_t left = deadline - now_ms();
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
static int tcp_exchange(const pwc_server *s, int op, const char *name, uint64_t num,
                        int key_id, const uint8_t *key, int64_t deadline,
                        pwc_answer *ans, int *status)
{
    uint8_t frame[4 + PW_MAX_REQUEST];
    uint64_t id = random_id();
    int n = build_request(frame + 4, sizeof frame - 4, id, op, name, num, 0, key_id, key);
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
    size_t plainlen;
    if (key_id) {
        plain = malloc(len);
        if (!plain)
            goto out;
    }
    if (answer_check(body, len, key_id ? plain : body, len, key_id, key, id, op, status,
                     &ans->payload, &plainlen) < 0)
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
    unsigned generation; /* g_fork_generation when the sockets were made */
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
        sock_drop(&ts->s[i], ts->generation == g_fork_generation);
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
    unsigned gen = __atomic_load_n(&g_fork_generation, __ATOMIC_RELAXED);
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
static void sock_release(int idx, int keep)
{
    if (!keep)
        sock_drop(&t_socks.s[idx], 1);
}

/* Makes a blocking receive on server slot idx's socket wait at most ms
 * (set once per socket while the wait stays the same). Returns 0 or -1. */
static int sock_wait_ms(int idx, int ms)
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

static int send_udp(int idx, const pwc_server *s, const uint8_t *pkt, size_t len)
{
    int cached;
    int fd = sock_get(idx, s, &cached);
    if (fd < 0)
        return -1;
    (void)cached; /* a late answer to an earlier lookup waiting in a reused
                   * socket carries another id: receive() skips it */
    if (send(fd, pkt, len, MSG_NOSIGNAL | MSG_DONTWAIT) != (ssize_t)len) {
        sock_release(idx, 0);
        return -1;
    }
    return fd;
}

/* Outcome of reading one server's socket. */
enum { RX_NOTHING, RX_FAILED, RX_ANSWER };

/* block: the first read may wait (up to the socket's SO_RCVTIMEO). */
static int receive(pwc_try *t, int key_id, const uint8_t *key,
                   uint64_t id, int op, pwc_answer *ans, int *status, int block)
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
        ssize_t n = recv(t->fd, buf, PWC_UDP_BUF, wait | MSG_TRUNC);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return RX_NOTHING;
            return RX_FAILED; /* ECONNREFUSED & co: nobody listens there */
        }
        if ((size_t)n > PWC_UDP_BUF)
            continue; /* oversize: MSG_TRUNC gives the datagram's real size */
        size_t plainlen;
        pwp_reader payload;
        if (answer_check(buf, (size_t)n, ans->udp, sizeof ans->udp, key_id, key, id, op,
                         status, &payload, &plainlen) < 0)
            continue;
        ans->payload = payload; /* points into ans->udp */
        return RX_ANSWER;
    }
    return RX_NOTHING;
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
    pthread_mutex_lock(&g_lock);
    config_current(&c);
    health_snapshot(&c, until);
    pthread_mutex_unlock(&g_lock);

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
    uint64_t id = random_id();
    int plen = build_request(pkt, sizeof pkt, id, op, name, num, PW_REQUEST_PAD, key_id, key);
    if (plen < 0) {
        rc = key_id ? -EAGAIN : -ENOENT; /* no libsodium / a name too long */
        goto out;
    }

    /* Order: servers not known down in priority order, then the ones known
     * down (still used when no other is left). */
    int64_t epoch = now_epoch();
    pwc_try tries[PWC_MAX_SERVERS];
    int ntries = 0, nlive = 0;
    for (int pass = 0; pass < 2; pass++)
        for (int i = 0; i < c.nservers; i++)
            if ((until[i] > epoch) == pass) {
                tries[ntries++] = (pwc_try){.idx = i, .fd = -1};
                nlive += !pass;
            }

    int64_t start = now_ms();
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
        int64_t t = now_ms();
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
                health_mark(&c, s->name, epoch + c.recheck_s);
            tr->fd = send_udp(tr->idx, s, pkt, (size_t)plen);
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
                sock_wait_ms(tries[map[0]].idx, (int)wait) == 0) {
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
            int rx = receive(tr, key_id, key, id, op, ans, &status, fast);
            if (rx == RX_NOTHING)
                continue;
            tr->done = 1;
            if (rx == RX_FAILED) {
                tr->refused = 1; /* nobody listens there: down */
                continue;
            }
            tr->silent = 0;
            if (status == PW_TRUNCATED) {
                int tst;
                /* the full timeout, even in the brief all-down probe: this
                 * server has just answered */
                if (tcp_exchange(s, op, name, num, key_id, key, start + c.timeout_ms, ans, &tst) < 0 ||
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
    int64_t end = now_ms();
    for (int k = 0; k < next; k++) {
        pwc_try *tr = &tries[k];
        const pwc_server *s = &c.servers[tr->idx];
        int slow = tr->silent && (winner < 0 || end - tr->sent_at >= c.hedge_ms);
        if (!tr->silent && !tr->refused) {
            if (until[tr->idx])
                health_mark(&c, s->name, 0);
        } else if (slow || tr->refused) {
            if (!(until[tr->idx] > epoch))
                health_mark(&c, s->name, now_epoch() + c.recheck_s);
        }
        if (tr->fd >= 0)
            sock_release(tr->idx, !tr->silent && !tr->refused);
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

/* ---- status mapping ------------------------------------------------------ */

enum nss_status pwc_status(int rc, int *errnop, int saved_errno)
{
    enum nss_status st;
    switch (rc) {
    case 0:
        errno = saved_errno;
        return NSS_STATUS_SUCCESS;
    case -ENOENT:
        st = NSS_STATUS_NOTFOUND;
        break;
    case -ERANGE: /* glibc calls again with a bigger buffer */
    case -ENOMEM:
        st = NSS_STATUS_TRYAGAIN;
        break;
    default:
        st = NSS_STATUS_UNAVAIL;
        break;
    }
    *errnop = -rc;
    errno = -rc;
    return st;
}
