/*
 * pdelivery.c - Sendmail's local mailer (the paper's III.F), in C so that a
 * run costs a millisecond or two of CPU instead of a Python start-up:
 *
 *   pdelivery [-f SENDER] [-i QUEUEID] [--lmtp-port N] [--config FILE] [--log-stderr] -d USER [USER...] < message
 *   pdelivery [-f SENDER] [-i QUEUEID] [--lmtp-port N] [--config FILE] [--log-stderr] -l   (LMTP on stdin/stdout)
 *
 * Same command line, settings, log lines and exit codes as
 * delivery/pdelivery.py (docs/delivery.md, "pdelivery"): 0 when every
 * copy is durable; 64 for an argument that cannot go on an LMTP command
 * line (refused before anything is read or sent); 67 for an unknown user
 * or a permanent refusal; 75 for everything temporary (password server
 * unavailable, mailbox frozen, storage host down, replies out of step,
 * usage errors, internal errors); 78 for a settings file it cannot use.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "pd.h"
#include "pd_lmtp_server.h"

#define READ_CHUNK 65536
#define USAGE "pdelivery: usage: pdelivery [-f SENDER] [-i QUEUEID] (-d USER... | -l)"

/* ---- replies ------------------------------------------------------------------ */
void pd_reply_set(pd_reply *r, int code, const char *status, const char *fmt, ...)
{
    va_list ap;
    r->code = code;
    snprintf(r->status, sizeof r->status, "%s", status);
    va_start(ap, fmt);
    vsnprintf(r->text, sizeof r->text, fmt, ap);
    va_end(ap);
}

const char *pd_reply_str(const pd_reply *r, char *buf, size_t cap)
{
    snprintf(buf, cap, "%d %s %s", r->code, r->status, r->text);
    return buf;
}

static int internal_error(const char *what)
{
    fprintf(stderr, "pdelivery: 4.3.0 internal error: %s\n", what);
    return EX_TEMPFAIL;
}

/* ---- the command line (argparse's rules, as delivery/pdelivery.py) -------------- */
typedef struct {
    const char *sender, *queue_id, *config;
    int deliver, lmtp, log_stderr;
    long lmtp_port;                 /* 0: the setting */
    const char **users;
    int nusers;
} args;

static const char *const LONG_OPTS[] = {"--lmtp-port", "--config", "--log-stderr", "--help", NULL};

/* The long option `arg` names (a unique prefix is enough), or NULL. */
static const char *long_option(const char *arg, size_t n)
{
    const char *found = NULL;
    for (const char *const *o = LONG_OPTS; *o; o++) {
        if (strlen(*o) == n && !strncmp(*o, arg, n))
            return *o;
        if (!strncmp(*o, arg, n)) {
            if (found)
                return NULL;          /* ambiguous */
            found = *o;
        }
    }
    return found;
}

static int parse_port(const char *text, long *out)
{
    char *end;
    errno = 0;
    long v = strtol(text, &end, 10);
    while (*end == ' ' || *end == '\t')
        end++;
    if (end == text || *end || errno || v < 0 || v > 65535)
        return -1;
    *out = v;
    return 0;
}

/* 0, 1 for --help, or -1 for a usage error. */
static int parse_args(int argc, char **argv, args *a)
{
    memset(a, 0, sizeof *a);
    a->sender = "";
    a->users = calloc((size_t)argc + 1, sizeof *a->users);
    if (!a->users)
        return -1;
    int positional_only = 0;
    enum { NONE_YET, IN_RUN, RUN_ENDED } users_run = NONE_YET;   /* the users are one run of words */
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        int positional = positional_only || arg[0] != '-' || !arg[1];
        if (positional && users_run == RUN_ENDED)
            return -1;                /* argparse: "unrecognized arguments" */
        if (!positional && strcmp(arg, "--") && users_run == IN_RUN)
            users_run = RUN_ENDED;
        if (positional) {
            a->users[a->nusers++] = arg;
            users_run = IN_RUN;
        } else if (!strcmp(arg, "--")) {
            positional_only = 1;
        } else if (arg[1] == '-') {
            const char *eq = strchr(arg, '=');
            size_t n = eq ? (size_t)(eq - arg) : strlen(arg);
            const char *opt = long_option(arg, n);
            if (!opt)
                return -1;
            int takes = !strcmp(opt, "--lmtp-port") || !strcmp(opt, "--config");
            if (!takes && eq)
                return -1;
            const char *value = eq ? eq + 1 : NULL;
            if (takes && !value) {
                if (i + 1 >= argc)
                    return -1;
                value = argv[++i];
            }
            if (!strcmp(opt, "--help"))
                return 1;
            if (!strcmp(opt, "--log-stderr"))
                a->log_stderr = 1;
            else if (!strcmp(opt, "--config"))
                a->config = value;
            else if (parse_port(value, &a->lmtp_port) < 0)
                return -1;
        } else {
            for (const char *c = arg + 1; *c; c++) {     /* -dl, -fSENDER, -f SENDER */
                if (*c == 'd' || *c == 'l' || *c == 'h') {
                    if (*c == 'h')
                        return 1;
                    *(*c == 'd' ? &a->deliver : &a->lmtp) = 1;
                    continue;
                }
                if (*c != 'f' && *c != 'i')
                    return -1;
                const char *value = c[1] ? c + 1 : i + 1 < argc ? argv[++i] : NULL;
                if (!value)
                    return -1;
                *(*c == 'f' ? &a->sender : &a->queue_id) = value;
                break;
            }
        }
    }
    return 0;
}

