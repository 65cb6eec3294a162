/* counter_heap: a single-threaded counter over a large heap.
 *
 *   counter_heap [-n N] [-t MS] [-s STOPFILE] [-m MiB] [-i] [-c CHURNFILE] [-S SECRETFILE]
 *
 * Memory it holds and verifies every tick:
 *   - a malloc'd heap of -m MiB (default 256) whose every 4 KiB page has
 *     content derived from (page index, page version); versions live in a
 *     separate array, their sum must equal the mutation counter in .bss;
 *   - ~2000 small malloc'd blocks (glibc's brk heap) that are reallocated
 *     a few at a time, plus a 100 KiB malloc/free per tick (moves brk);
 *   - a sparse 64 MiB anonymous mapping (every 16th page written, the others
 *     must read as zero) and a 2 MiB read-only anonymous mapping;
 *   - a MAP_PRIVATE mapping of an 8 MiB file it creates, some pages modified
 *     in memory only (the file itself must keep its original content).
 * Every tick uses clock_gettime (vDSO) and compares it with the syscall.
 * -i (idle): no memory is modified between ticks (only read to verify).
 * -c FILE: when FILE exists, rewrite every heap page once (prints CHURNED).
 * -S FILE: read a secret (one line, up to 255 bytes) from FILE at start and
 *     hold it in 8 pages of otherwise incompressible bytes (so an unsealed
 *     store would keep it verbatim), checked every tick.
 */
#include "common.h"
#include <sys/mman.h>

#define PAGE 4096UL
#define WPP (PAGE / 8) /* words per page */

static size_t heap_mib = 256;
static int idle = 0;
static const char *churnfile = NULL;
static const char *secretfile = NULL;
#define SECRET_PAGES 8
static char secret[256];
static size_t secret_len;
static unsigned char *secret_mem;

static uint64_t *heap;
static size_t npages;
static uint32_t *ver;              /* version of each heap page */
static uint64_t total_mutations;   /* sum of ver[] (in .bss) */
static uint64_t seed;

#define NSMALL 2000
static unsigned char *small[NSMALL];
static uint32_t small_len[NSMALL];
static uint32_t small_gen[NSMALL];

#define SPARSE_PAGES (64UL * 256) /* 64 MiB */
static unsigned char *sparse;
static uint32_t sparse_ver[SPARSE_PAGES / 16];

#define RO_PAGES 512 /* 2 MiB */
static unsigned char *ro;
static uint64_t ro_sum;

#define FILE_PAGES 2048 /* 8 MiB */
static unsigned char *fmap;
static uint32_t fver[FILE_PAGES];
static int file_fd = -1;
static char file_path[256];

static int64_t last_mono;
static int churned = 0;

static void opt(int c, const char *arg)
{
    switch (c) {
    case 'm': heap_mib = strtoul(arg, NULL, 10); break;
    case 'i': idle = 1; break;
    case 'c': churnfile = arg; break;
    case 'S': secretfile = arg; break;
    }
}

static inline uint64_t heap_word(size_t p, uint32_t v, size_t j)
{
    return ct_mix64(seed ^ ((uint64_t)p << 24) ^ ((uint64_t)v << 48) ^ j);
}

static void heap_fill_page(size_t p)
{
    uint64_t *w = heap + p * WPP;
    for (size_t j = 0; j < WPP; j++)
        w[j] = heap_word(p, ver[p], j);
}

static void heap_check_page(size_t p)
{
    const uint64_t *w = heap + p * WPP;
    for (size_t j = 0; j < WPP; j++)
        if (w[j] != heap_word(p, ver[p], j))
            ct_fail("heap page %zu (addr %p) word %zu: got %016llx want %016llx (version %u)",
                    p, (void *)(w + j), j, (unsigned long long)w[j],
                    (unsigned long long)heap_word(p, ver[p], j), ver[p]);
}

static inline unsigned char small_byte(size_t i, uint32_t g, size_t k)
{
    return (unsigned char)ct_mix64(((uint64_t)i << 32) ^ ((uint64_t)g << 16) ^ k);
}

