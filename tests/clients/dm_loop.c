/*
 * dm_loop: an acrn-dm-shaped device model for integration tests.
 *
 *   dm_loop NODE VCPU_AFFINITY [N]
 *
 * Creates a VM (zero-filled acrn_vm_creation, cpu_affinity from argv[2],
 * ioreq_buf = a static 4 KiB-aligned page in BSS, as acrn-dm does), prints
 * "vmid=<n> vcpu_num=<n>" and flushes, then a separate "vcpu loop" thread
 * does what acrn-dm's vm_loop does: CREATE_IOREQ_CLIENT, START_VM, and
 * forever ATTACH (blocking) / scan slots 0..vcpu_num-1 for processed ==
 * PROCESSING (acquire load) with kernel_handled == 0 / answer / NOTIFY.
 *
 * Reads are answered with a value derived from the request only (the same
 * formulas are in tests/support/answers.py):
 *   PIO:    (addr * 0x9E3779B1 + size)           mod 2^32, cut to size
 *   MMIO:   (addr * 0x9E3779B97F4A7C15 + size)   mod 2^64, cut to size
 *   PCICFG: ((bus<<16|dev<<11|func<<8|reg) * 0x9E3779B1 + size) mod 2^32, cut to size
 * Writes are only counted. Like acrn-dm it writes nothing but `value`.
 *
 * Stop: SIGTERM or SIGINT, or once N requests were handled if N is given.
 * The main thread then issues DESTROY_IOREQ_CLIENT while the loop thread is
 * (normally) blocked in ATTACH, which must return ENODEV; joins it; then
 * PAUSE_VM, DESTROY_VM, close, and prints
 *   stats attach_end=<errno name> notify_errors=<n> bad_type=<n> empty_wakeups=<n>
 *   handled total=<n> pio=<n> mmio=<n> pci=<n> vcpu0=<n> vcpu1=<n> ...
 * Exit status 0 if the loop ended with ENODEV and every ioctl of the
 * shutdown succeeded, 3 otherwise; 1 on set-up failure (message on stderr).
 *
 * A request handled twice cannot be seen from here (a slot carries no
 * sequence number); the counts are for the test to compare with the number
 * of requests the hypervisor issued.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include <linux/acrn.h>

/* The request page lives in this process, like acrn-dm's io_request_page. */
static struct acrn_io_request_buffer io_request_page __attribute__((aligned(4096)));

static int hsm_fd = -1;
static uint16_t vmid;
static uint16_t vcpu_num;
static pthread_t main_thread;
static unsigned long long stop_after;	/* 0: only on a signal */

/* Counters: written by the loop thread only, read by main after join. */
static unsigned long long handled_total, handled_pio, handled_mmio, handled_pci;
static unsigned long long handled_vcpu[ACRN_IO_REQUEST_MAX];
static unsigned long long notify_errors, bad_type, empty_wakeups;
static int attach_end_errno;

/* Start-up handshake: main waits until the client exists and the VM runs. */
static pthread_mutex_t ready_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t ready_cond = PTHREAD_COND_INITIALIZER;
static int ready_state;		/* 0 pending, 1 running, -1 failed */

static const char *errname(int e)
{
	const char *n = strerrorname_np(e);
	return n ? n : "UNKNOWN";
}

static uint64_t width_mask(uint64_t size)
{
	return size >= 8 ? ~0ULL : (1ULL << (8 * size)) - 1;
}

static uint32_t pio_answer(uint64_t addr, uint64_t size)
{
	return (uint32_t)((uint32_t)(addr * 0x9E3779B1u + size) & width_mask(size));
}

static uint64_t mmio_answer(uint64_t addr, uint64_t size)
{
	return (addr * 0x9E3779B97F4A7C15ULL + size) & width_mask(size);
}

static uint32_t pci_answer(uint32_t bus, uint32_t dev, uint32_t func, uint32_t reg, uint64_t size)
{
	uint32_t key = bus << 16 | dev << 11 | func << 8 | reg;
	return (uint32_t)((uint32_t)(key * 0x9E3779B1u + (uint32_t)size) & width_mask(size));
}

static void set_ready(int state)
{
	pthread_mutex_lock(&ready_lock);
	ready_state = state;
	pthread_cond_signal(&ready_cond);
	pthread_mutex_unlock(&ready_lock);
}

