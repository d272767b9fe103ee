/*
 * pw_table.c - parse passwd/shadow/group/mailhosts buffers into a packed,
 * read-only table (see pw_table.h).
 *
 * Load order: mailhosts first (a temporary index, so that each passwd
 * record is packed once with its host), then passwd, shadow, group; last
 * the reverse index of group members. Arenas grow by doubling and are
 * trimmed at the end; large blocks come from mmap through malloc, so a
 * freed table goes back to the system.
 */
#define _GNU_SOURCE
#include "pw_table_int.h"

#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>


/* ---- small helpers ----------------------------------------------------- */

/* Locates a skipped line (starting at `at` in `buf`, the text of `source`)
 * for the first PWT_SKIP_NOTES of a load. Sources are read one after the
 * other, front to back, so the line count resumes where the last note left. */
static void note_skip(pwt_table *t, uint32_t source, const char *buf, const char *at, const char *why)
{
    if (t->nnotes >= PWT_SKIP_NOTES)
        return;
    if (t->note_source != source || !t->note_at) {
        t->note_source = source;
        t->note_at = buf;
        t->note_line = 1;
    }
    const char *p = t->note_at;
    while (p < at) {
        const char *nl = memchr(p, '\n', (size_t)(at - p));
        if (!nl)
            break;
        t->note_line++;
        p = nl + 1;
    }
    t->note_at = at;
    t->notes[t->nnotes++] = (pwt_skip_note){source, t->note_line, why};
}

static int arena_reserve(arena *a, size_t more)
{
    if (more <= a->cap - a->len)
        return 0;
    size_t cap = a->cap ? a->cap : 1 << 16;
    while (cap - a->len < more)
        cap *= 2;
    if (cap > UINT32_MAX)
        cap = UINT32_MAX; /* offsets are 32-bit */
    if (cap - a->len < more)
        return -1;
    uint8_t *p = realloc(a->data, cap);
    if (!p)
        return -1;
    a->data = p;
    a->cap = cap;
    return 0;
}

static void arena_trim(arena *a)
{
    if (a->len && a->len < a->cap) {
        uint8_t *p = realloc(a->data, a->len);
        if (p) {
            a->data = p;
            a->cap = a->len;
        }
    }
}


/* Room for n entries at a load of at most 3/4 (probes stay within a cache
 * line or two: 8 slots a line). */
static int index_init(index_t *ix, size_t n)
{
    size_t cap = n + n / 3 + 16;
    if (cap > UINT32_MAX)
        return -1;
    ix->slots = calloc(cap, sizeof *ix->slots);
    ix->cap = (uint32_t)cap;
    return ix->slots ? 0 : -1;
}

static inline uint32_t index_pos(const index_t *ix, uint64_t h)
{
    return (uint32_t)(((h & 0xffffffffu) * ix->cap) >> 32);
}

static inline uint32_t index_next(const index_t *ix, uint32_t j)
{
    return j + 1 < ix->cap ? j + 1 : 0;
}

static inline int index_full(const index_t *ix, uint32_t count)
{
    return (uint64_t)count * 4 > (uint64_t)ix->cap * 3;
}

/* A slot holds (tag << 32) | (entry + 1); 0 is empty. The tag is the key's
 * id, or the upper half of its name hash: most misses and collisions are
 * settled in the slot array, without touching the entries. */
typedef int (*same_fn)(const void *ctx, uint32_t i, const void *key, size_t n);

/* The entry of a key (hash h, tag), or NONE; then *empty (if not NULL)
 * is the slot where it goes. `same` NULL: the tag is the whole key. */
static inline uint32_t index_probe(const index_t *ix, uint64_t h, uint32_t tag, same_fn same,
                                   const void *ctx, const void *key, size_t n, uint32_t *empty)
{
    uint32_t j = index_pos(ix, h);
    uint64_t v;
    while ((v = ix->slots[j])) {
        if ((uint32_t)(v >> 32) == tag && (!same || same(ctx, (uint32_t)v - 1, key, n)))
            return (uint32_t)v - 1;
        j = index_next(ix, j);
    }
    if (empty)
        *empty = j;
    return NONE;
}

static inline void index_set(index_t *ix, uint32_t j, uint32_t tag, uint32_t i)
{
    ix->slots[j] = (uint64_t)tag << 32 | (i + 1);
}

/* Grows (rehashes) when more than 3/4 full; `hash_of` recomputes where
 * an entry goes (tags stay). */
typedef uint64_t (*hash_fn)(const void *ctx, uint32_t i);

static int index_grow(index_t *ix, uint32_t count, const void *ctx, hash_fn hash_of)
{
    if (!index_full(ix, count))
        return 0;
    index_t bigger;
    if (index_init(&bigger, (size_t)count * 2) < 0)
        return -1;
    for (uint32_t s = 0; s < ix->cap; s++) {
        uint64_t v = ix->slots[s];
        if (!v)
            continue;
        uint32_t j = index_pos(&bigger, hash_of(ctx, (uint32_t)v - 1));
        while (bigger.slots[j])
            j = index_next(&bigger, j);
        bigger.slots[j] = v;
    }
    free(ix->slots);
    *ix = bigger;
    return 0;
}


