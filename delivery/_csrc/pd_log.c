/*
 * pd_log.c - pdelivery's log lines, as pwmail/base/logsetup.py writes them
 * for the Python programs: to syslog (facility mail) at /dev/log, or where
 * PWMAIL_SYSLOG says (HOST:PORT over UDP, or a socket path), as
 * "<PRI>pdelivery[PID]: LEVEL message"; and to stderr when asked
 * (--log-stderr) or when there is no syslog socket.
 */
#include <netdb.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "pd.h"

#define LOG_FACILITY_MAIL 2
#define LOG_LINE_MAX 2048

static int g_syslog = -1;      /* a connected socket, or -1 */
static int g_stream;           /* g_syslog is SOCK_STREAM */
static int g_stderr;

static int connect_udp(const char *hostport)
{
    char host[256];
    const char *colon = strrchr(hostport, ':');
    size_t n = (size_t)(colon - hostport);
    if (n >= sizeof host)
        return -1;
    memcpy(host, hostport, n);
    host[n] = 0;
    struct addrinfo hints = {.ai_socktype = SOCK_DGRAM}, *ai;
    if (getaddrinfo(host, colon + 1, &hints, &ai) != 0)
        return -1;
    int fd = socket(ai->ai_family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd >= 0 && connect(fd, ai->ai_addr, ai->ai_addrlen) < 0) {
        close(fd);
        fd = -1;
    }
    freeaddrinfo(ai);
    return fd;
}

static int connect_unix(const char *path)
{
    struct sockaddr_un sun = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof sun.sun_path)
        return -1;
    strcpy(sun.sun_path, path);
    /* datagrams first, then a stream, as Python's SysLogHandler */
    for (int type = SOCK_DGRAM; ; type = SOCK_STREAM) {
        int fd = socket(AF_UNIX, type | SOCK_CLOEXEC, 0);
        if (fd >= 0 && connect(fd, (struct sockaddr *)&sun, sizeof sun) == 0) {
            g_stream = type == SOCK_STREAM;
            return fd;
        }
        if (fd >= 0)
            close(fd);
        if (type == SOCK_STREAM)
            return -1;
    }
}

void pd_log_open(int to_stderr)
{
    const char *where = getenv("PWMAIL_SYSLOG");
    if (where && *where && strchr(where, ':') && where[0] != '/')
        g_syslog = connect_udp(where);
    else
        g_syslog = connect_unix(where && *where ? where : "/dev/log");
    g_stderr = to_stderr || g_syslog < 0;
}

static const char *level_name(int level)
{
    return level == PD_LOG_ERROR ? "ERROR" : level == PD_LOG_WARNING ? "WARNING" : "INFO";
}

void pd_log(int level, const char *fmt, ...)
{
    char msg[LOG_LINE_MAX], line[LOG_LINE_MAX + 128];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    for (char *p = msg; *p; p++)          /* one record, one line */
        if (*p == '\n' || *p == '\r')
            *p = ' ';
    if (g_syslog >= 0) {
        int n = snprintf(line, sizeof line, "<%d>pdelivery[%d]: %s %s", LOG_FACILITY_MAIL << 3 | level,
                         (int)getpid(), level_name(level), msg);
        if (n > (int)sizeof line - 1)
            n = (int)sizeof line - 1;
        line[n++] = 0;                    /* as SysLogHandler: NUL-terminated */
        (void)!send(g_syslog, line, (size_t)n, MSG_NOSIGNAL);
    }
    if (g_stderr) {
        struct timeval tv;
        struct tm tm;
        char when[32];
        gettimeofday(&tv, NULL);
        strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S", localtime_r(&tv.tv_sec, &tm));
        fprintf(stderr, "%s,%03d pdelivery[%d]: %s %s\n", when, (int)(tv.tv_usec / 1000), (int)getpid(),
                level_name(level), msg);
    }
}
