/* filemap: private file mappings come back mapped from their files.
 *
 *   filemap [-n N] [-t MS] [-s STOPFILE] [-m MiB]
 *
 * Writes a data file of -m MiB (default 64, content from a hash: little
 * that zstd can shrink) and maps it MAP_PRIVATE read-write; changes every
 * 97th page in memory at start and one more page each tick. Checks every
 * tick: each page holds the file's content or its changed version; the
 * file itself still holds the original (the changes are copy-on-write);
 * /proc/self/maps names the data file at the mapping's address with the
 * file's inode, and names libc at the address of `printf` (a restart that
 * copied mappings into anonymous memory loses both names).
 */
#include "common.h"
#include <sys/mman.h>

#define PAGE 4096UL

static size_t mib = 64;
static size_t npages;
static unsigned char *map;
static uint32_t *ver;
static char path[4096];
static int fd = -1;

static void opt(int c, const char *arg)
{
    if (c == 'm')
        mib = strtoul(arg, NULL, 10);
}

static uint64_t word(size_t page, uint32_t v, size_t k) { return ct_mix64(((uint64_t)page << 24) ^ ((uint64_t)v << 12) ^ k); }

static void fill(unsigned char *p, size_t page, uint32_t v)
{
    uint64_t *w = (uint64_t *)p;
    for (size_t k = 0; k < PAGE / 8; k++)
        w[k] = word(page, v, k);
}

static int holds(const unsigned char *p, size_t page, uint32_t v)
{
    const uint64_t *w = (const uint64_t *)p;
    for (size_t k = 0; k < PAGE / 8; k++)
        if (w[k] != word(page, v, k))
            return 0;
    return 1;
}

/* The maps line whose range holds addr: its name (empty if anonymous)
 * and inode. */
static int maps_entry(uintptr_t addr, char *name, size_t cap, unsigned long *inode)
{
    FILE *f = fopen("/proc/self/maps", "r");
    char line[4608];
    int found = 0;
    while (f && fgets(line, sizeof line, f)) {
        unsigned long s, e, off, ino;
        char perms[8], dev[16];
        int n = 0;
        if (sscanf(line, "%lx-%lx %7s %lx %15s %lu %n", &s, &e, perms, &off, dev, &ino, &n) < 6)
            continue;
        if (addr < s || addr >= e)
            continue;
        char *nm = line + n;
        nm[strcspn(nm, "\n")] = 0;
        snprintf(name, cap, "%s", nm);
        *inode = ino;
        found = 1;
        break;
    }
    if (f)
        fclose(f);
    return found;
}

static void check(long tick)
{
    for (size_t p = 0; p < npages; p++)
        if (!holds(map + p * PAGE, p, ver[p]))
            ct_fail("tick %ld: page %zu of the mapping does not hold version %u", tick, p, ver[p]);
    unsigned char buf[PAGE];
    size_t probe = (size_t)tick % npages / 97 * 97;
    if (pread(fd, buf, PAGE, (off_t)(probe * PAGE)) != (ssize_t)PAGE || !holds(buf, probe, 0))
        ct_fail("tick %ld: the file's page %zu changed (private changes reached the file)", tick, probe);
    char name[4096];
    unsigned long ino = 0;
    struct stat st;
    if (fstat(fd, &st) != 0)
        ct_fail("fstat: %s", strerror(errno));
    if (!maps_entry((uintptr_t)map, name, sizeof name, &ino))
        ct_fail("tick %ld: no mapping at %p in /proc/self/maps", tick, (void *)map);
    if (strcmp(name, path) != 0 || ino != (unsigned long)st.st_ino)
        ct_fail("tick %ld: /proc/self/maps names '%s' (inode %lu) at %p, not %s (inode %lu)", tick, name, ino, (void *)map, path, (unsigned long)st.st_ino);
    if (!maps_entry((uintptr_t)&printf, name, sizeof name, &ino) || !strstr(name, "libc"))
        ct_fail("tick %ld: the page of printf is mapped from '%s', not from libc", tick, name);
}

int main(int argc, char **argv)
{
    ct_parse(argc, argv, "m:", opt);
    ct_setup();
    npages = (mib << 20) / PAGE;
    char cwd[2048];
    if (!getcwd(cwd, sizeof cwd))
        ct_fail("getcwd: %s", strerror(errno));
    snprintf(path, sizeof path, "%s/filemap.%d.dat", cwd, (int)ct_pid);
    fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0)
        ct_fail("open %s: %s", path, strerror(errno));
    unsigned char buf[PAGE];
    for (size_t p = 0; p < npages; p++) {
        fill(buf, p, 0);
        if (write(fd, buf, PAGE) != (ssize_t)PAGE)
            ct_fail("write %s: %s", path, strerror(errno));
    }
    fsync(fd);
    ver = calloc(npages, sizeof *ver);
    map = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    if (!ver || map == MAP_FAILED)
        ct_fail("mmap %s: %s", path, strerror(errno));
    for (size_t p = 0; p < npages; p += 97)
        fill(map + p * PAGE, p, ++ver[p]);
    check(0);
    printf("READY file=%s\n", path);
    for (long tick = 1;; tick++) {
        ct_check_ids();
        size_t p = (size_t)ct_mix64((uint64_t)tick) % npages;
        fill(map + p * PAGE, p, ++ver[p]);
        check(tick);
        printf("TICK %ld\n", tick);
        if (ct_should_stop(tick)) {
            ct_done();
            return 0;
        }
        ct_sleep_ms(ct_interval_ms);
    }
}
