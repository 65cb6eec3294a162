//! `ckpt doctor`: what ckpt will do for this user on this machine, and
//! what is missing, each missing thing with its fix.
//!
//! The facts come from trying the real thing where it is cheap (the probes
//! of [`ckpt_engine::probe`] and [`ckpt_engine::dirty`]); the machine's
//! settings are read only to explain a failure. `missing` means launch,
//! checkpoint or restart will fail (exit 1); `note` means they work in a
//! lesser way (the fix says how to get the better one).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use ckpt_coordinator::Address;
use ckpt_engine::dirty::{self, Backend};
use ckpt_engine::probe::{self, ProbeError};
use serde_json::json;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Status {
    Ok,
    Missing,
    Note,
}

impl Status {
    fn name(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Missing => "missing",
            Status::Note => "note",
        }
    }
}

struct Item {
    item: &'static str,
    status: Status,
    detail: String,
    fix: Option<String>,
}

fn item(item: &'static str, status: Status, detail: impl Into<String>, fix: Option<String>) -> Item {
    Item { item, status, detail: detail.into(), fix }
}

const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_CHECKPOINT_RESTORE: u32 = 40;

/// Runs every check and prints them; exit 1 when something is missing.
pub fn run(store_url: &str, coord: &Address, as_json: bool) -> Result<ExitCode> {
    let root = probe::euid() == 0;
    let mut items = vec![dirty_tracking(root), stopper(root), capture(root), restart(root), capabilities(), network(root), store(store_url)];
    items.extend(coordinator(coord));
    if as_json {
        let v: Vec<_> = items.iter().map(|i| json!({"item": i.item, "status": i.status.name(), "detail": i.detail, "fix": i.fix})).collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for i in &items {
            match &i.fix {
                Some(f) => println!("{:<7}  {}: {} — {}", i.status.name(), i.item, i.detail, f),
                None => println!("{:<7}  {}: {}", i.status.name(), i.item, i.detail),
            }
        }
    }
    let missing: Vec<&str> = items.iter().filter(|i| i.status == Status::Missing).map(|i| i.item).collect();
    if missing.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!("ckpt doctor: missing: {}", missing.join(", "));
    Ok(ExitCode::from(1))
}

fn sysctl_is(name: &str, v: &str) -> bool {
    probe::sysctl(name).as_deref() == Some(v)
}

/// Item 1, the backend `ckpt launch --dirty-tracking auto` will use: the
/// agent makes a user-mode-only write-protect userfaultfd if it can, else
/// the coordinator falls back to soft-dirty, else to scanning
/// ([`Backend::choose`]).
fn dirty_tracking(root: bool) -> Item {
    let uffd = dirty::uffd_wp_supported();
    let backend = Backend::choose(ckpt_wire::agent::tracking::AUTO, if uffd { 0 } else { -1 });
    let why_not_uffd = || -> (String, String) {
        let Err(e) = probe::uffd_wp() else { return ("uffd-wp probe disagrees".into(), String::new()) };
        let fix = match e.errno() {
            libc::ENOSYS => "a kernel built with CONFIG_USERFAULTFD".to_string(),
            libc::EPERM if sysctl_is("vm.unprivileged_userfaultfd", "0") && !root => {
                "`sysctl -w vm.unprivileged_userfaultfd=1` (this kernel refuses even user-mode-only userfaultfds: older than 5.11?), or a seccomp policy allowing userfaultfd".to_string()
            }
            libc::EPERM => "allow the userfaultfd system call (a seccomp policy or LSM refuses it)".to_string(),
            libc::EINVAL => "a kernel with UFFD_FEATURE_WP_ASYNC and PAGEMAP_SCAN (Linux 6.7 or later)".to_string(),
            _ => "a kernel with userfaultfd WP_ASYNC (Linux 6.7 or later)".to_string(),
        };
        (format!("uffd-wp unavailable ({e})"), fix)
    };
    let umo = if !root && sysctl_is("vm.unprivileged_userfaultfd", "0") { " (user-mode-only, as vm.unprivileged_userfaultfd=0 requires)" } else { "" };
    match backend {
        Backend::UffdWp => item("dirty-tracking", Status::Ok, format!("auto uses uffd-wp: a write-protect userfaultfd with WP_ASYNC{umo}, read with PAGEMAP_SCAN"), None),
        Backend::SoftDirty => {
            let (why, fix) = why_not_uffd();
            item("dirty-tracking", Status::Ok, format!("auto uses soft-dirty: {why}; soft-dirty bits work"), Some(format!("for uffd-wp: {fix}")))
        }
        Backend::Scan => {
            let (why, fix) = why_not_uffd();
            item(
                "dirty-tracking",
                Status::Note,
                format!("auto uses scan (every present page is read and hashed at each checkpoint): {why}; no soft-dirty bits (CONFIG_MEM_SOFT_DIRTY not set)"),
                Some(format!("{fix}; or a kernel built with CONFIG_MEM_SOFT_DIRTY")),
            )
        }
    }
}

