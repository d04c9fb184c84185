/*
 * irq_dm: a device model that raises legacy interrupt lines, written against
 * plain <linux/acrn.h> only, as an unmodified ACRN device model is: it knows
 * nothing of the emulator. Zero-filled CREATE_VM with the request page in
 * BSS, RAM from posix_memalign with the guest copied in, SET_MEMSEG,
 * SET_VCPU_REGS, one ioreq client, START_VM; the main thread then serves the
 * guest's I/O (ATTACH, every PROCESSING slot, NOTIFY) while a second thread,
 * as acrn-dm's device threads do, drives the line with SET_IRQLINE once the
 * guest wrote "ready" to port 0x50. Guests report each interrupt's vector
 * on port 0x51 (tests/guests/irqpic16.S, irqapic32.S).
 *
 *   irq_dm [options] NODE
 *
 *   -g FILE@GPA   copy FILE into RAM at GPA (repeatable); -m SIZE RAM bytes (0x10000)
 *   -r MODE       real (vm-sample's registers) or pm32 (cs 0x10 flat, ds/es/ss 0x18)
 *   -e RIP  -G BASE:LIMIT  -I BASE:LIMIT
 *   -l GSI        the line under test
 *   -o OPS        comma-separated ops on it: high, low, raise, fall (ACRN's SET_HIGH,
 *                 SET_LOW, RAISING_PULSE, FALLING_PULSE), or a number (any op value)
 *   -f GSI:VEC    the fence: after each op, RAISING_PULSE on GSI and wait until the
 *                 guest reports VEC; what it reported before the fence is the op's
 *
 * Prints "vmid=N", "ready", then per op
 *   op N NAME ret=0 vectors=0x44[,...]        (vectors= empty: none)
 *   op N NAME ret=-1 errno=EFAULT             (the call failed: no fence, no wait)
 * and "done" after PAUSE_VM, DESTROY_VM and close. Exit 0, 3 when a SET_IRQLINE
 * failed, 1 with a message on stderr for anything else.
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
#include <unistd.h>
#include <linux/acrn.h>

/* SET_IRQLINE's ops: the hypervisor's, which <linux/acrn.h> leaves out; acrn-dm
 * defines them in its vmmapi.h the same way (GSI_SET_HIGH, ...). */
enum { GSI_SET_HIGH, GSI_SET_LOW, GSI_RAISING_PULSE, GSI_FALLING_PULSE };

static struct acrn_io_request_buffer io_request_page __attribute__((aligned(4096)));

#define MAX_OPS 64
#define MAX_VECS 256

static int hsm_fd = -1;
static uint16_t vmid;
static uint8_t *ram;
static uint64_t ram_size = 0x10000;
static struct acrn_vcpu_regs regs;
static int client;

static uint32_t line_gsi, fence_gsi, fence_vec;
static int have_fence;
static uint64_t ops[MAX_OPS];
static int n_ops;
static int failed;

/* What the guest reported, shared by the I/O loop and the interrupt thread. */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t changed = PTHREAD_COND_INITIALIZER;
static int ready;
static uint32_t vecs[MAX_VECS];
static int n_vecs;

