/* Taking and comparing a client's eventfds (acrn_hsm_emu/hsm/eventfd.py):
   the driver's eventfd_ctx_fdget, in userspace. */
#ifndef HSM_PIDFD_H
#define HSM_PIDFD_H

int hsm_pidfd_open(int pid, unsigned int flags);
int hsm_pidfd_getfd(int pidfd, int targetfd, unsigned int flags);
/* kcmp(KCMP_FILE): 0 when both fds are the same open file. */
int hsm_kcmp_file(int pid1, int pid2, int fd1, int fd2);

#endif
