//! The libc calls the agent must see: the application may neither handle nor
//! block the checkpoint signal ([`ckpt_wire::agent::CKPT_SIGNAL`]), and a
//! program it execs or spawns keeps the agent even when given an environment
//! without it, or with an `LD_PRELOAD` of its own (the agent goes first in
//! it): `execve`, `execv`, `execvp`, `execvpe`, `posix_spawn`,
//! `posix_spawnp`. The `execl*` functions (variadic) are not wrapped: they
//! keep the agent unless the program changed `LD_PRELOAD` in `environ`.
//!
//! The agent's own fds are out of the program's reach: `dup`, `dup2`,
//! `dup3`, `fcntl`, `close`, `close_range` and `closefrom` never touch
//! them (see [`crate::agentfds`]).
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
    resolve(&REAL_EXECVE, c"execve");
    resolve(&REAL_EXECVPE, c"execvpe");
    resolve(&REAL_POSIX_SPAWN, c"posix_spawn");
    resolve(&REAL_POSIX_SPAWNP, c"posix_spawnp");
    resolve(&REAL_DUP, c"dup");
    resolve(&REAL_DUP2, c"dup2");
    resolve(&REAL_DUP3, c"dup3");
    resolve(&REAL_FCNTL, c"fcntl");
    resolve(&REAL_FCNTL64, c"fcntl64");
    resolve(&REAL_CLOSE, c"close");
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

// ------------------------------------------------- per-thread credentials

/// # Safety
/// Same contract as libc's `capset`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn capset(hdr: *mut libc::c_void, data: *const libc::c_void) -> c_int {
    // SAFETY: raw capset with the caller's pointers.
    let r = unsafe { libc::syscall(libc::SYS_capset, hdr, data) } as c_int;
    if r == 0 && !hdr.is_null() {
        // The same sets on the checkpoint thread (see
        // `suspend::mirror_on_ckpt_thread`): a header naming this thread
        // becomes one naming the thread that runs it (pid 0).
        // SAFETY: `hdr` is a valid `struct __user_cap_header_struct`
        // (version u32, pid i32) by the contract.
        let mut own = unsafe { *(hdr as *const [u32; 2]) };
        own[1] = 0;
        crate::suspend::mirror_on_ckpt_thread(libc::SYS_capset, [&mut own as *mut [u32; 2] as u64, data as u64, 0, 0, 0]);
    }
    r
}

/// # Safety
/// Same contract as libc's `prctl` (all five arguments are passed on; the
/// unused ones are ignored by the kernel).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn prctl(option: c_int, a2: libc::c_ulong, a3: libc::c_ulong, a4: libc::c_ulong, a5: libc::c_ulong) -> c_int {
    // SAFETY: raw prctl with the caller's arguments.
    let r = unsafe { libc::syscall(libc::SYS_prctl, option, a2, a3, a4, a5) } as c_int;
    let per_thread_cred = matches!(option, libc::PR_SET_KEEPCAPS | libc::PR_CAPBSET_DROP | libc::PR_SET_SECUREBITS | libc::PR_SET_NO_NEW_PRIVS | libc::PR_CAP_AMBIENT);
    if r >= 0 && per_thread_cred {
        crate::suspend::mirror_on_ckpt_thread(libc::SYS_prctl, [option as u64, a2, a3, a4, a5]);
    }
    r
}

// ---------------------------------------------------------------- exec

/// The agent's own environment entries (`NAME=value`), taken at start: an
/// exec'd program stays under ckpt even when the caller passes an
/// environment without them (`env -i`, `subprocess(env={})`).
static AGENT_ENV: std::sync::OnceLock<Vec<std::ffi::CString>> = std::sync::OnceLock::new();

/// The variables that carry the agent across `exec`.
const CARRIED: [&str; 8] = ["LD_PRELOAD", ckpt_wire::agent::ENV_COORD, ckpt_wire::agent::ENV_AGENT_KEY, ckpt_wire::agent::ENV_MEMBER_SOCK, ckpt_wire::agent::ENV_COORD_UID, ckpt_wire::agent::ENV_TRACKING, ckpt_wire::agent::ENV_NO_FORK, "CKPT_EXTERNAL_FDS"];