static void die(const char *what)
{
	fprintf(stderr, "irq_dm: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void hsm(unsigned long cmd, unsigned long arg, const char *what)
{
	if (ioctl(hsm_fd, cmd, arg) < 0)
		die(what);
}

static uint64_t num(const char *s)
{
	return strtoull(s, NULL, 0);
}

static const char *op_name(uint64_t op)
{
	switch (op) {
	case GSI_SET_HIGH: return "high";
	case GSI_SET_LOW: return "low";
	case GSI_RAISING_PULSE: return "raise";
	case GSI_FALLING_PULSE: return "fall";
	}
	return "other";
}

static const char *errno_name(int e)
{
	switch (e) {
	case EFAULT: return "EFAULT";
	case EINVAL: return "EINVAL";
	case EPERM: return "EPERM";
	case ENOTTY: return "ENOTTY";
	case ENODEV: return "ENODEV";
	case ENOSYS: return "ENOSYS";
	}
	return "other";
}

static void parse_ops(char *list)
{
	for (char *tok = strtok(list, ","); tok && n_ops < MAX_OPS; tok = strtok(NULL, ",")) {
		if (!strcmp(tok, "high"))
			ops[n_ops++] = GSI_SET_HIGH;
		else if (!strcmp(tok, "low"))
			ops[n_ops++] = GSI_SET_LOW;
		else if (!strcmp(tok, "raise"))
			ops[n_ops++] = GSI_RAISING_PULSE;
		else if (!strcmp(tok, "fall"))
			ops[n_ops++] = GSI_FALLING_PULSE;
		else
			ops[n_ops++] = num(tok);
	}
}

/* SET_IRQLINE's argument is struct acrn_irqline_ops {u32 gsi; u32 op;} as a value. */
static int set_irqline(uint32_t gsi, uint64_t op)
{
	return ioctl(hsm_fd, ACRN_IOCTL_SET_IRQLINE, (unsigned long)((op << 32) | gsi));
}

static void *irq_thread(void *unused)
{
	pthread_mutex_lock(&lock);
	while (!ready)
		pthread_cond_wait(&changed, &lock);
	pthread_mutex_unlock(&lock);
	for (int i = 0; i < n_ops; i++) {
		pthread_mutex_lock(&lock);
		n_vecs = 0;
		pthread_mutex_unlock(&lock);
		if (set_irqline(line_gsi, ops[i]) < 0) {
			printf("op %d %s ret=-1 errno=%s\n", i, op_name(ops[i]), errno_name(errno));
			failed = 1;
			break;
		}
		if (!have_fence) {
			printf("op %d %s ret=0\n", i, op_name(ops[i]));
			continue;
		}
		if (set_irqline(fence_gsi, GSI_RAISING_PULSE) < 0) {
			printf("op %d fence ret=-1 errno=%s\n", i, errno_name(errno));
			failed = 1;
			break;
		}
		/* the op's interrupt, if any, was pending before the fence's and has the
		 * higher priority: it is reported first */
		pthread_mutex_lock(&lock);
		while (n_vecs == 0 || vecs[n_vecs - 1] != fence_vec)
			pthread_cond_wait(&changed, &lock);
		printf("op %d %s ret=0 vectors=", i, op_name(ops[i]));
		for (int k = 0; k < n_vecs - 1; k++)
			printf("%s%#x", k ? "," : "", vecs[k]);
		printf("\n");
		pthread_mutex_unlock(&lock);
	}
	fflush(stdout);
	/* ends the I/O loop: its ATTACH fails with ENODEV, as acrn-dm's vCPU thread exits */
	hsm(ACRN_IOCTL_DESTROY_IOREQ_CLIENT, client, "DESTROY_IOREQ_CLIENT");
	return NULL;
}

static void load_file(const char *spec)
{
	char path[512];
	const char *at = strrchr(spec, '@');
	if (!at || (size_t)(at - spec) >= sizeof(path)) {
		fprintf(stderr, "irq_dm: -g FILE@GPA\n");
		exit(2);
	}
	memcpy(path, spec, at - spec);
	path[at - spec] = 0;
	uint64_t gpa = num(at + 1);
	FILE *f = fopen(path, "rb");
	if (!f)
		die(path);
	size_t n = fread(ram + gpa, 1, ram_size - gpa, f);
	fclose(f);
	if (n == 0) {
		fprintf(stderr, "irq_dm: %s is empty or past the RAM\n", path);
		exit(1);
	}
}

static void pair(const char *s, uint64_t *a, uint64_t *b)
{
	const char *p = strchr(s, ':');
	if (!p) {
		fprintf(stderr, "irq_dm: expected A:B: %s\n", s);
		exit(2);
	}
	*a = num(s);
	*b = num(p + 1);
}

int main(int argc, char **argv)
{
	const char *files[8];
	int n_files = 0, opt;
	struct acrn_regs *r = &regs.vcpu_regs;
	uint64_t a, b;

	r->cr0 = 0x30;	/* real mode, as vm-sample */
	r->cs_sel = 0xF000;
	r->cs_ar = 0x9F;
	r->cs_limit = 0xFFFF;
	while ((opt = getopt(argc, argv, "g:m:r:e:G:I:l:o:f:")) != -1) {
		switch (opt) {
		case 'g': if (n_files < 8) files[n_files++] = optarg; break;
		case 'm': ram_size = num(optarg); break;
		case 'r':
			if (!strcmp(optarg, "pm32")) {
				r->cr0 = 0x31;
				r->cs_sel = 0x10;
				r->cs_ar = 0xC09B;
				r->cs_limit = 0xFFFFFFFF;
				r->ds_sel = r->es_sel = r->ss_sel = 0x18;
			} else if (strcmp(optarg, "real")) {
				return 2;
			}
			break;
		case 'e': r->rip = num(optarg); break;
		case 'G': pair(optarg, &a, &b); r->gdt.base = a; r->gdt.limit = b; break;
		case 'I': pair(optarg, &a, &b); r->idt.base = a; r->idt.limit = b; break;
		case 'l': line_gsi = num(optarg); break;
		case 'o': parse_ops(optarg); break;
		case 'f': pair(optarg, &a, &b); fence_gsi = a; fence_vec = b; have_fence = 1; break;
		default: return 2;
		}
	}
	if (optind != argc - 1) {
		fprintf(stderr, "usage: irq_dm [options] NODE\n");
		return 2;
	}
	void *p;
	errno = posix_memalign(&p, 4096, ram_size);
	if (errno)
		die("posix_memalign");
	ram = p;
	memset(ram, 0, ram_size);
	for (int i = 0; i < n_files; i++)
		load_file(files[i]);

	hsm_fd = open(argv[optind], O_RDWR | O_CLOEXEC);
	if (hsm_fd < 0)
		die(argv[optind]);
	struct acrn_vm_creation create_vm;
	memset(&create_vm, 0, sizeof(create_vm));
	create_vm.ioreq_buf = (uint64_t)(uintptr_t)&io_request_page;
	hsm(ACRN_IOCTL_CREATE_VM, (unsigned long)&create_vm, "CREATE_VM");
	vmid = create_vm.vmid;
	printf("vmid=%u\n", vmid);
	struct acrn_vm_memmap map = {
		.type = ACRN_MEMMAP_RAM,
		.attr = ACRN_MEM_ACCESS_RWX,
		.user_vm_pa = 0,
		.vma_base = (uint64_t)(uintptr_t)ram,
		.len = ram_size,
	};
	hsm(ACRN_IOCTL_SET_MEMSEG, (unsigned long)&map, "SET_MEMSEG");
	client = ioctl(hsm_fd, ACRN_IOCTL_CREATE_IOREQ_CLIENT, 0);
	if (client < 0)
		die("CREATE_IOREQ_CLIENT");
	hsm(ACRN_IOCTL_SET_VCPU_REGS, (unsigned long)&regs, "SET_VCPU_REGS");
	pthread_t t;
	if (pthread_create(&t, NULL, irq_thread, NULL))
		die("pthread_create");
	hsm(ACRN_IOCTL_START_VM, vmid, "START_VM");
	fflush(stdout);

	for (;;) {
		if (ioctl(hsm_fd, ACRN_IOCTL_ATTACH_IOREQ_CLIENT, client) < 0) {
			if (errno == ENODEV)
				break;	/* the interrupt thread is done */
			die("ATTACH_IOREQ_CLIENT");
		}
		for (int i = 0; i < create_vm.vcpu_num && i < ACRN_IO_REQUEST_MAX; i++) {
			struct acrn_io_request *req = &io_request_page.req_slot[i];
			if (__atomic_load_n(&req->processed, __ATOMIC_ACQUIRE) != ACRN_IOREQ_STATE_PROCESSING
			    || req->kernel_handled)
				continue;
			struct acrn_pio_request *pio = &req->reqs.pio_request;
			if (req->type == ACRN_IOREQ_TYPE_PORTIO && pio->direction == ACRN_IOREQ_DIR_WRITE) {
				pthread_mutex_lock(&lock);
				if (pio->address == 0x50 && !ready) {
					ready = 1;
					printf("ready\n");
					fflush(stdout);
				} else if (pio->address == 0x51 && n_vecs < MAX_VECS) {
					vecs[n_vecs++] = pio->value & 0xff;
				}
				pthread_cond_broadcast(&changed);
				pthread_mutex_unlock(&lock);
			} else if (req->type == ACRN_IOREQ_TYPE_PORTIO) {
				pio->value = 0;
			} else if (req->type == ACRN_IOREQ_TYPE_MMIO) {
				req->reqs.mmio_request.value = 0;
			} else if (req->type == ACRN_IOREQ_TYPE_PCICFG) {
				req->reqs.pci_request.value = ~0u;
			}
			struct acrn_ioreq_notify notify = { .vmid = vmid, .vcpu = i };
			hsm(ACRN_IOCTL_NOTIFY_REQUEST_FINISH, (unsigned long)&notify, "NOTIFY");
		}
	}
	pthread_join(t, NULL);
	hsm(ACRN_IOCTL_PAUSE_VM, vmid, "PAUSE_VM");
	hsm(ACRN_IOCTL_DESTROY_VM, 0, "DESTROY_VM");
	close(hsm_fd);
	printf("done\n");
	return failed ? 3 : 0;
}
