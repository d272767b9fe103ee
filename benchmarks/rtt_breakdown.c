/*
 * rtt_breakdown.c - where a getpwnam through libnss_pwserver.so.2 spends
 * its time, measured in one process with the peers interleaved (one sample
 * of each per name, in turn), so that the noise of a shared machine falls
 * on all of them alike:
 *
 *   echo    send + recv of 256 bytes to benchmarks/udp_echo.c (the limit)
 *   raw     send + recv of a real 256-byte PASSWD_BY_NAME request to
 *           pwserver on a connected socket: the server's turnaround
 *   module  _nss_pwserver_getpwnam_r called directly (dlopen): raw plus
 *           what the module adds
 *   glibc   getpwnam_r (nsswitch.conf says `passwd: pwserver`): module plus
 *           what glibc adds
 *
 *   rtt_breakdown ECHO_PORT PWSERVER_PORT NAMES_FILE ROUNDS MODULE_PATH [noglibc]
 *
 * Prints one line per peer: "peer samples median_ns p99_ns". Build:
 *   cc -O2 -I pwcache/_csrc -o rtt_breakdown benchmarks/rtt_breakdown.c \
 *      pwcache/_csrc/pw_wire.c -ldl
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <netinet/in.h>
#include <nss.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "bench_util.h"

#include "pw_wire.h"


static int udp_to(int port)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) < 0)
        exit(1);
    return fd;
}

typedef enum nss_status (*getpwnam_fn)(const char *, struct passwd *, char *, size_t, int *);

enum { ECHO, RAW, MODULE, GLIBC, NPEERS };
static const char *peer_names[NPEERS] = {"echo", "raw", "module", "glibc"};

int main(int argc, char **argv)
{
    if (argc < 6)
        return 2;
    int efd = udp_to(atoi(argv[1])), pfd = udp_to(atoi(argv[2]));
    int rounds = atoi(argv[4]), use_glibc = !(argc > 6 && strcmp(argv[6], "noglibc") == 0);
    void *h = dlopen(argv[5], RTLD_NOW);
    getpwnam_fn mod = h ? (getpwnam_fn)dlsym(h, "_nss_pwserver_getpwnam_r") : NULL;
    if (!mod) {
        fprintf(stderr, "rtt_breakdown: %s\n", dlerror());
        return 1;
    }
    size_t n;
    char **names = read_names(argv[3], &n);
    static char buf[16384];
    uint8_t pkt[PW_MAX_REQUEST], ans[9000], echo[256];
    memset(echo, 'x', sizeof echo);
    struct passwd pw, *res;
    int err;
    size_t total = n * (size_t)rounds, k = 0, bad = 0;
    long long *lat[NPEERS];
    for (int p = 0; p < NPEERS; p++)
        lat[p] = malloc(total * sizeof(long long));
    /* warm: open every socket, load the module */
    mod(names[0], &pw, buf, sizeof buf, &err);
    if (use_glibc)
        getpwnam_r(names[0], &pw, buf, sizeof buf, &res);
    for (int i = 0; i < 100; i++) {
        send(efd, echo, sizeof echo, 0);
        recv(efd, ans, sizeof ans, 0);
    }
    uint64_t id = 1;
    for (int r = 0; r < rounds; r++)
        for (size_t i = 0; i < n; i++, k++) {
            for (int p = 0; p < NPEERS; p++) {
                int q = (p + (int)k) % NPEERS; /* rotate which goes first */
                long long t = now_ns();
                switch (q) {
                case ECHO:
                    send(efd, echo, sizeof echo, 0);
                    recv(efd, ans, sizeof ans, 0);
                    break;
                case RAW: {
                    pw_request rq = {.id = ++id, .op = PW_OP_PASSWD_BY_NAME, .arg_kind = PW_ARG_STR,
                                     .name = names[i], .name_len = (uint32_t)strlen(names[i])};
                    int len = pw_encode_request(pkt, sizeof pkt, &rq, PW_REQUEST_PAD);
                    send(pfd, pkt, (size_t)len, 0);
                    ssize_t got = recv(pfd, ans, sizeof ans, 0);
                    bad += got < 20;
                    break;
                }
                case MODULE:
                    bad += mod(names[i], &pw, buf, sizeof buf, &err) != NSS_STATUS_SUCCESS;
                    break;
                case GLIBC:
                    if (use_glibc) {
                        getpwnam_r(names[i], &pw, buf, sizeof buf, &res);
                        bad += res == NULL;
                    }
                    break;
                }
                lat[q][k] = now_ns() - t;
            }
        }
    for (int p = 0; p < NPEERS; p++) {
        if (p == GLIBC && !use_glibc)
            continue;
        qsort(lat[p], total, sizeof(long long), cmp_ll);
        printf("%s %zu %lld %lld\n", peer_names[p], total, lat[p][total / 2], lat[p][(total * 99) / 100]);
    }
    if (bad)
        fprintf(stderr, "rtt_breakdown: %zu lookups failed\n", bad);
    return bad != 0;
}
