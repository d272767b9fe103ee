/*
 * pd_conf.c - pdelivery's settings: the [delivery], [placement] and [hosts]
 * sections of /etc/pwmail.toml (or $PWMAIL_CONF, or --config), with the
 * defaults of delivery/config.py and pwcache/placement.py, and the checks of
 * pwmail/base/hostmap.py.
 *
 * The reader knows the subset of TOML those sections use: tables `[name]`,
 * `key = value` with strings (basic and literal), integers, floats,
 * booleans and arrays of them, inline tables of those ([hosts] entries),
 * comments. The other sections are only
 * skipped, so their values may be anything TOML has (inline tables,
 * multi-line strings, nested arrays). Anything it does not understand, an
 * unknown key in [delivery] (a typo, as settings.section refuses it) or a
 * value of the wrong type is a configuration error: one line naming the
 * file and the key, exit 78 (EX_CONFIG).
 */
#include <ctype.h>
#include <errno.h>
#include <stddef.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pd.h"
#include "pw_placement.h"

#define CONF_FILE_MAX (4 << 20)      /* a settings file larger than this is refused */
#define CONF_KEYS_MAX 64             /* keys kept per section we read */
#define CONF_HOSTS_MAX 4096          /* [hosts] entries (hostmap.HOSTS_MAX) */
#define CONF_ITEMS_MAX 1024          /* strings in one array (PWPL_MAX_HOSTS) */

/* delivery/config.py DEFAULTS: every key [delivery] may have (pdeliveryd's
 * and lmtp-proxy's included, which pdelivery does not use). tests/delivery/test_delivery_pdelivery.py
 * runs pdelivery on examples/pwmail.toml with every key live, which
 * tests/system/test_examples.py keeps equal to DEFAULTS: a key added there
 * and not here fails that test. */
static const char *const DELIVERY_KEYS[] = {
    "lmtp_port", "listen", "root", "layout", "users", "mailhost_names", "recipient_delimiter",
    "message_size_max", "message_line_max", "recipients_max", "command_line_max", "bad_commands_max",
    "sessions_max", "idle_timeout", "data_timeout", "sessions_per_address_max", "dedup_window", "dedup_max",
    "tmp_max_age", "spool_memory_max", "io_threads", "connect_timeout", "timeout", "mailhost_suffix",
    /* lmtp-proxy's */
    "proxy_listen", "proxy_unix", "proxy_unix_mode", "proxy_pool_size", "proxy_pool_idle",
    "proxy_store_connections_max", "proxy_spool_dir", "shutdown_grace",
    /* pdeliveryd's and lmtp-proxy's Prometheus exporters */
    "metrics_listen", "proxy_metrics_listen", NULL};
static const char *const PLACEMENT_KEYS[] = {"rule", "ranges", "hosts", NULL};

enum vtype { V_STR, V_INT, V_FLOAT, V_BOOL, V_ARRAY, V_TABLE, V_OTHER };

typedef struct value {
    int type;
    char *s;                       /* V_STR */
    long long i;                   /* V_INT, V_BOOL */
    double f;                      /* V_FLOAT */
    int n;                         /* V_ARRAY: items, all V_STR (else the array is V_OTHER) */
    char **items;
    int nt;                        /* V_TABLE: an inline table without dotted keys */
    char **tkeys;
    struct value *tvals;
} value;

typedef struct {
    char *key;
    value v;
    int line;
} entry;

typedef struct {
    entry *e;
    int n, cap, max, seen;         /* max: the keys it may have */
} section;

typedef struct {
    const char *path;
    const char *p, *end;
    int line;
    char *err;
    size_t errcap;
} parser;

