//! eintr: a checkpoint is invisible to the program. Threads sitting in
//! poll, epoll_wait, select, nanosleep, semop, msgrcv, pause, sigsuspend,
//! read, futex wait and in timed ppoll/select/clock_nanosleep/nanosleep/
//! sigtimedwait never see EINTR nor an early return, and a thread that
//! blocks every signal with raw rt_sigprocmask is stopped too.
mod common;
use common::*;

#[test]
fn eintr_checkpoint_restart_cycle() {
    let c = Cycle::new(program("eintr"), &["-t", "100"]);
    standard_cycle("eintr", &c);
}

/// Live checkpoints only (no kill): a timed call lasts its timeout, not
/// its timeout again from the moment of the checkpoint (`-L`).
#[test]
fn eintr_live_checkpoints_keep_timeouts() {
    let s = Session::new("eintr-live");
    let stop = s.stop_file();
    let stop_s = stop.to_str().unwrap().to_string();
    let mut p = s.launch(&program("eintr"), &["-t", "100", "-L", "-s", &stop_s]);
    p.wait_prefix("READY", LINE_TIMEOUT);
    p.wait_ticks(5, LINE_TIMEOUT);
    for _ in 0..6 {
        s.checkpoint_bounded(&mut p);
        p.wait_ticks(7, LINE_TIMEOUT);
    }
    p.finish(&s, 25);
}

/// `CKPT_STOP=signal` keeps the signal stop (for when ptrace is not
/// permitted): programs that retry EINTR still go through the cycle.
#[test]
fn signal_stop_fallback_still_checkpoints() {
    let mut c = Cycle::new(program("threads"), &["-t", "100", "-w", "4"]);
    c.env.push(("CKPT_STOP", "signal"));
    standard_cycle("threads-signal-stop", &c);
}
