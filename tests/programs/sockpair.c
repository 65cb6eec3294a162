/* sockpair: unix sockets with data in flight, checked across restarts.
 *
 *   sockpair [-n N] [-t MS] [-s STOPFILE] [-c PATH]
 *
 * With -c, it also connects a stream socket (fd 60) to the unix server
 * listening at PATH, outside the computation, and keeps it: a checkpoint
 * must then fail with an error that names it.
 * Sets up, and drives every tick:
 *   - a stream socketpair and a seqpacket socketpair: each tick both ends
 *     send numbered records to the other and read back only down to a lag,
 *     so records are always in flight in both directions (stream records
 *     are 24 bytes; seqpacket messages have a length that depends on their
 *     number, so merged or split messages are caught);
 *   - a datagram socketpair, the same with datagrams;
 *   - a named datagram server (bound to dg.<pid> in the cwd) and an
 *     unnamed client connect()ed to it, messages in flight;
 *   - listening stream sockets on a path (ls.<pid>) and on an abstract
 *     name (@ckpt-sockpair-<pid>): each tick a client connects, the
 *     connection is accepted and one byte crosses it.
 * A stream pair shut down for writing on one end (shutdown SHUT_WR) after
 * 5 bytes: they stay in flight, a write there fails with EPIPE, the other
 * direction works, and at the end the reader gets them, then end of file.
 * The listener's socket file is made mode 0604 (chmod) at the start, and
 * checked every tick (stat: a socket, mode 0604, owned by the process).
 * It checks every record's number and content, that one end of the stream
 * pair stays O_NONBLOCK, that SO_PASSCRED and a SO_RCVBUF set at start
 * keep their values, and that the listeners keep their names.
 */
#include "common.h"
#include <poll.h>
#include <stddef.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#define LAG 4   /* records left unread per direction, per channel */
#define PER_TICK 3
#define OUTSIDE_FD 60

static const char *outside = NULL;

static void opt(int c, const char *arg)
{
    if (c == 'c')
        outside = arg;
}

struct chan {
    const char *name;
    int type;
    int tx, rx;            /* send on tx, receive on rx */
    uint64_t sent, got;
    char partial[64];      /* stream: a record read in pieces */
    size_t have;
};

static size_t msg_len(const struct chan *c, uint64_t seq)
{
    return c->type == SOCK_STREAM ? 24 : 8 + (size_t)(seq % 41);
}

static void fill(const struct chan *c, uint64_t seq, unsigned char *out)
{
    size_t n = msg_len(c, seq);
    uint64_t h = ct_mix64(seq ^ (uint64_t)(uintptr_t)c->name[0] << 56);
    memcpy(out, &seq, 8);
    for (size_t i = 8; i < n; i++)
        out[i] = (unsigned char)(h >> ((i % 8) * 8)) ^ (unsigned char)i;
}

static void send_one(struct chan *c)
{
    unsigned char buf[64];
    size_t n = msg_len(c, c->sent);
    fill(c, c->sent, buf);
    ssize_t w = send(c->tx, buf, n, MSG_NOSIGNAL);
    if (w != (ssize_t)n)
        ct_fail("%s: send of record %llu: %zd (%s)", c->name, (unsigned long long)c->sent, w, strerror(errno));
    c->sent++;
}

static void check(struct chan *c, const unsigned char *buf, size_t n)
{
    unsigned char want[64];
    size_t wn = msg_len(c, c->got);
    fill(c, c->got, want);
    uint64_t seq;
    memcpy(&seq, buf, 8);
    if (n != wn || memcmp(buf, want, wn) != 0)
        ct_fail("%s: expected record %llu (%zu bytes), got %zu bytes with number %llu", c->name,
                (unsigned long long)c->got, wn, n, (unsigned long long)seq);
    c->got++;
}

static void recv_one(struct chan *c)
{
    unsigned char buf[64];
    if (c->type == SOCK_STREAM) {
        while (c->have < 24) {
            ssize_t r = recv(c->rx, c->partial + c->have, 24 - c->have, 0);
            if (r < 0 && (errno == EAGAIN || errno == EINTR)) {
                struct pollfd p = { c->rx, POLLIN, 0 };
                poll(&p, 1, 1000);
                continue;
            }
            if (r <= 0)
                ct_fail("%s: recv: %zd (%s)", c->name, r, strerror(errno));
            c->have += (size_t)r;
        }
        c->have = 0;
        check(c, (unsigned char *)c->partial, 24);
        return;
    }
    ssize_t r;
    do
        r = recv(c->rx, buf, sizeof buf, MSG_TRUNC);
    while (r < 0 && errno == EINTR);
    if (r < 0)
        ct_fail("%s: recv: %s", c->name, strerror(errno));
    check(c, buf, (size_t)r);
}

