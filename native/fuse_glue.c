/* C side of cdev._fuse: fills the operation tables with the Python callbacks
 * and turns libfuse's printf-style log calls into one string each; receives
 * requests, in batches or in a thread of its own (fuse_glue.h). */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>
#include <sys/eventfd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <linux/fuse.h>
#include <fuse_lowlevel.h>
#include <cuse_lowlevel.h>

#include "fuse_glue.h"

/* The one place an ioctl enters Python (cdev_ll_ioctl, in fuse_glue.h). */
static void cdev_ioctl(fuse_req_t req, unsigned int cmd, void *arg, struct fuse_file_info *fi,
                       unsigned flags, const void *in_buf, size_t in_bufsz, size_t out_bufsz)
{
    const struct fuse_ctx *c = fuse_req_ctx(req);
    int64_t r = cdev_ll_ioctl(req, fi->fh, cmd, (uint64_t)(uintptr_t)arg, flags, (const char *)in_buf, in_bufsz,
                              out_bufsz, (uint32_t)c->uid, (uint32_t)c->gid, (int32_t)c->pid);
    if (r == CDEV_ANSWERED)
        return;
    if (r < 0)
        fuse_reply_err(req, r < -4095 ? EIO : (int)-r);
    else
        fuse_reply_ioctl(req, r > INT32_MAX ? INT32_MAX : (int)r, NULL, 0);
}

static void fuse_ioctl(fuse_req_t req, fuse_ino_t ino, unsigned int cmd, void *arg,
                       struct fuse_file_info *fi, unsigned flags, const void *in_buf,
                       size_t in_bufsz, size_t out_bufsz)
{
    (void)ino;
    cdev_ioctl(req, cmd, arg, fi, flags, in_buf, in_bufsz, out_bufsz);
}

struct fuse_lowlevel_ops *cdev_new_ops(void)
{
    struct fuse_lowlevel_ops *ops = calloc(1, sizeof(*ops));
    if (!ops)
        return NULL;
    ops->init = cdev_ll_init;
    ops->lookup = cdev_ll_lookup;
    ops->getattr = cdev_ll_getattr;
    ops->open = cdev_ll_open;
    ops->release = cdev_ll_release;
    ops->opendir = cdev_ll_opendir;
    ops->readdir = cdev_ll_readdir;
    ops->read = cdev_ll_read;
    ops->write = cdev_ll_write;
    ops->ioctl = fuse_ioctl;
    ops->poll = cdev_ll_poll;
    return ops;
}

/* CUSE passes ino 0 and the same argument lists otherwise. */
static void cuse_open(fuse_req_t req, struct fuse_file_info *fi) { cdev_ll_open(req, 0, fi); }
static void cuse_release(fuse_req_t req, struct fuse_file_info *fi) { cdev_ll_release(req, 0, fi); }
static void cuse_read(fuse_req_t req, size_t size, off_t off, struct fuse_file_info *fi)
{ cdev_ll_read(req, 0, size, off, fi); }
static void cuse_write(fuse_req_t req, const char *buf, size_t size, off_t off,
                       struct fuse_file_info *fi)
{ cdev_ll_write(req, 0, buf, size, off, fi); }
static void cuse_ioctl(fuse_req_t req, int cmd, void *arg, struct fuse_file_info *fi,
                       unsigned flags, const void *in_buf, size_t in_bufsz, size_t out_bufsz)
{ cdev_ioctl(req, (unsigned int)cmd, arg, fi, flags, in_buf, in_bufsz, out_bufsz); }
static void cuse_poll(fuse_req_t req, struct fuse_file_info *fi, struct fuse_pollhandle *ph)
{ cdev_ll_poll(req, 0, fi, ph); }

