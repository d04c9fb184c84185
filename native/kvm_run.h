/* The KVM vCPU loop's fast path (acrn_hsm_emu/hypervisor/backends/kvm.py).

   hsm_kvm_loop: KVM_RUN, and each PIO or MMIO exit that goes to the Service
   VM as one plain request (a single port access outside skip_ports, an MMIO
   access of 1, 2, 4 or 8 bytes outside [skip_mmio_lo, skip_mmio_hi)) is done
   here: the private request built as vcpu.py builds it, the slot cycle, the
   read value put where KVM wants it, the guest resumed. Everything else comes
   back to Python with the exit still in kvm_run (HSM_KL_EXIT), including an
   exit whose request did not complete normally: Python then performs it
   again, finds what stopped it (a closed gate, a reset, a fault) and does
   what it always does. A kick, or an attention count other than the
   caller's, comes back as HSM_KL_ATTENTION with no exit pending. */
#ifndef HSM_KVM_RUN_H
#define HSM_KVM_RUN_H

#include <stdint.h>

#include "vcpu_cycle.h"

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

int hsm_kvm_loop(struct hsm_kvm_fast *f, unsigned attention, struct hsm_vcpu_wait *w,
                 struct hsm_gate *g, int upcall_fd, struct hsm_native_upcall *up);

/* KVM_SIGNAL_MSI on a VM: > 0 delivered, 0 blocked by the guest, -errno. One
 * native call where Python would pack a struct kvm_msi and go through fcntl. */
int hsm_kvm_signal_msi(int vm_fd, uint64_t addr, uint32_t data);

/* ACRN's SET_IRQLINE op on gsi as KVM_IRQ_LINE calls, one per level it drives (a
   pulse is two): 0; 1 for an op that drives no level (nothing done); or the first
   failure's -errno (the levels after it not set). The one table of ACRN's ops. */
int hsm_kvm_irq_op(int vm_fd, uint32_t gsi, uint32_t op);

#endif
