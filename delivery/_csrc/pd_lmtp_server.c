/*
 * pd_lmtp_server.c - the LMTP server machine of `pdelivery -l`, command for
 * command delivery/lmtp.py's LMTPServerConnection (RFC 2033 with
 * PIPELINING, ENHANCEDSTATUSCODES, 8BITMIME, SIZE, CHUNKING and XQUEUEID).
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "pd_lmtp_server.h"

enum phase { INIT, READY, MAIL, DATA, BDAT, WAIT_RCPT, WAIT_MESSAGE, DONE };
enum { STEP_NONE = -1 };          /* a step that produced no event: go on */

#define XTEXT_MAX 128

/* ---- byte buffers ----------------------------------------------------------- */
static int bytes_reserve(pd_bytes *b, size_t more)
{
    if (b->len + more <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + more)
        cap *= 2;
    char *p = realloc(b->buf, cap);
    if (!p)
        return -1;
    b->buf = p, b->cap = cap;
    return 0;
}

static int bytes_add(pd_bytes *b, const char *p, size_t n)
{
    if (bytes_reserve(b, n + 1) < 0)
        return -1;
    memcpy(b->buf + b->len, p, n);
    b->len += n;
    b->buf[b->len] = 0;
    return 0;
}

static void bytes_drop_front(pd_bytes *b, size_t n)
{
    memmove(b->buf, b->buf + n, b->len - n);
    b->len -= n;
}

