/* mem_churn: memory that changes in every way between checkpoints, and is
 * verified exactly, all of it, every tick.
 *
 *   mem_churn [-n N] [-t MS] [-s STOPFILE] [-m HEAP_MIB] [-S SEED] [-d DIV] [-T]
 *
 * Plain C (no ckpt headers beyond common.h); builds with `-static` too:
 *   gcc -O2 -pthread -static -o mem_churn mem_churn.c
 *
 * Everything is derived from (SEED, tick number): two runs with the same
 * seed print the same `sum=` on every tick line, so a restored run can be
 * compared tick by tick with the original.
 *
 * Memory it holds (expected state kept compactly in a separate "book"
 * mapping of per-page version numbers; a page's content is a function of
 * (area, page index, epoch, version), version 0 meaning "must read zero"):
 *   - heap: -m MiB (default 64) private anonymous mapping; 3/4 of its pages
 *     written before READY, the rest holes; every tick 0.1%..10% of its
 *     pages rewritten at random, one sequential run of up to 256 pages, and
 *     a few runs dropped with MADV_DONTNEED (they must read back zero);
 *   - objects: 10 mappings (one MAP_SHARED anonymous) living in slots of a
 *     PROT_NONE arena; every tick a few of: page writes, mremap to another
 *     slot (often the slot another object left, so a new region sits where
 *     an old one was at the last checkpoint), in-place mremap grow/shrink,
 *     munmap + mmap at the same address with new content on the same pages,
 *     mmap MAP_FIXED over it, mprotect of page runs (read-only, PROT_NONE
 *     holding data, back to read-write; VMAs split and merge), MADV_DONTNEED,
 *     and recreation in another slot; at least one new mapping every tick;
 *   - brk: sbrk grows and shrinks the program break (up to 4 MiB) every
 *     tick, pages written at random;
 *   - a thread that keeps writing a 1 MiB mapping on its own, all the time
 *     (also while checkpoints are taken): sweep s writes every page with
 *     content(s, page), after checking the page still holds content(s-1).
 * Each tick: verify everything written by the previous tick (PROT_NONE pages
 * through /proc/self/mem, holes skipped when mincore says they are absent
 * and read as zero otherwise), print "TICK n sum=<checksum of the verified
 * state> thr=<thread sweeps> ...", then mutate for this tick and sleep. A
 * checkpoint taken while it sleeps therefore holds unverified mutations
 * (non-present DONTNEED pages included): the first tick after a restart
 * verifies them.
 * -T: no writer thread.  -d DIV: divide the heap's random writes per tick by
 * DIV (default 1: 0.1%..10% of the heap's pages).
 */
#include "common.h"
#include <pthread.h>
#include <sys/mman.h>

#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000
#endif
#ifndef MREMAP_FIXED
#define MREMAP_FIXED 2
#endif
#ifndef MREMAP_MAYMOVE
#define MREMAP_MAYMOVE 1
#endif

#define PAGE 4096UL
#define WPP (PAGE / 8)
#define STEP 0x9e3779b97f4a7c15ULL

static uint64_t seed = 1;
static size_t heap_mib = 64;
static int no_thread = 0;
static size_t heap_div = 1;

/* ---------------------------------------------------------------- content */

static inline uint64_t page_base(uint64_t area, uint64_t idx, uint64_t epoch, uint64_t ver)
{
    return ct_mix64(ct_mix64(seed ^ (area << 56) ^ (epoch << 32) ^ idx) ^ (ver * 0x100000001b3ULL));
}

static void fill_page(void *addr, uint64_t base)
{
    uint64_t *w = addr;
    for (size_t j = 0; j < WPP; j++)
        w[j] = base + j * STEP;
}

