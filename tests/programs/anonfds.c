/* anonfds: an eventfd, a semaphore eventfd, two timerfds, a signalfd, an
 * inotify instance, pipes and two epolls (one inside the other), all
 * exercised every tick; every check is the program's own.
 *
 *   anonfds [-n N] [-t MS] [-s STOPFILE] -w DIR -c CTL
 *
 * Each tick: adds 1 to the eventfd (read every 7th tick, the count must be
 * the writes since the last read), reads the semaphore eventfd once (1 each
 * time; its fdinfo count must be the start value minus the reads), writes
 * a byte into each pipe and one to the one-shot eventfd, then waits on the
 * epoll until it has seen the eventfd, the periodic timer (50 ms), the
 * pipe (edge-triggered), the one-shot eventfd (re-armed with
 * EPOLL_CTL_MOD) and the inner epoll (which holds the second pipe). It
 * then modifies the pipe's item (EPOLL_CTL_MOD) and checks from its own
 * fdinfo that every item keeps its flags (EPOLLET, EPOLLONESHOT,
 * EPOLLEXCLUSIVE) and data.
 * Other events: SIGUSR2 through the signalfd prints "SIGNAL 12"; a file
 * created in DIR prints "INOTIFY CREATE name wd=W" (W must be the watch's
 * wd: the instance had a watch removed before, so wd 1 is a gap).
 * When CTL.check appears: the one-shot timerfd, which expired 1 ms after
 * the start and was never read, must read 1 ("UNREAD-TIMER 1").
 */
#include "common.h"
#include <signal.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/inotify.h>
#include <sys/signalfd.h>
#include <sys/timerfd.h>

#define SEM_START 1000000ULL

static const char *dir = NULL, *ctl = NULL;
static int efd, semfd, efd1, tfd, tfd1, sfd, ifd, ep, ep2, pr, pw, p2r, p2w;
static int wd_w;

static void opt(int c, const char *arg)
{
    if (c == 'w') dir = arg;
    if (c == 'c') ctl = arg;
}

/* /proc/self/fdinfo/FD into buf (NUL-terminated) */
static void fdinfo(int fd, char *buf, size_t size)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fdinfo/%d", fd);
    int f = open(path, O_RDONLY | O_CLOEXEC);
    ssize_t n = f < 0 ? -1 : read(f, buf, size - 1);
    if (f >= 0) close(f);
    if (n <= 0) ct_fail("read %s: %s", path, strerror(errno));
    buf[n] = 0;
}

static uint64_t fdinfo_hex(int fd, const char *key)
{
    char buf[4096];
    fdinfo(fd, buf, sizeof buf);
    char *p = strstr(buf, key);
    if (!p) ct_fail("fdinfo of %d has no %s", fd, key);
    return strtoull(p + strlen(key), NULL, 16);
}

/* events and data of epoll item tfd in ep's fdinfo */
static void item(int epfd, int target, unsigned *events, uint64_t *data)
{
    char buf[4096], key[32];
    fdinfo(epfd, buf, sizeof buf);
    for (char *l = buf; l && *l; l = strchr(l, '\n') ? strchr(l, '\n') + 1 : NULL) {
        int t;
        unsigned long long d;
        if (sscanf(l, "tfd: %d events: %x data: %llx", &t, events, &d) == 3 && t == target) {
            *data = d;
            return;
        }
    }
    snprintf(key, sizeof key, "%d", target);
    ct_fail("epoll %d has no item for fd %s:\n%s", epfd, key, buf);
}

static void add(int epfd, int fd, unsigned events, uint64_t data)
{
    struct epoll_event ev = { .events = events, .data.u64 = data };
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) != 0)
        ct_fail("epoll_ctl ADD %d: %s", fd, strerror(errno));
}

