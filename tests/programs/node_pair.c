/* node_pair: one program in two pieces on two nodes of a Slurm job step,
 * talking TCP, each checking the other's state every tick.
 *
 *   node_pair [-n N] [-t MS] -p PORT [-c ADDR] [-b BYTES]
 *
 * The piece is chosen by $SLURM_NODEID at the start: node 0 listens on
 * PORT (all addresses, SO_REUSEADDR) and accepts one connection; node 1
 * connects to ADDR:PORT (ADDR: -c, else $SLURM_LAUNCH_NODE_IPADDR, the
 * node srun runs on, which is node 0 for a step of a batch script),
 * retrying for 30 s while node 0 is not listening yet.
 *
 * Tick k (1..N), node 1 sends message k: k, value v(k), and BYTES bytes
 * (default 4096) that are a function of k; up to LAG messages ahead of
 * the replies, so some are in flight (in both directions) at any moment.
 * Node 0 checks each message, adds v(k) to its sum and replies with k,
 * its sum and the bytes; node 1 checks the reply's bytes and that node
 * 0's sum is the sum of v(1..k) it keeps itself. Both print
 * "TICK k node R sum S". After N, node 1 reads the last replies and
 * shuts the connection down; node 0 reads the end of file. Each then
 * checks its sum against v(1..N) summed afresh and prints
 * "ANSWER node R sum S ok" and DONE. Any mismatch: FAIL and exit 1. The
 * connection closed or reset by the other piece before the end: "LOST"
 * and exit 3 (the other piece was killed).
 */
#include "common.h"
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#define LAG 3
#define MAXB 65536

static int port = 0;
static const char *peer = NULL;
static size_t bytes = 4096;

static void opt(int c, const char *arg)
{
    if (c == 'p')
        port = atoi(arg);
    if (c == 'c')
        peer = arg;
    if (c == 'b')
        bytes = (size_t)strtoul(arg, NULL, 10);
}

static uint64_t value(uint64_t k) { return ct_mix64(k) % 1000; }

struct head {
    uint64_t k, v, sum, check;
};

static void fill(unsigned char *b, size_t n, uint64_t k)
{
    for (size_t i = 0; i < n; i++)
        b[i] = (unsigned char)(ct_mix64(k * 131 + i / 8) >> (8 * (i % 8)));
}

/* The other piece is gone (it was killed: Slurm's SIGTERM to every
 * process of the job reaches the two nodes one after the other). Not the
 * program's check failing: "LOST" and exit 3. */
__attribute__((noreturn)) static void lost(const char *what, int writing, ssize_t r)
{
    printf("LOST %s: %s: %s\n", what, writing ? "send" : "recv", r == 0 ? "end of file" : strerror(errno));
    fflush(stdout);
    _exit(3);
}

static void io_all(int fd, void *p, size_t n, int writing, const char *what)
{
    unsigned char *buf = p;
    size_t done = 0;
    while (done < n) {
        ssize_t r = writing ? send(fd, buf + done, n - done, MSG_NOSIGNAL) : recv(fd, buf + done, n - done, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r == 0 || (r < 0 && (errno == ECONNRESET || errno == EPIPE)))
            lost(what, writing, r);
        if (r < 0)
            ct_fail("%s: %s: %s", what, writing ? "send" : "recv", strerror(errno));
        done += (size_t)r;
    }
}

static unsigned char want[MAXB], got[MAXB];

/* Reads one message (head and bytes) and checks its bytes and check word. */
static void receive(int fd, struct head *h, uint64_t k, const char *what)
{
    io_all(fd, h, sizeof *h, 0, what);
    if (h->k != k)
        ct_fail("%s: message %llu where %llu was due", what, (unsigned long long)h->k, (unsigned long long)k);
    if (h->check != ct_mix64(h->k ^ h->v ^ (h->sum << 1)))
        ct_fail("%s: message %llu: its check word is wrong", what, (unsigned long long)k);
    io_all(fd, got, bytes, 0, what);
    fill(want, bytes, k);
    if (memcmp(got, want, bytes) != 0)
        ct_fail("%s: message %llu: its bytes are not the ones sent", what, (unsigned long long)k);
}

static void transmit(int fd, uint64_t k, uint64_t v, uint64_t sum, const char *what)
{
    struct head h = { k, v, sum, ct_mix64(k ^ v ^ (sum << 1)) };
    io_all(fd, &h, sizeof h, 1, what);
    fill(want, bytes, k);
    io_all(fd, want, bytes, 1, what);
}

static uint64_t closed_form(uint64_t n)
{
    uint64_t s = 0;
    for (uint64_t k = 1; k <= n; k++)
        s += value(k);
    return s;
}

