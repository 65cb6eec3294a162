//! TCP sockets: unconnected, listening, and established connections
//! (IPv4 and IPv6), the latter read and recreated with `TCP_REPAIR`.
//!
//! Capture of a connection: the borrowed socket is put in repair mode
//! (the only change ckpt makes to a program's socket); the sequence
//! numbers of both queues (`TCP_QUEUE_SEQ`), their contents (`MSG_PEEK`
//! with `TCP_REPAIR_QUEUE`; nothing is consumed), the negotiated options
//! (MSS, window scales, SACK, timestamps), the timestamp clock and the
//! window (`TCP_REPAIR_WINDOW`) are read, read again until two reads agree.
//! The socket stays in repair mode until every process of the round was
//! captured: [`finish`] (called by the coordinator before RESUME) checks
//! that no connection received data since it was read, then takes every
//! socket out of repair mode with `TCP_REPAIR_OFF_NO_WP` (no packet sent).
//! If the round fails before, dropping it does the same ([`release`]).
//!
//! Why what is read is consistent, although the kernel keeps ACKing and
//! retransmitting while the programs are stopped: the programs write and
//! read nothing meanwhile, so each socket's `write_seq` and `copied_seq`
//! are fixed; only `snd_una` (ACKs arriving) and `rcv_nxt` (data arriving)
//! can move. A socket's captured send queue runs from its `snd_una` at
//! capture time to `write_seq`; the peer's captured receive queue runs from
//! its `copied_seq` to its `rcv_nxt`. Since `snd_una` never passes the
//! peer's `rcv_nxt` at the same instant, and [`finish`] checks that no
//! `rcv_nxt` moved between a socket's capture and the end of the round,
//! every byte of each direction is in one of the two queues (bytes in both
//! are sent again after a restart and dropped by the receiver by sequence
//! number): nothing lost, nothing delivered twice. If a `rcv_nxt` did move
//! (a delayed segment), the checkpoint is refused and can simply be tried
//! again.
//!
//! Restart: what the program's earlier life left on the address pair (the
//! killed connection's `TIME_WAIT` or closing socket, owned by no process)
//! is removed first ([`clear_leftovers`]); then a new socket in repair mode
//! gets both sequence numbers, binds
//! the old local address (repair mode may reuse it), connects (no SYN in
//! repair mode: it is established at once), gets the options, the
//! timestamp clock, the receive queue and the window. [`Restore::finish`],
//! once every socket of the restart exists (and, for a generation on
//! several hosts, every host's), puts back the already-sent part of the
//! send queue (not before: the kernel retransmits it even in repair mode,
//! and a peer host without the socket yet answers with a reset), leaves
//! repair mode (a window probe tells the peer we are back) and sends the
//! never-sent rest normally.
//!
//! Listening sockets are bound again (the leftovers of their earlier
//! connections on the port removed first, [`clear_port_leftovers`]; with
//! `SO_REUSEADDR`, then the program's own setting) and listen with the same backlog; connections
//! that were waiting to be accepted are not kept (their clients see a
//! reset). A connection whose other end is not in the computation, and one
//! being opened or closed (not ESTABLISHED), is refused with an error.
//! Out-of-order segments and urgent data are not kept.
//!
//! Network namespaces: each socket records the inode of its process's
//! `/proc/PID/ns/net`; peers are matched by address pairs, which works
//! across namespaces (two "hosts" on one machine). The restart driver makes
//! the sockets in its own namespace for now.

use std::io;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, OwnedFd};

use ckpt_store::Store;
use ckpt_wire::Pod;

use super::sys::*;
use super::{apply_opts, getsockopt_int, getsockopt_raw, grow_rcvbuf, grow_sndbuf, ioctl_int, new_socket, read_blob, read_opts, setsockopt_int, setsockopt_raw};
use crate::error::{EngineError, Result};
use crate::fds::{LiveFd, Round};
use crate::image::{SockOpts, TcpConnImage, TcpSocketImage, TcpState, TcpWindow};

/// A connection of the round, in repair mode until [`finish`].
pub(super) struct Held {
    pid: i32,
    fd: i32,
    sock: OwnedFd,
    local: SocketAddr,
    peer: SocketAddr,
    rcv_nxt: u32,
    /// First byte not yet acknowledged, and first byte never sent.
    snd_una: u32,
    snd_nxt: u32,
}

fn state_name(s: u8) -> &'static str {
    ["?", "ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT1", "FIN_WAIT2", "TIME_WAIT", "CLOSE", "CLOSE_WAIT", "LAST_ACK", "LISTEN", "CLOSING"]
        .get(s as usize)
        .copied()
        .unwrap_or("?")
}

