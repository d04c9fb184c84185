/* The express path in cdev's reader: ATTACH_IOREQ_CLIENT, NOTIFY_REQUEST_FINISH
   (and under CUSE its retry) and FUSE_INTERRUPT on a VM's own file or a served
   range client's bound file, and INJECT_MSI and SET_IRQLINE (directly, or in
   the extension ABI's VALUE_CALL) on a VM's own file, answered from the raw
   FUSE request (express.h). */
#include <errno.h>
#include <string.h>
#include <sys/ioctl.h>  /* _IOW, for the ACRN_IOCTL_ numbers */
#include <unistd.h>
#include <linux/acrn.h>
#include <linux/fuse.h>
#include <acrn_hsm_emu.h>  /* the extension ABI: VALUE_CALL */

#include "express_internal.h"
#include "remote_memory.h"

/* ATTACH_IOREQ_CLIENT on a client's waiters (bitmap, parked; who: the trace's
   client): level-triggered; past HSM_X_PARKED_MAX waiters, EAGAIN (as cdev's
   bound on waiting requests answers). Locked; unlocks. */
static int hsm_x_attach_on(struct hsm_xvm *x, uint64_t unique, uint64_t bitmap,
                           uint64_t *parked, uint32_t *nparked, uint32_t who)
{
    x->attaches++;
    if (x->trace)
        hsm_x_trace_client(x, HSM_XT_ATTACH, 0, NULL, 0,
                           bitmap ? 0 : *nparked >= HSM_X_PARKED_MAX ? -EAGAIN : 1, who);
    if (bitmap) {
        hsm_x_reply_later(x, unique);
    } else if (*nparked >= HSM_X_PARKED_MAX) {
        uint64_t one = 1;
        x->refused++;
        hsm_x_reply(x, unique, -EAGAIN);
        if (x->alert_fd >= 0 && write(x->alert_fd, &one, sizeof one) < 0) {
            /* a full counter is still readable: the log comes anyway */
        }
    } else {
        parked[(*nparked)++] = unique;
    }
    pthread_mutex_unlock(&x->lock);
    hsm_x_flush_out();
    return 1;
}

/* ATTACH_IOREQ_CLIENT on the VM's own file: the default client's. Locked; unlocks. */
static int hsm_x_attach(struct hsm_xvm *x, uint64_t unique)
{
    if (!x->has_default || x->fd < 0) {
        pthread_mutex_unlock(&x->lock);
        return 0;  /* Python: ENODEV, or the session is closing */
    }
    return hsm_x_attach_on(x, unique, x->bitmap, x->parked, &x->nparked, 0);
}

/* Locked: the end of a NOTIFY served here, the slot COMPLETE: the vCPU is
   told (unless it polls) and the caller answered, both once the lock is
   released; unlocks. 1. */
static int hsm_x_notified(struct hsm_xvm *x, uint32_t vcpu, uint32_t polling, int handed,
                          uint64_t unique)
{
    x->notified++;
    hsm_x_completed(x, vcpu, polling, handed);
    hsm_x_reply_later(x, unique);
    pthread_mutex_unlock(&x->lock);
    hsm_x_flush_out();
    return 1;
}

/* Locked: vCPU i's request answered (value; store_len of it stored into the
   slot, 0 for none): the answer (if any) and COMPLETE stored, or, for a vCPU
   waiting natively, the answer and FREE with the value handed over
   (hsm_vcpu_finish). 0 done, 1 done and handed over, -1 a fault (nothing
   stored: Python's to do). */
static int hsm_x_complete_slot(struct hsm_xvm *x, uint32_t i, uint32_t polling, uint64_t value,
                               size_t store_len)
{
    const uint32_t complete = HSM_STATE_COMPLETE;
    uint64_t slot = x->page + ((uint64_t)i << 8);
    int handed = 0;
    if (!polling && x->waits[i]) {
        handed = hsm_vcpu_finish(x->waits[i], x->pid, slot, value, store_len);
        if (handed < 0)
            return -1;
    }
    if (!handed && hsm_remote_write2(x->pid, slot + HSM_SLOT_VALUE, &value, store_len,
                                     slot + HSM_SLOT_STATE, &complete, 4) != (ssize_t)(store_len + 4))
        return -1;
    x->handed += (uint64_t)handed;
    return handed;
}

/* NOTIFY_REQUEST_FINISH: acrn_ioreq_request_default_complete. Anything but the
   plain case (reserved set, a vCPU out of range, a fault) goes to Python,
   before any effect, so that its answer and its logging stay the only ones.
   Locked; unlocks. */
