//! Stopping every thread of the process in the checkpoint signal handler.
//!
//! Each thread, on [`CKPT_SIGNAL`], saves what the kernel's signal frame does
//! not hold ([`ThreadState`]: TLS base, clear-child-tid, robust list, rseq)
//! into a static slot, counts itself in [`PARKED`] and waits on a futex until
//! [`RELEASE`] moves. The signal frame on the thread's own stack keeps all
//! its registers, FPU state, signal mask and alternate stack: after a restart
//! the restorer resumes the thread with `rt_sigreturn` on that very frame, so
//! the thread continues exactly where the signal interrupted it.
//!
//! The handler is async-signal-safe: raw syscalls, atomics and static
//! storage only; it preserves `errno`.

use core::cell::UnsafeCell;
use core::ffi::c_void;
use core::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicU32, Ordering};

use ckpt_wire::agent::{CKPT_SIGNAL, MAX_THREADS, ThreadState};

use crate::sys;

/// True while a checkpoint is stopping or holding the threads.
pub static SUSPENDING: AtomicBool = AtomicBool::new(false);
/// Bumped to let parked threads go.
pub static RELEASE: AtomicU32 = AtomicU32::new(0);
/// Number of threads currently parked in the handler.
pub static PARKED: AtomicU32 = AtomicU32::new(0);
/// Next free slot in [`SLOTS`].
pub static NEXT_SLOT: AtomicU32 = AtomicU32::new(0);
/// TID of the agent's checkpoint thread.
pub static CKPT_TID: AtomicI32 = AtomicI32::new(0);
/// glibc's `__rseq_offset` and `__rseq_size` (size 0: no rseq).
pub static RSEQ_OFFSET: AtomicI64 = AtomicI64::new(0);
pub static RSEQ_SIZE: AtomicU32 = AtomicU32::new(0);
/// x86-64 rseq signature used by glibc.
pub const RSEQ_SIG: u32 = 0x5305_3053;

/// Saved states of the parked threads, `NEXT_SLOT` of them valid.
pub struct Slots(UnsafeCell<[ThreadState; MAX_THREADS]>);
// SAFETY: each slot is written by exactly one thread (the index comes from
// a fetch_add) before that thread increments PARKED with Release ordering;
// the checkpoint thread reads them only after observing PARKED with Acquire.
unsafe impl Sync for Slots {}

pub static SLOTS: Slots = Slots(UnsafeCell::new(
    [ThreadState {
        tid: 0,
        is_ckpt_thread: 0,
        ucontext: 0,
        fs_base: 0,
        clear_child_tid: 0,
        robust_list: 0,
        robust_len: 0,
        rseq_addr: 0,
        rseq_len: 0,
        rseq_sig: 0,
        securebits: 0,
        _pad: 0,
    }; MAX_THREADS],
));

impl Slots {
    /// The first `n` slots.
    ///
    /// # Safety
    /// Only while every thread that took one of these slots is parked (see
    /// the `Sync` justification).
    pub unsafe fn filled(&self, n: usize) -> &[ThreadState] {
        // SAFETY: per the function contract no slot below `n` is being written.
        unsafe { &(&*self.0.get())[..n.min(MAX_THREADS)] }
    }
}

/// The calling thread's state, given the handler's ucontext pointer.
pub fn capture_self(ucontext: *mut c_void, is_ckpt_thread: bool) -> ThreadState {
    let (robust_list, robust_len) = sys::robust_list();
    let fs_base = sys::fs_base();
    let rseq_size = RSEQ_SIZE.load(Ordering::Relaxed);
    let (rseq_addr, rseq_len) = if rseq_size == 0 {
        (0, 0)
    } else {
        // glibc registers `struct rseq_area` (32 bytes) even when it
        // advertises a smaller feature size.
        let area = (fs_base.wrapping_add(RSEQ_OFFSET.load(Ordering::Relaxed) as u64), rseq_size.max(32));
        // A thread caught between its clone and glibc's registration has
        // none: none is restored (glibc registers it when it goes on).
        if sys::rseq_registered(area.0, area.1, RSEQ_SIG) { area } else { (0, 0) }
    };
    ThreadState {
        tid: sys::gettid(),
        is_ckpt_thread: is_ckpt_thread as u32,
        ucontext: ucontext as u64,
        fs_base,
        clear_child_tid: sys::tid_address(),
        robust_list,
        robust_len,
        rseq_addr,
        rseq_len,
        rseq_sig: if rseq_size == 0 { 0 } else { RSEQ_SIG },
        // SAFETY: PR_GET_SECUREBITS takes no pointer; it answers for the
        // calling thread, which is why each thread asks in its handler.
        securebits: unsafe { libc::syscall(libc::SYS_prctl, libc::PR_GET_SECUREBITS, 0, 0, 0, 0) }.max(0) as u32,
        _pad: 0,
    }
}

// ------------------------------------------------- per-thread credentials
//
// Capabilities, keepcaps, securebits, the bounding and ambient sets and
// no_new_privs belong to a thread, not a process. glibc makes `setuid` and
// its kin act on every thread it knows (the checkpoint thread too) and
// aborts the process when one thread's result differs from another's. A
// program that calls `prctl(PR_SET_KEEPCAPS)` and `capset` on its own
// thread between them (`setpriv --reuid=N --regid=N`: setresuid, capset to
// keep CAP_SETGID, setresgid) would leave the checkpoint thread without
// CAP_SETGID and abort with SIGABRT. So the interposed `capset` and the
// per-thread `prctl`s are mirrored onto the checkpoint thread, which runs
// the same syscall in its signal handler while the caller waits.

