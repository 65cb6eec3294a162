#!/usr/bin/env python3
"""python_hooks: hooks.c in Python, over ckpt's Python module (python/ckpt.py).

    python3 python_hooks.py [-n N] [-t MS] [-s STOPFILE] [-N TICK] [-f FILE]

The same callbacks, checks and lines as hooks.c ("HOOK pre N", "HOOK post N
gen G", "HOOK restart N gen G", "NOW checkpointed G" / "NOW restarted G",
"NOCKPT ok" without ckpt), registered with the module's decorators. -f
FILE: a second pre-checkpoint callback, "py_fail", raises while FILE
exists (the checkpoint must be refused). The module is found through
PYTHONPATH; libckpt.so through CKPT_LIBCKPT or where the installer puts it.
"""
import argparse
import os
import sys
import threading
import time

import ckpt

lock = threading.Lock()
# "asking": the main thread waits in checkpoint_now (so it cannot tick).
state = {"pre": 0, "post": 0, "restarts": 0, "last_gen": 0, "ticks": 0, "asking": False}
args = None


def fail(msg):
    sys.stdout.write("FAIL %s\n" % msg)
    sys.stdout.flush()
    os._exit(1)


def say(line):
    with lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def on_pre(generation):
    with lock:
        if state["pre"] != state["post"]:
            fail("pre-checkpoint callback %d, but only %d post-checkpoint callbacks" % (state["pre"] + 1, state["post"]))
        state["pre"] += 1
        n = state["pre"]
    t0 = state["ticks"]
    # Up to about 5 s: the main thread ticks every -t ms.
    for _ in range(500):
        if state["ticks"] != t0 or state["asking"]:
            break
        time.sleep(args.t / 10000.0 + 0.001)
    if state["ticks"] == t0 and not state["asking"]:
        fail("the main thread did not tick while the pre-checkpoint callback ran")
    say("HOOK pre %d" % n)


def py_fail(generation):
    if os.path.exists(args.f):
        raise RuntimeError("the fail file exists")
    return 0


def on_post(generation):
    with lock:
        if state["post"] + 1 != state["pre"]:
            fail("post-checkpoint callback %d after %d pre-checkpoint callbacks" % (state["post"] + 1, state["pre"]))
        if generation and generation <= state["last_gen"]:
            fail("committed generation %d after %d" % (generation, state["last_gen"]))
        if generation:
            state["last_gen"] = generation
        state["post"] += 1
        n = state["post"]
    say("HOOK post %d gen %d" % (n, generation))


def on_restart(generation):
    if not ckpt.is_restarted() or ckpt.restored_generation() != generation:
        fail("post-restart callback for %d: is_restarted %s, restored_generation %d" % (generation, ckpt.is_restarted(), ckpt.restored_generation()))
    with lock:
        if state["pre"] != state["post"] + 1:
            fail("restored memory has %d pre- and %d post-checkpoint calls" % (state["pre"], state["post"]))
        state["post"] = state["pre"]
        state["restarts"] += 1
        n = state["restarts"]
    say("HOOK restart %d gen %d" % (n, generation))


def main():
    global args
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=1000000)
    ap.add_argument("-t", type=int, default=100)
    ap.add_argument("-s")
    ap.add_argument("-N", type=int, default=-1)
    ap.add_argument("-f")
    args = ap.parse_args()
    say("PID %d" % os.getpid())
    if not ckpt.is_enabled():
        if ckpt.is_restarted() or ckpt.restored_generation() != 0:
            fail("without ckpt: restarted")
        if ckpt.register(ckpt.PRE_CHECKPOINT, on_pre):
            fail("without ckpt: register said it registered")
        if ckpt.checkpoint_now() is not None:
            fail("without ckpt: checkpoint_now did not return None")
        say("NOCKPT ok")
    else:
        ok = ckpt.register(ckpt.PRE_CHECKPOINT, on_pre, "on_pre")
        if args.f:
            ok = ok and ckpt.register(ckpt.PRE_CHECKPOINT, py_fail, "py_fail")
        ok = ok and ckpt.on_post_checkpoint(on_post) is on_post
        ok = ok and ckpt.register(ckpt.POST_RESTART, on_restart)
        if not ok:
            fail("registering the callbacks failed")
    say("READY")
    tick = 1
    while True:
        if tick == args.N:
            state["asking"] = True
            try:
                r = ckpt.checkpoint_now()
            except ckpt.CheckpointError as e:
                fail("checkpoint_now: %s" % e)
            state["asking"] = False
            if r is None and not ckpt.is_enabled():
                say("NOW not under ckpt")
            elif r and r[0] == "checkpointed" and r[1] > 0:
                say("NOW checkpointed %d" % r[1])
            elif r and r[0] == "restarted" and r[1] == ckpt.restored_generation():
                say("NOW restarted %d" % r[1])
            else:
                fail("checkpoint_now returned %r" % (r,))
        with lock:
            line = "TICK %d pre=%d post=%d restarts=%d" % (tick, state["pre"], state["post"], state["restarts"])
        say(line)
        state["ticks"] = tick
        if tick >= args.n or (args.s and os.path.exists(args.s) and tick >= int(open(args.s).read().strip() or 0)):
            break
        time.sleep(args.t / 1000.0)
        tick += 1
    say("DONE")


if __name__ == "__main__":
    main()
