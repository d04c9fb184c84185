/*
 * launcher.c - the native half of `acrn-hsm-emu run` (acrn_hsm_emu/launcher.py).
 *
 * launch_spawn() starts the command under a seccomp filter that hands every
 * ioctl whose request number is in a short list (the value-argument ACRN
 * ioctls) to a supervisor through a user-notification listener, and lets
 * every other system call through untouched. launch_serve() is that
 * supervisor: for each trapped call it takes the caller's fd (pidfd_getfd),
 * and when it is the HSM node it makes the same call by pointer on that open
 * file (ACRN_EMU_IOCTL_VALUE_CALL) and answers the trapped call with the
 * HSM's result; anything else goes on to the kernel as it was
 * (SECCOMP_USER_NOTIF_FLAG_CONTINUE). It returns to Python only for events
 * Python has to log, so a carried call never touches the interpreter.
 *
 * spec: docs/extension-abi.md (VALUE_CALL), docs/fidelity.md (the launcher).
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>

#include "launcher.h"

#ifndef __x86_64__
#error "the launcher's seccomp filter is written for x86-64"
#endif

#ifndef SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
#define SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV (1UL << 5)
#endif
#ifndef PIDFD_THREAD
#define PIDFD_THREAD O_EXCL /* Linux 6.9: a pidfd for one thread */
#endif

struct acrn_emu_value_call {	/* include/acrn_hsm_emu.h */
	uint32_t cmd;
	uint32_t reserved;
	uint64_t arg;
	int64_t result;
};

struct launch_sup {
	int listener;
	int stop_r, stop_w;
	unsigned long value_call;	/* ACRN_EMU_IOCTL_VALUE_CALL */
	char node[PATH_MAX];
	int node_known;
	dev_t node_dev;
	ino_t node_ino;
	int thread_pidfd;	/* -1 untried, 1 PIDFD_THREAD works, 0 it does not */
	uint32_t fd_cmds[LAUNCH_MAX_CMDS];	/* calls whose value is an fd of the caller */
	int n_fd_cmds;
	struct seccomp_notif *req;
	struct seccomp_notif_resp *resp;
	size_t req_size, resp_size;
	struct launch_stats stats;
};

static uint64_t launch_now_ns(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static int launch_seccomp(unsigned int op, unsigned int flags, void *arg)
{
	return (int)syscall(SYS_seccomp, op, flags, arg);
}

/* Whether this kernel can do it all: 0, or -errno with *step saying what is missing. */
int launch_probe(int *step)
{
	uint32_t action = SECCOMP_RET_USER_NOTIF;
	struct seccomp_notif_sizes sizes;
	int pidfd, fd;

	*step = LAUNCH_STEP_ACTION_AVAIL;
	if (launch_seccomp(SECCOMP_GET_ACTION_AVAIL, 0, &action) < 0)
		return -errno;
	*step = LAUNCH_STEP_NOTIF_SIZES;
	if (launch_seccomp(SECCOMP_GET_NOTIF_SIZES, 0, &sizes) < 0)
		return -errno;
	*step = LAUNCH_STEP_PIDFD_OPEN;
	pidfd = (int)syscall(SYS_pidfd_open, getpid(), 0);
	if (pidfd < 0)
		return -errno;
	*step = LAUNCH_STEP_PIDFD_GETFD;
	fd = (int)syscall(SYS_pidfd_getfd, pidfd, pidfd, 0);
	if (fd < 0) {
		int e = errno;
		close(pidfd);
		return -e;
	}
	close(fd);
	close(pidfd);
	*step = LAUNCH_STEP_NONE;
	return 0;
}

/* The child's half: report what failed through the pipe, then give up. */
static void launch_child_fail(int errpipe, int step)
{
	int msg[2] = { step, errno };
	ssize_t n = write(errpipe, msg, sizeof(msg));
	(void)n;
	_exit(127);
}

/* ioctl only, x86-64 only, request number (the low 32 bits, as the kernel's
 * unsigned int cmd) in the list: notify the supervisor; everything else: allow. */
static int launch_filter(const uint32_t *cmds, int ncmds, struct sock_filter *f)
{
	int n = 0;
	f[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch));
	f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0);
	f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
	f[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr));
	f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_ioctl, 1, 0);
	f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
	f[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS,
					      offsetof(struct seccomp_data, args[1]));	/* low half */
	for (int i = 0; i < ncmds; i++) /* match: skip to the USER_NOTIF return */
		f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, cmds[i],
						      (uint8_t)(ncmds - i), 0);
	f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
	f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_USER_NOTIF);
	return n;
}

