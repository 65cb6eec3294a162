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
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
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
    /// In a Slurm job over several nodes: run PROG on each node of the job
    /// (one task per node, through srun), all of them one computation,
    /// checkpointed and restarted together.
    #[arg(long)]
    pub each_node: bool,
    /// The program and its arguments (used by the first run only; a
    /// restart brings back the program the store holds).
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub prog: Vec<String>,
}

/// `ckpt run-share`: what `ckpt run --each-node` has srun run on each node.
#[derive(clap::Args)]
pub struct ShareArgs {
    /// The job's coordinator's port, on node 0 (the address srun runs on,
    /// `SLURM_LAUNCH_NODE_IPADDR`).
    #[arg(long)]
    pub port: u16,
    /// The computation's store (`STORE/NAME`).
    #[arg(long)]
    pub store: String,
    /// The generation to restart (none: launch PROG).
    #[arg(long)]
    pub generation: Option<u64>,
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

/// What this `ckpt run` is to the computation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// The whole computation runs under this command (its child).
    Alone,
    /// `--each-node`: the computation's shares run on the job's `nodes`
    /// nodes, started by srun (this command's child, outside the
    /// computation); this command keeps the coordinator, takes every
    /// checkpoint (signals, `--interval`) once every node's share has
    /// joined, and quits the coordinator once every share has ended.
    EachNode { nodes: u32 },
}

/// How long a node's share waits for the job's coordinator to answer.
const SHARE_WAIT: Duration = Duration::from_secs(30);

