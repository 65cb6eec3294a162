//! Sockets: unix ([`unix`]), TCP ([`tcp`]) and UDP ([`udp`]), captured from a stopped
//! process and made again at restart.
//!
//! Capture borrows the program's socket (`pidfd_getfd`) and reads it from
//! outside: sock_diag ([`diag`]) for peers, names and queue lengths, and
//! `MSG_PEEK` for the bytes in flight. It must never consume the program's
//! data or change its sockets, except the `TCP_REPAIR` toggle that reading
//! a TCP connection needs, which [`RoundSockets::finish`] (or the
//! [`super::Round`]'s drop) turns off again before the coordinator resumes
//! the program; a peek offset it moves to iterate messages is put back.
//!
//! Checks that need the whole computation (is every peer inside it? did a
//! TCP connection move while the others were read?) run once every process
//! was captured, in [`RoundSockets::finish`].
//!
//! At restart ([`Sockets`]) the driver makes the sockets before any process
//! exists: unix pairs as `socketpair`s refilled from the other end, named
//! ones bound again, TCP connections in repair mode; the steps that need
//! every socket to exist (connecting datagram sockets to their named peers,
//! leaving repair mode) run in [`Sockets::finish`].

pub mod diag;
pub mod sys;
pub mod tcp;
pub mod udp;
pub mod unix;

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use ckpt_chunker::Hash;
use ckpt_store::Store;

use super::{LiveFd, Round, set_status_flags};
use crate::error::{EngineError, Result};
use crate::image::{FdImage, FdKind, ProcessImage, SockOpts};

/// Socket state of one checkpoint round.
#[derive(Default)]
pub struct RoundSockets {
    /// Diag sockets and what they said, by network namespace.
    netns: HashMap<u64, Netns>,
    /// Sockets already captured (through another fd or process), by inode.
    captured: HashMap<u64, FdKind>,
    unix: Vec<unix::Seen>,
    tcp: Vec<tcp::Held>,
}

struct Netns {
    sock: OwnedFd,
    unix: Option<HashMap<u64, diag::UnixInfo>>,
    listeners: Option<HashMap<u64, (u32, u32)>>,
}

impl RoundSockets {
    fn netns(&mut self, pid: i32, netns: u64) -> io::Result<&mut Netns> {
        Ok(match self.netns.entry(netns) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => v.insert(Netns { sock: diag::open_in_netns_of(pid)?, unix: None, listeners: None }),
        })
    }

    /// Every unix socket of `pid`'s network namespace (read once per round:
    /// the computation is stopped).
    fn unix_table(&mut self, pid: i32, netns: u64) -> io::Result<&HashMap<u64, diag::UnixInfo>> {
        let n = self.netns(pid, netns)?;
        if n.unix.is_none() {
            n.unix = Some(diag::unix_sockets(&n.sock)?);
        }
        Ok(n.unix.as_ref().expect("read"))
    }

    fn tcp_listeners(&mut self, pid: i32, netns: u64) -> io::Result<&HashMap<u64, (u32, u32)>> {
        let n = self.netns(pid, netns)?;
        if n.listeners.is_none() {
            n.listeners = Some(diag::tcp_listeners(&n.sock)?);
        }
        Ok(n.listeners.as_ref().expect("read"))
    }

    /// Once every process of the round was captured, before the programs
    /// resume: checks that every connected socket's peer is in the
    /// computation and that no TCP connection changed while the others were
    /// read, and takes every TCP socket out of repair mode. Returns the TCP
    /// connections whose peer was not in the round, for
    /// [`tcp::check_ends`] across machines.
    pub fn finish(&mut self) -> Result<Vec<tcp::TcpEnd>> {
        let tcp_result = tcp::finish(&mut self.tcp);
        let unix_result = unix::finish(&self.unix, &self.netns);
        self.unix.clear();
        let loose = tcp_result?;
        unix_result.map(|()| loose)
    }
}

impl Drop for RoundSockets {
    fn drop(&mut self) {
        // A round that failed half-way: whatever was put in repair mode
        // leaves it, so that the program finds its connections as they were.
        tcp::release(&mut self.tcp);
    }
}