static void drive(struct chan *c)
{
    for (int i = 0; i < PER_TICK; i++)
        send_one(c);
    while (c->sent - c->got > LAG)
        recv_one(c);
}

static int sockopt(int fd, int level, int name)
{
    int v = 0;
    socklen_t l = sizeof v;
    if (getsockopt(fd, level, name, &v, &l) != 0)
        ct_fail("getsockopt %d/%d: %s", level, name, strerror(errno));
    return v;
}

static socklen_t un_addr(struct sockaddr_un *a, const char *name, int abstract)
{
    memset(a, 0, sizeof *a);
    a->sun_family = AF_UNIX;
    size_t n = strlen(name);
    if (abstract) {
        memcpy(a->sun_path + 1, name, n);
        return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + n);
    }
    memcpy(a->sun_path, name, n + 1);
    return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n + 1);
}

static int listener(const char *name, int abstract)
{
    struct sockaddr_un a;
    socklen_t l = un_addr(&a, name, abstract);
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    if (!abstract)
        unlink(name);
    if (s < 0 || bind(s, (struct sockaddr *)&a, l) != 0 || listen(s, 7) != 0)
        ct_fail("listener %s: %s", name, strerror(errno));
    return s;
}

static void probe(int ls, const char *name, int abstract)
{
    struct sockaddr_un a, got;
    socklen_t l = un_addr(&a, name, abstract), gl = sizeof got;
    if (getsockname(ls, (struct sockaddr *)&got, &gl) != 0 || gl != l || memcmp(&a, &got, l) != 0)
        ct_fail("listener %s lost its name", name);
    int c = socket(AF_UNIX, SOCK_STREAM, 0);
    if (c < 0 || connect(c, (struct sockaddr *)&a, l) != 0)
        ct_fail("connect to %s: %s", name, strerror(errno));
    int s = accept(ls, NULL, NULL);
    char b = 'x';
    if (s < 0 || write(c, &b, 1) != 1 || read(s, &b, 1) != 1 || b != 'x')
        ct_fail("probe of %s: %s", name, strerror(errno));
    close(c);
    close(s);
}

