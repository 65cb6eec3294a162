//! POSIX message queues (`mq_open`): attributes, and the messages with
//! their priorities.
//!
//! Capture (processes stopped) opens the queue again, read-write, through
//! `/proc/PID/fd/N` (a new open file description, so a write-only fd of the
//! program is no obstacle and its `O_NONBLOCK` is untouched), receives
//! every message with a timeout already past, and sends each back at once
//! in the same order with its priority: the queue holds what it held, in
//! the order `mq_receive` gives it (priority, then arrival). A queue is
//! read once per round (by inode) whatever the number of fds.
//!
//! Restart makes each queue once with its attributes (`mq_maxmsg`,
//! `mq_msgsize`), mode and owner, sends the messages, and gives every fd
//! its own open file description (access mode, `O_NONBLOCK`). A queue that
//! had been `mq_unlink`ed is made under a scratch name and unlinked at
//! once. A named queue that exists at restart is taken as the killed
//! computation's own leftover when its owner, mode and attributes are the
//! image's: it is removed and made again with the image's messages;
//! otherwise the restart is refused, naming the command that removes it.
//!
//! Not kept: an `mq_notify` registration (the checkpoint is refused,
//! naming it: the program would wait for a notification that never comes).

use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

use ckpt_store::Store;

use super::{LiveFd, Round, set_status_flags, take_fd};
use crate::error::{EngineError, Result};
use crate::image::{FdImage, FdKind, MqueueImage, ProcessImage};

/// `statfs` type of the mqueue file system.
const MQUEUE_MAGIC: i64 = 0x1980_0202;
/// Largest `mq_msgsize` and `mq_maxmsg` accepted from an image (the
/// kernel's hard limits).
const MAX_MSGSIZE: i64 = 16 << 20;
const MAX_MAXMSG: i64 = 65536;

/// Whether `/proc/PID/fd/FD` is a message queue.
pub fn is_mqueue(pid: i32, fd: i32) -> bool {
    let Ok(p) = CString::new(format!("/proc/{pid}/fd/{fd}")) else { return false };
    // SAFETY: statfs fills a zeroed struct; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::statfs(p.as_ptr(), &mut st) == 0 && st.f_type == MQUEUE_MAGIC }
}

fn attr(fd: &OwnedFd) -> std::io::Result<libc::mq_attr> {
    // SAFETY: mq_attr is plain data; mq_getattr fills it.
    let mut a: libc::mq_attr = unsafe { std::mem::zeroed() };
    // SAFETY: as above, on a queue fd we own.
    if unsafe { libc::mq_getattr(fd.as_raw_fd(), &mut a) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(a)
}

const PAST: libc::timespec = libc::timespec { tv_sec: 0, tv_nsec: 0 };

pub fn capture(round: &mut Round, live: &LiveFd) -> Result<FdKind> {
    let ino = live.meta.ino();
    if let Some(q) = round.mqueues_read.get(&ino) {
        return Ok(FdKind::Mqueue(q.clone()));
    }
    let fail = |what: String| live.unsupported(&format!("POSIX message queue {what}"));
    let src = format!("/proc/{}/fd/{}", live.pid, live.fd);
    // The queue's own text: QSIZE, NOTIFY, SIGNO, NOTIFY_PID.
    let text = std::fs::read_to_string(&src).map_err(|e| fail(format!("whose state cannot be read ({e})")))?;
    let notify_pid = text.split_whitespace().find_map(|w| w.strip_prefix("NOTIFY_PID:")).and_then(|v| v.parse::<i32>().ok()).unwrap_or(0);
    if notify_pid != 0 {
        return Err(fail(format!("with an mq_notify registration of process {notify_pid}, which ckpt cannot restore yet; cancel it (mq_notify(fd, NULL)) before checkpointing")));
    }
    let q = super::deleted::reopen_path(&src, libc::O_RDWR).map_err(|e| fail(format!("that cannot be opened again ({e})")))?;
    let a = attr(&q).map_err(|e| fail(format!("whose attributes cannot be read ({e})")))?;
    let mut buf = vec![0u8; a.mq_msgsize.clamp(1, MAX_MSGSIZE) as usize];
    let mut messages = Vec::new();
    let mut data = Vec::new();
    loop {
        let mut prio: libc::c_uint = 0;
        // SAFETY: receives into `buf` (its length given) with a timeout in the past.
        let n = unsafe { libc::mq_timedreceive(q.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), &mut prio, &PAST) };
        if n < 0 {
            break; // ETIMEDOUT: empty
        }
        messages.push((prio, n as u32));
        data.extend_from_slice(&buf[..n as usize]);
    }
    // Put them back at once, in the order they came out.
    send_all(&q, &messages, &data).map_err(|e| fail(format!("whose messages could not all be put back ({e}): {} messages may be lost", messages.len())))?;
    let name = live.target.strip_suffix(" (deleted)").unwrap_or(live.target).to_string();
    let image = MqueueImage {
        unlinked: live.target.ends_with(" (deleted)"),
        name,
        ino,
        mode: live.meta.mode() & 0o7777,
        uid: live.meta.uid(),
        gid: live.meta.gid(),
        maxmsg: a.mq_maxmsg,
        msgsize: a.mq_msgsize,
        data: if data.is_empty() { None } else { Some(round.put_blob(&data)?) },
        messages,
    };
    round.mqueues_read.insert(ino, image.clone());
    Ok(FdKind::Mqueue(image))
}

