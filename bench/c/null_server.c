/* The floor: a minimal libfuse3 low-level server, single-threaded, whose one
 * file answers every ioctl at once (EINVAL, as the HSM's gate does before
 * CREATE_VM, so both sides do the same work). Usage: null_server MOUNTPOINT */
#define FUSE_USE_VERSION 35
#include <errno.h>
#include <fuse_lowlevel.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

static void fill(struct stat *st, fuse_ino_t ino)
{
    memset(st, 0, sizeof(*st));
    st->st_ino = ino;
    st->st_mode = ino == 1 ? (S_IFDIR | 0755) : (S_IFREG | 0600);
    st->st_nlink = 1;
}

static void ll_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    struct fuse_entry_param e;
    if (parent != 1 || strcmp(name, "node")) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    memset(&e, 0, sizeof(e));
    e.ino = 2;
    e.attr_timeout = e.entry_timeout = 1.0;
    fill(&e.attr, 2);
    fuse_reply_entry(req, &e);
}

static void ll_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct stat st;
    (void)fi;
    fill(&st, ino);
    fuse_reply_attr(req, &st, 1.0);
}

static void ll_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)ino;
    fi->direct_io = 1;
    fi->nonseekable = 1;
    fuse_reply_open(req, fi);
}

static void ll_ioctl(fuse_req_t req, fuse_ino_t ino, unsigned int cmd, void *arg,
                     struct fuse_file_info *fi, unsigned flags, const void *in_buf,
                     size_t in_bufsz, size_t out_bufsz)
{
    (void)ino; (void)cmd; (void)arg; (void)fi; (void)flags; (void)in_buf;
    (void)in_bufsz; (void)out_bufsz;
    fuse_reply_err(req, EINVAL);
}

int main(int argc, char **argv)
{
    struct fuse_lowlevel_ops ops = {
        .lookup = ll_lookup, .getattr = ll_getattr, .open = ll_open, .ioctl = ll_ioctl,
    };
    char *fargv[] = {argv[0], "-o", "allow_other", NULL};
    struct fuse_args args = FUSE_ARGS_INIT(3, fargv);
    if (argc != 2)
        return 2;
    struct fuse_session *se = fuse_session_new(&args, &ops, sizeof(ops), NULL);
    if (!se || fuse_set_signal_handlers(se) || fuse_session_mount(se, argv[1]))
        return 1;
    printf("READY\n");
    fflush(stdout);
    int rc = fuse_session_loop(se);
    fuse_session_unmount(se);
    fuse_remove_signal_handlers(se);
    fuse_session_destroy(se);
    return rc ? 1 : 0;
}
