/* agentfd: takes the numbers where the ckpt agent keeps its own fds
 * (800 and up) and checks every tick that each of its fds is still the
 * file it put there.
 *
 *   agentfd -d DIR [-u] [-n N] [-t MS] [-s STOPFILE]
 *
 * Setup: six files DIR/f0..f5; f0 dup2'd onto 800, f1 onto 801, f2
 * dup3'd (O_CLOEXEC) onto 802, f3 through fcntl(F_DUPFD, 803) (must give
 * 803), f4 through fcntl(F_DUPFD_CLOEXEC, 800) (must give 804), f5 dup2'd
 * onto 805..810, then close_range(805, 1100). Every fd of another's at
 * 800..1100 (the agent's, seen in /proc/self/fd) is closed with close()
 * (must fail EBADF and change nothing). Then f5 replaces the agent's
 * userfaultfd, if there is one, with a raw dup2 syscall (the number
 * printed as "RAW n"; with -u, finding none is a FAIL).
 *
 * Every tick: each fd of the program is open with the same inode, reads
 * its file's first line, has its close-on-exec flag; every other number
 * in 800..1100 is closed in the program's view (fcntl F_GETFD EBADF).
 */
#include "common.h"
#include <dirent.h>

#define LO 800
#define HI 1100

static const char *dir = ".";
static int need_uffd;
static int have[HI + 1];
static int which[HI + 1];
static ino_t inos[6];
static int cloexec[HI + 1];

static void opt(int c, const char *arg)
{
    if (c == 'd')
        dir = arg;
    if (c == 'u')
        need_uffd = 1;
}

static int open_file(int k)
{
    char p[4096];
    snprintf(p, sizeof p, "%s/f%d", dir, k);
    int fd = open(p, O_RDONLY);
    if (fd < 0)
        ct_fail("open %s: %s", p, strerror(errno));
    return fd;
}

static void own(int fd, int k, int ce)
{
    have[fd] = 1;
    which[fd] = k;
    cloexec[fd] = ce;
}

static void expect(const char *what, int got, int want)
{
    if (got != want)
        ct_fail("%s gave %d (%s), not %d", what, got, got < 0 ? strerror(errno) : "ok", want);
}

/* The number of an fd in 800..1100 that the program does not own and
 * whose link names `kind`, or -1. */
static int find_other(const char *kind)
{
    for (int n = LO; n <= HI; n++) {
        char p[64], l[256];
        snprintf(p, sizeof p, "/proc/self/fd/%d", n);
        ssize_t m = readlink(p, l, sizeof l - 1);
        if (m <= 0 || have[n])
            continue;
        l[m] = 0;
        if (strstr(l, kind))
            return n;
    }
    return -1;
}

static void check(long tick)
{
    for (int n = LO; n <= HI; n++) {
        int fl = fcntl(n, F_GETFD);
        if (!have[n]) {
            if (fl != -1 || errno != EBADF)
                ct_fail("tick %ld: fd %d is open in the program's view (flags %d), it never opened it", tick, n, fl);
            continue;
        }
        if (fl < 0)
            ct_fail("tick %ld: fd %d (f%d) is closed: %s", tick, n, which[n], strerror(errno));
        if (!!(fl & FD_CLOEXEC) != cloexec[n])
            ct_fail("tick %ld: fd %d close-on-exec is %d, not %d", tick, n, !!(fl & FD_CLOEXEC), cloexec[n]);
        struct stat st;
        if (fstat(n, &st) != 0 || st.st_ino != inos[which[n]]) {
            char l[256] = "?";
            char p[64];
            snprintf(p, sizeof p, "/proc/self/fd/%d", n);
            ssize_t m = readlink(p, l, sizeof l - 1);
            if (m > 0)
                l[m] = 0;
            ct_fail("tick %ld: fd %d is %s, not f%d", tick, n, l, which[n]);
        }
        char buf[16] = { 0 }, want[16];
        snprintf(want, sizeof want, "file %d\n", which[n]);
        if (pread(n, buf, strlen(want), 0) != (ssize_t)strlen(want) || strcmp(buf, want) != 0)
            ct_fail("tick %ld: fd %d reads \"%s\", not f%d's line", tick, n, buf, which[n]);
    }
}

int main(int argc, char **argv)
{
    ct_parse(argc, argv, "d:u", opt);
    ct_setup();
    for (int k = 0; k < 6; k++) {
        char p[4096], line[16];
        snprintf(p, sizeof p, "%s/f%d", dir, k);
        int fd = open(p, O_WRONLY | O_CREAT | O_TRUNC, 0600);
        int n = snprintf(line, sizeof line, "file %d\n", k);
        if (fd < 0 || write(fd, line, n) != n)
            ct_fail("create %s: %s", p, strerror(errno));
        struct stat st;
        fstat(fd, &st);
        inos[k] = st.st_ino;
        close(fd);
    }
    int fd;
    fd = open_file(0);
    expect("dup2(f0, 800)", dup2(fd, 800), 800);
    close(fd);
    own(800, 0, 0);
    fd = open_file(1);
    expect("dup2(f1, 801)", dup2(fd, 801), 801);
    close(fd);
    own(801, 1, 0);
    fd = open_file(2);
    expect("dup3(f2, 802, O_CLOEXEC)", dup3(fd, 802, O_CLOEXEC), 802);
    close(fd);
    own(802, 2, 1);
    fd = open_file(3);
    expect("fcntl(f3, F_DUPFD, 803)", fcntl(fd, F_DUPFD, 803), 803);
    close(fd);
    own(803, 3, 0);
    fd = open_file(4);
    expect("fcntl(f4, F_DUPFD_CLOEXEC, 800)", fcntl(fd, F_DUPFD_CLOEXEC, 800), 804);
    close(fd);
    own(804, 4, 1);
    fd = open_file(5);
    for (int n = 805; n <= 810; n++)
        expect("dup2(f5, 805..810)", dup2(fd, n), n);
    expect("close_range(805, 1100)", close_range(805, HI, 0), 0);
    for (int n = 805; n <= 810; n++)
        if (fcntl(n, F_GETFD) != -1)
            ct_fail("fd %d still open after close_range", n);
    /* close() of the agent's fds (seen in /proc) must not take them. */
    int sock = find_other("socket:");
    if (sock >= 0) {
        errno = 0;
        if (close(sock) != -1 || errno != EBADF)
            ct_fail("close(%d), the agent's socket, did not fail with EBADF (%s)", sock, strerror(errno));
    }
    int u = find_other("userfaultfd");
    if (u >= 0) {
        expect("raw dup2(f5, uffd)", (int)syscall(SYS_dup2, fd, u), u);
        own(u, 5, 0);
        printf("RAW %d\n", u);
    } else if (need_uffd) {
        ct_fail("-u: no userfaultfd of the agent's at 800..1100 to replace");
    }
    close(fd);
    check(0);
    printf("READY\n");
    for (long tick = 1;; tick++) {
        ct_check_ids();
        ct_sleep_ms(ct_interval_ms);
        check(tick);
        printf("TICK %ld\n", tick);
        if (ct_should_stop(tick)) {
            ct_done();
            return 0;
        }
    }
}
