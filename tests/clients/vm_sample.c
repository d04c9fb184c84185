/*
 * vm_sample: a User VM launcher in the style of the kernel's
 * samples/acrn/vm-sample.c (our own code): zero-filled CREATE_VM with the
 * request page in BSS, guest RAM from posix_memalign (or a memfd with -f),
 * the guest image copied in, SET_MEMSEG, SET_VCPU_REGS, one ioreq client,
 * START_VM, then one loop: ATTACH, handle every PROCESSING slot, NOTIFY.
 *
 *   vm_sample [options] NODE
 *
 * The VM
 *   -C MASK          CREATE_VM's cpu_affinity: one vCPU per bit (default 0: the
 *                    scenario's default for the slot)
 * Memory and registers
 *   -m SIZE          RAM at GPA 0, bytes (default 0x10000)
 *   -f               back RAM with a memfd mapped MAP_SHARED (default: posix_memalign)
 *   -H               the memfd is MFD_HUGETLB (2 MiB pages, as acrn-dm's); implies -f
 *   -A GPA:OFF:LEN   also map RAM[OFF, OFF+LEN) at GPA (a second SET_MEMSEG, same pages)
 *   -g FILE@GPA      copy FILE into RAM at GPA (repeatable)
 *   -r MODE          real (vm-sample's: cr0 0x30, cs 0xF000 base 0 ar 0x9F limit 0xFFFF),
 *                    pm32 (cr0 0x31, cs 0x10 flat ar 0xC09B, ds/es/ss 0x18) or
 *                    long (cr0 0x80000031, cr4 PAE, efer LME, cs 0x10 ar 0xA09B)
 *   -e RIP -s RSP -c CR3 -G BASE:LIMIT -I BASE:LIMIT
 * Answers to reads (default 0)
 *   -a PORT=VAL      PORTIO reads of PORT     -M GPA=VAL  MMIO reads at GPA
 *   -P VAL           PCICFG reads
 * Stopping and actions
 *   -d PORT          stop after a write to PORT (default 0x1f)
 *   -n N             stop after N requests
 *   -q               quiet: no request lines (benchmarks)
 *   -R VAL           put VAL in acrn_ioreq_notify.reserved, as the kernel's vm-sample.c
 *                    does by accident (it never initialises the field: stack garbage, 0x2f2f
 *                    in the runs of issue 20); the driver then answers EINVAL to every
 *                    NOTIFY_REQUEST_FINISH and this exits 1 naming it
 *   -x PORT:N:ACTION after the Nth write to PORT was completed (N = 0: every one), do:
 *        peek:GPA       print the u32 at RAM[GPA] (what this process sees)
 *        poke:GPA:VAL   write the u32 VAL at RAM[GPA] (before completing the write)
 *        msi:DATA       INJECT_MSI, address 0xFEE00000
 *        pause:GPA      wait until the u32 at RAM[GPA] changes, time PAUSE_VM, then
 *                       read it, sleep 200 ms, read it again
 *        reset          PAUSE_VM (if running), RESET_VM, START_VM
 *        resetregs      the same with SET_VCPU_REGS before START_VM
 *        stop           stop (as the done port does)
 *
 * Prints one line per request handled:
 *   req vcpu=0 type=pio dir=w addr=0x10 size=4 value=0x4e524341
 *   req vcpu=0 type=pci dir=r bus=0 dev=3 func=2 reg=0x10 size=4 value=0x...
 * (reads show the answer given; -q: no request lines), lines for the actions, then
 *   cycle ns p50=.. p99=.. mean=.. per_s=..   (request to request, from the 2nd on)
 * (after "vmid=.." a line "memseg ns=.." gives the time the SET_MEMSEGs took)
 *   done requests=N
 * after PAUSE_VM, DESTROY_VM and close. Exit 0, or 1 with a message on stderr.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <linux/acrn.h>

static struct acrn_io_request_buffer io_request_page __attribute__((aligned(4096)));

#define MAX_ITEMS 32

static int hsm_fd = -1;
static uint16_t vmid;
static uint8_t *ram;
static uint64_t ram_size = 0x10000;
static uint64_t cpu_affinity;	/* -C: 0 = the slot's default */
static struct acrn_vcpu_regs regs;
static int running;

