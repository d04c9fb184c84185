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
    #define HSM_SLOT_VALUE ...
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
        int stage;
        int waiting;
        uint64_t requests;
        uint64_t accesses;
        unsigned char *head;
        struct hsm_ring *ring;
        ...;
    };
    void hsm_gate_init(struct hsm_gate *g);
    void hsm_gate_set(struct hsm_gate *g, int open);
    void hsm_vcpu_abandon(struct hsm_vcpu_wait *w, int stop);
    int hsm_slot_cycle(struct hsm_vcpu_wait *w, struct hsm_gate *g, int upcall_fd,
                       size_t value_len, uint64_t *value);

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
                     struct hsm_gate *g, int upcall_fd);
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
    #include <signal.h>
    #include <string.h>
    #include <time.h>
    #include <sys/ioctl.h>
    #include <linux/kvm.h>

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

    /* struct acrn_io_request: reqs.{pio,mmio}_request.value and processed
       (checked against acrn_hsm_emu.abi by the tests). */
    #define HSM_SLOT_VALUE 88
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
        int stage;        /* where a fault happened */
        int waiting;      /* in the wait for COMPLETE (status) */
        uint64_t requests;  /* requests posted by native code */
        uint64_t accesses;  /* accesses done by hsm_kvm_loop */
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

    /* w->head, the private request, is written before PENDING. value_len: 0 for
       a write, else the bytes of the read value (4 PIO, 8 MMIO), copied back into
       the head as ACRN copies the result into its request. */
    static int hsm_slot_cycle(struct hsm_vcpu_wait *w, struct hsm_gate *g, int upcall_fd,
                              size_t value_len, uint64_t *value)
    {
        unsigned char *head = w->head;
        const size_t head_len = HSM_HEAD_LEN;
        const uint32_t pending = HSM_STATE_PENDING, free_ = HSM_STATE_FREE;
        unsigned char done[HSM_SLOT_STATE + 4 - HSM_SLOT_VALUE];
        struct pollfd p = { w->wake_fd, POLLIN, 0 };
        uint64_t n;
        uint32_t state;
        ssize_t r;
        unsigned gen;

        /* A wake left over from before (a kick) is not drained here: the wait below
           re-reads the state word on every wake and only a COMPLETE ends it. */
        gen = __atomic_load_n(&w->gen, __ATOMIC_ACQUIRE);
        pthread_mutex_lock(&g->lock);
        if (!g->open || __atomic_load_n(&w->stopped, __ATOMIC_ACQUIRE)) {
            pthread_mutex_unlock(&g->lock);
            return HSM_SC_CLOSED;
        }
        r = hsm_remote_write2(w->pid, w->slot, head, head_len,
                              w->slot + HSM_SLOT_STATE, &pending, sizeof pending);
        pthread_mutex_unlock(&g->lock);
        if (r != (ssize_t)(head_len + sizeof pending))
            return hsm_sc_fault(w, HSM_SC_POST, r);
        w->requests++;
        if (upcall_fd >= 0) {
            n = 1;
            if (write(upcall_fd, &n, sizeof n) < 0) { /* a full counter: a pass is due anyway */ }
        }
        w->waiting = 1;
        for (;;) {
            int k = poll(&p, 1, w->probe_ms);
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

    static uint64_t hsm_now_ns(void)
    {
        struct timespec t;
        clock_gettime(CLOCK_MONOTONIC, &t);
        return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
    }

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
                            struct hsm_gate *g, int upcall_fd)
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
            memcpy(head + 64, &direction, 4);
            memset(head + 68, 0, 4);
            memcpy(head + 72, &addr, 8);
            {
                uint64_t sz = size;
                memcpy(head + 80, &sz, 8);
            }
            if (direction) {
                uint64_t v = wvalue & mask;
                memcpy(head + HSM_SLOT_VALUE, &v, mmio ? 8 : 4);
            }
            t0 = hsm_now_ns();
            rc = hsm_slot_cycle(w, g, upcall_fd, direction ? 0 : (mmio ? 8 : 4), &value);
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
