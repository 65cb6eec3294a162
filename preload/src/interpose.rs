//! The libc calls the agent must see: the application may neither handle nor
//! block the checkpoint signal ([`ckpt_wire::agent::CKPT_SIGNAL`]).
//!
//! Each wrapper forwards to the next definition of the symbol
//! (`dlsym(RTLD_NEXT, ..)`) after taking the checkpoint signal out of any
//! mask the application passes. The real functions are resolved by the
//! library constructor ([`resolve_all`]); a wrapper called before that (from
//! another library's constructor) resolves lazily. The wrappers are as
//! async-signal-safe as the functions they wrap once resolved.

use core::ffi::{CStr, c_int};
use core::sync::atomic::{AtomicUsize, Ordering};

use ckpt_wire::agent::CKPT_SIGNAL;

static REAL_SIGACTION: AtomicUsize = AtomicUsize::new(0);
static REAL_SIGNAL: AtomicUsize = AtomicUsize::new(0);
static REAL_SIGPROCMASK: AtomicUsize = AtomicUsize::new(0);
static REAL_PTHREAD_SIGMASK: AtomicUsize = AtomicUsize::new(0);

type SigactionFn = unsafe extern "C" fn(c_int, *const libc::sigaction, *mut libc::sigaction) -> c_int;
type SignalFn = unsafe extern "C" fn(c_int, libc::sighandler_t) -> libc::sighandler_t;
type MaskFn = unsafe extern "C" fn(c_int, *const libc::sigset_t, *mut libc::sigset_t) -> c_int;

fn resolve(slot: &AtomicUsize, name: &CStr) -> usize {
    let cur = slot.load(Ordering::Acquire);
    if cur != 0 {
        return cur;
    }
    // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name.
    let p = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) } as usize;
    if p == 0 {
        // Without the real function the process cannot go on sanely.
        // SAFETY: abort is always safe to call.
        unsafe { libc::abort() };
    }
    slot.store(p, Ordering::Release);
    p
}

/// Resolves every real function now, outside any signal handler.
pub fn resolve_all() {
    resolve(&REAL_SIGACTION, c"sigaction");
    resolve(&REAL_SIGNAL, c"signal");
    resolve(&REAL_SIGPROCMASK, c"sigprocmask");
    resolve(&REAL_PTHREAD_SIGMASK, c"pthread_sigmask");
}

/// The real `sigaction`, for the agent's own use.
pub fn real_sigaction(sig: c_int, act: *const libc::sigaction, old: *mut libc::sigaction) -> c_int {
    let f = resolve(&REAL_SIGACTION, c"sigaction");
    // SAFETY: `f` is libc's sigaction; arguments are passed through.
    unsafe { core::mem::transmute::<usize, SigactionFn>(f)(sig, act, old) }
}

fn without_ckpt_signal(set: *const libc::sigset_t) -> libc::sigset_t {
    // SAFETY: the caller passes a valid sigset (non-null checked by callers);
    // sigdelset on our own copy.
    unsafe {
        let mut copy = *set;
        libc::sigdelset(&mut copy, CKPT_SIGNAL);
        copy
    }
}

/// # Safety
/// Same contract as libc's `sigaction`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sigaction(sig: c_int, act: *const libc::sigaction, old: *mut libc::sigaction) -> c_int {
    if sig == CKPT_SIGNAL && !act.is_null() {
        crate::sys::set_errno(libc::EINVAL);
        return -1;
    }
    if act.is_null() {
        return real_sigaction(sig, act, old);
    }
    // SAFETY: `act` is non-null and, by contract, valid.
    let mut copy = unsafe { *act };
    copy.sa_mask = without_ckpt_signal(&copy.sa_mask);
    real_sigaction(sig, &copy, old)
}

/// # Safety
/// Same contract as libc's `signal`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn signal(sig: c_int, handler: libc::sighandler_t) -> libc::sighandler_t {
    if sig == CKPT_SIGNAL {
        crate::sys::set_errno(libc::EINVAL);
        return libc::SIG_ERR;
    }
    let f = resolve(&REAL_SIGNAL, c"signal");
    // SAFETY: `f` is libc's signal.
    unsafe { core::mem::transmute::<usize, SignalFn>(f)(sig, handler) }
}

fn masked(slot: &AtomicUsize, name: &CStr, how: c_int, set: *const libc::sigset_t, old: *mut libc::sigset_t) -> c_int {
    let f = resolve(slot, name);
    // SAFETY: `f` is the libc function named `name`, with the same
    // signature; `set` is either null or valid by the caller's contract.
    unsafe {
        let real = core::mem::transmute::<usize, MaskFn>(f);
        if set.is_null() || how == libc::SIG_UNBLOCK {
            return real(how, set, old);
        }
        let copy = without_ckpt_signal(set);
        real(how, &copy, old)
    }
}

/// # Safety
/// Same contract as libc's `sigprocmask`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sigprocmask(how: c_int, set: *const libc::sigset_t, old: *mut libc::sigset_t) -> c_int {
    masked(&REAL_SIGPROCMASK, c"sigprocmask", how, set, old)
}

/// # Safety
/// Same contract as libc's `pthread_sigmask`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn pthread_sigmask(how: c_int, set: *const libc::sigset_t, old: *mut libc::sigset_t) -> c_int {
    masked(&REAL_PTHREAD_SIGMASK, c"pthread_sigmask", how, set, old)
}
