//! `ckpt`: transparent checkpoint/restart for unmodified Linux programs.
//!
//! This binary is thin glue: argument parsing, finding the coordinator and
//! the store, and printing. The work happens in the library crates
//! (`ckpt-coordinator`, `ckpt-engine`, `ckpt-store`). It must never hold
//! logic a library user would need too.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ckpt_coordinator::protocol::External;
use ckpt_coordinator::{Address, client};
use ckpt_store::Store;
use clap::{Parser, Subcommand};
use serde_json::json;

mod doctor_cmd;
mod generate_cmd;
mod remote_cmd;
mod run_cmd;
mod gc_cmd;
mod key_cmd;
mod nsinit;
mod show_cmd;
mod verify_cmd;

#[derive(Parser)]
#[command(name = "ckpt", version, about = "Transparent checkpoint/restart for unmodified Linux programs, into an incremental, deduplicated image store")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct CoordArg {
    /// Coordinator address: unix:PATH or tcp:HOST:PORT [default: a per-user Unix socket]
    #[arg(long, env = "CKPT_COORD")]
    coord: Option<String>,
}

/// Command hooks (`--hook KIND=CMD`, `--hook-timeout SECS`).
#[derive(clap::Args, Clone, Default)]
struct HookArgs {
    /// Run CMD (with /bin/sh) around checkpoints: KIND is pre-checkpoint
    /// (before the programs are stopped; failing refuses the checkpoint),
    /// post-checkpoint (after each checkpoint, committed or not) or
    /// post-restart (once `ckpt restart` has every process back).
    /// Repeatable; stored with every generation, so a restart runs them again.
    #[arg(long, value_name = "KIND=CMD", value_parser = ckpt_coordinator::hooks::Hooks::parse_arg)]
    hook: Vec<(String, String)>,
    /// Seconds a hook (a command, or a program's callbacks of one event)
    /// may take before it fails [default: 60].
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=86400))]
    hook_timeout: Option<u64>,
}

impl HookArgs {
    fn hooks(&self) -> ckpt_coordinator::hooks::Hooks {
        let mut h = ckpt_coordinator::hooks::Hooks { timeout_s: self.hook_timeout, ..Default::default() };
        for (k, c) in &self.hook {
            h.set(k, c.clone());
        }
        h
    }

    fn args(&self) -> Vec<String> {
        let mut v: Vec<String> = self.hook.iter().flat_map(|(k, c)| ["--hook".to_string(), format!("{k}={c}")]).collect();
        if let Some(t) = self.hook_timeout {
            v.extend(["--hook-timeout".to_string(), t.to_string()]);
        }
        v
    }
}

