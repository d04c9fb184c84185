/* The express path's state, as Python sets it (express.h). */
#include <errno.h>
#include <sched.h>
#include <string.h>
#include <unistd.h>

#include "express.h"
#include "express_internal.h"
#include "slot.h"

void hsm_x_table_init(struct hsm_express *e)
{
    pthread_mutex_init(&e->lock, NULL);
    e->n = 0;
}

int hsm_x_register(struct hsm_express *e, struct hsm_xvm *x)
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

void hsm_x_unregister(struct hsm_express *e, struct hsm_xvm *x)
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

void hsm_x_init(struct hsm_xvm *x, int fd, uint64_t fh, int pid, uint64_t page,
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
    x->vcpu_num = vcpu_num > HSM_X_VCPUS_MAX ? HSM_X_VCPUS_MAX : vcpu_num;
    x->nfds = 0;
    x->alert_fd = -1;
}

void hsm_x_lock(struct hsm_xvm *x) { pthread_mutex_lock(&x->lock); }
void hsm_x_unlock(struct hsm_xvm *x) { pthread_mutex_unlock(&x->lock); }

int hsm_x_set_wake_fds(struct hsm_xvm *x, const int *fds, struct hsm_vcpu_wait *const *waits, int n)
{
    if (n != (int)x->vcpu_num || !waits)
        return -EINVAL;
    for (int i = 0; i < n; i++)
        if (!waits[i])
            return -EINVAL;
    pthread_mutex_lock(&x->lock);
    for (int i = 0; i < n; i++) {
        x->wake_fds[i] = fds[i];
        x->waits[i] = waits[i];
    }
    x->nfds = n;
    pthread_mutex_unlock(&x->lock);
    return 0;
}

uint64_t hsm_x_bits(struct hsm_xvm *x, uint64_t set, uint64_t clear)
{
    uint64_t b;
    pthread_mutex_lock(&x->lock);
    x->bitmap = (x->bitmap | set) & ~clear;
    b = x->bitmap;
    pthread_mutex_unlock(&x->lock);
    return b;
}

void hsm_x_wake(struct hsm_xvm *x)
{
    pthread_mutex_lock(&x->lock);
    if (x->bitmap)
        hsm_x_answer_parked(x, 0);
    pthread_mutex_unlock(&x->lock);
}

void hsm_x_set_default(struct hsm_xvm *x, int on)
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

void hsm_x_set_ioeventfds(struct hsm_xvm *x, const struct hsm_xioeventfd *p, uint32_t n)
{
    pthread_mutex_lock(&x->lock);
    x->iofds = p;
    x->niofds = n;
    pthread_mutex_unlock(&x->lock);
}

void hsm_x_configure(struct hsm_xvm *x, int dispatch, const struct hsm_xrange *ranges,
                     uint32_t n)
{
    pthread_mutex_lock(&x->lock);
    x->ranges = ranges;
    x->nranges = n;
    x->dispatch = dispatch && x->has_default && x->fd >= 0;
    pthread_mutex_unlock(&x->lock);
}

int hsm_x_client_add(struct hsm_xvm *x, uint64_t fh, int pid, uint64_t page)
{
    int ret = -ENOSPC;
    pthread_mutex_lock(&x->lock);
    for (uint32_t k = 0; k < HSM_X_CLIENTS_MAX && x->fd >= 0; k++) {
        struct hsm_xclient *c = &x->clients[k];
        if (c->live)
            continue;
        memset(c, 0, sizeof *c);
        c->live = 1;
        c->fh = fh;
        c->pid = pid;
        c->page = page;
        ret = (int)k;
        break;
    }
    pthread_mutex_unlock(&x->lock);
    return ret;
}

void hsm_x_client_remove(struct hsm_xvm *x, uint32_t k, int err)
{
    struct hsm_xclient *c;
    if (k >= HSM_X_CLIENTS_MAX)
        return;
    c = &x->clients[k];
    pthread_mutex_lock(&x->lock);
    hsm_x_answer_waiters(x, c->parked, &c->nparked, err);
    c->live = 0;
    c->fh = 0;
    c->bitmap = 0;
    memset(c->held, 0, sizeof c->held);
    pthread_mutex_unlock(&x->lock);
}

uint64_t hsm_x_client_bits(struct hsm_xvm *x, uint32_t k, uint64_t set, uint64_t clear)
{
    uint64_t b;
    if (k >= HSM_X_CLIENTS_MAX)
        return 0;
    pthread_mutex_lock(&x->lock);
    x->clients[k].bitmap = (x->clients[k].bitmap | set) & ~clear;
    b = x->clients[k].bitmap;
    pthread_mutex_unlock(&x->lock);
    return b;
}

