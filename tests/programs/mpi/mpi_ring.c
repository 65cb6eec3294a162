/* mpi_ring: an MPI job that checks its own state every tick.
 *
 * Built by tests/build.rs with each MPI library's compiler wrapper
 * (mpicc.openmpi -> mpi_ring-openmpi, mpicc.mpich -> mpi_ring-mpich); it
 * is not built with plain gcc (it lives in programs/mpi/ for that reason).
 *
 * Every tick t (1, 2, ...), on every rank r of n:
 *   - a ring exchange of a large rank-dependent buffer (-b KiB, default
 *     1024: past every eager limit, so Open MPI's vader BTL moves it with
 *     CMA (process_vm_readv) and MPICH's nemesis through its /dev/shm
 *     copy buffers), sent to r+1 and received from r-1 with MPI_Sendrecv;
 *     every word is checked against what rank r-1 must have sent;
 *   - the same with a small 64-byte message (the shared-memory FIFO /
 *     eager path), checked word by word;
 *   - MPI_Allreduce (sum) of (r+1)*t, which must be t*n*(n+1)/2, and an
 *     accumulator of those sums, which must be n(n+1)/2 * t(t+1)/2;
 *   - a private heap region (-m MiB, default 8) whose pages hold
 *     rank- and tick-dependent words, one page rewritten per tick and all
 *     checked each tick (the rank's own memory came back);
 *   - pid unchanged (ct_check_ids).
 * Any mismatch prints "FAIL rank R: ..." and exits 1 (mpirun then ends
 * the job with an error).
 *
 * Output: each rank prints "RANK r PID p" once, rank 0 "READY size=n",
 * "TICK t" each tick and, at the end, "ANSWER ticks=T acc=A" then "DONE".
 * Rank 0 decides when to stop (-n N ticks, or the stop file -s FILE as in
 * common.h) and broadcasts it, so every rank stops at the same tick.
 */
#include "../common.h"

#include <mpi.h>

static long buf_kib = 1024;
static long heap_mib = 8;

static void opt(int c, const char *arg)
{
    switch (c) {
    case 'b': buf_kib = strtol(arg, NULL, 10); break;
    case 'm': heap_mib = strtol(arg, NULL, 10); break;
    }
}

static int rank, size;

#define RFAIL(...) do { char m_[512]; snprintf(m_, sizeof m_, __VA_ARGS__); ct_fail("rank %d: %s", rank, m_); } while (0)

static uint64_t word(uint64_t tag, uint64_t r, uint64_t t, uint64_t i)
{
    return ct_mix64(tag * 0x1000003ULL ^ (r << 48) ^ (t << 20) ^ i);
}

