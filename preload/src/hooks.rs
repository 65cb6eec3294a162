//! Hooks for programs that know they run under ckpt: the entry points
//! `libckpt.so` (`libckpt/ckpt.h`) finds here at run time with
//! `dlsym(RTLD_DEFAULT, "ckpt_agent_…")`, the callbacks they register, and
//! the program's own checkpoint requests.
//!
//! When callbacks run (see docs/design.md, "Hooks"):
//! * pre-checkpoint: on PREPARE, before the round stops any thread, in a
//!   hook thread of their own while every other thread runs (a callback may
//!   flush a connection another thread serves). The checkpoint thread waits
//!   for them at most the coordinator's timeout; a callback returning
//!   non-zero, or one that does not return in time, fails the round (FAILED
//!   names the callback), and the program goes on.
//! * post-checkpoint: on ROUND_DONE, after every round whose PREPARE this
//!   process answered, committed or not (generation 0 when not: what a
//!   pre-checkpoint callback closed may be opened again).
//! * post-restart: right after a restored process registered again.
//!
//! Nothing here runs inside the checkpoint signal handler except
//! [`now_done`] and [`coordinator_gone`] (atomic stores and a futex wake).
//! The rest runs with every thread of the program running: allocation and
//! `pthread_create` are allowed.

use core::ffi::{c_char, c_void};
use core::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use ckpt_wire::Pod;
use ckpt_wire::agent::NowDone;

use crate::sys;

/// Events, as `ckpt.h` numbers them.
pub const EV_PRE_CHECKPOINT: i32 = 1;
pub const EV_POST_CHECKPOINT: i32 = 2;
pub const EV_POST_RESTART: i32 = 3;
/// Most callbacks one process registers.
pub const MAX_HOOKS: usize = 64;

/// `ckpt.h`'s `ckpt_hook_fn`: `int fn(int event, unsigned long long generation, void *arg)`.
pub type HookFn = extern "C" fn(i32, u64, *mut c_void) -> i32;

#[derive(Clone, Copy)]
struct Hook {
    event: i32,
    func: Option<HookFn>,
    arg: usize,
    name: [u8; 64],
}

const NO_HOOK: Hook = Hook { event: 0, func: None, arg: 0, name: [0; 64] };

/// A lock of one futex word (0 free, 1 held, 2 held with waiters). Its
/// state is plain memory: it survives a checkpoint and a restart as it was,
/// and a forked child resets it.
pub struct Lock(AtomicU32);

impl Lock {
    pub const fn new() -> Lock {
        Lock(AtomicU32::new(0))
    }

    pub fn lock(&self) {
        if self.0.compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed).is_ok() {
            return;
        }
        while self.0.swap(2, Ordering::Acquire) != 0 {
            sys::futex_wait(&self.0, 2, 0);
        }
    }

    pub fn unlock(&self) {
        if self.0.swap(0, Ordering::Release) == 2 {
            sys::futex_wake_all(&self.0);
        }
    }

    pub fn reset(&self) {
        self.0.store(0, Ordering::Release);
    }
}

/// Held around every frame the agent sends on its connection: by the
/// checkpoint thread for a whole round (from before it stops the first
/// thread until the last is released, so no thread is ever parked holding
/// it), and by a program thread for its one CHECKPOINT_NOW frame.
pub static SEND_LOCK: Lock = Lock::new();

struct Registry(core::cell::UnsafeCell<[Hook; MAX_HOOKS]>);
// SAFETY: every access holds REG_LOCK.
unsafe impl Sync for Registry {}
static HOOKS: Registry = Registry(core::cell::UnsafeCell::new([NO_HOOK; MAX_HOOKS]));
static NHOOKS: AtomicUsize = AtomicUsize::new(0);
static REG_LOCK: Lock = Lock::new();