/* 0 if the page holds content `base` (or zeros if ver == 0) */
static long check_page(const void *addr, uint64_t base, int zero)
{
    const uint64_t *w = addr;
    if (zero) {
        for (size_t j = 0; j < WPP; j++)
            if (w[j] != 0)
                return (long)j + 1;
        return 0;
    }
    for (size_t j = 0; j < WPP; j++)
        if (w[j] != base + j * STEP)
            return (long)j + 1;
    return 0;
}

static void fail_page(const char *what, size_t idx, const void *addr, const uint64_t *got, long j,
                      uint64_t base, uint32_t ver, uint64_t epoch)
{
    uint64_t want = ver ? base + (uint64_t)(j - 1) * STEP : 0;
    ct_fail("%s page %zu (addr %p) word %ld: got %016llx want %016llx (version %u epoch %llu)", what, idx,
            addr, j - 1, (unsigned long long)got[j - 1], (unsigned long long)want, ver,
            (unsigned long long)epoch);
}

/* Is the page resident? (1 if mincore cannot tell) */
static int resident(const void *addr)
{
    unsigned char v = 1;
    if (mincore((void *)addr, PAGE, &v) != 0)
        return 1;
    return v & 1;
}

/* ---------------------------------------------------------------- book */

/* The expected state: in its own small mapping ("the book"). */
#define NOBJ 10
#define OBJ_MAX 512 /* pages (2 MiB) */
#define NSLOTS 24
#define SLOT (4UL << 20)
#define BRK_MAX 1024 /* pages */
#define THR_PAGES 256

enum { P_RW = 0, P_RO = 1, P_NONE = 2 };

struct obj {
    int slot;
    int shared;
    uint32_t npages;
    uint32_t epoch;
    uint32_t ver[OBJ_MAX];
    uint8_t prot[OBJ_MAX];
};

struct book {
    uint32_t *hver; /* heap page versions (own mapping) */
    size_t hpages;
    struct obj obj[NOBJ];
    int slot_owner[NSLOTS];
    int last_freed;
    uint32_t brk_pages;
    uint32_t brk_ver[BRK_MAX];
    uint64_t nextra; /* mappings made */
};

static struct book *bk;
static unsigned char *heap;
static unsigned char *arena;
static unsigned char *brk_base;
static unsigned char *thr_area;
static volatile uint64_t thr_sweeps;

static inline unsigned char *slot_addr(int s) { return arena + (size_t)s * SLOT; }
static inline unsigned char *obj_addr(const struct obj *o) { return slot_addr(o->slot); }

static int prot_bits(int p)
{
    return p == P_RW ? PROT_READ | PROT_WRITE : p == P_RO ? PROT_READ : PROT_NONE;
}

/* ---------------------------------------------------------------- heap */

static void heap_write(size_t p, uint32_t v)
{
    bk->hver[p] = v;
    fill_page(heap + p * PAGE, page_base(1, p, 0, v));
}

static void heap_verify(void)
{
    for (size_t p = 0; p < bk->hpages; p++) {
        unsigned char *a = heap + p * PAGE;
        uint32_t v = bk->hver[p];
        if (v == 0 && !resident(a))
            continue;
        uint64_t b = page_base(1, p, 0, v);
        long j = check_page(a, b, v == 0);
        if (j)
            fail_page("heap", p, a, (const uint64_t *)a, j, b, v, 0);
    }
}

/* ---------------------------------------------------------------- objects */

static uint64_t obj_base(int i, const struct obj *o, size_t p)
{
    return page_base(2 + (uint64_t)i, p, o->epoch, o->ver[p]);
}

static void must(int ok, const char *what, int i)
{
    if (!ok)
        ct_fail("%s (object %d): %s", what, i, strerror(errno));
}

/* mprotect pages [a, b) of object i to `p`, in the book too. */
static void obj_protect(int i, size_t a, size_t b, int p)
{
    struct obj *o = &bk->obj[i];
    if (a >= b)
        return;
    must(mprotect(obj_addr(o) + a * PAGE, (b - a) * PAGE, prot_bits(p)) == 0, "mprotect", i);
    for (size_t k = a; k < b; k++)
        o->prot[k] = (uint8_t)p;
}

