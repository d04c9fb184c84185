/* The express path in cdev's reader: ATTACH_IOREQ_CLIENT, NOTIFY_REQUEST_FINISH
   and FUSE_INTERRUPT on a VM's own file, answered from the raw FUSE request
   (express.h). */
#include <errno.h>
#include <string.h>
#include <sys/ioctl.h>  /* _IOW, for the ACRN_IOCTL_ numbers */
#include <unistd.h>
#include <linux/acrn.h>
#include <linux/fuse.h>

#include "express_internal.h"
#include "remote_memory.h"

/* ATTACH_IOREQ_CLIENT: level-triggered; past HSM_X_PARKED_MAX waiters, EAGAIN
   (as cdev's bound on waiting requests answers). */
static int hsm_x_attach(struct hsm_xvm *x, uint64_t unique)
{
    pthread_mutex_lock(&x->lock);
    if (!x->has_default || x->fd < 0) {
        pthread_mutex_unlock(&x->lock);
        return 0;  /* Python: ENODEV, or the session is closing */
    }
    x->attaches++;
    if (x->trace)
        hsm_x_trace_rec(x, HSM_XT_ATTACH, 0, NULL, 0,
                        x->bitmap ? 0 : x->nparked >= HSM_X_PARKED_MAX ? -EAGAIN : 1);
    if (x->bitmap) {
        hsm_x_reply_later(x, unique);
    } else if (x->nparked >= HSM_X_PARKED_MAX) {
        uint64_t one = 1;
        x->refused++;
        hsm_x_reply(x, unique, -EAGAIN);
        if (x->alert_fd >= 0 && write(x->alert_fd, &one, sizeof one) < 0) {
            /* a full counter is still readable: the log comes anyway */
        }
    } else {
        x->parked[x->nparked++] = unique;
    }
    pthread_mutex_unlock(&x->lock);
    hsm_x_flush_out();
    return 1;
}

/* NOTIFY_REQUEST_FINISH: acrn_ioreq_request_default_complete. Anything but the
   plain case (reserved set, a vCPU out of range, a fault) goes to Python,
   before any effect, so that its answer and its logging stay the only ones. */
static int hsm_x_notify(struct hsm_xvm *x, uint64_t unique, const unsigned char *arg)
{
    struct acrn_ioreq_notify n;
    uint32_t polling;
    const uint32_t complete = HSM_STATE_COMPLETE;
    uint64_t slot, traced = 0;
    memcpy(&n, arg, sizeof n);
    if (n.reserved)
        return 0;
    n.vcpu &= 0xFFFF;
    pthread_mutex_lock(&x->lock);
    if (!x->has_default || x->fd < 0 || n.vcpu >= x->vcpu_num || x->nfds != (int)x->vcpu_num)
        goto python;
    slot = x->page + ((uint64_t)n.vcpu << 8);
    if (hsm_remote_read(x->pid, slot + HSM_SLOT_POLLING, &polling, 4) != 4)
        goto python;
    if (x->trace) {  /* the answer, before the vCPU may free the slot */
        uint64_t value = 0;
        if (hsm_remote_read(x->pid, slot + HSM_SLOT_VALUE, &value, 8) != 8)
            goto python;
        traced = value;
    }
    if (hsm_remote_write(x->pid, slot + HSM_SLOT_STATE, &complete, 4) != 4)
        goto python;
    x->bitmap &= ~((uint64_t)1 << n.vcpu);
    x->notified++;
    if (x->trace)
        hsm_x_trace_rec(x, HSM_XT_NOTIFY, n.vcpu, NULL, traced, 0);
    hsm_x_completed(x, n.vcpu, polling);
    hsm_x_reply_later(x, unique);
    pthread_mutex_unlock(&x->lock);
    hsm_x_flush_out();
    return 1;
python:
    pthread_mutex_unlock(&x->lock);
    return 0;
}

/* An interrupted ATTACH this path holds: the driver's wait ignores signals, 0. */
static int hsm_x_interrupt(struct hsm_xvm *x, uint64_t unique)
{
    int found = 0;
    pthread_mutex_lock(&x->lock);
    for (uint32_t i = 0; i < x->nparked; i++) {
        if (x->parked[i] == unique) {
            x->parked[i] = x->parked[--x->nparked];
            hsm_x_reply(x, unique, 0);
            found = 1;
            break;
        }
    }
    pthread_mutex_unlock(&x->lock);
    return found;
}

static int hsm_x_prefilter_locked(struct hsm_express *e, const void *req, size_t len)
{
    const struct fuse_in_header *h = req;
    const unsigned char *body = (const unsigned char *)req + sizeof *h;
    struct fuse_ioctl_in in;
    if (len < sizeof *h)
        return 0;
    if (h->opcode == FUSE_INTERRUPT) {
        uint64_t unique;
        if (len < sizeof *h + sizeof unique)
            return 0;
        memcpy(&unique, body, sizeof unique);
        for (uint32_t k = 0; k < e->n; k++)
            if (hsm_x_interrupt(e->vms[k], unique))
                return 1;
        return 0;
    }
    if (h->opcode != FUSE_IOCTL || len < sizeof *h + sizeof in)
        return 0;
    memcpy(&in, body, sizeof in);
    if (in.flags & FUSE_IOCTL_COMPAT)
        return 0;
    if (in.cmd != ACRN_IOCTL_ATTACH_IOREQ_CLIENT && in.cmd != ACRN_IOCTL_NOTIFY_REQUEST_FINISH)
        return 0;
    for (uint32_t k = 0; k < e->n; k++) {
        struct hsm_xvm *x = e->vms[k];
        if (x->fh != in.fh)
            continue;
        if (in.cmd == ACRN_IOCTL_ATTACH_IOREQ_CLIENT)
            return hsm_x_attach(x, h->unique);
        if (in.in_size < sizeof(struct acrn_ioreq_notify) ||
            len < sizeof *h + sizeof in + sizeof(struct acrn_ioreq_notify))
            return 0;  /* CUSE's first call: Python asks for a retry */
        return hsm_x_notify(x, h->unique, body + sizeof in);
    }
    return 0;
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
