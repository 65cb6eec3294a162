/* sessions: a process tree whose members are in sessions and groups that
 * are not simply their parent's.
 *
 *   sessions [-n N] [-t MS] [-s STOPFILE]
 *
 * R (this program) makes itself a session leader, then starts:
 *   - A, a session leader (setsid) with
 *       - Z, a child in a process group of its own that exits with status 7
 *         and stays a zombie (A never reaps it);
 *       - B, which forks C and then makes a session of its own: C keeps A's
 *         session and group (an ancestor's session, not its parent's);
 *   - D, a daemon leader (setsid) that forks O1 and O2 and exits: O1 and O2
 *     are orphans (init adopts them) in the session D left, O1 in D's group,
 *     O2 in a group of its own.
 * Every 20 ms each member checks its own pid, parent, group and session and
 * those of its children (Z through /proc: still a zombie, its own group, A's
 * session); R checks A, O1 and O2 every tick. A mismatch prints FAIL. At the
 * end R kills every member and prints DONE.
 */
#include "common.h"
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>

struct table {
    pid_t r, a, z, b, c, d, o1, o2;
    volatile int b_session, o2_group, ready_c;
};
static struct table *t;

/* ppid, pgid, sid and state of `pid` from /proc (state '?' if gone). */
static char proc_ids(pid_t pid, pid_t *ppid, pid_t *pgid, pid_t *sid)
{
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return '?';
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return '?';
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    char st = '?';
    int a = 0, b = 0, c = 0;
    if (!p || sscanf(p + 2, "%c %d %d %d", &st, &a, &b, &c) != 4)
        return '?';
    *ppid = a;
    *pgid = b;
    *sid = c;
    return st;
}

static void expect(const char *who, pid_t pid, pid_t ppid, pid_t pgid, pid_t sid, char state)
{
    pid_t pp = 0, pg = 0, s = 0;
    char st = proc_ids(pid, &pp, &pg, &s);
    if (st == '?')
        ct_fail("%s (pid %d) is gone", who, (int)pid);
    if (state == 'Z' ? st != 'Z' : st == 'Z')
        ct_fail("%s (pid %d) is in state %c", who, (int)pid, st);
    if (pp != ppid || pg != pgid || s != sid)
        ct_fail("%s (pid %d): ppid %d pgid %d sid %d, expected ppid %d pgid %d sid %d", who, (int)pid, (int)pp, (int)pg,
                (int)s, (int)ppid, (int)pgid, (int)sid);
}

static void expect_self(const char *who, pid_t pid, pid_t ppid, pid_t pgid, pid_t sid)
{
    if (getpid() != pid || getppid() != ppid || getpgid(0) != pgid || getsid(0) != sid)
        ct_fail("%s: pid %d ppid %d pgid %d sid %d, expected pid %d ppid %d pgid %d sid %d", who, (int)getpid(),
                (int)getppid(), (int)getpgid(0), (int)getsid(0), (int)pid, (int)ppid, (int)pgid, (int)sid);
}

/* A member's loop: checks every 20 ms, ends when R is gone. */
static void member(void (*check)(void))
{
    for (;;) {
        check();
        ct_sleep_ms(20);
        if (kill(t->r, 0) != 0 && errno == ESRCH)
            _exit(0);
    }
}

static void check_a(void)
{
    expect_self("A", t->a, t->r, t->a, t->a);
    expect("B (child of A)", t->b, t->a, t->b, t->b, 'S');
    expect("Z (zombie of A)", t->z, t->a, t->z, t->a, 'Z');
}
static void check_b(void)
{
    expect_self("B", t->b, t->a, t->b, t->b);
    expect("C (child of B)", t->c, t->b, t->a, t->a, 'S');
}
static void check_c(void) { expect_self("C", t->c, t->b, t->a, t->a); }
static void check_o1(void) { expect_self("O1", t->o1, 1, t->d, t->d); }
static void check_o2(void) { expect_self("O2", t->o2, 1, t->o2, t->d); }

int main(int argc, char **argv)
{
    ct_parse(argc, argv, "", NULL);
    ct_setup();
    if (setsid() < 0)
        ct_fail("setsid: %s", strerror(errno));
    t = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (t == MAP_FAILED)
        ct_fail("mmap: %s", strerror(errno));
    t->r = getpid();

    pid_t a = fork();
    if (a == 0) {
        setsid();
        t->a = getpid();
        pid_t z = fork();
        if (z == 0) {
            setpgid(0, 0);
            _exit(7);
        }
        siginfo_t info;
        waitid(P_PID, (id_t)z, &info, WEXITED | WNOWAIT);
        t->z = z;
        pid_t b = fork();
        if (b == 0) {
            t->b = getpid();
            pid_t c = fork();
            if (c == 0) {
                t->c = getpid();
                while (!t->b_session)
                    ct_sleep_ms(1);
                t->ready_c = 1;
                member(check_c);
            }
            while (!t->c)
                ct_sleep_ms(1);
            setsid();
            t->b_session = 1;
            member(check_b);
        }
        while (!t->b_session)
            ct_sleep_ms(1);
        member(check_a);
    }
    pid_t d = fork();
    if (d == 0) {
        setsid();
        t->d = getpid();
        pid_t o1 = fork();
        if (o1 == 0) {
            t->o1 = getpid();
            while (getppid() == t->d)
                ct_sleep_ms(1);
            member(check_o1);
        }
        pid_t o2 = fork();
        if (o2 == 0) {
            setpgid(0, 0);
            t->o2 = getpid();
            t->o2_group = 1;
            while (getppid() == t->d)
                ct_sleep_ms(1);
            member(check_o2);
        }
        while (!t->o2_group || !t->o1)
            ct_sleep_ms(1);
        _exit(0);
    }
    int st;
    if (waitpid(d, &st, 0) != d || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
        ct_fail("daemon leader D ended badly (%d)", st);
    while (!t->ready_c || !t->b_session)
        ct_sleep_ms(1);
    ct_sleep_ms(100);
    printf("READY A=%d Z=%d B=%d C=%d D=%d O1=%d O2=%d\n", (int)t->a, (int)t->z, (int)t->b, (int)t->c, (int)t->d,
           (int)t->o1, (int)t->o2);
    for (long tick = 1;; tick++) {
        ct_sleep_ms(ct_interval_ms);
        ct_check_ids();
        expect_self("R", t->r, getppid(), t->r, t->r);
        expect("A (child of R)", t->a, t->r, t->a, t->a, 'S');
        expect("O1 (orphan)", t->o1, 1, t->d, t->d, 'S');
        expect("O2 (orphan)", t->o2, 1, t->o2, t->d, 'S');
        pid_t pp, pg, s;
        if (proc_ids(t->d, &pp, &pg, &s) != '?')
            ct_fail("the daemon leader's pid %d is a process again", (int)t->d);
        printf("TICK %ld\n", tick);
        if (ct_should_stop(tick)) {
            pid_t all[] = {t->c, t->b, t->a, t->o1, t->o2};
            for (unsigned k = 0; k < sizeof all / sizeof all[0]; k++)
                kill(all[k], SIGKILL);
            waitpid(a, &st, 0);
            ct_done();
        }
    }
}
