/* udp: a parent and its child exchanging numbered datagrams over UDP on
 * loopback, with datagrams always waiting in both receive queues.
 *
 *   udp [-n N] [-t MS] [-s STOPFILE]
 *
 * Each side sends 20 datagrams a tick and reads until at most 50 are left
 * waiting; it checks every datagram's number and content and that it came
 * from the other side's address. The parent's socket is unconnected
 * (sendto/recvfrom), the child's is connected. At the stop tick the parent
 * stops the child and prints DONE.
 */
#include "common.h"
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>

#define PER_TICK 20
#define BACKLOG 50

struct dgram {
    uint64_t seq, check, from;
};

static int bound_socket(struct sockaddr_in *a)
{
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    socklen_t l = sizeof *a;
    a->sin_family = AF_INET;
    a->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a->sin_port = 0;
    if (s < 0 || bind(s, (struct sockaddr *)a, sizeof *a) != 0 || getsockname(s, (struct sockaddr *)a, &l) != 0)
        ct_fail("udp socket: %s", strerror(errno));
    return s;
}

/* One tick of one side: send, then read down to the backlog. */
static void side(int s, const struct sockaddr_in *peer, uint64_t me, uint64_t *sent, uint64_t *got, int connected, const char *who)
{
    for (int i = 0; i < PER_TICK; i++) {
        struct dgram d = { *sent, ct_mix64(*sent ^ me), me };
        ssize_t r = connected ? send(s, &d, sizeof d, 0) : sendto(s, &d, sizeof d, 0, (const struct sockaddr *)peer, sizeof *peer);
        if (r != (ssize_t)sizeof d)
            ct_fail("%s: send: %s", who, strerror(errno));
        (*sent)++;
    }
    /* The other side sends as much: keep at most BACKLOG waiting. */
    while (*sent > *got + BACKLOG) {
        struct dgram d;
        struct sockaddr_in from;
        socklen_t fl = sizeof from;
        ssize_t r = recvfrom(s, &d, sizeof d, 0, (struct sockaddr *)&from, &fl);
        if (r < 0 && errno == EINTR)
            continue;
        if (r != (ssize_t)sizeof d)
            ct_fail("%s: recv: %zd (%s)", who, r, strerror(errno));
        uint64_t other = me ^ 1;
        if (d.seq != *got || d.check != ct_mix64(*got ^ other) || d.from != other)
            ct_fail("%s: expected datagram %llu, got %llu", who, (unsigned long long)*got, (unsigned long long)d.seq);
        if (from.sin_port != peer->sin_port || from.sin_addr.s_addr != peer->sin_addr.s_addr)
            ct_fail("%s: datagram %llu from port %d, expected %d", who, (unsigned long long)d.seq, ntohs(from.sin_port), ntohs(peer->sin_port));
        (*got)++;
    }
}

int main(int argc, char **argv)
{
    ct_parse(argc, argv, "", NULL);
    ct_setup();
    struct sockaddr_in pa, ca;
    int ps = bound_socket(&pa), cs = bound_socket(&ca);
    pid_t child = fork();
    if (child == 0) {
        close(ps);
        ct_pid = getpid();
        ct_tid = ct_gettid();
        if (connect(cs, (struct sockaddr *)&pa, sizeof pa) != 0)
            ct_fail("child: connect: %s", strerror(errno));
        uint64_t sent = 0, got = 0;
        for (;;) {
            ct_check_ids();
            side(cs, &pa, 1, &sent, &got, 1, "child");
            ct_sleep_ms(ct_interval_ms);
        }
    }
    close(cs);
    printf("READY child %d\n", (int)child);
    uint64_t sent = 0, got = 0;
    for (long tick = 1;; tick++) {
        ct_check_ids();
        int st;
        if (waitpid(child, &st, WNOHANG) != 0)
            ct_fail("the child ended (status %#x)", st);
        side(ps, &ca, 0, &sent, &got, 0, "parent");
        printf("TICK %ld sent %llu got %llu\n", tick, (unsigned long long)sent, (unsigned long long)got);
        if (ct_should_stop(tick)) {
            kill(child, SIGTERM);
            waitpid(child, &st, 0);
            ct_done();
        }
        ct_sleep_ms(ct_interval_ms);
    }
}
