/* preload_exec: a program that starts children with an LD_PRELOAD of its
 * own, as a program running a tool under a preload library does.
 *
 *   preload_exec [-n N] [-t MS] [-s STOPFILE]
 *
 * The parent forks two children, each of which execs this program again
 * (mode -c) with LD_PRELOAD="libm.so.6:/nonexistent/libckpt-missing.so":
 * one through execve with an environment it built, one through setenv
 * and execvp. libm.so.6 is a library the program does not link: a child
 * checks every tick that it is mapped (the user's library was loaded),
 * the parent that it is not. The missing library is ignored by the
 * loader. Every tick the parent checks that both children live; on stop
 * they exit 0 and the parent reaps them (status 0) before DONE (after -n
 * ticks without a stop file, it ends them with SIGTERM).
 */
#include "common.h"
#include <signal.h>
#include <sys/wait.h>

#define USER_PRELOAD "libm.so.6:/nonexistent/libckpt-missing.so"

extern char **environ;

static int child_mode;

static void opt(int c, const char *arg)
{
    (void)arg;
    if (c == 'c')
        child_mode = 1;
}

static int has_libm(void)
{
    FILE *f = fopen("/proc/self/maps", "r");
    if (!f)
        ct_fail("open /proc/self/maps: %s", strerror(errno));
    char line[4096];
    int found = 0;
    while (fgets(line, sizeof line, f))
        if (strstr(line, "/libm.so") || strstr(line, "/libm-"))
            found = 1;
    fclose(f);
    return found;
}

static pid_t start_child(int how, char **argv_tail)
{
    pid_t pid = fork();
    if (pid < 0)
        ct_fail("fork: %s", strerror(errno));
    if (pid > 0)
        return pid;
    char *args[16];
    int n = 0;
    args[n++] = "preload_exec";
    args[n++] = "-c";
    for (char **a = argv_tail; *a && n < 15; a++)
        args[n++] = *a;
    args[n] = NULL;
    if (how == 0) {
        /* execve with an environment of its own making. */
        char *env[256];
        int k = 0;
        for (char **e = environ; *e && k < 254; e++)
            if (strncmp(*e, "LD_PRELOAD=", 11) != 0)
                env[k++] = *e;
        env[k++] = "LD_PRELOAD=" USER_PRELOAD;
        env[k] = NULL;
        execve("/proc/self/exe", args, env);
    } else {
        setenv("LD_PRELOAD", USER_PRELOAD, 1);
        execvp("/proc/self/exe", args);
    }
    fprintf(stdout, "FAIL exec: %s\n", strerror(errno));
    _exit(1);
}

int main(int argc, char **argv)
{
    ct_parse(argc, argv, "c", opt);
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (child_mode) {
        for (long tick = 1;; tick++) {
            if (!has_libm())
                ct_fail("child %d, tick %ld: libm.so.6 from its LD_PRELOAD is not mapped", (int)getpid(), tick);
            if (ct_stop_requested())
                return 0;
            ct_sleep_ms(ct_interval_ms);
        }
    }
    ct_setup();
    if (has_libm())
        ct_fail("the parent has libm mapped without asking for it: pick another library");
    /* The children get the common options (the stop file). */
    pid_t kids[2];
    int reaped[2] = { 0, 0 };
    for (int i = 0; i < 2; i++)
        kids[i] = start_child(i, argv + 1);
    printf("READY\n");
    for (long tick = 1;; tick++) {
        ct_check_ids();
        ct_sleep_ms(ct_interval_ms);
        if (has_libm())
            ct_fail("tick %ld: the parent has libm mapped", tick);
        for (int i = 0; i < 2; i++) {
            int st = 0;
            if (reaped[i])
                continue;
            pid_t r = waitpid(kids[i], &st, WNOHANG);
            /* Once the stop file exists, the children end on their own. */
            if (r == kids[i] && ct_stop_requested() && WIFEXITED(st) && WEXITSTATUS(st) == 0)
                reaped[i] = 1;
            else if (r != 0)
                ct_fail("tick %ld: child %d (%s) is gone (waitpid %d, status %#x)", tick, (int)kids[i], i ? "execvp" : "execve", (int)r, r > 0 ? st : 0);
        }
        printf("TICK %ld\n", tick);
        if (ct_should_stop(tick)) {
            for (int i = 0; i < 2; i++) {
                int st = 0;
                if (reaped[i])
                    continue;
                /* Without a stop file (-n), the children are told to end. */
                if (!ct_stop_requested())
                    kill(kids[i], SIGTERM);
                if (waitpid(kids[i], &st, 0) != kids[i] || !((WIFEXITED(st) && WEXITSTATUS(st) == 0) || (WIFSIGNALED(st) && WTERMSIG(st) == SIGTERM)))
                    ct_fail("child %d did not end with status 0 (%#x)", (int)kids[i], st);
            }
            ct_done();
            return 0;
        }
    }
}