uint32_t hsm_x_client_held(struct hsm_xvm *x, uint32_t k, uint32_t vcpu, uint32_t v)
{
    uint32_t old;
    if (k >= HSM_X_CLIENTS_MAX || vcpu >= HSM_X_VCPUS_MAX)
        return 0;
    pthread_mutex_lock(&x->lock);
    old = x->clients[k].held[vcpu];
    if (v != (uint32_t)-1)
        x->clients[k].held[vcpu] = v;
    pthread_mutex_unlock(&x->lock);
    return old;
}

void hsm_x_client_wake(struct hsm_xvm *x, uint32_t k)
{
    struct hsm_xclient *c;
    if (k >= HSM_X_CLIENTS_MAX)
        return;
    c = &x->clients[k];
    pthread_mutex_lock(&x->lock);
    if (c->live && c->bitmap)
        hsm_x_answer_waiters(x, c->parked, &c->nparked, 0);
    pthread_mutex_unlock(&x->lock);
}

void hsm_x_close(struct hsm_xvm *x)
{
    pthread_mutex_lock(&x->lock);
    hsm_x_answer_parked(x, -ENODEV);
    for (uint32_t k = 0; k < HSM_X_CLIENTS_MAX; k++) {
        struct hsm_xclient *c = &x->clients[k];
        hsm_x_answer_waiters(x, c->parked, &c->nparked, -ENODEV);
        c->live = 0;
        c->fh = 0;
    }
    x->fd = -1;
    x->dispatch = 0;
    x->has_default = 0;
    x->ranges = NULL;
    x->nranges = 0;
    x->iofds = NULL;
    x->niofds = 0;
    x->irq = NULL;
    /* writes put off before fd was -1 still use the fds: let them finish
       (they take no lock, so holding it here cannot stop them) */
    while (__atomic_load_n(&x->busy, __ATOMIC_ACQUIRE))
        sched_yield();
    for (int i = 0; i < x->nfds; i++) {
        close(x->wake_fds[i]);
        x->waits[i] = NULL;
    }
    x->nfds = 0;
    x->alert_fd = -1;  /* the session's (Express.alert_fd): not closed here */
    pthread_mutex_unlock(&x->lock);
}

void hsm_x_set_irq(struct hsm_xvm *x, struct hsm_irq_gate *g)
{
    pthread_mutex_lock(&x->lock);
    x->irq = g;
    pthread_mutex_unlock(&x->lock);
}

void hsm_x_set_trace(struct hsm_xvm *x, struct hsm_xtrace *t)
{
    pthread_mutex_lock(&x->lock);
    x->trace = t;
    pthread_mutex_unlock(&x->lock);
}

void hsm_x_trace_rec(struct hsm_xvm *x, uint32_t kind, uint64_t vcpu,
                     const unsigned char *head, uint64_t value, int32_t result)
{
    hsm_x_trace_client(x, kind, vcpu, head, value, result, 0);
}

void hsm_x_trace_client(struct hsm_xvm *x, uint32_t kind, uint64_t vcpu,
                        const unsigned char *head, uint64_t value, int32_t result,
                        uint32_t client)
{
    struct hsm_xtrace *t = x->trace;
    struct hsm_xtrace_rec *r;
    if (t->head - t->tail >= t->size) {
        t->lost++;
        return;
    }
    r = &t->buf[t->head % t->size];
    memset(r, 0, sizeof *r);
    r->t_ns = hsm_now_ns();
    r->kind = kind;
    r->vcpu = (uint32_t)vcpu;
    r->value = value;
    r->result = result;
    r->client = client;
    if (head) {
        memcpy(&r->type, head, 4);
        memcpy(&r->dir, head + HSM_SLOT_DIRECTION, 4);
        memcpy(&r->addr, head + HSM_SLOT_ADDRESS, 8);
        memcpy(&r->size, head + HSM_SLOT_SIZE, 8);
        memcpy(&r->value, head + HSM_SLOT_VALUE, 8);
    }
    t->head++;
}

uint32_t hsm_x_trace_drain(struct hsm_xvm *x, struct hsm_xtrace_rec *out, uint32_t max,
                           uint64_t *lost)
{
    uint32_t n = 0;
    struct hsm_xtrace *t;
    pthread_mutex_lock(&x->lock);
    t = x->trace;
    *lost = 0;
    if (t) {
        while (n < max && t->tail != t->head) {
            out[n++] = t->buf[t->tail % t->size];
            t->tail++;
        }
        *lost = t->lost;
        t->lost = 0;
    }
    pthread_mutex_unlock(&x->lock);
    return n;
}
