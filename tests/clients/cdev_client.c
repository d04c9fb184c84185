/* A client of the cdev test device (tests/support/testdev.py), through a real node.
 *   cdev_client NODE rewrite          _IOWR: prints the bytes the device wrote back
 *   cdev_client NODE raw ARG          _IO with a raw argument, then LASTARG
 *   cdev_client NODE fail ERRNO       the device answers -ERRNO
 *   cdev_client NODE wait|wait0       blocks until WAKE or a signal (SIGUSR1 handled)
 *   cdev_client NODE wake             wakes every waiter
 *   cdev_client NODE who-thread       WHO from a second thread
 *   cdev_client NODE waits N          N threads of one process WAIT at once
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#define T_REWRITE _IOWR('T', 1, unsigned char[16])
#define T_RAW _IO('T', 2)
#define T_LASTARG _IOR('T', 3, uint64_t)
#define T_FAIL _IO('T', 4)
#define T_WAIT _IO('T', 5)
#define T_WAIT0 _IO('T', 6)
#define T_WAKE _IO('T', 7)
#define T_WHO _IOR('T', 8, uint32_t[4])

static volatile sig_atomic_t handled;
static int fd;

static void on_usr1(int sig) { (void)sig; handled = 1; }

static void *who_thread(void *arg)
{
    uint32_t who[4] = {0};
    (void)arg;
    int r = ioctl(fd, T_WHO, who);
    printf("thread tid=%ld ret=%d pid=%u tid=%u\n", (long)syscall(SYS_gettid), r, who[0], who[1]);
    return NULL;
}

static void *wait_thread(void *arg)
{
    (void)arg;
    int r = ioctl(fd, T_WAIT);
    printf("ret=%d errno=%d\n", r, r < 0 ? errno : 0);
    fflush(stdout);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s NODE COMMAND [ARG]\n", argv[0]);
        return 2;
    }
    fd = open(argv[1], O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        perror("open");
        return 1;
    }
    const char *cmd = argv[2];
    if (!strcmp(cmd, "rewrite")) {
        unsigned char b[16];
        for (int i = 0; i < 16; i++)
            b[i] = (unsigned char)(i * 3);
        int r = ioctl(fd, T_REWRITE, b);
        printf("ret=%d bytes=", r);
        for (int i = 0; i < 16; i++)
            printf("%02x", b[i]);
        printf("\n");
    } else if (!strcmp(cmd, "raw") && argc > 3) {
        unsigned long arg = strtoul(argv[3], NULL, 0);
        int r = ioctl(fd, T_RAW, arg);
        uint64_t last = 0;
        int r2 = ioctl(fd, T_LASTARG, &last);
        printf("ret=%d lastarg_ret=%d lastarg=0x%llx\n", r, r2, (unsigned long long)last);
    } else if (!strcmp(cmd, "fail") && argc > 3) {
        int r = ioctl(fd, T_FAIL, strtoul(argv[3], NULL, 0));
        printf("ret=%d errno=%d\n", r, r < 0 ? errno : 0);
    } else if (!strcmp(cmd, "wait") || !strcmp(cmd, "wait0")) {
        struct sigaction sa;
        memset(&sa, 0, sizeof(sa));
        sa.sa_handler = on_usr1; /* no SA_RESTART: the ioctl's own answer shows */
        sigaction(SIGUSR1, &sa, NULL);
        printf("waiting pid=%d\n", getpid());
        fflush(stdout);
        int r = ioctl(fd, !strcmp(cmd, "wait") ? T_WAIT : T_WAIT0);
        printf("ret=%d errno=%d handled=%d\n", r, r < 0 ? errno : 0, (int)handled);
    } else if (!strcmp(cmd, "wake")) {
        int r = ioctl(fd, T_WAKE);
        printf("ret=%d\n", r);
    } else if (!strcmp(cmd, "who-thread")) {
        pthread_t t;
        printf("main pid=%d\n", getpid());
        pthread_create(&t, NULL, who_thread, NULL);
        pthread_join(t, NULL);
    } else if (!strcmp(cmd, "waits") && argc > 3) {
        int n = atoi(argv[3]);
        pthread_t t[64];
        for (int i = 0; i < n && i < 64; i++)
            pthread_create(&t[i], NULL, wait_thread, NULL);
        for (int i = 0; i < n && i < 64; i++)
            pthread_join(t[i], NULL);
    } else {
        fprintf(stderr, "unknown command %s\n", cmd);
        return 2;
    }
    close(fd);
    return 0;
}