static void obj_write(int i, size_t p, uint32_t v)
{
    struct obj *o = &bk->obj[i];
    unsigned char *a = obj_addr(o) + p * PAGE;
    int pr = o->prot[p];
    if (pr != P_RW)
        must(mprotect(a, PAGE, PROT_READ | PROT_WRITE) == 0, "mprotect rw", i);
    o->ver[p] = v;
    fill_page(a, obj_base(i, o, p));
    if (pr != P_RW)
        must(mprotect(a, PAGE, prot_bits(pr)) == 0, "mprotect back", i);
}

static void obj_verify(int i, int memfd)
{
    struct obj *o = &bk->obj[i];
    static uint64_t buf[WPP];
    for (size_t p = 0; p < o->npages; p++) {
        unsigned char *a = obj_addr(o) + p * PAGE;
        uint32_t v = o->ver[p];
        if (v == 0 && !o->shared && !resident(a))
            continue;
        const uint64_t *w = (const uint64_t *)a;
        if (o->prot[p] == P_NONE) {
            if (pread(memfd, buf, PAGE, (off_t)(uintptr_t)a) != (ssize_t)PAGE)
                ct_fail("pread /proc/self/mem at %p (object %d page %zu, PROT_NONE): %s", (void *)a, i, p,
                        strerror(errno));
            w = buf;
        }
        uint64_t b = obj_base(i, o, p);
        long j = check_page(w, b, v == 0);
        if (j) {
            char what[64];
            snprintf(what, sizeof what, "object %d (slot %d, %s, prot %d)", i, o->slot,
                     o->shared ? "shared" : "private", o->prot[p]);
            fail_page(what, p, a, w, j, b, v, o->epoch);
        }
    }
}

/* Maps object i at its slot (the slot's reservation is replaced). */
static void obj_map(int i, int fixed_noreplace)
{
    struct obj *o = &bk->obj[i];
    int flags = (o->shared ? MAP_SHARED : MAP_PRIVATE) | MAP_ANONYMOUS;
    flags |= fixed_noreplace ? MAP_FIXED_NOREPLACE : MAP_FIXED;
    void *r = mmap(obj_addr(o), o->npages * PAGE, PROT_READ | PROT_WRITE, flags, -1, 0);
    if (r == MAP_FAILED || r != obj_addr(o))
        ct_fail("mmap object %d at %p (%u pages): %s", i, (void *)obj_addr(o), o->npages,
                r == MAP_FAILED ? strerror(errno) : "wrong address");
    for (size_t p = 0; p < o->npages; p++)
        o->prot[p] = P_RW;
    bk->nextra++;
}

/* Puts the PROT_NONE reservation back on [a, a+len) (nothing mapped there). */
static void reserve(unsigned char *a, size_t len)
{
    if (len == 0)
        return;
    void *r = mmap(a, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED_NOREPLACE, -1, 0);
    if (r == MAP_FAILED || r != a)
        ct_fail("re-reserving %p+%zu: %s", (void *)a, len, r == MAP_FAILED ? strerror(errno) : "wrong address");
}

/* Replaces [a, a+len) (part of our arena) with the reservation. */
static void unreserve_to_reservation(unsigned char *a, size_t len)
{
    if (len == 0)
        return;
    if (munmap(a, len) != 0)
        ct_fail("munmap %p+%zu: %s", (void *)a, len, strerror(errno));
    reserve(a, len);
}

static int pick_free_slot(uint64_t h)
{
    if ((h & 1) && bk->last_freed >= 0 && bk->slot_owner[bk->last_freed] < 0)
        return bk->last_freed;
    int s = (int)((h >> 8) % NSLOTS);
    for (int k = 0; k < NSLOTS; k++) {
        int t = (s + k) % NSLOTS;
        if (bk->slot_owner[t] < 0)
            return t;
    }
    ct_fail("no free slot");
}