/* The key of entry i for index_fill; n == 0: leave the entry out. */
typedef struct {
    uint64_t h;
    uint32_t tag;
    const void *key;
    size_t n;
} ikey;
typedef ikey (*key_fn)(const void *ctx, uint32_t i);

#define FILL_AHEAD 16

/* Indexes entries 0..count-1 in order, so the first of equal keys wins
 * (`dup` is told of the others). The slots are fetched FILL_AHEAD entries
 * ahead: at a million entries they are the cache misses of a load. */
static void index_fill(index_t *ix, uint32_t count, void *ctx, key_fn key_of, same_fn same,
                       void (*dup)(void *ctx, uint32_t i))
{
    for (uint32_t i = 0; i < count; i++) {
        if (i + FILL_AHEAD < count) {
            ikey ahead = key_of(ctx, i + FILL_AHEAD);
            if (ahead.n)
                __builtin_prefetch(&ix->slots[index_pos(ix, ahead.h)]);
        }
        ikey k = key_of(ctx, i);
        uint32_t slot = 0;
        if (!k.n)
            continue;
        if (index_probe(ix, k.h, k.tag, same, ctx, k.key, k.n, &slot) != NONE)
            dup(ctx, i);
        else
            index_set(ix, slot, k.tag, i);
    }
}

static inline ikey name_key(const char *name, size_t n)
{
    uint64_t h = name_hash(name, n);
    return (ikey){h, (uint32_t)(h >> 32), name, n};
}


static int user_same(const void *ctx, uint32_t i, const void *key, size_t n)
{
    const pwt_table *t = ctx;
    const user_t *u = &t->users[i];
    size_t len;
    if (u->pw_off == DEAD)
        return 0;
    const char *name = user_name(t, u, &len);
    return len == n && memcmp(name, key, n) == 0;
}

static int group_same(const void *ctx, uint32_t i, const void *key, size_t n)
{
    const pwt_table *t = ctx;
    const group_t *g = &t->groups[i];
    return g->name_len == n && memcmp(group_name(t, g), key, n) == 0;
}

static uint32_t find_name(const index_t *ix, same_fn same, const void *ctx, const char *name, size_t n)
{
    if (!ix->slots || n == 0 || n > PW_MAX_NAME)
        return NONE;
    uint64_t h = name_hash(name, n);
    return index_probe(ix, h, (uint32_t)(h >> 32), same, ctx, name, n, NULL);
}

static uint32_t find_id(const index_t *ix, uint32_t id)
{
    return ix->slots ? index_probe(ix, id_hash(id), id, NULL, NULL, NULL, 0, NULL) : NONE;
}

static inline uint32_t find_user(const pwt_table *t, const char *name, size_t n)
{
    return find_name(&t->by_name, user_same, t, name, n);
}

static inline uint32_t find_group(const pwt_table *t, const char *name, size_t n)
{
    return find_name(&t->gr_by_name, group_same, t, name, n);
}

uint32_t pwt_find_user(const pwt_table *t, const char *name, size_t n)
{
    return find_user(t, name, n);
}

uint32_t pwt_find_uid(const pwt_table *t, uint32_t uid)
{
    return find_id(&t->by_uid, uid);
}

uint32_t pwt_find_group(const pwt_table *t, const char *name, size_t n)
{
    return find_group(t, name, n);
}

uint32_t pwt_find_gid(const pwt_table *t, uint32_t gid)
{
    return find_id(&t->gr_by_gid, gid);
}

static uint64_t user_name_hash(const void *ctx, uint32_t i)
{
    const pwt_table *t = ctx;
    size_t n;
    const char *name = user_name(t, &t->users[i], &n);
    return name_hash(name, n);
}


/* ---- hosts --------------------------------------------------------------- */

static int intern_host(pwt_table *t, const char *s, size_t n)
{
    for (uint32_t i = 0; i < t->nhosts; i++)
        if (t->hosts[i].len == n && memcmp(t->hostbuf.data + t->hosts[i].off, s, n) == 0)
            return (int)i;
    if (t->nhosts >= PWT_MAX_HOSTS || n > PWPL_MAX_HOST_LEN)
        return -1;
    if (t->nhosts == t->hosts_cap) {
        uint32_t cap = t->hosts_cap ? t->hosts_cap * 2 : 8;
        host_t *h = realloc(t->hosts, (size_t)cap * sizeof *h);
        if (!h)
            return -1;
        t->hosts = h;
        t->hosts_cap = cap;
    }
    if (arena_reserve(&t->hostbuf, n) < 0)
        return -1;
    memcpy(t->hostbuf.data + t->hostbuf.len, s, n);
    t->hosts[t->nhosts].off = (uint32_t)t->hostbuf.len;
    t->hosts[t->nhosts].len = (uint16_t)n;
    t->hostbuf.len += n;
    return (int)t->nhosts++;
}

/* ---- mailhosts: a temporary map name -> host ----------------------------- */

typedef struct {
    const char *name; /* into the caller's buffer */
    uint8_t name_len; /* 0: a duplicate, left out */
    uint8_t frozen;
    uint8_t used;     /* some passwd entry has it */
    uint16_t host;
} mh_entry;

typedef struct {
    mh_entry *e;
    uint32_t n, dups;
    index_t ix;
} mh_map;

