/* resources: per-process kernel state that must survive restart.
 *
 *   resources [-n N] [-t MS] [-s STOPFILE] [-a]
 *
 * At start it makes the directory res.<pid>.d under the current directory
 * and chdirs into it, then sets up, and checks every tick:
 *   - a log file opened O_APPEND, appended to each tick (the offset after
 *     each write must be the file's size and the last line the one written);
 *   - a data file read sequentially, one fixed-size record per tick (the
 *     offset and the record's content must be the expected ones), kept at
 *     fd 100 with FD_CLOEXEC, and a second O_RDWR descriptor at a low number;
 *   - cwd, umask 027, RLIMIT_NOFILE soft 777, RLIMIT_CORE soft 1 MiB;
 *   - a SIGUSR1 handler (SA_SIGINFO|SA_RESTART, mask {SIGUSR2}) raised each
 *     tick (the handler must run), SIGUSR2 ignored, SIGTERM blocked;
 *   - a periodic ITIMER_REAL of 20 ms counting SIGALRMs (the count must keep
 *     increasing), or with -a, alarm(1) re-armed by the handler;
 *   - environment variables: CKPT_TEST_SET (set by the program) and
 *     CKPT_TEST_MARK (inherited, if it was present at start).
 */
#include "common.h"
#include <limits.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/time.h>

#define REC 32
#define NREC 4096
#define DATA_FD 100

static int alarm_mode = 0;
static volatile sig_atomic_t usr1_count = 0;
static volatile sig_atomic_t alrm_count = 0;
static volatile sig_atomic_t usr1_bad = 0;
static char cwd_saved[PATH_MAX];
static char env_expect[64];
static char mark_expect[256];
static int have_mark = 0;
static int log_fd = -1, rw_fd = -1;
static long rec_index = 0;
static off_t log_size_min = 0;

static void opt(int c, const char *arg)
{
    (void)arg;
    if (c == 'a')
        alarm_mode = 1;
}

static void on_usr1(int sig, siginfo_t *si, void *uc)
{
    (void)uc;
    if (sig != SIGUSR1 || si->si_signo != SIGUSR1)
        usr1_bad = 1;
    sigset_t cur;
    pthread_sigmask(SIG_BLOCK, NULL, &cur);
    if (!sigismember(&cur, SIGUSR2)) /* sa_mask must be in effect */
        usr1_bad = 2;
    usr1_count++;
}

static void on_alrm(int sig)
{
    (void)sig;
    alrm_count++;
    if (alarm_mode)
        alarm(1);
}

static void record(long i, char *out)
{
    /* "rec 00000123 <hex>\n" padded to REC bytes */
    char tmp[REC + 1];
    snprintf(tmp, sizeof tmp, "rec %08ld %016llx", i, (unsigned long long)ct_mix64((uint64_t)i));
    memset(out, ' ', REC);
    memcpy(out, tmp, strlen(tmp));
    out[REC - 1] = '\n';
}

static void check_sigs(void)
{
    struct sigaction sa;
    if (sigaction(SIGUSR1, NULL, &sa) != 0)
        ct_fail("sigaction(SIGUSR1): %s", strerror(errno));
    if (sa.sa_sigaction != on_usr1)
        ct_fail("SIGUSR1 handler is %p, want %p", (void *)sa.sa_sigaction, (void *)on_usr1);
    if (!(sa.sa_flags & SA_SIGINFO) || !(sa.sa_flags & SA_RESTART))
        ct_fail("SIGUSR1 flags %#x lack SA_SIGINFO|SA_RESTART", (unsigned)sa.sa_flags);
    if (!sigismember(&sa.sa_mask, SIGUSR2) || sigismember(&sa.sa_mask, SIGHUP))
        ct_fail("SIGUSR1 sa_mask wrong");
    if (sigaction(SIGUSR2, NULL, &sa) != 0 || sa.sa_handler != SIG_IGN)
        ct_fail("SIGUSR2 is not ignored");
    if (sigaction(SIGALRM, NULL, &sa) != 0 || sa.sa_handler != on_alrm)
        ct_fail("SIGALRM handler lost");
    if (sigaction(SIGHUP, NULL, &sa) != 0 || sa.sa_handler != SIG_DFL)
        ct_fail("SIGHUP is not default");
    sigset_t mask;
    if (sigprocmask(SIG_BLOCK, NULL, &mask) != 0)
        ct_fail("sigprocmask: %s", strerror(errno));
    if (!sigismember(&mask, SIGTERM))
        ct_fail("SIGTERM no longer blocked");
    if (sigismember(&mask, SIGUSR1) || sigismember(&mask, SIGALRM) || sigismember(&mask, SIGHUP))
        ct_fail("unexpected signal blocked");
    int before = usr1_count;
    raise(SIGUSR1);
    if (usr1_count != before + 1)
        ct_fail("SIGUSR1 handler did not run (count %d, before %d)", (int)usr1_count, before);
    if (usr1_bad)
        ct_fail("SIGUSR1 handler saw bad state %d", (int)usr1_bad);
}