static int fail(parser *ps, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail(parser *ps, const char *fmt, ...)
{
    char why[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    snprintf(ps->err, ps->errcap, "%s: line %d: %s", ps->path, ps->line, why);
    return -1;
}

static void value_free(value *v)
{
    free(v->s);
    for (int k = 0; k < v->n; k++)
        free(v->items[k]);
    free(v->items);
    for (int k = 0; k < v->nt; k++) {
        free(v->tkeys[k]);
        value_free(&v->tvals[k]);
    }
    free(v->tkeys);
    free(v->tvals);
    memset(v, 0, sizeof *v);
}

/* ---- lexing ---------------------------------------------------------------- */
static void skip_blank(parser *ps)
{
    while (ps->p < ps->end && (*ps->p == ' ' || *ps->p == '\t'))
        ps->p++;
}

static void skip_comment(parser *ps)
{
    if (ps->p < ps->end && *ps->p == '#')
        while (ps->p < ps->end && *ps->p != '\n')
            ps->p++;
}

/* Blanks, comments and newlines (inside arrays and inline tables). */
static void skip_space(parser *ps)
{
    for (;;) {
        skip_blank(ps);
        skip_comment(ps);
        if (ps->p < ps->end && (*ps->p == '\n' || (*ps->p == '\r' && ps->p + 1 < ps->end && ps->p[1] == '\n'))) {
            ps->p += *ps->p == '\r' ? 2 : 1;
            ps->line++;
            continue;
        }
        return;
    }
}

/* The rest of the line must be blank or a comment. */
static int end_of_line(parser *ps)
{
    skip_blank(ps);
    skip_comment(ps);
    if (ps->p < ps->end && *ps->p == '\r')
        ps->p++;
    if (ps->p < ps->end && *ps->p != '\n')
        return fail(ps, "unexpected %c", *ps->p);
    if (ps->p < ps->end) {
        ps->p++;
        ps->line++;
    }
    return 0;
}

static void put_utf8(char *out, size_t *o, unsigned long cp)
{
    if (cp < 0x80) {
        out[(*o)++] = (char)cp;
    } else if (cp < 0x800) {
        out[(*o)++] = (char)(0xc0 | cp >> 6);
        out[(*o)++] = (char)(0x80 | (cp & 0x3f));
    } else if (cp < 0x10000) {
        out[(*o)++] = (char)(0xe0 | cp >> 12);
        out[(*o)++] = (char)(0x80 | (cp >> 6 & 0x3f));
        out[(*o)++] = (char)(0x80 | (cp & 0x3f));
    } else {
        out[(*o)++] = (char)(0xf0 | cp >> 18);
        out[(*o)++] = (char)(0x80 | (cp >> 12 & 0x3f));
        out[(*o)++] = (char)(0x80 | (cp >> 6 & 0x3f));
        out[(*o)++] = (char)(0x80 | (cp & 0x3f));
    }
}

/* A one-line string, basic ("..." with escapes) or literal ('...'), at p. */
static int parse_string(parser *ps, char **out)
{
    char quote = *ps->p++;
    const char *start = ps->p;
    while (ps->p < ps->end && *ps->p != quote && *ps->p != '\n') {
        if (quote == '"' && *ps->p == '\\' && ps->p + 1 < ps->end)
            ps->p++;
        ps->p++;
    }
    if (ps->p >= ps->end || *ps->p != quote)
        return fail(ps, "unterminated string");
    size_t n = (size_t)(ps->p - start), o = 0;
    ps->p++;
    char *s = malloc(n + 1);
    if (!s)
        return fail(ps, "out of memory");
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)start[i];
        if ((c < 0x20 && c != '\t') || c == 0x7f) {
            free(s);
            return fail(ps, "control character in a string");
        }
        if (quote == '\'' || c != '\\') {
            s[o++] = (char)c;
            continue;
        }
        c = (unsigned char)start[++i];
        const char *simple = strchr("b\bt\tn\nf\fr\r\"\"\\\\", c);
        if (c && simple && (simple - "b\bt\tn\nf\fr\r\"\"\\\\") % 2 == 0) {
            s[o++] = simple[1];
        } else if (c == 'u' || c == 'U') {
            size_t digits = c == 'u' ? 4 : 8;
            char hex[9] = {0};
            unsigned long cp;
            char *stop;
            if (i + digits >= n) {
                free(s);
                return fail(ps, "bad \\%c escape", c);
            }
            memcpy(hex, start + i + 1, digits);
            cp = strtoul(hex, &stop, 16);
            if (*stop || strlen(hex) != digits || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) {
                free(s);
                return fail(ps, "bad \\%c escape", c);
            }
            put_utf8(s, &o, cp);          /* at most 4 bytes for 5 or 9 read */
            i += digits;
        } else {
            free(s);
            return fail(ps, "unknown escape \\%c", c ? c : '0');
        }
    }
    s[o] = 0;
    if (!pd_utf8_valid(s, o)) {
        free(s);
        return fail(ps, "string is not valid UTF-8");
    }
    *out = s;
    return 0;
}

