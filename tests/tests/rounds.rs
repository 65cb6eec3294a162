//! A checkpoint never hangs with the computation stopped, and `ckpt kill`
//! and `ckpt quit` always work.
//!
//! * A drain that never ends (tests/programs/stuck.c holds a pty master
//!   whose slave a writer outside the computation, this test, keeps
//!   writing into): the round misses its deadline (`CKPT_ROUND_DEADLINE`,
//!   2 s here), fails naming the step and the process, and the program
//!   resumes with every byte (it counts them; the test compares with what
//!   it wrote). Once the writer stops, the same program checkpoints,
//!   restarts twice and checks its stream.
//! * `ckpt kill` while a round is busy (the same never-ending drain, with
//!   the default deadline): the round is cancelled and kill returns at
//!   once, with every process gone. Before, kill waited for the round's
//!   lock (30 s) and the CLI gave up, leaving the processes running.
//! * `ckpt quit` in the same state: the coordinator exits at once; the
//!   program, continued, runs on.
mod common;
use common::*;

use std::io::Write;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

fn bytes(l: &str) -> u64 {
    l.rsplit("bytes=").next().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no bytes= in {l:?}"))
}

fn last_bytes(p: &Proc) -> u64 {
    bytes(p.lines.iter().rev().find(|l| l.starts_with("TICK")).expect("no tick yet"))
}

/// Waits until the program reports `want` bytes read.
fn wait_bytes(p: &mut Proc, want: u64) {
    let deadline = Instant::now() + LINE_TIMEOUT;
    loop {
        let l = p.wait_prefix("TICK", LINE_TIMEOUT);
        let got = bytes(&l);
        assert!(got <= want, "the program read {got} bytes, more than the {want} written\n{}", p.context());
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "the program has {got} of the {want} bytes written\n{}", p.context());
    }
}

const DEADLINE: &str = "2";

