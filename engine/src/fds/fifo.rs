//! Named pipes (FIFOs). An fd open on a FIFO is an end of the pipe the
//! kernel keeps for that inode while anyone has it open: it keeps its path,
//! its access mode, and the pipe's capacity and bytes in flight.
//!
//! Capture: as for [`super::pipe`], the bytes in flight are copied with
//! `tee(2)` from a duplicate of an fd that can read the FIFO (opened
//! `O_RDONLY` or `O_RDWR`), once per FIFO, and stay in the program's pipe.
//! With no such fd in the computation (the reader was outside), they are
//! not recorded.
//! Restart: the FIFO is made again at its path if it is gone (`mkfifo`,
//! mode and owner), otherwise the file there must be a FIFO. The driver
//! first opens it `O_RDWR` (so that it has a reader and a writer: no open
//! blocks, and a write-only open does not fail with `ENXIO`), sets the
//! capacity and writes the bytes back through that fd. Each open file
//! description is then opened with its access mode and `O_NONBLOCK`, and
//! given its own status flags. The driver's `O_RDWR` fd closes when the
//! restart's fds are all made, before any process runs.

use std::collections::HashMap;
use std::ffi::CString;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use ckpt_store::Store;

use super::{LiveFd, Round, set_status_flags};
use crate::error::{EngineError, Result};
use crate::image::{FdImage, FdKind, FifoImage, ProcessImage};

pub fn capture(round: &mut Round, live: &LiveFd) -> Result<FdKind> {
    let path = live.target.to_string();
    if path.ends_with(" (deleted)") {
        return Err(live.unsupported("FIFO whose path was removed"));
    }
    let (dev, ino) = (live.meta.dev(), live.meta.ino());
    let fd = round.grab(live.pid, live.fd)?;
    // SAFETY: F_GETPIPE_SZ on our duplicate.
    let capacity = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETPIPE_SZ) }.max(0) as u32;
    let readable = live.info.flags & libc::O_ACCMODE != libc::O_WRONLY;
    let data = match round.fifos_read.get(&(dev, ino)) {
        Some(d) => *d,
        None if readable => {
            let bytes = super::pipe::peek(&fd, capacity)
                .map_err(|e| EngineError::io(format!("reading the bytes in flight in FIFO {path} (process {}, fd {})", live.pid, live.fd), e))?;
            let d = if bytes.is_empty() { None } else { Some(round.put_blob(&bytes)?) };
            round.fifos_read.insert((dev, ino), d);
            d
        }
        None => None,
    };
    Ok(FdKind::Fifo(FifoImage { path, ino, dev, mode: live.meta.mode() & 0o7777, uid: live.meta.uid(), gid: live.meta.gid(), capacity, data }))
}

/// The FIFOs of one restart, by path.
#[derive(Default)]
pub struct Fifos {
    /// Capacity and bytes in flight, from any fd of any image.
    wanted: HashMap<String, (u32, Option<ckpt_chunker::Hash>)>,
    /// The driver's `O_RDWR` fd on each FIFO made ready.
    held: HashMap<String, OwnedFd>,
}

impl Fifos {
    pub fn new(images: &[ProcessImage]) -> Self {
        let mut wanted: HashMap<String, (u32, Option<ckpt_chunker::Hash>)> = HashMap::new();
        for f in images.iter().flat_map(|i| &i.fds) {
            if let FdKind::Fifo(x) = &f.kind {
                let e = wanted.entry(x.path.clone()).or_insert((x.capacity, None));
                e.0 = e.0.max(x.capacity);
                e.1 = e.1.or(x.data);
            }
        }
        Fifos { wanted, held: HashMap::new() }
    }
}

/// Opens the FIFO as the process, following no symlink, and checks it is
/// one.
fn open_path(path: &CString, flags: i32) -> std::io::Result<OwnedFd> {
    let p = path.to_str().map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "not UTF-8"))?;
    let fd = crate::creds::open(p, flags, 0)?;
    let meta = std::fs::File::from(super::dup(&fd).map_err(std::io::Error::other)?).metadata()?;
    if !meta.file_type().is_fifo() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{p} is not a FIFO any more")));
    }
    Ok(fd)
}

