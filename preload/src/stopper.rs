//! The ptrace stopper: brings each thread into the checkpoint signal
//! handler without the program ever seeing an interrupted call.
//!
//! A plain signal makes `poll`, `epoll_wait`, `select`, `semop`, `msgrcv`,
//! `nanosleep`, `sigtimedwait`… return `EINTR` (SA_RESTART does not cover
//! them), and cannot reach a thread that blocks every signal. So the
//! checkpoint thread starts a tracer: a process of its own (ptrace refuses
//! a thread of the tracee's group) that shares the program's memory
//! (`CLONE_VM`: nothing is copied, no copy-on-write faults later) and runs
//! on a static stack, with exit signal 0 (the program's `wait` never sees
//! it, no `SIGCHLD`). For each thread the tracer:
//!
//! 1. `PTRACE_SEIZE`s and `PTRACE_INTERRUPT`s it (works whatever its mask);
//! 2. unblocks [`CKPT_SIGNAL`] in its mask (`PTRACE_SETSIGMASK`), sends it
//!    and lets it run to the signal-delivery stop;
//! 3. there, if the thread was in a system call the signal interrupted
//!    (`orig_rax >= 0` and `rax` one of the kernel's `-ERESTART*` codes, or
//!    `-EINTR` from a call that never restarts), rewrites its registers to
//!    re-execute that very call (`rax = orig_rax`, `rip -= 2`,
//!    `orig_rax = -1` so the kernel adds no `EINTR` of its own);
//! 4. puts the original mask back and `PTRACE_DETACH`es with the signal.
//!
//! The handler then builds its frame from those registers and parks as
//! with the signal stop; on release (or after a restart, through
//! `rt_sigreturn` on that frame) the thread enters its call again. Calls
//! the kernel would resume through `restart_syscall` (relative sleeps,
//! `poll`, timed futex waits) are entered again from their start:
//! `nanosleep`/`clock_nanosleep` with the time left (the kernel wrote it to
//! the caller's `rem`, which becomes the request), the others with their
//! original timeout. `select`/`ppoll`/`pselect` get the time left from the
//! kernel, which writes it back into the caller's timeout.
//!
//! A thread that cannot be traced (another tracer holds it: gdb, strace;
//! or the process is not dumpable) falls back to the signal, as does every
//! thread when `CKPT_STOP=signal`.
//!
//! **A process stopped by job control** (SIGSTOP, SIGTSTP, SIGTTIN,
//! SIGTTOU) is checkpointed where it stands. Its checkpoint thread is kept
//! running for the round by the coordinator's ptrace; the tracer finds the
//! other threads in their group stop, which ptrace lets it resume: each is
//! brought into the handler as above (an `EINTR` the stop itself caused is
//! left alone: the program gets it after `SIGCONT`, as it would have), but
//! stays traced, since a detach would stop it again before the handler
//! runs. At the end of the round ([`finish_round`]) the tracer follows each
//! thread out of the handler with syscall stops and detaches it at the
//! exit of its `rt_sigreturn`, on the program's own instruction: the
//! group stop, still in effect, takes it there. The program never runs a
//! single instruction while it is stopped, and after `SIGCONT` goes on
//! from where it was. The tracer runs only raw syscalls (it
//! shares the checkpoint thread's TLS, so nothing of libc's that uses it).

use core::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, Ordering};

use ckpt_wire::agent::{CKPT_SIGNAL, MAX_THREADS};

use crate::sys;

/// False when `CKPT_STOP=signal`: every thread is stopped by the signal.
pub static USE_PTRACE: AtomicBool = AtomicBool::new(true);

const ERESTARTSYS: i64 = 512;
const ERESTARTNOINTR: i64 = 513;
const ERESTARTNOHAND: i64 = 514;
const ERESTART_RESTARTBLOCK: i64 = 516;
const PTRACE_GETSIGMASK: i64 = 0x420a;
const PTRACE_SETSIGMASK: i64 = 0x420b;