static void obj_write_random(int i, uint64_t h, long tick, int n)
{
    struct obj *o = &bk->obj[i];
    for (int k = 0; k < n; k++)
        obj_write(i, ct_mix64(h ^ (uint64_t)k) % o->npages, (uint32_t)tick);
}

/* The same pages get written again, with a new epoch (different content). */
static void obj_rewrite_same_pages(int i, long tick)
{
    struct obj *o = &bk->obj[i];
    o->epoch++;
    for (size_t p = 0; p < o->npages; p++)
        if (o->ver[p]) {
            o->ver[p] = (uint32_t)tick;
            fill_page(obj_addr(o) + p * PAGE, obj_base(i, o, p));
        }
}

static void obj_create(int i, int slot, uint32_t npages, long tick, uint64_t h)
{
    struct obj *o = &bk->obj[i];
    o->slot = slot;
    bk->slot_owner[slot] = i;
    o->npages = npages;
    o->epoch++;
    memset(o->ver, 0, sizeof o->ver);
    /* replace the start of the slot's reservation */
    must(munmap(slot_addr(slot), npages * PAGE) == 0, "munmap reservation", i);
    obj_map(i, 1);
    obj_write_random(i, h, tick, 1 + (int)(h % (npages / 2 + 1)));
}

static void obj_all_rw(int i)
{
    struct obj *o = &bk->obj[i];
    for (size_t p = 0; p < o->npages; p++)
        if (o->prot[p] != P_RW) {
            obj_protect(i, 0, o->npages, P_RW);
            return;
        }
}

static void obj_op(int i, int op, long tick, uint64_t h)
{
    struct obj *o = &bk->obj[i];
    unsigned char *a = obj_addr(o);
    switch (op) {
    case 0: /* page writes */
        obj_write_random(i, h, tick, 1 + (int)(h % 32));
        break;
    case 1: { /* mremap to another slot, often the one last freed */
        int t = pick_free_slot(h);
        obj_all_rw(i);
        void *r = mremap(a, o->npages * PAGE, o->npages * PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, slot_addr(t));
        if (r == MAP_FAILED || r != slot_addr(t))
            ct_fail("mremap object %d %p -> %p: %s", i, (void *)a, (void *)slot_addr(t), strerror(errno));
        reserve(a, o->npages * PAGE);
        bk->slot_owner[o->slot] = -1;
        bk->last_freed = o->slot;
        o->slot = t;
        bk->slot_owner[t] = i;
        if (h & 2)
            obj_write_random(i, h >> 3, tick, 1 + (int)(h % 8));
        if (h & 4)
            obj_protect(i, 0, o->npages / 2, P_RO);
        break;
    }
    case 2: { /* grow or shrink in place */
        if (o->shared)
            break; /* growing a shared anonymous mapping past its object would SIGBUS */
        obj_all_rw(i);
        uint32_t n = o->npages;
        uint32_t nn = 1 + (uint32_t)((h >> 4) % OBJ_MAX);
        if (nn == n)
            break;
        if (nn > n) {
            must(munmap(a + n * PAGE, (nn - n) * PAGE) == 0, "munmap before grow", i);
            void *r = mremap(a, n * PAGE, nn * PAGE, 0);
            if (r != a)
                ct_fail("mremap grow object %d %u -> %u pages: %s", i, n, nn, strerror(errno));
            for (uint32_t p = n; p < nn; p++) {
                o->ver[p] = 0;
                o->prot[p] = P_RW;
            }
            o->npages = nn;
            /* write some of the new pages, and one old one */
            for (int k = 0; k < 8; k++)
                obj_write(i, n + ct_mix64(h ^ (uint64_t)k) % (nn - n), (uint32_t)tick);
            obj_write(i, (h >> 20) % n, (uint32_t)tick);
        } else {
            void *r = mremap(a, n * PAGE, nn * PAGE, 0);
            if (r != a)
                ct_fail("mremap shrink object %d %u -> %u pages: %s", i, n, nn, strerror(errno));
            reserve(a + nn * PAGE, (n - nn) * PAGE);
            for (uint32_t p = nn; p < n; p++)
                o->ver[p] = 0;
            o->npages = nn;
        }
        break;
    }
    case 3: /* munmap + mmap at the same address, new content on the same pages */
        must(munmap(a, o->npages * PAGE) == 0, "munmap", i);
        obj_map(i, 1);
        obj_rewrite_same_pages(i, tick);
        break;
    case 4: /* mmap MAP_FIXED over it, new content on the same pages */
        obj_map(i, 0);
        obj_rewrite_same_pages(i, tick);
        break;
    case 5: { /* mprotect a run */
        size_t x = (h >> 8) % o->npages, y = x + 1 + (h >> 24) % 64;
        if (y > o->npages)
            y = o->npages;
        obj_protect(i, x, y, (int)((h >> 40) % 3));
        break;
    }
    case 6: { /* MADV_DONTNEED a run (private: zero; shared: keeps its data) */
        size_t x = (h >> 8) % o->npages, y = x + 1 + (h >> 24) % 32;
        if (y > o->npages)
            y = o->npages;
        must(madvise(a + x * PAGE, (y - x) * PAGE, MADV_DONTNEED) == 0, "madvise", i);
        if (!o->shared)
            for (size_t p = x; p < y; p++)
                o->ver[p] = 0;
        break;
    }
    case 7: { /* gone; a new one elsewhere */
        int t = pick_free_slot(h >> 1);
        if (o->shared) {
            /* same size, new slot */
            unreserve_to_reservation(a, o->npages * PAGE);
            bk->slot_owner[o->slot] = -1;
            bk->last_freed = o->slot;
            obj_create(i, t, o->npages, tick, h);
        } else {
            uint32_t n = o->npages;
            unreserve_to_reservation(a, n * PAGE);
            bk->slot_owner[o->slot] = -1;
            bk->last_freed = o->slot;
            obj_create(i, t, 1 + (uint32_t)((h >> 12) % OBJ_MAX), tick, h);
        }
        break;
    }
    }
}

