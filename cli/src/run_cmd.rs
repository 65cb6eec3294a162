//! `ckpt run --name NAME -- PROG ARGS...`: one command for a batch job
//! that launches the program the first time and restarts it every later
//! time, and checkpoints it when the batch system signals it.
//!
//! It is glue over `ckpt launch`, `ckpt restart` and the coordinator, none
//! of whose work it does again: it keys the computation by NAME (the store
//! `STORE/NAME`, the coordinator socket `run-NAME.sock` in the per-user
//! runtime directory), starts that coordinator (with `--interval`), looks
//! up the store's latest generation, runs `ckpt launch` (none yet) or
//! `ckpt restart` (the latest) as its child with its own stdio, and stays
//! in the foreground until the program ends, exiting with its status.
//!
//! Signals to this command (the batch script's process after `exec`):
//! - `SIGUSR1`: checkpoint and go on (`#SBATCH --signal=B:USR1@N`, or
//!   Slurm's preemption with `PreemptParameters=send_user_signal`).
//! - `SIGTERM`, `SIGINT`: checkpoint and stop: the computation is
//!   checkpointed if it still runs, then killed; this command exits with
//!   128 + the signal's number, so that the job can be requeued and the
//!   same command restarts it from that generation.
//! - Except when Slurm signals the whole job (a requeue, preemption, time
//!   limit or cancel): it sends `SIGCONT`, then `SIGTERM`, to every process
//!   of the job at once, so the program has the `SIGTERM` too and is
//!   stopping itself (mpirun aborts the job). A checkpoint then would catch
//!   it part way and restart into its end; so after a `SIGCONT` less than
//!   [`JOB_KILL_WINDOW`] before, in a Slurm job, the computation is stopped
//!   without one, and the next start restarts the generation taken before
//!   (`--signal=B:USR1@SECS`, which signals this command alone, or
//!   `--interval`).
//!
//! It never removes or rewrites a generation, and never starts a second
//! copy of a computation of that name that still runs on this machine.

use std::process::{Command, ExitCode, ExitStatus};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ckpt_coordinator::{Address, client};
use ckpt_store::Store;
use nix::sys::signal::{SigSet, Signal};

#[derive(clap::Args)]
pub struct RunArgs {
    /// The computation's name (e.g. "$SLURM_JOB_NAME"): its generations
    /// are in STORE/NAME, its coordinator at run-NAME.sock in the per-user
    /// runtime directory. Letters, digits, '.', '_' and '-'.
    #[arg(long, value_parser = parse_name)]
    pub name: String,
    #[command(flatten)]
    pub store: crate::StoreArg,
    /// The coordinator's address [default: unix:RUNTIME_DIR/run-NAME.sock].
    #[arg(long)]
    pub coord: Option<String>,
    /// Also checkpoint every D: seconds, or a number with s, m, h or d
    /// (10m, 1h; at least 1 s).
    #[arg(long, value_name = "D", value_parser = parse_duration)]
    pub interval: Option<u64>,
    /// The program and its arguments (used by the first run only; a
    /// restart brings back the program the store holds).
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub prog: Vec<String>,
}

/// Longest accepted name (it becomes a socket name and a directory).
const MAX_NAME: usize = 64;

fn parse_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty() && s.len() <= MAX_NAME && !s.starts_with('.') && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if !ok {
        return Err(format!(
            "{s:?} is not a computation name: use 1 to {MAX_NAME} letters, digits, '.', '_' or '-', not starting with '.' (give the job a name like that: sbatch -J NAME)"
        ));
    }
    Ok(s.to_string())
}

/// `90`, `90s`, `10m`, `2h`, `1d` as seconds (at least 1).
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, 's')) => (&t[..i], 1),
        Some((i, 'm')) => (&t[..i], 60),
        Some((i, 'h')) => (&t[..i], 3600),
        Some((i, 'd')) => (&t[..i], 86400),
        _ => (t, 1),
    };
    let v: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration: give seconds, or a number with s, m, h or d (90, 90s, 10m, 2h)"))?;
    let secs = v.checked_mul(mult).ok_or_else(|| format!("{s:?} is too long"))?;
    crate::parse_interval(&secs.to_string())
}

/// The store of computation `name` in the store `base` (a `file://` URL
/// or `s3://BUCKET/PREFIX`): `base/name`.
fn named_store(base: &str, name: &str) -> String {
    format!("{}/{name}", base.trim_end_matches('/'))
}

/// The signals this command acts on.
const HANDLED: [libc::c_int; 4] = [libc::SIGUSR1, libc::SIGTERM, libc::SIGINT, libc::SIGCONT];

/// A `SIGTERM` this soon after a `SIGCONT`, in a Slurm job, is Slurm's
/// signal to every process of the job (see the module doc).
const JOB_KILL_WINDOW: Duration = Duration::from_secs(2);

