//! Cheap probes of what this user may do on this machine, for `ckpt
//! doctor`. Each tries the real thing ckpt will do (in a child process that
//! exits at once, so the caller is left as it was) and, when it fails,
//! names the step and its errno; the caller explains the failure from the
//! machine's settings ([`sysctl`]).
//!
//! The children run only raw async-signal-safe calls between `fork` and
//! `_exit` (no allocation: every buffer is made before the fork), so the
//! probes are safe to run from a threaded program.
//!
//! What it must never do: change anything outside the children it starts
//! (no sysctl is written, every namespace dies with its child).

use ckpt_wire::uapi::*;

/// A probe's failed step and the kernel's answer.
#[derive(Debug, thiserror::Error)]
#[error("{step}: {source}")]
pub struct ProbeError {
    /// What was tried (`unshare(CLONE_NEWUSER|…)`, `mount proc`…).
    pub step: &'static str,
    #[source]
    pub source: std::io::Error,
}

impl ProbeError {
    /// The errno of the failed step (0 when the child died without a word).
    pub fn errno(&self) -> i32 {
        self.source.raw_os_error().unwrap_or(0)
    }
}

/// A setting under `/proc/sys` (`"user.max_user_namespaces"`), trimmed;
/// None when this kernel has no such setting.
pub fn sysctl(name: &str) -> Option<String> {
    let path = format!("/proc/sys/{}", name.replace('.', "/"));
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

/// The effective uid of the calling process.
pub fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// The effective capability set of the calling thread (`capget`), bit `n`
/// for capability `n`.
pub fn effective_caps() -> std::io::Result<u64> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let mut h = Header { version: VERSION_3, pid: 0 };
    let mut d = [Data::default(); 2];
    // SAFETY: capget fills the header and two data structs of the v3 layout we own.
    let r = unsafe { libc::syscall(libc::SYS_capget, &mut h as *mut Header, d.as_mut_ptr()) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(d[0].effective as u64 | (d[1].effective as u64) << 32)
}

/// Steps a child reports, by index (0: success).
const STEPS: [&str; 12] = [
    "ok",
    "unshare",
    "write /proc/self/setgroups (deny)",
    "write /proc/self/uid_map",
    "write /proc/self/gid_map",
    "mount --make-rprivate /",
    "fork PID 1 of the new PID namespace",
    "the first child is not PID 1",
    "mount proc on /proc",
    "PTRACE_SEIZE of the parent by its child (the ptrace stopper's tracer)",
    "fork",
    "process_vm_readv of a child",
];
const OK: u32 = 0;
const UNSHARE: u32 = 1;
const SETGROUPS: u32 = 2;
const UID_MAP: u32 = 3;
const GID_MAP: u32 = 4;
const MAKE_PRIVATE: u32 = 5;
const FORK_INIT: u32 = 6;
const NOT_PID1: u32 = 7;
const MOUNT_PROC: u32 = 8;
const SEIZE: u32 = 9;
const FORK: u32 = 10;
const READ_MEM: u32 = 11;

/// Child side: sends (step, errno) and exits. Async-signal-safe.
fn report(fd: i32, step: u32, errno: i32) -> ! {
    let mut msg = [0u8; 8];
    msg[..4].copy_from_slice(&step.to_ne_bytes());
    msg[4..].copy_from_slice(&errno.to_ne_bytes());
    // SAFETY: a write of our stack buffer to our pipe, then _exit.
    unsafe {
        libc::write(fd, msg.as_ptr().cast(), msg.len());
        libc::_exit(0)
    }
}

/// The calling thread's errno.
fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Writes all of `data` to the file at `path` (a NUL-terminated byte
/// string). Async-signal-safe.
fn write_file(path: &[u8], data: &[u8]) -> bool {
    // SAFETY: `path` is NUL-terminated, `data` is ours; the fd is closed.
    unsafe {
        let fd = libc::open(path.as_ptr().cast(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return false;
        }
        let ok = libc::write(fd, data.as_ptr().cast(), data.len()) == data.len() as isize;
        libc::close(fd);
        ok
    }
}

/// Runs `child(report_fd)` in a forked child (which must end with
/// [`report`]) and returns what it reported.
fn in_child(child: impl FnOnce(i32)) -> Result<(), ProbeError> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills the two fds of our array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(ProbeError { step: "pipe", source: std::io::Error::last_os_error() });
    }
    let [rd, wr] = fds;
    // SAFETY: the child runs `child`, which makes raw async-signal-safe
    // calls only on buffers made before the fork, and exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        let source = std::io::Error::last_os_error();
        // SAFETY: closing our own fds.
        unsafe {
            libc::close(rd);
            libc::close(wr);
        }
        return Err(ProbeError { step: STEPS[FORK as usize], source });
    }
    if pid == 0 {
        // SAFETY: the child's copy of the read end is not needed.
        unsafe { libc::close(rd) };
        child(wr);
        // SAFETY: the child ends here whatever `child` did.
        unsafe { libc::_exit(0) };
    }
    // SAFETY: our copy of the write end is closed so that EOF comes when
    // every child is gone; the read is into our buffer; the wait reaps our child.
    let (got, msg) = unsafe {
        libc::close(wr);
        let mut msg = [0u8; 8];
        let mut got = 0usize;
        while got < msg.len() {
            let n = libc::read(rd, msg[got..].as_mut_ptr().cast(), msg.len() - got);
            if n < 0 && errno() == libc::EINTR {
                continue;
            }
            if n <= 0 {
                break;
            }
            got += n as usize;
        }
        libc::close(rd);
        let mut st = 0;
        while libc::waitpid(pid, &mut st, 0) < 0 && errno() == libc::EINTR {}
        (got, msg)
    };
    if got < 8 {
        return Err(ProbeError { step: "the probe's child", source: std::io::Error::other("died without a report") });
    }
    let step = u32::from_ne_bytes(msg[..4].try_into().unwrap());
    let err = i32::from_ne_bytes(msg[4..].try_into().unwrap());
    if step == OK {
        return Ok(());
    }
    let step = STEPS.get(step as usize).copied().unwrap_or("an unknown step");
    Err(ProbeError { step, source: std::io::Error::from_raw_os_error(err) })
}