/* ---------------------------------------------------------------- brk */

static void brk_verify(void)
{
    unsigned char *cur = sbrk(0);
    if (cur != brk_base + bk->brk_pages * PAGE)
        ct_fail("program break at %p, want %p (base %p + %u pages)", (void *)cur,
                (void *)(brk_base + bk->brk_pages * PAGE), (void *)brk_base, bk->brk_pages);
    for (size_t p = 0; p < bk->brk_pages; p++) {
        unsigned char *a = brk_base + p * PAGE;
        uint32_t v = bk->brk_ver[p];
        if (v == 0 && !resident(a))
            continue;
        uint64_t b = page_base(20, p, 0, v);
        long j = check_page(a, b, v == 0);
        if (j)
            fail_page("brk", p, a, (const uint64_t *)a, j, b, v, 0);
    }
}

static void brk_op(long tick, uint64_t h)
{
    long d = (long)(h % 9) - 4; /* -4..4 steps of 16 pages */
    long n = (long)bk->brk_pages + d * 16;
    if (n < 0)
        n = 0;
    if (n > BRK_MAX)
        n = BRK_MAX;
    long delta = n - (long)bk->brk_pages;
    if (delta != 0 && sbrk((intptr_t)delta * (intptr_t)PAGE) == (void *)-1)
        ct_fail("sbrk(%ld pages): %s", delta, strerror(errno));
    for (long p = n; p < (long)bk->brk_pages; p++)
        bk->brk_ver[p] = 0;
    bk->brk_pages = (uint32_t)n;
    if (n > 0)
        for (int k = 0; k < 8; k++) {
            size_t p = ct_mix64(h ^ 0xb0b ^ (uint64_t)k) % (size_t)n;
            bk->brk_ver[p] = (uint32_t)tick;
            fill_page(brk_base + p * PAGE, page_base(20, p, 0, (uint64_t)tick));
        }
}