/// Records the agent's environment entries (library constructor).
pub fn remember_env() {
    let v = CARRIED
        .iter()
        .filter_map(|name| std::env::var_os(name).map(|val| (name, val)))
        .filter_map(|(name, val)| {
            use std::os::unix::ffi::OsStrExt;
            let mut e = name.as_bytes().to_vec();
            e.push(b'=');
            e.extend_from_slice(val.as_bytes());
            std::ffi::CString::new(e).ok()
        })
        .collect();
    let _ = AGENT_ENV.set(v);
}

/// The path this library was loaded from (`dladdr`), taken at start.
static OWN_PATH: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();

/// Records where the agent's library is (library constructor).
pub fn remember_own_path() {
    // SAFETY: dladdr of one of our own functions into a Dl_info we own; the
    // name it points to lives as long as the library.
    let name = unsafe {
        let mut info: libc::Dl_info = core::mem::zeroed();
        if libc::dladdr(remember_own_path as *const libc::c_void, &mut info) == 0 || info.dli_fname.is_null() {
            return;
        }
        CStr::from_ptr(info.dli_fname).to_bytes().to_vec()
    };
    let _ = OWN_PATH.set(name);
}

/// An environment for exec: pointers, and the strings we made for it.
struct Env {
    ptrs: Vec<*const libc::c_char>,
    _made: Option<std::ffi::CString>,
}

/// `LD_PRELOAD=<agent>:<theirs>` if the program's own `LD_PRELOAD` entry
/// `e` lacks the agent (a program that sets `LD_PRELOAD` for a child);
/// None if it has it. A library of theirs that fails to load costs only
/// itself: the loader warns and goes on with the rest of the list.
fn preload_entry(e: &[u8]) -> Option<std::ffi::CString> {
    let own = OWN_PATH.get()?;
    let list = e.strip_prefix(b"LD_PRELOAD=")?;
    if list.split(|&b| b == b':' || b == b' ').any(|lib| lib == own.as_slice()) {
        return None;
    }
    let mut v = b"LD_PRELOAD=".to_vec();
    v.extend_from_slice(own);
    if !list.is_empty() {
        v.push(b':');
        v.extend_from_slice(list);
    }
    std::ffi::CString::new(v).ok()
}

/// `envp` plus whichever agent entries it lacks, with the agent first in
/// its `LD_PRELOAD`; None when it needs nothing. Allocates (exec is not
/// async-signal-safe either).
///
/// # Safety
/// `envp` is null or a null-terminated array of C strings.
unsafe fn with_agent_env(envp: *const *const libc::c_char) -> Option<Env> {
    let ours = AGENT_ENV.get()?;
    let mut have: Vec<*const libc::c_char> = Vec::new();
    if !envp.is_null() {
        let mut i = 0;
        // SAFETY: a null-terminated array by the contract.
        unsafe {
            while !(*envp.add(i)).is_null() {
                have.push(*envp.add(i));
                i += 1;
            }
        }
    }
    let name_of = |e: &[u8]| e.iter().position(|&b| b == b'=').map(|i| e[..=i].to_vec()).unwrap_or_default();
    // SAFETY: every entry is a C string.
    let present: Vec<Vec<u8>> = have.iter().map(|&e| name_of(unsafe { CStr::from_ptr(e) }.to_bytes())).collect();
    let mut made = None;
    if let Some(i) = present.iter().position(|n| n == b"LD_PRELOAD=") {
        // SAFETY: as above.
        made = preload_entry(unsafe { CStr::from_ptr(have[i]) }.to_bytes());
        if let Some(m) = &made {
            have[i] = m.as_ptr();
        }
    }
    let missing: Vec<*const libc::c_char> = ours.iter().filter(|o| !present.contains(&name_of(o.to_bytes()))).map(|o| o.as_ptr()).collect();
    if missing.is_empty() && made.is_none() {
        return None;
    }
    have.extend(missing);
    have.push(core::ptr::null());
    Some(Env { ptrs: have, _made: made })
}

static REAL_EXECVE: AtomicUsize = AtomicUsize::new(0);
static REAL_EXECVPE: AtomicUsize = AtomicUsize::new(0);
static REAL_POSIX_SPAWN: AtomicUsize = AtomicUsize::new(0);
static REAL_POSIX_SPAWNP: AtomicUsize = AtomicUsize::new(0);

type ExecFn = unsafe extern "C" fn(*const libc::c_char, *const *const libc::c_char, *const *const libc::c_char) -> c_int;
type SpawnFn = unsafe extern "C" fn(
    *mut libc::pid_t,
    *const libc::c_char,
    *const libc::posix_spawn_file_actions_t,
    *const libc::posix_spawnattr_t,
    *const *mut libc::c_char,
    *const *mut libc::c_char,
) -> c_int;

