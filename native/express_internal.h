/* What the express_*.c files share (express.h is what Python sees). */
#ifndef HSM_EXPRESS_INTERNAL_H
#define HSM_EXPRESS_INTERNAL_H

#include <stdint.h>

#include "express.h"

/* express_out.c: replies and wake-ups decided under a VM's lock, written
   after it is released where they can be. */

/* A reply to an ioctl the kernel sent us, now: 0 with no data, or -errno. */
void hsm_x_reply(const struct hsm_xvm *x, uint64_t unique, int err);
/* Now: FUSE_IOCTL_RETRY, asking the kernel for in_len bytes at the caller's arg
   (CUSE's unrestricted ioctls; libfuse's fuse_reply_ioctl_retry, one iovec in). */
void hsm_x_reply_retry(const struct hsm_xvm *x, uint64_t unique, uint64_t arg, uint64_t in_len);
/* Now: 0 with len bytes of data (len <= 64). */
void hsm_x_reply_data(const struct hsm_xvm *x, uint64_t unique, const void *data, uint32_t len);
/* Locked: a reply (0) to write once the lock is released. */
void hsm_x_reply_later(struct hsm_xvm *x, uint64_t unique);
/* Locked: answer every blocked ATTACH now (of the default client; of a list). */
void hsm_x_answer_parked(struct hsm_xvm *x, int err);
void hsm_x_answer_waiters(struct hsm_xvm *x, uint64_t *parked, uint32_t *n, int err);
/* Locked: vCPU i's slot is complete (handed: its completion handed over to
   its native wait, hsm_vcpu_finish); unless it polls the state, it is woken
   (HC_NOTIFY_REQUEST_FINISH's effect): its native wait (hsm_vcpu_wake), and,
   for a completion not handed over, its completion eventfd too (its waits
   in Python). */
void hsm_x_completed(struct hsm_xvm *x, uint64_t i, uint32_t polling, int handed);
/* Unlocked: write what this thread put off, then let hsm_x_close go on. */
void hsm_x_flush_out(void);

/* express.c: locked, x->trace set: one record (head: the request's, or NULL;
   client: 0 the default client, k + 1 range client k). */
void hsm_x_trace_rec(struct hsm_xvm *x, uint32_t kind, uint64_t vcpu,
                     const unsigned char *head, uint64_t value, int32_t result);
void hsm_x_trace_client(struct hsm_xvm *x, uint32_t kind, uint64_t vcpu,
                        const unsigned char *head, uint64_t value, int32_t result,
                        uint32_t client);

/* express_dispatch.c: the VM's struct hsm_native_upcall. */
int hsm_x_upcall(struct hsm_native_upcall *self, int pid, uint64_t slot,
                 const unsigned char *head);
void hsm_x_flush(struct hsm_native_upcall *self);

#endif
