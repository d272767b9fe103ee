/*
 * pd.h - pdelivery, Sendmail's local mailer, in C (docs/delivery.md,
 * "pdelivery"): one lookup per user through the shared C client of the
 * pwserver protocol (pwcache/_csrc), one LMTP session per mailhost, sysexits.
 *
 * The files, one job each:
 *   pdelivery.c        command line, the -d and -l runs, exit codes
 *   pd_conf.c          /etc/pwmail.toml: a TOML subset, [delivery] and [placement]
 *   pd_check.c         what may go on an LMTP command line (the grammar of
 *                      delivery/lmtpclient.py), UTF-8
 *   pd_route.c         user -> mailhost (pwserver, else the placement rule)
 *   pd_lmtp_client.c   one LMTP transaction with a storage host
 *   pd_lmtp_server.c   the LMTP server machine of -l (delivery/lmtp.py's)
 *   pd_log.c           syslog (/dev/log or PWMAIL_SYSLOG) and stderr
 *
 * delivery/pdelivery.py is the same program in Python, kept as the
 * reference (and the benchmark's baseline); the tests run this one.
 */
#ifndef PD_H
#define PD_H

#include <stddef.h>
#include <stdint.h>

/* sysexits: the only exit codes */
#define EX_OK 0
#define EX_USAGE 64
#define EX_NOUSER 67
#define EX_TEMPFAIL 75
#define EX_CONFIG 78

/* as delivery/lmtp.py and delivery/lmtpclient.py */
#define PD_ADDRESS_MAX 512
#define PD_QUEUE_ID_MAX 128
#define PD_USER_MAX 255            /* delivery/layout.py MAX_USER_LEN */
#define PD_HOST_MAX 256            /* a mailhost name, suffix included */
#define PD_REPLY_LINE_MAX 4096     /* a reply line from a storage host */
#define PD_REPLY_LINES_MAX 100     /* lines of one multi-line reply */
#define PD_STATUS_MAX 32           /* kept of an enhanced status code */
#define PD_TEXT_MAX 512            /* kept of a reply's text */

/* ---- replies ------------------------------------------------------------ */
typedef struct {
    int code;
    char status[PD_STATUS_MAX];    /* "" when none */
    char text[PD_TEXT_MAX];
} pd_reply;

static inline int pd_ok(const pd_reply *r) { return r->code >= 200 && r->code < 300; }
void pd_reply_set(pd_reply *r, int code, const char *status, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* "CODE STATUS TEXT" (as Python's str(Reply)) */
const char *pd_reply_str(const pd_reply *r, char *buf, size_t cap);

/* ---- settings (pd_conf.c) ----------------------------------------------- */
typedef struct pwpl_rule pwpl_rule;

/* One [hosts] entry (pwmail/base/hostmap.py): a mailhost name and its address. */
typedef struct {
    char name[PD_HOST_MAX];
    char address[PD_HOST_MAX];
    long lmtp_port;                       /* 0: [delivery] lmtp_port */
} pd_host;

typedef struct {
    long lmtp_port;
    double connect_timeout, timeout;      /* seconds */
    char mailhost_suffix[PD_HOST_MAX];
    char recipient_delimiter[16];
    long message_size_max, message_line_max, recipients_max, command_line_max, bad_commands_max;
    pwpl_rule *placement;                 /* [placement]; never NULL after pd_conf_load */
    pd_host *hosts;                       /* [hosts], nhosts of them */
    int nhosts;
} pd_conf;

/* Reads `path` (NULL: $PWMAIL_CONF, else /etc/pwmail.toml; a missing file
 * gives the defaults). 0, or -1 with a one-line reason naming the file and
 * the key in err. */
int pd_conf_load(const char *path, pd_conf *c, char *err, size_t errcap);
void pd_conf_free(pd_conf *c);

/* ---- the grammar of command lines (pd_check.c) -------------------------- */
/* `text` as an address between < and > in out[PD_ADDRESS_MAX + 1], one
 * enclosing pair taken off; 0, or -1 with the reason in err. */
int pd_check_address(const char *text, const char *what, int empty_ok, char *out, char *err, size_t errcap);
int pd_check_queue_id(const char *text, char *err, size_t errcap);
/* Whether s[0..n) is valid UTF-8 (NUL allowed, as Python's decoder). */
int pd_utf8_valid(const char *s, size_t n);
/* `text` escaped and cut for a one-line message. */
const char *pd_shown(const char *text, char *buf, size_t cap);

/* ---- routing (pd_route.c) ----------------------------------------------- */
typedef struct {
    pd_reply reply;                       /* 250 2.1.5 when routable */
    char host[PD_HOST_MAX + 16];          /* its [hosts] address, else the mailhost + suffix */
    long port;                            /* its [hosts] LMTP port; 0: lmtp_port */
} pd_route;

void pd_route_user(const pd_conf *c, const char *address, pd_route *out);

/* ---- LMTP client (pd_lmtp_client.c) ------------------------------------- */
typedef struct {
    const char *sender;                   /* checked addresses */
    const char *const *rcpts;
    size_t nrcpts;
    const char *data;                     /* CRLF line ends */
    size_t len;
    const char *queue_id;                 /* NULL: none */
} pd_message;

/* Delivers `m` to host:port; one reply per recipient in replies[]. 0, or
 * -1 when the host is unavailable or its replies did not match the
 * commands (the reason in err): a temporary failure for all of them. */
int pd_lmtp_deliver(const char *host, long port, const pd_message *m, double connect_timeout,
                    double timeout, pd_reply *replies, char *err, size_t errcap);

/* ---- logging (pd_log.c) ------------------------------------------------- */
enum { PD_LOG_ERROR = 3, PD_LOG_WARNING = 4, PD_LOG_INFO = 6 };
void pd_log_open(int to_stderr);
void pd_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif /* PD_H */