/// The hook thread of the last run: state, and what failed.
const IDLE: u32 = 0;
const RUNNING: u32 = 1;
const OK: u32 = 2;
const FAILED: u32 = 3;
static RUN_STATE: AtomicU32 = AtomicU32::new(IDLE);
static RUN_EVENT: AtomicI32 = AtomicI32::new(0);
static RUN_GEN: AtomicU64 = AtomicU64::new(0);
/// The pthread of the run to join (0: none, or detached).
static RUN_THREAD: AtomicU64 = AtomicU64::new(0);
/// Index in HOOKS of the callback running now (or that failed), and its code.
static RUN_INDEX: AtomicUsize = AtomicUsize::new(0);
static RUN_CODE: AtomicI32 = AtomicI32::new(0);
/// TID of the hook thread while it runs (a callback may not wait for a
/// checkpoint: that checkpoint waits for it).
static HOOK_TID: AtomicI32 = AtomicI32::new(0);
/// The callbacks of an event to run once the running ones end (a
/// post-checkpoint after a hung pre-checkpoint), and its generation;
/// RUN_LOCK orders them with the end of a run.
static PENDING_EVENT: AtomicI32 = AtomicI32::new(0);
static PENDING_GEN: AtomicU64 = AtomicU64::new(0);
static RUN_LOCK: Lock = Lock::new();
/// The pre-checkpoint step of the current round ran (or had nothing to
/// run): its ROUND_DONE runs the post-checkpoint callbacks. Not when the
/// step was refused because an earlier callback still ran.
static ARMED: AtomicBool = AtomicBool::new(false);

/// The program's checkpoint request (`ckpt_checkpoint_now`).
const NOW_IDLE: u32 = 0;
const NOW_PENDING: u32 = 1;
const NOW_COMMITTED: u32 = 2;
const NOW_RESTARTED: u32 = 3;
const NOW_ERROR: u32 = 4;
static NOW_STATE: AtomicU32 = AtomicU32::new(NOW_IDLE);
static NOW_GEN: AtomicU64 = AtomicU64::new(0);
struct NowText(core::cell::UnsafeCell<([u8; 240], usize)>);
// SAFETY: written only while NOW_STATE is NOW_PENDING by the checkpoint
// thread, read by the requester once it left NOW_PENDING.
unsafe impl Sync for NowText {}
static NOW_TEXT: NowText = NowText(core::cell::UnsafeCell::new(([0; 240], 0)));
/// One request at a time per process.
static NOW_LOCK: Lock = Lock::new();

/// Whether this process is a member of a computation (set once it registered).
pub static MEMBER: AtomicBool = AtomicBool::new(false);

/// Return codes of the entry points (`ckpt.h`).
const CKPT_NOT_UNDER_CKPT: i32 = -1;
const CKPT_ERROR: i32 = -2;
const CKPT_CHECKPOINTED: i32 = 1;
const CKPT_RESTARTED: i32 = 2;

fn event_name(event: i32) -> &'static str {
    match event {
        EV_PRE_CHECKPOINT => "pre-checkpoint",
        EV_POST_CHECKPOINT => "post-checkpoint",
        EV_POST_RESTART => "post-restart",
        _ => "unknown",
    }
}

fn hook_name(h: &Hook) -> String {
    let end = h.name.iter().position(|&b| b == 0).unwrap_or(h.name.len());
    String::from_utf8_lossy(&h.name[..end]).into_owned()
}

/// A forked child has no hook thread and no request of its own: what the
/// parent's threads held is reset (the callbacks stay registered).
pub fn after_fork_in_child() {
    SEND_LOCK.reset();
    REG_LOCK.reset();
    NOW_LOCK.reset();
    RUN_LOCK.reset();
    PENDING_EVENT.store(0, Ordering::Release);
    ARMED.store(false, Ordering::Release);
    NOW_STATE.store(NOW_IDLE, Ordering::Release);
    RUN_STATE.store(IDLE, Ordering::Release);
    RUN_THREAD.store(0, Ordering::Release);
    HOOK_TID.store(0, Ordering::Release);
    MEMBER.store(false, Ordering::Release);
}

