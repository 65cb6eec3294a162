//! `ckpt run` without a batch system (issue 15; `slurm.rs` runs it under a
//! real Slurm): launch the first time, restart the latest generation every
//! later time; SIGUSR1 checkpoints and goes on, SIGTERM checkpoints and
//! stops (exit 143); a second run of a name that runs is refused, and so is
//! a name that could leave its directory. `counter_heap` checks its heap
//! every tick across it all.
mod common;
use common::*;

use std::process::Command;
use std::time::Duration;

fn run_cmd(s: &Session, name: &str, ticks: u64) -> Command {
    let mut c = Command::new(&s.ckpt);
    c.args(["run", "--name", name, "--store"]).arg(&s.store_dir).args(["--coord", &s.coord, "--"]);
    c.arg(program("counter_heap")).args(["-t", "100", "-m", "16", "-n", &ticks.to_string()]);
    c.current_dir(&s.dir);
    c
}

fn signal(p: &Proc, sig: i32) {
    // SAFETY: kill with a pid of our own child (not reaped yet).
    assert_eq!(unsafe { libc::kill(p.child_pid(), sig) }, 0);
}

fn wait_stderr(p: &Proc, what: &str) -> String {
    let until = std::time::Instant::now() + LINE_TIMEOUT;
    loop {
        let e = p.stderr();
        if e.contains(what) {
            return e;
        }
        assert!(std::time::Instant::now() < until, "no {what:?} from ckpt run:\n{e}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn launches_then_restarts_checkpoints_on_usr1_stops_on_term() {
    let s = Session::new("run-cycle");
    let ticks = 80;
    let mut p = Proc::spawn("ckpt run (1st)".into(), run_cmd(&s, "sim", ticks));
    p.wait_ticks(5, LINE_TIMEOUT);
    wait_stderr(&p, "sim: no generation in");
    // The same name again while it runs: refused, the first goes on.
    let o = run_with_timeout(run_cmd(&s, "sim", ticks), CMD_TIMEOUT);
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("a computation named sim already runs"), "{}", text(&o.stderr));
    signal(&p, libc::SIGUSR1);
    wait_stderr(&p, "sim: SIGUSR1: checkpointed generation 1 ");
    let t = p.wait_ticks(3, LINE_TIMEOUT);
    signal(&p, libc::SIGTERM);
    let e = wait_stderr(&p, "stopping the program (SIGTERM)");
    assert!(e.contains("sim: SIGTERM: checkpointed generation 2 "), "{e}");
    let st = p.wait_exit(CMD_TIMEOUT);
    assert_eq!(st.code(), Some(143), "ckpt run after SIGTERM: {st:?}\n{}", p.stderr());
    assert!(p.lines.iter().all(|l| !l.contains("FAIL")), "{:?}", p.lines);
    let stopped_at = p.last_tick.unwrap();
    assert!(stopped_at >= t && stopped_at < ticks);
    // The next run restarts generation 2 and runs to the end.
    let mut q = Proc::spawn("ckpt run (2nd)".into(), run_cmd(&s, "sim", ticks));
    q.wait_ticks(1, RESTART_TIMEOUT);
    let n = q.first_tick.unwrap();
    assert!(n > t && n <= stopped_at + 1, "resumed at tick {n}: generation 2 was taken after tick {t}, the program stopped at {stopped_at}");
    assert!(q.stderr().contains("sim: restarting generation 2 "), "{}", q.stderr());
    let st = q.wait_exit(CMD_TIMEOUT);
    q.drain();
    assert!(q.done && q.last_tick == Some(ticks), "no DONE after tick {ticks}: {:?}", q.lines.last());
    assert_eq!(st.code(), Some(0), "{}", q.stderr());
    assert!(q.lines.iter().all(|l| !l.contains("FAIL")), "{:?}", q.lines);
    assert!(q.stderr().contains("the program ended (exit status 0)"), "{}", q.stderr());
    // Its coordinator is gone with it.
    let o = s.run("status", &[]);
    assert!(text(&o.stdout).contains("none running"), "{}", text(&o.stdout));
}

#[test]
fn a_name_that_could_leave_its_directory_is_refused() {
    let s = Session::new("run-name");
    for bad in ["../x", "a/b", ".hidden", ""] {
        let o = run_with_timeout(run_cmd(&s, bad, 5), CMD_TIMEOUT);
        assert!(!o.status.success(), "{bad:?} accepted");
        let e = text(&o.stderr);
        assert!(e.contains("is not a computation name") && e.contains("sbatch -J"), "{bad:?}: {e}");
    }
    assert!(!s.store_dir.exists(), "a refused name made the store");
}

/// Slurm's kill of a whole job sends SIGCONT and then SIGTERM to every
/// process; both may be pending at once when `ckpt run`'s signal thread
/// takes them, and sigwait takes the lower number, SIGTERM, first. Made
/// certain here: `ckpt run` stopped (SIGSTOP), sent SIGTERM, then SIGCONT
/// (which resumes it with both pending). It must still see the job's kill:
/// no checkpoint (it would restart into the program's own end), exit 143.
#[test]
fn a_sigterm_taken_before_its_pending_sigcont_is_still_the_job_s_kill() {
    let s = Session::new("run-contterm");
    let mut c = run_cmd(&s, "ct", 1000);
    c.env("SLURM_JOB_ID", "1");
    let mut p = Proc::spawn("ckpt run".into(), c);
    p.wait_ticks(3, LINE_TIMEOUT);
    signal(&p, libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(200));
    signal(&p, libc::SIGTERM);
    signal(&p, libc::SIGCONT);
    let e = wait_stderr(&p, "stopping the program (SIGTERM)");
    assert!(e.contains("ct: SIGTERM: no checkpoint: Slurm sent SIGCONT and SIGTERM to every process of the job"), "{e}");
    assert!(!e.contains("checkpointed generation"), "{e}");
    let st = p.wait_exit(CMD_TIMEOUT);
    assert_eq!(st.code(), Some(143), "{st:?}\n{}", p.stderr());
}
