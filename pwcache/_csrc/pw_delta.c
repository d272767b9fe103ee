/*
 * pw_delta.c - changes applied to a table without rebuilding it (see
 * pw_table.h, pwt_apply; docs/pwserver.md, "Changes").
 *
 * A table is a base (built from whole sources, shared) plus a delta: the
 * users and groups changed since, each an immutable entry holding its
 * records as answered. Lookups try the delta first. pwt_apply copies the
 * delta (its arrays; entries are shared, counted), changes the copy and
 * returns it in a new table: the caller publishes that with the server's
 * swap and frees the old table once no reader can hold it, so a reader
 * sees one delta or the other, whole.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>

#include "pw_table_int.h"

#define NONE UINT32_MAX

/* Positions (+1) of entries, open addressing in a power-of-two array.
 * Name slots are never removed (a changed name keeps its entry's
 * position); uid and gid slots may go stale and are checked on lookup. */
typedef struct {
    uint32_t *slots;
    uint32_t mask, used;
} dix;

struct pwt_delta {
    _Atomic uint32_t refs;
    pwd_user **users;
    uint32_t nusers, users_cap;
    pwd_group **groups;
    uint32_t ngroups, groups_cap;
    dix user_name, user_uid, group_name, group_gid;
    size_t bytes;
};

/* ---- entries ------------------------------------------------------------- */

static void entry_ref(_Atomic uint32_t *refs)
{
    atomic_fetch_add_explicit(refs, 1, memory_order_relaxed);
}

static void entry_unref(void *e, _Atomic uint32_t *refs)
{
    if (e && atomic_fetch_sub_explicit(refs, 1, memory_order_acq_rel) == 1)
        free(e);
}

/* What a user is (delta entry, base entry or nothing) as a changeable view. */
typedef struct {
    const char *name;
    size_t name_len;
    const uint8_t *pw, *sh;
    uint32_t pw_len, sh_len, uid;
    const char *host;
    size_t host_len;
    int frozen, has_gids;
    const uint32_t *gids;
    uint32_t ngids;
} user_view;

static size_t user_size(const user_view *v)
{
    return sizeof(pwd_user) + (size_t)v->ngids * 4 + v->name_len + v->pw_len + v->sh_len + v->host_len;
}

static pwd_user *user_new(const user_view *v)
{
    pwd_user *e = malloc(user_size(v));
    if (!e)
        return NULL;
    uint8_t *p = (uint8_t *)(e + 1);
    atomic_init(&e->refs, 1);
    e->ngids = v->has_gids ? v->ngids : 0;
    e->has_gids = (uint8_t)v->has_gids;
    e->gids = (const uint32_t *)p;
    if (e->ngids)
        memcpy(p, v->gids, (size_t)e->ngids * 4);
    p += (size_t)e->ngids * 4;
#define PUT(dst, src, n)          \
    do {                          \
        if (n)                    \
            memcpy(p, (src), (n)); \
        (dst) = (void *)p;        \
        p += (n);                 \
    } while (0)
    PUT(e->name, v->name, v->name_len);
    PUT(e->pw, v->pw, v->pw_len);
    PUT(e->sh, v->sh, v->sh_len);
    PUT(e->host, v->host, v->host_len);
#undef PUT
    e->name_len = (uint32_t)v->name_len;
    e->pw_len = v->pw_len;
    e->sh_len = v->sh_len;
    e->host_len = (uint32_t)v->host_len;
    e->frozen = (uint8_t)v->frozen;
    e->uid = v->uid;
    e->hash = name_hash(v->name, v->name_len);
    return e;
}

static pwd_group *group_new(const char *name, size_t n, uint32_t gid, const uint8_t *rec, uint32_t rec_len)
{
    pwd_group *g = malloc(sizeof *g + n + rec_len);
    if (!g)
        return NULL;
    uint8_t *p = (uint8_t *)(g + 1);
    atomic_init(&g->refs, 1);
    memcpy(p, name, n);
    if (rec_len)
        memcpy(p + n, rec, rec_len);
    g->name = (const char *)p;
    g->rec = p + n;
    g->name_len = (uint32_t)n;
    g->rec_len = rec_len;
    g->gid = gid;
    g->hash = name_hash(name, n);
    return g;
}

/* ---- indexes ------------------------------------------------------------- */

static int dix_init(dix *ix, uint32_t entries)
{
    uint32_t cap = 16;
    while (cap / 4 * 3 <= entries)
        cap *= 2;
    ix->slots = calloc(cap, sizeof *ix->slots);
    ix->mask = cap - 1;
    ix->used = 0;
    return ix->slots ? 0 : -1;
}

static int dix_copy(dix *to, const dix *from)
{
    *to = *from;
    to->slots = malloc(((size_t)from->mask + 1) * sizeof *to->slots);
    if (!to->slots)
        return -1;
    memcpy(to->slots, from->slots, ((size_t)from->mask + 1) * sizeof *to->slots);
    return 0;
}

static void dix_put(dix *ix, uint64_t h, uint32_t pos)
{
    uint32_t j = (uint32_t)h & ix->mask;
    while (ix->slots[j])
        j = (j + 1) & ix->mask;
    ix->slots[j] = pos + 1;
    ix->used++;
}

static const pwd_user *user_at(const pwt_delta *d, const char *name, size_t n, uint64_t h, uint32_t *pos)
{
    for (uint32_t j = (uint32_t)h & d->user_name.mask, v; (v = d->user_name.slots[j]);
         j = (j + 1) & d->user_name.mask) {
        const pwd_user *e = d->users[v - 1];
        if (e->hash == h && e->name_len == n && memcmp(e->name, name, n) == 0) {
            if (pos)
                *pos = v - 1;
            return e;
        }
    }
    return NULL;
}

