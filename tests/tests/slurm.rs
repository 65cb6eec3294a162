//! `ckpt run` under a real Slurm (issue 15): a one-node cluster of
//! Debian's slurm-wlm started by the test (`common/slurm.rs`), a job script
//! as short as a user writes it, and `counter_heap` checking its whole
//! heap every tick (FAIL and exit 1 if an invariant breaks).
//!
//! - a job signalled twice (`--signal=B:USR1`, delivered as Slurm does to
//!   the batch shell only): two checkpoints, the program goes on and
//!   finishes, never restarted;
//! - a job requeued twice with `--interval` checkpoints: each start after a
//!   requeue restarts the latest generation by itself (the program resumes
//!   where the generation was, not at tick 1) and the job completes;
//! - a job checkpointed by USR1 and then requeued, twice: it resumes from
//!   the signal's generation;
//! - `scancel --batch --signal=TERM`: checkpoint and stop (exit 143), and a
//!   new job of the same name restarts there;
//! - an ordinary user's job, checkpointed, requeued, restarted in
//!   namespaces of its own;
//! - a job of the `low` partition preempted (requeued) by one of `high`:
//!   it restarts from its latest `--interval` generation by itself.
mod common;
#[path = "common/s3.rs"]
mod s3;
#[path = "common/slurm.rs"]
mod slurm;

use common::*;
use slurm::Slurm;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Milliseconds per tick of the program: short, so the jobs take seconds.
const TICK_MS: u64 = 100;

/// The job script a user would write (absolute paths: the test's ckpt and
/// program), with `extra` options for `ckpt run`.
fn job_script(s: &Session, name: &str, extra: &str, ticks: u64) -> PathBuf {
    let script = s.path(&format!("{name}.sbatch"));
    std::fs::write(
        &script,
        format!(
            "#!/bin/bash\n\
             #SBATCH --signal=B:USR1@60 --requeue --open-mode=append\n\
             exec {ckpt} run --name \"$SLURM_JOB_NAME\" --store {store} {extra} -- {prog} -t {TICK_MS} -n {ticks} -m 16\n",
            ckpt = s.ckpt.display(),
            store = s.store_dir.display(),
            prog = program("counter_heap").display(),
        ),
    )
    .unwrap();
    script
}

/// A unique job name (it names the store and the coordinator socket).
fn job_name(test: &str) -> String {
    format!("{test}-{}", std::process::id())
}

fn submit(slurm: &Slurm, s: &Session, name: &str, script: &Path) -> (u32, PathBuf) {
    let out = s.path(&format!("{name}.out"));
    let job = slurm.sbatch(&s.dir, &["-J", name, "-o", &out.to_string_lossy()], script);
    (job, out)
}

fn read(out: &Path) -> String {
    std::fs::read_to_string(out).unwrap_or_default()
}

