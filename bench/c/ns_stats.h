/* Shared by the bench's C floors: a monotonic clock in ns, and the one line
 * bench/run.py parses ("ns p50=.. p99=.. mean=..") from n samples (sorted here). */
#ifndef NS_STATS_H
#define NS_STATS_H
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static inline uint64_t ns_now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static int ns_cmp(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

static inline void ns_report(uint64_t *t, long n)
{
	double sum = 0;
	for (long i = 0; i < n; i++)
		sum += (double)t[i];
	qsort(t, (size_t)n, sizeof(*t), ns_cmp);
	printf("ns p50=%llu p99=%llu mean=%.0f\n", (unsigned long long)t[n / 2],
	       (unsigned long long)t[(n * 99) / 100], sum / (double)n);
}
#endif
