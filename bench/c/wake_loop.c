/* What waking a waiting thread costs, by the two means a vCPU's wait has had:
 * a thread pair passes a token back and forth, each side waking the other
 * and waiting to be woken, timed round trip by round trip.
 *
 *   wake_loop N eventfd|futex [CPU CPU]
 *
 * eventfd: the waker writes the sleeper's eventfd; the sleeper waits in
 * poll(2) and then reads it (hsm_slot_cycle's wait until the eleventh
 * session). futex: the waker bumps the sleeper's word and calls FUTEX_WAKE
 * if it sleeps; the sleeper waits in FUTEX_WAIT on the word (hsm_vcpu_wake,
 * hsm_vcpu_sleep). Both wait with a timeout, as the vCPU does. Prints the
 * line of ns_stats.h for one round trip (two wake-ups). Run it pinned to one
 * CPU or to two, as the figure it is compared with runs: with two CPUs given,
 * the main thread runs on the first and its peer on the second. */
#define _GNU_SOURCE
#include <limits.h>
#include <sched.h>
#include <linux/futex.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "ns_stats.h"

struct side {
	int efd;
	uint32_t word, sleeping, seen;
};

static int use_futex;
static long rounds;
static int cpus[2] = { -1, -1 };
static struct side sides[2];

static void wake(struct side *s)
{
	if (!use_futex) {
		uint64_t one = 1;
		if (write(s->efd, &one, sizeof one) < 0)
			abort();
		return;
	}
	__atomic_add_fetch(&s->word, 1, __ATOMIC_SEQ_CST);
	if (__atomic_load_n(&s->sleeping, __ATOMIC_SEQ_CST))
		syscall(SYS_futex, &s->word, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

static void await_wake(struct side *s)
{
	if (!use_futex) {
		struct pollfd p = { s->efd, POLLIN, 0 };
		uint64_t n;
		while (poll(&p, 1, 500) <= 0)
			;
		if (read(s->efd, &n, sizeof n) < 0)
			abort();
		return;
	}
	for (;;) {
		uint32_t now = __atomic_load_n(&s->word, __ATOMIC_SEQ_CST);
		struct timespec t = { 0, 500000000 };
		if (now != s->seen) {
			s->seen = now;
			return;
		}
		__atomic_store_n(&s->sleeping, 1, __ATOMIC_SEQ_CST);
		syscall(SYS_futex, &s->word, FUTEX_WAIT_PRIVATE, s->seen, &t, NULL, 0);
		__atomic_store_n(&s->sleeping, 0, __ATOMIC_RELAXED);
	}
}

static void pin(int cpu)
{
	cpu_set_t set;
	if (cpu < 0)
		return;
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	if (pthread_setaffinity_np(pthread_self(), sizeof set, &set)) {
		fprintf(stderr, "wake_loop: cannot run on CPU %d\n", cpu);
		exit(1);
	}
}

static void *peer(void *arg)
{
	(void)arg;
	pin(cpus[1]);
	for (long k = 0; k < rounds; k++) {
		await_wake(&sides[1]);
		wake(&sides[0]);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	pthread_t t;
	uint64_t *ns;
	if ((argc != 3 && argc != 5) || (strcmp(argv[2], "eventfd") && strcmp(argv[2], "futex"))) {
		fprintf(stderr, "usage: wake_loop N eventfd|futex [CPU CPU]\n");
		return 2;
	}
	if (argc == 5) {
		cpus[0] = atoi(argv[3]);
		cpus[1] = atoi(argv[4]);
		pin(cpus[0]);
	}
	rounds = atol(argv[1]);
	use_futex = !strcmp(argv[2], "futex");
	ns = calloc((size_t)rounds, sizeof *ns);
	for (int i = 0; i < 2; i++)
		if ((sides[i].efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) < 0)
			return 1;
	if (!ns || pthread_create(&t, NULL, peer, NULL))
		return 1;
	for (long k = 0; k < rounds; k++) {
		uint64_t t0 = ns_now();
		wake(&sides[1]);
		await_wake(&sides[0]);
		ns[k] = ns_now() - t0;
	}
	pthread_join(t, NULL);
	ns_report(ns, rounds);
	return 0;
}
