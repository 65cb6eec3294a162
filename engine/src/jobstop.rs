//! Processes stopped by job control (`SIGSTOP`, `SIGTSTP`, `SIGTTIN`,
//! `SIGTTOU`): checkpointed where they stand, restarted stopped.
//!
//! A stopped process cannot answer a checkpoint: its agent's checkpoint
//! thread is stopped with the rest. [`Waker`] keeps that one thread running
//! for a round: a thread of the coordinator (or of the capture helper)
//! `PTRACE_SEIZE`s it and resumes it (ptrace may resume a thread in a group
//! stop; the others stay stopped). The agent's own stopper then holds the
//! other threads (`preload/src/stopper.rs`) and hands each back to its group
//! stop at the program's own instruction. When the round is over the waker
//! detaches, and the group stop, still in effect, takes the checkpoint
//! thread too. Nobody sees a `SIGCONT`: not the program's handlers, not its
//! parent's `wait`.
//!
//! At restart, [`Holder`] follows each restored thread of such a process
//! with syscall stops and holds it at the exit of its final `rt_sigreturn`
//! (the program's own instruction, not yet run), except the agent's
//! checkpoint thread, which must register with the coordinator. Once it
//! has, [`Holder::stop`] sends `SIGSTOP` and lets the held threads go: each
//! enters the group stop before it runs anything. The parent (if it is in
//! the computation) gets a `SIGCHLD` for that stop, as after any `SIGSTOP`.
//!
//! Both run the ptrace requests of a tracee on one thread of their own
//! (ptrace binds a tracee to the thread that attached).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Whether process `pid` is in a job-control stop (state `T`; `t`,
/// traced, is not a job-control stop).
pub fn is_stopped(pid: i32) -> bool {
    crate::procfs::tree_ids(pid).is_ok_and(|t| t.state == 'T')
}

/// Whether thread `tid` of `pid` is in a job-control stop.
fn thread_stopped(pid: i32, tid: i32) -> bool {
    crate::procfs::thread_state(pid, tid) == Some('T')
}

fn ptrace(req: libc::c_uint, tid: i32, data: usize) -> i64 {
    // SAFETY: the requests used here take no pointer in `addr`, and `data`
    // is a number (options or a signal).
    unsafe { libc::ptrace(req, tid, 0usize, data) as i64 }
}

/// One `wait4` for tracee `tid` (`__WALL`); `None` if nothing happened.
fn wait_tracee(tid: i32, block: bool) -> Option<i32> {
    let mut status = 0;
    let flags = libc::__WALL | if block { 0 } else { libc::WNOHANG };
    // SAFETY: wait4 into a local.
    let r = unsafe { libc::wait4(tid, &mut status, flags, std::ptr::null_mut()) };
    (r == tid).then_some(status)
}

const EVENT_STOP: i32 = libc::PTRACE_EVENT_STOP;

/// Keeps the checkpoint thread of a job-stopped process running until
/// dropped (see the module's doc).
pub struct Waker {
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Waker {
    /// Resumes thread `tid` (the agent's checkpoint thread) of the stopped
    /// process `pid` for one round.
    pub fn start(pid: i32, tid: i32) -> Result<Waker, String> {
        let done = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel::<Result<(), String>>();
        let d = done.clone();
        let thread = std::thread::Builder::new()
            .name(format!("ckpt-wake-{pid}"))
            .spawn(move || wake(pid, tid, &d, tx))
            .map_err(|e| format!("cannot start a thread to wake process {pid}: {e}"))?;
        let mut w = Waker { done, thread: Some(thread) };
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => Ok(w),
            Ok(Err(e)) => {
                w.finish();
                Err(e)
            }
            Err(_) => {
                w.finish();
                Err(format!("the checkpoint thread {tid} of stopped process {pid} did not answer ptrace within 5 s"))
            }
        }
    }