static void setup(void)
{
    efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    semfd = eventfd(0, EFD_SEMAPHORE | EFD_CLOEXEC);
    uint64_t v = SEM_START;
    if (efd < 0 || semfd < 0 || write(semfd, &v, 8) != 8)
        ct_fail("eventfd: %s", strerror(errno));
    efd1 = eventfd(0, EFD_NONBLOCK);
    tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    tfd1 = timerfd_create(CLOCK_BOOTTIME, TFD_NONBLOCK);
    struct itimerspec per = { { 0, 50000000 }, { 0, 50000000 } }, once = { { 0, 0 }, { 0, 1000000 } };
    if (tfd < 0 || tfd1 < 0 || timerfd_settime(tfd, 0, &per, NULL) || timerfd_settime(tfd1, 0, &once, NULL))
        ct_fail("timerfd: %s", strerror(errno));
    sigset_t m;
    sigemptyset(&m);
    sigaddset(&m, SIGUSR2);
    if (sigprocmask(SIG_BLOCK, &m, NULL) != 0 || (sfd = signalfd(-1, &m, SFD_NONBLOCK | SFD_CLOEXEC)) < 0)
        ct_fail("signalfd: %s", strerror(errno));
    ifd = inotify_init1(IN_NONBLOCK);
    char a[600], b[600];
    snprintf(a, sizeof a, "%s/a", dir);
    snprintf(b, sizeof b, "%s/b", dir);
    mkdir(a, 0755);
    mkdir(b, 0755);
    int wa = inotify_add_watch(ifd, a, IN_CREATE);
    if (wa < 0 || inotify_add_watch(ifd, b, IN_CREATE) < 0 || (wd_w = inotify_add_watch(ifd, dir, IN_CREATE | IN_ONLYDIR)) < 0)
        ct_fail("inotify_add_watch: %s", strerror(errno));
    inotify_rm_watch(ifd, wa);
    char ev[4096];
    if (read(ifd, ev, sizeof ev) <= 0) /* the IN_IGNORED of the removal */
        ct_fail("inotify: no IN_IGNORED after rm_watch");
    int p[2];
    if (pipe2(p, O_NONBLOCK) || (pr = p[0], pw = p[1], pipe2(p, O_NONBLOCK)))
        ct_fail("pipe: %s", strerror(errno));
    p2r = p[0];
    p2w = p[1];
    ep = epoll_create1(EPOLL_CLOEXEC);
    ep2 = epoll_create1(0);
    if (ep < 0 || ep2 < 0)
        ct_fail("epoll_create1: %s", strerror(errno));
    add(ep, efd, EPOLLIN, 1);
    add(ep, tfd, EPOLLIN, 2);
    add(ep, sfd, EPOLLIN | EPOLLEXCLUSIVE, 3);
    add(ep, ifd, EPOLLIN, 4);
    add(ep, pr, EPOLLIN | EPOLLET, 5);
    add(ep, efd1, EPOLLIN | EPOLLONESHOT, 6);
    add(ep, ep2, EPOLLIN, 7);
    add(ep2, p2r, EPOLLIN, 8);
    printf("FDS efd=%d sem=%d oneshot=%d timer=%d timer1=%d signal=%d inotify=%d ep=%d ep2=%d wd=%d\n", efd, semfd, efd1,
           tfd, tfd1, sfd, ifd, ep, ep2, wd_w);
}

static long writes_since_read, sem_reads, pipe_seq, pipe_next, pipe2_seq, pipe2_next, timer_total;

static void on_event(uint64_t d, unsigned *seen)
{
    uint64_t v;
    char buf[4096];
    switch (d) {
    case 1: break; /* level-triggered, read every 7th tick */
    case 2:
        if (read(tfd, &v, 8) == 8) timer_total += (long)v;
        break;
    case 3: {
        struct signalfd_siginfo si;
        while (read(sfd, &si, sizeof si) == sizeof si)
            printf("SIGNAL %u\n", si.ssi_signo);
        break;
    }
    case 4: {
        ssize_t n;
        while ((n = read(ifd, buf, sizeof buf)) > 0) {
            for (char *p = buf; p < buf + n;) {
                struct inotify_event *e = (struct inotify_event *)p;
                if (e->mask & IN_CREATE) {
                    if (e->wd != wd_w)
                        ct_fail("inotify event for wd %d, the watch is wd %d", e->wd, wd_w);
                    printf("INOTIFY CREATE %s wd=%d\n", e->len ? e->name : "?", e->wd);
                }
                p += sizeof *e + e->len;
            }
        }
        break;
    }
    case 5: { /* edge-triggered: read all */
        ssize_t n;
        while ((n = read(pr, buf, sizeof buf)) > 0)
            for (ssize_t i = 0; i < n; i++, pipe_next++)
                if ((unsigned char)buf[i] != (unsigned char)(pipe_next * 7))
                    ct_fail("pipe byte %ld is %u", pipe_next, (unsigned char)buf[i]);
        break;
    }
    case 6: {
        if (read(efd1, &v, 8) != 8)
            ct_fail("one-shot eventfd: %s", strerror(errno));
        struct epoll_event ev = { .events = EPOLLIN | EPOLLONESHOT, .data.u64 = 6 };
        if (epoll_ctl(ep, EPOLL_CTL_MOD, efd1, &ev) != 0)
            ct_fail("re-arming the one-shot item: %s", strerror(errno));
        break;
    }
    case 7: {
        struct epoll_event e2[4];
        int k = epoll_wait(ep2, e2, 4, 0);
        if (k != 1 || e2[0].data.u64 != 8)
            ct_fail("inner epoll: %d events (%s), first data %llu", k, strerror(errno), k > 0 ? (unsigned long long)e2[0].data.u64 : 0ULL);
        ssize_t n;
        while ((n = read(p2r, buf, sizeof buf)) > 0)
            for (ssize_t i = 0; i < n; i++, pipe2_next++)
                if ((unsigned char)buf[i] != (unsigned char)(pipe2_next * 13))
                    ct_fail("pipe 2 byte %ld is %u", pipe2_next, (unsigned char)buf[i]);
        break;
    }
    default: ct_fail("epoll data %llu", (unsigned long long)d);
    }
    *seen |= 1u << d;
}

