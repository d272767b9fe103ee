/*
 * pw_wire.h - the pwserver wire format (docs/protocol.md), in plain C.
 *
 * One implementation of the format, compiled into the server's cffi
 * extension (pwcache._pwtable) and into libnss_pwserver.so.2. No allocation,
 * no globals: readers point into the caller's packet, writers fill the
 * caller's buffer and set `overflow` instead of writing past its end.
 */
#ifndef PW_WIRE_H
#define PW_WIRE_H

#include <stddef.h>
#include <stdint.h>

#define PW_VERSION 1
#define PW_DEFAULT_PORT 7773

/* Limits (docs/protocol.md, "Limits"). */
#define PW_MAX_REQUEST 1024
#define PW_MAX_NAME 255
#define PW_MAX_UDP_ANSWER 8192
#define PW_AMPLIFICATION 3
#define PW_MAX_TCP_ANSWER (16u * 1024u * 1024u)
#define PW_ENUM_PAGE 1000
#define PW_REQUEST_PAD 256
#define PW_MAX_ID 4294967294u

/* Sealed packets: 0xC1 | key id | 24-byte nonce | ciphertext | 16-byte tag */
#define PW_SEAL_MARK 0xC1
#define PW_KEY_NETWORK 1
#define PW_KEY_SHADOW 2
#define PW_SEAL_NONCE 24
#define PW_SEAL_TAG 16
#define PW_SEAL_OVERHEAD (2 + PW_SEAL_NONCE + PW_SEAL_TAG)
#define PW_KEY_BYTES 32

enum pw_op {
    PW_OP_PASSWD_BY_NAME = 1,
    PW_OP_PASSWD_BY_UID = 2,
    PW_OP_GROUP_BY_NAME = 3,
    PW_OP_GROUP_BY_GID = 4,
    PW_OP_INITGROUPS = 5,
    PW_OP_SHADOW_BY_NAME = 6,
    PW_OP_MAILHOST = 7,
    PW_OP_STATS = 8,
    PW_OP_PING = 9,
    PW_OP_PASSWD_ENUM = 10,
    PW_OP_GROUP_ENUM = 11,
    PW_OP_SHADOW_ENUM = 12,
    PW_OP_MAX = 12
};

enum pw_status {
    PW_OK = 0,
    PW_NOTFOUND = 1,
    PW_TRUNCATED = 2,
    PW_DENIED = 3,
    PW_BADREQUEST = 4,
    PW_BADVERSION = 5,
    PW_UNAVAILABLE = 6
};

/* ---- msgpack writer ---------------------------------------------------- */

typedef struct {
    uint8_t *data;
    size_t len;
    size_t cap;
    int overflow; /* set once a write did not fit; len stops growing */
} pwp_buf;

void pwp_init(pwp_buf *b, void *data, size_t cap);
void pwp_put_raw(pwp_buf *b, const void *p, size_t n);
void pwp_put_nil(pwp_buf *b);
void pwp_put_bool(pwp_buf *b, int v);
void pwp_put_uint(pwp_buf *b, uint64_t v);
void pwp_put_int(pwp_buf *b, int64_t v);
void pwp_put_str(pwp_buf *b, const char *s, size_t n);
void pwp_put_bin(pwp_buf *b, const void *p, size_t n);
void pwp_put_array(pwp_buf *b, uint32_t n);
void pwp_put_map(pwp_buf *b, uint32_t n);

/* ---- msgpack reader ---------------------------------------------------- */

typedef struct {
    const uint8_t *p;
    const uint8_t *end;
} pwp_reader;

/* Every getter returns 0 and advances on success, -1 (and does not advance)
 * when the next object is of another type or runs past the end. */
void pwp_reader_init(pwp_reader *r, const void *data, size_t len);
int pwp_peek_nil(const pwp_reader *r);
int pwp_get_nil(pwp_reader *r);
int pwp_get_bool(pwp_reader *r, int *v);
int pwp_get_uint(pwp_reader *r, uint64_t *v);
int pwp_get_int(pwp_reader *r, int64_t *v);
int pwp_get_str(pwp_reader *r, const char **s, uint32_t *n);
int pwp_get_bin(pwp_reader *r, const uint8_t **p, uint32_t *n);
int pwp_get_array(pwp_reader *r, uint32_t *n);
int pwp_get_map(pwp_reader *r, uint32_t *n);
/* Skips one whole object (nesting bounded by PWP_MAX_DEPTH). */
#define PWP_MAX_DEPTH 8
int pwp_skip(pwp_reader *r);

/* ---- requests ---------------------------------------------------------- */