/* A bare or quoted key; a dotted key is refused (no section we read has one). */
static int parse_key(parser *ps, char **out)
{
    skip_blank(ps);
    if (ps->p < ps->end && (*ps->p == '"' || *ps->p == '\''))
        return parse_string(ps, out);
    const char *start = ps->p;
    while (ps->p < ps->end && (isalnum((unsigned char)*ps->p) || *ps->p == '_' || *ps->p == '-'))
        ps->p++;
    if (ps->p == start)
        return fail(ps, "expected a key");
    *out = strndup(start, (size_t)(ps->p - start));
    return *out ? 0 : fail(ps, "out of memory");
}

/* A scalar that is neither string nor array: integer, float, boolean, or
 * something else TOML has (a date), kept as V_OTHER. */
static int parse_scalar(parser *ps, value *v)
{
    const char *start = ps->p;
    while (ps->p < ps->end && !strchr(" \t\r\n,]}#", *ps->p))
        ps->p++;
    size_t n = (size_t)(ps->p - start);
    char tok[128], clean[128];
    size_t o = 0;
    if (n == 0)
        return fail(ps, "expected a value");
    if (n >= sizeof tok) {
        v->type = V_OTHER;
        return 0;
    }
    memcpy(tok, start, n);
    tok[n] = 0;
    if (!strcmp(tok, "true") || !strcmp(tok, "false")) {
        v->type = V_BOOL;
        v->i = tok[0] == 't';
        return 0;
    }
    for (size_t i = 0; i < n; i++)       /* underscores only between digits */
        if (tok[i] != '_')
            clean[o++] = tok[i];
        else if (!i || i + 1 == n || !isxdigit((unsigned char)tok[i - 1]) || !isxdigit((unsigned char)tok[i + 1]))
            return fail(ps, "bad number %s", tok);
    clean[o] = 0;
    char *stop;
    errno = 0;
    const char *digits = clean + (clean[0] == '+' || clean[0] == '-');
    if (digits[0] == '0' && digits[1] && strchr("xob", digits[1]) && digits == clean) {
        v->type = V_INT;
        v->i = strtoll(digits + 2, &stop, digits[1] == 'x' ? 16 : digits[1] == 'o' ? 8 : 2);
    } else if (strpbrk(clean, ".eE") || strstr(clean, "inf") || strstr(clean, "nan")) {
        if (!isdigit((unsigned char)digits[0]) && strcmp(digits, "inf") && strcmp(digits, "nan"))
            return fail(ps, "bad number %s", tok);
        v->type = V_FLOAT;
        v->f = strtod(clean, &stop);
    } else if (isdigit((unsigned char)digits[0])) {
        if (digits[0] == '0' && digits[1] && isdigit((unsigned char)digits[1])) {
            v->type = V_OTHER;           /* a date, or a leading zero TOML refuses: not ours */
            return 0;
        }
        v->type = V_INT;
        v->i = strtoll(clean, &stop, 10);
    } else {
        return fail(ps, "unsupported value %s", tok);
    }
    if (*stop) {
        v->type = V_OTHER;               /* 1979-05-27, 07:32:00, ... */
        return 0;
    }
    if (errno == ERANGE)
        return fail(ps, "number out of range: %s", tok);
    return 0;
}

static int parse_value(parser *ps, value *v, int depth);

/* A multi-line string ("""...""" or '''...'''): skipped, kept as V_OTHER. */
static int skip_multiline_string(parser *ps, value *v)
{
    char quote = *ps->p;
    ps->p += 3;
    while (ps->p + 2 < ps->end) {
        if (*ps->p == '\n')
            ps->line++;
        if (quote == '"' && *ps->p == '\\') {
            ps->p += 2;
            continue;
        }
        if (ps->p[0] == quote && ps->p[1] == quote && ps->p[2] == quote) {
            ps->p += 3;
            while (ps->p < ps->end && *ps->p == quote)   /* up to two quotes of the content */
                ps->p++;
            v->type = V_OTHER;
            return 0;
        }
        ps->p++;
    }
    return fail(ps, "unterminated multi-line string");
}