static void launch_child(const char *path, char *const argv[], char *const envp[],
			 const uint32_t *cmds, int ncmds, int sock, int errpipe, pid_t parent)
{
	struct sigaction dfl;
	sigset_t none;

	/* without its supervisor the command's interrupts are lost (ENOSYS): if the
	 * launcher is killed, so is the command, as `serve` kills it after its SIGTERM */
	if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) < 0 || getppid() != parent)
		_exit(127);

	/* exec keeps ignored signals ignored (Python ignores SIGPIPE and SIGXFSZ) and
	 * the blocked mask (the launcher blocks the ones it forwards): undo both */
	memset(&dfl, 0, sizeof(dfl));
	dfl.sa_handler = SIG_DFL;
	for (int s = 1; s < NSIG; s++)
		sigaction(s, &dfl, NULL);	/* SIGKILL, SIGSTOP, glibc's own: refused, harmless */
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);

	if (ncmds > 0) {
		struct sock_filter insns[LAUNCH_MAX_CMDS + 9];
		struct sock_fprog prog = { .len = (unsigned short)launch_filter(cmds, ncmds, insns),
					   .filter = insns };
		unsigned int flags = SECCOMP_FILTER_FLAG_NEW_LISTENER | SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV;
		int info[2] = { 0, 1 };	/* no_new_privs, killable */
		int listener = launch_seccomp(SECCOMP_SET_MODE_FILTER, flags, &prog);

		if (listener < 0 && errno == EINVAL) { /* before Linux 5.19 */
			flags &= ~(unsigned int)SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV;
			info[1] = 0;
			listener = launch_seccomp(SECCOMP_SET_MODE_FILTER, flags, &prog);
		}
		if (listener < 0 && errno == EACCES) { /* no CAP_SYS_ADMIN: the kernel wants NNP */
			if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
				launch_child_fail(errpipe, LAUNCH_STEP_NO_NEW_PRIVS);
			info[0] = 1;
			listener = launch_seccomp(SECCOMP_SET_MODE_FILTER, flags, &prog);
		}
		if (listener < 0)
			launch_child_fail(errpipe, LAUNCH_STEP_FILTER);

		char cbuf[CMSG_SPACE(sizeof(int))];
		struct iovec iov = { .iov_base = info, .iov_len = sizeof(info) };
		struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1,
				     .msg_control = cbuf, .msg_controllen = sizeof(cbuf) };
		struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int));
		memcpy(CMSG_DATA(c), &listener, sizeof(int));
		if (sendmsg(sock, &mh, 0) < 0)
			launch_child_fail(errpipe, LAUNCH_STEP_SEND_LISTENER);
		close(listener);
	}
	execve(path, argv, envp);
	launch_child_fail(errpipe, LAUNCH_STEP_EXEC);
}

/* Fork, install the filter in the child (ncmds > 0), exec. 0 with out->pid and
 * out->listener; -1 with out->step/err when the command could not be started
 * (the child, if any, is reaped). Call it while the process has one thread. */