/* ---- delivery ------------------------------------------------------------------- */
/* Every routable address to its mailhost, one LMTP session per mailhost (in
 * the order they first appear); replies[i] for addresses[i]. */
static int send_message(const pd_conf *c, const pd_route *routes, const char *const *addresses, size_t n,
                        const char *sender, const char *data, size_t len, const char *queue_id, pd_reply *replies)
{
    const char **batch = malloc((n + 1) * sizeof *batch);
    size_t *idx = malloc((n + 1) * sizeof *idx);
    char *done = calloc(n + 1, 1);
    pd_reply *got = malloc((n + 1) * sizeof *got);
    if (!batch || !idx || !done || !got) {
        free(batch), free(idx), free(done), free(got);
        return -1;
    }
    for (size_t i = 0; i < n; i++)
        if (!pd_ok(&routes[i].reply)) {
            replies[i] = routes[i].reply;
            done[i] = 1;
        }
    for (size_t first = 0; first < n; first++) {
        if (done[first])
            continue;
        const char *host = routes[first].host;
        long port = routes[first].port ? routes[first].port : c->lmtp_port;
        size_t k = 0;
        for (size_t i = first; i < n; i++)
            if (!done[i] && !strcmp(routes[i].host, host) && routes[i].port == routes[first].port) {
                idx[k] = i;
                batch[k++] = addresses[i];
            }
        pd_message m = {sender, batch, k, data, len, queue_id};
        char err[512];
        if (pd_lmtp_deliver(host, port, &m, c->connect_timeout, c->timeout, got, err, sizeof err) < 0) {
            pd_log(PD_LOG_WARNING, "%s:%ld: %s", host, port, err);
            for (size_t j = 0; j < k; j++)
                pd_reply_set(&got[j], 451, "4.4.1", "storage host %s unavailable: %s", host, err);
        }
        for (size_t j = 0; j < k; j++) {
            replies[idx[j]] = got[j];
            done[idx[j]] = 1;
        }
    }
    free(batch), free(idx), free(done), free(got);
    return 0;
}

static int exit_code(const pd_reply *replies, size_t n)
{
    int refused = 0;
    for (size_t i = 0; i < n; i++) {
        if (pd_ok(&replies[i]))
            continue;
        if (replies[i].code < 500 || replies[i].code >= 600)
            return EX_TEMPFAIL;
        refused = 1;
    }
    return refused ? EX_NOUSER : EX_OK;
}

/* The message on stdin, LF or CRLF line ends -> CRLF; NULL when it is
 * larger than `limit` (*too_big) or cannot be read. */
static char *read_message(long limit, size_t *len, int *too_big)
{
    size_t cap = READ_CHUNK, n = 0;
    char *raw = malloc(cap);
    *too_big = 0;
    for (;;) {
        if (!raw)
            return NULL;
        if (n == cap) {
            char *grown = realloc(raw, cap *= 2);
            if (!grown) {
                free(raw);
                return NULL;
            }
            raw = grown;
        }
        ssize_t r = read(0, raw + n, cap - n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            free(raw);
            return NULL;
        }
        if (r == 0)
            break;
        n += (size_t)r;
        if ((long)n > limit) {
            *too_big = 1;
            free(raw);
            return NULL;
        }
    }
    size_t bare = 0;
    for (size_t i = 0; i < n; i++)
        bare += raw[i] == '\n' && (i == 0 || raw[i - 1] != '\r');
    char *out = malloc(n + bare + 1), *o = out;
    if (out)
        for (size_t i = 0; i < n; i++) {
            if (raw[i] == '\n' && (i == 0 || raw[i - 1] != '\r'))
                *o++ = '\r';
            *o++ = raw[i];
        }
    free(raw);
    *len = n + bare;
    return out;
}

