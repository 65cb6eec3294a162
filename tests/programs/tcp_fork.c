/* tcp_fork: a forking TCP server and its clients on loopback, as separate
 * processes, checked across restarts.
 *
 *   tcp_fork [-n N] [-t MS] [-s STOPFILE] [-k CLIENTS]
 *
 * The main process listens on 127.0.0.1 (a port the kernel picks) and
 * forks CLIENTS client processes (default 2); it accepts each client's
 * connection and forks a handler child for it (the main process closes its
 * copy), then prints READY. Every tick each client sends 200 numbered
 * 32-byte records and reads the handler's echoes down to a lag of 300
 * records, so records are in flight both ways; the handler checks every
 * record it reads and echoes it transformed; the client checks every echo.
 * The main process prints TICK lines and checks that no child died.
 * At the stop tick the main process sends SIGUSR1 to the clients: each
 * stops sending, reads every echo still due, shuts its side down and exits
 * 0 once the handler closed (printing "CLIENT i OK records N"); handlers
 * exit 0 at end of file. The main process reaps all of them and prints
 * DONE. Any error prints FAIL (from whichever process saw it).
 *
 * Across hosts, the two halves run as two programs:
 *   tcp_fork -S PORT       listens on every address at PORT and forks a
 *                          handler for the one client that connects;
 *                          at the stop tick (or once a stop was asked for
 *                          and the handler ended: the client counts its
 *                          ticks on its own and may stop first) it waits
 *                          for the handler to see the client's end of file;
 *   tcp_fork -C IP:PORT    forks one client connecting there.
 */
#include "common.h"
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>

#define REC 32
#define PER_TICK 200
#define LAG 300
#define MAXC 16

static int nclients = 2;
static int server_port = 0;
static char *client_to = NULL;
static volatile sig_atomic_t stopping = 0;

static void opt(int c, const char *arg)
{
    if (c == 'k')
        nclients = atoi(arg);
    if (c == 'S')
        server_port = atoi(arg);
    if (c == 'C')
        client_to = strdup(arg);
}

static void on_usr1(int sig)
{
    (void)sig;
    stopping = 1;
}

static void record(uint64_t seq, int echo, unsigned char *out)
{
    uint64_t w[4] = { seq, ct_mix64(seq * 2 + (uint64_t)echo), (uint64_t)echo, ~seq };
    memcpy(out, w, REC);
}

static void io_all(int fd, unsigned char *buf, size_t n, int writing, const char *who)
{
    size_t done = 0;
    while (done < n) {
        ssize_t r = writing ? send(fd, buf + done, n - done, MSG_NOSIGNAL) : recv(fd, buf + done, n - done, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            ct_fail("%s: %s: %zd (%s)", who, writing ? "send" : "recv", r, r == 0 ? "end of file" : strerror(errno));
        done += (size_t)r;
    }
}

static void check(const unsigned char *got, uint64_t seq, int echo, const char *who)
{
    unsigned char want[REC];
    record(seq, echo, want);
    if (memcmp(got, want, REC) != 0) {
        uint64_t s;
        memcpy(&s, got, 8);
        ct_fail("%s: expected record %llu, got %llu", who, (unsigned long long)seq, (unsigned long long)s);
    }
}

static void handler(int fd)
{
    unsigned char buf[REC];
    for (uint64_t seq = 0;; seq++) {
        size_t have = 0;
        while (have < REC) {
            ssize_t r = recv(fd, buf + have, REC - have, 0);
            if (r < 0 && errno == EINTR)
                continue;
            if (r == 0 && have == 0)
                _exit(0); /* the client is done */
            if (r <= 0)
                ct_fail("handler: recv: %zd (%s)", r, strerror(errno));
            have += (size_t)r;
        }
        check(buf, seq, 0, "handler");
        record(seq, 1, buf);
        io_all(fd, buf, REC, 1, "handler");
    }
}

static void client(int i, const struct sockaddr_in *a)
{
    char who[32];
    snprintf(who, sizeof who, "client %d", i);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, (const struct sockaddr *)a, sizeof *a) != 0)
        ct_fail("%s: connect: %s", who, strerror(errno));
    uint64_t sent = 0, got = 0;
    unsigned char buf[REC];
    while (!stopping) {
        for (int k = 0; k < PER_TICK; k++) {
            record(sent++, 0, buf);
            io_all(fd, buf, REC, 1, who);
        }
        while (sent - got > LAG) {
            io_all(fd, buf, REC, 0, who);
            check(buf, got++, 1, who);
        }
        ct_sleep_ms(ct_interval_ms);
    }
    while (got < sent) {
        io_all(fd, buf, REC, 0, who);
        check(buf, got++, 1, who);
    }
    shutdown(fd, SHUT_WR);
    if (recv(fd, buf, 1, 0) != 0)
        ct_fail("%s: data after the last echo", who);
    printf("CLIENT %d OK records %llu\n", i, (unsigned long long)got);
    _exit(0);
}

