/*
 * pwserver_loadgen.c - UDP query load for pwserver and its peers.
 *
 *   pwserver_loadgen HOST PORT PROCS INFLIGHT SECONDS NUSERS
 *
 * PROCS client processes, each keeping INFLIGHT requests outstanding on
 * one connected UDP socket: every answer received sends the next request.
 * Requests are PASSWD_BY_NAME for random users of
 * tests/pwserver_util.write_many_users, padded to 256 bytes as clients do
 * (so an echo server sends back as many bytes as it got). A window that
 * stays silent for 50 ms is primed again (lost datagrams).
 * Prints: "answers_per_s timeouts".
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define POOL 4096
#define PAD 256

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* [1, id, 1, name, bin padding] as msgpack, PAD bytes in all. */
static size_t make_request(uint8_t *out, uint64_t id, const char *name)
{
    size_t n = strlen(name), k = 0;
    out[k++] = 0x95;
    out[k++] = 0x01;
    out[k++] = 0xcf;
    for (int i = 7; i >= 0; i--)
        out[k++] = (uint8_t)(id >> (8 * i));
    out[k++] = 0x01;
    out[k++] = (uint8_t)(0xa0 | n);
    memcpy(out + k, name, n);
    k += n;
    size_t pad = PAD - k - 2;
    out[k++] = 0xc4;
    out[k++] = (uint8_t)pad;
    memset(out + k, 0, pad);
    return k + pad;
}

static void client(const char *host, int port, int inflight, double seconds, long nusers, int wfd, unsigned seed)
{
    static uint8_t pool[POOL][PAD];
    static size_t lens[POOL];
    char name[32];
    srand(seed);
    for (int i = 0; i < POOL; i++) {
        long u = ((long)rand() * RAND_MAX + rand()) % nusers;
        snprintf(name, sizeof name, "%cuser%07ld", (char)('a' + u % 26), u);
        lens[i] = make_request(pool[i], ((uint64_t)seed << 32) | (uint64_t)i, name);
    }
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, host, &a.sin_addr);
    if (s < 0 || connect(s, (struct sockaddr *)&a, sizeof a) < 0) {
        perror("socket");
        exit(1);
    }
    struct timeval tv = {0, 50000};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    long answers = 0, timeouts = 0, next = 0;
    uint8_t buf[9000];
    double end = now_s() + seconds;
    for (int i = 0; i < inflight; i++, next++)
        send(s, pool[next % POOL], lens[next % POOL], 0);
    while (now_s() < end) {
        ssize_t n = recv(s, buf, sizeof buf, 0);
        if (n < 0) {
            timeouts++;
            for (int i = 0; i < inflight; i++, next++)
                send(s, pool[next % POOL], lens[next % POOL], 0);
            continue;
        }
        answers++;
        send(s, pool[next % POOL], lens[next % POOL], 0);
        next++;
    }
    char line[64];
    int len = snprintf(line, sizeof line, "%ld %ld\n", answers, timeouts);
    if (write(wfd, line, (size_t)len) != len)
        exit(1);
    exit(0);
}

int main(int argc, char **argv)
{
    if (argc != 7) {
        fprintf(stderr, "usage: %s HOST PORT PROCS INFLIGHT SECONDS NUSERS\n", argv[0]);
        return 2;
    }
    int procs = atoi(argv[3]), inflight = atoi(argv[4]);
    double seconds = atof(argv[5]);
    long nusers = atol(argv[6]);
    int fds[2];
    if (pipe(fds) < 0)
        return 1;
    for (int p = 0; p < procs; p++)
        if (fork() == 0) {
            close(fds[0]);
            client(argv[1], atoi(argv[2]), inflight, seconds, nusers, fds[1], (unsigned)p + 1);
        }
    close(fds[1]);
    FILE *f = fdopen(fds[0], "r");
    long total = 0, timeouts = 0, a, t;
    while (fscanf(f, "%ld %ld", &a, &t) == 2) {
        total += a;
        timeouts += t;
    }
    while (wait(NULL) > 0)
        ;
    printf("%.0f %ld\n", total / seconds, timeouts);
    return 0;
}