static const pwd_user *delta_user(const pwt_delta *d, const char *name, size_t n)
{
    return n && n <= PW_MAX_NAME ? user_at(d, name, n, name_hash(name, n), NULL) : NULL;
}

static const pwd_user *delta_uid(const pwt_delta *d, uint32_t uid)
{
    for (uint32_t j = (uint32_t)id_hash(uid) & d->user_uid.mask, v; (v = d->user_uid.slots[j]);
         j = (j + 1) & d->user_uid.mask) {
        const pwd_user *e = d->users[v - 1];
        if (e->pw_len && e->uid == uid)
            return e;
    }
    return NULL;
}

static const pwd_group *group_at(const pwt_delta *d, const char *name, size_t n, uint64_t h, uint32_t *pos)
{
    for (uint32_t j = (uint32_t)h & d->group_name.mask, v; (v = d->group_name.slots[j]);
         j = (j + 1) & d->group_name.mask) {
        const pwd_group *g = d->groups[v - 1];
        if (g->hash == h && g->name_len == n && memcmp(g->name, name, n) == 0) {
            if (pos)
                *pos = v - 1;
            return g;
        }
    }
    return NULL;
}

static const pwd_group *delta_group(const pwt_delta *d, const char *name, size_t n)
{
    return n && n <= PW_MAX_NAME ? group_at(d, name, n, name_hash(name, n), NULL) : NULL;
}

static const pwd_group *delta_gid(const pwt_delta *d, uint32_t gid)
{
    for (uint32_t j = (uint32_t)id_hash(gid) & d->group_gid.mask, v; (v = d->group_gid.slots[j]);
         j = (j + 1) & d->group_gid.mask) {
        const pwd_group *g = d->groups[v - 1];
        if (g->rec_len && g->gid == gid)
            return g;
    }
    return NULL;
}

/* Rebuilds an index from the entries when it is 3/4 full (stale id slots
 * go then). kind: 0 user names, 1 uids, 2 group names, 3 gids. */
static int dix_room(pwt_delta *d, int kind)
{
    dix *ix = kind == 0 ? &d->user_name : kind == 1 ? &d->user_uid : kind == 2 ? &d->group_name : &d->group_gid;
    if ((uint64_t)(ix->used + 1) * 4 <= (uint64_t)(ix->mask + 1) * 3)
        return 0;
    uint32_t n = kind < 2 ? d->nusers : d->ngroups;
    dix fresh;
    if (dix_init(&fresh, n + 1) < 0)
        return -1;
    for (uint32_t i = 0; i < n; i++) {
        if (kind == 0)
            dix_put(&fresh, d->users[i]->hash, i);
        else if (kind == 1 && d->users[i]->pw_len)
            dix_put(&fresh, id_hash(d->users[i]->uid), i);
        else if (kind == 2)
            dix_put(&fresh, d->groups[i]->hash, i);
        else if (kind == 3 && d->groups[i]->rec_len)
            dix_put(&fresh, id_hash(d->groups[i]->gid), i);
    }
    free(ix->slots);
    *ix = fresh;
    return 0;
}

/* ---- delta life ---------------------------------------------------------- */

void pwd_release(pwt_delta *d)
{
    if (!d || atomic_fetch_sub_explicit(&d->refs, 1, memory_order_acq_rel) != 1)
        return;
    for (uint32_t i = 0; i < d->nusers; i++)
        entry_unref(d->users[i], &d->users[i]->refs);
    for (uint32_t i = 0; i < d->ngroups; i++)
        entry_unref(d->groups[i], &d->groups[i]->refs);
    free(d->users);
    free(d->groups);
    free(d->user_name.slots);
    free(d->user_uid.slots);
    free(d->group_name.slots);
    free(d->group_gid.slots);
    free(d);
}

/* A private copy of d (NULL: an empty delta) for pwt_apply to change. */
static pwt_delta *delta_copy(const pwt_delta *d)
{
    pwt_delta *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    atomic_init(&c->refs, 1);
    if (!d) {
        if (dix_init(&c->user_name, 0) < 0 || dix_init(&c->user_uid, 0) < 0 || dix_init(&c->group_name, 0) < 0 ||
            dix_init(&c->group_gid, 0) < 0) {
            pwd_release(c);
            return NULL;
        }
        return c;
    }
    c->users = malloc(((size_t)d->users_cap + 1) * sizeof *c->users);
    c->groups = malloc(((size_t)d->groups_cap + 1) * sizeof *c->groups);
    if (!c->users || !c->groups || dix_copy(&c->user_name, &d->user_name) < 0 ||
        dix_copy(&c->user_uid, &d->user_uid) < 0 || dix_copy(&c->group_name, &d->group_name) < 0 ||
        dix_copy(&c->group_gid, &d->group_gid) < 0) {
        pwd_release(c);
        return NULL;
    }
    c->users_cap = d->users_cap;
    c->groups_cap = d->groups_cap;
    for (uint32_t i = 0; i < d->nusers; i++) {
        c->users[i] = d->users[i];
        entry_ref(&c->users[i]->refs);
    }
    c->nusers = d->nusers;
    for (uint32_t i = 0; i < d->ngroups; i++) {
        c->groups[i] = d->groups[i];
        entry_ref(&c->groups[i]->refs);
    }
    c->ngroups = d->ngroups;
    c->bytes = d->bytes;
    return c;
}