fn exec_with(slot: &AtomicUsize, name: &CStr, path: *const libc::c_char, argv: *const *const libc::c_char, envp: *const *const libc::c_char) -> c_int {
    let f = resolve(slot, name);
    // SAFETY: `f` is the libc function `name`; the arguments are the
    // caller's (valid by its contract) or our extended copy of `envp`,
    // which lives across the call.
    unsafe {
        let real = core::mem::transmute::<usize, ExecFn>(f);
        match with_agent_env(envp) {
            Some(env) => real(path, argv, env.ptrs.as_ptr()),
            None => real(path, argv, envp),
        }
    }
}

/// # Safety
/// Same contract as libc's `execve`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn execve(path: *const libc::c_char, argv: *const *const libc::c_char, envp: *const *const libc::c_char) -> c_int {
    exec_with(&REAL_EXECVE, c"execve", path, argv, envp)
}

unsafe extern "C" {
    static environ: *const *const libc::c_char;
}

/// # Safety
/// Same contract as libc's `execv` (glibc's calls its internal `execve`,
/// which the wrapper above would not see).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn execv(path: *const libc::c_char, argv: *const *const libc::c_char) -> c_int {
    // SAFETY: reading libc's `environ` pointer.
    exec_with(&REAL_EXECVE, c"execve", path, argv, unsafe { environ })
}

/// # Safety
/// Same contract as libc's `execvp`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn execvp(file: *const libc::c_char, argv: *const *const libc::c_char) -> c_int {
    // SAFETY: reading libc's `environ` pointer.
    exec_with(&REAL_EXECVPE, c"execvpe", file, argv, unsafe { environ })
}

/// # Safety
/// Same contract as glibc's `execvpe`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn execvpe(file: *const libc::c_char, argv: *const *const libc::c_char, envp: *const *const libc::c_char) -> c_int {
    exec_with(&REAL_EXECVPE, c"execvpe", file, argv, envp)
}

#[allow(clippy::too_many_arguments)] // posix_spawn's six, plus which one
fn spawn_with(
    slot: &AtomicUsize,
    name: &CStr,
    pid: *mut libc::pid_t,
    path: *const libc::c_char,
    actions: *const libc::posix_spawn_file_actions_t,
    attr: *const libc::posix_spawnattr_t,
    argv: *const *mut libc::c_char,
    envp: *const *mut libc::c_char,
) -> c_int {
    let f = resolve(slot, name);
    // SAFETY: as in `exec_with`.
    unsafe {
        let real = core::mem::transmute::<usize, SpawnFn>(f);
        match with_agent_env(envp as *const *const libc::c_char) {
            Some(env) => real(pid, path, actions, attr, argv, env.ptrs.as_ptr() as *const *mut libc::c_char),
            None => real(pid, path, actions, attr, argv, envp),
        }
    }
}

/// # Safety
/// Same contract as libc's `posix_spawn`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn posix_spawn(
    pid: *mut libc::pid_t,
    path: *const libc::c_char,
    actions: *const libc::posix_spawn_file_actions_t,
    attr: *const libc::posix_spawnattr_t,
    argv: *const *mut libc::c_char,
    envp: *const *mut libc::c_char,
) -> c_int {
    spawn_with(&REAL_POSIX_SPAWN, c"posix_spawn", pid, path, actions, attr, argv, envp)
}

/// # Safety
/// Same contract as libc's `posix_spawnp`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn posix_spawnp(
    pid: *mut libc::pid_t,
    file: *const libc::c_char,
    actions: *const libc::posix_spawn_file_actions_t,
    attr: *const libc::posix_spawnattr_t,
    argv: *const *mut libc::c_char,
    envp: *const *mut libc::c_char,
) -> c_int {
    spawn_with(&REAL_POSIX_SPAWNP, c"posix_spawnp", pid, file, actions, attr, argv, envp)
}

// ------------------------------------------------------ the agent's fds

static REAL_DUP: AtomicUsize = AtomicUsize::new(0);
static REAL_DUP2: AtomicUsize = AtomicUsize::new(0);
static REAL_DUP3: AtomicUsize = AtomicUsize::new(0);
static REAL_FCNTL: AtomicUsize = AtomicUsize::new(0);
static REAL_FCNTL64: AtomicUsize = AtomicUsize::new(0);
static REAL_CLOSE: AtomicUsize = AtomicUsize::new(0);

