//! signalfds: the set of signals it accepts (fdinfo `sigmask`), made again
//! with `signalfd4` at restart.
//!
//! Never read a program's signalfd: that takes its pending signals. Signals
//! pending at the checkpoint belong to the process, not to the fd.

use std::os::fd::OwnedFd;

use super::{LiveFd, set_status_flags, take_fd};
use crate::error::{EngineError, Result};
use crate::image::{FdImage, FdKind};

pub fn capture(live: &LiveFd) -> Result<FdKind> {
    let mask = live.info.field("sigmask:").and_then(|v| u64::from_str_radix(v, 16).ok()).ok_or_else(|| live.unreadable("sigmask"))?;
    Ok(FdKind::SignalFd { mask })
}

pub fn open(generation: u64, pid: i32, f: &FdImage) -> Result<OwnedFd> {
    let FdKind::SignalFd { mask } = f.kind else { unreachable!("signalfd::open of another kind") };
    // SAFETY: signalfd4 with a new fd (-1) and an 8-byte kernel sigset.
    let fd = unsafe { take_fd(libc::syscall(libc::SYS_signalfd4, -1, &mask as *const u64, 8usize, libc::SFD_CLOEXEC)) }
        .map_err(|e| EngineError::Restore { generation, what: format!("signalfd with mask {mask:#x} (fd {} of process {pid}): {e}", f.fd) })?;
    set_status_flags(&fd, f.flags);
    Ok(fd)
}
