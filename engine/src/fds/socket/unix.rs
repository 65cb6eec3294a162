//! Unix sockets (stream, datagram, seqpacket).
//!
//! Capture: sock_diag gives the type, state, name, peer and queue length;
//! the receive queue is copied with `recvmsg(MSG_PEEK | MSG_DONTWAIT)` on
//! the borrowed socket, one message at a time through `SO_PEEK_OFF` (so
//! message boundaries are kept), and the socket's own peek offset is put
//! back afterwards. Nothing is ever read off the queue: the program finds
//! its bytes where they were when it resumes.
//!
//! Restart: two sockets connected to each other (a `socketpair`, or a
//! client and the connection a server accepted for it) become one new
//! `socketpair` of the same type, each end's queue refilled by sending from
//! the other end (message by message, so datagram and seqpacket boundaries
//! stay). Names are bound again (a stale socket file at the path is
//! unlinked first), listeners listen again with their backlog, datagram
//! sockets get their queued messages from a temporary sender and are
//! connected again to their named peer once every socket exists. The
//! socket file of a path name gets its recorded mode and owner back after
//! the bind (a relative name is looked up in the process's cwd at
//! capture). A pair's ends are shut down again (`sk_shutdown` from
//! sock_diag) once their bytes are refilled.
//!
//! Not kept: the names of a connected stream/seqpacket pair (the new pair
//! is unnamed; datagram pairs are bound to their names again: `getsockname`/`getpeername` return an empty address), the
//! sender address and `SCM_CREDENTIALS` of queued datagrams (the refill's
//! are seen), out-of-band bytes. Messages carrying fds (`SCM_RIGHTS`) and
//! connections not accepted yet are refused at checkpoint with an error.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use ckpt_store::Store;

use super::sys::*;
use super::{Netns, apply_opts, default_buffers, getsockopt_int, grow_sndbuf, new_socket, read_blob, read_opts, setsockopt_int};
use crate::error::{EngineError, Result};
use crate::fds::{LiveFd, Round};
use crate::image::{FdKind, ProcessImage, UnixSocketImage};

/// A captured unix socket, for the checks of [`finish`].
pub(super) struct Seen {
    pid: i32,
    fd: i32,
    ino: u64,
    netns: u64,
    ty: i32,
    peer: u64,
    peer_name: Option<Vec<u8>>,
}

/// `sun_path` bytes for people: a path, or `@name` for an abstract name.
pub fn show_name(name: &[u8]) -> String {
    match name.split_first() {
        Some((0, rest)) => format!("@{}", String::from_utf8_lossy(rest)),
        _ => String::from_utf8_lossy(name.split(|&b| b == 0).next().unwrap_or_default()).into_owned(),
    }
}

fn type_name(ty: i32) -> &'static str {
    match ty {
        libc::SOCK_STREAM => "unix stream socket",
        libc::SOCK_DGRAM => "unix datagram socket",
        libc::SOCK_SEQPACKET => "unix seqpacket socket",
        _ => "unix socket",
    }
}

pub(super) fn capture(round: &mut Round, live: &LiveFd, fd: OwnedFd, ino: u64, ty: i32, netns: u64) -> Result<UnixSocketImage> {
    let (pid, n) = (live.pid, live.fd);
    let io_err = |what: &str, e: io::Error| EngineError::io(format!("{what} of unix socket {} (process {pid}, fd {n})", live.target), e);
    let table = round.sockets.unix_table(pid, netns).map_err(|e| io_err("sock_diag", e))?;
    let info = table.get(&ino).cloned().ok_or_else(|| io_err("sock_diag", io::Error::other("the kernel does not list it")))?;
    let peer_name = table.get(&info.peer).and_then(|p| p.name.clone());
    let stream_like = ty != libc::SOCK_DGRAM;
    let listening = info.state == TCP_LISTEN;
    if !matches!(info.state, TCP_LISTEN | TCP_ESTABLISHED | TCP_CLOSE) {
        return Err(EngineError::SocketBusy { pid, fd: n, what: format!("{} {} is being connected (state {})", type_name(ty), live.target, info.state) });
    }
    // A stream peer that was closed is gone from the kernel's table: our
    // socket still points to it (shut down), diag reports peer 0.
    let peer_gone = stream_like && info.state == TCP_ESTABLISHED && info.peer == 0;
    let (data, messages) = if listening {
        (None, Vec::new())
    } else {
        let msgs = peek_queue(&fd, ty, info.rqueue as usize).map_err(|e| io_err("reading the bytes in flight", e))?;
        let bytes: Vec<u8> = msgs.concat();
        let data = if bytes.is_empty() && msgs.is_empty() { None } else { Some(round.put_blob(&bytes)?) };
        let lens = if stream_like && ty == libc::SOCK_STREAM { Vec::new() } else { msgs.iter().map(|m| m.len() as u32).collect() };
        (data, lens)
    };
    let opts = read_opts(&fd, default_buffers(), false);
    round.sockets.unix.push(Seen { pid, fd: n, ino, netns, ty, peer: info.peer, peer_name: peer_name.clone() });
    tracing::debug!(pid, fd = n, ino, peer = info.peer, state = info.state, queued = info.rqueue, "captured {}", type_name(ty));
    Ok(UnixSocketImage {
        netns,
        ino,
        ty,
        name: info.name.clone(),
        listen_backlog: listening.then_some(info.wqueue),
        peer: info.peer,
        peer_name,
        peer_gone,
        data,
        messages,
        opts,
        file: info.name.as_deref().and_then(|n| socket_file(pid, n)),
        shutdown: info.shutdown & 3,
    })
}

