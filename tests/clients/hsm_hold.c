/* A client that takes one request and then misbehaves, for fault tests.
 *   hsm_hold NODE close   CREATE_VM .. ATTACH; on the first request: close the fd
 *                         without answering, print "closed", then sleep
 *   hsm_hold NODE hang    same, but keep the fd and never answer (for SIGKILL)
 *   hsm_hold NODE flood N N threads block in ATTACH at once; prints
 *                         "refused=K" once K of them have failed with EAGAIN
 *                         and K + 256 = N (the driver parks any number; the
 *                         emulator at most 256 per VM), then sleeps
 * Prints "vmid=N vcpu_num=N" after CREATE_VM and "holding vcpu=N" once it
 * has a request in hand. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/acrn.h>
#include <unistd.h>

static struct acrn_io_request_buffer page __attribute__((aligned(4096)));

static int hsm_fd;
static int refused, other_errors;

static void *attach_once(void *arg)
{
    (void)arg;
    if (ioctl(hsm_fd, ACRN_IOCTL_ATTACH_IOREQ_CLIENT, 0) < 0)
        __atomic_add_fetch(errno == EAGAIN ? &refused : &other_errors, 1, __ATOMIC_RELAXED);
    return NULL;
}

/* N callers in ATTACH at once; report the refusals once the rest are parked. */
static int flood(int n)
{
    pthread_attr_t a;
    pthread_attr_init(&a);
    pthread_attr_setstacksize(&a, 64 * 1024);
    for (int i = 0; i < n; i++) {
        pthread_t t;
        if (pthread_create(&t, &a, attach_once, NULL)) {
            perror("pthread_create");
            return 1;
        }
    }
    while (__atomic_load_n(&refused, __ATOMIC_RELAXED) + 256 < n &&
           __atomic_load_n(&other_errors, __ATOMIC_RELAXED) == 0)
        usleep(1000);
    printf("refused=%d other_errors=%d\n", refused, other_errors);
    fflush(stdout);
    for (;;)
        pause();
}

int main(int argc, char **argv)
{
    if (argc != 3 && argc != 4)
        return 2;
    int fd = open(argv[1], O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        perror("open");
        return 1;
    }
    struct acrn_vm_creation vm;
    memset(&vm, 0, sizeof(vm));
    vm.ioreq_buf = (__u64)(unsigned long)&page;
    if (ioctl(fd, ACRN_IOCTL_CREATE_VM, &vm) < 0 ||
        ioctl(fd, ACRN_IOCTL_CREATE_IOREQ_CLIENT, 0) < 0 ||
        ioctl(fd, ACRN_IOCTL_START_VM, 0) < 0) {
        perror("set-up");
        return 1;
    }
    printf("vmid=%u vcpu_num=%u\n", vm.vmid, vm.vcpu_num);
    fflush(stdout);
    if (!strcmp(argv[2], "flood")) {
        hsm_fd = fd;
        return flood(argc > 3 ? atoi(argv[3]) : 260);
    }
    for (;;) {
        if (ioctl(fd, ACRN_IOCTL_ATTACH_IOREQ_CLIENT, 0) < 0) {
            perror("attach");
            return 1;
        }
        for (unsigned i = 0; i < vm.vcpu_num; i++) {
            struct acrn_io_request *req = &page.req_slot[i];
            if (__atomic_load_n(&req->processed, __ATOMIC_ACQUIRE) != ACRN_IOREQ_STATE_PROCESSING ||
                req->kernel_handled)
                continue;
            printf("holding vcpu=%u\n", i);
            fflush(stdout);
            if (!strcmp(argv[2], "close")) {
                close(fd);
                printf("closed\n");
                fflush(stdout);
            }
            for (;;)
                pause();
        }
    }
}
