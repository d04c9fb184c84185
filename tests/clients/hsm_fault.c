/* A client that stops at one step of the request cycle, for fault tests.
 *   hsm_fault NODE STEP
 * STEP: after_create  CREATE_VM, then wait
 *       pending       CREATE_VM + START_VM without a client: requests stay PENDING
 *       processing    take a request (ATTACH), never answer it
 *       in_attach     block in ATTACH (the test runs no workload for this VM)
 *       after_notify  answer one request, then SIGKILL itself right after NOTIFY
 *       unmap_page    CREATE_VM + client + START_VM, then munmap the request page
 *       ro_page       ... then make the request page read-only
 *       loop          serve requests normally (a well-behaved neighbour)
 * Prints "vmid=N vcpu_num=N", then "at STEP" when it reached the step. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <linux/acrn.h>
#include <unistd.h>

static void at(const char *step)
{
    printf("at %s\n", step);
    fflush(stdout);
}

int main(int argc, char **argv)
{
    if (argc != 3)
        return 2;
    const char *step = argv[2];
    int fd = open(argv[1], O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        perror("open");
        return 1;
    }
    struct acrn_io_request_buffer *page =
        mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (page == MAP_FAILED)
        return 1;
    struct acrn_vm_creation vm;
    memset(&vm, 0, sizeof(vm));
    vm.ioreq_buf = (__u64)(unsigned long)page;
    if (ioctl(fd, ACRN_IOCTL_CREATE_VM, &vm) < 0) {
        perror("create");
        return 1;
    }
    printf("vmid=%u vcpu_num=%u\n", vm.vmid, vm.vcpu_num);
    fflush(stdout);
    if (!strcmp(step, "after_create")) {
        at(step);
        for (;;)
            pause();
    }
    if (strcmp(step, "pending") && ioctl(fd, ACRN_IOCTL_CREATE_IOREQ_CLIENT, 0) < 0) {
        perror("client");
        return 1;
    }
    if (ioctl(fd, ACRN_IOCTL_START_VM, 0) < 0) {
        perror("start");
        return 1;
    }
    if (!strcmp(step, "pending")) {
        /* No client: the hypervisor's request waits PENDING in the page. */
        while (__atomic_load_n(&page->req_slot[0].processed, __ATOMIC_ACQUIRE) !=
               ACRN_IOREQ_STATE_PENDING)
            usleep(1000);
        at(step);
        for (;;)
            pause();
    }
    if (!strcmp(step, "unmap_page") || !strcmp(step, "ro_page")) {
        int r = !strcmp(step, "unmap_page") ? munmap(page, 4096)
                                             : mprotect(page, 4096, PROT_READ);
        if (r < 0)
            return 1;
        at(step);
        for (;;)
            pause();
    }
    if (!strcmp(step, "in_attach")) {
        at(step);
        ioctl(fd, ACRN_IOCTL_ATTACH_IOREQ_CLIENT, 0);
        return 3; /* must not get here: the test kills us while we wait */
    }
    for (;;) {
        if (ioctl(fd, ACRN_IOCTL_ATTACH_IOREQ_CLIENT, 0) < 0) {
            perror("attach");
            return 1;
        }
        for (unsigned i = 0; i < vm.vcpu_num; i++) {
            struct acrn_io_request *req = &page->req_slot[i];
            if (__atomic_load_n(&req->processed, __ATOMIC_ACQUIRE) != ACRN_IOREQ_STATE_PROCESSING ||
                req->kernel_handled)
                continue;
            if (!strcmp(step, "processing")) {
                at(step);
                for (;;)
                    pause();
            }
            if (req->reqs.pio_request.direction == ACRN_IOREQ_DIR_READ)
                req->reqs.mmio_request.value = 0;
            struct acrn_ioreq_notify n = { .vmid = vm.vmid, .vcpu = i };
            if (ioctl(fd, ACRN_IOCTL_NOTIFY_REQUEST_FINISH, &n) < 0)
                return 1;
            if (!strcmp(step, "after_notify")) {
                at(step);
                raise(SIGKILL); /* between NOTIFY and the hypervisor's FREE */
            }
        }
    }
}