/// Makes the namespaces a computation of this user runs in, as `ckpt
/// launch`/`restart` do: `unshare` of a new PID, mount and IPC namespace
/// (with a user namespace when `user`, a network namespace when `net`);
/// in a user namespace `setgroups` denied and the uid and gid mapped to
/// themselves; `/` made recursively private; a first child that must be
/// PID 1 mounts a fresh `/proc`. Everything dies with the child.
pub fn namespaces(user: bool, net: bool) -> Result<(), ProbeError> {
    let mut flags = libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWIPC;
    if user {
        flags |= libc::CLONE_NEWUSER;
    }
    if net {
        flags |= libc::CLONE_NEWNET;
    }
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let uid_map = format!("{uid} {uid} 1\n").into_bytes();
    let gid_map = format!("{gid} {gid} 1\n").into_bytes();
    in_child(move |fd| {
        // SAFETY: raw calls of the freshly forked child on buffers made
        // before the fork; every path ends in `report` (_exit).
        unsafe {
            if libc::unshare(flags) != 0 {
                report(fd, UNSHARE, errno());
            }
            if user {
                enter_mapped(fd, &uid_map, &gid_map);
            }
            if libc::mount(std::ptr::null(), c"/".as_ptr(), std::ptr::null(), libc::MS_REC | libc::MS_PRIVATE, std::ptr::null()) != 0 {
                report(fd, MAKE_PRIVATE, errno());
            }
            let init = libc::fork();
            if init < 0 {
                report(fd, FORK_INIT, errno());
            }
            if init == 0 {
                if libc::getpid() != 1 {
                    report(fd, NOT_PID1, 0);
                }
                let f = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
                if libc::mount(c"proc".as_ptr(), c"/proc".as_ptr(), c"proc".as_ptr(), f, std::ptr::null()) != 0 {
                    report(fd, MOUNT_PROC, errno());
                }
                report(fd, OK, 0);
            }
            let mut st = 0;
            while libc::waitpid(init, &mut st, 0) < 0 && errno() == libc::EINTR {}
            libc::_exit(0)
        }
    })
}

/// Can a process be stopped by the ptrace stopper? As the agent does it: a
/// child of the process seizes it, the process first naming that child its
/// tracer (`PR_SET_PTRACER`) when Yama's `ptrace_scope` is 1.
pub fn ptrace_stopper() -> Result<(), ProbeError> {
    let yama1 = sysctl("kernel.yama.ptrace_scope").as_deref() == Some("1");
    in_child(move |fd| {
        // SAFETY: raw calls of the freshly forked child; every path ends in
        // `report` or `_exit`. The tracer exits right after its seize (a
        // tracer's exit detaches it).
        unsafe {
            let mut go = [0i32; 2];
            if libc::pipe(go.as_mut_ptr()) != 0 {
                report(fd, FORK, errno());
            }
            let parent = libc::getpid();
            let tracer = libc::fork();
            if tracer < 0 {
                report(fd, FORK, errno());
            }
            if tracer == 0 {
                let mut b = 0u8;
                libc::read(go[0], (&mut b as *mut u8).cast(), 1);
                if libc::ptrace(libc::PTRACE_SEIZE, parent, 0usize, 0usize) != 0 {
                    report(fd, SEIZE, errno());
                }
                report(fd, OK, 0);
            }
            if yama1 {
                libc::prctl(libc::PR_SET_PTRACER, tracer as libc::c_ulong, 0, 0, 0);
            }
            libc::write(go[1], b"g".as_ptr().cast(), 1);
            let mut st = 0;
            while libc::waitpid(tracer, &mut st, 0) < 0 && errno() == libc::EINTR {}
            libc::_exit(0)
        }
    })
}