/* [a, b, ...]: V_ARRAY when every item is a string, else V_OTHER. */
static int parse_array(parser *ps, value *v, int depth)
{
    ps->p++;
    v->type = V_ARRAY;
    for (;;) {
        skip_space(ps);
        if (ps->p >= ps->end)
            return fail(ps, "unterminated array");
        if (*ps->p == ']') {
            ps->p++;
            return 0;
        }
        value item = {0};
        if (parse_value(ps, &item, depth + 1) < 0)
            return -1;
        if (item.type == V_STR && v->type == V_ARRAY && v->n < CONF_ITEMS_MAX) {
            char **grown = realloc(v->items, sizeof *grown * (size_t)(v->n + 1));
            if (!grown) {
                value_free(&item);
                return fail(ps, "out of memory");
            }
            v->items = grown;
            v->items[v->n++] = item.s;
        } else {
            v->type = V_OTHER;
            value_free(&item);
        }
        skip_space(ps);
        if (ps->p < ps->end && *ps->p == ',')
            ps->p++;
        else if (ps->p < ps->end && *ps->p != ']')
            return fail(ps, "expected , or ] in an array");
    }
}

/* Keeps `key = item` in the inline table v (V_TABLE); a key given twice or
 * no memory makes v V_OTHER (refused where a table is wanted). */
static void table_add(value *v, char *key, value *item)
{
    for (int k = 0; v->type == V_TABLE && k < v->nt; k++)
        if (!strcmp(v->tkeys[k], key))
            v->type = V_OTHER;
    char **keys = v->type == V_TABLE ? realloc(v->tkeys, sizeof *keys * (size_t)(v->nt + 1)) : NULL;
    if (keys)
        v->tkeys = keys;
    value *vals = keys ? realloc(v->tvals, sizeof *vals * (size_t)(v->nt + 1)) : NULL;
    if (!vals) {
        v->type = V_OTHER;
        free(key);
        value_free(item);
        return;
    }
    v->tvals = vals;
    v->tkeys[v->nt] = key;
    v->tvals[v->nt++] = *item;
}

/* { k = v, ... }: V_TABLE with its items, or V_OTHER when a key is dotted. */
static int parse_inline_table(parser *ps, value *v, int depth)
{
    ps->p++;
    v->type = V_TABLE;
    for (;;) {
        skip_blank(ps);
        if (ps->p < ps->end && *ps->p == '}') {
            ps->p++;
            return 0;
        }
        char *key, *more;
        if (parse_key(ps, &key) < 0)
            return -1;
        skip_blank(ps);
        while (ps->p < ps->end && *ps->p == '.') {    /* dotted keys are fine in what we skip */
            ps->p++;
            v->type = V_OTHER;
            if (parse_key(ps, &more) < 0) {
                free(key);
                return -1;
            }
            free(more);
            skip_blank(ps);
        }
        if (ps->p >= ps->end || *ps->p != '=') {
            free(key);
            return fail(ps, "expected = in an inline table");
        }
        ps->p++;
        value item = {0};
        if (parse_value(ps, &item, depth + 1) < 0) {
            free(key);
            value_free(&item);
            return -1;
        }
        table_add(v, key, &item);
        skip_blank(ps);
        if (ps->p < ps->end && *ps->p == ',')
            ps->p++;
        else if (ps->p >= ps->end || *ps->p != '}')
            return fail(ps, "expected , or } in an inline table");
    }
}

static int parse_value(parser *ps, value *v, int depth)
{
    if (depth > 32)
        return fail(ps, "values nested too deep");
    skip_blank(ps);
    if (ps->p >= ps->end)
        return fail(ps, "expected a value");
    char c = *ps->p;
    if ((c == '"' || c == '\'') && ps->end - ps->p >= 3 && ps->p[1] == c && ps->p[2] == c)
        return skip_multiline_string(ps, v);
    if (c == '"' || c == '\'') {
        v->type = V_STR;
        return parse_string(ps, &v->s);
    }
    if (c == '[')
        return parse_array(ps, v, depth);
    if (c == '{')
        return parse_inline_table(ps, v, depth);
    return parse_scalar(ps, v);
}

/* ---- the file --------------------------------------------------------------- */
static int known(const char *const *keys, const char *key)
{
    for (; *keys; keys++)
        if (!strcmp(*keys, key))
            return 1;
    return 0;
}

