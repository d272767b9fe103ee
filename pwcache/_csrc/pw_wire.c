/*
 * pw_wire.c - msgpack subset and the pwserver messages (docs/protocol.md).
 *
 * Only what the protocol uses: nil, bool, ints, str, bin, array, map.
 * Floats and ext types are rejected by the getters (and skipped by
 * pwp_skip only so that extra padding elements cannot break a reader).
 */
#include "pw_wire.h"

#include <string.h>

/* ---- writer ------------------------------------------------------------ */

void pwp_init(pwp_buf *b, void *data, size_t cap)
{
    b->data = data;
    b->len = 0;
    b->cap = cap;
    b->overflow = 0;
}

void pwp_put_raw(pwp_buf *b, const void *p, size_t n)
{
    if (b->overflow || n > b->cap - b->len) {
        b->overflow = 1;
        return;
    }
    if (n)
        memcpy(b->data + b->len, p, n);
    b->len += n;
}

static void put_be(pwp_buf *b, uint8_t tag, uint64_t v, int bytes)
{
    uint8_t tmp[9];
    tmp[0] = tag;
    for (int i = 0; i < bytes; i++)
        tmp[1 + i] = (uint8_t)(v >> (8 * (bytes - 1 - i)));
    pwp_put_raw(b, tmp, 1 + (size_t)bytes);
}

void pwp_put_nil(pwp_buf *b)
{
    uint8_t c = 0xc0;
    pwp_put_raw(b, &c, 1);
}

void pwp_put_bool(pwp_buf *b, int v)
{
    uint8_t c = v ? 0xc3 : 0xc2;
    pwp_put_raw(b, &c, 1);
}

void pwp_put_uint(pwp_buf *b, uint64_t v)
{
    if (v < 0x80) {
        uint8_t c = (uint8_t)v;
        pwp_put_raw(b, &c, 1);
    } else if (v <= 0xff) {
        put_be(b, 0xcc, v, 1);
    } else if (v <= 0xffff) {
        put_be(b, 0xcd, v, 2);
    } else if (v <= 0xffffffffu) {
        put_be(b, 0xce, v, 4);
    } else {
        put_be(b, 0xcf, v, 8);
    }
}

void pwp_put_int(pwp_buf *b, int64_t v)
{
    if (v >= 0) {
        pwp_put_uint(b, (uint64_t)v);
    } else if (v >= -32) {
        uint8_t c = (uint8_t)(int8_t)v;
        pwp_put_raw(b, &c, 1);
    } else if (v >= INT8_MIN) {
        put_be(b, 0xd0, (uint64_t)v, 1);
    } else if (v >= INT16_MIN) {
        put_be(b, 0xd1, (uint64_t)v, 2);
    } else if (v >= INT32_MIN) {
        put_be(b, 0xd2, (uint64_t)v, 4);
    } else {
        put_be(b, 0xd3, (uint64_t)v, 8);
    }
}

void pwp_put_str(pwp_buf *b, const char *s, size_t n)
{
    if (n < 32) {
        uint8_t c = (uint8_t)(0xa0 | n);
        pwp_put_raw(b, &c, 1);
    } else if (n <= 0xff) {
        put_be(b, 0xd9, n, 1);
    } else if (n <= 0xffff) {
        put_be(b, 0xda, n, 2);
    } else {
        put_be(b, 0xdb, n, 4);
    }
    pwp_put_raw(b, s, n);
}

void pwp_put_bin(pwp_buf *b, const void *p, size_t n)
{
    if (n <= 0xff)
        put_be(b, 0xc4, n, 1);
    else if (n <= 0xffff)
        put_be(b, 0xc5, n, 2);
    else
        put_be(b, 0xc6, n, 4);
    pwp_put_raw(b, p, n);
}

void pwp_put_array(pwp_buf *b, uint32_t n)
{
    if (n < 16) {
        uint8_t c = (uint8_t)(0x90 | n);
        pwp_put_raw(b, &c, 1);
    } else if (n <= 0xffff) {
        put_be(b, 0xdc, n, 2);
    } else {
        put_be(b, 0xdd, n, 4);
    }
}