/// Of those, the ones the coordinator this command starts gets unblocked.
/// It keeps `SIGTERM` and `SIGINT` blocked: Slurm sends `SIGTERM` to every
/// process of the job (the coordinator is one: `slurmstepd` adopts it),
/// and the coordinator must outlive it to take the checkpoint this command
/// asks for then, and to be quit by it. A `SIGKILL` (Slurm's, once
/// `KillWait` is over) still ends it.
const COORD_UNBLOCKED: [libc::c_int; 1] = [libc::SIGUSR1];

fn handled() -> SigSet {
    let mut set = SigSet::empty();
    for s in HANDLED {
        set.add(Signal::try_from(s).expect("a valid signal"));
    }
    set
}

pub fn run(args: RunArgs) -> Result<ExitCode> {
    // Blocked before any thread starts (all inherit the mask) and taken by
    // the signal thread with sigwait; the child gets them unblocked again
    // (a mask survives exec: the program would inherit it).
    handled().thread_block().context("blocking SIGUSR1, SIGTERM, SIGINT and SIGCONT")?;
    let url = named_store(&crate::store_url(&args.store), &args.name);
    let addr: Address = match &args.coord {
        Some(a) => a.parse()?,
        None => {
            let p = ckpt_coordinator::rundir::default_dir().join(format!("run-{}.sock", args.name));
            format!("unix:{}", p.display()).parse()?
        }
    };
    if crate::find_program(&args.prog[0]).is_none() {
        bail!("cannot run {:?}: no such executable; nothing was started", args.prog[0]);
    }
    refuse_slurm_step(&args.prog)?;
    // A coordinator of this name answering here: the computation still
    // runs (never a second copy), or one left by a run that was killed.
    match client::status(&addr, Duration::from_secs(5)) {
        Ok(st) if !st.processes.is_empty() => bail!(
            "a computation named {} already runs on this machine ({} processes, coordinator at {addr}); wait for it to end, or stop it with `ckpt kill --coord {addr}`",
            args.name,
            st.processes.len()
        ),
        Ok(_) => {
            tracing::warn!("a coordinator at {addr} runs no process (left by a run that was killed): stopping it");
            client::quit(&addr, Duration::from_secs(10))?;
            wait_down(&addr);
        }
        Err(ckpt_coordinator::CoordError::Unreachable { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    let latest = {
        let store = Store::open_or_create(&url, ckpt_store::DEFAULT_CHUNK_SIZE)?;
        store.generations()?.last().map(|g| g.id)
    };
    let started = crate::ensure_coordinator(&addr, &url, true, args.interval, &crate::HookArgs::default(), &COORD_UNBLOCKED)?;
    let exe = std::env::current_exe().context("locating the ckpt binary")?;
    let mut cmd = Command::new(exe);
    ckpt_engine::ns::unblock_in(&mut cmd, &HANDLED);
    match latest {
        None => {
            eprintln!("ckpt: {}: no generation in {url} yet: launching {}", args.name, args.prog[0]);
            cmd.args(["launch", "--coord", &addr.to_string(), "--store", &url, "--"]).args(&args.prog);
        }
        Some(g) => {
            eprintln!("ckpt: {}: restarting generation {g} from {url}", args.name);
            cmd.args(["restart", "--coord", &addr.to_string(), "--store", &url, &g.to_string()]);
        }
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            stop_coordinator(&addr, started);
            return Err(anyhow::Error::new(e).context("starting ckpt launch/restart"));
        }
    };
    let shared = Arc::new(Shared { stop: AtomicI32::new(0), ended: Mutex::new(false) });
    {
        let (shared, addr, name, url) = (shared.clone(), addr.clone(), args.name.clone(), url.clone());
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        std::thread::spawn(move || signal_loop(&addr, &name, &url, &shared, pid));
    }
    // Waits for the child's end without reaping it (its pid stays its own
    // while the signal thread may still signal it); a signal being acted
    // on (a checkpoint, a stop) is finished before the coordinator goes,
    // one that comes later finds the run ended.
    use nix::sys::wait::{Id, WaitPidFlag, waitid};
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    while let Err(nix::errno::Errno::EINTR) = waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {}
    *shared.ended.lock().unwrap_or_else(|e| e.into_inner()) = true;
    let status = child.wait().context("waiting for the program")?;
    stop_coordinator(&addr, started);
    let sig = shared.stop.load(Ordering::SeqCst);
    if sig != 0 {
        return Ok(ExitCode::from((128 + sig) as u8));
    }
    let code = exit_code(status);
    eprintln!(
        "ckpt: {}: the program ended (exit status {code}); its generations stay in {url} (a new `ckpt run --name {}` would restart the latest: remove the store, or use another name, to start afresh)",
        args.name, args.name
    );
    Ok(ExitCode::from(code))
}

/// Refuses what ckpt cannot make one computation of under Slurm, before
/// anything is started: `srun` as the program (the job step's tasks are
/// started by `slurmd` and `slurmstepd`, outside ckpt's process tree, and
/// `srun` itself holds TCP connections to those daemons), and this command
/// run as one task of a job step of several (`srun -n 2 ckpt run ...`:
/// each task would be a computation of its own, all under one name).
/// The batch script of `sbatch --ntasks=2` is not refused (its batch step
/// is one task): `ckpt run -- mpirun -np 2 PROG` there launches, as
/// slurm.rs's MPI test shows against a real slurmd.
pub(crate) fn refuse_slurm_step(prog: &[String]) -> Result<()> {
    let base = prog.first().map(|p| p.rsplit('/').next().unwrap_or(p)).unwrap_or_default();
    if base == "srun" {
        bail!(
            "cannot run srun under ckpt: the tasks of a Slurm job step are started by slurmd and slurmstepd, outside ckpt's process tree, so they would not be checkpointed; nothing was started. \
             Run the program itself under ckpt in the batch script (`ckpt run --name \"$SLURM_JOB_NAME\" -- PROG`), and an MPI job with its own launcher on the batch script's node (`ckpt run --name \"$SLURM_JOB_NAME\" -- mpirun -np N PROG`)"
        );
    }
    let tasks = std::env::var("SLURM_STEP_NUM_TASKS").ok().and_then(|v| v.trim().parse::<u64>().ok()).unwrap_or(1);
    if tasks > 1 {
        let task = std::env::var("SLURM_PROCID").unwrap_or_else(|_| "?".into());
        bail!(
            "this is task {task} of a Slurm job step of {tasks} tasks (srun -n {tasks}): each task would run a computation of its own under one name, and the tasks' links to slurmstepd are outside ckpt; nothing was started. \
             Run `ckpt run` once, in the batch script itself (not under srun), with `mpirun -np {tasks} PROG` as its program for an MPI job"
        );
    }
    Ok(())
}

/// What a shell would report for `status`: the code, or 128 + the signal.
fn exit_code(status: ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => c as u8,
        (None, Some(s)) => (128 + s) as u8,
        _ => 1,
    }
}

/// What the signal thread and the waiting main thread share.
struct Shared {
    /// The signal that asked to stop (0: none).
    stop: AtomicI32,
    /// The program has ended: held while a signal is acted on.
    ended: Mutex<bool>,
}

/// Whether a stopping signal that comes now, after a `SIGCONT` at
/// `last_cont`, is a Slurm job's kill of every process (`in_slurm`: this
/// runs in a Slurm job).
fn job_wide(in_slurm: bool, last_cont: Option<Instant>, now: Instant) -> bool {
    in_slurm && last_cont.is_some_and(|t| now.duration_since(t) <= JOB_KILL_WINDOW)
}

/// Takes the handled signals one by one, for as long as the command runs.
/// `child` is the `ckpt launch` (the program itself, once it execs) or
/// `ckpt restart` this command waits for (not reaped before this thread's
/// last use of it: the main thread reaps it).
fn signal_loop(addr: &Address, name: &str, url: &str, shared: &Shared, child: nix::unistd::Pid) {
    let set = handled();
    let in_slurm = std::env::var_os("SLURM_JOB_ID").is_some();
    let mut last_cont = None;
    loop {
        let sig = match set.wait() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("sigwait: {e}");
                return;
            }
        };
        let ended = shared.ended.lock().unwrap_or_else(|e| e.into_inner());
        if *ended {
            return;
        }
        match sig {
            Signal::SIGCONT => last_cont = Some(Instant::now()),
            Signal::SIGUSR1 => {
                if let Err(e) = checkpoint(addr, name, sig) {
                    eprintln!("ckpt: {name}: {e:#}; the program goes on");
                }
            }
            _ => {
                if shared.stop.swap(sig as i32, Ordering::SeqCst) != 0 {
                    continue;
                }
                let latest = || Store::open(url).and_then(|s| s.generations()).ok().and_then(|g| g.last().map(|g| g.id));
                if job_wide(in_slurm, last_cont, Instant::now()) {
                    let next = match latest() {
                        Some(g) => format!("the next `ckpt run --name {name}` restarts generation {g}, taken before"),
                        None => format!("no generation was committed: the next `ckpt run --name {name}` launches the program afresh"),
                    };
                    eprintln!(
                        "ckpt: {name}: {sig}: no checkpoint: Slurm sent SIGCONT and {sig} to every process of the job (a requeue, preemption, time limit or cancel), so the program is stopping itself and a checkpoint now would restart into its end; {next} (checkpoint ahead of it with #SBATCH --signal=B:USR1@SECS or ckpt run --interval)"
                    );
                } else if let Err(e) = checkpoint(addr, name, sig) {
                    match latest() {
                        Some(g) => eprintln!("ckpt: {name}: {e:#}; the next `ckpt run --name {name}` restarts generation {g}, the latest"),
                        None => eprintln!("ckpt: {name}: {e:#}; no generation was committed: the next `ckpt run --name {name}` launches the program afresh"),
                    }
                }
                eprintln!("ckpt: {name}: stopping the program ({sig})");
                if let Err(e) = client::kill(addr, Duration::from_secs(30)) {
                    eprintln!("ckpt: {name}: could not kill the computation: {e}");
                }
                // A program that had not joined the coordinator yet (the
                // signal came right at the start), or a restart under way.
                let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
            }
        }
    }
}

