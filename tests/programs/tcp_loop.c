/* tcp_loop: a TCP client and server on loopback inside one process, with
 * the connection saturated both ways, checked across restarts.
 *
 *   tcp_loop [-n N] [-t MS] [-s STOPFILE] [-r RECORDS] [-R] [-6]
 *
 * Listens on 127.0.0.1 (a port the kernel picks, SO_REUSEADDR), connects,
 * accepts. Both sockets are O_NONBLOCK; the client has TCP_NODELAY. Every
 * tick each side writes numbered 32-byte records until the kernel takes no
 * more (so both sockets' send queues hold unacknowledged and never-sent
 * bytes and the receive queues are full), then reads RECORDS records
 * (default 400) from the other side and checks each number and its
 * content. Each tick also checks the options and the listener's address,
 * and connects a probe client through the listener (one byte each way).
 * A probe caught between connect and accept by a checkpoint is dropped at
 * restart (documented); it is then reported as "PROBE lost" and the
 * program goes on. At the stop tick, both sides read everything that is
 * left and print DONE.
 * -R: the listener does not set SO_REUSEADDR (and checks every tick that
 * it is still off): after a kill, what the connections of its earlier life
 * left on its port (TIME_WAIT, closing sockets) would keep a plain bind
 * off it for a minute; its probes close the server side first, so each
 * leaves a TIME_WAIT on the listener's port.
 * -6: a second listener on [::] at the same port, with IPV6_V6ONLY (as
 * Open MPI's TCP BTL listens): without it the two binds conflict. Every
 * tick it must still be IPV6_V6ONLY, on [::] at that port, and a probe
 * connects through it from [::1].
 */
#include "common.h"
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>

#define REC 32

struct dir {
    const char *name;
    int tx, rx;
    uint64_t sent, got;
    unsigned char out[REC];
    size_t out_off;       /* bytes of the current record already written */
    unsigned char in[REC];
    size_t in_have;
    int closing;          /* finish the current record, start no new one */
};

static long per_tick = 400;
static int reuse = 1;
static int dual = 0;

static void opt(int c, const char *arg)
{
    if (c == 'r')
        per_tick = strtol(arg, NULL, 10);
    if (c == 'R')
        reuse = 0;
    if (c == '6')
        dual = 1;
}

static void record(const struct dir *d, uint64_t seq, unsigned char *out)
{
    uint64_t w[4] = { seq, ct_mix64(seq ^ (uint64_t)(unsigned char)d->name[0]), ~seq, 0 };
    w[3] = w[1] ^ w[0];
    memcpy(out, w, REC);
}

/* Writes until the kernel refuses. */
static void pump(struct dir *d)
{
    for (;;) {
        if (d->out_off == 0 && d->closing)
            return;
        if (d->out_off == 0)
            record(d, d->sent, d->out);
        ssize_t n = send(d->tx, d->out + d->out_off, REC - d->out_off, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                return;
            ct_fail("%s: send: %s", d->name, strerror(errno));
        }
        d->out_off += (size_t)n;
        if (d->out_off == REC) {
            d->out_off = 0;
            d->sent++;
        }
    }
}

/* Reads `want` records (waiting for them). */
static void drain(struct dir *d, uint64_t want)
{
    while (want > 0) {
        ssize_t n = recv(d->rx, d->in + d->in_have, REC - d->in_have, 0);
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
            pump(d); /* keep the other way moving too is the caller's job; here just ours */
            struct pollfd p = { d->rx, POLLIN, 0 };
            if (poll(&p, 1, 5000) == 0)
                ct_fail("%s: no data for 5 s (waiting for record %llu, sent %llu)", d->name,
                        (unsigned long long)d->got, (unsigned long long)d->sent);
            continue;
        }
        if (n <= 0)
            ct_fail("%s: recv: %zd (%s)", d->name, n, n == 0 ? "end of file" : strerror(errno));
        d->in_have += (size_t)n;
        if (d->in_have < REC)
            continue;
        d->in_have = 0;
        unsigned char want_rec[REC];
        record(d, d->got, want_rec);
        if (memcmp(want_rec, d->in, REC) != 0) {
            uint64_t seq;
            memcpy(&seq, d->in, 8);
            ct_fail("%s: expected record %llu, got %llu", d->name, (unsigned long long)d->got, (unsigned long long)seq);
        }
        d->got++;
        want--;
    }
}

static int sockopt(int fd, int level, int name)
{
    int v = 0;
    socklen_t l = sizeof v;
    if (getsockopt(fd, level, name, &v, &l) != 0)
        ct_fail("getsockopt %d/%d: %s", level, name, strerror(errno));
    return v;
}

static void probe(int ls, const struct sockaddr_in *a)
{
    struct sockaddr_in got;
    socklen_t gl = sizeof got;
    if (getsockname(ls, (struct sockaddr *)&got, &gl) != 0 || got.sin_port != a->sin_port || got.sin_addr.s_addr != a->sin_addr.s_addr)
        ct_fail("the listener's address changed");
    int c = socket(AF_INET, SOCK_STREAM, 0);
    if (c < 0 || connect(c, (const struct sockaddr *)a, sizeof *a) != 0)
        ct_fail("probe connect: %s", strerror(errno));
    struct pollfd p = { ls, POLLIN, 0 };
    if (poll(&p, 1, 2000) != 1) {
        printf("PROBE lost\n");
        close(c);
        return;
    }
    int s = accept(ls, NULL, NULL);
    char b = 'p';
    if (s < 0 || write(c, &b, 1) != 1 || read(s, &b, 1) != 1 || b != 'p' || write(s, &b, 1) != 1 || read(c, &b, 1) != 1)
        ct_fail("probe: %s", strerror(errno));
    if (!reuse) {
        /* -R: the server side closes first, so the probe's TIME_WAIT is
         * on the listener's port */
        close(s);
        ct_sleep_ms(1);
    }
    close(c);
    close(s);
}