static int out_printf(pd_srv *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int out_printf(pd_srv *s, const char *fmt, ...)
{
    char line[PD_TEXT_MAX + PD_STATUS_MAX + 64];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (n >= (int)sizeof line)
        n = (int)sizeof line - 1;
    return bytes_add(&s->out, line, (size_t)n);
}

int pd_srv_reply(pd_srv *s, const pd_reply *r)
{
    char text[PD_TEXT_MAX];
    snprintf(text, sizeof text, "%s", r->text);
    for (char *p = text; *p; p++)
        if (*p == '\r' || *p == '\n')
            *p = ' ';
    if (r->status[0])
        return out_printf(s, "%d %s %s\r\n", r->code, r->status, text);
    return out_printf(s, "%d %s\r\n", r->code, text);
}

static int reply(pd_srv *s, int code, const char *status, const char *text)
{
    pd_reply r;
    pd_reply_set(&r, code, status, "%s", text);
    return pd_srv_reply(s, &r);
}

/* delivery/lmtp.py's replies */
#define R_OK 250, "2.0.0", "OK"
#define R_SENDER_OK 250, "2.1.0", "sender OK"
#define R_NEED_LHLO 503, "5.5.1", "send LHLO first"
#define R_BAD_SEQUENCE 503, "5.5.1", "bad sequence of commands"
#define R_NESTED_MAIL 503, "5.5.1", "sender already given"
#define R_NEED_MAIL 503, "5.5.1", "need MAIL first"
#define R_NO_VALID_RCPT 554, "5.5.1", "no valid recipients"
#define R_SYNTAX 501, "5.5.4", "syntax error in parameters"
#define R_UNKNOWN_CMD 500, "5.5.1", "command not recognized"
#define R_NOT_LMTP 500, "5.5.1", "this is LMTP: use LHLO"
#define R_LINE_TOO_LONG 500, "5.5.2", "line too long"
#define R_PARAM 555, "5.5.4", "unsupported parameter"
#define R_TOO_BIG 552, "5.3.4", "message too big"
#define R_LONG_LINES 554, "5.6.0", "message has lines longer than allowed"
#define R_TOO_MANY_RCPT 452, "4.5.3", "too many recipients"
#define R_TOO_MANY_ERRORS 421, "4.7.0", "too many errors, closing"
#define R_BYE 221, "2.0.0", "bye"
#define R_START_DATA 354, "", "end data with <CR><LF>.<CR><LF>"
#define R_VRFY 252, "2.5.0", "cannot verify, send mail to find out"
#define R_HELP 214, "2.0.0", "LHLO MAIL RCPT DATA BDAT RSET NOOP VRFY QUIT"
#define R_CHUNK 250, "2.0.0", "chunk received"

/* ---- session ---------------------------------------------------------------- */
static void reset_transaction(pd_srv *s)
{
    free(s->sender);
    s->sender = NULL;
    for (size_t i = 0; i < s->nrcpts; i++)
        free(s->rcpts[i].address);
    s->nrcpts = 0;
    free(s->pending);
    s->pending = NULL;
    s->queue_id[0] = 0;
    s->body.len = 0;
    s->scan = 0;
    s->too_big = s->bdat_last = s->bdat_started = 0;
    s->bdat_left = 0;
}

int pd_srv_init(pd_srv *s, const char *hostname, const pd_conf *limits)
{
    memset(s, 0, sizeof *s);
    s->limits = limits;
    s->hostname = hostname;
    s->phase = INIT;
    return out_printf(s, "220 %s LMTP pdelivery ready\r\n", hostname);
}

void pd_srv_free(pd_srv *s)
{
    reset_transaction(s);
    free(s->rcpts);
    free(s->in.buf);
    free(s->out.buf);
    free(s->body.buf);
}

int pd_srv_receive(pd_srv *s, const char *data, size_t n)
{
    if (!n) {
        s->eof = 1;
        return 0;
    }
    return bytes_add(&s->in, data, n);
}

/* The session ends: the reply goes out, then PD_PEER_ERROR. */
static int fail(pd_srv *s, int code, const char *status, const char *text)
{
    reply(s, code, status, text);
    s->phase = DONE;
    return PD_PEER_ERROR;
}

static int bad_command(pd_srv *s, int code, const char *status, const char *text)
{
    if (++s->bad >= s->limits->bad_commands_max)
        return fail(s, R_TOO_MANY_ERRORS);
    return reply(s, code, status, text) < 0 ? PD_NO_MEMORY : STEP_NONE;
}

static int queued(int rc) { return rc < 0 ? PD_NO_MEMORY : STEP_NONE; }

static int end_of_input(pd_srv *s)
{
    if (s->eof) {
        s->phase = DONE;
        return PD_CLOSED;
    }
    return PD_NEED_DATA;
}

/* Python's str.isspace for ASCII (the separators \x1c-\x1f included). */
static int is_space(char c) { return c == ' ' || (c >= '\t' && c <= '\r') || (c >= 0x1c && c <= 0x1f); }

static char *strip(char *p)
{
    while (is_space(*p))
        p++;
    size_t n = strlen(p);
    while (n && is_space(p[n - 1]))
        p[--n] = 0;
    return p;
}

/* The next whitespace-separated word of *p (NULL when none). */
static char *next_word(char **p)
{
    char *w = *p;
    while (is_space(*w))
        w++;
    if (!*w)
        return NULL;
    char *e = w;
    while (*e && !is_space(*e))
        e++;
    *p = *e ? e + 1 : e;
    *e = 0;
    return w;
}

static size_t code_points(const char *s)
{
    size_t n = 0;
    for (; *s; s++)
        n += ((unsigned char)*s & 0xc0) != 0x80;
    return n;
}

/* lmtp.py _parse_path: "<addr> params..." (or a bare address) -> addr, the
 * params left in *params; NULL on bad syntax. */
static char *parse_path(char *rest, char **params)
{
    char *p = rest;
    while (is_space(*p))
        p++;
    char *close = *p == '<' ? strpbrk(p + 1, "<>") : NULL;
    if (close && *close == '>') {
        char *addr = p + 1;
        *close = 0;
        *params = close + 1;
        if (addr[0] == '@' && strchr(addr, ':'))      /* source route: dropped (RFC 5321 C) */
            addr = strchr(addr, ':') + 1;
        if (strpbrk(addr, " \t\r\n") || code_points(addr) > PD_ADDRESS_MAX)
            return NULL;
        return addr;
    }
    /* tolerate a bare address without brackets (some old clients) */
    char *cursor = rest;
    char *word = next_word(&cursor);
    if (!word || strpbrk(word, "<>"))
        return NULL;
    *params = cursor;
    return word;
}

static int all_digits(const char *s, size_t max)
{
    size_t n = strlen(s);
    if (!n || n > max)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (s[i] < '0' || s[i] > '9')
            return 0;
    return 1;
}

static int cmd_lhlo(pd_srv *s, char *arg)
{
    if (!*arg)
        return bad_command(s, R_SYNTAX);
    reset_transaction(s);
    s->phase = READY;
    return queued(out_printf(s, "250-%s\r\n250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n"
                             "250-SIZE %ld\r\n250-CHUNKING\r\n250 XQUEUEID\r\n",
                             s->hostname, s->limits->message_size_max));
}

static int cmd_mail(pd_srv *s, char *arg)
{
    if (s->sender)
        return bad_command(s, R_NESTED_MAIL);
    if (strncasecmp(arg, "FROM:", 5))
        return bad_command(s, R_SYNTAX);
    char *params;
    char *addr = parse_path(arg + 5, &params);
    if (!addr)
        return bad_command(s, R_SYNTAX);
    char queue_id[XTEXT_MAX + 1] = "";
    for (char *p; (p = next_word(&params));) {
        char *v = strchr(p, '=');
        if (v)
            *v++ = 0;
        else
            v = "";
        if (!strcasecmp(p, "SIZE")) {
            if (!all_digits(v, 20))
                return bad_command(s, R_SYNTAX);
            if (strtod(v, NULL) > (double)s->limits->message_size_max)
                return queued(reply(s, R_TOO_BIG));
        } else if (!strcasecmp(p, "BODY")) {
            if (strcasecmp(v, "7BIT") && strcasecmp(v, "8BITMIME"))
                return bad_command(s, R_SYNTAX);
        } else if (!strcasecmp(p, "XQUEUEID")) {
            size_t n = strlen(v);
            int ok = n >= 1 && n <= XTEXT_MAX;
            for (size_t i = 0; ok && i < n; i++)
                ok = v[i] >= '!' && v[i] <= '~';
            if (!ok)
                return bad_command(s, R_SYNTAX);
            strcpy(queue_id, v);
        } else {
            return queued(reply(s, R_PARAM));
        }
    }
    if (!(s->sender = strdup(addr)))
        return PD_NO_MEMORY;
    strcpy(s->queue_id, queue_id);
    s->phase = MAIL;
    return queued(reply(s, R_SENDER_OK));
}

static int cmd_rcpt(pd_srv *s, char *arg)
{
    if (!s->sender)
        return bad_command(s, R_NEED_MAIL);
    if (strncasecmp(arg, "TO:", 3))
        return bad_command(s, R_SYNTAX);
    char *params;
    char *addr = parse_path(arg + 3, &params);
    if (!addr || !*addr)
        return bad_command(s, R_SYNTAX);
    if (next_word(&params))
        return queued(reply(s, R_PARAM));
    if ((long)s->nrcpts >= s->limits->recipients_max)
        return queued(reply(s, R_TOO_MANY_RCPT));
    if (!(s->pending = strdup(addr)))
        return PD_NO_MEMORY;
    s->phase = WAIT_RCPT;
    return PD_RCPT;
}

static int cmd_data(pd_srv *s, char *arg)
{
    if (*arg)
        return bad_command(s, R_SYNTAX);
    if (!s->sender)
        return bad_command(s, R_NEED_MAIL);
    if (s->bdat_started)
        return bad_command(s, R_BAD_SEQUENCE);
    if (!s->nrcpts)
        return queued(reply(s, R_NO_VALID_RCPT));
    s->body.len = 0;
    if (bytes_add(&s->body, "\r\n", 2) < 0)   /* so a leading "." line is found like any other */
        return PD_NO_MEMORY;
    s->scan = 0;
    s->phase = DATA;
    return queued(reply(s, R_START_DATA));
}

static int cmd_bdat(pd_srv *s, char *arg)
{
    char *size = next_word(&arg), *last = next_word(&arg), *more = next_word(&arg);
    if (!size || more || !all_digits(size, 20) || (last && strcasecmp(last, "LAST")))
        return fail(s, R_SYNTAX);     /* the chunk's length is unknown: the stream cannot be framed */
    s->bdat_left = strtoull(size, NULL, 10);
    s->bdat_last = last != NULL;
    s->phase = BDAT;
    return STEP_NONE;
}

static int cmd_rset(pd_srv *s, char *arg)
{
    (void)arg;
    reset_transaction(s);
    if (s->phase != INIT)
        s->phase = READY;
    return queued(reply(s, R_OK));
}

static int cmd_quit(pd_srv *s, char *arg)
{
    (void)arg;
    if (reply(s, R_BYE) < 0)
        return PD_NO_MEMORY;
    s->phase = DONE;
    return PD_CLOSED;
}

static int command_step(pd_srv *s)
{
    char *nl = memchr(s->in.buf, '\n', s->in.len);
    if (!nl) {
        if ((long)s->in.len > s->limits->command_line_max)
            return fail(s, R_LINE_TOO_LONG);
        return end_of_input(s);
    }
    size_t n = (size_t)(nl - s->in.buf), used = n + 1;
    if (n && s->in.buf[n - 1] == '\r')
        n--;
    if ((long)n > s->limits->command_line_max) {
        bytes_drop_front(&s->in, used);
        return bad_command(s, R_LINE_TOO_LONG);
    }
    char *line = malloc(n + 1);
    if (!line)
        return PD_NO_MEMORY;
    memcpy(line, s->in.buf, n);
    line[n] = 0;
    /* A NUL cannot end the C string early: it becomes another control
     * character, which every check that sees it refuses as it would a NUL
     * (an address with it is answered 501 by pdelivery, never relayed). */
    for (size_t i = 0; i < n; i++)
        if (!line[i])
            line[i] = '\x01';
    bytes_drop_front(&s->in, used);
    int rc;
    if (!pd_utf8_valid(line, n)) {
        rc = bad_command(s, R_SYNTAX);
        free(line);
        return rc;
    }
    char *space = memchr(line, ' ', n);
    char *arg = space ? space + 1 : line + n;
    if (space)
        *space = 0;
    arg = strip(arg);
    const char *verb = line;
    int init_ok = !strcasecmp(verb, "LHLO") || !strcasecmp(verb, "NOOP") || !strcasecmp(verb, "QUIT") ||
                  !strcasecmp(verb, "RSET") || !strcasecmp(verb, "HELP");
    int known = init_ok || !strcasecmp(verb, "MAIL") || !strcasecmp(verb, "RCPT") ||
                !strcasecmp(verb, "DATA") || !strcasecmp(verb, "BDAT") || !strcasecmp(verb, "VRFY");
    if (!known)
        rc = !strcasecmp(verb, "HELO") || !strcasecmp(verb, "EHLO") ? bad_command(s, R_NOT_LMTP)
                                                                      : bad_command(s, R_UNKNOWN_CMD);
    else if (s->phase == INIT && !init_ok)
        rc = bad_command(s, R_NEED_LHLO);
    else if (!strcasecmp(verb, "LHLO"))
        rc = cmd_lhlo(s, arg);
    else if (!strcasecmp(verb, "MAIL"))
        rc = cmd_mail(s, arg);
    else if (!strcasecmp(verb, "RCPT"))
        rc = cmd_rcpt(s, arg);
    else if (!strcasecmp(verb, "DATA"))
        rc = cmd_data(s, arg);
    else if (!strcasecmp(verb, "BDAT"))
        rc = cmd_bdat(s, arg);
    else if (!strcasecmp(verb, "RSET"))
        rc = cmd_rset(s, arg);
    else if (!strcasecmp(verb, "NOOP"))
        rc = queued(reply(s, R_OK));
    else if (!strcasecmp(verb, "VRFY"))
        rc = queued(reply(s, R_VRFY));
    else if (!strcasecmp(verb, "HELP"))
        rc = queued(reply(s, R_HELP));
    else
        rc = cmd_quit(s, arg);
    free(line);
    return rc;
}

/* ---- message bodies ------------------------------------------------------------ */
static size_t max_line_length(const char *p, size_t n)
{
    size_t best = 0, start = 0;
    for (size_t i = 0; i <= n; i++)
        if (i == n || p[i] == '\n') {
            if (i - start > best)
                best = i - start;
            start = i + 1;
        }
    return best;
}

static int message_complete(pd_srv *s)
{
    int too_big = s->too_big || (long)s->body.len > s->limits->message_size_max;
    int long_lines = !too_big && (long)max_line_length(s->body.buf, s->body.len) > s->limits->message_line_max + 1;
    if (too_big || long_lines) {
        for (size_t i = 0; i < s->nrcpts; i++)
            if ((too_big ? reply(s, R_TOO_BIG) : reply(s, R_LONG_LINES)) < 0)
                return PD_NO_MEMORY;
        reset_transaction(s);
        s->phase = READY;
        return STEP_NONE;
    }
    s->phase = WAIT_MESSAGE;
    return PD_MESSAGE;
}

static const char *find_terminator(const char *p, size_t n, size_t from)
{
    for (size_t i = from; i + 5 <= n; i++) {
        const char *hit = memchr(p + i, '\r', n - i - 4);
        if (!hit)
            return NULL;
        if (!memcmp(hit, "\r\n.\r\n", 5))
            return hit;
        i = (size_t)(hit - p);
    }
    return NULL;
}

static int data_step(pd_srv *s)
{
    if (!s->in.len)
        return end_of_input(s);
    if (bytes_add(&s->body, s->in.buf, s->in.len) < 0)
        return PD_NO_MEMORY;
    s->in.len = 0;
    const char *end = find_terminator(s->body.buf, s->body.len, s->scan > 4 ? s->scan - 4 : 0);
    if (!end) {
        s->scan = s->body.len;
        if ((long)s->body.len > s->limits->message_size_max + 2) {
            s->too_big = 1;               /* keep only what a terminator could straddle */
            bytes_drop_front(&s->body, s->body.len - 4);
            s->scan = s->body.len;
        }
        return STEP_NONE;
    }
    /* what follows the terminator goes back (pipelined commands) */
    size_t at = (size_t)(end - s->body.buf);
    if (bytes_add(&s->in, s->body.buf + at + 5, s->body.len - at - 5) < 0)
        return PD_NO_MEMORY;
    s->body.len = at + 2;
    /* unstuff "\r\n.." -> "\r\n.", then drop the leading "\r\n" */
    size_t o = 0;
    char *b = s->body.buf;
    for (size_t i = 0; i < s->body.len; i++) {
        b[o++] = b[i];
        /* the output's last three bytes are "\r\n." exactly when the input's are */
        if (b[i] == '.' && i + 1 < s->body.len && b[i + 1] == '.' && o >= 3 && b[o - 2] == '\n' && b[o - 3] == '\r')
            i++;
    }
    memmove(b, b + 2, o - 2);
    s->body.len = o - 2;
    return message_complete(s);
}

static int bdat_step(pd_srv *s)
{
    if (s->bdat_left) {
        if (!s->in.len)
            return end_of_input(s);
        size_t take = s->bdat_left < s->in.len ? s->bdat_left : s->in.len;
        if (!s->too_big) {
            if (bytes_add(&s->body, s->in.buf, take) < 0)
                return PD_NO_MEMORY;
            if ((long)s->body.len > s->limits->message_size_max) {
                s->too_big = 1;
                s->body.len = 0;
            }
        }
        bytes_drop_front(&s->in, take);
        s->bdat_left -= take;
        if (s->bdat_left)
            return STEP_NONE;
    }
    /* a whole chunk is in */
    if (!s->sender) {
        int rc = bad_command(s, R_NEED_MAIL);
        if (rc == PD_PEER_ERROR || rc == PD_NO_MEMORY)
            return rc;
        reset_transaction(s);
        s->phase = READY;
        return STEP_NONE;
    }
    if (!s->nrcpts) {
        int rc = reply(s, R_NO_VALID_RCPT);
        reset_transaction(s);
        s->phase = READY;
        return queued(rc);
    }
    s->bdat_started = 1;
    if (!s->bdat_last) {
        s->phase = MAIL;
        return queued(reply(s, R_CHUNK));
    }
    return message_complete(s);
}

int pd_srv_next(pd_srv *s)
{
    for (;;) {
        if (s->phase == DONE)
            return PD_CLOSED;
        int ev = s->phase == DATA ? data_step(s) : s->phase == BDAT ? bdat_step(s) : command_step(s);
        if (ev != STEP_NONE)
            return ev;
    }
}

int pd_srv_answer_rcpt(pd_srv *s, const pd_reply *r, const pd_route *route)
{
    if (pd_ok(r)) {
        if (s->nrcpts == s->rcpts_cap) {
            size_t cap = s->rcpts_cap ? s->rcpts_cap * 2 : 16;
            pd_rcpt *grown = realloc(s->rcpts, cap * sizeof *grown);
            if (!grown)
                return -1;
            s->rcpts = grown, s->rcpts_cap = cap;
        }
        s->rcpts[s->nrcpts].address = s->pending;
        s->rcpts[s->nrcpts++].route = *route;
        s->pending = NULL;
    }
    free(s->pending);
    s->pending = NULL;
    s->phase = MAIL;
    return pd_srv_reply(s, r);
}

int pd_srv_answer_message(pd_srv *s, const pd_reply *replies)
{
    for (size_t i = 0; i < s->nrcpts; i++)
        if (pd_srv_reply(s, &replies[i]) < 0)
            return -1;
    reset_transaction(s);
    s->phase = READY;
    return 0;
}
