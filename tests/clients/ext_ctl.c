/*
 * ext_ctl: drive one open file of the node from a test, one command per line.
 *
 *   ext_ctl NODE        (commands on stdin, one answer line per command)
 *
 * Answers are "ok ..." or "err <ERRNAME>" (the ioctl's errno). Numbers in
 * C syntax. Commands:
 *   version                      ACRN_EMU_IOCTL_VERSION -> ok major= minor= features=
 *   create AFFINITY              CREATE_VM, request page static in BSS -> ok vmid= vcpu_num=
 *   client                       CREATE_IOREQ_CLIENT + a default-client thread
 *                                (answers reads as dm_loop does, counts everything)
 *   start | pause | destroy      START_VM / PAUSE_VM / DESTROY_VM
 *   forbid TYPE START END        the default client counts requests wholly inside
 *                                this range (TYPE pio|mmio) as "forbidden"
 *   seen                         ok total= pio= mmio= pci= writes= wsum= forbidden=
 *                                (default client; wsum as ext_range computes it)
 *   bind VMID                    ACRN_EMU_IOCTL_BIND_VM -> ok vcpu_num= owner_uid=
 *   rc NAME                      ACRN_EMU_IOCTL_CREATE_RANGE_CLIENT (static page)
 *   range TYPE START END [RSV]   ACRN_EMU_IOCTL_ADD_RANGE (TYPE pio|mmio|pci|number)
 *   delrange TYPE START END      ACRN_EMU_IOCTL_DEL_RANGE
 *   eventfd                      a new non-blocking eventfd -> ok fd=
 *   pipe                         a pipe -> ok fd=<read end>
 *   closefd FD
 *   ioeventfd FD FLAGS ADDR LEN DATA [RESERVED]
 *   irqfd FD FLAGS MSI_ADDR MSI_DATA
 *   signal FD N                  N separate eventfd writes of 1
 *   count FD                     read the counter without blocking -> ok value=
 *   msi ADDR DATA                INJECT_MSI
 *   quit                         stop the default client (DESTROY_IOREQ_CLIENT),
 *                                close the file, exit 0
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
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include <linux/acrn.h>
#include <acrn_hsm_emu.h>

static struct acrn_io_request_buffer vm_page __attribute__((aligned(4096)));
static struct acrn_io_request_buffer rc_page __attribute__((aligned(4096)));

static int fd = -1;
static unsigned vcpu_num;
static pthread_t client_thread;
static int client_running;

struct forbidden { uint32_t type; uint64_t start, end; };
static struct forbidden forbid[8];
static int nforbid;

/* default-client counters: written by the client thread, read with atomics */
static unsigned long long c_total, c_pio, c_mmio, c_pci, c_writes, c_forbidden;
static uint64_t c_wsum;

static const char *errname(int e)
{
	const char *n = strerrorname_np(e);
	return n ? n : "UNKNOWN";
}

static uint64_t num(const char *s)
{
	return strtoull(s, NULL, 0);
}

static uint64_t width_mask(uint64_t size)
{
	return size >= 8 ? ~0ULL : (1ULL << (8 * size)) - 1;
}

static void add(unsigned long long *c, unsigned long long v)
{
	__atomic_add_fetch(c, v, __ATOMIC_RELAXED);
}

static void handle(struct acrn_io_request *req)
{
	if (req->type == ACRN_IOREQ_TYPE_PORTIO || req->type == ACRN_IOREQ_TYPE_MMIO) {
		uint64_t a = req->reqs.pio_request.address, s = req->reqs.pio_request.size;
		for (int k = 0; k < nforbid; k++)
			if (forbid[k].type == req->type && a >= forbid[k].start && a + s - 1 <= forbid[k].end)
				add(&c_forbidden, 1);
	}
	switch (req->type) {
	case ACRN_IOREQ_TYPE_PORTIO: {
		struct acrn_pio_request *p = &req->reqs.pio_request;
		if (p->direction == ACRN_IOREQ_DIR_READ)
			p->value = (uint32_t)((uint32_t)(p->address * 0x9E3779B1u + p->size) & width_mask(p->size));
		else {
			__atomic_add_fetch(&c_wsum, p->address * 31 + p->value, __ATOMIC_RELAXED);
			add(&c_writes, 1);
		}
		add(&c_pio, 1);
		break;
	}
	case ACRN_IOREQ_TYPE_MMIO: {
		struct acrn_mmio_request *m = &req->reqs.mmio_request;
		if (m->direction == ACRN_IOREQ_DIR_READ)
			m->value = (m->address * 0x9E3779B97F4A7C15ULL + m->size) & width_mask(m->size);
		else {
			__atomic_add_fetch(&c_wsum, m->address * 31 + m->value, __ATOMIC_RELAXED);
			add(&c_writes, 1);
		}
		add(&c_mmio, 1);
		break;
	}
	case ACRN_IOREQ_TYPE_PCICFG: {
		struct acrn_pci_request *c = &req->reqs.pci_request;
		uint32_t key = c->bus << 16 | c->dev << 11 | c->func << 8 | c->reg;
		if (c->direction == ACRN_IOREQ_DIR_READ)
			c->value = (uint32_t)((uint32_t)(key * 0x9E3779B1u + (uint32_t)c->size) & width_mask(c->size));
		else {
			__atomic_add_fetch(&c_wsum, (uint64_t)key * 31 + c->value, __ATOMIC_RELAXED);
			add(&c_writes, 1);
		}
		add(&c_pci, 1);
		break;
	}
	}
	add(&c_total, 1);
}