static int grow_list(void **list, uint32_t *cap, uint32_t n, size_t size)
{
    if (n < *cap)
        return 0;
    uint32_t bigger = *cap ? *cap * 2 : 64;
    void *p = realloc(*list, (size_t)bigger * size);
    if (!p)
        return -1;
    *list = p;
    *cap = bigger;
    return 0;
}

static size_t user_bytes(const pwd_user *e)
{
    return sizeof *e + (size_t)e->ngids * 4 + e->name_len + e->pw_len + e->sh_len + e->host_len;
}

static size_t group_bytes(const pwd_group *g)
{
    return sizeof *g + g->name_len + g->rec_len;
}

/* Puts e in place of the entry of its name (or adds it); takes e. */
static int delta_put_user(pwt_delta *d, pwd_user *e)
{
    uint32_t pos;
    const pwd_user *old = user_at(d, e->name, e->name_len, e->hash, &pos);
    if (old) {
        d->bytes -= user_bytes(old);
        entry_unref(d->users[pos], &d->users[pos]->refs);
        d->users[pos] = e;
    } else {
        if (grow_list((void **)&d->users, &d->users_cap, d->nusers, sizeof *d->users) < 0 || dix_room(d, 0) < 0)
            goto fail;
        pos = d->nusers;
        d->users[d->nusers++] = e;
        dix_put(&d->user_name, e->hash, pos);
    }
    d->bytes += user_bytes(e);
    if (e->pw_len && delta_uid(d, e->uid) != e) {
        if (dix_room(d, 1) < 0)
            return -1; /* e is in the list: freed with d */
        if (delta_uid(d, e->uid) != e) /* (a rebuild indexed it) */
            dix_put(&d->user_uid, id_hash(e->uid), pos);
    }
    return 0;
fail:
    free(e);
    return -1;
}

static int delta_put_group(pwt_delta *d, pwd_group *g)
{
    uint32_t pos;
    const pwd_group *old = group_at(d, g->name, g->name_len, g->hash, &pos);
    if (old) {
        d->bytes -= group_bytes(old);
        entry_unref(d->groups[pos], &d->groups[pos]->refs);
        d->groups[pos] = g;
    } else {
        if (grow_list((void **)&d->groups, &d->groups_cap, d->ngroups, sizeof *d->groups) < 0 ||
            dix_room(d, 2) < 0) {
            free(g);
            return -1;
        }
        pos = d->ngroups;
        d->groups[d->ngroups++] = g;
        dix_put(&d->group_name, g->hash, pos);
    }
    d->bytes += group_bytes(g);
    if (g->rec_len && delta_gid(d, g->gid) != g) {
        if (dix_room(d, 3) < 0)
            return -1;
        if (delta_gid(d, g->gid) != g)
            dix_put(&d->group_gid, id_hash(g->gid), pos);
    }
    return 0;
}

/* ---- reading: delta first, then the base --------------------------------- */

/* Whether the base's user entry i was changed (its record is stale). */
static int base_user_changed(const pwt_table *t, uint32_t i)
{
    size_t n;
    const char *name = pwt_base_user_name(t, i, &n);
    return delta_user(t->delta, name, n) != NULL;
}

static int base_group_changed(const pwt_table *t, uint32_t i)
{
    size_t n;
    const char *name = pwt_base_group_name(t, i, &n);
    return delta_group(t->delta, name, n) != NULL;
}

const uint8_t *pwd_passwd_by_name(const pwt_table *t, const char *name, size_t n, uint32_t *len)
{
    const pwd_user *e = delta_user(t->delta, name, n);
    if (!e)
        return pwt_base_passwd(t, pwt_find_user(t, name, n), len);
    *len = e->pw_len;
    return e->pw_len ? e->pw : NULL;
}

const uint8_t *pwd_passwd_by_uid(const pwt_table *t, uint32_t uid, uint32_t *len)
{
    const pwd_user *e = delta_uid(t->delta, uid);
    if (e) {
        *len = e->pw_len;
        return e->pw;
    }
    uint32_t i = pwt_find_uid(t, uid);
    return i == NONE || base_user_changed(t, i) ? NULL : pwt_base_passwd(t, i, len);
}

const uint8_t *pwd_shadow_by_name(const pwt_table *t, const char *name, size_t n, uint32_t *len)
{
    const pwd_user *e = delta_user(t->delta, name, n);
    if (!e)
        return pwt_base_shadow(t, pwt_find_user(t, name, n), len);
    *len = e->sh_len;
    return e->sh_len ? e->sh : NULL;
}

const uint8_t *pwd_group_by_name(const pwt_table *t, const char *name, size_t n, uint32_t *len)
{
    const pwd_group *g = delta_group(t->delta, name, n);
    if (!g)
        return pwt_base_group(t, pwt_find_group(t, name, n), len);
    *len = g->rec_len;
    return g->rec_len ? g->rec : NULL;
}

const uint8_t *pwd_group_by_gid(const pwt_table *t, uint32_t gid, uint32_t *len)
{
    const pwd_group *g = delta_gid(t->delta, gid);
    if (g) {
        *len = g->rec_len;
        return g->rec;
    }
    uint32_t i = pwt_find_gid(t, gid);
    return i == NONE || base_group_changed(t, i) ? NULL : pwt_base_group(t, i, len);
}

