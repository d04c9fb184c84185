/* HC_INJECT_MSI's and HC_SET_IRQLINE's native forms (irq_gate.h). */
#include <string.h>
#include <unistd.h>

#include "irq_gate.h"
#include "kvm_run.h"

void hsm_irq_gate_init(struct hsm_irq_gate *g)
{
    memset(g, 0, sizeof *g);
    pthread_mutex_init(&g->lock, NULL);
    g->fd = -1;
    g->alert_fd = -1;
}

void hsm_irq_gate_set(struct hsm_irq_gate *g, int fd)
{
    pthread_mutex_lock(&g->lock);
    g->fd = fd;
    pthread_mutex_unlock(&g->lock);
}

void hsm_irq_gate_alert(struct hsm_irq_gate *g, int alert_fd)
{
    pthread_mutex_lock(&g->lock);
    g->alert_fd = alert_fd;
    g->alerted = 0;
    pthread_mutex_unlock(&g->lock);
}

/* Locked: records not yet taken by both consumers. */
static uint64_t hsm_irq_held(const struct hsm_irq_gate *g)
{
    uint64_t oldest = g->taken[0] < g->taken[1] ? g->taken[0] : g->taken[1];
    return g->n - oldest;
}

/* Locked: room for one more record (and the KVM call it stands for)? */
static int hsm_irq_room(const struct hsm_irq_gate *g)
{
    return g->fd >= 0 && hsm_irq_held(g) < HSM_IRQ_RING;
}

/* Locked: the record of a call done. */
static void hsm_irq_record(struct hsm_irq_gate *g, uint32_t kind, uint64_t a, uint64_t b)
{
    struct hsm_irq_rec *r = &g->ring[g->n % HSM_IRQ_RING];
    r->kind = kind;
    r->pad = 0;
    r->a = a;
    r->b = b;
    g->n++;
    if (!g->alerted && g->alert_fd >= 0 && hsm_irq_held(g) >= HSM_IRQ_RING / 2) {
        uint64_t one = 1;
        g->alerted = 1;
        if (write(g->alert_fd, &one, sizeof one) < 0) {
            /* a full counter is still readable: the fold comes anyway */
        }
    }
}

int hsm_irq_msi(struct hsm_irq_gate *g, uint64_t addr, uint64_t data)
{
    int done = 0;
    if ((addr >> 20 & 0xFFF) != 0xFEE)
        return 0;
    pthread_mutex_lock(&g->lock);
    if (hsm_irq_room(g) && hsm_kvm_signal_msi(g->fd, addr, (uint32_t)data) >= 0) {
        hsm_irq_record(g, HSM_IRQ_MSI, addr, data);
        done = 1;
    }
    pthread_mutex_unlock(&g->lock);
    return done;
}

int hsm_irq_line(struct hsm_irq_gate *g, uint64_t ops)
{
    uint32_t gsi = (uint32_t)ops, op = (uint32_t)(ops >> 32);
    int done = 0;
    if (gsi >= HSM_IRQ_PINS)
        return 0;
    pthread_mutex_lock(&g->lock);
    if (hsm_irq_room(g) && hsm_kvm_irq_op(g->fd, gsi, op) == 0) {
        hsm_irq_record(g, HSM_IRQ_LINE, ops, 0);
        done = 1;
    }
    pthread_mutex_unlock(&g->lock);
    return done;
}

uint32_t hsm_irq_take(struct hsm_irq_gate *g, int who, struct hsm_irq_rec *out, uint32_t max)
{
    uint32_t k = 0;
    pthread_mutex_lock(&g->lock);
    while (k < max && g->taken[who] < g->n) {
        out[k++] = g->ring[g->taken[who] % HSM_IRQ_RING];
        g->taken[who]++;
    }
    if (hsm_irq_held(g) < HSM_IRQ_RING / 2)
        g->alerted = 0;
    pthread_mutex_unlock(&g->lock);
    return k;
}
