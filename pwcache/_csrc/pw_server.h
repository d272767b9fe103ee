/*
 * pw_server.h - answering pwserver requests (docs/protocol.md).
 *
 * One function turns a request packet into an answer packet (pws_answer,
 * used for TCP); pws_serve_udp loops recvmmsg -> answer -> sendmmsg in
 * batches on a UDP socket until pws_stop. Several threads may serve one
 * socket, each with its own slot (statistics and a read-side sequence).
 *
 * Reload: pws_swap_table publishes a new table and returns the old one only
 * after every slot that could still be reading it has left its read-side
 * section (an RCU-like grace period: a slot's sequence is odd while it
 * reads; the writer waits for each odd sequence to change). Readers never
 * wait.
 */
#ifndef PW_SERVER_H
#define PW_SERVER_H

#include <stddef.h>
#include <stdint.h>

#include "pw_table.h"

#define PWS_MAX_SLOTS 64
#define PWS_BATCH 32
#define PWS_MAX_ALLOW 256
#define PWS_STOP_CHECK_MS 100
#define PWS_MAX_BUSY_POLL_US 10000
/* a sched_yield longer than this let another task run: stop busy-polling */
#define PWS_YIELD_SHARED_US 5
#define PWS_VERSION_STRING "pwserver 0.1.0"

/* cffi: begin (build_pwtable.py reads this part as its cdef) */
typedef struct pws_server pws_server;

pws_server *pws_new(void);
/* Frees the server, not its table (take it back with pws_swap_table). */
void pws_free(pws_server *s);

/* Keys (32 bytes) or NULL. Set before serving. */
void pws_set_keys(pws_server *s, const uint8_t *network_key, const uint8_t *shadow_key);
/* Adds an allowed client network: family 4 or 6, address bytes (4 or 16),
 * prefix length. Returns 0 or -1. With no network allowed, nobody is. */
int pws_allow(pws_server *s, int family, const uint8_t *addr, int prefix);
/* Whether a peer (family 4 or 6, address bytes) may talk to us; counts
 * refusals. */
int pws_source_allowed(pws_server *s, int slot, int family, const uint8_t *addr);

/* Publishes `t` (may be NULL) and returns the previous table once no slot
 * can still read it; the caller frees it. */
pwt_table *pws_swap_table(pws_server *s, pwt_table *t, uint64_t generation, uint64_t load_ms);

int pws_slot_acquire(pws_server *s);
void pws_slot_release(pws_server *s, int slot);

/* Answers one request. tcp: 1 over TCP (enumeration allowed, no UDP size
 * limits). Returns the answer length, 0 when the request is dropped. `out`
 * needs PW_MAX_TCP_ANSWER + PW_SEAL_OVERHEAD bytes for TCP, PW_MAX_UDP_ANSWER
 * for UDP. */
size_t pws_answer(pws_server *s, int slot, const uint8_t *req, size_t len,
                  int tcp, uint8_t *out, size_t cap);

/* Serves the UDP socket fd until pws_stop (seen within PWS_STOP_CHECK_MS:
 * it sets SO_RCVTIMEO on fd). Returns 0, or -errno on a socket error. */
int pws_serve_udp(pws_server *s, int fd, int slot);
void pws_stop(pws_server *s);
/* Busy-poll window in microseconds (0, the default: always block; at most
 * PWS_MAX_BUSY_POLL_US): after answering, one serving thread keeps
 * receiving without blocking this long, yielding the CPU between tries. */
void pws_set_busy_poll(pws_server *s, unsigned usec);

/* What STATS says of the loads the reload guard refused
 * (pwcache/reload_guard.py; docs/pwserver.md, "Reloading"). */
typedef struct {
    uint64_t count;     /* loads refused since start */
    uint64_t time;      /* Unix time of the last one (0: none yet) */
    uint64_t reason;    /* why: 1 empty, 2 shrink, 3 bad lines */
    uint64_t users;     /* users the refused load held */
    uint64_t bad_lines; /* malformed lines it held */
} pws_refusals;

/* Replaces what STATS says of refused loads (copied; STATS sees all of
 * one record or of the previous one, never a mix). */
void pws_set_refusals(pws_server *s, const pws_refusals *r);

/* What STATS says of a database source (pwcache/pgsource.py;
 * docs/pwserver.md, "A PostgreSQL source"): the change log's last sequence
 * number applied, and 1 while connected to the database (file sources: 0, 0). */
void pws_set_source(pws_server *s, uint64_t seq, int connected);

/* Counters, summed over slots. */
int pws_ncounters(void);
const char *pws_counter_name(int i);
uint64_t pws_counter(pws_server *s, int i);
/* Counts one event of counter i in a slot (its thread's only): for what
 * the callers decide, such as the TCP connection limits. */
void pws_count(pws_server *s, int slot, int i);
/* cffi: end */

#endif /* PW_SERVER_H */
