/* pendsig: pending signals come back, process-wide and per thread, with
 * their siginfo and, for real-time signals, every queued instance in order.
 *
 *   pendsig [-n N] [-t MS] [-s STOPFILE]
 *
 * Every thread blocks SIGHUP, SIGUSR1, SIGUSR2 and SIGRTMIN+3. Pending for
 * the process: SIGHUP from kill() (SI_USER, si_pid = own pid), SIGUSR1
 * from sigqueue() with value 111, SIGRTMIN+3 queued three times with values
 * 1, 2, 3. Pending for the worker thread only: SIGUSR2 with value 222.
 * Every tick each side takes its signals (sigtimedwait, zero timeout),
 * checks code, sender and value, and queues them again the same way.
 */
#include "common.h"
#include <pthread.h>
#include <signal.h>

static pthread_t worker_th;
static volatile int worker_ok_ticks;

static void take(int sig, int code, int value, const char *who, long tick)
{
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, sig);
    struct timespec zero = { 0, 0 };
    siginfo_t si;
    if (sigtimedwait(&s, &si, &zero) != sig)
        ct_fail("tick %ld: %s: signal %d is not pending (%s)", tick, who, sig, strerror(errno));
    if (si.si_code != code || si.si_pid != ct_pid || (code == SI_QUEUE && si.si_value.sival_int != value))
        ct_fail("tick %ld: %s: signal %d came with code %d pid %d value %d, not code %d pid %d value %d", tick, who, sig, si.si_code, (int)si.si_pid,
                si.si_value.sival_int, code, (int)ct_pid, value);
}

static void requeue_process(void)
{
    union sigval v;
    kill(getpid(), SIGHUP);
    v.sival_int = 111;
    sigqueue(getpid(), SIGUSR1, v);
    for (int k = 1; k <= 3; k++) {
        v.sival_int = k;
        sigqueue(getpid(), SIGRTMIN + 3, v);
    }
}

static void *worker(void *arg)
{
    (void)arg;
    union sigval v = { .sival_int = 222 };
    pthread_sigqueue(pthread_self(), SIGUSR2, v);
    for (long tick = 1;; tick++) {
        ct_sleep_ms(50);
        sigset_t p;
        sigpending(&p);
        if (!sigismember(&p, SIGUSR2))
            ct_fail("worker tick %ld: SIGUSR2 is not pending for the worker", tick);
        take(SIGUSR2, SI_QUEUE, 222, "worker", tick);
        pthread_sigqueue(pthread_self(), SIGUSR2, v);
        worker_ok_ticks++;
    }
    return NULL;
}

int main(int argc, char **argv)
{
    ct_parse(argc, argv, "", NULL);
    ct_setup();
    sigset_t block;
    sigemptyset(&block);
    sigaddset(&block, SIGHUP);
    sigaddset(&block, SIGUSR1);
    sigaddset(&block, SIGUSR2);
    sigaddset(&block, SIGRTMIN + 3);
    pthread_sigmask(SIG_BLOCK, &block, NULL);
    pthread_create(&worker_th, NULL, worker, NULL);
    requeue_process();
    printf("READY\n");
    for (long tick = 1;; tick++) {
        ct_check_ids();
        ct_sleep_ms(ct_interval_ms);
        sigset_t p;
        sigpending(&p);
        if (sigismember(&p, SIGUSR2))
            ct_fail("tick %ld: the worker's SIGUSR2 is pending for the main thread", tick);
        take(SIGHUP, SI_USER, 0, "process", tick);
        take(SIGUSR1, SI_QUEUE, 111, "process", tick);
        for (int k = 1; k <= 3; k++)
            take(SIGRTMIN + 3, SI_QUEUE, k, "process", tick);
        sigset_t rt;
        sigemptyset(&rt);
        sigaddset(&rt, SIGRTMIN + 3);
        struct timespec zero = { 0, 0 };
        if (sigtimedwait(&rt, NULL, &zero) > 0)
            ct_fail("tick %ld: a fourth SIGRTMIN+3 was pending", tick);
        requeue_process();
        printf("TICK %ld worker=%d\n", tick, worker_ok_ticks);
        if (ct_should_stop(tick)) {
            ct_done();
            return 0;
        }
    }
}