static int run_users(const pd_conf *c, const char *const *users, size_t n, const char *sender, const char *queue_id)
{
    size_t len;
    int too_big;
    char *data = read_message(c->message_size_max, &len, &too_big);
    if (!data) {
        if (too_big) {
            fprintf(stderr, "pdelivery: 552 5.3.4 message too big\n");
            return EX_NOUSER;
        }
        return internal_error("cannot read the message");
    }
    pd_route *routes = calloc(n, sizeof *routes);
    pd_reply *replies = calloc(n, sizeof *replies);
    if (!routes || !replies) {
        free(data), free(routes), free(replies);
        return internal_error("out of memory");
    }
    for (size_t i = 0; i < n; i++)
        pd_route_user(c, users[i], &routes[i]);
    int rc = send_message(c, routes, users, n, sender, data, len, queue_id, replies);
    for (size_t i = 0; rc == 0 && i < n; i++) {
        char shown[PD_TEXT_MAX + 64];
        pd_reply_str(&replies[i], shown, sizeof shown);
        if (pd_ok(&replies[i])) {
            pd_log(PD_LOG_INFO, "delivered qid=%s to=%s: %s", queue_id ? queue_id : "-", users[i], shown);
        } else {
            fprintf(stderr, "pdelivery: %s: %s\n", users[i], shown);
            pd_log(PD_LOG_WARNING, "qid=%s to=%s: %s", queue_id ? queue_id : "-", users[i], shown);
        }
    }
    int code = rc == 0 ? exit_code(replies, n) : internal_error("out of memory");
    free(data), free(routes), free(replies);
    return code;
}

/* ---- -l: LMTP on stdin/stdout -------------------------------------------------------- */
static int write_all(int fd, const char *p, size_t n)
{
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0)
            return -1;
        p += w, n -= (size_t)w;
    }
    return 0;
}

static int flush_out(pd_srv *s)
{
    int rc = write_all(1, s->out.buf, s->out.len);
    s->out.len = 0;
    return rc;
}

/* The refusal of a RCPT whose sender or address is outside the grammar (it
 * is never relayed); 0 when both may be sent. */
static int refused_rcpt(const pd_srv *s, pd_reply *r)
{
    char addr[PD_ADDRESS_MAX + 1], err[256];
    if (pd_check_address(s->sender, "sender", 1, addr, err, sizeof err) < 0) {
        pd_log(PD_LOG_WARNING, "-l input: %s", err);
        pd_reply_set(r, 501, "5.1.7", "bad sender address syntax");
        return 1;
    }
    if (pd_check_address(s->pending, "recipient", 0, addr, err, sizeof err) < 0) {
        pd_log(PD_LOG_WARNING, "-l input: %s", err);
        pd_reply_set(r, 501, "5.1.3", "bad recipient address syntax");
        return 1;
    }
    return 0;
}

/* The replies to a whole message (s->rcpts, routed at RCPT). */
static int answer_message(const pd_conf *c, pd_srv *s, const char *queue_id, int *bad_input)
{
    size_t n = s->nrcpts;
    const char *qid = queue_id ? queue_id : s->queue_id[0] ? s->queue_id : NULL;
    pd_reply *replies = calloc(n + 1, sizeof *replies);
    pd_route *routes = calloc(n + 1, sizeof *routes);
    const char **addresses = calloc(n + 1, sizeof *addresses);
    int rc = -1;
    char err[256];
    if (!replies || !routes || !addresses)
        goto out;
    for (size_t i = 0; i < n; i++) {
        routes[i] = s->rcpts[i].route;
        addresses[i] = s->rcpts[i].address;
    }
    if (qid && pd_check_queue_id(qid, err, sizeof err) < 0) {
        pd_log(PD_LOG_WARNING, "-l input: %s", err);
        *bad_input = 1;
        for (size_t i = 0; i < n; i++)
            pd_reply_set(&replies[i], 501, "5.5.4", "bad XQUEUEID");
    } else if (send_message(c, routes, addresses, n, s->sender, s->body.buf, s->body.len, qid, replies) < 0) {
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        char shown[PD_TEXT_MAX + 64];
        pd_log(pd_ok(&replies[i]) ? PD_LOG_INFO : PD_LOG_WARNING, "qid=%s to=%s: %s", qid ? qid : "-",
               addresses[i], pd_reply_str(&replies[i], shown, sizeof shown));
    }
    rc = pd_srv_answer_message(s, replies);
out:
    free(replies), free(routes), free(addresses);
    return rc;
}

