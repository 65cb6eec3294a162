//! Pending signals: which signals wait for a thread or for the whole
//! process, each with its `siginfo`, read without taking them.
//!
//! `/proc/PID/task/TID/status` tells which signals are pending (`SigPnd` for
//! the thread, `ShdPnd` for the process); their `siginfo` (sender, code,
//! value, queued real-time instances) only `PTRACE_PEEKSIGINFO` reads
//! without dequeuing. So a thread with something pending is seized and
//! interrupted for a moment while it is parked in the agent's handler (its
//! futex wait is restarted by the kernel, no handler runs: the program sees
//! nothing), peeked, and let go. A thread with nothing pending, the usual
//! case, costs one read of its status.
//!
//! At restart the main thread's restorer queues them again
//! (`rt_tgsigqueueinfo` for a thread's own, `rt_sigqueueinfo` for the
//! process's), in their order, before any of them can be delivered to a
//! thread that blocks them.

use std::time::{Duration, Instant};

use crate::error::{EngineError, Result};
use crate::image::PendingSignal;

/// `PTRACE_PEEKSIGINFO` (linux/ptrace.h).
const PTRACE_PEEKSIGINFO: libc::c_uint = 0x4209;
/// Peek the process-wide queue instead of the thread's.
const PTRACE_PEEKSIGINFO_SHARED: u32 = 1;
/// Size of a `siginfo_t`.
pub const SIGINFO_SIZE: usize = 128;
/// Most signals read per queue: one per standard signal, and queued
/// real-time instances (RLIMIT_SIGPENDING bounds them).
const MAX_PER_QUEUE: usize = 4096;

#[repr(C)]
struct PeekArgs {
    off: u64,
    flags: u32,
    nr: i32,
}

/// The signal numbers of a `SigPnd:`/`ShdPnd:` mask, less the agent's own
/// (it never stays pending across a checkpoint) and those that cannot wait
/// (SIGKILL ends the process; SIGSTOP/SIGCONT act at once).
fn mask_signals(hex: &str) -> Vec<i32> {
    let m = u64::from_str_radix(hex.trim(), 16).unwrap_or(0);
    (1..=64)
        .filter(|&s| m & (1u64 << (s - 1)) != 0)
        .filter(|&s| s != ckpt_wire::agent::CKPT_SIGNAL && s != libc::SIGKILL && s != libc::SIGSTOP && s != libc::SIGCONT)
        .collect()
}

fn status_mask(text: &str, key: &str) -> Vec<i32> {
    text.lines().find_map(|l| l.strip_prefix(key)).map(mask_signals).unwrap_or_default()
}

/// The signals pending for the threads `tids` of `pid` and for the process,
/// read while its agent holds every thread in the handler. `status(i)`:
/// the status text of thread `tids[i]` ([`crate::creds::status_text`]).
pub fn capture_from<'a, S: AsRef<str> + ?Sized + 'a>(pid: i32, tids: &[i32], status: impl Fn(usize) -> &'a S) -> Result<Vec<PendingSignal>> {
    let mut out = Vec::new();
    let mut shared_done = false;
    for (i, &tid) in tids.iter().enumerate() {
        let text = status(i).as_ref();
        let own = status_mask(text, "SigPnd:");
        let shared = if shared_done { Vec::new() } else { status_mask(text, "ShdPnd:") };
        if own.is_empty() && shared.is_empty() {
            shared_done = true;
            continue;
        }
        let mut queues = Vec::new();
        if !own.is_empty() {
            queues.push(0);
        }
        if !shared.is_empty() {
            queues.push(PTRACE_PEEKSIGINFO_SHARED);
        }
        for (flags, infos) in peek(pid, tid, &queues)? {
            out.extend(infos.into_iter().map(|info| PendingSignal { tid: if flags == 0 { tid } else { 0 }, info }));
        }
        shared_done = true;
    }
    Ok(out)
}

/// Seizes `tid`, interrupts it, peeks the queues `queues` (0: the thread's,
/// [`PTRACE_PEEKSIGINFO_SHARED`]: the process's) and lets it go.
fn peek(pid: i32, tid: i32, queues: &[u32]) -> Result<Vec<(u32, Vec<Vec<u8>>)>> {
    let fail = |what: String| EngineError::Unsupported { pid, what };
    let errno = || std::io::Error::last_os_error();
    // SAFETY: PTRACE_SEIZE of a thread of a process we checkpoint; no
    // pointer is passed.
    if unsafe { libc::ptrace(libc::PTRACE_SEIZE, tid, 0, 0) } != 0 {
        return Err(fail(format!(
            "thread {tid} has signals pending and ptrace cannot read them ({}: is it traced by a debugger?); let it handle them, or detach the tracer",
            errno()
        )));
    }
    struct Detach(i32);
    impl Drop for Detach {
        fn drop(&mut self) {
            // SAFETY: detaching the thread we seized (a stopped or a
            // running tracee: the kernel handles both for a seized one).
            unsafe { libc::ptrace(libc::PTRACE_DETACH, self.0, 0, 0) };
        }
    }
    let _detach = Detach(tid);
    // SAFETY: PTRACE_INTERRUPT of our tracee; no pointer.
    if unsafe { libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0) } != 0 {
        return Err(fail(format!("cannot interrupt thread {tid} to read its pending signals: {}", errno())));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut st = 0;
        // SAFETY: waiting for our tracee's stop; `st` is ours.
        let r = unsafe { libc::waitpid(tid, &mut st, libc::__WALL | libc::WNOHANG) };
        if r == tid {
            break;
        }
        if r < 0 || Instant::now() > deadline {
            return Err(fail(format!("thread {tid} did not stop for the reading of its pending signals: {}", if r < 0 { errno().to_string() } else { "timed out".into() })));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let mut out = Vec::new();
    for &flags in queues {
        let mut infos = Vec::new();
        let mut buf = vec![0u8; 64 * SIGINFO_SIZE];
        loop {
            let args = PeekArgs { off: infos.len() as u64, flags, nr: 64 };
            // SAFETY: PTRACE_PEEKSIGINFO writes at most `nr` siginfos into
            // `buf`, which holds 64.
            let n = unsafe { libc::ptrace(PTRACE_PEEKSIGINFO as _, tid, &args as *const PeekArgs, buf.as_mut_ptr()) };
            if n < 0 {
                return Err(fail(format!("cannot read the pending signals of thread {tid}: {}", errno())));
            }
            infos.extend(buf[..n as usize * SIGINFO_SIZE].chunks_exact(SIGINFO_SIZE).map(<[u8]>::to_vec));
            if n < 64 || infos.len() >= MAX_PER_QUEUE {
                break;
            }
        }
        // The agent's own signal is never carried over.
        infos.retain(|i| signo(i) != ckpt_wire::agent::CKPT_SIGNAL);
        out.push((flags, infos));
    }
    Ok(out)
}

/// The signal number of a raw `siginfo_t`.
pub fn signo(info: &[u8]) -> i32 {
    info.get(..4).map_or(0, |b| i32::from_ne_bytes(b.try_into().unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_name_signals_less_the_ones_that_cannot_wait() {
        // SIGHUP(1), SIGINT(2), SIGKILL(9), SIGUSR1(10), 62 (the agent's), SIGRTMIN+2 (36).
        let m = (1u64 << 0) | (1 << 1) | (1 << 8) | (1 << 9) | (1 << 61) | (1 << 35);
        assert_eq!(mask_signals(&format!("{m:016x}")), vec![1, 2, 10, 36]);
        assert!(mask_signals("0000000000000000").is_empty());
    }
}