/// Calls that return a plain `-EINTR` when a signal (or a ptrace stop)
/// interrupts them, never an `-ERESTART*` code: IPC and epoll waits, and
/// socket I/O under `SO_RCVTIMEO`/`SO_SNDTIMEO` (the kernel's
/// `sock_intr_errno`). Each has done nothing when it fails so (a partial
/// transfer returns its count), so entering it again is safe. `connect` is
/// not here: a second attempt would answer `EALREADY`.
const EINTR_CALLS: [i64; 21] = [
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_recvmmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_sendmmsg,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_semop,
    libc::SYS_semtimedop,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_msgrcv,
    libc::SYS_msgsnd,
    libc::SYS_io_getevents,
];

/// Set by the tracer to the stop signal when a thread is in a job-control
/// stop (reported in SUSPENDED: the image comes back stopped).
pub static JOB_STOPPED: AtomicI32 = AtomicI32::new(0);

/// A tracer holds threads of a job-stopped process for this round
/// (its pid); 0 when none does.
static HOLDER: AtomicI32 = AtomicI32::new(0);
/// Tracer to checkpoint thread: every thread is in the handler, held by
/// the tracer (1), or detached, the tracer exiting ([`DONE_EXITING`]).
static SERVED: AtomicU32 = AtomicU32::new(0);
const DONE_EXITING: u32 = 2;
/// Checkpoint thread to tracer: 1 = follow the held threads out of the
/// handler; tracer: 2 = they are being followed, release them.
static LET_GO: AtomicU32 = AtomicU32::new(0);
const PTRACE_GET_SYSCALL_INFO: i64 = 0x420e;
const PTRACE_SYSCALL_INFO_ENTRY: u8 = 1;
const PTRACE_SYSCALL_INFO_EXIT: u8 = 2;

/// `si_errno` of a checkpoint signal whose siginfo carries, at offset 24,
/// the thread's signal mask before the stopper unblocked our signal.
const MASK_MARK: i32 = 0x636b_7074;

/// In the checkpoint handler: if the stopper had to unblock our signal in
/// the thread's mask, put the original mask into the frame, which is what
/// the thread gets back on release or restart. Async-signal-safe.
///
/// # Safety
/// `info` and `ucontext` are the handler's arguments for [`CKPT_SIGNAL`].
pub unsafe fn fix_frame_mask(info: *const libc::siginfo_t, ucontext: *mut core::ffi::c_void) {
    if info.is_null() || ucontext.is_null() {
        return;
    }
    // SAFETY: the kernel's siginfo is 128 bytes; the ucontext is the frame
    // the kernel built on this thread's stack for this very signal.
    unsafe {
        let raw = info as *const u8;
        // A tgkill (SI_TKILL: rt_tgsigqueueinfo cannot forge it) whose
        // siginfo a tracer rewrote to carry our mark.
        if core::ptr::read_unaligned(raw.add(4) as *const i32) != MASK_MARK
            || core::ptr::read_unaligned(raw.add(8) as *const i32) != libc::SI_TKILL
        {
            return;
        }
        let mask = core::ptr::read_unaligned(raw.add(24) as *const u64);
        let uc = ucontext as *mut libc::ucontext_t;
        core::ptr::write_unaligned(core::ptr::addr_of_mut!((*uc).uc_sigmask) as *mut u64, mask);
    }
}

/// Reads `CKPT_STOP` and Yama's ptrace scope (constructor time).
pub fn configure() {
    if std::env::var("CKPT_STOP").as_deref() == Ok("signal") {
        USE_PTRACE.store(false, Ordering::Relaxed);
    }
    let mut scope = [0u8; 8];
    let one = sys::read_small_file(c"/proc/sys/kernel/yama/ptrace_scope", &mut scope) > 0 && scope[0] == b'1';
    YAMA_SCOPE_1.store(one, Ordering::Relaxed);
}