static void in_child(void)
{
    ct_pid = getpid();
    ct_tid = ct_gettid();
}

/* One half of a pair across hosts (-S or -C): one child does the work,
 * the main process ticks and, at the stop tick, ends it and reaps it. */
static void half(void)
{
    pid_t child;
    if (server_port) {
        int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
        struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)server_port) };
        setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(ls, (struct sockaddr *)&a, sizeof a) != 0 || listen(ls, 4) != 0)
            ct_fail("listen on port %d: %s", server_port, strerror(errno));
        printf("LISTENING %d\n", server_port);
        int c = accept(ls, NULL, NULL);
        if (c < 0)
            ct_fail("accept: %s", strerror(errno));
        child = fork();
        if (child == 0) {
            close(ls);
            in_child();
            handler(c);
        }
        close(c);
    } else {
        char host[64];
        snprintf(host, sizeof host, "%s", client_to);
        char *colon = strrchr(host, ':');
        if (!colon)
            ct_fail("-C wants IP:PORT");
        *colon = 0;
        struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(colon + 1)) };
        if (inet_pton(AF_INET, host, &a.sin_addr) != 1)
            ct_fail("bad address %s", host);
        child = fork();
        if (child == 0) {
            in_child();
            client(0, &a);
        }
    }
    printf("READY\n");
    for (long tick = 1;; tick++) {
        ct_check_ids();
        int st;
        pid_t dead = waitpid(child, &st, WNOHANG);
        /* The server's handler ends when the client stops, which it does
         * at its own stop tick: ours may not have come yet. Before a stop
         * was asked for, the handler's end is an error. */
        if (dead == child && server_port && ct_stop_requested()) {
            if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
                ct_fail("child %d ended with status %#x", (int)child, st);
            ct_done();
        }
        if (dead != 0)
            ct_fail("child %d ended early with status %#x", (int)child, st);
        printf("TICK %ld\n", tick);
        if (ct_should_stop(tick)) {
            if (!server_port)
                kill(child, SIGUSR1);
            if (waitpid(child, &st, 0) != child || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
                ct_fail("child %d ended with status %#x", (int)child, st);
            ct_done();
        }
        ct_sleep_ms(ct_interval_ms);
    }
}

int main(int argc, char **argv)
{
    ct_parse(argc, argv, "k:S:C:", opt);
    ct_setup();
    if (nclients < 1 || nclients > MAXC)
        ct_fail("bad -k");
    struct sigaction sa = { .sa_handler = on_usr1, .sa_flags = SA_RESTART };
    sigemptyset(&sa.sa_mask);
    sigaction(SIGUSR1, &sa, NULL);
    if (server_port || client_to)
        half();
    int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t al = sizeof a;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) != 0 || listen(ls, 16) != 0 || getsockname(ls, (struct sockaddr *)&a, &al) != 0)
        ct_fail("listen: %s", strerror(errno));
    pid_t clients[MAXC], handlers[MAXC];
    for (int i = 0; i < nclients; i++) {
        clients[i] = fork();
        if (clients[i] < 0)
            ct_fail("fork: %s", strerror(errno));
        if (clients[i] == 0) {
            close(ls);
            in_child();
            client(i, &a);
        }
    }
    for (int i = 0; i < nclients; i++) {
        int c = accept(ls, NULL, NULL);
        if (c < 0)
            ct_fail("accept: %s", strerror(errno));
        handlers[i] = fork();
        if (handlers[i] < 0)
            ct_fail("fork: %s", strerror(errno));
        if (handlers[i] == 0) {
            close(ls);
            in_child();
            handler(c);
        }
        close(c);
    }
    printf("READY clients %d\n", nclients);
    for (long tick = 1;; tick++) {
        ct_check_ids();
        int st;
        pid_t dead = waitpid(-1, &st, WNOHANG);
        if (dead > 0)
            ct_fail("child %d ended early with status %#x", (int)dead, st);
        printf("TICK %ld\n", tick);
        if (ct_should_stop(tick)) {
            for (int i = 0; i < nclients; i++)
                kill(clients[i], SIGUSR1);
            for (int i = 0; i < 2 * nclients; i++) {
                pid_t p = wait(&st);
                if (p < 0)
                    ct_fail("wait: %s", strerror(errno));
                if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
                    ct_fail("child %d ended with status %#x", (int)p, st);
            }
            ct_done();
        }
        ct_sleep_ms(ct_interval_ms);
    }
}
