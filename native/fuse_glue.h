/* cdev._fuse's C half (fuse_glue.c): what the cffi module binds, beside
 * libfuse itself (its preamble is this file; the declarations Python sees are
 * _cffi_src/fuse_decl.h). */
#ifndef CDEV_FUSE_GLUE_H
#define CDEV_FUSE_GLUE_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>      /* free, bound as it is */
#include <sys/mount.h>   /* mount, umount2: the FUSE mode's bind mount */
#include <fuse_lowlevel.h>
#include <cuse_lowlevel.h>

/* The Python callbacks (extern "Python+C" in fuse_decl.h, cdev/session.py). */
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
/* An ioctl, as plain numbers (the file's fh, the argument's address, the caller's
 * uid, gid and thread: fuse_req_ctx), so that the Python side builds no cdata for
 * them and makes no call back into C to learn them. Its answer: a result >= 0 or a
 * -errno that fuse_glue.c replies with (one call less through cffi, which would
 * drop and retake the GIL around it), or CDEV_ANSWERED when Python replied itself
 * (with data) or keeps the request (it waits). */
#define CDEV_ANSWERED INT64_MIN
int64_t cdev_ll_ioctl(fuse_req_t req, uint64_t fh, unsigned int cmd, uint64_t arg,
                      unsigned flags, const char *in_buf, size_t in_bufsz, size_t out_bufsz,
                      uint32_t uid, uint32_t gid, int32_t tid);
void cdev_ll_poll(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi,
                  struct fuse_pollhandle *ph);
void cdev_cuse_init_done(void *userdata);
void cdev_interrupt(fuse_req_t req, void *data);
void cdev_log(int level, const char *msg);

size_t cdev_ops_size(void);
struct fuse_lowlevel_ops *cdev_new_ops(void);
struct cuse_lowlevel_ops *cdev_new_cuse_ops(void);
void cdev_install_log(void);
void cdev_req_interrupt_func(fuse_req_t req, void *data);
void cdev_fi_setup(struct fuse_file_info *fi, int direct_io, int nonseekable);

/* A device's prefilter: sees each raw request (fuse_in_header and body) first;
 * nonzero when it answered or kept it (cdev_receive_poll, in fuse_glue.c). */
typedef int (*cdev_prefilter_fn)(void *ctx, int fd, const void *req, size_t len);


/* The reader in the caller's thread, polling adaptively after each request
 * (cdev_receive_poll, in fuse_glue.c); the caller keeps this between calls. */
struct cdev_poll {
    uint64_t window_ns;         /* now: after a request, keep reading this long */
    uint64_t max_ns;            /* the bound of window_ns; 0: never poll */
    uint64_t answered_at;       /* the last request before a return, 0: none */
    uint64_t hits;              /* requests found by polling */
    uint64_t misses;            /* windows that ran out */
    int also_fd;                /* readable: the device has other work; -1: none */
};

int cdev_receive_poll(struct fuse_session *se, struct fuse_buf *buf, int batch,
                      void *prefilter, void *ctx, struct cdev_poll *pl);

/* The native receiver thread (fuse_glue.c). */
struct cdev_rx_item;
struct cdev_rx {
    int notify_fd;              /* eventfd: something was queued (or the end) */
    int ended;                  /* the session ended (unmount): no more requests */
    uint64_t taken;             /* requests the prefilter answered */
    uint64_t forwarded;         /* requests queued for the trio thread */
    uint64_t poll_window_ns;    /* now: after a prefilter answer, keep reading this long */
    uint64_t poll_hits;         /* requests found by polling (no sleep, no wake-up) */
    uint64_t poll_misses;       /* windows that ran out: the thread slept */
    uint64_t poll_max_ns;       /* the bound of poll_window_ns; 0: never poll */
    int stop_fd;                /* eventfd: cdev_rx_stop */
    int fd;
    struct fuse_session *se;
    cdev_prefilter_fn pf;
    void *ctx;
    pthread_t thread;
    pthread_mutex_t lock;
    struct cdev_rx_item *head, **tail;
};

struct cdev_rx *cdev_rx_start(struct fuse_session *se, void *prefilter, void *ctx,
                              uint64_t poll_max_ns);
void cdev_rx_stop(struct cdev_rx *rx);
int cdev_rx_process(struct fuse_session *se, struct cdev_rx *rx, int batch, struct cdev_poll *pl);
void cdev_rx_free(struct cdev_rx *rx, int err);

#endif