/// Yama's `ptrace_scope` is 1 (read once, at start).
static YAMA_SCOPE_1: AtomicBool = AtomicBool::new(false);

/// Brings every thread of `tids` into the checkpoint handler. Returns once
/// each has been signalled (not necessarily parked yet). Runs on the
/// checkpoint thread.
pub fn stop_threads(tids: &[i32]) {
    if tids.is_empty() {
        return;
    }
    if !USE_PTRACE.load(Ordering::Relaxed) || HOLDER.load(Ordering::Acquire) != 0 {
        // (A tracer holding a stopped process's threads owns the one
        // tracer stack; a thread that appears after that gets the signal.)
        for &tid in tids {
            sys::tgkill(tid, CKPT_SIGNAL);
        }
        return;
    }
    TRACER_GO.store(0, Ordering::Release);
    SERVED.store(0, Ordering::Release);
    LET_GO.store(0, Ordering::Release);
    let job = Job { tgid: sys::getpid(), tids: tids.as_ptr(), len: tids.len() };
    // SAFETY: a process (not a thread: ptrace refuses its own thread group)
    // sharing our memory, on a stack of its own that only it uses (the
    // checkpoint thread, the only caller, waits for it to exit); exit
    // signal 0, so the program never sees it. It reads `job` and `tids`,
    // which outlive it, and makes raw syscalls only.
    let pid = unsafe {
        let stack = core::ptr::addr_of_mut!(TRACER_STACK.0) as *mut u8;
        libc::clone(
            tracer_main,
            stack.add(TRACER_STACK_SIZE) as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_FILES | libc::CLONE_FS,
            &job as *const Job as *mut libc::c_void,
        )
    };
    if pid < 0 {
        TRACER_GO.store(1, Ordering::Release);
        for &tid in tids {
            sys::tgkill(tid, CKPT_SIGNAL);
        }
        return;
    }
    // Yama's ptrace_scope 1 lets a process trace only its descendants:
    // name the tracer (our child) as ours for the time of the stop.
    let yama = YAMA_SCOPE_1.load(Ordering::Relaxed);
    if yama {
        // SAFETY: PR_SET_PTRACER takes a pid, no pointer.
        unsafe { libc::syscall(libc::SYS_prctl, libc::PR_SET_PTRACER, pid as u64, 0usize, 0usize, 0usize) };
    }
    TRACER_GO.store(1, Ordering::Release);
    sys::futex_wake_all(&TRACER_GO);
    // The tracer exits when it is done, or stays to hold the threads of a
    // job-stopped process until `finish_round`.
    loop {
        // SAFETY: waiting for our own exit-signal-0 clone child.
        if unsafe { libc::syscall(libc::SYS_wait4, pid, 0usize, libc::__WALL | libc::WNOHANG, 0usize) } != 0 {
            break;
        }
        match SERVED.load(Ordering::Acquire) {
            0 => {}
            DONE_EXITING => {
                // SAFETY: as above; it has nothing left to do but exit.
                unsafe { libc::syscall(libc::SYS_wait4, pid, 0usize, libc::__WALL, 0usize) };
                break;
            }
            _ => {
                HOLDER.store(pid, Ordering::Release);
                break;
            }
        }
        sys::futex_wait(&SERVED, 0, 1_000_000);
    }
    if yama {
        // SAFETY: as above. This forgets a tracer the program named
        // itself (the kernel cannot be asked for it).
        unsafe { libc::syscall(libc::SYS_prctl, libc::PR_SET_PTRACER, 0usize, 0usize, 0usize, 0usize) };
    }
}

