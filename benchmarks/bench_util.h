/*
 * bench_util.h - what the C benchmark tools share: a monotonic clock in
 * nanoseconds, a comparison for sorting latencies (qsort), and reading a
 * file of names (one a line).
 */
#ifndef BENCH_UTIL_H
#define BENCH_UTIL_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static inline long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static inline int cmp_ll(const void *a, const void *b)
{
    long long x = *(const long long *)a, y = *(const long long *)b;
    return (x > y) - (x < y);
}

/* The lines of `path` (at most 255 bytes each); exits 2 when unreadable. */
static inline char **read_names(const char *path, size_t *count)
{
    FILE *f = fopen(path, "r");
    if (!f)
        exit(2);
    char **names = NULL, line[256];
    size_t n = 0;
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = '\0';
        names = realloc(names, (n + 1) * sizeof *names);
        names[n++] = strdup(line);
    }
    fclose(f);
    if (n == 0)
        exit(2);
    *count = n;
    return names;
}

#endif /* BENCH_UTIL_H */