static int hsm_x_notify(struct hsm_xvm *x, uint64_t unique, const unsigned char *arg)
{
    struct acrn_ioreq_notify n;
    uint32_t polling;
    /* completion_polling .. value: the driver's read, and the value the
       vCPU (or the trace) takes */
    unsigned char seen[HSM_SLOT_VALUE + 8 - HSM_SLOT_POLLING];
    uint64_t slot, value;
    int handed;
    memcpy(&n, arg, sizeof n);
    n.vcpu &= 0xFFFF;
    if (n.reserved || !x->has_default || x->fd < 0 || n.vcpu >= x->vcpu_num ||
        x->nfds != (int)x->vcpu_num)
        goto python;
    slot = x->page + ((uint64_t)n.vcpu << 8);
    if (hsm_remote_read(x->pid, slot + HSM_SLOT_POLLING, seen, sizeof seen) != sizeof seen)
        goto python;
    memcpy(&polling, seen, 4);
    memcpy(&value, seen + HSM_SLOT_VALUE - HSM_SLOT_POLLING, 8);
    handed = hsm_x_complete_slot(x, n.vcpu, polling, value, 0);
    if (handed < 0)
        goto python;
    x->bitmap &= ~((uint64_t)1 << n.vcpu);
    if (x->trace)
        hsm_x_trace_rec(x, HSM_XT_NOTIFY, n.vcpu, NULL, value, 0);
    return hsm_x_notified(x, n.vcpu, polling, handed, unique);
python:
    pthread_mutex_unlock(&x->lock);
    return 0;
}

/* Locked: may an interrupt hypercall be made natively here? Not without the
   VM's gate, nor while a tracer listens (Python records the call). */
static int hsm_x_irq_ready(const struct hsm_xvm *x)
{
    return x->fd >= 0 && x->irq && !x->trace;
}

/* INJECT_MSI on the VM's own file (hsm.py: _pass("inject_msi"), the hypervisor's
   inject_msi): through the VM's native HC_INJECT_MSI, answered 0. Anything
   else goes to Python, which has had nothing done for it (irq_gate.h).
   Locked; unlocks. */
static int hsm_x_msi(struct hsm_xvm *x, uint64_t unique, const unsigned char *arg)
{
    struct acrn_msi_entry m;
    memcpy(&m, arg, sizeof m);
    if (!hsm_x_irq_ready(x) || !hsm_irq_msi(x->irq, m.msi_addr, m.msi_data)) {
        pthread_mutex_unlock(&x->lock);
        return 0;
    }
    x->msis++;
    hsm_x_reply_later(x, unique);
    pthread_mutex_unlock(&x->lock);
    hsm_x_flush_out();
    return 1;
}

/* SET_IRQLINE on the VM's own file, its argument the value itself (CUSE: cdev
   declares it by value, hsm.py: arg_specs), or carried by VALUE_CALL (FUSE:
   the launcher's; extension.py: value_call), answered with that call's 24
   bytes, result 0. Through the VM's native HC_SET_IRQLINE; anything else to
   Python, nothing done. Locked; unlocks. */
static int hsm_x_irqline(struct hsm_xvm *x, uint64_t unique, uint64_t ops,
                         struct acrn_emu_value_call *vc)
{
    if (!hsm_x_irq_ready(x) || !hsm_irq_line(x->irq, ops)) {
        pthread_mutex_unlock(&x->lock);
        return 0;
    }
    x->irqlines++;
    if (vc) {
        vc->result = 0;
        hsm_x_reply_data(x, unique, vc, sizeof *vc);
    } else {
        hsm_x_reply_later(x, unique);
    }
    pthread_mutex_unlock(&x->lock);
    hsm_x_flush_out();
    return 1;
}

/* ATTACH_IOREQ_CLIENT on range client k's bound file (extension.py:
   bound_ioctl, IoreqClient.attach). Locked (the caller found it live); unlocks. */
static int hsm_x_client_attach(struct hsm_xvm *x, uint32_t k, uint64_t unique)
{
    struct hsm_xclient *c = &x->clients[k];
    if (x->fd < 0) {
        pthread_mutex_unlock(&x->lock);
        return 0;
    }
    return hsm_x_attach_on(x, unique, c->bitmap, c->parked, &c->nparked, k + 1);
}

/* NOTIFY_REQUEST_FINISH on range client k's bound file: remote.complete. A
   read's answer comes from the client's page (4 bytes, 8 for MMIO), its slot
   goes back to FREE, then the ACRN slot gets the answer and COMPLETE and the
   vCPU is notified. Anything but the plain case (reserved set, a vCPU out of
   range or not held, a fault) goes to Python, before any effect that Python
   would not redo the same way (FREE in the client's page is written again).
   Locked (the caller found it live); unlocks. */
