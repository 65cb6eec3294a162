//! The process tree of a restart: each process cloned with its PID
//! (`clone3` with `set_tid`) by its parent, roots by the driver, orphans
//! through a short-lived middle process; each makes its session or group,
//! its zombies and children, places its fds and execs the restorer.

use std::collections::HashMap;
use std::ffi::CString;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use ckpt_wire::Pod;
use ckpt_wire::restore::{StatusMsg, status};

use crate::error::{EngineError, Result};
use crate::image::*;

use super::fds::FdMove;
use super::{Conversation, Ctx, wait_exit};

/// `struct clone_args` of the kernel uapi.
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// How a process comes into the tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Origin {
    /// A child of the restart driver (its parent was outside the computation).
    Root,
    /// A child of the process at this index of the generation.
    Child(usize),
    /// Its parent had exited (a daemon): it is reparented to init again.
    Orphan,
}

/// How each process of the generation comes into the tree.
pub(super) fn origins(images: &[ProcessImage], index: &HashMap<i32, usize>) -> Vec<Origin> {
    images
        .iter()
        .map(|im| match index.get(&im.ppid) {
            Some(&p) if im.ppid != im.pid => Origin::Child(p),
            _ if im.ppid == 1 => Origin::Orphan,
            _ => Origin::Root,
        })
        .collect()
}


/// Everything one process needs from the moment it is cloned until it
/// execs the restorer: prepared before the first clone, so that the clone
/// children only make async-signal-safe calls on ready data.
struct Launch {
    pid: i32,
    sid: i32,
    pgid: i32,
    /// Indices of its children in the generation, group leaders first.
    children: Vec<usize>,
    zombies: Vec<Zombie>,
    pairs: Vec<(RawFd, RawFd)>,
    keep: Vec<bool>,
    cwd: CString,
    umask: u32,
    /// The driver's end of the status pipe (for errors before the exec).
    status_src: RawFd,
    /// `epoll_ctl(EPOLL_CTL_ADD)` calls made once the fds have their
    /// numbers: (epoll fd, target fd, event, fd holding the target's file
    /// now or -1; see [`crate::fds::epoll::additions`]).
    epoll_adds: Vec<(RawFd, RawFd, libc::epoll_event, RawFd)>,
    /// A slave of the pseudo-terminal that was the session's controlling
    /// terminal (a driver fd above every program fd), or -1.
    ctty_src: RawFd,
}

/// Failure codes of the pre-exec steps, reported as `op` of an ERROR status.
pub(super) mod step {
    pub const DUP2: u32 = 0xffff_0001;
    pub const CHDIR: u32 = 0xffff_0002;
    pub const EXEC: u32 = 0xffff_0003;
    pub const CLONE: u32 = 0xffff_0004;
    pub const SETSID: u32 = 0xffff_0005;
    pub const EPOLL: u32 = 0xffff_0006;
    pub const CTTY: u32 = 0xffff_0007;

    pub fn name(op: u32) -> &'static str {
        match op {
            DUP2 => "placing the fds",
            CHDIR => "changing to the working directory",
            EXEC => "executing the restorer",
            CLONE => "creating a child process or zombie with its PID",
            SETSID => "creating its session",
            EPOLL => "adding its epoll items back (epoll_ctl)",
            CTTY => "taking back its controlling terminal (TIOCSCTTY)",
            _ => "",
        }
    }
}