void pwp_put_map(pwp_buf *b, uint32_t n)
{
    if (n < 16) {
        uint8_t c = (uint8_t)(0x80 | n);
        pwp_put_raw(b, &c, 1);
    } else if (n <= 0xffff) {
        put_be(b, 0xde, n, 2);
    } else {
        put_be(b, 0xdf, n, 4);
    }
}

/* ---- reader ------------------------------------------------------------ */

void pwp_reader_init(pwp_reader *r, const void *data, size_t len)
{
    r->p = data;
    r->end = r->p + len;
}

static int avail(const pwp_reader *r, size_t n)
{
    return (size_t)(r->end - r->p) >= n;
}

static uint64_t get_be(const uint8_t *p, int bytes)
{
    uint64_t v = 0;
    for (int i = 0; i < bytes; i++)
        v = (v << 8) | p[i];
    return v;
}

int pwp_peek_nil(const pwp_reader *r)
{
    return avail(r, 1) && r->p[0] == 0xc0;
}

int pwp_get_nil(pwp_reader *r)
{
    if (!pwp_peek_nil(r))
        return -1;
    r->p++;
    return 0;
}

int pwp_get_bool(pwp_reader *r, int *v)
{
    if (!avail(r, 1) || (r->p[0] != 0xc2 && r->p[0] != 0xc3))
        return -1;
    *v = r->p[0] == 0xc3;
    r->p++;
    return 0;
}

/* Reads any msgpack integer as a signed 64-bit value plus a flag telling
 * whether it was a uint64 above INT64_MAX. */
static int get_integer(pwp_reader *r, int64_t *sv, uint64_t *uv, int *is_neg)
{
    if (!avail(r, 1))
        return -1;
    uint8_t c = r->p[0];
    int bytes = 0, sign = 0;
    if (c < 0x80) {
        *uv = c;
        *sv = c;
        *is_neg = 0;
        r->p++;
        return 0;
    }
    if (c >= 0xe0) {
        *sv = (int8_t)c;
        *uv = 0;
        *is_neg = 1;
        r->p++;
        return 0;
    }
    switch (c) {
    case 0xcc: bytes = 1; break;
    case 0xcd: bytes = 2; break;
    case 0xce: bytes = 4; break;
    case 0xcf: bytes = 8; break;
    case 0xd0: bytes = 1; sign = 1; break;
    case 0xd1: bytes = 2; sign = 1; break;
    case 0xd2: bytes = 4; sign = 1; break;
    case 0xd3: bytes = 8; sign = 1; break;
    default: return -1;
    }
    if (!avail(r, 1 + (size_t)bytes))
        return -1;
    uint64_t raw = get_be(r->p + 1, bytes);
    if (sign) {
        int64_t v;
        switch (bytes) {
        case 1: v = (int8_t)raw; break;
        case 2: v = (int16_t)raw; break;
        case 4: v = (int32_t)raw; break;
        default: v = (int64_t)raw; break;
        }
        *sv = v;
        *uv = (uint64_t)v;
        *is_neg = v < 0;
    } else {
        *uv = raw;
        *sv = (int64_t)raw;
        *is_neg = 0;
    }
    r->p += 1 + bytes;
    return 0;
}

int pwp_get_uint(pwp_reader *r, uint64_t *v)
{
    pwp_reader save = *r;
    int64_t sv;
    uint64_t uv;
    int neg;
    if (get_integer(r, &sv, &uv, &neg) < 0)
        return -1;
    if (neg) {
        *r = save;
        return -1;
    }
    *v = uv;
    return 0;
}

int pwp_get_int(pwp_reader *r, int64_t *v)
{
    pwp_reader save = *r;
    int64_t sv;
    uint64_t uv;
    int neg;
    if (get_integer(r, &sv, &uv, &neg) < 0)
        return -1;
    if (!neg && uv > (uint64_t)INT64_MAX) {
        *r = save;
        return -1;
    }
    *v = sv;
    return 0;
}

