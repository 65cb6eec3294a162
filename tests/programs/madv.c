/* madv: memory with madvise and mlock attributes, each checked every tick
 * in its own /proc/self/smaps VmFlags, with contents.
 *
 *   madv [-n N] [-t MS] [-s STOPFILE]
 *
 * Regions (anonymous, private): WIPEONFORK (16 pages, one page rewritten
 * each tick: the rest keep their start pattern), DONTFORK (4 pages),
 * HUGEPAGE (4 MiB), NOHUGEPAGE, DONTDUMP, MERGEABLE (checked only if the
 * kernel takes it) and mlock'ed (4 pages; /proc/self/status VmLck too).
 * After READY, mlockall(MCL_FUTURE): each tick a new mapping must be locked.
 * Every page of every region holds a pattern of (region, page, version).
 */
#include "common.h"
#include <sys/mman.h>

#define PAGE 4096
#define NREG 7

struct reg {
    const char *name;
    const char *flag; /* VmFlags */
    int advice;       /* -1: mlock */
    size_t pages;
    char *addr;
    int on;
    long version[1024];
};

static struct reg regs[NREG] = {
    { "WIPEONFORK", "wf", MADV_WIPEONFORK, 16, 0, 0, { 0 } },
    { "DONTFORK", "dc", MADV_DONTFORK, 4, 0, 0, { 0 } },
    { "HUGEPAGE", "hg", MADV_HUGEPAGE, 1024, 0, 0, { 0 } },
    { "NOHUGEPAGE", "nh", MADV_NOHUGEPAGE, 8, 0, 0, { 0 } },
    { "DONTDUMP", "dd", MADV_DONTDUMP, 8, 0, 0, { 0 } },
    { "MERGEABLE", "mg", MADV_MERGEABLE, 8, 0, 0, { 0 } },
    { "mlock", "lo", -1, 4, 0, 0, { 0 } },
};

static void fill(struct reg *r, size_t pg, long v)
{
    uint64_t *w = (uint64_t *)(r->addr + pg * PAGE);
    for (size_t i = 0; i < PAGE / 8; i++)
        w[i] = ct_mix64(((uint64_t)(r - regs) << 48) ^ (pg << 24) ^ (uint64_t)v ^ i);
    r->version[pg] = v;
}

static void check_content(struct reg *r, long tick)
{
    for (size_t pg = 0; pg < r->pages; pg++) {
        uint64_t *w = (uint64_t *)(r->addr + pg * PAGE);
        for (size_t i = 0; i < PAGE / 8; i++)
            if (w[i] != ct_mix64(((uint64_t)(r - regs) << 48) ^ (pg << 24) ^ (uint64_t)r->version[pg] ^ i))
                ct_fail("tick %ld: %s page %zu word %zu is %#llx, not version %ld's", tick, r->name, pg, i, (unsigned long long)w[i], r->version[pg]);
    }
}

/* The VmFlags of the mapping holding `a`, in `out`. */
static void vm_flags(const char *a, char *out, size_t n)
{
    FILE *f = fopen("/proc/self/smaps", "r");
    if (!f)
        ct_fail("open smaps: %s", strerror(errno));
    char line[1024];
    int in = 0;
    out[0] = 0;
    while (fgets(line, sizeof line, f)) {
        unsigned long s, e;
        if (sscanf(line, "%lx-%lx ", &s, &e) == 2 && strchr(line, '-') < strchr(line, ' ')) {
            in = (uintptr_t)a >= s && (uintptr_t)a < e;
        } else if (in && strncmp(line, "VmFlags:", 8) == 0) {
            size_t m = strlen(line + 8);
            if (m >= n)
                m = n - 1;
            memcpy(out, line + 8, m);
            out[m] = 0;
            break;
        }
    }
    fclose(f);
}

static int has_flag(const char *flags, const char *flag)
{
    char buf[512];
    snprintf(buf, sizeof buf, " %s", flags);
    char want[8];
    snprintf(want, sizeof want, " %s ", flag);
    char *nl = strchr(buf, '\n');
    if (nl)
        strcpy(nl, " ");
    return strstr(buf, want) != NULL;
}

static long vmlck_kb(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long kb = -1;
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "VmLck: %ld kB", &kb) == 1)
            break;
    if (f)
        fclose(f);
    return kb;
}

int main(int argc, char **argv)
{
    ct_parse(argc, argv, "", NULL);
    ct_setup();
    for (int k = 0; k < NREG; k++) {
        struct reg *r = &regs[k];
        size_t len = r->pages * PAGE;
        /* A guard page either side keeps each region a mapping of its own. */
        char *g = mmap(NULL, len + 2 * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (g == MAP_FAILED)
            ct_fail("mmap %s: %s", r->name, strerror(errno));
        r->addr = mmap(g + PAGE, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
        if (r->addr == MAP_FAILED)
            ct_fail("mmap %s: %s", r->name, strerror(errno));
        for (size_t pg = 0; pg < r->pages; pg++)
            fill(r, pg, 1);
        int rc = r->advice < 0 ? mlock(r->addr, len) : madvise(r->addr, len, r->advice);
        if (rc != 0 && r->advice == MADV_MERGEABLE) {
            printf("MERGEABLE not supported here: %s\n", strerror(errno));
            continue;
        }
        if (rc != 0)
            ct_fail("%s: %s", r->name, strerror(errno));
        r->on = 1;
    }
    /* Mappings made from now on are locked (mm->def_flags, not in /proc). */
    if (mlockall(MCL_FUTURE) != 0)
        ct_fail("mlockall(MCL_FUTURE): %s", strerror(errno));
    printf("READY\n");
    for (long tick = 1;; tick++) {
        ct_check_ids();
        ct_sleep_ms(ct_interval_ms);
        for (int k = 0; k < NREG; k++) {
            struct reg *r = &regs[k];
            char flags[512];
            check_content(r, tick);
            if (!r->on)
                continue;
            vm_flags(r->addr, flags, sizeof flags);
            if (!has_flag(flags, r->flag))
                ct_fail("tick %ld: %s region at %p lacks VmFlags %s: %s", tick, r->name, (void *)r->addr, r->flag, flags);
        }
        char *fresh = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (fresh == MAP_FAILED)
            ct_fail("tick %ld: mmap: %s", tick, strerror(errno));
        char ff[512];
        vm_flags(fresh, ff, sizeof ff);
        if (!has_flag(ff, "lo"))
            ct_fail("tick %ld: a new mapping is not locked: mlockall(MCL_FUTURE) was lost (VmFlags %s)", tick, ff);
        munmap(fresh, PAGE);
        long lck = vmlck_kb();
        if (lck < (long)(regs[6].pages * PAGE / 1024))
            ct_fail("tick %ld: VmLck is %ld kB, under the %zu kB locked", tick, lck, regs[6].pages * PAGE / 1024);
        /* One page of the WIPEONFORK region changes each tick. */
        fill(&regs[0], (size_t)tick % regs[0].pages, tick + 1);
        fill(&regs[1], (size_t)tick % regs[1].pages, tick + 1);
        printf("TICK %ld\n", tick);
        if (ct_should_stop(tick)) {
            ct_done();
            return 0;
        }
    }
}
