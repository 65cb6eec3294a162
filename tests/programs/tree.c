/* tree: a process tree that talks over pipes and shared memory.
 *
 *   tree [-n N] [-t MS] [-s STOPFILE] [-z TICK] [-p]
 *
 * The parent makes itself a session leader, then starts:
 *   - P, a producer in a process group of its own, writing numbered
 *     16-byte records into pipe 1 as fast as the pipe takes them;
 *   - E, a child that execs this program again as a producer on pipe 2,
 *     with an environment of its own (the exec'd program is still under
 *     ckpt);
 *   - D, a daemon (fork, setsid, fork; the middle process exits) producing
 *     on pipe 3: its parent is init, not us;
 *   - S, a child that rewrites a 4 MiB MAP_SHARED anonymous region and a
 *     256 KiB - 8 bytes POSIX shared memory object (shm_open; its size checked) under a process-shared
 *     mutex, one round after the other;
 *   - Z, a child that exits with status 7 at once and stays a zombie until
 *     the parent reaps it at tick -z (after a restart, in the tests).
 * Every tick the parent reads 64 records from each pipe (so the pipes stay
 * full: there are always bytes in flight) and checks their numbers follow
 * on, checks the shared region is consistent and its round never goes
 * back, and checks no child died. Every child checks, every round, that its
 * pid, parent, process group and session are unchanged.
 * -p: every 5 ticks also run `system("exit 3")` and a `popen` of `echo`
 * (short-lived children that a checkpoint may catch).
 * At the end the parent reaps Z (status 7 expected), stops P, E, S with
 * SIGTERM and checks they died of it, and prints DONE.
 */
#include "common.h"
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>

#define REC_WORDS 2
#define PER_TICK 64
#define SHM_PAGES 1024
#define POSIX_PAGES 64
/* Not a whole number of pages (as Open MPI's vader segments): the object's
 * size must come back as it was, not rounded up to its mapping. */
#define POSIX_SIZE (POSIX_PAGES * 4096L - 8)
static char posix_path[96];

static uint64_t *posix_pages;

struct shm {
    pthread_mutex_t lock;
    uint64_t round;
};

static long reap_tick = -1;
static int with_spawns = 0;

static void opt(int c, const char *arg)
{
    if (c == 'z')
        reap_tick = strtol(arg, NULL, 10);
    if (c == 'p')
        with_spawns = 1;
}

struct ids {
    pid_t pid, ppid, pgid, sid;
};

static struct ids ids_now(void)
{
    struct ids i = { getpid(), getppid(), getpgid(0), getsid(0) };
    return i;
}

static void check_same(const struct ids *a, const char *who)
{
    struct ids b = ids_now();
    if (a->pid != b.pid || a->ppid != b.ppid || a->pgid != b.pgid || a->sid != b.sid)
        ct_fail("%s: ids changed: pid %d->%d ppid %d->%d pgid %d->%d sid %d->%d", who, a->pid, b.pid, a->ppid,
                b.ppid, a->pgid, b.pgid, a->sid, b.sid);
}

static void write_all(int fd, const void *p, size_t n, const char *who)
{
    const char *b = p;
    while (n > 0) {
        ssize_t k = write(fd, b, n);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            ct_fail("%s: write: %s", who, strerror(errno));
        b += k;
        n -= (size_t)k;
    }
}

static void read_all(int fd, void *p, size_t n, const char *who)
{
    char *b = p;
    while (n > 0) {
        ssize_t k = read(fd, b, n);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            ct_fail("%s: read: %s", who, k == 0 ? "end of file" : strerror(errno));
        b += k;
        n -= (size_t)k;
    }
}

/* Writes records seq, mix(seq) forever; checks its ids each record. */
static void produce(int fd, const char *who)
{
    struct ids me = ids_now();
    for (uint64_t seq = 0;; seq++) {
        uint64_t rec[REC_WORDS] = { seq, ct_mix64(seq) };
        write_all(fd, rec, sizeof rec, who);
        if ((seq & 255) == 0)
            check_same(&me, who);
    }
}

static void consume(int fd, uint64_t *next, const char *who)
{
    uint64_t recs[PER_TICK][REC_WORDS];
    read_all(fd, recs, sizeof recs, who);
    for (int i = 0; i < PER_TICK; i++) {
        if (recs[i][0] != *next || recs[i][1] != ct_mix64(*next))
            ct_fail("%s: record %llu expected, got %llu (check %llx)", who, (unsigned long long)*next,
                    (unsigned long long)recs[i][0], (unsigned long long)recs[i][1]);
        (*next)++;
    }
}