static void check_timer(long tick, int *last_alrm, long *last_alrm_tick)
{
    if (!alarm_mode) {
        struct itimerval it;
        if (getitimer(ITIMER_REAL, &it) != 0)
            ct_fail("getitimer: %s", strerror(errno));
        if (it.it_interval.tv_sec != 0 || it.it_interval.tv_usec != 20000)
            ct_fail("ITIMER_REAL interval is %ld.%06ld, want 0.020000", (long)it.it_interval.tv_sec,
                    (long)it.it_interval.tv_usec);
        if (it.it_value.tv_sec == 0 && it.it_value.tv_usec == 0)
            ct_fail("ITIMER_REAL disarmed");
    }
    int a = alrm_count;
    if (a != *last_alrm) {
        *last_alrm = a;
        *last_alrm_tick = tick;
    } else {
        long limit_ms = alarm_mode ? 3000 : 1000;
        if ((tick - *last_alrm_tick) * ct_interval_ms > limit_ms)
            ct_fail("no SIGALRM for %ld ticks (count %d)", tick - *last_alrm_tick, a);
    }
}

static void check_limits(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur != 777)
        ct_fail("RLIMIT_NOFILE soft is %llu, want 777", (unsigned long long)rl.rlim_cur);
    if (getrlimit(RLIMIT_CORE, &rl) != 0 || rl.rlim_cur != 1048576)
        ct_fail("RLIMIT_CORE soft is %llu, want 1048576", (unsigned long long)rl.rlim_cur);
    mode_t m = umask(027);
    if (m != 027)
        ct_fail("umask is %03o, want 027", (unsigned)m);
    char buf[PATH_MAX];
    if (!getcwd(buf, sizeof buf))
        ct_fail("getcwd: %s", strerror(errno));
    if (strcmp(buf, cwd_saved) != 0)
        ct_fail("cwd is %s, want %s", buf, cwd_saved);
    const char *e = getenv("CKPT_TEST_SET");
    if (!e || strcmp(e, env_expect) != 0)
        ct_fail("CKPT_TEST_SET is %s, want %s", e ? e : "(unset)", env_expect);
    if (have_mark) {
        e = getenv("CKPT_TEST_MARK");
        if (!e || strcmp(e, mark_expect) != 0)
            ct_fail("CKPT_TEST_MARK is %s, want %s", e ? e : "(unset)", mark_expect);
    }
}

static void do_log(long tick)
{
    int fl = fcntl(log_fd, F_GETFL);
    if (fl < 0 || !(fl & O_APPEND) || (fl & O_ACCMODE) != O_WRONLY)
        ct_fail("log fd flags %#x: want O_WRONLY|O_APPEND", fl);
    char line[64];
    int n = snprintf(line, sizeof line, "tick %08ld pid %d\n", tick, (int)ct_pid);
    if (write(log_fd, line, (size_t)n) != n)
        ct_fail("log write: %s", strerror(errno));
    off_t off = lseek(log_fd, 0, SEEK_CUR);
    struct stat st;
    if (fstat(log_fd, &st) != 0)
        ct_fail("fstat log: %s", strerror(errno));
    if (off != st.st_size)
        ct_fail("log offset %lld != size %lld after append", (long long)off, (long long)st.st_size);
    if (st.st_size < log_size_min + n)
        ct_fail("log shrank: size %lld < %lld", (long long)st.st_size, (long long)(log_size_min + n));
    log_size_min = st.st_size;
    char back[64];
    if (pread(rw_fd, back, (size_t)n, st.st_size - n) != n || memcmp(back, line, (size_t)n) != 0)
        ct_fail("last log line is not the one just appended");
}

