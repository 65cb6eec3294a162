//! Namespaces of a computation's own: how an ordinary user gets its PIDs
//! back, and how root restarts when the old PIDs are taken.
//!
//! Restoring a process with its PID (`clone3` with `set_tid`) needs
//! `CAP_CHECKPOINT_RESTORE` (or `CAP_SYS_ADMIN`) over the PID namespace it
//! is made in, and the PID must be free there. An ordinary user holds no
//! capability over the machine's namespaces, and any PID of the machine may
//! have been taken since the checkpoint. So a computation can live in
//! namespaces made for it ([`Namespaces`]):
//!
//! * a **user** namespace (for non-root) whose only uid and gid are the
//!   user's own, mapped to themselves: the program sees the ids it had, and
//!   its files are its own; other users' ids show as the overflow id
//!   (65534), as everywhere in user namespaces. `setgroups` is denied there
//!   (the kernel's condition for an unprivileged gid map), so supplementary
//!   groups stay what the user's login gave: the restart checks they match.
//! * a **PID** namespace, fresh at every restart, where every PID but 1 is
//!   free; PID 1 is ckpt's own init (see `ckpt`'s `nsinit`), never the
//!   program. A launch's PIDs start after the init's PID on the machine
//!   ([`start_pids_near`]), so two computations do not number their
//!   processes alike.
//! * a **mount** namespace, only to mount a `/proc` that shows that PID
//!   namespace (the program's `/proc/PID` then names its own processes);
//!   nothing else is mounted or hidden.
//! * an **IPC** namespace: the computation's SysV objects and POSIX message
//!   queues are its own, so their ids can be made again.
//! * a **network** namespace only when asked (`--net private`): loopback
//!   only, where TCP connections among the computation's processes can be
//!   repaired (repair needs `CAP_NET_ADMIN` over the namespace of the
//!   socket). Without it the computation uses the machine's network.
//!
//! Capabilities: the process that unshares holds every capability *in the
//! new user namespace* and none outside it; ckpt's init keeps them to serve
//! captures and restarts, hands them to the restorers as ambient
//! capabilities (they need `CAP_CHECKPOINT_RESTORE` for the exe link and
//! `set_tid`), and each restorer drops to the image's credentials as its
//! last step. The program itself is exec'd without any.
//!
//! This module must never mount anything but `/proc` in the new mount
//! namespace, and never unshare in a multi-threaded process.

use std::ffi::CString;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};

/// The namespaces a computation was given beyond PID, mount and IPC
/// (always made).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespaces {
    /// A user namespace mapping the user's uid and gid to themselves.
    pub user: bool,
    /// A network namespace of its own (loopback only).
    pub net: bool,
}

impl Namespaces {
    /// What a launch by the calling user gets by default: a user namespace
    /// unless root.
    pub fn for_caller(net: bool) -> Namespaces {
        // SAFETY: geteuid cannot fail.
        Namespaces { user: unsafe { libc::geteuid() } != 0, net }
    }

    fn flags(self) -> libc::c_int {
        let mut f = libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWIPC;
        if self.user {
            f |= libc::CLONE_NEWUSER;
        }
        if self.net {
            f |= libc::CLONE_NEWNET;
        }
        f
    }

    /// Short words for logs and errors: "user+pid+mount+ipc+net".
    pub fn describe(self) -> String {
        let mut v = Vec::new();
        if self.user {
            v.push("user");
        }
        v.extend(["pid", "mount", "ipc"]);
        if self.net {
            v.push("net");
        }
        v.join("+")
    }
}

static CURRENT: OnceLock<Namespaces> = OnceLock::new();

/// The namespaces this process (ckpt's init) made for its computation; the
/// captures it serves record them in every image.
pub fn current() -> Option<Namespaces> {
    CURRENT.get().copied()
}

fn ns_err(what: String) -> EngineError {
    EngineError::Namespace { what }
}

