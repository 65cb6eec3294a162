/* libckpt.so: the C API of ckpt.h. Each call looks up ckpt's agent (the
 * ckpt_agent_* functions of libckpt_preload.so, present only in processes
 * that ckpt launched or restarted) with dlsym(RTLD_DEFAULT) and calls it;
 * without the agent it does nothing and says so.
 *
 * It holds no state of its own and must never do anything but forward:
 * the agent (preload/src/hooks.rs) is where the API is implemented. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <string.h>

#include "ckpt.h"

#define AGENT(ret, name, args)                                        \
    static ret(*agent_##name) args;                                   \
    static int have_##name(void)                                      \
    {                                                                 \
        if (!agent_##name)                                            \
            *(void **)&agent_##name = dlsym(RTLD_DEFAULT, "ckpt_agent_" #name); \
        return agent_##name != NULL;                                  \
    }

AGENT(int, is_enabled, (void))
AGENT(unsigned long long, restored_generation, (void))
AGENT(int, register_hook, (int, const char *, ckpt_hook_fn, void *))
AGENT(int, checkpoint_now, (unsigned long long *, char *, unsigned long))

int ckpt_is_enabled(void)
{
    return have_is_enabled() ? agent_is_enabled() : 0;
}

unsigned long long ckpt_restored_generation(void)
{
    return have_restored_generation() ? agent_restored_generation() : 0;
}

int ckpt_is_restarted(void)
{
    return ckpt_restored_generation() != 0;
}

int ckpt_register_hook(enum ckpt_event event, const char *name, ckpt_hook_fn fn, void *arg)
{
    if (!have_register_hook() || !ckpt_is_enabled())
        return CKPT_NOT_UNDER_CKPT;
    return agent_register_hook((int)event, name, fn, arg);
}

int ckpt_checkpoint_now(unsigned long long *generation, char *err, unsigned long errlen)
{
    if (!have_checkpoint_now()) {
        if (err && errlen > 0) {
            strncpy(err, "this process is not under ckpt", errlen - 1);
            err[errlen - 1] = 0;
        }
        return CKPT_NOT_UNDER_CKPT;
    }
    return agent_checkpoint_now(generation, err, errlen);
}
