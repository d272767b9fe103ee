/*
 * nss_latency.c - getpwnam_r latency through glibc, whatever nsswitch.conf
 * names (benchmarks/bench_nss.py sets it up in a private mount namespace).
 *
 *   nss_latency NAMES_FILE ROUNDS [warm]
 *
 * Looks up every name of NAMES_FILE (one a line) ROUNDS times, timing each
 * call; `warm` first looks every name up once untimed (nscd hits). Prints
 * "samples found median_ns p99_ns".
 */
#define _GNU_SOURCE
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench_util.h"


int main(int argc, char **argv)
{
    if (argc < 3)
        return 2;
    int rounds = atoi(argv[2]), warm = argc > 3 && strcmp(argv[3], "warm") == 0;
    size_t n;
    char **names = read_names(argv[1], &n);
    static char buf[16384];
    struct passwd pw, *res;
    /* load the module and open what it opens, untimed */
    getpwnam_r(names[0], &pw, buf, sizeof buf, &res);
    if (warm)
        for (size_t i = 0; i < n; i++)
            getpwnam_r(names[i], &pw, buf, sizeof buf, &res);
    size_t total = n * (size_t)rounds, found = 0, k = 0;
    long long *lat = malloc(total * sizeof *lat);
    for (int r = 0; r < rounds; r++)
        for (size_t i = 0; i < n; i++) {
            long long t = now_ns();
            getpwnam_r(names[i], &pw, buf, sizeof buf, &res);
            lat[k++] = now_ns() - t;
            found += res != NULL && strcmp(res->pw_name, names[i]) == 0;
        }
    qsort(lat, total, sizeof *lat, cmp_ll);
    printf("%zu %zu %lld %lld\n", total, found, lat[total / 2], lat[(total * 99) / 100]);
    return 0;
}