int pwd_mailhost(const pwt_table *t, const char *name, size_t n, const char **host, size_t *host_len, int *frozen)
{
    const pwd_user *e = delta_user(t->delta, name, n);
    if (!e)
        return pwt_base_mailhost(t, pwt_find_user(t, name, n), host, host_len, frozen);
    if (!e->pw_len)
        return -1;
    *host = e->host;
    *host_len = e->host_len;
    *frozen = e->frozen;
    return 0;
}

/* A name's gids: its own list when a group change set it, else the base's.
 * -1 when the name is neither a user nor a member of any group. */
static int effective_gids(const pwt_table *t, const pwt_delta *d, const char *name, size_t n,
                          const uint32_t **gids, uint32_t *count)
{
    const pwd_user *e = delta_user(d, name, n);
    *count = 0;
    *gids = NULL;
    int found = 0;
    if (e && e->has_gids) {
        *gids = e->gids;
        *count = e->ngids;
    } else {
        found = pwt_base_initgroups(t, name, n, gids, count) == 0;
        if (!found)
            *count = 0;
    }
    if (e)
        return e->pw_len || *count ? 0 : -1;
    return found ? 0 : -1;
}

int pwd_initgroups(const pwt_table *t, const char *name, size_t n, const uint32_t **gids, uint32_t *count)
{
    return effective_gids(t, t->delta, name, n, gids, count);
}

uint32_t pwd_enum_size(const pwt_table *t, int map)
{
    return pwt_base_enum_size(t, map) + (map == PWT_GROUP ? t->delta->ngroups : t->delta->nusers);
}

const uint8_t *pwd_enum_record(const pwt_table *t, int map, uint32_t i, uint32_t *len)
{
    uint32_t base = pwt_base_enum_size(t, map);
    if (i < base) {
        const uint8_t *rec = pwt_base_enum_record(t, map, i, len);
        if (rec && (map == PWT_GROUP ? base_group_changed(t, i) : base_user_changed(t, i)))
            return NULL; /* its delta slot has it */
        return rec;
    }
    i -= base;
    if (map == PWT_GROUP) {
        if (i >= t->delta->ngroups || !t->delta->groups[i]->rec_len)
            return NULL;
        *len = t->delta->groups[i]->rec_len;
        return t->delta->groups[i]->rec;
    }
    if (i >= t->delta->nusers)
        return NULL;
    const pwd_user *e = t->delta->users[i];
    *len = map == PWT_SHADOW ? e->sh_len : e->pw_len;
    if (!*len)
        return NULL;
    return map == PWT_SHADOW ? e->sh : e->pw;
}

size_t pwt_delta_entries(const pwt_table *t)
{
    return t->delta ? (size_t)t->delta->nusers + t->delta->ngroups : 0;
}

/* ---- applying changes ---------------------------------------------------- */

typedef struct {
    pwt_table *t;      /* the new table: base shared, delta private until returned */
    const pwpl_rule *rule;
    uint8_t *scratch;  /* packing room */
    size_t scratch_cap;
} applier;

static int scratch(applier *a, size_t need)
{
    if (need <= a->scratch_cap)
        return 0;
    uint8_t *p = realloc(a->scratch, need);
    if (!p)
        return -1;
    a->scratch = p;
    a->scratch_cap = need;
    return 0;
}

/* The user as the new table holds it so far; 0 when it has a passwd record. */
static int user_get(const applier *a, const char *name, size_t n, user_view *v)
{
    const pwt_table *t = a->t;
    memset(v, 0, sizeof *v);
    v->name = name;
    v->name_len = n;
    const pwd_user *e = delta_user(t->delta, name, n);
    if (e) {
        v->pw = e->pw;
        v->pw_len = e->pw_len;
        v->sh = e->sh;
        v->sh_len = e->sh_len;
        v->uid = e->uid;
        v->host = e->host;
        v->host_len = e->host_len;
        v->frozen = e->frozen;
        v->has_gids = e->has_gids;
        v->gids = e->gids;
        v->ngids = e->ngids;
        return e->pw_len ? 0 : -1;
    }
    uint32_t i = pwt_find_user(t, name, n), len = 0;
    if (i == NONE)
        return -1;
    v->pw = pwt_base_passwd(t, i, &len);
    v->pw_len = v->pw ? len : 0;
    v->sh = pwt_base_shadow(t, i, &len);
    v->sh_len = v->sh ? len : 0;
    if (!v->pw)
        return -1;
    pwt_base_mailhost(t, i, &v->host, &v->host_len, &v->frozen);
    pw_passwd_view pv;
    pwp_reader r;
    pwp_reader_init(&r, v->pw, v->pw_len);
    if (pw_get_passwd(&r, &pv) == 0)
        v->uid = (uint32_t)pv.uid;
    return 0;
}

static int user_put(applier *a, const user_view *v)
{
    pwd_user *e = user_new(v);
    return e ? delta_put_user(a->t->delta, e) : -1;
}

/* Whether a user other than `name` holds uid. */
static int uid_taken(const applier *a, uint32_t uid, const char *name, size_t n)
{
    const pwd_user *e = delta_uid(a->t->delta, uid);
    if (e)
        return !(e->name_len == n && memcmp(e->name, name, n) == 0);
    uint32_t i = pwt_find_uid(a->t, uid);
    if (i == NONE)
        return 0;
    size_t bn;
    const char *bname = pwt_base_user_name(a->t, i, &bn);
    return !(bn == n && memcmp(bname, name, n) == 0) && !delta_user(a->t->delta, bname, bn);
}