/// Unshares `ns` in the calling process, which must be single-threaded
/// (a freshly exec'd `ckpt`). Its next child is PID 1 of the new PID
/// namespace; the caller itself stays where it was for PIDs.
pub fn unshare(ns: Namespaces) -> Result<()> {
    // SAFETY: geteuid/getegid cannot fail.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    // SAFETY: unshare takes flags only.
    if unsafe { libc::unshare(ns.flags()) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(ns_err(format!("cannot make {} namespaces: {e}{}", ns.describe(), why_unshare_failed(ns, &e))));
    }
    if ns.user {
        write_proc("/proc/self/setgroups", "deny")?;
        write_proc("/proc/self/uid_map", &format!("{uid} {uid} 1\n"))?;
        write_proc("/proc/self/gid_map", &format!("{gid} {gid} 1\n"))?;
    }
    CURRENT.set(ns).ok();
    Ok(())
}

/// Why `unshare` failed, with the fix, from the settings that forbid it.
fn why_unshare_failed(ns: Namespaces, e: &std::io::Error) -> String {
    let read = |p: &str| std::fs::read_to_string(p).ok().map(|s| s.trim().to_string());
    if ns.user {
        if read("/proc/sys/user/max_user_namespaces").as_deref() == Some("0") {
            return " (user namespaces are disabled: user.max_user_namespaces is 0; as root: `sysctl -w user.max_user_namespaces=15000`)".into();
        }
        if read("/proc/sys/kernel/unprivileged_userns_clone").as_deref() == Some("0") {
            return " (unprivileged user namespaces are disabled: as root, `sysctl -w kernel.unprivileged_userns_clone=1`)".into();
        }
        if read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns").as_deref() == Some("1") {
            return " (AppArmor restricts unprivileged user namespaces: as root, `sysctl -w kernel.apparmor_restrict_unprivileged_userns=0`, or give ckpt an AppArmor profile with `userns,`)".into();
        }
        if e.raw_os_error() == Some(libc::ENOSPC) {
            return " (this user has as many user namespaces as user.max_user_namespaces allows)".into();
        }
        return " (user namespaces are not allowed here: `ckpt doctor` says why; without them only root can restart)".into();
    }
    if e.raw_os_error() == Some(libc::EPERM) {
        return " (making PID namespaces needs root, or a user namespace)".into();
    }
    String::new()
}

fn write_proc(path: &str, what: &str) -> Result<()> {
    std::fs::write(path, what).map_err(|e| ns_err(format!("cannot write {what:?} to {path}: {e}")))
}

/// In PID 1 of the new namespaces: keep mounts from propagating out, mount
/// a `/proc` of this PID namespace, bring loopback up in a network
/// namespace of our own.
pub fn setup_init(ns: Namespaces) -> Result<()> {
    let c = |s: &str| CString::new(s).unwrap();
    let (none, root, proc_, procfs) = (c("none"), c("/"), c("/proc"), c("proc"));
    // SAFETY: mount with NUL-terminated strings and no data.
    if unsafe { libc::mount(none.as_ptr(), root.as_ptr(), std::ptr::null(), libc::MS_REC | libc::MS_PRIVATE, std::ptr::null()) } != 0 {
        return Err(ns_err(format!("cannot make the mounts of the new mount namespace private: {}", std::io::Error::last_os_error())));
    }
    // SAFETY: as above.
    if unsafe { libc::mount(procfs.as_ptr(), proc_.as_ptr(), procfs.as_ptr(), libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC, std::ptr::null()) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(ns_err(format!(
            "cannot mount /proc for the computation's PID namespace: {e} (in a container whose /proc is partly hidden the kernel forbids it; run ckpt where /proc is fully visible, or as root)"
        )));
    }
    if ns.net {
        loopback_up()?;
    }
    Ok(())
}

fn loopback_up() -> Result<()> {
    // SAFETY: a datagram socket only for the interface ioctls; closed below.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(ns_err(format!("cannot bring up loopback: socket: {}", std::io::Error::last_os_error())));
    }
    // SAFETY: ifreq is plain data; zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, b) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *b as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq we own.
    let r = unsafe {
        if libc::ioctl(s, libc::SIOCGIFFLAGS, &mut ifr) != 0 {
            -1
        } else {
            ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            libc::ioctl(s, libc::SIOCSIFFLAGS, &ifr)
        }
    };
    let e = std::io::Error::last_os_error();
    // SAFETY: our socket.
    unsafe { libc::close(s) };
    if r != 0 {
        return Err(ns_err(format!("cannot bring up loopback in the computation's network namespace: {e}")));
    }
    Ok(())
}

