/* A vCPU's whole request cycle in one call made without the GIL: post the
   request, raise the upcall (an eventfd), wait for the notify (a futex),
   read the result, free the slot. A Python vCPU thread would
   otherwise take the GIL back several times per request, each time while the
   trio thread wants it: measured, that hand-off cost more than the work
   (docs/performance.md). The Python side is acrn_hsm_emu/hypervisor/vcpu.py. */
#ifndef HSM_VCPU_CYCLE_H
#define HSM_VCPU_CYCLE_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include "slot.h"

/* hsm_slot_cycle results; a negative one is -errno of a memory fault,
   whose step is left in w->stage. */
#define HSM_SC_DONE 0
#define HSM_SC_CLOSED 1     /* VM not running or vCPU stopped: nothing posted */
#define HSM_SC_ABANDONED 2  /* stop or reset while waiting: no completion */
#define HSM_SC_POST 1
#define HSM_SC_PROBE 2
#define HSM_SC_READ 3
#define HSM_SC_FREE 4

/* A VM's gate: open while it runs and its page has not faulted. A state
   change closes it under the lock, so no PENDING is written after the
   change returns (the VM lock does this on the Python side). */
struct hsm_gate { pthread_mutex_t lock; int open; };

/* The last `size` cycle times in ns (vcpu.py CycleRing): one writer, the vCPU. */
struct hsm_ring { uint64_t *buf; uint64_t size; uint64_t n; };

struct hsm_vcpu_wait {
    int pid;          /* the request page's process */
    uint64_t slot;    /* this vCPU's slot, an address in pid */
    int probe_ms;     /* a wait this long re-reads the page (dead client?) */
    uint64_t spin_ns; /* poll for the completion this long before sleeping; 0: never */
    int stage;        /* where a fault happened */
    int waiting;      /* in the wait for COMPLETE (status) */
    uint64_t requests;  /* requests posted by native code */
    uint64_t accesses;  /* accesses done by hsm_kvm_loop */
    uint64_t spin_hits; /* completions found while polling */
    unsigned char *head;  /* the private request: type .. end of reqs (HSM_HEAD_LEN) */
    struct hsm_ring *ring;
    unsigned gen;     /* bumped by stop and reset: leave the wait */
    int stopped;
    uint32_t mail;    /* HSM_MAIL_*: a completion handed over in memory (hsm_vcpu_finish) */
    uint64_t handed;  /* its value */
    uint64_t handoffs;  /* completions handed over (status) */
    uint32_t wakes;     /* futex word of the native wait: bumped by every waker (hsm_vcpu_wake) */
    uint32_t sleeping;  /* the native wait sleeps on wakes: a waker makes the futex call */
};

/* w->mail: hsm_slot_cycle arms it before its request is posted and disarms
   it when its wait ends; a notifier that claims it (hsm_vcpu_finish) frees
   the slot itself and leaves the value here, so the vCPU touches the page
   no more. The vCPU waits out a claim (one store) before it goes on. */
#define HSM_MAIL_IDLE 0
#define HSM_MAIL_ARMED 1
#define HSM_MAIL_CLAIMED 2
#define HSM_MAIL_HANDED 3

/* The native upcall (hypervisor side of the seam): a VM's handler that
   Hypercalls.set_native_upcall installs. post() gets a request whose head is
   written nowhere yet, under the VM's gate: 1 it dispatched the request
   itself, 0 it left it (post it PENDING and raise the upcall), < 0 -errno.
   flush(), in the same thread once the gate is released, does what post()
   put off: waking other threads while holding the gate would let them run
   into it (on one CPU, a wake-up preempts the waker before it unlocks). */
struct hsm_native_upcall {
    int (*post)(struct hsm_native_upcall *self, int pid, uint64_t slot,
                const unsigned char *head);
    void (*flush)(struct hsm_native_upcall *self);
};

void hsm_gate_init(struct hsm_gate *g);
void hsm_gate_set(struct hsm_gate *g, int open);
/* Leave the wait (a new generation), and wake it. */
void hsm_vcpu_abandon(struct hsm_vcpu_wait *w, int stop);

/* Wake hsm_slot_cycle's wait: it looks again (mail, generation, the slot's
   state). Every waker of the native wait calls this; the completion eventfd
   is for the vCPU's waits in Python. A futex call only when it sleeps. */
void hsm_vcpu_wake(struct hsm_vcpu_wait *w);

/* w->head, the private request, is written before PENDING. value_len: 0 for
   a write, else the bytes of the read value (4 PIO, 8 MMIO), copied back into
   the head as ACRN copies the result into its request. up: the VM's native
   upcall, or NULL. */
int hsm_slot_cycle(struct hsm_vcpu_wait *w, struct hsm_gate *g, int upcall_fd,
                   struct hsm_native_upcall *up, size_t value_len, uint64_t *value);

/* HC_NOTIFY_REQUEST_FINISH made from native code (the HSM's express reader,
   hsm/express.py) with the driver's COMPLETE store folded into the vCPU's
   completion, as the hypercall runs on the caller's CPU: if w waits in
   hsm_slot_cycle for the request in `slot` of process `pid`, store FREE there
   and hand w `value`, the slot's value as the caller read it (with the
   driver's read of completion_polling, before any store): 1, and the caller
   wakes w as the hypercall does (its completion eventfd). The slot goes from
   PROCESSING to FREE where it went through COMPLETE: the two stores of one
   request, back to back, with nothing between them that could tell. 0: w
   does not wait natively for it (nothing done: the caller stores COMPLETE
   and wakes w, as before); -errno: the store faulted (nothing done).
   store_len: 0, or the bytes of `value` the driver stores into the slot's
   value first, in the same call (a range client's answer: 4 or 8). */
int hsm_vcpu_finish(struct hsm_vcpu_wait *w, int pid, uint64_t slot, uint64_t value,
                    size_t store_len);

static inline uint64_t hsm_now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

#endif