static uint64_t page_word(uint64_t round, size_t page, size_t w)
{
    return ct_mix64(round * 1000003ULL + page * 521ULL + w);
}

static void shm_writer(struct shm *s, uint64_t *pages)
{
    struct ids me = ids_now();
    for (;;) {
        pthread_mutex_lock(&s->lock);
        uint64_t r = s->round + 1;
        for (size_t p = 0; p < SHM_PAGES; p++)
            for (size_t w = 0; w < 512; w += 64)
                pages[p * 512 + w] = page_word(r, p, w);
        for (size_t p = 0; p < POSIX_PAGES; p++)
            posix_pages[p * 512] = page_word(r, SHM_PAGES + p, 0);
        s->round = r;
        pthread_mutex_unlock(&s->lock);
        check_same(&me, "shm writer");
        ct_sleep_ms(2);
    }
}

static uint64_t shm_check(struct shm *s, uint64_t *pages, uint64_t last)
{
    pthread_mutex_lock(&s->lock);
    uint64_t r = s->round;
    if (r < last)
        ct_fail("shared round went back: %llu after %llu", (unsigned long long)r, (unsigned long long)last);
    if (r > 0)
        for (size_t p = 0; p < SHM_PAGES; p++)
            for (size_t w = 0; w < 512; w += 64)
                if (pages[p * 512 + w] != page_word(r, p, w))
                    ct_fail("shared page %zu word %zu is not of round %llu", p, w, (unsigned long long)r);
    if (r > 0)
        for (size_t p = 0; p < POSIX_PAGES; p++)
            if (posix_pages[p * 512] != page_word(r, SHM_PAGES + p, 0))
                ct_fail("POSIX shared memory page %zu is not of round %llu", p, (unsigned long long)r);
    struct stat pst;
    if (stat(posix_path, &pst) != 0)
        ct_fail("POSIX shared memory object %s: %s", posix_path, strerror(errno));
    if (pst.st_size != POSIX_SIZE)
        ct_fail("POSIX shared memory object %s: size %ld, not %ld", posix_path, (long)pst.st_size, POSIX_SIZE);
    pthread_mutex_unlock(&s->lock);
    return r;
}