pub fn run(args: RunArgs) -> Result<ExitCode> {
    // Blocked before any thread starts (all inherit the mask) and taken by
    // the signal thread with sigwait; the child gets them unblocked again
    // (a mask survives exec: the program would inherit it).
    handled().thread_block().context("blocking SIGUSR1, SIGTERM, SIGINT and SIGCONT")?;
    let url = named_store(&crate::store_url(&args.store), &args.name);
    if crate::find_program(&args.prog[0]).is_none() {
        bail!("cannot run {:?}: no such executable; nothing was started", args.prog[0]);
    }
    refuse_slurm_step(&args.prog)?;
    let role = if args.each_node { Role::EachNode { nodes: job_nodes(|k| std::env::var(k).ok())? } } else { Role::Alone };
    let addr: Address = match (&args.coord, role) {
        (_, Role::EachNode { .. }) => {
            if args.coord.is_some() {
                bail!("--each-node picks the job's coordinator address itself (TCP on node 0, a free port): drop --coord");
            }
            // Every address of node 0: the other nodes reach it by the
            // address srun runs on; the channel is authenticated.
            format!("tcp:0.0.0.0:{}", free_port()?).parse()?
        }
        (Some(a), Role::Alone) => a.parse()?,
        (None, Role::Alone) => {
            let p = ckpt_coordinator::rundir::default_dir().join(format!("run-{}.sock", args.name));
            format!("unix:{}", p.display()).parse()?
        }
    };
    // With --each-node the coordinator's port is new each time: a lock in
    // the runtime directory says whether one of this name runs on this
    // node (held until this command ends; a flock dies with its holder).
    let _lock = match role {
        Role::EachNode { .. } => Some(lock_name(&args.name)?),
        Role::Alone => None,
    };
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
    // With --each-node the interval is this command's (below), from when
    // every node's share has joined: a generation without some node's
    // share could not restart it.
    let coord_interval = if role == Role::Alone { args.interval } else { None };
    let started = crate::ensure_coordinator(&addr, &url, true, coord_interval, &crate::HookArgs::default(), &COORD_UNBLOCKED)?;
    let exe = std::env::current_exe().context("locating the ckpt binary")?;
    let mut cmd = match role {
        Role::Alone => Command::new(&exe),
        Role::EachNode { nodes } => {
            let Address::Tcp(h) = &addr else { unreachable!("--each-node's coordinator is on TCP") };
            let port = h.rsplit(':').next().unwrap_or_default().to_string();
            let mut c = Command::new("srun");
            c.args([format!("--nodes={nodes}"), format!("--ntasks={nodes}"), "--ntasks-per-node=1".into()]);
            c.arg(&exe).args(["run-share", "--port", &port, "--store", &url]);
            if let Some(g) = latest {
                c.args(["--generation", &g.to_string()]);
            }
            c
        }
    };
    ckpt_engine::ns::unblock_in(&mut cmd, &HANDLED);
    let on = match role {
        Role::Alone => String::new(),
        Role::EachNode { nodes } => format!(" on each of the job's {nodes} nodes"),
    };
    match latest {
        None => eprintln!("ckpt: {}: no generation in {url} yet: launching {}{on}", args.name, args.prog[0]),
        Some(g) => eprintln!("ckpt: {}: restarting generation {g} from {url}{on}", args.name),
    }
    match (latest, role) {
        (None, Role::Alone) => {
            cmd.args(["launch", "--coord", &addr.to_string(), "--store", &url, "--"]).args(&args.prog);
        }
        (Some(g), Role::Alone) => {
            cmd.args(["restart", "--coord", &addr.to_string(), "--store", &url, &g.to_string()]);
        }
        (_, Role::EachNode { .. }) => {
            cmd.arg("--").args(&args.prog);
        }
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            stop_coordinator(&addr, started);
            return Err(anyhow::Error::new(e).context(if role == Role::Alone { "starting ckpt launch/restart" } else { "starting srun" }));
        }
    };
    let joined = role == Role::Alone;
    let shared = Arc::new(Shared { stop: AtomicI32::new(0), ended: Mutex::new(false), joined: AtomicBool::new(joined) });
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    {
        let (shared, addr, name, url) = (shared.clone(), addr.clone(), args.name.clone(), url.clone());
        std::thread::spawn(move || signal_loop(&addr, &name, &url, &shared, pid));
    }
    if let Role::EachNode { nodes } = role {
        let (shared, addr, name, interval) = (shared.clone(), addr.clone(), args.name.clone(), args.interval);
        std::thread::spawn(move || each_node_loop(&addr, &name, &shared, nodes, interval));
    }
    // Waits for the child's end without reaping it (its pid stays its own
    // while the signal thread may still signal it); a signal being acted
    // on (a checkpoint, a stop) is finished before the coordinator goes,
    // one that comes later finds the run ended.
    use nix::sys::wait::{Id, WaitPidFlag, waitid};
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

/// The exclusive `flock` of `run-NAME.lock` in the per-user runtime
/// directory: refused if another `ckpt run --each-node --name NAME` holds it.
fn lock_name(name: &str) -> Result<nix::fcntl::Flock<std::fs::File>> {
    use nix::fcntl::{Flock, FlockArg};
    let dir = ckpt_coordinator::rundir::default_dir();
    ckpt_coordinator::rundir::ensure_private_dir(&dir)?;
    let path = dir.join(format!("run-{name}.lock"));
    let f = ckpt_coordinator::rundir::open_private_append(&path)?;
    match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(l),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => bail!(
            "a computation named {name} already runs on this node (another `ckpt run --each-node --name {name}` holds {}); wait for it to end, or give this job another name; nothing was started",
            path.display()
        ),
        Err((_, e)) => Err(anyhow::Error::new(e).context(format!("locking {}", path.display()))),
    }
}

/// A free TCP port (bound, then released for the coordinator).
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("0.0.0.0:0").context("finding a free TCP port for the job's coordinator")?;
    Ok(l.local_addr()?.port())
}