static int hsm_x_client_notify(struct hsm_xvm *x, uint32_t k, uint64_t unique,
                               const unsigned char *arg)
{
    static const uint32_t free_state = HSM_STATE_FREE;
    struct hsm_xclient *c = &x->clients[k];
    struct acrn_ioreq_notify n;
    uint32_t polling, held, type = ACRN_IOREQ_TYPE_PORTIO, direction = ACRN_IOREQ_DIR_WRITE;
    uint64_t slot, coff, value = 0;
    int handed;
    size_t value_len = 0;
    memcpy(&n, arg, sizeof n);
    if (n.reserved)
        goto python;
    n.vcpu &= 0xFFFF;
    if (x->fd < 0 || n.vcpu >= x->vcpu_num || x->nfds != (int)x->vcpu_num ||
        !(c->bitmap >> n.vcpu & 1))
        goto python;
    held = c->held[n.vcpu];
    if (held & HSM_X_HELD) {
        type = held >> 8 & 0xFF;
        direction = held & 0xFF;
    }
    slot = x->page + ((uint64_t)n.vcpu << 8);
    coff = c->page + ((uint64_t)n.vcpu << 8);
    if (direction == ACRN_IOREQ_DIR_READ) {
        value_len = type == ACRN_IOREQ_TYPE_MMIO ? 8 : 4;
        if (hsm_remote_read(c->pid, coff + HSM_SLOT_VALUE, &value, value_len) != (ssize_t)value_len)
            goto python;
    }
    if (hsm_remote_read(x->pid, slot + HSM_SLOT_POLLING, &polling, 4) != 4)
        goto python;
    if (hsm_remote_write(c->pid, coff + HSM_SLOT_STATE, &free_state, 4) != 4)
        goto python;
    handed = hsm_x_complete_slot(x, n.vcpu, polling, value, value_len);
    if (handed < 0)
        goto python;
    c->bitmap &= ~((uint64_t)1 << n.vcpu);
    c->held[n.vcpu] = 0;
    c->served++;
    if (x->trace)
        hsm_x_trace_client(x, HSM_XT_RNOTIFY, n.vcpu, NULL, value, value_len ? 1 : 0, k + 1);
    return hsm_x_notified(x, n.vcpu, polling, handed, unique);
python:
    pthread_mutex_unlock(&x->lock);
    return 0;
}

/* The live range client whose bound file is fh: x locked and its number, or -1. */
static int hsm_x_find_client(struct hsm_xvm *x, uint64_t fh)
{
    pthread_mutex_lock(&x->lock);
    for (uint32_t k = 0; k < HSM_X_CLIENTS_MAX; k++)
        if (x->clients[k].live && x->clients[k].fh == fh)
            return (int)k;
    pthread_mutex_unlock(&x->lock);
    return -1;
}

/* An interrupted ATTACH this path holds: the driver's wait ignores signals, 0. */
static int hsm_x_interrupt(struct hsm_xvm *x, uint64_t unique)
{
    int found = 0;
    pthread_mutex_lock(&x->lock);
    uint64_t *parked = x->parked;
    uint32_t *n = &x->nparked;
    for (uint32_t k = 0; !found && k <= HSM_X_CLIENTS_MAX; k++) {
        if (k > 0) {
            parked = x->clients[k - 1].parked;
            n = &x->clients[k - 1].nparked;
        }
        for (uint32_t i = 0; i < *n; i++) {
            if (parked[i] == unique) {
                parked[i] = parked[--*n];
                hsm_x_reply(x, unique, 0);
                found = 1;
                break;
            }
        }
    }
    pthread_mutex_unlock(&x->lock);
    return found;
}

/* Who serves the file fh here: its VM, locked, with *k -1 for the VM's own file
   (the default client's) or k for range client k's bound file; NULL: nobody. */
static struct hsm_xvm *hsm_x_owner(struct hsm_express *e, uint64_t fh, int *k)
{
    for (uint32_t n = 0; n < e->n; n++) {
        if (e->vms[n]->fh == fh) {
            pthread_mutex_lock(&e->vms[n]->lock);
            *k = -1;
            return e->vms[n];
        }
    }
    for (uint32_t n = 0; n < e->n; n++) {
        *k = hsm_x_find_client(e->vms[n], fh);
        if (*k >= 0)
            return e->vms[n];
    }
    return NULL;
}