/* The sections we read, in this order. */
static const char *const SECTION_NAMES[3] = {"delivery", "placement", "hosts"};

/* [name] or [[name]] at p: the section it opens, or NULL for one we skip. */
static int parse_header(parser *ps, section *const secs[3], section **cur)
{
    int array = ps->end - ps->p >= 2 && ps->p[1] == '[';
    ps->p += array ? 2 : 1;
    char name[128] = "";
    size_t o = 0;
    for (;;) {
        char *part;
        if (parse_key(ps, &part) < 0)
            return -1;
        int fits = o + strlen(part) + 2 < sizeof name;
        if (fits)
            o += (size_t)snprintf(name + o, sizeof name - o, "%s%s", o ? "." : "", part);
        free(part);
        skip_blank(ps);
        if (ps->p < ps->end && *ps->p == '.') {
            ps->p++;
            continue;
        }
        break;
    }
    if (ps->end - ps->p < (array ? 2 : 1) || *ps->p != ']' || (array && ps->p[1] != ']'))
        return fail(ps, "bad table header");
    ps->p += array ? 2 : 1;
    *cur = NULL;
    if (!strncmp(name, "delivery.", 9) || !strncmp(name, "placement.", 10) || !strncmp(name, "hosts.", 6))
        return fail(ps, "[%s]: [%.*s] has no sub-tables (write each host on one line)", name,
                    (int)strcspn(name, "."), name);
    for (int k = 0; k < 3; k++)
        if (!strcmp(name, SECTION_NAMES[k]))
            *cur = secs[k];
    if (*cur && array)
        return fail(ps, "[[%s]]: [%s] must be a table", name, name);
    if (*cur && (*cur)->seen++)
        return fail(ps, "[%s] defined twice", name);
    return end_of_line(ps);
}

/* key = value inside `cur` (NULL: a section we skip). */
static int parse_entry(parser *ps, section *cur, const char *name)
{
    char *key;
    if (parse_key(ps, &key) < 0)
        return -1;
    skip_blank(ps);
    int dotted = 0;
    while (ps->p < ps->end && *ps->p == '.') {
        char *more;
        ps->p++;
        dotted = 1;
        if (parse_key(ps, &more) < 0) {
            free(key);
            return -1;
        }
        free(more);
        skip_blank(ps);
    }
    int line = ps->line;
    if (ps->p >= ps->end || *ps->p != '=') {
        free(key);
        return fail(ps, "expected = after a key");
    }
    ps->p++;
    value v = {0};
    if (parse_value(ps, &v, 0) < 0 || end_of_line(ps) < 0) {
        free(key);
        value_free(&v);
        return -1;
    }
    if (!cur) {
        free(key);
        value_free(&v);
        return 0;
    }
    int rc = 0;
    if (dotted)
        rc = fail(ps, "[%s] %s: dotted keys are not used here", name, key);
    for (int k = 0; !rc && k < cur->n; k++)
        if (!strcmp(cur->e[k].key, key))
            rc = fail(ps, "[%s] %s given twice", name, key);
    if (!rc && cur->n == cur->max)
        rc = fail(ps, "[%s]: too many keys", name);
    if (!rc && cur->n == cur->cap) {
        int cap = cur->cap ? cur->cap * 2 : 16;
        entry *grown = realloc(cur->e, sizeof *grown * (size_t)cap);
        if (grown)
            cur->e = grown, cur->cap = cap;
        else
            rc = fail(ps, "out of memory");
    }
    if (rc) {
        free(key);
        value_free(&v);
        return -1;
    }
    cur->e[cur->n++] = (entry){key, v, line};
    return 0;
}

static int parse_file(parser *ps, section *const secs[3])
{
    section *cur = NULL;
    const char *name = "";
    while (ps->p < ps->end) {
        skip_space(ps);
        if (ps->p >= ps->end)
            break;
        if (*ps->p == '[') {
            if (parse_header(ps, secs, &cur) < 0)
                return -1;
            for (int k = 0; k < 3; k++)
                if (cur == secs[k])
                    name = SECTION_NAMES[k];
        } else if (parse_entry(ps, cur, name) < 0) {
            return -1;
        }
    }
    return 0;
}

/* ---- typed settings ------------------------------------------------------------ */
static int conf_error(char *err, size_t cap, const char *path, const entry *e, const char *sec, const char *want)
{
    snprintf(err, cap, "%s: line %d: [%s] %s must be %s", path, e->line, sec, e->key, want);
    return -1;
}