/* Speaks LMTP on stdin/stdout (Sendmail F=z), relaying to the mailhosts.
 * Input that cannot be relayed as it came is answered 501 and the session
 * ends with EX_USAGE instead of EX_OK. */
static int run_lmtp(const pd_conf *c, const char *queue_id)
{
    static char chunk[READ_CHUNK];
    char host[256] = "localhost";
    gethostname(host, sizeof host - 1);
    pd_srv s;
    int bad_input = 0, code = -1;
    if (pd_srv_init(&s, host, c) < 0)
        return internal_error("out of memory");
    while (code < 0) {
        int ev = pd_srv_next(&s);
        if (ev == PD_CLOSED || ev == PD_PEER_ERROR) {
            code = flush_out(&s) < 0 || ev == PD_PEER_ERROR ? EX_TEMPFAIL : bad_input ? EX_USAGE : EX_OK;
        } else if (ev == PD_NEED_DATA) {
            if (flush_out(&s) < 0) {
                code = EX_TEMPFAIL;
                break;
            }
            ssize_t r = read(0, chunk, sizeof chunk);
            if (r < 0 && errno == EINTR)
                continue;
            if (pd_srv_receive(&s, chunk, r > 0 ? (size_t)r : 0) < 0)
                code = internal_error("out of memory");
        } else if (ev == PD_RCPT) {
            pd_route route;
            if (refused_rcpt(&s, &route.reply))
                bad_input = 1;
            else
                pd_route_user(c, s.pending, &route);
            if (pd_srv_answer_rcpt(&s, &route.reply, &route) < 0)
                code = internal_error("out of memory");
        } else if (ev == PD_MESSAGE) {
            if (answer_message(c, &s, queue_id, &bad_input) < 0)
                code = internal_error("out of memory");
        } else {
            code = internal_error("out of memory");
        }
    }
    pd_srv_free(&s);
    return code;
}

/* Checks the arguments, then runs -d or -l: the exit code. */
static int run(const args *a, const pd_conf *c)
{
    /* Whatever reaches an LMTP command line is checked before anything is
     * read or sent: an argument with CR or LF would be commands of its own. */
    static char sender[PD_ADDRESS_MAX + 1];
    char err[512];
    char **users = calloc((size_t)a->nusers + 1, sizeof *users);
    if (!users)
        return internal_error("out of memory");
    int bad = pd_check_address(a->sender, "sender", 1, sender, err, sizeof err) < 0;
    for (int i = 0; !bad && i < a->nusers; i++)
        bad = !(users[i] = malloc(PD_ADDRESS_MAX + 1)) ||
              pd_check_address(a->users[i], "recipient", 0, users[i], err, sizeof err) < 0;
    if (!bad && a->queue_id)
        bad = pd_check_queue_id(a->queue_id, err, sizeof err) < 0;
    int code;
    if (bad) {
        fprintf(stderr, "pdelivery: 5.5.4 %s\n", err);
        code = EX_USAGE;
    } else if (a->lmtp) {
        code = run_lmtp(c, a->queue_id);
    } else {
        code = run_users(c, (const char *const *)users, (size_t)a->nusers, sender, a->queue_id);
    }
    for (int i = 0; i < a->nusers; i++)
        free(users[i]);
    free(users);
    return code;
}

int main(int argc, char **argv)
{
    args a;
    pd_conf c;
    char err[1024];
    int code;
    signal(SIGPIPE, SIG_IGN);     /* a peer gone is an error return, not a signal */
    int parsed = parse_args(argc, argv, &a);
    if (parsed == 1) {
        printf("%s\n", USAGE + strlen("pdelivery: "));
        free(a.users);
        return EX_OK;
    }
    if (parsed < 0) {             /* a usage error is the MTA's configuration: keep the mail */
        fprintf(stderr, "%s\n", USAGE);
        free(a.users);
        return EX_TEMPFAIL;
    }
    pd_log_open(a.log_stderr);
    if (pd_conf_load(a.config, &c, err, sizeof err) < 0) {
        fprintf(stderr, "pdelivery: 4.3.5 configuration error: %s\n", err);
        pd_log(PD_LOG_ERROR, "configuration error: %s", err);
        code = EX_CONFIG;
    } else {
        if (a.lmtp_port)
            c.lmtp_port = a.lmtp_port;
        if (a.lmtp == a.deliver || (a.deliver && !a.nusers) || (a.lmtp && a.nusers)) {
            fprintf(stderr, "%s\n", USAGE);
            code = EX_TEMPFAIL;
        } else {
            code = run(&a, &c);
        }
    }
    free(a.users);
    pd_conf_free(&c);
    return code;
}