static int gid_taken(const applier *a, uint32_t gid, const char *name, size_t n)
{
    const pwd_group *g = delta_gid(a->t->delta, gid);
    if (g)
        return !(g->name_len == n && memcmp(g->name, name, n) == 0);
    uint32_t i = pwt_find_gid(a->t, gid);
    if (i == NONE)
        return 0;
    size_t bn;
    const char *bname = pwt_base_group_name(a->t, i, &bn);
    return !(bn == n && memcmp(bname, name, n) == 0) && !delta_group(a->t->delta, bname, bn);
}

/* Packs a passwd record from its view into scratch; its length or 0. */
static size_t pack_passwd(applier *a, const pw_passwd_view *pv)
{
    size_t need = pv->name.n + pv->gecos.n + pv->dir.n + pv->shell.n + pv->mailhost.n + 64;
    if (scratch(a, need) < 0)
        return 0;
    pwp_buf b;
    pwp_init(&b, a->scratch, need);
    pw_put_passwd(&b, pv);
    return b.overflow || b.len > UINT16_MAX ? 0 : b.len;
}

enum { OK = PWT_APPLIED, BAD = PWT_REFUSED_BAD, UNKNOWN = PWT_REFUSED_UNKNOWN, DUP = PWT_REFUSED_DUP_ID, NOMEM = -1 };

static int apply_passwd(applier *a, const field *line)
{
    field f[8];
    uint32_t uid, gid;
    pwt_load_stats *st = &a->t->st;
    if (parse_passwd_line(line, f, &uid, &gid) < 0) {
        st->passwd_bad++;
        return BAD;
    }
    if (uid_taken(a, uid, f[0].p, f[0].n)) {
        st->passwd_dup_uid++;
        return DUP;
    }
    user_view v;
    int existed = user_get(a, f[0].p, f[0].n, &v) == 0;
    if (!existed) {
        /* a new user: placed as at load (no mailhosts line yet) */
        int h = a->rule ? pwpl_pick(a->rule, f[0].p, f[0].n) : -1;
        v.host = h >= 0 ? pwpl_host(a->rule, h, &v.host_len) : "";
        v.host_len = h >= 0 ? v.host_len : 0;
        v.frozen = 0;
        v.sh = NULL;
        v.sh_len = 0;
    }
    pw_passwd_view pv = {
        .name = {f[0].p, (uint32_t)f[0].n},
        .passwd = {"x", 1}, /* never a hash: the shadow map serves those */
        .uid = uid,
        .gid = gid,
        .gecos = {f[4].p, (uint32_t)f[4].n},
        .dir = {f[5].p, (uint32_t)f[5].n},
        .shell = {f[6].p, (uint32_t)f[6].n},
        .mailhost = {v.host, (uint32_t)v.host_len},
    };
    size_t len = pack_passwd(a, &pv);
    if (!len) {
        st->passwd_bad++;
        return a->scratch ? BAD : NOMEM;
    }
    v.pw = a->scratch;
    v.pw_len = (uint32_t)len;
    v.uid = uid;
    if (user_put(a, &v) < 0)
        return NOMEM;
    st->users += !existed;
    return OK;
}

static int apply_shadow(applier *a, const field *line)
{
    field f[10];
    pw_shadow_view sv;
    pwt_load_stats *st = &a->t->st;
    if (parse_shadow_line(line, f, &sv) < 0) {
        st->shadow_bad++;
        return BAD;
    }
    user_view v;
    if (user_get(a, f[0].p, f[0].n, &v) < 0) {
        st->shadow_orphan++;
        return UNKNOWN;
    }
    size_t need = line->n + 80;
    uint8_t *rec = malloc(need);
    if (!rec)
        return NOMEM;
    pwp_buf b;
    pwp_init(&b, rec, need);
    pw_put_shadow(&b, &sv);
    int rc = OK;
    if (b.overflow || b.len > UINT16_MAX) {
        st->shadow_bad++;
        rc = BAD;
    } else {
        st->shadows += !v.sh_len;
        v.sh = rec;
        v.sh_len = (uint32_t)b.len;
        rc = user_put(a, &v) < 0 ? NOMEM : OK;
    }
    free(rec);
    return rc;
}

static int apply_mailhosts(applier *a, const field *line)
{
    field w[3];
    int frozen;
    pwt_load_stats *st = &a->t->st;
    if (parse_mailhosts_line(line, w, &frozen) < 0 || w[1].n > PWPL_MAX_HOST_LEN) {
        st->mailhosts_bad++;
        return BAD;
    }
    user_view v;
    if (user_get(a, w[0].p, w[0].n, &v) < 0) {
        st->mailhosts_unknown++;
        return UNKNOWN;
    }
    pw_passwd_view pv;
    pwp_reader r;
    pwp_reader_init(&r, v.pw, v.pw_len);
    if (pw_get_passwd(&r, &pv) < 0)
        return BAD; /* cannot be: we packed it */
    /* the view points into the old record: pack aside, then copy */
    pv.mailhost = (pw_str){w[1].p, (uint32_t)w[1].n};
    size_t len = pack_passwd(a, &pv);
    if (!len) {
        st->mailhosts_bad++;
        return a->scratch ? BAD : NOMEM;
    }
    v.pw = a->scratch;
    v.pw_len = (uint32_t)len;
    v.host = w[1].p;
    v.host_len = w[1].n;
    v.frozen = frozen;
    return user_put(a, &v) < 0 ? NOMEM : OK;
}

