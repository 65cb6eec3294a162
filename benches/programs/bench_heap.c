/* Benchmark workload for ckpt: a heap of -m MiB filled with data that
 * compresses like a typical memory image (runs of zeros, small integers,
 * pointers, and random bytes), or with -k hash of random words (hash-like
 * data that zstd cannot shrink). Commands on stdin, one per line:
 *   mutate PERCENT random|sequential   -> changes that share of pages, prints "MUTATED n"
 *   quit                               -> exits
 * A heartbeat line "BEAT n" is printed every 20 ms, so a restart's first
 * output is seen at once. With -w MIB a working set of that many MiB (runs
 * of 64 pages spread evenly over the heap) is read by a thread of its own,
 * one word a page, over and over; "WORKED n" after each whole pass. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <pthread.h>
#include <sys/mman.h>

#define PAGE 4096
static uint64_t rng = 0x9e3779b97f4a7c15ULL;
static uint64_t next(void) { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return rng; }

static int hashlike; /* -k hash: every word random (zstd cannot shrink it) */

static void fill_page(unsigned char *p, uint64_t salt) {
    uint64_t *w = (uint64_t *)p;
    if (hashlike) {
        for (int i = 0; i < PAGE / 8; i++) w[i] = next() ^ salt;
        return;
    }
    for (int i = 0; i < PAGE / 8; i++) {
        uint64_t r = next() ^ salt;
        switch (r & 7) {
        case 0: case 1: case 2: w[i] = 0; break;                      /* zeros */
        case 3: case 4: w[i] = r >> 56; break;                         /* small ints */
        case 5: case 6: w[i] = 0x00007f0000000000ULL | ((r >> 20) & 0xffffff8); break; /* pointers */
        default: w[i] = r; break;                                      /* random */
        }
    }
}

static unsigned char *heap;
static size_t pages, ws_pages;
static volatile uint64_t sink;
static void *work(void *arg) {
    (void)arg;
    size_t runs = ws_pages / 64, step = runs ? pages / runs : 0;
    for (unsigned long n = 0;; n++) {
        uint64_t s = 0;
        for (size_t r = 0; r < runs; r++)
            for (size_t k = 0; k < 64; k++) s += *(volatile uint64_t *)(heap + (r * step + k) * PAGE);
        sink = s;
        printf("WORKED %lu\n", n);
        usleep(5000);
    }
    return NULL;
}

static volatile unsigned long beats;
static void *beat(void *arg) {
    (void)arg;
    for (;;) {
        printf("BEAT %lu\n", beats++);
        usleep(20000);
    }
    return NULL;
}

int main(int argc, char **argv) {
    size_t mib = 1024, ws_mib = 0;
    int opt;
    while ((opt = getopt(argc, argv, "m:k:w:")) != -1) {
        if (opt == 'm') mib = strtoul(optarg, NULL, 10);
        if (opt == 'w') ws_mib = strtoul(optarg, NULL, 10);
        if (opt == 'k') hashlike = strcmp(optarg, "hash") == 0;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    pages = mib * 1024 * 1024 / PAGE;
    ws_pages = ws_mib * 1024 * 1024 / PAGE;
    if (ws_pages > pages) ws_pages = pages;
    heap = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (heap == MAP_FAILED) { perror("mmap"); return 1; }
    for (size_t i = 0; i < pages; i++) fill_page(heap + i * PAGE, i);
    printf("READY pages=%zu\n", pages);
    pthread_t t;
    pthread_create(&t, NULL, beat, NULL);
    if (ws_pages) {
        pthread_t w;
        pthread_create(&w, NULL, work, NULL);
    }
    char line[256];
    size_t seq = 0;
    uint64_t round = 1;
    while (fgets(line, sizeof line, stdin)) {
        double pct; char pat[32];
        if (sscanf(line, "mutate %lf %31s", &pct, pat) == 2) {
            size_t n = (size_t)(pages * pct / 100.0);
            if (n == 0) n = 1;
            round++;
            for (size_t k = 0; k < n; k++) {
                size_t pg = strcmp(pat, "sequential") == 0 ? (seq++ % pages) : (size_t)(next() % pages);
                fill_page(heap + pg * PAGE, round * 1000003 + pg);
            }
            printf("MUTATED %zu\n", n);
        } else if (strncmp(line, "quit", 4) == 0) {
            return 0;
        }
    }
    for (;;) pause();
}
