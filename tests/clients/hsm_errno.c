/*
 * hsm_errno: table-driven errno checker for an ACRN HSM node.
 *
 *   hsm_errno NODE [GROUP[,GROUP...] | default | all]
 *
 * Runs groups of ioctl sequences against NODE and prints, for every ioctl
 * it issues (and for read/write on the node), one line
 *
 *   ROW <group>.<step> ret=<return value> errno=<ENAME, or 0 on success>
 *
 * plus "INFO <group> vmid=<n> vcpu_num=<n>" after each successful
 * CREATE_VM. The expected values are NOT here: tests/test_hsm_errno.py holds
 * the table (row -> errno) and compares. Each group opens the node afresh
 * and, where it created a VM, ends with <group>.cleanup_pause and
 * <group>.cleanup_destroy (the hypervisor only destroys a paused VM).
 *
 * Groups named q_* reproduce kernel quirks that leave VMs behind in the
 * hypervisor (as the real driver does); they only run when named or with
 * "all".
 *
 * Only system headers are used: <linux/acrn.h> for the ABI; structures the
 * uapi does not define (the interrupt-monitor page) are declared locally.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <linux/acrn.h>

#define PAGE 4096UL
#define BAD_PTR ((unsigned long)16)	/* never mapped: page 0 */
#define CLOSED_FD 1000000		/* beyond any fd table: EBADF */

static const char *node;

/* Request pages, one per VM created, like acrn-dm's static io_request_page. */
#define NPAGES 16
static struct acrn_io_request_buffer ioreq_pages[NPAGES] __attribute__((aligned(4096)));
static unsigned int next_page;

/* A zero-filled page: a valid pointer for every _IOW/_IOWR argument. */
static unsigned char zero_page[PAGE] __attribute__((aligned(4096)));

/* The interrupt-monitor page format (hypervisor side, not in the uapi). */
struct intr_monitor {
	uint32_t cmd;
	uint32_t buf_cnt;
	uint64_t buffer[48];
};
static union {
	struct intr_monitor m;
	unsigned char raw[PAGE];
} monitor_page __attribute__((aligned(4096)));

/* ------------------------------------------------------------------ */
/* output                                                               */
/* ------------------------------------------------------------------ */

static const char *errname(int e)
{
	static __thread char buf[16];
	const char *n = strerrorname_np(e);
	if (n)
		return n;
	snprintf(buf, sizeof(buf), "E%d", e);
	return buf;
}

static void report(const char *group, const char *step, long ret, int err)
{
	/* one printf per line: stdio locks the stream, so threads do not interleave */
	printf("ROW %s.%s ret=%ld errno=%s\n", group, step, ret, ret < 0 ? errname(err) : "0");
	fflush(stdout);
}

static long do_ioctl(const char *group, const char *step, int fd, unsigned long cmd,
		     unsigned long arg)
{
	errno = 0;
	long r = ioctl(fd, cmd, arg);
	int e = errno;
	report(group, step, r, e);
	errno = e;
	return r;
}

#define P(x) ((unsigned long)(uintptr_t)(x))

static void die(const char *what)
{
	fprintf(stderr, "hsm_errno: %s: %s\n", what, strerror(errno));
	exit(1);
}

static int open_node(void)
{
	int fd = open(node, O_RDWR | O_CLOEXEC);
	if (fd < 0)
		die(node);
	return fd;
}

