//! eintr: a checkpoint is invisible to the program. Threads sitting in
//! poll, epoll_wait, select, nanosleep, semop, msgrcv, pause, sigsuspend,
//! read, futex wait and in timed ppoll/select/clock_nanosleep/nanosleep/
//! sigtimedwait never see EINTR nor an early return, and a thread that
//! blocks every signal with raw rt_sigprocmask is stopped too.
mod common;
use common::*;
use std::time::Duration;

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

/// A process stopped by job control (`kill -STOP`) is checkpointed where it
/// stands: through two checkpoints it stays stopped and prints nothing (no
/// SIGCONT behind the user's back); after SIGCONT it runs on; stopped again,
/// checkpointed, killed and restarted, it comes back stopped (state T, not a
/// line), and after SIGCONT its own per-tick checks of its worker threads
/// pass to the end.
#[test]
fn stopped_process_checkpoints_and_comes_back_stopped() {
    job_stop_cycle(Session::new("eintr-stopped"));
}

/// A thread already traced by someone else (strace here) cannot be
/// seized: it is stopped by the signal instead, and the checkpoint
/// succeeds while the other tracer stays attached.
#[test]
fn thread_traced_by_strace_falls_back_to_the_signal() {
    if std::process::Command::new("strace").arg("-V").output().is_err() {
        eprintln!("strace not installed: skipped");
        return;
    }
    let s = Session::new("eintr-strace");
    let stop = s.stop_file();
    let stop_s = stop.to_str().unwrap().to_string();
    let mut p = s.launch(&program("threads"), &["-t", "100", "-w", "4", "-s", &stop_s]);
    p.wait_prefix("READY", LINE_TIMEOUT);
    p.wait_ticks(3, LINE_TIMEOUT);
    let mut tids: Vec<i32> = std::fs::read_dir(format!("/proc/{}/task", p.pid))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    tids.sort();
    let victim = *tids.last().unwrap();
    let mut strace = std::process::Command::new("strace")
        .args(["-qq", "-o", "/dev/null", "-p", &victim.to_string()])
        .spawn()
        .unwrap();
    // Wait until strace is attached.
    for _ in 0..100 {
        let st = std::fs::read_to_string(format!("/proc/{}/task/{victim}/status", p.pid)).unwrap_or_default();
        if st.lines().any(|l| l.starts_with("TracerPid:") && l.split_whitespace().nth(1) != Some("0")) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    p.wait_ticks(2, LINE_TIMEOUT);
    s.checkpoint_bounded(&mut p);
    p.wait_ticks(3, LINE_TIMEOUT);
    let _ = strace.kill();
    let _ = strace.wait();
    p.wait_ticks(3, LINE_TIMEOUT);
    p.finish(&s, 5);
}