static void small_alloc(size_t i)
{
    uint32_t len = 16 + (uint32_t)(ct_mix64(((uint64_t)i << 20) ^ small_gen[i]) % 2033);
    small[i] = malloc(len);
    if (!small[i])
        ct_fail("malloc(%u) failed", len);
    small_len[i] = len;
    for (size_t k = 0; k < len; k++)
        small[i][k] = small_byte(i, small_gen[i], k);
}

static void small_check(void)
{
    for (size_t i = 0; i < NSMALL; i++)
        for (size_t k = 0; k < small_len[i]; k++)
            if (small[i][k] != small_byte(i, small_gen[i], k))
                ct_fail("small block %zu byte %zu corrupt", i, k);
}

static inline uint64_t sparse_word(size_t sp, uint32_t v, size_t j)
{
    return ct_mix64(0x5ba55eULL ^ ((uint64_t)sp << 20) ^ ((uint64_t)v << 40) ^ j);
}

static void sparse_fill(size_t sp) /* sp = index among written pages */
{
    uint64_t *w = (uint64_t *)(sparse + sp * 16 * PAGE);
    for (size_t j = 0; j < WPP; j++)
        w[j] = sparse_word(sp, sparse_ver[sp], j);
}

static void sparse_check(long tick)
{
    for (size_t sp = 0; sp < SPARSE_PAGES / 16; sp++) {
        const uint64_t *w = (const uint64_t *)(sparse + sp * 16 * PAGE);
        for (size_t j = 0; j < WPP; j++)
            if (w[j] != sparse_word(sp, sparse_ver[sp], j))
                ct_fail("sparse page %zu word %zu corrupt", sp * 16, j);
    }
    /* a few never-written pages must read as zero */
    for (int k = 0; k < 8; k++) {
        size_t p = (size_t)(ct_mix64((uint64_t)tick * 8 + k) % SPARSE_PAGES);
        if (p % 16 == 0)
            p++;
        const uint64_t *w = (const uint64_t *)(sparse + p * PAGE);
        for (size_t j = 0; j < WPP; j++)
            if (w[j] != 0)
                ct_fail("sparse hole page %zu word %zu is %016llx, want 0", p, j,
                        (unsigned long long)w[j]);
    }
}

static inline unsigned char file_byte(size_t p, uint32_t v, size_t k)
{
    return (unsigned char)(ct_mix64(0xf11eULL ^ ((uint64_t)p << 16) ^ ((uint64_t)v << 40) ^ (k >> 3)) >> (8 * (k & 7)));
}

static void file_check(long tick)
{
    for (size_t p = 0; p < FILE_PAGES; p++) {
        const unsigned char *b = fmap + p * PAGE;
        for (size_t k = 0; k < PAGE; k += 8) /* check one byte of each word */
            if (b[k] != file_byte(p, fver[p], k))
                ct_fail("file mapping page %zu byte %zu: got %02x want %02x (version %u)", p, k,
                        b[k], file_byte(p, fver[p], k), fver[p]);
    }
    /* The file itself must be unchanged (MAP_PRIVATE). */
    size_t p = (size_t)(tick % FILE_PAGES);
    unsigned char buf[PAGE];
    if (pread(file_fd, buf, PAGE, (off_t)(p * PAGE)) != (ssize_t)PAGE)
        ct_fail("pread %s: %s", file_path, strerror(errno));
    for (size_t k = 0; k < PAGE; k++)
        if (buf[k] != file_byte(p, 0, k))
            ct_fail("file %s on disk changed at page %zu byte %zu", file_path, p, k);
}

static void check_clocks(void)
{
    int64_t m = ct_now_ns(CLOCK_MONOTONIC);
    int64_t ms = ct_now_ns_syscall(CLOCK_MONOTONIC);
    int64_t r = ct_now_ns(CLOCK_REALTIME);
    int64_t rs = ct_now_ns_syscall(CLOCK_REALTIME);
    if (m < last_mono)
        ct_fail("CLOCK_MONOTONIC went backwards: %lld < %lld", (long long)m, (long long)last_mono);
    if (ms - m > 200000000LL || ms < m)
        ct_fail("vDSO CLOCK_MONOTONIC %lld disagrees with syscall %lld", (long long)m, (long long)ms);
    if (llabs(rs - r) > 200000000LL)
        ct_fail("vDSO CLOCK_REALTIME %lld disagrees with syscall %lld", (long long)r, (long long)rs);
    last_mono = m;
}