static void *map_pages(size_t n, int prot)
{
	void *p = mmap(NULL, n * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		die("mmap");
	memset(p, 0, n * PAGE);		/* populate: pages exist before any pinning */
	if (prot != (PROT_READ | PROT_WRITE) && mprotect(p, n * PAGE, prot) < 0)
		die("mprotect");
	return p;
}

/* An address with nothing mapped behind it (mapped, then unmapped). */
static void *unmapped_pages(size_t n)
{
	void *p = map_pages(n, PROT_READ | PROT_WRITE);
	if (munmap(p, n * PAGE) < 0)
		die("munmap");
	return p;
}

static void fill_creation(struct acrn_vm_creation *c)
{
	memset(c, 0, sizeof(*c));
	c->ioreq_buf = P(&ioreq_pages[next_page++ % NPAGES]);
}

/* Zero-filled CREATE_VM with a fresh static request page (samples/acrn/vm-sample.c style). */
static int create_vm(const char *group, const char *step, int fd, struct acrn_vm_creation *out)
{
	struct acrn_vm_creation c;
	fill_creation(&c);
	long r = do_ioctl(group, step, fd, ACRN_IOCTL_CREATE_VM, P(&c));
	if (r == 0)
		printf("INFO %s vmid=%u vcpu_num=%u\n", group, c.vmid, c.vcpu_num);
	if (out)
		*out = c;
	return (int)r;
}

static void cleanup(const char *group, int fd)
{
	do_ioctl(group, "cleanup_pause", fd, ACRN_IOCTL_PAUSE_VM, 0);
	do_ioctl(group, "cleanup_destroy", fd, ACRN_IOCTL_DESTROY_VM, 0);
	close(fd);
}

/* ------------------------------------------------------------------ */
/* every ioctl of the uapi except CREATE_VM, with a harmless argument   */
/* ------------------------------------------------------------------ */

enum arg_kind { ARG_NONE, ARG_PTR, ARG_VALUE };

static const struct {
	const char *name;
	unsigned long cmd;
	enum arg_kind arg;
} uapi_ioctls[] = {
	{ "destroy_vm", ACRN_IOCTL_DESTROY_VM, ARG_NONE },
	{ "start_vm", ACRN_IOCTL_START_VM, ARG_NONE },
	{ "pause_vm", ACRN_IOCTL_PAUSE_VM, ARG_NONE },
	{ "reset_vm", ACRN_IOCTL_RESET_VM, ARG_NONE },
	{ "set_vcpu_regs", ACRN_IOCTL_SET_VCPU_REGS, ARG_PTR },
	{ "inject_msi", ACRN_IOCTL_INJECT_MSI, ARG_PTR },
	{ "vm_intr_monitor", ACRN_IOCTL_VM_INTR_MONITOR, ARG_PTR },
	{ "set_irqline", ACRN_IOCTL_SET_IRQLINE, ARG_VALUE },
	{ "notify_request_finish", ACRN_IOCTL_NOTIFY_REQUEST_FINISH, ARG_PTR },
	{ "create_ioreq_client", ACRN_IOCTL_CREATE_IOREQ_CLIENT, ARG_NONE },
	{ "attach_ioreq_client", ACRN_IOCTL_ATTACH_IOREQ_CLIENT, ARG_NONE },
	{ "destroy_ioreq_client", ACRN_IOCTL_DESTROY_IOREQ_CLIENT, ARG_NONE },
	{ "clear_vm_ioreq", ACRN_IOCTL_CLEAR_VM_IOREQ, ARG_NONE },
	{ "set_memseg", ACRN_IOCTL_SET_MEMSEG, ARG_PTR },
	{ "unset_memseg", ACRN_IOCTL_UNSET_MEMSEG, ARG_PTR },
	{ "set_ptdev_intr", ACRN_IOCTL_SET_PTDEV_INTR, ARG_PTR },
	{ "reset_ptdev_intr", ACRN_IOCTL_RESET_PTDEV_INTR, ARG_PTR },
	{ "assign_pcidev", ACRN_IOCTL_ASSIGN_PCIDEV, ARG_PTR },
	{ "deassign_pcidev", ACRN_IOCTL_DEASSIGN_PCIDEV, ARG_PTR },
	{ "assign_mmiodev", ACRN_IOCTL_ASSIGN_MMIODEV, ARG_PTR },
	{ "deassign_mmiodev", ACRN_IOCTL_DEASSIGN_MMIODEV, ARG_PTR },
	{ "create_vdev", ACRN_IOCTL_CREATE_VDEV, ARG_PTR },
	{ "destroy_vdev", ACRN_IOCTL_DESTROY_VDEV, ARG_PTR },
	{ "pm_get_cpu_state", ACRN_IOCTL_PM_GET_CPU_STATE, ARG_PTR },
	{ "ioeventfd", ACRN_IOCTL_IOEVENTFD, ARG_PTR },
	{ "irqfd", ACRN_IOCTL_IRQFD, ARG_PTR },
};

/* SET_IRQLINE's argument is the value {gsi 4, op SET_HIGH}, not a pointer. */
#define IRQLINE_VALUE(gsi, op) ((unsigned long)(gsi) | (unsigned long)(op) << 32)

/* Issue every uapi ioctl but CREATE_VM on a file that has no VM: all EINVAL. */
static void all_without_vm(const char *group, const char *prefix, int fd)
{
	char step[64];
	for (size_t i = 0; i < sizeof(uapi_ioctls) / sizeof(uapi_ioctls[0]); i++) {
		unsigned long arg = 0;
		if (uapi_ioctls[i].arg == ARG_PTR)
			arg = P(zero_page);
		else if (uapi_ioctls[i].arg == ARG_VALUE)
			arg = IRQLINE_VALUE(4, 0);
		snprintf(step, sizeof(step), "%s%s", prefix, uapi_ioctls[i].name);
		do_ioctl(group, step, fd, uapi_ioctls[i].cmd, arg);
	}
}

/* ioctl numbers that are not in the mainline uapi */
#define UNKNOWN_IO _IO(ACRN_IOCTL_TYPE, 0xFF)
#define UNKNOWN_IOW _IOW(ACRN_IOCTL_TYPE, 0x99, __u64)
#define UNKNOWN_IOR _IOR(ACRN_IOCTL_TYPE, 0x98, __u64)
#define UNKNOWN_IOWR _IOWR(ACRN_IOCTL_TYPE, 0x97, __u64)
#define FOREIGN_TYPE _IO('X', 0x01)
#define OLD_CREATE_VCPU _IO(ACRN_IOCTL_TYPE, 0x14)	/* obsolete, never in mainline */
#define SETUP_ASYNCIO _IOW(ACRN_IOCTL_TYPE, 0x90, __u64)	/* acrn-kernel only; value = page addr */
#define SETUP_VM_EVENT_FD _IOW(ACRN_IOCTL_TYPE, 0xA1, __u32)	/* acrn-kernel only; value = fd */

static void unknown_ioctls(const char *group, int fd)
{
	do_ioctl(group, "unknown_io", fd, UNKNOWN_IO, 0);
	do_ioctl(group, "unknown_iow", fd, UNKNOWN_IOW, P(zero_page));
	do_ioctl(group, "unknown_ior", fd, UNKNOWN_IOR, P(zero_page));
	do_ioctl(group, "unknown_iowr", fd, UNKNOWN_IOWR, P(zero_page));
	do_ioctl(group, "foreign_type", fd, FOREIGN_TYPE, 0);
	do_ioctl(group, "old_create_vcpu", fd, OLD_CREATE_VCPU, 0);
}

/* ------------------------------------------------------------------ */
/* groups                                                               */
/* ------------------------------------------------------------------ */

/* No VM yet: every ioctl but CREATE_VM is EINVAL, before the argument is looked at. */
static void g_gate(const char *g)
{
	int fd = open_node();
	all_without_vm(g, "", fd);
	do_ioctl(g, "set_irqline_ptrval", fd, ACRN_IOCTL_SET_IRQLINE, P(zero_page));
	unknown_ioctls(g, fd);
	do_ioctl(g, "setup_asyncio", fd, SETUP_ASYNCIO, P(zero_page));
	/* the kernel never reads these arguments before the gate */
	do_ioctl(g, "badptr_set_vcpu_regs", fd, ACRN_IOCTL_SET_VCPU_REGS, BAD_PTR);
	do_ioctl(g, "badptr_notify", fd, ACRN_IOCTL_NOTIFY_REQUEST_FINISH, BAD_PTR);
	do_ioctl(g, "badptr_ioeventfd", fd, ACRN_IOCTL_IOEVENTFD, BAD_PTR);
	do_ioctl(g, "badptr_pm_get_cpu_state", fd, ACRN_IOCTL_PM_GET_CPU_STATE, BAD_PTR);
	/* VFS-level ioctls: FIOCLEX never reaches a driver; FIONREAD does for a char device */
	do_ioctl(g, "fioclex", fd, FIOCLEX, 0);
	int avail = -1;
	do_ioctl(g, "fionread", fd, FIONREAD, P(&avail));
	close(fd);
}

/* No read/write handlers: the misc core answers EINVAL. */
static void g_rw(const char *g)
{
	int fd = open_node();
	char buf[8] = { 0 };
	errno = 0;
	long r = read(fd, buf, sizeof(buf));
	report(g, "read", r, errno);
	errno = 0;
	r = write(fd, buf, sizeof(buf));
	report(g, "write", r, errno);
	close(fd);
}

static void g_create(const char *g)
{
	int fd = open_node();
	struct acrn_vm_creation c;

	fill_creation(&c);
	c.reserved0 = 1;
	do_ioctl(g, "reserved0", fd, ACRN_IOCTL_CREATE_VM, P(&c));
	fill_creation(&c);
	c.reserved1 = 0x8000;
	do_ioctl(g, "reserved1", fd, ACRN_IOCTL_CREATE_VM, P(&c));
	do_ioctl(g, "start_after_rejected", fd, ACRN_IOCTL_START_VM, 0);
	do_ioctl(g, "badptr", fd, ACRN_IOCTL_CREATE_VM, BAD_PTR);
	create_vm(g, "ok", fd, NULL);
	cleanup(g, fd);
}

/*
 * CREATE_VM whose argument is read-only: the copy-back faults, the driver
 * tries to destroy the new VM, and the hypervisor refuses (it only destroys
 * paused VMs), so the file keeps a live VM although the ioctl said EFAULT.
 */
static void g_create_ro(const char *g)
{
	int fd = open_node();
	struct acrn_vm_creation *c = map_pages(1, PROT_READ | PROT_WRITE);
	fill_creation(c);
	if (mprotect(c, PAGE, PROT_READ) < 0)
		die("mprotect");
	do_ioctl(g, "create_vm", fd, ACRN_IOCTL_CREATE_VM, P(c));
	do_ioctl(g, "destroy_unpaused", fd, ACRN_IOCTL_DESTROY_VM, 0);
	do_ioctl(g, "pause", fd, ACRN_IOCTL_PAUSE_VM, 0);
	do_ioctl(g, "destroy", fd, ACRN_IOCTL_DESTROY_VM, 0);
	do_ioctl(g, "start_after_destroy", fd, ACRN_IOCTL_START_VM, 0);
	close(fd);
	munmap(c, PAGE);
}

/* With a VM: unknown numbers are ENOTTY. */
static void g_unknown(const char *g)
{
	int fd = open_node();
	create_vm(g, "create_vm", fd, NULL);
	unknown_ioctls(g, fd);
	do_ioctl(g, "setup_asyncio", fd, SETUP_ASYNCIO, P(zero_page));
	do_ioctl(g, "setup_vm_event_fd", fd, SETUP_VM_EVENT_FD, 5);
	int avail = -1;
	do_ioctl(g, "fionread", fd, FIONREAD, P(&avail));
	cleanup(g, fd);
}

static void g_notify(const char *g)
{
	int fd = open_node();
	struct acrn_vm_creation c;
	create_vm(g, "create_vm", fd, &c);
	struct acrn_ioreq_notify n;

	memset(&n, 0, sizeof(n));
	n.reserved = 1;
	do_ioctl(g, "reserved", fd, ACRN_IOCTL_NOTIFY_REQUEST_FINISH, P(&n));
	memset(&n, 0, sizeof(n));
	do_ioctl(g, "noclient_vcpu0", fd, ACRN_IOCTL_NOTIFY_REQUEST_FINISH, P(&n));
	n.vcpu = 1000;
	do_ioctl(g, "noclient_vcpu1000", fd, ACRN_IOCTL_NOTIFY_REQUEST_FINISH, P(&n));
	n.vcpu = 0;
	n.vmid = 0x1234;
	do_ioctl(g, "noclient_other_vmid", fd, ACRN_IOCTL_NOTIFY_REQUEST_FINISH, P(&n));
	do_ioctl(g, "badptr", fd, ACRN_IOCTL_NOTIFY_REQUEST_FINISH, BAD_PTR);

	do_ioctl(g, "create_client", fd, ACRN_IOCTL_CREATE_IOREQ_CLIENT, 0);
	memset(&n, 0, sizeof(n));
	n.vmid = c.vmid;
	n.reserved = 0xFFFF;
	do_ioctl(g, "reserved_with_client", fd, ACRN_IOCTL_NOTIFY_REQUEST_FINISH, P(&n));
	n.reserved = 0;
	n.vcpu = c.vcpu_num;
	do_ioctl(g, "vcpu_eq_vcpu_num", fd, ACRN_IOCTL_NOTIFY_REQUEST_FINISH, P(&n));
	n.vcpu = 0xFFFF;
	do_ioctl(g, "vcpu_ffff", fd, ACRN_IOCTL_NOTIFY_REQUEST_FINISH, P(&n));
	/* vcpu is truncated to 16 bits: 0x10000 completes slot 0 (whatever its state) */
	n.vcpu = 0x10000;
	do_ioctl(g, "vcpu_truncated_to_0", fd, ACRN_IOCTL_NOTIFY_REQUEST_FINISH, P(&n));
	do_ioctl(g, "destroy_client", fd, ACRN_IOCTL_DESTROY_IOREQ_CLIENT, 0);
	n.vcpu = 0xFFFF;
	do_ioctl(g, "after_client_vcpu_ffff", fd, ACRN_IOCTL_NOTIFY_REQUEST_FINISH, P(&n));
	cleanup(g, fd);
}

static void g_client(const char *g)
{
	int fd = open_node();
	create_vm(g, "create_vm", fd, NULL);
	do_ioctl(g, "attach_noclient", fd, ACRN_IOCTL_ATTACH_IOREQ_CLIENT, 0);
	do_ioctl(g, "destroy_noclient", fd, ACRN_IOCTL_DESTROY_IOREQ_CLIENT, 0);
	do_ioctl(g, "clear_noclient", fd, ACRN_IOCTL_CLEAR_VM_IOREQ, 0);
	do_ioctl(g, "create", fd, ACRN_IOCTL_CREATE_IOREQ_CLIENT, 0);
	do_ioctl(g, "create_again", fd, ACRN_IOCTL_CREATE_IOREQ_CLIENT, 0);
	do_ioctl(g, "clear", fd, ACRN_IOCTL_CLEAR_VM_IOREQ, 0);
	do_ioctl(g, "destroy", fd, ACRN_IOCTL_DESTROY_IOREQ_CLIENT, 0);
	do_ioctl(g, "destroy_again", fd, ACRN_IOCTL_DESTROY_IOREQ_CLIENT, 0);
	do_ioctl(g, "attach_after_destroy", fd, ACRN_IOCTL_ATTACH_IOREQ_CLIENT, 0);
	do_ioctl(g, "create_after_destroy", fd, ACRN_IOCTL_CREATE_IOREQ_CLIENT, 0);
	cleanup(g, fd);	/* with the client still there: destroy tears it down */
}

/* ---- ATTACH from a second thread ---- */

struct attacher {
	const char *group;
	int fd;
	int attaches;			/* ATTACH calls to make */
	volatile pid_t tid;
	volatile int done;		/* ATTACH calls returned so far */
	const char *steps[2];
};

static void *attach_thread(void *arg)
{
	struct attacher *a = arg;
	a->tid = gettid();
	for (int i = 0; i < a->attaches; i++) {
		do_ioctl(a->group, a->steps[i], a->fd, ACRN_IOCTL_ATTACH_IOREQ_CLIENT, 0);
		__atomic_store_n(&a->done, i + 1, __ATOMIC_RELEASE);
	}
	return NULL;
}

static void sleep_ms(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

/* Wait until thread `tid` sits in ioctl(2) having made `done` calls; 0 or -1 on timeout. */
static int wait_blocked_in_ioctl(struct attacher *a, int done)
{
	for (int i = 0; i < 5000; i++) {
		int now = __atomic_load_n(&a->done, __ATOMIC_ACQUIRE);
		if (now > done)
			return -1;	/* that call already returned: it did not block */
		if (a->tid && now == done) {
			char path[64], buf[64] = { 0 };
			snprintf(path, sizeof(path), "/proc/self/task/%d/syscall", (int)a->tid);
			FILE *f = fopen(path, "r");
			if (f) {
				size_t n = fread(buf, 1, sizeof(buf) - 1, f);
				fclose(f);
				buf[n] = 0;
				if (strncmp(buf, "16 ", 3) == 0) {	/* __NR_ioctl on x86-64 */
					sleep_ms(100);	/* let the server pick the request up */
					return 0;
				}
			}
		}
		sleep_ms(1);
	}
	return -1;
}

/* Join with a deadline so a server bug shows as a TIMEOUT row, not a hang. */
static void join_or_report(const char *g, const char *step, pthread_t t)
{
	struct timespec deadline;
	clock_gettime(CLOCK_REALTIME, &deadline);
	deadline.tv_sec += 10;
	if (pthread_timedjoin_np(t, NULL, &deadline) != 0) {
		printf("ROW %s.%s ret=-1 errno=TIMEOUT\n", g, step);
		fflush(stdout);
	}
}

/* acrn-dm's shutdown: another thread destroys the client, the blocked ATTACH fails with ENODEV. */
static void g_attach_wake(const char *g)
{
	int fd = open_node();
	create_vm(g, "create_vm", fd, NULL);
	do_ioctl(g, "create_client", fd, ACRN_IOCTL_CREATE_IOREQ_CLIENT, 0);
	struct attacher a = { .group = g, .fd = fd, .attaches = 1, .steps = { "attach" } };
	pthread_t t;
	if (pthread_create(&t, NULL, attach_thread, &a) != 0)
		die("pthread_create");
	if (wait_blocked_in_ioctl(&a, 0) < 0)
		printf("INFO %s attach did not block\n", g);
	do_ioctl(g, "destroy_client", fd, ACRN_IOCTL_DESTROY_IOREQ_CLIENT, 0);
	join_or_report(g, "join", t);
	do_ioctl(g, "attach_again", fd, ACRN_IOCTL_ATTACH_IOREQ_CLIENT, 0);
	cleanup(g, fd);
}

static void on_sigusr1(int sig)
{
	(void)sig;
}

/* A signal ends a blocked ATTACH with 0 (the driver ignores the wait's result), never EINTR. */
static void g_attach_signal(const char *g)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_sigusr1;	/* no SA_RESTART: EINTR would be visible */
	sigemptyset(&sa.sa_mask);
	sigaction(SIGUSR1, &sa, NULL);

	int fd = open_node();
	create_vm(g, "create_vm", fd, NULL);
	do_ioctl(g, "create_client", fd, ACRN_IOCTL_CREATE_IOREQ_CLIENT, 0);
	struct attacher a = { .group = g, .fd = fd, .attaches = 2,
			      .steps = { "attach_signalled", "attach_then_destroyed" } };
	pthread_t t;
	if (pthread_create(&t, NULL, attach_thread, &a) != 0)
		die("pthread_create");
	if (wait_blocked_in_ioctl(&a, 0) < 0)
		printf("INFO %s attach did not block\n", g);
	pthread_kill(t, SIGUSR1);
	if (wait_blocked_in_ioctl(&a, 1) < 0)
		printf("INFO %s second attach did not block\n", g);
	do_ioctl(g, "destroy_client", fd, ACRN_IOCTL_DESTROY_IOREQ_CLIENT, 0);
	join_or_report(g, "join", t);
	cleanup(g, fd);
}

/* ---- SET_VCPU_REGS ---- */

static void valid_regs(struct acrn_vcpu_regs *r, uint16_t vcpu)
{
	/* the x86 reset state, as acrn-dm's OVMF path sets it */
	memset(r, 0, sizeof(*r));
	r->vcpu_id = vcpu;
	r->vcpu_regs.cr0 = 0x30;		/* ET | NE, real mode */
	r->vcpu_regs.rip = 0xFFF0;
	r->vcpu_regs.cs_base = 0xFFFF0000;
	r->vcpu_regs.cs_sel = 0xF000;
	r->vcpu_regs.cs_limit = 0xFFFF;
	r->vcpu_regs.cs_ar = 0x9B;
	r->vcpu_regs.rflags = 0x2;
	r->vcpu_regs.gdt.limit = 0xFFFF;
	r->vcpu_regs.idt.limit = 0xFFFF;
}

static void g_vcpu_regs(const char *g)
{
	int fd = open_node();
	struct acrn_vm_creation c;
	create_vm(g, "create_vm", fd, &c);
	struct acrn_vcpu_regs r;
	char step[48];

	valid_regs(&r, 0);
	do_ioctl(g, "valid", fd, ACRN_IOCTL_SET_VCPU_REGS, P(&r));

	for (int i = 0; i < 3; i++) {
		valid_regs(&r, 0);
		r.reserved[i] = 1;
		snprintf(step, sizeof(step), "reserved%d", i);
		do_ioctl(g, step, fd, ACRN_IOCTL_SET_VCPU_REGS, P(&r));
	}
	for (int i = 0; i < 3; i++) {
		valid_regs(&r, 0);
		r.vcpu_regs.reserved_32[i] = 0x80000000u;
		snprintf(step, sizeof(step), "reserved_32_%d", i);
		do_ioctl(g, step, fd, ACRN_IOCTL_SET_VCPU_REGS, P(&r));
	}
	for (int i = 0; i < 4; i++) {
		valid_regs(&r, 0);
		r.vcpu_regs.reserved_64[i] = 1ULL << 63;
		snprintf(step, sizeof(step), "reserved_64_%d", i);
		do_ioctl(g, step, fd, ACRN_IOCTL_SET_VCPU_REGS, P(&r));
	}
	for (int i = 0; i < 3; i++) {
		valid_regs(&r, 0);
		r.vcpu_regs.gdt.reserved[i] = 1;
		snprintf(step, sizeof(step), "gdt_reserved%d", i);
		do_ioctl(g, step, fd, ACRN_IOCTL_SET_VCPU_REGS, P(&r));
	}
	for (int i = 0; i < 3; i++) {
		valid_regs(&r, 0);
		r.vcpu_regs.idt.reserved[i] = 0x100;
		snprintf(step, sizeof(step), "idt_reserved%d", i);
		do_ioctl(g, step, fd, ACRN_IOCTL_SET_VCPU_REGS, P(&r));
	}
	/* reserved checks come before the hypercall: an also-bad vcpu_id changes nothing */
	valid_regs(&r, 16);
	r.vcpu_regs.idt.reserved[2] = 1;
	do_ioctl(g, "reserved_and_bad_vcpu", fd, ACRN_IOCTL_SET_VCPU_REGS, P(&r));

	/* hypervisor checks (-1 -> EPERM) */
	valid_regs(&r, c.vcpu_num);
	do_ioctl(g, "vcpu_id_eq_vcpu_num", fd, ACRN_IOCTL_SET_VCPU_REGS, P(&r));
	valid_regs(&r, 16);
	do_ioctl(g, "vcpu_id_16", fd, ACRN_IOCTL_SET_VCPU_REGS, P(&r));
	valid_regs(&r, 0);
	r.vcpu_regs.cr0 |= 1ULL << 32;		/* CR0 reserved bit */
	do_ioctl(g, "cr0_reserved_bit", fd, ACRN_IOCTL_SET_VCPU_REGS, P(&r));
	do_ioctl(g, "badptr", fd, ACRN_IOCTL_SET_VCPU_REGS, BAD_PTR);

	do_ioctl(g, "start", fd, ACRN_IOCTL_START_VM, 0);
	valid_regs(&r, 0);
	do_ioctl(g, "while_running", fd, ACRN_IOCTL_SET_VCPU_REGS, P(&r));
	cleanup(g, fd);
}

/* ---- VM state machine (hypervisor: START needs CREATED, RESET/DESTROY need PAUSED) ---- */

static void g_lifecycle(const char *g)
{
	int fd = open_node();
	create_vm(g, "create_vm", fd, NULL);
	do_ioctl(g, "reset_created", fd, ACRN_IOCTL_RESET_VM, 0);
	do_ioctl(g, "start", fd, ACRN_IOCTL_START_VM, 0);
	do_ioctl(g, "start_again", fd, ACRN_IOCTL_START_VM, 0);
	do_ioctl(g, "reset_running", fd, ACRN_IOCTL_RESET_VM, 0);
	do_ioctl(g, "destroy_running", fd, ACRN_IOCTL_DESTROY_VM, 0);
	/* the failed destroy freed nothing: the VM is still there and running */
	do_ioctl(g, "start_after_failed_destroy", fd, ACRN_IOCTL_START_VM, 0);
	do_ioctl(g, "pause", fd, ACRN_IOCTL_PAUSE_VM, 0);
	do_ioctl(g, "pause_again", fd, ACRN_IOCTL_PAUSE_VM, 0);
	do_ioctl(g, "start_paused", fd, ACRN_IOCTL_START_VM, 0);
	do_ioctl(g, "reset", fd, ACRN_IOCTL_RESET_VM, 0);
	do_ioctl(g, "reset_again", fd, ACRN_IOCTL_RESET_VM, 0);
	do_ioctl(g, "start_after_reset", fd, ACRN_IOCTL_START_VM, 0);
	do_ioctl(g, "pause2", fd, ACRN_IOCTL_PAUSE_VM, 0);
	do_ioctl(g, "destroy", fd, ACRN_IOCTL_DESTROY_VM, 0);
	/* back to "no VM": everything is EINVAL again */
	all_without_vm(g, "after_", fd);
	do_ioctl(g, "after_unknown_io", fd, UNKNOWN_IO, 0);
	close(fd);
}

/* A VM that was never started can be paused and destroyed. */
static void g_pause_created(const char *g)
{
	int fd = open_node();
	create_vm(g, "create_vm", fd, NULL);
	do_ioctl(g, "pause", fd, ACRN_IOCTL_PAUSE_VM, 0);
	do_ioctl(g, "destroy", fd, ACRN_IOCTL_DESTROY_VM, 0);
	do_ioctl(g, "start_after_destroy", fd, ACRN_IOCTL_START_VM, 0);
	close(fd);
}

/* ---- SET_MEMSEG / UNSET_MEMSEG ---- */

static long memseg(const char *g, const char *step, int fd, unsigned long cmd, uint32_t type,
		   uint64_t gpa, uint64_t host, uint64_t len)
{
	struct acrn_vm_memmap m;
	memset(&m, 0, sizeof(m));
	m.type = type;
	m.attr = ACRN_MEM_ACCESS_RWX;
	m.user_vm_pa = gpa;
	m.vma_base = host;		/* same bytes as service_vm_pa */
	m.len = len;
	return do_ioctl(g, step, fd, cmd, P(&m));
}

static void g_memseg(const char *g)
{
	int fd = open_node();
	create_vm(g, "create_vm", fd, NULL);
	unsigned char *ram = map_pages(16, PROT_READ | PROT_WRITE);
	unsigned char *ro = map_pages(1, PROT_READ);
	unsigned char *gone = unmapped_pages(1);
	unsigned char *half = map_pages(2, PROT_READ | PROT_WRITE);
	if (munmap(half + PAGE, PAGE) < 0)
		die("munmap");

	memseg(g, "bad_type_2", fd, ACRN_IOCTL_SET_MEMSEG, 2, 0, P(ram), PAGE);
	memseg(g, "bad_type_max", fd, ACRN_IOCTL_SET_MEMSEG, 0xFFFFFFFFu, 0, P(ram), PAGE);
	memseg(g, "ram_len0", fd, ACRN_IOCTL_SET_MEMSEG, ACRN_MEMMAP_RAM, 0, P(ram), 0);
	memseg(g, "ram_len4095", fd, ACRN_IOCTL_SET_MEMSEG, ACRN_MEMMAP_RAM, 0, P(ram), PAGE - 1);
	memseg(g, "ram_unmapped", fd, ACRN_IOCTL_SET_MEMSEG, ACRN_MEMMAP_RAM, 0, P(gone), PAGE);
	memseg(g, "ram_readonly", fd, ACRN_IOCTL_SET_MEMSEG, ACRN_MEMMAP_RAM, 0, P(ro), PAGE);
	memseg(g, "ram_half_unmapped", fd, ACRN_IOCTL_SET_MEMSEG, ACRN_MEMMAP_RAM, 0, P(half),
	       2 * PAGE);
	do_ioctl(g, "badptr", fd, ACRN_IOCTL_SET_MEMSEG, BAD_PTR);
	memseg(g, "ram_ok", fd, ACRN_IOCTL_SET_MEMSEG, ACRN_MEMMAP_RAM, 0, P(ram), 8 * PAGE);
	/* len is cut to whole pages; the start is rounded down to its page */
	memseg(g, "ram_len_not_page_multiple", fd, ACRN_IOCTL_SET_MEMSEG, ACRN_MEMMAP_RAM,
	       0x100000, P(ram + 8 * PAGE), PAGE + 100);
	memseg(g, "ram_unaligned_base", fd, ACRN_IOCTL_SET_MEMSEG, ACRN_MEMMAP_RAM, 0x200000,
	       P(ram + 10 * PAGE + 100), PAGE);
	memseg(g, "unset_ram", fd, ACRN_IOCTL_UNSET_MEMSEG, ACRN_MEMMAP_RAM, 0, P(ram), 8 * PAGE);
	memseg(g, "unset_bad_type", fd, ACRN_IOCTL_UNSET_MEMSEG, 2, 0, P(ram), PAGE);
	do_ioctl(g, "unset_badptr", fd, ACRN_IOCTL_UNSET_MEMSEG, BAD_PTR);
	/* MMIO goes to the hypervisor as one region: sizes must be whole pages */
	memseg(g, "mmio_len_not_page_multiple", fd, ACRN_IOCTL_SET_MEMSEG, ACRN_MEMMAP_MMIO,
	       0xE0000000, 0xF0000000, 100);
	memseg(g, "mmio_ok", fd, ACRN_IOCTL_SET_MEMSEG, ACRN_MEMMAP_MMIO, 0xE0000000, 0xF0000000,
	       PAGE);
	memseg(g, "unset_mmio", fd, ACRN_IOCTL_UNSET_MEMSEG, ACRN_MEMMAP_MMIO, 0xE0000000, 0, PAGE);
	memseg(g, "unset_mmio_never_mapped", fd, ACRN_IOCTL_UNSET_MEMSEG, ACRN_MEMMAP_MMIO,
	       0xD0000000, 0, PAGE);
	cleanup(g, fd);
	munmap(ram, 16 * PAGE);
	munmap(ro, PAGE);
	munmap(half, PAGE);
}

/* At most ACRN_MEM_MAPPING_MAX (256) RAM segments per VM, then ENOMEM. */
static void g_memseg_limit(const char *g)
{
	int fd = open_node();
	create_vm(g, "create_vm", fd, NULL);
	unsigned char *ram = map_pages(257, PROT_READ | PROT_WRITE);
	char step[32];
	for (int i = 0; i < 257; i++) {
		snprintf(step, sizeof(step), "ram_%03d", i);
		memseg(g, step, fd, ACRN_IOCTL_SET_MEMSEG, ACRN_MEMMAP_RAM,
		       0x10000000ULL + (uint64_t)i * PAGE, P(ram + (size_t)i * PAGE), PAGE);
	}
	cleanup(g, fd);
	munmap(ram, 257 * PAGE);
}

/* ---- PM_GET_CPU_STATE ---- */

static uint64_t pm_cmd(uint16_t vmid, unsigned vcpu, unsigned idx, unsigned type)
{
	return (uint64_t)vmid << 24 | vcpu << 16 | idx << 8 | type;
}

static void pm(const char *g, const char *step, int fd, uint64_t cmd)
{
	static uint64_t buf[8] __attribute__((aligned(64)));	/* room for 48-byte results */
	memset(buf, 0, sizeof(buf));
	buf[0] = cmd;
	do_ioctl(g, step, fd, ACRN_IOCTL_PM_GET_CPU_STATE, P(buf));
}

static void g_pm(const char *g)
{
	int fd = open_node();
	struct acrn_vm_creation c;
	create_vm(g, "create_vm", fd, &c);
	pm(g, "unknown_type_7f", fd, pm_cmd(c.vmid, 0, 0, 0x7F));
	pm(g, "unknown_type_4", fd, pm_cmd(c.vmid, 0, 0, 4));
	pm(g, "px_cnt", fd, pm_cmd(c.vmid, 0, 0, ACRN_PMCMD_GET_PX_CNT));
	pm(g, "px_data", fd, pm_cmd(c.vmid, 0, 0, ACRN_PMCMD_GET_PX_DATA));
	pm(g, "cx_cnt", fd, pm_cmd(c.vmid, 0, 0, ACRN_PMCMD_GET_CX_CNT));
	pm(g, "cx_data_index0", fd, pm_cmd(c.vmid, 0, 0, ACRN_PMCMD_GET_CX_DATA));
	do_ioctl(g, "badptr", fd, ACRN_IOCTL_PM_GET_CPU_STATE, BAD_PTR);
	do_ioctl(g, "start", fd, ACRN_IOCTL_START_VM, 0);
	pm(g, "running_cx_cnt", fd, pm_cmd(c.vmid, 0, 0, ACRN_PMCMD_GET_CX_CNT));
	pm(g, "running_unknown_type", fd, pm_cmd(c.vmid, 0, 0, 0x7F));
	cleanup(g, fd);
}

/* ---- IOEVENTFD ---- */

static void ioeventfd(const char *g, const char *step, int fd, int efd, uint32_t flags,
		      uint64_t addr, uint32_t len, uint64_t data, uint32_t reserved)
{
	struct acrn_ioeventfd e;
	memset(&e, 0, sizeof(e));
	e.fd = (uint32_t)efd;
	e.flags = flags;
	e.addr = addr;
	e.len = len;
	e.data = data;
	e.reserved = reserved;
	do_ioctl(g, step, fd, ACRN_IOCTL_IOEVENTFD, P(&e));
}

static int new_eventfd(void)
{
	int e = eventfd(0, EFD_CLOEXEC);
	if (e < 0)
		die("eventfd");
	return e;
}

static void g_ioeventfd(const char *g)
{
	const uint32_t PIO = ACRN_IOEVENTFD_FLAG_PIO, DM = ACRN_IOEVENTFD_FLAG_DATAMATCH,
		       DEASSIGN = ACRN_IOEVENTFD_FLAG_DEASSIGN;
	int fd = open_node();
	create_vm(g, "create_vm", fd, NULL);
	int e1 = new_eventfd(), e2 = new_eventfd(), e3 = new_eventfd();
	int e1dup = dup(e1);
	int devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
	if (e1dup < 0 || devnull < 0)
		die("dup/open");

	ioeventfd(g, "len3", fd, e1, PIO, 0x1000, 3, 0, 0);
	ioeventfd(g, "len0", fd, e1, PIO, 0x1000, 0, 0, 0);
	ioeventfd(g, "len16", fd, e1, PIO, 0x1000, 16, 0, 0);
	ioeventfd(g, "addr_wraps", fd, e1, 0, ~0ULL, 2, 0, 0);
	ioeventfd(g, "addr_ends_at_2_64", fd, e1, 0, ~0ULL - 1, 2, 0, 0);
	ioeventfd(g, "closed_fd", fd, CLOSED_FD, PIO, 0x1000, 2, 0, 0);
	ioeventfd(g, "len3_and_closed_fd", fd, CLOSED_FD, PIO, 0x1000, 3, 0, 0);
	ioeventfd(g, "not_eventfd", fd, devnull, PIO, 0x1000, 2, 0, 0);
	ioeventfd(g, "reserved", fd, e1, PIO, 0x1000, 2, 0, 1);
	ioeventfd(g, "reserved_deassign", fd, e1, PIO | DEASSIGN, 0x1000, 2, 0, 0x80000000u);
	do_ioctl(g, "badptr", fd, ACRN_IOCTL_IOEVENTFD, BAD_PTR);

	ioeventfd(g, "assign", fd, e1, PIO, 0x1000, 2, 0, 0);
	ioeventfd(g, "duplicate", fd, e1, PIO, 0x1000, 2, 0, 0);
	ioeventfd(g, "duplicate_other_len", fd, e1, PIO, 0x1000, 4, 0, 0);
	ioeventfd(g, "duplicate_via_dup_fd", fd, e1dup, PIO, 0x1000, 2, 0, 0);
	ioeventfd(g, "datamatch_over_wildcard", fd, e1, PIO | DM, 0x1000, 2, 5, 0);
	ioeventfd(g, "other_eventfd_same_addr", fd, e2, PIO, 0x1000, 2, 0, 0);
	ioeventfd(g, "mmio_same_addr", fd, e1, 0, 0x1000, 2, 0, 0);
	ioeventfd(g, "datamatch_1", fd, e1, PIO | DM, 0x2000, 2, 1, 0);
	ioeventfd(g, "datamatch_2", fd, e1, PIO | DM, 0x2000, 2, 2, 0);
	ioeventfd(g, "datamatch_1_again", fd, e1, PIO | DM, 0x2000, 2, 1, 0);
	ioeventfd(g, "wildcard_over_datamatch", fd, e1, PIO, 0x2000, 2, 0, 0);
	ioeventfd(g, "unknown_flag_bits", fd, e2, PIO | 0x80, 0x3000, 2, 0, 0);
	ioeventfd(g, "mmio_len8", fd, e2, 0, 0xFED00000, 8, 0, 0);

	ioeventfd(g, "deassign", fd, e1, DEASSIGN, 0, 0, 0, 0);
	ioeventfd(g, "deassign_closed_fd", fd, CLOSED_FD, DEASSIGN, 0, 0, 0, 0);
	ioeventfd(g, "deassign_not_eventfd", fd, devnull, DEASSIGN, 0, 0, 0, 0);
	ioeventfd(g, "deassign_never_assigned", fd, e3, DEASSIGN | PIO, 0x1000, 2, 0, 0);
	cleanup(g, fd);
	close(e1);
	close(e1dup);
	close(e2);
	close(e3);
	close(devnull);
}

/* ---- IRQFD ---- */

static void irqfd(const char *g, const char *step, int fd, int efd, uint32_t flags)
{
	struct acrn_irqfd q;
	memset(&q, 0, sizeof(q));
	q.fd = efd;
	q.flags = flags;
	q.msi.msi_addr = 0xFEE00000;
	q.msi.msi_data = 0x30;
	do_ioctl(g, step, fd, ACRN_IOCTL_IRQFD, P(&q));
}

static void g_irqfd(const char *g)
{
	const uint32_t DEASSIGN = ACRN_IRQFD_FLAG_DEASSIGN;
	int fd = open_node();
	create_vm(g, "create_vm", fd, NULL);
	int e1 = new_eventfd(), e2 = new_eventfd(), e3 = new_eventfd(), e4 = new_eventfd();
	int e1dup = dup(e1);
	int devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
	if (e1dup < 0 || devnull < 0)
		die("dup/open");
	uint64_t one = 1;
	if (write(e3, &one, sizeof(one)) != sizeof(one))
		die("eventfd write");

	irqfd(g, "closed_fd", fd, CLOSED_FD, 0);
	irqfd(g, "negative_fd", fd, -1, 0);
	irqfd(g, "not_eventfd", fd, devnull, 0);
	do_ioctl(g, "badptr", fd, ACRN_IOCTL_IRQFD, BAD_PTR);
	irqfd(g, "assign", fd, e1, 0);
	irqfd(g, "duplicate", fd, e1, 0);
	irqfd(g, "duplicate_via_dup_fd", fd, e1dup, 0);
	irqfd(g, "other_eventfd", fd, e2, 0);
	irqfd(g, "already_signalled", fd, e3, 0);	/* injects one MSI at once */
	irqfd(g, "unknown_flag_bits", fd, e4, 0x6);
	irqfd(g, "deassign", fd, e1, DEASSIGN);
	irqfd(g, "deassign_again", fd, e1, DEASSIGN);
	irqfd(g, "reassign", fd, e1, 0);
	irqfd(g, "deassign_closed_fd", fd, CLOSED_FD, DEASSIGN);
	irqfd(g, "deassign_not_eventfd", fd, devnull, DEASSIGN);
	cleanup(g, fd);
	close(e1);
	close(e1dup);
	close(e2);
	close(e3);
	close(e4);
	close(devnull);
}

/* ---- INJECT_MSI, VM_INTR_MONITOR, SET_IRQLINE ---- */

static void g_interrupts(const char *g)
{
	int fd = open_node();
	create_vm(g, "create_vm", fd, NULL);
	struct acrn_msi_entry msi = { .msi_addr = 0xFEE00000, .msi_data = 0x30 };
	do_ioctl(g, "inject_msi", fd, ACRN_IOCTL_INJECT_MSI, P(&msi));
	msi.msi_addr = 0xFED00000;	/* not in the 0xFEExxxxx window */
	do_ioctl(g, "inject_msi_bad_addr", fd, ACRN_IOCTL_INJECT_MSI, P(&msi));
	do_ioctl(g, "inject_msi_badptr", fd, ACRN_IOCTL_INJECT_MSI, BAD_PTR);

	/* VM_INTR_MONITOR's argument is the page address itself */
	memset(&monitor_page, 0, sizeof(monitor_page));
	do_ioctl(g, "intr_monitor_get", fd, ACRN_IOCTL_VM_INTR_MONITOR, P(&monitor_page));
	monitor_page.m.cmd = 1;		/* INTR_CMD_DELAY_INT, buffer[0] = 0 ms */
	monitor_page.m.buf_cnt = 0;
	do_ioctl(g, "intr_monitor_delay", fd, ACRN_IOCTL_VM_INTR_MONITOR, P(&monitor_page));
	monitor_page.m.cmd = 0;
	monitor_page.m.buf_cnt = 49;
	do_ioctl(g, "intr_monitor_buf_cnt_49", fd, ACRN_IOCTL_VM_INTR_MONITOR, P(&monitor_page));
	monitor_page.m.cmd = 2;
	monitor_page.m.buf_cnt = 0;
	do_ioctl(g, "intr_monitor_bad_cmd", fd, ACRN_IOCTL_VM_INTR_MONITOR, P(&monitor_page));
	void *gone = unmapped_pages(1);
	do_ioctl(g, "intr_monitor_unmapped", fd, ACRN_IOCTL_VM_INTR_MONITOR, P(gone));
	void *ro = map_pages(1, PROT_READ);
	do_ioctl(g, "intr_monitor_readonly", fd, ACRN_IOCTL_VM_INTR_MONITOR, P(ro));

	/* SET_IRQLINE's argument is the {gsi, op} value itself */
	do_ioctl(g, "set_irqline", fd, ACRN_IOCTL_SET_IRQLINE, IRQLINE_VALUE(4, 0));
	do_ioctl(g, "set_irqline_pulse", fd, ACRN_IOCTL_SET_IRQLINE, IRQLINE_VALUE(4, 2));
	do_ioctl(g, "set_irqline_bad_gsi", fd, ACRN_IOCTL_SET_IRQLINE, IRQLINE_VALUE(100, 0));
	/* a mapped address used as the value: gsi = its low half, way out of range */
	do_ioctl(g, "set_irqline_ptrval", fd, ACRN_IOCTL_SET_IRQLINE, P(zero_page));
	cleanup(g, fd);
	munmap(ro, PAGE);
}

/* ---- opaque passthrough / vdev ioctls (hypervisor state checks) ---- */

static void g_devices(const char *g)
{
	int fd = open_node();
	create_vm(g, "create_vm", fd, NULL);
	struct acrn_ptdev_irq irq;
	struct acrn_pcidev pci;
	struct acrn_mmiodev mmio;
	struct acrn_vdev vdev;

	memset(&irq, 0, sizeof(irq));
	irq.type = ACRN_PTDEV_IRQ_MSI;
	do_ioctl(g, "set_ptdev_intr_msi", fd, ACRN_IOCTL_SET_PTDEV_INTR, P(&irq));
	irq.type = ACRN_PTDEV_IRQ_INTX;
	irq.virt_bdf = 0x0018;
	irq.phys_bdf = 0x0018;
	irq.intx.virt_pin = 5;
	irq.intx.phys_pin = 5;
	do_ioctl(g, "set_ptdev_intr_no_vdev", fd, ACRN_IOCTL_SET_PTDEV_INTR, P(&irq));
	memset(&pci, 0, sizeof(pci));
	pci.virt_bdf = 0x0018;
	pci.phys_bdf = 0xFFFF;
	do_ioctl(g, "assign_pcidev_no_device", fd, ACRN_IOCTL_ASSIGN_PCIDEV, P(&pci));
	memset(&vdev, 0, sizeof(vdev));
	vdev.id.fields.vendor = 0x1234;
	vdev.id.fields.device = 0x5678;
	do_ioctl(g, "create_vdev_unknown_id", fd, ACRN_IOCTL_CREATE_VDEV, P(&vdev));
	vdev.slot = 0x00F8;
	do_ioctl(g, "destroy_vdev_none", fd, ACRN_IOCTL_DESTROY_VDEV, P(&vdev));

	do_ioctl(g, "badptr_set_ptdev_intr", fd, ACRN_IOCTL_SET_PTDEV_INTR, BAD_PTR);
	do_ioctl(g, "badptr_reset_ptdev_intr", fd, ACRN_IOCTL_RESET_PTDEV_INTR, BAD_PTR);
	do_ioctl(g, "badptr_assign_pcidev", fd, ACRN_IOCTL_ASSIGN_PCIDEV, BAD_PTR);
	do_ioctl(g, "badptr_deassign_pcidev", fd, ACRN_IOCTL_DEASSIGN_PCIDEV, BAD_PTR);
	do_ioctl(g, "badptr_assign_mmiodev", fd, ACRN_IOCTL_ASSIGN_MMIODEV, BAD_PTR);
	do_ioctl(g, "badptr_deassign_mmiodev", fd, ACRN_IOCTL_DEASSIGN_MMIODEV, BAD_PTR);
	do_ioctl(g, "badptr_create_vdev", fd, ACRN_IOCTL_CREATE_VDEV, BAD_PTR);
	do_ioctl(g, "badptr_destroy_vdev", fd, ACRN_IOCTL_DESTROY_VDEV, BAD_PTR);

	do_ioctl(g, "start", fd, ACRN_IOCTL_START_VM, 0);
	memset(&mmio, 0, sizeof(mmio));
	do_ioctl(g, "running_set_ptdev_intr", fd, ACRN_IOCTL_SET_PTDEV_INTR, P(&irq));
	do_ioctl(g, "running_reset_ptdev_intr", fd, ACRN_IOCTL_RESET_PTDEV_INTR, P(&irq));
	do_ioctl(g, "running_assign_pcidev", fd, ACRN_IOCTL_ASSIGN_PCIDEV, P(&pci));
	do_ioctl(g, "running_deassign_pcidev", fd, ACRN_IOCTL_DEASSIGN_PCIDEV, P(&pci));
	do_ioctl(g, "running_assign_mmiodev", fd, ACRN_IOCTL_ASSIGN_MMIODEV, P(&mmio));
	do_ioctl(g, "running_deassign_mmiodev", fd, ACRN_IOCTL_DEASSIGN_MMIODEV, P(&mmio));
	do_ioctl(g, "running_create_vdev", fd, ACRN_IOCTL_CREATE_VDEV, P(&vdev));
	do_ioctl(g, "running_destroy_vdev", fd, ACRN_IOCTL_DESTROY_VDEV, P(&vdev));
	cleanup(g, fd);
}

/* ---- kernel quirks that leave VMs behind (opt-in) ---- */

/*
 * A second CREATE_VM on a file with a live VM: the hypervisor creates a
 * second VM, the request page is already set (EEXIST), the driver tries to
 * destroy the new VM (refused: not paused) and forgets the first: EINVAL,
 * and the file has no VM any more. Leaves two VMs in the hypervisor.
 */
static void q_create_twice(const char *g)
{
	int fd = open_node();
	create_vm(g, "create_vm", fd, NULL);
	create_vm(g, "create_vm_again", fd, NULL);
	do_ioctl(g, "start_after", fd, ACRN_IOCTL_START_VM, 0);
	close(fd);
}

/*
 * DESTROYED is sticky: a VM created on a file after a destroy can never be
 * destroyed by the driver (DESTROY_VM returns 0 and does nothing). Leaves
 * one paused VM in the hypervisor.
 */
static void q_sticky_destroyed(const char *g)
{
	int fd = open_node();
	create_vm(g, "create_vm", fd, NULL);
	do_ioctl(g, "pause", fd, ACRN_IOCTL_PAUSE_VM, 0);
	do_ioctl(g, "destroy", fd, ACRN_IOCTL_DESTROY_VM, 0);
	create_vm(g, "create_vm_again", fd, NULL);
	do_ioctl(g, "destroy_noop", fd, ACRN_IOCTL_DESTROY_VM, 0);
	do_ioctl(g, "start_still_alive", fd, ACRN_IOCTL_START_VM, 0);
	do_ioctl(g, "pause_again", fd, ACRN_IOCTL_PAUSE_VM, 0);
	do_ioctl(g, "destroy_noop_again", fd, ACRN_IOCTL_DESTROY_VM, 0);
	close(fd);
}

/* ------------------------------------------------------------------ */

static const struct {
	const char *name;
	void (*fn)(const char *);
	int by_default;
} groups[] = {
	{ "gate", g_gate, 1 },
	{ "rw", g_rw, 1 },
	{ "create", g_create, 1 },
	{ "create_ro", g_create_ro, 1 },
	{ "unknown", g_unknown, 1 },
	{ "notify", g_notify, 1 },
	{ "client", g_client, 1 },
	{ "attach_wake", g_attach_wake, 1 },
	{ "attach_signal", g_attach_signal, 1 },
	{ "vcpu_regs", g_vcpu_regs, 1 },
	{ "lifecycle", g_lifecycle, 1 },
	{ "pause_created", g_pause_created, 1 },
	{ "memseg", g_memseg, 1 },
	{ "memseg_limit", g_memseg_limit, 1 },
	{ "pm", g_pm, 1 },
	{ "ioeventfd", g_ioeventfd, 1 },
	{ "irqfd", g_irqfd, 1 },
	{ "interrupts", g_interrupts, 1 },
	{ "devices", g_devices, 1 },
	{ "q_create_twice", q_create_twice, 0 },
	{ "q_sticky_destroyed", q_sticky_destroyed, 0 },
};

static int selected(const char *list, const char *name, int by_default)
{
	if (list == NULL || strcmp(list, "default") == 0)
		return by_default;
	if (strcmp(list, "all") == 0)
		return 1;
	size_t n = strlen(name);
	for (const char *p = list; (p = strstr(p, name)) != NULL; p += n)
		if ((p == list || p[-1] == ',') && (p[n] == ',' || p[n] == '\0'))
			return 1;
	return 0;
}

int main(int argc, char **argv)
{
	if (argc < 2 || argc > 3) {
		fprintf(stderr, "usage: %s NODE [GROUP[,GROUP...]|default|all]\n", argv[0]);
		return 2;
	}
	node = argv[1];
	const char *list = argc == 3 ? argv[2] : NULL;
	if (list && strcmp(list, "--list") == 0) {
		for (size_t i = 0; i < sizeof(groups) / sizeof(groups[0]); i++)
			printf("%s%s\n", groups[i].name, groups[i].by_default ? "" : " (opt-in)");
		return 0;
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	alarm(300);	/* a wedged server must not wedge the test run */
	for (size_t i = 0; i < sizeof(groups) / sizeof(groups[0]); i++) {
		if (!selected(list, groups[i].name, groups[i].by_default))
			continue;
		printf("GROUP %s\n", groups[i].name);
		groups[i].fn(groups[i].name);
	}
	printf("END\n");
	return 0;
}