static int mh_same(const void *ctx, uint32_t i, const void *key, size_t n)
{
    const mh_entry *e = &((const mh_map *)ctx)->e[i];
    return e->name_len == n && memcmp(e->name, key, n) == 0;
}

static ikey mh_key(const void *ctx, uint32_t i)
{
    const mh_entry *e = &((const mh_map *)ctx)->e[i];
    return name_key(e->name, e->name_len);
}

static void mh_dup(void *ctx, uint32_t i)
{
    mh_map *m = ctx;
    m->e[i].name_len = 0;
    m->dups++;
}


static int load_mailhosts(pwt_table *t, mh_map *m, const char *buf, size_t len)
{
    size_t lines = count_lines(buf, len);
    m->e = malloc((lines ? lines : 1) * sizeof *m->e);
    if (!m->e || index_init(&m->ix, lines) < 0)
        return -1;
    const char *pos = buf, *end = buf + len;
    field line, w[3];
    while (next_line(&pos, end, &line)) {
        if (blank_or_comment(&line))
            continue;
        int frozen;
        if (parse_mailhosts_line(&line, w, &frozen) < 0) {
            t->st.mailhosts_bad++;
            note_skip(t, PWT_SRC_MAILHOSTS, buf, line.p, "malformed");
            continue;
        }
        int h = intern_host(t, w[1].p, w[1].n);
        if (h < 0) {
            t->st.mailhosts_bad++;
            note_skip(t, PWT_SRC_MAILHOSTS, buf, line.p, "bad host or too many hosts");
            continue;
        }
        mh_entry *e = &m->e[m->n];
        e->name = w[0].p;
        e->name_len = (uint8_t)w[0].n;
        e->host = (uint16_t)h;
        e->frozen = (uint8_t)frozen;
        e->used = 0;
        m->n++;
    }
    index_fill(&m->ix, m->n, m, mh_key, mh_same, mh_dup);
    t->st.mailhosts_dup = m->dups;
    return 0;
}

/* ---- users --------------------------------------------------------------- */

static int add_user_slot(pwt_table *t)
{
    if (t->nusers < t->users_cap)
        return 0;
    uint32_t cap = t->users_cap ? t->users_cap * 2 : 1024;
    user_t *u = realloc(t->users, (size_t)cap * sizeof *u);
    if (!u)
        return -1;
    t->users = u;
    t->users_cap = cap;
    return 0;
}

static ikey user_key(const void *ctx, uint32_t i)
{
    const pwt_table *t = ctx;
    size_t n;
    if (t->users[i].pw_off == DEAD)
        return (ikey){0, 0, NULL, 0};
    const char *name = user_name(t, &t->users[i], &n);
    return name_key(name, n);
}

static void user_dup(void *ctx, uint32_t i)
{
    pwt_table *t = ctx;
    t->users[i].pw_off = DEAD; /* never found, never listed */
    t->users[i].pw_len = 0;
    t->st.passwd_dup_name++;
}

static ikey uid_key(const void *ctx, uint32_t i)
{
    const pwt_table *t = ctx;
    const user_t *u = &t->users[i];
    pwp_reader r;
    uint32_t n;
    const char *str;
    uint64_t uid;
    if (!u->pw_len)
        return (ikey){0, 0, NULL, 0};
    /* [name, passwd, uid, ...]: we packed it, so it reads */
    pwp_reader_init(&r, t->pw.data + u->pw_off, u->pw_len);
    if (pwp_get_array(&r, &n) < 0 || pwp_get_str(&r, &str, &n) < 0 ||
        pwp_get_str(&r, &str, &n) < 0 || pwp_get_uint(&r, &uid) < 0)
        return (ikey){0, 0, NULL, 0};
    return (ikey){id_hash((uint32_t)uid), (uint32_t)uid, NULL, 1};
}

static void uid_dup(void *ctx, uint32_t i)
{
    (void)i;
    ((pwt_table *)ctx)->st.passwd_dup_uid++;
}

