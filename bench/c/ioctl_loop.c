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

static int cmp(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

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
        struct timespec a, b;
        clock_gettime(CLOCK_MONOTONIC, &a);
        ioctl(fd, cmd, arg);
        clock_gettime(CLOCK_MONOTONIC, &b);
        t[i] = (uint64_t)(b.tv_sec - a.tv_sec) * 1000000000u + (uint64_t)(b.tv_nsec - a.tv_nsec);
    }
    double sum = 0;
    for (long i = 0; i < n; i++)
        sum += (double)t[i];
    qsort(t, (size_t)n, sizeof(*t), cmp);
    printf("ns p50=%llu p99=%llu mean=%.0f\n", (unsigned long long)t[n / 2],
           (unsigned long long)t[(n * 99) / 100], sum / (double)n);
    return 0;
}