/// Waits until the job's output holds a line for which `pred` is true,
/// after the first `skip` lines; returns that line's index and text.
fn wait_line(slurm: &Slurm, out: &Path, skip: usize, pred: impl Fn(&str) -> bool, what: &str) -> (usize, String) {
    let until = Instant::now() + Duration::from_secs(90);
    loop {
        let t = read(out);
        if let Some((i, l)) = t.lines().enumerate().skip(skip).find(|(_, l)| pred(l)) {
            return (i, l.to_string());
        }
        assert!(!t.contains("FAIL"), "the program failed its own check:\n{t}");
        assert!(Instant::now() < until, "no {what} in the job's output after 90 s:\n{t}{}", slurm.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn tick_of(line: &str) -> Option<u64> {
    line.strip_prefix("TICK ")?.split_whitespace().next()?.parse().ok()
}

/// Waits for `TICK n` with n >= `min` after line `skip`.
fn wait_tick(slurm: &Slurm, out: &Path, skip: usize, min: u64) -> (usize, u64) {
    let (i, l) = wait_line(slurm, out, skip, |l| tick_of(l).is_some_and(|t| t >= min), &format!("TICK {min}"));
    (i, tick_of(&l).unwrap())
}

/// The job's whole output, checked: no FAIL, `DONE` and the exit line at
/// the end, every tick from 1 to `ticks` there, each following the one
/// before, except the first after a `restarting generation` line of
/// `ckpt run`: the restarted program goes on from the generation's tick,
/// after tick 1 and at most one past the last tick printed. Returns the
/// ticks each restart resumed at.
fn check_output(out: &Path, ticks: u64) -> Vec<u64> {
    let t = read(out);
    assert!(!t.contains("FAIL"), "the program failed its own check:\n{t}");
    assert!(t.contains("\nDONE\n"), "no DONE:\n{t}");
    assert!(t.contains("the program ended (exit status 0)"), "ckpt run did not end with the program's status 0:\n{t}");
    let mut last = 0;
    let mut restarting = false;
    let mut resumed = Vec::new();
    for l in t.lines() {
        if l.contains(": restarting generation ") {
            restarting = true;
            continue;
        }
        let Some(n) = tick_of(l) else { continue };
        if restarting {
            assert!(n >= 2 && n <= last + 1, "resumed at tick {n} after tick {last}: not where a checkpoint was\n{t}");
            resumed.push(n);
            restarting = false;
        } else {
            assert_eq!(n, last + 1, "tick {n} after tick {last}\n{t}");
        }
        last = n;
    }
    assert_eq!(last, ticks, "the program did not reach its last tick\n{t}");
    resumed
}

/// The generations of job `name`'s store (`STORE/NAME`).
fn generations(s: &Session, name: &str) -> usize {
    let store = s.store_dir.join(name);
    if !store.join("catalog.db").exists() {
        return 0;
    }
    let mut c = std::process::Command::new(&s.ckpt);
    c.args(["log", "--json", "--store"]).arg(&store);
    let o = run_with_timeout(c, CMD_TIMEOUT);
    assert!(o.status.success(), "ckpt log: {}", text(&o.stderr));
    Json::parse(&text(&o.stdout)).unwrap().as_array().unwrap().len()
}

fn finish(slurm: &Slurm, job: u32, restarts: u32) {
    slurm.wait_state(job, "COMPLETED", Duration::from_secs(90));
    assert_eq!(slurm.job_field(job, "ExitCode"), "0:0");
    assert_eq!(slurm.job_field(job, "Restarts"), restarts.to_string());
}

#[test]
fn signalled_twice_checkpoints_and_goes_on() {
    let s = Session::new("slurm-signal");
    let slurm = Slurm::start(&s.dir);
    let name = job_name("sig");
    let ticks = 60;
    let (job, out) = submit(&slurm, &s, &name, &job_script(&s, &name, "", ticks));
    let (i, _) = wait_tick(&slurm, &out, 0, 5);
    slurm.signal_batch(job, "USR1");
    let (i, _) = wait_line(&slurm, &out, i, |l| l.contains("SIGUSR1: checkpointed generation 1 "), "first checkpoint");
    let (i, t) = wait_tick(&slurm, &out, i, 0);
    wait_tick(&slurm, &out, i, t + 5);
    slurm.signal_batch(job, "USR1");
    wait_line(&slurm, &out, i, |l| l.contains("SIGUSR1: checkpointed generation 2 "), "second checkpoint");
    finish(&slurm, job, 0);
    let resumed = check_output(&out, ticks);
    assert!(resumed.is_empty(), "the program was restarted: {resumed:?}\n{}", read(&out));
    assert_eq!(generations(&s, &name), 2);
}

#[test]
fn requeued_twice_restarts_from_interval_checkpoints() {
    let s = Session::new("slurm-requeue");
    let slurm = Slurm::start(&s.dir);
    let name = job_name("req");
    let ticks = 90;
    let (job, out) = submit(&slurm, &s, &name, &job_script(&s, &name, "--interval 1", ticks));
    let mut skip = 0;
    for round in 1..=2 {
        // An --interval checkpoint of this start, then a few more ticks.
        let before = generations(&s, &name);
        let (i, _) = wait_tick(&slurm, &out, skip, 0);
        let until = Instant::now() + Duration::from_secs(30);
        while generations(&s, &name) == before {
            assert!(Instant::now() < until, "no --interval checkpoint within 30 s:\n{}", read(&out));
            std::thread::sleep(Duration::from_millis(100));
        }
        let (i, t) = wait_tick(&slurm, &out, i, 0);
        wait_tick(&slurm, &out, i, t + 3);
        slurm.requeue(job);
        let (i, l) = wait_line(&slurm, &out, i, |l| l.contains(&format!("{name}: restarting generation ")), "restart after the requeue");
        assert!(l.contains(&s.store_dir.join(&name).to_string_lossy().into_owned()), "{l}");
        let (i, _) = wait_tick(&slurm, &out, i, 0);
        skip = i;
        assert_eq!(slurm.job_field(job, "Restarts"), round.to_string());
    }
    finish(&slurm, job, 2);
    let resumed = check_output(&out, ticks);
    assert_eq!(resumed.len(), 2, "{}", read(&out));
    assert!(generations(&s, &name) >= 3, "--interval 1 made fewer than 3 generations");
}

/// `scancel --batch --signal=TERM`: checkpoint and stop (exit 143); the
/// same script submitted again under the same name restarts there.
#[test]
fn term_checkpoints_and_stops_then_a_new_job_restarts() {
    let s = Session::new("slurm-term");
    let slurm = Slurm::start(&s.dir);
    let name = job_name("term");
    let ticks = 50;
    let script = job_script(&s, &name, "", ticks);
    let (job, out) = submit(&slurm, &s, &name, &script);
    let (i, t) = wait_tick(&slurm, &out, 0, 5);
    slurm.signal_batch(job, "TERM");
    let (i, l) = wait_line(&slurm, &out, i, |l| l.contains("SIGTERM: checkpointed generation 1 "), "checkpoint on TERM");
    assert!(l.contains(&name), "{l}");
    wait_line(&slurm, &out, i, |l| l.contains("stopping the program (SIGTERM)"), "stop");
    slurm.wait_state(job, "FAILED", Duration::from_secs(60));
    assert_eq!(slurm.job_field(job, "ExitCode"), "143:0", "ckpt run's exit status is not 128 + SIGTERM");
    let stopped = read(&out);
    let last = stopped.lines().filter_map(tick_of).next_back().unwrap();
    assert!(last >= t && last < ticks, "the program was not stopped (last tick {last}):\n{stopped}");
    // A new job of that name: it restarts generation 1, and goes on to the end.
    let job2 = slurm.sbatch(&s.dir, &["-J", &name, "-o", &out.to_string_lossy()], &script);
    let skip = stopped.lines().count();
    wait_line(&slurm, &out, skip, |l| l.contains(&format!("{name}: restarting generation 1 ")), "restart in the new job");
    finish(&slurm, job2, 0);
    assert_eq!(check_output(&out, ticks).len(), 1);
}

#[test]
fn checkpointed_by_signal_then_requeued_twice() {
    let s = Session::new("slurm-sigreq");
    let slurm = Slurm::start(&s.dir);
    let name = job_name("sigreq");
    let ticks = 70;
    let (job, out) = submit(&slurm, &s, &name, &job_script(&s, &name, "", ticks));
    let mut skip = 0;
    for round in 1..=2u32 {
        let (i, t) = wait_tick(&slurm, &out, skip, 0);
        let (i, _) = wait_tick(&slurm, &out, i, t + 5);
        // The program had reached at least this tick when the signal came
        // (the checkpoint stops it then; the ticks printed before the
        // checkpoint's line came after its snapshot).
        let at = read(&out).lines().filter_map(tick_of).next_back().unwrap();
        slurm.signal_batch(job, "USR1");
        let (i, l) = wait_line(&slurm, &out, i, |l| l.contains("SIGUSR1: checkpointed generation "), "checkpoint on USR1");
        let g: u64 = l.split("generation ").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();
        let (i, t) = wait_tick(&slurm, &out, i, 0);
        wait_tick(&slurm, &out, i, t + 2);
        slurm.requeue(job);
        let (i, l) = wait_line(&slurm, &out, i, |l| l.contains(&format!("{name}: restarting generation ")), "restart after the requeue");
        // The requeue's SIGCONT and SIGTERM reached every process of the
        // job, the program too: ckpt run takes no checkpoint then (it
        // would restart into the program's own end), says so, and the
        // requeued job restarts the signal's generation.
        let restarted: u64 = l.split("generation ").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();
        assert_eq!(restarted, g, "restarted generation {restarted}, not the signal's {g}:\n{}", read(&out));
        // Which of the two ckpt run sees first is a race of the kernel's
        // (seen under load): its own SIGTERM (then it says why it takes no
        // checkpoint) or the program's end by the same SIGTERM (then it
        // says that, with the exit status).
        let said = read(&out);
        assert!(
            said.contains("SIGTERM: no checkpoint: Slurm sent SIGCONT and SIGTERM to every process of the job") || said.contains(&format!("{name}: the program ended (exit status 143)")),
            "no word of the job-wide SIGTERM nor of the program's end by it:\n{said}"
        );
        let (i, resumed) = wait_tick(&slurm, &out, i, 0);
        assert!(resumed >= at, "resumed at tick {resumed}, before the signal's checkpoint at tick {at}:\n{}", read(&out));
        skip = i;
        assert_eq!(slurm.job_field(job, "Restarts"), round.to_string());
    }
    finish(&slurm, job, 2);
    assert_eq!(check_output(&out, ticks).len(), 2);
}

/// The job of an ordinary user (`ckpt-user`, submitting with its own
/// `sbatch`): the computation runs in namespaces of its own, and the
/// restart after a requeue makes fresh ones; checkpointed by USR1 first.
#[test]
fn an_ordinary_users_job_checkpointed_requeued_and_restarted() {
    let cluster = Session::new("slurm-user-cluster");
    let slurm = Slurm::start(&cluster.dir);
    let s = Session::as_user(TEST_USER, "slurm-user");
    let name = job_name("user");
    let ticks = 60;
    let script = job_script(&s, &name, "", ticks);
    let out = s.path(&format!("{name}.out"));
    let mut c = s.user_command("sbatch");
    c.env("SLURM_CONF", &slurm.conf).args(["--parsable", "-J", &name, "-o", &out.to_string_lossy(), "-D", &s.dir.to_string_lossy()]).arg(&script);
    let o = run_with_timeout(c, CMD_TIMEOUT);
    assert!(o.status.success(), "sbatch as {TEST_USER}: {}", text(&o.stderr));
    let job: u32 = text(&o.stdout).trim().parse().unwrap();
    assert_eq!(slurm.job_field(job, "UserId").split('(').next().unwrap(), TEST_USER);
    let (i, t) = wait_tick(&slurm, &out, 0, 5);
    slurm.signal_batch(job, "USR1");
    let (i, _) = wait_line(&slurm, &out, i, |l| l.contains("SIGUSR1: checkpointed generation 1 "), "checkpoint on USR1");
    slurm.requeue(job);
    let (i, _) = wait_line(&slurm, &out, i, |l| l.contains(&format!("{name}: restarting generation 1 ")), "restart after the requeue");
    let (_, resumed) = wait_tick(&slurm, &out, i, 0);
    assert!(resumed >= t, "resumed at tick {resumed}, before the signal at tick {t}");
    finish(&slurm, job, 1);
    assert_eq!(check_output(&out, ticks).len(), 1);
    // The store is the user's, and private.
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(s.store_dir.join(&name).join("catalog.db")).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o777), (s.user.as_ref().unwrap().uid, 0o600));
}

/// Preemption (`PreemptMode=REQUEUE`): a job holding the node's two CPUs
/// in `low` is requeued when a job of `high` needs them, and restarts
/// from its latest `--interval` generation once that one is done.
#[test]
fn preempted_by_a_higher_partition_restarts_from_its_interval_checkpoint() {
    let s = Session::new("slurm-preempt");
    let slurm = Slurm::start(&s.dir);
    let name = job_name("pre");
    // Without a GraceTime, Slurm preempts as it schedules the high job, at
    // once: the job still runs for seconds after.
    let ticks = 150;
    let script = job_script(&s, &name, "--interval 1", ticks);
    let out = s.path(&format!("{name}.out"));
    let job = slurm.sbatch(&s.dir, &["-J", &name, "-c", "2", "-o", &out.to_string_lossy()], &script);
    let (i, _) = wait_tick(&slurm, &out, 0, 5);
    // An --interval generation first: preemption comes at once.
    let until = Instant::now() + Duration::from_secs(30);
    while generations(&s, &name) == 0 {
        assert!(Instant::now() < until, "no --interval checkpoint within 30 s:\n{}", read(&out));
        std::thread::sleep(Duration::from_millis(100));
    }
    let high = s.path("high.sbatch");
    std::fs::write(&high, "#!/bin/bash\nsleep 1\n").unwrap();
    let hi = slurm.sbatch(&s.dir, &["-p", "high", "-c", "2", "-J", "high", "-o", "/dev/null"], &high);
    let (i, _) = wait_line(&slurm, &out, i, |l| l.contains("DUE TO PREEMPTION"), "preemption");
    let (i, l) = wait_line(&slurm, &out, i, |l| l.contains(&format!("{name}: restarting generation ")), "restart after the preemption");
    assert!(!l.contains("generation 0"), "{l}");
    wait_tick(&slurm, &out, i, 0);
    slurm.wait_state(hi, "COMPLETED", Duration::from_secs(60));
    finish(&slurm, job, 1);
    assert_eq!(check_output(&out, ticks).len(), 1);
}

/// An Open MPI job in a batch script, the way a user writes it:
/// `ckpt run --name JOB -- mpirun -np 2 mpi_ring` inside an allocation of
/// two tasks on the node (mpirun reads the allocation from Slurm and
/// starts both ranks itself: no daemon, no srun), rank 0 checking the
/// ring's messages, the allreduce and the running sum every tick.
/// Checkpointed by USR1, requeued (Slurm stops every process of the job),
/// restarted by the next start from the signal's generation, and run to
/// its last tick with the closed-form answer.
#[test]
fn an_mpi_job_signalled_then_requeued_restarts_with_the_right_answer() {
    let prog = program("mpi_ring-openmpi");
    if !prog.is_file() {
        eprintln!("SKIP: {} was not built: Open MPI is not installed (scripts/test.sh installs it)", prog.display());
        return;
    }
    let s = Session::new("slurm-mpi");
    let slurm = Slurm::start(&s.dir);
    let name = job_name("mpi");
    let ticks: u64 = 60;
    let script = s.path(&format!("{name}.sbatch"));
    std::fs::write(
        &script,
        format!(
            "#!/bin/bash\n\
             #SBATCH --ntasks=2 --signal=B:USR1@60 --requeue --open-mode=append\n\
             export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 # as root only\n\
             exec {ckpt} run --name \"$SLURM_JOB_NAME\" --store {store} -- mpirun.openmpi -np 2 {prog} -t {TICK_MS} -n {ticks} -b 256 -m 8\n",
            ckpt = s.ckpt.display(),
            store = s.store_dir.display(),
            prog = prog.display(),
        ),
    )
    .unwrap();
    let (job, out) = submit(&slurm, &s, &name, &script);
    let (i, _) = wait_tick(&slurm, &out, 0, 5);
    let at = read(&out).lines().filter_map(tick_of).next_back().unwrap();
    slurm.signal_batch(job, "USR1");
    let (i, l) = wait_line(&slurm, &out, i, |l| l.contains("SIGUSR1: checkpointed generation 1 "), "checkpoint on USR1");
    assert!(l.contains(&name), "{l}");
    let (i, t) = wait_tick(&slurm, &out, i, 0);
    wait_tick(&slurm, &out, i, t + 2);
    slurm.requeue(job);
    let (i, _) = wait_line(&slurm, &out, i, |l| l.contains(&format!("{name}: restarting generation ")), "restart after the requeue");
    let (_, resumed) = wait_tick(&slurm, &out, i, 0);
    assert!(resumed >= at, "resumed at tick {resumed}, before the signal's checkpoint at tick {at}:\n{}", read(&out));
    finish(&slurm, job, 1);
    assert_eq!(check_output(&out, ticks).len(), 1);
    let t = read(&out);
    let answer = t.lines().rfind(|l| l.starts_with("ANSWER ")).unwrap_or_else(|| panic!("no ANSWER:\n{t}"));
    assert_eq!(answer, format!("ANSWER ticks={ticks} acc={}", 3 * (ticks * (ticks + 1) / 2)), "rank 0's answer after {ticks} ticks:\n{t}");
}

/// `ckpt run -- srun PROG` is refused before anything starts, naming why
/// (the step's tasks are started by slurmstepd, outside ckpt's tree) and
/// what to run instead; so is `ckpt run` as one task of a step of two
/// (`srun -n 2 ckpt run ...`). The job fails with that message.
#[test]
fn srun_under_ckpt_and_ckpt_under_a_multi_task_srun_are_refused() {
    let s = Session::new("slurm-srun");
    let slurm = Slurm::start(&s.dir);
    let prog = program("counter_heap");
    for (what, line, needle) in [
        ("inner", format!("exec {} run --name \"$SLURM_JOB_NAME\" --store {} -- srun {} -n 3", s.ckpt.display(), s.store_dir.display(), prog.display()), "cannot run srun under ckpt"),
        ("outer", format!("srun -n 2 {} run --name \"$SLURM_JOB_NAME\" --store {} -- {} -n 3", s.ckpt.display(), s.store_dir.display(), prog.display()), "of a Slurm job step of 2 tasks"),
    ] {
        let name = job_name(&format!("srun-{what}"));
        let script = s.path(&format!("{name}.sbatch"));
        std::fs::write(&script, format!("#!/bin/bash\n#SBATCH --ntasks=2\n{line}\n")).unwrap();
        let (job, out) = submit(&slurm, &s, &name, &script);
        slurm.wait_state(job, "FAILED", Duration::from_secs(60));
        let t = read(&out);
        assert!(t.contains(needle) && t.contains("in the batch script") && t.contains("nothing was started"), "no clear refusal ({needle:?}) in the job's output:\n{t}");
        assert!(!t.contains("TICK "), "the program ran:\n{t}");
        assert_eq!(generations(&s, &name), 0);
    }
}