static void answer(int node, uint64_t sum)
{
    uint64_t right = closed_form((uint64_t)ct_nticks);
    if (sum != right)
        ct_fail("node %d: sum %llu after %ld ticks, not %llu", node, (unsigned long long)sum, ct_nticks, (unsigned long long)right);
    printf("ANSWER node %d sum %llu ok\n", node, (unsigned long long)sum);
}

static void node0(void)
{
    int l = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1;
    if (l < 0 || setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0)
        ct_fail("node 0: socket: %s", strerror(errno));
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port), .sin_addr.s_addr = htonl(INADDR_ANY) };
    if (bind(l, (struct sockaddr *)&a, sizeof a) != 0 || listen(l, 1) != 0)
        ct_fail("node 0: listen on port %d: %s", port, strerror(errno));
    printf("LISTENING %d\n", port);
    int fd;
    while ((fd = accept4(l, NULL, NULL, SOCK_CLOEXEC)) < 0)
        if (errno != EINTR)
            ct_fail("node 0: accept: %s", strerror(errno));
    close(l);
    printf("READY node 0\n");
    uint64_t sum = 0;
    for (uint64_t k = 1; k <= (uint64_t)ct_nticks; k++) {
        struct head h;
        receive(fd, &h, k, "node 0");
        if (h.v != value(k))
            ct_fail("node 0: message %llu carries value %llu, not %llu", (unsigned long long)k, (unsigned long long)h.v, (unsigned long long)value(k));
        sum += h.v;
        ct_check_ids();
        transmit(fd, k, h.v, sum, "node 0");
        printf("TICK %llu node 0 sum %llu\n", (unsigned long long)k, (unsigned long long)sum);
    }
    char c;
    ssize_t r;
    while ((r = recv(fd, &c, 1, 0)) < 0 && errno == EINTR) {}
    if (r != 0)
        ct_fail("node 0: data or an error after the last message (%zd)", r);
    answer(0, sum);
}

static void node1(void)
{
    const char *addr = peer ? peer : getenv("SLURM_LAUNCH_NODE_IPADDR");
    if (!addr)
        ct_fail("node 1: no address of node 0: give -c ADDR (or run under srun)");
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
    if (inet_pton(AF_INET, addr, &a.sin_addr) != 1)
        ct_fail("node 1: %s is not an IPv4 address", addr);
    int fd = -1;
    for (int i = 0;; i++) {
        fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0)
            ct_fail("node 1: socket: %s", strerror(errno));
        if (connect(fd, (struct sockaddr *)&a, sizeof a) == 0)
            break;
        if (i >= 300)
            ct_fail("node 1: connect to %s:%d: %s", addr, port, strerror(errno));
        close(fd);
        ct_sleep_ms(100);
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    printf("READY node 1\n");
    uint64_t sent = 0, replied = 0, mine = 0, sum = 0;
    uint64_t sums[LAG + 2];
    uint64_t n = (uint64_t)ct_nticks;
    while (replied < n) {
        if (sent < n && sent - replied < LAG) {
            sent++;
            mine += value(sent);
            sums[sent % (LAG + 2)] = mine;
            transmit(fd, sent, value(sent), 0, "node 1");
            continue;
        }
        struct head h;
        replied++;
        receive(fd, &h, replied, "node 1");
        if (h.sum != sums[replied % (LAG + 2)])
            ct_fail("node 1: node 0's sum after message %llu is %llu, not %llu", (unsigned long long)replied, (unsigned long long)h.sum, (unsigned long long)sums[replied % (LAG + 2)]);
        sum = h.sum;
        ct_check_ids();
        printf("TICK %llu node 1 sum %llu\n", (unsigned long long)replied, (unsigned long long)sum);
        ct_sleep_ms(ct_interval_ms);
    }
    shutdown(fd, SHUT_WR);
    answer(1, sum);
}

int main(int argc, char **argv)
{
    ct_setup();
    ct_parse(argc, argv, "p:c:b:", opt);
    const char *id = getenv("SLURM_NODEID");
    if (!id || port <= 0 || bytes == 0 || bytes > MAXB) {
        fprintf(stderr, "usage: node_pair [-n N] [-t MS] -p PORT [-c ADDR] [-b BYTES <= %d], with SLURM_NODEID 0 or 1\n", MAXB);
        return 2;
    }
    if (strcmp(id, "0") == 0)
        node0();
    else if (strcmp(id, "1") == 0)
        node1();
    else
        ct_fail("SLURM_NODEID is %s: node_pair has two pieces, node 0 and node 1", id);
    ct_done();
}