/// Ends the stop: lets the parked threads go (`release`). Threads a tracer
/// holds (a job-stopped process) are followed out of the handler and left
/// in their group stop at the program's own instruction first. Runs on the
/// checkpoint thread.
pub fn finish_round(release: impl Fn()) {
    let pid = HOLDER.load(Ordering::Acquire);
    if pid == 0 {
        release();
        return;
    }
    LET_GO.store(1, Ordering::Release);
    sys::futex_wake_all(&LET_GO);
    while LET_GO.load(Ordering::Acquire) == 1 {
        // SAFETY: our own clone child; a tracer that died leaves nothing to wait for.
        if unsafe { libc::syscall(libc::SYS_wait4, pid, 0usize, libc::__WALL | libc::WNOHANG, 0usize) } != 0 {
            HOLDER.store(0, Ordering::Release);
            release();
            return;
        }
        sys::futex_wait(&LET_GO, 1, 1_000_000);
    }
    release();
    // SAFETY: waiting for our own exit-signal-0 clone child.
    unsafe { libc::syscall(libc::SYS_wait4, pid, 0usize, libc::__WALL, 0usize) };
    HOLDER.store(0, Ordering::Release);
}

/// After a restart: the tracer of the checkpointed life is not ours.
pub fn forget() {
    HOLDER.store(0, Ordering::Release);
    JOB_STOPPED.store(0, Ordering::Release);
}

/// Moved to 1 once the tracer may start (after `PR_SET_PTRACER`).
static TRACER_GO: AtomicU32 = AtomicU32::new(0);

struct Job {
    tgid: i32,
    tids: *const i32,
    len: usize,
}

const TRACER_STACK_SIZE: usize = 64 * 1024;
#[repr(C, align(16))]
struct TracerStack([u8; TRACER_STACK_SIZE]);
/// The tracer's stack; only the tracer (one at a time) touches it.
static mut TRACER_STACK: TracerStack = TracerStack([0; TRACER_STACK_SIZE]);

/// Per-thread progress of the tracer (static: the tracer's stack is small).
struct Track {
    state: [u8; MAX_THREADS],
    dirty: [bool; MAX_THREADS],
    orig_mask: [u64; MAX_THREADS],
    /// Found in a group stop (job control): held, not detached.
    group: [bool; MAX_THREADS],
    /// Inside `rt_sigreturn` (its entry stop seen), while followed out.
    returning: [bool; MAX_THREADS],
}
static mut TRACK: Track = Track {
    state: [0; MAX_THREADS],
    dirty: [false; MAX_THREADS],
    orig_mask: [0; MAX_THREADS],
    group: [false; MAX_THREADS],
    returning: [false; MAX_THREADS],
};

/// Seized and interrupted, waiting for the interrupt stop.
const SEIZED: u8 = 1;
/// Our signal sent, waiting for its delivery stop.
const SENT: u8 = 2;
/// Detached (or gone, or given up).
const DONE: u8 = 3;
/// In the handler with our signal, still traced (a job-stopped process).
const HELD: u8 = 4;

/// How long the tracer waits for all its threads to reach their stops (a
/// thread in uninterruptible sleep or in `vfork` never does: it is left
/// to the signal, and the agent's own deadline names it).
const TRACER_DEADLINE_NS: u64 = 3_000_000_000;

