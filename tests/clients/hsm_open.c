/* Opens the node and tries CREATE_VM with a page of its own (or at ADDR):
 *   hsm_open NODE [ADDR]   prints "open=<errno name|0> create=<errno name|0>" */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/acrn.h>
#include <unistd.h>

static struct acrn_io_request_buffer page __attribute__((aligned(4096)));

static const char *name(int e)
{
    switch (e) {
    case 0: return "0";
    case EACCES: return "EACCES";
    case EPERM: return "EPERM";
    case EINVAL: return "EINVAL";
    case EFAULT: return "EFAULT";
    default: return strerror(e);
    }
}

int main(int argc, char **argv)
{
    int fd = open(argv[1], O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        printf("open=%s create=-\n", name(errno));
        return 0;
    }
    struct acrn_vm_creation vm;
    memset(&vm, 0, sizeof(vm));
    vm.ioreq_buf = argc > 2 ? strtoull(argv[2], NULL, 0) : (__u64)(unsigned long)&page;
    int r = ioctl(fd, ACRN_IOCTL_CREATE_VM, &vm);
    printf("open=0 create=%s\n", r < 0 ? name(errno) : "0");
    close(fd);
    return 0;
}