fn send_all(q: &OwnedFd, messages: &[(u32, u32)], data: &[u8]) -> std::io::Result<()> {
    let mut off = 0usize;
    for &(prio, len) in messages {
        let m = &data[off..off + len as usize];
        off += len as usize;
        // SAFETY: sends `m` (its length given) with a timeout in the past.
        if unsafe { libc::mq_timedsend(q.as_raw_fd(), m.as_ptr().cast(), m.len(), prio, &PAST) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The queues of one restart, each made once.
pub struct Queues {
    made: HashMap<u64, OwnedFd>,
}

impl Queues {
    pub fn new(images: &[ProcessImage]) -> Queues {
        let _ = images;
        Queues { made: HashMap::new() }
    }
}

fn make(store: &Store, generation: u64, pid: i32, q: &MqueueImage) -> Result<OwnedFd> {
    let err = |what: String| EngineError::Restore { generation, what: format!("POSIX message queue {} of process {pid}: {what}", q.name) };
    let bad = |what: String| EngineError::BadImage { generation, what: format!("POSIX message queue {} of process {pid}: {what}", q.name) };
    if !(1..=MAX_MAXMSG).contains(&q.maxmsg) || !(1..=MAX_MSGSIZE).contains(&q.msgsize) || q.messages.len() as i64 > q.maxmsg {
        return Err(bad(format!("attributes maxmsg {} msgsize {} with {} messages", q.maxmsg, q.msgsize, q.messages.len())));
    }
    let rest = q.name.strip_prefix('/').unwrap_or("");
    if rest.is_empty() || rest.contains('/') || q.name.contains('\0') || q.name.len() > 255 {
        return Err(bad("is not a queue name".into()));
    }
    let data = match &q.data {
        Some(h) => store.read_blob(h)?,
        None => Vec::new(),
    };
    let total: u64 = q.messages.iter().map(|m| m.1 as u64).sum();
    if total != data.len() as u64 || q.messages.iter().any(|m| m.1 as i64 > q.msgsize) {
        return Err(bad(format!("{} messages of {total} bytes with {} bytes of data", q.messages.len(), data.len())));
    }
    let name = if q.unlinked { format!("/ckpt-restore-{}-{}", std::process::id(), q.ino) } else { q.name.clone() };
    let c = CString::new(name.as_bytes()).map_err(|_| bad("a NUL in its name".into()))?;
    // SAFETY: mq_attr is plain data.
    let mut a: libc::mq_attr = unsafe { std::mem::zeroed() };
    a.mq_maxmsg = q.maxmsg;
    a.mq_msgsize = q.msgsize;
    let open = || {
        // SAFETY: mq_open with a NUL-terminated name, a mode and our attributes; taken at once.
        unsafe { take_fd(libc::mq_open(c.as_ptr(), libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC, (q.mode & 0o777) as libc::c_uint, &a as *const libc::mq_attr).into()) }
    };
    let fd = match open() {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) && !q.unlinked => {
            // A leftover of the killed computation (same owner, mode and
            // attributes) is replaced; anything else is refused.
            let path = format!("/dev/mqueue{}", q.name);
            // SAFETY: mq_open of an existing queue, read-only; taken at once.
            let old = unsafe { take_fd(libc::mq_open(c.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC).into()) }.map_err(|e| err(format!("exists and cannot be opened ({e})")))?;
            let md = std::fs::metadata(format!("/proc/self/fd/{}", old.as_raw_fd())).map_err(|e| err(format!("exists and cannot be read ({e})")))?;
            let oa = attr(&old).map_err(|e| err(format!("exists and its attributes cannot be read ({e})")))?;
            if md.uid() != q.uid || md.gid() != q.gid || md.mode() & 0o7777 != q.mode || oa.mq_maxmsg != q.maxmsg || oa.mq_msgsize != q.msgsize {
                return Err(err(format!(
                    "a queue of that name exists and is not this computation's (owner {}:{}, mode {:o}, maxmsg {}, msgsize {}; the image has {}:{}, {:o}, {}, {}): remove it (`rm {path}`, or mq_unlink) if nothing uses it, and restart again",
                    md.uid(), md.gid(), md.mode() & 0o7777, oa.mq_maxmsg, oa.mq_msgsize, q.uid, q.gid, q.mode, q.maxmsg, q.msgsize
                )));
            }
            tracing::info!(pid, "POSIX message queue {} was left by the killed computation: made again with the checkpoint's messages", q.name);
            // SAFETY: mq_unlink with a NUL-terminated name.
            unsafe { libc::mq_unlink(c.as_ptr()) };
            open().map_err(|e| err(format!("mq_open after removing the leftover: {e}")))?
        }
        Err(e) => return Err(err(format!("mq_open: {e}"))),
    };
    if q.unlinked {
        // SAFETY: mq_unlink with a NUL-terminated name.
        unsafe { libc::mq_unlink(c.as_ptr()) };
    }
    // SAFETY: fchown/fchmod on our own fd.
    unsafe {
        libc::fchmod(fd.as_raw_fd(), q.mode & 0o7777);
        libc::fchown(fd.as_raw_fd(), q.uid, q.gid);
    }
    send_all(&fd, &q.messages, &data).map_err(|e| err(format!("sending its {} messages: {e}", q.messages.len())))?;
    Ok(fd)
}

/// A new open file description of the queue `f` had.
pub fn open(queues: &mut Queues, store: &Store, generation: u64, pid: i32, f: &FdImage) -> Result<OwnedFd> {
    let FdKind::Mqueue(q) = &f.kind else { unreachable!("mqueue::open of another kind") };
    if let std::collections::hash_map::Entry::Vacant(e) = queues.made.entry(q.ino) {
        let fd = make(store, generation, pid, q)?;
        e.insert(fd);
    }
    let fd = super::deleted::reopen(&queues.made[&q.ino], f.flags & (libc::O_ACCMODE | libc::O_NONBLOCK))
        .map_err(|e| EngineError::Restore { generation, what: format!("POSIX message queue {} as fd {} of process {pid}: {e}", q.name, f.fd) })?;
    set_status_flags(&fd, f.flags);
    Ok(fd)
}