/* ---------------------------------------------------------------- thread */

static void *writer_thread(void *arg)
{
    (void)arg;
    for (uint64_t s = 1;; s++) {
        for (size_t i = 0; i < THR_PAGES; i++) {
            unsigned char *a = thr_area + i * PAGE;
            uint64_t want = page_base(30, i, 0, s - 1);
            long j = check_page(a, want, 0);
            if (j)
                fail_page("writer thread", i, a, (const uint64_t *)a, j, want, (uint32_t)(s - 1), 0);
            fill_page(a, page_base(30, i, 0, s));
            if (i % 8 == 7)
                ct_sleep_ms(1);
        }
        thr_sweeps = s;
    }
    return NULL;
}

/* ---------------------------------------------------------------- main */

static void opt(int c, const char *arg)
{
    switch (c) {
    case 'm': heap_mib = strtoul(arg, NULL, 10); break;
    case 'S': seed = strtoull(arg, NULL, 10); break;
    case 'T': no_thread = 1; break;
    case 'd': heap_div = strtoul(arg, NULL, 10) ? strtoul(arg, NULL, 10) : 1; break;
    }
}

static uint64_t checksum(void)
{
    uint64_t h = ct_hash_bytes(bk->hver, bk->hpages * sizeof *bk->hver, 1);
    for (int i = 0; i < NOBJ; i++) {
        const struct obj *o = &bk->obj[i];
        uint64_t m[3] = { o->npages, o->epoch, (uint64_t)o->shared };
        h = ct_hash_bytes(m, sizeof m, h);
        h = ct_hash_bytes(o->ver, o->npages * sizeof o->ver[0], h);
        h = ct_hash_bytes(o->prot, o->npages, h);
    }
    h = ct_hash_bytes(&bk->brk_pages, sizeof bk->brk_pages, h);
    h = ct_hash_bytes(bk->brk_ver, bk->brk_pages * sizeof bk->brk_ver[0], h);
    return h;
}

static void verify_all(void)
{
    heap_verify();
    int memfd = open("/proc/self/mem", O_RDONLY | O_CLOEXEC);
    if (memfd < 0)
        ct_fail("open /proc/self/mem: %s", strerror(errno));
    for (int i = 0; i < NOBJ; i++)
        obj_verify(i, memfd);
    close(memfd);
    brk_verify();
}

static void mutate(long tick)
{
    uint64_t t = ct_mix64(seed * 0x1234567ULL ^ (uint64_t)tick);
    size_t np = bk->hpages;
    /* heap: random pages, 0.1% .. 10% */
    static const unsigned per_mille[4] = { 1, 10, 100, 20 };
    size_t nw = np * per_mille[t % 4] / 1000 / heap_div + 1;
    for (size_t k = 0; k < nw; k++)
        heap_write(ct_mix64(t ^ (k << 1)) % np, (uint32_t)tick);
    /* a sequential run */
    size_t s0 = (t >> 8) % np, len = 1 + (t >> 24) % 256;
    for (size_t p = s0; p < s0 + len && p < np; p++)
        heap_write(p, (uint32_t)tick);
    /* DONTNEED a few runs */
    for (int k = 0; k < (int)((t >> 40) % 4); k++) {
        uint64_t u = ct_mix64(t ^ 0xd0d0 ^ (uint64_t)k);
        size_t x = u % np, y = x + 1 + (u >> 32) % 64;
        if (y > np)
            y = np;
        if (madvise(heap + x * PAGE, (y - x) * PAGE, MADV_DONTNEED) != 0)
            ct_fail("madvise heap: %s", strerror(errno));
        for (size_t p = x; p < y; p++)
            bk->hver[p] = 0;
    }
    /* objects: a few operations, and at least one new mapping */
    for (int k = 0; k < 4; k++) {
        uint64_t u = ct_mix64(t ^ 0x0b0b ^ ((uint64_t)k << 16));
        obj_op((int)(u % NOBJ), (int)((u >> 4) % 8), tick, ct_mix64(u));
    }
    {
        uint64_t u = ct_mix64(t ^ 0xfeed);
        obj_op((int)(tick % NOBJ), (u & 1) ? 7 : ((u & 2) ? 3 : 4), tick, ct_mix64(u ^ 1));
    }
    brk_op(tick, ct_mix64(t ^ 0xb7));
}

