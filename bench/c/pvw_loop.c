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

#include "ns_stats.h"

static char target[4096] __attribute__((aligned(4096)));

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
        uint64_t a = ns_now();
        if (process_vm_writev(child, &l, 1, &r, 1, 0) != (ssize_t)sizeof(src))
            return 1;
        t[i] = ns_now() - a;
    }
    kill(child, SIGKILL);
    waitpid(child, NULL, 0);
    ns_report(t, n);
    return 0;
}
