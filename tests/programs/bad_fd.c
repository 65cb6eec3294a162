/* bad_fd: holds a file descriptor of a kind ckpt cannot checkpoint (yet),
 * or of a kind it can (to compare).
 *
 *   bad_fd [-n N] [-t MS] [-s STOPFILE] [-k KIND] [-f FD] [-c CTL]
 *
 * KIND is pidfd (default; not checkpointable), eventfd, timerfd, signalfd
 * or inotify (checkpointable); the descriptor is
 * moved to number FD (default 57).  Without -c it is opened at start; with
 * -c the program opens it when the file CTL.open appears and closes it when
 * CTL.close appears (prints "OPENED fd=57 kind=pidfd" / "CLOSED fd=57").
 * While open, the descriptor is exercised every tick and must keep working.
 */
#include "common.h"
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/inotify.h>
#include <sys/signalfd.h>
#include <sys/timerfd.h>

static const char *kind = "pidfd";
static int target_fd = 57;
static const char *ctl = NULL;
static int is_open = 0;

static void opt(int c, const char *arg)
{
    switch (c) {
    case 'k': kind = arg; break;
    case 'f': target_fd = atoi(arg); break;
    case 'c': ctl = arg; break;
    }
}

static void open_it(void)
{
    int fd;
    if (strcmp(kind, "pidfd") == 0) {
        fd = (int)syscall(SYS_pidfd_open, getpid(), 0);
    } else if (strcmp(kind, "eventfd") == 0) {
        fd = eventfd(0, 0);
    } else if (strcmp(kind, "timerfd") == 0) {
        fd = timerfd_create(CLOCK_MONOTONIC, 0);
        struct itimerspec its = { { 0, 10000000 }, { 0, 10000000 } };
        if (fd >= 0)
            timerfd_settime(fd, 0, &its, NULL);
    } else if (strcmp(kind, "signalfd") == 0) {
        sigset_t m;
        sigemptyset(&m);
        sigaddset(&m, SIGUSR2);
        sigprocmask(SIG_BLOCK, &m, NULL);
        fd = signalfd(-1, &m, 0);
    } else if (strcmp(kind, "inotify") == 0) {
        fd = inotify_init();
    } else {
        fprintf(stderr, "unknown kind %s\n", kind);
        exit(2);
    }
    if (fd < 0)
        ct_fail("create %s: %s", kind, strerror(errno));
    if (dup2(fd, target_fd) != target_fd)
        ct_fail("dup2: %s", strerror(errno));
    close(fd);
    is_open = 1;
    printf("OPENED fd=%d kind=%s\n", target_fd, kind);
}

static void exercise(void)
{
    uint64_t v;
    if (strcmp(kind, "pidfd") == 0) {
        if (syscall(SYS_pidfd_send_signal, target_fd, 0, NULL, 0) != 0)
            ct_fail("pidfd_send_signal: %s", strerror(errno));
    } else if (strcmp(kind, "eventfd") == 0) {
        v = 3;
        if (write(target_fd, &v, 8) != 8)
            ct_fail("eventfd write: %s", strerror(errno));
        if (read(target_fd, &v, 8) != 8 || v != 3)
            ct_fail("eventfd read: got %llu (%s)", (unsigned long long)v, strerror(errno));
    } else if (strcmp(kind, "timerfd") == 0) {
        if (read(target_fd, &v, 8) != 8 || v == 0)
            ct_fail("timerfd read: %s", strerror(errno));
    } else if (strcmp(kind, "signalfd") == 0) {
        raise(SIGUSR2);
        struct signalfd_siginfo si;
        if (read(target_fd, &si, sizeof si) != sizeof si || si.ssi_signo != SIGUSR2)
            ct_fail("signalfd read: %s", strerror(errno));
    }
    if (fcntl(target_fd, F_GETFD) < 0)
        ct_fail("fd %d is gone", target_fd);
}

int main(int argc, char **argv)
{
    ct_parse(argc, argv, "k:f:c:", opt);
    ct_setup();
    char open_path[512], close_path[512];
    if (ctl) {
        snprintf(open_path, sizeof open_path, "%s.open", ctl);
        snprintf(close_path, sizeof close_path, "%s.close", ctl);
    } else {
        open_it();
    }
    printf("READY\n");
    int closed = 0;
    for (long tick = 1;; tick++) {
        ct_check_ids();
        if (ctl && !is_open && !closed && ct_file_exists(open_path))
            open_it();
        if (ctl && is_open && ct_file_exists(close_path)) {
            close(target_fd);
            is_open = 0;
            closed = 1;
            printf("CLOSED fd=%d\n", target_fd);
        }
        if (is_open)
            exercise();
        printf("TICK %ld open=%d\n", tick, is_open);
        if (ct_should_stop(tick))
            ct_done();
        ct_sleep_ms(ct_interval_ms);
    }
}