type DupFn = unsafe extern "C" fn(c_int) -> c_int;
type Dup3Fn = unsafe extern "C" fn(c_int, c_int, c_int) -> c_int;
type FcntlFn = unsafe extern "C" fn(c_int, c_int, libc::c_ulong) -> c_int;

use crate::agentfds;

fn ebadf() -> c_int {
    crate::sys::set_errno(libc::EBADF);
    -1
}

fn emfile() -> c_int {
    crate::sys::set_errno(libc::EMFILE);
    -1
}

/// # Safety
/// Same contract as libc's `dup`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dup(fd: c_int) -> c_int {
    if agentfds::is_agent(fd) {
        return ebadf();
    }
    let f = resolve(&REAL_DUP, c"dup");
    // SAFETY: libc's dup.
    let r = unsafe { core::mem::transmute::<usize, DupFn>(f)(fd) };
    // The lowest free number in the program's view may be the agent's.
    agentfds::lowest(r, 0, false)
}

/// # Safety
/// Same contract as libc's `dup2`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dup2(old: c_int, new: c_int) -> c_int {
    if agentfds::is_agent(old) {
        return ebadf();
    }
    if !agentfds::make_room(new) {
        return emfile();
    }
    let f = resolve(&REAL_DUP2, c"dup2");
    // SAFETY: libc's dup2 (same signature as dup3 minus flags: cast back).
    unsafe { core::mem::transmute::<usize, unsafe extern "C" fn(c_int, c_int) -> c_int>(f)(old, new) }
}

/// # Safety
/// Same contract as libc's `dup3`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dup3(old: c_int, new: c_int, flags: c_int) -> c_int {
    if agentfds::is_agent(old) {
        return ebadf();
    }
    if !agentfds::make_room(new) {
        return emfile();
    }
    let f = resolve(&REAL_DUP3, c"dup3");
    // SAFETY: libc's dup3.
    unsafe { core::mem::transmute::<usize, Dup3Fn>(f)(old, new, flags) }
}

/// `fcntl`'s variadic third argument arrives in a register like a fixed
/// one (x86-64 System V): taking it as `c_ulong` and passing it on is
/// exact for every command (ints and pointers alike).
fn fcntl_with(slot: &AtomicUsize, name: &CStr, fd: c_int, cmd: c_int, arg: libc::c_ulong) -> c_int {
    if agentfds::is_agent(fd) {
        return ebadf();
    }
    let f = resolve(slot, name);
    // SAFETY: libc's fcntl/fcntl64 with the caller's arguments.
    let r = unsafe { core::mem::transmute::<usize, FcntlFn>(f)(fd, cmd, arg) };
    if cmd == libc::F_DUPFD || cmd == libc::F_DUPFD_CLOEXEC {
        // The lowest free number at or above `arg` in the program's view
        // may be the agent's.
        return agentfds::lowest(r, arg as c_int, cmd == libc::F_DUPFD_CLOEXEC);
    }
    r
}

/// # Safety
/// Same contract as libc's `fcntl` (declared here with a fixed third
/// argument; see [`fcntl_with`]).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fcntl(fd: c_int, cmd: c_int, arg: libc::c_ulong) -> c_int {
    fcntl_with(&REAL_FCNTL, c"fcntl", fd, cmd, arg)
}

/// # Safety
/// Same contract as glibc's `fcntl64` (what `fcntl` is with 64-bit offsets).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fcntl64(fd: c_int, cmd: c_int, arg: libc::c_ulong) -> c_int {
    fcntl_with(&REAL_FCNTL64, c"fcntl64", fd, cmd, arg)
}

/// # Safety
/// Same contract as libc's `close`. The agent's fds are not open in the
/// program's view: closing one fails with `EBADF` (what the program would
/// get without the agent) and leaves it alone.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    if agentfds::is_agent(fd) {
        return ebadf();
    }
    let f = resolve(&REAL_CLOSE, c"close");
    // SAFETY: libc's close.
    unsafe { core::mem::transmute::<usize, DupFn>(f)(fd) }
}

