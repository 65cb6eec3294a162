/* Shared helpers for the ckpt test programs.
 *
 * Every program:
 *   - prints line-oriented progress on stdout (line buffered),
 *   - prints "PID <pid>" at start, "READY" once initialised, then
 *     "TICK <n> ..." once per tick, "DONE" at the end (exit 0),
 *   - checks its own invariants every tick and prints "FAIL <reason>"
 *     and exits 1 when one is broken,
 *   - checks every tick that getpid()/gettid() are unchanged.
 *
 * Common options (parsed by ct_parse_common, which leaves the rest):
 *   -n N     number of ticks before DONE (default 1000000)
 *   -t MS    tick interval in milliseconds (default 100)
 *   -s FILE  stop file: when it exists and holds a number T, the program
 *            prints DONE and exits 0 once its tick counter reaches T
 *            (an empty file means "stop now").
 */
#ifndef CKPT_TEST_COMMON_H
#define CKPT_TEST_COMMON_H

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

static long ct_nticks = 1000000;
static long ct_interval_ms = 100;
static const char *ct_stopfile = NULL;
static pid_t ct_pid;
static pid_t ct_tid;

static inline pid_t ct_gettid(void) { return (pid_t)syscall(SYS_gettid); }
static inline pid_t ct_getpid_sys(void) { return (pid_t)syscall(SYS_getpid); }

__attribute__((format(printf, 1, 2), noreturn)) static void ct_fail(const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    /* One write so the line is never interleaved with other threads. */
    char line[1100];
    int n = snprintf(line, sizeof line, "FAIL %s\n", buf);
    fflush(stdout);
    if (write(1, line, (size_t)n) < 0) { /* nothing to do */ }
    _exit(1);
}

static inline uint64_t ct_mix64(uint64_t x)
{
    /* splitmix64 finaliser */
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

/* FNV-1a-like 64-bit hash over 64-bit words, position dependent. */
static inline uint64_t ct_hash_words(const uint64_t *p, size_t nwords, uint64_t seed)
{
    uint64_t h = 0xcbf29ce484222325ULL ^ seed;
    for (size_t i = 0; i < nwords; i++) {
        h ^= p[i] + i;
        h *= 0x100000001b3ULL;
        h ^= h >> 29;
    }
    return h;
}

static inline uint64_t ct_hash_bytes(const void *p, size_t n, uint64_t seed)
{
    const unsigned char *b = p;
    uint64_t h = 0xcbf29ce484222325ULL ^ seed;
    for (size_t i = 0; i < n; i++) {
        h ^= b[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

static inline int64_t ct_now_ns(clockid_t clk)
{
    struct timespec ts;
    if (clock_gettime(clk, &ts) != 0)
        ct_fail("clock_gettime(%d): %s", (int)clk, strerror(errno));
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static inline int64_t ct_now_ns_syscall(clockid_t clk)
{
    struct timespec ts;
    if (syscall(SYS_clock_gettime, clk, &ts) != 0)
        ct_fail("syscall clock_gettime(%d): %s", (int)clk, strerror(errno));
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Sleep for ms milliseconds, continuing with the remaining time when
 * interrupted by a signal (as well-behaved programs do). */
static inline void ct_sleep_ms(long ms)
{
    struct timespec req = { ms / 1000, (ms % 1000) * 1000000L }, rem;
    while (nanosleep(&req, &rem) != 0) {
        if (errno != EINTR)
            ct_fail("nanosleep: %s", strerror(errno));
        req = rem;
    }
}

/* Parse the common options; returns the index of the first unparsed
 * argument.  Program-specific options are handled by the caller. */
static inline void ct_setup(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    setvbuf(stderr, NULL, _IONBF, 0);
    ct_pid = getpid();
    ct_tid = ct_gettid();
    printf("PID %d\n", (int)ct_pid);
}

/* Checks the identity of the calling (main) thread. */
static inline void ct_check_ids(void)
{
    pid_t p = getpid(), ps = ct_getpid_sys(), t = ct_gettid();
    if (p != ct_pid || ps != ct_pid)
        ct_fail("pid changed: saved %d getpid %d syscall %d", (int)ct_pid, (int)p, (int)ps);
    if (t != ct_tid)
        ct_fail("tid changed: saved %d gettid %d", (int)ct_tid, (int)t);
}

/* Returns 1 when the program should print DONE and exit. */
static inline int ct_should_stop(long tick)
{
    if (tick >= ct_nticks)
        return 1;
    if (ct_stopfile) {
        struct stat st;
        if (stat(ct_stopfile, &st) == 0) {
            char buf[64] = {0};
            int fd = open(ct_stopfile, O_RDONLY | O_CLOEXEC);
            if (fd < 0)
                return 0;
            ssize_t n = read(fd, buf, sizeof buf - 1);
            close(fd);
            if (n <= 0)
                return 1;
            long target = strtol(buf, NULL, 10);
            return tick >= target;
        }
    }
    return 0;
}

static inline int ct_file_exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0;
}

/* Whether a stop was asked for (the stop file exists), whatever tick it
 * names. Two programs count their ticks each on its own: the one behind
 * can see its partner stop before its own counter reaches the target. */
static inline int ct_stop_requested(void)
{
    return ct_stopfile && ct_file_exists(ct_stopfile);
}

/* Handles -n/-t/-s; other options are passed to `other` (may be NULL)
 * with the option letter and its argument. */
static inline void ct_parse(int argc, char **argv, const char *extra_opts,
                            void (*other)(int opt, const char *arg))
{
    char opts[64];
    snprintf(opts, sizeof opts, "n:t:s:%s", extra_opts ? extra_opts : "");
    int c;
    while ((c = getopt(argc, argv, opts)) != -1) {
        switch (c) {
        case 'n': ct_nticks = strtol(optarg, NULL, 10); break;
        case 't': ct_interval_ms = strtol(optarg, NULL, 10); break;
        case 's': ct_stopfile = optarg; break;
        case '?': fprintf(stderr, "bad option\n"); exit(2);
        default:
            if (other) other(c, optarg);
            break;
        }
    }
}

static inline void ct_done(void)
{
    printf("DONE\n");
    fflush(stdout);
    exit(0);
}

#endif
