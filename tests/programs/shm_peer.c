/* shm_peer: one of two unrelated processes sharing memory through a name,
 * as processes on two hosts of one kernel can (what UCX does between MPI
 * ranks it takes for one machine's).
 *
 *   shm_peer [-n N] [-t MS] [-s STOPFILE] -r ROLE (-k KEY | -p NAME)
 *
 * -k KEY (hex): a SysV segment of one page with that key; -p NAME: the
 * POSIX shared memory object /NAME (shm_open) of one page. Made by
 * whichever peer comes first, mapped shared by both. ROLE is 0 or 1: each
 * tick, peer ROLE bumps its own counter in the page and reads the other's,
 * which must never go back; "TICK t mine=M theirs=T". DONE at the stop
 * tick, where each removes the object (the second finds it gone).
 */
#include "common.h"
#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/shm.h>

#define PAGE 4096

static int role = -1;
static key_t key = -1;
static const char *name;

static void opt(int c, const char *arg)
{
    if (c == 'r') role = atoi(arg);
    if (c == 'k') key = (key_t)strtoul(arg, NULL, 16);
    if (c == 'p') name = arg;
}

int main(int argc, char **argv)
{
    ct_setup();
    ct_parse(argc, argv, "r:k:p:", opt);
    if ((role != 0 && role != 1) || (key == -1) == (name == NULL)) {
        fprintf(stderr, "usage: shm_peer -r 0|1 (-k KEY | -p NAME)\n");
        return 2;
    }
    volatile uint64_t *page;
    int id = -1;
    if (name) {
        char path[256];
        snprintf(path, sizeof path, "/%s", name);
        int fd = shm_open(path, O_RDWR | O_CREAT, 0600);
        if (fd < 0)
            ct_fail("shm_open(%s): %s", path, strerror(errno));
        if (ftruncate(fd, PAGE) != 0)
            ct_fail("ftruncate(%s): %s", path, strerror(errno));
        void *m = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (m == MAP_FAILED)
            ct_fail("mmap(%s): %s", path, strerror(errno));
        close(fd);
        page = m;
    } else {
        id = shmget(key, PAGE, IPC_CREAT | 0600);
        if (id < 0)
            ct_fail("shmget(%#x): %s", (unsigned)key, strerror(errno));
        void *m = shmat(id, NULL, 0);
        if (m == (void *)-1)
            ct_fail("shmat(%d): %s", id, strerror(errno));
        page = m;
    }
    printf("READY\n");
    uint64_t theirs = 0;
    for (long t = 1;; t++) {
        ct_sleep_ms(ct_interval_ms);
        ct_check_ids();
        page[role] = page[role] + 1;
        uint64_t now = page[1 - role];
        if (now < theirs)
            ct_fail("tick %ld: the other peer's counter went back from %lu to %lu", t, (unsigned long)theirs, (unsigned long)now);
        theirs = now;
        printf("TICK %ld mine=%lu theirs=%lu\n", t, (unsigned long)page[role], (unsigned long)theirs);
        if (ct_should_stop(t))
            break;
    }
    if (name) {
        char path[256];
        snprintf(path, sizeof path, "/%s", name);
        shm_unlink(path);
    } else {
        shmctl(id, IPC_RMID, NULL);
    }
    ct_done();
}