    fn finish(&mut self) {
        self.done.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Waker {
    fn drop(&mut self) {
        self.finish();
    }
}

fn wake(pid: i32, tid: i32, done: &AtomicBool, tx: mpsc::Sender<Result<(), String>>) {
    if ptrace(libc::PTRACE_SEIZE, tid, 0) != 0 {
        let e = std::io::Error::last_os_error();
        let _ = tx.send(Err(format!(
            "process {pid} is stopped by job control and its checkpoint thread {tid} cannot be woken by ptrace ({e}: another tracer, \
             or Yama's ptrace_scope forbids it); resume it with `kill -CONT {pid}` and checkpoint again"
        )));
        return;
    }
    ptrace(libc::PTRACE_INTERRUPT, tid, 0);
    let Some(status) = wait_tracee(tid, true) else {
        let _ = tx.send(Err(format!("the checkpoint thread {tid} of process {pid} is gone")));
        return;
    };
    if !libc::WIFSTOPPED(status) {
        let _ = tx.send(Err(format!("the checkpoint thread {tid} of process {pid} is gone")));
        return;
    }
    ptrace(libc::PTRACE_CONT, tid, 0);
    let _ = tx.send(Ok(()));
    // Pass on whatever stops it (its own checkpoint signal, a new group
    // stop) until the round is over.
    while !done.load(Ordering::Acquire) {
        match wait_tracee(tid, false) {
            None => std::thread::sleep(Duration::from_millis(1)),
            Some(st) if libc::WIFSTOPPED(st) => pass_on(tid, st, libc::PTRACE_CONT),
            Some(_) => return,
        }
    }
    // Into a ptrace stop, then detach: the group stop takes it.
    ptrace(libc::PTRACE_INTERRUPT, tid, 0);
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        match wait_tracee(tid, false) {
            None => std::thread::sleep(Duration::from_millis(1)),
            Some(st) if libc::WIFSTOPPED(st) => {
                let event = (st >> 16) & 0xff;
                if event == EVENT_STOP || libc::WSTOPSIG(st) == libc::SIGTRAP {
                    ptrace(libc::PTRACE_DETACH, tid, 0);
                    return;
                }
                pass_on(tid, st, libc::PTRACE_CONT);
            }
            Some(_) => return,
        }
    }
    // (Our thread's exit detaches it in any case.)
}

/// Resumes a tracee from stop `status`, delivering the signal of a
/// signal-delivery stop.
fn pass_on(tid: i32, status: i32, how: libc::c_uint) {
    let sig = libc::WSTOPSIG(status);
    let event = (status >> 16) & 0xff;
    let deliver = if event != 0 || sig == libc::SIGTRAP || sig == libc::SIGTRAP | 0x80 { 0 } else { sig };
    ptrace(how, tid, deliver as usize);
}

/// At restart: holds the threads of processes restored stopped at their
/// first instruction of the program (see the module's doc).
pub struct Holder {
    cmd: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

/// A process to hold: its pid, the agent's checkpoint thread, and how many
/// threads it will have.
#[derive(Clone, Copy, Debug)]
pub struct Held {
    pub pid: i32,
    pub ckpt_tid: i32,
    pub threads: usize,
}

impl Holder {
    /// Seizes the restorers of `procs` (each still one thread, waiting for
    /// its last go-ahead). Returns once they are traced.
    pub fn start(procs: Vec<Held>) -> Result<Holder, String> {
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let (cmd_tx, cmd_rx) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("ckpt-hold".into())
            .spawn(move || hold(procs, ready_tx, cmd_rx))
            .map_err(|e| format!("cannot start the thread that holds stopped processes: {e}"))?;
        let mut h = Holder { cmd: Some(cmd_tx), thread: Some(thread) };
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(h),
            Ok(Err(e)) => {
                let _ = h.finish();
                Err(e)
            }
            Err(_) => Err(h.finish().err().unwrap_or_else(|| "the thread that holds stopped processes ended".into())),
        }
    }

    /// Stops the held processes for good (`SIGSTOP`) and lets them go: call
    /// once their agents have registered.
    pub fn stop(mut self) -> Result<(), String> {
        self.finish()
    }

