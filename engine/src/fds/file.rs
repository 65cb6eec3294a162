//! Regular files, directories and character devices: reopened by path, at
//! the same offset, with the same status flags.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;

use super::{LiveFd, Opener};
use crate::error::{EngineError, Result};
use crate::image::{FdImage, FdKind};

pub fn capture(live: &LiveFd) -> Result<FdKind> {
    let path = live.target.to_string();
    if path.ends_with(" (deleted)") {
        return Err(live.unsupported("deleted file"));
    }
    let ft = live.meta.file_type();
    Ok(if ft.is_file() {
        FdKind::File { path }
    } else if ft.is_dir() {
        FdKind::Dir { path }
    } else if ft.is_char_device() {
        FdKind::Device { path }
    } else {
        return Err(live.unsupported("special file"));
    })
}

pub fn dev_null() -> Result<OwnedFd> {
    let f = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null").map_err(|e| EngineError::io("/dev/null", e))?;
    Ok(f.into())
}

pub fn open(o: &Opener, pid: i32, f: &FdImage) -> Result<OwnedFd> {
    let keep = libc::O_ACCMODE | libc::O_APPEND | libc::O_NONBLOCK | libc::O_SYNC | libc::O_DSYNC | libc::O_DIRECT | libc::O_NOATIME;
    let (path, flags) = match &f.kind {
        FdKind::File { path } | FdKind::Device { path } => (path, f.flags & keep),
        FdKind::Dir { path } => (path, libc::O_RDONLY | libc::O_DIRECTORY),
        other => return Err(o.err(format!("internal: {other:?} is not a file"))),
    };
    // As the process, following no symlink (crate::creds::open).
    let owned = crate::creds::open(path, flags, 0).map_err(|e| o.err(format!("cannot reopen {path} as fd {} of process {pid}: {e}", f.fd)))?;
    let fd = owned.as_raw_fd();
    if matches!(f.kind, FdKind::File { .. }) && f.pos > 0 {
        // SAFETY: lseek on our own fd.
        unsafe { libc::lseek(fd, f.pos, libc::SEEK_SET) };
    }
    Ok(owned)
}