static void do_read(void)
{
    int fdfl = fcntl(DATA_FD, F_GETFD);
    if (fdfl < 0 || !(fdfl & FD_CLOEXEC))
        ct_fail("data fd %d: F_GETFD %d, want FD_CLOEXEC", DATA_FD, fdfl);
    int fl = fcntl(DATA_FD, F_GETFL);
    if (fl < 0 || (fl & O_ACCMODE) != O_RDONLY)
        ct_fail("data fd flags %#x, want O_RDONLY", fl);
    off_t off = lseek(DATA_FD, 0, SEEK_CUR);
    if (off != (off_t)(rec_index * REC))
        ct_fail("data fd offset %lld, want %lld", (long long)off, (long long)(rec_index * REC));
    char got[REC], want[REC];
    for (int k = 0; k < 3; k++) { /* three records per tick */
        ssize_t n = read(DATA_FD, got, REC);
        if (n != REC)
            ct_fail("read data record %ld: %zd (%s)", rec_index, n, strerror(errno));
        record(rec_index, want);
        if (memcmp(got, want, REC) != 0)
            ct_fail("data record %ld: got '%.20s' want '%.20s'", rec_index, got, want);
        rec_index++;
        if (rec_index == NREC) {
            if (lseek(DATA_FD, 0, SEEK_SET) != 0)
                ct_fail("lseek: %s", strerror(errno));
            rec_index = 0;
        }
    }
}

int main(int argc, char **argv)
{
    ct_parse(argc, argv, "a", opt);
    ct_setup();

    char dir[64];
    snprintf(dir, sizeof dir, "res.%d.d", (int)ct_pid);
    if (mkdir(dir, 0755) != 0 && errno != EEXIST)
        ct_fail("mkdir %s: %s", dir, strerror(errno));
    if (chdir(dir) != 0)
        ct_fail("chdir %s: %s", dir, strerror(errno));
    if (!getcwd(cwd_saved, sizeof cwd_saved))
        ct_fail("getcwd: %s", strerror(errno));
    umask(027);

    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = 777;
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0)
        ct_fail("setrlimit NOFILE: %s", strerror(errno));
    getrlimit(RLIMIT_CORE, &rl);
    if (rl.rlim_max != RLIM_INFINITY && rl.rlim_max < 1048576)
        rl.rlim_max = 1048576; /* we are root in the tests */
    rl.rlim_cur = 1048576;
    if (setrlimit(RLIMIT_CORE, &rl) != 0)
        ct_fail("setrlimit CORE: %s", strerror(errno));

    snprintf(env_expect, sizeof env_expect, "value-%d", (int)ct_pid);
    setenv("CKPT_TEST_SET", env_expect, 1);
    const char *mark = getenv("CKPT_TEST_MARK");
    if (mark) {
        have_mark = 1;
        snprintf(mark_expect, sizeof mark_expect, "%s", mark);
    }

    /* data file */
    int fd = open("data", O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0)
        ct_fail("create data: %s", strerror(errno));
    for (long i = 0; i < NREC; i++) {
        char r[REC];
        record(i, r);
        if (write(fd, r, REC) != REC)
            ct_fail("write data: %s", strerror(errno));
    }
    close(fd);
    fd = open("data", O_RDONLY);
    if (fd < 0 || dup2(fd, DATA_FD) != DATA_FD)
        ct_fail("open/dup2 data: %s", strerror(errno));
    close(fd);
    fcntl(DATA_FD, F_SETFD, FD_CLOEXEC);

    log_fd = open("log", O_WRONLY | O_APPEND | O_CREAT, 0644);
    rw_fd = open("log", O_RDWR);
    if (log_fd < 0 || rw_fd < 0)
        ct_fail("open log: %s", strerror(errno));

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_usr1;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaddset(&sa.sa_mask, SIGUSR2);
    if (sigaction(SIGUSR1, &sa, NULL) != 0)
        ct_fail("sigaction: %s", strerror(errno));
    signal(SIGUSR2, SIG_IGN);
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alrm;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGALRM, &sa, NULL);
    sigset_t blk;
    sigemptyset(&blk);
    sigaddset(&blk, SIGTERM);
    sigprocmask(SIG_BLOCK, &blk, NULL);

    if (alarm_mode) {
        alarm(1);
    } else {
        struct itimerval it = { { 0, 20000 }, { 0, 20000 } };
        if (setitimer(ITIMER_REAL, &it, NULL) != 0)
            ct_fail("setitimer: %s", strerror(errno));
    }
    printf("READY dir=%s log_fd=%d rw_fd=%d data_fd=%d\n", cwd_saved, log_fd, rw_fd, DATA_FD);

    int last_alrm = 0;
    long last_alrm_tick = 0;
    for (long tick = 1;; tick++) {
        ct_check_ids();
        check_limits();
        check_sigs();
        check_timer(tick, &last_alrm, &last_alrm_tick);
        do_log(tick);
        do_read();
        printf("TICK %ld alarms=%d usr1=%d rec=%ld\n", tick, (int)alrm_count, (int)usr1_count,
               rec_index);
        if (ct_should_stop(tick))
            ct_done();
        ct_sleep_ms(ct_interval_ms);
    }
}