/// Makes every process of the generation, each at the restorer's exec;
/// returns the guard that kills them on a failure, and the driver's own
/// children.
#[allow(clippy::too_many_arguments)]
pub(super) fn spawn(
    ctx: &Ctx,
    origins: &[Origin],
    index: &HashMap<i32, usize>,
    all_moves: Vec<Vec<FdMove>>,
    cttys: Vec<Option<OwnedFd>>,
    src_base: RawFd,
    convs: &[Conversation],
    restorer: &Path,
) -> Result<(KillOnDrop, Vec<i32>)> {
    let Ctx { generation, images, .. } = *ctx;
    let err = |what: String| EngineError::Restore { generation, what };
    // Everything the clone children need, prepared before any exists.
    let mut launches = Vec::new();
    for (i, image) in images.iter().enumerate() {
        let moves = &all_moves[i];
        let mut keep = vec![false; src_base as usize];
        for m in moves {
            keep[m.dst as usize] = true;
        }
        let mut children: Vec<usize> = (0..images.len()).filter(|&c| origins[c] == Origin::Child(i)).collect();
        // Group leaders before the members that join their group.
        children.sort_by_key(|&c| (images[c].pgid != images[c].pid, images[c].pid));
        let status_src = moves.iter().find(|m| m.dst == convs[i].status_fd).map(|m| m.src.as_raw_fd()).unwrap_or(-1);
        launches.push(Launch {
            pid: image.pid,
            sid: image.sid,
            pgid: image.pgid,
            children,
            zombies: image.zombies.clone(),
            pairs: moves.iter().map(|m| (m.src.as_raw_fd(), m.dst)).collect(),
            keep,
            cwd: CString::new(image.cwd.as_bytes()).map_err(|_| err(format!("bad cwd {:?}", image.cwd)))?,
            umask: image.umask,
            status_src,
            epoll_adds: crate::fds::epoll::additions(image),
            ctty_src: cttys[i].as_ref().map(|f| f.as_raw_fd()).unwrap_or(-1),
        });
    }
    let restorer_c = CString::new(restorer.as_os_str().as_bytes()).map_err(|_| err("bad restorer path".into()))?;
    let argvs: Vec<[CString; 3]> = convs
        .iter()
        .map(|c| [CString::new("ckpt-restorer").unwrap(), CString::new(c.ctl_fd.to_string()).unwrap(), CString::new(c.status_fd.to_string()).unwrap()])
        .collect();
    let argv_ptrs: Vec<Vec<*const libc::c_char>> = argvs.iter().map(|a| a.iter().map(|s| s.as_ptr()).chain([std::ptr::null()]).collect()).collect();
    let spawn = Spawn { launches: &launches, restorer: &restorer_c, argv: &argv_ptrs, src_base };

    // The tree: roots and orphans from here, every other process from its
    // parent.
    // On failure: the processes made so far are killed. (Their descendants
    // that never said READY die on their own: their restorer reads the
    // end of its control pipe when the driver's copy closes.)
    let mut guard = KillOnDrop { children: Vec::new(), pidfds: Vec::new(), armed: true };
    let mut roots = Vec::new();
    for (i, image) in images.iter().enumerate() {
        match origins[i] {
            Origin::Child(_) => continue,
            Origin::Root => {
                let pid = clone_with_pid(image.pid, libc::SIGCHLD);
                if pid == 0 {
                    // SAFETY: in the clone child; never returns.
                    unsafe { spawn.become_process(i) };
                }
                if pid < 0 {
                    return Err(clone_error(generation, image.pid));
                }
                guard.children.push(pid as i32);
                roots.push(pid as i32);
            }
            Origin::Orphan => {
                // The middle process exits at once, so that init adopts the
                // orphans again. When their session leader is gone (a
                // daemon's double fork), one middle process takes the
                // leader's PID, makes the session and then every orphan of
                // that session (group leaders first).
                let lost = |im: &ProcessImage| im.sid != im.pid && im.sid > 0 && !index.contains_key(&im.sid);
                let members: Vec<usize> = if lost(image) {
                    if (0..i).any(|j| origins[j] == Origin::Orphan && lost(&images[j]) && images[j].sid == image.sid) {
                        continue;
                    }
                    let mut m: Vec<usize> = (i..images.len()).filter(|&j| origins[j] == Origin::Orphan && lost(&images[j]) && images[j].sid == image.sid).collect();
                    m.sort_by_key(|&j| (images[j].pgid != images[j].pid, images[j].pid));
                    m
                } else {
                    vec![i]
                };
                let session = lost(image).then_some(image.sid);
                make_orphans(&spawn, generation, images, session, &members)?;
            }
        }
    }
    drop(all_moves);
    drop(cttys);
    Ok((guard, roots))
}