static int apply_del_user(applier *a, const field *line)
{
    user_view v;
    if (!file_name_ok(line)) {
        a->t->st.passwd_bad++;
        return BAD;
    }
    if (user_get(a, line->p, line->n, &v) < 0) {
        a->t->st.delete_unknown++;
        return UNKNOWN;
    }
    a->t->st.users--;
    a->t->st.shadows -= v.sh_len != 0;
    /* the name stays a member of its groups, as in group(5) */
    v.pw = v.sh = NULL;
    v.pw_len = v.sh_len = 0;
    v.host = NULL;
    v.host_len = 0;
    v.frozen = 0;
    return user_put(a, &v) < 0 ? NOMEM : OK;
}

/* Adds gid to (add) or removes one gid from a name's list. */
static int member_change(applier *a, const char *name, size_t n, uint32_t gid, int add)
{
    user_view v;
    user_get(a, name, n, &v);
    const uint32_t *gids;
    uint32_t count;
    effective_gids(a->t, a->t->delta, name, n, &gids, &count);
    uint32_t *list = malloc(((size_t)count + 1) * sizeof *list), k = 0;
    if (!list)
        return -1;
    int removed = 0;
    for (uint32_t i = 0; i < count; i++) {
        if (!add && !removed && gids[i] == gid)
            removed = 1;
        else
            list[k++] = gids[i];
    }
    if (add) {
        if (k >= PWT_MAX_USER_GROUPS) {
            a->t->st.too_many_groups++;
            free(list);
            return 0;
        }
        list[k++] = gid;
    } else if (!removed) {
        free(list);
        return 0;
    }
    v.has_gids = 1;
    v.gids = list;
    v.ngids = k;
    int rc = user_put(a, &v);
    free(list);
    return rc;
}

/* A set of member names (a group's, old or new) for telling changes apart. */
typedef struct {
    field *m;
    uint32_t n, mask;
    uint32_t *slots;
} name_set;

static int set_has(const name_set *s, const char *p, size_t n)
{
    if (!s->slots)
        return 0;
    for (uint32_t j = (uint32_t)name_hash(p, n) & s->mask, v; (v = s->slots[j]); j = (j + 1) & s->mask)
        if (s->m[v - 1].n == n && memcmp(s->m[v - 1].p, p, n) == 0)
            return 1;
    return 0;
}

static int set_build(name_set *s)
{
    uint32_t cap = 16;
    while (cap < 2 * s->n)
        cap *= 2;
    s->slots = calloc(cap, sizeof *s->slots);
    if (!s->slots)
        return -1;
    s->mask = cap - 1;
    for (uint32_t i = 0; i < s->n; i++) {
        uint32_t j = (uint32_t)name_hash(s->m[i].p, s->m[i].n) & s->mask;
        while (s->slots[j])
            j = (j + 1) & s->mask;
        s->slots[j] = i + 1;
    }
    return 0;
}

/* The members of a packed group record. */
static int record_members(const uint8_t *rec, uint32_t len, name_set *s, uint32_t *gid)
{
    pwp_reader r;
    pw_group_view gv;
    pw_str m;
    pwp_reader_init(&r, rec, len);
    if (pw_get_group(&r, &gv) < 0)
        return -1;
    *gid = (uint32_t)gv.gid;
    s->m = malloc(((size_t)gv.nmembers + 1) * sizeof *s->m);
    if (!s->m)
        return -1;
    while (pw_group_next_member(&gv, &m) == 0)
        s->m[s->n++] = (field){m.p, m.n};
    return 0;
}

/* The group as the new table holds it so far: its record, or NULL. */
static const uint8_t *group_get(const applier *a, const char *name, size_t n, uint32_t *len)
{
    const pwd_group *g = delta_group(a->t->delta, name, n);
    if (g) {
        *len = g->rec_len;
        return g->rec_len ? g->rec : NULL;
    }
    return pwt_base_group(a->t, pwt_find_group(a->t, name, n), len);
}

/* Moves the members' gid lists from the old group (rec NULL: none) to the
 * new (members NULL: deleted): only names whose membership changed are
 * touched, unless the gid changed. */
static int regroup(applier *a, const uint8_t *old, uint32_t old_len, const name_set *now, uint32_t gid)
{
    name_set was = {0}, is = *now;
    uint32_t old_gid = gid;
    int rc = -1;
    if (old && record_members(old, old_len, &was, &old_gid) < 0)
        goto out;
    int same_gid = old && old_gid == gid;
    if ((same_gid && (set_build(&was) < 0 || set_build(&is) < 0)))
        goto out;
    for (uint32_t i = 0; i < was.n; i++)
        if (!(same_gid && set_has(&is, was.m[i].p, was.m[i].n)) &&
            member_change(a, was.m[i].p, was.m[i].n, old_gid, 0) < 0)
            goto out;
    for (uint32_t i = 0; i < is.n; i++)
        if (!(same_gid && set_has(&was, is.m[i].p, is.m[i].n)) &&
            member_change(a, is.m[i].p, is.m[i].n, gid, 1) < 0)
            goto out;
    rc = 0;
out:
    free(was.m);
    free(was.slots);
    free(is.slots);
    return rc;
}