/// `close_range(first, last, flags)` over the program's fds only: the
/// range is cut around the agent's fds (raw syscalls; `CLOSE_RANGE_UNSHARE`
/// applies to the first piece, which unshares the table for the rest).
fn close_range_around(first: u32, last: u32, flags: c_int) -> c_int {
    if first > last {
        crate::sys::set_errno(libc::EINVAL);
        return -1;
    }
    let mut ours = agentfds::current();
    ours.sort_unstable();
    let mut from = first as u64;
    for fd in ours.into_iter().filter(|&fd| fd >= 0).map(|fd| fd as u64) {
        if fd < from || fd > last as u64 {
            continue;
        }
        if fd > from {
            // SAFETY: close_range takes no pointer.
            let r = unsafe { libc::syscall(libc::SYS_close_range, from as u32, (fd - 1) as u32, flags) };
            if r < 0 {
                return -1;
            }
        }
        from = fd + 1;
    }
    if from <= last as u64 {
        // SAFETY: as above.
        return unsafe { libc::syscall(libc::SYS_close_range, from as u32, last, flags) } as c_int;
    }
    0
}

/// # Safety
/// Same contract as glibc's `close_range`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn close_range(first: libc::c_uint, last: libc::c_uint, flags: c_int) -> c_int {
    close_range_around(first, last, flags)
}

/// # Safety
/// Same contract as glibc's `closefrom`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn closefrom(low: c_int) {
    close_range_around(low.max(0) as u32, u32::MAX, 0);
}

// ------------------------------------------------------------- mlockall

/// The flags of the program's last successful `mlockall` (0: none or
/// `munlockall`). `MCL_FUTURE` lives in the kernel's `mm->def_flags`,
/// which `/proc` does not show: the agent sets it again after a restart.
pub static MLOCKALL_FLAGS: core::sync::atomic::AtomicI32 = core::sync::atomic::AtomicI32::new(0);

/// # Safety
/// Same contract as libc's `mlockall`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mlockall(flags: c_int) -> c_int {
    // SAFETY: mlockall takes no pointer.
    let r = unsafe { libc::syscall(libc::SYS_mlockall, flags) } as c_int;
    if r == 0 {
        MLOCKALL_FLAGS.store(flags, Ordering::Release);
    }
    r
}

/// # Safety
/// Same contract as libc's `munlockall`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn munlockall() -> c_int {
    // SAFETY: munlockall takes no argument.
    let r = unsafe { libc::syscall(libc::SYS_munlockall) } as c_int;
    if r == 0 {
        MLOCKALL_FLAGS.store(0, Ordering::Release);
    }
    r
}

// ------------------------------------------------- SysV semaphore undo

/// The kernel keeps, per process, an undo adjustment per (set, semaphore)
/// a `semop` with `SEM_UNDO` touched, and shows it nowhere: the wrappers
/// below keep the same numbers in `CKPT_RESTART_WORD.sem_undo` (a fixed
/// table in static memory, so it comes back with the process's memory),
/// which the coordinator reads at checkpoint. Updates run with every
/// signal blocked under a spinlock (async-signal-safe, no allocation).
static SEM_UNDO_LOCK: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// Runs `f` on the table with signals blocked and the lock held.
fn with_sem_undo(f: impl FnOnce(&mut ckpt_wire::agent::SemUndoTable)) {
    let all: u64 = !0;
    let mut old: u64 = 0;
    // SAFETY: rt_sigprocmask with 8-byte masks we own.
    unsafe { libc::syscall(libc::SYS_rt_sigprocmask, libc::SIG_SETMASK, &all as *const u64, &mut old as *mut u64, 8usize) };
    while SEM_UNDO_LOCK.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
        core::hint::spin_loop();
    }
    // SAFETY: the lock is held and this thread's signals are blocked: no
    // other reference to the table exists.
    f(unsafe { &mut *crate::agent::CKPT_RESTART_WORD.sem_undo.get() });
    SEM_UNDO_LOCK.store(false, Ordering::Release);
    // SAFETY: restores the mask saved above.
    unsafe { libc::syscall(libc::SYS_rt_sigprocmask, libc::SIG_SETMASK, &old as *const u64, 0usize, 8usize) };
}

/// An adjustment did not fit the table: the checkpoint is refused.
pub fn sem_undo_overflowed() -> bool {
    // SAFETY: a plain read of a u32 the wrappers set (read at checkpoint,
    // while the other threads are stopped).
    unsafe { core::ptr::read_volatile(&(*crate::agent::CKPT_RESTART_WORD.sem_undo.get()).overflow) != 0 }
}