/// Captures a socket fd.
pub fn capture(round: &mut Round, live: &LiveFd) -> Result<FdKind> {
    use std::os::unix::fs::MetadataExt;
    let ino = live.meta.ino();
    if let Some(k) = round.sockets.captured.get(&ino) {
        return Ok(k.clone());
    }
    let fd = round.grab(live.pid, live.fd)?;
    let io_err = |what: &str, e: io::Error| EngineError::io(format!("{what} of socket {} (process {}, fd {})", live.target, live.pid, live.fd), e);
    let domain = getsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_DOMAIN).map_err(|e| io_err("SO_DOMAIN", e))?;
    let ty = getsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_TYPE).map_err(|e| io_err("SO_TYPE", e))?;
    let protocol = getsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_PROTOCOL).map_err(|e| io_err("SO_PROTOCOL", e))?;
    let netns = diag::netns_of(live.pid).map_err(|e| io_err("the network namespace", e))?;
    let kind = match domain {
        libc::AF_UNIX => FdKind::Unix(unix::capture(round, live, fd, ino, ty, netns)?),
        libc::AF_INET | libc::AF_INET6 if ty == libc::SOCK_STREAM && protocol == libc::IPPROTO_TCP => {
            FdKind::Tcp(tcp::capture(round, live, fd, ino, netns)?)
        }
        libc::AF_INET | libc::AF_INET6 if ty == libc::SOCK_DGRAM && protocol == libc::IPPROTO_UDP => {
            FdKind::Udp(udp::capture(round, live, fd, ino, netns)?)
        }
        libc::AF_INET | libc::AF_INET6 => {
            let what = match ty {
                libc::SOCK_DGRAM => "UDP-Lite or ICMP socket",
                libc::SOCK_RAW => "raw IP socket",
                _ => "IP socket of another protocol",
            };
            return Err(live.unsupported(what));
        }
        libc::AF_NETLINK => return Err(live.unsupported("netlink socket")),
        libc::AF_PACKET => return Err(live.unsupported("packet socket")),
        other => return Err(live.unsupported(&format!("socket of address family {other}"))),
    };
    round.sockets.captured.insert(ino, kind.clone());
    Ok(kind)
}

/// The sockets of one restart, made on first use.
pub struct Sockets {
    unix: unix::Restore,
    tcp: tcp::Restore,
    udp: udp::Restore,
}

impl Sockets {
    pub fn new(images: &[ProcessImage]) -> Self {
        Sockets { unix: unix::Restore::new(images), tcp: tcp::Restore::default(), udp: udp::Restore::default() }
    }

    /// Once every fd of the restart was made, before any process runs:
    /// connects datagram sockets to their named peers and takes TCP
    /// connections out of repair mode (every end exists by then, so none of
    /// them is answered with a reset).
    pub fn finish(self, generation: u64) -> Result<()> {
        self.unix.finish(generation)?;
        self.udp.finish(generation)?;
        self.tcp.finish(generation)
    }
}

/// Makes the socket of `f`.
pub fn open(sockets: &mut Sockets, store: &Store, generation: u64, pid: i32, f: &FdImage) -> Result<OwnedFd> {
    let fd = match &f.kind {
        FdKind::Unix(u) => sockets.unix.open(store, generation, pid, f.fd, u)?,
        FdKind::Tcp(t) => sockets.tcp.open(store, generation, pid, f.fd, t)?,
        FdKind::Udp(u) => sockets.udp.open(store, generation, pid, f.fd, u)?,
        other => unreachable!("socket::open of {other:?}"),
    };
    set_status_flags(&fd, f.flags);
    Ok(fd)
}

/// A blob of the generation, for the socket of `pid`'s fd `fd`.
fn read_blob(store: &Store, generation: u64, pid: i32, fd: i32, what: &str, h: &Option<Hash>) -> Result<Vec<u8>> {
    match h {
        None => Ok(Vec::new()),
        Some(h) => store.read_blob(h).map_err(|e| EngineError::BadImage {
            generation,
            what: format!("the {what} of the socket at fd {fd} of process {pid} is not readable ({e})"),
        }),
    }
}