// ------------------------------------------------------------ running them

extern "C" fn hook_main(_: *mut c_void) -> *mut c_void {
    HOOK_TID.store(sys::gettid(), Ordering::Release);
    let mut event = RUN_EVENT.load(Ordering::Acquire);
    let mut generation = RUN_GEN.load(Ordering::Acquire);
    loop {
        let state = run_event(event, generation);
        // What came to run while these ran is run now, in this thread.
        RUN_LOCK.lock();
        let next = PENDING_EVENT.swap(0, Ordering::AcqRel);
        if next == 0 {
            HOOK_TID.store(0, Ordering::Release);
            RUN_STATE.store(state, Ordering::Release);
            RUN_LOCK.unlock();
            sys::futex_wake_all(&RUN_STATE);
            return core::ptr::null_mut();
        }
        RUN_LOCK.unlock();
        event = next;
        generation = PENDING_GEN.load(Ordering::Acquire);
        RUN_EVENT.store(event, Ordering::Release);
    }
}

/// Runs the callbacks of `event` in order; FAILED at the first
/// pre-checkpoint one that returns non-zero.
fn run_event(event: i32, generation: u64) -> u32 {
    // A copy: a callback may register more callbacks.
    REG_LOCK.lock();
    let n = NHOOKS.load(Ordering::Acquire);
    // SAFETY: REG_LOCK is held.
    let all: [Hook; MAX_HOOKS] = unsafe { *HOOKS.0.get() };
    REG_LOCK.unlock();
    let mut state = OK;
    for (i, h) in all.iter().enumerate().take(n) {
        if h.event != event {
            continue;
        }
        let Some(f) = h.func else { continue };
        RUN_INDEX.store(i, Ordering::Release);
        let rc = f(event, generation, h.arg as *mut c_void);
        if rc != 0 && event == EV_PRE_CHECKPOINT {
            RUN_CODE.store(rc, Ordering::Release);
            state = FAILED;
            break;
        }
        if rc != 0 {
            agent_warn(&format!("ckpt: the {} callback {} returned {rc}\n", event_name(event), hook_name(h)));
        }
    }
    state
}

fn agent_warn(s: &str) {
    crate::agentfds::warn(s.as_bytes());
}

fn has_hooks(event: i32) -> bool {
    REG_LOCK.lock();
    let n = NHOOKS.load(Ordering::Acquire);
    // SAFETY: REG_LOCK is held.
    let any = unsafe { (&*HOOKS.0.get())[..n].iter().any(|h| h.event == event) };
    REG_LOCK.unlock();
    any
}

/// Waits for the run in progress (if any) up to `until` (CLOCK_MONOTONIC
/// ns); joins its thread once it ended. Err names the callback still running.
fn wait_run(until: u64) -> Result<(), String> {
    loop {
        let s = RUN_STATE.load(Ordering::Acquire);
        if s != RUNNING {
            let th = RUN_THREAD.swap(0, Ordering::AcqRel);
            if th != 0 {
                // SAFETY: joining the hook thread we created and never detached.
                unsafe { libc::pthread_join(th as libc::pthread_t, core::ptr::null_mut()) };
            }
            return Ok(());
        }
        let now = sys::now_ns();
        if now >= until {
            let th = RUN_THREAD.swap(0, Ordering::AcqRel);
            if th != 0 {
                // SAFETY: our own joinable thread; it frees itself once the
                // callback returns (if ever).
                unsafe { libc::pthread_detach(th as libc::pthread_t) };
            }
            let i = RUN_INDEX.load(Ordering::Acquire);
            REG_LOCK.lock();
            // SAFETY: REG_LOCK is held; i < MAX_HOOKS.
            let h = unsafe { (*HOOKS.0.get())[i.min(MAX_HOOKS - 1)] };
            REG_LOCK.unlock();
            return Err(format!("its {} callback {} is still running", event_name(RUN_EVENT.load(Ordering::Acquire)), hook_name(&h)));
        }
        sys::futex_wait(&RUN_STATE, RUNNING, (until - now).min(100_000_000));
    }
}