int launch_spawn(const char *path, char *const argv[], char *const envp[],
		 const uint32_t *cmds, int ncmds, struct launch_spawn_result *out)
{
	int sv[2], ep[2];

	memset(out, 0, sizeof(*out));
	out->listener = -1;
	if (ncmds < 0 || ncmds > LAUNCH_MAX_CMDS) {
		out->step = LAUNCH_STEP_FILTER;
		out->err = E2BIG;
		return -1;
	}
	if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0) {
		out->step = LAUNCH_STEP_FORK;
		out->err = errno;
		return -1;
	}
	if (pipe2(ep, O_CLOEXEC) < 0) {
		out->step = LAUNCH_STEP_FORK;
		out->err = errno;
		close(sv[0]);
		close(sv[1]);
		return -1;
	}
	pid_t parent = getpid();
	pid_t pid = fork();
	if (pid < 0) {
		out->step = LAUNCH_STEP_FORK;
		out->err = errno;
		close(sv[0]);
		close(sv[1]);
		close(ep[0]);
		close(ep[1]);
		return -1;
	}
	if (pid == 0) {
		close(sv[0]);
		close(ep[0]);
		launch_child(path, argv, envp, cmds, ncmds, sv[1], ep[1], parent);
	}
	close(sv[1]);
	close(ep[1]);
	out->pid = pid;
	if (ncmds > 0) {
		int info[2] = { 0, 0 };
		char cbuf[CMSG_SPACE(sizeof(int))];
		struct iovec iov = { .iov_base = info, .iov_len = sizeof(info) };
		struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1,
				     .msg_control = cbuf, .msg_controllen = sizeof(cbuf) };
		ssize_t n;
		do
			n = recvmsg(sv[0], &mh, MSG_CMSG_CLOEXEC);
		while (n < 0 && errno == EINTR);
		struct cmsghdr *c = n > 0 ? CMSG_FIRSTHDR(&mh) : NULL;
		if (c != NULL && c->cmsg_type == SCM_RIGHTS) {
			memcpy(&out->listener, CMSG_DATA(c), sizeof(int));
			out->no_new_privs = info[0];
			out->killable = info[1];
		}
	}
	close(sv[0]);
	int msg[2];
	ssize_t n;
	do
		n = read(ep[0], msg, sizeof(msg));
	while (n < 0 && errno == EINTR);
	close(ep[0]);
	if (n == sizeof(msg) || (ncmds > 0 && out->listener < 0)) {
		int status;
		out->step = n == sizeof(msg) ? msg[0] : LAUNCH_STEP_RECV_LISTENER;
		out->err = n == sizeof(msg) ? msg[1] : EPROTO;
		if (out->listener >= 0)
			close(out->listener);
		out->listener = -1;
		while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
			;
		out->pid = 0;
		return -1;
	}
	return 0;
}

/* ---- the supervisor ------------------------------------------------------------ */

/* thread_pidfd: -1 find out whether pidfd_open takes PIDFD_THREAD (Linux 6.9), 0 do not
 * use it (the caller's process found through /proc, as on older kernels) */
struct launch_sup *launch_sup_new(int listener, const char *node, unsigned long value_call,
				  int thread_pidfd)
{
	struct seccomp_notif_sizes sizes;
	struct launch_sup *s;
	int p[2];

	if (launch_seccomp(SECCOMP_GET_NOTIF_SIZES, 0, &sizes) < 0)
		return NULL;
	if (strlen(node) >= PATH_MAX) {
		errno = ENAMETOOLONG;
		return NULL;
	}
	s = calloc(1, sizeof(*s));
	if (s == NULL)
		return NULL;
	if (pipe2(p, O_CLOEXEC) < 0) {
		free(s);
		return NULL;
	}
	s->stop_r = p[0];
	s->stop_w = p[1];
	s->listener = listener;
	s->value_call = value_call;
	strcpy(s->node, node);
	s->thread_pidfd = thread_pidfd ? -1 : 0;
	/* the kernel's structs may be larger than our headers' */
	s->req_size = sizes.seccomp_notif > sizeof(*s->req) ? sizes.seccomp_notif : sizeof(*s->req);
	s->resp_size = sizes.seccomp_notif_resp > sizeof(*s->resp) ? sizes.seccomp_notif_resp
								    : sizeof(*s->resp);
	s->req = calloc(1, s->req_size);
	s->resp = calloc(1, s->resp_size);
	if (s->req == NULL || s->resp == NULL) {
		free(s->req);
		free(s->resp);
		close(p[0]);
		close(p[1]);
		free(s);
		errno = ENOMEM;
		return NULL;
	}
	return s;
}

/* Before serving: the value of ``cmd`` is a file descriptor of the caller (ACRN's
 * SETUP_VM_EVENT_FD). It is carried as the number of the launcher's own copy of that
 * file, open during the call, since the daemon takes it from whoever makes the call. */
int launch_sup_fd_arg(struct launch_sup *s, uint32_t cmd)
{
	if (s->n_fd_cmds == LAUNCH_MAX_CMDS)
		return -E2BIG;
	s->fd_cmds[s->n_fd_cmds++] = cmd;
	return 0;
}

static int launch_is_fd_cmd(const struct launch_sup *s, uint32_t cmd)
{
	for (int i = 0; i < s->n_fd_cmds; i++)
		if (s->fd_cmds[i] == cmd)
			return 1;
	return 0;
}

/* Any thread: make launch_serve return LAUNCH_EV_STOP. */
void launch_stop(struct launch_sup *s)
{
	char c = 1;
	ssize_t n = write(s->stop_w, &c, 1);
	(void)n;
}