static int apply_group(applier *a, const field *line)
{
    field f[5], mf;
    uint32_t gid;
    pwt_load_stats *st = &a->t->st;
    if (parse_group_line(line, f, &gid) < 0) {
        st->group_bad++;
        return BAD;
    }
    if (gid_taken(a, gid, f[0].p, f[0].n)) {
        st->group_dup_gid++;
        return DUP;
    }
    name_set now = {0};
    size_t cap = 0;
    const char *p = f[3].p, *end = f[3].p + f[3].n;
    int valid, rc = NOMEM;
    for (; next_member(&p, end, &mf, &valid);) {
        if (!valid) {
            st->group_bad_member++;
            continue;
        }
        if (now.n == cap) {
            cap = cap ? cap * 2 : 16;
            field *m = realloc(now.m, cap * sizeof *m);
            if (!m)
                goto out;
            now.m = m;
        }
        now.m[now.n++] = mf;
    }
    size_t need = line->n + 5 * (size_t)now.n + 32;
    uint8_t *rec = malloc(need);
    if (!rec)
        goto out;
    pwp_buf b;
    pwp_init(&b, rec, need);
    pwp_put_array(&b, 4);
    pwp_put_str(&b, f[0].p, f[0].n);
    pwp_put_str(&b, "x", 1);
    pwp_put_uint(&b, gid);
    pwp_put_array(&b, now.n);
    for (uint32_t k = 0; k < now.n; k++)
        pwp_put_str(&b, now.m[k].p, now.m[k].n);
    uint32_t old_len = 0;
    const uint8_t *old = group_get(a, f[0].p, f[0].n, &old_len);
    /* the old record stays valid: the entry it is in is held by the published delta or the base */
    pwd_group *g = group_new(f[0].p, f[0].n, gid, rec, (uint32_t)b.len);
    free(rec);
    if (!g)
        goto out;
    if (regroup(a, old, old_len, &now, gid) < 0) {
        free(g);
        goto out;
    }
    int added = !old; /* (old goes when g takes its place) */
    if (delta_put_group(a->t->delta, g) < 0)
        goto out;
    st->groups += added;
    rc = OK;
out:
    free(now.m);
    return rc;
}

static int apply_del_group(applier *a, const field *line)
{
    if (!file_name_ok(line)) {
        a->t->st.group_bad++;
        return BAD;
    }
    uint32_t old_len = 0;
    const uint8_t *old = group_get(a, line->p, line->n, &old_len);
    if (!old) {
        a->t->st.delete_unknown++;
        return UNKNOWN;
    }
    name_set none = {0};
    pwd_group *g = group_new(line->p, line->n, 0, NULL, 0);
    if (g && regroup(a, old, old_len, &none, UINT32_MAX) < 0) {
        free(g);
        return NOMEM;
    }
    if (!g || delta_put_group(a->t->delta, g) < 0)
        return NOMEM;
    a->t->st.groups--;
    return OK;
}

/* One change as one line: a trailing newline is allowed, no other. */
static int change_line(const pwt_change *c, field *line)
{
    line->p = c->text ? c->text : "";
    line->n = c->text ? c->len : 0;
    if (line->n && line->p[line->n - 1] == '\n')
        line->n--;
    if (line->n && line->p[line->n - 1] == '\r')
        line->n--;
    return memchr(line->p, '\n', line->n) || blank_or_comment(line) ? -1 : 0;
}

static int apply_one(applier *a, const pwt_change *c)
{
    field line;
    static const int bad_counter_kind[] = {0, 1, 2, 3, 0, 2};
    if (c->kind < PWT_CH_PASSWD || c->kind > PWT_CH_DEL_GROUP || change_line(c, &line) < 0) {
        pwt_load_stats *st = &a->t->st;
        int k = c->kind >= PWT_CH_PASSWD && c->kind <= PWT_CH_DEL_GROUP ? bad_counter_kind[c->kind] : 0;
        uint64_t *bad[] = {&st->passwd_bad, &st->shadow_bad, &st->group_bad, &st->mailhosts_bad};
        (*bad[k])++;
        return BAD;
    }
    switch (c->kind) {
    case PWT_CH_PASSWD: return apply_passwd(a, &line);
    case PWT_CH_SHADOW: return apply_shadow(a, &line);
    case PWT_CH_GROUP: return apply_group(a, &line);
    case PWT_CH_MAILHOSTS: return apply_mailhosts(a, &line);
    case PWT_CH_DEL_USER: return apply_del_user(a, &line);
    default: return apply_del_group(a, &line);
    }
}

static pwt_table *table_share(const pwt_table *t, pwt_delta *delta)
{
    pwt_table *c = malloc(sizeof *c);
    if (!c)
        return NULL;
    *c = *t;
    atomic_fetch_add_explicit(&t->shared->refs, 1, memory_order_relaxed);
    c->delta = delta;
    return c;
}

pwt_table *pwt_share(const pwt_table *t)
{
    if (t->delta)
        atomic_fetch_add_explicit(&t->delta->refs, 1, memory_order_relaxed);
    pwt_table *c = table_share(t, t->delta);
    if (!c)
        pwd_release(t->delta);
    return c;
}

pwt_table *pwt_apply(const pwt_table *t, const pwt_change *changes, size_t n, const pwpl_rule *rule, int *status,
                     char *err, size_t errcap)
{
    pwt_delta *d = delta_copy(t->delta);
    pwt_table *c = d ? table_share(t, d) : NULL;
    applier a = {c, rule, NULL, 0};
    if (!c) {
        pwd_release(d);
        goto nomem;
    }
    for (size_t i = 0; i < n; i++) {
        int rc = apply_one(&a, &changes[i]);
        if (rc == NOMEM)
            goto nomem;
        if (status)
            status[i] = rc;
        if (rc == OK)
            c->st.changes_applied++;
        else
            c->st.changes_refused++;
    }
    free(a.scratch);
    c->st.delta_entries = (uint64_t)d->nusers + d->ngroups;
    c->st.bytes = t->st.bytes - (t->delta ? t->delta->bytes : 0) + d->bytes;
    if (err && errcap)
        err[0] = 0;
    return c;
nomem:
    free(a.scratch);
    pwt_free(c);
    if (err && errcap)
        snprintf(err, errcap, "out of memory applying changes");
    return NULL;
}