static void check_mpi(int rc, const char *what)
{
    if (rc != MPI_SUCCESS) {
        char msg[MPI_MAX_ERROR_STRING];
        int len = 0;
        MPI_Error_string(rc, msg, &len);
        RFAIL("%s: %.200s", what, msg);
    }
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    setvbuf(stdout, NULL, _IOLBF, 0);
    setvbuf(stderr, NULL, _IONBF, 0);
    ct_pid = getpid();
    ct_tid = ct_gettid();
    ct_parse(argc, argv, "b:m:", opt);
    printf("RANK %d PID %d\n", rank, (int)ct_pid);

    size_t nbig = (size_t)buf_kib * 1024 / 8, nsmall = 8;
    uint64_t *sbig = malloc(nbig * 8), *rbig = malloc(nbig * 8);
    uint64_t ssmall[8], rsmall[8];
    size_t page_words = 4096 / 8, npages = (size_t)heap_mib * 256;
    uint64_t *heap = malloc(npages * 4096);
    uint64_t *version = calloc(npages, sizeof *version);
    if (!sbig || !rbig || !heap || !version)
        RFAIL("out of memory");
    for (size_t p = 0; p < npages; p++)
        for (size_t w = 0; w < page_words; w++)
            heap[p * page_words + w] = word(3, (uint64_t)rank, 0, p * page_words + w);

    int right = (rank + 1) % size, left = (rank + size - 1) % size;
    uint64_t n = (uint64_t)size, acc = 0;
    MPI_Barrier(MPI_COMM_WORLD);
    if (rank == 0)
        printf("READY size=%d\n", size);

    for (uint64_t t = 1;; t++) {
        ct_sleep_ms(ct_interval_ms);
        ct_check_ids();

        for (size_t i = 0; i < nbig; i++)
            sbig[i] = word(1, (uint64_t)rank, t, i);
        memset(rbig, 0, nbig * 8);
        check_mpi(MPI_Sendrecv(sbig, (int)nbig, MPI_UINT64_T, right, 1, rbig, (int)nbig, MPI_UINT64_T, left, 1,
                               MPI_COMM_WORLD, MPI_STATUS_IGNORE), "MPI_Sendrecv (large)");
        for (size_t i = 0; i < nbig; i++)
            if (rbig[i] != word(1, (uint64_t)left, t, i))
                RFAIL("tick %lu: large message from rank %d wrong at word %zu", (unsigned long)t, left, i);

        for (size_t i = 0; i < nsmall; i++)
            ssmall[i] = word(2, (uint64_t)rank, t, i);
        memset(rsmall, 0, sizeof rsmall);
        check_mpi(MPI_Sendrecv(ssmall, (int)nsmall, MPI_UINT64_T, left, 2, rsmall, (int)nsmall, MPI_UINT64_T, right, 2,
                               MPI_COMM_WORLD, MPI_STATUS_IGNORE), "MPI_Sendrecv (small)");
        for (size_t i = 0; i < nsmall; i++)
            if (rsmall[i] != word(2, (uint64_t)right, t, i))
                RFAIL("tick %lu: small message from rank %d wrong at word %zu", (unsigned long)t, right, i);

        uint64_t mine = (uint64_t)(rank + 1) * t, sum = 0;
        check_mpi(MPI_Allreduce(&mine, &sum, 1, MPI_UINT64_T, MPI_SUM, MPI_COMM_WORLD), "MPI_Allreduce");
        if (sum != t * n * (n + 1) / 2)
            RFAIL("tick %lu: allreduce gave %lu, expected %lu", (unsigned long)t, (unsigned long)sum,
                  (unsigned long)(t * n * (n + 1) / 2));
        acc += sum;
        if (acc != n * (n + 1) / 2 * (t * (t + 1) / 2))
            RFAIL("tick %lu: accumulator %lu, expected %lu", (unsigned long)t, (unsigned long)acc,
                  (unsigned long)(n * (n + 1) / 2 * (t * (t + 1) / 2)));

        size_t pg = (size_t)(t % npages);
        version[pg] = t;
        for (size_t w = 0; w < page_words; w++)
            heap[pg * page_words + w] = word(3, (uint64_t)rank, t, pg * page_words + w);
        for (size_t p = 0; p < npages; p++)
            for (size_t w = 0; w < page_words; w += 61)
                if (heap[p * page_words + w] != word(3, (uint64_t)rank, version[p], p * page_words + w))
                    RFAIL("tick %lu: heap page %zu (version %lu) wrong at word %zu", (unsigned long)t, p,
                          (unsigned long)version[p], w);

        int stop = 0;
        if (rank == 0) {
            printf("TICK %lu\n", (unsigned long)t);
            stop = ct_should_stop((long)t);
        }
        check_mpi(MPI_Bcast(&stop, 1, MPI_INT, 0, MPI_COMM_WORLD), "MPI_Bcast");
        if (stop) {
            if (rank == 0)
                printf("ANSWER ticks=%lu acc=%lu\n", (unsigned long)t, (unsigned long)acc);
            break;
        }
    }
    MPI_Finalize();
    if (rank == 0)
        ct_done();
    return 0;
}
