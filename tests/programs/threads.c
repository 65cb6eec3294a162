/* threads: many threads with mutexes, condition variables and TLS.
 *
 *   threads [-n N] [-t MS] [-s STOPFILE] [-w WORKERS]
 *
 * Threads (WORKERS defaults to 8, plus 4 others, plus main):
 *   - workers take turns (round robin handed off with a mutex and a
 *     condition variable), each incrementing the global counter and its own;
 *     every tick main hands out a budget of increments;
 *   - a thread in nanosleep (300 ms steps, EINTR continued with the rest),
 *     a thread in nanosleep for an hour (must never wake),
 *   - a thread in pthread_cond_wait woken by main every 3 ticks,
 *   - a thread blocked in read(0) (stdin: an open pipe without data).
 * Invariants checked every tick by main (under the mutex): the sum of the
 * per-worker counters equals the global counter and the handed-out budget;
 * turns are fair (counters differ by at most one);
 * each worker checks its TLS values and its tid on every increment;
 * every thread's tid is unchanged.
 */
#include "common.h"
#include <pthread.h>

#define MAXW 64
static int nworkers = 8;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t turn_cv = PTHREAD_COND_INITIALIZER;
static int turn = 0;
static uint64_t budget = 0;      /* increments handed out */
static uint64_t global_count = 0;
static uint64_t wcount[MAXW];
static pid_t wtid[MAXW];
static pthread_t wself[MAXW];
static volatile int started = 0;

static __thread uint64_t tls_magic = 0x1234567890abcdefULL; /* .tdata */
static __thread uint64_t tls_id;                            /* .tbss */
static __thread char tls_buf[256];
static __thread pid_t tls_tid;

static pthread_mutex_t cw_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cw_cv = PTHREAD_COND_INITIALIZER;
static uint64_t cw_seq = 0, cw_seen = 0;
static pid_t cw_tid;

static volatile uint64_t sleeper_wakes = 0;
static pid_t sleeper_tid, long_tid, reader_tid;
static volatile int long_woke = 0;
static volatile int reader_state = 0; /* 0 blocked, 1 EOF, 2 data */

static void tls_init(uint64_t id)
{
    tls_id = id;
    tls_tid = ct_gettid();
    for (int i = 0; i < 256; i++)
        tls_buf[i] = (char)(ct_mix64(id * 256 + (uint64_t)i));
    tls_magic ^= ct_mix64(id);
}

static void tls_check(uint64_t id, const char *who)
{
    if (tls_id != id)
        ct_fail("%s: TLS id %llu, want %llu", who, (unsigned long long)tls_id, (unsigned long long)id);
    if (tls_magic != (0x1234567890abcdefULL ^ ct_mix64(id)))
        ct_fail("%s: TLS magic corrupt", who);
    for (int i = 0; i < 256; i++)
        if (tls_buf[i] != (char)(ct_mix64(id * 256 + (uint64_t)i)))
            ct_fail("%s: TLS buffer corrupt at %d", who, i);
    pid_t t = ct_gettid();
    if (t != tls_tid)
        ct_fail("%s: tid changed from %d to %d", who, (int)tls_tid, (int)t);
    if (getpid() != ct_pid)
        ct_fail("%s: pid changed from %d to %d", who, (int)ct_pid, (int)getpid());
}

static void *worker(void *arg)
{
    int me = (int)(intptr_t)arg;
    char who[32];
    snprintf(who, sizeof who, "worker %d", me);
    tls_init((uint64_t)me + 100);
    pthread_mutex_lock(&mu);
    wtid[me] = tls_tid;
    wself[me] = pthread_self();
    started++;
    pthread_cond_broadcast(&turn_cv);
    for (;;) {
        while (turn != me || global_count >= budget)
            pthread_cond_wait(&turn_cv, &mu);
        tls_check((uint64_t)me + 100, who);
        if (!pthread_equal(pthread_self(), wself[me]))
            ct_fail("%s: pthread_self changed", who);
        global_count++;
        wcount[me]++;
        turn = (turn + 1) % nworkers;
        pthread_cond_broadcast(&turn_cv);
    }
    return NULL;
}

static void *sleeper(void *arg)
{
    (void)arg;
    tls_init(1);
    sleeper_tid = tls_tid;
    for (;;) {
        ct_sleep_ms(300);
        tls_check(1, "sleeper");
        __atomic_add_fetch(&sleeper_wakes, 1, __ATOMIC_SEQ_CST);
    }
    return NULL;
}

static void *long_sleeper(void *arg)
{
    (void)arg;
    tls_init(2);
    long_tid = tls_tid;
    ct_sleep_ms(3600L * 1000);
    long_woke = 1;
    return NULL;
}

static void *cond_waiter(void *arg)
{
    (void)arg;
    tls_init(3);
    pthread_mutex_lock(&cw_mu);
    cw_tid = tls_tid;
    for (;;) {
        while (cw_seen == cw_seq)
            pthread_cond_wait(&cw_cv, &cw_mu);
        tls_check(3, "cond waiter");
        if (cw_seq != cw_seen + 1)
            ct_fail("cond waiter: sequence jumped from %llu to %llu",
                    (unsigned long long)cw_seen, (unsigned long long)cw_seq);
        cw_seen = cw_seq;
    }
    return NULL;
}

