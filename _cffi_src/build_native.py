"""cffi (API mode) build of acrn_hsm_emu._native: the Linux calls Python lacks.

process_vm_readv/writev reach a client's memory; pidfd_open/pidfd_getfd and
kcmp take and compare a client's eventfds.
"""

from cffi import FFI

ffibuilder = FFI()

ffibuilder.cdef(
    """
    struct iovec { void *iov_base; size_t iov_len; };
    ssize_t process_vm_readv(int pid, const struct iovec *local_iov,
                             unsigned long liovcnt, const struct iovec *remote_iov,
                             unsigned long riovcnt, unsigned long flags);
    ssize_t process_vm_writev(int pid, const struct iovec *local_iov,
                              unsigned long liovcnt, const struct iovec *remote_iov,
                              unsigned long riovcnt, unsigned long flags);
    int hsm_pidfd_open(int pid, unsigned int flags);
    int hsm_pidfd_getfd(int pidfd, int targetfd, unsigned int flags);
    int hsm_kcmp_file(int pid1, int pid2, int fd1, int fd2);

    /* Remote copies with the iovecs built in C (hot path). */
    ssize_t hsm_remote_read(int pid, uint64_t addr, void *buf, size_t len);
    ssize_t hsm_remote_write(int pid, uint64_t addr, const void *buf, size_t len);
    ssize_t hsm_remote_write2(int pid, uint64_t addr1, const void *buf1, size_t len1,
                              uint64_t addr2, const void *buf2, size_t len2);
    """
)

ffibuilder.set_source(
    "acrn_hsm_emu._native",
    r"""
    #define _GNU_SOURCE
    #include <stdint.h>
    #include <sys/types.h>
    #include <sys/uio.h>
    #include <sys/syscall.h>
    #include <unistd.h>
    #include <linux/kcmp.h>

    #ifndef SYS_pidfd_open
    #define SYS_pidfd_open 434
    #endif
    #ifndef SYS_pidfd_getfd
    #define SYS_pidfd_getfd 438
    #endif

    static int hsm_pidfd_open(int pid, unsigned int flags)
    { return (int)syscall(SYS_pidfd_open, pid, flags); }
    static int hsm_pidfd_getfd(int pidfd, int targetfd, unsigned int flags)
    { return (int)syscall(SYS_pidfd_getfd, pidfd, targetfd, flags); }
    static int hsm_kcmp_file(int pid1, int pid2, int fd1, int fd2)
    { return (int)syscall(SYS_kcmp, pid1, pid2, KCMP_FILE, fd1, fd2); }

    static ssize_t hsm_remote_read(int pid, uint64_t addr, void *buf, size_t len)
    {
        struct iovec l = { buf, len };
        struct iovec r = { (void *)(uintptr_t)addr, len };
        return process_vm_readv(pid, &l, 1, &r, 1, 0);
    }
    static ssize_t hsm_remote_write(int pid, uint64_t addr, const void *buf, size_t len)
    {
        struct iovec l = { (void *)buf, len };
        struct iovec r = { (void *)(uintptr_t)addr, len };
        return process_vm_writev(pid, &l, 1, &r, 1, 0);
    }
    /* Two ranges in one call, written in order (fields, then state word). */
    static ssize_t hsm_remote_write2(int pid, uint64_t addr1, const void *buf1, size_t len1,
                                     uint64_t addr2, const void *buf2, size_t len2)
    {
        struct iovec l[2] = { { (void *)buf1, len1 }, { (void *)buf2, len2 } };
        struct iovec r[2] = { { (void *)(uintptr_t)addr1, len1 },
                              { (void *)(uintptr_t)addr2, len2 } };
        return process_vm_writev(pid, l, 2, r, 2, 0);
    }
    """,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