/// The FIFO at `x.path`, made if it is gone, held open `O_RDWR` with its
/// capacity and bytes in flight.
fn prepare(fifos: &mut Fifos, store: &Store, generation: u64, x: &FifoImage, err: &dyn Fn(String) -> EngineError) -> Result<()> {
    if fifos.held.contains_key(&x.path) {
        return Ok(());
    }
    let c = CString::new(x.path.as_bytes()).map_err(|_| err("its path holds a NUL".into()))?;
    let made = match std::fs::symlink_metadata(&x.path) {
        Ok(m) if m.file_type().is_fifo() => false,
        Ok(_) => return Err(err(format!("{} is not a FIFO any more; move it away so that the FIFO can be made again", x.path))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Made as the process (so it owns it); mkfifo never follows a
            // symlink at the last component and fails if anything is there.
            crate::creds::as_process(|| {
                // SAFETY: mkfifo with a NUL-terminated path.
                if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
            .map_err(|e| err(format!("cannot make it again (mkfifo): {e} (does its directory exist?)")))?;
            true
        }
        Err(e) => return Err(err(format!("cannot look at {}: {e}", x.path))),
    };
    // A reader and a writer at once: never blocks.
    let held = open_path(&c, libc::O_RDWR | libc::O_NONBLOCK).map_err(|e| err(format!("cannot open it: {e}")))?;
    if made {
        // The recorded mode and owner, through the fd (never the path).
        // SAFETY: fchmod/fchown on our fd.
        unsafe {
            libc::fchmod(held.as_raw_fd(), x.mode as libc::mode_t);
            if libc::fchown(held.as_raw_fd(), x.uid, x.gid) != 0 {
                tracing::warn!("FIFO {}: cannot give it back to uid {} gid {}: {}", x.path, x.uid, x.gid, std::io::Error::last_os_error());
            }
        }
    }
    let (capacity, data) = fifos.wanted.get(&x.path).copied().unwrap_or((x.capacity, x.data));
    // SAFETY: F_GETPIPE_SZ/F_SETPIPE_SZ on our fd.
    unsafe {
        if capacity > 0 && libc::fcntl(held.as_raw_fd(), libc::F_GETPIPE_SZ) != capacity as i32 && libc::fcntl(held.as_raw_fd(), libc::F_SETPIPE_SZ, capacity as libc::c_int) < 0 {
            return Err(err(format!("F_SETPIPE_SZ {capacity}: {}", std::io::Error::last_os_error())));
        }
    }
    if let Some(h) = data {
        let bytes = store.read_blob(&h).map_err(|e| EngineError::BadImage { generation, what: format!("the bytes in flight in FIFO {} are not readable ({e})", x.path) })?;
        // The FIFO is empty unless a program outside the computation wrote
        // to it; the capacity is at least what it held.
        std::fs::File::from(super::dup(&held)?).write_all(&bytes).map_err(|e| err(format!("refilling {} bytes: {e}", bytes.len())))?;
    }
    fifos.held.insert(x.path.clone(), held);
    Ok(())
}

pub fn open(fifos: &mut Fifos, store: &Store, generation: u64, pid: i32, f: &FdImage) -> Result<OwnedFd> {
    let FdKind::Fifo(x) = &f.kind else { unreachable!("fifo::open of a non-FIFO") };
    let err = |what: String| EngineError::Restore { generation, what: format!("FIFO {} (fd {} of process {pid}): {what}", x.path, f.fd) };
    prepare(fifos, store, generation, x, &err)?;
    let c = CString::new(x.path.as_bytes()).map_err(|_| err("its path holds a NUL".into()))?;
    let fd = open_path(&c, (f.flags & libc::O_ACCMODE) | libc::O_NONBLOCK).map_err(|e| err(format!("cannot open it: {e}")))?;
    set_status_flags(&fd, f.flags);
    Ok(fd)
}