static int load_passwd(pwt_table *t, mh_map *mh, const pwpl_rule *rule,
                       const char *buf, size_t len)
{
    size_t lines = count_lines(buf, len);
    if (index_init(&t->by_name, lines) < 0 || index_init(&t->by_uid, lines) < 0)
        return -1;
    t->users_cap = (uint32_t)(lines ? lines : 1);
    t->users = malloc((size_t)t->users_cap * sizeof *t->users);
    /* a record is about its line plus the host and a few headers */
    if (!t->users || arena_reserve(&t->pw, len + lines * 24 + 1) < 0)
        return -1;
    const char *pos = buf, *end = buf + len;
    field line, f[8];
    uint32_t mh_next = 0;
    while (next_line(&pos, end, &line)) {
        if (blank_or_comment(&line))
            continue;
        uint32_t uid, gid;
        if (parse_passwd_line(&line, f, &uid, &gid) < 0) {
            t->st.passwd_bad++;
            note_skip(t, PWT_SRC_PASSWD, buf, line.p, "malformed");
            continue;
        }
        int host = -1, frozen = 0;
        uint32_t m = !mh->n ? NONE
                     : mh_next < mh->n && mh_same(mh, mh_next, f[0].p, f[0].n)
                         ? mh_next /* the map is often in passwd order */
                         : find_name(&mh->ix, mh_same, mh, f[0].p, f[0].n);
        mh_next = m + 1;
        if (m != NONE) {
            host = mh->e[m].host;
            frozen = mh->e[m].frozen;
            mh->e[m].used = 1;
        } else if (rule) {
            host = pwpl_pick(rule, f[0].p, f[0].n); /* rule hosts come first */
        }
        pw_passwd_view v = {
            .name = {f[0].p, (uint32_t)f[0].n},
            /* never a hash: the shadow map serves those (DESIGN.md, 5) */
            .passwd = {"x", 1},
            .uid = uid,
            .gid = gid,
            .gecos = {f[4].p, (uint32_t)f[4].n},
            .dir = {f[5].p, (uint32_t)f[5].n},
            .shell = {f[6].p, (uint32_t)f[6].n},
            .mailhost = {"", 0},
        };
        if (host >= 0) {
            v.mailhost.p = (const char *)t->hostbuf.data + t->hosts[host].off;
            v.mailhost.n = t->hosts[host].len;
        }
        size_t need = line.n + v.mailhost.n + 32;
        if (arena_reserve(&t->pw, need) < 0 || add_user_slot(t) < 0)
            return -1;
        pwp_buf b;
        pwp_init(&b, t->pw.data + t->pw.len, need);
        pw_put_passwd(&b, &v);
        if (b.overflow || b.len > UINT16_MAX) {
            t->st.passwd_bad++;
            note_skip(t, PWT_SRC_PASSWD, buf, line.p, "record too long");
            continue;
        }
        user_t *u = &t->users[t->nusers];
        memset(u, 0, sizeof *u);
        u->pw_off = (uint32_t)t->pw.len;
        u->pw_len = (uint16_t)b.len;
        u->host = (uint16_t)((host >= 0 ? (unsigned)host : NO_HOST) | (frozen ? FROZEN : 0));
        t->pw.len += b.len;
        t->nusers++;
    }
    /* the first entry of a name or a uid wins, as in files */
    index_fill(&t->by_name, t->nusers, t, user_key, user_same, user_dup);
    index_fill(&t->by_uid, t->nusers, t, uid_key, NULL, uid_dup);
    t->st.users = t->nusers - t->st.passwd_dup_name;
    return 0;
}

static int load_shadow(pwt_table *t, const char *buf, size_t len)
{
    const char *pos = buf, *end = buf + len;
    field line, f[10];
    uint32_t next = 0;
    if (arena_reserve(&t->sh, len + 1) < 0)
        return -1;
    while (next_line(&pos, end, &line)) {
        if (blank_or_comment(&line))
            continue;
        pw_shadow_view v;
        if (parse_shadow_line(&line, f, &v) < 0) {
            t->st.shadow_bad++;
            note_skip(t, PWT_SRC_SHADOW, buf, line.p, "malformed");
            continue;
        }
        uint32_t i = next < t->nusers && user_same(t, next, f[0].p, f[0].n)
                         ? next /* shadow is often in passwd order */
                         : find_user(t, f[0].p, f[0].n);
        next = i + 1;
        if (i == NONE) {
            t->st.shadow_orphan++;
            note_skip(t, PWT_SRC_SHADOW, buf, line.p, "no such user in passwd");
            continue;
        }
        if (t->users[i].sh_len) {
            t->st.shadow_dup++;
            note_skip(t, PWT_SRC_SHADOW, buf, line.p, "duplicate name");
            continue;
        }
        size_t need = line.n + 80;
        if (arena_reserve(&t->sh, need) < 0)
            return -1;
        pwp_buf b;
        pwp_init(&b, t->sh.data + t->sh.len, need);
        pw_put_shadow(&b, &v);
        if (b.overflow || b.len > UINT16_MAX) {
            t->st.shadow_bad++;
            note_skip(t, PWT_SRC_SHADOW, buf, line.p, "record too long");
            continue;
        }
        t->users[i].sh_off = (uint32_t)t->sh.len;
        t->users[i].sh_len = (uint16_t)b.len;
        t->sh.len += b.len;
        t->st.shadows++;
    }
    return 0;
}

/* ---- groups -------------------------------------------------------------- */

typedef struct {
    uint32_t user, gid;
} membership;

/* The entry of a member name, added (without records) when it is no user,
 * so that INITGROUPS still answers for it. */
static uint32_t member_entry(pwt_table *t, const char *name, size_t n, uint64_t h)
{
    uint32_t slot = 0, i = index_probe(&t->by_name, h, (uint32_t)(h >> 32), user_same, t, name, n, &slot);
    if (i != NONE)
        return i;
    if (add_user_slot(t) < 0 || arena_reserve(&t->pw, n + 2) < 0)
        return NONE - 1;
    if (index_full(&t->by_name, t->nusers + 1)) {
        if (index_grow(&t->by_name, t->nusers + 1, t, user_name_hash) < 0)
            return NONE - 1;
        index_probe(&t->by_name, h, (uint32_t)(h >> 32), user_same, t, name, n, &slot); /* where it goes now */
    }
    user_t *u = &t->users[t->nusers];
    memset(u, 0, sizeof *u);
    u->pw_off = (uint32_t)t->pw.len;
    u->host = NO_HOST;
    pwp_buf b; /* the name alone, as a msgpack str (see user_name) */
    pwp_init(&b, t->pw.data + t->pw.len, n + 2);
    pwp_put_str(&b, name, n);
    t->pw.len += b.len;
    index_set(&t->by_name, slot, (uint32_t)(h >> 32), t->nusers);
    return t->nusers++;
}