/* Reads a length-prefixed object header; returns the payload length. */
static int get_len_header(pwp_reader *r, uint8_t fix_base, uint8_t fix_mask,
                          uint8_t t8, uint8_t t16, uint8_t t32,
                          uint32_t *n, size_t *hdr)
{
    if (!avail(r, 1))
        return -1;
    uint8_t c = r->p[0];
    if (fix_mask && (c & (uint8_t)~fix_mask) == fix_base) {
        *n = c & fix_mask;
        *hdr = 1;
        return 0;
    }
    int bytes;
    if (t8 && c == t8)
        bytes = 1;
    else if (c == t16)
        bytes = 2;
    else if (c == t32)
        bytes = 4;
    else
        return -1;
    if (!avail(r, 1 + (size_t)bytes))
        return -1;
    *n = (uint32_t)get_be(r->p + 1, bytes);
    *hdr = 1 + (size_t)bytes;
    return 0;
}

int pwp_get_str(pwp_reader *r, const char **s, uint32_t *n)
{
    size_t hdr;
    if (get_len_header(r, 0xa0, 0x1f, 0xd9, 0xda, 0xdb, n, &hdr) < 0)
        return -1;
    if (!avail(r, hdr + *n))
        return -1;
    *s = (const char *)r->p + hdr;
    r->p += hdr + *n;
    return 0;
}

int pwp_get_bin(pwp_reader *r, const uint8_t **p, uint32_t *n)
{
    size_t hdr;
    if (get_len_header(r, 0, 0, 0xc4, 0xc5, 0xc6, n, &hdr) < 0)
        return -1;
    if (!avail(r, hdr + *n))
        return -1;
    *p = r->p + hdr;
    r->p += hdr + *n;
    return 0;
}

int pwp_get_array(pwp_reader *r, uint32_t *n)
{
    size_t hdr;
    if (get_len_header(r, 0x90, 0x0f, 0, 0xdc, 0xdd, n, &hdr) < 0)
        return -1;
    /* Each element takes at least one byte: refuse counts that cannot fit. */
    if (!avail(r, hdr + *n))
        return -1;
    r->p += hdr;
    return 0;
}

int pwp_get_map(pwp_reader *r, uint32_t *n)
{
    size_t hdr;
    if (get_len_header(r, 0x80, 0x0f, 0, 0xde, 0xdf, n, &hdr) < 0)
        return -1;
    if ((size_t)(r->end - r->p) - hdr < 2 * (uint64_t)*n)
        return -1;
    r->p += hdr;
    return 0;
}

static int skip_depth(pwp_reader *r, int depth)
{
    if (depth > PWP_MAX_DEPTH || !avail(r, 1))
        return -1;
    uint8_t c = r->p[0];
    const char *s;
    const uint8_t *b;
    uint32_t n;
    int64_t sv;
    uint64_t uv;
    int neg, v;
    if (c == 0xc0)
        return pwp_get_nil(r);
    if (c == 0xc2 || c == 0xc3)
        return pwp_get_bool(r, &v);
    if (get_integer(r, &sv, &uv, &neg) == 0)
        return 0;
    if (pwp_get_str(r, &s, &n) == 0 || pwp_get_bin(r, &b, &n) == 0)
        return 0;
    pwp_reader save = *r;
    if (pwp_get_array(r, &n) == 0) {
        for (uint32_t i = 0; i < n; i++)
            if (skip_depth(r, depth + 1) < 0) {
                *r = save;
                return -1;
            }
        return 0;
    }
    if (pwp_get_map(r, &n) == 0) {
        for (uint32_t i = 0; i < 2 * n; i++)
            if (skip_depth(r, depth + 1) < 0) {
                *r = save;
                return -1;
            }
        return 0;
    }
    return -1; /* floats, ext and 0xc1 are not part of the protocol */
}

int pwp_skip(pwp_reader *r)
{
    return skip_depth(r, 0);
}

/* ---- names ------------------------------------------------------------- */

