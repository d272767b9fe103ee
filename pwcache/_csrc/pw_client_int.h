/*
 * pw_client_int.h - what the files of the C client share among themselves
 * (pw_client.h is what its users see).
 *
 * Thread safety: no socket is shared between threads; the only shared state
 * is the parsed configuration and the health record, both behind pwc_lock,
 * which is never held during network I/O and is taken around fork() so a
 * child never inherits it locked.
 */
#ifndef PW_CLIENT_INT_H
#define PW_CLIENT_INT_H

#include <pthread.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>

#include "pw_client.h"

#define PWC_MAX_SERVERS 8
#define PWC_NAME_MAX 80         /* "HOST:PORT" as written in the config */
#define PWC_PATH_MAX 256
/* Files are stat()ed at most this often by a long-running process; a new
 * process always reads them on its first lookup. */
#define PWC_RECHECK_FILES_MS 1000

typedef struct {
    char name[PWC_NAME_MAX];
    struct sockaddr_storage addr;
    socklen_t addrlen;
} pwc_server;

typedef struct {
    int nservers;
    int timeout_ms, hedge_ms, recheck_s, enumerate;
    int has_netkey;
    uint8_t netkey[PW_KEY_BYTES];
    char shadow_keyfile[PWC_PATH_MAX];
    char health_file[PWC_PATH_MAX];
    /* last: pwc_config_current copies only the nservers in use */
    pwc_server servers[PWC_MAX_SERVERS];
} pwc_config;

/* ---- shared state (pw_client.c) ------------------------------------------ */

/* Guards the configuration and the health record. */
extern pthread_mutex_t pwc_lock;
/* Bumped in every forked child: per-thread state made before the fork
 * (buffered request ids, UDP sockets) must not be used by both processes. */
extern unsigned pwc_fork_generation;

static inline unsigned pwc_generation(void)
{
    return __atomic_load_n(&pwc_fork_generation, __ATOMIC_RELAXED);
}

/* ---- time ------------------------------------------------------------------ */

static inline int64_t pwc_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Cheap (vDSO, no system call), a few ms coarse: for throttling only. */
static inline int64_t pwc_coarse_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static inline int64_t pwc_now_epoch(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec;
}

/* ---- files that are re-read only when they change (pw_client_conf.c) ----- */

typedef struct {
    int exists;
    dev_t dev;
    ino_t ino;
    off_t size;
    struct timespec mtime;
} pwc_stamp;

void pwc_stamp_of(const char *path, pwc_stamp *st);
int pwc_stamp_equal(const pwc_stamp *a, const pwc_stamp *b);

/* ---- configuration (pw_client_conf.c) ------------------------------------ */

/* Copies the current configuration, re-reading the file when it changed.
 * pwc_lock held. */
void pwc_config_current(pwc_config *out);

/* ---- health record (pw_health.c) ----------------------------------------- */

/* For each configured server: the epoch second until which it is known
 * down (0: not known down). pwc_lock held. */
void pwc_health_snapshot(const pwc_config *c, int64_t until[PWC_MAX_SERVERS]);
/* Records that `name` is down until `until` (0: it answered). Takes
 * pwc_lock. */
void pwc_health_mark(const pwc_config *c, const char *name, int64_t until);

/* ---- answers (pw_records.c) ------------------------------------------------ */

/* Opens (if sealed) and checks one answer to request `id`. On success the
 * plain packet is in `plain` (may be `pkt` itself when not sealed), and
 * *status and *payload are set. Returns 0, or -1 for a packet to ignore. */
int pwc_answer_check(const uint8_t *pkt, size_t len, uint8_t *plain, size_t plaincap,
                     int key_id, const uint8_t *key, uint64_t id, int op,
                     int *status, pwp_reader *payload);

/* ---- one server (pw_transport.c) ------------------------------------------- */

/* A fresh request id (getrandom, drawn in batches per thread). */
uint64_t pwc_random_id(void);

/* A request packet, sealed with `key` (key_id != 0) or plain, padded to
 * `pad` bytes. Returns its length or -1. */
int pwc_build_request(uint8_t *out, size_t cap, uint64_t id, int op, const char *name,
                      uint64_t num, size_t pad, int key_id, const uint8_t *key);

/* Sends a request over this thread's UDP socket for server slot `idx`.
 * Returns the socket, or -1. */
int pwc_udp_send(int idx, const pwc_server *s, const uint8_t *pkt, size_t len);

/* Outcome of reading one server's socket. */
enum { PWC_RX_NOTHING, PWC_RX_FAILED, PWC_RX_ANSWER };

/* Reads the answer to request `id` from socket fd into *ans. block: the
 * first read may wait (up to the socket's pwc_udp_wait_ms). */
int pwc_udp_receive(int fd, int key_id, const uint8_t *key, uint64_t id, int op,
                    pwc_answer *ans, int *status, int block);

/* Makes a blocking receive on server slot idx's socket wait at most ms.
 * Returns 0 or -1. */
int pwc_udp_wait_ms(int idx, int ms);

/* After a lookup: keep the socket if its server answered, else close it. */
void pwc_udp_release(int idx, int keep);

/* One request over TCP to server `s` (the answer was TRUNCATED over UDP).
 * On 0, ans->heap holds the answer and *status / ans->payload are set. */
int pwc_tcp_exchange(const pwc_server *s, int op, const char *name, uint64_t num,
                     int key_id, const uint8_t *key, int64_t deadline,
                     pwc_answer *ans, int *status);

#endif /* PW_CLIENT_INT_H */
