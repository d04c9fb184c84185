/*
 * value_ioctl: issues ioctls with value arguments on command, line by line, from
 * the main thread or from a second thread; plain <linux/acrn.h>, like any ACRN
 * device model. Driven by tests/test_launcher.py, with and without the launcher.
 *
 *   value_ioctl NODE
 *
 * At start it opens NODE and creates a VM on it (fd "vm"), opens NODE again
 * without a VM ("novm"), opens /dev/null ("null"), and takes a number that is
 * not an open fd ("closed"), then prints
 *   ready pid=P vmid=N vm=FD novm=FD null=FD closed=FD
 * Commands:
 *   call T FD CMD ARG   ioctl(FD, CMD, ARG) from thread T (0 main, 1 the second);
 *                       FD decimal, CMD and ARG hex (64 bits);
 *                       CMD is passed as an unsigned long, upper bits and all
 *                       -> "ret R errno E" (E 0 when R >= 0)
 *   nodump              prctl(PR_SET_DUMPABLE, 0) -> "ok"
 *   storm T N GSI US    T threads each make N SET_IRQLINE (RAISING_PULSE on GSI) on the
 *                       VM's fd; with US > 0 a SIGALRM every US microseconds interrupts
 *                       them (a handler without SA_RESTART) -> "storm ok=A eintr=B other=C"
 *   quit
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/time.h>
#include <signal.h>
#include <unistd.h>
#include <linux/acrn.h>

static struct acrn_io_request_buffer io_request_page __attribute__((aligned(4096)));

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static int pending, done;
static int job_fd;
static unsigned long job_cmd, job_arg;
static int job_ret, job_errno;

static int storm_fd, storm_n;
static unsigned long storm_arg;
static long storm_ok, storm_eintr, storm_other;

static void on_alarm(int sig)
{
	(void)sig;
}

static void *storm_thread(void *unused)
{
	long ok = 0, eintr = 0, other = 0;
	for (int i = 0; i < storm_n; i++) {
		if (ioctl(storm_fd, ACRN_IOCTL_SET_IRQLINE, storm_arg) == 0)
			ok++;
		else if (errno == EINTR)
			eintr++;
		else
			other++;
	}
	__atomic_add_fetch(&storm_ok, ok, __ATOMIC_SEQ_CST);
	__atomic_add_fetch(&storm_eintr, eintr, __ATOMIC_SEQ_CST);
	__atomic_add_fetch(&storm_other, other, __ATOMIC_SEQ_CST);
	return NULL;
}

static void storm(int vm, int threads, int n, unsigned gsi, long us)
{
	pthread_t t[64];
	struct sigaction sa = { .sa_handler = on_alarm };	/* no SA_RESTART */
	struct itimerval it = { .it_interval = { 0, us }, .it_value = { 0, us } };

	storm_fd = vm;
	storm_n = n;
	storm_arg = 2ul << 32 | gsi;
	storm_ok = storm_eintr = storm_other = 0;
	if (threads > 64)
		threads = 64;
	if (us > 0) {
		sigaction(SIGALRM, &sa, NULL);
		setitimer(ITIMER_REAL, &it, NULL);
	}
	for (int i = 0; i < threads; i++)
		pthread_create(&t[i], NULL, storm_thread, NULL);
	for (int i = 0; i < threads; i++)
		pthread_join(t[i], NULL);
	if (us > 0) {
		struct itimerval off = { { 0, 0 }, { 0, 0 } };
		setitimer(ITIMER_REAL, &off, NULL);
	}
	printf("storm ok=%ld eintr=%ld other=%ld\n", storm_ok, storm_eintr, storm_other);
}

static void call(int fd, unsigned long cmd, unsigned long arg, int *ret, int *err)
{
	errno = 0;
	*ret = ioctl(fd, cmd, arg);
	*err = *ret < 0 ? errno : 0;
}

static void *second_thread(void *unused)
{
	pthread_mutex_lock(&lock);
	for (;;) {
		while (!pending)
			pthread_cond_wait(&cond, &lock);
		call(job_fd, job_cmd, job_arg, &job_ret, &job_errno);
		pending = 0;
		done = 1;
		pthread_cond_broadcast(&cond);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	char line[256];
	pthread_t t;

	if (argc != 2) {
		fprintf(stderr, "usage: value_ioctl NODE\n");
		return 2;
	}
	int vm = open(argv[1], O_RDWR | O_CLOEXEC);
	int novm = open(argv[1], O_RDWR | O_CLOEXEC);
	int null = open("/dev/null", O_RDWR | O_CLOEXEC);
	int closed = open("/dev/null", O_RDONLY | O_CLOEXEC);
	if (vm < 0 || novm < 0 || null < 0 || closed < 0) {
		perror("value_ioctl: open");
		return 1;
	}
	close(closed);
	struct acrn_vm_creation create_vm;
	memset(&create_vm, 0, sizeof(create_vm));
	create_vm.ioreq_buf = (uint64_t)(uintptr_t)&io_request_page;
	if (ioctl(vm, ACRN_IOCTL_CREATE_VM, &create_vm) < 0) {
		perror("value_ioctl: CREATE_VM");
		return 1;
	}
	if (pthread_create(&t, NULL, second_thread, NULL)) {
		perror("value_ioctl: pthread_create");
		return 1;
	}
	printf("ready pid=%d vmid=%u vm=%d novm=%d null=%d closed=%d\n", getpid(), create_vm.vmid,
	       vm, novm, null, closed);
	fflush(stdout);
	while (fgets(line, sizeof(line), stdin)) {
		int th, fd, ret, err;
		unsigned long cmd, arg;
		if (sscanf(line, "call %d %d %lx %lx", &th, &fd, &cmd, &arg) == 4) {
			if (th == 0) {
				call(fd, cmd, arg, &ret, &err);
			} else {
				pthread_mutex_lock(&lock);
				job_fd = fd;
				job_cmd = cmd;
				job_arg = arg;
				done = 0;
				pending = 1;
				pthread_cond_broadcast(&cond);
				while (!done)
					pthread_cond_wait(&cond, &lock);
				ret = job_ret;
				err = job_errno;
				pthread_mutex_unlock(&lock);
			}
			printf("ret %d errno %d\n", ret, err);
		} else if (sscanf(line, "storm %d %d %i %li", &th, &ret, &fd, &arg) == 4) {
			storm(vm, th, ret, (unsigned)fd, (long)arg);
		} else if (!strncmp(line, "nodump", 6)) {
			printf(prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) ? "err\n" : "ok\n");
		} else if (!strncmp(line, "quit", 4)) {
			break;
		} else {
			printf("bad command\n");
		}
		fflush(stdout);
	}
	return 0;
}