/* Valid UTF-8 without NUL; `strict` also refuses ':' and newline. */
static int valid_utf8(const char *s, size_t n, int strict)
{
    const uint8_t *p = (const uint8_t *)s, *end = p + n;
    while (p < end) {
        uint8_t c = *p;
        if (!strict && end - p >= 8) {
            /* 8 ASCII bytes, none of them NUL, at once */
            uint64_t w;
            memcpy(&w, p, 8);
            if (!(w & 0x8080808080808080ull) &&
                !((w - 0x0101010101010101ull) & ~w & 0x8080808080808080ull)) {
                p += 8;
                continue;
            }
        }
        if (c < 0x80) {
            if (c == 0 || (strict && (c == ':' || c == '\n')))
                return 0;
            p++;
            continue;
        }
        int extra;
        uint32_t cp;
        if ((c & 0xe0) == 0xc0) {
            extra = 1;
            cp = c & 0x1f;
        } else if ((c & 0xf0) == 0xe0) {
            extra = 2;
            cp = c & 0x0f;
        } else if ((c & 0xf8) == 0xf0) {
            extra = 3;
            cp = c & 0x07;
        } else {
            return 0;
        }
        if (end - p <= extra)
            return 0;
        for (int i = 1; i <= extra; i++) {
            if ((p[i] & 0xc0) != 0x80)
                return 0;
            cp = (cp << 6) | (p[i] & 0x3f);
        }
        /* overlong forms, surrogates and values past U+10FFFF */
        if ((extra == 1 && cp < 0x80) || (extra == 2 && cp < 0x800) ||
            (extra == 3 && cp < 0x10000) || cp > 0x10ffff ||
            (cp >= 0xd800 && cp <= 0xdfff))
            return 0;
        p += extra + 1;
    }
    return 1;
}

int pw_valid_name(const char *s, size_t n)
{
    return n > 0 && n <= PW_MAX_NAME && valid_utf8(s, n, 1);
}

int pw_valid_utf8(const char *s, size_t n)
{
    return valid_utf8(s, n, 0);
}

/* ---- requests ---------------------------------------------------------- */

int pw_op_arg_kind(int op)
{
    switch (op) {
    case PW_OP_PASSWD_BY_NAME:
    case PW_OP_GROUP_BY_NAME:
    case PW_OP_INITGROUPS:
    case PW_OP_SHADOW_BY_NAME:
    case PW_OP_MAILHOST:
        return PW_ARG_STR;
    case PW_OP_PASSWD_BY_UID:
    case PW_OP_GROUP_BY_GID:
    case PW_OP_PASSWD_ENUM:
    case PW_OP_GROUP_ENUM:
    case PW_OP_SHADOW_ENUM:
        return PW_ARG_INT;
    case PW_OP_STATS:
    case PW_OP_PING:
        return PW_ARG_NIL;
    default:
        return -1;
    }
}

int pw_encode_request(void *out, size_t cap, const pw_request *req, size_t pad_to)
{
    pwp_buf b;
    pwp_init(&b, out, cap);
    pwp_put_array(&b, pad_to ? 5 : 4);
    pwp_put_uint(&b, PW_VERSION);
    pwp_put_uint(&b, req->id);
    pwp_put_uint(&b, (uint64_t)req->op);
    switch (req->arg_kind) {
    case PW_ARG_STR:
        pwp_put_str(&b, req->name, req->name_len);
        break;
    case PW_ARG_INT:
        pwp_put_uint(&b, req->num);
        break;
    default:
        pwp_put_nil(&b);
        break;
    }
    if (pad_to) {
        /* bin header is 1 byte + 1 length byte up to 255 bytes of padding,
         * 3 bytes (0xc5) beyond that */
        size_t used = b.len, pad = 0;
        if (used + 2 < pad_to) {
            pad = pad_to - used - 2;
            if (pad > 0xff)
                pad = pad_to - used - 3;
        }
        uint8_t zeros[PW_MAX_REQUEST] = {0};
        if (pad > sizeof zeros)
            return -1;
        pwp_put_bin(&b, zeros, pad);
    }
    return b.overflow ? -1 : (int)b.len;
}