/// Starts the callbacks of `event` in a hook thread (after the previous
/// run, given at most `timeout_ns` to end).
fn start(event: i32, generation: u64, timeout_ns: u64) -> Result<bool, String> {
    if !has_hooks(event) {
        return Ok(false);
    }
    wait_run(sys::now_ns() + timeout_ns).map_err(|e| format!("{e} since an earlier round (it did not return within its timeout)"))?;
    RUN_EVENT.store(event, Ordering::Release);
    RUN_GEN.store(generation, Ordering::Release);
    RUN_CODE.store(0, Ordering::Release);
    RUN_STATE.store(RUNNING, Ordering::Release);
    // SAFETY: pthread_create with a valid start routine; default attrs
    // but a fixed stack size (callbacks may use a good deal of stack).
    let r = unsafe {
        let mut attr: libc::pthread_attr_t = core::mem::zeroed();
        libc::pthread_attr_init(&mut attr);
        libc::pthread_attr_setstacksize(&mut attr, 8 << 20);
        let mut th: libc::pthread_t = 0;
        let r = libc::pthread_create(&mut th, &attr, hook_main, core::ptr::null_mut());
        libc::pthread_attr_destroy(&mut attr);
        if r == 0 {
            RUN_THREAD.store(th as u64, Ordering::Release);
        }
        r
    };
    if r != 0 {
        RUN_STATE.store(IDLE, Ordering::Release);
        return Err(format!("it cannot start a thread for its {} callbacks (error {r})", event_name(event)));
    }
    Ok(true)
}

/// PREPARE: the pre-checkpoint callbacks, all within `timeout_ms`. Err is
/// the text of the FAILED answer (it names the callback).
pub fn prepare(timeout_ms: u64) -> Result<(), String> {
    let timeout_ns = timeout_ms.saturating_mul(1_000_000);
    let t0 = sys::now_ns();
    ARMED.store(false, Ordering::Release);
    let started = start(EV_PRE_CHECKPOINT, 0, timeout_ns)?;
    ARMED.store(true, Ordering::Release);
    if !started {
        return Ok(());
    }
    let secs = timeout_ms as f64 / 1000.0;
    wait_run(t0.saturating_add(timeout_ns)).map_err(|e| format!("{e} after {secs} s (the hook timeout, `--hook-timeout`)"))?;
    if RUN_STATE.load(Ordering::Acquire) == FAILED {
        let i = RUN_INDEX.load(Ordering::Acquire);
        REG_LOCK.lock();
        // SAFETY: REG_LOCK is held.
        let h = unsafe { (*HOOKS.0.get())[i.min(MAX_HOOKS - 1)] };
        REG_LOCK.unlock();
        return Err(format!("its pre-checkpoint callback {} returned {}", hook_name(&h), RUN_CODE.load(Ordering::Acquire)));
    }
    Ok(())
}

/// ROUND_DONE: the post-checkpoint callbacks, if this round's
/// pre-checkpoint step ran.
pub fn round_done(generation: u64) {
    if ARMED.swap(false, Ordering::AcqRel) {
        post(EV_POST_CHECKPOINT, generation);
    }
}

/// The callbacks of `event`, not waited for (the next PREPARE waits for
/// them); after the running ones if some still run (a hung callback).
fn post(event: i32, generation: u64) {
    RUN_LOCK.lock();
    if RUN_STATE.load(Ordering::Acquire) == RUNNING {
        PENDING_GEN.store(generation, Ordering::Release);
        PENDING_EVENT.store(event, Ordering::Release);
        RUN_LOCK.unlock();
        return;
    }
    RUN_LOCK.unlock();
    // Nothing runs: start() joins the last run at once.
    if let Err(e) = start(event, generation, 0) {
        agent_warn(&format!("ckpt: no {} callbacks this time: {e}\n", event_name(event)));
    }
}

