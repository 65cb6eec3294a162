//! ckpt's init: PID 1 of the namespaces a computation of its own lives in
//! (see `ckpt_engine::ns` for which, and why).
//!
//! `ckpt launch` (by a user other than root, or with `--pid-namespace` /
//! `--net private`) and `ckpt restart` of such a computation exec `ckpt
//! nsinit`: a fresh, single-threaded process, which unshares the
//! namespaces and forks their init, then waits outside for it, passing on
//! `SIGTERM`, `SIGHUP`, `SIGUSR1` and `SIGUSR2`, and exits with its status.
//!
//! The init mounts the namespace's `/proc`, runs the capture helper of
//! `ckpt host` in a thread (the coordinator, outside, cannot read
//! processes of a PID namespace it does not see), and then either starts
//! the program (PID 2) or restores the generation with its PIDs. From then
//! on it reaps every process of the namespace and passes signals on to
//! all of them; it ends when the last of them does (the kernel would kill
//! them all with it), with the status of the program (or, after a restart,
//! of the first restored process whose parent was outside).
//!
//! The init must never give the program a capability: the launched program
//! is exec'd by a non-root uid (which drops them all), and restored
//! processes get exactly the image's credentials from their restorer.

use std::os::unix::process::CommandExt;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use ckpt_coordinator::Address;
use ckpt_engine::image::ProcessImage;
use ckpt_engine::ns::{self, Namespaces};
use ckpt_store::Store;

use crate::{Launch, bring_back, host_names, program_command};

/// The arguments `ckpt launch`/`ckpt restart` give `ckpt nsinit`.
#[derive(clap::Args)]
pub struct NsinitArgs {
    /// Make a user namespace (identity-mapped uid and gid).
    #[arg(long)]
    user: bool,
    /// Make a network namespace (loopback only).
    #[arg(long)]
    net: bool,
    #[arg(long)]
    coord: String,
    /// Restore this generation instead of launching a program.
    #[arg(long, value_name = "GEN")]
    restart: Option<u64>,
    #[arg(long)]
    store: Option<String>,
    /// The highest PID or TID the restart makes (the init's own threads
    /// take PIDs above it).
    #[arg(long, default_value_t = 0)]
    keep_pids: i32,
    #[arg(long)]
    host: Option<String>,
    #[arg(long, value_name = "OLD=NEW", value_parser = crate::parse_host_map)]
    host_map: Vec<(String, String)>,
    #[arg(long, default_value = "auto")]
    dirty_tracking: String,
    /// A lazy restart (`ckpt restart --lazy`).
    #[arg(long)]
    lazy: bool,
    #[arg(long)]
    no_fork_ckpt: bool,
    /// The computation's command hooks (JSON), for the post-restart one.
    #[arg(long)]
    hooks: Option<String>,
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    prog: Vec<String>,
}

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The namespaces a launch gets: always for users other than root, for
/// root when asked.
pub fn for_launch(pid_namespace: bool, net_private: bool, addr: &Address) -> Result<Option<Namespaces>> {
    if is_root() && !pid_namespace && !net_private {
        return Ok(None);
    }
    if net_private && matches!(addr, Address::Tcp(_)) {
        bail!("--net private: the computation's network namespace cannot reach a TCP coordinator ({addr}); use a Unix address (the default), or --net host");
    }
    Ok(Some(Namespaces::for_caller(net_private)))
}

