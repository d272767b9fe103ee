/*
 * pd_lmtp_client.c - one LMTP transaction with a storage host, as
 * delivery/lmtpclient.py's deliver(): LHLO, MAIL, the RCPTs (pipelined when
 * offered), the message as `BDAT n LAST` (CHUNKING) or DATA with
 * dot-stuffing, one reply per accepted recipient, QUIT.
 *
 * Every reply must be one the command it answers can have, in the order the
 * commands were sent, nothing may arrive when every command is answered,
 * and QUIT's 221 must come in its place: an extra, missing or out-of-order
 * reply anywhere is a protocol error, never a delivery (-1: the caller
 * gives every recipient a temporary failure).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "pd.h"

#define READ_CHUNK 65536

enum cmd { C_GREETING, C_LHLO, C_MAIL, C_RCPT, C_DATA, C_MESSAGE, C_RSET, C_QUIT };
static const char *const CMD_NAME[] = {"greeting", "LHLO", "MAIL", "RCPT", "DATA", "message", "RSET", "QUIT"};
/* the success each can have besides a 4xx/5xx refusal (none for QUIT) */
static const int CMD_OK[][2] = {{220, 0}, {250, 0}, {250, 0}, {250, 251}, {354, 0}, {250, 0}, {250, 0}, {221, 0}};

typedef struct {
    int fd;
    int timeout_ms;
    char buf[PD_REPLY_LINE_MAX + READ_CHUNK];
    size_t len;
    int enhanced;                  /* the server offered ENHANCEDSTATUSCODES */
    char *err;
    size_t errcap;
    const char *where;             /* host:port, for messages */
} session;