// --------------------------------------------------- the program's request

/// NOW_DONE from the coordinator. Async-signal-safe (it may arrive while
/// the checkpoint thread is in its handler).
pub fn now_done(payload: &[u8]) {
    if NOW_STATE.load(Ordering::Acquire) != NOW_PENDING {
        return;
    }
    let Some(d) = NowDone::read_from(payload) else { return };
    // SAFETY: the requester reads the text only after NOW_STATE changes.
    unsafe {
        let t = &mut *NOW_TEXT.0.get();
        let m = d.message();
        t.0[..m.len()].copy_from_slice(m);
        t.1 = m.len();
    }
    NOW_GEN.store(d.generation, Ordering::Release);
    NOW_STATE.store(if d.ok == 1 { NOW_COMMITTED } else { NOW_ERROR }, Ordering::Release);
    sys::futex_wake_all(&NOW_STATE);
}

fn now_fail(text: &[u8]) {
    if NOW_STATE.load(Ordering::Acquire) != NOW_PENDING {
        return;
    }
    // SAFETY: as in now_done.
    unsafe {
        let t = &mut *NOW_TEXT.0.get();
        let n = text.len().min(t.0.len());
        t.0[..n].copy_from_slice(&text[..n]);
        t.1 = n;
    }
    NOW_STATE.store(NOW_ERROR, Ordering::Release);
    sys::futex_wake_all(&NOW_STATE);
}

/// The agent's connection is gone: a request waiting for its answer fails.
/// Async-signal-safe.
pub fn coordinator_gone() {
    MEMBER.store(false, Ordering::Release);
    now_fail(b"the coordinator went away (this process runs without checkpoints from now)");
}

/// A restored process registered again as a restart of `generation`: a
/// request made before the checkpoint returns "restarted", then the
/// post-restart callbacks run.
pub fn restarted(generation: u64) {
    if NOW_STATE.load(Ordering::Acquire) == NOW_PENDING {
        NOW_GEN.store(generation, Ordering::Release);
        NOW_STATE.store(NOW_RESTARTED, Ordering::Release);
        sys::futex_wake_all(&NOW_STATE);
    }
    // The run of the checkpoint's time (if any) was joined before the
    // checkpoint, or is a callback that never returned: nothing to join.
    post(EV_POST_RESTART, generation);
}

// ------------------------------------------------------------ entry points

/// 1 if this process is under ckpt (registered with a coordinator), 0 if not.
#[unsafe(no_mangle)]
pub extern "C" fn ckpt_agent_is_enabled() -> i32 {
    MEMBER.load(Ordering::Acquire) as i32
}

/// The generation this process was restored from, 0 if it was not.
#[unsafe(no_mangle)]
pub extern "C" fn ckpt_agent_restored_generation() -> u64 {
    crate::agent::CKPT_RESTART_WORD.word.load(Ordering::Acquire)
}

