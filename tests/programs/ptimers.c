/* ptimers: POSIX timers (timer_create) keep their ids, clocks,
 * notifications, intervals and time left.
 *
 *   ptimers [-n N] [-t MS] [-s STOPFILE] [-T]
 *
 * Timers:
 *   A  CLOCK_MONOTONIC, SIGEV_SIGNAL SIGUSR1 with sigev_value 0x1234abcd,
 *      every 20 ms: the handler checks si_value and si_timerid and counts;
 *   B  CLOCK_REALTIME, SIGEV_THREAD_ID to a worker thread, SIGUSR2, one
 *      shot in an hour: armed, its time left only goes down;
 *   D  CLOCK_MONOTONIC, SIGEV_NONE, one shot in 1000 s, 7 s interval;
 *   C  (-T) SIGEV_THREAD every 30 ms: glibc's helper thread runs a
 *      callback that counts.
 * Every tick: the ids in /proc/self/timers are the ones made at start,
 * timer_gettime works on each, A fired since the last tick (and so did C),
 * B's and D's time left did not grow and their intervals are unchanged.
 */
#include "common.h"
#include <pthread.h>
#include <signal.h>

static timer_t ta, tb, tc, td;
static int with_thread_timer;
static volatile sig_atomic_t a_count, a_bad, b_fired;
static volatile long c_count;
static pid_t worker_tid;

static void opt(int c, const char *arg)
{
    (void)arg;
    if (c == 'T')
        with_thread_timer = 1;
}

static void on_a(int sig, siginfo_t *si, void *uc)
{
    (void)sig;
    (void)uc;
    if (si->si_value.sival_ptr != (void *)0x1234abcdUL || si->si_code != SI_TIMER || si->si_timerid != (int)(intptr_t)ta)
        a_bad = 1;
    a_count++;
}

static void on_b(int sig) { (void)sig; b_fired = 1; }

static void on_c(union sigval v)
{
    if (v.sival_int == 77)
        __atomic_add_fetch(&c_count, 1, __ATOMIC_RELAXED);
}

static void *worker(void *arg)
{
    (void)arg;
    worker_tid = ct_gettid();
    for (;;)
        pause();
    return NULL;
}

static double left(timer_t t, double *interval)
{
    struct itimerspec its;
    if (timer_gettime(t, &its) != 0)
        ct_fail("timer_gettime(%ld): %s", (long)(intptr_t)t, strerror(errno));
    *interval = its.it_interval.tv_sec + its.it_interval.tv_nsec / 1e9;
    return its.it_value.tv_sec + its.it_value.tv_nsec / 1e9;
}

static int ids[8], nids;

static int proc_ids(int *out, int cap)
{
    FILE *f = fopen("/proc/self/timers", "r");
    char line[256];
    int n = 0;
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "ID: ", 4) && n < cap)
            out[n++] = atoi(line + 4);
    if (f)
        fclose(f);
    return n;
}

static int cmp_int(const void *a, const void *b) { return *(const int *)a - *(const int *)b; }

int main(int argc, char **argv)
{
    ct_parse(argc, argv, "T", opt);
    ct_setup();
    struct sigaction sa = {0};
    sa.sa_sigaction = on_a;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigaction(SIGUSR1, &sa, NULL);
    signal(SIGUSR2, on_b);
    pthread_t th;
    pthread_create(&th, NULL, worker, NULL);
    while (!__atomic_load_n(&worker_tid, __ATOMIC_ACQUIRE))
        ct_sleep_ms(1);

    struct sigevent ev = {0};
    ev.sigev_notify = SIGEV_SIGNAL;
    ev.sigev_signo = SIGUSR1;
    ev.sigev_value.sival_ptr = (void *)0x1234abcdUL;
    if (timer_create(CLOCK_MONOTONIC, &ev, &ta) != 0)
        ct_fail("timer_create A: %s", strerror(errno));
    struct itimerspec its = { { 0, 20000000 }, { 0, 20000000 } };
    timer_settime(ta, 0, &its, NULL);

    memset(&ev, 0, sizeof ev);
    ev.sigev_notify = SIGEV_THREAD_ID;
    ev._sigev_un._tid = worker_tid;
    ev.sigev_signo = SIGUSR2;
    if (timer_create(CLOCK_REALTIME, &ev, &tb) != 0)
        ct_fail("timer_create B: %s", strerror(errno));
    struct itimerspec hour = { { 0, 0 }, { 3600, 0 } };
    timer_settime(tb, 0, &hour, NULL);

    memset(&ev, 0, sizeof ev);
    ev.sigev_notify = SIGEV_NONE;
    if (timer_create(CLOCK_MONOTONIC, &ev, &td) != 0)
        ct_fail("timer_create D: %s", strerror(errno));
    struct itimerspec long_one = { { 7, 0 }, { 1000, 0 } };
    timer_settime(td, 0, &long_one, NULL);

    if (with_thread_timer) {
        memset(&ev, 0, sizeof ev);
        ev.sigev_notify = SIGEV_THREAD;
        ev.sigev_notify_function = on_c;
        ev.sigev_value.sival_int = 77;
        if (timer_create(CLOCK_MONOTONIC, &ev, &tc) != 0)
            ct_fail("timer_create C: %s", strerror(errno));
        struct itimerspec c = { { 0, 30000000 }, { 0, 30000000 } };
        timer_settime(tc, 0, &c, NULL);
    }
    nids = proc_ids(ids, 8);
    qsort(ids, (size_t)nids, sizeof *ids, cmp_int);
    printf("READY timers=%d\n", nids);

    double b_prev = 1e9, d_prev = 1e9;
    long a_prev = 0, c_prev = 0;
    for (long tick = 1;; tick++) {
        ct_check_ids();
        ct_sleep_ms(ct_interval_ms);
        int now[8], n = proc_ids(now, 8);
        qsort(now, (size_t)n, sizeof *now, cmp_int);
        if (n != nids || memcmp(now, ids, sizeof(int) * (size_t)n) != 0)
            ct_fail("tick %ld: /proc/self/timers lists %d timers (first %d), not the %d made at start (first %d)", tick, n, n ? now[0] : -1, nids, ids[0]);
        double iv, l;
        l = left(ta, &iv);
        if (iv < 0.0199 || iv > 0.0201)
            ct_fail("tick %ld: timer A's interval is %f s", tick, iv);
        l = left(tb, &iv);
        if (l <= 0 || l > b_prev + 0.001 || iv != 0 || b_fired)
            ct_fail("tick %ld: timer B has %f s left (before: %f), interval %f, fired %d", tick, l, b_prev, iv, (int)b_fired);
        b_prev = l;
        l = left(td, &iv);
        if (l <= 0 || l > d_prev + 0.001 || iv != 7)
            ct_fail("tick %ld: timer D has %f s left (before: %f), interval %f", tick, l, d_prev, iv);
        d_prev = l;
        if (a_bad)
            ct_fail("tick %ld: timer A's signal came with the wrong si_value/si_code/si_timerid", tick);
        long a = a_count, c = __atomic_load_n(&c_count, __ATOMIC_RELAXED);
        if (a <= a_prev)
            ct_fail("tick %ld: timer A did not fire since the last tick (%ld)", tick, a);
        if (with_thread_timer && c <= c_prev)
            ct_fail("tick %ld: the SIGEV_THREAD timer's callback did not run since the last tick (%ld)", tick, c);
        a_prev = a;
        c_prev = c;
        printf("TICK %ld a=%ld c=%ld b_left=%.1f\n", tick, a, c, b_prev);
        if (ct_should_stop(tick)) {
            ct_done();
            return 0;
        }
    }
}