static int fail(session *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail(session *s, const char *fmt, ...)
{
    char why[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    snprintf(s->err, s->errcap, "%s: %s", s->where, why);
    return -1;
}

static int wait_fd(int fd, short events, int timeout_ms)
{
    struct pollfd p = {fd, events, 0};
    int r;
    do
        r = poll(&p, 1, timeout_ms);
    while (r < 0 && errno == EINTR);
    return r > 0 ? 0 : r == 0 ? -ETIMEDOUT : -errno;
}

/* Sends the pieces as one stream (one system call when they fit), after
 * checking that nothing unanswered came in: every command sent so far is
 * answered, so anything received now is a reply to nothing. */
static int send_pieces(session *s, struct iovec *iov, int n)
{
    if (s->len)
        return fail(s, "reply to no command: %.40s", s->buf);
    while (n) {
        struct msghdr msg = {.msg_iov = iov, .msg_iovlen = (size_t)n};
        ssize_t w = sendmsg(s->fd, &msg, MSG_NOSIGNAL);
        if (w < 0 && errno == EAGAIN) {
            int rc = wait_fd(s->fd, POLLOUT, s->timeout_ms);
            if (rc < 0)
                return fail(s, "send: %s", rc == -ETIMEDOUT ? "timed out" : strerror(-rc));
            continue;
        }
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0)
            return fail(s, "send: %s", strerror(errno));
        size_t left = (size_t)w;
        while (n && left >= iov->iov_len) {
            left -= iov->iov_len;
            iov++, n--;
        }
        if (n) {
            iov->iov_base = (char *)iov->iov_base + left;
            iov->iov_len -= left;
        }
    }
    return 0;
}

static int send_all(session *s, const char *p, size_t n)
{
    struct iovec iov = {(void *)p, n};
    return send_pieces(s, &iov, 1);
}

/* One reply line (CR LF or LF taken off) into line[PD_REPLY_LINE_MAX + 1]. */
static int read_line(session *s, char *line)
{
    for (;;) {
        char *nl = memchr(s->buf, '\n', s->len);
        if (nl) {
            size_t n = (size_t)(nl - s->buf);
            size_t keep = n;
            while (keep && s->buf[keep - 1] == '\r')
                keep--;
            if (keep > PD_REPLY_LINE_MAX)
                return fail(s, "reply line too long");
            memcpy(line, s->buf, keep);
            line[keep] = 0;
            memmove(s->buf, nl + 1, s->len - n - 1);
            s->len -= n + 1;
            return (int)keep;
        }
        if (s->len > PD_REPLY_LINE_MAX)
            return fail(s, "reply line too long");
        int rc = wait_fd(s->fd, POLLIN, s->timeout_ms);
        if (rc < 0)
            return fail(s, "%s", rc == -ETIMEDOUT ? "timed out" : strerror(-rc));
        ssize_t r = recv(s->fd, s->buf + s->len, sizeof s->buf - s->len, 0);
        if (r < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        if (r < 0)
            return fail(s, "recv: %s", strerror(errno));
        if (r == 0)
            return fail(s, "connection closed by the server");
        s->len += (size_t)r;
    }
}

/* Adds the first word of `text`, upper-cased and between spaces, to ext. */
static void add_extension(char *ext, size_t cap, const char *text)
{
    size_t used = strlen(ext), w = strcspn(text, " ");
    if (used + w + 3 > cap)
        return;
    ext[used++] = ' ';
    for (size_t i = 0; i < w; i++)
        ext[used++] = (char)(text[i] >= 'a' && text[i] <= 'z' ? text[i] - 32 : text[i]);
    ext[used++] = ' ';
    ext[used] = 0;
}

/* A whole reply (multi-line ones too). With `ext`, the first word of each
 * line but the first, and of the last, go there (LHLO's extensions). */
static int read_reply(session *s, pd_reply *out, char *ext, size_t extcap)
{
    static char line[PD_REPLY_LINE_MAX + 1];
    int lines = 0, n;
    const char *text;
    for (;;) {
        if ((n = read_line(s, line)) < 0)
            return -1;
        if (n < 3 || line[0] < '0' || line[0] > '9' || line[1] < '0' || line[1] > '9' || line[2] < '0' ||
            line[2] > '9') {
            char shown[128];
            return fail(s, "malformed reply %s", pd_shown(line, shown, sizeof shown));
        }
        text = n > 3 ? line + 4 : "";
        if (ext && lines++ > 0)
            add_extension(ext, extcap, text);
        if (n <= 3 || line[3] != '-')
            break;
        if (lines > PD_REPLY_LINES_MAX)
            return fail(s, "reply too long");
    }
    if (ext && lines == 1)
        add_extension(ext, extcap, text);
    char code[4] = {line[0], line[1], line[2], 0};
    size_t w = strcspn(text, " ");
    int dots = 0;
    for (size_t i = 0; i < w; i++)
        dots += text[i] == '.';
    if (w && strchr("245", text[0]) && dots == 2) {
        pd_reply_set(out, atoi(code), "", "%s", text[w] ? text + w + 1 : "");
        snprintf(out->status, sizeof out->status, "%.*s", (int)w, text);
    } else {
        pd_reply_set(out, atoi(code), "", "%s", text);
    }
    return 0;
}

/* The reply to `cmd`, which must be one it can have. */
static int answer(session *s, enum cmd cmd, pd_reply *out, char *ext, size_t extcap)
{
    if (read_reply(s, out, ext, extcap) < 0)
        return -1;
    int code = out->code;
    int fits = code == CMD_OK[cmd][0] || code == CMD_OK[cmd][1] || (cmd != C_QUIT && code >= 400 && code < 600);
    if (fits && s->enhanced && out->status[0]) {
        fits = out->status[0] == '0' + code / 100;
        if (fits && pd_ok(out) && (cmd == C_MAIL || cmd == C_RCPT))
            fits = out->status[1] == '.' && out->status[2] == '1';
    }
    if (!fits) {
        char shown[PD_TEXT_MAX + 64];
        return fail(s, "reply '%.80s' cannot answer %s: replies out of step", pd_reply_str(out, shown, sizeof shown),
                    CMD_NAME[cmd]);
    }
    return 0;
}

static int connect_to(const char *host, long port, double timeout, char *err, size_t errcap)
{
    char service[16];
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *list, *ai;   /* as create_connection */
    snprintf(service, sizeof service, "%ld", port);
    int rc = getaddrinfo(host, service, &hints, &list);
    if (rc != 0) {
        snprintf(err, errcap, "connect to %s:%ld: %s", host, port, gai_strerror(rc));
        return -1;
    }
    int fd = -1, last = ECONNREFUSED;
    for (ai = list; ai && fd < 0; ai = ai->ai_next) {     /* each address in turn, as create_connection */
        fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) {
            last = errno;
            continue;
        }
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) < 0 && errno != EINPROGRESS) {
            last = errno;
        } else {
            int wr = wait_fd(fd, POLLOUT, (int)(timeout * 1000));
            socklen_t len = sizeof last;
            if (wr < 0)
                last = -wr;
            else if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &last, &len) < 0)
                last = errno;
            if (wr == 0 && last == 0)
                break;
        }
        close(fd);
        fd = -1;
    }
    freeaddrinfo(list);
    if (fd < 0)
        snprintf(err, errcap, "connect to %s:%ld: %s", host, port, last == ETIMEDOUT ? "timed out" : strerror(last));
    return fd;
}