struct cuse_lowlevel_ops *cdev_new_cuse_ops(void)
{
    struct cuse_lowlevel_ops *ops = calloc(1, sizeof(*ops));
    if (!ops)
        return NULL;
    ops->init_done = cdev_cuse_init_done;
    ops->open = cuse_open;
    ops->release = cuse_release;
    ops->read = cuse_read;
    ops->write = cuse_write;
    ops->ioctl = cuse_ioctl;
    ops->poll = cuse_poll;
    return ops;
}

size_t cdev_ops_size(void) { return sizeof(struct fuse_lowlevel_ops); }

static void cdev_log_trampoline(enum fuse_log_level level, const char *fmt, va_list ap)
{
    char buf[1024];
    vsnprintf(buf, sizeof(buf), fmt, ap);
    size_t n = strlen(buf);
    while (n && buf[n - 1] == '\n')
        buf[--n] = '\0';
    cdev_log((int)level, buf);
}

void cdev_install_log(void) { fuse_set_log_func(cdev_log_trampoline); }

void cdev_req_interrupt_func(fuse_req_t req, void *data)
{
    fuse_req_interrupt_func(req, cdev_interrupt, data);
}

void cdev_fi_setup(struct fuse_file_info *fi, int direct_io, int nonseekable)
{
    fi->direct_io = direct_io ? 1 : 0;
    fi->nonseekable = nonseekable ? 1 : 0;
    /* A character device has no flush: close(2) costs no round trip, and on a dead
       server's node it cannot fail with ENOTCONN (FOPEN_NOFLUSH, Linux 5.10+). */
    fi->noflush = 1;
}

/* Whether the prefilter (if any) took the request just read into buf. */
static int cdev_prefiltered(cdev_prefilter_fn pf, void *ctx, int fd, const struct fuse_buf *buf,
                            int res)
{
    return pf && !(buf->flags & FUSE_BUF_IS_FD) && pf(ctx, fd, buf->mem, (size_t)res);
}

static uint64_t cdev_now_ns(void);
static void cdev_adapt(uint64_t *window_ns, uint64_t max_ns, uint64_t gap_ns);

/* Whether `fd` (the device's other work: an upcall eventfd) is readable now. */
static int cdev_other_ready(int fd)
{
    struct pollfd p = { fd, POLLIN, 0 };
    return fd >= 0 && poll(&p, 1, 0) > 0;
}

/* The polling both readers of the caller's thread share (cdev_receive_poll,
 * cdev_rx_process). At the start of a call, the gap since the last request
 * before the previous call returned adapts the window (cdev_adapt, below). */
static void cdev_poll_begin(struct cdev_poll *pl)
{
    if (pl && pl->answered_at && pl->max_ns) {
        cdev_adapt(&pl->window_ns, pl->max_ns, cdev_now_ns() - pl->answered_at);
        pl->answered_at = 0;
    }
}

/* After a request: until when to keep looking for the next one (0: not at all);
 * `last` is when that request was done. */
static uint64_t cdev_poll_after(const struct cdev_poll *pl, uint64_t *last)
{
    if (!pl || !pl->max_ns)
        return 0;
    *last = cdev_now_ns();
    return pl->window_ns ? *last + pl->window_ns : 0;
}

/* Nothing there yet: 1 to look again (after yielding the CPU, behind anything
 * else runnable here), 0 to stop (the window ran out, counted as a miss, or the
 * device has other work for this thread). */
static int cdev_poll_turn(struct cdev_poll *pl, uint64_t poll_until)
{
    uint64_t now = cdev_now_ns();
    if (now < poll_until && !cdev_other_ready(pl->also_fd)) {
        sched_yield();
        return 1;
    }
    if (now >= poll_until)
        pl->misses++;
    return 0;
}