typedef struct {
    const char *p;
    uint32_t n;
    uint64_t h;
} member_ref;

#ifndef PREFETCH_STEP
#define PREFETCH_STEP 8
#endif

/* Member names arrive in no useful order: each lookup would wait for three
 * cache misses (slot, entry, name). Walk ahead and prefetch them. */
static inline void prefetch_member(const pwt_table *t, const member_ref *r, uint32_t k, uint32_t n)
{
    const index_t *ix = &t->by_name;
    if (k + 3 * PREFETCH_STEP < n)
        __builtin_prefetch(&ix->slots[index_pos(ix, r[k + 3 * PREFETCH_STEP].h)]);
    if (k + 2 * PREFETCH_STEP < n) {
        uint64_t v = ix->slots[index_pos(ix, r[k + 2 * PREFETCH_STEP].h)];
        if (v)
            __builtin_prefetch(&t->users[(uint32_t)v - 1]);
    }
    if (k + PREFETCH_STEP < n) {
        uint64_t v = ix->slots[index_pos(ix, r[k + PREFETCH_STEP].h)];
        if (v)
            __builtin_prefetch(t->pw.data + t->users[(uint32_t)v - 1].pw_off);
    }
}

static int load_group(pwt_table *t, const char *buf, size_t len,
                      membership **ms, size_t *nms)
{
    size_t lines = count_lines(buf, len), ms_cap = 0, refs_cap = 0;
    member_ref *refs = NULL;
    int rc = -1;
    t->groups = malloc((lines ? lines : 1) * sizeof *t->groups);
    if (!t->groups || index_init(&t->gr_by_name, lines) < 0 ||
        index_init(&t->gr_by_gid, lines) < 0)
        goto out;
    const char *pos = buf, *end = buf + len;
    field line, f[5];
    while (next_line(&pos, end, &line)) {
        if (blank_or_comment(&line))
            continue;
        uint32_t gid;
        if (parse_group_line(&line, f, &gid) < 0) {
            t->st.group_bad++;
            note_skip(t, PWT_SRC_GROUP, buf, line.p, "malformed");
            continue;
        }
        uint64_t h = name_hash(f[0].p, f[0].n);
        uint32_t name_slot = 0, gid_slot = 0;
        if (index_probe(&t->gr_by_name, h, (uint32_t)(h >> 32), group_same, t, f[0].p, f[0].n,
                        &name_slot) != NONE) {
            t->st.group_dup_name++;
            note_skip(t, PWT_SRC_GROUP, buf, line.p, "duplicate name");
            continue;
        }
        /* members: validate and hash, pack, then resolve */
        uint32_t nmem = 0;
        const char *p = f[3].p, *mend = f[3].p + f[3].n;
        field mf;
        int valid;
        while (next_member(&p, mend, &mf, &valid)) {
            if (valid) {
                if (nmem == refs_cap) {
                    size_t grown = refs_cap ? refs_cap * 2 : 1024;
                    member_ref *r = realloc(refs, grown * sizeof *r);
                    if (!r)
                        goto out;
                    refs = r;
                    refs_cap = grown;
                }
                refs[nmem++] = (member_ref){mf.p, (uint32_t)mf.n, name_hash(mf.p, mf.n)};
            } else {
                t->st.group_bad_member++;
            }
        }
        size_t need = line.n + 5 * (size_t)nmem + 32;
        if (arena_reserve(&t->gr, need) < 0)
            goto out;
        pwp_buf b;
        pwp_init(&b, t->gr.data + t->gr.len, need);
        pwp_put_array(&b, 4);
        pwp_put_str(&b, f[0].p, f[0].n);
        pwp_put_str(&b, "x", 1);
        pwp_put_uint(&b, gid);
        pwp_put_array(&b, nmem);
        for (uint32_t k = 0; k < nmem; k++)
            pwp_put_str(&b, refs[k].p, refs[k].n);
        if (b.overflow) {
            t->st.group_bad++;
            note_skip(t, PWT_SRC_GROUP, buf, line.p, "record too long");
            continue;
        }
        if (*nms + nmem > ms_cap) {
            size_t mc = ms_cap ? ms_cap : 4096;
            while (mc < *nms + nmem)
                mc *= 2;
            membership *m = realloc(*ms, mc * sizeof *m);
            if (!m)
                goto out;
            *ms = m;
            ms_cap = mc;
        }
        for (uint32_t k = 0; k < nmem; k++) {
            prefetch_member(t, refs, k, nmem);
            uint32_t u = member_entry(t, refs[k].p, refs[k].n, refs[k].h);
            if (u == NONE - 1)
                goto out;
            (*ms)[(*nms)++] = (membership){u, gid};
        }
        group_t *g = &t->groups[t->ngroups];
        g->rec_off = (uint32_t)t->gr.len;
        g->rec_len = (uint32_t)b.len;
        g->name_off = g->rec_off + 1 + (f[0].n < 32 ? 1 : 2);
        g->name_len = (uint8_t)f[0].n;
        g->gid = gid;
        t->gr.len += b.len;
        index_set(&t->gr_by_name, name_slot, (uint32_t)(h >> 32), t->ngroups);
        if (index_probe(&t->gr_by_gid, id_hash(gid), gid, NULL, NULL, NULL, 0, &gid_slot) == NONE)
            index_set(&t->gr_by_gid, gid_slot, gid, t->ngroups);
        else
            t->st.group_dup_gid++;
        t->ngroups++;
    }
    t->st.groups = t->ngroups;
    rc = 0;
out:
    free(refs);
    return rc;
}

