"""cffi (API mode) build of acrn_hsm_emu._native: the Linux calls Python lacks.

process_vm_readv/writev reach a client's memory; pidfd_open/pidfd_getfd and
kcmp take and compare a client's eventfds.

``hsm_slot_cycle`` is a vCPU's whole request cycle in one call made without
the GIL: post the request, raise the upcall (an eventfd), wait for the notify
(another eventfd), read the result, free the slot. A Python vCPU thread would
otherwise take the GIL back several times per request, each time while the
trio thread wants it: measured, that hand-off cost more than the work
(docs/performance.md).
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

    /* The vCPU request cycle (see the module docstring). */
    #define HSM_SLOT_POLLING ...
    #define HSM_SLOT_DIRECTION ...
    #define HSM_SLOT_ADDRESS ...
    #define HSM_SLOT_SIZE ...
    #define HSM_SLOT_VALUE ...
    #define HSM_SLOT_KH ...
    #define HSM_SLOT_STATE ...
    #define HSM_HEAD_LEN ...
    #define HSM_STATE_PENDING ...
    #define HSM_STATE_COMPLETE ...
    #define HSM_STATE_FREE ...
    #define HSM_SC_DONE ...
    #define HSM_SC_CLOSED ...
    #define HSM_SC_ABANDONED ...
    #define HSM_SC_POST ...
    #define HSM_SC_PROBE ...
    #define HSM_SC_READ ...
    #define HSM_SC_FREE ...
    struct hsm_gate { ...; };
    struct hsm_ring { uint64_t *buf; uint64_t size; uint64_t n; };
    struct hsm_vcpu_wait {
        int pid;
        int wake_fd;
        uint64_t slot;
        int probe_ms;
        uint64_t spin_ns;
        int stage;
        int waiting;
        uint64_t requests;
        uint64_t accesses;
        uint64_t spin_hits;
        unsigned char *head;
        struct hsm_ring *ring;
        ...;
    };
    void hsm_gate_init(struct hsm_gate *g);
    void hsm_gate_set(struct hsm_gate *g, int open);
    void hsm_vcpu_abandon(struct hsm_vcpu_wait *w, int stop);
    struct hsm_native_upcall { ...; };
    int hsm_slot_cycle(struct hsm_vcpu_wait *w, struct hsm_gate *g, int upcall_fd,
                       struct hsm_native_upcall *up, size_t value_len, uint64_t *value);

    /* The HSM's express path (see hsm/express.py). */
    #define HSM_X_PARKED_MAX ...
    #define HSM_X_VMS_MAX ...
    struct hsm_xrange { uint32_t type; uint64_t start; uint64_t end; uint32_t handler; };
    #define HSM_XRANGE_OTHER ...
    #define HSM_XRANGE_IOEVENTFD ...
    struct hsm_xioeventfd { uint32_t type; uint32_t length; uint64_t addr; uint64_t data;
                            int wildcard; int fd; };
    struct hsm_xvm {
        int fd;
        uint64_t fh;
        int pid;
        uint64_t page;
        uint32_t vcpu_num;
        int has_default;
        int dispatch;
        int nfds;
        uint32_t nparked;
        uint64_t pio;
        uint64_t mmio;
        uint64_t defaults;
        uint64_t notified;
        uint64_t attaches;
        uint64_t refused;
        uint64_t in_kernel;
        int alert_fd;
        ...;
    };
    void hsm_x_set_ioeventfds(struct hsm_xvm *x, const struct hsm_xioeventfd *p, uint32_t n);
    struct hsm_express { uint32_t n; ...; };
    void hsm_x_table_init(struct hsm_express *e);
    int hsm_x_register(struct hsm_express *e, struct hsm_xvm *x);
    void hsm_x_unregister(struct hsm_express *e, struct hsm_xvm *x);
    void hsm_x_init(struct hsm_xvm *x, int fd, uint64_t fh, int pid, uint64_t page,
                    uint32_t vcpu_num);
    int hsm_x_set_wake_fds(struct hsm_xvm *x, const int *fds, int n);
    void hsm_x_lock(struct hsm_xvm *x);
    void hsm_x_unlock(struct hsm_xvm *x);
    uint64_t hsm_x_bits(struct hsm_xvm *x, uint64_t set, uint64_t clear);
    void hsm_x_wake(struct hsm_xvm *x);
    void hsm_x_set_default(struct hsm_xvm *x, int on);
    void hsm_x_configure(struct hsm_xvm *x, int dispatch, const struct hsm_xrange *ranges,
                         uint32_t n);
    void hsm_x_close(struct hsm_xvm *x);
    int hsm_x_prefilter(void *ctx, int fd, const void *req, size_t len);
    int hsm_x_post(struct hsm_xvm *x, int pid, uint64_t slot, const unsigned char *head);

    /* The KVM vCPU loop's fast path (see hsm_kvm_loop). */
    #define HSM_KL_EXIT ...
    #define HSM_KL_ATTENTION ...
    struct hsm_kvm_fast {
        int vcpu_fd;
        int kick_signal;
        void *run;
        const unsigned char *skip_ports;
        uint64_t skip_mmio_lo;
        uint64_t skip_mmio_hi;
        unsigned attention;
        int in_guest;
        uint64_t io_exits;
        uint64_t mmio_exits;
        ...;
    };
    int hsm_kvm_loop(struct hsm_kvm_fast *f, unsigned attention, struct hsm_vcpu_wait *w,
                     struct hsm_gate *g, int upcall_fd, struct hsm_native_upcall *up);
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
    #include <errno.h>
    #include <poll.h>
    #include <pthread.h>
    #include <sched.h>
    #include <signal.h>
    #include <string.h>
    #include <time.h>
    #include <sys/ioctl.h>
    #include <linux/kvm.h>
    #include <linux/fuse.h>
    #include <linux/acrn.h>

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

    /* struct acrn_io_request's fields (reqs.{pio,mmio}_request's for direction
       .. value), checked against acrn_hsm_emu.abi by the tests. */
    #define HSM_SLOT_POLLING 4
    #define HSM_SLOT_DIRECTION 64
    #define HSM_SLOT_ADDRESS 72
    #define HSM_SLOT_SIZE 80
    #define HSM_SLOT_VALUE 88
    #define HSM_SLOT_KH 132
    #define HSM_SLOT_STATE 136
    #define HSM_STATE_PENDING 0
    #define HSM_STATE_COMPLETE 1
    #define HSM_STATE_FREE 3

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
        int wake_fd;      /* eventfd: notify, kicks */
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
    };
    #define HSM_HEAD_LEN 128

    static void hsm_gate_init(struct hsm_gate *g)
    {
        pthread_mutex_init(&g->lock, NULL);
        g->open = 0;
    }
    static void hsm_gate_set(struct hsm_gate *g, int open)
    {
        pthread_mutex_lock(&g->lock);
        g->open = open;
        pthread_mutex_unlock(&g->lock);
    }
    /* Before the kick that wakes the thread: a wait sees the new generation. */
    static void hsm_vcpu_abandon(struct hsm_vcpu_wait *w, int stop)
    {
        if (stop)
            __atomic_store_n(&w->stopped, 1, __ATOMIC_RELEASE);
        __atomic_add_fetch(&w->gen, 1, __ATOMIC_ACQ_REL);
    }

    static int hsm_sc_fault(struct hsm_vcpu_wait *w, int stage, ssize_t n)
    {
        w->stage = stage;
        w->waiting = 0;
        return (n < 0 && errno) ? -errno : -EFAULT;  /* short transfer: unmapped part */
    }

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

    /* ---- The HSM's express path (hsm/express.py) --------------------------

       What the driver does for the default client, done without Python where
       nothing but the default client is involved:
       - a vCPU's plain PIO/MMIO request (no range client's range contains it,
         not CF8/CFC) is dispatched by the upcall itself, in the vCPU's thread:
         PENDING, then kernel_handled = 0 and PROCESSING, the vCPU's bit set,
         the blocked ATTACH calls answered (acrn_ioreq_dispatch for one slot);
       - a request in the range of the VM's ioeventfd client (the driver's
         handler) is completed by the upcall itself, eventfd signalled;
       - ATTACH_IOREQ_CLIENT and NOTIFY_REQUEST_FINISH on the VM's own file are
         answered by the session's prefilter (cdev's reader thread, or the trio
         thread's batch read), without libfuse or Python: the same checks and
         effects as the Python handlers.
       Anything else, or any doubt (a fault, a closed session), is left to
       Python, which then does what it always does. One recursive mutex per VM
       orders all of it with the Python dispatcher, which holds it for a pass. */
    #define HSM_X_PARKED_MAX 256
    #define HSM_X_VMS_MAX 256

    /* A range client's PIO/MMIO range, in the order the dispatcher searches
       them (the first client with a range containing the access gets it).
       handler: HSM_XRANGE_OTHER, a client the request goes to Python for;
       HSM_XRANGE_IOEVENTFD, the VM's ioeventfd client with the driver's
       handler (hsm/ioeventfd.py: handler), which the vCPU runs here. */
    #define HSM_XRANGE_OTHER 0
    #define HSM_XRANGE_IOEVENTFD 1
    struct hsm_xrange { uint32_t type; uint64_t start; uint64_t end; uint32_t handler; };

    /* struct hsm_ioeventfd, as hsm/ioeventfd.py keeps it (fd: the daemon's duplicate). */
    struct hsm_xioeventfd { uint32_t type; uint32_t length; uint64_t addr; uint64_t data;
                            int wildcard; int fd; };

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
        int wake_fds[16];
        uint32_t nparked;     /* blocked ATTACH calls (FUSE uniques) */
        uint64_t parked[HSM_X_PARKED_MAX];
        uint64_t pio, mmio, defaults;   /* dispatched here */
        uint64_t notified, attaches, refused;  /* served here */
        uint64_t in_kernel;   /* completed here by the ioeventfd handler */
        int alert_fd;         /* eventfd written on a refusal (Python logs it), or -1 */
        const struct hsm_xioeventfd *iofds;  /* the VM's ioeventfds, in order */
        uint32_t niofds;
        int busy;             /* deferred writes under way (hsm_x_out); close waits */
    };

    /* Replies and wake-ups taken under the VM's lock and written after it is
       released (a thread's own, so no lock): a thread woken on this CPU would
       otherwise preempt the writer inside its lock and block on it. While set,
       x->busy counts it, and hsm_x_close waits for that before the fds go. */
    #define HSM_X_OUT_MAX 8
    struct hsm_x_out {
        struct hsm_xvm *x;    /* NULL: nothing put off */
        int fd;
        uint32_t n;
        uint64_t unique[HSM_X_OUT_MAX];
        int wake_fd;          /* a vCPU's completion eventfd, or -1 */
    };
    static __thread struct hsm_x_out hsm_x_out;

    /* The VMs the prefilter serves. Its lock is taken before a VM's. */
    struct hsm_express { pthread_mutex_t lock; uint32_t n; struct hsm_xvm *vms[HSM_X_VMS_MAX]; };

    static void hsm_x_table_init(struct hsm_express *e)
    {
        pthread_mutex_init(&e->lock, NULL);
        e->n = 0;
    }
    static int hsm_x_register(struct hsm_express *e, struct hsm_xvm *x)
    {
        int ret = -ENOSPC;
        pthread_mutex_lock(&e->lock);
        if (e->n < HSM_X_VMS_MAX) {
            e->vms[e->n++] = x;
            ret = 0;
        }
        pthread_mutex_unlock(&e->lock);
        return ret;
    }
    static void hsm_x_unregister(struct hsm_express *e, struct hsm_xvm *x)
    {
        pthread_mutex_lock(&e->lock);
        for (uint32_t k = 0; k < e->n; k++) {
            if (e->vms[k] == x) {
                e->vms[k] = e->vms[--e->n];
                e->vms[e->n] = NULL;
                break;
            }
        }
        pthread_mutex_unlock(&e->lock);
    }

    static int hsm_x_upcall(struct hsm_native_upcall *self, int pid, uint64_t slot,
                            const unsigned char *head);
    static void hsm_x_flush(struct hsm_native_upcall *self);

    static void hsm_x_init(struct hsm_xvm *x, int fd, uint64_t fh, int pid, uint64_t page,
                           uint32_t vcpu_num)
    {
        pthread_mutexattr_t a;
        pthread_mutexattr_init(&a);
        pthread_mutexattr_settype(&a, PTHREAD_MUTEX_RECURSIVE);
        pthread_mutex_init(&x->lock, &a);
        pthread_mutexattr_destroy(&a);
        x->up.post = hsm_x_upcall;
        x->up.flush = hsm_x_flush;
        x->fd = fd;
        x->fh = fh;
        x->pid = pid;
        x->page = page;
        x->vcpu_num = vcpu_num > 16 ? 16 : vcpu_num;
        x->nfds = 0;
        x->alert_fd = -1;
    }
    static void hsm_x_lock(struct hsm_xvm *x) { pthread_mutex_lock(&x->lock); }
    static void hsm_x_unlock(struct hsm_xvm *x) { pthread_mutex_unlock(&x->lock); }

    /* Takes the fds (the caller's duplicates); n must be the VM's vCPU count. */
    static int hsm_x_set_wake_fds(struct hsm_xvm *x, const int *fds, int n)
    {
        if (n != (int)x->vcpu_num)
            return -EINVAL;
        pthread_mutex_lock(&x->lock);
        for (int i = 0; i < n; i++)
            x->wake_fds[i] = fds[i];
        x->nfds = n;
        pthread_mutex_unlock(&x->lock);
        return 0;
    }

    /* A reply to an ioctl the kernel sent us: 0 with no data, or -errno. */
    static void hsm_reply_on(int fd, uint64_t unique, int err)
    {
        struct { struct fuse_out_header h; struct fuse_ioctl_out o; } r;
        memset(&r, 0, sizeof r);
        r.h.unique = unique;
        r.h.error = err;
        r.h.len = err ? sizeof r.h : sizeof r;
        if (fd >= 0 && write(fd, &r, r.h.len) < 0) {
            /* ENOENT: the caller is gone (interrupted, killed); nothing to do */
        }
    }
    static void hsm_x_reply(const struct hsm_xvm *x, uint64_t unique, int err)
    {
        hsm_reply_on(x->fd, unique, err);
    }

    /* Locked: this thread's hsm_x_out, for x (one VM per flush). NULL when x
       is closed or the out is taken by another VM (then write under the lock). */
    static struct hsm_x_out *hsm_x_defer(struct hsm_xvm *x)
    {
        struct hsm_x_out *o = &hsm_x_out;
        if (x->fd < 0 || (o->x && o->x != x))
            return NULL;
        if (!o->x) {
            o->x = x;
            o->fd = x->fd;
            o->n = 0;
            o->wake_fd = -1;
            __atomic_add_fetch(&x->busy, 1, __ATOMIC_ACQ_REL);
        }
        return o;
    }

    /* Locked: a reply to write once the lock is released. */
    static void hsm_x_reply_later(struct hsm_xvm *x, uint64_t unique)
    {
        struct hsm_x_out *o = hsm_x_defer(x);
        if (!o || o->n >= HSM_X_OUT_MAX) {
            hsm_x_reply(x, unique, 0);
            return;
        }
        o->unique[o->n++] = unique;
    }

    /* Unlocked: write what this thread put off, then let hsm_x_close go on. */
    static void hsm_x_flush_out(void)
    {
        struct hsm_x_out *o = &hsm_x_out;
        struct hsm_xvm *x = o->x;
        uint64_t one = 1;
        if (!x)
            return;
        if (o->wake_fd >= 0 && write(o->wake_fd, &one, sizeof one) < 0) { /* a full counter wakes */ }
        for (uint32_t i = 0; i < o->n; i++)
            hsm_reply_on(o->fd, o->unique[i], 0);
        o->x = NULL;
        __atomic_sub_fetch(&x->busy, 1, __ATOMIC_ACQ_REL);
    }

    static void hsm_x_flush(struct hsm_native_upcall *self)
    {
        (void)self;
        hsm_x_flush_out();
    }

    /* Answer every blocked ATTACH; locked. */
    static void hsm_x_answer_parked(struct hsm_xvm *x, int err)
    {
        for (uint32_t i = 0; i < x->nparked; i++)
            hsm_x_reply(x, x->parked[i], err);
        x->nparked = 0;
    }

    static uint64_t hsm_x_bits(struct hsm_xvm *x, uint64_t set, uint64_t clear)
    {
        uint64_t b;
        pthread_mutex_lock(&x->lock);
        x->bitmap = (x->bitmap | set) & ~clear;
        b = x->bitmap;
        pthread_mutex_unlock(&x->lock);
        return b;
    }

    /* IoreqClient.wake for the default client: level-triggered. */
    static void hsm_x_wake(struct hsm_xvm *x)
    {
        pthread_mutex_lock(&x->lock);
        if (x->bitmap)
            hsm_x_answer_parked(x, 0);
        pthread_mutex_unlock(&x->lock);
    }

    /* The default client created (on) or destroyed (off: waiters get ENODEV). */
    static void hsm_x_set_default(struct hsm_xvm *x, int on)
    {
        pthread_mutex_lock(&x->lock);
        if (!on) {
            hsm_x_answer_parked(x, -ENODEV);
            x->dispatch = 0;
        }
        x->has_default = on;
        x->bitmap = 0;
        pthread_mutex_unlock(&x->lock);
    }

    /* The VM's ioeventfds changed (set before the ranges that name the handler,
       and before a dropped entry's fd is closed: after this returns, C uses p). */
    static void hsm_x_set_ioeventfds(struct hsm_xvm *x, const struct hsm_xioeventfd *p, uint32_t n)
    {
        pthread_mutex_lock(&x->lock);
        x->iofds = p;
        x->niofds = n;
        pthread_mutex_unlock(&x->lock);
    }

    /* What may be dispatched by the vCPUs; `ranges` stays the caller's until replaced. */
    static void hsm_x_configure(struct hsm_xvm *x, int dispatch, const struct hsm_xrange *ranges,
                                uint32_t n)
    {
        pthread_mutex_lock(&x->lock);
        x->ranges = ranges;
        x->nranges = n;
        x->dispatch = dispatch && x->has_default && x->fd >= 0;
        pthread_mutex_unlock(&x->lock);
    }

    /* The VM or the session goes: answer the waiters, stop writing to the fd. */
    static void hsm_x_close(struct hsm_xvm *x)
    {
        pthread_mutex_lock(&x->lock);
        hsm_x_answer_parked(x, -ENODEV);
        x->fd = -1;
        x->dispatch = 0;
        x->has_default = 0;
        x->ranges = NULL;
        x->nranges = 0;
        x->iofds = NULL;
        x->niofds = 0;
        /* writes put off before fd was -1 still use the fds: let them finish
           (they take no lock, so holding it here cannot stop them) */
        while (__atomic_load_n(&x->busy, __ATOMIC_ACQUIRE))
            sched_yield();
        for (int i = 0; i < x->nfds; i++)
            close(x->wake_fds[i]);
        x->nfds = 0;
        x->alert_fd = -1;  /* the session's (Express.alert_fd): not closed here */
        pthread_mutex_unlock(&x->lock);
    }

    /* Where the driver would route a request: HSM_X_DEFAULT, the default client
       (PIO or MMIO that no range contains, in_range: whole access inside, not
       CF8/CFC); HSM_X_IOEVENTFD, the ioeventfd client's handler (the first range
       containing it is that client's); 0 anything else (Python's). */
    #define HSM_X_DEFAULT 1
    #define HSM_X_IOEVENTFD 2
    static int hsm_x_route(const struct hsm_xvm *x, const unsigned char *head)
    {
        uint32_t type;
        uint64_t addr, size, last;
        memcpy(&type, head, 4);
        memcpy(&addr, head + HSM_SLOT_ADDRESS, 8);
        memcpy(&size, head + HSM_SLOT_SIZE, 8);
        if (type == ACRN_IOREQ_TYPE_PORTIO) {
            if (addr == 0xCF8 || (addr >= 0xCFC && addr <= 0xCFF))
                return 0;
        } else if (type != ACRN_IOREQ_TYPE_MMIO) {
            return 0;
        }
        last = addr + size - 1;
        for (uint32_t k = 0; k < x->nranges; k++) {
            const struct hsm_xrange *r = &x->ranges[k];
            if (r->type == type && r->start <= addr && last <= r->end)
                return r->handler == HSM_XRANGE_IOEVENTFD && x->nfds == (int)x->vcpu_num
                       ? HSM_X_IOEVENTFD : 0;
        }
        return HSM_X_DEFAULT;
    }

    /* Take slot `slot` for a client, in one process_vm_writev whose iovecs the
       kernel copies in order: the head, PENDING, `value_len` zero bytes of value
       (a read the ioeventfd handler answers), then kernel_handled and the state
       (kh_state). Counts the request's type. Locked; 0 or -errno. */
    static int hsm_x_take(struct hsm_xvm *x, int pid, uint64_t slot, const unsigned char *head,
                          size_t value_len, const uint32_t kh_state[2])
    {
        static const uint32_t pending = HSM_STATE_PENDING;
        static const uint64_t zero = 0;
        struct iovec l[4], rm[4];
        int n = 0;
        ssize_t r, want = 0;
        uint32_t type;
        l[n] = (struct iovec){ (void *)head, HSM_HEAD_LEN };
        rm[n++] = (struct iovec){ (void *)(uintptr_t)slot, HSM_HEAD_LEN };
        l[n] = (struct iovec){ (void *)&pending, 4 };
        rm[n++] = (struct iovec){ (void *)(uintptr_t)(slot + HSM_SLOT_STATE), 4 };
        if (value_len) {
            l[n] = (struct iovec){ (void *)&zero, value_len };
            rm[n++] = (struct iovec){ (void *)(uintptr_t)(slot + HSM_SLOT_VALUE), value_len };
        }
        l[n] = (struct iovec){ (void *)kh_state, 8 };
        rm[n++] = (struct iovec){ (void *)(uintptr_t)(slot + HSM_SLOT_KH), 8 };
        for (int k = 0; k < n; k++)
            want += (ssize_t)l[k].iov_len;
        r = process_vm_writev(pid, l, n, rm, n, 0);
        if (r != want)
            return r < 0 && errno ? -errno : -EFAULT;
        memcpy(&type, head, 4);
        if (type == ACRN_IOREQ_TYPE_PORTIO)
            x->pio++;
        else
            x->mmio++;
        return 0;
    }

    /* A completed slot: the vCPU learns it from its completion eventfd unless it
       polls the state (HC_NOTIFY_REQUEST_FINISH's effect). Locked; the write is
       put off until the lock is released (hsm_x_out) where it can be. */
    static void hsm_x_completed(struct hsm_xvm *x, uint64_t i, uint32_t polling)
    {
        struct hsm_x_out *o;
        uint64_t one = 1;
        if (polling)
            return;
        o = hsm_x_defer(x);
        if (o && o->wake_fd < 0)
            o->wake_fd = x->wake_fds[i];
        else if (write(x->wake_fds[i], &one, sizeof one) < 0) { /* a full counter wakes anyway */ }
    }

    /* acrn_ioeventfd_handler for slot i, in the vCPU's thread; locked. Reads get
       0; a write signals the first entry whose address equals the access's (of
       at least its size, with its data unless a wildcard); any other access in
       the client's ranges is consumed. Then, as the dispatcher does for an
       in-daemon client, kernel_handled 1 and COMPLETE, and the vCPU notified. */
    static int hsm_x_ioeventfd(struct hsm_xvm *x, int pid, uint64_t slot, uint64_t i,
                               const unsigned char *head)
    {
        static const uint32_t kh_complete[2] = { 1, HSM_STATE_COMPLETE };
        uint32_t type, direction, polling;
        uint64_t addr, size, value;
        int r;
        memcpy(&type, head, 4);
        memcpy(&polling, head + HSM_SLOT_POLLING, 4);
        memcpy(&direction, head + HSM_SLOT_DIRECTION, 4);
        memcpy(&addr, head + HSM_SLOT_ADDRESS, 8);
        memcpy(&size, head + HSM_SLOT_SIZE, 8);
        memcpy(&value, head + HSM_SLOT_VALUE, 8);
        r = hsm_x_take(x, pid, slot, head,
                       direction == ACRN_IOREQ_DIR_READ ? (type == ACRN_IOREQ_TYPE_MMIO ? 8 : 4) : 0,
                       kh_complete);
        if (r < 0)
            return r;
        if (direction != ACRN_IOREQ_DIR_READ) {
            if (type != ACRN_IOREQ_TYPE_MMIO)
                value &= 0xFFFFFFFFu;
            for (uint32_t k = 0; k < x->niofds; k++) {
                const struct hsm_xioeventfd *p = &x->iofds[k];
                if (p->type == type && p->addr == addr && p->length >= size &&
                    (p->wildcard || p->data == value)) {
                    uint64_t one = 1;
                    if (write(p->fd, &one, sizeof one) < 0) { /* eventfd_signal ignores a full counter */ }
                    break;
                }
            }
        }
        x->in_kernel++;
        hsm_x_completed(x, i, polling);
        return 1;
    }

    /* The upcall for one request, in the vCPU's thread, under its VM's gate:
       1 dispatched here (to the default client: PENDING, then kernel_handled 0
       and PROCESSING, its bit, its waiters answered; or completed by the
       ioeventfd handler), 0 not the express path's (the caller posts it PENDING
       and raises the upcall), < 0 a fault. The answers to parked ATTACH calls
       are put off: the caller flushes them (hsm_x_flush_out). */
    static int hsm_x_dispatch(struct hsm_xvm *x, int pid, uint64_t slot, const unsigned char *head)
    {
        static const uint32_t kh_processing[2] = { 0, ACRN_IOREQ_STATE_PROCESSING };
        uint64_t i = (slot - x->page) >> 8;
        int route, r = 0;
        pthread_mutex_lock(&x->lock);
        route = x->dispatch && pid == x->pid && slot >= x->page && i < x->vcpu_num
                ? hsm_x_route(x, head) : 0;
        if (route == HSM_X_IOEVENTFD) {
            r = hsm_x_ioeventfd(x, pid, slot, i, head);
        } else if (route == HSM_X_DEFAULT) {
            r = hsm_x_take(x, pid, slot, head, 0, kh_processing);
            if (r == 0) {
                x->defaults++;
                x->bitmap |= (uint64_t)1 << i;
                for (uint32_t k = 0; k < x->nparked; k++)
                    hsm_x_reply_later(x, x->parked[k]);  /* after the gate: flush() */
                x->nparked = 0;
                r = 1;
            }
        }
        pthread_mutex_unlock(&x->lock);
        return r;
    }

    /* hsm_x_dispatch, flushed: what the post path does, in one call (tests). */
    static int hsm_x_post(struct hsm_xvm *x, int pid, uint64_t slot, const unsigned char *head)
    {
        int r = hsm_x_dispatch(x, pid, slot, head);
        hsm_x_flush_out();
        return r;
    }

    /* The vCPU's post, under its VM's gate; flush() follows once the gate is released. */
    static int hsm_x_upcall(struct hsm_native_upcall *self, int pid, uint64_t slot,
                            const unsigned char *head)
    {
        return hsm_x_dispatch((struct hsm_xvm *)self, pid, slot, head);
    }

    /* ATTACH_IOREQ_CLIENT: level-triggered; past HSM_X_PARKED_MAX waiters, EAGAIN
       (as cdev's bound on waiting requests answers). */
    static int hsm_x_attach(struct hsm_xvm *x, uint64_t unique)
    {
        pthread_mutex_lock(&x->lock);
        if (!x->has_default || x->fd < 0) {
            pthread_mutex_unlock(&x->lock);
            return 0;  /* Python: ENODEV, or the session is closing */
        }
        x->attaches++;
        if (x->bitmap) {
            hsm_x_reply_later(x, unique);
        } else if (x->nparked >= HSM_X_PARKED_MAX) {
            uint64_t one = 1;
            x->refused++;
            hsm_x_reply(x, unique, -EAGAIN);
            if (x->alert_fd >= 0 && write(x->alert_fd, &one, sizeof one) < 0) {
                /* a full counter is still readable: the log comes anyway */
            }
        } else {
            x->parked[x->nparked++] = unique;
        }
        pthread_mutex_unlock(&x->lock);
        hsm_x_flush_out();
        return 1;
    }

    /* NOTIFY_REQUEST_FINISH: acrn_ioreq_request_default_complete. Anything but the
       plain case (reserved set, a vCPU out of range, a fault) goes to Python,
       before any effect, so that its answer and its logging stay the only ones. */
    static int hsm_x_notify(struct hsm_xvm *x, uint64_t unique, const unsigned char *arg)
    {
        struct acrn_ioreq_notify n;
        uint32_t polling;
        const uint32_t complete = HSM_STATE_COMPLETE;
        uint64_t slot;
        memcpy(&n, arg, sizeof n);
        if (n.reserved)
            return 0;
        n.vcpu &= 0xFFFF;
        pthread_mutex_lock(&x->lock);
        if (!x->has_default || x->fd < 0 || n.vcpu >= x->vcpu_num || x->nfds != (int)x->vcpu_num)
            goto python;
        slot = x->page + ((uint64_t)n.vcpu << 8);
        if (hsm_remote_read(x->pid, slot + HSM_SLOT_POLLING, &polling, 4) != 4)
            goto python;
        if (hsm_remote_write(x->pid, slot + HSM_SLOT_STATE, &complete, 4) != 4)
            goto python;
        x->bitmap &= ~((uint64_t)1 << n.vcpu);
        x->notified++;
        hsm_x_completed(x, n.vcpu, polling);
        hsm_x_reply_later(x, unique);
        pthread_mutex_unlock(&x->lock);
        hsm_x_flush_out();
        return 1;
    python:
        pthread_mutex_unlock(&x->lock);
        return 0;
    }

    /* An interrupted ATTACH this path holds: the driver's wait ignores signals, 0. */
    static int hsm_x_interrupt(struct hsm_xvm *x, uint64_t unique)
    {
        int found = 0;
        pthread_mutex_lock(&x->lock);
        for (uint32_t i = 0; i < x->nparked; i++) {
            if (x->parked[i] == unique) {
                x->parked[i] = x->parked[--x->nparked];
                hsm_x_reply(x, unique, 0);
                found = 1;
                break;
            }
        }
        pthread_mutex_unlock(&x->lock);
        return found;
    }

    static int hsm_x_prefilter_locked(struct hsm_express *e, const void *req, size_t len);

    /* cdev's prefilter (its receiver thread, or cdev_receive_batch in the trio
       thread): ctx is a struct hsm_express. */
    static int hsm_x_prefilter(void *ctx, int fd, const void *req, size_t len)
    {
        struct hsm_express *e = ctx;
        int ret;
        (void)fd;
        pthread_mutex_lock(&e->lock);
        ret = hsm_x_prefilter_locked(e, req, len);
        pthread_mutex_unlock(&e->lock);
        return ret;
    }

    static int hsm_x_prefilter_locked(struct hsm_express *e, const void *req, size_t len)
    {
        const struct fuse_in_header *h = req;
        const unsigned char *body = (const unsigned char *)req + sizeof *h;
        struct fuse_ioctl_in in;
        if (len < sizeof *h)
            return 0;
        if (h->opcode == FUSE_INTERRUPT) {
            uint64_t unique;
            if (len < sizeof *h + sizeof unique)
                return 0;
            memcpy(&unique, body, sizeof unique);
            for (uint32_t k = 0; k < e->n; k++)
                if (hsm_x_interrupt(e->vms[k], unique))
                    return 1;
            return 0;
        }
        if (h->opcode != FUSE_IOCTL || len < sizeof *h + sizeof in)
            return 0;
        memcpy(&in, body, sizeof in);
        if (in.flags & FUSE_IOCTL_COMPAT)
            return 0;
        if (in.cmd != ACRN_IOCTL_ATTACH_IOREQ_CLIENT && in.cmd != ACRN_IOCTL_NOTIFY_REQUEST_FINISH)
            return 0;
        for (uint32_t k = 0; k < e->n; k++) {
            struct hsm_xvm *x = e->vms[k];
            if (x->fh != in.fh)
                continue;
            if (in.cmd == ACRN_IOCTL_ATTACH_IOREQ_CLIENT)
                return hsm_x_attach(x, h->unique);
            if (in.in_size < sizeof(struct acrn_ioreq_notify) ||
                len < sizeof *h + sizeof in + sizeof(struct acrn_ioreq_notify))
                return 0;  /* CUSE's first call: Python asks for a retry */
            return hsm_x_notify(x, h->unique, body + sizeof in);
        }
        return 0;
    }

    static uint64_t hsm_now_ns(void)
    {
        struct timespec t;
        clock_gettime(CLOCK_MONOTONIC, &t);
        return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
    }

    /* w->head, the private request, is written before PENDING. value_len: 0 for
       a write, else the bytes of the read value (4 PIO, 8 MMIO), copied back into
       the head as ACRN copies the result into its request. */
    static int hsm_slot_cycle(struct hsm_vcpu_wait *w, struct hsm_gate *g, int upcall_fd,
                              struct hsm_native_upcall *up, size_t value_len, uint64_t *value)
    {
        unsigned char *head = w->head;
        const size_t head_len = HSM_HEAD_LEN;
        const uint32_t pending = HSM_STATE_PENDING, free_ = HSM_STATE_FREE;
        unsigned char done[HSM_SLOT_STATE + 4 - HSM_SLOT_VALUE];
        struct pollfd p = { w->wake_fd, POLLIN, 0 };
        uint64_t n;
        uint32_t state;
        ssize_t r = 0;
        unsigned gen;
        int posted;
        uint64_t spin_until;

        /* A wake left over from before (a kick) is not drained here: the wait below
           re-reads the state word on every wake and only a COMPLETE ends it. */
        gen = __atomic_load_n(&w->gen, __ATOMIC_ACQUIRE);
        pthread_mutex_lock(&g->lock);
        if (!g->open || __atomic_load_n(&w->stopped, __ATOMIC_ACQUIRE)) {
            pthread_mutex_unlock(&g->lock);
            return HSM_SC_CLOSED;
        }
        posted = up ? up->post(up, w->pid, w->slot, head) : 0;
        if (posted == 0)
            r = hsm_remote_write2(w->pid, w->slot, head, head_len,
                                  w->slot + HSM_SLOT_STATE, &pending, sizeof pending);
        pthread_mutex_unlock(&g->lock);
        if (up)
            up->flush(up);
        if (posted < 0) {
            errno = -posted;
            return hsm_sc_fault(w, HSM_SC_POST, -1);
        }
        if (posted)
            upcall_fd = -1;  /* the upcall dispatched it already */
        else if (r != (ssize_t)(head_len + sizeof pending))
            return hsm_sc_fault(w, HSM_SC_POST, r);
        w->requests++;
        if (upcall_fd >= 0) {
            n = 1;
            if (write(upcall_fd, &n, sizeof n) < 0) { /* a full counter: a pass is due anyway */ }
        }
        w->waiting = 1;
        spin_until = w->spin_ns ? hsm_now_ns() + w->spin_ns : 0;
        for (;;) {
            int k;
            if (spin_until) {
                /* a vCPU with a CPU of its own: look for the completion before
                   sleeping, behind anything else runnable on that CPU */
                k = poll(&p, 1, 0);
                if (k == 0) {
                    if (hsm_now_ns() < spin_until) {
                        sched_yield();
                        continue;
                    }
                    spin_until = 0;
                    continue;
                }
                if (k > 0)
                    w->spin_hits++;
            } else {
                k = poll(&p, 1, w->probe_ms);
            }
            if (k < 0) {
                if (errno == EINTR)
                    continue;  /* a kick's signal; the eventfd says whether to look */
                return hsm_sc_fault(w, HSM_SC_READ, -1);
            }
            if (k == 0) {  /* no notify for a while: is the page still there? */
                r = hsm_remote_read(w->pid, w->slot + HSM_SLOT_STATE, &state, sizeof state);
                if (r != sizeof state)
                    return hsm_sc_fault(w, HSM_SC_PROBE, r);
                continue;
            }
            if (read(w->wake_fd, &n, sizeof n) < 0 && errno != EAGAIN)
                return hsm_sc_fault(w, HSM_SC_READ, -1);
            if (__atomic_load_n(&w->gen, __ATOMIC_ACQUIRE) != gen) {
                w->waiting = 0;
                return HSM_SC_ABANDONED;
            }
            r = hsm_remote_read(w->pid, w->slot + HSM_SLOT_VALUE, done, sizeof done);
            if (r != sizeof done)
                return hsm_sc_fault(w, HSM_SC_READ, r);
            memcpy(&state, done + sizeof done - sizeof state, sizeof state);
            if (state == HSM_STATE_COMPLETE)
                break;
        }
        w->waiting = 0;
        if (value_len) {
            memcpy(head + HSM_SLOT_VALUE, done, value_len);
            memcpy(value, done, sizeof *value);
        }
        r = hsm_remote_write(w->pid, w->slot + HSM_SLOT_STATE, &free_, sizeof free_);
        if (r != sizeof free_)
            return hsm_sc_fault(w, HSM_SC_FREE, r);
        return HSM_SC_DONE;
    }

    /* hsm_kvm_loop: KVM_RUN, and each PIO or MMIO exit that goes to the Service
       VM as one plain request (a single port access outside skip_ports, an MMIO
       access of 1, 2, 4 or 8 bytes outside [skip_mmio_lo, skip_mmio_hi)) is done
       here: the private request built as vcpu.py builds it, the slot cycle, the
       read value put where KVM wants it, the guest resumed. Everything else comes
       back to Python with the exit still in kvm_run (HSM_KL_EXIT), including an
       exit whose request did not complete normally: Python then performs it
       again, finds what stopped it (a closed gate, a reset, a fault) and does
       what it always does. A kick, or an attention count other than the
       caller's, comes back as HSM_KL_ATTENTION with no exit pending. */
    #define HSM_KL_EXIT 0
    #define HSM_KL_ATTENTION 1

    struct hsm_kvm_fast {
        int vcpu_fd;
        int kick_signal;
        void *run;                        /* struct kvm_run */
        const unsigned char *skip_ports;  /* 65536 bits: ports left to Python */
        uint64_t skip_mmio_lo;
        uint64_t skip_mmio_hi;
        unsigned attention;               /* bumped before every kick */
        int in_guest;
        uint64_t io_exits;                /* exits done here */
        uint64_t mmio_exits;
    };


    static void hsm_eat_kicks(int sig)
    {
        sigset_t set;
        struct timespec zero = { 0, 0 };
        sigemptyset(&set);
        sigaddset(&set, sig);
        while (sigtimedwait(&set, NULL, &zero) > 0)
            ;
    }

    static int hsm_kvm_loop(struct hsm_kvm_fast *f, unsigned attention, struct hsm_vcpu_wait *w,
                            struct hsm_gate *g, int upcall_fd, struct hsm_native_upcall *up)
    {
        struct kvm_run *run = f->run;
        unsigned char *head = w->head;
        for (;;) {
            uint32_t type, direction, size;
            uint64_t addr, wvalue = 0, mask, value, t0;
            int rc, mmio;

            if (__atomic_load_n(&f->attention, __ATOMIC_ACQUIRE) != attention)
                return HSM_KL_ATTENTION;
            __atomic_store_n(&f->in_guest, 1, __ATOMIC_RELEASE);
            if (__atomic_load_n(&f->attention, __ATOMIC_ACQUIRE) != attention) {
                __atomic_store_n(&f->in_guest, 0, __ATOMIC_RELEASE);
                return HSM_KL_ATTENTION;
            }
            rc = ioctl(f->vcpu_fd, KVM_RUN, 0);
            __atomic_store_n(&f->in_guest, 0, __ATOMIC_RELEASE);
            if (rc < 0) {
                if (errno == EINTR || errno == EAGAIN) {
                    hsm_eat_kicks(f->kick_signal);
                    return HSM_KL_ATTENTION;
                }
                return -errno;
            }
            if (run->exit_reason == KVM_EXIT_IO) {
                uint16_t port = run->io.port;
                if (run->io.count != 1 || run->io.size > 4 || (f->skip_ports[port >> 3] >> (port & 7)) & 1)
                    return HSM_KL_EXIT;
                mmio = 0;
                type = 0;  /* ACRN_IOREQ_TYPE_PORTIO */
                direction = run->io.direction == KVM_EXIT_IO_OUT;
                size = run->io.size;
                addr = port;
                if (direction)
                    memcpy(&wvalue, (unsigned char *)run + run->io.data_offset, size);
            } else if (run->exit_reason == KVM_EXIT_MMIO) {
                uint32_t len = run->mmio.len;
                uint64_t gpa = run->mmio.phys_addr;
                if ((len != 1 && len != 2 && len != 4 && len != 8) ||
                    (gpa >= f->skip_mmio_lo && gpa < f->skip_mmio_hi))
                    return HSM_KL_EXIT;
                mmio = 1;
                type = 1;  /* ACRN_IOREQ_TYPE_MMIO */
                direction = run->mmio.is_write != 0;
                size = len;
                addr = gpa;
                if (direction)
                    memcpy(&wvalue, run->mmio.data, len);
            } else {
                return HSM_KL_EXIT;
            }
            /* the private request, as vcpu.py's _pio/_mmio fill it */
            mask = size == 8 ? ~(uint64_t)0 : ((uint64_t)1 << (8 * size)) - 1;
            memcpy(head, &type, 4);
            memcpy(head + HSM_SLOT_DIRECTION, &direction, 4);
            memset(head + HSM_SLOT_DIRECTION + 4, 0, 4);
            memcpy(head + HSM_SLOT_ADDRESS, &addr, 8);
            {
                uint64_t sz = size;
                memcpy(head + HSM_SLOT_SIZE, &sz, 8);
            }
            if (direction) {
                uint64_t v = wvalue & mask;
                memcpy(head + HSM_SLOT_VALUE, &v, mmio ? 8 : 4);
            }
            t0 = hsm_now_ns();
            rc = hsm_slot_cycle(w, g, upcall_fd, up, direction ? 0 : (mmio ? 8 : 4), &value);
            if (rc != HSM_SC_DONE || !__atomic_load_n(&g->open, __ATOMIC_ACQUIRE))
                return HSM_KL_EXIT;  /* Python performs it again and meets the cause */
            {
                struct hsm_ring *ring = w->ring;
                ring->buf[ring->n % ring->size] = hsm_now_ns() - t0;
                ring->n++;
            }
            w->accesses++;
            if (mmio) {
                f->mmio_exits++;
                if (!direction) {
                    value &= mask;
                    memcpy(run->mmio.data, &value, size);
                }
            } else {
                f->io_exits++;
                if (!direction) {
                    value &= mask;
                    memcpy((unsigned char *)run + run->io.data_offset, &value, size);
                }
            }
        }
    }
    """,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