/// Makes every permitted capability inheritable and ambient, so that the
/// restorers this process starts keep them across their `exec` (they give
/// them up as their last step). Only in ckpt's init.
pub fn raise_ambient() -> Result<()> {
    let mut hdr = [0x2008_0522u32, 0];
    let mut d = [0u32; 6];
    // SAFETY: capget fills two struct __user_cap_data_struct (6 u32).
    if unsafe { libc::syscall(libc::SYS_capget, hdr.as_mut_ptr(), d.as_mut_ptr()) } != 0 {
        return Err(ns_err(format!("capget: {}", std::io::Error::last_os_error())));
    }
    let permitted = d[1] as u64 | (d[4] as u64) << 32;
    d[2] = d[1];
    d[5] = d[4];
    // SAFETY: capset reads the header and the data we filled.
    if unsafe { libc::syscall(libc::SYS_capset, hdr.as_ptr(), d.as_ptr()) } != 0 {
        return Err(ns_err(format!("cannot make the init's capabilities inheritable: {}", std::io::Error::last_os_error())));
    }
    for cap in (0..64u64).filter(|c| permitted & (1 << c) != 0) {
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_RAISE, cap, 0, 0) } != 0 {
            return Err(ns_err(format!("cannot raise ambient capability {cap}: {}", std::io::Error::last_os_error())));
        }
    }
    Ok(())
}

/// Whether `setgroups` is denied in this process's user namespace (an
/// unprivileged one): groups cannot be set, only kept.
pub fn setgroups_denied() -> bool {
    std::fs::read_to_string("/proc/self/setgroups").is_ok_and(|s| s.trim() == "deny")
}

/// The overflow gid that unmapped groups show as in a user namespace.
pub fn overflow_gid() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/overflowgid").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(65534)
}

/// The signals ckpt's init passes on to its computation (and the process
/// that waits for it outside passes on to the init). `SIGINT` and `SIGQUIT`
/// are not among them: a terminal sends them to its foreground group, the
/// program included, and the waiting process ignores them.
const FORWARDED: [libc::c_int; 5] = [libc::SIGTERM, libc::SIGHUP, libc::SIGUSR1, libc::SIGUSR2, libc::SIGCHLD];

fn forwarded_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is ours.
    unsafe {
        libc::sigemptyset(&mut set);
        for s in FORWARDED {
            libc::sigaddset(&mut set, s);
        }
    }
    set
}

/// Blocks the forwarded signals in the calling thread (and so in every
/// thread it starts later): they are taken with `sigwaitinfo`.
pub fn block_forwarded() {
    let set = forwarded_set();
    // SAFETY: sets the calling thread's mask from a set we own.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// Lets a command started from a thread that blocks the forwarded signals
/// start with none blocked.
pub fn unblock_forwarded_in(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the child between fork and exec and
    // only calls sigprocmask, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let set = forwarded_set();
            libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            Ok(())
        })
    };
}

/// Lets a command started from a thread that blocks `signals` (to take
/// them with `sigwait`, as `ckpt run` does) start with them unblocked, as
/// they were before: a mask is inherited across exec.
pub fn unblock_in(cmd: &mut std::process::Command, signals: &'static [libc::c_int]) {
    use std::os::unix::process::CommandExt;
    if signals.is_empty() {
        return;
    }
    // SAFETY: the closure runs in the child between fork and exec and only
    // calls sigemptyset, sigaddset and sigprocmask on a set on its stack,
    // all async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for &s in signals {
                libc::sigaddset(&mut set, s);
            }
            libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            Ok(())
        })
    };
}

/// Where [`fork_init`] returned.
pub enum Forked {
    /// In the parent, which stays outside: the init's PID.
    Outside(i32),
    /// In the child: PID 1 of the new PID namespace.
    Init,
}

/// Forks the init of the namespaces [`unshare`] made. The calling process
/// must still be single-threaded.
pub fn fork_init() -> Result<Forked> {
    block_forwarded();
    // SAFETY: single-threaded (the caller's contract): the child may run
    // any code.
    match unsafe { libc::fork() } {
        -1 => Err(ns_err(format!("cannot start the computation's init: fork: {}", std::io::Error::last_os_error()))),
        0 => Ok(Forked::Init),
        pid => Ok(Forked::Outside(pid)),
    }
}

