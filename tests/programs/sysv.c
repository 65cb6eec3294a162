/* sysv: a parent and its child sharing two SysV shared memory segments.
 *
 *   sysv [-n N] [-t MS] [-s STOPFILE] -k KEY
 *
 * KEY (hex) names a segment of 3 pages and 100 bytes, mode 0640, whose
 * first pages the parent fills with a pattern at the start; the second
 * segment is private (IPC_PRIVATE) and removed (IPC_RMID) at once, while
 * both processes keep it attached. The parent attaches the keyed segment a
 * second time, read-only, and makes all but the first page of its first
 * attach read-only, before the fork.
 *
 * Every tick, in both processes: the pattern is intact; IPC_STAT of both
 * segments gives their key, size, mode (SHM_DEST on the removed one) and
 * attach count (the parent's attaches plus the child's, see check_all);
 * /proc/self/maps
 * shows them at the addresses they were attached at. The parent bumps a
 * counter in the keyed segment, the child copies it into the removed one
 * and bumps its own, which the parent reads back: each sees the other's
 * writes go on. The parent also attaches the keyed segment a third time,
 * checks that it shows the same memory and the count, and detaches it
 * (shmdt).
 * At the stop tick, the parent detaches everything (shmdt must succeed),
 * checks the count drops, removes the keyed segment, stops the child and
 * prints DONE.
 */
#include "common.h"
#include <signal.h>
#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/shm.h>
#include <sys/wait.h>

#define PAGE 4096
#define SIZE (3 * PAGE + 100)
#define PRIV_SIZE (2 * PAGE)
#define PATTERN_WORDS (2 * PAGE / 8)

struct shared {
    volatile uint64_t parent_count;
    volatile uint64_t echo; /* written by the child */
    uint64_t pad[6];
};

static key_t key;
static int kid, pid2;
static char *kmem, *kro, *pmem;

static void opt(int c, const char *arg)
{
    if (c == 'k') key = (key_t)strtoul(arg, NULL, 16);
}

static void stat_seg(const char *who, int id, const char *what, key_t k, size_t size, int mode, int dest, int nattch_lo, int nattch_hi)
{
    struct shmid_ds ds;
    if (shmctl(id, IPC_STAT, &ds) != 0)
        ct_fail("%s: shmctl(%s %d, IPC_STAT): %s", who, what, id, strerror(errno));
    if (ds.shm_perm.__key != k)
        ct_fail("%s: %s %d: key %#x, expected %#x", who, what, id, (unsigned)ds.shm_perm.__key, (unsigned)k);
    if (ds.shm_segsz != size)
        ct_fail("%s: %s %d: size %zu, expected %zu", who, what, id, (size_t)ds.shm_segsz, size);
    if ((int)(ds.shm_perm.mode & 0777) != mode)
        ct_fail("%s: %s %d: mode %o, expected %o", who, what, id, ds.shm_perm.mode & 0777, mode);
    if (!!(ds.shm_perm.mode & SHM_DEST) != dest)
        ct_fail("%s: %s %d: SHM_DEST is %s", who, what, id, dest ? "not set" : "set");
    if ((int)ds.shm_nattch < nattch_lo || (int)ds.shm_nattch > nattch_hi)
        ct_fail("%s: %s %d: %d attaches, expected %d..%d", who, what, id, (int)ds.shm_nattch, nattch_lo, nattch_hi);
}

/* The mapping at addr is a SysV mapping of segment id, with perms rw. */
static void check_map(void *addr, int id, const char *perms)
{
    char line[512];
    FILE *f = fopen("/proc/self/maps", "re");
    if (!f)
        ct_fail("maps: %s", strerror(errno));
    int found = 0;
    while (fgets(line, sizeof line, f)) {
        unsigned long start, end, inode;
        char p[8];
        if (sscanf(line, "%lx-%lx %7s %*s %*s %lu", &start, &end, p, &inode) != 4 || start != (unsigned long)addr)
            continue;
        found = 1;
        if (!strstr(line, "/SYSV") || (int)inode != id || strncmp(p, perms, 4) != 0)
            ct_fail("the mapping at %p is not SysV segment %d %s: %s", addr, id, perms, line);
    }
    fclose(f);
    if (!found)
        ct_fail("nothing mapped at %p (SysV segment %d)", addr, id);
}

static void check_pattern(const char *who)
{
    const uint64_t *w = (const uint64_t *)(kmem + PAGE);
    for (size_t i = 0; i < PATTERN_WORDS; i++)
        if (w[i] != ct_mix64(i ^ (uint64_t)key))
            ct_fail("%s: word %zu of the keyed segment changed", who, i);
    if (memcmp(kro + PAGE, kmem + PAGE, 2 * PAGE) != 0)
        ct_fail("%s: the read-only attach shows other memory", who);
}

