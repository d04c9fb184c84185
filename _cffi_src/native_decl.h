/* The surface acrn_hsm_emu._native binds (cffi cdef); the C is in native/
 * (hsm_native.h includes what this names). Layouts are partial ("...;")
 * where Python needs only some fields: the compiler fills in the rest. */

struct iovec { void *iov_base; size_t iov_len; };
ssize_t process_vm_readv(int pid, const struct iovec *local_iov,
                         unsigned long liovcnt, const struct iovec *remote_iov,
                         unsigned long riovcnt, unsigned long flags);
ssize_t process_vm_writev(int pid, const struct iovec *local_iov,
                          unsigned long liovcnt, const struct iovec *remote_iov,
                          unsigned long riovcnt, unsigned long flags);
int hsm_pidfd_open(int pid, unsigned int flags);
int hsm_pidfd_getfd(int pidfd, int targetfd, unsigned int flags);
int hsm_kcmp_file(int pid1, int pid2, int fd1, int fd2);

/* Remote copies with the iovecs built in C (hot path). */
ssize_t hsm_remote_read(int pid, uint64_t addr, void *buf, size_t len);
ssize_t hsm_remote_write(int pid, uint64_t addr, const void *buf, size_t len);
ssize_t hsm_remote_write2(int pid, uint64_t addr1, const void *buf1, size_t len1,
                          uint64_t addr2, const void *buf2, size_t len2);

/* The vCPU request cycle (native/vcpu_cycle.h). */
#define HSM_SLOT_POLLING ...
#define HSM_SLOT_DIRECTION ...
#define HSM_SLOT_ADDRESS ...
#define HSM_SLOT_SIZE ...
#define HSM_SLOT_VALUE ...
#define HSM_SLOT_KH ...
#define HSM_SLOT_STATE ...
#define HSM_HEAD_LEN ...
#define HSM_STATE_PENDING ...
#define HSM_STATE_COMPLETE ...
#define HSM_STATE_FREE ...
#define HSM_SC_DONE ...
#define HSM_SC_CLOSED ...
#define HSM_SC_ABANDONED ...
#define HSM_SC_POST ...
#define HSM_SC_PROBE ...
#define HSM_SC_READ ...
#define HSM_SC_FREE ...
struct hsm_gate { ...; };
struct hsm_ring { uint64_t *buf; uint64_t size; uint64_t n; };
struct hsm_vcpu_wait {
    int pid;
    uint64_t slot;
    int probe_ms;
    uint64_t spin_ns;
    int stage;
    int waiting;
    uint64_t requests;
    uint64_t accesses;
    uint64_t spin_hits;
    unsigned char *head;
    struct hsm_ring *ring;
    uint32_t mail;
    uint64_t handed;
    uint64_t handoffs;
    uint32_t wakes;
    ...;
};
void hsm_gate_init(struct hsm_gate *g);
void hsm_gate_set(struct hsm_gate *g, int open);
void hsm_vcpu_abandon(struct hsm_vcpu_wait *w, int stop);
void hsm_vcpu_wake(struct hsm_vcpu_wait *w);
struct hsm_native_upcall { ...; };
int hsm_slot_cycle(struct hsm_vcpu_wait *w, struct hsm_gate *g, int upcall_fd,
                   struct hsm_native_upcall *up, size_t value_len, uint64_t *value);
#define HSM_MAIL_IDLE ...
#define HSM_MAIL_ARMED ...
#define HSM_MAIL_CLAIMED ...
#define HSM_MAIL_HANDED ...
int hsm_vcpu_finish(struct hsm_vcpu_wait *w, int pid, uint64_t slot, uint64_t value,
                    size_t store_len);

/* The HSM's express path (native/express.h, hsm/express.py). */
#define HSM_X_PARKED_MAX ...
#define HSM_X_VMS_MAX ...
#define HSM_X_CLIENTS_MAX ...
struct hsm_xrange { uint32_t type; uint64_t start; uint64_t end; uint32_t handler;
                    uint32_t client; };
#define HSM_XRANGE_OTHER ...
#define HSM_XRANGE_IOEVENTFD ...
#define HSM_XRANGE_CLIENT ...
#define HSM_X_HELD ...
struct hsm_xclient {
    int live;
    int pid;
    uint64_t fh;
    uint64_t page;
    uint64_t bitmap;
    uint64_t dispatched;
    uint64_t served;
    uint32_t nparked;
    ...;
};
struct hsm_xioeventfd { uint32_t type; uint32_t length; uint64_t addr; uint64_t data;
                        int wildcard; int fd; };
#define HSM_XT_DEFAULT ...
#define HSM_XT_IOEVENTFD ...
#define HSM_XT_NOTIFY ...
#define HSM_XT_ATTACH ...
#define HSM_XT_RANGE ...
#define HSM_XT_RNOTIFY ...
struct hsm_xtrace_rec { uint64_t t_ns; uint64_t addr; uint64_t size; uint64_t value;
                        uint32_t kind; uint32_t vcpu; uint32_t type; uint32_t dir;
                        int32_t result; uint32_t client; };
