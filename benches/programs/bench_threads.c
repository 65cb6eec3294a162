/* bench_threads: N threads for the stop benchmark.
 *
 *   bench_threads N MIB   a MIB MiB heap and N threads: half loop on
 *                         1 ms nanosleeps, half block in poll on a pipe
 *                         (EINTR retried, as the signal stop causes it);
 *                         prints READY and waits for stdin EOF
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static int pfd[2];

static void *sleeper(void *a)
{
    (void)a;
    struct timespec ts = { 0, 1000000 };
    for (;;)
        nanosleep(&ts, NULL);
}

static void *poller(void *a)
{
    (void)a;
    struct pollfd p = { pfd[0], POLLIN, 0 };
    for (;;)
        if (poll(&p, 1, -1) < 0 && errno != EINTR)
            return NULL;
}

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 8;
    long mib = argc > 2 ? atol(argv[2]) : 16;
    if (pipe(pfd) != 0)
        return 1;
    size_t sz = (size_t)mib << 20;
    unsigned char *h = malloc(sz);
    for (size_t i = 0; i < sz; i += 64)
        h[i] = (unsigned char)(i * 2654435761u);
    pthread_t t;
    for (int i = 0; i < n; i++)
        pthread_create(&t, NULL, i % 2 ? poller : sleeper, NULL);
    printf("READY\n");
    fflush(stdout);
    char c;
    while (read(0, &c, 1) > 0)
        ;
    return 0;
}