/* The [delivery] keys pdelivery uses, with their types and bounds. */
enum { K_INT, K_SECONDS, K_STRING };
typedef struct {
    const char *key;
    int kind;
    size_t offset;                 /* in pd_conf */
    long min, max;                 /* K_INT; K_STRING: max = buffer size */
    const char *want;
} typed_key;

#define AT(field) offsetof(pd_conf, field)
static const typed_key TYPED[] = {
    {"lmtp_port", K_INT, AT(lmtp_port), 1, 65535, "a port, 1 to 65535"},
    {"connect_timeout", K_SECONDS, AT(connect_timeout), 0, 0, "a number of seconds > 0"},
    {"timeout", K_SECONDS, AT(timeout), 0, 0, "a number of seconds > 0"},
    {"mailhost_suffix", K_STRING, AT(mailhost_suffix), 0, 64, "a string of at most 63 bytes"},
    {"recipient_delimiter", K_STRING, AT(recipient_delimiter), 0, 16, "a string of at most 15 bytes"},
    {"message_size_max", K_INT, AT(message_size_max), 1, 1L << 40, "an integer >= 1"},
    {"message_line_max", K_INT, AT(message_line_max), 1, 1L << 40, "an integer >= 1"},
    {"recipients_max", K_INT, AT(recipients_max), 1, 1L << 30, "an integer >= 1"},
    {"command_line_max", K_INT, AT(command_line_max), 1, 1L << 30, "an integer >= 1"},
    {"bad_commands_max", K_INT, AT(bad_commands_max), 1, 1L << 30, "an integer >= 1"},
};

static int take(const typed_key *t, const value *v, pd_conf *c)
{
    char *field = (char *)c + t->offset;
    if (t->kind == K_INT) {
        if (v->type != V_INT || v->i < t->min || v->i > t->max)
            return -1;
        *(long *)field = (long)v->i;
    } else if (t->kind == K_SECONDS) {
        double x = v->type == V_INT ? (double)v->i : v->type == V_FLOAT ? v->f : -1;
        if (!(x > 0) || !isfinite(x))
            return -1;
        *(double *)field = x;
    } else {
        if (v->type != V_STR || strlen(v->s) >= (size_t)t->max)
            return -1;
        strcpy(field, v->s);
    }
    return 0;
}

static int apply_delivery(const section *s, pd_conf *c, const char *path, char *err, size_t cap)
{
    for (int k = 0; k < s->n; k++) {
        const entry *e = &s->e[k];
        if (!known(DELIVERY_KEYS, e->key)) {
            snprintf(err, cap, "%s: line %d: unknown key in [delivery]: %s", path, e->line, e->key);
            return -1;
        }
        for (size_t t = 0; t < sizeof TYPED / sizeof TYPED[0]; t++)
            if (!strcmp(TYPED[t].key, e->key) && take(&TYPED[t], &e->v, c) < 0)
                return conf_error(err, cap, path, e, "delivery", TYPED[t].want);
    }
    return 0;
}

/* pwcache/placement.py's _check_host: 1 to 255 bytes, no space. */
static int usable_host(const char *host, size_t n)
{
    if (n == 0 || n > PWPL_MAX_HOST_LEN)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (isspace((unsigned char)host[i]))
            return 0;
    return 1;
}

/* The index of a "ranges" host (each named once), added if new. */
static int range_host(pwpl_rule *r, const char *host, size_t n)
{
    if (!usable_host(host, n))
        return -1;
    for (int k = 0; k < pwpl_nhosts(r); k++) {
        size_t kn;
        const char *known_host = pwpl_host(r, k, &kn);
        if (kn == n && !memcmp(known_host, host, n))
            return k;
    }
    return pwpl_add_host(r, host, n, 1.0);
}