/// The mode and owner of the socket file of a path name, seen from the
/// process (its root for an absolute name, its cwd for a relative one:
/// where the name was bound, unless the process changed directory since).
fn socket_file(pid: i32, name: &[u8]) -> Option<crate::image::SocketFile> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    if name.first().is_none_or(|&b| b == 0) {
        return None;
    }
    let path = std::ffi::OsStr::from_bytes(name.split(|&b| b == 0).next().unwrap_or_default());
    let base = if path.as_bytes().starts_with(b"/") { format!("/proc/{pid}/root") } else { format!("/proc/{pid}/cwd/") };
    let mut full = std::ffi::OsString::from(base);
    full.push(path);
    let m = std::fs::symlink_metadata(&full).ok().filter(|m| m.file_type().is_socket())?;
    Some(crate::image::SocketFile { mode: m.mode() & 0o7777, uid: m.uid(), gid: m.gid() })
}

/// `shutdown()` as `sk_shutdown` bits say (1: reads, 2: writes).
fn shut(s: &OwnedFd, bits: u8) -> io::Result<()> {
    let how = match bits & 3 {
        0 => return Ok(()),
        1 => libc::SHUT_RD,
        2 => libc::SHUT_WR,
        _ => libc::SHUT_RDWR,
    };
    // SAFETY: shutdown of our own socket.
    if unsafe { libc::shutdown(s.as_raw_fd(), how) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Gives the socket file just bound at `name` its recorded mode and owner.
fn restore_file(name: &[u8], f: &crate::image::SocketFile) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let path = std::path::Path::new(std::ffi::OsStr::from_bytes(name.split(|&b| b == 0).next().unwrap_or_default()));
    let m = std::fs::symlink_metadata(path)?;
    if (m.uid(), m.gid()) != (f.uid, f.gid) {
        std::os::unix::fs::lchown(path, Some(f.uid), Some(f.gid))?;
    }
    if m.mode() & 0o7777 != f.mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(f.mode))?;
    }
    Ok(())
}

/// The messages in the receive queue of `fd`, left in place. A stream
/// socket's bytes come back as one message; `expected` is the byte count
/// sock_diag gave (stream and seqpacket).
pub fn peek_queue(fd: &OwnedFd, ty: i32, expected: usize) -> io::Result<Vec<Vec<u8>>> {
    let saved = getsockopt_int(fd, libc::SOL_SOCKET, SO_PEEK_OFF)?;
    let got = peek_all(fd, ty, expected);
    // Put the program's peek offset back (-1: it had none) whatever happened.
    let put_back = setsockopt_int(fd, libc::SOL_SOCKET, SO_PEEK_OFF, saved);
    let msgs = got?;
    put_back?;
    Ok(msgs)
}

