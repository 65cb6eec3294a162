/* procfiles: files under /proc/PID/ held open come back naming the
 * restored process.
 *
 *   procfiles [-n N] [-t MS] [-s STOPFILE]
 *
 * Held: /proc/self/stat at fd 40 (below it a gap of closed numbers),
 * /proc/self/status read to offset 5, /proc/self/maps, /proc/self/mem
 * read-write (close-on-exec), opendir("/proc/self/fd"), and
 * /proc/CHILD/status of a child of its own. Every tick: stat's pid field
 * and status's Pid: are its pid; the offset is still 5; mem reads a
 * variable that changes each tick and writes another one; maps names
 * [stack]; the fd directory lists fd 40; the child's status names the
 * child.
 */
#include "common.h"
#include <dirent.h>
#include <signal.h>
#include <sys/wait.h>

static volatile uint64_t magic, poked;

static void rd(int fd, char *buf, size_t n, long tick, const char *what)
{
    ssize_t k = pread(fd, buf, n - 1, 0);
    if (k <= 0)
        ct_fail("tick %ld: pread %s: %s", tick, what, strerror(errno));
    buf[k] = 0;
}

int main(int argc, char **argv)
{
    ct_parse(argc, argv, "", NULL);
    ct_setup();
    pid_t parent = getpid();
    pid_t child = fork();
    if (child == 0) {
        for (;;) { /* gone with its parent (kill -9 of the test) */
            ct_sleep_ms(10);
            if (getppid() != parent)
                _exit(0);
        }
    }
    int st = open("/proc/self/stat", O_RDONLY);
    if (st < 0 || dup2(st, 40) != 40)
        ct_fail("open /proc/self/stat: %s", strerror(errno));
    close(st);
    int status = open("/proc/self/status", O_RDONLY);
    char tmp[8];
    if (status < 0 || read(status, tmp, 5) != 5)
        ct_fail("read /proc/self/status: %s", strerror(errno));
    int maps = open("/proc/self/maps", O_RDONLY);
    int mem = open("/proc/self/mem", O_RDWR | O_CLOEXEC);
    DIR *fds = opendir("/proc/self/fd");
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/status", (int)child);
    int cstatus = open(path, O_RDONLY);
    if (maps < 0 || mem < 0 || !fds || cstatus < 0)
        ct_fail("open /proc files: %s", strerror(errno));
    static char buf[1 << 20];
    printf("READY\n");
    for (long tick = 1;; tick++) {
        ct_check_ids();
        ct_sleep_ms(ct_interval_ms);
        rd(40, buf, sizeof buf, tick, "/proc/self/stat");
        if (atoi(buf) != (int)getpid())
            ct_fail("tick %ld: fd 40 is the stat of process %d, not %d", tick, atoi(buf), (int)getpid());
        rd(status, buf, sizeof buf, tick, "/proc/self/status");
        char want[64];
        snprintf(want, sizeof want, "\nPid:\t%d\n", (int)getpid());
        if (!strstr(buf, want))
            ct_fail("tick %ld: /proc/self/status does not name %d", tick, (int)getpid());
        if (lseek(status, 0, SEEK_CUR) != 5)
            ct_fail("tick %ld: /proc/self/status offset %ld, not 5", tick, (long)lseek(status, 0, SEEK_CUR));
        magic = ct_mix64((uint64_t)tick);
        uint64_t v = 0;
        if (pread(mem, &v, 8, (off_t)(uintptr_t)&magic) != 8 || v != magic)
            ct_fail("tick %ld: /proc/self/mem reads %#llx, not %#llx (%s)", tick, (unsigned long long)v, (unsigned long long)magic, strerror(errno));
        v = (uint64_t)tick * 3;
        if (pwrite(mem, &v, 8, (off_t)(uintptr_t)&poked) != 8 || poked != (uint64_t)tick * 3)
            ct_fail("tick %ld: a write through /proc/self/mem did not land", tick);
        if (!(fcntl(mem, F_GETFD) & FD_CLOEXEC) || (fcntl(mem, F_GETFL) & O_ACCMODE) != O_RDWR)
            ct_fail("tick %ld: /proc/self/mem lost its flags", tick);
        rd(maps, buf, sizeof buf, tick, "/proc/self/maps");
        if (!strstr(buf, "[stack]"))
            ct_fail("tick %ld: /proc/self/maps has no [stack]", tick);
        rewinddir(fds);
        int seen40 = 0;
        struct dirent *e;
        while ((e = readdir(fds)))
            seen40 |= strcmp(e->d_name, "40") == 0;
        if (!seen40)
            ct_fail("tick %ld: /proc/self/fd does not list fd 40", tick);
        rd(cstatus, buf, sizeof buf, tick, "the child's status");
        snprintf(want, sizeof want, "\nPid:\t%d\n", (int)child);
        if (!strstr(buf, want))
            ct_fail("tick %ld: the child's /proc status does not name %d", tick, (int)child);
        printf("TICK %ld\n", tick);
        if (ct_should_stop(tick)) {
            kill(child, SIGKILL);
            waitpid(child, NULL, 0);
            ct_done();
            return 0;
        }
    }
}
