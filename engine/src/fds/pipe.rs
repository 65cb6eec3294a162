//! Pipes. Pipes stay pipes: the two ends of a pipe between processes of the
//! computation are ends of one new pipe after a restart, with its capacity
//! and the bytes that were in flight.
//!
//! Capture: the buffered bytes are copied out with `tee(2)` from a
//! duplicate of the read end (`pidfd_getfd`) into a pipe of ours, so they
//! stay in the program's pipe: nothing has to be written back at resume.
//! Restart: a new pipe gets the old capacity (`F_SETPIPE_SZ`) and the bytes,
//! written before any process runs.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use ckpt_chunker::Hash;
use ckpt_store::Store;

use super::{LiveFd, Round, set_status_flags};
use crate::error::{EngineError, Result};
use crate::image::{FdImage, FdKind, ProcessImage};

/// The kernel's default pipe capacity.
const DEFAULT_CAPACITY: u32 = 65536;

pub fn capture(round: &mut Round, live: &LiveFd) -> Result<FdKind> {
    use std::os::unix::fs::MetadataExt;
    let pipe = live.meta.ino();
    let write = live.info.flags & libc::O_ACCMODE == libc::O_WRONLY;
    let fd = round.grab(live.pid, live.fd)?;
    // SAFETY: F_GETPIPE_SZ on our duplicate.
    let capacity = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETPIPE_SZ) }.max(0) as u32;
    let data = if write {
        None
    } else if let Some(d) = round.pipes_read.get(&pipe) {
        *d
    } else {
        let bytes = peek(&fd, capacity).map_err(|e| EngineError::io(format!("reading the bytes in flight in pipe {pipe} (process {}, fd {})", live.pid, live.fd), e))?;
        let d = if bytes.is_empty() { None } else { Some(round.put_blob(&bytes)?) };
        round.pipes_read.insert(pipe, d);
        d
    };
    Ok(FdKind::Pipe { pipe, write, capacity, data })
}

fn new_pipe(flags: i32) -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut p = [0; 2];
    // SAFETY: pipe2 writes two fds into `p`.
    if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC | flags) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds were just created.
    Ok(unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) })
}

