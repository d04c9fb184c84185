/* HC_INJECT_MSI's native form (msi_gate.h). */
#include <string.h>

#include "kvm_run.h"
#include "msi_gate.h"

void hsm_msi_gate_init(struct hsm_msi_gate *g)
{
    memset(g, 0, sizeof *g);
    pthread_mutex_init(&g->lock, NULL);
    g->fd = -1;
}

void hsm_msi_gate_set(struct hsm_msi_gate *g, int fd)
{
    pthread_mutex_lock(&g->lock);
    g->fd = fd;
    pthread_mutex_unlock(&g->lock);
}

int hsm_msi_inject(struct hsm_msi_gate *g, uint64_t addr, uint64_t data)
{
    int done = 0;
    if ((addr >> 20 & 0xFFF) != 0xFEE)
        return 0;
    pthread_mutex_lock(&g->lock);
    if (g->fd >= 0 && hsm_kvm_signal_msi(g->fd, addr, (uint32_t)data) >= 0) {
        struct hsm_msi *m = &g->ring[g->n % HSM_MSI_RING];
        m->addr = addr;
        m->data = data;
        g->n++;
        done = 1;
    }
    pthread_mutex_unlock(&g->lock);
    return done;
}

uint64_t hsm_msi_take(struct hsm_msi_gate *g, int who, struct hsm_msi *out, uint32_t max,
                      uint32_t *copied)
{
    uint64_t fresh, k;
    pthread_mutex_lock(&g->lock);
    fresh = g->n - g->taken[who];
    k = fresh < max ? fresh : max;
    if (k > HSM_MSI_RING)
        k = HSM_MSI_RING;
    for (uint64_t i = 0; i < k; i++)
        out[i] = g->ring[(g->n - k + i) % HSM_MSI_RING];
    g->taken[who] = g->n;
    pthread_mutex_unlock(&g->lock);
    *copied = (uint32_t)k;
    return fresh;
}