int main(int argc, char **argv)
{
    ct_parse(argc, argv, "c:", opt);
    ct_setup();
    if (outside) {
        struct sockaddr_un o;
        socklen_t ol = un_addr(&o, outside, 0);
        int fd = socket(AF_UNIX, SOCK_STREAM, 0);
        if (fd < 0 || connect(fd, (struct sockaddr *)&o, ol) != 0 || dup2(fd, OUTSIDE_FD) != OUTSIDE_FD)
            ct_fail("connect to %s: %s", outside, strerror(errno));
        close(fd);
    }
    int sp[2], qp[2], dp[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sp) != 0 || socketpair(AF_UNIX, SOCK_SEQPACKET, 0, qp) != 0 ||
        socketpair(AF_UNIX, SOCK_DGRAM, 0, dp) != 0)
        ct_fail("socketpair: %s", strerror(errno));
    /* options that must survive */
    fcntl(sp[1], F_SETFL, fcntl(sp[1], F_GETFL) | O_NONBLOCK);
    int one = 1, rcv = 100000;
    setsockopt(dp[0], SOL_SOCKET, SO_PASSCRED, &one, sizeof one);
    setsockopt(sp[0], SOL_SOCKET, SO_RCVBUF, &rcv, sizeof rcv);
    int rcv_set = sockopt(sp[0], SOL_SOCKET, SO_RCVBUF);
    /* A stream pair half shut down: 5 bytes, then end of file, from hp[0]
     * to hp[1]; hp[1] can still write to hp[0]. */
    int hp[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, hp) != 0 || write(hp[0], "hello", 5) != 5 || shutdown(hp[0], SHUT_WR) != 0)
        ct_fail("half shut down pair: %s", strerror(errno));

    char dgname[64], lsname[64], absname[64];
    snprintf(dgname, sizeof dgname, "dg.%d", (int)ct_pid);
    snprintf(lsname, sizeof lsname, "ls.%d", (int)ct_pid);
    snprintf(absname, sizeof absname, "ckpt-sockpair-%d", (int)ct_pid);
    struct sockaddr_un a;
    socklen_t al = un_addr(&a, dgname, 0);
    unlink(dgname);
    int dsrv = socket(AF_UNIX, SOCK_DGRAM, 0), dcli = socket(AF_UNIX, SOCK_DGRAM, 0);
    if (bind(dsrv, (struct sockaddr *)&a, al) != 0 || connect(dcli, (struct sockaddr *)&a, al) != 0)
        ct_fail("named datagram socket: %s", strerror(errno));
    int ls = listener(lsname, 0), las = listener(absname, 1);
    /* The listener's socket file keeps a mode of its own. */
    if (chmod(lsname, 0604) != 0)
        ct_fail("chmod %s: %s", lsname, strerror(errno));

    struct chan ch[] = {
        { "stream a->b", SOCK_STREAM, sp[0], sp[1], 0, 0, {0}, 0 },
        { "stream b->a", SOCK_STREAM, sp[1], sp[0], 0, 0, {0}, 0 },
        { "seqpacket a->b", SOCK_SEQPACKET, qp[0], qp[1], 0, 0, {0}, 0 },
        { "seqpacket b->a", SOCK_SEQPACKET, qp[1], qp[0], 0, 0, {0}, 0 },
        { "dgram a->b", SOCK_DGRAM, dp[0], dp[1], 0, 0, {0}, 0 },
        { "dgram b->a", SOCK_DGRAM, dp[1], dp[0], 0, 0, {0}, 0 },
        { "named dgram", SOCK_DGRAM, dcli, dsrv, 0, 0, {0}, 0 },
    };
    size_t nch = sizeof ch / sizeof ch[0];
    printf("READY\n");
    for (long tick = 1;; tick++) {
        ct_check_ids();
        for (size_t i = 0; i < nch; i++)
            drive(&ch[i]);
        if (!(fcntl(sp[1], F_GETFL) & O_NONBLOCK) || (fcntl(sp[0], F_GETFL) & O_NONBLOCK))
            ct_fail("O_NONBLOCK changed");
        if (!sockopt(dp[0], SOL_SOCKET, SO_PASSCRED) || sockopt(dp[1], SOL_SOCKET, SO_PASSCRED))
            ct_fail("SO_PASSCRED changed");
        if (sockopt(sp[0], SOL_SOCKET, SO_RCVBUF) != rcv_set)
            ct_fail("SO_RCVBUF changed: %d, was %d", sockopt(sp[0], SOL_SOCKET, SO_RCVBUF), rcv_set);
        char hb[8];
        if (recv(hp[1], hb, sizeof hb, MSG_PEEK | MSG_DONTWAIT) != 5 || memcmp(hb, "hello", 5) != 0)
            ct_fail("the half shut down pair lost its 5 bytes in flight");
        if (send(hp[0], "x", 1, MSG_NOSIGNAL | MSG_DONTWAIT) != -1 || errno != EPIPE)
            ct_fail("a write to the end shut down for writing did not fail with EPIPE");
        if (send(hp[1], "y", 1, MSG_NOSIGNAL) != 1 || recv(hp[0], hb, 1, 0) != 1 || hb[0] != 'y')
            ct_fail("the other direction of the half shut down pair does not work: %s", strerror(errno));
        struct stat lst;
        if (stat(lsname, &lst) != 0 || !S_ISSOCK(lst.st_mode) || (lst.st_mode & 07777) != 0604 || lst.st_uid != getuid())
            ct_fail("the socket file %s is not a socket of mode 0604 owned by uid %d (mode %o uid %d)", lsname, (int)getuid(), (unsigned)lst.st_mode, (int)lst.st_uid);
        probe(ls, lsname, 0);
        probe(las, absname, 1);
        printf("TICK %ld records %llu\n", tick, (unsigned long long)ch[0].got);
        if (ct_should_stop(tick)) {
            /* everything still in flight arrives, in order */
            for (size_t i = 0; i < nch; i++)
                while (ch[i].got < ch[i].sent)
                    recv_one(&ch[i]);
            char hb2[8];
            if (recv(hp[1], hb2, sizeof hb2, MSG_DONTWAIT) != 5 || recv(hp[1], hb2, sizeof hb2, MSG_DONTWAIT) != 0)
                ct_fail("the half shut down pair does not give its 5 bytes, then end of file");
            ct_done();
        }
        ct_sleep_ms(ct_interval_ms);
    }
}