fn clone_error(generation: u64, pid: i32) -> EngineError {
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EEXIST) {
        return EngineError::IdTaken { generation, what: format!("PID {pid}") };
    }
    EngineError::Restore { generation, what: format!("clone3 with PID {pid} failed: {e} (restoring PIDs needs root or CAP_CHECKPOINT_RESTORE)") }
}

/// Makes `members` (orphans of the generation) through a middle process
/// that exits at once, so that init adopts them: the middle process is the
/// lost leader of `session` (its PID, a new session) when given, else a
/// plain fork. A clone that fails is named with its errno.
fn make_orphans(spawn: &Spawn, generation: u64, images: &[ProcessImage], session: Option<i32>, members: &[usize]) -> Result<()> {
    let (report_r, report_w) = super::fds::pipe()?;
    let mid = match session {
        Some(sid) => clone_with_pid(sid, libc::SIGCHLD) as libc::pid_t,
        // SAFETY: a fork whose child only clones and exits.
        None => unsafe { libc::fork() },
    };
    if mid == 0 {
        // SAFETY: in the middle process: plain syscalls on prepared data.
        unsafe {
            if session.is_some() {
                libc::setsid();
            }
            for &j in members {
                let child = &spawn.launches[j];
                let pid = clone_with_pid(child.pid, libc::SIGCHLD);
                if pid == 0 {
                    spawn.become_process(j);
                }
                if pid < 0 {
                    let msg = [child.pid, *libc::__errno_location()];
                    libc::write(report_w.as_raw_fd(), msg.as_ptr() as *const libc::c_void, 8);
                    libc::_exit(1);
                }
                if child.sid != child.pid && child.pgid > 0 {
                    libc::setpgid(pid as libc::pid_t, child.pgid);
                }
            }
            libc::_exit(0);
        }
    }
    if mid < 0 {
        return Err(clone_error(generation, session.unwrap_or(images[members[0]].pid)));
    }
    drop(report_w);
    if wait_exit(mid) == 0 {
        return Ok(());
    }
    let mut msg = [0u8; 8];
    let got = std::fs::File::from(report_r).read_exact(&mut msg);
    let (pid, errno) = match got {
        Ok(()) => (i32::from_ne_bytes(msg[..4].try_into().unwrap()), i32::from_ne_bytes(msg[4..].try_into().unwrap())),
        Err(_) => (images[members[0]].pid, 0),
    };
    if errno == libc::EEXIST {
        return Err(EngineError::IdTaken { generation, what: format!("PID {pid}") });
    }
    Err(EngineError::Restore { generation, what: format!("clone3 with PID {pid} failed: {} (restoring PIDs needs root or CAP_CHECKPOINT_RESTORE)", std::io::Error::from_raw_os_error(errno)) })
}

/// A fork-like `clone3` whose child gets PID `pid`. Returns as `fork` does.
fn clone_with_pid(pid: i32, exit_signal: i32) -> libc::c_long {
    let set_tid = [pid];
    let args = CloneArgs { exit_signal: exit_signal as u64, set_tid: set_tid.as_ptr() as u64, set_tid_size: 1, ..Default::default() };
    // SAFETY: clone3 without CLONE_VM behaves like fork; `args` and
    // `set_tid` live across the call.
    unsafe { libc::syscall(libc::SYS_clone3, &args as *const CloneArgs, std::mem::size_of::<CloneArgs>()) }
}

/// The prepared data the clone children work from.
struct Spawn<'a> {
    launches: &'a [Launch],
    restorer: &'a CString,
    argv: &'a [Vec<*const libc::c_char>],
    src_base: RawFd,
}

