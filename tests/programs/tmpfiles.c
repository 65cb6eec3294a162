/* tmpfiles: a program whose working files live in a temporary directory,
 * as Open MPI's session directory does.
 *
 *   tmpfiles [-n N] [-t MS] [-s STOPFILE] -d DIR
 *
 * Makes DIR/sess (mode 0710) and in it:
 *   - data: 300 KiB + 123 bytes (mode 0640) of known content, a hole of
 *     64 KiB in the middle, mapped MAP_SHARED read-write; the fd is
 *     closed (the mapping alone holds it, as PMIx's data store files);
 *   - log: a file kept open O_WRONLY | O_APPEND (mode 0600), one record
 *     of 16 bytes appended per tick;
 *   - fifo: a FIFO (mode 0620) kept open O_RDWR | O_NONBLOCK.
 * Every tick: the mapping holds the known content, but for the counter
 * in its first word, which is the number of ticks done; the log (read
 * through a new open of its path) holds exactly one record per tick done,
 * each its tick number; a byte written into the FIFO reads back; the
 * paths name the fd's and the mapping's inodes, with their modes; then
 * it counts the tick in the mapping and the log.
 * Files still there after a kill hold what the program wrote after the
 * checkpoint (the file is the content): a count or log ahead of the
 * program's is told with a line "AHEAD count records ticks" and cut back
 * to the program's. So after a restart with DIR/sess removed, the files
 * made again must hold exactly what they held at the checkpoint (no
 * AHEAD, no FAIL).
 */
#include "common.h"
#include <sys/mman.h>

#define SIZE (300 * 1024 + 123)
#define HOLE_AT (128 * 1024)
#define HOLE_LEN (64 * 1024)

static const char *dir;
static char sess[4096], data[4200], logp[4200], fifo[4200];

static void opt(int c, const char *arg)
{
    if (c == 'd') dir = arg;
}

static unsigned char byte_at(size_t i)
{
    if (i >= HOLE_AT && i < HOLE_AT + HOLE_LEN)
        return 0;
    return (unsigned char)(ct_mix64(i / 8) >> (8 * (i % 8)));
}

/* The inode /proc/self/maps gives the mapping at addr (0: none). */
static unsigned long mapped_inode(const void *addr)
{
    FILE *f = fopen("/proc/self/maps", "r");
    char line[4608];
    unsigned long ino = 0;
    while (f && fgets(line, sizeof line, f)) {
        unsigned long s, e, off, i;
        char perms[8], dev[16];
        if (sscanf(line, "%lx-%lx %7s %lx %15s %lu", &s, &e, perms, &off, dev, &i) == 6 && s == (uintptr_t)addr) {
            ino = i;
            break;
        }
    }
    if (f)
        fclose(f);
    return ino;
}

static ino_t fd_inode(int fd)
{
    struct stat st;
    return fstat(fd, &st) == 0 ? st.st_ino : 0;
}

static void check_path(const char *path, ino_t ino, unsigned mode, unsigned type, long tick)
{
    struct stat st;
    if (lstat(path, &st) != 0)
        ct_fail("tick %ld: %s: %s", tick, path, strerror(errno));
    if (st.st_ino != ino || (st.st_mode & S_IFMT) != type || (st.st_mode & 07777) != mode)
        ct_fail("tick %ld: %s is inode %lu mode %o, not inode %lu mode %o of type %o", tick, path, (unsigned long)st.st_ino, st.st_mode, (unsigned long)ino, mode, type);
}

