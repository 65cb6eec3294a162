//! The watchdog of a lazy restart: it kills the computation if the page
//! server's process dies before every page is in.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::error::{EngineError, Result};

/// A process of ours that kills the computation if the page server's
/// process (`ckpt restart`, or ckpt's init) dies before every page is in:
/// killed with it, the server's userfaultfds would close, and the kernel
/// would then give the missing pages as zeros, memory the program never
/// had. The watchdog holds a copy of each userfaultfd, so those pages
/// cannot fill with zeros while it lives: it waits on a pipe whose only
/// writer is the server, and at end of file without the server's "done"
/// kills every restored process and every process group one of them leads
/// (children forked during the fill), says so, then exits. When the server
/// itself kills the computation (a page it cannot get), it tells the
/// watchdog, which then kills the same way without a word: the server
/// says why, and it did not die. Forked from a
/// multithreaded process, it runs raw system calls only, on data prepared
/// before the fork.
pub(super) struct Watchdog {
    pid: i32,
    pipe: Option<OwnedFd>,
}

impl Watchdog {
    pub(super) fn start(generation: u64, all_pids: &[i32]) -> Result<Watchdog> {
        let err = |what: &str| EngineError::io(format!("the lazy restart's watchdog: {what}"), std::io::Error::last_os_error());
        let pidfds: Vec<OwnedFd> = all_pids
            .iter()
            // SAFETY: pidfd_open returns a new fd or -1.
            .filter_map(|&p| match unsafe { libc::syscall(libc::SYS_pidfd_open, p, 0) } {
                fd if fd >= 0 => Some(unsafe { OwnedFd::from_raw_fd(fd as RawFd) }),
                _ => None,
            })
            .collect();
        let mut groups: Vec<i32> = all_pids.iter().copied().filter(|&p| crate::procfs::tree_ids(p).is_ok_and(|t| t.pgid == p)).collect();
        groups.sort_unstable();
        groups.dedup();
        let msg = format!(
            "ckpt: generation {generation}: the lazy restart's page server died before all memory was in: every process of the restart was killed (SIGKILL); restart again\n"
        );
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(err("pipe"));
        }
        // SAFETY: both are new fds we own.
        let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: the child runs only the raw system calls below (no
        // allocation, no lock: other threads of ours may hold them) and
        // leaves with _exit.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(err("fork"));
        }
        if pid == 0 {
            // SAFETY: raw calls on fds and buffers prepared before the fork.
            unsafe {
                libc::close(wr.as_raw_fd());
                let mut b = 0u8;
                let n = loop {
                    let n = libc::read(rd.as_raw_fd(), &mut b as *mut u8 as *mut libc::c_void, 1);
                    if n < 0 && *libc::__errno_location() == libc::EINTR {
                        continue;
                    }
                    break n;
                };
                if n == 1 && b == b'D' {
                    libc::_exit(0);
                }
                // 'K': the server killed the computation and said why; the
                // watchdog makes sure (the groups too) and says nothing.
                let quiet = n == 1 && b == b'K';
                for fd in &pidfds {
                    libc::syscall(libc::SYS_pidfd_send_signal, fd.as_raw_fd(), libc::SIGKILL, 0usize, 0u32);
                }
                for &g in &groups {
                    libc::kill(-g, libc::SIGKILL);
                }
                if !quiet {
                    libc::write(2, msg.as_ptr() as *const libc::c_void, msg.len());
                }
                libc::_exit(1);
            }
        }
        Ok(Watchdog { pid, pipe: Some(wr) })
    }

    /// Every page is in: the watchdog leaves (and its copies of the
    /// userfaultfds with it), killing nothing.
    pub(super) fn disarm(&mut self) {
        if let Some(p) = self.pipe.take() {
            // SAFETY: one byte to our pipe.
            unsafe { libc::write(p.as_raw_fd(), b"D".as_ptr() as *const libc::c_void, 1) };
        }
        self.reap();
    }

    /// The server killed the computation itself (and says why): the
    /// watchdog kills it too, every process group included, but says
    /// nothing (the server did not die).
    pub(super) fn killed(&self) {
        if let Some(p) = &self.pipe {
            // SAFETY: one byte to our pipe.
            unsafe { libc::write(p.as_raw_fd(), b"K".as_ptr() as *const libc::c_void, 1) };
        }
    }

    fn reap(&mut self) {
        if self.pid > 0 {
            // SAFETY: waiting for our own child.
            unsafe { libc::waitpid(self.pid, std::ptr::null_mut(), libc::__WALL) };
            self.pid = 0;
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        // Not disarmed: the fill failed or stopped; the watchdog kills.
        self.pipe.take();
        self.reap();
    }
}

