/*
 * vm_cycle: one VM life cycle on "/dev/acrn_hsm", a path fixed at compile
 * time as in acrn-dm. It takes no arguments: the container test proves the
 * daemon's node is where unmodified ACRN userspace looks for it.
 *
 *   CREATE_VM (zero-filled, cpu_affinity 1, ioreq_buf = a page in BSS)
 *   CREATE_IOREQ_CLIENT, START_VM, PAUSE_VM, DESTROY_IOREQ_CLIENT, DESTROY_VM
 *
 * Prints "STEP <name> ret=<r> errno=<name or 0>" for each ioctl and
 * "OK vmid=<n> vcpu_num=<n>" at the end; exit 0 if every step succeeded,
 * 1 otherwise (the first failing step is the last STEP line).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include <linux/acrn.h>

#define HSM_NODE "/dev/acrn_hsm"

static struct acrn_io_request_buffer io_request_page __attribute__((aligned(4096)));

static int step(const char *name, int ret)
{
	const char *e = ret < 0 ? strerrorname_np(errno) : "0";
	printf("STEP %s ret=%d errno=%s\n", name, ret, e ? e : "UNKNOWN");
	fflush(stdout);
	return ret;
}

int main(void)
{
	struct acrn_vm_creation create;
	int fd = open(HSM_NODE, O_RDWR | O_CLOEXEC);

	if (step("open", fd) < 0)
		return 1;
	memset(&create, 0, sizeof(create));
	create.ioreq_buf = (uint64_t)(uintptr_t)&io_request_page;
	create.cpu_affinity = 1;
	if (step("create_vm", ioctl(fd, ACRN_IOCTL_CREATE_VM, &create)) < 0)
		return 1;
	if (step("create_ioreq_client", ioctl(fd, ACRN_IOCTL_CREATE_IOREQ_CLIENT, 0)) < 0)
		return 1;
	if (step("start_vm", ioctl(fd, ACRN_IOCTL_START_VM, (unsigned long)create.vmid)) < 0)
		return 1;
	if (step("pause_vm", ioctl(fd, ACRN_IOCTL_PAUSE_VM, (unsigned long)create.vmid)) < 0)
		return 1;
	if (step("destroy_ioreq_client", ioctl(fd, ACRN_IOCTL_DESTROY_IOREQ_CLIENT, 0)) < 0)
		return 1;
	if (step("destroy_vm", ioctl(fd, ACRN_IOCTL_DESTROY_VM, (unsigned long)create.vmid)) < 0)
		return 1;
	if (step("close", close(fd)) < 0)
		return 1;
	printf("OK vmid=%u vcpu_num=%u\n", create.vmid, create.vcpu_num);
	return 0;
}