extern "C" fn tracer_main(arg: *mut libc::c_void) -> i32 {
    // SAFETY: `arg` is the `Job` of `stop_threads`, alive until we exit;
    // TRACK is used by the tracer alone, one tracer at a time.
    unsafe {
        let job = &*(arg as *const Job);
        let tids = core::slice::from_raw_parts(job.tids, job.len.min(MAX_THREADS));
        let t = &mut *core::ptr::addr_of_mut!(TRACK);
        let all: u64 = !0;
        libc::syscall(libc::SYS_rt_sigprocmask, libc::SIG_SETMASK, &all as *const u64, 0usize, 8usize);
        while TRACER_GO.load(Ordering::Acquire) == 0 {
            sys::futex_wait(&TRACER_GO, 0, 1_000_000);
        }
        // 1. Seize and interrupt them all at once: their stops overlap.
        let mut pending = 0usize;
        for (i, &tid) in tids.iter().enumerate() {
            t.dirty[i] = false;
            t.group[i] = false;
            t.returning[i] = false;
            t.state[i] = DONE;
            if libc::syscall(libc::SYS_ptrace, libc::PTRACE_SEIZE, tid, 0usize, libc::PTRACE_O_TRACESYSGOOD as usize) != 0 {
                // Traced by someone else (gdb, strace) or not permitted.
                libc::syscall(libc::SYS_tgkill, job.tgid, tid, CKPT_SIGNAL);
                continue;
            }
            if libc::syscall(libc::SYS_ptrace, libc::PTRACE_INTERRUPT, tid, 0usize, 0usize) != 0 {
                libc::syscall(libc::SYS_ptrace, libc::PTRACE_DETACH, tid, 0usize, 0usize);
                libc::syscall(libc::SYS_tgkill, job.tgid, tid, CKPT_SIGNAL);
                continue;
            }
            t.state[i] = SEIZED;
            pending += 1;
        }
        // 2.–4. Serve the stops as they come.
        let deadline = sys::now_ns() + TRACER_DEADLINE_NS;
        let mut idle = 0u32;
        while pending > 0 {
            let mut status: i32 = 0;
            let r = libc::syscall(libc::SYS_wait4, -1, &mut status as *mut i32, libc::__WALL | libc::WNOHANG, 0usize) as i32;
            if r <= 0 {
                if r < 0 || sys::now_ns() > deadline {
                    break;
                }
                idle += 1;
                if idle < 64 {
                    libc::syscall(libc::SYS_sched_yield);
                } else {
                    let ts = libc::timespec { tv_sec: 0, tv_nsec: 50_000 };
                    libc::syscall(libc::SYS_nanosleep, &ts as *const libc::timespec, 0usize);
                }
                continue;
            }
            idle = 0;
            let Some(i) = tids.iter().position(|&x| x == r) else { continue };
            if t.state[i] == DONE {
                continue;
            }
            if !libc::WIFSTOPPED(status) {
                t.state[i] = DONE; // exited or killed
                pending -= 1;
                continue;
            }
            if serve_stop(job.tgid, r, status, &mut t.state[i], &mut t.dirty[i], &mut t.orig_mask[i], &mut t.group[i]) {
                pending -= 1;
            }
        }
        // Threads that never reached their stops: our exit detaches them;
        // the signal is what is left (the agent's deadline names them).
        for (i, &tid) in tids.iter().enumerate() {
            if t.state[i] != DONE && t.state[i] != HELD {
                libc::syscall(libc::SYS_tgkill, job.tgid, tid, CKPT_SIGNAL);
            }
        }
        if t.state[..tids.len()].contains(&HELD) {
            hold(tids, t);
        } else {
            // Done: the checkpoint thread may wait for our exit (a wait4
            // that blocks, instead of looking again after its next 1 ms
            // nap: that nap was most of a small process's stop).
            SERVED.store(DONE_EXITING, Ordering::Release);
            sys::futex_wake_all(&SERVED);
        }
    }
    0
}