/* Handle one PROCESSING slot; returns 0, or -1 for a type acrn-dm cannot handle. */
static int handle(struct acrn_io_request *req, unsigned int vcpu)
{
	switch (req->type) {
	case ACRN_IOREQ_TYPE_PORTIO: {
		struct acrn_pio_request *p = &req->reqs.pio_request;
		if (p->direction == ACRN_IOREQ_DIR_READ)
			p->value = pio_answer(p->address, p->size);
		handled_pio++;
		break;
	}
	case ACRN_IOREQ_TYPE_MMIO: {
		struct acrn_mmio_request *m = &req->reqs.mmio_request;
		if (m->direction == ACRN_IOREQ_DIR_READ)
			m->value = mmio_answer(m->address, m->size);
		handled_mmio++;
		break;
	}
	case ACRN_IOREQ_TYPE_PCICFG: {
		struct acrn_pci_request *c = &req->reqs.pci_request;
		if (c->direction == ACRN_IOREQ_DIR_READ)
			c->value = pci_answer(c->bus, c->dev, c->func, c->reg, c->size);
		handled_pci++;
		break;
	}
	default:
		return -1;	/* acrn-dm exit(1)s here; we count and still complete it */
	}
	handled_vcpu[vcpu]++;
	handled_total++;
	return 0;
}

static void *vcpu_loop(void *arg)
{
	(void)arg;
	if (ioctl(hsm_fd, ACRN_IOCTL_CREATE_IOREQ_CLIENT, 0) < 0) {
		fprintf(stderr, "dm_loop: CREATE_IOREQ_CLIENT: %s\n", errname(errno));
		set_ready(-1);
		return NULL;
	}
	if (ioctl(hsm_fd, ACRN_IOCTL_START_VM, (unsigned long)vmid) < 0) {
		fprintf(stderr, "dm_loop: START_VM: %s\n", errname(errno));
		set_ready(-1);
		return NULL;
	}
	set_ready(1);

	int stop_sent = 0;
	for (;;) {
		if (ioctl(hsm_fd, ACRN_IOCTL_ATTACH_IOREQ_CLIENT, 0) != 0) {
			attach_end_errno = errno;
			break;
		}
		int found = 0;
		for (unsigned int i = 0; i < vcpu_num && i < ACRN_IO_REQUEST_MAX; i++) {
			struct acrn_io_request *req = &io_request_page.req_slot[i];
			if (__atomic_load_n(&req->processed, __ATOMIC_ACQUIRE) != ACRN_IOREQ_STATE_PROCESSING)
				continue;
			if (__atomic_load_n(&req->kernel_handled, __ATOMIC_RELAXED) != 0)
				continue;
			found = 1;
			if (handle(req, i) < 0)
				bad_type++;
			/* value before notify: the HSM reads it when it completes the slot */
			__atomic_thread_fence(__ATOMIC_RELEASE);
			struct acrn_ioreq_notify notify = { .vmid = vmid, .vcpu = i };
			if (ioctl(hsm_fd, ACRN_IOCTL_NOTIFY_REQUEST_FINISH, &notify) < 0)
				notify_errors++;
		}
		if (!found)
			empty_wakeups++;
		if (stop_after && !stop_sent && handled_total >= stop_after) {
			pthread_kill(main_thread, SIGTERM);
			stop_sent = 1;
		}
	}
	/* Normally main caused this (and ignores the extra signal); if not, start the shutdown. */
	pthread_kill(main_thread, SIGTERM);
	return NULL;
}

static int shutdown_ioctl(unsigned long cmd, const char *name)
{
	if (ioctl(hsm_fd, cmd, 0) < 0) {
		fprintf(stderr, "dm_loop: %s: %s\n", name, errname(errno));
		return -1;
	}
	return 0;
}

/*
 * `dm_loop --answers`: read "pio ADDR SIZE", "mmio ADDR SIZE" or
 * "pci BUS DEV FUNC REG SIZE" lines on stdin and print the value each read
 * would get, so tests can check tests/support/answers.py against this file.
 */
static int answers_mode(void)
{
	char kind[8], tok[5][32];
	unsigned long long a[5];
	while (scanf("%7s", kind) == 1) {
		int n = strcmp(kind, "pci") == 0 ? 5 : 2;
		for (int i = 0; i < n; i++) {
			if (scanf("%31s", tok[i]) != 1)
				return 2;
			a[i] = strtoull(tok[i], NULL, 0);	/* full u64 range, 0x prefix allowed */
		}
		if (strcmp(kind, "pci") == 0)
			printf("%" PRIu32 "\n", pci_answer(a[0], a[1], a[2], a[3], a[4]));
		else if (strcmp(kind, "pio") == 0)
			printf("%" PRIu32 "\n", pio_answer(a[0], a[1]));
		else if (strcmp(kind, "mmio") == 0)
			printf("%" PRIu64 "\n", mmio_answer(a[0], a[1]));
		else
			return 2;
	}
	return fflush(stdout) == 0 ? 0 : 1;
}