#[derive(clap::Args, Clone)]
struct StoreArg {
    /// Image store: file:///PATH, a path, or s3://BUCKET/PREFIX [default: $XDG_DATA_HOME/ckpt or ~/.local/share/ckpt]
    #[arg(long, env = "CKPT_STORE")]
    store: Option<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run PROG under checkpoint control (starts a coordinator if none answers).
    Launch {
        #[command(flatten)]
        coord: CoordArg,
        #[command(flatten)]
        store: StoreArg,
        /// Checkpoint every SECS seconds (at least 1).
        #[arg(long, value_name = "SECS", value_parser = parse_interval)]
        interval: Option<u64>,
        /// Dirty-page tracking: auto, soft-dirty, uffd-wp or scan.
        #[arg(long, value_name = "MODE", default_value = "auto")]
        dirty_tracking: String,
        /// Keep the program stopped while its memory is read, instead of
        /// resuming it once a copy-on-write snapshot is forked.
        #[arg(long)]
        no_fork_ckpt: bool,
        /// Run the computation in PID, mount and IPC namespaces of its own
        /// (always for users other than root, who also get a user namespace),
        /// so that every restart can make its PIDs again.
        #[arg(long)]
        pid_namespace: bool,
        /// `private`: a network namespace of the computation's own, loopback
        /// only (TCP connections among its processes can then be restored
        /// without root); `host`: the machine's network.
        #[arg(long, value_name = "host|private", default_value = "host", value_parser = ["host", "private"])]
        net: String,
        #[command(flatten)]
        hooks: HookArgs,
        /// The program and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        prog: Vec<String>,
    },
    /// Launch PROG the first time, restart the latest generation of NAME
    /// every later time, in the foreground (for batch jobs): SIGUSR1
    /// checkpoints and goes on, SIGTERM/SIGINT checkpoint and stop.
    Run {
        #[command(flatten)]
        args: run_cmd::RunArgs,
    },
    /// One node's share of `ckpt run --each-node` (what srun runs on each
    /// node of the job; see `run_cmd.rs`).
    #[command(hide = true)]
    RunShare {
        #[command(flatten)]
        args: run_cmd::ShareArgs,
    },
    /// Checkpoint every process of the computation; prints the generation number once it is durable.
    Checkpoint {
        #[command(flatten)]
        coord: CoordArg,
    },
    /// Show the coordinator, its processes and the last generation.
    Status {
        #[command(flatten)]
        coord: CoordArg,
        #[arg(long)]
        json: bool,
    },
    /// List the generations in the store.
    Log {
        #[command(flatten)]
        store: StoreArg,
        #[arg(long)]
        json: bool,
    },
    /// Restart generation GEN (default: the latest) in the foreground.
    Restart {
        generation: Option<u64>,
        #[command(flatten)]
        coord: CoordArg,
        #[command(flatten)]
        store: StoreArg,
        /// Restart the processes that ran on this host [default: this machine's name].
        /// A generation of one host restarts whole anywhere; one spread over
        /// several hosts restarts host by host.
        #[arg(long, value_name = "NAME")]
        host: Option<String>,
        /// Restart the processes of host OLD on host NEW (repeatable).
        #[arg(long, value_name = "OLD=NEW", value_parser = parse_host_map)]
        host_map: Vec<(String, String)>,
        /// Start nothing: check that every path, file, id and PID the
        /// restart needs is there, and say what would fail.
        #[arg(long)]
        dry_run: bool,
        /// Run the program as soon as its threads' state is back; the rest
        /// of its private memory is served on first touch and filled in the
        /// background by this command, which stays until all of it is in
        /// (needs root, or vm.unprivileged_userfaultfd=1; otherwise the
        /// restart writes all memory first, with a warning).
        #[arg(long)]
        lazy: bool,
        /// Hooks over those stored with the generation (same syntax as `ckpt launch --hook`).
        #[command(flatten)]
        hooks: HookArgs,
    },
    /// Kill every process of the computation.
    Kill {
        #[command(flatten)]
        coord: CoordArg,
    },
    /// Stop the coordinator.
    Quit {
        #[command(flatten)]
        coord: CoordArg,
    },
    /// Copy the local store (--store) to S3, sending only the packs DEST lacks, then the catalog.
    Push {
        /// Destination: s3://BUCKET/PREFIX
        dest: String,
        #[command(flatten)]
        store: StoreArg,
        #[arg(long)]
        json: bool,
    },
    /// Copy an S3 store into the local store (--store), fetching only the packs it lacks, then the catalog.
    Pull {
        /// Source: s3://BUCKET/PREFIX
        src: String,
        #[command(flatten)]
        store: StoreArg,
        #[arg(long)]
        json: bool,
    },
    /// Forget generations by retention policy, delete the data nothing kept needs, repack.
    Gc {
        #[command(flatten)]
        store: StoreArg,
        #[command(flatten)]
        args: gc_cmd::GcArgs,
    },
    /// Read back what generations need and check every blob's BLAKE3 (exit 1 on any problem).
    Verify {
        /// Generation to check [default: all of them, and the whole store]
        generation: Option<u64>,
        /// Every generation and every pack of the store.
        #[arg(long, conflicts_with = "generation")]
        all: bool,
        /// Check the catalog against the packs (presence, sizes, trailers) without reading chunk data.
        #[arg(long)]
        metadata_only: bool,
        #[command(flatten)]
        store: StoreArg,
        #[arg(long)]
        json: bool,
    },
    /// Store maintenance: `ckpt store seal` seals a store made before stores were sealed.
    Store {
        #[command(subcommand)]
        cmd: key_cmd::StoreCmd,
    },
    /// Move a sealed store's key to another machine (the key never enters the store).
    Key {
        #[command(subcommand)]
        cmd: key_cmd::KeyCmd,
    },
    /// Show a generation (default: the latest): processes, threads, regions, parent, bytes.
    Show {
        generation: Option<u64>,
        #[command(flatten)]
        store: StoreArg,
        #[arg(long)]
        json: bool,
    },
    /// Store statistics: logical, distinct and stored bytes; dedup and compression ratios.
    Stats {
        #[command(flatten)]
        store: StoreArg,
        #[arg(long)]
        json: bool,
    },
    /// Serve this machine's share of every checkpoint for a coordinator on
    /// another machine (or in another PID namespace): run once per machine,
    /// in the PID namespace of the programs, as root. Stops when the
    /// coordinator goes away.
    Host {
        /// The coordinator's address, as given to `ckpt launch` on this machine (tcp:HOST:PORT).
        #[arg(long, env = "CKPT_COORD")]
        coord: String,
        /// The name shown in the coordinator's log [default: the host name].
        #[arg(long)]
        name: Option<String>,
    },
    /// ckpt's init in namespaces of a computation's own (started by
    /// `ckpt launch` and `ckpt restart`; see `nsinit.rs`).
    #[command(hide = true)]
    Nsinit {
        #[command(flatten)]
        args: nsinit::NsinitArgs,
    },
    /// Say what ckpt will do for this user on this machine (dirty tracking,
    /// thread stop, restart mode, networking, store) and what is missing,
    /// with the fix; exit 1 when launch, checkpoint or restart would fail.
    Doctor {
        #[command(flatten)]
        coord: CoordArg,
        #[command(flatten)]
        store: StoreArg,
        #[arg(long)]
        json: bool,
    },
    /// Write the man pages or print a shell's completions, made from this
    /// command's definition (run by `scripts/install.sh`).
    #[command(hide = true)]
    Generate {
        #[command(subcommand)]
        what: generate_cmd::GenerateCmd,
    },
    /// Run a coordinator (normally started by `ckpt launch`).
    Coordinator {
        #[command(flatten)]
        coord: CoordArg,
        #[command(flatten)]
        store: StoreArg,
        /// Checkpoint every SECS seconds (at least 1).
        #[arg(long, value_name = "SECS", value_parser = parse_interval)]
        interval: Option<u64>,
        /// Detach from the terminal and run in the background.
        #[arg(long)]
        daemonize: bool,
        #[command(flatten)]
        hooks: HookArgs,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let is_coord = matches!(cli.cmd, Cmd::Coordinator { .. } | Cmd::Host { .. });
    let filter = std::env::var("CKPT_LOG").unwrap_or_else(|_| if is_coord { "info".into() } else { "warn".into() });
    tracing_subscriber::fmt().with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).with_env_filter(tracing_subscriber::EnvFilter::new(filter)).with_writer(std::io::stderr).init();
    match run(cli.cmd) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ckpt: {}", error_report(&e));
            ExitCode::from(1)
        }
    }
}