/// The namespaces a restart makes: those the generation had (a user
/// namespace only for a user other than root), a user namespace for any
/// restart by a user other than root, and, for root, PID namespaces of
/// its own when a PID of the generation is taken.
pub fn for_restart(generation: u64, images: &[ProcessImage]) -> Result<Option<Namespaces>> {
    let recorded = images.iter().find_map(|i| i.namespaces);
    let net = recorded.is_some_and(|n| n.net);
    if !is_root() {
        return Ok(Some(Namespaces { user: true, net }));
    }
    if recorded.is_some() {
        return Ok(Some(Namespaces { user: false, net }));
    }
    for img in images {
        match ckpt_engine::restore::check_ids_free(generation, img) {
            Ok(()) => {}
            Err(e @ ckpt_engine::EngineError::IdTaken { .. }) if holds_original(img) => return Err(e.into()),
            Err(ckpt_engine::EngineError::IdTaken { what, .. }) => {
                eprintln!("ckpt: {what} is taken by another process: generation {generation} restarts in PID, mount and IPC namespaces of its own");
                return Ok(Some(Namespaces { user: false, net: false }));
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(None)
}

/// Whether the process that holds the PID of `img` runs the same
/// executable: the original, most likely, outside any coordinator (a
/// restart would be a second copy of it).
fn holds_original(img: &ProcessImage) -> bool {
    std::fs::read_link(format!("/proc/{}/exe", img.pid)).is_ok_and(|e| e.to_string_lossy() == img.exe)
}

fn nsinit_command(ns: Namespaces, addr: &Address) -> Result<std::process::Command> {
    let exe = std::env::current_exe().context("locating the ckpt binary")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("nsinit").args(["--coord", &addr.to_string()]);
    if ns.user {
        cmd.arg("--user");
    }
    if ns.net {
        cmd.arg("--net");
    }
    // ckpt's own processes never carry the agent.
    cmd.env_remove("LD_PRELOAD");
    Ok(cmd)
}

/// Replaces `ckpt launch` by `ckpt nsinit` launching `l` in `ns`; returns
/// only if that cannot be run.
pub fn exec_launch(ns: Namespaces, l: &Launch) -> anyhow::Error {
    let mut cmd = match nsinit_command(ns, &l.addr) {
        Ok(c) => c,
        Err(e) => return e,
    };
    cmd.args(["--dirty-tracking", &l.dirty_tracking]);
    if l.no_fork_ckpt {
        cmd.arg("--no-fork-ckpt");
    }
    // The fds the program inherits from outside, named here, where they
    // are the launch's (the init's own are not the program's).
    cmd.env(ckpt_engine::fds::ENV_EXTERNAL_FDS, ckpt_engine::fds::describe_external_fds());
    cmd.arg("--").args(&l.prog);
    anyhow!(cmd.exec()).context(format!("cannot start ckpt's init for {} namespaces", ns.describe()))
}

/// Replaces `ckpt restart` by `ckpt nsinit` restoring `generation` in
/// `ns`; returns only if that cannot be run.
#[allow(clippy::too_many_arguments)]
pub fn exec_restart(
    ns: Namespaces,
    generation: u64,
    images: &[ProcessImage],
    addr: &Address,
    url: &str,
    here: &str,
    host_map: &[(String, String)],
    lazy: bool,
    hooks: &ckpt_coordinator::hooks::Hooks,
) -> anyhow::Error {
    let mut cmd = match nsinit_command(ns, addr) {
        Ok(c) => c,
        Err(e) => return e,
    };
    cmd.args(["--restart", &generation.to_string(), "--store", url, "--host", here, "--keep-pids", &ns::highest_id(images).to_string()]);
    for (old, new) in host_map {
        cmd.args(["--host-map", &format!("{old}={new}")]);
    }
    if lazy {
        cmd.arg("--lazy");
    }
    if !hooks.is_empty() {
        match serde_json::to_string(hooks) {
            Ok(j) => {
                cmd.args(["--hooks", &j]);
            }
            Err(e) => return e.into(),
        }
    }
    anyhow!(cmd.exec()).context(format!("cannot start ckpt's init for {} namespaces", ns.describe()))
}

/// `ckpt nsinit`: see the module doc.
pub fn run(a: NsinitArgs) -> Result<ExitCode> {
    let ns = Namespaces { user: a.user, net: a.net };
    if let Err(e) = ns::unshare(ns) {
        if a.restart.is_some() || !a.user || a.net {
            return Err(e.into());
        }
        // A launch by a user where user namespaces are not allowed: the
        // program runs in the machine's namespaces, and is checkpointed as
        // well; only its restart needs what is missing.
        eprintln!("ckpt: warning: {e}; the program runs in the machine's namespaces: checkpoints work, but restarting them needs root, or the fix above");
        let launch = Launch { addr: a.coord.parse()?, dirty_tracking: a.dirty_tracking, no_fork_ckpt: a.no_fork_ckpt, prog: a.prog };
        let err = program_command(&launch)?.exec();
        bail!("cannot run {}: {err}", launch.prog[0]);
    }
    match ns::fork_init()? {
        ns::Forked::Outside(init) => return Ok(ExitCode::from(ns::wait_outside(init) as u8)),
        ns::Forked::Init => {}
    }
    // Our PID on the machine, while /proc is still the machine's.
    let host_pid: Option<i32> = std::fs::read_link("/proc/self").ok().and_then(|p| p.to_str()?.parse().ok());
    ns::setup_init(ns)?;
    ns::keep_pids_up_to(a.keep_pids)?;
    if a.restart.is_none()
        && let Some(pid) = host_pid
    {
        ns::start_pids_near(pid)?;
    }
    // Before any thread exists: every thread of the init (the restore
    // driver's too) then hands its capabilities to the restorers it starts.
    if a.restart.is_some() {
        ns::raise_ambient()?;
    }
    let addr: Address = a.coord.parse()?;
    let (ready, welcomed) = std::sync::mpsc::channel();
    let helper_addr = addr.clone();
    std::thread::spawn(move || {
        if let Err(e) = ckpt_coordinator::run_host(ckpt_coordinator::HostConfig { coord: helper_addr, name: None, ready: Some(ready) }) {
            eprintln!("ckpt: the capture helper of the computation's namespaces stopped: {e}; checkpoints of it fail until it is restarted");
        }
    });
    welcomed
        .recv_timeout(Duration::from_secs(30))
        .map_err(|_| anyhow!("the coordinator at {addr} did not take the capture helper of the computation's namespaces; see the coordinator's log"))?;
    // A lazy restart's page server lives here (the init outlives every
    // process of the computation) until all memory is in.
    let mut server = None;
    let main = match a.restart {
        Some(generation) => {
            let url = a.store.context("nsinit --restart needs --store")?;
            let store = Store::open(&url)?;
            let (info, _, images) = ckpt_engine::image::load_generation(&store, Some(generation))?;
            let hosts = host_names(&images);
            let here = a.host.unwrap_or_else(crate::this_host);
            let images = ckpt_engine::image::select_host(info.id, images, &here, &a.host_map)?;
            for img in &images {
                ckpt_engine::restore::check_ids_free(info.id, img)?;
            }
            let hooks: ckpt_coordinator::hooks::Hooks = match &a.hooks {
                Some(j) => serde_json::from_str(j).context("nsinit --hooks")?,
                None => Default::default(),
            };
            let mut restored = bring_back(&store, info.id, &images, &hosts, &addr, a.lazy, &hooks)?;
            server = restored.server.take();
            restored.roots
        }
        None => {
            if a.prog.is_empty() {
                bail!("nsinit: no program to launch");
            }
            let launch = Launch { addr, dirty_tracking: a.dirty_tracking, no_fork_ckpt: a.no_fork_ckpt, prog: a.prog };
            let mut cmd = program_command(&launch)?;
            ns::unblock_forwarded_in(&mut cmd);
            let child = cmd.spawn().with_context(|| format!("cannot run {}", launch.prog[0]))?;
            vec![child.id() as i32]
        }
    };
    let mut code = ns::reap_all(&main);
    // The page server killed the computation and said why if it failed:
    // the restart fails too.
    if let Some(Err(e)) = server.map(|s| s.wait()) {
        tracing::debug!("page server: {e}");
        code = if code == 0 { 1 } else { code };
    }
    Ok(ExitCode::from(code as u8))
}
