/* The libfuse3 surface cdev binds (cffi cdef). Layouts are partial ("...;"):
 * the compiler fills in the rest from <fuse_lowlevel.h>. */

typedef int... mode_t;
typedef int... dev_t;
typedef int... nlink_t;
typedef int... off_t;
typedef int... uid_t;
typedef int... gid_t;
typedef int... pid_t;
typedef int... ino_t;
typedef uint64_t fuse_ino_t;
typedef struct fuse_req *fuse_req_t;
struct fuse_session;
struct fuse_pollhandle;

struct fuse_args { int argc; char **argv; int allocated; };
void fuse_opt_free_args(struct fuse_args *args);

struct fuse_file_info {
    int flags;
    uint64_t fh;
    ...;
};

struct stat {
    dev_t st_rdev;
    ino_t st_ino;
    mode_t st_mode;
    nlink_t st_nlink;
    uid_t st_uid;
    gid_t st_gid;
    off_t st_size;
    ...;
};

struct fuse_entry_param {
    fuse_ino_t ino;
    uint64_t generation;
    struct stat attr;
    double attr_timeout;
    double entry_timeout;
};

struct fuse_conn_info {
    unsigned proto_major;
    unsigned proto_minor;
    unsigned max_write;
    unsigned max_read;
    unsigned capable;
    unsigned want;
    ...;
};

struct fuse_ctx { uid_t uid; gid_t gid; pid_t pid; mode_t umask; };

struct fuse_buf { size_t size; void *mem; int fd; ...; };

struct iovec { void *iov_base; size_t iov_len; };

struct cuse_info {
    unsigned dev_major;
    unsigned dev_minor;
    unsigned dev_info_argc;
    const char **dev_info_argv;
    unsigned flags;
};

#define CUSE_UNRESTRICTED_IOCTL ...
#define FUSE_IOCTL_COMPAT ...
#define FUSE_IOCTL_UNRESTRICTED ...
#define FUSE_IOCTL_RETRY ...

struct fuse_session *fuse_session_new(struct fuse_args *args, const struct fuse_lowlevel_ops *op,
                                      size_t op_size, void *userdata);
struct fuse_session *cuse_lowlevel_new(struct fuse_args *args, const struct cuse_info *ci,
                                       const struct cuse_lowlevel_ops *clop, void *userdata);
int fuse_session_mount(struct fuse_session *se, const char *mountpoint);
void fuse_session_unmount(struct fuse_session *se);
void fuse_session_destroy(struct fuse_session *se);
int fuse_session_fd(struct fuse_session *se);
void fuse_session_exit(struct fuse_session *se);
int fuse_session_exited(struct fuse_session *se);
int fuse_session_receive_buf(struct fuse_session *se, struct fuse_buf *buf);
void fuse_session_process_buf(struct fuse_session *se, const struct fuse_buf *buf);

int fuse_reply_err(fuse_req_t req, int err);
void fuse_reply_none(fuse_req_t req);
int fuse_reply_entry(fuse_req_t req, const struct fuse_entry_param *e);
int fuse_reply_attr(fuse_req_t req, const struct stat *attr, double attr_timeout);
int fuse_reply_open(fuse_req_t req, const struct fuse_file_info *fi);
int fuse_reply_buf(fuse_req_t req, const char *buf, size_t size);
int fuse_reply_ioctl(fuse_req_t req, int result, const void *buf, size_t size);
int fuse_reply_ioctl_retry(fuse_req_t req, const struct iovec *in_iov, size_t in_count,
                           const struct iovec *out_iov, size_t out_count);
int fuse_reply_poll(fuse_req_t req, unsigned revents);
int fuse_lowlevel_notify_poll(struct fuse_pollhandle *ph);
void fuse_pollhandle_destroy(struct fuse_pollhandle *ph);
size_t fuse_add_direntry(fuse_req_t req, char *buf, size_t bufsize, const char *name,
                         const struct stat *stbuf, off_t off);
const struct fuse_ctx *fuse_req_ctx(fuse_req_t req);
int fuse_req_interrupted(fuse_req_t req);
void *fuse_req_userdata(fuse_req_t req);

/* Mounts for FUSE mode (bind-mounting the served file onto the node path). */
#define MS_BIND ...
#define MNT_DETACH ...
int mount(const char *source, const char *target, const char *fstype,
          unsigned long flags, const void *data);
int umount2(const char *target, int flags);

void free(void *ptr);

/* Glue (native/fuse_glue.c). */
size_t cdev_ops_size(void);
struct fuse_lowlevel_ops *cdev_new_ops(void);
struct cuse_lowlevel_ops *cdev_new_cuse_ops(void);
void cdev_install_log(void);
void cdev_req_interrupt_func(fuse_req_t req, void *data);
void cdev_fi_setup(struct fuse_file_info *fi, int direct_io, int nonseekable);
struct cdev_poll { uint64_t window_ns; uint64_t max_ns; uint64_t answered_at; uint64_t hits;
                   uint64_t misses; int also_fd; };
int cdev_receive_poll(struct fuse_session *se, struct fuse_buf *buf, int batch,
                      void *prefilter, void *ctx, struct cdev_poll *pl);

/* The native receiver thread (native/fuse_glue.c). */
struct cdev_rx { int notify_fd; int ended; uint64_t taken; uint64_t forwarded;
                 uint64_t poll_window_ns; uint64_t poll_hits; uint64_t poll_misses;
                 uint64_t poll_max_ns; ...; };
struct cdev_rx *cdev_rx_start(struct fuse_session *se, void *prefilter, void *ctx,
                              uint64_t poll_max_ns);
void cdev_rx_stop(struct cdev_rx *rx);
int cdev_rx_process(struct fuse_session *se, struct cdev_rx *rx, int batch, struct cdev_poll *pl);
void cdev_rx_free(struct cdev_rx *rx, int err);

/* cdev_ll_ioctl's answer when Python replied itself, or keeps the request. */
#define CDEV_ANSWERED ...

/* Callbacks, defined in Python (cdev/session.py); "+C": fuse_glue.c, its own
 * translation unit, calls them. */
extern "Python+C" {
    void cdev_ll_init(void *userdata, struct fuse_conn_info *conn);
    void cdev_ll_lookup(fuse_req_t req, fuse_ino_t parent, const char *name);
    void cdev_ll_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi);
    void cdev_ll_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi);
    void cdev_ll_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi);
    void cdev_ll_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi);
    void cdev_ll_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                         struct fuse_file_info *fi);
    void cdev_ll_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                      struct fuse_file_info *fi);
    void cdev_ll_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size,
                       off_t off, struct fuse_file_info *fi);
    int64_t cdev_ll_ioctl(fuse_req_t req, uint64_t fh, unsigned int cmd, uint64_t arg,
                          unsigned flags, const char *in_buf, size_t in_bufsz, size_t out_bufsz,
                          uint32_t uid, uint32_t gid, int32_t tid);
    void cdev_ll_poll(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi,
                      struct fuse_pollhandle *ph);
    void cdev_cuse_init_done(void *userdata);
    void cdev_interrupt(fuse_req_t req, void *data);
    void cdev_log(int level, const char *msg);
}
