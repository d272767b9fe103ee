/*
 * pw_table_int.h - the table's internals, shared by pw_table.c (the base:
 * build and lookups) and pw_delta.c (changes applied on top of it).
 * Not part of the cffi interface.
 */
#ifndef PW_TABLE_INT_H
#define PW_TABLE_INT_H

#include <stdatomic.h>
#include <string.h>

#include "pw_table.h"
#include "pw_wire.h"

#define NONE UINT32_MAX

typedef struct {
    uint8_t *data;
    size_t len, cap;
} arena;

typedef struct {
    uint64_t *slots; /* see index_probe */
    uint32_t cap;    /* any size: positions are (hash * cap) >> 32 */
} index_t;

/* 20 bytes a user: the name and uid are read from the record itself. */
typedef struct {
    uint32_t pw_off;    /* in t->pw: the passwd record, or (pw_len 0) the name
                           alone as a msgpack str; DEAD: a duplicate */
    uint32_t sh_off;
    uint32_t gids_off;  /* in t->gids */
    uint16_t pw_len;    /* 0: no passwd record (a group member only) */
    uint16_t sh_len;    /* 0: no shadow record */
    uint16_t ngids;
    uint16_t host;      /* index in t->hosts or NO_HOST; FROZEN bit */
} user_t;

#define DEAD UINT32_MAX
#define NO_HOST 0x7fffu
#define FROZEN 0x8000u

typedef struct {
    uint32_t name_off;  /* in t->gr */
    uint32_t rec_off;
    uint32_t rec_len;
    uint32_t gid;
    uint8_t name_len;
} group_t;

typedef struct {
    uint32_t off; /* in hostbuf */
    uint16_t len;
} host_t;

typedef struct pwt_delta pwt_delta;

struct pwt_shared {
    _Atomic uint32_t refs; /* tables sharing one base */
};

struct pwt_table {
    user_t *users;
    uint32_t nusers, users_cap;
    group_t *groups;
    uint32_t ngroups;
    arena pw, sh, gr, hostbuf;
    uint32_t *gids;
    host_t *hosts;
    uint32_t nhosts, hosts_cap;
    index_t by_name, by_uid, gr_by_name, gr_by_gid;
    /* Above: the base, built once and shared by every table made from it
     * by pwt_apply (copies of this struct); freed with the last of them. */
    struct pwt_shared *shared;
    /* Changes applied since the base was built; NULL when none (the
     * lookups then read the base alone). Immutable once published. */
    struct pwt_delta *delta;
    pwt_load_stats st; /* of the whole table, base and delta */
    /* The first skipped lines of the load (pwt_skip_notes), and where
     * note_skip's line count stands: source, position, line there. */
    pwt_skip_note notes[PWT_SKIP_NOTES];
    uint32_t nnotes;
    uint32_t note_source;
    const char *note_at;
    uint32_t note_line;
};

static inline uint64_t mix64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    return x;
}

static inline uint64_t name_hash(const char *s, size_t n)
{
    return mix64(pw_fnv1a(PW_FNV_BASIS, s, n));
}

static inline uint64_t id_hash(uint32_t id)
{
    return mix64((uint64_t)id + 0x9e3779b97f4a7c15ull);
}

/* The name of an entry: the first string of its record, or its bare str. */
static inline const char *user_name(const pwt_table *t, const user_t *u, size_t *n)
{
    const uint8_t *p = t->pw.data + u->pw_off + (u->pw_len ? 1 : 0); /* array header */
    if (p[0] == 0xd9) {
        *n = p[1];
        return (const char *)p + 2;
    }
    *n = p[0] & 0x1f;
    return (const char *)p + 1;
}

static inline const char *group_name(const pwt_table *t, const group_t *g)
{
    return (const char *)t->gr.data + g->name_off;
}

/* ---- line parsing -------------------------------------------------------- */

typedef struct {
    const char *p;
    size_t n;
} field;

static inline size_t count_lines(const char *buf, size_t len)
{
    size_t n = 0;
    const char *p = buf, *end = buf + len;
    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        n++;
        if (!nl)
            break;
        p = nl + 1;
    }
    return n;
}

/* Next line without its newline (and a trailing \r); 0 at the end. */
static inline int next_line(const char **pos, const char *end, field *line)
{
    if (*pos >= end)
        return 0;
    const char *p = *pos;
    const char *nl = memchr(p, '\n', (size_t)(end - p));
    const char *stop = nl ? nl : end;
    *pos = nl ? nl + 1 : end;
    if (stop > p && stop[-1] == '\r')
        stop--;
    line->p = p;
    line->n = (size_t)(stop - p);
    return 1;
}

