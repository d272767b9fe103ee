/*
 * pop_engine.h - pop-proxy's engine: the common session in C.
 *
 * One thread with epoll carries a plain-TCP session from accept to close
 * when it goes the common way: greeting, CAPA, USER, PASS, QUIT; the
 * mailhost lookup (worker threads through pwcache/_csrc's C client); the
 * backend login (XCLIENT and AUTH PLAIN in one packet); the splice relay.
 * Everything else is handed over to the Python proxy (pop/proxy.py) with
 * the bytes received so far: another command, a line the engine does not
 * take as plainly valid, a refused or failed login, a blocked address or
 * user, STLS. Python replays those bytes through the sans-I/O state
 * machine (pop/protocol.py) and goes on, so the engine never answers
 * anything the state machine would answer differently; the answers it
 * sends itself are texts Python made (pe_config).
 *
 * docs/pop.md ("The engine") describes the division of work.
 */
#ifndef POP_ENGINE_H
#define POP_ENGINE_H

#include <stddef.h>
#include <stdint.h>

/* cffi: begin */
typedef struct pe_engine pe_engine;

/* The login throttle (docs/pop.md, "Throttling"): one table that Python
 * and every engine share, so one policy decides every login. An attempt
 * counts from its start (in flight) until its verdict; a failure then
 * adds one to a leaky bucket per client address, per (user, address) and
 * per user name, each with its own limit (0: off) over one window. */
typedef struct pe_throttle pe_throttle;
enum {
    PE_ADMITTED = 0,            /* pe_throttle_begin: counted in flight */
    PE_THROTTLED_ADDRESS = 1,   /* ... or refused, and which limit said so */
    PE_THROTTLED_USER_ADDRESS = 2,
    PE_THROTTLED_USER = 3,
    PE_THROTTLED_FULL = 4       /* no room for the keys (out of memory) */
};
enum { PE_VERDICT_NONE = 0, PE_VERDICT_OK = 1, PE_VERDICT_FAILED = 2 };
pe_throttle *pe_throttle_new(size_t max_keys);
void pe_throttle_configure(pe_throttle *t, int per_address, int per_user_address, int per_user, double window);
/* `user` lower-cased; `now` CLOCK_MONOTONIC seconds. */
int pe_throttle_begin(pe_throttle *t, const char *addr, const char *user, double now);
/* Ends an admitted attempt: OK clears the (user, address) bucket, FAILED
 * adds one to each bucket, NONE (no verdict) only leaves the in-flight count. */
void pe_throttle_end(pe_throttle *t, const char *addr, const char *user, int verdict, double now);
size_t pe_throttle_keys(pe_throttle *t);
uint64_t pe_throttle_evicted(pe_throttle *t);
void pe_throttle_free(pe_throttle *t);

typedef struct {
    /* Whole answers, CRLF included, as pop/protocol.py writes them. */
    const char *greeting;
    const char *capa;
    const char *user_ok;        /* NULL: USER/PASS go to Python (no plaintext auth) */
    const char *quit_ok;
    const char *timeout_err;    /* the pre-login timeout's last words */
    const char *refuse_err;     /* over a connection limit */
    double prelogin_timeout, connect_timeout, backend_timeout, idle_timeout;
    int max_connections, max_connections_per_ip;
    int relay_buffer;           /* bytes: the backend pipe grows to this */
    int lookup_threads;
    int backend_port;           /* for mailhosts given without a port */
    /* The engine writes its own log records (login, logout, relay errors)
     * to where pwcache/logsetup.py sends Python's, in the same format. */
    const char *log_ident;      /* "pop-proxy" */
    int log_level;              /* lowest level written, as Python's (20 INFO, 30 WARNING) */
    int syslog_fd;              /* connected syslog socket, or -1 */
    int syslog_facility;        /* LOG_MAIL & co (already shifted: facility << 3) */
    int stderr_fd;              /* -1: none */
    pe_throttle *throttle;      /* the caller's; outlives the engine */
} pe_config;

enum {
    PE_EV_HANDOFF = 1           /* the only event: fd, addr, port, history, answered, outcome, text */
};

enum {
    PE_OUTCOME_NONE = 0,        /* no login tried, or tried without a backend answer: redo */
    PE_OUTCOME_ANSWER = 1,      /* the backend answered the login with the line in text */
    PE_OUTCOME_ERROR = 2        /* the backend failed after connecting: text says how */
};

#define PE_TEXT_MAX 4200
#define PE_NAME_MAX 256
#define PE_ADDR_MAX 64

typedef struct {
    int kind;
    int fd;                     /* HANDOFF: the client's socket, now the caller's to close */
    char addr[PE_ADDR_MAX];
    int port;
    char user[PE_NAME_MAX];
    char mailhost[PE_NAME_MAX];
    double started;             /* CLOCK_MONOTONIC seconds of the PASS, 0 if none */
    int outcome;
    char text[PE_TEXT_MAX];
    uint8_t *history;           /* HANDOFF: every byte read from the client */
    size_t history_len;
    size_t answered;            /* ... of which the engine answered this many */
    int attempt;                /* a login attempt the engine began: the caller ends it (pe_throttle_end) */
} pe_event;

#define PE_NSTATS 7             /* pe_stats(): see PE_STAT_NAMES in pop/engine.py */

/* A new engine on a listening socket (nonblocking, bound, listening);
 * it owns that socket and the log descriptors from now on. NULL with
 * errno on failure (they stay the caller's). */
pe_engine *pe_new(const pe_config *cfg, int listen_fd);
/* mailhost name -> numeric address (the [pop] backends map); port 0 means
 * "not numeric: hand such logins over". 0, or -1 when full. */
int pe_add_backend(pe_engine *e, const char *mailhost, const char *ip, int port);
/* The engine thread's body: returns 0 after pe_stop(), -1 with errno. */
int pe_run(pe_engine *e);
/* Stops at once: sessions still open end with the process. */
void pe_stop(pe_engine *e);
/* Stops accepting (closes the engine's copy of the listening socket) and
 * lets the open sessions go on; pe_run returns 0 once the last has ended.
 * For SIGHUP (a new engine takes the listener) and SIGTERM. */
void pe_drain(pe_engine *e);
/* Sessions the engine holds now (any thread may ask). */
size_t pe_open_sessions(pe_engine *e);
/* Readable when events are queued (an eventfd). */
int pe_event_fd(pe_engine *e);
/* Takes the next event: 1, or 0 when the queue is empty. */
int pe_next_event(pe_engine *e, pe_event *ev);
void pe_event_release(pe_event *ev);
void pe_stats(pe_engine *e, uint64_t *out);
/* Kicks on move (docs/pop.md, "Kicks on move"); any thread may call them.
 * The distinct "user\nmailhost" of the sessions the engine relays, each
 * followed by a NUL, in buf (those past `cap` bytes are left out); the
 * bytes written. */
size_t pe_relay_users(pe_engine *e, char *buf, size_t cap);
/* Asks the engine thread to close the relayed sessions of `user` whose
 * mailhost is not `keep` ("" = every one), each after the line `farewell`.
 * 0, or -1 when PE_KICKS_MAX kicks are already pending (ask again later). */
int pe_kick(pe_engine *e, const char *user, const char *keep, const char *farewell);
#define PE_KICKS_MAX 64
/* After pe_run returned. */
void pe_free(pe_engine *e);
/* cffi: end */

#endif /* POP_ENGINE_H */
