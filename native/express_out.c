/* Replies and wake-ups taken under a VM's lock and written after it is
   released (a thread's own record, so no lock): a thread woken on this CPU
   would otherwise preempt the writer inside its lock and block on it. While
   a record is set, x->busy counts it, and hsm_x_close waits for that before
   the fds go. Also the raw FUSE replies the express path writes. */
#include <string.h>
#include <unistd.h>
#include <linux/fuse.h>

#include "express_internal.h"

#define HSM_X_OUT_MAX 8
struct hsm_x_out {
    struct hsm_xvm *x;    /* NULL: nothing put off */
    int fd;
    uint32_t n;
    uint64_t unique[HSM_X_OUT_MAX];
    int wake_fd;          /* a vCPU's completion eventfd, or -1 */
    struct hsm_vcpu_wait *wake_w;  /* a vCPU's native wait, or NULL */
};
static __thread struct hsm_x_out hsm_x_out;

/* A reply to an ioctl the kernel sent us: 0 with no data, or -errno. */
static void hsm_reply_on(int fd, uint64_t unique, int err)
{
    struct { struct fuse_out_header h; struct fuse_ioctl_out o; } r;
    memset(&r, 0, sizeof r);
    r.h.unique = unique;
    r.h.error = err;
    r.h.len = err ? sizeof r.h : sizeof r;
    if (fd >= 0 && write(fd, &r, r.h.len) < 0) {
        /* ENOENT: the caller is gone (interrupted, killed); nothing to do */
    }
}

void hsm_x_reply(const struct hsm_xvm *x, uint64_t unique, int err)
{
    hsm_reply_on(x->fd, unique, err);
}

void hsm_x_reply_data(const struct hsm_xvm *x, uint64_t unique, const void *data, uint32_t len)
{
    struct { struct fuse_out_header h; struct fuse_ioctl_out o; unsigned char d[64]; } r;
    if (len > sizeof r.d)
        len = sizeof r.d;
    memset(&r, 0, sizeof r);
    r.h.len = (uint32_t)(sizeof r.h + sizeof r.o) + len;
    r.h.unique = unique;
    memcpy(r.d, data, len);
    if (x->fd >= 0 && write(x->fd, &r, r.h.len) < 0) {
        /* ENOENT: the caller is gone (interrupted, killed); nothing to do */
    }
}

void hsm_x_reply_retry(const struct hsm_xvm *x, uint64_t unique, uint64_t arg, uint64_t in_len)
{
    struct { struct fuse_out_header h; struct fuse_ioctl_out o; struct fuse_ioctl_iovec in; } r;
    memset(&r, 0, sizeof r);
    r.h.len = sizeof r;
    r.h.unique = unique;
    r.o.flags = FUSE_IOCTL_RETRY;
    r.o.in_iovs = 1;
    r.in.base = arg;
    r.in.len = in_len;
    if (x->fd >= 0 && write(x->fd, &r, sizeof r) < 0) {
        /* ENOENT: the caller is gone (interrupted, killed); nothing to do */
    }
}

/* Locked: this thread's hsm_x_out, for x (one VM per flush). NULL when x
   is closed or the out is taken by another VM (then write under the lock). */
static struct hsm_x_out *hsm_x_defer(struct hsm_xvm *x)
{
    struct hsm_x_out *o = &hsm_x_out;
    if (x->fd < 0 || (o->x && o->x != x))
        return NULL;
    if (!o->x) {
        o->x = x;
        o->fd = x->fd;
        o->n = 0;
        o->wake_fd = -1;
        o->wake_w = NULL;
        __atomic_add_fetch(&x->busy, 1, __ATOMIC_ACQ_REL);
    }
    return o;
}

void hsm_x_reply_later(struct hsm_xvm *x, uint64_t unique)
{
    struct hsm_x_out *o = hsm_x_defer(x);
    if (!o || o->n >= HSM_X_OUT_MAX) {
        hsm_x_reply(x, unique, 0);
        return;
    }
    o->unique[o->n++] = unique;
}

void hsm_x_flush_out(void)
{
    struct hsm_x_out *o = &hsm_x_out;
    struct hsm_xvm *x = o->x;
    uint64_t one = 1;
    if (!x)
        return;
    if (o->wake_fd >= 0 && write(o->wake_fd, &one, sizeof one) < 0) { /* a full counter wakes */ }
    if (o->wake_w)
        hsm_vcpu_wake(o->wake_w);
    for (uint32_t i = 0; i < o->n; i++)
        hsm_reply_on(o->fd, o->unique[i], 0);
    o->x = NULL;
    __atomic_sub_fetch(&x->busy, 1, __ATOMIC_ACQ_REL);
}

void hsm_x_answer_waiters(struct hsm_xvm *x, uint64_t *parked, uint32_t *n, int err)
{
    for (uint32_t i = 0; i < *n; i++)
        hsm_x_reply(x, parked[i], err);
    *n = 0;
}

void hsm_x_answer_parked(struct hsm_xvm *x, int err)
{
    hsm_x_answer_waiters(x, x->parked, &x->nparked, err);
}

/* The wake-up is put off until the lock is released where it can be. */
void hsm_x_completed(struct hsm_xvm *x, uint64_t i, uint32_t polling, int handed)
{
    struct hsm_x_out *o;
    struct hsm_vcpu_wait *w = x->waits[i];
    int fd = handed ? -1 : x->wake_fds[i];
    uint64_t one = 1;
    if (polling)
        return;
    o = hsm_x_defer(x);
    if (o && o->wake_fd < 0 && !o->wake_w) {
        o->wake_fd = fd;
        o->wake_w = w;
        return;
    }
    if (fd >= 0 && write(fd, &one, sizeof one) < 0) { /* a full counter wakes anyway */ }
    if (w)
        hsm_vcpu_wake(w);
}
