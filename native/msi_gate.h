/* HC_INJECT_MSI's native form, for a KVM-backed VM (the hypervisor's
   hypervisor.py: inject_msi; backends/kvm.py keeps one gate per VM).

   The hypervisor opens the gate where its checks of HC_INJECT_MSI pass for
   every call but the address (the VM exists, it is post-launched, the Service
   VM may target it): the KVM VM's fd is then set. hsm_msi_inject is the
   hypercall for a caller outside Python (the express path's INJECT_MSI):
   the address check, KVM_SIGNAL_MSI, and a record. The hypervisor closes the
   gate before it closes the fd; a closed gate, or an address outside the
   LAPIC's range, is the caller's to take to Python, which answers as always.

   What was injected here reaches the two records kept in Python (the
   hypervisor's MSIs received, the HSM's hypercall log) when each takes it:
   a count, and the newest HSM_MSI_RING of them, in order. */
#ifndef HSM_MSI_GATE_H
#define HSM_MSI_GATE_H

#include <pthread.h>
#include <stdint.h>

#define HSM_MSI_RING 32
#define HSM_MSI_HV 0   /* the consumers of the records */
#define HSM_MSI_HSM 1

struct hsm_msi { uint64_t addr; uint64_t data; };

struct hsm_msi_gate {
    pthread_mutex_t lock;
    int fd;                 /* the KVM VM's (the hypervisor's: borrowed), -1 closed */
    uint64_t n;             /* injected here */
    uint64_t taken[2];      /* of those, taken by each consumer */
    struct hsm_msi ring[HSM_MSI_RING];
};

void hsm_msi_gate_init(struct hsm_msi_gate *g);
/* Open (fd >= 0) or close (-1): once this returns, a closed gate's fd is not used. */
void hsm_msi_gate_set(struct hsm_msi_gate *g, int fd);
/* 1 injected (KVM took the call), 0 not here: the gate is closed, the address
   is not the LAPIC's (0xFEExxxxx), or KVM refused (nothing was done). */
int hsm_msi_inject(struct hsm_msi_gate *g, uint64_t addr, uint64_t data);
/* For consumer who: how many were injected here since it last took; the newest
   min(that, max, HSM_MSI_RING) of them go into out, oldest first (*copied). */
uint64_t hsm_msi_take(struct hsm_msi_gate *g, int who, struct hsm_msi *out, uint32_t max,
                      uint32_t *copied);

#endif
