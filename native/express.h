/* The HSM's express path (acrn_hsm_emu/hsm/express.py): what the driver does
   for the default client, done without Python where nothing but the default
   client is involved:
   - a vCPU's plain PIO/MMIO request (no range client's range contains it,
     not CF8/CFC) is dispatched by the upcall itself, in the vCPU's thread:
     PENDING, then kernel_handled = 0 and PROCESSING, the vCPU's bit set,
     the blocked ATTACH calls answered (acrn_ioreq_dispatch for one slot);
     express_dispatch.c;
   - a request in the range of the VM's ioeventfd client (the driver's
     handler) is completed by the upcall itself, eventfd signalled;
     express_dispatch.c;
   - ATTACH_IOREQ_CLIENT and NOTIFY_REQUEST_FINISH on the VM's own file are
     answered by the session's prefilter (cdev's reader thread, or the trio
     thread's batch read), without libfuse or Python: the same checks and
     effects as the Python handlers (under CUSE, NOTIFY's first call, which
     has no argument yet, too: its answer is the retry that fetches it);
     express_prefilter.c.
   - the same cycle for a userspace range client (extension ABI, up to
     HSM_X_CLIENTS_MAX a VM): a plain request in its range is copied into
     its own page and its bit set (hsm/remote.py: hand_over), and ATTACH and
     NOTIFY_REQUEST_FINISH on its bound file (its fh) are answered here
     (remote.py: complete); struct hsm_xclient.
   - INJECT_MSI and SET_IRQLINE (under CUSE; under FUSE the launcher's
     VALUE_CALL carrying it) on the VM's own file, where the hypervisor gave
     the VM's native interrupt hypercalls (irq_gate.h): answered by the
     prefilter; the hypervisor's and the HSM's records replay the gate's.
   Anything else, or any doubt (a fault, a closed session), is left to
   Python, which then does what it always does. One recursive mutex per VM
   orders all of it with the Python dispatcher, which holds it for a pass.
   Python keeps the state below in step with its own (express.c); replies and
   wake-ups decided under the lock are written after it (express_out.c). */
#ifndef HSM_EXPRESS_H
#define HSM_EXPRESS_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "irq_gate.h"
#include "vcpu_cycle.h"

#define HSM_X_PARKED_MAX 256
#define HSM_X_VMS_MAX 256
#define HSM_X_VCPUS_MAX 16
#define HSM_X_CLIENTS_MAX 8

/* A range client's PIO/MMIO range, in the order the dispatcher searches
   them (the first client with a range containing the access gets it).
   handler: HSM_XRANGE_OTHER, a client the request goes to Python for;
   HSM_XRANGE_IOEVENTFD, the VM's ioeventfd client with the driver's
   handler (hsm/ioeventfd.py: handler), which the vCPU runs here;
   HSM_XRANGE_CLIENT, the range client served here as x->clients[client]
   (if it is no longer, the request goes to Python). */
#define HSM_XRANGE_OTHER 0
#define HSM_XRANGE_IOEVENTFD 1
#define HSM_XRANGE_CLIENT 2
struct hsm_xrange { uint32_t type; uint64_t start; uint64_t end; uint32_t handler;
                    uint32_t client; };

/* A range client in another process, served here while live (Python adopts
   it: hsm_x_client_add). held[i]: HSM_X_HELD | type << 8 | direction of the
   request bit i stands for (remote.py: inflight), or 0. */
#define HSM_X_HELD 0x10000u
struct hsm_xclient {
    int live;
    int pid;              /* its request page's process */
    uint64_t fh;          /* its bound file, as the kernel names it */
    uint64_t page;
    uint64_t bitmap;
    uint32_t held[HSM_X_VCPUS_MAX];
    uint64_t dispatched, served;  /* here */
    uint32_t nparked;     /* blocked ATTACH calls on its file */
    uint64_t parked[HSM_X_PARKED_MAX];
};

