/*
 * ext_range: a range client of the acrn-hsm-emu extension ABI, for tests.
 *
 *   ext_range NODE VMID NAME [--tag T] [--hold] RANGE...
 *   RANGE: pio:START-END | mmio:START-END | pci:BDF-BDF   (numbers in C syntax,
 *          inclusive ends; a PCI end is bus << 8 | dev << 3 | func)
 *
 * Binds a fresh open file to VM VMID (ACRN_EMU_IOCTL_BIND_VM), creates the
 * range client NAME with a static 4 KiB-aligned request page in BSS, adds
 * every RANGE, prints "ready vcpu_num=<n> owner_uid=<u>" and flushes. A
 * "loop" thread then does what a device model does: ATTACH (blocking) / scan
 * its own page for PROCESSING with kernel_handled == 0 / answer / NOTIFY.
 *
 * Reads are answered with dm_loop's formula for the request, XOR the tag
 * (default 0), cut to the access size:
 *   PIO:    (addr * 0x9E3779B1 + size) mod 2^32
 *   MMIO:   (addr * 0x9E3779B97F4A7C15 + size) mod 2^64
 *   PCICFG: ((bus<<16|dev<<11|func<<8|reg) * 0x9E3779B1 + size) mod 2^32
 * Writes are summed: wsum += key * 31 + value (mod 2^64), key = the address
 * (PCI: the packed key above), so a test can check that every write reached
 * this process with its value.
 *
 * --hold: the first request is not answered; the loop prints
 * "holding vcpu=<i> kind=<pio|mmio|pci> addr=<hex> read=<0|1>", flushes and
 * sleeps forever (the test kills the process).
 *
 * Set-up failures print "error <op> <ERRNAME>" on stdout and exit 4.
 * Stop: SIGTERM/SIGINT -> the main thread issues DESTROY_IOREQ_CLIENT (the
 * loop's ATTACH must then fail with ENODEV), joins, closes, and prints
 *   stats attach_end=<ERRNAME> notify_errors=<n> outside=<n>
 *   handled total=<n> pio=<n> mmio=<n> pci=<n> reads=<n> writes=<n> wsum=<n>
 * "outside" counts requests that were not inside one of its own ranges.
 * Exit 0 if the loop ended with ENODEV and there were no errors, 3 otherwise.
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
#include <acrn_hsm_emu.h>

#define MAX_RANGES 16

static struct acrn_io_request_buffer page __attribute__((aligned(4096)));

static int fd = -1;
static unsigned vcpu_num;
static uint64_t tag;
static int hold;
static pthread_t main_thread;
static struct acrn_emu_range ranges[MAX_RANGES];
static int nranges;

static unsigned long long total, n_pio, n_mmio, n_pci, n_reads, n_writes, outside, notify_errors;
static uint64_t wsum;
static int attach_end_errno;

static const char *errname(int e)
{
	const char *n = strerrorname_np(e);
	return n ? n : "UNKNOWN";
}

static uint64_t width_mask(uint64_t size)
{
	return size >= 8 ? ~0ULL : (1ULL << (8 * size)) - 1;
}

static int fail(const char *op)
{
	printf("error %s %s\n", op, errname(errno));
	fflush(stdout);
	return 4;
}

static int parse_range(const char *arg, struct acrn_emu_range *r)
{
	const char *colon = strchr(arg, ':');
	if (!colon)
		return -1;
	size_t n = (size_t)(colon - arg);
	if (n == 3 && strncmp(arg, "pio", 3) == 0)
		r->type = ACRN_EMU_RANGE_PIO;
	else if (n == 4 && strncmp(arg, "mmio", 4) == 0)
		r->type = ACRN_EMU_RANGE_MMIO;
	else if (n == 3 && strncmp(arg, "pci", 3) == 0)
		r->type = ACRN_EMU_RANGE_PCI;
	else
		return -1;
	char *end;
	r->start = strtoull(colon + 1, &end, 0);
	if (*end != '-')
		return -1;
	r->end = strtoull(end + 1, &end, 0);
	if (*end != '\0')
		return -1;
	r->reserved = 0;
	return 0;
}

static int mine(const struct acrn_io_request *req)
{
	for (int k = 0; k < nranges; k++) {
		const struct acrn_emu_range *r = &ranges[k];
		if (r->type != req->type)
			continue;
		if (req->type == ACRN_IOREQ_TYPE_PCICFG) {
			const struct acrn_pci_request *c = &req->reqs.pci_request;
			uint64_t bdf = ACRN_EMU_PCI_BDF(c->bus, c->dev, c->func);
			if (r->start <= bdf && bdf <= r->end)
				return 1;
		} else {
			uint64_t a = req->reqs.pio_request.address;
			uint64_t s = req->reqs.pio_request.size;
			if (r->start <= a && a + s - 1 <= r->end)
				return 1;
		}
	}
	return 0;
}

static void handle(struct acrn_io_request *req)
{
	if (!mine(req))
		outside++;
	switch (req->type) {
	case ACRN_IOREQ_TYPE_PORTIO: {
		struct acrn_pio_request *p = &req->reqs.pio_request;
		if (p->direction == ACRN_IOREQ_DIR_READ) {
			p->value = (uint32_t)(((uint32_t)(p->address * 0x9E3779B1u + p->size) ^ tag)
					      & width_mask(p->size));
			n_reads++;
		} else {
			wsum += p->address * 31 + p->value;
			n_writes++;
		}
		n_pio++;
		break;
	}
	case ACRN_IOREQ_TYPE_MMIO: {
		struct acrn_mmio_request *m = &req->reqs.mmio_request;
		if (m->direction == ACRN_IOREQ_DIR_READ) {
			m->value = ((m->address * 0x9E3779B97F4A7C15ULL + m->size) ^ tag)
				   & width_mask(m->size);
			n_reads++;
		} else {
			wsum += m->address * 31 + m->value;
			n_writes++;
		}
		n_mmio++;
		break;
	}
	case ACRN_IOREQ_TYPE_PCICFG: {
		struct acrn_pci_request *c = &req->reqs.pci_request;
		uint32_t key = c->bus << 16 | c->dev << 11 | c->func << 8 | c->reg;
		if (c->direction == ACRN_IOREQ_DIR_READ) {
			c->value = (uint32_t)(((uint32_t)(key * 0x9E3779B1u + (uint32_t)c->size) ^ tag)
					      & width_mask(c->size));
			n_reads++;
		} else {
			wsum += (uint64_t)key * 31 + c->value;
			n_writes++;
		}
		n_pci++;
		break;
	}
	default:
		outside++;
		break;
	}
	total++;
}

static const char *kind(uint32_t type)
{
	return type == ACRN_IOREQ_TYPE_PORTIO ? "pio" : type == ACRN_IOREQ_TYPE_MMIO ? "mmio" : "pci";
}

static void *loop(void *arg)
{
	(void)arg;
	for (;;) {
		if (ioctl(fd, ACRN_IOCTL_ATTACH_IOREQ_CLIENT, 0) != 0) {
			attach_end_errno = errno;
			break;
		}
		for (unsigned i = 0; i < vcpu_num && i < ACRN_IO_REQUEST_MAX; i++) {
			struct acrn_io_request *req = &page.req_slot[i];
			if (__atomic_load_n(&req->processed, __ATOMIC_ACQUIRE) != ACRN_IOREQ_STATE_PROCESSING)
				continue;
			if (__atomic_load_n(&req->kernel_handled, __ATOMIC_RELAXED) != 0)
				continue;
			if (hold) {
				printf("holding vcpu=%u kind=%s addr=%#" PRIx64 " read=%d\n", i,
				       kind(req->type), (uint64_t)req->reqs.pio_request.address,
				       req->reqs.pio_request.direction == ACRN_IOREQ_DIR_READ);
				fflush(stdout);
				for (;;)
					pause();
			}
			handle(req);
			__atomic_thread_fence(__ATOMIC_RELEASE);
			struct acrn_ioreq_notify notify = { .vcpu = i };
			if (ioctl(fd, ACRN_IOCTL_NOTIFY_REQUEST_FINISH, &notify) < 0)
				notify_errors++;
		}
	}
	pthread_kill(main_thread, SIGTERM);
	return NULL;
}

int main(int argc, char **argv)
{
	if (argc < 4) {
		fprintf(stderr, "usage: %s NODE VMID NAME [--tag T] [--hold] RANGE...\n", argv[0]);
		return 2;
	}
	for (int k = 4; k < argc; k++) {
		if (strcmp(argv[k], "--tag") == 0 && k + 1 < argc) {
			tag = strtoull(argv[++k], NULL, 0);
		} else if (strcmp(argv[k], "--hold") == 0) {
			hold = 1;
		} else if (nranges < MAX_RANGES && parse_range(argv[k], &ranges[nranges]) == 0) {
			nranges++;
		} else {
			fprintf(stderr, "ext_range: bad argument %s\n", argv[k]);
			return 2;
		}
	}

	sigset_t stop;
	sigemptyset(&stop);
	sigaddset(&stop, SIGTERM);
	sigaddset(&stop, SIGINT);
	pthread_sigmask(SIG_BLOCK, &stop, NULL);
	main_thread = pthread_self();

	fd = open(argv[1], O_RDWR | O_CLOEXEC);
	if (fd < 0)
		return fail("open");
	struct acrn_emu_bind bind = { .vmid = (__u16)strtoul(argv[2], NULL, 0) };
	if (ioctl(fd, ACRN_EMU_IOCTL_BIND_VM, &bind) < 0)
		return fail("bind");
	vcpu_num = bind.vcpu_num;
	struct acrn_emu_range_client rc = { .ioreq_buf = (__u64)(uintptr_t)&page };
	strncpy(rc.name, argv[3], sizeof(rc.name) - 1);
	if (ioctl(fd, ACRN_EMU_IOCTL_CREATE_RANGE_CLIENT, &rc) < 0)
		return fail("create_range_client");
	for (int k = 0; k < nranges; k++)
		if (ioctl(fd, ACRN_EMU_IOCTL_ADD_RANGE, &ranges[k]) < 0)
			return fail("add_range");
	printf("ready vcpu_num=%u owner_uid=%u\n", bind.vcpu_num, bind.owner_uid);
	fflush(stdout);

	pthread_t t;
	if (pthread_create(&t, NULL, loop, NULL) != 0)
		return fail("pthread_create");
	int sig;
	sigwait(&stop, &sig);
	int ok = 1;
	if (ioctl(fd, ACRN_IOCTL_DESTROY_IOREQ_CLIENT, 0) < 0)
		ok = 0;
	pthread_join(t, NULL);
	if (attach_end_errno != ENODEV || notify_errors)
		ok = 0;
	if (close(fd) < 0)
		ok = 0;
	printf("stats attach_end=%s notify_errors=%llu outside=%llu\n",
	       errname(attach_end_errno), notify_errors, outside);
	printf("handled total=%llu pio=%llu mmio=%llu pci=%llu reads=%llu writes=%llu wsum=%" PRIu64 "\n",
	       total, n_pio, n_mmio, n_pci, n_reads, n_writes, wsum);
	fflush(stdout);
	return ok ? 0 : 3;
}