/// In the tracer: one stop of thread `tid`. True once the thread is
/// detached with our signal on its way.
///
/// # Safety
/// Only in the tracer, for a thread it seized.
#[allow(clippy::too_many_arguments)]
unsafe fn serve_stop(tgid: i32, tid: i32, status: i32, state: &mut u8, dirty: &mut bool, orig_mask: &mut u64, group: &mut bool) -> bool {
    // SAFETY: ptrace requests on our tracee; every pointer is to a local
    // or to the caller's slots.
    unsafe {
        let sig = libc::WSTOPSIG(status);
        let event = (status >> 16) & 0xff;
        if event != 0 && sig != libc::SIGTRAP && *state == SEIZED {
            // A group stop (SIGSTOP, SIGTSTP…): the process is stopped by
            // job control. ptrace may resume it: bring it into the handler
            // like the others, but hold it (see the module's doc).
            JOB_STOPPED.store(sig, Ordering::Release);
            *group = true;
        }
        if event != 0 {
            // The interrupt stop (PTRACE_EVENT_STOP): open the mask to our
            // signal and send it.
            if *state == SEIZED {
                libc::syscall(libc::SYS_ptrace, PTRACE_GETSIGMASK, tid, 8usize, orig_mask as *mut u64);
                let mask = *orig_mask & !(1u64 << (CKPT_SIGNAL - 1));
                libc::syscall(libc::SYS_ptrace, PTRACE_SETSIGMASK, tid, 8usize, &mask as *const u64);
                libc::syscall(libc::SYS_tgkill, tgid, tid, CKPT_SIGNAL);
                *state = SENT;
            }
            libc::syscall(libc::SYS_ptrace, libc::PTRACE_CONT, tid, 0usize, 0usize);
            return false;
        }
        if sig != CKPT_SIGNAL || *state != SENT {
            // The program's own signal: deliver it untouched. Its handler
            // frame now holds the registers: nothing of ours to restart.
            *dirty |= *state == SENT;
            libc::syscall(libc::SYS_ptrace, libc::PTRACE_CONT, tid, 0usize, sig as usize);
            return false;
        }
        if !*dirty {
            let mut regs: libc::user_regs_struct = core::mem::zeroed();
            if libc::syscall(libc::SYS_ptrace, libc::PTRACE_GETREGS, tid, 0usize, &mut regs as *mut _) == 0
                && restart_in_place(&mut regs, !*group)
            {
                libc::syscall(libc::SYS_ptrace, libc::PTRACE_SETREGS, tid, 0usize, &regs as *const _);
            }
        }
        if *orig_mask & (1u64 << (CKPT_SIGNAL - 1)) != 0 {
            // The signal must stay unblocked to be delivered: the handler
            // puts the original mask into its frame, handed over in the
            // siginfo.
            let mut info = [0u8; 128];
            if libc::syscall(libc::SYS_ptrace, libc::PTRACE_GETSIGINFO, tid, 0usize, info.as_mut_ptr()) == 0 {
                info[4..8].copy_from_slice(&MASK_MARK.to_ne_bytes());
                info[24..32].copy_from_slice(&orig_mask.to_ne_bytes());
                libc::syscall(libc::SYS_ptrace, libc::PTRACE_SETSIGINFO, tid, 0usize, info.as_ptr());
            }
        }
        if *group {
            // Detached now, it would enter its group stop again before the
            // handler ran: it runs on traced.
            libc::syscall(libc::SYS_ptrace, libc::PTRACE_CONT, tid, 0usize, CKPT_SIGNAL as usize);
            *state = HELD;
            return true;
        }
        libc::syscall(libc::SYS_ptrace, libc::PTRACE_DETACH, tid, 0usize, CKPT_SIGNAL as usize);
        *state = DONE;
        true
    }
}