static void *client_loop(void *arg)
{
	(void)arg;
	while (ioctl(fd, ACRN_IOCTL_ATTACH_IOREQ_CLIENT, 0) == 0) {
		for (unsigned i = 0; i < vcpu_num && i < ACRN_IO_REQUEST_MAX; i++) {
			struct acrn_io_request *req = &vm_page.req_slot[i];
			if (__atomic_load_n(&req->processed, __ATOMIC_ACQUIRE) != ACRN_IOREQ_STATE_PROCESSING)
				continue;
			if (__atomic_load_n(&req->kernel_handled, __ATOMIC_RELAXED) != 0)
				continue;
			handle(req);
			__atomic_thread_fence(__ATOMIC_RELEASE);
			struct acrn_ioreq_notify n = { .vcpu = i };
			ioctl(fd, ACRN_IOCTL_NOTIFY_REQUEST_FINISH, &n);
		}
	}
	return NULL;
}

static int range_type(const char *s)
{
	if (strcmp(s, "pio") == 0)
		return ACRN_EMU_RANGE_PIO;
	if (strcmp(s, "mmio") == 0)
		return ACRN_EMU_RANGE_MMIO;
	if (strcmp(s, "pci") == 0)
		return ACRN_EMU_RANGE_PCI;
	return (int)num(s);
}