static void check_items(void)
{
    static const struct { int *fd; unsigned flags; uint64_t data; } want[] = {
        { &efd, EPOLLIN, 1 }, { &tfd, EPOLLIN, 2 }, { &sfd, EPOLLIN | EPOLLEXCLUSIVE, 3 }, { &ifd, EPOLLIN, 4 },
        { &pr, EPOLLIN | EPOLLET, 5 }, { &efd1, EPOLLONESHOT, 6 }, { &ep2, EPOLLIN, 7 },
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        unsigned ev;
        uint64_t d;
        item(ep, *want[i].fd, &ev, &d);
        if ((ev & want[i].flags) != want[i].flags || d != want[i].data)
            ct_fail("epoll item fd %d: events %x data %llu, expected flags %x data %llu", *want[i].fd, ev,
                    (unsigned long long)d, want[i].flags, (unsigned long long)want[i].data);
    }
}

int main(int argc, char **argv)
{
    ct_parse(argc, argv, "w:c:", opt);
    ct_setup();
    if (!dir || !ctl)
        ct_fail("usage: anonfds -w DIR -c CTL");
    setup();
    char check_path[600];
    snprintf(check_path, sizeof check_path, "%s.check", ctl);
    int checked = 0;
    printf("READY\n");
    for (long tick = 1;; tick++) {
        ct_check_ids();
        uint64_t v = 1;
        if (write(efd, &v, 8) != 8)
            ct_fail("eventfd write: %s", strerror(errno));
        writes_since_read++;
        if (read(semfd, &v, 8) != 8 || v != 1)
            ct_fail("semaphore eventfd read %llu (%s)", (unsigned long long)v, strerror(errno));
        sem_reads++;
        uint64_t left = fdinfo_hex(semfd, "eventfd-count:");
        if (left != SEM_START - (uint64_t)sem_reads)
            ct_fail("semaphore eventfd count %llu, expected %llu", (unsigned long long)left, SEM_START - (unsigned long long)sem_reads);
        unsigned char b = (unsigned char)(pipe_seq++ * 7), b2 = (unsigned char)(pipe2_seq++ * 13);
        if (write(pw, &b, 1) != 1 || write(p2w, &b2, 1) != 1 || write(efd1, &v, 8) != 8)
            ct_fail("write: %s", strerror(errno));
        unsigned seen = 0, need = (1u << 1) | (1u << 2) | (1u << 5) | (1u << 6) | (1u << 7);
        int64_t deadline = ct_now_ns(CLOCK_MONOTONIC) + 2000000000LL;
        while ((seen & need) != need) {
            if (ct_now_ns(CLOCK_MONOTONIC) > deadline)
                ct_fail("epoll_wait: after 2 s only %x of %x", seen, need);
            struct epoll_event evs[16];
            int k = epoll_wait(ep, evs, 16, 200);
            if (k < 0 && errno != EINTR)
                ct_fail("epoll_wait: %s", strerror(errno));
            for (int i = 0; i < k; i++)
                on_event(evs[i].data.u64, &seen);
        }
        if (tick % 7 == 0) {
            if (read(efd, &v, 8) != 8 || (long)v != writes_since_read)
                ct_fail("eventfd read %llu, expected %ld (%s)", (unsigned long long)v, writes_since_read, strerror(errno));
            writes_since_read = 0;
        }
        if (pipe_next != pipe_seq || pipe2_next != pipe2_seq)
            ct_fail("pipes: read %ld/%ld of %ld/%ld bytes", pipe_next, pipe2_next, pipe_seq, pipe2_seq);
        struct epoll_event ev = { .events = EPOLLIN | EPOLLET, .data.u64 = 5 };
        if (epoll_ctl(ep, EPOLL_CTL_MOD, pr, &ev) != 0)
            ct_fail("EPOLL_CTL_MOD of the pipe: %s", strerror(errno));
        check_items();
        if (!checked && ct_file_exists(check_path)) {
            checked = 1;
            if (read(tfd1, &v, 8) != 8)
                ct_fail("the one-shot timerfd has no expiration: %s", strerror(errno));
            printf("UNREAD-TIMER %llu\n", (unsigned long long)v);
        }
        printf("TICK %ld timer=%ld sem=%ld\n", tick, timer_total, sem_reads);
        if (ct_should_stop(tick))
            ct_done();
        ct_sleep_ms(ct_interval_ms);
    }
}
