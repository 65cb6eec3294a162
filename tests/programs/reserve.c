/* reserve: a huge MAP_NORESERVE reservation of which a few pages are used
 * (sanitizer shadow memory, language runtimes' arenas).
 *
 *   reserve [-n N] [-t MS] [-s STOPFILE] [-g GiB]
 *
 * Reserves -g GiB (default 2048: 2 TiB) read-write with MAP_NORESERVE and
 * writes 64 pages spread over it; every tick rewrites one of them with a
 * new version and touches one more page of a growing set. Checks every
 * tick: each used page holds its version, sampled untouched pages read as
 * zero, the mapping is still MAP_NORESERVE (VmFlags "nr" in smaps), and
 * its own page tables (VmPTE) stay small: a checkpointer that walks or
 * write-protects the whole reservation builds gigabytes of page tables in
 * the program.
 */
#include "common.h"
#include <sys/mman.h>

#define PAGE 4096UL
#define NUSED 64
#define NGROW 4096

static size_t gib = 2048;
static unsigned char *base;
static size_t npages;
static uint32_t ver[NUSED];
static size_t grown; /* pages of the growing set written so far */

static void opt(int c, const char *arg)
{
    if (c == 'g')
        gib = strtoul(arg, NULL, 10);
}

static size_t used_page(int i) { return (size_t)i * (npages / NUSED) + 17; }
static size_t grow_page(size_t k) { return (size_t)(ct_mix64(k ^ 0x5eed) % npages) | 1; }

static void fill(size_t page, uint64_t tag)
{
    uint64_t *w = (uint64_t *)(base + page * PAGE);
    for (size_t k = 0; k < PAGE / 8; k++)
        w[k] = ct_mix64(tag * 1024 + k);
}

static int holds(size_t page, uint64_t tag)
{
    const uint64_t *w = (const uint64_t *)(base + page * PAGE);
    for (size_t k = 0; k < PAGE / 8; k++)
        if (w[k] != ct_mix64(tag * 1024 + k))
            return 0;
    return 1;
}

static long status_kb(const char *key)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long v = -1;
    size_t n = strlen(key);
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, key, n) && line[n] == ':')
            v = strtol(line + n + 1, NULL, 10);
    if (f)
        fclose(f);
    return v;
}

static int still_noreserve(void)
{
    FILE *f = fopen("/proc/self/smaps", "r");
    char line[512];
    int in = 0, nr = -1;
    unsigned long s, e;
    while (f && fgets(line, sizeof line, f)) {
        if (sscanf(line, "%lx-%lx ", &s, &e) == 2 && strchr(line, '-') < strchr(line, ' '))
            in = s == (unsigned long)base;
        else if (in && !strncmp(line, "VmFlags:", 8)) {
            nr = strstr(line, " nr") != NULL;
            break;
        }
    }
    if (f)
        fclose(f);
    return nr;
}

static void check(long tick)
{
    for (int i = 0; i < NUSED; i++)
        if (!holds(used_page(i), ((uint64_t)i << 32) | ver[i]))
            ct_fail("tick %ld: used page %d (page %zu) lost version %u", tick, i, used_page(i), ver[i]);
    for (size_t k = 0; k < grown; k++)
        if (!holds(grow_page(k), 0xabcdef00000000ULL + k))
            ct_fail("tick %ld: grown page %zu (page %zu) lost its content", tick, k, grow_page(k));
    for (int k = 0; k < 64; k++) {
        size_t p = (size_t)(ct_mix64((uint64_t)tick * 64 + (uint64_t)k) % npages) & ~(size_t)1;
        if (p % (npages / NUSED) == 17)
            continue;
        const uint64_t *w = (const uint64_t *)(base + p * PAGE);
        for (size_t j = 0; j < PAGE / 8; j++)
            if (w[j] != 0)
                ct_fail("tick %ld: untouched page %zu is not zero", tick, p);
        /* reading a hole maps the zero page; give it back */
        madvise(base + p * PAGE, PAGE, MADV_DONTNEED);
    }
    long pte = status_kb("VmPTE");
    if (pte > 64 * 1024)
        ct_fail("tick %ld: page tables grew to %ld kB (the reservation was walked)", tick, pte);
    int nr = still_noreserve();
    if (nr != 1)
        ct_fail("tick %ld: the reservation is %s MAP_NORESERVE", tick, nr < 0 ? "missing, not" : "no longer");
}

int main(int argc, char **argv)
{
    ct_parse(argc, argv, "g:", opt);
    ct_setup();
    npages = (gib << 30) / PAGE;
    base = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED)
        ct_fail("mmap %zu GiB MAP_NORESERVE: %s", gib, strerror(errno));
    for (int i = 0; i < NUSED; i++)
        fill(used_page(i), (uint64_t)i << 32);
    check(0);
    printf("READY gib=%zu\n", gib);
    for (long tick = 1;; tick++) {
        ct_check_ids();
        int i = (int)(tick % NUSED);
        ver[i]++;
        fill(used_page(i), ((uint64_t)i << 32) | ver[i]);
        if (grown < NGROW) {
            fill(grow_page(grown), 0xabcdef00000000ULL + grown);
            grown++;
        }
        check(tick);
        printf("TICK %ld grown=%zu pte_kb=%ld\n", tick, grown, status_kb("VmPTE"));
        if (ct_should_stop(tick)) {
            ct_done();
            return 0;
        }
        ct_sleep_ms(ct_interval_ms);
    }
}