/* struct hsm_ioeventfd, as hsm/ioeventfd.py keeps it (fd: the daemon's duplicate). */
struct hsm_xioeventfd { uint32_t type; uint32_t length; uint64_t addr; uint64_t data;
                        int wildcard; int fd; };

/* The trace (acrn_hsm_emu/observe/trace.py): while a tracer listens, this
   path records what it does into the VM's ring, under the VM's lock, and the
   trio thread drains it. NULL (the default): nothing is recorded, one test. */
#define HSM_XT_DEFAULT 1    /* a request dispatched to the default client */
#define HSM_XT_IOEVENTFD 2  /* a request completed by the ioeventfd handler */
#define HSM_XT_NOTIFY 3     /* NOTIFY_REQUEST_FINISH answered; value: the slot's */
#define HSM_XT_ATTACH 4     /* ATTACH_IOREQ_CLIENT: result 0 answered, 1 parked, -EAGAIN */
#define HSM_XT_RANGE 5      /* a request handed to range client `client` - 1 */
#define HSM_XT_RNOTIFY 6    /* its NOTIFY answered; result 1: a read, value its answer */
/* client: 0 the VM's own file (the default client), k + 1 range client k */
struct hsm_xtrace_rec { uint64_t t_ns; uint64_t addr; uint64_t size; uint64_t value;
                        uint32_t kind; uint32_t vcpu; uint32_t type; uint32_t dir;
                        int32_t result; uint32_t client; };
struct hsm_xtrace { uint64_t head; uint64_t tail; uint64_t lost; uint32_t size;
                    struct hsm_xtrace_rec *buf; };

struct hsm_xvm {
    struct hsm_native_upcall up;  /* first: the hypervisor sees only this */
    pthread_mutex_t lock;
    int fd;               /* the session's fd for replies; -1 once closed */
    uint64_t fh;          /* the VM's file, as the kernel names it */
    int pid;              /* the request page's process */
    uint64_t page;
    uint32_t vcpu_num;
    int has_default;      /* a default client exists: ATTACH/NOTIFY served here */
    int dispatch;         /* the vCPUs may dispatch plain requests */
    uint64_t bitmap;      /* the default client's ioreqs_map */
    const struct hsm_xrange *ranges;  /* every range client's PIO/MMIO ranges */
    uint32_t nranges;
    int nfds;             /* the vCPUs' completion eventfds (owned), or 0 */
    int wake_fds[HSM_X_VCPUS_MAX];
    /* the vCPUs' native waits, for HC_NOTIFY_REQUEST_FINISH's native form
       (hsm_vcpu_finish; kept alive by Python), or NULL */
    struct hsm_vcpu_wait *waits[HSM_X_VCPUS_MAX];
    uint64_t handed;      /* completions handed to a waiting vCPU here */
    uint32_t nparked;     /* blocked ATTACH calls (FUSE uniques) */
    uint64_t parked[HSM_X_PARKED_MAX];
    uint64_t pio, mmio, defaults;   /* dispatched here */
    uint64_t notified, attaches, refused;  /* served here */
    uint64_t in_kernel;   /* completed here by the ioeventfd handler */
    int alert_fd;         /* eventfd written on a refusal (Python logs it), or -1 */
    const struct hsm_xioeventfd *iofds;  /* the VM's ioeventfds, in order */
    uint32_t niofds;
    int busy;             /* deferred writes under way (express_out.c); close waits */
    struct hsm_xtrace *trace;  /* while traced, else NULL */
    uint64_t remote;      /* handed to a range client here */
    struct hsm_xclient clients[HSM_X_CLIENTS_MAX];
    struct hsm_irq_gate *irq;  /* the VM's native interrupt hypercalls (kept alive by Python), or NULL */
    uint64_t msis, irqlines;   /* INJECT_MSI, SET_IRQLINE answered here */
};

/* The VMs the prefilter serves. Its lock is taken before a VM's. */
struct hsm_express { pthread_mutex_t lock; uint32_t n; struct hsm_xvm *vms[HSM_X_VMS_MAX]; };

