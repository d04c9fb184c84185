/* The express path in a vCPU's thread: the upcall for one request (express.h). */
#include <errno.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>
#include <linux/acrn.h>

#include "express_internal.h"

/* Where the driver would route a request: HSM_X_DEFAULT, the default client
   (PIO or MMIO that no range contains, in_range: whole access inside, not
   CF8/CFC); HSM_X_IOEVENTFD, the ioeventfd client's handler (the first range
   containing it is that client's); HSM_X_CLIENT, a range client served here
   (*client: its number); 0 anything else (Python's). */
#define HSM_X_DEFAULT 1
#define HSM_X_IOEVENTFD 2
#define HSM_X_CLIENT 3
static int hsm_x_route(const struct hsm_xvm *x, const unsigned char *head, uint32_t *client)
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
        if (r->type != type || r->start > addr || last > r->end)
            continue;
        if (r->handler == HSM_XRANGE_CLIENT) {
            *client = r->client;
            return r->client < HSM_X_CLIENTS_MAX && x->clients[r->client].live
                   ? HSM_X_CLIENT : 0;
        }
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
    unsigned long n = 0;
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
    for (unsigned long k = 0; k < n; k++)
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
    if (x->trace)
        hsm_x_trace_rec(x, HSM_XT_IOEVENTFD, i, head, 0, 0);
    hsm_x_completed(x, i, polling, 0);
    return 1;
}

/* remote.hand_over for slot i and range client k, in the vCPU's thread;
   locked. The request goes to the client's own page first (head, then
   kernel_handled 0 and PROCESSING): if that page is unreachable, Python's
   pass finds the request PENDING and drops the client, as it does. Then the
   ACRN slot gets kernel_handled 1 and PROCESSING, the client its bit and
   what the bit holds, and its blocked ATTACH calls their answer. */
static int hsm_x_hand_over(struct hsm_xvm *x, uint32_t k, int pid, uint64_t slot, uint64_t i,
                           const unsigned char *head)
{
    static const uint32_t kh0_processing[2] = { 0, ACRN_IOREQ_STATE_PROCESSING };
    static const uint32_t kh1_processing[2] = { 1, ACRN_IOREQ_STATE_PROCESSING };
    struct hsm_xclient *c = &x->clients[k];
    uint64_t coff = c->page + (i << 8);
    uint32_t type, direction;
    struct iovec l[2] = { { (void *)head, HSM_HEAD_LEN }, { (void *)kh0_processing, 8 } };
    struct iovec rm[2] = { { (void *)(uintptr_t)coff, HSM_HEAD_LEN },
                           { (void *)(uintptr_t)(coff + HSM_SLOT_KH), 8 } };
    int r;
    if (process_vm_writev(c->pid, l, 2, rm, 2, 0) != HSM_HEAD_LEN + 8)
        return 0;
    r = hsm_x_take(x, pid, slot, head, 0, kh1_processing);
    if (r < 0)
        return r;
    memcpy(&type, head, 4);
    memcpy(&direction, head + HSM_SLOT_DIRECTION, 4);
    c->bitmap |= (uint64_t)1 << i;
    c->held[i] = HSM_X_HELD | (type & 0xFF) << 8 | (direction & 0xFF);
    c->dispatched++;
    x->remote++;
    if (x->trace)
        hsm_x_trace_client(x, HSM_XT_RANGE, i, head, 0, 0, k + 1);
    for (uint32_t n = 0; n < c->nparked; n++)
        hsm_x_reply_later(x, c->parked[n]);  /* after the gate: flush() */
    c->nparked = 0;
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
    uint32_t client = 0;
    int route, r = 0;
    pthread_mutex_lock(&x->lock);
    route = x->dispatch && pid == x->pid && slot >= x->page && i < x->vcpu_num
            ? hsm_x_route(x, head, &client) : 0;
    if (route == HSM_X_CLIENT) {
        r = hsm_x_hand_over(x, client, pid, slot, i, head);
    } else if (route == HSM_X_IOEVENTFD) {
        r = hsm_x_ioeventfd(x, pid, slot, i, head);
    } else if (route == HSM_X_DEFAULT) {
        r = hsm_x_take(x, pid, slot, head, 0, kh_processing);
        if (r == 0) {
            x->defaults++;
            x->bitmap |= (uint64_t)1 << i;
            if (x->trace)
                hsm_x_trace_rec(x, HSM_XT_DEFAULT, i, head, 0, 0);
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
int hsm_x_post(struct hsm_xvm *x, int pid, uint64_t slot, const unsigned char *head)
{
    int r = hsm_x_dispatch(x, pid, slot, head);
    hsm_x_flush_out();
    return r;
}

/* The vCPU's post, under its VM's gate; flush() follows once the gate is released. */
int hsm_x_upcall(struct hsm_native_upcall *self, int pid, uint64_t slot,
                 const unsigned char *head)
{
    return hsm_x_dispatch((struct hsm_xvm *)self, pid, slot, head);
}

void hsm_x_flush(struct hsm_native_upcall *self)
{
    (void)self;
    hsm_x_flush_out();
}