/* Reverse index: each entry's gids, contiguous (counting sort). */
static int build_initgroups(pwt_table *t, const membership *ms, size_t nms)
{
    for (size_t i = 0; i < nms; i++) {
        user_t *u = &t->users[ms[i].user];
        if (u->ngids == PWT_MAX_USER_GROUPS)
            t->st.too_many_groups++;
        else
            u->ngids++;
    }
    size_t total = 0;
    for (uint32_t i = 0; i < t->nusers; i++) {
        t->users[i].gids_off = (uint32_t)total;
        total += t->users[i].ngids;
        t->users[i].ngids = 0; /* refilled below */
    }
    t->gids = malloc((total ? total : 1) * sizeof *t->gids);
    if (!t->gids)
        return -1;
    for (size_t i = 0; i < nms; i++) {
        uint32_t k = ms[i].user;
        user_t *u = &t->users[k];
        size_t limit = (k + 1 < t->nusers ? t->users[k + 1].gids_off : total) - u->gids_off;
        if (u->ngids < limit) /* the rest were counted in too_many_groups */
            t->gids[u->gids_off + u->ngids++] = ms[i].gid;
    }
    return 0;
}

/* ---- build ------------------------------------------------------------- */

static void set_err(char *err, size_t cap, const char *msg)
{
    if (err && cap)
        snprintf(err, cap, "%s", msg);
}

/* Files are read, not mapped: a source truncated in place while it is
 * parsed would turn a mapping into SIGBUS; a read just sees a short file. */
typedef struct {
    char *data;
    size_t len;
} source_buf;

static int read_file(const char *path, source_buf *m, char *err, size_t errcap)
{
    m->data = NULL;
    m->len = 0;
    if (!path || !*path)
        return 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat sb;
    if (fd < 0 || fstat(fd, &sb) < 0)
        goto fail;
    size_t size = sb.st_size > 0 ? (size_t)sb.st_size : 0;
    m->data = malloc(size + 1);
    if (!m->data)
        goto fail;
    posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
    while (m->len < size) {
        ssize_t n = read(fd, m->data + m->len, size - m->len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            goto fail;
        if (n == 0)
            break; /* shrank meanwhile: the next change reloads */
        m->len += (size_t)n;
    }
    close(fd);
    return 0;
fail:
    if (err && errcap)
        snprintf(err, errcap, "%s: %s", path, strerror(errno));
    if (fd >= 0)
        close(fd);
    free(m->data);
    m->data = NULL;
    return -1;
}

/* The four sources, each present only while it is parsed (the peak of a
 * load is the table and the biggest file, not all of them). */
enum { SRC_PASSWD, SRC_SHADOW, SRC_GROUP, SRC_MAILHOSTS, NSRC };

typedef struct {
    const char *path[NSRC]; /* read from files ... */
    source_buf buf[NSRC];   /* ... or given */
} sources;

static int source_get(sources *src, int i, char *err, size_t errcap)
{
    return src->path[i] ? read_file(src->path[i], &src->buf[i], err, errcap) : 0;
}

static void source_drop(sources *src, int i)
{
    if (src->path[i]) {
        free(src->buf[i].data);
        src->buf[i].data = NULL;
    }
}

static const char *source_data(const sources *src, int i)
{
    return src->buf[i].data ? src->buf[i].data : "";
}

/* Tables come and go whole: a fixed mmap threshold keeps glibc from
 * raising it after a free, so every big block of an old table goes back
 * to the system instead of staying in a heap. */
static void fix_mmap_threshold(void)
{
    mallopt(M_MMAP_THRESHOLD, 256 * 1024);
}

static pwt_table *build(sources *src, const pwpl_rule *rule, char *err, size_t errcap)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, fix_mmap_threshold);
    pwt_table *t = calloc(1, sizeof *t);
    mh_map mh = {0};
    if (t) {
        t->shared = calloc(1, sizeof *t->shared);
        if (t->shared)
            atomic_init(&t->shared->refs, 1);
    }
    membership *ms = NULL;
    size_t nms = 0;
    set_err(err, errcap, "out of memory (or a source past 4 GiB)");
    if (!t || !t->shared)
        goto fail;
    /* the rule's hosts get the same indexes in the table */
    for (int i = 0; rule && i < pwpl_nhosts(rule); i++) {
        size_t n;
        const char *h = pwpl_host(rule, i, &n);
        if (intern_host(t, h, n) != i)
            goto fail;
    }
    if (source_get(src, SRC_MAILHOSTS, err, errcap) < 0 || source_get(src, SRC_PASSWD, err, errcap) < 0)
        goto fail;
    if (load_mailhosts(t, &mh, source_data(src, SRC_MAILHOSTS), src->buf[SRC_MAILHOSTS].len) < 0 ||
        load_passwd(t, &mh, rule, source_data(src, SRC_PASSWD), src->buf[SRC_PASSWD].len) < 0)
        goto fail;
    for (uint32_t i = 0; i < mh.n; i++)
        t->st.mailhosts_unknown += mh.e[i].name_len && !mh.e[i].used;
    free(mh.e);
    free(mh.ix.slots);
    mh.e = NULL;
    mh.ix.slots = NULL;
    source_drop(src, SRC_MAILHOSTS);
    source_drop(src, SRC_PASSWD);
    if (source_get(src, SRC_SHADOW, err, errcap) < 0 ||
        load_shadow(t, source_data(src, SRC_SHADOW), src->buf[SRC_SHADOW].len) < 0)
        goto fail;
    source_drop(src, SRC_SHADOW);
    if (source_get(src, SRC_GROUP, err, errcap) < 0 ||
        load_group(t, source_data(src, SRC_GROUP), src->buf[SRC_GROUP].len, &ms, &nms) < 0 ||
        build_initgroups(t, ms, nms) < 0)
        goto fail;
    source_drop(src, SRC_GROUP);
    free(ms);
    arena_trim(&t->pw);
    arena_trim(&t->sh);
    arena_trim(&t->gr);
    if (t->nusers < t->users_cap) {
        user_t *u = realloc(t->users, (size_t)(t->nusers ? t->nusers : 1) * sizeof *u);
        if (u) {
            t->users = u;
            t->users_cap = t->nusers;
        }
    }
    size_t ngids = 0;
    for (uint32_t i = 0; i < t->nusers; i++)
        ngids += t->users[i].ngids;
    t->st.bytes = t->pw.cap + t->sh.cap + t->gr.cap + t->hostbuf.cap +
                  (size_t)t->users_cap * sizeof(user_t) +
                  (size_t)t->ngroups * sizeof(group_t) + ngids * 4 +
                  8 * ((size_t)t->by_name.cap + t->by_uid.cap + t->gr_by_name.cap +
                       t->gr_by_gid.cap);
    set_err(err, errcap, "");
    return t;