static void check_all(int parent, const char *who)
{
    check_pattern(who);
    /* Each process: its first attach of the keyed segment (split in two
     * mappings by mprotect, each counts) and the read-only one: 6.
     * The parent checks between its own short-lived third attaches, so it
     * sees exactly 6. The child may look while the parent's third attach
     * is there (7) or still inside shmat, which counts it twice for a
     * moment (8): do_shmat raises shm_nattch to keep the segment alive,
     * the new mapping's shm_open raises it again, and only then is the
     * first one taken back (after taking shm_ids' rwsem, which a reader of
     * /proc/sysvipc/shm holds). */
    stat_seg(who, kid, "keyed segment", key, SIZE, 0640, 0, 6, parent ? 6 : 8);
    stat_seg(who, pid2, "removed segment", IPC_PRIVATE, PRIV_SIZE, 0600, 1, 2, 2);
    check_map(kmem, kid, "rw-s");
    check_map(kmem + PAGE, kid, "r--s");
    check_map(kro, kid, "r--s");
    check_map(pmem, pid2, "rw-s");
    if (mprotect(kro, PAGE, PROT_READ | PROT_WRITE) == 0 || errno != EACCES)
        ct_fail("%s: the read-only attach could be made writable", who);
}

int main(int argc, char **argv)
{
    ct_parse(argc, argv, "k:", opt);
    ct_setup();
    if (!key)
        ct_fail("-k KEY is required");
    kid = shmget(key, SIZE, IPC_CREAT | IPC_EXCL | 0640);
    if (kid < 0)
        ct_fail("shmget(%#x): %s", (unsigned)key, strerror(errno));
    kmem = shmat(kid, NULL, 0);
    kro = shmat(kid, NULL, SHM_RDONLY);
    pid2 = shmget(IPC_PRIVATE, PRIV_SIZE, IPC_CREAT | 0600);
    pmem = pid2 < 0 ? (void *)-1 : shmat(pid2, NULL, 0);
    if (kmem == (void *)-1 || kro == (void *)-1 || pmem == (void *)-1)
        ct_fail("shmat: %s", strerror(errno));
    if (shmctl(pid2, IPC_RMID, NULL) != 0)
        ct_fail("IPC_RMID: %s", strerror(errno));
    uint64_t *w = (uint64_t *)(kmem + PAGE);
    for (size_t i = 0; i < PATTERN_WORDS; i++)
        w[i] = ct_mix64(i ^ (uint64_t)key);
    volatile struct shared *ks = (struct shared *)kmem, *ps = (struct shared *)pmem;
    if (mprotect(kmem + PAGE, 3 * PAGE, PROT_READ) != 0)
        ct_fail("mprotect: %s", strerror(errno));

    pid_t child = fork();
    if (child == 0) {
        ct_pid = getpid();
        ct_tid = ct_gettid();
        uint64_t last = 0;
        for (;;) {
            ct_check_ids();
            check_all(0, "child");
            uint64_t c = ks->parent_count;
            if (c < last)
                ct_fail("child: the parent's counter went back from %llu to %llu", (unsigned long long)last, (unsigned long long)c);
            last = c;
            ps->parent_count = c;
            ps->echo++;
            ct_sleep_ms(ct_interval_ms);
        }
    }
    printf("READY child %d keyed %d removed %d at %p %p %p\n", (int)child, kid, pid2, (void *)kmem, (void *)kro, (void *)pmem);
    uint64_t echo = 0, seen_echo_at = 0;
    for (long tick = 1;; tick++) {
        ct_check_ids();
        int st;
        if (waitpid(child, &st, WNOHANG) != 0)
            ct_fail("the child ended (status %#x)", st);
        check_all(1, "parent");
        ks->parent_count++;
        uint64_t e = ps->echo;
        if (e < echo)
            ct_fail("the child's counter went back from %llu to %llu", (unsigned long long)echo, (unsigned long long)e);
        if (e > echo) {
            echo = e;
            seen_echo_at = (uint64_t)tick;
        } else if ((uint64_t)tick > seen_echo_at + 50) {
            ct_fail("the child's counter has not moved for 50 ticks");
        }
        if (ps->parent_count > ks->parent_count)
            ct_fail("the child saw count %llu, ahead of %llu", (unsigned long long)ps->parent_count, (unsigned long long)ks->parent_count);
        /* Another attach of the same id: same memory, one more attach. */
        volatile struct shared *third = shmat(kid, NULL, 0);
        if (third == (void *)-1)
            ct_fail("shmat(%d) again: %s", kid, strerror(errno));
        if (third->parent_count != ks->parent_count)
            ct_fail("a new attach of segment %d shows other memory", kid);
        stat_seg("parent", kid, "keyed segment", key, SIZE, 0640, 0, 7, 7);
        if (shmdt((const void *)third) != 0)
            ct_fail("shmdt of the new attach: %s", strerror(errno));
        stat_seg("parent", kid, "keyed segment", key, SIZE, 0640, 0, 6, 6);
        printf("TICK %ld count %llu echo %llu\n", tick, (unsigned long long)ks->parent_count, (unsigned long long)echo);
        if (ct_should_stop(tick)) {
            kill(child, SIGKILL);
            waitpid(child, &st, 0);
            if (shmdt(kmem) != 0 || shmdt(kro) != 0 || shmdt(pmem) != 0)
                ct_fail("shmdt: %s", strerror(errno));
            stat_seg("parent", kid, "keyed segment", key, SIZE, 0640, 0, 0, 0);
            struct shmid_ds ds;
            if (shmctl(pid2, IPC_STAT, &ds) == 0)
                ct_fail("the removed segment %d outlived its last attach", pid2);
            if (shmctl(kid, IPC_RMID, NULL) != 0)
                ct_fail("IPC_RMID: %s", strerror(errno));
            ct_done();
        }
        ct_sleep_ms(ct_interval_ms);
    }
}
