/* deleted: files open after they were unlinked, and a memfd open but not
 * mapped, come back with their contents, size, mode, offsets and flags,
 * still unlinked, every fd and mapping of one file sharing it again.
 *
 *   deleted [-n N] [-t MS] [-s STOPFILE] [-d DIR]
 *
 * A: tmpfile(): an 8-byte record appended per tick with write(); its
 *    offset is 8 * records, every record is checked.
 * B: O_TMPFILE in DIR (default /tmp), mode 0640, O_APPEND: a sparse file
 *    (a page at 1 MiB); one record appended per tick; size, mode, flags.
 * C: a scratch file in DIR unlinked after open, 16 pages, mapped
 *    MAP_SHARED and MAP_PRIVATE, a dup (same offset) and a second open of
 *    /proc/self/fd/N read-only (its own offset): a write through the
 *    shared mapping is seen by pread and the other way round; the private
 *    mapping keeps its own page 0.
 * D: a memfd with F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL, open, not mapped: seals,
 *    contents, ftruncate refused.
 * F: a memfd open and mapped shared: a write through the mapping is seen
 *    by pread on the fd and the other way round.
 * E: a file unlinked after open and watched with inotify (IN_MODIFY): a
 *    write through the fd gives an event with the watch's wd.
 * G: an empty file in DIR unlinked after open and never written (as Open
 *    MPI keeps /dev/shm/open_mpi.0000): size 0, read gives end of file.
 * Every file: st_nlink 0.
 */
#include "common.h"
#include <sys/inotify.h>
#include <sys/mman.h>

#define PG 4096
#define CPAGES 16

static const char *dir = "/tmp";
static void opt(int c, const char *arg)
{
    if (c == 'd')
        dir = arg;
}

static void check_unlinked(int fd, const char *what, long tick)
{
    struct stat st;
    if (fstat(fd, &st) != 0)
        ct_fail("tick %ld: fstat %s: %s", tick, what, strerror(errno));
    if (st.st_nlink != 0)
        ct_fail("tick %ld: %s has %ld links, not 0", tick, what, (long)st.st_nlink);
}

static void rd(int fd, void *buf, size_t n, off_t off, const char *what, long tick)
{
    ssize_t k = pread(fd, buf, n, off);
    if (k != (ssize_t)n)
        ct_fail("tick %ld: pread %s at %ld: %zd (%s)", tick, what, (long)off, k, strerror(errno));
}

