"""ckpt: Python bindings of ckpt's C API (libckpt/ckpt.h, libckpt.so).

For programs that know they may be checkpointed by ckpt: whether they run
under ckpt and were restarted, a checkpoint asked for from inside, and
callbacks around checkpoints::

    import ckpt

    @ckpt.on_pre_checkpoint
    def close_db(generation):
        db.close()            # return a non-zero int (or raise) to refuse

    @ckpt.on_post_checkpoint
    def reopen_db(generation):  # generation 0: that checkpoint failed
        db.connect()

    @ckpt.on_post_restart
    def reconnect(generation):
        db.connect()

    state, generation = ckpt.checkpoint_now()  # ("checkpointed" | "restarted", n)

Without ckpt every call does nothing: is_enabled() is False, the
decorators register nothing, checkpoint_now() returns None. Callbacks run
in a thread of ckpt's while the program's threads run (the GIL is taken
for them); see ckpt.h for when each runs. An exception in a callback is
printed and counts as a failure (a pre-checkpoint one refuses the
checkpoint).

libckpt.so is looked for in $CKPT_LIBCKPT, then where scripts/install.sh
puts it (PREFIX/lib/libckpt.so, this file being in
PREFIX/lib/ckpt/python/), then by the dynamic loader's search path.
"""

import ctypes
import os
import sys
import traceback

__all__ = [
    "PRE_CHECKPOINT", "POST_CHECKPOINT", "POST_RESTART", "CheckpointError",
    "is_enabled", "is_restarted", "restored_generation", "register",
    "on_pre_checkpoint", "on_post_checkpoint", "on_post_restart", "checkpoint_now",
]

PRE_CHECKPOINT = 1
POST_CHECKPOINT = 2
POST_RESTART = 3

_CHECKPOINTED = 1
_RESTARTED = 2
_NOT_UNDER_CKPT = -1


class CheckpointError(Exception):
    """A checkpoint asked for with checkpoint_now() failed (the message says why)."""


def _load():
    here = os.path.dirname(os.path.abspath(__file__))
    tried = []
    candidates = []
    if os.environ.get("CKPT_LIBCKPT"):
        candidates.append(os.environ["CKPT_LIBCKPT"])
    candidates += [os.path.normpath(os.path.join(here, "..", "..", "libckpt.so")), "libckpt.so"]
    for path in candidates:
        try:
            return ctypes.CDLL(path)
        except OSError as e:
            tried.append(f"{path}: {e}")
    raise ImportError("ckpt: cannot load libckpt.so (" + "; ".join(tried) + "); install ckpt with "
                      "`scripts/install.sh PREFIX`, or set CKPT_LIBCKPT to the library's path")


_lib = _load()
_HOOK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_ulonglong, ctypes.c_void_p)
_lib.ckpt_is_enabled.restype = ctypes.c_int
_lib.ckpt_is_enabled.argtypes = []
_lib.ckpt_is_restarted.restype = ctypes.c_int
_lib.ckpt_is_restarted.argtypes = []
_lib.ckpt_restored_generation.restype = ctypes.c_ulonglong
_lib.ckpt_restored_generation.argtypes = []
_lib.ckpt_register_hook.restype = ctypes.c_int
_lib.ckpt_register_hook.argtypes = [ctypes.c_int, ctypes.c_char_p, _HOOK, ctypes.c_void_p]
_lib.ckpt_checkpoint_now.restype = ctypes.c_int
_lib.ckpt_checkpoint_now.argtypes = [ctypes.POINTER(ctypes.c_ulonglong), ctypes.c_char_p, ctypes.c_ulong]

# The C trampolines must live as long as the process: ckpt keeps pointers to them.
_keep = []


def is_enabled():
    """True if this process runs under ckpt."""
    return _lib.ckpt_is_enabled() == 1


def is_restarted():
    """True if this process was restored by `ckpt restart`."""
    return _lib.ckpt_is_restarted() == 1


def restored_generation():
    """The generation this process was restored from, 0 if it was not."""
    return int(_lib.ckpt_restored_generation())


def register(event, fn, name=None):
    """Calls fn(generation) at event (PRE_CHECKPOINT, POST_CHECKPOINT,
    POST_RESTART). Returns True if registered, False without ckpt. A
    pre-checkpoint fn that returns a non-zero int or raises refuses the
    checkpoint; name (default: fn's qualified name) names it in errors."""
    if event not in (PRE_CHECKPOINT, POST_CHECKPOINT, POST_RESTART):
        raise ValueError(f"ckpt: unknown event {event!r}")
    label = name or getattr(fn, "__qualname__", repr(fn))

    def trampoline(_event, generation, _arg):
        try:
            r = fn(int(generation))
            return 0 if r is None else int(r)
        except BaseException:
            sys.stderr.write(f"ckpt: the callback {label} raised:\n{traceback.format_exc()}")
            return 1

    cb = _HOOK(trampoline)
    rc = _lib.ckpt_register_hook(event, label.encode("utf-8", "replace")[:60], cb, None)
    if rc == _NOT_UNDER_CKPT:
        return False
    if rc != 0:
        raise ValueError(f"ckpt: cannot register {label} (more than 64 callbacks?)")
    _keep.append(cb)
    return True


def on_pre_checkpoint(fn):
    """Decorator: register(PRE_CHECKPOINT, fn)."""
    register(PRE_CHECKPOINT, fn)
    return fn


def on_post_checkpoint(fn):
    """Decorator: register(POST_CHECKPOINT, fn)."""
    register(POST_CHECKPOINT, fn)
    return fn


def on_post_restart(fn):
    """Decorator: register(POST_RESTART, fn)."""
    register(POST_RESTART, fn)
    return fn


def checkpoint_now():
    """Checkpoints the whole computation and returns once it is committed:
    ("checkpointed", generation), or ("restarted", generation) in a process
    restarted from that checkpoint. None without ckpt. Raises
    CheckpointError if the checkpoint failed. Not from a callback."""
    gen = ctypes.c_ulonglong(0)
    err = ctypes.create_string_buffer(512)
    rc = _lib.ckpt_checkpoint_now(ctypes.byref(gen), err, len(err))
    if rc == _CHECKPOINTED:
        return ("checkpointed", int(gen.value))
    if rc == _RESTARTED:
        return ("restarted", int(gen.value))
    if rc == _NOT_UNDER_CKPT:
        return None
    raise CheckpointError(err.value.decode("utf-8", "replace"))