#[test]
fn a_drain_that_never_ends_misses_the_deadline_and_resumes_the_program() {
    let s = Session::new("rounds_deadline");
    let stop = s.stop_file();
    let mut p = s.launch_env(&program("stuck"), &["-t", "50", "-s", stop.to_str().unwrap()], &[("CKPT_ROUND_DEADLINE", DEADLINE)]);
    let pts = p.wait_prefix("PTS ", LINE_TIMEOUT)[4..].trim().to_string();
    p.wait_ticks(2, LINE_TIMEOUT);

    // A writer outside the computation: one byte every 10 ms, for ever.
    let written = Arc::new(AtomicU64::new(0));
    let quiet = Arc::new(AtomicBool::new(false));
    let writer = {
        let (written, quiet) = (written.clone(), quiet.clone());
        let mut slave = std::fs::OpenOptions::new().write(true).open(&pts).unwrap_or_else(|e| panic!("{pts}: {e}"));
        std::thread::spawn(move || {
            while !quiet.load(Ordering::Acquire) {
                slave.write_all(b"x").unwrap();
                written.fetch_add(1, Ordering::AcqRel);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    p.wait_ticks(3, LINE_TIMEOUT);
    let t0 = Instant::now();
    let out = s.try_checkpoint();
    let took = t0.elapsed();
    let err = text(&out.stderr);
    assert!(!out.status.success(), "the checkpoint succeeded while its drain could not end\n{}", p.context());
    assert!(took < Duration::from_secs(20), "the failed round took {took:?} (deadline {DEADLINE} s)");
    assert!(err.contains("deadline") && err.contains("pseudo-terminal") && err.contains(&format!("process {}", p.pid)), "the error names neither the step nor the process: {err}");
    // Released: the program runs on and reads what was written meanwhile.
    p.drain();
    let before = last_bytes(&p);
    p.wait_ticks(5, LINE_TIMEOUT);
    assert!(last_bytes(&p) > before, "the program does not read any more after the failed round\n{}", p.context());
    quiet.store(true, Ordering::Release);
    writer.join().unwrap();
    let total = written.load(Ordering::Acquire);
    // Every byte the round read was put back.
    wait_bytes(&mut p, total);
    eprintln!("[rounds] failed round took {took:?}; {total} bytes written, all read");

    // Quiet again, it checkpoints and restarts (twice), stream intact.
    let g = s.checkpoint_bounded(&mut p);
    s.kill_all(&[p.pid], &mut p);
    for round in 0..2 {
        let mut r = s.restart_expect(&g, p.pid, true);
        r.wait_ticks(3, LINE_TIMEOUT);
        assert_eq!(last_bytes(&r), total, "the restored program's count changed\n{}", r.context());
        if round == 1 {
            let t = r.last_tick.unwrap();
            s.stop_at(t + 2);
            r.wait_prefix("DONE", LINE_TIMEOUT);
            assert!(r.wait_exit(CMD_TIMEOUT).success(), "{}", r.context());
        } else {
            s.kill_all(&[r.pid], &mut r);
        }
    }
}

/// A writer outside the computation into the slave `pts`: one byte every
/// 10 ms until `quiet` is set (or the pty is gone).
fn feed(pts: &str) -> (Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let quiet = Arc::new(AtomicBool::new(false));
    let mut slave = std::fs::OpenOptions::new().write(true).open(pts).unwrap_or_else(|e| panic!("{pts}: {e}"));
    let q = quiet.clone();
    let writer = std::thread::spawn(move || {
        while !q.load(Ordering::Acquire) && slave.write_all(b"x").is_ok() {
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    (quiet, writer)
}

/// `stuck` launched and a round made busy for good: `ckpt checkpoint` in
/// the background, draining a pty that a writer outside keeps feeding (the
/// round's deadline is the default 60 s, far beyond the test).
fn busy_round(s: &Session) -> (Proc, std::process::Child, Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let mut p = s.launch(&program("stuck"), &["-t", "50"]);
    let pts = p.wait_prefix("PTS ", LINE_TIMEOUT)[4..].trim().to_string();
    p.wait_ticks(3, LINE_TIMEOUT);
    let (quiet, writer) = feed(&pts);
    let mut c = s.cmd("checkpoint");
    c.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let child = c.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    (p, child, quiet, writer)
}

fn round_result(c: std::process::Child) -> (bool, String) {
    let out = c.wait_with_output().unwrap();
    (out.status.success(), text(&out.stderr))
}

#[test]
fn kill_during_a_busy_round_cancels_it_and_returns_with_every_process_gone() {
    let s = Session::new("rounds_kill");
    let (mut p, round, quiet, writer) = busy_round(&s);
    let t0 = Instant::now();
    let out = s.run("kill", &[]);
    let took = t0.elapsed();
    assert!(out.status.success(), "ckpt kill failed during a busy round ({took:?}): {}", text(&out.stderr));
    // Gone when kill returns (a zombie until `ckpt launch`'s parent, this
    // test, reaps it).
    assert!(!pid_alive(p.pid), "process {} still runs after ckpt kill returned", p.pid);
    assert!(took < Duration::from_secs(9), "ckpt kill took {took:?} during a busy round");
    let (ok, err) = round_result(round);
    assert!(!ok && err.contains("cancelled"), "the busy round did not end as cancelled: {err}");
    p.wait_exit(CMD_TIMEOUT);
    quiet.store(true, Ordering::Release);
    writer.join().unwrap();
    eprintln!("[rounds] kill during a busy round took {took:?}");
}

#[test]
fn quit_during_a_busy_round_exits_and_the_program_runs_on() {
    let s = Session::new("rounds_quit");
    let (mut p, round, quiet, writer) = busy_round(&s);
    let t0 = Instant::now();
    let out = s.run("quit", &[]);
    let took = t0.elapsed();
    assert!(out.status.success(), "ckpt quit failed during a busy round ({took:?}): {}", text(&out.stderr));
    assert!(took < Duration::from_secs(9), "ckpt quit took {took:?} during a busy round");
    let (ok, _) = round_result(round);
    assert!(!ok, "the busy round succeeded");
    let st = Command::new(&s.ckpt).args(["status", "--coord", &s.coord]).output().unwrap();
    assert!(text(&st.stdout).contains("none running"), "the coordinator still answers after quit: {}", text(&st.stdout));
    // Released, the program runs on, out of any computation.
    p.drain();
    p.wait_ticks(5, LINE_TIMEOUT);
    quiet.store(true, Ordering::Release);
    writer.join().unwrap();
    p.kill9();
    eprintln!("[rounds] quit during a busy round took {took:?}");
}