int main(int argc, char **argv)
{
    ct_parse(argc, argv, "m:S:d:T", opt);
    ct_setup();

    size_t hpages = (heap_mib << 20) / PAGE;
    bk = mmap(NULL, sizeof *bk, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (bk == MAP_FAILED)
        ct_fail("mmap book: %s", strerror(errno));
    bk->hver = mmap(NULL, hpages * sizeof(uint32_t), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    heap = mmap(NULL, hpages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    arena = mmap(NULL, NSLOTS * SLOT, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    thr_area = mmap(NULL, THR_PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (bk->hver == MAP_FAILED || heap == MAP_FAILED || arena == MAP_FAILED || thr_area == MAP_FAILED)
        ct_fail("mmap: %s", strerror(errno));
    bk->hpages = hpages;
    for (size_t p = 0; p < hpages; p++)
        if (p % 4 != 3)
            heap_write(p, 1);
    for (int s = 0; s < NSLOTS; s++)
        bk->slot_owner[s] = -1;
    bk->last_freed = -1;
    for (int i = 0; i < NOBJ; i++) {
        bk->obj[i].shared = i == 0;
        obj_create(i, i * 2, 64 + 40 * (uint32_t)i, 1, ct_mix64(seed ^ (uint64_t)i));
    }
    for (size_t i = 0; i < THR_PAGES; i++)
        fill_page(thr_area + i * PAGE, page_base(30, i, 0, 0));
    /* the break: ours from here on (malloc is not used after this) */
    brk_base = sbrk(0);
    if (brk_base == (void *)-1)
        ct_fail("sbrk(0): %s", strerror(errno));
    brk_base = (unsigned char *)(((uintptr_t)brk_base + PAGE - 1) & ~(PAGE - 1));
    if (brk((void *)brk_base) != 0)
        ct_fail("brk: %s", strerror(errno));
    bk->brk_pages = 0;

    pthread_t th;
    if (!no_thread && pthread_create(&th, NULL, writer_thread, NULL) != 0)
        ct_fail("pthread_create failed");
    verify_all();
    printf("READY heap_pages=%zu objects=%d slots=%d seed=%llu thread=%d\n", hpages, NOBJ, NSLOTS,
           (unsigned long long)seed, !no_thread);

    int64_t prev = ct_now_ns(CLOCK_MONOTONIC);
    for (long tick = 1;; tick++) {
        ct_check_ids();
        int64_t t0 = ct_now_ns(CLOCK_MONOTONIC);
        int resumed = t0 - prev > 3 * ct_interval_ms * 1000000LL + 500000000LL;
        verify_all();
        int64_t t1 = ct_now_ns(CLOCK_MONOTONIC);
        printf("TICK %ld sum=%016llx thr=%llu maps=%llu brk=%u verify_ms=%lld%s\n", tick,
               (unsigned long long)checksum(), (unsigned long long)thr_sweeps,
               (unsigned long long)bk->nextra, bk->brk_pages, (long long)((t1 - t0) / 1000000),
               resumed ? " resumed" : "");
        if (ct_should_stop(tick))
            ct_done();
        mutate(tick);
        prev = ct_now_ns(CLOCK_MONOTONIC);
        ct_sleep_ms(ct_interval_ms);
    }
}
