/* Remote copies with the iovecs built in C (the hot path's). */
#include <sys/uio.h>

#include "remote_memory.h"

ssize_t hsm_remote_read(int pid, uint64_t addr, void *buf, size_t len)
{
    struct iovec l = { buf, len };
    struct iovec r = { (void *)(uintptr_t)addr, len };
    return process_vm_readv(pid, &l, 1, &r, 1, 0);
}

ssize_t hsm_remote_write(int pid, uint64_t addr, const void *buf, size_t len)
{
    struct iovec l = { (void *)buf, len };
    struct iovec r = { (void *)(uintptr_t)addr, len };
    return process_vm_writev(pid, &l, 1, &r, 1, 0);
}

ssize_t hsm_remote_write2(int pid, uint64_t addr1, const void *buf1, size_t len1,
                          uint64_t addr2, const void *buf2, size_t len2)
{
    struct iovec l[2] = { { (void *)buf1, len1 }, { (void *)buf2, len2 } };
    struct iovec r[2] = { { (void *)(uintptr_t)addr1, len1 },
                          { (void *)(uintptr_t)addr2, len2 } };
    return process_vm_writev(pid, l, 2, r, 2, 0);
}
