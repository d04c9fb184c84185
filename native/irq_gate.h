/* HC_INJECT_MSI's and HC_SET_IRQLINE's native forms, for a KVM-backed VM (the
   hypervisor's inject_msi and set_irqline, hypervisor.py; backends/kvm.py keeps
   one gate per VM).

   The hypervisor opens the gate (sets the KVM VM's fd) where its checks of both
   hypercalls pass for every call but the argument (the VM exists, it is
   post-launched, the Service VM may target it), and closes it before the fd
   goes. hsm_irq_msi and hsm_irq_line are the hypercalls for a caller outside
   Python (the express path's INJECT_MSI and SET_IRQLINE): the argument's
   checks, the KVM calls, and a record. Anything else (a closed gate, an MSI
   outside the LAPIC's range, a GSI KVM has no pin for, an op that drives no
   level, KVM refusing, a full ring) is the caller's to take to Python, which
   answers and records as always, with nothing done here.

   Every call made here is a record in the ring, in order, until both of its
   consumers (the hypervisor's records, the HSM's hypercall log) have taken it
   and replayed it as their own: nothing is lost; with the ring full the calls
   go to Python. Past half full, alert_fd is written once: a fold is due. */
#ifndef HSM_IRQ_GATE_H
#define HSM_IRQ_GATE_H

#include <pthread.h>
#include <stdint.h>

#define HSM_IRQ_RING 4096
#define HSM_IRQ_HV 0      /* the consumers */
#define HSM_IRQ_HSM 1
#define HSM_IRQ_MSI 1     /* a record's kind: a = address, b = data */
#define HSM_IRQ_LINE 2    /* a = acrn_irqline_ops (gsi | op << 32) */
#define HSM_IRQ_PINS 24   /* KVM's IOAPIC: the GSIs driven here */

struct hsm_irq_rec { uint32_t kind; uint32_t pad; uint64_t a; uint64_t b; };

struct hsm_irq_gate {
    pthread_mutex_t lock;
    int fd;               /* the KVM VM's (the hypervisor's: borrowed), -1 closed */
    int alert_fd;         /* an eventfd to write when a fold is due, or -1 */
    int alerted;
    uint64_t n;           /* records made */
    uint64_t taken[2];    /* of those, taken by each consumer */
    struct hsm_irq_rec ring[HSM_IRQ_RING];
};

void hsm_irq_gate_init(struct hsm_irq_gate *g);
/* Open (fd >= 0) or close (-1): once this returns, a closed gate's fd is unused. */
void hsm_irq_gate_set(struct hsm_irq_gate *g, int fd);
void hsm_irq_gate_alert(struct hsm_irq_gate *g, int alert_fd);
/* 1 done and recorded, 0 not here (see above). */
int hsm_irq_msi(struct hsm_irq_gate *g, uint64_t addr, uint64_t data);
int hsm_irq_line(struct hsm_irq_gate *g, uint64_t ops);
/* Consumer who's records, oldest first: up to max into out; how many. */
uint32_t hsm_irq_take(struct hsm_irq_gate *g, int who, struct hsm_irq_rec *out, uint32_t max);

#endif