/// Held by the thread whose call is being mirrored.
static MIRROR_LOCK: AtomicU32 = AtomicU32::new(0);
/// A mirror request is waiting for the checkpoint thread.
static MIRROR_PENDING: AtomicBool = AtomicBool::new(false);
/// Set by the checkpoint thread once it ran the request.
static MIRROR_DONE: AtomicU32 = AtomicU32::new(0);
static MIRROR_CALL: [core::sync::atomic::AtomicU64; 6] = [const { core::sync::atomic::AtomicU64::new(0) }; 6];

/// Runs syscall `nr` with `args` on the checkpoint thread too (the caller
/// already ran it on its own thread, successfully). Async-signal-safe.
pub fn mirror_on_ckpt_thread(nr: i64, args: [u64; 5]) {
    let ckpt = CKPT_TID.load(Ordering::Acquire);
    if ckpt <= 0 || ckpt == sys::gettid() {
        return;
    }
    while MIRROR_LOCK.compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire).is_err() {
        sys::futex_wait(&MIRROR_LOCK, 1, 1_000_000);
    }
    MIRROR_CALL[0].store(nr as u64, Ordering::Relaxed);
    for (slot, a) in MIRROR_CALL[1..].iter().zip(args) {
        slot.store(a, Ordering::Relaxed);
    }
    MIRROR_DONE.store(0, Ordering::Release);
    MIRROR_PENDING.store(true, Ordering::Release);
    if sys::tgkill(ckpt, CKPT_SIGNAL) == 0 {
        let deadline = sys::now_ns() + 5_000_000_000;
        while MIRROR_DONE.load(Ordering::Acquire) == 0 && sys::now_ns() < deadline {
            sys::futex_wait(&MIRROR_DONE, 0, 10_000_000);
        }
    }
    MIRROR_PENDING.store(false, Ordering::Release);
    MIRROR_LOCK.store(0, Ordering::Release);
    sys::futex_wake_all(&MIRROR_LOCK);
}

/// After `fork`, in the child: no mirror is under way there.
pub fn reset_mirror() {
    MIRROR_PENDING.store(false, Ordering::Release);
    MIRROR_LOCK.store(0, Ordering::Release);
}

fn run_mirror() {
    let c: [u64; 6] = core::array::from_fn(|i| MIRROR_CALL[i].load(Ordering::Relaxed));
    // SAFETY: the syscall and arguments another thread of this process
    // ran itself a moment ago (capset, prctl); any pointer in them is to
    // that thread's memory, which stays valid while it waits for us.
    unsafe { libc::syscall(c[0] as libc::c_long, c[1], c[2], c[3], c[4], c[5]) };
    MIRROR_DONE.store(1, Ordering::Release);
    sys::futex_wake_all(&MIRROR_DONE);
}

/// The checkpoint signal handler.
extern "C" fn handler(_sig: i32, info: *mut libc::siginfo_t, ucontext: *mut c_void) {
    let saved_errno = sys::errno();
    // SAFETY: our handler's own arguments.
    unsafe { crate::stopper::fix_frame_mask(info, ucontext) };
    if sys::gettid() == CKPT_TID.load(Ordering::Relaxed) && MIRROR_PENDING.swap(false, Ordering::AcqRel) {
        // One signal, one deed: a checkpoint's own signal is queued apart
        // (real-time signals queue) and handled next.
        run_mirror();
    } else if SUSPENDING.load(Ordering::Acquire) {
        if sys::gettid() == CKPT_TID.load(Ordering::Relaxed) {
            crate::agent::checkpoint_in_handler(capture_self(ucontext, true));
        } else {
            park(ucontext);
        }
    }
    sys::set_errno(saved_errno);
}

fn park(ucontext: *mut c_void) {
    let state = capture_self(ucontext, false);
    let idx = NEXT_SLOT.fetch_add(1, Ordering::AcqRel) as usize;
    if idx < MAX_THREADS {
        // SAFETY: slot `idx` is ours alone (fetch_add); readers wait for
        // PARKED, which we bump after this write with Release ordering.
        unsafe { (*SLOTS.0.get())[idx] = state };
    }
    let seq = RELEASE.load(Ordering::Acquire);
    PARKED.fetch_add(1, Ordering::AcqRel);
    sys::futex_wake_all(&PARKED);
    while RELEASE.load(Ordering::Acquire) == seq {
        sys::futex_wait(&RELEASE, seq, 0);
    }
    PARKED.fetch_sub(1, Ordering::AcqRel);
    sys::futex_wake_all(&PARKED);
}

/// Installs the handler. All signals are blocked while it runs, so no
/// application handler runs on top of a parked thread.
pub fn install() -> bool {
    // SAFETY: building a sigaction from zeroed memory and libc helpers.
    unsafe {
        let mut act: libc::sigaction = core::mem::zeroed();
        act.sa_sigaction = handler as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        libc::sigfillset(&mut act.sa_mask);
        crate::interpose::real_sigaction(CKPT_SIGNAL, &act, core::ptr::null_mut()) == 0
    }
}
