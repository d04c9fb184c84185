/* Floor: process_vm_writev of 256 bytes into another process, N times.
 * Usage: pvw_loop N   (prints "ns p50=.. p99=.. mean=..") */
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static char target[4096] __attribute__((aligned(4096)));

static int cmp(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
    long n = argc > 1 ? strtol(argv[1], NULL, 0) : 100000;
    pid_t child = fork();
    if (child == 0) {
        for (;;)
            pause();
    }
    char src[256] = {1};
    uint64_t *t = calloc((size_t)n, sizeof(*t));
    struct iovec l = { src, sizeof(src) }, r = { target, sizeof(src) };
    for (long i = 0; i < n; i++) {
        struct timespec a, b;
        clock_gettime(CLOCK_MONOTONIC, &a);
        if (process_vm_writev(child, &l, 1, &r, 1, 0) != (ssize_t)sizeof(src))
            return 1;
        clock_gettime(CLOCK_MONOTONIC, &b);
        t[i] = (uint64_t)(b.tv_sec - a.tv_sec) * 1000000000u + (uint64_t)(b.tv_nsec - a.tv_nsec);
    }
    kill(child, SIGKILL);
    waitpid(child, NULL, 0);
    double sum = 0;
    for (long i = 0; i < n; i++)
        sum += (double)t[i];
    qsort(t, (size_t)n, sizeof(*t), cmp);
    printf("ns p50=%llu p99=%llu mean=%.0f\n", (unsigned long long)t[n / 2],
           (unsigned long long)t[(n * 99) / 100], sum / (double)n);
    return 0;
}
