/* A client's memory, reached with process_vm_readv/writev: the userspace form
   of the driver pinning a user page (acrn_hsm_emu/memory.py's RemoteMemory). */
#ifndef HSM_REMOTE_MEMORY_H
#define HSM_REMOTE_MEMORY_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

ssize_t hsm_remote_read(int pid, uint64_t addr, void *buf, size_t len);
ssize_t hsm_remote_write(int pid, uint64_t addr, const void *buf, size_t len);
/* Two ranges in one call, written in order (fields, then state word). */
ssize_t hsm_remote_write2(int pid, uint64_t addr1, const void *buf1, size_t len1,
                          uint64_t addr2, const void *buf2, size_t len2);

#endif
