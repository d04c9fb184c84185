/* The floor for interrupt injection: a bare KVM VM (in-kernel irqchip, one vCPU
 * that never runs, as a VM the daemon created), the interrupt raised in C.
 *
 *   kvm_irq_loop N irq|msi
 *
 * irq: one sample is a pulse on GSI 4 (KVM_IRQ_LINE level 1, then 0: what the
 * backend does for ACRN's RAISING_PULSE); msi: one KVM_SIGNAL_MSI (address
 * 0xFEE00000, data 0x44: what it does for INJECT_MSI). Prints the line
 * bench/run.py parses: "ns p50=.. p99=.. mean=.." (nanoseconds). */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "ns_stats.h"

static void die(const char *what)
{
	fprintf(stderr, "kvm_irq_loop: %s: %s\n", what, strerror(errno));
	exit(1);
}

int main(int argc, char **argv)
{
	if (argc != 3 || (strcmp(argv[2], "irq") && strcmp(argv[2], "msi"))) {
		fprintf(stderr, "usage: kvm_irq_loop N irq|msi\n");
		return 2;
	}
	long n = atol(argv[1]);
	int msi = !strcmp(argv[2], "msi");
	uint64_t *t = calloc((size_t)n, sizeof(*t));
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0 || !t)
		die("/dev/kvm");
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0)
		die("KVM_CREATE_VM");
	if (ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0)
		die("KVM_CREATE_IRQCHIP");
	if (ioctl(vm, KVM_CREATE_VCPU, 0) < 0)
		die("KVM_CREATE_VCPU");
	struct kvm_irq_level hi = { .irq = 4, .level = 1 }, lo = { .irq = 4, .level = 0 };
	struct kvm_msi m = { .address_lo = 0xFEE00000, .data = 0x44 };
	for (long i = 0; i < n; i++) {
		uint64_t t0 = ns_now();
		if (msi) {
			if (ioctl(vm, KVM_SIGNAL_MSI, &m) < 0)
				die("KVM_SIGNAL_MSI");
		} else if (ioctl(vm, KVM_IRQ_LINE, &hi) < 0 || ioctl(vm, KVM_IRQ_LINE, &lo) < 0) {
			die("KVM_IRQ_LINE");
		}
		t[i] = ns_now() - t0;
	}
	ns_report(t, n);
	return 0;
}
