/*
 * pw_health.c - the C client's health record (docs/protocol.md, "Health
 * record"): which servers are known down, and until when, shared by every
 * process of the host through one small file (health_file). What this
 * process could not write to the file is kept in memory only.
 */
#define _GNU_SOURCE
#include "pw_client_int.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define PWC_HEALTH_MAX 4096     /* bytes of the health record we read */
#define PWC_MAX_DOWN 16

typedef struct {
    char name[PWC_NAME_MAX];
    int64_t until;
} pwc_down;

/* Health record: the file's last parsed content, and the part this process
 * could not write to the file (kept in memory only). */
static pwc_down g_file_down[PWC_MAX_DOWN];
static int g_file_ndown;
static pwc_stamp g_health_stamp;
static int64_t g_health_checked;
static char g_health_path[PWC_PATH_MAX];
static pwc_down g_local_down[PWC_MAX_DOWN];
static int g_local_ndown;

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

/* Refreshes g_file_down from the file when it changed. pwc_lock held. */
static void health_refresh(const pwc_config *c)
{
    int64_t t = pwc_coarse_ms();
    int same_path = strcmp(g_health_path, c->health_file) == 0;
    if (same_path && g_health_checked && t - g_health_checked < PWC_RECHECK_FILES_MS)
        return;
    g_health_checked = t;
    pwc_stamp st;
    pwc_stamp_of(c->health_file, &st);
    if (strcmp(g_health_path, c->health_file) != 0 ||
        !pwc_stamp_equal(&st, &g_health_stamp)) {
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
void pwc_health_mark(const pwc_config *c, const char *name, int64_t until)
{
    pthread_mutex_lock(&pwc_lock);
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
    pthread_mutex_unlock(&pwc_lock);
}

/* For each configured server: the epoch second until which it is known
 * down (0: not known down). pwc_lock held. */
void pwc_health_snapshot(const pwc_config *c, int64_t until[PWC_MAX_SERVERS])
{
    health_refresh(c);
    for (int i = 0; i < c->nservers; i++) {
        int64_t f = down_until(g_file_down, g_file_ndown, c->servers[i].name);
        int64_t l = down_until(g_local_down, g_local_ndown, c->servers[i].name);
        until[i] = f > l ? f : l;
    }
}
