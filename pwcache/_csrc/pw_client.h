/*
 * pw_client.h - the C client of the pwserver wire protocol: one hedged
 * request/answer exchange with the password servers named in
 * /etc/pwserver.conf, with failover through the shared health record
 * (docs/nss.md, "Failover"). libnss_pwserver.so.2 (nss_module/) and
 * pop-proxy's engine (pop/_csrc/pop_engine.c) both link it.
 *
 * The library's files, one job each:
 *   pw_client_conf.c  configuration (/etc/pwserver.conf, PWSERVER_CONF)
 *   pw_health.c       the health record (servers known down)
 *   pw_transport.c    one server: request packets, per-thread UDP sockets, TCP
 *   pw_records.c      what an answer must look like, and its readers
 *   pw_client.c       the hedged exchange across the servers
 * over the wire format (pw_wire.c) and sealing (pw_seal.c). Its source list
 * is client-sources.txt.
 *
 * Functions return 0 or a negative errno:
 *   -ENOENT  a server said NOTFOUND (or the key can never exist)
 *   -ERANGE  the caller's buffer is too small
 *   -EAGAIN  no server answered (NSS_STATUS_UNAVAIL)
 *   -EACCES  shadow without the shadow key, or DENIED
 *   -EINVAL  a server said BADREQUEST, or an answer does not fit the caller
 *   -ENOMEM  out of memory
 */
#ifndef PW_CLIENT_H
#define PW_CLIENT_H

#include <stddef.h>
#include <stdint.h>

#include "pw_wire.h"

/* Room for the largest datagram a server may send (sealed or not). */
#define PWC_UDP_BUF (PW_MAX_UDP_ANSWER + PW_SEAL_OVERHEAD)

typedef struct {
    int status;            /* PW_OK or PW_NOTFOUND */
    pwp_reader payload;    /* at the payload object (valid when PW_OK) */
    uint8_t *heap;         /* TCP answers; NULL for UDP */
    uint8_t udp[PWC_UDP_BUF];
} pwc_answer;

/* One lookup: `name` for string ops (NUL-terminated), `num` for int ops.
 * On 0, *ans holds a checked answer (its payload has the shape `op`
 * expects, read with pw_wire.h's readers); release it with pwc_answer_free
 * whatever the result. */
int pwc_query(int op, const char *name, uint64_t num, pwc_answer *ans);
void pwc_answer_free(pwc_answer *ans);

/* Reads one record (reader at it) into the caller's struct and buffer:
 * 0, -ERANGE, or -EAGAIN when the record is malformed. */
typedef int (*pwc_pack_fn)(pwp_reader *rec, void *result, char *buf, size_t buflen);

/* A lookup by name (name != NULL, checked first) or by number, its record
 * read with `pack`: 0, -ENOENT, -ERANGE, -EAGAIN, ... */
int pwc_lookup(int op, const char *name, uint64_t num, pwc_pack_fn pack, void *result,
               char *buf, size_t buflen);

/* The mailhost of a PW_OP_MAILHOST answer, as a C string in host[cap], and
 * whether it is frozen: 0, -ENOENT (NOTFOUND), or -EINVAL (malformed, or
 * longer than cap - 1). */
int pwc_answer_mailhost(const pwc_answer *ans, char *host, size_t cap, int *frozen);

/* Whether `enumerate yes` is configured. */
int pwc_enumerate_enabled(void);

#endif /* PW_CLIENT_H */
