/* The vCPU request cycle (vcpu_cycle.h). */
#include <errno.h>
#include <limits.h>
#include <sched.h>
#include <string.h>
#include <unistd.h>
#include <linux/futex.h>
#include <sys/syscall.h>

#include "remote_memory.h"
#include "vcpu_cycle.h"

void hsm_gate_init(struct hsm_gate *g)
{
    pthread_mutex_init(&g->lock, NULL);
    g->open = 0;
}

void hsm_gate_set(struct hsm_gate *g, int open)
{
    pthread_mutex_lock(&g->lock);
    g->open = open;
    pthread_mutex_unlock(&g->lock);
}

void hsm_vcpu_wake(struct hsm_vcpu_wait *w)
{
    /* Sequentially consistent both sides: either this sees the waiter's
       sleeping = 1 and wakes it, or the waiter's FUTEX_WAIT sees the new
       count and does not sleep. */
    __atomic_add_fetch(&w->wakes, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&w->sleeping, __ATOMIC_SEQ_CST))
        syscall(SYS_futex, &w->wakes, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

void hsm_vcpu_abandon(struct hsm_vcpu_wait *w, int stop)
{
    if (stop)
        __atomic_store_n(&w->stopped, 1, __ATOMIC_RELEASE);
    __atomic_add_fetch(&w->gen, 1, __ATOMIC_ACQ_REL);
    hsm_vcpu_wake(w);
}

/* Sleep until a wake after `seen` or for ms: 0 woken (or spurious), 1 timed out. */
static int hsm_vcpu_sleep(struct hsm_vcpu_wait *w, uint32_t seen, int ms)
{
    struct timespec t = { ms / 1000, (long)(ms % 1000) * 1000000L };
    long rc;
    __atomic_store_n(&w->sleeping, 1, __ATOMIC_SEQ_CST);
    rc = syscall(SYS_futex, &w->wakes, FUTEX_WAIT_PRIVATE, seen, &t, NULL, 0);
    __atomic_store_n(&w->sleeping, 0, __ATOMIC_RELAXED);
    return rc < 0 && errno == ETIMEDOUT;
}

int hsm_vcpu_finish(struct hsm_vcpu_wait *w, int pid, uint64_t slot, uint64_t value,
                    size_t store_len)
{
    const uint32_t free_ = HSM_STATE_FREE;
    uint32_t armed = HSM_MAIL_ARMED;
    ssize_t r;
    if (store_len > sizeof value || w->pid != pid || w->slot != slot ||
        !__atomic_compare_exchange_n(&w->mail, &armed, HSM_MAIL_CLAIMED, 0,
                                     __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        return 0;
    r = hsm_remote_write2(pid, slot + HSM_SLOT_VALUE, &value, store_len,  /* store_len may be 0 */
                          slot + HSM_SLOT_STATE, &free_, sizeof free_);
    if (r != (ssize_t)(store_len + sizeof free_)) {
        int err = (r < 0 && errno) ? -errno : -EFAULT;
        __atomic_store_n(&w->mail, HSM_MAIL_ARMED, __ATOMIC_RELEASE);
        return err;
    }
    w->handed = value;
    w->handoffs++;
    __atomic_store_n(&w->mail, HSM_MAIL_HANDED, __ATOMIC_RELEASE);
    return 1;
}

/* The wait is over (any way): disarm w->mail. 1 if a notifier handed the
   completion over (the slot is FREE, the value in w->handed). */
static int hsm_mail_take(struct hsm_vcpu_wait *w)
{
    uint32_t m = HSM_MAIL_ARMED;
    if (__atomic_compare_exchange_n(&w->mail, &m, HSM_MAIL_IDLE, 0,
                                    __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        return 0;
    while (m == HSM_MAIL_CLAIMED) {  /* between its claim and its store */
        sched_yield();
        m = __atomic_load_n(&w->mail, __ATOMIC_ACQUIRE);
    }
    __atomic_store_n(&w->mail, HSM_MAIL_IDLE, __ATOMIC_RELAXED);
    return m == HSM_MAIL_HANDED;
}

static int hsm_sc_fault(struct hsm_vcpu_wait *w, int stage, ssize_t n)
{
    int err = (n < 0 && errno) ? -errno : -EFAULT;  /* short transfer: unmapped part */
    hsm_mail_take(w);
    w->stage = stage;
    w->waiting = 0;
    return err;
}

int hsm_slot_cycle(struct hsm_vcpu_wait *w, struct hsm_gate *g, int upcall_fd,
                   struct hsm_native_upcall *up, size_t value_len, uint64_t *value)
{
    unsigned char *head = w->head;
    const size_t head_len = HSM_HEAD_LEN;
    const uint32_t pending = HSM_STATE_PENDING, free_ = HSM_STATE_FREE;
    unsigned char done[HSM_SLOT_STATE + 4 - HSM_SLOT_VALUE];
    uint64_t n;
    uint32_t state;
    ssize_t r = 0;
    unsigned gen;
    uint32_t seen;
    int posted, handed = 0;
    uint64_t spin_until;

    /* Wakes count from here, before anyone can see the request: the wait
       below looks at the mail, the generation and the state word after each
       one, and only a completion ends it. */
    seen = __atomic_load_n(&w->wakes, __ATOMIC_SEQ_CST);
    gen = __atomic_load_n(&w->gen, __ATOMIC_ACQUIRE);
    pthread_mutex_lock(&g->lock);
    if (!g->open || __atomic_load_n(&w->stopped, __ATOMIC_ACQUIRE)) {
        pthread_mutex_unlock(&g->lock);
        return HSM_SC_CLOSED;
    }
    __atomic_store_n(&w->mail, HSM_MAIL_ARMED, __ATOMIC_RELEASE);  /* before anyone sees it */
    posted = up ? up->post(up, w->pid, w->slot, head) : 0;
    if (posted == 0)
        r = hsm_remote_write2(w->pid, w->slot, head, head_len,
                              w->slot + HSM_SLOT_STATE, &pending, sizeof pending);
    pthread_mutex_unlock(&g->lock);
    if (up)
        up->flush(up);
    if (posted < 0) {
        errno = -posted;
        return hsm_sc_fault(w, HSM_SC_POST, -1);
    }
    if (posted)
        upcall_fd = -1;  /* the upcall dispatched it already */
    else if (r != (ssize_t)(head_len + sizeof pending))
        return hsm_sc_fault(w, HSM_SC_POST, r);
    w->requests++;
    if (upcall_fd >= 0) {
        n = 1;
        if (write(upcall_fd, &n, sizeof n) < 0) { /* a full counter: a pass is due anyway */ }
    }
    w->waiting = 1;
    spin_until = w->spin_ns ? hsm_now_ns() + w->spin_ns : 0;
    for (;;) {
        uint32_t now = __atomic_load_n(&w->wakes, __ATOMIC_SEQ_CST);
        if (now == seen) {  /* nothing new */
            if (spin_until) {
                /* a vCPU with a CPU of its own: look for the completion
                   before sleeping, behind anything else runnable there */
                if (hsm_now_ns() < spin_until) {
                    sched_yield();
                    continue;
                }
                spin_until = 0;
            }
            if (hsm_vcpu_sleep(w, seen, w->probe_ms)) {
                /* no wake for a while: is the page still there? */
                r = hsm_remote_read(w->pid, w->slot + HSM_SLOT_STATE, &state, sizeof state);
                if (r != sizeof state)
                    return hsm_sc_fault(w, HSM_SC_PROBE, r);
            }
            continue;  /* woken, a signal (a kick's), or spurious: look */
        }
        seen = now;
        if (spin_until)
            w->spin_hits++;
        if (__atomic_load_n(&w->mail, __ATOMIC_ACQUIRE) == HSM_MAIL_HANDED) {
            handed = hsm_mail_take(w);
            break;
        }
        if (__atomic_load_n(&w->gen, __ATOMIC_ACQUIRE) != gen) {
            hsm_mail_take(w);  /* a completion handed over now is dropped, as below */
            w->waiting = 0;
            return HSM_SC_ABANDONED;
        }
        r = hsm_remote_read(w->pid, w->slot + HSM_SLOT_VALUE, done, sizeof done);
        if (r != sizeof done)
            return hsm_sc_fault(w, HSM_SC_READ, r);
        memcpy(&state, done + sizeof done - sizeof state, sizeof state);
        if (state == HSM_STATE_COMPLETE) {
            handed = hsm_mail_take(w);  /* a notifier may have claimed it meanwhile */
            break;
        }
    }
    w->waiting = 0;
    if (handed)  /* the slot is FREE already */
        memcpy(done, &w->handed, sizeof w->handed);
    if (value_len) {
        memcpy(head + HSM_SLOT_VALUE, done, value_len);
        memcpy(value, done, sizeof *value);
    }
    if (handed)
        return HSM_SC_DONE;
    r = hsm_remote_write(w->pid, w->slot + HSM_SLOT_STATE, &free_, sizeof free_);
    if (r != sizeof free_)
        return hsm_sc_fault(w, HSM_SC_FREE, r);
    return HSM_SC_DONE;
}
