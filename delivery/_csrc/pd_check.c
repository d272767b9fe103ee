/*
 * pd_check.c - what may go on an LMTP command line: the grammar of
 * delivery/lmtpclient.py (check_address, check_queue_id), so that an
 * argument with CR, LF or NUL can never be a command of its own.
 */
#include <stdio.h>
#include <string.h>

#include "pd.h"

/* One code point from s[*i..n), or -1 on invalid UTF-8 (overlong forms,
 * surrogates and values past U+10FFFF included, as Python refuses them). */
static long utf8_next(const unsigned char *s, size_t n, size_t *i)
{
    unsigned c = s[*i];
    int len;
    long cp, min;
    if (c < 0x80) {
        (*i)++;
        return c;
    }
    if ((c & 0xe0) == 0xc0)
        len = 2, cp = c & 0x1f, min = 0x80;
    else if ((c & 0xf0) == 0xe0)
        len = 3, cp = c & 0x0f, min = 0x800;
    else if ((c & 0xf8) == 0xf0)
        len = 4, cp = c & 0x07, min = 0x10000;
    else
        return -1;
    if (*i + len > n)
        return -1;
    for (int k = 1; k < len; k++) {
        if ((s[*i + k] & 0xc0) != 0x80)
            return -1;
        cp = cp << 6 | (s[*i + k] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
        return -1;
    *i += len;
    return cp;
}

int pd_utf8_valid(const char *s, size_t n)
{
    for (size_t i = 0; i < n;)
        if (utf8_next((const unsigned char *)s, n, &i) < 0)
            return 0;
    return 1;
}

/* Unicode categories Cc, Zs, Zl and Zp (Cs cannot be valid UTF-8). */
static int refused_code_point(long cp)
{
    return cp < 0x20 || (cp >= 0x7f && cp <= 0x9f) ||                         /* Cc */
           cp == ' ' || cp == 0xa0 || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200a) ||
           cp == 0x202f || cp == 0x205f || cp == 0x3000 ||                     /* Zs */
           cp == 0x2028 || cp == 0x2029 ||                                     /* Zl, Zp */
           cp == '<' || cp == '>';
}

const char *pd_shown(const char *text, char *buf, size_t cap)
{
    size_t o = 0, n = strlen(text);
    size_t shown = n > 80 ? 80 : n;
    if (cap < 8)
        return "";
    buf[o++] = '\'';
    for (size_t i = 0; i < shown && o + 6 < cap; i++) {
        unsigned char c = (unsigned char)text[i];
        if (c < 0x20 || c == 0x7f || c == '\\' || c == '\'')
            o += (size_t)snprintf(buf + o, cap - o, c == '\\' || c == '\'' ? "\\%c" : "\\x%02x", c);
        else
            buf[o++] = (char)c;
    }
    if (n > shown && o + 5 < cap)
        o += (size_t)snprintf(buf + o, cap - o, "...");
    buf[o++] = '\'';
    buf[o] = 0;
    return buf;
}

int pd_check_address(const char *text, const char *what, int empty_ok, char *out, char *err, size_t errcap)
{
    char shown[128];
    size_t n = strlen(text);
    const char *addr = text;
    if (n >= 2 && text[0] == '<' && text[n - 1] == '>')
        addr++, n -= 2;
    if (n == 0 && !empty_ok) {
        snprintf(err, errcap, "empty %s address", what);
        return -1;
    }
    for (size_t i = 0; i < n;) {
        size_t at = i;
        long cp = utf8_next((const unsigned char *)addr, n, &i);
        if (cp < 0 || refused_code_point(cp)) {
            if (cp < 0)
                snprintf(err, errcap, "%s address %s is not valid UTF-8", what, pd_shown(text, shown, sizeof shown));
            else
                snprintf(err, errcap, "%s address %s contains U+%04lX at byte %zu", what,
                         pd_shown(text, shown, sizeof shown), cp, at);
            return -1;
        }
    }
    if (n > PD_ADDRESS_MAX) {
        snprintf(err, errcap, "%s address longer than %d bytes: %s", what, PD_ADDRESS_MAX,
                 pd_shown(text, shown, sizeof shown));
        return -1;
    }
    memcpy(out, addr, n);
    out[n] = 0;
    return 0;
}

int pd_check_queue_id(const char *text, char *err, size_t errcap)
{
    size_t n = strlen(text);
    int ok = n >= 1 && n <= PD_QUEUE_ID_MAX;
    for (size_t i = 0; ok && i < n; i++) {
        char c = text[i];
        ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' ||
             c == '_' || c == '-';
    }
    if (!ok) {
        char shown[128];
        snprintf(err, errcap, "queue id %s is not 1 to %d letters, digits, '.', '_', '-'",
                 pd_shown(text, shown, sizeof shown), PD_QUEUE_ID_MAX);
        return -1;
    }
    return 0;
}