static int placement_entry(pwpl_rule *r, int kind, const char *item)
{
    if (kind == PWPL_HASH) {
        const char *colon = strrchr(item, ':');
        double w = 1.0;
        if (colon) {
            char *stop;
            w = strtod(colon + 1, &stop);
            if (stop == colon + 1 || *stop || !(w > 0) || !isfinite(w))
                return -1;
        }
        size_t n = colon ? (size_t)(colon - item) : strlen(item);
        return !usable_host(item, n) || pwpl_add_host(r, item, n, w) < 0 ? -1 : 0;   /* _parse_weighted */
    }
    /* "FIRST-LAST HOST" or "L HOST" */
    char letters[8], host[PWPL_MAX_HOST_LEN + 2], extra;
    if (sscanf(item, " %7s %256s %c", letters, host, &extra) != 2)
        return -1;
    size_t ln = strlen(letters);
    if (!(ln == 1 || (ln == 3 && letters[1] == '-')))
        return -1;
    int a = tolower((unsigned char)letters[0]), b = tolower((unsigned char)letters[ln - 1]);
    if (a > 127 || b > 127 || a > b)
        return -1;
    int h = range_host(r, host, strlen(host));
    return h < 0 || pwpl_add_range(r, a, b, h) < 0 ? -1 : 0;
}

static int apply_placement(const section *s, pd_conf *c, const char *path, char *err, size_t cap)
{
    const entry *rule = NULL, *list[2] = {NULL, NULL};     /* ranges, hosts */
    for (int k = 0; k < s->n; k++) {
        const entry *e = &s->e[k];
        if (!known(PLACEMENT_KEYS, e->key)) {
            snprintf(err, cap, "%s: line %d: unknown key in [placement]: %s", path, e->line, e->key);
            return -1;
        }
        if (!strcmp(e->key, "rule"))
            rule = e;
        else
            list[strcmp(e->key, "ranges") != 0] = e;
        if (e->v.type != V_ARRAY && strcmp(e->key, "rule"))
            return conf_error(err, cap, path, e, "placement", "a list of strings");
    }
    int kind = PWPL_RANGES;
    if (rule) {
        if (rule->v.type != V_STR || (strcmp(rule->v.s, "ranges") && strcmp(rule->v.s, "hash")))
            return conf_error(err, cap, path, rule, "placement", "'ranges' or 'hash'");
        kind = strcmp(rule->v.s, "hash") ? PWPL_RANGES : PWPL_HASH;
    }
    pwpl_free(c->placement);
    c->placement = pwpl_new(kind);
    if (!c->placement) {
        snprintf(err, cap, "%s: out of memory", path);
        return -1;
    }
    const entry *used = list[kind == PWPL_HASH];
    for (int k = 0; used && k < used->v.n; k++)
        if (placement_entry(c->placement, kind, used->v.items[k]) < 0) {
            char shown[128];
            snprintf(err, cap, "%s: line %d: [placement] %s: bad entry %s", path, used->line, used->key,
                     pd_shown(used->v.items[k], shown, sizeof shown));
            return -1;
        }
    return 0;
}

/* One [hosts] entry: "ADDRESS" or { address = "ADDRESS", lmtp = PORT, pop = PORT, imap = PORT }
 * (hostmap._entry's checks; pop and imap are checked, pdelivery uses lmtp). */
static int usable_address(const value *v)
{
    return v->type == V_STR && usable_host(v->s, strlen(v->s)) && strlen(v->s) < PD_HOST_MAX;
}

static int host_entry(const entry *e, pd_host *h, const char *path, char *err, size_t cap)
{
    char shown[128];
    pd_shown(e->key, shown, sizeof shown);
    if (!usable_host(e->key, strlen(e->key)) || strlen(e->key) >= sizeof shown) {
        snprintf(err, cap, "%s: line %d: [hosts] %s: not a host name", path, e->line, shown);
        return -1;
    }
    snprintf(shown, sizeof shown, "%s", e->key);      /* no space in it: shown as it is */
    snprintf(h->name, sizeof h->name, "%s", e->key);
    h->lmtp_port = 0;
    const value *address = e->v.type == V_STR ? &e->v : NULL;
    if (e->v.type != V_STR && e->v.type != V_TABLE) {
        snprintf(err, cap, "%s: line %d: [hosts] %s must be an address or { address = ..., lmtp = PORT, ... }",
                 path, e->line, shown);
        return -1;
    }
    for (int k = 0; e->v.type == V_TABLE && k < e->v.nt; k++) {
        const char *key = e->v.tkeys[k];
        const value *item = &e->v.tvals[k];
        if (!strcmp(key, "address")) {
            address = item;
        } else if (!strcmp(key, "lmtp") || !strcmp(key, "pop") || !strcmp(key, "imap")) {
            if (item->type != V_INT || item->i < 1 || item->i > 65535) {
                snprintf(err, cap, "%s: line %d: [hosts] %s.%s must be a port, 1 to 65535", path, e->line, shown, key);
                return -1;
            }
            if (key[0] == 'l')
                h->lmtp_port = (long)item->i;
        } else {
            char shown_key[64];
            snprintf(err, cap, "%s: line %d: unknown key in [hosts] %s: %s", path, e->line, shown,
                     pd_shown(key, shown_key, sizeof shown_key));
            return -1;
        }
    }
    if (!address || !usable_address(address)) {
        snprintf(err, cap, "%s: line %d: [hosts] %s.address must be an address (a name or an IP, no port, no spaces)",
                 path, e->line, shown);
        return -1;
    }
    snprintf(h->address, sizeof h->address, "%s", address->s);
    return 0;
}