/// Outside: waits for the init, passing it the forwarded signals, and
/// returns its exit status (128 + the signal that killed it).
pub fn wait_outside(init: i32) -> i32 {
    // SAFETY: SIG_IGN for two signals: the terminal's interrupt reaches
    // the program itself (it is in the same process group).
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGQUIT, libc::SIG_IGN);
    }
    let set = forwarded_set();
    loop {
        // SAFETY: siginfo_t is plain data the kernel fills.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waits for a signal of `set` (blocked by fork_init).
        let sig = unsafe { libc::sigwaitinfo(&set, &mut info) };
        if sig == libc::SIGCHLD {
            let mut status = 0;
            // SAFETY: our only child.
            if unsafe { libc::waitpid(init, &mut status, libc::WNOHANG) } == init {
                return exit_code(status);
            }
        } else if sig > 0 {
            // SAFETY: the init has a handler (it waits for these).
            unsafe { libc::kill(init, sig) };
        }
    }
}

fn exit_code(status: libc::c_int) -> i32 {
    if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { 128 + libc::WTERMSIG(status) }
}

/// In the init: reaps every process of the namespace until none is left,
/// passing the forwarded signals to all of them, and returns the exit
/// status of the first of `main` (the launched program, or the first
/// restored root) that ended.
pub fn reap_all(main: &[i32]) -> i32 {
    let set = forwarded_set();
    let mut code = None;
    loop {
        loop {
            let mut status = 0;
            // Only this thread's children (__WNOTHREAD): the init's main
            // thread starts the program (or the restored roots) and
            // inherits the orphans; a thread of the capture helper that
            // ptraces a job-stopped process's checkpoint thread
            // (`jobstop::Waker`) must get that thread's stops itself, and a
            // wait of any thread of ours would take them.
            // SAFETY: reaps a child of this thread.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG | libc::__WALL | libc::__WNOTHREAD) };
            if pid > 0 {
                if code.is_none() && main.contains(&pid) {
                    code = Some(exit_code(status));
                }
                continue;
            }
            if pid < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD) {
                return code.unwrap_or(0);
            }
            break;
        }
        // SAFETY: siginfo_t is plain data the kernel fills.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let timeout = libc::timespec { tv_sec: 1, tv_nsec: 0 };
        // SAFETY: waits for a signal of `set`, blocked in every thread.
        let sig = unsafe { libc::sigtimedwait(&set, &mut info, &timeout) };
        if sig > 0 && sig != libc::SIGCHLD {
            // SAFETY: -1 from a PID namespace's init is every other
            // process of the namespace.
            unsafe { libc::kill(-1, sig) };
        }
    }
}

/// In the init of a fresh PID namespace: PIDs up to `highest` are kept for
/// the processes a restart makes with `set_tid`; the init's own threads
/// (and anything else it starts) get PIDs above them.
pub fn keep_pids_up_to(highest: i32) -> Result<()> {
    if highest <= 1 {
        return Ok(());
    }
    write_proc("/proc/sys/kernel/ns_last_pid", &highest.to_string())
}

/// In the init of a launch's fresh PID namespace, whose PID on the
/// machine is `host_pid`: the computation's PIDs start after it rather
/// than at 2. Every computation's namespace would otherwise number its
/// processes the same way (the launched program always 2 or so), and
/// programs that name files in places shared with other computations by
/// their PID collide: two Open MPI jobs of one user in namespaces of their
/// own opened each other's /dev/shm segments (mpirun's PID names them) and
/// crashed. Two live inits have different PIDs on the machine, and each
/// process of a namespace gets a PID no higher there than on the machine,
/// so a computation launched after another one starts above every PID the
/// other had at that moment. A restart makes the recorded PIDs again.
pub fn start_pids_near(host_pid: i32) -> Result<()> {
    if host_pid <= 2 {
        return Ok(());
    }
    write_proc("/proc/sys/kernel/ns_last_pid", &(host_pid - 1).to_string())
}

/// The highest PID or TID `images` needs.
pub fn highest_id(images: &[crate::image::ProcessImage]) -> i32 {
    images
        .iter()
        .flat_map(|i| std::iter::once(i.pid).chain(i.threads.iter().map(|t| t.tid)).chain(i.zombies.iter().map(|z| z.pid)))
        .max()
        .unwrap_or(0)
}