/// One checkpoint of the computation, asked for by `sig`.
fn checkpoint(addr: &Address, name: &str, sig: Signal) -> Result<()> {
    let t = Instant::now();
    // A batch system that signals every process of the job (Slurm at a
    // requeue, preemption or time limit) ends a program that does not
    // handle the signal at once: nothing is left to checkpoint.
    let gone = || format!("{sig}: no checkpoint: the program is gone (it ended, or the same signal killed it: Slurm sends SIGTERM to every process of the job; checkpoint before, with --signal=B:USR1@SECS or --interval)");
    let st = client::status(addr, Duration::from_secs(10)).context("cannot checkpoint")?;
    if st.processes.is_empty() {
        bail!(gone());
    }
    let v = match client::checkpoint(addr, Duration::from_secs(3600)) {
        Ok(v) => v,
        Err(e) => {
            let left = client::status(addr, Duration::from_secs(10)).map(|s| s.processes.len()).unwrap_or(0);
            if left == 0 {
                bail!(gone());
            }
            return Err(anyhow::Error::new(e).context(format!("{sig}: the checkpoint failed")));
        }
    };
    eprintln!("ckpt: {name}: {sig}: checkpointed generation {} in {} ms", v.generation, t.elapsed().as_millis());
    Ok(())
}