fail:
    for (int i = 0; i < NSRC; i++)
        source_drop(src, i);
    free(mh.e);
    free(mh.ix.slots);
    free(ms);
    pwt_free(t);
    return NULL;
}

pwt_table *pwt_build(const char *passwd, size_t passwd_len,
                     const char *shadow, size_t shadow_len,
                     const char *group, size_t group_len,
                     const char *mailhosts, size_t mailhosts_len,
                     const pwpl_rule *rule, char *err, size_t errcap)
{
    sources src = {.buf = {{(char *)passwd, passwd ? passwd_len : 0}, {(char *)shadow, shadow ? shadow_len : 0},
                           {(char *)group, group ? group_len : 0},
                           {(char *)mailhosts, mailhosts ? mailhosts_len : 0}}};
    return build(&src, rule, err, errcap);
}

pwt_table *pwt_build_sources(const char *const buf[4], const size_t len[4], const pwpl_rule *rule, char *err,
                             size_t errcap)
{
    return pwt_build(buf[0], len[0], buf[1], len[1], buf[2], len[2], buf[3], len[3], rule, err, errcap);
}

pwt_table *pwt_load_files(const char *passwd, const char *shadow,
                          const char *group, const char *mailhosts,
                          const pwpl_rule *rule, char *err, size_t errcap)
{
    if (!passwd || !*passwd) {
        set_err(err, errcap, "no passwd file given");
        return NULL;
    }
    sources src = {.path = {passwd, shadow && *shadow ? shadow : NULL,
                            group && *group ? group : NULL, mailhosts && *mailhosts ? mailhosts : NULL}};
    return build(&src, rule, err, errcap);
}

void pwt_free(pwt_table *t)
{
    if (!t)
        return;
    pwd_release(t->delta);
    /* the base goes with the last table that shares it */
    if (t->shared && atomic_fetch_sub_explicit(&t->shared->refs, 1, memory_order_acq_rel) != 1) {
        free(t);
        return;
    }
    free(t->shared);
    free(t->users);
    free(t->groups);
    free(t->pw.data);
    free(t->sh.data);
    free(t->gr.data);
    free(t->hostbuf.data);
    free(t->gids);
    free(t->hosts);
    free(t->by_name.slots);
    free(t->by_uid.slots);
    free(t->gr_by_name.slots);
    free(t->gr_by_gid.slots);
    free(t);
}

void pwt_get_stats(const pwt_table *t, pwt_load_stats *st)
{
    *st = t->st;
}

uint32_t pwt_skip_notes(const pwt_table *t, const pwt_skip_note **notes)
{
    *notes = t->notes;
    return t->nnotes;
}


/* ---- lookups ------------------------------------------------------------- */

/* Each lookup reads the base alone while no change was applied (one
 * predictable branch: the hot path of a table loaded from files); else
 * pw_delta.c looks in the delta first and falls back to these. */