impl Spawn<'_> {
    /// Reports a pre-exec failure to the driver and exits.
    ///
    /// # Safety
    /// Only in a clone child; async-signal-safe.
    unsafe fn fail(&self, i: usize, op: u32) -> ! {
        // SAFETY: errno read and a write to an fd the child inherited.
        unsafe {
            let errno = *libc::__errno_location();
            let msg = StatusMsg { kind: status::ERROR, op, value: -(errno as i64) };
            let b = msg.as_bytes();
            libc::write(self.launches[i].status_src, b.as_ptr() as *const libc::c_void, b.len());
            libc::_exit(120);
        }
    }

    /// Makes zombie `z` of process `i`: a child with its PID that takes its
    /// session and group, dies as it died, and stays unreaped.
    ///
    /// # Safety
    /// As [`Spawn::become_process`].
    unsafe fn make_zombie(&self, i: usize, z: &Zombie) {
        // SAFETY: plain syscalls on prepared data, in a clone child.
        unsafe {
            let pid = clone_with_pid(z.pid, libc::SIGCHLD);
            if pid == 0 {
                if z.sid == z.pid {
                    libc::setsid();
                } else if z.pgid == z.pid {
                    libc::setpgid(0, 0);
                } else if z.pgid > 0 && libc::getpgid(0) != z.pgid {
                    libc::setpgid(0, z.pgid);
                }
                if libc::WIFSIGNALED(z.status) {
                    let sig = libc::WTERMSIG(z.status);
                    libc::signal(sig, libc::SIG_DFL);
                    let mut set: libc::sigset_t = std::mem::zeroed();
                    libc::sigemptyset(&mut set);
                    libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
                    libc::kill(libc::getpid(), sig);
                }
                libc::_exit(libc::WEXITSTATUS(z.status));
            }
            if pid < 0 {
                self.fail(i, step::CLONE);
            }
            // Dead before we go on (still a zombie: WNOWAIT).
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, libc::WEXITED | libc::WNOWAIT);
        }
    }

    /// Makes child `c` of process `i` (which becomes process `c`).
    ///
    /// # Safety
    /// As [`Spawn::become_process`].
    unsafe fn make_child(&self, i: usize, c: usize) {
        let child = &self.launches[c];
        // SAFETY: plain syscalls on prepared data, in a clone child.
        unsafe {
            let pid = clone_with_pid(child.pid, libc::SIGCHLD);
            if pid == 0 {
                self.become_process(c);
            }
            if pid < 0 {
                self.fail(i, step::CLONE);
            }
            // As a shell does: the parent sets the child's group too, so
            // that later siblings find the group already there.
            if child.sid != child.pid && child.pgid > 0 {
                libc::setpgid(pid as libc::pid_t, child.pgid);
            }
        }
    }

    /// Turns the calling clone child into process `i`: session and group,
    /// its zombies and children, its fds, then the restorer.
    ///
    /// # Safety
    /// Only in the child of a fork-like clone: async-signal-safe calls on
    /// prepared data only; never returns.
    unsafe fn become_process(&self, i: usize) -> ! {
        let l = &self.launches[i];
        // SAFETY: plain syscalls on prepared data (see the function's contract).
        unsafe {
            // A child or zombie that kept the session this process leaves
            // (forked before its setsid) is made first, in that session.
            let new_leader = l.sid == l.pid && libc::getsid(0) != l.pid;
            // (A child that leads a session of its own makes it itself, after.)
            let kept_old = |pid: i32, sid: i32| new_leader && sid > 0 && sid != l.pid && sid != pid;
            // A zombie leading its own group (or in ours) first, so that
            // children joining its group find it; one in a child's group
            // once the children exist.
            let early_zombie = |z: &Zombie| z.pgid <= 0 || z.pgid == z.pid || z.pgid == l.pgid;
            if new_leader {
                for z in l.zombies.iter().filter(|z| kept_old(z.pid, z.sid)) {
                    self.make_zombie(i, z);
                }
                for &c in l.children.iter().filter(|&&c| kept_old(self.launches[c].pid, self.launches[c].sid)) {
                    self.make_child(i, c);
                }
            }
            if l.sid == l.pid {
                if libc::setsid() < 0 {
                    self.fail(i, step::SETSID);
                }
                // Before any child is made, so that they inherit it.
                if l.ctty_src >= 0 && libc::ioctl(l.ctty_src, libc::TIOCSCTTY, 0) != 0 {
                    self.fail(i, step::CTTY);
                }
            } else if l.pgid == l.pid {
                libc::setpgid(0, 0);
            } else if l.pgid > 0 && libc::getpgid(0) != l.pgid {
                libc::setpgid(0, l.pgid);
            }
            for z in l.zombies.iter().filter(|z| !kept_old(z.pid, z.sid) && early_zombie(z)) {
                self.make_zombie(i, z);
            }
            for &c in l.children.iter().filter(|&&c| !kept_old(self.launches[c].pid, self.launches[c].sid)) {
                self.make_child(i, c);
            }
            for z in l.zombies.iter().filter(|z| !kept_old(z.pid, z.sid) && !early_zombie(z)) {
                self.make_zombie(i, z);
            }
            for &(src, dst) in &l.pairs {
                if libc::dup2(src, dst) < 0 {
                    self.fail(i, step::DUP2);
                }
            }
            let status_fd = l.pairs.iter().find(|p| p.0 == l.status_src).map(|p| p.1).unwrap_or(-1);
            libc::syscall(libc::SYS_close_range, self.src_base as u32, u32::MAX, 0u32);
            for (fd, &k) in l.keep.iter().enumerate() {
                if !k {
                    libc::close(fd as RawFd);
                }
            }
            let report = |op: u32| {
                let errno = *libc::__errno_location();
                let msg = StatusMsg { kind: status::ERROR, op, value: -(errno as i64) };
                let b = msg.as_bytes();
                libc::write(status_fd, b.as_ptr() as *const libc::c_void, b.len());
                libc::_exit(121);
            };
            // Epoll items are keyed by (file, fd number): added now that
            // the fds have their numbers. A second process sharing the
            // epoll finds them there already.
            for &(epfd, tfd, ev, via) in &l.epoll_adds {
                let mut ev = ev;
                if via < 0 {
                    if libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, tfd, &mut ev) != 0 && *libc::__errno_location() != libc::EEXIST {
                        report(step::EPOLL);
                    }
                    continue;
                }
                // Registered through fd `tfd`, closed or reused since: the
                // file at `via` goes at number `tfd` for the call, then what
                // was there (nothing, or another file) is put back.
                let saved = libc::fcntl(tfd, libc::F_DUPFD_CLOEXEC, 0);
                if libc::dup2(via, tfd) < 0 {
                    report(step::EPOLL);
                }
                let r = libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, tfd, &mut ev);
                let e = *libc::__errno_location();
                if saved >= 0 {
                    libc::dup2(saved, tfd);
                    libc::close(saved);
                } else {
                    libc::close(tfd);
                }
                if r != 0 && e != libc::EEXIST {
                    *libc::__errno_location() = e;
                    report(step::EPOLL);
                }
            }
            if libc::chdir(l.cwd.as_ptr()) != 0 {
                report(step::CHDIR);
            }
            libc::umask(l.umask as libc::mode_t);
            let mut all: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::syscall(libc::SYS_rt_sigprocmask, libc::SIG_SETMASK, &all as *const libc::sigset_t, 0usize, 8usize);
            let envp: [*const libc::c_char; 1] = [std::ptr::null()];
            libc::execve(self.restorer.as_ptr(), self.argv[i].as_ptr(), envp.as_ptr());
            report(step::EXEC);
            libc::_exit(122);
        }
    }
}

/// On a failed restart: every process made so far is killed (the PIDs of
/// the image), and the driver's own children reaped.
pub(super) struct KillOnDrop {
    /// Our children (unreaped, so their PIDs cannot be anyone else's).
    children: Vec<i32>,
    /// The other processes, once their restorer has said READY on its own
    /// status pipe (so the pidfd is surely of a process of ours).
    pub pidfds: Vec<OwnedFd>,
    pub armed: bool,
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        for fd in &self.pidfds {
            // SAFETY: pidfd_send_signal on a pidfd we own; no memory passed.
            unsafe { libc::syscall(libc::SYS_pidfd_send_signal, fd.as_raw_fd(), libc::SIGKILL, 0usize, 0u32) };
        }
        for &pid in &self.children {
            // SAFETY: killing and reaping our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
        }
    }
}
