/* sched: each thread's scheduling comes back: policy, real-time priority,
 * nice, CPU affinity, I/O priority.
 *
 *   sched [-n N] [-t MS] [-s STOPFILE]
 *
 * main:  SCHED_OTHER nice 7, CPUs {last}, I/O best-effort level 6;
 * batch: SCHED_BATCH nice 3, CPUs {0}, I/O idle;
 * fifo:  SCHED_FIFO priority 10 (needs root), CPUs all, I/O real-time 2;
 * idle:  SCHED_IDLE.
 * Every thread checks its own attributes every 50 ms, main every tick.
 */
#include "common.h"
#include <pthread.h>
#include <sched.h>
#include <sys/resource.h>

struct want {
    const char *name;
    int policy, prio, nice, cpu; /* cpu -1: any */
    int ioprio;
};

#define IOPRIO(class, data) (((class) << 13) | (data))

static int ncpu;

static int my_ioprio(void) { return (int)syscall(SYS_ioprio_get, 1, 0); }

static void apply(const struct want *w)
{
    struct sched_param sp = { .sched_priority = w->prio };
    if (sched_setscheduler(0, w->policy, &sp) != 0)
        ct_fail("%s: sched_setscheduler(%d, %d): %s", w->name, w->policy, w->prio, strerror(errno));
    if (w->policy == SCHED_OTHER || w->policy == SCHED_BATCH)
        if (setpriority(PRIO_PROCESS, (id_t)ct_gettid(), w->nice) != 0)
            ct_fail("%s: setpriority: %s", w->name, strerror(errno));
    if (w->cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(w->cpu, &set);
        if (sched_setaffinity(0, sizeof set, &set) != 0)
            ct_fail("%s: sched_setaffinity: %s", w->name, strerror(errno));
    }
    if (syscall(SYS_ioprio_set, 1, 0, w->ioprio) != 0)
        ct_fail("%s: ioprio_set: %s", w->name, strerror(errno));
}

static void check(const struct want *w)
{
    int policy = sched_getscheduler(0);
    struct sched_param sp;
    sched_getparam(0, &sp);
    errno = 0;
    int nice = getpriority(PRIO_PROCESS, (id_t)ct_gettid());
    if (policy != w->policy || sp.sched_priority != w->prio)
        ct_fail("%s: policy %d priority %d, not %d %d", w->name, policy, sp.sched_priority, w->policy, w->prio);
    if ((w->policy == SCHED_OTHER || w->policy == SCHED_BATCH) && nice != w->nice)
        ct_fail("%s: nice %d, not %d", w->name, nice, w->nice);
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) != 0)
        ct_fail("%s: sched_getaffinity: %s", w->name, strerror(errno));
    if (w->cpu >= 0 && (CPU_COUNT(&set) != 1 || !CPU_ISSET(w->cpu, &set)))
        ct_fail("%s: affinity has %d CPUs, not just CPU %d", w->name, CPU_COUNT(&set), w->cpu);
    if (w->cpu < 0 && CPU_COUNT(&set) != ncpu)
        ct_fail("%s: affinity has %d CPUs, not all %d", w->name, CPU_COUNT(&set), ncpu);
    if (w->cpu >= 0 && sched_getcpu() != w->cpu)
        ct_fail("%s: runs on CPU %d, outside its affinity {%d}", w->name, sched_getcpu(), w->cpu);
    if (my_ioprio() != w->ioprio)
        ct_fail("%s: I/O priority %#x, not %#x", w->name, my_ioprio(), w->ioprio);
}

static void *worker(void *arg)
{
    const struct want *w = arg;
    apply(w);
    for (;;) {
        check(w);
        ct_sleep_ms(50);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    ct_parse(argc, argv, "", NULL);
    ct_setup();
    ncpu = (int)sysconf(_SC_NPROCESSORS_ONLN);
    static struct want batch = { "batch", SCHED_BATCH, 0, 3, 0, IOPRIO(3, 0) };
    static struct want fifo = { "fifo", SCHED_FIFO, 10, 0, -1, IOPRIO(1, 2) };
    static struct want idle = { "idle", SCHED_IDLE, 0, 0, -1, IOPRIO(2, 4) };
    struct want me = { "main", SCHED_OTHER, 0, 7, 0, IOPRIO(2, 6) };
    me.cpu = ncpu - 1;
    pthread_t t;
    pthread_create(&t, NULL, worker, &batch);
    pthread_create(&t, NULL, worker, &fifo);
    pthread_create(&t, NULL, worker, &idle);
    apply(&me);
    check(&me);
    printf("READY cpus=%d\n", ncpu);
    for (long tick = 1;; tick++) {
        ct_check_ids();
        check(&me);
        printf("TICK %ld\n", tick);
        if (ct_should_stop(tick)) {
            ct_done();
            return 0;
        }
        ct_sleep_ms(ct_interval_ms);
    }
}
