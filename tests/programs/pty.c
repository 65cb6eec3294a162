/* pty: a parent reads numbered lines from a pseudo-terminal master; its
 * child, a session leader whose controlling terminal is the slave, writes
 * them through the slave.
 *
 *   pty [-n N] [-t MS] [-s STOPFILE] [-b LINES] [-p]
 *
 * The child writes LINES lines (default 8) every 20 ms, each
 * "LINE <seq> <ct_mix64(seq)>\n" (the master reads "\r\n": ONLCR), and
 * checks every time that the slave is still its controlling terminal and
 * that the window size (33x101) and terminal settings are the ones it
 * started with. The parent reads whatever is there once per tick and checks
 * every byte: lines follow each other with no gap, repeat or change. Each
 * tick prints "TICK n lines=L". Prints "CHILD <pid>" at start.
 * As a shell does with a foreground job, the child starts a grandchild in
 * a process group of its own and makes it the terminal's foreground group
 * (tcsetpgrp); the child (now in the background) and the grandchild check
 * every time that it still is (tcgetpgrp). The child prints "FG <pid>".
 * The grandchild exits when the child is gone.
 * -p: the master is in packet mode (TIOCPKT): every read starts with a
 * header byte, 0 before data (a control status byte alone is counted and
 * skipped); the parent checks every tick that packet mode is still on
 * (TIOCGPKT) and prints "PACKET on" at start.
 */
#include "common.h"
#include <sys/stat.h>
#include <poll.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <termios.h>

static int burst = 8;
static int packet;

static void opt(int c, const char *arg)
{
    if (c == 'b') burst = atoi(arg);
    if (c == 'p') packet = 1;
}

static int line_of(long seq, char *buf, size_t n, const char *nl)
{
    return snprintf(buf, n, "LINE %08ld %016llx%s", seq, (unsigned long long)ct_mix64((uint64_t)seq), nl);
}

static void child(const char *name)
{
    pid_t me = getpid();
    if (setsid() != me)
        ct_fail("child: setsid: %s", strerror(errno));
    int s = open(name, O_RDWR); /* a session leader without a terminal: it becomes the controlling one */
    if (s < 0)
        ct_fail("child: open %s: %s", name, strerror(errno));
    struct termios t0, t;
    if (tcgetattr(s, &t0) != 0)
        ct_fail("child: tcgetattr: %s", strerror(errno));
    fflush(stdout);
    pid_t fg = fork();
    if (fg < 0)
        ct_fail("child: fork: %s", strerror(errno));
    if (fg == 0) {
        pid_t g = getpid();
        if (setpgid(0, 0) != 0)
            ct_fail("grandchild: setpgid: %s", strerror(errno));
        /* Until the child has given it the terminal. */
        for (int i = 0; tcgetpgrp(s) != g; i++) {
            if (i == 500)
                ct_fail("grandchild: never became the foreground group");
            ct_sleep_ms(10);
        }
        while (getppid() == me) {
            if (getpid() != g || (pid_t)syscall(SYS_getpid) != g)
                ct_fail("grandchild: pid changed from %d", (int)g);
            pid_t now = tcgetpgrp(s);
            if (now != g)
                ct_fail("grandchild: the terminal's foreground group is %d, not mine (%d): %s", (int)now, (int)g, strerror(errno));
            ct_sleep_ms(20);
        }
        _exit(0);
    }
    /* As a shell does: the group made from both sides, then given the
     * terminal. */
    setpgid(fg, fg);
    if (tcsetpgrp(s, fg) != 0)
        ct_fail("child: tcsetpgrp: %s", strerror(errno));
    printf("FG %d\n", (int)fg);
    /* Its controlling terminal opened as /dev/tty, kept: every other line
     * goes through it. */
    int devtty = open("/dev/tty", O_WRONLY | O_NOCTTY);
    if (devtty < 0)
        ct_fail("child: /dev/tty: %s", strerror(errno));
    for (long seq = 1;; seq++) {
        char buf[128];
        int n = line_of(seq, buf, sizeof buf, "\n");
        if (write(seq % 2 ? s : devtty, buf, (size_t)n) != n)
            ct_fail("child: write line %ld: %s", seq, strerror(errno));
        if (seq % burst)
            continue;
        struct winsize ws;
        if (getpid() != me || (pid_t)syscall(SYS_getpid) != me)
            ct_fail("child: pid changed from %d", (int)me);
        if (tcgetpgrp(s) != fg)
            ct_fail("child: the terminal's foreground group is %d, not %d: %s", (int)tcgetpgrp(s), (int)fg, strerror(errno));
        if (tcgetsid(s) != me)
            ct_fail("child: the slave is not my controlling terminal any more (tcgetsid %d: %s)", (int)tcgetsid(s), strerror(errno));
        int tty = open("/dev/tty", O_RDWR | O_NOCTTY | O_CLOEXEC);
        if (tty < 0)
            ct_fail("child: /dev/tty: %s", strerror(errno));
        close(tty);
        if (ioctl(s, TIOCGWINSZ, &ws) != 0 || ws.ws_row != 33 || ws.ws_col != 101)
            ct_fail("child: window size %dx%d", ws.ws_row, ws.ws_col);
        if (tcgetattr(s, &t) != 0 || t.c_iflag != t0.c_iflag || t.c_oflag != t0.c_oflag || t.c_lflag != t0.c_lflag ||
            t.c_cflag != t0.c_cflag || memcmp(t.c_cc, t0.c_cc, sizeof t.c_cc) != 0)
            ct_fail("child: terminal settings changed (oflag %o -> %o, lflag %o -> %o)", t0.c_oflag, t.c_oflag, t0.c_lflag, t.c_lflag);
        ct_sleep_ms(20);
    }
}