/* When supervision ends (the serving thread, after launch_serve returned): closing
 * the listener fails the calls still trapped, and any later ones, with ENOSYS. */
void launch_sup_abandon(struct launch_sup *s)
{
	if (s->listener >= 0)
		close(s->listener);
	s->listener = -1;
}

void launch_sup_free(struct launch_sup *s)
{
	launch_sup_abandon(s);
	close(s->stop_r);
	close(s->stop_w);
	free(s->req);
	free(s->resp);
	free(s);
}

void launch_sup_stats(struct launch_sup *s, struct launch_stats *out)
{
	*out = s->stats;
}

/* The thread group of a thread, from /proc (before Linux 6.9's PIDFD_THREAD). */
static int launch_tgid(int tid)
{
	char path[64], buf[1024];
	int fd, tgid = -ESRCH;
	ssize_t n;

	snprintf(path, sizeof(path), "/proc/%d/status", tid);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return errno == ENOENT ? -ESRCH : -errno;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return -ESRCH;
	buf[n] = 0;
	char *p = strstr(buf, "\nTgid:");
	if (p != NULL)
		tgid = (int)strtol(p + 6, NULL, 10);
	return tgid > 0 ? tgid : -ESRCH;
}

/* A pidfd for the caller's process (any of its threads will do for pidfd_getfd). */
static int launch_open_caller(struct launch_sup *s, int tid, int *step)
{
	int fd, tgid;

	*step = LAUNCH_STEP_PIDFD_OPEN;
	if (s->thread_pidfd != 0) {
		fd = (int)syscall(SYS_pidfd_open, tid, PIDFD_THREAD);
		if (fd >= 0) {
			s->thread_pidfd = 1;
			return fd;
		}
		if (errno != EINVAL || s->thread_pidfd == 1)
			return -errno;
		s->thread_pidfd = 0;
	}
	*step = LAUNCH_STEP_TGID;
	tgid = launch_tgid(tid);
	if (tgid < 0)
		return tgid;
	*step = LAUNCH_STEP_PIDFD_OPEN;
	fd = (int)syscall(SYS_pidfd_open, tgid, 0);
	return fd >= 0 ? fd : -errno;
}

/* The same open file as the node? The node's identity is looked up again when it
 * does not match (the daemon may have been restarted). */
static int launch_is_node(struct launch_sup *s, int fd)
{
	struct stat st, ns;

	if (fstat(fd, &st) < 0)
		return 0;
	if (s->node_known && st.st_dev == s->node_dev && st.st_ino == s->node_ino)
		return 1;
	if (stat(s->node, &ns) < 0) {
		s->node_known = 0;
		return 0;
	}
	s->node_known = 1;
	s->node_dev = ns.st_dev;
	s->node_ino = ns.st_ino;
	return st.st_dev == ns.st_dev && st.st_ino == ns.st_ino;
}