/// Can memory be read from a descendant with `process_vm_readv`, as the
/// capture helper reads the programs below it? With `userns`, from inside
/// a user namespace of our own as a non-root computation's init does (its
/// capabilities there count for Yama's `ptrace_scope` 2). Yama's 3 refuses
/// it to everyone.
pub fn read_descendant_memory(userns: bool) -> Result<(), ProbeError> {
    static WORD: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0x636b_7074);
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let uid_map = format!("{uid} {uid} 1\n").into_bytes();
    let gid_map = format!("{gid} {gid} 1\n").into_bytes();
    in_child(move |fd| {
        // SAFETY: raw calls of the freshly forked child on buffers made
        // before the fork; the grandchild only blocks on the pipe and
        // exits; every path ends in `report` (_exit).
        unsafe {
            if userns {
                if libc::unshare(libc::CLONE_NEWUSER) != 0 {
                    report(fd, UNSHARE, errno());
                }
                enter_mapped(fd, &uid_map, &gid_map);
            }
            let mut hold = [0i32; 2];
            if libc::pipe(hold.as_mut_ptr()) != 0 {
                report(fd, FORK, errno());
            }
            let pid = libc::fork();
            if pid < 0 {
                report(fd, FORK, errno());
            }
            if pid == 0 {
                libc::close(hold[1]);
                let mut b = 0u8;
                libc::read(hold[0], (&mut b as *mut u8).cast(), 1);
                libc::_exit(0);
            }
            let mut buf = 0u64;
            let local = libc::iovec { iov_base: (&mut buf as *mut u64).cast(), iov_len: 8 };
            let remote = libc::iovec { iov_base: WORD.as_ptr().cast(), iov_len: 8 };
            let n = libc::process_vm_readv(pid, &local, 1, &remote, 1, 0);
            let e = errno();
            libc::close(hold[1]);
            let mut st = 0;
            while libc::waitpid(pid, &mut st, 0) < 0 && errno() == libc::EINTR {}
            if n != 8 {
                report(fd, READ_MEM, if n < 0 { e } else { libc::EIO });
            }
            report(fd, OK, 0);
        }
    })
}

/// Child side, after `unshare(CLONE_NEWUSER)`: `setgroups` denied, uid and
/// gid mapped to themselves. Async-signal-safe; reports and exits on failure.
fn enter_mapped(fd: i32, uid_map: &[u8], gid_map: &[u8]) {
    if !write_file(b"/proc/self/setgroups\0", b"deny") {
        report(fd, SETGROUPS, errno());
    }
    if !write_file(b"/proc/self/uid_map\0", uid_map) {
        report(fd, UID_MAP, errno());
    }
    if !write_file(b"/proc/self/gid_map\0", gid_map) {
        report(fd, GID_MAP, errno());
    }
}

/// Can this process create a write-protect userfaultfd as the agent does
/// (`UFFD_USER_MODE_ONLY`, feature `WP_ASYNC`)? The same calls as
/// [`crate::dirty::uffd_wp_supported`], with the failing step named.
pub fn uffd_wp() -> Result<(), ProbeError> {
    // SAFETY: create a userfaultfd, ask for the feature, close it.
    unsafe {
        let fd = libc::syscall(SYS_USERFAULTFD, libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY) as i32;
        if fd < 0 {
            return Err(ProbeError { step: "userfaultfd(UFFD_USER_MODE_ONLY)", source: std::io::Error::last_os_error() });
        }
        let mut api = UffdioApi { api: UFFD_API, features: UFFD_FEATURE_WP_ASYNC, ioctls: 0 };
        let r = libc::ioctl(fd, UFFDIO_API as _, &mut api as *mut UffdioApi);
        let source = std::io::Error::last_os_error();
        libc::close(fd);
        if r != 0 {
            return Err(ProbeError { step: "UFFDIO_API with UFFD_FEATURE_WP_ASYNC", source });
        }
    }
    Ok(())
}

/// Mount points under `/proc` (a container's masking of `/proc/kcore`,
/// `/proc/sys`…: the kernel then refuses a fresh proc mount in a user
/// namespace).
pub fn proc_overmounts() -> Vec<String> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return Vec::new() };
    info.lines().filter_map(|l| l.split(' ').nth(4)).filter(|m| m.starts_with("/proc/")).map(str::to_string).collect()
}

/// Bytes free to this user on the file system of `path` (`statvfs`).
pub fn free_bytes(path: &std::path::Path) -> std::io::Result<u64> {
    let s = nix::sys::statvfs::statvfs(path).map_err(std::io::Error::from)?;
    Ok(s.blocks_available() as u64 * s.fragment_size() as u64)
}

/// May this user make entries in the directory `dir` (`access(W_OK|X_OK)`)?
pub fn can_write_dir(dir: &std::path::Path) -> bool {
    nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK).is_ok()
}