    fn finish(&mut self) -> Result<(), String> {
        if let Some(c) = self.cmd.take() {
            let _ = c.send(());
        }
        match self.thread.take() {
            Some(t) => t.join().unwrap_or_else(|_| Err("the thread that holds stopped processes panicked".into())),
            None => Ok(()),
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            tracing::warn!("{e}");
        }
    }
}

#[derive(PartialEq)]
enum T {
    /// Traced with syscall stops, on its way out of the restorer.
    Tracing,
    /// Inside its final `rt_sigreturn`.
    Returning,
    /// Held at the exit of `rt_sigreturn`.
    Held,
    /// The checkpoint thread: runs (traced, no syscall stops).
    Free,
}

fn hold(procs: Vec<Held>, ready: mpsc::Sender<Result<(), String>>, cmd: mpsc::Receiver<()>) -> Result<(), String> {
    use std::collections::HashMap;
    let mut threads: HashMap<i32, (usize, T)> = HashMap::new();
    let opts = (libc::PTRACE_O_TRACESYSGOOD | libc::PTRACE_O_TRACECLONE) as usize;
    for (i, p) in procs.iter().enumerate() {
        if ptrace(libc::PTRACE_SEIZE, p.pid, opts) != 0 {
            let e = format!(
                "cannot trace restored process {} to bring it back stopped: {}",
                p.pid,
                std::io::Error::last_os_error()
            );
            let _ = ready.send(Err(e.clone()));
            return Err(e);
        }
        ptrace(libc::PTRACE_INTERRUPT, p.pid, 0);
        match wait_tracee(p.pid, true) {
            Some(st) if libc::WIFSTOPPED(st) => {
                ptrace(libc::PTRACE_SYSCALL, p.pid, 0);
            }
            _ => {
                let e = format!("restored process {} died before it could be held stopped", p.pid);
                let _ = ready.send(Err(e.clone()));
                return Err(e);
            }
        }
        threads.insert(p.pid, (i, T::Tracing));
    }
    let _ = ready.send(Ok(()));
    let settled = |threads: &HashMap<i32, (usize, T)>| {
        procs.iter().enumerate().all(|(i, p)| {
            !std::path::Path::new(&format!("/proc/{}", p.pid)).exists()
                || threads.values().filter(|(j, s)| *j == i && matches!(s, T::Held | T::Free)).count() >= p.threads
        })
    };
    let mut stop_asked = false;
    let deadline_after_ask = Duration::from_secs(30);
    let mut asked_at = None;
    loop {
        if !stop_asked && !matches!(cmd.try_recv(), Err(mpsc::TryRecvError::Empty)) {
            stop_asked = true;
            asked_at = Some(Instant::now());
        }
        if stop_asked && settled(&threads) {
            break;
        }
        if asked_at.is_some_and(|t| t.elapsed() > deadline_after_ask) {
            return Err("the restored stopped processes did not reach their first instruction within 30 s".into());
        }
        let mut status = 0;
        // SAFETY: wait4 into a local; __WNOTHREAD: only our own tracees.
        let r = unsafe { libc::wait4(-1, &mut status, libc::__WALL | libc::__WNOTHREAD | libc::WNOHANG, std::ptr::null_mut()) };
        if r <= 0 {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        if !libc::WIFSTOPPED(status) {
            threads.remove(&r);
            continue;
        }
        let event = (status >> 16) & 0xff;
        let sig = libc::WSTOPSIG(status);
        let owner = threads.get(&r).map(|(i, _)| *i);
        if event == libc::PTRACE_EVENT_CLONE {
            // The new thread is ours already; it reports its own first stop.
            let mut new_tid: libc::c_ulong = 0;
            // SAFETY: PTRACE_GETEVENTMSG writes one unsigned long.
            unsafe { libc::ptrace(libc::PTRACE_GETEVENTMSG, r, 0usize, &mut new_tid as *mut libc::c_ulong) };
            if let Some(i) = owner {
                threads.entry(new_tid as i32).or_insert((i, T::Tracing));
            }
            ptrace(libc::PTRACE_SYSCALL, r, 0);
            continue;
        }
        let Some(i) = owner.or_else(|| {
            // A new thread's first stop may come before its parent's event.
            let tgid = tgid_of(r)?;
            procs.iter().position(|p| p.pid == tgid)
        }) else {
            ptrace(libc::PTRACE_DETACH, r, 0);
            continue;
        };
        let state = threads.entry(r).or_insert((i, T::Tracing));
        match state.1 {
            T::Held => {}
            T::Free => pass_on(r, status, libc::PTRACE_CONT),
            _ if sig == libc::SIGTRAP | 0x80 => {
                let mut info = [0u8; 88];
                // SAFETY: PTRACE_GET_SYSCALL_INFO writes at most `len` bytes.
                let n = unsafe { libc::ptrace(libc::PTRACE_GET_SYSCALL_INFO, r, info.len(), info.as_mut_ptr()) };
                let op = if n > 0 { info[0] } else { 0 };
                let nr = u64::from_ne_bytes(info[24..32].try_into().unwrap_or([0; 8])) as i64;
                if op == libc::PTRACE_SYSCALL_INFO_ENTRY {
                    state.1 = if nr == libc::SYS_rt_sigreturn { T::Returning } else { T::Tracing };
                    ptrace(libc::PTRACE_SYSCALL, r, 0);
                } else if op == libc::PTRACE_SYSCALL_INFO_EXIT && state.1 == T::Returning {
                    if r == procs[i].ckpt_tid {
                        state.1 = T::Free;
                        ptrace(libc::PTRACE_CONT, r, 0);
                    } else {
                        state.1 = T::Held;
                    }
                } else {
                    ptrace(libc::PTRACE_SYSCALL, r, 0);
                }
            }
            _ => pass_on(r, status, libc::PTRACE_SYSCALL),
        }
    }
    // Every thread is at its first instruction, the agents have registered:
    // the checkpoint threads go untraced, then the stop, then the others go.
    for (&tid, (_, s)) in &threads {
        if *s == T::Free {
            ptrace(libc::PTRACE_INTERRUPT, tid, 0);
        }
    }
    let mut free: Vec<i32> = threads.iter().filter(|(_, (_, s))| *s == T::Free).map(|(&t, _)| t).collect();
    let until = Instant::now() + Duration::from_secs(5);
    while !free.is_empty() && Instant::now() < until {
        let mut status = 0;
        // SAFETY: as above.
        let r = unsafe { libc::wait4(-1, &mut status, libc::__WALL | libc::__WNOTHREAD | libc::WNOHANG, std::ptr::null_mut()) };
        if r <= 0 {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        if free.contains(&r) {
            let event = (status >> 16) & 0xff;
            if !libc::WIFSTOPPED(status) {
                free.retain(|&t| t != r);
            } else if event == EVENT_STOP || libc::WSTOPSIG(status) == libc::SIGTRAP {
                ptrace(libc::PTRACE_DETACH, r, 0);
                free.retain(|&t| t != r);
            } else {
                pass_on(r, status, libc::PTRACE_CONT);
            }
        }
    }
    for p in &procs {
        // SAFETY: kill of a process we restored.
        unsafe { libc::kill(p.pid, libc::SIGSTOP) };
    }
    // The checkpoint threads stop first (they run); then the held threads.
    for p in &procs {
        let until = Instant::now() + Duration::from_secs(5);
        while !thread_stopped(p.pid, p.ckpt_tid) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    for (&tid, (_, s)) in &threads {
        if *s == T::Held {
            ptrace(libc::PTRACE_DETACH, tid, 0);
        }
    }
    for p in procs.iter().filter(|p| std::path::Path::new(&format!("/proc/{}", p.pid)).exists()) {
        let until = Instant::now() + Duration::from_secs(5);
        while !is_stopped(p.pid) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
        if !is_stopped(p.pid) {
            return Err(format!("restored process {} did not come back stopped", p.pid));
        }
    }
    Ok(())
}

fn tgid_of(tid: i32) -> Option<i32> {
    let s = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    s.lines().find_map(|l| l.strip_prefix("Tgid:")).and_then(|v| v.trim().parse().ok())
}