int main(int argc, char **argv)
{
    ct_parse(argc, argv, "d:", opt);
    ct_setup();

    /* A */
    FILE *fa = tmpfile();
    if (!fa)
        ct_fail("tmpfile: %s", strerror(errno));
    int a = fileno(fa);

    /* G */
    char gpath[4200];
    snprintf(gpath, sizeof gpath, "%s/ckpt-deleted-empty-%d", dir, (int)getpid());
    int g = open(gpath, O_RDWR | O_CREAT | O_EXCL, 0600);
    if (g < 0 || unlink(gpath) != 0)
        ct_fail("empty file %s: %s", gpath, strerror(errno));

    /* B */
    int b = open(dir, O_TMPFILE | O_RDWR, 0640);
    if (b < 0)
        ct_fail("O_TMPFILE in %s: %s", dir, strerror(errno));
    fchmod(b, 0640);
    if (pwrite(b, "sparse!", 7, 1 << 20) != 7)
        ct_fail("pwrite b: %s", strerror(errno));
    int bflags = fcntl(b, F_GETFL);
    fcntl(b, F_SETFL, bflags | O_APPEND);
    off_t bbase = (1 << 20) + 7;

    /* C */
    char path[4096];
    snprintf(path, sizeof path, "%s/ckpt-deleted-%d", dir, (int)getpid());
    int c = open(path, O_RDWR | O_CREAT | O_EXCL, 0600);
    if (c < 0)
        ct_fail("open %s: %s", path, strerror(errno));
    if (ftruncate(c, CPAGES * PG) != 0)
        ct_fail("ftruncate c: %s", strerror(errno));
    unsigned char *cs = mmap(NULL, CPAGES * PG, PROT_READ | PROT_WRITE, MAP_SHARED, c, 0);
    unsigned char *cp = mmap(NULL, CPAGES * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE, c, 0);
    if (cs == MAP_FAILED || cp == MAP_FAILED)
        ct_fail("mmap c: %s", strerror(errno));
    memset(cp, 0x5a, PG); /* the private copy's own page 0 */
    unlink(path);
    int c2 = dup(c);
    char self[64];
    snprintf(self, sizeof self, "/proc/self/fd/%d", c);
    int c3 = open(self, O_RDONLY);
    if (c3 < 0)
        ct_fail("reopen c: %s", strerror(errno));
    lseek(c, 100, SEEK_SET);
    lseek(c3, 200, SEEK_SET);

    /* D */
    int d = memfd_create("ckpt-test-memfd", MFD_ALLOW_SEALING | MFD_CLOEXEC);
    if (d < 0)
        ct_fail("memfd_create: %s", strerror(errno));
    unsigned char dbuf[10000];
    for (int i = 0; i < (int)sizeof dbuf; i++)
        dbuf[i] = (unsigned char)(i * 7 + 3);
    if (write(d, dbuf, sizeof dbuf) != (ssize_t)sizeof dbuf)
        ct_fail("write d: %s", strerror(errno));
    if (fcntl(d, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0)
        ct_fail("F_ADD_SEALS: %s", strerror(errno));

    /* F */
    int fm = memfd_create("ckpt-test-mapped", MFD_CLOEXEC);
    if (fm < 0 || ftruncate(fm, 4 * PG) != 0)
        ct_fail("memfd F: %s", strerror(errno));
    unsigned char *fmap = mmap(NULL, 4 * PG, PROT_READ | PROT_WRITE, MAP_SHARED, fm, 0);
    if (fmap == MAP_FAILED)
        ct_fail("mmap memfd F: %s", strerror(errno));

    /* E */
    snprintf(path, sizeof path, "%s/ckpt-watched-%d", dir, (int)getpid());
    int e = open(path, O_RDWR | O_CREAT | O_EXCL, 0600);
    if (e < 0)
        ct_fail("open %s: %s", path, strerror(errno));
    int in = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    int wd = inotify_add_watch(in, path, IN_MODIFY);
    if (in < 0 || wd < 0)
        ct_fail("inotify: %s", strerror(errno));
    unlink(path);
    char evbuf[4096];
    while (read(in, evbuf, sizeof evbuf) > 0) {} /* IN_ATTRIB etc. are not asked for; drain anyway */

    printf("READY\n");
    for (long tick = 1;; tick++) {
        ct_check_ids();
        ct_sleep_ms(ct_interval_ms);

        /* G */
        check_unlinked(g, "empty file", tick);
        struct stat gst;
        char gb;
        if (fstat(g, &gst) != 0 || gst.st_size != 0 || pread(g, &gb, 1, 0) != 0)
            ct_fail("tick %ld: the empty unlinked file is not empty", tick);

        /* A */
        check_unlinked(a, "tmpfile", tick);
        off_t pos = lseek(a, 0, SEEK_CUR);
        if (pos != (tick - 1) * 8)
            ct_fail("tick %ld: tmpfile offset %ld, not %ld", tick, (long)pos, (long)(tick - 1) * 8);
        for (long k = 1; k < tick; k++) {
            int64_t v;
            rd(a, &v, 8, (k - 1) * 8, "tmpfile", tick);
            if (v != k * 1000 + 1)
                ct_fail("tick %ld: tmpfile record %ld is %ld", tick, k, (long)v);
        }
        int64_t v = tick * 1000 + 1;
        if (write(a, &v, 8) != 8)
            ct_fail("tick %ld: write tmpfile: %s", tick, strerror(errno));

        /* B */
        check_unlinked(b, "O_TMPFILE file", tick);
        struct stat st;
        fstat(b, &st);
        if ((st.st_mode & 07777) != 0640 || st.st_size != bbase + (tick - 1) * 8)
            ct_fail("tick %ld: O_TMPFILE file mode %o size %ld, not 640 and %ld", tick, st.st_mode & 07777, (long)st.st_size, (long)(bbase + (tick - 1) * 8));
        if (!(fcntl(b, F_GETFL) & O_APPEND) || (fcntl(b, F_GETFL) & O_ACCMODE) != O_RDWR)
            ct_fail("tick %ld: O_TMPFILE file flags %#x", tick, fcntl(b, F_GETFL));
        char sp[8] = {0};
        rd(b, sp, 7, 1 << 20, "O_TMPFILE file", tick);
        if (memcmp(sp, "sparse!", 7) != 0)
            ct_fail("tick %ld: O_TMPFILE file lost its data at 1 MiB", tick);
        for (long k = 1; k < tick; k++) {
            int64_t w;
            rd(b, &w, 8, bbase + (k - 1) * 8, "O_TMPFILE file", tick);
            if (w != k * 1000 + 2)
                ct_fail("tick %ld: O_TMPFILE record %ld is %ld", tick, k, (long)w);
        }
        v = tick * 1000 + 2;
        if (write(b, &v, 8) != 8)
            ct_fail("tick %ld: write O_TMPFILE file: %s", tick, strerror(errno));

        /* C */
        check_unlinked(c, "scratch file", tick);
        if (lseek(c2, 0, SEEK_CUR) != 100 + (tick - 1) || lseek(c3, 0, SEEK_CUR) != 200)
            ct_fail("tick %ld: scratch offsets %ld %ld, not %ld 200", tick, (long)lseek(c2, 0, SEEK_CUR), (long)lseek(c3, 0, SEEK_CUR), 100 + (tick - 1));
        if ((fcntl(c3, F_GETFL) & O_ACCMODE) != O_RDONLY)
            ct_fail("tick %ld: the read-only fd of the scratch file is not read-only", tick);
        for (int p = 1; p < CPAGES; p++) {
            int64_t m, f;
            memcpy(&m, cs + p * PG, 8);
            rd(c3, &f, 8, p * PG, "scratch file", tick);
            if (m != f)
                ct_fail("tick %ld: scratch page %d: mapping %ld, file %ld: not one file", tick, p, (long)m, (long)f);
            memcpy(&m, cs + p * PG + 8, 8);
            if (m != (p < tick ? p * 3 : 0))
                ct_fail("tick %ld: scratch page %d has %ld written through its fd", tick, p, (long)m);
        }
        for (int i = 0; i < PG; i++)
            if (cp[i] != 0x5a)
                ct_fail("tick %ld: private mapping of the scratch file lost its page 0", tick);
        int p = (int)(tick % (CPAGES - 1)) + 1;
        v = tick;
        memcpy(cs + p * PG, &v, 8); /* through the mapping, seen by pread */
        if (tick < CPAGES) {
            int64_t w = tick * 3;
            pwrite(c, &w, 8, tick * PG + 8); /* through the fd, seen in the mapping */
        }
        if (write(c2, "x", 1) != 1) /* moves the shared offset of c and c2 */
            ct_fail("tick %ld: write c2: %s", tick, strerror(errno));
        /* the write landed at the offset, page 0 of the file: not in the private copy */

        /* D */
        check_unlinked(d, "memfd", tick);
        int seals = fcntl(d, F_GET_SEALS);
        if (seals != (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL))
            ct_fail("tick %ld: memfd seals %#x", tick, seals);
        if (fcntl(fm, F_GET_SEALS) != F_SEAL_SEAL)
            ct_fail("tick %ld: the memfd made without MFD_ALLOW_SEALING has seals %#x", tick, fcntl(fm, F_GET_SEALS));
        if (ftruncate(d, 5) == 0 || errno != EPERM)
            ct_fail("tick %ld: the sealed memfd could be shrunk", tick);
        unsigned char got[sizeof dbuf];
        rd(d, got, sizeof got, 0, "memfd", tick);
        if (memcmp(got, dbuf, sizeof dbuf) != 0)
            ct_fail("tick %ld: memfd contents differ", tick);
        if (lseek(d, 0, SEEK_CUR) != (off_t)sizeof dbuf)
            ct_fail("tick %ld: memfd offset %ld", tick, (long)lseek(d, 0, SEEK_CUR));
        char name[256];
        snprintf(self, sizeof self, "/proc/self/fd/%d", d);
        ssize_t nl = readlink(self, name, sizeof name - 1);
        name[nl > 0 ? nl : 0] = 0;
        if (strcmp(name, "/memfd:ckpt-test-memfd (deleted)") != 0)
            ct_fail("tick %ld: memfd is %s", tick, name);

        /* F */
        {
            int64_t m, f;
            memcpy(&m, fmap + PG, 8);
            rd(fm, &f, 8, PG, "mapped memfd", tick);
            if (m != tick - 1 || f != tick - 1)
                ct_fail("tick %ld: mapped memfd: mapping %ld, fd %ld, not %ld", tick, (long)m, (long)f, tick - 1);
            memcpy(&m, fmap + 2 * PG, 8);
            if (m != (tick - 1) * 5)
                ct_fail("tick %ld: mapped memfd: a write through its fd is not in the mapping (%ld)", tick, (long)m);
            m = tick;
            memcpy(fmap + PG, &m, 8);
            f = tick * 5;
            pwrite(fm, &f, 8, 2 * PG);
        }

        /* E */
        check_unlinked(e, "watched file", tick);
        if (write(e, "y", 1) != 1)
            ct_fail("tick %ld: write e: %s", tick, strerror(errno));
        ssize_t k = read(in, evbuf, sizeof evbuf);
        struct inotify_event *ev = (struct inotify_event *)evbuf;
        if (k < (ssize_t)sizeof *ev || ev->wd != wd || !(ev->mask & IN_MODIFY))
            ct_fail("tick %ld: no IN_MODIFY for wd %d on the deleted file (read %zd, wd %d, mask %#x)", tick, wd, k,
                    k > 0 ? ev->wd : -1, k > 0 ? ev->mask : 0);
        while (read(in, evbuf, sizeof evbuf) > 0) {}

        printf("TICK %ld\n", tick);
        if (ct_should_stop(tick)) {
            ct_done();
            return 0;
        }
    }
}