int main(int argc, char **argv)
{
    ct_parse(argc, argv, "r:R6", opt);
    ct_setup();
    int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t al = sizeof a;
    if (reuse)
        setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) != 0 || listen(ls, 16) != 0 || getsockname(ls, (struct sockaddr *)&a, &al) != 0)
        ct_fail("listen: %s", strerror(errno));
    int c = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(c, (struct sockaddr *)&a, sizeof a) != 0)
        ct_fail("connect: %s", strerror(errno));
    int s = accept(ls, NULL, NULL);
    if (s < 0)
        ct_fail("accept: %s", strerror(errno));
    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    fcntl(c, F_SETFL, O_NONBLOCK);
    fcntl(s, F_SETFL, O_NONBLOCK);
    printf("PORT %d\n", ntohs(a.sin_port));
    int ls6 = -1;
    struct sockaddr_in6 a6 = { .sin6_family = AF_INET6, .sin6_addr = IN6ADDR_ANY_INIT, .sin6_port = a.sin_port };
    if (dual) {
        ls6 = socket(AF_INET6, SOCK_STREAM, 0);
        if (ls6 < 0 || setsockopt(ls6, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one) != 0)
            ct_fail("IPv6 listener: %s", strerror(errno));
        if (reuse)
            setsockopt(ls6, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(ls6, (struct sockaddr *)&a6, sizeof a6) != 0 || listen(ls6, 16) != 0)
            ct_fail("IPv6 listener on [::]:%d: %s", ntohs(a.sin_port), strerror(errno));
    }

    struct dir up = { .name = "client->server", .tx = c, .rx = s };
    struct dir down = { .name = "server->client", .tx = s, .rx = c };
    printf("READY\n");
    for (long tick = 1;; tick++) {
        ct_check_ids();
        pump(&up);
        pump(&down);
        drain(&up, (uint64_t)per_tick);
        drain(&down, (uint64_t)per_tick);
        pump(&up);
        pump(&down);
        if (!sockopt(c, IPPROTO_TCP, TCP_NODELAY) || sockopt(s, IPPROTO_TCP, TCP_NODELAY))
            ct_fail("TCP_NODELAY changed");
        if (!sockopt(ls, SOL_SOCKET, SO_REUSEADDR) != !reuse)
            ct_fail("the listener's SO_REUSEADDR is %d, not %d", sockopt(ls, SOL_SOCKET, SO_REUSEADDR), reuse);
        if (!(fcntl(c, F_GETFL) & O_NONBLOCK) || !(fcntl(s, F_GETFL) & O_NONBLOCK))
            ct_fail("O_NONBLOCK lost");
        probe(ls, &a);
        if (dual) {
            struct sockaddr_in6 now;
            socklen_t nl = sizeof now;
            if (!sockopt(ls6, IPPROTO_IPV6, IPV6_V6ONLY))
                ct_fail("the IPv6 listener lost IPV6_V6ONLY");
            if (getsockname(ls6, (struct sockaddr *)&now, &nl) != 0 || now.sin6_port != a.sin_port ||
                memcmp(&now.sin6_addr, &in6addr_any, sizeof now.sin6_addr) != 0)
                ct_fail("the IPv6 listener is not on [::]:%d", ntohs(a.sin_port));
            int pc = socket(AF_INET6, SOCK_STREAM, 0);
            struct sockaddr_in6 to = { .sin6_family = AF_INET6, .sin6_addr = IN6ADDR_LOOPBACK_INIT, .sin6_port = a.sin_port };
            if (pc < 0 || connect(pc, (struct sockaddr *)&to, sizeof to) != 0)
                ct_fail("connect to [::1]:%d: %s", ntohs(a.sin_port), strerror(errno));
            int ps = accept(ls6, NULL, NULL);
            char b = '6';
            if (ps < 0 || write(pc, &b, 1) != 1 || read(ps, &b, 1) != 1 || b != '6')
                ct_fail("IPv6 probe: %s", strerror(errno));
            close(pc);
            close(ps);
        }
        printf("TICK %ld up %llu/%llu down %llu/%llu\n", tick, (unsigned long long)up.got, (unsigned long long)up.sent,
               (unsigned long long)down.got, (unsigned long long)down.sent);
        if (ct_should_stop(tick)) {
            /* everything written so far arrives, in order, exactly once */
            up.closing = down.closing = 1;
            while (up.out_off != 0 || down.out_off != 0) {
                pump(&up);
                pump(&down);
                if (up.sent > up.got)
                    drain(&up, 1);
                if (down.sent > down.got)
                    drain(&down, 1);
            }
            drain(&up, up.sent - up.got);
            drain(&down, down.sent - down.got);
            printf("TOTAL up %llu down %llu\n", (unsigned long long)up.got, (unsigned long long)down.got);
            ct_done();
        }
        ct_sleep_ms(ct_interval_ms);
    }
}