/// 2. How threads are stopped: the ptrace stopper, or the signal fallback.
fn stopper(root: bool) -> Item {
    let yama = probe::sysctl("kernel.yama.ptrace_scope");
    let scope = match yama.as_deref() {
        None => "Yama not present".to_string(),
        Some(s) => format!("Yama ptrace_scope {s}"),
    };
    if std::env::var("CKPT_STOP").as_deref() == Ok("signal") {
        return item("stop", Status::Note, format!("signal fallback, as CKPT_STOP=signal asks ({scope}): interrupted calls return EINTR, a thread blocking every signal cannot be stopped"), Some("unset CKPT_STOP".into()));
    }
    match probe::ptrace_stopper() {
        Ok(()) => {
            let how = if yama.as_deref() == Some("1") { ", the agent naming its tracer with PR_SET_PTRACER" } else { "" };
            item("stop", Status::Ok, format!("ptrace stopper ({scope}{how}): no call returns EINTR"), None)
        }
        Err(e) => {
            let fix = match yama.as_deref() {
                Some("2") => format!("ptrace_scope 2 lets only holders of CAP_SYS_PTRACE trace{}: `sysctl -w kernel.yama.ptrace_scope=1`", if root { "" } else { " (the program has none)" }),
                Some("3") => "ptrace_scope 3 forbids ptrace until reboot: set kernel.yama.ptrace_scope=1 in /etc/sysctl.d and reboot".into(),
                _ => "a process traced by another (gdb, strace) or not dumpable cannot be traced; check the LSM (SELinux, AppArmor) ptrace rules".into(),
            };
            item("stop", Status::Note, format!("signal fallback ({scope}; {e}): interrupted calls return EINTR, a thread blocking every signal cannot be stopped"), Some(fix))
        }
    }
}

/// Capture reads the programs' memory from an ancestor (`process_vm_readv`;
/// for a non-root computation its init, in the computation's user namespace).
fn capture(root: bool) -> Item {
    match probe::read_descendant_memory(!root) {
        Ok(()) => item("capture", Status::Ok, format!("memory of the computation's processes can be read (process_vm_readv{})", if root { "" } else { " from its init, in its user namespace" }), None),
        Err(e) if sysctl_is("kernel.yama.ptrace_scope", "3") => item(
            "capture",
            Status::Missing,
            format!("Yama ptrace_scope 3 refuses reading any process's memory, so no checkpoint can be taken ({e})"),
            Some("set kernel.yama.ptrace_scope=1 in /etc/sysctl.d and reboot (3 cannot be lowered while running)".into()),
        ),
        Err(e) if e.step == "unshare" || e.step.contains("/proc/self") => item("capture", Status::Missing, format!("the computation's user namespace cannot be made: {e}"), Some(explain_namespaces(&e))),
        Err(e) => item("capture", Status::Missing, format!("cannot read a child's memory: {e}"), Some("check the LSM (SELinux, AppArmor) ptrace rules for ckpt".into())),
    }
}

/// Why the namespaces cannot be made, from the settings that forbid them.
fn explain_namespaces(e: &ProbeError) -> String {
    let mut why = Vec::new();
    if sysctl_is("user.max_user_namespaces", "0") {
        why.push("user.max_user_namespaces is 0: `sysctl -w user.max_user_namespaces=15000`".to_string());
    }
    if sysctl_is("kernel.unprivileged_userns_clone", "0") {
        why.push("kernel.unprivileged_userns_clone is 0: `sysctl -w kernel.unprivileged_userns_clone=1`".to_string());
    }
    if sysctl_is("kernel.apparmor_restrict_unprivileged_userns", "1") {
        why.push("kernel.apparmor_restrict_unprivileged_userns is 1: an AppArmor profile for ckpt allowing `userns,`, or `sysctl -w kernel.apparmor_restrict_unprivileged_userns=0`".to_string());
    }
    if e.step.contains("proc") && e.errno() == libc::EPERM {
        let masked = probe::proc_overmounts();
        if !masked.is_empty() {
            why.push(format!("/proc is masked ({} mounted over it, as in a container): the kernel refuses a fresh proc; run the container with an unmasked /proc (e.g. docker --security-opt systempaths=unconfined)", masked.join(", ")));
        }
    }
    if e.errno() == libc::ENOSPC && why.is_empty() {
        why.push("the user namespace limit is reached: raise user.max_user_namespaces (`sysctl -w user.max_user_namespaces=15000`)".to_string());
    }
    if why.is_empty() {
        why.push("no setting explains it: check seccomp or the LSM policy for unshare and mount".to_string());
    }
    why.join("; ")
}

/// 3. How a restart recreates the processes.
fn restart(root: bool) -> Item {
    if root {
        return match probe::namespaces(false, false) {
            Ok(()) => item("restart", Status::Ok, "in place, same PIDs; a fresh PID namespace when one is taken", None),
            Err(e) => item("restart", Status::Note, format!("in place, same PIDs; a PID namespace cannot be made ({e}), so a restart whose PIDs are taken fails"), Some(explain_namespaces(&e))),
        };
    }
    match probe::namespaces(true, false) {
        Ok(()) => item("restart", Status::Ok, "in namespaces of its own (user+pid+mount+ipc), same PIDs inside", None),
        Err(e) => item("restart", Status::Missing, format!("a non-root computation runs in namespaces of its own (user+pid+mount+ipc), and they cannot be made: {e}"), Some(explain_namespaces(&e))),
    }
}