int main(int argc, char **argv)
{
    ct_parse(argc, argv, "b:p", opt);
    ct_setup();
    int m = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (m < 0 || grantpt(m) != 0 || unlockpt(m) != 0)
        ct_fail("posix_openpt: %s", strerror(errno));
    /* The slave's mode: 0640, not what devpts gives (0600 or 0620), checked every tick
     * on a slave fd the parent keeps (read-only, never read). */
    int sf = ioctl(m, TIOCGPTPEER, O_RDONLY | O_NOCTTY | O_CLOEXEC);
    if (sf < 0 || fchmod(sf, 0640) != 0)
        ct_fail("fchmod of the slave: %s", strerror(errno));
    struct winsize ws = { .ws_row = 33, .ws_col = 101 };
    if (ioctl(m, TIOCSWINSZ, &ws) != 0)
        ct_fail("TIOCSWINSZ: %s", strerror(errno));
    char name[64];
    if (ptsname_r(m, name, sizeof name) != 0)
        ct_fail("ptsname: %s", strerror(errno));
    fflush(stdout);
    pid_t c = fork();
    if (c < 0)
        ct_fail("fork: %s", strerror(errno));
    if (c == 0) {
        close(m);
        child(name);
    }
    if (fcntl(m, F_SETFL, O_NONBLOCK) != 0)
        ct_fail("O_NONBLOCK: %s", strerror(errno));
    if (packet) {
        int on = 1;
        if (ioctl(m, TIOCPKT, &on) != 0)
            ct_fail("TIOCPKT: %s", strerror(errno));
        printf("PACKET on\n");
    }
    printf("CHILD %d\n", (int)c);
    printf("READY\n");
    static char pending[1 << 16];
    size_t have = 0;
    long next = 1;
    for (long tick = 1;; tick++) {
        ct_check_ids();
        if (packet) {
            int on = 0;
            if (ioctl(m, TIOCGPKT, &on) != 0 || !on)
                ct_fail("the master is not in packet mode any more (TIOCGPKT %d: %s)", on, strerror(errno));
        }
        for (;;) {
            static char pkt[sizeof pending + 1];
            ssize_t n;
            if (packet) {
                n = read(m, pkt, sizeof pending - have + 1);
                if (n > 0 && pkt[0] != 0) {
                    if (n != 1)
                        ct_fail("a control status packet (%#x) of %zd bytes", pkt[0] & 0xff, n);
                    continue; /* a status alone: no data */
                }
                if (n == 1)
                    ct_fail("a data packet with no data");
                if (n > 1) {
                    memcpy(pending + have, pkt + 1, (size_t)n - 1);
                    n--;
                }
            } else {
                n = read(m, pending + have, sizeof pending - have);
            }
            if (n < 0 && errno == EAGAIN)
                break;
            if (n <= 0)
                ct_fail("read from the master: %s", n == 0 ? "end of file" : strerror(errno));
            have += (size_t)n;
            char want[128];
            int w;
            size_t off = 0;
            while (have - off >= (size_t)(w = line_of(next, want, sizeof want, "\r\n"))) {
                if (memcmp(pending + off, want, (size_t)w) != 0)
                    ct_fail("line %ld: got \"%.*s\"", next, w, pending + off);
                off += (size_t)w;
                next++;
            }
            memmove(pending, pending + off, have - off);
            have -= off;
        }
        int st;
        if (waitpid(c, &st, WNOHANG) != 0)
            ct_fail("the child ended (status %x)", st);
        struct stat sst;
        if (fstat(sf, &sst) != 0 || (sst.st_mode & 07777) != 0640 || sst.st_uid != getuid())
            ct_fail("the slave is not mode 0640 owned by uid %d (mode %o uid %d): %s", (int)getuid(), (unsigned)sst.st_mode, (int)sst.st_uid, strerror(errno));
        printf("TICK %ld lines=%ld\n", tick, next - 1);
        if (ct_should_stop(tick)) {
            kill(c, SIGKILL);
            waitpid(c, &st, 0);
            ct_done();
        }
        ct_sleep_ms(ct_interval_ms);
    }
}
