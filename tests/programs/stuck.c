/* stuck: holds a pseudo-terminal master whose slave is written by a
 * process outside the computation (the test), so that the drain of the
 * bytes in flight never ends on its own while someone keeps writing.
 *
 *   stuck [-n N] [-t MS] [-s STOPFILE]
 *
 * Prints "PTS <slave path>" at start. Every tick it reads whatever the
 * master holds, checks that every byte is 'x' and prints
 * "TICK n bytes=B" (B: all bytes read so far). A checkpoint round that
 * gives up must leave it every byte: the test compares B with what it
 * wrote.
 */
#include "common.h"
#include <sys/ioctl.h>

int main(int argc, char **argv)
{
    ct_parse(argc, argv, "", NULL);
    ct_setup();
    int m = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (m < 0 || grantpt(m) != 0 || unlockpt(m) != 0)
        ct_fail("posix_openpt: %s", strerror(errno));
    char name[64];
    if (ptsname_r(m, name, sizeof name) != 0)
        ct_fail("ptsname: %s", strerror(errno));
    if (fcntl(m, F_SETFL, O_NONBLOCK) != 0)
        ct_fail("O_NONBLOCK: %s", strerror(errno));
    printf("PTS %s\n", name);
    printf("READY\n");
    long total = 0;
    for (long tick = 1;; tick++) {
        ct_check_ids();
        for (;;) {
            char buf[4096];
            ssize_t n = read(m, buf, sizeof buf);
            if (n < 0 && (errno == EAGAIN || errno == EIO))
                break; /* EIO: no slave open right now */
            if (n <= 0)
                ct_fail("read from the master: %s", n == 0 ? "end of file" : strerror(errno));
            for (ssize_t i = 0; i < n; i++)
                if (buf[i] != 'x')
                    ct_fail("byte %ld is %#x, not 'x'", total + i, buf[i] & 0xff);
            total += n;
        }
        printf("TICK %ld bytes=%ld\n", tick, total);
        if (ct_should_stop(tick))
            ct_done();
        ct_sleep_ms(ct_interval_ms);
    }
}
