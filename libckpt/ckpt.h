/* ckpt.h: the C API of ckpt for programs that know they may be
 * checkpointed (link with -lckpt).
 *
 * Every function works in a program run without ckpt: it then does
 * nothing and says so (CKPT_NOT_UNDER_CKPT, or 0). Under `ckpt launch` or
 * after `ckpt restart`, libckpt.so finds ckpt's agent in the process (the
 * LD_PRELOADed libckpt_preload.so) at run time and calls it.
 *
 * Callbacks (ckpt_register_hook) run in a thread of ckpt's, while every
 * other thread of the program runs:
 *   CKPT_PRE_CHECKPOINT   before a checkpoint stops the program (flush or
 *                         close what lives outside the computation: a
 *                         database connection, a license, a socket to a
 *                         service). Return 0 to go on; any other value
 *                         refuses this checkpoint: the program goes on,
 *                         no generation is written, and the error names
 *                         the process and the callback. A callback that
 *                         does not return within the hook timeout
 *                         (`ckpt launch --hook-timeout SECS`, 60 s by
 *                         default) refuses it too.
 *   CKPT_POST_CHECKPOINT  after every checkpoint whose pre-checkpoint
 *                         callbacks ran, the program going on: generation
 *                         is the committed generation, or 0 if that
 *                         checkpoint failed (open again what the
 *                         pre-checkpoint callback closed).
 *   CKPT_POST_RESTART     in a restarted process, once it is back under
 *                         the coordinator: generation is the one restored.
 * The return value of post-* callbacks is only reported (on stderr).
 * Callbacks of one event run one after the other, in the order they were
 * registered. A callback may not call ckpt_checkpoint_now.
 */
#ifndef CKPT_H
#define CKPT_H

#ifdef __cplusplus
extern "C" {
#endif

#define CKPT_OK 0
#define CKPT_CHECKPOINTED 1      /* ckpt_checkpoint_now: committed */
#define CKPT_RESTARTED 2         /* ckpt_checkpoint_now: returning in a restart */
#define CKPT_NOT_UNDER_CKPT (-1) /* the program runs without ckpt */
#define CKPT_ERROR (-2)          /* see the message */

enum ckpt_event {
    CKPT_PRE_CHECKPOINT = 1,
    CKPT_POST_CHECKPOINT = 2,
    CKPT_POST_RESTART = 3,
};

typedef int (*ckpt_hook_fn)(int event, unsigned long long generation, void *arg);

/* 1 if the process runs under ckpt (registered with a coordinator), else 0. */
int ckpt_is_enabled(void);

/* 1 if the process was restored by `ckpt restart`, else 0. */
int ckpt_is_restarted(void);

/* The generation this process was restored from, 0 if it was not. */
unsigned long long ckpt_restored_generation(void);

/* Registers fn for event; name (may be NULL: the function's symbol is
 * used) names it in error messages. CKPT_OK, CKPT_NOT_UNDER_CKPT (nothing
 * registered), or CKPT_ERROR (bad event, NULL fn, more than 64 callbacks). */
int ckpt_register_hook(enum ckpt_event event, const char *name, ckpt_hook_fn fn, void *arg);

/* Asks for a checkpoint of the whole computation and returns once it is
 * committed (CKPT_CHECKPOINTED, *generation set if generation is not
 * NULL), or, in a process restarted from that checkpoint, CKPT_RESTARTED
 * (*generation: the generation restored). CKPT_NOT_UNDER_CKPT without
 * ckpt; CKPT_ERROR if the checkpoint failed: err (if not NULL) gets the
 * reason, NUL-terminated, at most errlen bytes. */
int ckpt_checkpoint_now(unsigned long long *generation, char *err, unsigned long errlen);

#ifdef __cplusplus
}
#endif

#endif