/// In the tracer, for a job-stopped process: keeps the held threads
/// running (their own signals wait, blocked by the handler) until the
/// checkpoint thread lets go, then follows each out of the handler and
/// detaches it at the exit of its `rt_sigreturn`, where its group stop
/// takes it before it runs an instruction of the program. The other
/// threads were detached already; our exit detaches whatever is left.
///
/// # Safety
/// Only in the tracer, after serving the stops of `tids`.
unsafe fn hold(tids: &[i32], t: &mut Track) {
    // SAFETY: ptrace and wait4 on our own tracees, pointers to locals.
    unsafe {
        SERVED.store(1, Ordering::Release);
        sys::futex_wake_all(&SERVED);
        let mut held = t.state[..tids.len()].iter().filter(|&&s| s == HELD).count();
        let mut following = false;
        while held > 0 {
            if !following && LET_GO.load(Ordering::Acquire) == 1 {
                // Into a stop where syscall tracing can begin.
                for (i, &tid) in tids.iter().enumerate() {
                    if t.state[i] == HELD {
                        libc::syscall(libc::SYS_ptrace, libc::PTRACE_INTERRUPT, tid, 0usize, 0usize);
                    }
                }
                following = true;
                LET_GO.store(2, Ordering::Release);
                sys::futex_wake_all(&LET_GO);
            }
            let mut status: i32 = 0;
            let r = libc::syscall(libc::SYS_wait4, -1, &mut status as *mut i32, libc::__WALL | libc::WNOHANG, 0usize) as i32;
            if r < 0 {
                return;
            }
            if r == 0 {
                if following {
                    libc::syscall(libc::SYS_sched_yield);
                } else {
                    sys::futex_wait(&LET_GO, 0, 1_000_000);
                }
                continue;
            }
            let Some(i) = tids.iter().position(|&x| x == r) else { continue };
            if t.state[i] != HELD {
                continue;
            }
            if !libc::WIFSTOPPED(status) {
                t.state[i] = DONE;
                held -= 1;
                continue;
            }
            let sig = libc::WSTOPSIG(status);
            let event = (status >> 16) & 0xff;
            let resume = if following { libc::PTRACE_SYSCALL } else { libc::PTRACE_CONT };
            if sig == libc::SIGTRAP | 0x80 {
                // A syscall stop: the entry of `rt_sigreturn`, then its exit
                // (every other call of the way out passes).
                let mut info = [0u8; 88];
                let n = libc::syscall(libc::SYS_ptrace, PTRACE_GET_SYSCALL_INFO, r, info.len(), info.as_mut_ptr());
                let op = if n > 0 { info[0] } else { 0 };
                let nr = u64::from_ne_bytes(info[24..32].try_into().unwrap_or([0; 8])) as i64;
                if op == PTRACE_SYSCALL_INFO_ENTRY {
                    t.returning[i] = nr == libc::SYS_rt_sigreturn;
                } else if op == PTRACE_SYSCALL_INFO_EXIT && t.returning[i] {
                    libc::syscall(libc::SYS_ptrace, libc::PTRACE_DETACH, r, 0usize, 0usize);
                    t.state[i] = DONE;
                    held -= 1;
                    continue;
                }
                libc::syscall(libc::SYS_ptrace, resume, r, 0usize, 0usize);
            } else if event != 0 || sig == libc::SIGTRAP {
                // Our interrupt, or another group stop: on it goes.
                libc::syscall(libc::SYS_ptrace, resume, r, 0usize, 0usize);
            } else {
                libc::syscall(libc::SYS_ptrace, resume, r, 0usize, sig as usize);
            }
        }
    }
}

/// Rewrites `regs` (a thread at the delivery of our signal) so that its
/// interrupted system call is entered again. False if there is nothing to
/// restart.
/// `eintr`: a plain `-EINTR` of the calls in [`EINTR_CALLS`] is ours to
/// undo (not when a job-control stop caused it: the program gets it).
fn restart_in_place(regs: &mut libc::user_regs_struct, eintr: bool) -> bool {
    let nr = regs.orig_rax as i64;
    let ret = regs.rax as i64;
    if nr < 0 {
        return false;
    }
    let restart = match -ret {
        ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND => true,
        ERESTART_RESTARTBLOCK => {
            // Relative sleeps: the kernel stored the time left in `rem`.
            if nr == libc::SYS_nanosleep && regs.rsi != 0 {
                regs.rdi = regs.rsi;
            } else if nr == libc::SYS_clock_nanosleep && regs.rsi & libc::TIMER_ABSTIME as u64 == 0 && regs.r10 != 0 {
                regs.rdx = regs.r10;
            }
            true
        }
        e if e == libc::EINTR as i64 => eintr && EINTR_CALLS.contains(&nr),
        _ => false,
    };
    if restart {
        regs.rax = regs.orig_rax;
        regs.rip -= 2;
        regs.orig_rax = u64::MAX;
    }
    restart
}