/* Receive up to `batch` requests and process each, for the reader in the
 * caller's (trio) thread. A device may offer a prefilter: a C function that
 * sees every raw request first (fuse_in_header and body, as read from the
 * kernel) and returns nonzero if it answered or kept it, writing its replies to
 * `fd` itself; libfuse and Python never see those.
 *
 * After a request the thread keeps reading for pl->window_ns (pl->max_ns 0:
 * never), so that a client's next call, made as soon as it has its answer, does
 * not pay for a trip through the event loop and a wake-up; the poll ends early
 * when pl->also_fd becomes readable. The cffi call releases the GIL meanwhile.
 * Returns 1 when the batch was used up (or the device has other work), else
 * what fuse_session_receive_buf returned (0: session ended or request aborted;
 * -errno). */
int cdev_receive_poll(struct fuse_session *se, struct fuse_buf *buf, int batch,
                      void *prefilter, void *ctx, struct cdev_poll *pl)
{
    cdev_prefilter_fn pf = (cdev_prefilter_fn)prefilter;
    int fd = fuse_session_fd(se);
    uint64_t last = 0, poll_until = 0;
    int polled = 0;
    cdev_poll_begin(pl);
    for (int i = 0; i < batch;) {
        int res = fuse_session_receive_buf(se, buf);
        if (res == -EAGAIN && poll_until && cdev_poll_turn(pl, poll_until)) {
            polled = 1;
            continue;
        }
        if (res <= 0) {
            if (res == -EAGAIN && last)
                pl->answered_at = last;  /* the gap to the next request adapts the window */
            return res;
        }
        if (polled) {
            pl->hits++;
            polled = 0;
        }
        if (!cdev_prefiltered(pf, ctx, fd, buf, res))
            fuse_session_process_buf(se, buf);
        i++;
        if ((i & 15) == 0 && cdev_other_ready(pl->also_fd))
            return 1;  /* the device has other work for this thread: let it run */
        poll_until = cdev_poll_after(pl, &last);
    }
    return 1;
}

/* The native receiver: a thread that reads the session's requests and gives
 * each to the prefilter first, so that what the prefilter answers never waits
 * for the trio thread. What it leaves is queued for the trio thread (which
 * processes it with libfuse, in order, from cdev_rx_process) and announced on
 * notify_fd. While it runs, the trio thread waits on notify_fd instead of the
 * session fd: every request then has one reader. */
struct cdev_rx_item { struct cdev_rx_item *next; size_t size; char mem[]; };

static void cdev_rx_post(struct cdev_rx *rx, struct cdev_rx_item *item, int end)
{
    uint64_t one = 1;
    pthread_mutex_lock(&rx->lock);
    if (item) {
        item->next = NULL;
        *rx->tail = item;
        rx->tail = &item->next;
        rx->forwarded++;
    }
    if (end)
        __atomic_store_n(&rx->ended, 1, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&rx->lock);
    if (write(rx->notify_fd, &one, sizeof one) < 0) { /* a full counter is still readable */ }
}

static uint64_t cdev_now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

/* Adaptive polling, as KVM's halt polling adapts halt_poll_ns. After the
 * prefilter answers a request, the thread keeps reading for poll_window_ns
 * before it sleeps: on a machine where waking a thread on an idle CPU costs
 * tens of microseconds (a VM guest: 40 us measured), the client's next call
 * (the ATTACH after a NOTIFY) then finds this thread awake. The window follows
 * the traffic: when the thread slept and the next request still came within
 * poll_max_ns of the answer, polling would have caught it, so the window grows
 * (from 10 us, doubling, up to poll_max_ns); when it came later (as it must
 * when a window at the bound ran out), the window halves (below 10 us it is
 * 0). The gap is measured at the wake-up, so it includes the wake-up. A device with
 * sparse traffic so never polls, and steady traffic polls no longer than the
 * gaps it has (under CUSE an exchange is never quite sparse: a NOTIFY's retry is
 * answered here and its second call follows at once, which the window is for). KVM polls only while nothing else is runnable on its CPU
 * (single_task_running()); a thread cannot see that, so at each turn it yields
 * instead: a thread that shares its CPU (the client, when both are placed on
 * one) runs before the next read. */
