/*
 * pw_client_conf.c - the C client's configuration: /etc/pwserver.conf (or
 * PWSERVER_CONF), its format in docs/protocol.md ("Client configuration")
 * and docs/nss.md ("/etc/pwserver.conf"). Read on the first lookup, then
 * re-read when the file changes (checked at most every
 * PWC_RECHECK_FILES_MS).
 */
#define _GNU_SOURCE
#include "pw_client_int.h"

#include <errno.h>
#include <netdb.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pw_seal.h"

#define PWC_DEFAULT_CONF "/etc/pwserver.conf"
#define PWC_DEFAULT_HEALTH "/run/pwserver/health"
#define PWC_LINE_MAX 512

static pwc_config g_conf;
static int g_conf_loaded;
static int64_t g_conf_checked;   /* CLOCK_MONOTONIC_COARSE ms */
static char g_conf_path[PWC_PATH_MAX];
static pwc_stamp g_conf_stamp;

void pwc_stamp_of(const char *path, pwc_stamp *st)
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

int pwc_stamp_equal(const pwc_stamp *a, const pwc_stamp *b)
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
 * pwc_lock held. */
void pwc_config_current(pwc_config *out)
{
    const char *path = secure_getenv("PWSERVER_CONF");
    if (!path || !*path || strlen(path) >= sizeof g_conf_path)
        path = PWC_DEFAULT_CONF;
    int64_t t = pwc_coarse_ms();
    int same_path = g_conf_loaded && strcmp(path, g_conf_path) == 0;
    if (same_path && t - g_conf_checked < PWC_RECHECK_FILES_MS) {
        config_copy(out, &g_conf);
        return;
    }
    g_conf_checked = t;
    pwc_stamp st;
    pwc_stamp_of(path, &st);
    if (!same_path || !pwc_stamp_equal(&st, &g_conf_stamp)) {
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
    pthread_mutex_lock(&pwc_lock);
    pwc_config_current(&c);
    pthread_mutex_unlock(&pwc_lock);
    explicit_bzero(c.netkey, sizeof c.netkey);
    errno = saved;
    return c.enumerate;
}