fn peek_all(fd: &OwnedFd, ty: i32, expected: usize) -> io::Result<Vec<Vec<u8>>> {
    let stream = ty == libc::SOCK_STREAM;
    let mut msgs: Vec<Vec<u8>> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let (mut off, mut total) = (0usize, 0usize);
    loop {
        if ty != libc::SOCK_DGRAM && total >= expected {
            break;
        }
        if msgs.len() > 1 << 20 {
            return Err(io::Error::other("more than a million queued messages"));
        }
        setsockopt_int(fd, libc::SOL_SOCKET, SO_PEEK_OFF, off as i32)?;
        let flags = libc::MSG_PEEK | libc::MSG_DONTWAIT | if stream { 0 } else { libc::MSG_TRUNC };
        let (n, out_flags) = match recv_peek(fd, &mut buf, flags) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        };
        if !stream && n > buf.len() {
            // A datagram larger than the buffer: again, at the same offset.
            buf.resize(n, 0);
            continue;
        }
        if n == 0 && ty != libc::SOCK_DGRAM {
            break; // end of file (the peer is gone)
        }
        let _ = out_flags;
        msgs.push(buf[..n].to_vec());
        off += n;
        total += n;
    }
    if stream {
        return Ok(if msgs.is_empty() { Vec::new() } else { vec![msgs.concat()] });
    }
    Ok(msgs)
}

/// One `recvmsg` with `flags`; fds passed along with the message
/// (`SCM_RIGHTS`) are closed again and make it fail.
fn recv_peek(fd: &OwnedFd, buf: &mut [u8], flags: i32) -> io::Result<(usize, i32)> {
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let mut control = [0u64; 64];
    // SAFETY: an all-zero msghdr is valid; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: recvmsg writes into the buffers `msg` points to, within their lengths.
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds_passed = msg.msg_flags & libc::MSG_CTRUNC != 0;
    // SAFETY: CMSG_* walk the control buffer the kernel filled, within msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                fds_passed = true;
                let data = libc::CMSG_DATA(c) as *const i32;
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                for i in 0..count {
                    drop(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if fds_passed {
        return Err(io::Error::other("a queued message carries file descriptors (SCM_RIGHTS), which ckpt cannot checkpoint yet; let the program receive it first"));
    }
    Ok((n as usize, msg.msg_flags))
}

/// A `sockaddr_un` for `name` (exact `sun_path` bytes).
fn addr(name: &[u8]) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: an all-zero sockaddr_un is valid.
    let mut a: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if name.len() > a.sun_path.len() {
        return Err(io::Error::other("name longer than sun_path"));
    }
    a.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in a.sun_path.iter_mut().zip(name) {
        *d = *s as libc::c_char;
    }
    Ok((a, (std::mem::size_of::<libc::sa_family_t>() + name.len()) as libc::socklen_t))
}

/// Sends `msgs` from `sender` (to `to`, if given), never blocking: the
/// send buffer grows when it is too small for what was queued.
pub fn refill(sender: &OwnedFd, to: Option<&[u8]>, msgs: &[&[u8]], stream: bool) -> io::Result<()> {
    let dest = to.map(addr).transpose()?;
    for m in msgs {
        let mut sent = 0;
        let mut grown = 0;
        loop {
            let rest = &m[sent..];
            let (ap, al) = match &dest {
                Some((a, l)) => ((a as *const libc::sockaddr_un).cast::<libc::sockaddr>(), *l),
                None => (std::ptr::null(), 0),
            };
            // SAFETY: sendto reads `rest` and the address, both alive here.
            let n = unsafe { libc::sendto(sender.as_raw_fd(), rest.as_ptr().cast(), rest.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL, ap, al) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock && grown < 3 {
                    grow_sndbuf(sender, m.len())?;
                    grown += 1;
                    continue;
                }
                return Err(e);
            }
            sent += n as usize;
            if !stream && sent != m.len() {
                return Err(io::Error::other(format!("sent {sent} of a {}-byte message", m.len())));
            }
            if sent >= m.len() {
                break;
            }
        }
    }
    Ok(())
}

/// The messages of an image's queue.
fn split<'a>(u: &UnixSocketImage, data: &'a [u8]) -> Vec<&'a [u8]> {
    if u.ty == libc::SOCK_STREAM {
        return if data.is_empty() { Vec::new() } else { vec![data] };
    }
    let mut out = Vec::new();
    let mut rest = data;
    for &l in &u.messages {
        let (m, r) = rest.split_at((l as usize).min(rest.len()));
        out.push(m);
        rest = r;
    }
    out
}