#define CDEV_POLL_GROW_START_NS 10000u

static void cdev_adapt(uint64_t *window_ns, uint64_t max_ns, uint64_t gap_ns)
{
    uint64_t w = __atomic_load_n(window_ns, __ATOMIC_RELAXED);
    if (gap_ns <= max_ns && w < max_ns) {
        w = w ? w * 2 : CDEV_POLL_GROW_START_NS;
        if (w > max_ns)
            w = max_ns;
    } else if (gap_ns > max_ns) {
        w /= 2;
        if (w < CDEV_POLL_GROW_START_NS)
            w = 0;
    }
    __atomic_store_n(window_ns, w, __ATOMIC_RELAXED);
}

static void cdev_rx_adapt(struct cdev_rx *rx, uint64_t gap_ns)
{
    cdev_adapt(&rx->poll_window_ns, rx->poll_max_ns, gap_ns);
}

/* The thread: wait for requests (or the stop), then read until EAGAIN, polling
 * after a prefilter answer as above. */
static void *cdev_rx_main(void *arg)
{
    struct cdev_rx *rx = arg;
    struct fuse_buf buf = { 0 };
    struct pollfd p[2] = { { rx->fd, POLLIN, 0 }, { rx->stop_fd, POLLIN, 0 } };
    uint64_t answered_at = 0;   /* the prefilter's last answer before a sleep, 0: none */
    /* cdev_rx_adapt runs at each wake-up that follows an answer */
    for (;;) {
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (p[1].revents)
            break;
        if (answered_at && rx->poll_max_ns) {
            cdev_rx_adapt(rx, cdev_now_ns() - answered_at);
            answered_at = 0;
        }
        uint64_t poll_until = 0;
        int polled = 0;
        for (;;) {
            int res = fuse_session_receive_buf(rx->se, &buf);
            if (res == -EAGAIN && poll_until) {
                if (cdev_now_ns() < poll_until) {
                    polled = 1;
                    sched_yield();  /* polling, behind anything else runnable here */
                    continue;
                }
                __atomic_add_fetch(&rx->poll_misses, 1, __ATOMIC_RELAXED);
            }
            if (res == -EAGAIN || res == -EINTR)
                break;
            if (res == 0 && !fuse_session_exited(rx->se))
                break;  /* an aborted request */
            if (res <= 0) {
                cdev_rx_post(rx, NULL, 1);  /* unmounted, or the fd failed */
                goto out;
            }
            if (polled) {
                __atomic_add_fetch(&rx->poll_hits, 1, __ATOMIC_RELAXED);
                polled = 0;
            }
            if (cdev_prefiltered(rx->pf, rx->ctx, rx->fd, &buf, res)) {
                uint64_t window = __atomic_load_n(&rx->poll_window_ns, __ATOMIC_RELAXED);
                rx->taken++;
                answered_at = cdev_now_ns();
                poll_until = window ? answered_at + window : 0;
                continue;
            }
            answered_at = 0;  /* the next request is not a reply to our answer */
            poll_until = 0;
            {
                struct cdev_rx_item *item = malloc(sizeof *item + (size_t)res);
                if (!item)
                    continue;  /* no memory: the caller waits until it gives up */
                item->size = (size_t)res;
                memcpy(item->mem, buf.mem, (size_t)res);
                cdev_rx_post(rx, item, 0);
            }
        }
    }
out:
    free(buf.mem);
    return NULL;
}

