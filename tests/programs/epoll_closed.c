/* epoll_closed: epoll items registered through fds that were closed later,
 * the epoll still watching their files.
 *
 *   epoll_closed [-n N] [-t MS] [-s STOPFILE]
 *
 * Pipe A's read end is added to an epoll as fd X (data 0xa), dup'ed to Y,
 * and X closed: its number stays free. Pipe B's read end is added as fd U
 * (data 0xb), dup'ed to W, U closed and /dev/null opened, taking number U
 * again. Every tick a byte goes into each pipe: epoll_wait must report
 * both items (data 0xa and 0xb, EPOLLIN), the bytes are read from Y and W,
 * then epoll_wait must report nothing; X must still be free and U still
 * /dev/null.
 */
#include "common.h"
#include <sys/epoll.h>
#include <sys/sysmacros.h>

int main(int argc, char **argv)
{
    ct_parse(argc, argv, "", NULL);
    ct_setup();
    int a[2], b[2];
    if (pipe(a) || pipe(b))
        ct_fail("pipe: %s", strerror(errno));
    int ep = epoll_create1(0);
    if (ep < 0)
        ct_fail("epoll_create1: %s", strerror(errno));
    /* X and U well apart from the other fds. */
    int x = dup2(a[0], 40), u = dup2(b[0], 41);
    close(a[0]);
    close(b[0]);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 0xa};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, x, &ev))
        ct_fail("epoll_ctl X: %s", strerror(errno));
    ev.data.u64 = 0xb;
    if (epoll_ctl(ep, EPOLL_CTL_ADD, u, &ev))
        ct_fail("epoll_ctl U: %s", strerror(errno));
    int y = dup2(x, 50), w = dup2(u, 51);
    close(x);
    close(u);
    int null = open("/dev/null", O_RDONLY);
    if (null != u && dup2(null, u) == u)
        close(null);
    struct stat n0;
    if (fstat(u, &n0))
        ct_fail("fstat U: %s", strerror(errno));
    printf("READY X=%d Y=%d U=%d W=%d\n", x, y, u, w);
    for (long tick = 1;; tick++) {
        ct_sleep_ms(ct_interval_ms);
        ct_check_ids();
        if (write(a[1], "a", 1) != 1 || write(b[1], "b", 1) != 1)
            ct_fail("write: %s", strerror(errno));
        struct epoll_event got[4];
        int seen = 0;
        for (int tries = 0; tries < 10 && seen != 3; tries++) {
            int n = epoll_wait(ep, got, 4, 1000);
            if (n < 0 && errno != EINTR)
                ct_fail("epoll_wait: %s", strerror(errno));
            for (int k = 0; k < n; k++) {
                if (!(got[k].events & EPOLLIN))
                    ct_fail("event %#x for item %#lx", got[k].events, (unsigned long)got[k].data.u64);
                if (got[k].data.u64 == 0xa)
                    seen |= 1;
                else if (got[k].data.u64 == 0xb)
                    seen |= 2;
                else
                    ct_fail("event for an unknown item %#lx", (unsigned long)got[k].data.u64);
            }
        }
        if (seen != 3)
            ct_fail("epoll reported items %#x of 0x3 (1: pipe A through closed fd %d, 2: pipe B through reused fd %d)", seen, x, u);
        char c;
        if (read(y, &c, 1) != 1 || c != 'a' || read(w, &c, 1) != 1 || c != 'b')
            ct_fail("reading the pipes: %s", strerror(errno));
        int n = epoll_wait(ep, got, 4, 0);
        if (n != 0)
            ct_fail("epoll reports %d items with the pipes empty", n);
        if (fcntl(x, F_GETFD) != -1 || errno != EBADF)
            ct_fail("fd %d is open again", x);
        struct stat ns;
        if (fstat(u, &ns) || ns.st_rdev != n0.st_rdev || ns.st_ino != n0.st_ino)
            ct_fail("fd %d is not /dev/null any more", u);
        printf("TICK %ld\n", tick);
        if (ct_should_stop(tick))
            ct_done();
    }
}