/* One command line; what is sent was checked, this is the last guard: a
 * command that would be two is never written. */
static int command(session *s, char *out, size_t cap, size_t *used, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
static int command(session *s, char *out, size_t cap, size_t *used, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(out + *used, cap - *used, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n + 2 >= cap - *used)
        return fail(s, "command too long");
    if (strpbrk(out + *used, "\r\n") || memchr(out + *used, 0, (size_t)n))
        return fail(s, "refusing to send a command containing CR, LF or NUL");
    memcpy(out + *used + n, "\r\n", 3);
    *used += (size_t)n + 2;
    return 0;
}

/* `data` dot-stuffed and ended by ".\r\n" (delivery/lmtpclient.py dot_stuff). */
static char *dot_stuff(const char *data, size_t len, size_t *outlen)
{
    char *out = malloc(len * 2 + 5), *o = out;
    if (!out)
        return NULL;
    for (size_t i = 0; i < len; i++) {
        if (data[i] == '.' && (i == 0 || (i >= 2 && data[i - 1] == '\n' && data[i - 2] == '\r')))
            *o++ = '.';
        *o++ = data[i];
    }
    if (len && !(len >= 2 && data[len - 2] == '\r' && data[len - 1] == '\n'))
        *o++ = '\r', *o++ = '\n';
    memcpy(o, ".\r\n", 3);
    *outlen = (size_t)(o - out) + 3;
    return out;
}

/* The message to the accepted recipients, once MAIL and the RCPTs are answered. */
static int message(session *s, const pd_message *m, const pd_reply *mail, pd_reply *replies, int chunking)
{
    size_t accepted = 0;
    pd_reply go;
    if (!pd_ok(mail)) {
        for (size_t i = 0; i < m->nrcpts; i++)
            replies[i] = *mail;
        return 0;
    }
    for (size_t i = 0; i < m->nrcpts; i++)
        accepted += pd_ok(&replies[i]);
    if (!accepted)
        return send_all(s, "RSET\r\n", 6) < 0 || answer(s, C_RSET, &go, NULL, 0) < 0 ? -1 : 0;
    if (chunking) {
        char head[64];
        int n = snprintf(head, sizeof head, "BDAT %zu LAST\r\n", m->len);
        struct iovec iov[2] = {{head, (size_t)n}, {(void *)m->data, m->len}};
        if (send_pieces(s, iov, 2) < 0)
            return -1;
    } else {
        if (send_all(s, "DATA\r\n", 6) < 0 || answer(s, C_DATA, &go, NULL, 0) < 0)
            return -1;
        if (go.code != 354) {
            for (size_t i = 0; i < m->nrcpts; i++)
                if (pd_ok(&replies[i]))
                    replies[i] = go;
            return 0;
        }
        size_t n;
        char *stuffed = dot_stuff(m->data, m->len, &n);
        if (!stuffed)
            return fail(s, "out of memory");
        int rc = send_all(s, stuffed, n);
        free(stuffed);
        if (rc < 0)
            return -1;
    }
    for (size_t i = 0; i < m->nrcpts; i++)
        if (pd_ok(&replies[i]) && answer(s, C_MESSAGE, &replies[i], NULL, 0) < 0)
            return -1;
    return 0;
}

static int transaction(session *s, const pd_message *m, pd_reply *replies)
{
    pd_reply r, mail;
    char ext[1024] = " ", helo[256] = "localhost";
    if (answer(s, C_GREETING, &r, NULL, 0) < 0)
        return -1;
    if (r.code != 220)
        return fail(s, "greeting: %d %s %s", r.code, r.status, r.text);
    gethostname(helo, sizeof helo - 1);
    size_t used = 0;
    size_t cap = 64 + (PD_ADDRESS_MAX + 32) * (m->nrcpts + 1) + PD_QUEUE_ID_MAX;
    char *cmds = malloc(cap);
    if (!cmds)
        return fail(s, "out of memory");
    int rc = -1;
    if (command(s, cmds, cap, &used, "LHLO %s", helo) < 0 || send_all(s, cmds, used) < 0 ||
        answer(s, C_LHLO, &r, ext, sizeof ext) < 0)
        goto out;
    if (r.code != 250) {
        fail(s, "LHLO: %d %s %s", r.code, r.status, r.text);
        goto out;
    }
    s->enhanced = strstr(ext, " ENHANCEDSTATUSCODES ") != NULL;
    char params[64 + PD_QUEUE_ID_MAX] = "";
    size_t pn = 0;
    if (strstr(ext, " SIZE "))
        pn += (size_t)snprintf(params + pn, sizeof params - pn, " SIZE=%zu", m->len);
    if (strstr(ext, " 8BITMIME "))
        pn += (size_t)snprintf(params + pn, sizeof params - pn, " BODY=8BITMIME");
    if (m->queue_id && strstr(ext, " XQUEUEID "))
        snprintf(params + pn, sizeof params - pn, " XQUEUEID=%s", m->queue_id);
    used = 0;
    if (command(s, cmds, cap, &used, "MAIL FROM:<%s>%s", m->sender, params) < 0)
        goto out;
    size_t mail_end = used;    /* without PIPELINING each line goes alone */
    for (size_t i = 0; i < m->nrcpts; i++)
        if (command(s, cmds, cap, &used, "RCPT TO:<%s>", m->rcpts[i]) < 0)
            goto out;
    if (strstr(ext, " PIPELINING ")) {
        if (send_all(s, cmds, used) < 0 || answer(s, C_MAIL, &mail, NULL, 0) < 0)
            goto out;
        for (size_t i = 0; i < m->nrcpts; i++)
            if (answer(s, C_RCPT, &replies[i], NULL, 0) < 0)
                goto out;
    } else {
        if (send_all(s, cmds, mail_end) < 0 || answer(s, C_MAIL, &mail, NULL, 0) < 0)
            goto out;
        size_t at = mail_end;
        for (size_t i = 0; i < m->nrcpts; i++) {
            size_t n = (size_t)((char *)memchr(cmds + at, '\n', used - at) - (cmds + at)) + 1;
            if (send_all(s, cmds + at, n) < 0 || answer(s, C_RCPT, &replies[i], NULL, 0) < 0)
                goto out;
            at += n;
        }
    }
    if (message(s, m, &mail, replies, strstr(ext, " CHUNKING ") != NULL) < 0)
        goto out;
    /* Only the 221 in its place proves that every reply above answered the
     * command it was taken for: no result without it. */
    if (send_all(s, "QUIT\r\n", 6) < 0 || answer(s, C_QUIT, &r, NULL, 0) < 0)
        goto out;
    if (s->len) {
        fail(s, "reply to no command: %.40s", s->buf);
        goto out;
    }
    rc = 0;
out:
    free(cmds);
    return rc;
}

int pd_lmtp_deliver(const char *host, long port, const pd_message *m, double connect_timeout, double timeout,
                    pd_reply *replies, char *err, size_t errcap)
{
    static session s;           /* its buffer is large: not on the stack */
    char where[PD_HOST_MAX + 32];
    snprintf(where, sizeof where, "%s:%ld", host, port);
    memset(&s, 0, offsetof(session, buf));
    s.len = 0;
    s.timeout_ms = timeout * 1000 > 2e9 ? 2000000000 : (int)(timeout * 1000);
    s.err = err, s.errcap = errcap, s.where = where;
    s.enhanced = 0;
    s.fd = connect_to(host, port, connect_timeout, err, errcap);
    if (s.fd < 0)
        return -1;
    int rc = transaction(&s, m, replies);
    close(s.fd);
    return rc;
}