enum pw_arg_kind { PW_ARG_NIL = 0, PW_ARG_STR = 1, PW_ARG_INT = 2 };

/* cffi: begin (build_pwtable.py reads this part as its cdef) */
typedef struct {
    uint64_t id;
    int op;
    int arg_kind;            /* enum pw_arg_kind */
    const char *name;        /* PW_ARG_STR: points into the packet, not NUL-terminated */
    uint32_t name_len;
    uint64_t num;            /* PW_ARG_INT */
} pw_request;

/* Encodes a plain request, padded with a bin so the whole message is at
 * least pad_to bytes (0: no padding). Returns the length, or -1 if it did
 * not fit. */
int pw_encode_request(void *out, size_t cap, const pw_request *req, size_t pad_to);

/* Decodes a plain request. Returns PW_OK, PW_BADVERSION or PW_BADREQUEST;
 * on PW_BADREQUEST/PW_BADVERSION req->id is set when it could be read
 * (*id_known = 1), so the error can be answered. Checks the argument's kind
 * and range for the op (names: 1..PW_MAX_NAME bytes, valid UTF-8, no NUL,
 * ':' or newline). */
int pw_decode_request(const void *data, size_t len, pw_request *req, int *id_known);

/* cffi: end */

/* Whether an op needs a string, an int or nothing. */
int pw_op_arg_kind(int op);

/* ---- answers ----------------------------------------------------------- */

/* Writes the 4-element answer header [version, id, status, ...]; the caller
 * then writes exactly one payload object. */
void pw_put_answer_header(pwp_buf *b, uint64_t id, int status);

/* Reads the header of an answer; on success *r is left at the payload.
 * Returns 0, or -1 when the packet is not a version-1 answer. */
int pw_get_answer_header(pwp_reader *r, uint64_t *id, int *status);

/* Views of records: strings point into the packet and are NOT
 * NUL-terminated. */
typedef struct { const char *p; uint32_t n; } pw_str;

typedef struct {
    pw_str name, passwd, gecos, dir, shell, mailhost;
    uint64_t uid, gid;
} pw_passwd_view;

typedef struct {
    pw_str name, passwd;
    uint64_t gid;
    uint32_t nmembers;
    pwp_reader members; /* positioned at the first member string */
} pw_group_view;

typedef struct {
    pw_str name, hash;
    int64_t lastchg, min, max, warn, inact, expire, flag;
} pw_shadow_view;

/* MAILHOST's answer: [host, frozen]. */
typedef struct {
    pw_str host;
    int frozen; /* the mailbox is being moved */
} pw_mailhost_view;

/* INITGROUPS' answer: [gid, ...]. */
typedef struct {
    uint32_t count;
    pwp_reader gids; /* positioned at the first gid */
} pw_gids_view;

/* An enumeration page: [next index or nil, [record, ...]]. */
typedef struct {
    int has_next;       /* 0: this is the last page (nil) */
    uint64_t next;      /* index of the next page's first record */
    uint32_t count;     /* records in this page, at most PW_ENUM_PAGE */
    pwp_reader records; /* positioned at the first record */
} pw_page_view;

/* One reader per record (and answer payload) type. Each returns 0 and
 * advances past the whole object, or -1 and does not advance. */
int pw_get_passwd(pwp_reader *r, pw_passwd_view *v);
int pw_get_group(pwp_reader *r, pw_group_view *v);
/* Returns the next member of a group view; -1 when done or malformed. */
int pw_group_next_member(pw_group_view *v, pw_str *member);
int pw_get_shadow(pwp_reader *r, pw_shadow_view *v);
int pw_get_mailhost(pwp_reader *r, pw_mailhost_view *v);
/* Checks every gid (at most PW_MAX_ID) so pw_gids_next may be trusted. */
int pw_get_gids(pwp_reader *r, pw_gids_view *v);
/* Returns the next gid of the list; -1 when done. */
int pw_gids_next(pw_gids_view *v, uint64_t *gid);
/* Checks the page's frame and that each record is one whole object; the
 * records themselves are read with the map's reader (pw_get_passwd, ...). */
int pw_get_page(pwp_reader *r, pw_page_view *v);

/* Record writers (used by the server's table to pack answers once). */
void pw_put_passwd(pwp_buf *b, const pw_passwd_view *v);
void pw_put_shadow(pwp_buf *b, const pw_shadow_view *v);

/* Valid UTF-8, no NUL; used for every name a peer sends. */
int pw_valid_name(const char *s, size_t n);
/* Valid UTF-8, no NUL, any length (record fields loaded from files). */
int pw_valid_utf8(const char *s, size_t n);

#endif /* PW_WIRE_H */