/// The error and its causes on one line, as `{:#}` prints them, but
/// without a cause that an outer message already quotes (our library
/// errors name their cause in their own text: printing it again says
/// nothing new).
fn error_report(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.is_empty() {
            out = text;
        } else if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

fn coord_addr(a: &CoordArg) -> Result<Address> {
    match &a.coord {
        Some(s) => Ok(s.parse()?),
        None => Ok(Address::default_for_user()),
    }
}

fn store_url(s: &StoreArg) -> String {
    let raw = s.store.clone().unwrap_or_else(|| {
        let base = std::env::var_os("XDG_DATA_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into())).join(".local/share"));
        base.join("ckpt").to_string_lossy().into_owned()
    });
    if raw.contains("://") {
        return raw;
    }
    let p = Path::new(&raw);
    let abs = if p.is_absolute() { p.to_path_buf() } else { std::env::current_dir().map(|d| d.join(p)).unwrap_or_else(|_| p.to_path_buf()) };
    format!("file://{}", abs.display())
}

/// A file ckpt ships (the agent, the restorer), found without any setting:
/// `$ENV` if set, else beside the `ckpt` binary (the build tree,
/// `target/release/`), else in `../lib/ckpt/` from it (the installed
/// layout of `scripts/install.sh`: `PREFIX/bin/ckpt`,
/// `PREFIX/lib/ckpt/NAME`). The binary's path is the kernel's
/// (`/proc/self/exe`), so a symlink to `ckpt` elsewhere finds them too.
fn artifact(name: &str, env: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("locating the ckpt binary")?;
    let candidates = artifact_candidates(&exe, name);
    if let Some(p) = candidates.iter().find(|p| p.is_file()) {
        return Ok(p.clone());
    }
    let looked = candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" and ");
    bail!("cannot find {name} (looked at {looked}); install ckpt whole (`scripts/install.sh PREFIX`), build the whole workspace (`cargo build --release`), or set {env}")
}

/// Where [`artifact`] looks for `name`, in order, for the binary `exe`.
fn artifact_candidates(exe: &Path, name: &str) -> Vec<PathBuf> {
    let Some(bin) = exe.parent() else { return Vec::new() };
    let mut v = vec![bin.join(name)];
    if let Some(prefix) = bin.parent() {
        v.push(prefix.join("lib/ckpt").join(name));
    }
    v
}

fn log_path(addr: &Address) -> PathBuf {
    match addr {
        Address::Unix(p) => p.with_extension("log"),
        Address::Tcp(h) => ckpt_coordinator::rundir::default_dir().join(format!("coordinator-{}.log", h.replace([':', '/'], "_"))),
    }
}

/// Shortest accepted `--interval`: a checkpoint every second at most (0
/// would checkpoint back to back forever).
const MIN_INTERVAL_SECS: u64 = 1;

fn parse_interval(s: &str) -> Result<u64, String> {
    let v: u64 = s.parse().map_err(|e| format!("{s:?} is not a number of seconds: {e}"))?;
    if v < MIN_INTERVAL_SECS {
        return Err(format!(
            "{v} s is too short: the shortest interval is {MIN_INTERVAL_SECS} s (each checkpoint stops the programs and stores their changes; 0 would checkpoint back to back forever); without --interval, checkpoint on demand with `ckpt checkpoint`"
        ));
    }
    Ok(v)
}

/// The executable `prog` runs as (a path, or looked up in `$PATH` like
/// execvp does), if it exists and may be executed.
fn find_program(prog: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let ok = |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if prog.contains('/') {
        let p = PathBuf::from(prog);
        return ok(&p).then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path).map(|d| d.join(prog)).find(|p| ok(p))
}

/// Undo what a launch started when the program cannot run: the coordinator
/// it started (asked to quit, waited for) and the store it created.
fn undo_launch(addr: &Address, started: bool, new_store: Option<&Path>) {
    if !started {
        return;
    }
    if let Err(e) = client::quit(addr, Duration::from_secs(10)) {
        tracing::warn!("could not stop the coordinator this launch started at {addr}: {e}");
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while client::is_up(addr) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Some(dir) = new_store {
        // Only a store with no generation: nothing of value is lost.
        let empty = Store::open(&dir.to_string_lossy()).and_then(|s| s.generations()).is_ok_and(|g| g.is_empty());
        if empty && let Err(e) = std::fs::remove_dir_all(dir) {
            tracing::warn!("could not remove the store {} this launch created: {e}", dir.display());
        }
    }
}

/// Makes sure a coordinator answers at `addr`, using `store` (started in
/// the background if none runs). True if this call started it. `unblock`:
/// signals the caller blocks that the coordinator must not inherit blocked.
fn ensure_coordinator(addr: &Address, store: &str, store_given: bool, interval: Option<u64>, hooks: &HookArgs, unblock: &'static [libc::c_int]) -> Result<bool> {
    // Long enough for a coordinator on a slow link or a busy machine: only
    // a refused connection means none runs there (`CoordError::Unreachable`);
    // a timeout is an error, never a reason to start another.
    match client::hello(addr, Duration::from_secs(10)) {
        Ok(v) => {
            let theirs = v.store;
            if store_given && theirs != store {
                bail!("the coordinator at {addr} uses store {theirs}, not {store}; quit it (`ckpt quit`) or choose another address with --coord");
            }
            if interval.is_some() {
                tracing::warn!("a coordinator already runs at {addr}: --interval is ignored");
            }
            let h = hooks.hooks();
            if !h.is_empty() {
                client::set_hooks(addr, h, Duration::from_secs(10)).context("giving the coordinator this computation's hooks")?;
            }
            return Ok(false);
        }
        Err(ckpt_coordinator::CoordError::Unreachable { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    // A bad store is reported here, not buried in the coordinator's log.
    Store::open_or_create(store, ckpt_store::DEFAULT_CHUNK_SIZE)?;
    let log = log_path(addr);
    // The socket's (and log's) directory is checked before anything is
    // made in it; the log is opened without following a symlink.
    addr.prepare_dir()?;
    let logf = ckpt_coordinator::rundir::open_private_append(&log)?;
    let exe = std::env::current_exe()?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["coordinator", "--daemonize", "--coord", &addr.to_string(), "--store", store]);
    if let Some(i) = interval {
        cmd.args(["--interval", &i.to_string()]);
    }
    cmd.args(hooks.args());
    ckpt_engine::ns::unblock_in(&mut cmd, unblock);
    cmd.env_remove("LD_PRELOAD").stdin(std::process::Stdio::null()).stdout(logf.try_clone()?).stderr(logf);
    let status = cmd.status().context("starting the coordinator")?;
    if !status.success() {
        bail!("the coordinator did not start; see {}", log.display());
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if client::is_up(addr) {
            return Ok(true);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("the coordinator at {addr} did not come up; see {}", log.display())
}

/// What `ckpt launch` runs, and where its agent reports.
pub(crate) struct Launch {
    pub addr: Address,
    pub dirty_tracking: String,
    pub no_fork_ckpt: bool,
    pub prog: Vec<String>,
}

/// The program of a launch, with its agent preloaded and told where the
/// coordinator is (run in place by `ckpt launch`, or by ckpt's init in the
/// computation's namespaces).
pub(crate) fn program_command(l: &Launch) -> Result<std::process::Command> {
    let secret_file = std::env::var_os(ckpt_coordinator::secret::ENV_SECRET_FILE).map(PathBuf::from).map_or_else(ckpt_coordinator::Secret::default_path, Ok)?;
    let secret = ckpt_coordinator::Secret::load(&secret_file).context("loading the coordinator's secret")?;
    let preload = artifact("libckpt_preload.so", "CKPT_PRELOAD")?;
    let mut ld = preload.to_string_lossy().into_owned();
    if let Ok(old) = std::env::var("LD_PRELOAD")
        && !old.is_empty()
    {
        ld = format!("{ld}:{old}");
    }
    // The fds the program gets from outside the computation: named where
    // `ckpt launch` ran (ckpt's init passes the list on, its own fds are
    // not the program's).
    let external = std::env::var(ckpt_engine::fds::ENV_EXTERNAL_FDS).unwrap_or_else(|_| ckpt_engine::fds::describe_external_fds());
    let mut cmd = std::process::Command::new(&l.prog[0]);
    // The computation's membership key: agents prove it to the
    // coordinator over TCP, and over Unix when they run as another
    // user; the secret itself stays in its file.
    cmd.args(&l.prog[1..]).env("LD_PRELOAD", ld)
        .env(ckpt_wire::agent::ENV_COORD, l.addr.to_string())
        .env(ckpt_wire::agent::ENV_AGENT_KEY, secret.agent_key_hex())
        .env(ckpt_wire::agent::ENV_MEMBER_SOCK, l.addr.member_socket().unwrap_or_default())
        // SAFETY: geteuid cannot fail.
        .env(ckpt_wire::agent::ENV_COORD_UID, unsafe { libc::geteuid() }.to_string())
        .env_remove(ckpt_coordinator::secret::ENV_SECRET_FILE)
        .env(ckpt_engine::fds::ENV_EXTERNAL_FDS, external)
        .env(ckpt_wire::agent::ENV_TRACKING, &l.dirty_tracking)
        .env(ckpt_wire::agent::ENV_NO_FORK, if l.no_fork_ckpt { "1" } else { "0" });
    Ok(cmd)
}

fn run(cmd: Cmd) -> Result<ExitCode> {
    match cmd {
        Cmd::Launch { coord, store, interval, dirty_tracking, no_fork_ckpt, pid_namespace, net, hooks, prog } => {
            use ckpt_engine::dirty;
            if dirty::parse_request(&dirty_tracking).is_none() {
                bail!("--dirty-tracking {dirty_tracking:?}: use auto, soft-dirty, uffd-wp or scan");
            }
            if dirty_tracking == "soft-dirty" && !dirty::soft_dirty_supported() {
                bail!("--dirty-tracking soft-dirty: this kernel keeps no soft-dirty bits (built without CONFIG_MEM_SOFT_DIRTY); use uffd-wp, scan or auto");
            }
            if dirty_tracking == "uffd-wp" && !dirty::uffd_wp_supported() {
                bail!("--dirty-tracking uffd-wp: this kernel has no userfaultfd write-protect with WP_ASYNC (Linux 6.7+), or userfaultfd is not allowed here; use soft-dirty, scan or auto");
            }
            let addr = coord_addr(&coord)?;
            let ns = nsinit::for_launch(pid_namespace, net == "private", &addr)?;
            let url = store_url(&store);
            // Before anything is started: a program that cannot be found
            // leaves no coordinator and no store behind.
            if find_program(&prog[0]).is_none() {
                bail!(
                    "cannot run {:?}: no such executable{}; nothing was started",
                    prog[0],
                    if prog[0].contains('/') { String::new() } else { " in $PATH".to_string() }
                );
            }
            // A task of a step over several nodes joins the job's one
            // computation, over TCP (as `ckpt run` in such a step does).
            if let Some(sp) = run_cmd::slurm_step(&prog)?
                && !matches!(addr, Address::Tcp(_))
            {
                bail!(
                    "this is the task of node {} of a Slurm job step over {} nodes: its share of the job joins one coordinator every node reaches, so give --coord tcp:ADDR:PORT (or use `ckpt run`, which starts one); nothing was started",
                    sp.node,
                    sp.nodes
                );
            }
            // The coordinator started below loads the same secret file.
            let secret_file = ckpt_coordinator::Secret::default_path()?;
            ckpt_coordinator::Secret::load_or_create(&secret_file)?;
            // SAFETY: still single-threaded; the coordinator it starts and
            // the program inherit it.
            unsafe { std::env::set_var(ckpt_coordinator::secret::ENV_SECRET_FILE, &secret_file) };
            let new_store = if ckpt_store::remote::is_s3_url(&url) { None } else { ckpt_store::parse_url(&url).ok().filter(|p| !p.exists()) };
            let started = ensure_coordinator(&addr, &url, store.store.is_some(), interval, &hooks, &[])?;
            let launch = Launch { addr: addr.clone(), dirty_tracking, no_fork_ckpt, prog };
            let err = match ns {
                Some(ns) => nsinit::exec_launch(ns, &launch),
                None => match program_command(&launch) {
                    Ok(mut cmd) => cmd.exec().into(),
                    Err(e) => e,
                },
            };
            undo_launch(&addr, started, new_store.as_deref());
            bail!("cannot run {}: {err:#}{}", launch.prog[0], if started { "; the coordinator this launch started was stopped" } else { "" })
        }
        Cmd::Run { args } => run_cmd::run(args),
        Cmd::RunShare { args } => run_cmd::share(args),
        Cmd::Checkpoint { coord } => {
            let addr = coord_addr(&coord)?;
            let v = client::checkpoint(&addr, Duration::from_secs(3600))?;
            println!("{}", v.generation);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status { coord, json } => status(&coord_addr(&coord)?, json),
        Cmd::Log { store, json } => log(&store_url(&store), json),
        Cmd::Restart { generation, coord, store, host, host_map, dry_run, lazy, hooks } => {
            let here = host.unwrap_or_else(this_host);
            if dry_run {
                return restart_dry_run(generation, &coord_addr(&coord)?, &store_url(&store), &here, &host_map);
            }
            restart(generation, &coord_addr(&coord)?, &store_url(&store), store.store.is_some(), &here, &host_map, lazy, &hooks)
        }
        Cmd::Push { dest, store, json } => remote_cmd::push(&store_url(&store), &dest, json),
        Cmd::Pull { src, store, json } => remote_cmd::pull(&src, &store_url(&store), json),
        Cmd::Kill { coord } => {
            let v = client::kill(&coord_addr(&coord)?, Duration::from_secs(10))?;
            eprintln!("killed {}", serde_json::to_string(&v.killed)?);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Quit { coord } => {
            client::quit(&coord_addr(&coord)?, Duration::from_secs(10))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Gc { store, args } => gc_cmd::gc(&store_url(&store), args),
        Cmd::Verify { generation, all, metadata_only, store, json } => verify_cmd::verify(&store_url(&store), generation, all, metadata_only, json),
        Cmd::Key { cmd } => key_cmd::run(cmd).map(|()| ExitCode::SUCCESS),
        Cmd::Store { cmd } => key_cmd::run_store(cmd).map(|()| ExitCode::SUCCESS),
        Cmd::Show { generation, store, json } => show_cmd::show(&store_url(&store), generation, json),
        Cmd::Stats { store, json } => show_cmd::stats(&store_url(&store), json),
        Cmd::Doctor { coord, store, json } => doctor_cmd::run(&store_url(&store), &coord_addr(&coord)?, json),
        Cmd::Host { coord, name } => {
            ckpt_coordinator::run_host(ckpt_coordinator::HostConfig { coord: coord.parse()?, name, ready: None })?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Nsinit { args } => nsinit::run(args),
        Cmd::Generate { what } => {
            generate_cmd::run(what, <Cli as clap::CommandFactory>::command())?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Coordinator { coord, store, interval, daemonize, hooks } => {
            let addr = coord_addr(&coord)?;
            if daemonize {
                // SAFETY: still single-threaded here; the parent exits at once.
                unsafe {
                    match libc::fork() {
                        -1 => bail!("fork: {}", std::io::Error::last_os_error()),
                        0 => {
                            libc::setsid();
                        }
                        _ => {
                            // Return once the coordinator answers, so that
                            // what the caller runs next can reach it.
                            let deadline = std::time::Instant::now() + Duration::from_secs(10);
                            while !client::is_up(&addr) {
                                if std::time::Instant::now() >= deadline {
                                    eprintln!("ckpt: the coordinator at {addr} did not come up within 10 s; see its log");
                                    libc::_exit(1);
                                }
                                std::thread::sleep(Duration::from_millis(10));
                            }
                            libc::_exit(0)
                        }
                    }
                }
            }
            ckpt_coordinator::run(ckpt_coordinator::Config { addr, store_url: store_url(&store), interval: interval.map(Duration::from_secs), fork: true, hooks: hooks.hooks() })?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn status(addr: &Address, as_json: bool) -> Result<ExitCode> {
    let v = match client::status(addr, Duration::from_secs(10)) {
        Ok(v) => v,
        Err(ckpt_coordinator::CoordError::Unreachable { .. }) => {
            if as_json {
                println!("{}", json!({"coordinator": null, "addr": addr.to_string()}));
            } else {
                println!("coordinator: none running at {addr}");
            }
            return Ok(ExitCode::SUCCESS);
        }
        Err(e) => return Err(e.into()),
    };
    if as_json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    let c = &v.coordinator;
    println!("coordinator: {} (pid {}, up {}s{})", c.addr, c.pid, c.uptime_s, match c.interval_s {
        Some(i) => format!(", checkpoint every {i}s"),
        None => String::new(),
    });
    println!("store:       {}", v.store);
    println!("processes:   {}", v.processes.len());
    for p in &v.processes {
        println!(
            "  pid {:>7}  {:<16} host {}  tracking {}{}{}",
            p.pid,
            p.comm,
            p.host,
            p.dirty_tracking,
            if p.fork { ", forked snapshots" } else { "" },
            if p.restored_from > 0 { format!("  (restarted from generation {})", p.restored_from) } else { String::new() }
        );
    }
    match &v.last_generation {
        Some(g) => println!("last generation: {} ({} processes, {} new bytes)", g.id, g.nprocs, g.new_bytes),
        None => println!("last generation: none"),
    }
    if let Some(e) = &v.last_error {
        println!("last error:  {e}");
    }
    Ok(ExitCode::SUCCESS)
}

fn human(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", units[u]) }
}

fn log(url: &str, as_json: bool) -> Result<ExitCode> {
    let store = Store::open(url)?;
    let gens = store.generations()?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&gens)?);
        return Ok(ExitCode::SUCCESS);
    }
    if gens.is_empty() {
        println!("no generations in {url}");
        return Ok(ExitCode::SUCCESS);
    }
    println!("{:>5}  {:<19}  {:>5}  {:>10}  {:>10}  {:>10}  {:>8}  {:<9}  PROCESSES", "GEN", "TIME (UTC)", "PROCS", "LOGICAL", "NEW", "STORED", "TOOK", "TRACKING");
    for g in gens {
        let secs = g.created_ms / 1000;
        // pid@host of each process, from the generation's details.
        let procs: Vec<String> = g.info["processes"]
            .as_array()
            .map(|a| a.iter().map(|p| format!("{}@{}", p["pid"], p["host"].as_str().unwrap_or("?"))).collect())
            .unwrap_or_default();
        println!(
            "{:>5}  {:<19}  {:>5}  {:>10}  {:>10}  {:>10}  {:>6}ms  {:<9}  {}",
            g.id,
            utc(secs),
            g.nprocs,
            human(g.logical_bytes),
            human(g.new_bytes),
            human(g.stored_bytes),
            g.duration_ms,
            g.dirty_tracking,
            procs.join(" ")
        );
    }
    println!("{}", show_cmd::stats_line(&store)?);
    Ok(ExitCode::SUCCESS)
}

/// `YYYY-MM-DD HH:MM:SS` for a Unix time (civil-from-days, UTC).
fn utc(secs: i64) -> String {
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// How long the restart on one host waits for the restarts on the others.
const RESTART_BARRIER_SECS: u64 = 120;

fn parse_host_map(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((old, new)) if !old.is_empty() && !new.is_empty() => Ok((old.to_string(), new.to_string())),
        _ => Err(format!("{s:?} is not OLD=NEW (e.g. --host-map node1=node7)")),
    }
}

/// This machine's host name (as the agents report it).
fn this_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
}

/// `ckpt restart --dry-run`: the restore plan's checks, nothing started.
fn restart_dry_run(generation: Option<u64>, addr: &Address, url: &str, here: &str, host_map: &[(String, String)]) -> Result<ExitCode> {
    let store = Store::open(url)?;
    let (info, _, images) = ckpt_engine::image::load_generation(&store, generation)?;
    let images = ckpt_engine::image::select_host(info.id, images, here, host_map)?;
    let mut problems = Vec::new();
    if let Err(e) = still_running(info.id, &images, addr) {
        problems.push(ckpt_engine::Problem { pid: images.first().map_or(0, |i| i.pid), what: format!("{e:#}") });
    }
    // Where the restart would run: in namespaces of its own, PIDs are free.
    let in_namespaces = match nsinit::for_restart(info.id, &images) {
        Ok(ns) => ns.is_some(),
        Err(_) => false,
    };
    problems.extend(ckpt_engine::restore::dry_run(info.id, &images, in_namespaces));
    // Temporary files kept with the image and gone: made again.
    let notes = ckpt_engine::tmpfiles::would_make(info.id, &images).0;
    if problems.is_empty() {
        let pids: Vec<String> = images.iter().map(|i| i.pid.to_string()).collect();
        println!("generation {} would restart: {} processes (pid {})", info.id, images.len(), pids.join(", "));
        for note in &notes {
            println!("  {note}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    println!("generation {} would not restart:", info.id);
    for p in &problems {
        println!("  {p}");
    }
    Ok(ExitCode::from(1))
}

/// Never a second copy of a computation that still runs: in namespaces
/// of its own, its PIDs would be free for one.
fn still_running(generation: u64, images: &[ckpt_engine::image::ProcessImage], addr: &Address) -> Result<()> {
    // A process killed a moment ago is listed until the coordinator sees
    // its connection close: give it a few seconds to.
    let until = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match client::status(addr, Duration::from_secs(10)) {
            Ok(st) => {
                let Some(img) = images.iter().find(|i| st.processes.iter().any(|p| p.pid == i.pid && p.host == i.host)) else { return Ok(()) };
                if std::time::Instant::now() >= until {
                    bail!(
                        "cannot restart generation {generation}: its process {} (PID {}) still runs in the computation (`ckpt status` lists it); `ckpt kill` it first, or wait for it to exit",
                        img.pid,
                        img.pid
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(ckpt_coordinator::CoordError::Unreachable { .. }) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
}

/// The hosts a generation's processes ran on (by their recorded names).
fn host_names(v: &[ckpt_engine::image::ProcessImage]) -> Vec<String> {
    let mut h: Vec<String> = v.iter().map(|i| i.host.clone()).collect();
    h.sort();
    h.dedup();
    h
}

#[allow(clippy::too_many_arguments)]
fn restart(generation: Option<u64>, addr: &Address, url: &str, store_given: bool, here: &str, host_map: &[(String, String)], lazy: bool, hook_args: &HookArgs) -> Result<ExitCode> {
    let store = Store::open(url)?;
    let (info, _, images) = ckpt_engine::image::load_generation(&store, generation)?;
    // The hooks stored with the generation, under this command's own.
    let hooks = stored_hooks(&info)?.merged(&hook_args.hooks());
    let hosts = host_names(&images);
    let images = ckpt_engine::image::select_host(info.id, images, here, host_map)?;
    // Whose processes these are: a non-root user restarts only its own,
    // refused here before anything (even a coordinator) is started.
    ckpt_engine::creds::check_may_restore(info.id, &images)?;
    still_running(info.id, &images, addr)?;
    // In namespaces of its own (the computation's PIDs are always free
    // there), or in place.
    let ns = nsinit::for_restart(info.id, &images)?;
    ckpt_engine::restore::check_tree(info.id, &images)?;
    artifact("ckpt-restorer", "CKPT_RESTORER")?;
    ensure_coordinator(addr, url, store_given, None, &HookArgs::default(), &[])?;
    if !hooks.is_empty() {
        client::set_hooks(addr, hooks.clone(), Duration::from_secs(10)).context("giving the coordinator the computation's hooks")?;
    }
    // The restarted processes get this command's stdin, stdout and stderr:
    // the coordinator must know them as the computation's outside.
    let stdio: Vec<External> = (0..3)
        .filter_map(|fd| std::fs::read_link(format!("/proc/self/fd/{fd}")).ok().map(|t| External { fd, target: t.to_string_lossy().into_owned() }))
        .collect();
    client::externals(addr, stdio, Duration::from_secs(10)).context("telling the coordinator about this command's stdio")?;
    if let Some(ns) = ns {
        drop(store);
        return Err(nsinit::exec_restart(ns, info.id, &images, addr, url, here, host_map, lazy, &hooks));
    }
    let mut restored = bring_back(&store, info.id, &images, &hosts, addr, lazy, &hooks)?;
    drop(store);
    let server = restored.server.take();
    let mut code = 0;
    for (i, pid) in restored.roots.iter().enumerate() {
        let c = ckpt_engine::restore::wait_exit(*pid);
        if i == 0 {
            code = c;
        }
    }
    // A lazy restart: its page server serves the processes that are left
    // until their memory is all in (they may outlive the roots). If it
    // could not, it killed them and said why; this command fails too.
    if let Some(server) = server
        && let Err(e) = server.wait()
    {
        tracing::debug!("page server: {e}");
        code = if code == 0 { 1 } else { code };
    }
    Ok(ExitCode::from(code as u8))
}

/// The command hooks stored with a generation (`info.hooks`; none in
/// generations older than hooks).
fn stored_hooks(info: &ckpt_store::GenerationInfo) -> Result<ckpt_coordinator::hooks::Hooks> {
    match info.info.get("hooks") {
        None => Ok(Default::default()),
        Some(v) => {
            let h: ckpt_coordinator::hooks::Hooks = serde_json::from_value(v.clone()).with_context(|| format!("generation {}: its stored hooks", info.id))?;
            h.validate().map_err(|e| anyhow::anyhow!("generation {}: its stored hooks: {e}", info.id))?;
            Ok(h)
        }
    }
}

/// Recreates the processes of `images` (those of this host, of a
/// generation that ran on `hosts`) and waits until each is back at the
/// coordinator; then runs the post-restart command hook, if any.
#[allow(clippy::too_many_arguments)]
pub(crate) fn bring_back(
    store: &Store,
    generation: u64,
    images: &[ckpt_engine::image::ProcessImage],
    hosts: &[String],
    addr: &Address,
    lazy: bool,
    hooks: &ckpt_coordinator::hooks::Hooks,
) -> Result<ckpt_engine::restore::Restored> {
    let mine = host_names(images);
    let restorer = artifact("ckpt-restorer", "CKPT_RESTORER")?;
    // Over TCP this command runs each restored agent's handshake and hands
    // it the transport keys (see the preload's channel module).
    let secret = match addr {
        Address::Tcp(_) => Some(ckpt_coordinator::Secret::load(&ckpt_coordinator::Secret::default_path()?).context("loading the coordinator's secret")?),
        Address::Unix(_) => None,
    };
    let connect = || {
        // The connection becomes a restored agent's, which waits on it for
        // as long as the computation runs: no read timeout (it would end
        // the agent's membership after the first quiet spell).
        let io = |e| ckpt_engine::EngineError::io(format!("cannot connect to the coordinator at {addr}"), e);
        match &secret {
            None => addr.connect(Duration::from_secs(10)).and_then(|c| c.set_read_timeout(None).map(|()| (c.into_owned_fd(), Vec::new()))).map_err(io),
            Some(secret) => {
                let (fd, keys) = addr.connect_for_agent(Duration::from_secs(10), secret).map_err(io)?;
                let mut block = generation.to_le_bytes().to_vec();
                if let Some((tx, rx)) = keys {
                    block.extend_from_slice(&tx);
                    block.extend_from_slice(&rx);
                }
                Ok((fd, block))
            }
        }
    };
    // A generation spread over hosts: the restarts on every host meet at the
    // coordinator before their connections go live.
    let before_live = || {
        if hosts.len() > 1 {
            client::restart_barrier(addr, generation, mine.clone(), hosts.to_vec(), Duration::from_secs(RESTART_BARRIER_SECS + 10))
                .map_err(|e| ckpt_engine::EngineError::Restore { generation, what: format!("waiting for the restarts on hosts {}: {e}", hosts.join(", ")) })?;
        }
        Ok(())
    };
    let opts = ckpt_engine::restore::Options { lazy };
    let mut restored = ckpt_engine::restore::restore_generation_with(store, generation, images, &restorer, connect, before_live, opts)?;
    // Each process comes back to the coordinator; a lazy restart's page
    // server may kill them all before (a page it cannot get): that is
    // said at once, not after the coordinator's wait.
    let (back_tx, back) = std::sync::mpsc::channel();
    let (waddr, wpids) = (addr.clone(), restored.all.clone());
    std::thread::spawn(move || {
        let r = wpids.iter().try_for_each(|pid| {
            client::wait_process(&waddr, *pid, Duration::from_secs(30)).with_context(|| format!("restored process {pid} did not come back to the coordinator"))
        });
        let _ = back_tx.send(r);
    });
    loop {
        match back.recv_timeout(Duration::from_millis(20)) {
            Ok(r) => break r?,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => bail!("the wait for the restored processes to come back to the coordinator stopped"),
        }
        if let Some(why) = restored.server.as_ref().and_then(|s| s.failed()) {
            bail!("generation {generation}: the lazy restart killed its processes before they were back at the coordinator: {why}");
        }
    }
    // Processes stopped by job control at the checkpoint come back stopped.
    restored.stop_held().context("bringing back stopped processes stopped")?;
    let list = |v: &[i32]| v.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ");
    eprintln!("ckpt: restarted generation {generation} (pid {})", list(&restored.all));
    if let Some(s) = &restored.server {
        eprintln!("ckpt: lazy restart: {:.1} MiB of memory come on first touch and in the background; this command serves them until all are in", s.bytes as f64 / 1048576.0);
    }
    if let Some(cmd) = &hooks.post_restart {
        let env = ckpt_coordinator::hooks::HookEnv { store: store.url().to_string(), coord: addr.to_string(), pids: restored.all.clone(), generation, ..Default::default() };
        // The programs run again: a failed hook is reported, not undone.
        if let Err(e) = ckpt_coordinator::hooks::run("post-restart", cmd, hooks.timeout(), &env) {
            eprintln!("ckpt: warning: {e}");
        }
    }
    Ok(restored)
}

#[cfg(test)]
mod tests {
    use super::error_report;

    /// An error that names its cause in its own text, as ours do.
    #[derive(Debug)]
    struct Quoting {
        source: std::io::Error,
    }
    impl std::fmt::Display for Quoting {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "cannot talk to X ({}); check Y", self.source)
        }
    }
    impl std::error::Error for Quoting {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.source)
        }
    }

    #[test]
    fn a_cause_already_quoted_is_not_printed_twice() {
        let e = anyhow::Error::from(Quoting { source: std::io::Error::other("timed out") });
        assert_eq!(error_report(&e), "cannot talk to X (timed out); check Y");
        let e = e.context("checkpoint failed");
        assert_eq!(error_report(&e), "checkpoint failed: cannot talk to X (timed out); check Y");
        let plain = anyhow::Error::from(std::io::Error::other("disk full")).context("cannot write pack");
        assert_eq!(error_report(&plain), "cannot write pack: disk full");
    }
}