int pw_decode_request(const void *data, size_t len, pw_request *req, int *id_known)
{
    pwp_reader r;
    uint32_t n;
    uint64_t version, op;
    *id_known = 0;
    memset(req, 0, sizeof *req);
    if (len > PW_MAX_REQUEST)
        return PW_BADREQUEST;
    pwp_reader_init(&r, data, len);
    if (pwp_get_array(&r, &n) < 0 || n < 4 || n > 5)
        return PW_BADREQUEST;
    if (pwp_get_uint(&r, &version) < 0)
        return PW_BADREQUEST;
    if (pwp_get_uint(&r, &req->id) < 0)
        return PW_BADREQUEST;
    *id_known = 1;
    if (version != PW_VERSION)
        return PW_BADVERSION;
    if (pwp_get_uint(&r, &op) < 0 || op > PW_OP_MAX)
        return PW_BADREQUEST;
    req->op = (int)op;
    int kind = pw_op_arg_kind(req->op);
    if (kind < 0)
        return PW_BADREQUEST;
    req->arg_kind = kind;
    switch (kind) {
    case PW_ARG_STR:
        if (pwp_get_str(&r, &req->name, &req->name_len) < 0 ||
            !pw_valid_name(req->name, req->name_len))
            return PW_BADREQUEST;
        break;
    case PW_ARG_INT:
        if (pwp_get_uint(&r, &req->num) < 0 || req->num > PW_MAX_ID)
            return PW_BADREQUEST;
        break;
    default:
        if (pwp_get_nil(&r) < 0)
            return PW_BADREQUEST;
        break;
    }
    if (n == 5) {
        const uint8_t *pad;
        uint32_t padlen;
        if (pwp_get_bin(&r, &pad, &padlen) < 0)
            return PW_BADREQUEST;
    }
    if (r.p != r.end)
        return PW_BADREQUEST; /* trailing bytes */
    return PW_OK;
}

/* ---- answers ----------------------------------------------------------- */

void pw_put_answer_header(pwp_buf *b, uint64_t id, int status)
{
    pwp_put_array(b, 4);
    pwp_put_uint(b, PW_VERSION);
    pwp_put_uint(b, id);
    pwp_put_uint(b, (uint64_t)status);
}

int pw_get_answer_header(pwp_reader *r, uint64_t *id, int *status)
{
    pwp_reader save = *r;
    uint32_t n;
    uint64_t version, st;
    if (pwp_get_array(r, &n) < 0 || n != 4 || pwp_get_uint(r, &version) < 0 ||
        version != PW_VERSION || pwp_get_uint(r, id) < 0 ||
        pwp_get_uint(r, &st) < 0 || st > PW_UNAVAILABLE) {
        *r = save;
        return -1;
    }
    *status = (int)st;
    return 0;
}

static int get_pwstr(pwp_reader *r, pw_str *s)
{
    return pwp_get_str(r, &s->p, &s->n);
}

int pw_get_passwd(pwp_reader *r, pw_passwd_view *v)
{
    pwp_reader save = *r;
    uint32_t n;
    if (pwp_get_array(r, &n) < 0 || n != 8 || get_pwstr(r, &v->name) < 0 ||
        get_pwstr(r, &v->passwd) < 0 || pwp_get_uint(r, &v->uid) < 0 ||
        pwp_get_uint(r, &v->gid) < 0 || get_pwstr(r, &v->gecos) < 0 ||
        get_pwstr(r, &v->dir) < 0 || get_pwstr(r, &v->shell) < 0 ||
        get_pwstr(r, &v->mailhost) < 0 || v->uid > PW_MAX_ID ||
        v->gid > PW_MAX_ID) {
        *r = save;
        return -1;
    }
    return 0;
}

int pw_get_group(pwp_reader *r, pw_group_view *v)
{
    pwp_reader save = *r;
    uint32_t n;
    if (pwp_get_array(r, &n) < 0 || n != 4 || get_pwstr(r, &v->name) < 0 ||
        get_pwstr(r, &v->passwd) < 0 || pwp_get_uint(r, &v->gid) < 0 ||
        v->gid > PW_MAX_ID || pwp_get_array(r, &v->nmembers) < 0) {
        *r = save;
        return -1;
    }
    v->members = *r;
    /* Check the members now so a caller may trust pw_group_next_member. */
    for (uint32_t i = 0; i < v->nmembers; i++) {
        pw_str m;
        if (get_pwstr(r, &m) < 0) {
            *r = save;
            return -1;
        }
    }
    return 0;
}

