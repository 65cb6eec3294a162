/* creds: a program that drops its privileges and sandboxes itself in main
 * (after the ckpt agent has connected, which its constructor does), then
 * checks every tick that its credentials are exactly what they were.
 *
 *   creds [-u UID -g GID] [-m SHMNAME] [-f FILE] [-n N] [-t MS] [-s STOPFILE]
 *
 * With -u/-g (run as root): PR_SET_KEEPCAPS, setgroups {GID, 65534},
 * setresgid(GID, 65534, 65533), setresuid(UID, 65534, 65533), keep-caps off
 * again; capabilities: CAP_SETPCAP effective to drop CAP_SYS_ADMIN,
 * CAP_SYS_PTRACE and CAP_MKNOD from the bounding set, then permitted
 * {NET_BIND_SERVICE, NET_RAW}, inheritable and effective
 * {NET_BIND_SERVICE}, ambient NET_BIND_SERVICE raised, securebits NOROOT
 * and NO_CAP_AMBIENT_RAISE; no_new_privs; a
 * seccomp filter that makes getppid fail with EPERM. Without -u: it stays
 * as it was started (root), unsandboxed.
 *
 * With -f, FILE is kept open and its first line checked every tick.
 *
 * With -m, a POSIX shared memory object /SHMNAME (made after the drop, so
 * it is the process's own) holds a pattern checked every tick.
 *
 * Prints "CREDS <state>" once set up, then READY and TICK lines; every
 * tick compares the state (the main thread's /proc/thread-self/status
 * credential lines, getresuid/getresgid, fsuid, fsgid, groups, securebits,
 * no_new_privs) with the one printed, and checks that the filter still
 * acts: FAIL names what changed. */
#include "common.h"

#include <grp.h>
#include <linux/audit.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <sys/fsuid.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <linux/securebits.h>

static long opt_uid = -1, opt_gid = -1;
static const char *opt_shm, *opt_file;

static void other(int opt, const char *arg)
{
    if (opt == 'u') opt_uid = strtol(arg, NULL, 10);
    if (opt == 'g') opt_gid = strtol(arg, NULL, 10);
    if (opt == 'm') opt_shm = arg;
    if (opt == 'f') opt_file = arg;
}

static void set_caps(uint64_t eff, uint64_t prm, uint64_t inh)
{
    struct __user_cap_header_struct h = { _LINUX_CAPABILITY_VERSION_3, 0 };
    struct __user_cap_data_struct d[2] = {
        { (uint32_t)eff, (uint32_t)prm, (uint32_t)inh },
        { (uint32_t)(eff >> 32), (uint32_t)(prm >> 32), (uint32_t)(inh >> 32) },
    };
    if (syscall(SYS_capset, &h, d) != 0)
        ct_fail("capset: %s", strerror(errno));
}

#define BIT(c) (1ULL << (c))

static void drop_and_sandbox(void)
{
    gid_t groups[2] = { (gid_t)opt_gid, 65534 };
    if (prctl(PR_SET_KEEPCAPS, 1) != 0) ct_fail("PR_SET_KEEPCAPS: %s", strerror(errno));
    if (setgroups(2, groups) != 0) ct_fail("setgroups: %s", strerror(errno));
    if (setresgid((gid_t)opt_gid, 65534, 65533) != 0) ct_fail("setresgid: %s", strerror(errno));
    if (setresuid((uid_t)opt_uid, 65534, 65533) != 0) ct_fail("setresuid: %s", strerror(errno));
    if (prctl(PR_SET_KEEPCAPS, 0) != 0) ct_fail("PR_SET_KEEPCAPS 0: %s", strerror(errno));
    uint64_t keep = BIT(CAP_NET_BIND_SERVICE) | BIT(CAP_NET_RAW);
    set_caps(BIT(CAP_SETPCAP), keep | BIT(CAP_SETPCAP), BIT(CAP_NET_BIND_SERVICE));
    int drop[] = { CAP_SYS_ADMIN, CAP_SYS_PTRACE, CAP_MKNOD };
    for (size_t i = 0; i < sizeof drop / sizeof drop[0]; i++)
        if (prctl(PR_CAPBSET_DROP, drop[i], 0, 0, 0) != 0) ct_fail("PR_CAPBSET_DROP %d: %s", drop[i], strerror(errno));
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_NET_BIND_SERVICE, 0, 0) != 0)
        ct_fail("PR_CAP_AMBIENT_RAISE: %s", strerror(errno));
    if (prctl(PR_SET_SECUREBITS, SECBIT_NOROOT | SECBIT_NO_CAP_AMBIENT_RAISE, 0, 0, 0) != 0)
        ct_fail("PR_SET_SECUREBITS: %s", strerror(errno));
    set_caps(BIT(CAP_NET_BIND_SERVICE), keep, BIT(CAP_NET_BIND_SERVICE));
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) ct_fail("PR_SET_NO_NEW_PRIVS: %s", strerror(errno));
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_getppid, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = { sizeof f / sizeof f[0], f };
    if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) != 0) ct_fail("seccomp: %s", strerror(errno));
}