/// In a fork child: the kernel gave it no undo adjustments.
pub fn forget_sem_undo() {
    // A thread of the parent may have held the lock at `fork`.
    SEM_UNDO_LOCK.store(false, Ordering::Release);
    with_sem_undo(|t| *t = ckpt_wire::agent::SemUndoTable::default());
}

/// The set's `sem_ctime`, or 0.
fn sem_ctime(semid: c_int) -> i64 {
    // SAFETY: a zeroed semid_ds filled by IPC_STAT (raw syscall).
    unsafe {
        let mut ds: libc::semid_ds = core::mem::zeroed();
        if libc::syscall(libc::SYS_semctl, semid, 0, libc::IPC_STAT, &mut ds as *mut libc::semid_ds) != 0 {
            return 0;
        }
        ds.sem_ctime
    }
}

fn note_sem_undo(semid: c_int, r: c_int, sops: *const libc::sembuf, nsops: libc::size_t) {
    if r != 0 || sops.is_null() || nsops == 0 {
        return;
    }
    // SAFETY: the kernel just read `nsops` entries of `sops` successfully.
    let ops = unsafe { core::slice::from_raw_parts(sops, nsops) };
    if !ops.iter().any(|o| o.sem_flg as c_int & libc::SEM_UNDO != 0 && o.sem_op != 0) {
        return;
    }
    let ctime = sem_ctime(semid);
    with_sem_undo(|t| {
        for o in ops.iter().filter(|o| o.sem_flg as c_int & libc::SEM_UNDO != 0 && o.sem_op != 0) {
            let n = o.sem_num as i32;
            let slot = match t.slots.iter().position(|s| s.used != 0 && s.semid == semid && s.semnum == n) {
                Some(i) => Some(i),
                None => t.slots.iter().position(|s| s.used == 0),
            };
            let Some(i) = slot else {
                t.overflow = 1;
                continue;
            };
            let s = &mut t.slots[i];
            if s.used == 0 {
                *s = ckpt_wire::agent::SemUndoSlot { semid, semnum: n, adj: 0, used: 1, ctime };
            }
            s.adj -= o.sem_op as i32;
            s.ctime = ctime;
            if s.adj == 0 {
                s.used = 0;
            }
        }
    });
}

/// `SETVAL`/`SETALL` clear the semaphore's adjustments in every process,
/// `IPC_RMID` drops the set: this process's entries go.
fn clear_sem_undo(semid: c_int, semnum: Option<c_int>) {
    with_sem_undo(|t| {
        for s in t.slots.iter_mut().filter(|s| s.used != 0 && s.semid == semid && semnum.is_none_or(|n| s.semnum == n)) {
            s.used = 0;
        }
    });
}

/// # Safety
/// Same contract as libc's `semctl` (x86-64: the variadic fourth argument
/// is passed in a register like a fixed one). Async-signal-safe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn semctl(semid: c_int, semnum: c_int, cmd: c_int, arg: libc::c_ulong) -> c_int {
    // SAFETY: raw semctl with the caller's arguments.
    let r = unsafe { libc::syscall(libc::SYS_semctl, semid, semnum, cmd, arg) } as c_int;
    if r >= 0 {
        match cmd & !0x100 {
            libc::SETVAL => clear_sem_undo(semid, Some(semnum)),
            libc::SETALL | libc::IPC_RMID => clear_sem_undo(semid, None),
            _ => {}
        }
    }
    r
}

/// # Safety
/// Same contract as libc's `semop`. Async-signal-safe (raw syscalls and
/// a table update with signals blocked).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn semop(semid: c_int, sops: *mut libc::sembuf, nsops: libc::size_t) -> c_int {
    // SAFETY: raw semtimedop (no timeout) with the caller's arguments.
    let r = unsafe { libc::syscall(libc::SYS_semtimedop, semid, sops, nsops, core::ptr::null::<libc::timespec>()) } as c_int;
    note_sem_undo(semid, r, sops, nsops);
    r
}

/// # Safety
/// Same contract as glibc's `semtimedop`. Async-signal-safe.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn semtimedop(semid: c_int, sops: *mut libc::sembuf, nsops: libc::size_t, timeout: *const libc::timespec) -> c_int {
    // SAFETY: raw semtimedop with the caller's arguments.
    let r = unsafe { libc::syscall(libc::SYS_semtimedop, semid, sops, nsops, timeout) } as c_int;
    note_sem_undo(semid, r, sops, nsops);
    r
}