const char *pwt_base_user_name(const pwt_table *t, uint32_t i, size_t *n)
{
    return user_name(t, &t->users[i], n);
}

const char *pwt_base_group_name(const pwt_table *t, uint32_t i, size_t *n)
{
    *n = t->groups[i].name_len;
    return group_name(t, &t->groups[i]);
}

const uint8_t *pwt_base_passwd(const pwt_table *t, uint32_t i, uint32_t *len)
{
    if (i == NONE || !t->users[i].pw_len)
        return NULL;
    *len = t->users[i].pw_len;
    return t->pw.data + t->users[i].pw_off;
}

const uint8_t *pwt_base_shadow(const pwt_table *t, uint32_t i, uint32_t *len)
{
    if (i == NONE || !t->users[i].sh_len)
        return NULL;
    *len = t->users[i].sh_len;
    return t->sh.data + t->users[i].sh_off;
}

const uint8_t *pwt_base_group(const pwt_table *t, uint32_t i, uint32_t *len)
{
    if (i == NONE)
        return NULL;
    *len = t->groups[i].rec_len;
    return t->gr.data + t->groups[i].rec_off;
}

int pwt_base_mailhost(const pwt_table *t, uint32_t i, const char **host, size_t *host_len, int *frozen)
{
    if (i == NONE || !t->users[i].pw_len)
        return -1;
    const user_t *u = &t->users[i];
    unsigned h = u->host & ~FROZEN;
    if (h == NO_HOST) {
        *host = "";
        *host_len = 0;
    } else {
        *host = (const char *)t->hostbuf.data + t->hosts[h].off;
        *host_len = t->hosts[h].len;
    }
    *frozen = (u->host & FROZEN) != 0;
    return 0;
}

#define WITH_DELTA(t) __builtin_expect((t)->delta != NULL, 0)

const uint8_t *pwt_passwd_by_name(const pwt_table *t, const char *name, size_t n, uint32_t *len)
{
    if (WITH_DELTA(t))
        return pwd_passwd_by_name(t, name, n, len);
    return pwt_base_passwd(t, find_user(t, name, n), len);
}

const uint8_t *pwt_passwd_by_uid(const pwt_table *t, uint32_t uid, uint32_t *len)
{
    if (WITH_DELTA(t))
        return pwd_passwd_by_uid(t, uid, len);
    return pwt_base_passwd(t, find_id(&t->by_uid, uid), len);
}

const uint8_t *pwt_shadow_by_name(const pwt_table *t, const char *name, size_t n, uint32_t *len)
{
    if (WITH_DELTA(t))
        return pwd_shadow_by_name(t, name, n, len);
    return pwt_base_shadow(t, find_user(t, name, n), len);
}

const uint8_t *pwt_group_by_name(const pwt_table *t, const char *name, size_t n, uint32_t *len)
{
    if (WITH_DELTA(t))
        return pwd_group_by_name(t, name, n, len);
    return pwt_base_group(t, find_group(t, name, n), len);
}

const uint8_t *pwt_group_by_gid(const pwt_table *t, uint32_t gid, uint32_t *len)
{
    if (WITH_DELTA(t))
        return pwd_group_by_gid(t, gid, len);
    return pwt_base_group(t, find_id(&t->gr_by_gid, gid), len);
}

int pwt_mailhost(const pwt_table *t, const char *name, size_t n,
                 const char **host, size_t *host_len, int *frozen)
{
    if (WITH_DELTA(t))
        return pwd_mailhost(t, name, n, host, host_len, frozen);
    return pwt_base_mailhost(t, find_user(t, name, n), host, host_len, frozen);
}

int pwt_base_initgroups(const pwt_table *t, const char *name, size_t n, const uint32_t **gids, uint32_t *count)
{
    uint32_t i = find_user(t, name, n);
    if (i == NONE)
        return -1;
    *gids = t->gids + t->users[i].gids_off;
    *count = t->users[i].ngids;
    return 0;
}

int pwt_initgroups(const pwt_table *t, const char *name, size_t n,
                   const uint32_t **gids, uint32_t *count)
{
    if (WITH_DELTA(t))
        return pwd_initgroups(t, name, n, gids, count);
    return pwt_base_initgroups(t, name, n, gids, count);
}

uint32_t pwt_base_enum_size(const pwt_table *t, int map)
{
    return map == PWT_GROUP ? t->ngroups : t->nusers;
}

const uint8_t *pwt_base_enum_record(const pwt_table *t, int map, uint32_t i, uint32_t *len)
{
    if (i >= pwt_base_enum_size(t, map))
        return NULL;
    if (map == PWT_GROUP)
        return pwt_base_group(t, i, len);
    return map == PWT_SHADOW ? pwt_base_shadow(t, i, len) : pwt_base_passwd(t, i, len);
}

uint32_t pwt_enum_size(const pwt_table *t, int map)
{
    return WITH_DELTA(t) ? pwd_enum_size(t, map) : pwt_base_enum_size(t, map);
}

const uint8_t *pwt_enum_record(const pwt_table *t, int map, uint32_t i, uint32_t *len)
{
    return WITH_DELTA(t) ? pwd_enum_record(t, map, i, len) : pwt_base_enum_record(t, map, i, len);
}