static void full_check(long tick)
{
    uint64_t s = 0;
    for (size_t p = 0; p < npages; p++)
        s += ver[p];
    if (s != total_mutations)
        ct_fail("sum of page versions %llu != mutation counter %llu",
                (unsigned long long)s, (unsigned long long)total_mutations);
    for (size_t p = 0; p < npages; p++)
        heap_check_page(p);
    (void)tick;
}

int main(int argc, char **argv)
{
    ct_parse(argc, argv, "m:ic:S:", opt);
    ct_setup();
    seed = ct_mix64((uint64_t)ct_pid);

    npages = (heap_mib << 20) / PAGE;
    heap = malloc(npages * PAGE);
    ver = calloc(npages, sizeof *ver);
    if (!heap || !ver)
        ct_fail("cannot allocate %zu MiB", heap_mib);
    for (size_t p = 0; p < npages; p++)
        heap_fill_page(p);

    for (size_t i = 0; i < NSMALL; i++)
        small_alloc(i);

    sparse = mmap(NULL, SPARSE_PAGES * PAGE, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (sparse == MAP_FAILED)
        ct_fail("mmap sparse: %s", strerror(errno));
    for (size_t sp = 0; sp < SPARSE_PAGES / 16; sp++)
        sparse_fill(sp);

    ro = mmap(NULL, RO_PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (ro == MAP_FAILED)
        ct_fail("mmap ro: %s", strerror(errno));
    for (size_t k = 0; k < RO_PAGES * PAGE; k++)
        ro[k] = (unsigned char)ct_mix64(k ^ 0x40);
    ro_sum = ct_hash_bytes(ro, RO_PAGES * PAGE, 7);
    if (mprotect(ro, RO_PAGES * PAGE, PROT_READ) != 0)
        ct_fail("mprotect: %s", strerror(errno));

    snprintf(file_path, sizeof file_path, "counter_heap.%d.map", (int)ct_pid);
    file_fd = open(file_path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (file_fd < 0)
        ct_fail("open %s: %s", file_path, strerror(errno));
    {
        unsigned char buf[PAGE];
        for (size_t p = 0; p < FILE_PAGES; p++) {
            for (size_t k = 0; k < PAGE; k++)
                buf[k] = file_byte(p, 0, k);
            if (write(file_fd, buf, PAGE) != (ssize_t)PAGE)
                ct_fail("write %s: %s", file_path, strerror(errno));
        }
        fsync(file_fd);
    }
    fmap = mmap(NULL, FILE_PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE, file_fd, 0);
    if (fmap == MAP_FAILED)
        ct_fail("mmap file: %s", strerror(errno));
    /* modify a few pages in memory */
    for (size_t p = 0; p < FILE_PAGES; p += 97) {
        fver[p]++;
        for (size_t k = 0; k < PAGE; k++)
            fmap[p * PAGE + k] = file_byte(p, fver[p], k);
    }

    if (secretfile) {
        FILE *f = fopen(secretfile, "r");
        if (!f || !fgets(secret, sizeof secret, f))
            ct_fail("cannot read the secret from %s", secretfile);
        fclose(f);
        secret_len = strcspn(secret, "\n");
        secret[secret_len] = 0;
        secret_mem = malloc(SECRET_PAGES * PAGE);
        if (!secret_mem || secret_len == 0)
            ct_fail("secret: empty or no memory");
        for (size_t k = 0; k < SECRET_PAGES * PAGE; k++)
            secret_mem[k] = (unsigned char)(ct_mix64(k ^ 0x5ec) >> 11);
        for (size_t p = 0; p < SECRET_PAGES; p++)
            memcpy(secret_mem + p * PAGE + 64 * (p + 1), secret, secret_len);
    }

    last_mono = ct_now_ns(CLOCK_MONOTONIC);
    full_check(0);
    printf("READY heap_mib=%zu pages=%zu idle=%d\n", heap_mib, npages, idle);

    size_t window = npages / 8 ? npages / 8 : 1;
    int64_t prev = ct_now_ns(CLOCK_MONOTONIC);
    for (long tick = 1;; tick++) {
        ct_check_ids();
        if (!idle) {
            /* heap: bump 64 pages */
            for (int k = 0; k < 64; k++) {
                size_t p = (size_t)(ct_mix64(seed ^ ((uint64_t)tick << 8) ^ (uint64_t)k) % npages);
                ver[p]++;
                total_mutations++;
                heap_fill_page(p);
            }
            /* small blocks: reallocate 20 */
            for (int k = 0; k < 20; k++) {
                size_t i = (size_t)(ct_mix64(((uint64_t)tick << 8) ^ (uint64_t)k ^ 0xabc) % NSMALL);
                free(small[i]);
                small_gen[i]++;
                small_alloc(i);
            }
            /* a 100 KiB block from the brk heap, filled and checked */
            unsigned char *big = malloc(100 * 1024);
            if (!big)
                ct_fail("malloc(100K) failed");
            for (size_t k = 0; k < 100 * 1024; k++)
                big[k] = (unsigned char)(k * 7 + (size_t)tick);
            uint64_t h1 = ct_hash_bytes(big, 100 * 1024, 1);
            unsigned char *other = malloc(64);
            if (!other)
                ct_fail("malloc(64) failed");
            memset(other, 0x5a, 64);
            uint64_t h2 = 0;
            {
                unsigned char *tmp = malloc(100 * 1024);
                if (!tmp)
                    ct_fail("malloc(100K) #2 failed");
                for (size_t k = 0; k < 100 * 1024; k++)
                    tmp[k] = (unsigned char)(k * 7 + (size_t)tick);
                h2 = ct_hash_bytes(tmp, 100 * 1024, 1);
                free(tmp);
            }
            if (h1 != h2 || ct_hash_bytes(big, 100 * 1024, 1) != h1)
                ct_fail("brk heap block corrupt");
            free(other);
            free(big);
            /* sparse mapping: bump one written page */
            size_t sp = (size_t)(tick % (long)(SPARSE_PAGES / 16));
            sparse_ver[sp]++;
            sparse_fill(sp);
            /* file mapping: modify one page in memory */
            size_t fp = (size_t)(ct_mix64((uint64_t)tick ^ 0xf00) % FILE_PAGES);
            fver[fp]++;
            for (size_t k = 0; k < PAGE; k++)
                fmap[fp * PAGE + k] = file_byte(fp, fver[fp], k);
        }

        /* verification */
        int64_t now = ct_now_ns(CLOCK_MONOTONIC);
        int resumed = now - prev > 3 * ct_interval_ms * 1000000LL + 500000000LL;
        if (tick % 16 == 0 || resumed) {
            full_check(tick);
        } else {
            size_t start = (size_t)(tick % 8) * window;
            for (size_t p = start; p < start + window && p < npages; p++)
                heap_check_page(p);
            uint64_t s = 0;
            for (size_t p = 0; p < npages; p++)
                s += ver[p];
            if (s != total_mutations)
                ct_fail("sum of page versions %llu != mutation counter %llu",
                        (unsigned long long)s, (unsigned long long)total_mutations);
        }
        small_check();
        sparse_check(tick);
        for (size_t p = 0; secret_mem && p < SECRET_PAGES; p++)
            if (memcmp(secret_mem + p * PAGE + 64 * (p + 1), secret, secret_len) != 0)
                ct_fail("secret page %zu does not hold the secret", p);
        if (ct_hash_bytes(ro, RO_PAGES * PAGE, 7) != ro_sum)
            ct_fail("read-only mapping checksum changed");
        file_check(tick);
        check_clocks();

        if (churnfile && !churned && ct_file_exists(churnfile)) {
            for (size_t p = 0; p < npages; p++) {
                ver[p]++;
                total_mutations++;
                heap_fill_page(p);
            }
            churned = 1;
            printf("CHURNED\n");
        }

        printf("TICK %ld mutations=%llu%s\n", tick, (unsigned long long)total_mutations,
               resumed ? " resumed" : "");
        if (ct_should_stop(tick))
            ct_done();
        prev = ct_now_ns(CLOCK_MONOTONIC);
        ct_sleep_ms(ct_interval_ms);
    }
}
