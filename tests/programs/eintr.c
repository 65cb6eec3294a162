/* eintr: threads sitting in blocking calls that a signal would interrupt
 * with EINTR (SA_RESTART does not cover them). A checkpoint must be
 * invisible to each of them.
 *
 *   eintr [-n N] [-t MS] [-s STOPFILE] [-L]
 *
 * Threads that wait forever (nothing ever wakes them): poll, epoll_wait,
 * select, nanosleep (one hour), semop (SysV semaphore at 0), msgrcv (empty
 * SysV queue), pause, sigsuspend, read on an empty pipe, futex wait. Any
 * return of theirs is a FAIL (EINTR or an early return).
 * Threads in calls with a 2 s timeout, in a loop: ppoll, select (with a
 * timeout), clock_nanosleep relative and TIMER_ABSTIME, nanosleep,
 * sigtimedwait, recv on a datagram socketpair with SO_RCVTIMEO. Each must return its timeout result (0 / EAGAIN), never
 * EINTR, and not before its timeout (FAIL "early"). A call that lasts more
 * than its timeout + 700 ms prints "LATE" (it was restarted from scratch);
 * with -L that is a FAIL (for runs with live checkpoints only: a restart
 * after a kill adds the downtime), except for sigtimedwait and recv, which
 * a checkpoint enters again with their whole timeout.
 * A thread that blocks every signal with raw rt_sigprocmask and loops on
 * raw syscalls (getppid, a 1 ms nanosleep); it checks its mask stays full.
 * A thread creates and joins short-lived threads (5 ms in poll each) all
 * the time: threads appear and vanish while a checkpoint stops them.
 * Main checks every tick that every timed thread, the blocker and the
 * churn make progress.
 */
#include "common.h"
#include <linux/futex.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/ipc.h>
#include <sys/msg.h>
#include <sys/select.h>
#include <sys/sem.h>
#include <sys/socket.h>

static int strict_late = 0;
static int pipe_fd[2];
static int epfd;
static int semid, msqid;
static volatile uint32_t futex_word = 0;

#define TIMEOUT_MS 2000
#define LATE_MS 700

static volatile int exiting = 0;

__attribute__((noreturn)) static void forever_ret(const char *what, long r)
{
    while (exiting) /* main removed the SysV objects on its way out */
        pause();
    ct_fail("%s returned %ld (%s)", what, r, r < 0 ? strerror(errno) : "no error");
}

static void *t_poll(void *a)
{
    (void)a;
    struct pollfd p = { pipe_fd[0], POLLIN, 0 };
    forever_ret("poll", poll(&p, 1, -1));
}
static void *t_epoll(void *a)
{
    (void)a;
    struct epoll_event ev;
    forever_ret("epoll_wait", epoll_wait(epfd, &ev, 1, -1));
}
static void *t_select(void *a)
{
    (void)a;
    fd_set r;
    FD_ZERO(&r);
    FD_SET(pipe_fd[0], &r);
    forever_ret("select", select(pipe_fd[0] + 1, &r, NULL, NULL, NULL));
}
static void *t_longsleep(void *a)
{
    (void)a;
    struct timespec ts = { 3600, 0 };
    forever_ret("nanosleep(1 h)", nanosleep(&ts, NULL));
}
static void *t_semop(void *a)
{
    (void)a;
    struct sembuf op = { 0, -1, 0 };
    forever_ret("semop", semop(semid, &op, 1));
}
static void *t_msgrcv(void *a)
{
    (void)a;
    struct { long type; char text[64]; } m;
    forever_ret("msgrcv", msgrcv(msqid, &m, sizeof m.text, 0, 0));
}
static void *t_pause(void *a)
{
    (void)a;
    forever_ret("pause", pause());
}
static void *t_sigsuspend(void *a)
{
    (void)a;
    sigset_t s;
    sigfillset(&s);
    sigdelset(&s, SIGUSR1); /* nobody sends it */
    forever_ret("sigsuspend", sigsuspend(&s));
}
static void *t_read(void *a)
{
    (void)a;
    char c;
    forever_ret("read(empty pipe)", read(pipe_fd[0], &c, 1));
}
static void *t_futex(void *a)
{
    (void)a;
    for (;;) {
        long r = syscall(SYS_futex, &futex_word, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0);
        if (r != 0 && errno == EAGAIN)
            ct_fail("futex word changed");
        forever_ret("futex wait", r);
    }
}

/* Timed calls. */
enum { T_PPOLL, T_SELECT, T_CNREL, T_CNABS, T_NANOSLEEP, T_SIGTIMED, T_RCVTIMEO, NTIMED };
static const char *timed_name[NTIMED] = { "ppoll", "select", "clock_nanosleep", "clock_nanosleep(ABSTIME)",
                                          "nanosleep", "sigtimedwait", "recv(SO_RCVTIMEO)" };
static int dgram[2];
static volatile uint64_t timed_done[NTIMED];