static struct { uint64_t key, value; } port_answers[MAX_ITEMS], mmio_answers[MAX_ITEMS];
static int n_port_answers, n_mmio_answers;
static uint32_t pci_answer;
static struct { uint64_t port, nth; char action[64]; } actions[MAX_ITEMS];
static int n_actions;
static struct { uint64_t port, count; } writes[MAX_ITEMS];
static int n_writes;
static int stop;
static int quiet;
static uint16_t notify_reserved;	/* -R */
#define MAX_SAMPLES (1 << 20)
static uint64_t samples[MAX_SAMPLES];
static long n_samples;

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

/* Counts writes to ports that have actions; returns this write's number. */
static uint64_t count_write(uint64_t port)
{
	for (int i = 0; i < n_writes; i++)
		if (writes[i].port == port)
			return ++writes[i].count;
	if (n_writes < MAX_ITEMS) {
		writes[n_writes].port = port;
		writes[n_writes].count = 1;
		n_writes++;
	}
	return 1;
}

static int fires(int i, uint64_t port, uint64_t nth)
{
	return actions[i].port == port && (actions[i].nth == 0 || actions[i].nth == nth);
}

static void die(const char *what)
{
	fprintf(stderr, "vm_sample: %s: %s\n", what, strerror(errno));
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

static void pair(const char *s, uint64_t *a, uint64_t *b, char sep)
{
	const char *p = strchr(s, sep);
	if (!p) {
		fprintf(stderr, "vm_sample: expected A%cB: %s\n", sep, s);
		exit(2);
	}
	*a = num(s);
	*b = num(p + 1);
}

static uint64_t now_ns(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static uint32_t ram_u32(uint64_t gpa)
{
	return __atomic_load_n((uint32_t *)(ram + gpa), __ATOMIC_SEQ_CST);
}

static void set_regs_mode(const char *mode)
{
	struct acrn_regs *r = &regs.vcpu_regs;
	if (!strcmp(mode, "real")) {	/* exactly what vm-sample sets */
		r->cr0 = 0x30;
		r->cs_sel = 0xF000;
		r->cs_base = 0;
		r->cs_ar = 0x9F;
		r->cs_limit = 0xFFFF;
	} else if (!strcmp(mode, "pm32")) {
		r->cr0 = 0x31;
		r->cs_sel = 0x10;
		r->cs_base = 0;
		r->cs_ar = 0xC09B;
		r->cs_limit = 0xFFFFFFFF;
		r->ds_sel = r->es_sel = r->ss_sel = 0x18;
	} else if (!strcmp(mode, "long")) {
		r->cr0 = 0x80000031;
		r->cr4 = 0x20;
		r->ia32_efer = 0x100;	/* LME; the CPU makes it active with paging */
		r->cs_sel = 0x10;
		r->cs_base = 0;
		r->cs_ar = 0xA09B;
		r->cs_limit = 0xFFFFFFFF;
		r->ds_sel = r->es_sel = r->ss_sel = 0x18;
	} else {
		fprintf(stderr, "vm_sample: unknown register mode %s\n", mode);
		exit(2);
	}
}

static uint64_t answer_for(const struct acrn_io_request *req)
{
	if (req->type == ACRN_IOREQ_TYPE_PORTIO) {
		for (int i = 0; i < n_port_answers; i++)
			if (port_answers[i].key == req->reqs.pio_request.address)
				return port_answers[i].value;
	} else if (req->type == ACRN_IOREQ_TYPE_MMIO) {
		for (int i = 0; i < n_mmio_answers; i++)
			if (mmio_answers[i].key == req->reqs.mmio_request.address)
				return mmio_answers[i].value;
	} else if (req->type == ACRN_IOREQ_TYPE_PCICFG) {
		return pci_answer;
	}
	return 0;
}

static void print_request(int vcpu, const struct acrn_io_request *req)
{
	if (req->type == ACRN_IOREQ_TYPE_PORTIO) {
		const struct acrn_pio_request *p = &req->reqs.pio_request;
		printf("req vcpu=%d type=pio dir=%c addr=%#" PRIx64 " size=%" PRIu64 " value=%#x\n",
		       vcpu, p->direction ? 'w' : 'r', (uint64_t)p->address, (uint64_t)p->size,
		       p->value);
	} else if (req->type == ACRN_IOREQ_TYPE_MMIO) {
		const struct acrn_mmio_request *m = &req->reqs.mmio_request;
		printf("req vcpu=%d type=mmio dir=%c addr=%#" PRIx64 " size=%" PRIu64
		       " value=%#" PRIx64 "\n", vcpu, m->direction ? 'w' : 'r',
		       (uint64_t)m->address, (uint64_t)m->size, (uint64_t)m->value);
	} else if (req->type == ACRN_IOREQ_TYPE_PCICFG) {
		const struct acrn_pci_request *c = &req->reqs.pci_request;
		printf("req vcpu=%d type=pci dir=%c bus=%d dev=%d func=%d reg=%#x size=%" PRIu64
		       " value=%#x\n", vcpu, c->direction ? 'w' : 'r', c->bus, c->dev, c->func,
		       c->reg, (uint64_t)c->size, c->value);
	} else {
		printf("req vcpu=%d type=%u\n", vcpu, req->type);
	}
}

static void pause_vm(void)
{
	if (running) {
		hsm(ACRN_IOCTL_PAUSE_VM, vmid, "PAUSE_VM");
		running = 0;
	}
}

static void start_vm(int with_regs)
{
	if (with_regs)
		hsm(ACRN_IOCTL_SET_VCPU_REGS, (unsigned long)&regs, "SET_VCPU_REGS");
	hsm(ACRN_IOCTL_START_VM, vmid, "START_VM");
	running = 1;
}

/* Actions that must happen before the request completes (the guest waits). */
static void pre_action(uint64_t port, uint64_t nth)
{
	for (int i = 0; i < n_actions; i++) {
		uint64_t gpa, val;
		if (!fires(i, port, nth) || strncmp(actions[i].action, "poke:", 5))
			continue;
		pair(actions[i].action + 5, &gpa, &val, ':');
		__atomic_store_n((uint32_t *)(ram + gpa), (uint32_t)val, __ATOMIC_SEQ_CST);
		printf("poke gpa=%#" PRIx64 " value=%#" PRIx64 "\n", gpa, val);
	}
}

static void post_action(uint64_t port, uint64_t nth)
{
	for (int i = 0; i < n_actions; i++) {
		const char *a = actions[i].action;
		if (!fires(i, port, nth))
			continue;
		if (!strncmp(a, "peek:", 5)) {
			uint64_t gpa = num(a + 5);
			printf("peek gpa=%#" PRIx64 " value=%#x\n", gpa, ram_u32(gpa));
		} else if (!strncmp(a, "msi:", 4)) {
			struct acrn_msi_entry msi = { .msi_addr = 0xFEE00000, .msi_data = num(a + 4) };
			hsm(ACRN_IOCTL_INJECT_MSI, (unsigned long)&msi, "INJECT_MSI");
			printf("msi data=%#" PRIx64 "\n", (uint64_t)msi.msi_data);
		} else if (!strncmp(a, "pause:", 6)) {
			uint64_t gpa = num(a + 6);
			uint32_t first = ram_u32(gpa);
			uint64_t deadline = now_ns() + 30000000000ull;	/* hang guard */
			while (ram_u32(gpa) == first) {
				if (now_ns() > deadline) {
					fprintf(stderr, "vm_sample: the guest never counted\n");
					exit(1);
				}
				usleep(100);
			}
			uint32_t before = ram_u32(gpa);
			uint64_t t0 = now_ns();
			pause_vm();
			uint64_t t1 = now_ns();
			uint32_t c1 = ram_u32(gpa);
			usleep(200000);
			uint32_t c2 = ram_u32(gpa);
			printf("paused ns=%" PRIu64 " running_count=%#x after_pause=%#x later=%#x\n",
			       t1 - t0, before, c1, c2);
		} else if (!strcmp(a, "reset") || !strcmp(a, "resetregs")) {
			pause_vm();
			hsm(ACRN_IOCTL_RESET_VM, vmid, "RESET_VM");
			start_vm(!strcmp(a, "resetregs"));
			printf("%s\n", a);
		} else if (!strcmp(a, "stop")) {
			stop = 1;
		}
	}
}

static void add_memseg(uint64_t gpa, uint8_t *va, uint64_t len)
{
	struct acrn_vm_memmap map = {
		.type = ACRN_MEMMAP_RAM,
		.attr = ACRN_MEM_ACCESS_RWX,
		.user_vm_pa = gpa,
		.vma_base = (uint64_t)(uintptr_t)va,
		.len = len,
	};
	hsm(ACRN_IOCTL_SET_MEMSEG, (unsigned long)&map, "SET_MEMSEG");
}

static void load_file(const char *spec)
{
	char path[512];
	const char *at = strrchr(spec, '@');
	if (!at || (size_t)(at - spec) >= sizeof(path)) {
		fprintf(stderr, "vm_sample: -g FILE@GPA\n");
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
		fprintf(stderr, "vm_sample: %s is empty or past the RAM\n", path);
		exit(1);
	}
}

int main(int argc, char **argv)
{
	int use_memfd = 0, huge = 0, opt;
	uint64_t done_port = 0x1f, limit = 0;
	const char *files[MAX_ITEMS];
	int n_files = 0;
	struct { uint64_t gpa, off, len; } aliases[4];
	int n_aliases = 0;

	set_regs_mode("real");
	while ((opt = getopt(argc, argv, "C:m:fHA:g:r:e:s:c:G:I:a:M:P:d:n:x:qR:")) != -1) {
		struct acrn_regs *r = &regs.vcpu_regs;
		uint64_t a, b;
		switch (opt) {
		case 'C': cpu_affinity = num(optarg); break;
		case 'm': ram_size = num(optarg); break;
		case 'f': use_memfd = 1; break;
		case 'H': use_memfd = huge = 1; break;
		case 'A':
			if (n_aliases == 4 || sscanf(optarg, "%" SCNi64 ":%" SCNi64 ":%" SCNi64,
						     &aliases[n_aliases].gpa, &aliases[n_aliases].off,
						     &aliases[n_aliases].len) != 3)
				return 2;
			n_aliases++;
			break;
		case 'g': if (n_files < MAX_ITEMS) files[n_files++] = optarg; break;
		case 'r': set_regs_mode(optarg); break;
		case 'e': r->rip = num(optarg); break;
		case 's': r->gprs.rsp = num(optarg); break;
		case 'c': r->cr3 = num(optarg); break;
		case 'G': pair(optarg, &a, &b, ':'); r->gdt.base = a; r->gdt.limit = b; break;
		case 'I': pair(optarg, &a, &b, ':'); r->idt.base = a; r->idt.limit = b; break;
		case 'a':
			if (n_port_answers < MAX_ITEMS) {
				pair(optarg, &a, &b, '=');
				port_answers[n_port_answers].key = a;
				port_answers[n_port_answers++].value = b;
			}
			break;
		case 'M':
			if (n_mmio_answers < MAX_ITEMS) {
				pair(optarg, &a, &b, '=');
				mmio_answers[n_mmio_answers].key = a;
				mmio_answers[n_mmio_answers++].value = b;
			}
			break;
		case 'P': pci_answer = num(optarg); break;
		case 'd': done_port = num(optarg); break;
		case 'n': limit = num(optarg); break;
		case 'q': quiet = 1; break;
		case 'R': notify_reserved = (uint16_t)num(optarg); break;
		case 'x': {
			const char *c = strchr(optarg, ':');
			const char *c2 = c ? strchr(c + 1, ':') : NULL;
			if (!c2 || n_actions == MAX_ITEMS)
				return 2;
			actions[n_actions].port = num(optarg);
			actions[n_actions].nth = num(c + 1);
			snprintf(actions[n_actions++].action, sizeof(actions[0].action), "%s", c2 + 1);
			break;
		}
		default: return 2;
		}
	}
	if (optind != argc - 1) {
		fprintf(stderr, "usage: vm_sample [options] NODE\n");
		return 2;
	}

	/* Guest memory: private (as vm-sample) or a shared memfd (as acrn-dm). */
	if (use_memfd) {
		int mfd = memfd_create("vm_sample_ram", MFD_CLOEXEC | (huge ? MFD_HUGETLB : 0));
		if (mfd < 0 || ftruncate(mfd, (off_t)ram_size) < 0)
			die("memfd");
		ram = mmap(NULL, ram_size, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
		if (ram == MAP_FAILED)
			die("mmap memfd");
		close(mfd);	/* the mapping keeps it; the daemon finds it through /proc */
	} else {
		void *p;
		errno = posix_memalign(&p, 4096, ram_size);
		if (errno)
			die("posix_memalign");
		ram = p;
		memset(ram, 0, ram_size);
	}
	for (int i = 0; i < n_files; i++)
		load_file(files[i]);

	hsm_fd = open(argv[optind], O_RDWR | O_CLOEXEC);
	if (hsm_fd < 0)
		die(argv[optind]);

	struct acrn_vm_creation create_vm;
	memset(&create_vm, 0, sizeof(create_vm));
	create_vm.ioreq_buf = (uint64_t)(uintptr_t)&io_request_page;
	create_vm.cpu_affinity = cpu_affinity;
	hsm(ACRN_IOCTL_CREATE_VM, (unsigned long)&create_vm, "CREATE_VM");
	vmid = create_vm.vmid;
	if (create_vm.vmid == 0xFFFF) {	/* ACRN_INVALID_VMID */
		fprintf(stderr, "vm_sample: CREATE_VM gave no VM\n");
		return 1;
	}
	printf("vmid=%u vcpu_num=%u ram=%s\n", vmid, create_vm.vcpu_num,
	       huge ? "hugetlb" : use_memfd ? "memfd" : "private");

	uint64_t t_memseg = now_ns();
	add_memseg(0, ram, ram_size);
	for (int i = 0; i < n_aliases; i++)
		add_memseg(aliases[i].gpa, ram + aliases[i].off, aliases[i].len);
	printf("memseg ns=%" PRIu64 "\n", now_ns() - t_memseg);

	regs.vcpu_id = 0;
	int client = ioctl(hsm_fd, ACRN_IOCTL_CREATE_IOREQ_CLIENT, 0);
	if (client < 0)
		die("CREATE_IOREQ_CLIENT");
	start_vm(1);
	fflush(stdout);

	uint64_t handled = 0, last_ns = 0;
	while (!stop) {
		if (ioctl(hsm_fd, ACRN_IOCTL_ATTACH_IOREQ_CLIENT, client) < 0)
			die("ATTACH_IOREQ_CLIENT");
		for (int i = 0; i < create_vm.vcpu_num && i < ACRN_IO_REQUEST_MAX; i++) {
			struct acrn_io_request *req = &io_request_page.req_slot[i];
			if (__atomic_load_n(&req->processed, __ATOMIC_ACQUIRE) != ACRN_IOREQ_STATE_PROCESSING
			    || req->kernel_handled)
				continue;
			int write = req->reqs.pio_request.direction == ACRN_IOREQ_DIR_WRITE;
			uint64_t port = req->type == ACRN_IOREQ_TYPE_PORTIO
				? req->reqs.pio_request.address : (uint64_t)-1;
			if (!write) {
				uint64_t v = answer_for(req);
				if (req->type == ACRN_IOREQ_TYPE_MMIO)
					req->reqs.mmio_request.value = v;
				else if (req->type == ACRN_IOREQ_TYPE_PCICFG)
					req->reqs.pci_request.value = (uint32_t)v;
				else
					req->reqs.pio_request.value = (uint32_t)v;
			}
			if (!quiet)
				print_request(i, req);
			uint64_t nth = write ? count_write(port) : 0;
			if (write)
				pre_action(port, nth);
			struct acrn_ioreq_notify notify = { .vmid = vmid, .reserved = notify_reserved, .vcpu = i };
			hsm(ACRN_IOCTL_NOTIFY_REQUEST_FINISH, (unsigned long)&notify, "NOTIFY");
			handled++;
			uint64_t t = now_ns();
			if (last_ns && n_samples < MAX_SAMPLES)
				samples[n_samples++] = t - last_ns;
			last_ns = t;
			if (write)
				post_action(port, nth);
			if ((write && port == done_port) || (limit && handled >= limit))
				stop = 1;
			fflush(stdout);
		}
	}

	pause_vm();
	hsm(ACRN_IOCTL_DESTROY_IOREQ_CLIENT, client, "DESTROY_IOREQ_CLIENT");
	hsm(ACRN_IOCTL_DESTROY_VM, 0, "DESTROY_VM");
	close(hsm_fd);
	if (n_samples) {
		double sum = 0;
		for (long i = 0; i < n_samples; i++)
			sum += (double)samples[i];
		qsort(samples, (size_t)n_samples, sizeof(samples[0]), cmp_u64);
		printf("cycle ns p50=%" PRIu64 " p99=%" PRIu64 " mean=%.0f per_s=%.0f\n",
		       samples[n_samples / 2], samples[(n_samples * 99) / 100], sum / n_samples,
		       1e9 * n_samples / sum);
	}
	printf("done requests=%" PRIu64 "\n", handled);
	return 0;
}
