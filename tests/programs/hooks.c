/* hooks: a program that knows it may be checkpointed (ckpt.h, libckpt.so).
 *
 *   hooks [-n N] [-t MS] [-s STOPFILE] [-N TICK] [-f FILE] [-H FILE]
 *
 * Registers a pre-checkpoint, a post-checkpoint and a post-restart
 * callback that count their calls and check their order:
 *   - pre: every earlier pre was followed by its post (pre == post);
 *   - post: follows its pre (post + 1 == pre); a committed generation
 *     grows from one to the next, 0 means the checkpoint failed;
 *   - restart: ckpt_is_restarted() is 1 and the generation is
 *     ckpt_restored_generation(); in the restored memory the last pre has
 *     no post yet (pre == post + 1: the image was taken between them),
 *     which then counts as done.
 * Each prints "HOOK pre N", "HOOK post N gen G", "HOOK restart gen G".
 * -f FILE: a second pre-checkpoint callback, "fail_if_file", returns 3
 *          while FILE exists (the checkpoint must be refused);
 * -H FILE: a third, "hang_if_file", sleeps while FILE exists (past the
 *          hook timeout: the checkpoint must be refused, and the program
 *          go on).
 * -N TICK: at that tick the main thread calls ckpt_checkpoint_now() and
 *          prints "NOW checkpointed G" (the committed generation) or, in a
 *          process restarted from it, "NOW restarted G".
 * Without ckpt every call must say so (CKPT_NOT_UNDER_CKPT, 0) and the
 * program prints "NOCKPT ok", then ticks as usual.
 * Each TICK line carries pre=, post=, restarts=.
 */
#include "common.h"
#include <ckpt.h>
#include <pthread.h>

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static long pre_calls, post_calls, restarts;
static unsigned long long last_gen;
static const char *fail_file, *hang_file;
static long now_tick = -1;
static volatile long ticks_seen;
/* The main thread is in ckpt_checkpoint_now (so it cannot tick). */
static volatile int asking;

static void opt(int c, const char *arg)
{
    if (c == 'f') fail_file = arg;
    if (c == 'H') hang_file = arg;
    if (c == 'N') now_tick = strtol(arg, NULL, 10);
}

static int on_pre(int event, unsigned long long gen, void *arg)
{
    if (event != CKPT_PRE_CHECKPOINT || arg != &pre_calls)
        ct_fail("pre callback called for event %d, arg %p", event, arg);
    (void)gen;
    pthread_mutex_lock(&mu);
    if (pre_calls != post_calls)
        ct_fail("pre-checkpoint callback %ld, but only %ld post-checkpoint callbacks so far", pre_calls + 1, post_calls);
    long n = ++pre_calls;
    pthread_mutex_unlock(&mu);
    /* The program's other threads run meanwhile: the main thread ticks
     * (unless it is the one waiting for this checkpoint). */
    long t0 = ticks_seen;
    for (int i = 0; i < 500 && ticks_seen == t0 && !asking; i++)
        ct_sleep_ms(ct_interval_ms / 10 + 1);
    if (ticks_seen == t0 && !asking)
        ct_fail("the main thread did not tick while the pre-checkpoint callback ran");
    printf("HOOK pre %ld\n", n);
    return 0;
}

static int fail_if_file(int event, unsigned long long gen, void *arg)
{
    (void)event; (void)gen; (void)arg;
    return ct_file_exists(fail_file) ? 3 : 0;
}

static int hang_if_file(int event, unsigned long long gen, void *arg)
{
    (void)event; (void)gen; (void)arg;
    while (ct_file_exists(hang_file))
        ct_sleep_ms(50);
    return 0;
}

static int on_post(int event, unsigned long long gen, void *arg)
{
    if (event != CKPT_POST_CHECKPOINT || arg != &post_calls)
        ct_fail("post callback called for event %d, arg %p", event, arg);
    pthread_mutex_lock(&mu);
    if (post_calls + 1 != pre_calls)
        ct_fail("post-checkpoint callback %ld after %ld pre-checkpoint callbacks", post_calls + 1, pre_calls);
    if (gen != 0 && gen <= last_gen)
        ct_fail("committed generation %llu after %llu", gen, last_gen);
    if (gen != 0)
        last_gen = gen;
    long n = ++post_calls;
    pthread_mutex_unlock(&mu);
    printf("HOOK post %ld gen %llu\n", n, gen);
    return 0;
}