/* One trapped call: decide, carry, fill the answer in s->resp. */
static void launch_handle(struct launch_sup *s, struct launch_event *ev)
{
	struct seccomp_notif *req = s->req;
	struct seccomp_notif_resp *resp = s->resp;
	int step, pidfd, target;

	memset(resp, 0, s->resp_size);
	resp->id = req->id;
	resp->flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE;	/* unless carried below */
	ev->tid = (int)req->pid;
	ev->fd = (int)req->data.args[0];
	ev->cmd = (uint32_t)req->data.args[1];
	ev->arg = req->data.args[2];

	pidfd = launch_open_caller(s, ev->tid, &step);
	/* the id still valid after pidfd_open: the tid was not reused, the pidfd is the caller's */
	if (ioctl(s->listener, SECCOMP_IOCTL_NOTIF_ID_VALID, &req->id) < 0) {
		if (pidfd >= 0)
			close(pidfd);
		ev->kind = LAUNCH_EV_GONE;
		return;
	}
	if (pidfd < 0) {
		ev->kind = LAUNCH_EV_FAILED;
		ev->step = step;
		ev->err = -pidfd;
		return;
	}
	target = (int)syscall(SYS_pidfd_getfd, pidfd, ev->fd, 0);
	int e = errno;
	if (target < 0) {
		close(pidfd);
		if (e == EBADF) {	/* not an open fd: the kernel says EBADF itself */
			ev->kind = LAUNCH_EV_PASSED;
			return;
		}
		ev->kind = e == ESRCH ? LAUNCH_EV_GONE : LAUNCH_EV_FAILED;
		ev->step = LAUNCH_STEP_PIDFD_GETFD;
		ev->err = e;
		return;
	}
	if (!launch_is_node(s, target)) {
		close(pidfd);
		close(target);
		ev->kind = LAUNCH_EV_PASSED;
		return;
	}
	struct acrn_emu_value_call vc = { .cmd = ev->cmd, .arg = ev->arg };
	int argfd = -1;
	if (launch_is_fd_cmd(s, ev->cmd)) {
		/* the caller's fd, as our own; not an open fd there: -1, which the daemon's
		 * answer (EBADF, or ENOTTY where it does not know the call) treats alike */
		argfd = (int)syscall(SYS_pidfd_getfd, pidfd, (int)(uint32_t)ev->arg, 0);
		vc.arg = (uint32_t)argfd;
	}
	close(pidfd);
	uint64_t t0 = launch_now_ns();
	int r = ioctl(target, s->value_call, &vc);
	e = errno;
	if (r == 0)
		s->stats.value_call_ns += launch_now_ns() - t0;
	if (argfd >= 0)
		close(argfd);
	close(target);
	if (r < 0) {
		ev->kind = LAUNCH_EV_REFUSED;
		ev->err = e;
		return;
	}
	ev->kind = LAUNCH_EV_CARRIED;
	ev->result = vc.result;
	resp->flags = 0;
	if (vc.result < 0) {
		resp->error = (int32_t)vc.result;	/* the caller sees -1 and this errno */
	} else {
		resp->val = vc.result;
	}
}

/* Serve trapped calls until an event Python must see (every event when verbose). */
int launch_serve(struct launch_sup *s, struct launch_event *ev, int verbose)
{
	struct pollfd p[2] = { { .fd = s->listener, .events = POLLIN }, { .fd = s->stop_r, .events = POLLIN } };

	for (;;) {
		memset(ev, 0, sizeof(*ev));
		if (poll(p, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			ev->kind = LAUNCH_EV_ERROR;
			ev->step = LAUNCH_STEP_POLL;
			ev->err = errno;
			return ev->kind;
		}
		if (p[1].revents) {
			ev->kind = LAUNCH_EV_STOP;
			return ev->kind;
		}
		if (!(p[0].revents & POLLIN)) {
			ev->kind = LAUNCH_EV_HUP;	/* POLLHUP: every filtered process exited */
			return ev->kind;
		}
		memset(s->req, 0, s->req_size);
		if (ioctl(s->listener, SECCOMP_IOCTL_NOTIF_RECV, s->req) < 0) {
			if (errno == ENOENT || errno == EINTR) { /* the caller left before we took it */
				s->stats.gone++;
				if (verbose) {
					ev->kind = LAUNCH_EV_GONE;
					return ev->kind;
				}
				continue;
			}
			ev->kind = LAUNCH_EV_ERROR;
			ev->step = LAUNCH_STEP_NOTIF_RECV;
			ev->err = errno;
			return ev->kind;
		}
		uint64_t t0 = launch_now_ns();
		launch_handle(s, ev);
		if (ev->kind != LAUNCH_EV_GONE &&
		    ioctl(s->listener, SECCOMP_IOCTL_NOTIF_SEND, s->resp) < 0) {
			if (errno != ENOENT) {
				ev->kind = LAUNCH_EV_ERROR;
				ev->step = LAUNCH_STEP_NOTIF_SEND;
				ev->err = errno;
				return ev->kind;
			}
			/* killed while we worked: a carried call took effect, nobody hears of it */
			if (ev->kind != LAUNCH_EV_CARRIED)
				ev->kind = LAUNCH_EV_GONE;
		}
		switch (ev->kind) {
		case LAUNCH_EV_CARRIED:
			s->stats.carried++;
			s->stats.supervisor_ns += launch_now_ns() - t0;
			break;
		case LAUNCH_EV_PASSED:
			s->stats.passed++;
			break;
		case LAUNCH_EV_GONE:
			s->stats.gone++;
			break;
		case LAUNCH_EV_REFUSED:
			s->stats.refused++;
			break;
		case LAUNCH_EV_FAILED:
			s->stats.failed++;
			break;
		}
		if (verbose || ev->kind == LAUNCH_EV_REFUSED || ev->kind == LAUNCH_EV_FAILED)
			return ev->kind;
	}
}