pub(super) fn get_addr(fd: &OwnedFd, peer: bool) -> io::Result<SocketAddr> {
    // SAFETY: an all-zero sockaddr_storage is valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let p = (&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr>();
    // SAFETY: the kernel writes at most `len` bytes into `ss`.
    let r = unsafe { if peer { libc::getpeername(fd.as_raw_fd(), p, &mut len) } else { libc::getsockname(fd.as_raw_fd(), p, &mut len) } };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    match ss.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: the family says it is a sockaddr_in, which fits in the storage.
            let a = unsafe { *(&ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Ok(SocketAddr::V4(SocketAddrV4::new(u32::from_be(a.sin_addr.s_addr).into(), u16::from_be(a.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says it is a sockaddr_in6, which fits in the storage.
            let a = unsafe { *(&ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Ok(SocketAddr::V6(SocketAddrV6::new(a.sin6_addr.s6_addr.into(), u16::from_be(a.sin6_port), a.sin6_flowinfo, a.sin6_scope_id)))
        }
        f => Err(io::Error::other(format!("address family {f} is not IP"))),
    }
}

/// `a` as the kernel takes it.
pub(super) fn raw_addr(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match a {
        SocketAddr::V4(v) => {
            // SAFETY: an all-zero sockaddr_in is valid.
            let mut s: libc::sockaddr_in = unsafe { std::mem::zeroed() };
            s.sin_family = libc::AF_INET as libc::sa_family_t;
            s.sin_port = v.port().to_be();
            s.sin_addr.s_addr = u32::from(*v.ip()).to_be();
            // SAFETY: a sockaddr_in fits in a sockaddr_storage.
            unsafe { *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>() = s };
            (ss, std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t)
        }
        SocketAddr::V6(v) => {
            // SAFETY: an all-zero sockaddr_in6 is valid.
            let mut s: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
            s.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            s.sin6_port = v.port().to_be();
            s.sin6_addr.s6_addr = v.ip().octets();
            s.sin6_flowinfo = v.flowinfo();
            s.sin6_scope_id = v.scope_id();
            // SAFETY: a sockaddr_in6 fits in a sockaddr_storage.
            unsafe { *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>() = s };
            (ss, std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t)
        }
    }
}

pub(super) fn local_addr(fd: &OwnedFd) -> io::Result<SocketAddr> {
    get_addr(fd, false)
}

pub(super) fn peer_addr(fd: &OwnedFd) -> io::Result<SocketAddr> {
    get_addr(fd, true)
}

/// `tcpi_state`, `tcpi_options` and the window scales of `struct tcp_info`.
fn tcp_info(fd: &OwnedFd) -> io::Result<(u8, u8, u8, u8)> {
    let b = getsockopt_raw(fd, libc::IPPROTO_TCP, libc::TCP_INFO, std::mem::size_of::<libc::tcp_info>())?;
    if b.len() < 7 {
        return Err(io::Error::other("short TCP_INFO"));
    }
    Ok((b[0], b[5], b[6] & 0xf, b[6] >> 4))
}

/// `net.ipv4.tcp_rmem` and `tcp_wmem`, the middle (default) values.
fn tcp_defaults() -> (i32, i32) {
    let read = |p: &str, d: i32| {
        std::fs::read_to_string(p).ok().and_then(|s| s.split_whitespace().nth(1).and_then(|v| v.parse().ok())).unwrap_or(d)
    };
    (read("/proc/sys/net/ipv4/tcp_rmem", 131072), read("/proc/sys/net/ipv4/tcp_wmem", 16384))
}

pub(super) fn capture(round: &mut Round, live: &LiveFd, fd: OwnedFd, ino: u64, netns: u64) -> Result<TcpSocketImage> {
    let (pid, n) = (live.pid, live.fd);
    let io_err = |what: &str, e: io::Error| EngineError::io(format!("{what} of TCP socket {} (process {pid}, fd {n})", live.target), e);
    let local = local_addr(&fd).map_err(|e| io_err("getsockname", e))?;
    let (state, ..) = tcp_info(&fd).map_err(|e| io_err("TCP_INFO", e))?;
    let opts = read_opts(&fd, tcp_defaults(), true);
    let state = match state {
        TCP_CLOSE => TcpState::Closed,
        TCP_LISTEN => {
            let (pending, backlog) = round.sockets.tcp_listeners(pid, netns).map_err(|e| io_err("sock_diag", e))?.get(&ino).copied().unwrap_or((0, 128));
            if pending > 0 {
                tracing::warn!(pid, fd = n, %local, pending, "{pending} connections wait to be accepted on this listening socket; a restart of this generation drops them");
            }
            TcpState::Listen { backlog }
        }
        TCP_ESTABLISHED => {
            let peer = peer_addr(&fd).map_err(|e| io_err("getpeername", e))?;
            if let Err(e) = setsockopt_int(&fd, libc::IPPROTO_TCP, libc::TCP_REPAIR, TCP_REPAIR_ON) {
                if e.raw_os_error() == Some(libc::EPERM) {
                    // The machine's network namespace, for a computation of
                    // a user who is not root (crate::ns).
                    return Err(EngineError::Namespace {
                        what: format!(
                            "process {pid}: fd {n} is the TCP connection {local} -> {peer}, in a network namespace where ckpt holds no CAP_NET_ADMIN, so it cannot be repaired \
                             (TCP_REPAIR: {e}); launch the computation with `--net private` (a network namespace of its own, where connections among its processes \
                             are repaired), or as root; a connection to a peer outside the computation must be closed before checkpointing, or reopened by the program after a restart"
                        ),
                    });
                }
                return Err(io_err("TCP_REPAIR", e));
            }
            let read = read_connection(&fd, peer);
            let (mut conn, send, recv) = match read {
                Ok(r) => r,
                Err(e) => {
                    release_one(&fd);
                    return Err(io_err("reading the connection", e));
                }
            };
            let rcv_nxt = conn.recv_seq.wrapping_add(conn.recv_len);
            let snd_una = conn.send_seq;
            let snd_nxt = conn.send_seq.wrapping_add(conn.send_len - conn.unsent);
            round.sockets.tcp.push(Held { pid, fd: n, sock: fd, local, peer, rcv_nxt, snd_una, snd_nxt });
            conn.send = if send.is_empty() { None } else { Some(round.put_blob(&send)?) };
            conn.recv = if recv.is_empty() { None } else { Some(round.put_blob(&recv)?) };
            tracing::debug!(pid, fd = n, %local, %peer, send = conn.send_len, unsent = conn.unsent, recv = conn.recv_len, "captured a TCP connection");
            TcpState::Established(conn)
        }
        s => {
            let peer = peer_addr(&fd).map(|p| p.to_string()).unwrap_or_else(|_| "?".into());
            return Err(EngineError::SocketBusy {
                pid,
                fd: n,
                what: format!("TCP connection {local} -> {peer} is being opened or closed (state {})", state_name(s)),
            });
        }
    };
    Ok(TcpSocketImage { netns, ino, local, state, opts })
}

fn set_queue(fd: &OwnedFd, q: i32) -> io::Result<()> {
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR_QUEUE, q)
}

fn queue_seq(fd: &OwnedFd, q: i32) -> io::Result<u32> {
    set_queue(fd, q)?;
    Ok(getsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_QUEUE_SEQ)? as u32)
}

/// `len` bytes of the queue chosen with `TCP_REPAIR_QUEUE`, left in place.
fn peek(fd: &OwnedFd, q: i32, len: usize) -> io::Result<Vec<u8>> {
    if len == 0 {
        return Ok(Vec::new());
    }
    set_queue(fd, q)?;
    // A program's own peek offset (SO_PEEK_OFF) would shift and move with
    // our peek: start from 0 and put it back.
    let saved = getsockopt_int(fd, libc::SOL_SOCKET, SO_PEEK_OFF).unwrap_or(-1);
    if saved > 0 {
        setsockopt_int(fd, libc::SOL_SOCKET, SO_PEEK_OFF, 0)?;
    }
    let mut buf = vec![0u8; len + 1];
    // SAFETY: recv into our buffer, within its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_PEEK | libc::MSG_DONTWAIT) };
    let e = io::Error::last_os_error();
    if saved >= 0 {
        setsockopt_int(fd, libc::SOL_SOCKET, SO_PEEK_OFF, saved)?;
    }
    if n < 0 {
        return Err(e);
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// Reads a connection in repair mode: (image without blobs, send queue,
/// receive queue).
pub fn read_connection(fd: &OwnedFd, peer: SocketAddr) -> io::Result<(TcpConnImage, Vec<u8>, Vec<u8>)> {
    let mut last = None;
    for _ in 0..20 {
        let w1 = queue_seq(fd, TCP_SEND_QUEUE)?;
        let outq = ioctl_int(fd, SIOCOUTQ)?.max(0) as usize;
        let unsent = ioctl_int(fd, SIOCOUTQNSD)?.max(0) as u32;
        let send = peek(fd, TCP_SEND_QUEUE, outq)?;
        let r1 = queue_seq(fd, TCP_RECV_QUEUE)?;
        let inq = ioctl_int(fd, SIOCINQ)?.max(0) as usize;
        let recv = peek(fd, TCP_RECV_QUEUE, inq)?;
        let (w2, r2) = (queue_seq(fd, TCP_SEND_QUEUE)?, queue_seq(fd, TCP_RECV_QUEUE)?);
        let (outq2, inq2) = (ioctl_int(fd, SIOCOUTQ)?.max(0) as usize, ioctl_int(fd, SIOCINQ)?.max(0) as usize);
        set_queue(fd, TCP_NO_QUEUE)?;
        if w1 == w2 && r1 == r2 && outq == outq2 && inq == inq2 && send.len() == outq && recv.len() == inq {
            last = Some((w1, r1, unsent.min(outq as u32), send, recv));
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let Some((write_seq, rcv_nxt, unsent, send, recv)) = last else {
        return Err(io::Error::other("the connection kept changing while it was read"));
    };
    let (_, options, snd_wscale, rcv_wscale) = tcp_info(fd)?;
    let mss = getsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_MAXSEG)? as u32;
    let timestamps = options & TCPI_OPT_TIMESTAMPS != 0;
    let tsval = if timestamps { getsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_TIMESTAMP)? as u32 } else { 0 };
    let w = getsockopt_raw(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR_WINDOW, std::mem::size_of::<TcpRepairWindow>())?;
    let w = TcpRepairWindow::read_from(&w).ok_or_else(|| io::Error::other("short TCP_REPAIR_WINDOW"))?;
    let scaled = options & TCPI_OPT_WSCALE != 0;
    let conn = TcpConnImage {
        peer,
        send_seq: write_seq.wrapping_sub(send.len() as u32),
        recv_seq: rcv_nxt.wrapping_sub(recv.len() as u32),
        send: None,
        send_len: send.len() as u32,
        unsent,
        recv: None,
        recv_len: recv.len() as u32,
        mss,
        snd_wscale: if scaled { snd_wscale } else { 0 },
        rcv_wscale: if scaled { rcv_wscale } else { 0 },
        sack: options & TCPI_OPT_SACK != 0,
        timestamps,
        tsval,
        window: TcpWindow { snd_wl1: w.snd_wl1, snd_wnd: w.snd_wnd, max_window: w.max_window, rcv_wnd: w.rcv_wnd, rcv_wup: w.rcv_wup },
    };
    Ok((conn, send, recv))
}

fn release_one(fd: &OwnedFd) {
    let _ = set_queue(fd, TCP_NO_QUEUE);
    if let Err(e) = setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR, TCP_REPAIR_OFF_NO_WP) {
        tracing::error!("cannot take a TCP socket out of repair mode: {e}");
    }
}

/// Takes every held socket out of repair mode.
pub(super) fn release(held: &mut Vec<Held>) {
    for h in held.drain(..) {
        release_one(&h.sock);
    }
}

/// End of the round: checks, then [`release`] (always).
pub(super) fn finish(held: &mut Vec<Held>) -> Result<Vec<TcpEnd>> {
    let mut result = Ok(());
    for h in held.iter() {
        match queue_seq(&h.sock, TCP_RECV_QUEUE) {
            Ok(now) if now == h.rcv_nxt => {}
            Ok(now) => {
                result = Err(EngineError::SocketBusy {
                    pid: h.pid,
                    fd: h.fd,
                    what: format!("TCP connection {} -> {} received {} bytes while the computation was being captured", h.local, h.peer, now.wrapping_sub(h.rcv_nxt)),
                });
                break;
            }
            Err(e) => {
                result = Err(EngineError::io(format!("TCP_QUEUE_SEQ of the connection {} -> {} (process {}, fd {})", h.local, h.peer, h.pid, h.fd), e));
                break;
            }
        }
    }
    let ends: Vec<TcpEnd> = held
        .iter()
        .map(|h| TcpEnd { pid: h.pid, fd: h.fd, local: h.local.to_string(), peer: h.peer.to_string(), rcv_nxt: h.rcv_nxt, snd_una: h.snd_una, snd_nxt: h.snd_nxt })
        .collect();
    if result.is_ok() {
        result = pairs_agree(&ends);
    }
    // Connections whose other end is not in this round: it may be in the
    // round of another machine (see [`check_ends`]).
    let loose = ends.iter().filter(|h| !ends.iter().any(|o| o.local == h.peer && o.peer == h.local)).cloned().collect();
    release(held);
    result.map(|()| loose)
}

/// The two ends of each connection among `ends` were read at moments that
/// fit together: each end has received at least what the other had seen
/// acknowledged, and no more than the other had sent. Otherwise one end
/// moved (the kernel sent or acknowledged something) between the two
/// reads, and the restored pair would discard each other's segments.
fn pairs_agree(ends: &[TcpEnd]) -> Result<()> {
    let within = |x: u32, lo: u32, hi: u32| x.wrapping_sub(lo) <= hi.wrapping_sub(lo);
    for a in ends {
        if let Some(b) = ends.iter().find(|b| b.local == a.peer && b.peer == a.local)
            && !within(b.rcv_nxt, a.snd_una, a.snd_nxt)
        {
            return Err(EngineError::SocketBusy {
                pid: a.pid,
                fd: a.fd,
                what: format!(
                    "the TCP connection {} -> {} moved between the reads of its two ends (the peer has received up to {}, this end had sent {}..{})",
                    a.local, a.peer, b.rcv_nxt, a.snd_una, a.snd_nxt
                ),
            });
        }
    }
    Ok(())
}

/// One end of a TCP connection whose other end was not in the same round.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct TcpEnd {
    pub pid: i32,
    pub fd: i32,
    pub local: String,
    pub peer: String,
    /// Where this end was when it was read: next byte expected, first byte
    /// unacknowledged, first byte never sent.
    pub rcv_nxt: u32,
    pub snd_una: u32,
    pub snd_nxt: u32,
}

/// The ends left loose by the rounds of every machine of a checkpoint must
/// pair up: a connection to a peer outside the computation cannot be
/// restored (the peer would not take part in the repair).
pub fn check_ends(ends: &[TcpEnd]) -> Result<()> {
    for h in ends {
        if !ends.iter().any(|o| o.local == h.peer && o.peer == h.local) {
            return Err(EngineError::SocketPeer { pid: h.pid, fd: h.fd, what: format!("a TCP connection from {}", h.local), peer: h.peer.clone() });
        }
    }
    pairs_agree(ends)
}

pub(super) fn bind(fd: &OwnedFd, a: SocketAddr) -> io::Result<()> {
    let (ss, len) = raw_addr(a);
    // SAFETY: bind reads `len` bytes of `ss`.
    if unsafe { libc::bind(fd.as_raw_fd(), (&ss as *const libc::sockaddr_storage).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub(super) fn connect(fd: &OwnedFd, a: SocketAddr) -> io::Result<()> {
    let (ss, len) = raw_addr(a);
    // SAFETY: connect reads `len` bytes of `ss`.
    if unsafe { libc::connect(fd.as_raw_fd(), (&ss as *const libc::sockaddr_storage).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sends all of `data` (repair queues included), never blocking: grows
/// the buffer that is in the way when the kernel says it is full.
fn send_all(fd: &OwnedFd, data: &[u8], grow_rcv: bool) -> io::Result<()> {
    send_all_until(fd, data, grow_rcv, None)
}

/// [`send_all`] on a live connection: once the buffer cannot grow, waits
/// (until `deadline`) for the peer to acknowledge what is in flight.
fn send_all_until(fd: &OwnedFd, data: &[u8], grow_rcv: bool, deadline: Option<std::time::Instant>) -> io::Result<()> {
    let mut sent = 0;
    let mut stuck = 0;
    while sent < data.len() {
        let rest = &data[sent..];
        // SAFETY: send reads `rest`.
        let n = unsafe { libc::send(fd.as_raw_fd(), rest.as_ptr().cast(), rest.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        if n > 0 {
            sent += n as usize;
            stuck = 0;
            continue;
        }
        let e = if n == 0 { io::Error::from(io::ErrorKind::WouldBlock) } else { io::Error::last_os_error() };
        let full = matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::OutOfMemory) || e.raw_os_error() == Some(libc::ENOMEM);
        if full && stuck >= 3 && deadline.is_some_and(|d| std::time::Instant::now() < d) {
            let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
            // SAFETY: poll of one pollfd on the stack.
            unsafe { libc::poll(&mut p, 1, 50) };
            continue;
        }
        if !full || stuck >= 3 {
            if full {
                return Err(io::Error::new(
                    e.kind(),
                    format!("{} bytes do not fit in the socket's buffer ({e}); without root the buffer cannot grow past net.core.wmem_max and rmem_max: raise them (as root, `sysctl -w net.core.wmem_max=N net.core.rmem_max=N`)", rest.len()),
                ));
            }
            return Err(e);
        }
        stuck += 1;
        if grow_rcv {
            grow_rcvbuf(fd, rest.len())?;
        } else {
            grow_sndbuf(fd, rest.len())?;
        }
    }
    Ok(())
}

/// A socket that still holds a connection's address pair after
/// [`clear_leftovers`]: its state, its inode (0: no process holds it) and
/// why it could not be removed.
struct Holder {
    state: u8,
    inode: u32,
    why: Option<io::Error>,
}

/// Removes what the program's earlier life left on `local -> peer` in this
/// network namespace, before the connection is made again there; returns
/// the sockets that still hold the pair.
///
/// Killing a program does not make its connections vanish: the kernel
/// closes them as TCP says, and what is left of each stays in the
/// namespace, owned by no process: `TIME_WAIT` for a minute on the side
/// that closed first; `FIN_WAIT1`, `CLOSING` or `LAST_ACK` until the peer
/// answers (minutes of retransmissions if it never does). Such a leftover
/// holds the address pair the restored connection needs. The kernel lets
/// a new connection take over a `TIME_WAIT` only if the two sides had
/// agreed on timestamps (`net.ipv4.tcp_timestamps`), and no other state
/// at all: `connect` in repair mode then fails with `EADDRNOTAVAIL`. A
/// leftover that retransmits also sends the old connection's segments,
/// which the restored peer would take for its own (they fall in its
/// window: the programs ran on after the checkpoint).
///
/// So every socket on the pair that no process holds (inode 0) is destroyed
/// with `SOCK_DESTROY` (no packet is sent) before the new one is made;
/// needs `CAP_NET_ADMIN` and `CONFIG_INET_DIAG_DESTROY`. A failure is a
/// warning here and, if the pair is still taken, part of the error of the
/// `connect` that follows. A socket some process holds is left alone. Each
/// host's restart clears its own namespace before the restarts meet at the
/// barrier, and no connection goes live before that; a leftover on one
/// host can still reach the other host's new socket while it is in repair
/// mode, before its own host's restart removed it (only a packet filter on
/// the pair, CRIU's network lock, would close that window; with both ends
/// killed together the kernel has ended the old connection with a reset
/// long before a restart runs, as seen in the hosts test).
fn clear_leftovers(local: SocketAddr, peer: SocketAddr) -> Vec<Holder> {
    let found = super::diag::open_in_netns_of(0).and_then(|d| super::diag::tcp_holders(&d, local, peer).map(|h| (d, h)));
    let (diag, holders) = match found {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!(%local, %peer, "cannot list the TCP sockets on this address pair (sock_diag: {e}); sockets the program's earlier life left on it stay");
            return Vec::new();
        }
    };
    let mut left = Vec::new();
    for m in holders {
        if m.inode != 0 {
            left.push(Holder { state: m.state, inode: m.inode, why: None });
            continue;
        }
        match super::diag::destroy_tcp(&diag, &m) {
            Ok(()) => tracing::debug!(%local, %peer, state = state_name(m.state), "removed a socket the program's earlier life left on the connection"),
            Err(e) => {
                tracing::warn!(%local, %peer, state = state_name(m.state), "cannot remove the socket the program's earlier life left on this connection (SOCK_DESTROY: {e}; needs CAP_NET_ADMIN and a kernel with CONFIG_INET_DIAG_DESTROY)");
                left.push(Holder { state: m.state, inode: 0, why: Some(e) });
            }
        }
    }
    left
}

/// Removes what the connections of a listener's earlier life left on its
/// port (sockets no process holds: `TIME_WAIT`, `FIN_WAIT*`, `LAST_ACK`
/// ...) before it is bound again. `SO_REUSEADDR` on the new socket is not
/// enough: the kernel lets a bind share a port with such a socket only if
/// that one had `SO_REUSEADDR` too (its listener's setting), so a program
/// that did not set it could not restart for a minute after `ckpt kill`.
/// A socket some process holds is left alone (the bind then fails, named).
fn clear_port_leftovers(local: SocketAddr) {
    let found = super::diag::open_in_netns_of(0).and_then(|d| super::diag::tcp_port_holders(&d, local).map(|h| (d, h)));
    let Ok((diag, holders)) = found.inspect_err(|e| tracing::warn!(%local, "cannot list the TCP sockets on this port (sock_diag: {e}); what the listener's earlier connections left stays")) else {
        return;
    };
    for m in holders.iter().filter(|m| m.inode == 0) {
        match super::diag::destroy_tcp(&diag, m) {
            Ok(()) => tracing::debug!(%local, state = state_name(m.state), "removed a socket the listener's earlier connections left on its port"),
            Err(e) => tracing::warn!(%local, state = state_name(m.state), "cannot remove a socket the listener's earlier connections left on its port (SOCK_DESTROY: {e}; needs CAP_NET_ADMIN and CONFIG_INET_DIAG_DESTROY)"),
        }
    }
}

/// What `connect` failing with `EADDRNOTAVAIL` means, given the sockets
/// [`clear_leftovers`] left on the pair.
fn pair_taken(local: SocketAddr, peer: SocketAddr, left: &[Holder]) -> String {
    let each: Vec<String> = left
        .iter()
        .map(|h| match &h.why {
            None => format!("a socket in state {} that a process holds (inode {}): is the checkpointed program, or another one, still running with this connection?", state_name(h.state), h.inode),
            Some(e) => format!(
                "the old connection's socket in state {}, left by the program's earlier life, which could not be removed ({e}): it goes away by itself (TIME_WAIT within a minute); restart again then",
                state_name(h.state)
            ),
        })
        .collect();
    if each.is_empty() {
        format!("another socket holds {local} -> {peer} in this network namespace (see `ss -tan`)")
    } else {
        format!("{local} -> {peer} is held by {}", each.join("; and by "))
    }
}

/// Makes a connection in repair mode from its image, its send queue
/// empty: what is left to do once its peer exists is [`refill_sent`] with
/// the bytes already sent, then [`leave_repair`] with the unsent ones.
/// First removes what the program's earlier life left on the address pair
/// ([`clear_leftovers`]).
pub fn make_connection(local: SocketAddr, c: &TcpConnImage, opts: &SockOpts, recv: &[u8]) -> io::Result<OwnedFd> {
    let family = if local.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    let left = clear_leftovers(local, c.peer);
    let s = new_socket(family, libc::SOCK_STREAM)?;
    let step = |what: &'static str| move |e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"));
    // Options first: SO_REUSEADDR would undo repair mode's forced reuse
    // of the address, which the bind below needs (the listener and
    // connections of the program's earlier life may hold the port).
    apply_opts(&s, opts, true).map_err(step("options"))?;
    setsockopt_int(&s, libc::IPPROTO_TCP, libc::TCP_REPAIR, TCP_REPAIR_ON).map_err(step("TCP_REPAIR"))?;
    set_queue(&s, TCP_RECV_QUEUE)?;
    setsockopt_int(&s, libc::IPPROTO_TCP, libc::TCP_QUEUE_SEQ, c.recv_seq as i32).map_err(step("TCP_QUEUE_SEQ (receive)"))?;
    set_queue(&s, TCP_SEND_QUEUE)?;
    setsockopt_int(&s, libc::IPPROTO_TCP, libc::TCP_QUEUE_SEQ, c.send_seq as i32).map_err(step("TCP_QUEUE_SEQ (send)"))?;
    bind(&s, local).map_err(step("bind"))?;
    connect(&s, c.peer).map_err(|e| match e.raw_os_error() {
        Some(libc::EADDRNOTAVAIL) => io::Error::new(e.kind(), format!("connect: {e}: {}", pair_taken(local, c.peer, &left))),
        _ => step("connect")(e),
    })?;
    let mut o = vec![TcpRepairOpt { code: TCPOPT_MSS, val: c.mss }];
    if c.snd_wscale != 0 || c.rcv_wscale != 0 {
        o.push(TcpRepairOpt { code: TCPOPT_WINDOW, val: c.snd_wscale as u32 | (c.rcv_wscale as u32) << 16 });
    }
    if c.sack {
        o.push(TcpRepairOpt { code: TCPOPT_SACK_PERM, val: 0 });
    }
    if c.timestamps {
        o.push(TcpRepairOpt { code: TCPOPT_TIMESTAMP, val: 0 });
    }
    let bytes: Vec<u8> = o.iter().flat_map(|x| x.as_bytes().to_vec()).collect();
    setsockopt_raw(s.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_REPAIR_OPTIONS, &bytes).map_err(step("TCP_REPAIR_OPTIONS"))?;
    if c.timestamps {
        setsockopt_int(&s, libc::IPPROTO_TCP, libc::TCP_TIMESTAMP, c.tsval as i32).map_err(step("TCP_TIMESTAMP"))?;
    }
    if !recv.is_empty() {
        set_queue(&s, TCP_RECV_QUEUE)?;
        send_all(&s, recv, true).map_err(step("refilling the receive queue"))?;
    }
    set_queue(&s, TCP_NO_QUEUE)?;
    let w = &c.window;
    let w = TcpRepairWindow { snd_wl1: w.snd_wl1, snd_wnd: w.snd_wnd, max_window: w.max_window, rcv_wnd: w.rcv_wnd, rcv_wup: w.rcv_wup };
    setsockopt_raw(s.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_REPAIR_WINDOW, w.as_bytes()).map_err(step("TCP_REPAIR_WINDOW"))?;
    Ok(s)
}

/// Puts back, in repair mode, the part of the send queue that had been
/// sent but not acknowledged (`send`, the whole recorded queue: its first
/// `c.send_len - c.unsent` bytes). Only once the peer's socket exists: the
/// kernel arms the retransmission timer for them even in repair mode, and
/// a retransmission that reaches the peer's host before the peer's socket
/// is made is answered with a reset, which kills the restored connection
/// (a restart on two hosts, one slower than the other's RTO: MPICH's
/// ranks over UCX's TCP transport, issue 15).
pub fn refill_sent(s: &OwnedFd, c: &TcpConnImage, send: &[u8]) -> io::Result<()> {
    let sent = send.len().saturating_sub(c.unsent as usize);
    if sent > 0 {
        set_queue(s, TCP_SEND_QUEUE)?;
        let r = send_all(s, &send[..sent], false).map_err(step("refilling the send queue"));
        set_queue(s, TCP_NO_QUEUE)?;
        r?;
    }
    Ok(())
}

/// Leaves repair mode (a window probe goes out: the peer answers with
/// where it is) and sends the bytes that had never been sent.
/// Leaving repair mode clears `SO_REUSEADDR`: `reuseaddr` sets it again.
pub fn leave_repair(s: &OwnedFd, unsent: &[u8], reuseaddr: bool) -> io::Result<()> {
    repair_off(s, reuseaddr)?;
    send_unsent(s, unsent)
}

fn step(what: &'static str) -> impl Fn(io::Error) -> io::Error {
    move |e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn repair_off(s: &OwnedFd, reuseaddr: bool) -> io::Result<()> {
    setsockopt_int(s, libc::IPPROTO_TCP, libc::TCP_REPAIR, TCP_REPAIR_OFF).map_err(step("TCP_REPAIR off"))?;
    if reuseaddr {
        setsockopt_int(s, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1).map_err(step("SO_REUSEADDR"))?;
    }
    Ok(())
}

/// The bytes that had never been sent, on a connection out of repair mode.
/// Where the buffer cannot grow enough (an ordinary user's computation:
/// `SO_SNDBUF` stops at `net.core.wmem_max`, while the kernel's own
/// autotuning had let the queue grow to `tcp_wmem`'s maximum), they wait
/// for the peer to acknowledge what is in flight: up to 10 s.
fn send_unsent(s: &OwnedFd, unsent: &[u8]) -> io::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    send_all_until(s, unsent, false, Some(deadline)).map_err(step("sending the bytes never sent"))
}

/// A connection of a restart, in repair mode until [`Restore::finish`].
struct Repairing {
    sock: OwnedFd,
    conn: TcpConnImage,
    /// The whole recorded send queue: sent (put back at the finish), then
    /// never sent (sent once out of repair mode).
    send: Vec<u8>,
    /// `SO_REUSEADDR`, which leaving repair mode clears.
    reuseaddr: bool,
    pid: i32,
    fd: i32,
}

/// The TCP sockets of one restart.
#[derive(Default)]
pub(super) struct Restore {
    repairing: Vec<Repairing>,
}

impl Restore {
    pub fn open(&mut self, store: &Store, generation: u64, pid: i32, fd: i32, t: &TcpSocketImage) -> Result<OwnedFd> {
        let err = |what: String| EngineError::Restore { generation, what: format!("TCP socket {} at fd {fd} of process {pid}: {what}", t.local) };
        let family = if t.local.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
        match &t.state {
            TcpState::Closed => {
                let s = new_socket(family, libc::SOCK_STREAM).map_err(|e| err(format!("socket: {e}")))?;
                apply_opts(&s, &t.opts, true).map_err(|e| err(format!("options: {e}")))?;
                if t.local.port() != 0 {
                    bind(&s, t.local).map_err(|e| err(format!("bind: {e}")))?;
                }
                Ok(s)
            }
            TcpState::Listen { backlog } => {
                let s = new_socket(family, libc::SOCK_STREAM).map_err(|e| err(format!("socket: {e}")))?;
                apply_opts(&s, &t.opts, true).map_err(|e| err(format!("options: {e}")))?;
                setsockopt_int(&s, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1).map_err(|e| err(format!("SO_REUSEADDR: {e}")))?;
                clear_port_leftovers(t.local);
                bind(&s, t.local).map_err(|e| {
                    err(format!("bind: {e} (if the program did not set SO_REUSEADDR, connections of its earlier life may hold the port for a minute; try again later)"))
                })?;
                // SAFETY: listen on our own socket.
                if unsafe { libc::listen(s.as_raw_fd(), *backlog as i32) } != 0 {
                    return Err(err(format!("listen: {}", io::Error::last_os_error())));
                }
                setsockopt_int(&s, libc::SOL_SOCKET, libc::SO_REUSEADDR, t.opts.reuseaddr as i32).map_err(|e| err(format!("SO_REUSEADDR: {e}")))?;
                Ok(s)
            }
            TcpState::Established(c) => {
                let send = read_blob(store, generation, pid, fd, "send queue", &c.send)?;
                let recv = read_blob(store, generation, pid, fd, "receive queue", &c.recv)?;
                if send.len() != c.send_len as usize || recv.len() != c.recv_len as usize {
                    return Err(EngineError::BadImage { generation, what: format!("the queues of the TCP connection at fd {fd} of process {pid} have the wrong length") });
                }
                let s = make_connection(t.local, c, &t.opts, &recv).map_err(|e| err(format!("restoring the connection to {}: {e}", c.peer)))?;
                self.repairing.push(Repairing { sock: crate::fds::dup(&s)?, conn: c.clone(), send, reuseaddr: t.opts.reuseaddr, pid, fd });
                Ok(s)
            }
        }
    }

    pub fn finish(self, generation: u64) -> Result<()> {
        let failed = |pid: &i32, fd: &i32, e: io::Error| EngineError::Restore {
            generation,
            what: format!("the TCP connection at fd {fd} of process {pid}: leaving repair mode: {e}"),
        };
        // Every peer exists now (on the other hosts too: the restarts met
        // at the coordinator before this): the bytes already sent go back,
        // and may be retransmitted from now on (see [`refill_sent`]).
        for r in &self.repairing {
            refill_sent(&r.sock, &r.conn, &r.send)
                .map_err(|e| EngineError::Restore { generation, what: format!("the TCP connection at fd {} of process {}: {e}", r.fd, r.pid) })?;
        }
        // Every end out of repair mode first: a peer in repair mode
        // acknowledges nothing, and bytes that wait for room wait for it.
        for r in &self.repairing {
            repair_off(&r.sock, r.reuseaddr).map_err(|e| failed(&r.pid, &r.fd, e))?;
        }
        for r in &self.repairing {
            let unsent = &r.send[r.send.len() - (r.conn.unsent as usize).min(r.send.len())..];
            send_unsent(&r.sock, unsent).map_err(|e| failed(&r.pid, &r.fd, e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    fn repair(fd: &OwnedFd, on: i32) {
        setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR, on).unwrap();
    }

    /// In a network namespace of its own (a thread that unshared it) with
    /// `net.ipv4.tcp_timestamps` off: a connection is captured, then closed
    /// the way killing its programs closes it, which leaves the client's
    /// side in TIME_WAIT. Without timestamps the kernel does not let a new
    /// connection take that over; the restore removes it and the
    /// connection carries on.
    #[test]
    fn connection_comes_back_over_its_own_time_wait() {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: TCP_REPAIR and network namespaces need root");
            return;
        }
        std::thread::spawn(|| {
            // SAFETY: unshare of this thread's network namespace only.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare: {}", io::Error::last_os_error());
            lo_up();
            std::fs::write("/proc/sys/net/ipv4/tcp_timestamps", "0").unwrap();
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (mut s, _) = l.accept().unwrap();
            c.write_all(b"hello").unwrap();
            let mut five = [0u8; 5];
            s.read_exact(&mut five).unwrap();
            let (c_fd, s_fd): (OwnedFd, OwnedFd) = (c.into(), s.into());
            let (cl, sl) = (local_addr(&c_fd).unwrap(), local_addr(&s_fd).unwrap());
            let mut images = Vec::new();
            for (fd, peer) in [(&c_fd, sl), (&s_fd, cl)] {
                repair(fd, TCP_REPAIR_ON);
                let (img, send, recv) = read_connection(fd, peer).unwrap();
                assert!(!img.timestamps && send.is_empty() && recv.is_empty());
                repair(fd, TCP_REPAIR_OFF_NO_WP);
                images.push(img);
            }
            // Client first, then server: FIN, FIN, and the client's side
            // stays in TIME_WAIT, owned by nobody.
            drop(c_fd);
            std::thread::sleep(std::time::Duration::from_millis(50));
            drop(s_fd);
            std::thread::sleep(std::time::Duration::from_millis(50));
            let diag = super::super::diag::open_in_netns_of(0).unwrap();
            let held = super::super::diag::tcp_holders(&diag, cl, sl).unwrap();
            assert!(held.iter().any(|m| m.state == 6 && m.inode == 0), "no TIME_WAIT left on {cl} -> {sl}: {held:?}");
            let opts = SockOpts::default();
            let c2 = make_connection(cl, &images[0], &opts, &[]).unwrap();
            let s2 = make_connection(sl, &images[1], &opts, &[]).unwrap();
            assert!(super::super::diag::tcp_holders(&diag, cl, sl).unwrap().iter().all(|m| m.state != 6), "the TIME_WAIT is still there");
            leave_repair(&c2, b"again", false).unwrap();
            leave_repair(&s2, b"back", false).unwrap();
            let (mut c2, mut s2) = (TcpStream::from(c2), TcpStream::from(s2));
            for t in [&c2, &s2] {
                t.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
            }
            s2.read_exact(&mut five).unwrap();
            assert_eq!(&five, b"again");
            let mut four = [0u8; 4];
            c2.read_exact(&mut four).unwrap();
            assert_eq!(&four, b"back");
        })
        .join()
        .unwrap();
    }

    /// Brings up `lo` in the calling thread's network namespace.
    fn lo_up() {
        let s = new_socket(libc::AF_INET, libc::SOCK_DGRAM).unwrap();
        // SAFETY: an all-zero ifreq is valid; "lo" fits in its name.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, b) in ifr.ifr_name.iter_mut().zip(b"lo") {
            *d = *b as libc::c_char;
        }
        // SAFETY: SIOCGIFFLAGS and SIOCSIFFLAGS read and write the ifreq.
        unsafe {
            assert_eq!(libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr), 0);
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            assert_eq!(libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr), 0, "bringing lo up: {}", io::Error::last_os_error());
        }
    }

    /// A loopback connection with bytes in flight both ways is read in
    /// repair mode, closed silently, made again and carries on: nothing
    /// lost, nothing twice.
    #[test]
    fn loopback_connection_survives_repair() {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: TCP_REPAIR needs root");
            return;
        }
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        c.write_all(b"client says hello").unwrap();
        // More than the buffers take (tcp_wmem and tcp_rmem at most 4 and
        // 6 MiB by default): some of it is never sent.
        s.set_nonblocking(true).unwrap();
        let pattern: Vec<u8> = (0..32_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut written = 0;
        while written < pattern.len() {
            match s.write(&pattern[written..]) {
                Ok(n) => written += n,
                Err(_) => break,
            }
        }
        assert!(written < pattern.len(), "the buffers took all {written} bytes");
        std::thread::sleep(std::time::Duration::from_millis(50));
        let c_fd: OwnedFd = c.into();
        let s_fd: OwnedFd = s.into();
        for fd in [&c_fd, &s_fd] {
            repair(fd, TCP_REPAIR_ON);
        }
        let (cl, sl) = (local_addr(&c_fd).unwrap(), local_addr(&s_fd).unwrap());
        let (ci, csend, crecv) = read_connection(&c_fd, sl).unwrap();
        let (si, ssend, srecv) = read_connection(&s_fd, cl).unwrap();
        assert_eq!(srecv, b"client says hello");
        assert_eq!(crecv.len() + ssend.len(), written, "unsent {}", si.unsent);
        assert!(si.unsent > 0);
        assert!(csend.is_empty());
        // Closed in repair mode: no FIN, no RST, the ports stay free.
        drop(c_fd);
        drop(s_fd);
        let opts = SockOpts::default();
        let c2 = make_connection(cl, &ci, &opts, &crecv).unwrap();
        let s2 = make_connection(sl, &si, &opts, &srecv).unwrap();
        refill_sent(&c2, &ci, &csend).unwrap();
        refill_sent(&s2, &si, &ssend).unwrap();
        leave_repair(&c2, &csend[csend.len() - ci.unsent as usize..], false).unwrap();
        leave_repair(&s2, &ssend[ssend.len() - si.unsent as usize..], false).unwrap();
        let mut c2 = TcpStream::from(c2);
        let mut s2 = TcpStream::from(s2);
        let mut got = vec![0u8; 17];
        s2.read_exact(&mut got).unwrap();
        assert_eq!(got, b"client says hello");
        let mut all = vec![0u8; written];
        c2.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        c2.read_exact(&mut all).unwrap();
        assert!(all == pattern[..written], "the stream differs after the restore");
        c2.write_all(b"more").unwrap();
        let mut more = [0u8; 4];
        s2.read_exact(&mut more).unwrap();
        assert_eq!(&more, b"more");
    }
}
