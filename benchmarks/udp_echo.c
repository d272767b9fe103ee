/*
 * udp_echo.c - the physical limit of any network lookup: a minimal C UDP
 * echo server and a client timing round trips of SIZE-byte datagrams.
 *
 *   udp_echo server PORT           (serves until killed)
 *   udp_echo client PORT N SIZE    prints "samples median_ns p99_ns"
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "bench_util.h"


int main(int argc, char **argv)
{
    if (argc < 3)
        return 2;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(argv[2]))};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    char buf[2048];
    if (strcmp(argv[1], "server") == 0) {
        if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0)
            return 1;
        for (;;) {
            struct sockaddr_in from;
            socklen_t fl = sizeof from;
            ssize_t n = recvfrom(fd, buf, sizeof buf, 0, (struct sockaddr *)&from, &fl);
            if (n >= 0)
                sendto(fd, buf, (size_t)n, 0, (struct sockaddr *)&from, fl);
        }
    }
    int n = atoi(argv[3]), size = atoi(argv[4]);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0)
        return 1;
    memset(buf, 'x', sizeof buf);
    long long *lat = malloc((size_t)n * sizeof *lat);
    for (int i = -100; i < n; i++) { /* 100 untimed first */
        long long t = now_ns();
        send(fd, buf, (size_t)size, 0);
        recv(fd, buf, sizeof buf, 0);
        if (i >= 0)
            lat[i] = now_ns() - t;
    }
    qsort(lat, (size_t)n, sizeof *lat, cmp_ll);
    printf("%d %lld %lld\n", n, lat[n / 2], lat[(n * 99) / 100]);
    return 0;
}
