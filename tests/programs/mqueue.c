/* mqueue: POSIX message queues come back with their attributes and their
 * messages, in order, with their priorities.
 *
 *   mqueue [-n N] [-t MS] [-s STOPFILE] [-q NAME]
 *
 * Q1: a named queue NAME (default /ckpt-test-mq-PID), mode 0600, maxmsg 8,
 *     msgsize 64, opened read-only (r) and write-only (w, a second open
 *     file description). Each tick r receives the 5 messages sent last
 *     tick ("t=T k=K", priority K % 3): highest priority first, in order
 *     within a priority; then w sends the next 5.
 * Q2: a queue unlinked right after mq_open, O_NONBLOCK, maxmsg 4, msgsize
 *     128, kept full: a fifth send fails with EAGAIN; each tick its 4
 *     messages are taken, checked and sent again with the new tick.
 * At DONE the named queue is unlinked.
 */
#include "common.h"
#include <mqueue.h>

static char name[256];
static void opt(int c, const char *arg)
{
    if (c == 'q')
        snprintf(name, sizeof name, "%s", arg);
}

static void check_attr(mqd_t q, long maxmsg, long msgsize, long flags, long cur, const char *what, long tick)
{
    struct mq_attr a;
    if (mq_getattr(q, &a) != 0)
        ct_fail("tick %ld: mq_getattr %s: %s", tick, what, strerror(errno));
    if (a.mq_maxmsg != maxmsg || a.mq_msgsize != msgsize || (a.mq_flags & O_NONBLOCK) != flags || a.mq_curmsgs != cur)
        ct_fail("tick %ld: %s has maxmsg %ld msgsize %ld flags %#lx curmsgs %ld, not %ld %ld %#lx %ld", tick, what, a.mq_maxmsg, a.mq_msgsize,
                a.mq_flags, a.mq_curmsgs, maxmsg, msgsize, flags, cur);
}

static void send1(mqd_t q, long tick, int k, unsigned prio)
{
    char m[64];
    int n = snprintf(m, sizeof m, "t=%ld k=%d", tick, k);
    if (mq_send(q, m, (size_t)n, prio) != 0)
        ct_fail("tick %ld: mq_send %d: %s", tick, k, strerror(errno));
}

static void expect(mqd_t q, long tick, int k, unsigned prio, size_t size)
{
    char m[256], want[64];
    unsigned p = 99;
    ssize_t n = mq_receive(q, m, size, &p);
    if (n < 0)
        ct_fail("tick %ld: mq_receive (want k=%d): %s", tick, k, strerror(errno));
    m[n] = 0;
    snprintf(want, sizeof want, "t=%ld k=%d", tick, k);
    if (strcmp(m, want) != 0 || p != prio)
        ct_fail("tick %ld: received \"%s\" priority %u, not \"%s\" priority %u", tick, m, p, want, prio);
}

int main(int argc, char **argv)
{
    ct_parse(argc, argv, "q:", opt);
    ct_setup();
    if (!name[0])
        snprintf(name, sizeof name, "/ckpt-test-mq-%d", (int)getpid());
    struct mq_attr a1 = { .mq_maxmsg = 8, .mq_msgsize = 64 };
    mq_unlink(name);
    mqd_t w = mq_open(name, O_WRONLY | O_CREAT | O_EXCL, 0600, &a1);
    mqd_t r = mq_open(name, O_RDONLY);
    if (w < 0 || r < 0)
        ct_fail("mq_open %s: %s", name, strerror(errno));
    char n2[300];
    snprintf(n2, sizeof n2, "%s-unlinked", name);
    struct mq_attr a2 = { .mq_maxmsg = 4, .mq_msgsize = 128 };
    mq_unlink(n2);
    mqd_t u = mq_open(n2, O_RDWR | O_CREAT | O_EXCL | O_NONBLOCK, 0640, &a2);
    if (u < 0)
        ct_fail("mq_open %s: %s", n2, strerror(errno));
    mq_unlink(n2);
    for (int k = 0; k < 5; k++)
        send1(w, 0, k, (unsigned)(k % 3));
    for (int k = 0; k < 4; k++)
        send1(u, 0, k, 7);
    printf("READY\n");
    for (long tick = 1;; tick++) {
        ct_check_ids();
        ct_sleep_ms(ct_interval_ms);
        check_attr(r, 8, 64, 0, 5, "the named queue", tick);
        check_attr(u, 4, 128, O_NONBLOCK, 4, "the unlinked queue", tick);
        if (mq_send(w, "x", 1, 0) == 0) {
            /* the queue has room: fine, take it out again below */
        }
        /* priority 2: k=2; priority 1: k=1, k=4; priority 0: k=0, k=3 */
        expect(r, tick - 1, 2, 2, 64);
        expect(r, tick - 1, 1, 1, 64);
        expect(r, tick - 1, 4, 1, 64);
        expect(r, tick - 1, 0, 0, 64);
        expect(r, tick - 1, 3, 0, 64);
        char x[64];
        if (mq_receive(r, x, 64, NULL) != 1)
            ct_fail("tick %ld: the extra message is not last", tick);
        for (int k = 0; k < 5; k++)
            send1(w, tick, k, (unsigned)(k % 3));
        if (mq_send(u, "full", 4, 0) == 0 || errno != EAGAIN)
            ct_fail("tick %ld: the full non-blocking queue took a fifth message (%s)", tick, strerror(errno));
        for (int k = 0; k < 4; k++)
            expect(u, tick - 1, k, 7, 128);
        for (int k = 0; k < 4; k++)
            send1(u, tick, k, 7);
        printf("TICK %ld\n", tick);
        if (ct_should_stop(tick)) {
            mq_unlink(name);
            ct_done();
            return 0;
        }
    }
}