/// Stops the coordinator this run started (it has no process left).
fn stop_coordinator(addr: &Address, started: bool) {
    if !started {
        return;
    }
    if let Err(e) = client::quit(addr, Duration::from_secs(10)) {
        tracing::warn!("could not stop the coordinator at {addr}: {e}");
        return;
    }
    wait_down(addr);
}

fn wait_down(addr: &Address) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while client::is_up(addr) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_term_right_after_a_cont_in_a_slurm_job_is_the_job_s_kill() {
        let now = Instant::now();
        let just_before = now.checked_sub(Duration::from_millis(5)).unwrap();
        let long_before = now.checked_sub(JOB_KILL_WINDOW + Duration::from_secs(1)).unwrap();
        assert!(job_wide(true, Some(just_before), now));
        assert!(!job_wide(true, Some(long_before), now), "an old SIGCONT says nothing of this SIGTERM");
        assert!(!job_wide(true, None, now), "scancel --batch --signal=TERM sends no SIGCONT: checkpoint");
        assert!(!job_wide(false, Some(just_before), now), "outside Slurm nothing signals every process");
    }

    #[test]
    fn names_that_cannot_leave_their_directory() {
        for ok in ["simulate", "job-1.a_b", "A"] {
            assert_eq!(parse_name(ok).unwrap(), ok);
        }
        for bad in ["", ".", "..", ".hidden", "a/b", "../x", "a b", "a\nb", "é", &"x".repeat(MAX_NAME + 1)] {
            let e = parse_name(bad).unwrap_err();
            assert!(e.contains("sbatch -J"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), 90);
        assert_eq!(parse_duration("90s").unwrap(), 90);
        assert_eq!(parse_duration("10m").unwrap(), 600);
        assert_eq!(parse_duration("2h").unwrap(), 7200);
        assert_eq!(parse_duration("1d").unwrap(), 86400);
        assert!(parse_duration("0").unwrap_err().contains("too short"));
        assert!(parse_duration("10x").unwrap_err().contains("not a duration"));
        assert!(parse_duration("m").unwrap_err().contains("not a duration"));
        assert!(parse_duration("99999999999999999d").unwrap_err().contains("too long"));
    }

    #[test]
    fn the_named_store_is_under_the_store() {
        assert_eq!(named_store("file:///shared/ckpt", "sim"), "file:///shared/ckpt/sim");
        assert_eq!(named_store("file:///shared/ckpt/", "sim"), "file:///shared/ckpt/sim");
        assert_eq!(named_store("s3://bucket/prefix", "sim"), "s3://bucket/prefix/sim");
    }
}