pub(crate) fn getsockopt_int(fd: &OwnedFd, level: i32, name: i32) -> io::Result<i32> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `v`.
    if unsafe { libc::getsockopt(fd.as_raw_fd(), level, name, (&mut v as *mut libc::c_int).cast(), &mut len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

pub(crate) fn setsockopt_int(fd: &OwnedFd, level: i32, name: i32, v: i32) -> io::Result<()> {
    setsockopt_raw(fd.as_raw_fd(), level, name, &v.to_ne_bytes())
}

pub(crate) fn setsockopt_raw(fd: RawFd, level: i32, name: i32, v: &[u8]) -> io::Result<()> {
    // SAFETY: setsockopt reads `v.len()` bytes from `v`.
    if unsafe { libc::setsockopt(fd, level, name, v.as_ptr().cast(), v.len() as libc::socklen_t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `getsockopt` into a buffer of `len` bytes; returns what the kernel wrote.
pub(crate) fn getsockopt_raw(fd: &OwnedFd, level: i32, name: i32, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut l = len as libc::socklen_t;
    // SAFETY: getsockopt writes at most `l` bytes into `buf`.
    if unsafe { libc::getsockopt(fd.as_raw_fd(), level, name, buf.as_mut_ptr().cast(), &mut l) } != 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(l as usize);
    Ok(buf)
}

/// An `ioctl` that reads one int (`SIOCINQ`, `SIOCOUTQ`, ...).
pub(crate) fn ioctl_int(fd: &OwnedFd, req: libc::c_ulong) -> io::Result<i32> {
    let mut v: libc::c_int = 0;
    // SAFETY: these ioctls write one int.
    if unsafe { libc::ioctl(fd.as_raw_fd(), req, &mut v) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

/// `net.core.{r,w}mem_default`: what a new socket's buffers are.
fn default_buffers() -> (i32, i32) {
    let read = |p: &str| std::fs::read_to_string(p).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(212992);
    (read("/proc/sys/net/core/rmem_default"), read("/proc/sys/net/core/wmem_default"))
}

/// The options of `fd` worth keeping; buffer sizes only when they differ
/// from `defaults` (rcvbuf, sndbuf): a program that never set them gets the
/// kernel's defaults (and TCP's autotuning) again.
fn read_opts(fd: &OwnedFd, defaults: (i32, i32), tcp: bool) -> SockOpts {
    let flag = |level, name| getsockopt_int(fd, level, name).map(|v| v != 0).unwrap_or(false);
    let rcv = getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF).ok();
    let snd = getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF).ok();
    // TCP grows its buffers by itself (autotuning): only sizes below the
    // defaults are surely the program's.
    let set = |v: Option<i32>, d: i32| v.filter(|&v| if tcp { v < d } else { v != d });
    SockOpts {
        rcvbuf: set(rcv, defaults.0),
        sndbuf: set(snd, defaults.1),
        passcred: !tcp && flag(libc::SOL_SOCKET, sys::SO_PASSCRED),
        reuseaddr: flag(libc::SOL_SOCKET, libc::SO_REUSEADDR),
        keepalive: flag(libc::SOL_SOCKET, libc::SO_KEEPALIVE),
        nodelay: tcp && flag(libc::IPPROTO_TCP, libc::TCP_NODELAY),
        // Only an IPv6 socket answers for IPV6_V6ONLY.
        v6only: getsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY).ok().map(|v| v != 0),
    }
}

/// Sets the options of `o` on a new socket (buffers: the kernel halves
/// what `getsockopt` reported, so half of it is asked for).
fn apply_opts(fd: &OwnedFd, o: &SockOpts, tcp: bool) -> io::Result<()> {
    if let Some(v) = o.rcvbuf {
        setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, v / 2)?;
    }
    if let Some(v) = o.sndbuf {
        setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, v / 2)?;
    }
    if o.passcred {
        setsockopt_int(fd, libc::SOL_SOCKET, sys::SO_PASSCRED, 1)?;
    }
    if o.reuseaddr {
        setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    }
    if o.keepalive {
        setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    }
    if tcp && o.nodelay {
        setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1)?;
    }
    // Explicitly either way: the restart's `net.ipv6.bindv6only` may not
    // be the checkpoint's.
    if let Some(v) = o.v6only {
        setsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, v as i32)?;
    }
    Ok(())
}

/// Makes room for `len` more bytes in the send buffer of `fd` (root may go
/// past `wmem_max`), so that a refill never blocks.
fn grow_sndbuf(fd: &OwnedFd, len: usize) -> io::Result<()> {
    grow_buf(fd, libc::SO_SNDBUF, sys::SO_SNDBUFFORCE, len)
}

/// Makes room for `len` more bytes in the receive buffer of `fd`.
fn grow_rcvbuf(fd: &OwnedFd, len: usize) -> io::Result<()> {
    grow_buf(fd, libc::SO_RCVBUF, sys::SO_RCVBUFFORCE, len)
}

/// Grows buffer `opt` of `fd` by about `len`: past `wmem_max`/`rmem_max`
/// with `force` where the kernel allows it (`CAP_NET_ADMIN` over the
/// machine, i.e. root), else up to them (a computation of a user other
/// than root, in its own user namespace: [`crate::ns`]).
fn grow_buf(fd: &OwnedFd, opt: i32, force: i32, len: usize) -> io::Result<()> {
    let cur = getsockopt_int(fd, libc::SOL_SOCKET, opt)?.max(0) as usize;
    let want = (cur + 2 * len + 65536).min(i32::MAX as usize / 2) as i32;
    match setsockopt_int(fd, libc::SOL_SOCKET, force, want) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => setsockopt_int(fd, libc::SOL_SOCKET, opt, want),
        r => r,
    }
}

fn new_socket(domain: i32, ty: i32) -> io::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: socket(2) returns a new fd or -1.
    let fd = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