static void *t_timed(void *a)
{
    int k = (int)(intptr_t)a;
    const char *name = timed_name[k];
    if (k == T_SIGTIMED) {
        sigset_t s;
        sigemptyset(&s);
        sigaddset(&s, SIGUSR2);
        pthread_sigmask(SIG_BLOCK, &s, NULL);
    }
    for (;;) {
        int64_t t0 = ct_now_ns(CLOCK_MONOTONIC);
        long r;
        int ok;
        switch (k) {
        case T_PPOLL: {
            struct pollfd p = { pipe_fd[0], POLLIN, 0 };
            struct timespec ts = { TIMEOUT_MS / 1000, (TIMEOUT_MS % 1000) * 1000000L };
            r = ppoll(&p, 1, &ts, NULL);
            ok = r == 0;
            break;
        }
        case T_SELECT: {
            fd_set rs;
            FD_ZERO(&rs);
            FD_SET(pipe_fd[0], &rs);
            struct timeval tv = { TIMEOUT_MS / 1000, (TIMEOUT_MS % 1000) * 1000 };
            r = select(pipe_fd[0] + 1, &rs, NULL, NULL, &tv);
            ok = r == 0;
            break;
        }
        case T_CNREL: {
            struct timespec ts = { TIMEOUT_MS / 1000, (TIMEOUT_MS % 1000) * 1000000L }, rem;
            r = clock_nanosleep(CLOCK_MONOTONIC, 0, &ts, &rem);
            ok = r == 0;
            if (r > 0)
                errno = (int)r;
            break;
        }
        case T_CNABS: {
            struct timespec ts;
            clock_gettime(CLOCK_MONOTONIC, &ts);
            t0 = (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
            ts.tv_sec += TIMEOUT_MS / 1000;
            r = clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
            ok = r == 0;
            if (r > 0)
                errno = (int)r;
            break;
        }
        case T_NANOSLEEP: {
            struct timespec ts = { TIMEOUT_MS / 1000, (TIMEOUT_MS % 1000) * 1000000L }, rem;
            r = syscall(SYS_nanosleep, &ts, &rem);
            ok = r == 0;
            break;
        }
        case T_RCVTIMEO: {
            struct timeval tv = { TIMEOUT_MS / 1000, (TIMEOUT_MS % 1000) * 1000 };
            if (setsockopt(dgram[0], SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) != 0)
                ct_fail("SO_RCVTIMEO: %s", strerror(errno));
            char b[16];
            r = recv(dgram[0], b, sizeof b, 0);
            ok = r < 0 && errno == EAGAIN;
            break;
        }
        default: {
            sigset_t s;
            sigemptyset(&s);
            sigaddset(&s, SIGUSR2);
            struct timespec ts = { TIMEOUT_MS / 1000, (TIMEOUT_MS % 1000) * 1000000L };
            r = sigtimedwait(&s, NULL, &ts);
            ok = r < 0 && errno == EAGAIN;
            break;
        }
        }
        int64_t ms = (ct_now_ns(CLOCK_MONOTONIC) - t0) / 1000000;
        if (!ok)
            ct_fail("%s returned %ld (%s) after %lld ms", name, r, strerror(errno), (long long)ms);
        if (ms < TIMEOUT_MS - 2)
            ct_fail("%s returned early, after %lld ms of %d", name, (long long)ms, TIMEOUT_MS);
        if (ms > TIMEOUT_MS + LATE_MS) {
            /* sigtimedwait and a socket timeout start again at a
             * checkpoint (the kernel keeps no time left): only LATE. */
            if (strict_late && k != T_SIGTIMED && k != T_RCVTIMEO)
                ct_fail("%s lasted %lld ms for a %d ms timeout (restarted from scratch?)", name, (long long)ms,
                        TIMEOUT_MS);
            printf("LATE %s %lld ms\n", name, (long long)ms);
        }
        timed_done[k]++;
    }
}

/* Creates and joins short-lived threads all the time (threads appear and
 * vanish during the stop); each sleeps 5 ms in poll. */
static volatile uint64_t churn_loops;
static void *churn_child(void *a)
{
    (void)a;
    int64_t t0 = ct_now_ns(CLOCK_MONOTONIC);
    int r = poll(NULL, 0, 5);
    if (r != 0)
        ct_fail("churn child: poll returned %d (%s)", r, strerror(errno));
    if (ct_now_ns(CLOCK_MONOTONIC) - t0 < 4 * 1000000LL)
        ct_fail("churn child: poll returned early");
    return NULL;
}
static void *t_churn(void *a)
{
    (void)a;
    for (;;) {
        pthread_t c;
        int e = pthread_create(&c, NULL, churn_child, NULL);
        if (e != 0)
            ct_fail("churn: pthread_create: %s", strerror(e));
        pthread_join(c, NULL);
        churn_loops++;
    }
}

/* Blocks every signal with the raw syscall and loops on raw syscalls. */
static volatile uint64_t blocker_loops;
static void *t_blocker(void *a)
{
    (void)a;
    uint64_t all = ~0ULL;
    for (;;) {
        if (syscall(SYS_rt_sigprocmask, SIG_SETMASK, &all, NULL, 8) != 0)
            ct_fail("rt_sigprocmask: %s", strerror(errno));
        for (int i = 0; i < 50; i++) {
            syscall(SYS_getppid);
            struct timespec ts = { 0, 1000000 };
            syscall(SYS_nanosleep, &ts, NULL);
            uint64_t cur = 0;
            syscall(SYS_rt_sigprocmask, SIG_BLOCK, NULL, &cur, 8);
            uint64_t want = ~0ULL & ~((1ULL << (SIGKILL - 1)) | (1ULL << (SIGSTOP - 1)));
            if (cur != want)
                ct_fail("blocker: signal mask %llx, want %llx", (unsigned long long)cur, (unsigned long long)want);
            blocker_loops++;
        }
    }
}

static void opt(int c, const char *arg)
{
    (void)arg;
    if (c == 'L')
        strict_late = 1;
}

int main(int argc, char **argv)
{
    ct_parse(argc, argv, "L", opt);
    ct_setup();
    if (pipe(pipe_fd) != 0)
        ct_fail("pipe: %s", strerror(errno));
    epfd = epoll_create1(0);
    struct epoll_event ev = { .events = EPOLLIN, .data.u64 = 7 };
    if (epfd < 0 || epoll_ctl(epfd, EPOLL_CTL_ADD, pipe_fd[0], &ev) != 0)
        ct_fail("epoll: %s", strerror(errno));
    if (socketpair(AF_UNIX, SOCK_DGRAM, 0, dgram) != 0)
        ct_fail("socketpair: %s", strerror(errno));
    semid = semget(IPC_PRIVATE, 1, IPC_CREAT | 0600);
    msqid = msgget(IPC_PRIVATE, IPC_CREAT | 0600);
    if (semid < 0 || msqid < 0)
        ct_fail("semget/msgget: %s", strerror(errno));
    /* SIGUSR1 has a handler (never sent) so sigsuspend/pause are plain. */
    signal(SIGUSR1, SIG_IGN);

    void *(*forever[])(void *) = { t_poll, t_epoll, t_select, t_longsleep, t_semop,
                                   t_msgrcv, t_pause, t_sigsuspend, t_read, t_futex };
    pthread_t th;
    for (size_t i = 0; i < sizeof forever / sizeof forever[0]; i++)
        if (pthread_create(&th, NULL, forever[i], NULL) != 0)
            ct_fail("pthread_create");
    for (int k = 0; k < NTIMED; k++)
        if (pthread_create(&th, NULL, t_timed, (void *)(intptr_t)k) != 0)
            ct_fail("pthread_create");
    if (pthread_create(&th, NULL, t_blocker, NULL) != 0)
        ct_fail("pthread_create");
    if (pthread_create(&th, NULL, t_churn, NULL) != 0)
        ct_fail("pthread_create");

    printf("READY\n");
    uint64_t last[NTIMED] = { 0 }, last_blocker = 0, last_churn = 0;
    int64_t last_change[NTIMED], last_blocker_change = ct_now_ns(CLOCK_MONOTONIC);
    int64_t last_churn_change = last_blocker_change;
    for (int k = 0; k < NTIMED; k++)
        last_change[k] = last_blocker_change;
    for (long tick = 1;; tick++) {
        ct_check_ids();
        int64_t now = ct_now_ns(CLOCK_MONOTONIC);
        for (int k = 0; k < NTIMED; k++) {
            if (timed_done[k] != last[k]) {
                last[k] = timed_done[k];
                last_change[k] = now;
            } else if (now - last_change[k] > 20LL * 1000000000LL) {
                ct_fail("%s thread made no progress for 20 s", timed_name[k]);
            }
        }
        if (blocker_loops != last_blocker) {
            last_blocker = blocker_loops;
            last_blocker_change = now;
        } else if (now - last_blocker_change > 20LL * 1000000000LL) {
            ct_fail("blocker thread made no progress for 20 s");
        }
        if (churn_loops != last_churn) {
            last_churn = churn_loops;
            last_churn_change = now;
        } else if (now - last_churn_change > 20LL * 1000000000LL) {
            ct_fail("thread churn made no progress for 20 s");
        }
        printf("TICK %ld ppoll=%llu blocker=%llu\n", tick, (unsigned long long)timed_done[T_PPOLL],
               (unsigned long long)blocker_loops);
        if (ct_should_stop(tick)) {
            exiting = 1;
            semctl(semid, 0, IPC_RMID);
            msgctl(msqid, IPC_RMID, NULL);
            ct_done();
        }
        ct_sleep_ms(ct_interval_ms);
    }
}
