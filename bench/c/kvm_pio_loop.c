/* The floor for the kvm backend: a bare KVM VM whose 16-bit guest does
 * `out %al, $0x10` in a loop, timed exit by exit.
 *
 *   kvm_pio_loop N [MODE]
 *
 * MODE is "real" (default: real mode, as vm-sample's guest runs) or "long"
 * (64-bit code with identity page tables: the cheapest exit path on hosts
 * that emulate real mode). Each sample is one KVM_RUN: guest resumes, executes
 * the OUT, exits to userspace. Prints one line, the format of ioctl_loop:
 *   "ns p50=.. p99=.. mean=.." (nanoseconds).
 * Same set-up as the backend (in-kernel irqchip), no signals, no Python. */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "ns_stats.h"

#define MEM_SIZE 0x20000

static void die(const char *what)
{
	fprintf(stderr, "kvm_pio_loop: %s: %s\n", what, strerror(errno));
	exit(1);
}

static int xioctl(int fd, unsigned long req, void *arg, const char *what)
{
	int r = ioctl(fd, req, arg);
	if (r < 0)
		die(what);
	return r;
}

int main(int argc, char **argv)
{
	if (argc < 2)
		return 2;
	long n = strtol(argv[1], NULL, 0);
	int long_mode = argc > 2 && !strcmp(argv[2], "long");
	if (n <= 0)
		return 2;

	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		die("/dev/kvm");
	int vm = xioctl(kvm, KVM_CREATE_VM, 0, "KVM_CREATE_VM");
	xioctl(vm, KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP");
	uint8_t *mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE,
			    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (mem == MAP_FAILED)
		die("mmap");
	struct kvm_userspace_memory_region region = {
		.slot = 0, .guest_phys_addr = 0, .memory_size = MEM_SIZE,
		.userspace_addr = (uint64_t)(uintptr_t)mem,
	};
	xioctl(vm, KVM_SET_USER_MEMORY_REGION, &region, "KVM_SET_USER_MEMORY_REGION");
	int vcpu = xioctl(vm, KVM_CREATE_VCPU, 0, "KVM_CREATE_VCPU");
	int run_size = xioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE");
	struct kvm_run *run = mmap(NULL, (size_t)run_size, PROT_READ | PROT_WRITE, MAP_SHARED,
				   vcpu, 0);
	if (run == MAP_FAILED)
		die("mmap kvm_run");

	/* 1: mov $0x41, %al; out %al, $0x10; jmp 1b -- the same bytes in 16 and 64-bit code */
	static const uint8_t loop[] = { 0xb0, 0x41, 0xe6, 0x10, 0xeb, 0xfa };
	struct kvm_sregs s;
	struct kvm_regs r;
	xioctl(vcpu, KVM_GET_SREGS, &s, "KVM_GET_SREGS");
	memset(&r, 0, sizeof(r));
	r.rflags = 2;
	if (!long_mode) {
		memcpy(mem, loop, sizeof(loop));
		s.cs.selector = 0;
		s.cs.base = 0;
		r.rip = 0;
	} else {
		uint64_t *pml4 = (uint64_t *)(mem + 0x10000);
		uint64_t *pdpt = (uint64_t *)(mem + 0x11000);
		uint64_t *pd = (uint64_t *)(mem + 0x12000);
		pml4[0] = 0x11000 | 3;
		pdpt[0] = 0x12000 | 3;
		pd[0] = 0x83;	/* 2 MiB page at 0 */
		memcpy(mem + 0x1000, loop, sizeof(loop));
		struct kvm_segment cs = {
			.base = 0, .limit = 0xffffffff, .selector = 0x10, .type = 0xb,
			.present = 1, .s = 1, .l = 1, .g = 1,
		};
		struct kvm_segment ds = cs;
		ds.type = 3;
		ds.selector = 0x18;
		ds.l = 0;
		ds.db = 1;
		s.cs = cs;
		s.ds = s.es = s.fs = s.gs = s.ss = ds;
		s.cr0 = 0x80000031;
		s.cr3 = 0x10000;
		s.cr4 = 0x20;
		s.efer = 0x500;
		r.rip = 0x1000;
	}
	xioctl(vcpu, KVM_SET_SREGS, &s, "KVM_SET_SREGS");
	xioctl(vcpu, KVM_SET_REGS, &r, "KVM_SET_REGS");

	uint64_t *t = calloc((size_t)n, sizeof(*t));
	if (!t)
		die("calloc");
	for (long i = -200; i < n; i++) {	/* 200 warm-up exits */
		uint64_t a = ns_now();
		xioctl(vcpu, KVM_RUN, 0, "KVM_RUN");
		uint64_t b = ns_now();
		if (run->exit_reason != KVM_EXIT_IO || run->io.port != 0x10) {
			fprintf(stderr, "kvm_pio_loop: unexpected exit %u\n", run->exit_reason);
			return 1;
		}
		if (i >= 0)
			t[i] = b - a;
	}
	ns_report(t, n);
	return 0;
}