/* ---- folding: a new base from the table's records ------------------------ */

typedef struct {
    char *p;
    size_t n, cap;
    int failed;
} text;

static void put(text *s, const char *p, size_t n)
{
    if (s->failed)
        return;
    if (s->n + n + 1 > s->cap) {
        size_t cap = s->cap ? s->cap : 1 << 16;
        while (cap < s->n + n + 1)
            cap *= 2;
        char *q = realloc(s->p, cap);
        if (!q) {
            s->failed = 1;
            return;
        }
        s->p = q;
        s->cap = cap;
    }
    memcpy(s->p + s->n, p, n);
    s->n += n;
}

static void putstr(text *s, pw_str v)
{
    put(s, v.p, v.n);
}

static void putf(text *s, const char *fmt, long long v)
{
    char num[32];
    int k = snprintf(num, sizeof num, fmt, v);
    put(s, num, (size_t)k);
}

/* A shadow(5) number: -1 is the empty field. */
static void putnum(text *s, int64_t v)
{
    if (v != -1)
        putf(s, "%lld", (long long)v);
}

/* Writes the table back as the four sources (what a load of them makes). */
static void dump(const pwt_table *t, text out[4])
{
    uint32_t len;
    for (uint32_t i = 0, size = pwt_enum_size(t, PWT_PASSWD); i < size; i++) {
        const uint8_t *rec = pwt_enum_record(t, PWT_PASSWD, i, &len);
        pw_passwd_view v;
        pwp_reader r;
        if (!rec)
            continue;
        pwp_reader_init(&r, rec, len);
        if (pw_get_passwd(&r, &v) < 0)
            continue;
        putstr(&out[0], v.name);
        putf(&out[0], ":x:%llu", (long long)v.uid);
        putf(&out[0], ":%llu:", (long long)v.gid);
        putstr(&out[0], v.gecos);
        put(&out[0], ":", 1);
        putstr(&out[0], v.dir);
        put(&out[0], ":", 1);
        putstr(&out[0], v.shell);
        put(&out[0], "\n", 1);
        const char *host;
        size_t hl;
        int frozen;
        /* a name with blanks has no mailhosts line: the rule places it again */
        if (pwt_mailhost(t, v.name.p, v.name.n, &host, &hl, &frozen) == 0 && hl &&
            !memchr(v.name.p, ' ', v.name.n) && !memchr(v.name.p, '\t', v.name.n)) {
            putstr(&out[3], v.name);
            put(&out[3], " ", 1);
            put(&out[3], host, hl);
            if (frozen)
                put(&out[3], " frozen", 7);
            put(&out[3], "\n", 1);
        }
    }
    for (uint32_t i = 0, size = pwt_enum_size(t, PWT_SHADOW); i < size; i++) {
        const uint8_t *rec = pwt_enum_record(t, PWT_SHADOW, i, &len);
        pw_shadow_view v;
        pwp_reader r;
        if (!rec)
            continue;
        pwp_reader_init(&r, rec, len);
        if (pw_get_shadow(&r, &v) < 0)
            continue;
        putstr(&out[1], v.name);
        put(&out[1], ":", 1);
        putstr(&out[1], v.hash);
        const int64_t nums[] = {v.lastchg, v.min, v.max, v.warn, v.inact, v.expire, v.flag};
        for (int k = 0; k < 7; k++) {
            put(&out[1], ":", 1);
            putnum(&out[1], nums[k]);
        }
        put(&out[1], "\n", 1);
    }
    for (uint32_t i = 0, size = pwt_enum_size(t, PWT_GROUP); i < size; i++) {
        const uint8_t *rec = pwt_enum_record(t, PWT_GROUP, i, &len);
        pw_group_view v;
        pw_str m;
        pwp_reader r;
        if (!rec)
            continue;
        pwp_reader_init(&r, rec, len);
        if (pw_get_group(&r, &v) < 0)
            continue;
        putstr(&out[2], v.name);
        putf(&out[2], ":x:%llu:", (long long)v.gid);
        for (int first = 1; pw_group_next_member(&v, &m) == 0; first = 0) {
            if (!first)
                put(&out[2], ",", 1);
            putstr(&out[2], m);
        }
        put(&out[2], "\n", 1);
    }
}

pwt_table *pwt_fold(const pwt_table *t, const pwpl_rule *rule, char *err, size_t errcap)
{
    text out[4] = {{0}};
    pwt_table *f = NULL;
    dump(t, out);
    if (out[0].failed || out[1].failed || out[2].failed || out[3].failed) {
        if (err && errcap)
            snprintf(err, errcap, "out of memory folding the changes");
    } else {
        const char *buf[4];
        size_t len[4];
        /* pwt_build's order: passwd, shadow, group, mailhosts */
        for (int i = 0; i < 4; i++) {
            buf[i] = out[i].p ? out[i].p : "";
            len[i] = out[i].n;
        }
        f = pwt_build_sources(buf, len, rule, err, errcap);
    }
    for (int i = 0; i < 4; i++)
        free(out[i].p);
    if (f) {
        /* what was refused before stays counted; what is held is the new count */
        pwt_load_stats st = t->st;
        st.users = f->st.users;
        st.groups = f->st.groups;
        st.shadows = f->st.shadows;
        st.bytes = f->st.bytes;
        st.delta_entries = 0;
        f->st = st;
    }
    return f;
}