/* express.c: the state, as Python sets it. */
void hsm_x_table_init(struct hsm_express *e);
int hsm_x_register(struct hsm_express *e, struct hsm_xvm *x);
void hsm_x_unregister(struct hsm_express *e, struct hsm_xvm *x);
void hsm_x_init(struct hsm_xvm *x, int fd, uint64_t fh, int pid, uint64_t page,
                uint32_t vcpu_num);
void hsm_x_lock(struct hsm_xvm *x);
void hsm_x_unlock(struct hsm_xvm *x);
/* Takes the fds (the caller's duplicates: the vCPUs' completion eventfds,
   for their waits in Python) and the vCPUs' native waits (hsm_vcpu_finish,
   hsm_vcpu_wake: a vCPU waits on one or the other); n must be the VM's vCPU
   count. -EINVAL otherwise (nothing taken). */
int hsm_x_set_wake_fds(struct hsm_xvm *x, const int *fds, struct hsm_vcpu_wait *const *waits, int n);
uint64_t hsm_x_bits(struct hsm_xvm *x, uint64_t set, uint64_t clear);
/* IoreqClient.wake for the default client: level-triggered. */
void hsm_x_wake(struct hsm_xvm *x);
/* The default client created (on) or destroyed (off: waiters get ENODEV). */
void hsm_x_set_default(struct hsm_xvm *x, int on);
/* The VM's ioeventfds changed (set before the ranges that name the handler,
   and before a dropped entry's fd is closed: after this returns, C uses p). */
void hsm_x_set_ioeventfds(struct hsm_xvm *x, const struct hsm_xioeventfd *p, uint32_t n);
/* What may be dispatched by the vCPUs; `ranges` stays the caller's until replaced. */
void hsm_x_configure(struct hsm_xvm *x, int dispatch, const struct hsm_xrange *ranges,
                     uint32_t n);
/* A range client served here from now on (Python's IoreqClient.adopt_range):
   its number, or -ENOSPC. Its bitmap and held requests start empty. */
int hsm_x_client_add(struct hsm_xvm *x, uint64_t fh, int pid, uint64_t page);
/* No longer (destroyed, dropped, the VM leaves): its waiters get err. */
void hsm_x_client_remove(struct hsm_xvm *x, uint32_t k, int err);
uint64_t hsm_x_client_bits(struct hsm_xvm *x, uint32_t k, uint64_t set, uint64_t clear);
/* held[vcpu], replaced by v unless v is (uint32_t)-1: the previous value. */
uint32_t hsm_x_client_held(struct hsm_xvm *x, uint32_t k, uint32_t vcpu, uint32_t v);
/* IoreqClient.wake for range client k: level-triggered. */
void hsm_x_client_wake(struct hsm_xvm *x, uint32_t k);
/* INJECT_MSI and SET_IRQLINE answered here through g from now on (NULL: no longer). */
void hsm_x_set_irq(struct hsm_xvm *x, struct hsm_irq_gate *g);
/* The VM or the session goes: answer the waiters, stop writing to the fd. */
void hsm_x_close(struct hsm_xvm *x);
/* Start (t: the caller's, kept alive until replaced) or stop (NULL) recording. */
void hsm_x_set_trace(struct hsm_xvm *x, struct hsm_xtrace *t);
/* Move up to max records into out; *lost: records dropped on a full ring since. */
uint32_t hsm_x_trace_drain(struct hsm_xvm *x, struct hsm_xtrace_rec *out, uint32_t max,
                           uint64_t *lost);

/* express_dispatch.c: the vCPU's upcall, flushed (what the post path does,
   in one call: tests). */
int hsm_x_post(struct hsm_xvm *x, int pid, uint64_t slot, const unsigned char *head);

/* express_prefilter.c: cdev's prefilter (its receiver thread, or
   cdev_receive_poll in the trio thread); ctx is a struct hsm_express. */
int hsm_x_prefilter(void *ctx, int fd, const void *req, size_t len);

#endif