/// The capabilities this process holds (informative).
fn capabilities() -> Item {
    match probe::effective_caps() {
        Ok(c) => {
            let has = |n: u32| if c >> n & 1 == 1 { "yes" } else { "no" };
            item(
                "capabilities",
                Status::Note,
                format!("CAP_CHECKPOINT_RESTORE {}, CAP_SYS_ADMIN {}, CAP_SYS_PTRACE {} (effective set {c:#x})", has(CAP_CHECKPOINT_RESTORE), has(CAP_SYS_ADMIN), has(CAP_SYS_PTRACE)),
                None,
            )
        }
        Err(e) => item("capabilities", Status::Note, format!("capget failed: {e}"), None),
    }
}

/// 4. Which TCP connections come back.
fn network(root: bool) -> Item {
    if root {
        return item("network", Status::Ok, "TCP connections are repaired (TCP_REPAIR)", None);
    }
    let base = "connections among the computation's processes need `--net private`; connections to the outside cannot be repaired without root";
    match probe::namespaces(true, true) {
        Ok(()) => item("network", Status::Note, format!("{base} (a network namespace can be made here)"), None),
        Err(e) => item("network", Status::Note, format!("{base}, and no network namespace can be made here ({e}): `--net private` fails"), Some(explain_namespaces(&e))),
    }
}

/// The nearest existing ancestor of `p`.
fn existing_ancestor(p: &Path) -> Option<PathBuf> {
    p.ancestors().find(|a| a.exists()).map(Path::to_path_buf)
}

fn free(p: &Path) -> String {
    match probe::free_bytes(p) {
        Ok(n) => format!("{} free", crate::human(n)),
        Err(e) => format!("free space unknown ({e})"),
    }
}

/// 5a. The default store (same rules as the other commands).
fn store(url: &str) -> Item {
    use std::os::unix::fs::MetadataExt;
    let Some(path) = url.strip_prefix("file://").map(PathBuf::from) else {
        return item("store", Status::Note, format!("{url} is not a local store: not checked here"), Some("`ckpt verify --metadata-only` checks it".into()));
    };
    match std::fs::symlink_metadata(&path) {
        Ok(md) if !md.is_dir() => item("store", Status::Missing, format!("{} is not a directory", path.display()), Some("remove it or choose another store (--store or CKPT_STORE)".into())),
        Ok(md) if md.uid() != probe::euid() && probe::euid() != 0 => item(
            "store",
            Status::Missing,
            format!("{} belongs to uid {}, not to you", path.display(), md.uid()),
            Some("choose a store of yours (--store or CKPT_STORE)".into()),
        ),
        Ok(md) if md.mode() & 0o077 != 0 => item(
            "store",
            Status::Note,
            format!("{} is mode {:o}, not private; {}", path.display(), md.mode() & 0o7777, free(&path)),
            Some(format!("the next command that opens it makes it 0700, or `chmod -R go= {}`", path.display())),
        ),
        Ok(_) => item("store", Status::Ok, format!("{} exists, private (0700), {}", path.display(), free(&path)), None),
        Err(_) => match existing_ancestor(&path) {
            Some(a) if probe::can_write_dir(&a) => item("store", Status::Ok, format!("{} will be made (0700) under {}, {}", path.display(), a.display(), free(&a)), None),
            Some(a) => item("store", Status::Missing, format!("{} cannot be made: {} is not writable by you", path.display(), a.display()), Some("choose another store (--store or CKPT_STORE)".into())),
            None => item("store", Status::Missing, format!("{} has no existing parent", path.display()), Some("choose another store (--store or CKPT_STORE)".into())),
        },
    }
}

/// 5b. The coordinator socket's directory.
fn coordinator(addr: &Address) -> Option<Item> {
    let Address::Unix(sock) = addr else {
        return Some(item("coordinator", Status::Note, format!("{addr}: a TCP coordinator; its log goes to {}", ckpt_coordinator::rundir::default_dir().display()), None));
    };
    let dir = sock.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    let default = ckpt_coordinator::rundir::default_dir();
    let checked = if dir == default { ckpt_coordinator::rundir::check_private_dir(&dir) } else { ckpt_coordinator::rundir::check_socket_dir(&dir) };
    Some(match checked {
        Ok(()) => item("coordinator", Status::Ok, format!("socket {} in a directory that is safe", sock.display()), None),
        Err(_) if !dir.exists() => match existing_ancestor(&dir) {
            Some(a) if probe::can_write_dir(&a) => item("coordinator", Status::Ok, format!("socket {}: its directory will be made (0700)", sock.display()), None),
            _ => item("coordinator", Status::Missing, format!("socket {}: its directory {} cannot be made", sock.display(), dir.display()), Some("set XDG_RUNTIME_DIR to a private directory or give --coord".into())),
        },
        Err(e) => item("coordinator", Status::Missing, format!("socket {}: {e}", sock.display()), None),
    })
}
