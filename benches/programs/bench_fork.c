/* bench_fork: process-creation costs and a tree of idle processes.
 *
 *   bench_fork fork N     N times fork, child _exit(0), waitpid; prints
 *                         "NS_PER_OP x"
 *   bench_fork exec N     N times fork, child execs /bin/true, waitpid
 *   bench_fork tree K MIB a parent and K-1 children, each touching MIB MiB,
 *                         then idle; prints READY and waits for stdin EOF
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* Where the touched memory is kept: without it, gcc -O2 drops the
 * malloc and its stores (nothing reads them), and the "16 MiB" processes
 * held ~200 KiB of anonymous memory (until 2026-12-07). */
static unsigned char *volatile kept;

static void touch(long mib, unsigned seed)
{
    size_t n = (size_t)mib << 20;
    unsigned char *p = malloc(n);
    if (!p)
        abort();
    for (size_t i = 0; i < n; i += 64)
        p[i] = (unsigned char)(i * 2654435761u + seed);
    kept = p;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 3)
        return 2;
    long n = atol(argv[2]);
    if (strcmp(argv[1], "tree") == 0) {
        long mib = argc > 3 ? atol(argv[3]) : 16;
        pid_t kids[256];
        long nk = 0;
        for (long i = 1; i < n && nk < 256; i++) {
            pid_t p = fork();
            if (p == 0) {
                touch(mib, (unsigned)i);
                for (;;)
                    pause();
            }
            kids[nk++] = p;
        }
        touch(mib, 0);
        printf("READY\n");
        char buf[16];
        while (fread(buf, 1, sizeof buf, stdin) > 0) {
        }
        for (long i = 0; i < nk; i++) {
            kill(kids[i], SIGKILL);
            waitpid(kids[i], NULL, 0);
        }
        return 0;
    }
    int exec = strcmp(argv[1], "exec") == 0;
    long long t0 = now_ns();
    for (long i = 0; i < n; i++) {
        pid_t p = fork();
        if (p == 0) {
            if (exec)
                execl("/bin/true", "true", (char *)NULL);
            _exit(0);
        }
        int st;
        waitpid(p, &st, 0);
    }
    printf("NS_PER_OP %lld\n", (now_ns() - t0) / n);
    return 0;
}