static int apply_hosts(const section *s, pd_conf *c, const char *path, char *err, size_t cap)
{
    if (!s->n)
        return 0;
    c->hosts = calloc((size_t)s->n, sizeof *c->hosts);
    if (!c->hosts) {
        snprintf(err, cap, "%s: out of memory", path);
        return -1;
    }
    for (int k = 0; k < s->n; k++) {
        if (host_entry(&s->e[k], &c->hosts[k], path, err, cap) < 0)
            return -1;
        c->nhosts++;
    }
    return 0;
}

static void defaults(pd_conf *c)
{
    memset(c, 0, sizeof *c);
    c->lmtp_port = 24;
    c->connect_timeout = 10.0;
    c->timeout = 300.0;
    strcpy(c->recipient_delimiter, "+");
    c->message_size_max = 50L * 1024 * 1024;     /* delivery/lmtp.py's limits */
    c->message_line_max = 64L * 1024;
    c->recipients_max = 1000;
    c->command_line_max = 2048;
    c->bad_commands_max = 20;
}

static void section_free(section *s)
{
    for (int k = 0; k < s->n; k++) {
        free(s->e[k].key);
        value_free(&s->e[k].v);
    }
    free(s->e);
}

int pd_conf_load(const char *path, pd_conf *c, char *err, size_t errcap)
{
    defaults(c);
    err[0] = 0;
    if (!path || !*path)
        path = getenv("PWMAIL_CONF");
    if (!path || !*path)
        path = "/etc/pwmail.toml";
    FILE *f = fopen(path, "rb");
    char *text = NULL;
    size_t len = 0;
    if (!f && errno != ENOENT) {
        snprintf(err, errcap, "%s: %s", path, strerror(errno));
        return -1;
    }
    if (f) {
        text = malloc(CONF_FILE_MAX + 1);
        len = text ? fread(text, 1, CONF_FILE_MAX + 1, f) : 0;
        int bad = !text || ferror(f) || len > CONF_FILE_MAX;
        fclose(f);
        if (bad) {
            snprintf(err, errcap, "%s: %s", path, !text ? "out of memory" : len > CONF_FILE_MAX ? "too large" : "read error");
            free(text);
            return -1;
        }
    }
    section delivery = {.max = CONF_KEYS_MAX}, placement = {.max = CONF_KEYS_MAX}, hosts = {.max = CONF_HOSTS_MAX};
    section *const secs[3] = {&delivery, &placement, &hosts};
    parser ps = {path, text, text + len, 1, err, errcap};
    int rc = 0;
    if (text && (memchr(text, 0, len) || !pd_utf8_valid(text, len))) {
        snprintf(err, errcap, "%s: not UTF-8 text", path);
        rc = -1;
    }
    if (!rc && text)
        rc = parse_file(&ps, secs);
    if (!rc)
        rc = apply_delivery(&delivery, c, path, err, errcap);
    if (!rc)
        rc = apply_placement(&placement, c, path, err, errcap);
    if (!rc)
        rc = apply_hosts(&hosts, c, path, err, errcap);
    section_free(&delivery);
    section_free(&placement);
    section_free(&hosts);
    free(text);
    return rc;
}

void pd_conf_free(pd_conf *c)
{
    pwpl_free(c->placement);
    c->placement = NULL;
    free(c->hosts);
    c->hosts = NULL;
    c->nhosts = 0;
}
