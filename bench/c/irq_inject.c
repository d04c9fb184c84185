/* Interrupts injected through the node, one call timed at a time: what a device
 * model pays to raise one. Plain <linux/acrn.h>, like any ACRN device model,
 * except the "value" mode, which uses the emulator's extension header.
 *
 *   irq_inject NODE N irq|msi|value|null
 *
 * Creates a VM (one vCPU, never started: the interrupt is raised, nobody takes
 * it, as in kvm_irq_loop), then N calls of
 *   irq    SET_IRQLINE, RAISING_PULSE on GSI 4 (under FUSE: through the launcher)
 *   msi    INJECT_MSI, address 0xFEE00000, data 0x44
 *   value  ACRN_EMU_IOCTL_VALUE_CALL carrying that SET_IRQLINE: the launcher's
 *          call to the daemon, without the trap
 *   null   SET_IRQLINE on /dev/null: under the launcher, the trap and the
 *          supervisor's look at the fd, then the kernel's ENOTTY
 * Prints "ns p50=.. p99=.. mean=.." (nanoseconds). */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include <linux/acrn.h>
#include <acrn_hsm_emu.h>

#include "ns_stats.h"

static struct acrn_io_request_buffer io_request_page __attribute__((aligned(4096)));

static void die(const char *what)
{
	fprintf(stderr, "irq_inject: %s: %s\n", what, strerror(errno));
	exit(1);
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: irq_inject NODE N irq|msi|value|null\n");
		return 2;
	}
	long n = atol(argv[2]);
	const char *mode = argv[3];
	uint64_t *t = calloc((size_t)n, sizeof(*t));
	int fd = open(argv[1], O_RDWR | O_CLOEXEC);
	int null = open("/dev/null", O_RDWR | O_CLOEXEC);
	if (fd < 0 || null < 0 || !t)
		die(argv[1]);
	struct acrn_vm_creation vm;
	memset(&vm, 0, sizeof(vm));
	vm.ioreq_buf = (uint64_t)(uintptr_t)&io_request_page;
	if (ioctl(fd, ACRN_IOCTL_CREATE_VM, &vm) < 0)
		die("CREATE_VM");
	unsigned long pulse = 2ul << 32 | 4;	/* {gsi 4, RAISING_PULSE} */
	struct acrn_msi_entry msi = { .msi_addr = 0xFEE00000, .msi_data = 0x44 };
	struct acrn_emu_value_call vc = { .cmd = ACRN_IOCTL_SET_IRQLINE, .arg = pulse };
	for (long i = 0; i < n; i++) {
		uint64_t t0 = ns_now();
		int r;
		if (!strcmp(mode, "irq"))
			r = ioctl(fd, ACRN_IOCTL_SET_IRQLINE, pulse);
		else if (!strcmp(mode, "msi"))
			r = ioctl(fd, ACRN_IOCTL_INJECT_MSI, &msi);
		else if (!strcmp(mode, "value"))
			r = ioctl(fd, ACRN_EMU_IOCTL_VALUE_CALL, &vc) < 0 ? -1 : (int)vc.result;
		else
			r = ioctl(null, ACRN_IOCTL_SET_IRQLINE, pulse) < 0 && errno == ENOTTY ? 0 : -1;
		t[i] = ns_now() - t0;
		if (r < 0)
			die(mode);
	}
	ns_report(t, n);
	return 0;
}
