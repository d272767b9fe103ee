/*
 * pw_table.h - the password server's in-memory table.
 *
 * Built once from whole passwd(5), shadow(5), group(5) and mailhosts files
 * (buffers in, table out), then read-only: any number of threads may look
 * up concurrently. Every record is stored as its msgpack answer payload
 * (docs/protocol.md, "Records"), ready to copy into an answer. Lookups
 * return pointers into the table, valid until pwt_free.
 *
 * Indexes: open addressing with linear probing on user name, uid, group
 * name and gid; each user's supplementary gids (INITGROUPS) are a reverse
 * index of the group member lists, built at load.
 *
 * Changes (pwt_apply) make a new table that shares the base and adds a
 * small delta of changed records on top, consulted first; the old table
 * stays valid and unchanged for its readers. pwt_fold builds a new base
 * from both when the delta has grown (docs/pwserver.md, "Changes").
 */
#ifndef PW_TABLE_H
#define PW_TABLE_H

#include <stddef.h>
#include <stdint.h>

#include "pw_placement.h"

#define PWT_MAX_USER_GROUPS 65535
#define PWT_MAX_LINE 65535      /* longer passwd/shadow lines are malformed */
#define PWT_MAX_HOSTS 32767

/* cffi: begin (build_pwtable.py reads this part as its cdef) */
typedef struct pwt_table pwt_table;

/* What a load found; every skipped line is counted ("_bad": malformed). */
typedef struct {
    uint64_t users;            /* passwd entries */
    uint64_t groups;
    uint64_t shadows;
    uint64_t passwd_bad, passwd_dup_name, passwd_dup_uid;
    uint64_t shadow_bad, shadow_dup, shadow_orphan;
    uint64_t group_bad, group_dup_name, group_dup_gid, group_bad_member;
    uint64_t mailhosts_bad, mailhosts_dup, mailhosts_unknown;
    uint64_t too_many_groups;  /* memberships past PWT_MAX_USER_GROUPS */
    uint64_t bytes;            /* bytes held by the table */
    /* pwt_apply: changes applied and refused (each refusal is also counted
     * above as the same line in a file would be, or in delete_unknown) */
    uint64_t changes_applied, changes_refused, delete_unknown;
    uint64_t delta_entries;    /* users and groups held in the delta */
} pwt_load_stats;

/* One change for pwt_apply: a line as in the source files (without its
 * newline), or for deletions the name alone. */
enum pwt_change_kind {
    PWT_CH_PASSWD = 0,    /* insert or replace a user (shadow, host, groups stay) */
    PWT_CH_SHADOW = 1,    /* the user's shadow entry (the user must exist) */
    PWT_CH_GROUP = 2,     /* insert or replace a group and its members */
    PWT_CH_MAILHOSTS = 3, /* "user host [frozen]" (the user must exist) */
    PWT_CH_DEL_USER = 4,  /* passwd, shadow and host go; group lists stay */
    PWT_CH_DEL_GROUP = 5,
};
typedef struct {
    int kind;
    const char *text;
    size_t len;
} pwt_change;

/* What became of each change. */
enum pwt_change_status {
    PWT_APPLIED = 0,
    PWT_REFUSED_BAD = 1,     /* malformed, as a line of the file would be */
    PWT_REFUSED_UNKNOWN = 2, /* no such user (shadow, mailhosts, delete) or group */
    PWT_REFUSED_DUP_ID = 3,  /* the uid or gid belongs to another user or group */
};


/* The first skipped lines of a load, located (the server logs them):
 * malformed lines, shadow entries of no user, duplicates met while
 * reading. Duplicate names and uids in passwd and mailhosts are found
 * later, by the index, and only counted. */
#define PWT_SKIP_NOTES 5
enum pwt_source { PWT_SRC_PASSWD = 0, PWT_SRC_SHADOW = 1, PWT_SRC_GROUP = 2, PWT_SRC_MAILHOSTS = 3 };
typedef struct {
    uint32_t source;           /* enum pwt_source */
    uint32_t line;             /* 1-based */
    const char *why;           /* a static string */
} pwt_skip_note;

