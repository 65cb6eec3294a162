/* rseq_vdso: glibc's rseq registration and the vDSO after restart.
 *
 *   rseq_vdso [-n N] [-t MS] [-s STOPFILE]
 *
 * Two threads (main and a helper) pin themselves alternately to two CPUs
 * every tick with sched_setaffinity and check that the kernel keeps
 * updating their rseq area (cpu_id in glibc's area == the pinned CPU ==
 * sched_getcpu() == the getcpu syscall), and that the rseq area is still
 * registered at the same address (re-registering it must fail with EBUSY).
 * A third thread has no rseq (it unregisters glibc's area, as a thread just
 * cloned has none until glibc's start_thread registers it) and checks every
 * tick that it still has none: a restart that registered one for such a
 * thread would make glibc's own registration fail, which aborts it.
 * Every tick it also checks that [vdso], [vvar] and [vvar_vclock] are at
 * the addresses they had at start, that AT_SYSINFO_EHDR points to [vdso],
 * and that vDSO clocks agree with the syscalls and keep advancing.
 */
#include "common.h"
#include <pthread.h>
#include <sched.h>
#include <sys/auxv.h>
#include <sys/rseq.h>
#include <sys/time.h>

#ifndef RSEQ_SIG
#define RSEQ_SIG 0x53053053
#endif
#define UNREGISTER 1 /* RSEQ_FLAG_UNREGISTER */

static int cpus[2];
static int ncpus_usable;
static unsigned rseq_len_reg;
static char maps_saved[3][128];
static const char *special[3] = { "[vdso]", "[vvar]", "[vvar_vclock]" };
static volatile long helper_ticks = 0;
static volatile long bare_ticks = 0;

static struct rseq *rseq_area(void)
{
    return (struct rseq *)((char *)__builtin_thread_pointer() + __rseq_offset);
}

static void pin_and_check(int cpu, const char *who)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof set, &set) != 0)
        ct_fail("%s: sched_setaffinity(%d): %s", who, cpu, strerror(errno));
    unsigned sc = 0;
    if (syscall(SYS_getcpu, &sc, NULL, NULL) != 0)
        ct_fail("%s: getcpu: %s", who, strerror(errno));
    if ((int)sc != cpu)
        ct_fail("%s: getcpu syscall says %u, pinned to %d", who, sc, cpu);
    int g = sched_getcpu();
    if (g != cpu)
        ct_fail("%s: sched_getcpu() %d, pinned to %d (rseq area not updated?)", who, g, cpu);
    if (__rseq_size > 0) {
        struct rseq *rs = rseq_area();
        if ((int)rs->cpu_id != cpu || (int)rs->cpu_id_start != cpu)
            ct_fail("%s: rseq cpu_id %u cpu_id_start %u, pinned to %d (rseq not registered?)", who,
                    rs->cpu_id, rs->cpu_id_start, cpu);
        long r = syscall(SYS_rseq, rs, rseq_len_reg, 0, RSEQ_SIG);
        if (r == 0)
            ct_fail("%s: rseq area at %p was not registered (re-registering succeeded)", who, (void *)rs);
        if (errno != EBUSY)
            ct_fail("%s: rseq re-register probe gave %s, want EBUSY (registered elsewhere?)", who,
                    strerror(errno));
    }
}

static void read_special(char out[3][128])
{
    for (int i = 0; i < 3; i++)
        strcpy(out[i], "absent");
    FILE *f = fopen("/proc/self/maps", "re");
    if (!f)
        ct_fail("open /proc/self/maps: %s", strerror(errno));
    char line[512];
    while (fgets(line, sizeof line, f)) {
        for (int i = 0; i < 3; i++) {
            size_t l = strlen(line);
            if (l && line[l - 1] == '\n')
                line[--l] = 0;
            size_t sl = strlen(special[i]);
            if (l >= sl && strcmp(line + l - sl, special[i]) == 0) {
                char *sp = strchr(line, ' ');
                snprintf(out[i], 128, "%.*s", (int)(sp - line), line);
            }
        }
    }
    fclose(f);
}

static void check_vdso(void)
{
    char now[3][128];
    read_special(now);
    for (int i = 0; i < 3; i++)
        if (strcmp(now[i], maps_saved[i]) != 0)
            ct_fail("%s moved: %s at start, now %s", special[i], maps_saved[i], now[i]);
    unsigned long ehdr = getauxval(AT_SYSINFO_EHDR);
    unsigned long start = strtoul(now[0], NULL, 16);
    if (ehdr != start)
        ct_fail("AT_SYSINFO_EHDR %#lx != [vdso] start %#lx", ehdr, start);
}