int main(int argc, char **argv)
{
    if (argc == 3 && strcmp(argv[1], "--produce") == 0) {
        /* E after its exec: the pipe is fd argv[2]. */
        produce(atoi(argv[2]), "exec'd producer");
    }
    ct_setup();
    ct_parse(argc, argv, "z:p", opt);
    if (setsid() < 0)
        ct_fail("setsid: %s", strerror(errno));
    struct ids me = ids_now();
    int p1[2], p2[2], p3[2];
    if (pipe(p1) || pipe(p2) || pipe(p3))
        ct_fail("pipe: %s", strerror(errno));

    struct shm *s = mmap(NULL, sizeof(struct shm) + SHM_PAGES * 4096UL, PROT_READ | PROT_WRITE,
                         MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (s == MAP_FAILED)
        ct_fail("mmap: %s", strerror(errno));
    uint64_t *pages = (uint64_t *)((char *)s + 4096);
    char shmname[64];
    snprintf(shmname, sizeof shmname, "/ckpt-tree-%d", (int)getpid());
    int sfd = shm_open(shmname, O_CREAT | O_RDWR, 0600);
    snprintf(posix_path, sizeof posix_path, "/dev/shm%s", shmname);
    if (sfd < 0 || ftruncate(sfd, POSIX_SIZE) != 0)
        ct_fail("shm_open %s: %s", shmname, strerror(errno));
    posix_pages = mmap(NULL, POSIX_PAGES * 4096L, PROT_READ | PROT_WRITE, MAP_SHARED, sfd, 0);
    if (posix_pages == MAP_FAILED)
        ct_fail("mmap of %s: %s", shmname, strerror(errno));
    close(sfd);
    pthread_mutexattr_t ma;
    pthread_mutexattr_init(&ma);
    pthread_mutexattr_setpshared(&ma, PTHREAD_PROCESS_SHARED);
    pthread_mutex_init(&s->lock, &ma);

    pid_t P = fork();
    if (P == 0) {
        setpgid(0, 0);
        close(p1[0]);
        produce(p1[1], "producer");
    }
    pid_t E = fork();
    if (E == 0) {
        close(p2[0]);
        char fdarg[16];
        snprintf(fdarg, sizeof fdarg, "%d", p2[1]);
        /* An environment without the agent's variables: the program
         * stays under ckpt all the same. */
        char *argv2[] = { "tree", "--produce", fdarg, NULL };
        char *envp2[] = { "TREE_ROLE=producer", NULL };
        execve("/proc/self/exe", argv2, envp2);
        ct_fail("exec: %s", strerror(errno));
    }
    pid_t mid = fork();
    if (mid == 0) {
        pid_t middle = getpid(); /* `mid` is 0 here */
        setsid();
        if (fork() == 0) {
            close(p3[0]);
            /* Adopted by init once the middle process is gone: only then
             * are its ids the ones it keeps (under load that can take a
             * while, so no time limit). */
            while (getppid() == middle)
                ct_sleep_ms(2);
            produce(p3[1], "daemon");
        }
        _exit(0);
    }
    int st;
    if (waitpid(mid, &st, 0) != mid || !WIFEXITED(st) || WEXITSTATUS(st) != 0)
        ct_fail("daemon's middle process: status %x", st);
    pid_t S = fork();
    if (S == 0)
        shm_writer(s, pages);
    pid_t Z = fork();
    if (Z == 0)
        _exit(7);
    close(p1[1]);
    close(p2[1]);
    close(p3[1]);
    printf("READY P=%d E=%d S=%d Z=%d\n", P, E, S, Z);

    uint64_t n1 = 0, n2 = 0, n3 = 0, round = 0;
    int reaped = 0;
    for (long tick = 1;; tick++) {
        ct_check_ids();
        /* Our own parent is whoever runs us: `ckpt launch`'s or `ckpt
         * restart`'s caller. */
        me.ppid = getppid();
        check_same(&me, "parent");
        consume(p1[0], &n1, "pipe from the producer");
        consume(p2[0], &n2, "pipe from the exec'd producer");
        consume(p3[0], &n3, "pipe from the daemon");
        round = shm_check(s, pages, round);
        pid_t live[3] = { P, E, S };
        for (int i = 0; i < 3; i++)
            if (waitpid(live[i], &st, WNOHANG) != 0)
                ct_fail("child %d ended early (status %x)", live[i], st);
        if (!reaped && reap_tick >= 0 && tick >= reap_tick) {
            pid_t r = waitpid(Z, &st, 0);
            if (r != Z || !WIFEXITED(st) || WEXITSTATUS(st) != 7)
                ct_fail("the zombie child %d: waitpid %d status %x, expected exit 7", Z, r, st);
            reaped = 1;
            printf("REAPED %d status 7\n", Z);
        }
        if (with_spawns && tick % 5 == 0) {
            int rc = system("exit 3");
            if (rc == -1 || !WIFEXITED(rc) || WEXITSTATUS(rc) != 3)
                ct_fail("system: status %x", rc);
            FILE *f = popen("echo popen-ok", "r");
            char line[64] = {0};
            if (!f || !fgets(line, sizeof line, f) || strcmp(line, "popen-ok\n") != 0)
                ct_fail("popen: got %s", line);
            if (pclose(f) != 0)
                ct_fail("pclose");
        }
        printf("TICK %ld pipes %llu %llu %llu round %llu\n", tick, (unsigned long long)n1, (unsigned long long)n2,
               (unsigned long long)n3, (unsigned long long)round);
        if (ct_should_stop(tick))
            break;
        ct_sleep_ms(ct_interval_ms);
    }
    if (!reaped) {
        if (waitpid(Z, &st, 0) != Z || !WIFEXITED(st) || WEXITSTATUS(st) != 7)
            ct_fail("the zombie child %d: status %x, expected exit 7", Z, st);
    }
    pid_t kids[3] = { P, E, S };
    for (int i = 0; i < 3; i++) {
        kill(kids[i], SIGTERM);
        if (waitpid(kids[i], &st, 0) != kids[i] || !WIFSIGNALED(st) || WTERMSIG(st) != SIGTERM)
            ct_fail("child %d: status %x, expected SIGTERM", kids[i], st);
    }
    shm_unlink(shmname);
    ct_done();
}
