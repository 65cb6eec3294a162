//! eventfds: the counter (and `EFD_SEMAPHORE`) from fdinfo; restart makes a
//! new eventfd and writes the count into it before any process runs.
//!
//! Never `read()` a program's eventfd to learn its count: that would
//! consume it (and wake nobody). The count comes from fdinfo only.

use std::os::fd::{AsRawFd, OwnedFd};

use super::{LiveFd, hex_field, set_status_flags, take_fd};
use crate::error::{EngineError, Result};
use crate::image::{FdImage, FdKind};

pub fn capture(live: &LiveFd) -> Result<FdKind> {
    let count = hex_field(live.info, "eventfd-count:").ok_or_else(|| live.unreadable("eventfd-count"))?;
    let semaphore = live.info.field("eventfd-semaphore:").is_some_and(|v| v == "1");
    Ok(FdKind::EventFd { count, semaphore })
}

pub fn open(generation: u64, pid: i32, f: &FdImage) -> Result<OwnedFd> {
    let FdKind::EventFd { count, semaphore } = f.kind else { unreachable!("eventfd::open of another kind") };
    let err = |what: String| EngineError::Restore { generation, what: format!("eventfd (fd {} of process {pid}): {what}", f.fd) };
    let flags = libc::EFD_CLOEXEC | if semaphore { libc::EFD_SEMAPHORE } else { 0 };
    // SAFETY: eventfd returns a new fd or -1.
    let fd = unsafe { take_fd(libc::eventfd(0, flags).into()) }.map_err(|e| err(format!("eventfd: {e}")))?;
    if count > 0 {
        // The count can exceed the u32 that eventfd() takes: written instead.
        // SAFETY: an 8-byte write from a local to our own eventfd.
        if unsafe { libc::write(fd.as_raw_fd(), &count as *const u64 as *const libc::c_void, 8) } != 8 {
            return Err(err(format!("setting the count {count}: {}", std::io::Error::last_os_error())));
        }
    }
    set_status_flags(&fd, f.flags);
    Ok(fd)
}