struct hsm_xtrace { uint64_t head; uint64_t tail; uint64_t lost; uint32_t size;
                    struct hsm_xtrace_rec *buf; };
struct hsm_xvm {
    int fd;
    uint64_t fh;
    int pid;
    uint64_t page;
    uint32_t vcpu_num;
    int has_default;
    int dispatch;
    int nfds;
    uint32_t nparked;
    uint64_t pio;
    uint64_t mmio;
    uint64_t defaults;
    uint64_t notified;
    uint64_t attaches;
    uint64_t refused;
    uint64_t in_kernel;
    int alert_fd;
    struct hsm_xtrace *trace;
    uint64_t remote;
    uint64_t handed;
    struct hsm_xclient clients[8];
    uint64_t msis;
    uint64_t irqlines;
    ...;
};
void hsm_x_set_irq(struct hsm_xvm *x, struct hsm_irq_gate *g);
void hsm_x_set_trace(struct hsm_xvm *x, struct hsm_xtrace *t);
uint32_t hsm_x_trace_drain(struct hsm_xvm *x, struct hsm_xtrace_rec *out, uint32_t max,
                           uint64_t *lost);
void hsm_x_set_ioeventfds(struct hsm_xvm *x, const struct hsm_xioeventfd *p, uint32_t n);
struct hsm_express { uint32_t n; ...; };
void hsm_x_table_init(struct hsm_express *e);
int hsm_x_register(struct hsm_express *e, struct hsm_xvm *x);
void hsm_x_unregister(struct hsm_express *e, struct hsm_xvm *x);
void hsm_x_init(struct hsm_xvm *x, int fd, uint64_t fh, int pid, uint64_t page,
                uint32_t vcpu_num);
int hsm_x_set_wake_fds(struct hsm_xvm *x, const int *fds, struct hsm_vcpu_wait *const *waits, int n);
void hsm_x_lock(struct hsm_xvm *x);
void hsm_x_unlock(struct hsm_xvm *x);
uint64_t hsm_x_bits(struct hsm_xvm *x, uint64_t set, uint64_t clear);
void hsm_x_wake(struct hsm_xvm *x);
void hsm_x_set_default(struct hsm_xvm *x, int on);
void hsm_x_configure(struct hsm_xvm *x, int dispatch, const struct hsm_xrange *ranges,
                     uint32_t n);
int hsm_x_client_add(struct hsm_xvm *x, uint64_t fh, int pid, uint64_t page);
void hsm_x_client_remove(struct hsm_xvm *x, uint32_t k, int err);
uint64_t hsm_x_client_bits(struct hsm_xvm *x, uint32_t k, uint64_t set, uint64_t clear);
uint32_t hsm_x_client_held(struct hsm_xvm *x, uint32_t k, uint32_t vcpu, uint32_t v);
void hsm_x_client_wake(struct hsm_xvm *x, uint32_t k);
void hsm_x_close(struct hsm_xvm *x);
int hsm_x_prefilter(void *ctx, int fd, const void *req, size_t len);
int hsm_x_post(struct hsm_xvm *x, int pid, uint64_t slot, const unsigned char *head);

/* The KVM vCPU loop's fast path (native/kvm_run.h). */
#define HSM_KL_EXIT ...
#define HSM_KL_ATTENTION ...
struct hsm_kvm_fast {
    int vcpu_fd;
    int kick_signal;
    void *run;
    const unsigned char *skip_ports;
    uint64_t skip_mmio_lo;
    uint64_t skip_mmio_hi;
    unsigned attention;
    int in_guest;
    uint64_t io_exits;
    uint64_t mmio_exits;
    ...;
};
int hsm_kvm_loop(struct hsm_kvm_fast *f, unsigned attention, struct hsm_vcpu_wait *w,
                 struct hsm_gate *g, int upcall_fd, struct hsm_native_upcall *up);
int hsm_kvm_signal_msi(int vm_fd, uint64_t addr, uint32_t data);
int hsm_kvm_irq_op(int vm_fd, uint32_t gsi, uint32_t op);

/* HC_INJECT_MSI's and HC_SET_IRQLINE's native forms (native/irq_gate.h). */
#define HSM_IRQ_RING ...
#define HSM_IRQ_HV ...
#define HSM_IRQ_HSM ...
#define HSM_IRQ_MSI ...
#define HSM_IRQ_LINE ...
#define HSM_IRQ_PINS ...
struct hsm_irq_rec { uint32_t kind; uint64_t a; uint64_t b; ...; };
struct hsm_irq_gate { int fd; uint64_t n; uint64_t taken[2]; ...; };
void hsm_irq_gate_init(struct hsm_irq_gate *g);
void hsm_irq_gate_set(struct hsm_irq_gate *g, int fd);
void hsm_irq_gate_alert(struct hsm_irq_gate *g, int alert_fd);
int hsm_irq_msi(struct hsm_irq_gate *g, uint64_t addr, uint64_t data);
int hsm_irq_line(struct hsm_irq_gate *g, uint64_t ops);
uint32_t hsm_irq_take(struct hsm_irq_gate *g, int who, struct hsm_irq_rec *out, uint32_t max);
