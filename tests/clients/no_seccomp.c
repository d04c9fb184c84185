/*
 * no_seccomp: run a command where seccomp(2) fails, as on a kernel without it or
 * under a container runtime's profile that forbids it.
 *
 *   no_seccomp all|filter ERRNO COMMAND [ARGS...]
 *
 * all: every seccomp(2) call fails with ERRNO (a kernel without seccomp: ENOSYS);
 * filter: only SECCOMP_SET_MODE_FILTER does (installing a filter is refused).
 * Sets no_new_privs, which installing this filter requires without CAP_SYS_ADMIN.
 */
#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>

int main(int argc, char **argv)
{
	if (argc < 4 || (strcmp(argv[1], "all") && strcmp(argv[1], "filter"))) {
		fprintf(stderr, "usage: no_seccomp all|filter ERRNO COMMAND [ARGS...]\n");
		return 2;
	}
	unsigned int err = (unsigned int)atoi(argv[2]);
	int only_filter = !strcmp(argv[1], "filter");
	struct sock_filter f[] = {
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_seccomp, 1, 0),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[0])),
		/* all: refuse whatever the operation; filter: only SECCOMP_SET_MODE_FILTER */
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SECCOMP_SET_MODE_FILTER, 1, 0),
		BPF_STMT(BPF_RET | BPF_K, only_filter ? SECCOMP_RET_ALLOW : SECCOMP_RET_ERRNO | (err & 0xfff)),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (err & 0xfff)),
	};
	struct sock_fprog prog = { .len = sizeof(f) / sizeof(f[0]), .filter = f };
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog)) {
		perror("no_seccomp");
		return 1;
	}
	execvp(argv[3], argv + 3);
	perror("no_seccomp: exec");
	return 127;
}
