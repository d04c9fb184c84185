/*
 * launcher.h - what acrn_hsm_emu._launcher binds of launcher.c (the cffi
 * module's preamble is this file; the declarations Python sees are
 * _cffi_src/launcher_decl.h).
 */
#ifndef LAUNCHER_H
#define LAUNCHER_H

#include <stdint.h>

/* What failed (launch_probe, launch_spawn, launch_serve's events). */
enum {
	LAUNCH_STEP_NONE,
	LAUNCH_STEP_ACTION_AVAIL,	/* seccomp(SECCOMP_GET_ACTION_AVAIL, USER_NOTIF) */
	LAUNCH_STEP_NOTIF_SIZES,	/* seccomp(SECCOMP_GET_NOTIF_SIZES) */
	LAUNCH_STEP_PIDFD_OPEN,
	LAUNCH_STEP_PIDFD_GETFD,
	LAUNCH_STEP_FORK,
	LAUNCH_STEP_FILTER,		/* seccomp(SECCOMP_SET_MODE_FILTER, NEW_LISTENER) */
	LAUNCH_STEP_NO_NEW_PRIVS,
	LAUNCH_STEP_SEND_LISTENER,
	LAUNCH_STEP_EXEC,
	LAUNCH_STEP_RECV_LISTENER,
	LAUNCH_STEP_POLL,
	LAUNCH_STEP_NOTIF_RECV,
	LAUNCH_STEP_NOTIF_SEND,
	LAUNCH_STEP_TGID,		/* /proc/TID/status */
	LAUNCH_STEP_MEMORY,
};

#define LAUNCH_MAX_CMDS 16	/* trapped request numbers, and of those, fd-valued ones */

/* launch_serve's events. */
enum {
	LAUNCH_EV_STOP,		/* launch_stop() was called */
	LAUNCH_EV_HUP,		/* no process is left under the filter */
	LAUNCH_EV_CARRIED,	/* the HSM answered it: result */
	LAUNCH_EV_PASSED,	/* not the HSM node (or not an open fd): the kernel answers */
	LAUNCH_EV_GONE,		/* the caller went away (killed) before it was answered */
	LAUNCH_EV_REFUSED,	/* the node refused VALUE_CALL (err); the kernel answers */
	LAUNCH_EV_FAILED,	/* a step on the caller failed (step, err); the kernel answers */
	LAUNCH_EV_ERROR,	/* the listener failed (step, err): supervision ends */
};

struct launch_spawn_result {
	int pid;
	int listener;	/* -1 without a filter */
	int step;	/* what failed (LAUNCH_STEP_*), 0 if nothing */
	int err;
	int no_new_privs;	/* the child had to set it to install the filter */
	int killable;		/* SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV was accepted */
};

struct launch_event {
	int kind;
	int step;
	int err;
	int tid;
	int fd;
	uint32_t cmd;
	uint64_t arg;
	int64_t result;
};

struct launch_stats {
	uint64_t carried, passed, gone, refused, failed;
	uint64_t supervisor_ns;	/* sum, notification received to answered, carried calls */
	uint64_t value_call_ns;	/* sum, the VALUE_CALL ioctl alone */
};

struct launch_sup;

int launch_probe(int *step);
int launch_spawn(const char *path, char *const argv[], char *const envp[],
		 const uint32_t *cmds, int ncmds, struct launch_spawn_result *out);
struct launch_sup *launch_sup_new(int listener, const char *node, unsigned long value_call,
				  int thread_pidfd);
int launch_sup_fd_arg(struct launch_sup *s, uint32_t cmd);
int launch_serve(struct launch_sup *s, struct launch_event *ev, int verbose);
void launch_stop(struct launch_sup *s);
void launch_sup_abandon(struct launch_sup *s);
void launch_sup_stats(struct launch_sup *s, struct launch_stats *out);
void launch_sup_free(struct launch_sup *s);

#endif