static int ok_or_err(int rc)
{
	if (rc < 0)
		printf("err %s\n", errname(errno));
	else
		printf("ok\n");
	return rc;
}

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: %s NODE\n", argv[0]);
		return 2;
	}
	fd = open(argv[1], O_RDWR | O_CLOEXEC);
	if (fd < 0) {
		printf("err %s\n", errname(errno));
		return 1;
	}
	char line[512];
	while (fgets(line, sizeof(line), stdin)) {
		char *w[8] = { 0 };
		int n = 0;
		for (char *tok = strtok(line, " \t\n"); tok && n < 8; tok = strtok(NULL, " \t\n"))
			w[n++] = tok;
		if (n == 0)
			continue;
		const char *cmd = w[0];
		if (strcmp(cmd, "version") == 0) {
			struct acrn_emu_version v;
			memset(&v, 0xAA, sizeof(v));
			if (ioctl(fd, ACRN_EMU_IOCTL_VERSION, &v) < 0)
				printf("err %s\n", errname(errno));
			else
				printf("ok major=%u minor=%u features=%u reserved=%u\n",
				       v.major, v.minor, v.features, v.reserved);
		} else if (strcmp(cmd, "create") == 0 && n == 2) {
			struct acrn_vm_creation c;
			memset(&c, 0, sizeof(c));
			c.ioreq_buf = (uint64_t)(uintptr_t)&vm_page;
			c.cpu_affinity = num(w[1]);
			if (ioctl(fd, ACRN_IOCTL_CREATE_VM, &c) < 0) {
				printf("err %s\n", errname(errno));
			} else {
				vcpu_num = c.vcpu_num;
				printf("ok vmid=%u vcpu_num=%u\n", c.vmid, c.vcpu_num);
			}
		} else if (strcmp(cmd, "client") == 0) {
			if (ok_or_err(ioctl(fd, ACRN_IOCTL_CREATE_IOREQ_CLIENT, 0)) == 0) {
				pthread_create(&client_thread, NULL, client_loop, NULL);
				client_running = 1;
			}
		} else if (strcmp(cmd, "start") == 0) {
			ok_or_err(ioctl(fd, ACRN_IOCTL_START_VM, 0));
		} else if (strcmp(cmd, "pause") == 0) {
			ok_or_err(ioctl(fd, ACRN_IOCTL_PAUSE_VM, 0));
		} else if (strcmp(cmd, "destroy") == 0) {
			ok_or_err(ioctl(fd, ACRN_IOCTL_DESTROY_VM, 0));
		} else if (strcmp(cmd, "forbid") == 0 && n == 4 && nforbid < 8) {
			forbid[nforbid].type = (uint32_t)range_type(w[1]);
			forbid[nforbid].start = num(w[2]);
			forbid[nforbid].end = num(w[3]);
			nforbid++;
			printf("ok\n");
		} else if (strcmp(cmd, "seen") == 0) {
			printf("ok total=%llu pio=%llu mmio=%llu pci=%llu writes=%llu wsum=%" PRIu64
			       " forbidden=%llu\n",
			       __atomic_load_n(&c_total, __ATOMIC_RELAXED),
			       __atomic_load_n(&c_pio, __ATOMIC_RELAXED),
			       __atomic_load_n(&c_mmio, __ATOMIC_RELAXED),
			       __atomic_load_n(&c_pci, __ATOMIC_RELAXED),
			       __atomic_load_n(&c_writes, __ATOMIC_RELAXED),
			       __atomic_load_n(&c_wsum, __ATOMIC_RELAXED),
			       __atomic_load_n(&c_forbidden, __ATOMIC_RELAXED));
		} else if (strcmp(cmd, "bind") == 0 && n == 2) {
			struct acrn_emu_bind b = { .vmid = (__u16)num(w[1]) };
			if (ioctl(fd, ACRN_EMU_IOCTL_BIND_VM, &b) < 0) {
				printf("err %s\n", errname(errno));
			} else {
				vcpu_num = b.vcpu_num;
				printf("ok vcpu_num=%u owner_uid=%u\n", b.vcpu_num, b.owner_uid);
			}
		} else if (strcmp(cmd, "rc") == 0 && n == 2) {
			struct acrn_emu_range_client rc = { .ioreq_buf = (__u64)(uintptr_t)&rc_page };
			strncpy(rc.name, w[1], sizeof(rc.name) - 1);
			ok_or_err(ioctl(fd, ACRN_EMU_IOCTL_CREATE_RANGE_CLIENT, &rc));
		} else if ((strcmp(cmd, "range") == 0 || strcmp(cmd, "delrange") == 0) && n >= 4) {
			struct acrn_emu_range r = {
				.type = (__u32)range_type(w[1]), .start = num(w[2]), .end = num(w[3]),
				.reserved = n > 4 ? (__u32)num(w[4]) : 0,
			};
			ok_or_err(ioctl(fd, strcmp(cmd, "range") == 0 ? ACRN_EMU_IOCTL_ADD_RANGE
								     : ACRN_EMU_IOCTL_DEL_RANGE, &r));
		} else if (strcmp(cmd, "eventfd") == 0) {
			int e = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
			if (e < 0)
				printf("err %s\n", errname(errno));
			else
				printf("ok fd=%d\n", e);
		} else if (strcmp(cmd, "pipe") == 0) {
			int p[2];
			if (pipe2(p, O_CLOEXEC) < 0)
				printf("err %s\n", errname(errno));
			else
				printf("ok fd=%d\n", p[0]);
		} else if (strcmp(cmd, "closefd") == 0 && n == 2) {
			ok_or_err(close((int)num(w[1])));
		} else if (strcmp(cmd, "ioeventfd") == 0 && n >= 6) {
			struct acrn_ioeventfd a = {
				.fd = (__u32)num(w[1]), .flags = (__u32)num(w[2]), .addr = num(w[3]),
				.len = (__u32)num(w[4]), .data = num(w[5]),
				.reserved = n > 6 ? (__u32)num(w[6]) : 0,
			};
			ok_or_err(ioctl(fd, ACRN_IOCTL_IOEVENTFD, &a));
		} else if (strcmp(cmd, "irqfd") == 0 && n == 5) {
			struct acrn_irqfd a = {
				.fd = (__s32)num(w[1]), .flags = (__u32)num(w[2]),
				.msi = { .msi_addr = num(w[3]), .msi_data = num(w[4]) },
			};
			ok_or_err(ioctl(fd, ACRN_IOCTL_IRQFD, &a));
		} else if (strcmp(cmd, "signal") == 0 && n == 3) {
			int rc = 0;
			for (uint64_t k = 0; k < num(w[2]) && rc == 0; k++)
				rc = eventfd_write((int)num(w[1]), 1);
			ok_or_err(rc);
		} else if (strcmp(cmd, "count") == 0 && n == 2) {
			eventfd_t v = 0;
			if (eventfd_read((int)num(w[1]), &v) < 0 && errno != EAGAIN)
				printf("err %s\n", errname(errno));
			else
				printf("ok value=%" PRIu64 "\n", (uint64_t)v);
		} else if (strcmp(cmd, "msi") == 0 && n == 3) {
			struct acrn_msi_entry m = { .msi_addr = num(w[1]), .msi_data = num(w[2]) };
			ok_or_err(ioctl(fd, ACRN_IOCTL_INJECT_MSI, &m));
		} else if (strcmp(cmd, "quit") == 0) {
			if (client_running) {
				ioctl(fd, ACRN_IOCTL_DESTROY_IOREQ_CLIENT, 0);
				pthread_join(client_thread, NULL);
			}
			close(fd);
			printf("ok\n");
			fflush(stdout);
			return 0;
		} else {
			printf("err usage\n");
		}
		fflush(stdout);
	}
	if (client_running) {
		ioctl(fd, ACRN_IOCTL_DESTROY_IOREQ_CLIENT, 0);
		pthread_join(client_thread, NULL);
	}
	return 0;
}
