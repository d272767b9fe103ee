/*
 * pw_placement.c - letter ranges and weighted rendezvous hashing
 * (docs/placement.md).
 */
#include "pw_placement.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

struct pwpl_rule {
    int kind;
    int nhosts, nranges;
    struct {
        char *name;
        size_t n;
        double weight;
    } hosts[PWPL_MAX_HOSTS];
    struct {
        uint8_t first, last;
        int host;
    } ranges[PWPL_MAX_RANGES];
};

pwpl_rule *pwpl_new(int kind)
{
    if (kind != PWPL_RANGES && kind != PWPL_HASH)
        return NULL;
    pwpl_rule *r = calloc(1, sizeof *r);
    if (r)
        r->kind = kind;
    return r;
}

void pwpl_free(pwpl_rule *r)
{
    if (!r)
        return;
    for (int i = 0; i < r->nhosts; i++)
        free(r->hosts[i].name);
    free(r);
}

int pwpl_add_host(pwpl_rule *r, const char *name, size_t n, double weight)
{
    if (r->nhosts >= PWPL_MAX_HOSTS || n == 0 || n > PWPL_MAX_HOST_LEN ||
        memchr(name, 0, n) || !(weight > 0) || !isfinite(weight))
        return -1;
    char *copy = malloc(n + 1);
    if (!copy)
        return -1;
    memcpy(copy, name, n);
    copy[n] = 0;
    int i = r->nhosts++;
    r->hosts[i].name = copy;
    r->hosts[i].n = n;
    r->hosts[i].weight = weight;
    return i;
}

int pwpl_add_range(pwpl_rule *r, int first, int last, int host)
{
    if (r->nranges >= PWPL_MAX_RANGES || first < 0 || last > 255 ||
        first > last || host < 0 || host >= r->nhosts)
        return -1;
    int i = r->nranges++;
    r->ranges[i].first = (uint8_t)first;
    r->ranges[i].last = (uint8_t)last;
    r->ranges[i].host = host;
    return 0;
}

int pwpl_nhosts(const pwpl_rule *r)
{
    return r->nhosts;
}

const char *pwpl_host(const pwpl_rule *r, int i, size_t *n)
{
    if (i < 0 || i >= r->nhosts)
        return NULL;
    *n = r->hosts[i].n;
    return r->hosts[i].name;
}

/* Rendezvous score of one host; `equal_weights` for the ranges fallback. */
static double score(const pwpl_rule *r, int i, const char *name, size_t n,
                    int equal_weights)
{
    static const char zero = 0;
    uint64_t x = pw_fnv1a(PW_FNV_BASIS, r->hosts[i].name, r->hosts[i].n);
    x = pw_fnv1a(x, &zero, 1);
    x = pw_fnv1a(x, name, n);
    double u = ((double)(x >> 11) + 0.5) / 9007199254740992.0; /* 2**53 */
    double w = equal_weights ? 1.0 : r->hosts[i].weight;
    return -w / log(u);
}

static int pick_hash(const pwpl_rule *r, const char *name, size_t n, int equal_weights)
{
    int best = -1;
    double best_score = 0;
    for (int i = 0; i < r->nhosts; i++) {
        double s = score(r, i, name, n, equal_weights);
        if (best < 0 || s > best_score) { /* ties: the first listed wins */
            best = i;
            best_score = s;
        }
    }
    return best;
}

int pwpl_pick(const pwpl_rule *r, const char *name, size_t n)
{
    if (r->nhosts == 0)
        return -1;
    if (r->kind == PWPL_HASH)
        return pick_hash(r, name, n, 0);
    uint8_t c = n ? (uint8_t)name[0] : 0;
    if (c >= 'A' && c <= 'Z')
        c = (uint8_t)(c - 'A' + 'a');
    for (int i = 0; i < r->nranges; i++)
        if (c >= r->ranges[i].first && c <= r->ranges[i].last)
            return r->ranges[i].host;
    /* Hosts of a "ranges" rule are the distinct hosts named in the ranges,
     * in order of first appearance (placement.py adds them that way). */
    return pick_hash(r, name, n, 1);
}