static int hsm_x_prefilter_locked(struct hsm_express *e, const void *req, size_t len)
{
    const struct fuse_in_header *h = req;
    const unsigned char *body = (const unsigned char *)req + sizeof *h;
    struct fuse_ioctl_in in;
    struct hsm_xvm *x;
    int k;
    if (len < sizeof *h)
        return 0;
    if (h->opcode == FUSE_INTERRUPT) {
        uint64_t unique;
        if (len < sizeof *h + sizeof unique)
            return 0;
        memcpy(&unique, body, sizeof unique);
        for (uint32_t n = 0; n < e->n; n++)
            if (hsm_x_interrupt(e->vms[n], unique))
                return 1;
        return 0;
    }
    if (h->opcode != FUSE_IOCTL || len < sizeof *h + sizeof in)
        return 0;
    memcpy(&in, body, sizeof in);
    if (in.flags & FUSE_IOCTL_COMPAT)
        return 0;
    if (in.cmd != ACRN_IOCTL_ATTACH_IOREQ_CLIENT && in.cmd != ACRN_IOCTL_NOTIFY_REQUEST_FINISH &&
        in.cmd != ACRN_IOCTL_INJECT_MSI && in.cmd != ACRN_IOCTL_SET_IRQLINE &&
        in.cmd != ACRN_EMU_IOCTL_VALUE_CALL)
        return 0;
    x = hsm_x_owner(e, in.fh, &k);
    if (!x)
        return 0;
    if (in.cmd == ACRN_IOCTL_SET_IRQLINE) {
        /* the value is the argument: CUSE passes it as it is (an unrestricted
           ioctl, nothing to fetch); FUSE would have copied 8 bytes from it */
        if (k < 0 && (in.flags & FUSE_IOCTL_UNRESTRICTED) && in.in_size == 0)
            return hsm_x_irqline(x, h->unique, in.arg, NULL);
        pthread_mutex_unlock(&x->lock);
        return 0;
    }
    if (in.cmd == ACRN_EMU_IOCTL_VALUE_CALL) {
        struct acrn_emu_value_call vc;
        if (k < 0 && in.in_size >= sizeof vc && in.out_size >= sizeof vc &&
            len >= sizeof *h + sizeof in + sizeof vc) {
            memcpy(&vc, body + sizeof in, sizeof vc);
            if (vc.cmd == ACRN_IOCTL_SET_IRQLINE && vc.reserved == 0)
                return hsm_x_irqline(x, h->unique, vc.arg, &vc);
        }
        pthread_mutex_unlock(&x->lock);  /* the rest, and CUSE's first call: Python */
        return 0;
    }
    if (in.cmd == ACRN_IOCTL_INJECT_MSI) {
        if (k < 0 && in.in_size >= sizeof(struct acrn_msi_entry) &&
            len >= sizeof *h + sizeof in + sizeof(struct acrn_msi_entry))
            return hsm_x_msi(x, h->unique, body + sizeof in);
        /* CUSE's first call, without its 16 bytes: the retry fetching them, as for
           NOTIFY below, where the second call would be served here. A range
           client's bound file: Python (extension.py: bound_ioctl). */
        int served = k < 0 && (in.flags & FUSE_IOCTL_UNRESTRICTED) && in.in_size == 0 &&
                     hsm_x_irq_ready(x);
        if (served)
            hsm_x_reply_retry(x, h->unique, in.arg, sizeof(struct acrn_msi_entry));
        pthread_mutex_unlock(&x->lock);
        return served;
    }
    if (in.cmd == ACRN_IOCTL_NOTIFY_REQUEST_FINISH &&
        (in.in_size < sizeof(struct acrn_ioreq_notify) ||
         len < sizeof *h + sizeof in + sizeof(struct acrn_ioreq_notify))) {
        /* CUSE's first call (an unrestricted ioctl) carries no argument: the answer
           is the retry asking the kernel for its 8 bytes, as cdev's op_ioctl gives
           once the HSM's precheck passes (hsm.py: gate), which it does for the files
           served here (a live VM's own file with its default client, or a live
           range client's bound file). Anything else goes to Python. */
        int served = (in.flags & FUSE_IOCTL_UNRESTRICTED) && in.in_size == 0 && x->fd >= 0 &&
                     (k >= 0 || x->has_default);
        if (served)
            hsm_x_reply_retry(x, h->unique, in.arg, sizeof(struct acrn_ioreq_notify));
        pthread_mutex_unlock(&x->lock);
        return served;
    }
    if (in.cmd == ACRN_IOCTL_ATTACH_IOREQ_CLIENT)
        return k < 0 ? hsm_x_attach(x, h->unique) : hsm_x_client_attach(x, (uint32_t)k, h->unique);
    return k < 0 ? hsm_x_notify(x, h->unique, body + sizeof in)
                 : hsm_x_client_notify(x, (uint32_t)k, h->unique, body + sizeof in);
}

int hsm_x_prefilter(void *ctx, int fd, const void *req, size_t len)
{
    struct hsm_express *e = ctx;
    int ret;
    (void)fd;
    pthread_mutex_lock(&e->lock);
    ret = hsm_x_prefilter_locked(e, req, len);
    pthread_mutex_unlock(&e->lock);
    return ret;
}