struct cdev_rx *cdev_rx_start(struct fuse_session *se, void *prefilter, void *ctx,
                              uint64_t poll_max_ns)
{
    struct cdev_rx *rx = calloc(1, sizeof *rx);
    if (!rx)
        return NULL;
    rx->se = se;
    rx->fd = fuse_session_fd(se);
    rx->pf = (cdev_prefilter_fn)prefilter;
    rx->ctx = ctx;
    rx->poll_max_ns = poll_max_ns;
    rx->tail = &rx->head;
    pthread_mutex_init(&rx->lock, NULL);
    rx->notify_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    rx->stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (rx->notify_fd < 0 || rx->stop_fd < 0 || pthread_create(&rx->thread, NULL, cdev_rx_main, rx)) {
        if (rx->notify_fd >= 0)
            close(rx->notify_fd);
        if (rx->stop_fd >= 0)
            close(rx->stop_fd);
        free(rx);
        return NULL;
    }
    pthread_setname_np(rx->thread, "cdev-rx");  /* for top -H, perf, taskset */
    return rx;
}

/* Ends the thread (it finishes the request in hand, queueing it if it is not
 * the prefilter's). The queue stays for cdev_rx_process. */
void cdev_rx_stop(struct cdev_rx *rx)
{
    uint64_t one = 1;
    if (write(rx->stop_fd, &one, sizeof one) < 0) { /* cannot fail on a fresh eventfd */ }
    pthread_join(rx->thread, NULL);
}

/* Processes up to `batch` queued requests with libfuse (in the caller's thread).
 * When it emptied the queue and `pl` (NULL: never) has a window open, it keeps
 * looking at the queue for that window, as cdev_receive_poll does at the node:
 * a request the native reader forwards right after (a range client's NOTIFY
 * after its ATTACH was answered) then needs no wake-up of this thread.
 * Returns how many, or -1 once the queue is empty and the session has ended. */
int cdev_rx_process(struct fuse_session *se, struct cdev_rx *rx, int batch, struct cdev_poll *pl)
{
    uint64_t n, last = 0, poll_until = 0;
    int done = 0, polled = 0;
    if (read(rx->notify_fd, &n, sizeof n) < 0) { /* EAGAIN: nothing new announced */ }
    cdev_poll_begin(pl);
    while (done < batch) {
        struct cdev_rx_item *item;
        pthread_mutex_lock(&rx->lock);
        item = rx->head;
        if (item) {
            rx->head = item->next;
            if (!rx->head)
                rx->tail = &rx->head;
        }
        pthread_mutex_unlock(&rx->lock);
        if (!item) {
            if (poll_until && !__atomic_load_n(&rx->ended, __ATOMIC_ACQUIRE) && cdev_poll_turn(pl, poll_until)) {
                polled = 1;
                continue;
            }
            if (pl && last)
                pl->answered_at = last;
            break;
        }
        if (polled) {
            pl->hits++;
            polled = 0;
        }
        {
            struct fuse_buf buf = { .size = item->size, .flags = 0, .mem = item->mem, .fd = -1, .pos = 0 };
            fuse_session_process_buf(se, &buf);
        }
        free(item);
        done++;
        poll_until = cdev_poll_after(pl, &last);
    }
    if (done == batch) {  /* more may be queued: look again after the next checkpoint */
        uint64_t one = 1;
        if (write(rx->notify_fd, &one, sizeof one) < 0) { }
        return done;
    }
    return __atomic_load_n(&rx->ended, __ATOMIC_ACQUIRE) ? -1 : done;
}

/* After cdev_rx_stop: answers what is still queued with -err (none if 0). */
void cdev_rx_free(struct cdev_rx *rx, int err)
{
    struct cdev_rx_item *item = rx->head;
    while (item) {
        struct cdev_rx_item *next = item->next;
        const struct fuse_in_header *h = (const void *)item->mem;
        if (err && item->size >= sizeof *h && h->opcode != FUSE_FORGET &&
            h->opcode != FUSE_BATCH_FORGET && h->opcode != FUSE_INTERRUPT) {
            struct fuse_out_header o = { sizeof o, -err, h->unique };
            if (write(rx->fd, &o, sizeof o) < 0) { /* the caller is gone */ }
        }
        free(item);
        item = next;
    }
    close(rx->notify_fd);
    close(rx->stop_fd);
    pthread_mutex_destroy(&rx->lock);
    free(rx);
}