static inline int blank_or_comment(const field *line)
{
    for (size_t i = 0; i < line->n; i++) {
        char c = line->p[i];
        if (c == '#')
            return 1;
        if (c != ' ' && c != '\t')
            return 0;
    }
    return 1;
}

/* Splits on ':'; returns the number of fields, or -1 past `max`. */
static inline int split_colons(const field *line, field *f, int max)
{
    const char *p = line->p, *end = p + line->n;
    int k = 0;
    for (;;) {
        const char *c = memchr(p, ':', (size_t)(end - p));
        if (k == max)
            return -1;
        f[k].p = p;
        f[k].n = (size_t)((c ? c : end) - p);
        k++;
        if (!c)
            return k;
        p = c + 1;
    }
}

static inline int parse_id(const field *f, uint32_t *out)
{
    uint64_t v = 0;
    if (f->n == 0 || f->n > 10)
        return -1;
    for (size_t i = 0; i < f->n; i++) {
        if (f->p[i] < '0' || f->p[i] > '9')
            return -1;
        v = v * 10 + (uint64_t)(f->p[i] - '0');
    }
    if (v > PW_MAX_ID)
        return -1;
    *out = (uint32_t)v;
    return 0;
}

/* shadow(5) numbers: empty is -1. */
static inline int parse_long(const field *f, int64_t *out)
{
    size_t i = 0;
    int neg = 0;
    int64_t v = 0;
    if (f->n == 0) {
        *out = -1;
        return 0;
    }
    if (f->p[0] == '-') {
        neg = 1;
        i = 1;
    }
    if (i == f->n || f->n - i > 18)
        return -1;
    for (; i < f->n; i++) {
        if (f->p[i] < '0' || f->p[i] > '9')
            return -1;
        v = v * 10 + (f->p[i] - '0');
    }
    *out = neg ? -v : v;
    return 0;
}

/* A user or group name as it may appear in a file. NIS compat entries
 * ("+name", "-name") are not served. */
static inline int file_name_ok(const field *f)
{
    return pw_valid_name(f->p, f->n) && f->p[0] != '+' && f->p[0] != '-';
}

/* Splits on blanks into at most `max` words; -1 past that. */
static inline int split_words(const field *line, field *w, int max)
{
    const char *p = line->p, *end = p + line->n;
    int k = 0;
    while (p < end) {
        while (p < end && (*p == ' ' || *p == '\t'))
            p++;
        if (p == end || *p == '#')
            break;
        const char *s = p;
        while (p < end && *p != ' ' && *p != '\t')
            p++;
        if (k == max)
            return -1;
        w[k].p = s;
        w[k].n = (size_t)(p - s);
        k++;
    }
    return k;
}

/* ---- one line of each source, validated as at load ----------------------- */

/* name:passwd:uid:gid:gecos:dir:shell (f holds 8 fields). */
static inline int parse_passwd_line(const field *line, field *f, uint32_t *uid, uint32_t *gid)
{
    return split_colons(line, f, 8) == 7 && line->n <= PWT_MAX_LINE && file_name_ok(&f[0]) &&
                   parse_id(&f[2], uid) == 0 && parse_id(&f[3], gid) == 0 && pw_valid_utf8(f[4].p, f[4].n) &&
                   pw_valid_utf8(f[5].p, f[5].n) && pw_valid_utf8(f[6].p, f[6].n)
               ? 0
               : -1;
}

/* The nine fields of shadow(5) into v (all but the name and hash); f holds 10. */
static inline int parse_shadow_line(const field *line, field *f, pw_shadow_view *v)
{
    if (split_colons(line, f, 9) != 9 || line->n > PWT_MAX_LINE || !file_name_ok(&f[0]) ||
        !pw_valid_utf8(f[1].p, f[1].n) || parse_long(&f[2], &v->lastchg) < 0 || parse_long(&f[3], &v->min) < 0 ||
        parse_long(&f[4], &v->max) < 0 || parse_long(&f[5], &v->warn) < 0 || parse_long(&f[6], &v->inact) < 0 ||
        parse_long(&f[7], &v->expire) < 0 || parse_long(&f[8], &v->flag) < 0)
        return -1;
    v->name = (pw_str){f[0].p, (uint32_t)f[0].n};
    v->hash = (pw_str){f[1].p, (uint32_t)f[1].n};
    return 0;
}

/* "user host" or "user host frozen" (w holds 3 words); *frozen set. */
static inline int parse_mailhosts_line(const field *line, field *w, int *frozen)
{
    int k = split_words(line, w, 3);
    if (k < 2 || !file_name_ok(&w[0]) || !pw_valid_utf8(w[1].p, w[1].n) ||
        (k == 3 && !(w[2].n == 6 && memcmp(w[2].p, "frozen", 6) == 0)))
        return -1;
    *frozen = k == 3;
    return 0;
}