static int on_restart(int event, unsigned long long gen, void *arg)
{
    if (event != CKPT_POST_RESTART || arg != &restarts)
        ct_fail("restart callback called for event %d, arg %p", event, arg);
    if (!ckpt_is_restarted())
        ct_fail("post-restart callback, but ckpt_is_restarted() is 0");
    if (ckpt_restored_generation() != gen)
        ct_fail("post-restart callback for generation %llu, but ckpt_restored_generation() is %llu", gen, ckpt_restored_generation());
    pthread_mutex_lock(&mu);
    if (pre_calls != post_calls + 1)
        ct_fail("restored memory has %ld pre- and %ld post-checkpoint calls: the image was not taken between them", pre_calls, post_calls);
    post_calls = pre_calls;
    long n = ++restarts;
    pthread_mutex_unlock(&mu);
    printf("HOOK restart %ld gen %llu\n", n, gen);
    return 0;
}

static void without_ckpt(void)
{
    char err[128] = "";
    unsigned long long g = 7;
    if (ckpt_is_enabled() != 0 || ckpt_is_restarted() != 0 || ckpt_restored_generation() != 0)
        ct_fail("without ckpt: enabled %d restarted %d generation %llu", ckpt_is_enabled(), ckpt_is_restarted(), ckpt_restored_generation());
    if (ckpt_register_hook(CKPT_PRE_CHECKPOINT, "x", on_pre, &pre_calls) != CKPT_NOT_UNDER_CKPT)
        ct_fail("without ckpt: ckpt_register_hook did not say CKPT_NOT_UNDER_CKPT");
    int rc = ckpt_checkpoint_now(&g, err, sizeof err);
    if (rc != CKPT_NOT_UNDER_CKPT || g != 7 || strstr(err, "not under ckpt") == NULL)
        ct_fail("without ckpt: ckpt_checkpoint_now returned %d, generation %llu, %s", rc, g, err);
    printf("NOCKPT ok\n");
}

int main(int argc, char **argv)
{
    ct_setup();
    ct_parse(argc, argv, "f:H:N:", opt);
    if (!ckpt_is_enabled()) {
        without_ckpt();
    } else {
        if (ckpt_register_hook(CKPT_PRE_CHECKPOINT, "count_pre", on_pre, &pre_calls) != CKPT_OK
            || (fail_file && ckpt_register_hook(CKPT_PRE_CHECKPOINT, "fail_if_file", fail_if_file, NULL) != CKPT_OK)
            || (hang_file && ckpt_register_hook(CKPT_PRE_CHECKPOINT, "hang_if_file", hang_if_file, NULL) != CKPT_OK)
            || ckpt_register_hook(CKPT_POST_CHECKPOINT, "count_post", on_post, &post_calls) != CKPT_OK
            || ckpt_register_hook(CKPT_POST_RESTART, "count_restart", on_restart, &restarts) != CKPT_OK)
            ct_fail("ckpt_register_hook failed");
        if (ckpt_register_hook((enum ckpt_event)9, "bad", on_pre, NULL) != CKPT_ERROR)
            ct_fail("ckpt_register_hook accepted event 9");
    }
    printf("READY\n");
    for (long tick = 1;; tick++) {
        ct_check_ids();
        if (tick == now_tick) {
            char err[256] = "";
            unsigned long long g = 0;
            asking = 1;
            int rc = ckpt_checkpoint_now(&g, err, sizeof err);
            asking = 0;
            if (rc == CKPT_CHECKPOINTED && g > 0)
                printf("NOW checkpointed %llu\n", g);
            else if (rc == CKPT_RESTARTED && g == ckpt_restored_generation() && g > 0)
                printf("NOW restarted %llu\n", g);
            else if (rc == CKPT_NOT_UNDER_CKPT && !ckpt_is_enabled())
                printf("NOW not under ckpt\n");
            else
                ct_fail("ckpt_checkpoint_now returned %d, generation %llu: %s", rc, g, err);
        }
        pthread_mutex_lock(&mu);
        printf("TICK %ld pre=%ld post=%ld restarts=%ld\n", tick, pre_calls, post_calls, restarts);
        pthread_mutex_unlock(&mu);
        ticks_seen = tick;
        if (ct_should_stop(tick))
            break;
        ct_sleep_ms(ct_interval_ms);
    }
    ct_done();
    return 0;
}