/* Which records an enumeration walks. */
enum pwt_map { PWT_PASSWD = 0, PWT_GROUP = 1, PWT_SHADOW = 2 };

/* Builds a table. Any buffer may be NULL/0 except passwd (may be empty).
 * `rule` (may be NULL) places users the mailhosts map omits. Returns NULL
 * only when memory runs out (err says so); malformed lines are counted. */
pwt_table *pwt_build(const char *passwd, size_t passwd_len,
                     const char *shadow, size_t shadow_len,
                     const char *group, size_t group_len,
                     const char *mailhosts, size_t mailhosts_len,
                     const pwpl_rule *rule, char *err, size_t errcap);

/* Same, from files (read whole, then freed); NULL or "" paths are skipped
 * except passwd. Returns NULL with a reason in err. */
pwt_table *pwt_load_files(const char *passwd, const char *shadow,
                          const char *group, const char *mailhosts,
                          const pwpl_rule *rule, char *err, size_t errcap);

void pwt_free(pwt_table *t);
void pwt_get_stats(const pwt_table *t, pwt_load_stats *st);
/* The notes of the load (at most PWT_SKIP_NOTES); returns how many. */
uint32_t pwt_skip_notes(const pwt_table *t, const pwt_skip_note **notes);

/* Lookups: the record payload and its length, or NULL. */
const uint8_t *pwt_passwd_by_name(const pwt_table *t, const char *name, size_t n, uint32_t *len);
const uint8_t *pwt_passwd_by_uid(const pwt_table *t, uint32_t uid, uint32_t *len);
const uint8_t *pwt_shadow_by_name(const pwt_table *t, const char *name, size_t n, uint32_t *len);
const uint8_t *pwt_group_by_name(const pwt_table *t, const char *name, size_t n, uint32_t *len);
const uint8_t *pwt_group_by_gid(const pwt_table *t, uint32_t gid, uint32_t *len);
/* The user's host (not NUL-terminated) and frozen flag; -1 if no such user. */
int pwt_mailhost(const pwt_table *t, const char *name, size_t n,
                 const char **host, size_t *host_len, int *frozen);
/* Gids of the groups listing `name` as a member; -1 when the name is
 * neither a user nor a member of any group. */
int pwt_initgroups(const pwt_table *t, const char *name, size_t n,
                   const uint32_t **gids, uint32_t *count);

/* Enumeration: slots 0..pwt_enum_size-1; a slot may hold no record (NULL).
 * With a delta: the base's slots (a changed record's slot is empty), then
 * the delta's, each changed name keeping its slot in later tables. */
uint32_t pwt_enum_size(const pwt_table *t, int map);
const uint8_t *pwt_enum_record(const pwt_table *t, int map, uint32_t i, uint32_t *len);

/* Applies n changes in order to a copy of t and returns it (t is not
 * changed: its readers go on). A refused change is counted and skipped,
 * never half-applied; status[i] (may be NULL) says which. `rule` (may be
 * NULL) places new users, as at load. NULL only when memory runs out. */
pwt_table *pwt_apply(const pwt_table *t, const pwt_change *changes, size_t n,
                     const pwpl_rule *rule, int *status, char *err, size_t errcap);
/* Users and groups held in the delta (0: none). */
size_t pwt_delta_entries(const pwt_table *t);
/* A new table with t's records in a new base and no delta (t unchanged);
 * the skipped-line counters carry over. NULL with a reason in err. */
pwt_table *pwt_fold(const pwt_table *t, const pwpl_rule *rule, char *err, size_t errcap);
/* Another handle on t's records (sharing them; freed with pwt_free). */
pwt_table *pwt_share(const pwt_table *t);
/* cffi: end */

#endif /* PW_TABLE_H */