static void *reader(void *arg)
{
    (void)arg;
    tls_init(4);
    reader_tid = tls_tid;
    char c;
    for (;;) {
        ssize_t n = read(0, &c, 1);
        if (n < 0 && errno == EINTR)
            continue;
        tls_check(4, "reader");
        if (n == 0) {
            reader_state = 1;
            printf("STDIN EOF\n");
            return NULL;
        }
        if (n < 0) {
            reader_state = 3;
            printf("STDIN ERROR %s\n", strerror(errno));
            return NULL;
        }
        reader_state = 2;
        printf("STDIN DATA %d\n", c);
    }
}

static void opt(int c, const char *arg)
{
    if (c == 'w') {
        nworkers = atoi(arg);
        if (nworkers < 2 || nworkers > MAXW) {
            fprintf(stderr, "bad -w\n");
            exit(2);
        }
    }
}

static void check_task(pid_t tid, const char *who)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/self/task/%d", (int)tid);
    if (!ct_file_exists(path))
        ct_fail("%s thread (tid %d) is gone from /proc/self/task", who, (int)tid);
}

int main(int argc, char **argv)
{
    ct_parse(argc, argv, "w:", opt);
    ct_setup();
    tls_init(0);

    pthread_t th;
    for (int i = 0; i < nworkers; i++)
        if (pthread_create(&th, NULL, worker, (void *)(intptr_t)i) != 0)
            ct_fail("pthread_create");
    if (pthread_create(&th, NULL, sleeper, NULL) || pthread_create(&th, NULL, long_sleeper, NULL) ||
        pthread_create(&th, NULL, cond_waiter, NULL) || pthread_create(&th, NULL, reader, NULL))
        ct_fail("pthread_create");

    pthread_mutex_lock(&mu);
    while (started < nworkers)
        pthread_cond_wait(&turn_cv, &mu);
    pthread_mutex_unlock(&mu);
    while (!sleeper_tid || !long_tid || !cw_tid || !reader_tid)
        ct_sleep_ms(1);
    printf("READY threads=%d\n", nworkers + 5);

    uint64_t last_sleeper = 0;
    long last_sleeper_tick = 0;
    for (long tick = 1;; tick++) {
        ct_check_ids();
        tls_check(0, "main");

        pthread_mutex_lock(&mu);
        uint64_t sum = 0, mn = UINT64_MAX, mx = 0;
        for (int i = 0; i < nworkers; i++) {
            sum += wcount[i];
            if (wcount[i] < mn) mn = wcount[i];
            if (wcount[i] > mx) mx = wcount[i];
        }
        if (sum != global_count)
            ct_fail("sum of worker counters %llu != global %llu", (unsigned long long)sum,
                    (unsigned long long)global_count);
        if (mx - mn > 1)
            ct_fail("unfair turns: min %llu max %llu", (unsigned long long)mn, (unsigned long long)mx);
        if (global_count > budget)
            ct_fail("global %llu exceeds budget %llu", (unsigned long long)global_count,
                    (unsigned long long)budget);
        /* the previous tick's budget must have been consumed by now
         * (workers had a whole tick to do 64 increments each) */
        uint64_t behind = budget - global_count;
        budget += 64 * (uint64_t)nworkers;
        pthread_cond_broadcast(&turn_cv);
        pthread_mutex_unlock(&mu);
        if (behind > 0 && tick > 1)
            printf("NOTE workers behind by %llu\n", (unsigned long long)behind);

        for (int i = 0; i < nworkers; i++)
            check_task(wtid[i], "worker");
        check_task(sleeper_tid, "sleeper");
        check_task(long_tid, "long sleeper");
        check_task(cw_tid, "cond waiter");
        if (reader_state == 0)
            check_task(reader_tid, "reader");
        if (long_woke)
            ct_fail("one-hour nanosleep returned after %ld ticks", tick);

        pthread_mutex_lock(&cw_mu);
        if (cw_seen + 1 < cw_seq)
            ct_fail("cond waiter did not wake: seen %llu seq %llu", (unsigned long long)cw_seen,
                    (unsigned long long)cw_seq);
        if (tick % 3 == 0) {
            cw_seq++;
            pthread_cond_signal(&cw_cv);
        }
        uint64_t cws = cw_seen;
        pthread_mutex_unlock(&cw_mu);

        uint64_t sw = sleeper_wakes;
        if (sw != last_sleeper) {
            last_sleeper = sw;
            last_sleeper_tick = tick;
        } else if ((tick - last_sleeper_tick) * ct_interval_ms > 5000) {
            ct_fail("sleeper thread has not woken for %ld ticks", tick - last_sleeper_tick);
        }

        printf("TICK %ld global=%llu sleeper=%llu condwakes=%llu\n", tick,
               (unsigned long long)global_count, (unsigned long long)sw, (unsigned long long)cws);
        if (ct_should_stop(tick)) {
            /* let the workers finish their budget and check once more */
            pthread_mutex_lock(&mu);
            uint64_t s2 = 0;
            for (int i = 0; i < nworkers; i++)
                s2 += wcount[i];
            if (s2 != global_count)
                ct_fail("final: sum %llu != global %llu", (unsigned long long)s2,
                        (unsigned long long)global_count);
            pthread_mutex_unlock(&mu);
            ct_done();
        }
        ct_sleep_ms(ct_interval_ms);
    }
}