/// The nodes of this Slurm job (`SLURM_JOB_NUM_NODES`), for `--each-node`.
fn job_nodes(env: impl Fn(&str) -> Option<String>) -> Result<u32> {
    if env("SLURM_JOB_ID").is_none() {
        bail!("--each-node runs the program on each node of a Slurm job: this is not in a Slurm job (no SLURM_JOB_ID); nothing was started");
    }
    if env("SLURM_STEP_NUM_TASKS").and_then(|v| v.trim().parse::<u32>().ok()).is_some_and(|t| t > 1) {
        bail!("--each-node starts the job's step itself (srun, one task per node): run `ckpt run --each-node` in the batch script, not under srun; nothing was started");
    }
    match env("SLURM_JOB_NUM_NODES").and_then(|v| v.trim().parse::<u32>().ok()) {
        Some(n) if n >= 1 => Ok(n),
        _ => bail!("--each-node: SLURM_JOB_NUM_NODES ({:?}) is not a number of nodes; nothing was started", env("SLURM_JOB_NUM_NODES")),
    }
}

/// `ckpt run-share`, on each node of the job: this node's share of the
/// computation, launched (no generation yet) or restarted (this node's
/// processes of the generation) at the job's coordinator, on node 0 at the
/// address srun runs on. It becomes `ckpt launch` or `ckpt restart` (exec).
pub fn share(args: ShareArgs) -> Result<ExitCode> {
    use std::os::unix::process::CommandExt;
    let Some(ip) = std::env::var("SLURM_LAUNCH_NODE_IPADDR").ok().and_then(|a| a.trim().parse::<std::net::IpAddr>().ok()) else {
        bail!("ckpt run-share: SLURM_LAUNCH_NODE_IPADDR is not an address: it runs under srun, started by `ckpt run --each-node`");
    };
    let addr: Address = format!("tcp:{}", std::net::SocketAddr::new(ip, args.port)).parse()?;
    let until = Instant::now() + SHARE_WAIT;
    while !client::is_up(&addr) {
        if Instant::now() >= until {
            bail!(
                "no coordinator answers at {addr} after {} s: `ckpt run --each-node` on node 0 started it there; does this node reach node 0 at that address (a firewall)? nothing was started here",
                SHARE_WAIT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let exe = std::env::current_exe().context("locating the ckpt binary")?;
    let mut cmd = Command::new(exe);
    match args.generation {
        None => cmd.args(["launch", "--coord", &addr.to_string(), "--store", &args.store, "--"]).args(&args.prog),
        Some(g) => cmd.args(["restart", "--coord", &addr.to_string(), "--store", &args.store, &g.to_string()]),
    };
    Err(anyhow::Error::new(cmd.exec()).context("starting ckpt launch/restart"))
}

/// The hosts of the coordinator's processes.
fn hosts(addr: &Address) -> Option<std::collections::BTreeSet<String>> {
    let st = client::status(addr, Duration::from_secs(10)).ok()?;
    Some(st.processes.into_iter().map(|p| p.host).collect())
}

/// `--each-node`: waits until the processes of `nodes` hosts have joined
/// (every node's share launched or restarted), then checkpoints every `interval`
/// seconds, if given, until the program ends.
fn each_node_loop(addr: &Address, name: &str, shared: &Shared, nodes: u32, interval: Option<u64>) {
    loop {
        if *shared.ended.lock().unwrap_or_else(|e| e.into_inner()) {
            return;
        }
        if let Some(h) = hosts(addr)
            && h.len() >= nodes as usize
        {
            shared.joined.store(true, Ordering::SeqCst);
            eprintln!("ckpt: {name}: every node's share has joined ({}): checkpoints are on", h.into_iter().collect::<Vec<_>>().join(", "));
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let Some(secs) = interval else { return };
    let mut next = Instant::now() + Duration::from_secs(secs);
    loop {
        std::thread::sleep(next.saturating_duration_since(Instant::now()).min(Duration::from_millis(200)));
        if Instant::now() < next {
            if *shared.ended.lock().unwrap_or_else(|e| e.into_inner()) {
                return;
            }
            continue;
        }
        let ended = shared.ended.lock().unwrap_or_else(|e| e.into_inner());
        if *ended || shared.stop.load(Ordering::SeqCst) != 0 {
            return;
        }
        if let Err(e) = checkpoint(addr, name, "--interval") {
            eprintln!("ckpt: {name}: {e:#}; the program goes on");
        }
        drop(ended);
        next = Instant::now() + Duration::from_secs(secs);
    }
}

/// This task's place in a Slurm job step over several nodes, one task on
/// each: what srun runs for `ckpt run --each-node` (`ckpt run-share`,
/// becoming `ckpt launch --coord tcp:...` of node 0's coordinator), each
/// task its node's share of one computation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Spread {
    /// `SLURM_NODEID`.
    pub node: u32,
    /// `SLURM_STEP_NUM_NODES`.
    pub nodes: u32,
}

/// The Slurm job step this process is a task of, if that is one task on
/// each of several nodes; an error for what ckpt cannot make one
/// computation of, before anything is started: `srun` as the program (the
/// job step's tasks are started by `slurmd` and `slurmstepd`, outside
/// ckpt's process tree, and `srun` itself holds TCP connections to those
/// daemons), and a task of a step of several tasks on one node (`srun -n 2
/// ckpt ...`: each task would be a computation of its own). The batch
/// script of `sbatch --ntasks=2` is not refused (its batch step is one
/// task): `ckpt run -- mpirun -np 2 PROG` there launches, as slurm.rs's MPI
/// test shows against a real slurmd.
pub(crate) fn slurm_step(prog: &[String]) -> Result<Option<Spread>> {
    slurm_step_of(prog, |k| std::env::var(k).ok())
}

/// `ckpt run`'s check: [`slurm_step`], and no step over several nodes
/// either (`--each-node` starts that step itself).
pub(crate) fn refuse_slurm_step(prog: &[String]) -> Result<()> {
    if let Some(Spread { node, nodes }) = slurm_step(prog)? {
        bail!(
            "this is the task of node {node} of a Slurm job step over {nodes} nodes (srun ... ckpt run): each task would run a computation of its own under one name, and a program's pieces that talk across nodes need one; nothing was started. \
             Run `ckpt run --each-node --name NAME -- PROG` once, in the batch script itself (not under srun): it runs PROG on every node of the job through srun, as one computation"
        );
    }
    Ok(())
}

fn slurm_step_of(prog: &[String], env: impl Fn(&str) -> Option<String>) -> Result<Option<Spread>> {
    let base = prog.first().map(|p| p.rsplit('/').next().unwrap_or(p)).unwrap_or_default();
    if base == "srun" {
        bail!(
            "cannot run srun under ckpt: the tasks of a Slurm job step are started by slurmd and slurmstepd, outside ckpt's process tree, so they would not be checkpointed; nothing was started. \
             Run the program itself under ckpt in the batch script (`ckpt run --name \"$SLURM_JOB_NAME\" -- PROG`), on every node of the job with `ckpt run --each-node --name \"$SLURM_JOB_NAME\" -- PROG`, and an MPI job with its own launcher on the batch script's node (`ckpt run --name \"$SLURM_JOB_NAME\" -- mpirun -np N PROG`)"
        );
    }
    let num = |k: &str| env(k).and_then(|v| v.trim().parse::<u32>().ok());
    let tasks = num("SLURM_STEP_NUM_TASKS").unwrap_or(1);
    if tasks <= 1 {
        return Ok(None);
    }
    let nodes = num("SLURM_STEP_NUM_NODES").unwrap_or(1);
    if nodes > 1 && tasks == nodes {
        let Some(node) = num("SLURM_NODEID").filter(|n| *n < nodes) else {
            bail!("this is a task of a Slurm job step of {tasks} tasks on {nodes} nodes, but SLURM_NODEID ({:?}) does not say which node; nothing was started", env("SLURM_NODEID"));
        };
        return Ok(Some(Spread { node, nodes }));
    }
    let task = env("SLURM_PROCID").unwrap_or_else(|| "?".into());
    bail!(
        "this is task {task} of a Slurm job step of {tasks} tasks (srun -n {tasks}): each task would run a computation of its own under one name, and the tasks' links to slurmstepd are outside ckpt; nothing was started. \
         Run `ckpt run` once, in the batch script itself (not under srun), with `mpirun -np {tasks} PROG` as its program for an MPI job, or `--each-node` for a program with a piece on each node"
    )
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
    /// Every node's share has joined the coordinator (always, but with
    /// `--each-node` until they have): checkpoints may be taken.
    joined: AtomicBool,
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
        // Slurm's SIGCONT and SIGTERM come together, and sigwait takes the
        // lowest-numbered pending signal first: SIGTERM (15) before a
        // SIGCONT (18) still pending with it (seen on a loaded machine).
        if matches!(sig, Signal::SIGTERM | Signal::SIGINT) && cont_pending() {
            last_cont = Some(Instant::now());
        }
        let wide = sig != Signal::SIGCONT && sig != Signal::SIGUSR1 && job_wide(in_slurm, last_cont, Instant::now());
        match sig {
            Signal::SIGCONT => last_cont = Some(Instant::now()),
            Signal::SIGUSR1 => {
                if !shared.joined.load(Ordering::SeqCst) {
                    eprintln!("ckpt: {name}: {sig}: no checkpoint: not every node's share of the job has joined yet (a generation without them could not restart them); the program goes on");
                } else if let Err(e) = checkpoint(addr, name, sig.as_str()) {
                    eprintln!("ckpt: {name}: {e:#}; the program goes on");
                }
            }
            _ => {
                if shared.stop.swap(sig as i32, Ordering::SeqCst) != 0 {
                    continue;
                }
                let latest = || Store::open(url).and_then(|s| s.generations()).ok().and_then(|g| g.last().map(|g| g.id));
                if wide {
                    let next = match latest() {
                        Some(g) => format!("the next `ckpt run --name {name}` restarts generation {g}, taken before"),
                        None => format!("no generation was committed: the next `ckpt run --name {name}` launches the program afresh"),
                    };
                    eprintln!(
                        "ckpt: {name}: {sig}: no checkpoint: Slurm sent SIGCONT and {sig} to every process of the job (a requeue, preemption, time limit or cancel), so the program is stopping itself and a checkpoint now would restart into its end; {next} (checkpoint ahead of it with #SBATCH --signal=B:USR1@SECS or ckpt run --interval)"
                    );
                } else if !shared.joined.load(Ordering::SeqCst) {
                    eprintln!("ckpt: {name}: {sig}: no checkpoint: not every node's share of the job has joined yet");
                } else if let Err(e) = checkpoint(addr, name, sig.as_str()) {
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

/// Whether a `SIGCONT` is pending for this thread or the process
/// (`SigPnd`, `ShdPnd` of `/proc/thread-self/status`).
fn cont_pending() -> bool {
    let status = std::fs::read_to_string("/proc/thread-self/status").unwrap_or_default();
    status.lines().filter_map(|l| l.strip_prefix("SigPnd:").or_else(|| l.strip_prefix("ShdPnd:"))).any(|m| mask_has(m, libc::SIGCONT))
}

/// Whether the hex signal mask `mask` (as in `/proc/PID/status`) holds
/// signal `sig`.
fn mask_has(mask: &str, sig: libc::c_int) -> bool {
    u64::from_str_radix(mask.trim(), 16).is_ok_and(|m| (1..=64).contains(&sig) && m & (1u64 << (sig - 1)) != 0)
}

/// One checkpoint of the computation, asked for by `what` (a signal's
/// name, or `--interval`).
fn checkpoint(addr: &Address, name: &str, what: &str) -> Result<()> {
    let t = Instant::now();
    // A batch system that signals every process of the job (Slurm at a
    // requeue, preemption or time limit) ends a program that does not
    // handle the signal at once: nothing is left to checkpoint.
    let gone = || format!("{what}: no checkpoint: the program is gone (it ended, or the same signal killed it: Slurm sends SIGTERM to every process of the job; checkpoint before, with --signal=B:USR1@SECS or --interval)");
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
            return Err(anyhow::Error::new(e).context(format!("{what}: the checkpoint failed")));
        }
    };
    eprintln!("ckpt: {name}: {what}: checkpointed generation {} in {} ms", v.generation, t.elapsed().as_millis());
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

    fn env_of<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn slurm_steps_one_task_per_node_and_the_rest() {
        let prog = vec!["prog".to_string()];
        assert_eq!(slurm_step_of(&prog, env_of(&[])).unwrap(), None, "outside Slurm");
        assert_eq!(slurm_step_of(&prog, env_of(&[("SLURM_STEP_NUM_TASKS", "1"), ("SLURM_STEP_NUM_NODES", "1")])).unwrap(), None, "a batch step");
        let two = [("SLURM_STEP_NUM_TASKS", "2"), ("SLURM_STEP_NUM_NODES", "2"), ("SLURM_NODEID", "1")];
        assert_eq!(slurm_step_of(&prog, env_of(&two)).unwrap(), Some(Spread { node: 1, nodes: 2 }));
        let e = slurm_step_of(&prog, env_of(&[("SLURM_STEP_NUM_TASKS", "2"), ("SLURM_STEP_NUM_NODES", "1"), ("SLURM_PROCID", "1")])).unwrap_err().to_string();
        assert!(e.contains("task 1 of a Slurm job step of 2 tasks") && e.contains("--each-node"), "{e}");
        let e = slurm_step_of(&prog, env_of(&[("SLURM_STEP_NUM_TASKS", "4"), ("SLURM_STEP_NUM_NODES", "2")])).unwrap_err().to_string();
        assert!(e.contains("of 4 tasks"), "two tasks on a node: {e}");
        let e = slurm_step_of(&prog, env_of(&[("SLURM_STEP_NUM_TASKS", "2"), ("SLURM_STEP_NUM_NODES", "2"), ("SLURM_NODEID", "7")])).unwrap_err().to_string();
        assert!(e.contains("SLURM_NODEID"), "{e}");
        let e = slurm_step_of(&["/usr/bin/srun".to_string()], env_of(&[])).unwrap_err().to_string();
        assert!(e.contains("cannot run srun under ckpt") && e.contains("--each-node"), "{e}");
    }

    #[test]
    fn each_node_runs_in_a_batch_script_only() {
        let batch = [("SLURM_JOB_ID", "7"), ("SLURM_JOB_NUM_NODES", "3")];
        assert_eq!(job_nodes(env_of(&batch)).unwrap(), 3);
        assert!(job_nodes(env_of(&[])).unwrap_err().to_string().contains("not in a Slurm job"));
        let task = [("SLURM_JOB_ID", "7"), ("SLURM_JOB_NUM_NODES", "2"), ("SLURM_STEP_NUM_TASKS", "2")];
        assert!(job_nodes(env_of(&task)).unwrap_err().to_string().contains("not under srun"));
        assert!(job_nodes(env_of(&[("SLURM_JOB_ID", "7"), ("SLURM_JOB_NUM_NODES", "x")])).unwrap_err().to_string().contains("SLURM_JOB_NUM_NODES"));
    }

    #[test]
    fn signal_masks() {
        assert!(mask_has("0000000000020000", libc::SIGCONT));
        assert!(mask_has("0000000000024000", libc::SIGTERM));
        assert!(!mask_has("0000000000004000", libc::SIGCONT));
        assert!(!mask_has("zz", libc::SIGCONT));
        assert!(!cont_pending(), "no SIGCONT is pending for the test's thread");
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
