/* Through syscall(2): kcmp has no C library wrapper, pidfd_* only in recent ones. */
#include <linux/kcmp.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "pidfd.h"

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif

int hsm_pidfd_open(int pid, unsigned int flags)
{
    return (int)syscall(SYS_pidfd_open, pid, flags);
}

int hsm_pidfd_getfd(int pidfd, int targetfd, unsigned int flags)
{
    return (int)syscall(SYS_pidfd_getfd, pidfd, targetfd, flags);
}

int hsm_kcmp_file(int pid1, int pid2, int fd1, int fd2)
{
    return (int)syscall(SYS_kcmp, pid1, pid2, KCMP_FILE, fd1, fd2);
}