/* name:passwd:gid:members (f holds 5); members are checked one by one. */
static inline int parse_group_line(const field *line, field *f, uint32_t *gid)
{
    return split_colons(line, f, 4) == 4 && file_name_ok(&f[0]) && parse_id(&f[2], gid) == 0 ? 0 : -1;
}

/* Next member of a member list (cursor *p up to end): 1 and the name (0
 * length when it is malformed: counted, skipped), or 0 at the end. */
static inline int next_member(const char **p, const char *end, field *m, int *valid)
{
    while (*p < end) {
        const char *c = memchr(*p, ',', (size_t)(end - *p));
        const char *stop = c ? c : end;
        m->p = *p;
        m->n = (size_t)(stop - *p);
        *p = c ? c + 1 : end;
        if (m->n) {
            *valid = pw_valid_name(m->p, m->n);
            return 1;
        }
    }
    return 0;
}

/* ---- base lookups (pw_table.c): entries, or NONE ------------------------- */

uint32_t pwt_find_user(const pwt_table *t, const char *name, size_t n);
uint32_t pwt_find_uid(const pwt_table *t, uint32_t uid);
uint32_t pwt_find_group(const pwt_table *t, const char *name, size_t n);
uint32_t pwt_find_gid(const pwt_table *t, uint32_t gid);
pwt_table *pwt_build_sources(const char *const buf[4], const size_t len[4], const pwpl_rule *rule, char *err,
                             size_t errcap);

/* ---- the delta (pw_delta.c) ---------------------------------------------- */

/* A user's state after changes: immutable once published, shared by the
 * deltas that hold it (refs). Also a deleted user (no passwd record) and
 * a member name that is no user (gids only). */
typedef struct {
    _Atomic uint32_t refs;
    uint64_t hash;             /* name_hash of the name */
    uint32_t uid;              /* when pw_len */
    uint32_t pw_len, sh_len;   /* 0: no passwd (deleted) / no shadow record */
    uint32_t name_len, host_len;
    uint32_t ngids;
    uint8_t frozen;
    uint8_t has_gids;          /* gids replace the base's list of the name */
    const char *name, *host;
    const uint8_t *pw, *sh;
    const uint32_t *gids;
} pwd_user;

typedef struct {
    _Atomic uint32_t refs;
    uint64_t hash;
    uint32_t gid;
    uint32_t rec_len;          /* 0: deleted */
    uint32_t name_len;
    const char *name;
    const uint8_t *rec;
} pwd_group;

/* Read side of the delta, for pw_table.c's lookups (t->delta != NULL). */
const uint8_t *pwd_passwd_by_name(const pwt_table *t, const char *name, size_t n, uint32_t *len);
const uint8_t *pwd_passwd_by_uid(const pwt_table *t, uint32_t uid, uint32_t *len);
const uint8_t *pwd_shadow_by_name(const pwt_table *t, const char *name, size_t n, uint32_t *len);
const uint8_t *pwd_group_by_name(const pwt_table *t, const char *name, size_t n, uint32_t *len);
const uint8_t *pwd_group_by_gid(const pwt_table *t, uint32_t gid, uint32_t *len);
int pwd_mailhost(const pwt_table *t, const char *name, size_t n, const char **host, size_t *host_len, int *frozen);
int pwd_initgroups(const pwt_table *t, const char *name, size_t n, const uint32_t **gids, uint32_t *count);
uint32_t pwd_enum_size(const pwt_table *t, int map);
const uint8_t *pwd_enum_record(const pwt_table *t, int map, uint32_t i, uint32_t *len);
void pwd_release(struct pwt_delta *d);

/* Base lookups the delta falls back to (pw_table.c). */
const uint8_t *pwt_base_passwd(const pwt_table *t, uint32_t i, uint32_t *len);
const uint8_t *pwt_base_shadow(const pwt_table *t, uint32_t i, uint32_t *len);
const uint8_t *pwt_base_group(const pwt_table *t, uint32_t i, uint32_t *len);
int pwt_base_mailhost(const pwt_table *t, uint32_t i, const char **host, size_t *host_len, int *frozen);
const char *pwt_base_user_name(const pwt_table *t, uint32_t i, size_t *n);
const char *pwt_base_group_name(const pwt_table *t, uint32_t i, size_t *n);
int pwt_base_initgroups(const pwt_table *t, const char *name, size_t n, const uint32_t **gids, uint32_t *count);
uint32_t pwt_base_enum_size(const pwt_table *t, int map);
const uint8_t *pwt_base_enum_record(const pwt_table *t, int map, uint32_t i, uint32_t *len);

#endif /* PW_TABLE_INT_H */
