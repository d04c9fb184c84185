/* The KVM vCPU loop's fast path (kvm_run.h). */
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>

#include "kvm_run.h"

static void hsm_eat_kicks(int sig)
{
    sigset_t set;
    struct timespec zero = { 0, 0 };
    sigemptyset(&set);
    sigaddset(&set, sig);
    while (sigtimedwait(&set, NULL, &zero) > 0)
        ;
}

int hsm_kvm_loop(struct hsm_kvm_fast *f, unsigned attention, struct hsm_vcpu_wait *w,
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

int hsm_kvm_signal_msi(int vm_fd, uint64_t addr, uint32_t data)
{
    struct kvm_msi msi;
    memset(&msi, 0, sizeof(msi));
    msi.address_lo = (uint32_t)addr;
    msi.address_hi = (uint32_t)(addr >> 32);
    msi.data = data;
    int rc = ioctl(vm_fd, KVM_SIGNAL_MSI, &msi);
    return rc < 0 ? -errno : rc;
}

int hsm_kvm_irq_op(int vm_fd, uint32_t gsi, uint32_t op)
{
    /* ACRN's SET_IRQLINE ops (spec hv B.1.2: SET_HIGH, SET_LOW, RAISING_PULSE,
       FALLING_PULSE) as the KVM_IRQ_LINE levels they drive, in order */
    static const uint32_t levels[4][2] = { { 1, 0 }, { 0, 0 }, { 1, 0 }, { 0, 1 } };
    static const uint32_t count[4] = { 1, 1, 2, 2 };
    if (op > 3)
        return 1;
    for (uint32_t i = 0; i < count[op]; i++) {
        struct kvm_irq_level l;
        memset(&l, 0, sizeof(l));
        l.irq = gsi;
        l.level = levels[op][i];
        if (ioctl(vm_fd, KVM_IRQ_LINE, &l) < 0)
            return -errno;
    }
    return 0;
}