/// Registers `func` for `event` (`EV_*`); `name` (may be NULL) names it in
/// errors. 0, or -1 not under ckpt, -2 bad event or table full.
///
/// # Safety
/// `name` is NULL or a NUL-terminated string; `func` is a valid function.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ckpt_agent_register_hook(event: i32, name: *const c_char, func: Option<HookFn>, arg: *mut c_void) -> i32 {
    if !(EV_PRE_CHECKPOINT..=EV_POST_RESTART).contains(&event) || func.is_none() {
        return CKPT_ERROR;
    }
    let mut h = Hook { event, func, arg: arg as usize, name: [0; 64] };
    let label = if name.is_null() {
        // SAFETY: dladdr only reads the loader's tables.
        let sym = unsafe {
            let mut info: libc::Dl_info = core::mem::zeroed();
            let at = func.map_or(core::ptr::null(), |f| f as *const c_void);
            // Only the function's own symbol: dladdr gives the nearest one
            // below a function that has none (a static one).
            if libc::dladdr(at, &mut info) != 0 && !info.dli_sname.is_null() && core::ptr::eq(info.dli_saddr as *const c_void, at) {
                Some(core::ffi::CStr::from_ptr(info.dli_sname).to_string_lossy().into_owned())
            } else {
                None
            }
        };
        sym.unwrap_or_else(|| format!("at {:#x}", func.map_or(0, |f| f as usize)))
    } else {
        // SAFETY: the caller passes a NUL-terminated string.
        unsafe { core::ffi::CStr::from_ptr(name) }.to_string_lossy().into_owned()
    };
    let label = format!("\"{label}\"");
    let n = label.len().min(h.name.len() - 1);
    h.name[..n].copy_from_slice(&label.as_bytes()[..n]);
    REG_LOCK.lock();
    let i = NHOOKS.load(Ordering::Acquire);
    let r = if i < MAX_HOOKS {
        // SAFETY: REG_LOCK is held.
        unsafe { (*HOOKS.0.get())[i] = h };
        NHOOKS.store(i + 1, Ordering::Release);
        0
    } else {
        CKPT_ERROR
    };
    REG_LOCK.unlock();
    r
}

/// Asks for a checkpoint of the whole computation and waits for it: 1
/// once committed (`*generation` set), 2 when this process is a restart of
/// that checkpoint (`*generation` the one restored), -1 not under ckpt, -2
/// error (`err` gets the reason, NUL-terminated, cut to `errlen`).
///
/// # Safety
/// `generation` is NULL or valid for a write; `err` is NULL or valid for
/// `errlen` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ckpt_agent_checkpoint_now(generation: *mut u64, err: *mut c_char, errlen: usize) -> i32 {
    let put_err = |msg: &[u8]| {
        if !err.is_null() && errlen > 0 {
            let n = msg.len().min(errlen - 1);
            // SAFETY: the caller gave errlen writable bytes at err.
            unsafe {
                core::ptr::copy_nonoverlapping(msg.as_ptr(), err as *mut u8, n);
                *err.add(n) = 0;
            }
        }
    };
    if !MEMBER.load(Ordering::Acquire) {
        put_err(b"this process is not under ckpt");
        return CKPT_NOT_UNDER_CKPT;
    }
    if HOOK_TID.load(Ordering::Acquire) == sys::gettid() {
        put_err(b"ckpt_checkpoint_now cannot be called from a ckpt callback (the checkpoint would wait for the callback)");
        return CKPT_ERROR;
    }
    NOW_LOCK.lock();
    NOW_STATE.store(NOW_PENDING, Ordering::Release);
    SEND_LOCK.lock();
    let sent = crate::agent::send_now_request();
    SEND_LOCK.unlock();
    if !sent {
        now_fail(b"the request could not be sent to the coordinator");
    }
    while NOW_STATE.load(Ordering::Acquire) == NOW_PENDING {
        sys::futex_wait(&NOW_STATE, NOW_PENDING, 1_000_000_000);
    }
    let state = NOW_STATE.swap(NOW_IDLE, Ordering::AcqRel);
    let g = NOW_GEN.load(Ordering::Acquire);
    let rc = match state {
        NOW_COMMITTED => CKPT_CHECKPOINTED,
        NOW_RESTARTED => CKPT_RESTARTED,
        _ => {
            // SAFETY: the checkpoint thread wrote the text before the state.
            let t = unsafe { &*NOW_TEXT.0.get() };
            put_err(&t.0[..t.1]);
            CKPT_ERROR
        }
    };
    if rc > 0 && !generation.is_null() {
        // SAFETY: the caller gave a writable u64.
        unsafe { *generation = g };
    }
    NOW_LOCK.unlock();
    rc
}