int main(int argc, char **argv)
{
    ct_parse(argc, argv, "d:", opt);
    ct_setup();
    if (!dir)
        ct_fail("-d DIR is required");
    snprintf(sess, sizeof sess, "%s/sess", dir);
    snprintf(data, sizeof data, "%s/data", sess);
    snprintf(logp, sizeof logp, "%s/log", sess);
    snprintf(fifo, sizeof fifo, "%s/fifo", sess);
    if (mkdir(sess, 0700) != 0 || chmod(sess, 0710) != 0)
        ct_fail("mkdir %s: %s", sess, strerror(errno));

    int d = open(data, O_RDWR | O_CREAT | O_EXCL, 0600);
    if (d < 0 || fchmod(d, 0640) != 0)
        ct_fail("open %s: %s", data, strerror(errno));
    unsigned char *buf = malloc(SIZE);
    for (size_t i = 0; i < SIZE; i++)
        buf[i] = byte_at(i);
    if (pwrite(d, buf, HOLE_AT, 0) != HOLE_AT || pwrite(d, buf + HOLE_AT + HOLE_LEN, SIZE - HOLE_AT - HOLE_LEN, HOLE_AT + HOLE_LEN) != SIZE - HOLE_AT - HOLE_LEN)
        ct_fail("write %s: %s", data, strerror(errno));
    free(buf);
    unsigned char *map = mmap(NULL, SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, d, 0);
    if (map == MAP_FAILED)
        ct_fail("mmap %s: %s", data, strerror(errno));
    close(d);
    int64_t zero = 0;
    memcpy(map, &zero, 8);

    int lg = open(logp, O_WRONLY | O_APPEND | O_CREAT | O_EXCL, 0600);
    if (lg < 0)
        ct_fail("open %s: %s", logp, strerror(errno));

    if (mkfifo(fifo, 0600) != 0 || chmod(fifo, 0620) != 0)
        ct_fail("mkfifo %s: %s", fifo, strerror(errno));
    int ff = open(fifo, O_RDWR | O_NONBLOCK);
    if (ff < 0)
        ct_fail("open %s: %s", fifo, strerror(errno));

    printf("READY\n");
    for (long tick = 1;; tick++) {
        ct_check_ids();
        ct_sleep_ms(ct_interval_ms);
        long done = tick - 1;

        struct stat st;
        if (stat(sess, &st) != 0 || !S_ISDIR(st.st_mode) || (st.st_mode & 07777) != 0710)
            ct_fail("tick %ld: %s is not a directory of mode 0710", tick, sess);

        /* The shared mapping. */
        int64_t count;
        memcpy(&count, map, 8);
        if (fstat(lg, &st) != 0)
            ct_fail("tick %ld: fstat log: %s", tick, strerror(errno));
        if (count > done || st.st_size > done * 16) {
            printf("AHEAD %ld %ld %ld\n", (long)count, (long)st.st_size / 16, done);
            count = done;
            memcpy(map, &count, 8);
            if (ftruncate(lg, done * 16) != 0)
                ct_fail("tick %ld: ftruncate log: %s", tick, strerror(errno));
        }
        if (count != done)
            ct_fail("tick %ld: the mapped file counts %ld ticks, not %ld", tick, (long)count, done);
        for (size_t i = 8; i < SIZE; i++)
            if (map[i] != byte_at(i))
                ct_fail("tick %ld: the mapped file differs at byte %zu (%#x, not %#x)", tick, i, map[i], byte_at(i));
        check_path(data, mapped_inode(map), 0640, S_IFREG, tick);

        /* The log, through its path. */
        check_path(logp, fd_inode(lg), 0600, S_IFREG, tick);
        if (fstat(lg, &st) != 0 || st.st_size != done * 16)
            ct_fail("tick %ld: the log is %ld bytes, not %ld", tick, (long)st.st_size, done * 16);
        int r = open(logp, O_RDONLY);
        if (r < 0)
            ct_fail("tick %ld: open %s: %s", tick, logp, strerror(errno));
        for (long k = 1; k <= done; k++) {
            int64_t rec[2];
            if (pread(r, rec, 16, (k - 1) * 16) != 16 || rec[0] != k || rec[1] != k * 7)
                ct_fail("tick %ld: log record %ld is wrong", tick, k);
        }
        close(r);
        if ((fcntl(lg, F_GETFL) & (O_ACCMODE | O_APPEND)) != (O_WRONLY | O_APPEND))
            ct_fail("tick %ld: the log's fd flags are %#x", tick, fcntl(lg, F_GETFL));

        /* The FIFO. */
        check_path(fifo, fd_inode(ff), 0620, S_IFIFO, tick);
        char c = (char)tick, back = 0;
        if (write(ff, &c, 1) != 1 || read(ff, &back, 1) != 1 || back != c)
            ct_fail("tick %ld: the FIFO does not give back its byte: %s", tick, strerror(errno));

        count = tick;
        memcpy(map, &count, 8);
        int64_t rec[2] = { tick, tick * 7 };
        if (write(lg, rec, 16) != 16)
            ct_fail("tick %ld: write %s: %s", tick, logp, strerror(errno));

        printf("TICK %ld\n", tick);
        if (ct_should_stop(tick)) {
            ct_done();
            return 0;
        }
    }
}
