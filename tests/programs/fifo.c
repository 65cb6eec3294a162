/* fifo: a child writing numbered records into a named pipe that its
 * parent reads, with records always in flight.
 *
 *   fifo [-n N] [-t MS] [-s STOPFILE] -f PATH
 *
 * The parent makes the FIFO at PATH (mode 0640) unless it is there, opens
 * it O_RDONLY | O_NONBLOCK, then forks the child, which opens it O_WRONLY
 * (blocking open: the reader is there). Every tick the child writes 25
 * records of 16 bytes (sequence number and a check word); the parent reads
 * records until at most 100 are left in the pipe, and checks each one:
 * the next sequence number, its check word (no byte lost, none twice).
 * Every tick both check that their fd keeps its access mode and flags
 * (the reader O_NONBLOCK, the writer not), that the capacity is the one
 * the parent set (128 KiB) and that PATH is a FIFO of mode 0640.
 * At the stop tick the parent stops the child, reads what is left, checks
 * it and prints DONE.
 */
#include "common.h"
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/wait.h>

#define PER_TICK 25
#define BACKLOG 100
#define CAPACITY (128 * 1024)

struct rec {
    uint64_t seq, check;
};

static const char *path;

static void opt(int c, const char *arg)
{
    if (c == 'f') path = arg;
}

static void check_fd(int fd, const char *who, int accmode, int nonblock)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0)
        ct_fail("%s: F_GETFL: %s", who, strerror(errno));
    if ((fl & O_ACCMODE) != accmode || !!(fl & O_NONBLOCK) != nonblock)
        ct_fail("%s: fd flags %#o, expected access mode %d%s", who, fl, accmode, nonblock ? " and O_NONBLOCK" : "");
    int cap = fcntl(fd, F_GETPIPE_SZ);
    if (cap != CAPACITY)
        ct_fail("%s: pipe capacity %d, expected %d", who, cap, CAPACITY);
    struct stat st, fst;
    if (stat(path, &st) != 0 || !S_ISFIFO(st.st_mode) || (st.st_mode & 07777) != 0640)
        ct_fail("%s: %s is not a FIFO of mode 0640 (%s)", who, path, strerror(errno));
    if (fstat(fd, &fst) != 0 || fst.st_ino != st.st_ino || fst.st_dev != st.st_dev)
        ct_fail("%s: the fd is not open on %s", who, path);
}

static uint64_t got;

/* Reads records while more than `keep` are in the pipe. */
static void drain(int fd, int keep)
{
    for (;;) {
        int avail = 0;
        if (ioctl(fd, FIONREAD, &avail) != 0)
            ct_fail("FIONREAD: %s", strerror(errno));
        if (avail % (int)sizeof(struct rec) != 0)
            ct_fail("%d bytes in the pipe: not whole records", avail);
        if (avail <= keep * (int)sizeof(struct rec))
            return;
        struct rec r;
        ssize_t n = read(fd, &r, sizeof r);
        if (n < 0 && errno == EINTR)
            continue;
        if (n != (ssize_t)sizeof r)
            ct_fail("read: %zd (%s)", n, strerror(errno));
        if (r.seq != got || r.check != ct_mix64(got))
            ct_fail("expected record %llu, got %llu (check %s)", (unsigned long long)got, (unsigned long long)r.seq,
                    r.check == ct_mix64(r.seq) ? "ok" : "bad");
        got++;
    }
}

int main(int argc, char **argv)
{
    ct_parse(argc, argv, "f:", opt);
    ct_setup();
    if (!path)
        ct_fail("-f PATH is required");
    if (mkfifo(path, 0640) != 0 && errno != EEXIST)
        ct_fail("mkfifo %s: %s", path, strerror(errno));
    chmod(path, 0640);
    int rfd = open(path, O_RDONLY | O_NONBLOCK);
    if (rfd < 0 || fcntl(rfd, F_SETPIPE_SZ, CAPACITY) != CAPACITY)
        ct_fail("open %s: %s", path, strerror(errno));
    pid_t child = fork();
    if (child == 0) {
        close(rfd);
        ct_pid = getpid();
        ct_tid = ct_gettid();
        int wfd = open(path, O_WRONLY);
        if (wfd < 0)
            ct_fail("child: open %s: %s", path, strerror(errno));
        uint64_t sent = 0;
        for (;;) {
            ct_check_ids();
            check_fd(wfd, "child", O_WRONLY, 0);
            for (int i = 0; i < PER_TICK; i++) {
                struct rec r = { sent, ct_mix64(sent) };
                ssize_t n = write(wfd, &r, sizeof r);
                if (n < 0 && errno == EINTR) {
                    i--;
                    continue;
                }
                if (n != (ssize_t)sizeof r)
                    ct_fail("child: write: %zd (%s)", n, strerror(errno));
                sent++;
            }
            ct_sleep_ms(ct_interval_ms);
        }
    }
    printf("READY child %d\n", (int)child);
    for (long tick = 1;; tick++) {
        ct_check_ids();
        int st;
        if (waitpid(child, &st, WNOHANG) != 0)
            ct_fail("the child ended (status %#x)", st);
        check_fd(rfd, "parent", O_RDONLY, 1);
        drain(rfd, BACKLOG);
        int avail = 0;
        ioctl(rfd, FIONREAD, &avail);
        printf("TICK %ld got %llu inflight %d\n", tick, (unsigned long long)got, avail / (int)sizeof(struct rec));
        if (ct_should_stop(tick)) {
            kill(child, SIGKILL);
            waitpid(child, &st, 0);
            drain(rfd, 0);
            printf("END got %llu\n", (unsigned long long)got);
            ct_done();
        }
        ct_sleep_ms(ct_interval_ms);
    }
}