/* The credentials of the calling thread, as one line. */
static void state(char *out, size_t n)
{
    char buf[4096];
    int fd = open("/proc/thread-self/status", O_RDONLY | O_CLOEXEC);
    if (fd < 0) ct_fail("open /proc/thread-self/status: %s", strerror(errno));
    ssize_t len = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (len <= 0) ct_fail("read status: %s", strerror(errno));
    buf[len] = 0;
    size_t o = 0;
    static const char *keys[] = { "Uid:", "Gid:", "Groups:", "CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:", "NoNewPrivs:", "Seccomp:", "Seccomp_filters:" };
    for (size_t k = 0; k < sizeof keys / sizeof keys[0]; k++) {
        char *l = strstr(buf, keys[k]);
        if (!l) ct_fail("no %s in status", keys[k]);
        char *e = strchr(l, '\n');
        for (char *c = l; c < e && o + 2 < n; c++)
            out[o++] = *c == '\t' ? ' ' : *c;
        out[o++] = '|';
    }
    uid_t r, e, s;
    gid_t rg, eg, sg;
    if (getresuid(&r, &e, &s) || getresgid(&rg, &eg, &sg)) ct_fail("getres[ug]id: %s", strerror(errno));
    gid_t g[64];
    int ng = getgroups(64, g);
    o += (size_t)snprintf(out + o, n - o, "res %u/%u/%u %u/%u/%u fs %d/%d groups %d secbits %d nnp %d", r, e, s, rg, eg, sg,
                          setfsuid(-1), setfsgid(-1), ng, prctl(PR_GET_SECUREBITS), prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0));
}

int main(int argc, char **argv)
{
    ct_setup();
    ct_parse(argc, argv, "u:g:m:f:", other);
    int sandboxed = opt_uid >= 0;
    if (sandboxed)
        drop_and_sandbox();
    uint64_t *shm = NULL;
    if (opt_shm) {
        int fd = shm_open(opt_shm, O_CREAT | O_EXCL | O_RDWR, 0600);
        if (fd < 0) ct_fail("shm_open %s: %s", opt_shm, strerror(errno));
        if (ftruncate(fd, 4096) != 0) ct_fail("ftruncate: %s", strerror(errno));
        shm = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (shm == MAP_FAILED) ct_fail("mmap: %s", strerror(errno));
        close(fd);
    }
    int file = -1;
    char first[64] = {0};
    if (opt_file) {
        file = open(opt_file, O_RDONLY | O_CLOEXEC);
        if (file < 0 || pread(file, first, sizeof first - 1, 0) <= 0) ct_fail("open/read %s: %s", opt_file, strerror(errno));
    }
    char before[2048], now[2048];
    state(before, sizeof before);
    printf("CREDS %s\n", before);
    printf("READY\n");
    for (long tick = 1;; tick++) {
        ct_check_ids();
        state(now, sizeof now);
        if (strcmp(before, now) != 0)
            ct_fail("credentials changed:\n  was %s\n  now %s", before, now);
        if (sandboxed) {
            errno = 0;
            long pp = syscall(SYS_getppid);
            if (pp != -1 || errno != EPERM)
                ct_fail("the seccomp filter no longer acts: getppid returned %ld (errno %d)", pp, errno);
        }
        if (file >= 0) {
            char again[64] = {0};
            if (pread(file, again, sizeof again - 1, 0) <= 0 || strcmp(again, first) != 0)
                ct_fail("%s now reads %s", opt_file, again);
        }
        if (shm) {
            for (int i = 0; i < 512; i++)
                if (tick > 1 && shm[i] != ct_mix64((uint64_t)(tick - 1) * 512 + (uint64_t)i))
                    ct_fail("shared memory word %d is %llx at tick %ld", i, (unsigned long long)shm[i], tick);
            for (int i = 0; i < 512; i++)
                shm[i] = ct_mix64((uint64_t)tick * 512 + (uint64_t)i);
        }
        printf("TICK %ld uid %d\n", tick, (int)geteuid());
        if (ct_should_stop(tick)) {
            if (opt_shm) shm_unlink(opt_shm);
            ct_done();
        }
        ct_sleep_ms(ct_interval_ms);
    }
}
