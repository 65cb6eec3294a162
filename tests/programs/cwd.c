/* cwd: runs in directory DIR and checks, every tick, that it still does.
 *
 *   cwd -d DIR [-n N] [-t MS] [-s STOPFILE]
 *
 * At start it changes to DIR and records the directory's device and inode
 * and getcwd(). Every tick: getcwd() must give the same path and "." the
 * same device and inode (a restart that put it elsewhere fails it).
 */
#include "common.h"
#include <limits.h>

static const char *dir = NULL;

static void opt(int c, const char *arg)
{
    if (c == 'd')
        dir = arg;
}

int main(int argc, char **argv)
{
    ct_parse(argc, argv, "d:", opt);
    ct_setup();
    if (!dir)
        ct_fail("usage: cwd -d DIR");
    if (chdir(dir) != 0)
        ct_fail("chdir %s: %s", dir, strerror(errno));
    char want[PATH_MAX];
    if (!getcwd(want, sizeof want))
        ct_fail("getcwd: %s", strerror(errno));
    struct stat st0;
    if (stat(".", &st0) != 0)
        ct_fail("stat .: %s", strerror(errno));
    printf("READY cwd %s\n", want);
    for (long tick = 1;; tick++) {
        ct_sleep_ms(ct_interval_ms);
        ct_check_ids();
        char got[PATH_MAX];
        struct stat st;
        if (stat(".", &st) != 0)
            ct_fail("stat .: %s", strerror(errno));
        if (st.st_dev != st0.st_dev || st.st_ino != st0.st_ino)
            ct_fail("cwd is another directory: dev %lu ino %lu, was dev %lu ino %lu", (unsigned long)st.st_dev,
                    (unsigned long)st.st_ino, (unsigned long)st0.st_dev, (unsigned long)st0.st_ino);
        /* A removed directory: getcwd fails (ENOENT) or names it "(deleted)". */
        if (getcwd(got, sizeof got) && strcmp(got, want) != 0)
            ct_fail("getcwd %s, expected %s", got, want);
        printf("TICK %ld\n", tick);
        if (ct_should_stop(tick))
            ct_done();
    }
}