int pw_group_next_member(pw_group_view *v, pw_str *member)
{
    if (v->nmembers == 0)
        return -1;
    if (get_pwstr(&v->members, member) < 0)
        return -1;
    v->nmembers--;
    return 0;
}

int pw_get_shadow(pwp_reader *r, pw_shadow_view *v)
{
    pwp_reader save = *r;
    uint32_t n;
    if (pwp_get_array(r, &n) < 0 || n != 9 || get_pwstr(r, &v->name) < 0 ||
        get_pwstr(r, &v->hash) < 0 || pwp_get_int(r, &v->lastchg) < 0 ||
        pwp_get_int(r, &v->min) < 0 || pwp_get_int(r, &v->max) < 0 ||
        pwp_get_int(r, &v->warn) < 0 || pwp_get_int(r, &v->inact) < 0 ||
        pwp_get_int(r, &v->expire) < 0 || pwp_get_int(r, &v->flag) < 0) {
        *r = save;
        return -1;
    }
    return 0;
}

int pw_get_mailhost(pwp_reader *r, pw_mailhost_view *v)
{
    pwp_reader save = *r;
    uint32_t n;
    if (pwp_get_array(r, &n) < 0 || n != 2 || get_pwstr(r, &v->host) < 0 ||
        pwp_get_bool(r, &v->frozen) < 0) {
        *r = save;
        return -1;
    }
    return 0;
}

int pw_get_gids(pwp_reader *r, pw_gids_view *v)
{
    pwp_reader save = *r;
    uint64_t gid;
    if (pwp_get_array(r, &v->count) < 0)
        return -1;
    v->gids = *r;
    for (uint32_t i = 0; i < v->count; i++)
        if (pwp_get_uint(r, &gid) < 0 || gid > PW_MAX_ID) {
            *r = save;
            return -1;
        }
    return 0;
}

int pw_gids_next(pw_gids_view *v, uint64_t *gid)
{
    if (v->count == 0)
        return -1;
    v->count--;
    return pwp_get_uint(&v->gids, gid); /* 0: pw_get_gids checked them all */
}

int pw_get_page(pwp_reader *r, pw_page_view *v)
{
    pwp_reader save = *r;
    uint32_t n;
    if (pwp_get_array(r, &n) < 0 || n != 2)
        goto bad;
    v->next = 0;
    v->has_next = pwp_get_nil(r) < 0;
    if (v->has_next && pwp_get_uint(r, &v->next) < 0)
        goto bad;
    if (pwp_get_array(r, &v->count) < 0 || v->count > PW_ENUM_PAGE)
        goto bad;
    v->records = *r;
    for (uint32_t i = 0; i < v->count; i++)
        if (pwp_skip(r) < 0)
            goto bad;
    return 0;
bad:
    *r = save;
    return -1;
}

void pw_put_passwd(pwp_buf *b, const pw_passwd_view *v)
{
    pwp_put_array(b, 8);
    pwp_put_str(b, v->name.p, v->name.n);
    pwp_put_str(b, v->passwd.p, v->passwd.n);
    pwp_put_uint(b, v->uid);
    pwp_put_uint(b, v->gid);
    pwp_put_str(b, v->gecos.p, v->gecos.n);
    pwp_put_str(b, v->dir.p, v->dir.n);
    pwp_put_str(b, v->shell.p, v->shell.n);
    pwp_put_str(b, v->mailhost.p, v->mailhost.n);
}

void pw_put_shadow(pwp_buf *b, const pw_shadow_view *v)
{
    pwp_put_array(b, 9);
    pwp_put_str(b, v->name.p, v->name.n);
    pwp_put_str(b, v->hash.p, v->hash.n);
    pwp_put_int(b, v->lastchg);
    pwp_put_int(b, v->min);
    pwp_put_int(b, v->max);
    pwp_put_int(b, v->warn);
    pwp_put_int(b, v->inact);
    pwp_put_int(b, v->expire);
    pwp_put_int(b, v->flag);
}
