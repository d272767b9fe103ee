/*
 * bench_table_delta.c - the answer path in C (pws_answer, PASSWD_BY_NAME for
 * random users of a 100,000-user table) with no delta and with a delta of
 * changed users (pwt_apply; docs/pwserver.md, "Changes without a reload").
 * Best of 5 runs. Build and run by hand (never in make test):
 *
 *   S=pwcache/_csrc; gcc -std=gnu11 -O2 -fvisibility=hidden -I $S benchmarks/bench_table_delta.c \
 *       $S/pw_wire.c $S/pw_seal.c $S/pw_placement.c $S/pw_table.c $S/pw_delta.c $S/pw_server.c \
 *       -ldl -lpthread -lm -o /tmp/bench_table_delta
 *   /tmp/bench_table_delta [answers a run, default 2000000] [changed users, default 0]
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "pw_server.h"
#include "pw_wire.h"

#define USERS 100000
#define PACKETS 4096

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void user_line(char *out, size_t cap, int i, const char *gecos, size_t *len)
{
    *len = (size_t)snprintf(out, cap, "auser%07d:x:%d:100:%s:/home/u%d:/bin/sh", i, 1000 + i, gecos, i);
}

int main(int argc, char **argv)
{
    int answers = argc > 1 ? atoi(argv[1]) : 2000000, changed = argc > 2 ? atoi(argv[2]) : 0;
    char *passwd = malloc((size_t)USERS * 64), err[128];
    size_t n = 0, len;
    for (int i = 0; i < USERS; i++) {
        user_line(passwd + n, 64, i, "gecos", &len);
        n += len;
        passwd[n++] = '\n';
    }
    pwt_table *t = pwt_build(passwd, n, NULL, 0, NULL, 0, NULL, 0, NULL, err, sizeof err);
    pws_server *s = pws_new();
    int slot = pws_slot_acquire(s);
    if (!t || !s || slot < 0)
        return 1;
    pws_swap_table(s, t, 1, 0);
    if (changed > 0) {
        pwt_change *ch = calloc((size_t)changed, sizeof *ch);
        char (*text)[96] = calloc((size_t)changed, 96);
        for (int i = 0; i < changed; i++) {
            user_line(text[i], 96, i * (USERS / changed), "changed", &ch[i].len);
            ch[i].kind = PWT_CH_PASSWD;
            ch[i].text = text[i];
        }
        pwt_table *with_delta = pwt_apply(t, ch, (size_t)changed, NULL, NULL, err, sizeof err);
        if (!with_delta)
            return 1;
        pwt_free(pws_swap_table(s, with_delta, 2, 0));
    }
    static uint8_t packet[PACKETS][64], out[PW_MAX_TCP_ANSWER + PW_SEAL_OVERHEAD];
    static int plen[PACKETS];
    uint64_t r = 88172645463325252ull;
    for (int i = 0; i < PACKETS; i++) {
        char name[32];
        r ^= r << 13, r ^= r >> 7, r ^= r << 17;
        snprintf(name, sizeof name, "auser%07d", (int)(r % USERS));
        pw_request rq = {.id = r, .op = PW_OP_PASSWD_BY_NAME, .arg_kind = PW_ARG_STR, .name = name,
                         .name_len = (uint32_t)strlen(name)};
        plen[i] = pw_encode_request(packet[i], sizeof packet[i], &rq, 0);
    }
    double best = 1e9;
    for (int run = 0; run < 5; run++) {
        double t0 = now();
        size_t sum = 0;
        for (int q = 0; q < answers; q++)
            sum += pws_answer(s, slot, packet[q % PACKETS], (size_t)plen[q % PACKETS], 1, out, sizeof out);
        double dt = now() - t0;
        best = dt < best ? dt : best;
        if (!sum)
            return 1;
    }
    printf("%d changed users: %.1f ns an answer\n", changed, best / answers * 1e9);
    pwt_free(pws_swap_table(s, NULL, 0, 0));
    pws_free(s);
    free(passwd);
    return 0;
}
