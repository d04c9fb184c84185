/* Times N round trips of one ioctl on a node: ioctl_loop NODE N CMD [ARG]
 * Prints one line per call count: "ns p50=.. p99=.. mean=.." (nanoseconds). */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#include "ns_stats.h"

int main(int argc, char **argv)
{
    if (argc < 4)
        return 2;
    int fd = open(argv[1], O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        perror("open");
        return 1;
    }
    long n = strtol(argv[2], NULL, 0);
    unsigned long cmd = strtoul(argv[3], NULL, 0);
    unsigned long arg = argc > 4 ? strtoul(argv[4], NULL, 0) : 0;
    uint64_t *t = calloc((size_t)n, sizeof(*t));
    for (long i = 0; i < 200; i++) /* warm-up */
        ioctl(fd, cmd, arg);
    for (long i = 0; i < n; i++) {
        uint64_t a = ns_now();
        ioctl(fd, cmd, arg);
        t[i] = ns_now() - a;
    }
    ns_report(t, n);
    return 0;
}