/// Removes a socket file left at `name`'s path by the program's earlier
/// life; anything else at that path is an error.
fn unlink_stale(name: &[u8]) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::FileTypeExt;
    if name.first() == Some(&0) || name.is_empty() {
        return Ok(()); // abstract: nothing on disk
    }
    let path = std::path::Path::new(std::ffi::OsStr::from_bytes(name.split(|&b| b == 0).next().unwrap_or_default()));
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Err(io::Error::other(format!("{} exists and is not a socket", path.display()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Binds as the process ([`crate::creds::as_process`]): a path name is
/// made with its identity (bind fails if anything is at the path).
fn bind(fd: &OwnedFd, name: &[u8]) -> io::Result<()> {
    let (a, l) = addr(name)?;
    crate::creds::as_process(|| {
        // SAFETY: bind reads the address we pass.
        if unsafe { libc::bind(fd.as_raw_fd(), (&a as *const libc::sockaddr_un).cast(), l) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    })
}

/// Connects as the process (the socket file's permissions are checked
/// against its identity).
fn connect(fd: &OwnedFd, name: &[u8]) -> io::Result<()> {
    let (a, l) = addr(name)?;
    crate::creds::as_process(|| {
        // SAFETY: connect reads the address we pass.
        if unsafe { libc::connect(fd.as_raw_fd(), (&a as *const libc::sockaddr_un).cast(), l) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    })
}

fn socketpair(ty: i32) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut p = [0; 2];
    // SAFETY: socketpair writes two fds into `p`.
    if unsafe { libc::socketpair(libc::AF_UNIX, ty | libc::SOCK_CLOEXEC, 0, p.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds were just created.
    Ok(unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) })
}

/// Who (outside the computation) holds socket `ino`, for error messages.
fn holder(ino: u64) -> Option<String> {
    let want = format!("socket:[{ino}]");
    for p in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else { continue };
        for f in fds.flatten() {
            if std::fs::read_link(f.path()).is_ok_and(|t| t.as_os_str() == want.as_str()) {
                let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
                return Some(format!("process {pid} ({}) fd {}", comm.trim(), f.file_name().to_string_lossy()));
            }
        }
    }
    None
}

/// Checks, once every process was captured, that each connected socket's
/// peer was captured too (or can be found again by name).
pub(super) fn finish(seen: &[Seen], netns: &HashMap<u64, Netns>) -> Result<()> {
    let captured: std::collections::HashSet<(u64, u64)> = seen.iter().map(|s| (s.netns, s.ino)).collect();
    for s in seen.iter().filter(|s| s.peer != 0 && !captured.contains(&(s.netns, s.peer))) {
        let table = netns.get(&s.netns).and_then(|n| n.unix.as_ref());
        if s.ty == libc::SOCK_DGRAM && s.peer_name.is_some() {
            continue; // connected again by name at restart
        }
        if let Some((_, l)) = table.and_then(|t| t.iter().find(|(_, i)| i.icons.contains(&s.peer))) {
            let name = l.name.as_deref().map(show_name).unwrap_or_default();
            return Err(EngineError::SocketBusy {
                pid: s.pid,
                fd: s.fd,
                what: format!("its {} is connected to a connection that the listening socket {name} has not accepted yet", type_name(s.ty)),
            });
        }
        let mut peer = format!("socket:[{}]", s.peer);
        if let Some(n) = &s.peer_name {
            peer = format!("{peer} ({}, a server outside the computation)", show_name(n));
        }
        if let Some(h) = holder(s.peer) {
            peer = format!("{peer}, held by {h}");
        }
        return Err(EngineError::SocketPeer { pid: s.pid, fd: s.fd, what: format!("a {}", type_name(s.ty)), peer });
    }
    Ok(())
}

/// The unix sockets of one restart.
pub(super) struct Restore {
    by_ino: HashMap<u64, UnixSocketImage>,
    /// Other ends of pairs made already, waiting for their fd.
    pending: HashMap<u64, OwnedFd>,
    /// Datagram sockets to connect to a named peer once all are bound:
    /// (socket, peer name, pid, fd).
    connects: Vec<(OwnedFd, Vec<u8>, i32, i32)>,
}

impl Restore {
    pub fn new(images: &[ProcessImage]) -> Self {
        let by_ino = images
            .iter()
            .flat_map(|i| &i.fds)
            .filter_map(|f| match &f.kind {
                FdKind::Unix(u) => Some((u.ino, u.clone())),
                _ => None,
            })
            .collect();
        Restore { by_ino, pending: HashMap::new(), connects: Vec::new() }
    }

    pub fn open(&mut self, store: &Store, generation: u64, pid: i32, fd: i32, u: &UnixSocketImage) -> Result<OwnedFd> {
        let err = |what: String| EngineError::Restore { generation, what: format!("{} at fd {fd} of process {pid}: {what}", type_name(u.ty)) };
        if let Some(s) = self.pending.remove(&u.ino) {
            return Ok(s);
        }
        let data = read_blob(store, generation, pid, fd, "bytes in flight", &u.data)?;
        let stream = u.ty == libc::SOCK_STREAM;
        let peer = self.by_ino.get(&u.peer).filter(|p| u.peer != 0 && p.peer == u.ino);
        if let Some(p) = peer.cloned() {
            let pdata = read_blob(store, generation, pid, fd, "peer's bytes in flight", &p.data)?;
            let (a, b) = socketpair(u.ty).map_err(|e| err(format!("socketpair: {e}")))?;
            apply_opts(&a, &u.opts, false).map_err(|e| err(format!("options: {e}")))?;
            apply_opts(&b, &p.opts, false).map_err(|e| err(format!("options of its peer: {e}")))?;
            if u.ty == libc::SOCK_DGRAM {
                // Datagram ends keep their names (given by bind, or by
                // autobind for SO_PASSCRED): the ends of a new pair may
                // still be bound. (A stream pair's names are the
                // listener's, which it keeps.)
                for (s, n) in [(&a, &u.name), (&b, &p.name)] {
                    if let Some(name) = n {
                        unlink_stale(name).map_err(|e| err(format!("cannot free {}: {e}", show_name(name))))?;
                        bind(s, name).map_err(|e| err(format!("bind {}: {e}", show_name(name))))?;
                    }
                }
            }
            refill(&b, None, &split(u, &data), stream).map_err(|e| err(format!("refilling {} bytes: {e}", data.len())))?;
            refill(&a, None, &split(&p, &pdata), stream).map_err(|e| err(format!("refilling its peer's {} bytes: {e}", pdata.len())))?;
            // Once the bytes are in: each end's shutdown() (which the
            // other end sees as well).
            for (s, how) in [(&a, u.shutdown), (&b, p.shutdown)] {
                shut(s, how).map_err(|e| err(format!("shutdown: {e}")))?;
            }
            self.pending.insert(p.ino, b);
            return Ok(a);
        }
        if u.peer_gone || (u.peer != 0 && u.ty != libc::SOCK_DGRAM) {
            if !u.peer_gone {
                return Err(err(format!("its peer socket:[{}] is not in the image", u.peer)));
            }
            // The peer had closed: a pair whose other end goes away once
            // the bytes are in.
            let (a, b) = socketpair(u.ty).map_err(|e| err(format!("socketpair: {e}")))?;
            apply_opts(&a, &u.opts, false).map_err(|e| err(format!("options: {e}")))?;
            refill(&b, None, &split(u, &data), stream).map_err(|e| err(format!("refilling {} bytes: {e}", data.len())))?;
            return Ok(a);
        }
        let s = new_socket(libc::AF_UNIX, u.ty).map_err(|e| err(format!("socket: {e}")))?;
        apply_opts(&s, &u.opts, false).map_err(|e| err(format!("options: {e}")))?;
        if let Some(name) = &u.name {
            unlink_stale(name).map_err(|e| err(format!("cannot free {}: {e}", show_name(name))))?;
            bind(&s, name).map_err(|e| err(format!("bind {}: {e}", show_name(name))))?;
            if let Some(f) = &u.file {
                restore_file(name, f).map_err(|e| err(format!("cannot give the socket file {} its mode {:o} and owner {}:{}: {e}", show_name(name), f.mode, f.uid, f.gid)))?;
            }
        }
        if let Some(backlog) = u.listen_backlog {
            // SAFETY: listen on our own socket.
            if unsafe { libc::listen(s.as_raw_fd(), backlog as i32) } != 0 {
                return Err(err(format!("listen: {}", io::Error::last_os_error())));
            }
        }
        let msgs = split(u, &data);
        if !msgs.is_empty() {
            match &u.name {
                Some(name) => {
                    let tmp = new_socket(libc::AF_UNIX, u.ty).map_err(|e| err(format!("socket: {e}")))?;
                    refill(&tmp, Some(name), &msgs, stream).map_err(|e| err(format!("refilling {} messages: {e}", msgs.len())))?;
                }
                None => tracing::warn!(pid, fd, "{} messages queued on an unnamed, unpaired datagram socket are lost", msgs.len()),
            }
        }
        if let (true, Some(pn)) = (u.peer != 0, &u.peer_name) {
            self.connects.push((crate::fds::dup(&s)?, pn.clone(), pid, fd));
        }
        Ok(s)
    }

    pub fn finish(self, generation: u64) -> Result<()> {
        for (s, name, pid, fd) in &self.connects {
            connect(s, name).map_err(|e| EngineError::Restore {
                generation,
                what: format!("connecting the datagram socket at fd {fd} of process {pid} to {} again: {e}", show_name(name)),
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recv_all(fd: &OwnedFd) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 1 << 17];
        loop {
            // SAFETY: recv into our buffer.
            let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
            if n < 0 {
                return out;
            }
            out.push(buf[..n as usize].to_vec());
            if n == 0 && out.len() > 100 {
                return out;
            }
        }
    }

    fn peek_refill_roundtrip(ty: i32, msgs: &[&[u8]]) {
        let (a, b) = socketpair(ty).unwrap();
        refill(&b, None, msgs, ty == libc::SOCK_STREAM).unwrap();
        let total: usize = msgs.iter().map(|m| m.len()).sum();
        // The program had a peek offset of its own: it must survive.
        setsockopt_int(&a, libc::SOL_SOCKET, SO_PEEK_OFF, 3).unwrap();
        let got = peek_queue(&a, ty, total).unwrap();
        assert_eq!(getsockopt_int(&a, libc::SOL_SOCKET, SO_PEEK_OFF).unwrap(), 3);
        setsockopt_int(&a, libc::SOL_SOCKET, SO_PEEK_OFF, -1).unwrap();
        if ty == libc::SOCK_STREAM {
            assert_eq!(got, vec![msgs.concat()]);
        } else {
            assert_eq!(got, msgs.iter().map(|m| m.to_vec()).collect::<Vec<_>>());
        }
        // Still there, boundaries intact, after a refill into a new pair.
        let (c, d) = socketpair(ty).unwrap();
        let refs: Vec<&[u8]> = got.iter().map(|m| m.as_slice()).collect();
        refill(&d, None, &refs, ty == libc::SOCK_STREAM).unwrap();
        let orig = recv_all(&a);
        let copy = recv_all(&c);
        if ty == libc::SOCK_STREAM {
            assert_eq!(orig.concat(), msgs.concat());
            assert_eq!(copy.concat(), msgs.concat());
        } else {
            assert_eq!(orig, copy);
            assert_eq!(orig.len(), msgs.len());
        }
    }

    #[test]
    fn stream_queue_is_peeked_and_refilled() {
        let big = vec![7u8; 300_000];
        peek_refill_roundtrip(libc::SOCK_STREAM, &[b"hello ", b"world", &big]);
    }

    #[test]
    fn datagram_boundaries_survive() {
        let big = vec![9u8; 100_000];
        peek_refill_roundtrip(libc::SOCK_DGRAM, &[b"one", b"", b"three", &big]);
    }

    #[test]
    fn seqpacket_boundaries_survive() {
        peek_refill_roundtrip(libc::SOCK_SEQPACKET, &[b"a", b"bb", b"ccc"]);
    }

    #[test]
    fn fds_in_flight_are_refused() {
        let (a, b) = socketpair(libc::SOCK_STREAM).unwrap();
        let passed = std::fs::File::open("/dev/null").unwrap();
        let fds = [passed.as_raw_fd()];
        let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
        nix::sys::socket::sendmsg::<()>(b.as_raw_fd(), &[io::IoSlice::new(b"x")], &cmsg, nix::sys::socket::MsgFlags::empty(), None).unwrap();
        let e = peek_queue(&a, libc::SOCK_STREAM, 1).unwrap_err();
        assert!(e.to_string().contains("SCM_RIGHTS"), "{e}");
        assert_eq!(recv_all(&a), vec![b"x".to_vec()]);
    }
}