int main(int argc, char **argv)
{
	if (argc == 2 && strcmp(argv[1], "--answers") == 0)
		return answers_mode();
	if (argc < 3 || argc > 4) {
		fprintf(stderr, "usage: %s NODE VCPU_AFFINITY [N]\n", argv[0]);
		return 2;
	}
	char *end;
	unsigned long long affinity = strtoull(argv[2], &end, 0);
	if (*argv[2] == '\0' || *end != '\0') {
		fprintf(stderr, "dm_loop: bad VCPU_AFFINITY %s\n", argv[2]);
		return 2;
	}
	if (argc == 4) {
		stop_after = strtoull(argv[3], &end, 0);
		if (*argv[3] == '\0' || *end != '\0' || stop_after == 0) {
			fprintf(stderr, "dm_loop: bad N %s\n", argv[3]);
			return 2;
		}
	}

	/* Signals are taken synchronously by main (sigwait); every thread blocks them. */
	sigset_t stop_set;
	sigemptyset(&stop_set);
	sigaddset(&stop_set, SIGTERM);
	sigaddset(&stop_set, SIGINT);
	pthread_sigmask(SIG_BLOCK, &stop_set, NULL);
	main_thread = pthread_self();

	hsm_fd = open(argv[1], O_RDWR | O_CLOEXEC);
	if (hsm_fd < 0) {
		fprintf(stderr, "dm_loop: open %s: %s\n", argv[1], strerror(errno));
		return 1;
	}

	struct acrn_vm_creation create;
	memset(&create, 0, sizeof(create));
	create.ioreq_buf = (uint64_t)(uintptr_t)&io_request_page;
	create.cpu_affinity = affinity;
	if (ioctl(hsm_fd, ACRN_IOCTL_CREATE_VM, &create) < 0) {
		fprintf(stderr, "dm_loop: CREATE_VM: %s\n", errname(errno));
		return 1;
	}
	vmid = create.vmid;
	vcpu_num = create.vcpu_num;
	printf("vmid=%u vcpu_num=%u\n", vmid, vcpu_num);
	fflush(stdout);
	if (vcpu_num > ACRN_IO_REQUEST_MAX)
		fprintf(stderr, "dm_loop: vcpu_num %u > %d, scanning %d slots\n",
			vcpu_num, ACRN_IO_REQUEST_MAX, ACRN_IO_REQUEST_MAX);

	pthread_t loop;
	int rc = pthread_create(&loop, NULL, vcpu_loop, NULL);
	if (rc != 0) {
		fprintf(stderr, "dm_loop: pthread_create: %s\n", strerror(rc));
		return 1;
	}

	pthread_mutex_lock(&ready_lock);
	while (ready_state == 0)
		pthread_cond_wait(&ready_cond, &ready_lock);
	int started = ready_state > 0;
	pthread_mutex_unlock(&ready_lock);

	int ok = 1;
	if (started) {
		int sig;
		sigwait(&stop_set, &sig);
	} else {
		ok = 0;
	}

	/* acrn-dm's delete_cpu: destroy the client from this thread; ATTACH wakes with ENODEV. */
	if (shutdown_ioctl(ACRN_IOCTL_DESTROY_IOREQ_CLIENT, "DESTROY_IOREQ_CLIENT") < 0)
		ok = 0;
	pthread_join(loop, NULL);
	if (started && attach_end_errno != ENODEV)
		ok = 0;
	if (shutdown_ioctl(ACRN_IOCTL_PAUSE_VM, "PAUSE_VM") < 0)
		ok = 0;
	if (shutdown_ioctl(ACRN_IOCTL_DESTROY_VM, "DESTROY_VM") < 0)
		ok = 0;
	if (close(hsm_fd) < 0)
		ok = 0;

	printf("stats attach_end=%s notify_errors=%llu bad_type=%llu empty_wakeups=%llu\n",
	       started ? errname(attach_end_errno) : "NONE", notify_errors, bad_type,
	       empty_wakeups);
	printf("handled total=%llu pio=%llu mmio=%llu pci=%llu",
	       handled_total, handled_pio, handled_mmio, handled_pci);
	for (unsigned int i = 0; i < vcpu_num && i < ACRN_IO_REQUEST_MAX; i++)
		printf(" vcpu%u=%llu", i, handled_vcpu[i]);
	printf("\n");
	fflush(stdout);
	if (!started)
		return 1;
	return ok ? 0 : 3;
}