static void check_clocks(int64_t *last_mono, int64_t *last_boot)
{
    clockid_t ids[3] = { CLOCK_MONOTONIC, CLOCK_REALTIME, CLOCK_BOOTTIME };
    for (int i = 0; i < 3; i++) {
        int64_t v = ct_now_ns(ids[i]);
        int64_t s = ct_now_ns_syscall(ids[i]);
        if (s < v || s - v > 200000000LL)
            ct_fail("vDSO clock %d reads %lld, syscall %lld", (int)ids[i], (long long)v, (long long)s);
    }
    struct timeval tv;
    gettimeofday(&tv, NULL);
    int64_t rs = ct_now_ns_syscall(CLOCK_REALTIME);
    int64_t g = (int64_t)tv.tv_sec * 1000000000LL + tv.tv_usec * 1000LL;
    if (llabs(rs - g) > 200000000LL)
        ct_fail("gettimeofday %lld disagrees with clock_gettime %lld", (long long)g, (long long)rs);
    time_t t = time(NULL);
    if (llabs((long long)t - rs / 1000000000LL) > 1)
        ct_fail("time() %lld disagrees with clock_gettime %lld", (long long)t, (long long)(rs / 1000000000LL));
    int64_t m = ct_now_ns(CLOCK_MONOTONIC), b = ct_now_ns(CLOCK_BOOTTIME);
    if (*last_mono) {
        int64_t min = ct_interval_ms * 900000LL;
        if (m - *last_mono < min)
            ct_fail("CLOCK_MONOTONIC advanced %lld ns over a %ld ms sleep", (long long)(m - *last_mono),
                    ct_interval_ms);
        if (b - *last_boot < min)
            ct_fail("CLOCK_BOOTTIME advanced %lld ns over a %ld ms sleep", (long long)(b - *last_boot),
                    ct_interval_ms);
    }
    *last_mono = m;
    *last_boot = b;
}

static void *helper(void *arg)
{
    (void)arg;
    pid_t mytid = ct_gettid();
    for (long k = 0;; k++) {
        if (ct_gettid() != mytid)
            ct_fail("helper: tid changed from %d to %d", (int)mytid, (int)ct_gettid());
        pin_and_check(cpus[(k + 1) % ncpus_usable], "helper");
        helper_ticks = k + 1;
        ct_sleep_ms(ct_interval_ms);
    }
    return NULL;
}

/* The thread without rseq: registering its area must succeed (none is
 * registered), and is undone at once. */
static void *bare(void *arg)
{
    (void)arg;
    if (syscall(SYS_rseq, rseq_area(), rseq_len_reg, UNREGISTER, RSEQ_SIG) != 0)
        ct_fail("bare: unregistering glibc's rseq area: %s", strerror(errno));
    for (;;) {
        if (syscall(SYS_rseq, rseq_area(), rseq_len_reg, 0, RSEQ_SIG) != 0)
            ct_fail("bare: a thread without rseq has one registered (%s): registered for it by a restart?",
                    strerror(errno));
        if (syscall(SYS_rseq, rseq_area(), rseq_len_reg, UNREGISTER, RSEQ_SIG) != 0)
            ct_fail("bare: unregistering the probe: %s", strerror(errno));
        bare_ticks++;
        ct_sleep_ms(ct_interval_ms);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    ct_parse(argc, argv, "", NULL);
    ct_setup();
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) != 0)
        ct_fail("sched_getaffinity: %s", strerror(errno));
    for (int c = 0; c < CPU_SETSIZE && ncpus_usable < 2; c++)
        if (CPU_ISSET(c, &set))
            cpus[ncpus_usable++] = c;
    if (ncpus_usable == 1)
        printf("NOTE only one usable CPU: rseq cpu_id cannot be seen changing\n");

    if (__rseq_size == 0)
        printf("NOTE glibc did not register rseq (__rseq_size 0)\n");
    else {
        /* find the length glibc registered with: re-registering with it gives EBUSY */
        unsigned lens[2] = { 32, __rseq_size };
        for (int i = 0; i < 2 && !rseq_len_reg; i++)
            if (syscall(SYS_rseq, rseq_area(), lens[i], 0, RSEQ_SIG) != 0 && errno == EBUSY)
                rseq_len_reg = lens[i];
        if (!rseq_len_reg)
            ct_fail("cannot find glibc's rseq registration (offset %td size %u)", __rseq_offset,
                    __rseq_size);
    }
    read_special(maps_saved);
    if (strcmp(maps_saved[0], "absent") == 0)
        ct_fail("no [vdso] mapping");
    pthread_t th;
    if (pthread_create(&th, NULL, helper, NULL) != 0)
        ct_fail("pthread_create");
    pthread_t bth;
    if (__rseq_size > 0 && pthread_create(&bth, NULL, bare, NULL) != 0)
        ct_fail("pthread_create");
    printf("READY cpus=%d,%d rseq_offset=%td rseq_size=%u vdso=%s vvar=%s vvar_vclock=%s\n", cpus[0],
           cpus[ncpus_usable - 1], __rseq_offset, __rseq_size, maps_saved[0], maps_saved[1],
           maps_saved[2]);

    int64_t last_mono = 0, last_boot = 0;
    long last_helper = 0, last_helper_tick = 0;
    for (long tick = 1;; tick++) {
        ct_check_ids();
        pin_and_check(cpus[tick % ncpus_usable], "main");
        check_vdso();
        check_clocks(&last_mono, &last_boot);
        long h = helper_ticks;
        if (h != last_helper) {
            last_helper = h;
            last_helper_tick = tick;
        } else if (tick - last_helper_tick > 20) {
            ct_fail("helper thread stopped ticking");
        }
        printf("TICK %ld cpu=%d helper=%ld bare=%ld\n", tick, sched_getcpu(), h, bare_ticks);
        if (ct_should_stop(tick))
            ct_done();
        ct_sleep_ms(ct_interval_ms);
    }
}