fn set_capacity(fd: &OwnedFd, capacity: u32) -> std::io::Result<()> {
    // SAFETY: F_SETPIPE_SZ on our own pipe.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, capacity as libc::c_int) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The bytes buffered in the pipe whose read end is `fd`, left in place.
pub fn peek(fd: &OwnedFd, capacity: u32) -> std::io::Result<Vec<u8>> {
    let mut avail: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut avail) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if avail <= 0 {
        return Ok(Vec::new());
    }
    let (r, w) = new_pipe(libc::O_NONBLOCK)?;
    set_capacity(&w, capacity.max(avail as u32))?;
    // SAFETY: tee between two pipes we hold; copies without consuming.
    let n = unsafe { libc::tee(fd.as_raw_fd(), w.as_raw_fd(), avail as usize, libc::SPLICE_F_NONBLOCK) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if n as usize != avail as usize {
        return Err(std::io::Error::other(format!("tee copied {n} of {avail} bytes")));
    }
    drop(w);
    let mut out = Vec::with_capacity(n as usize);
    std::fs::File::from(r).read_to_end(&mut out)?;
    Ok(out)
}

/// The pipes of one restart, made on first use.
pub struct Pipes {
    /// By inode: capacity and bytes in flight, from any end in any image.
    wanted: HashMap<u64, (u32, Option<Vec<u8>>)>,
    /// Made so far: (read end, write end), each handed out once as is and
    /// reopened through /proc for further open file descriptions.
    made: HashMap<u64, [Option<OwnedFd>; 2]>,
    kept: HashMap<u64, [Option<OwnedFd>; 2]>,
}

impl Pipes {
    pub fn new(store: &Store, generation: u64, images: &[ProcessImage]) -> Result<Self> {
        let mut wanted: HashMap<u64, (u32, Option<Vec<u8>>)> = HashMap::new();
        for f in images.iter().flat_map(|i| &i.fds) {
            if let FdKind::Pipe { pipe, capacity, data, .. } = &f.kind {
                let e = wanted.entry(*pipe).or_insert((*capacity, None));
                e.0 = e.0.max(*capacity);
                if let (Some(h), None) = (data, &e.1) {
                    e.1 = Some(read_data(store, generation, *pipe, h)?);
                }
            }
        }
        Ok(Pipes { wanted, made: HashMap::new(), kept: HashMap::new() })
    }
}

fn read_data(store: &Store, generation: u64, pipe: u64, h: &Hash) -> Result<Vec<u8>> {
    store.read_blob(h).map_err(|e| EngineError::BadImage { generation, what: format!("the bytes in flight in pipe {pipe} are not readable ({e})") })
}

pub fn open(pipes: &mut Pipes, generation: u64, pid: i32, f: &FdImage) -> Result<OwnedFd> {
    let FdKind::Pipe { pipe, write, .. } = f.kind else { unreachable!("pipe::open of a non-pipe") };
    let err = |what: String| EngineError::Restore { generation, what: format!("pipe {pipe} (fd {} of process {pid}): {what}", f.fd) };
    if !pipes.made.contains_key(&pipe) {
        let (capacity, data) = pipes.wanted.get(&pipe).cloned().unwrap_or((DEFAULT_CAPACITY, None));
        let (r, w) = new_pipe(0).map_err(|e| err(format!("pipe2: {e}")))?;
        if capacity != DEFAULT_CAPACITY && capacity > 0 {
            set_capacity(&w, capacity).map_err(|e| err(format!("F_SETPIPE_SZ {capacity}: {e}")))?;
        }
        if let Some(bytes) = data {
            // The pipe is at least as large as what it held: this cannot block.
            std::fs::File::from(super::dup(&w)?).write_all(&bytes).map_err(|e| err(format!("refilling {} bytes: {e}", bytes.len())))?;
        }
        pipes.kept.insert(pipe, [Some(super::dup(&r)?), Some(super::dup(&w)?)]);
        pipes.made.insert(pipe, [Some(r), Some(w)]);
    }
    let end = write as usize;
    let fd = match pipes.made.get_mut(&pipe).and_then(|m| m[end].take()) {
        Some(fd) => fd,
        None => {
            // A second open file description of the same end.
            let kept = pipes.kept[&pipe][end].as_ref().expect("kept ends");
            let path = format!("/proc/self/fd/{}", kept.as_raw_fd());
            let mode = if write { libc::O_WRONLY } else { libc::O_RDONLY };
            let c = std::ffi::CString::new(path).expect("no NUL");
            // SAFETY: open of a /proc path; the fd is owned below.
            let n = unsafe { libc::open(c.as_ptr(), mode | libc::O_CLOEXEC) };
            if n < 0 {
                return Err(err(format!("reopening the {} end: {}", if write { "write" } else { "read" }, std::io::Error::last_os_error())));
            }
            // SAFETY: a new fd we own.
            unsafe { OwnedFd::from_raw_fd(n) }
        }
    };
    set_status_flags(&fd, f.flags);
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peek_leaves_the_bytes_in_place() {
        let (r, w) = new_pipe(0).unwrap();
        std::fs::File::from(super::super::dup(&w).unwrap()).write_all(b"hello, pipe").unwrap();
        assert_eq!(peek(&r, DEFAULT_CAPACITY).unwrap(), b"hello, pipe");
        drop(w);
        let mut rest = Vec::new();
        std::fs::File::from(r).read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"hello, pipe");
    }

    #[test]
    fn peek_of_an_empty_pipe_is_empty() {
        let (r, _w) = new_pipe(0).unwrap();
        assert!(peek(&r, DEFAULT_CAPACITY).unwrap().is_empty());
    }
}
