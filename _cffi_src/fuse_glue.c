/* C side of cdev._fuse: fills the operation tables with the Python callbacks
 * and turns libfuse's printf-style log calls into one string each. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <fuse_lowlevel.h>
#include <cuse_lowlevel.h>

static void cdev_ll_init(void *userdata, struct fuse_conn_info *conn);
static void cdev_ll_lookup(fuse_req_t req, fuse_ino_t parent, const char *name);
static void cdev_ll_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi);
static void cdev_ll_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi);
static void cdev_ll_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi);
static void cdev_ll_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi);
static void cdev_ll_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                            struct fuse_file_info *fi);
static void cdev_ll_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                         struct fuse_file_info *fi);
static void cdev_ll_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size,
                          off_t off, struct fuse_file_info *fi);
static void cdev_ll_ioctl(fuse_req_t req, fuse_ino_t ino, unsigned int cmd, void *arg,
                          struct fuse_file_info *fi, unsigned flags, const void *in_buf,
                          size_t in_bufsz, size_t out_bufsz);
static void cdev_ll_poll(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi,
                         struct fuse_pollhandle *ph);
static void cdev_cuse_init_done(void *userdata);
static void cdev_interrupt(fuse_req_t req, void *data);
static void cdev_log(int level, const char *msg);

static struct fuse_lowlevel_ops *cdev_new_ops(void)
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
    ops->ioctl = cdev_ll_ioctl;
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
{ cdev_ll_ioctl(req, 0, (unsigned int)cmd, arg, fi, flags, in_buf, in_bufsz, out_bufsz); }
static void cuse_poll(fuse_req_t req, struct fuse_file_info *fi, struct fuse_pollhandle *ph)
{ cdev_ll_poll(req, 0, fi, ph); }

static struct cuse_lowlevel_ops *cdev_new_cuse_ops(void)
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

static size_t cdev_ops_size(void) { return sizeof(struct fuse_lowlevel_ops); }

static void cdev_log_trampoline(enum fuse_log_level level, const char *fmt, va_list ap)
{
    char buf[1024];
    vsnprintf(buf, sizeof(buf), fmt, ap);
    size_t n = strlen(buf);
    while (n && buf[n - 1] == '\n')
        buf[--n] = '\0';
    cdev_log((int)level, buf);
}

static void cdev_install_log(void) { fuse_set_log_func(cdev_log_trampoline); }

static void cdev_req_interrupt_func(fuse_req_t req, void *data)
{
    fuse_req_interrupt_func(req, cdev_interrupt, data);
}

static void cdev_fi_setup(struct fuse_file_info *fi, int direct_io, int nonseekable)
{
    fi->direct_io = direct_io ? 1 : 0;
    fi->nonseekable = nonseekable ? 1 : 0;
}

/* Receive up to `batch` requests and process each. A device may offer a
 * prefilter: a C function that sees every raw request first (fuse_in_header
 * and body, as read from the kernel) and returns nonzero if it answered or kept
 * it, writing its replies to `fd` itself; libfuse and Python never see those.
 * Returns 1 when the batch was used up, else what fuse_session_receive_buf
 * returned (0: session ended or request aborted; -errno). */
typedef int (*cdev_prefilter_fn)(void *ctx, int fd, const void *req, size_t len);

static int cdev_receive_batch(struct fuse_session *se, struct fuse_buf *buf, int batch,
                              void *prefilter, void *ctx)
{
    cdev_prefilter_fn pf = (cdev_prefilter_fn)prefilter;
    int fd = fuse_session_fd(se);
    for (int i = 0; i < batch; i++) {
        int res = fuse_session_receive_buf(se, buf);
        if (res <= 0)
            return res;
        if (pf && !(buf->flags & FUSE_BUF_IS_FD) && pf(ctx, fd, buf->mem, (size_t)res))
            continue;
        fuse_session_process_buf(se, buf);
    }
    return 1;
}
