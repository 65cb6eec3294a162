//! `NETLINK_SOCK_DIAG` queries: what the kernel knows about the sockets of
//! a network namespace (a unix socket's peer, name, queue lengths and
//! pending connections; a TCP listener's backlog), and the TCP sockets
//! holding one address pair. It changes no socket of a program: the one
//! thing it destroys ([`destroy_tcp`]) is what a killed program left
//! behind, on the restart's request.
//!
//! A diag socket answers for the network namespace it was made in, so one
//! is made per namespace, in a short-lived thread that joined it (`setns`
//! changes only the calling thread's namespace).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

use ckpt_wire::Pod;

use super::sys::*;

/// The inode of the network namespace of `pid` (`/proc/PID/ns/net`); 0 for
/// this process if `pid` is 0.
pub fn netns_of(pid: i32) -> io::Result<u64> {
    let path = if pid == 0 { "/proc/self/ns/net".to_string() } else { format!("/proc/{pid}/ns/net") };
    Ok(std::fs::metadata(path)?.ino())
}

/// What sock_diag says about one unix socket.
#[derive(Clone, Debug, Default)]
pub struct UnixInfo {
    pub ty: u8,
    pub state: u8,
    /// `sun_path` bytes as bound (abstract names start with a NUL).
    pub name: Option<Vec<u8>>,
    pub peer: u64,
    /// Listening sockets: the inodes of connections not accepted yet.
    pub icons: Vec<u64>,
    /// Bytes in the receive queue (stream, seqpacket: all of them; dgram:
    /// the first message), or for a listener: pending connections.
    pub rqueue: u32,
    /// Listener: its backlog.
    pub wqueue: u32,
    pub shutdown: u8,
}

/// A diag socket in the network namespace of `pid`.
pub fn open_in_netns_of(pid: i32) -> io::Result<OwnedFd> {
    if netns_of(pid)? == netns_of(0)? {
        return new_socket();
    }
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            new_socket()
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("sock_diag thread panicked")))
    })
}

fn new_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) returns a new fd or -1.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, NETLINK_SOCK_DIAG) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends one dump request; returns the payload of every answer.
fn dump(sock: &OwnedFd, body: &[u8]) -> io::Result<Vec<Vec<u8>>> {
    exchange(sock, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, body)
}

/// Sends one request; returns the payload of every answer up to the
/// closing `NLMSG_DONE` or `NLMSG_ERROR` (an error if it carries one).
fn exchange(sock: &OwnedFd, ty: u16, flags: u16, body: &[u8]) -> io::Result<Vec<Vec<u8>>> {
    let hdr = NlMsgHdr { len: (16 + body.len()) as u32, ty, flags, seq: 1, pid: 0 };
    let mut req = hdr.as_bytes().to_vec();
    req.extend_from_slice(body);
    // SAFETY: send of a buffer we own, to the kernel (nl_pid 0 by default).
    if unsafe { libc::send(sock.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: recv into our buffer, at most its length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut rest = &buf[..n as usize];
        while let Some(h) = NlMsgHdr::read_from(rest) {
            let len = h.len as usize;
            if len < 16 || len > rest.len() {
                return Err(io::Error::other("malformed sock_diag answer"));
            }
            match h.ty {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    let errno = rest.get(16..20).map(|b| i32::from_ne_bytes(b.try_into().unwrap())).unwrap_or(0);
                    if errno == 0 {
                        return Ok(out);
                    }
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                _ => out.push(rest[16..len].to_vec()),
            }
            rest = &rest[len.next_multiple_of(4).min(rest.len())..];
        }
        if n == 0 {
            return Ok(out);
        }
    }
}

/// The netlink attributes after a fixed header of `skip` bytes.
fn attrs(payload: &[u8], skip: usize) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut rest = payload.get(skip..).unwrap_or_default();
    while rest.len() >= 4 {
        let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
        let ty = u16::from_ne_bytes([rest[2], rest[3]]) & 0x3fff;
        if len < 4 || len > rest.len() {
            break;
        }
        out.push((ty, &rest[4..len]));
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
    }
    out
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    b.get(i * 4..i * 4 + 4).map(|s| u32::from_ne_bytes(s.try_into().unwrap())).unwrap_or(0)
}

/// Every unix socket of the diag socket's namespace, by inode.
pub fn unix_sockets(sock: &OwnedFd) -> io::Result<HashMap<u64, UnixInfo>> {
    let req = UnixDiagReq {
        family: libc::AF_UNIX as u8,
        states: u32::MAX,
        show: UDIAG_SHOW_NAME | UDIAG_SHOW_PEER | UDIAG_SHOW_ICONS | UDIAG_SHOW_RQLEN,
        ..Default::default()
    };
    let mut out = HashMap::new();
    for p in dump(sock, req.as_bytes())? {
        let Some(m) = UnixDiagMsg::read_from(&p) else { continue };
        let mut info = UnixInfo { ty: m.ty, state: m.state, ..Default::default() };
        for (ty, v) in attrs(&p, std::mem::size_of::<UnixDiagMsg>()) {
            match ty {
                UNIX_DIAG_NAME => info.name = Some(v.to_vec()),
                UNIX_DIAG_PEER => info.peer = u32_at(v, 0) as u64,
                UNIX_DIAG_ICONS => info.icons = (0..v.len() / 4).map(|i| u32_at(v, i) as u64).collect(),
                UNIX_DIAG_RQLEN => (info.rqueue, info.wqueue) = (u32_at(v, 0), u32_at(v, 1)),
                UNIX_DIAG_SHUTDOWN => info.shutdown = v.first().copied().unwrap_or(0),
                _ => {}
            }
        }
        out.insert(m.ino as u64, info);
    }
    Ok(out)
}

/// Every listening TCP socket (IPv4 and IPv6) of the namespace, by inode:
/// (connections waiting to be accepted, backlog).
pub fn tcp_listeners(sock: &OwnedFd) -> io::Result<HashMap<u64, (u32, u32)>> {
    let mut out = HashMap::new();
    for family in [libc::AF_INET, libc::AF_INET6] {
        let req = InetDiagReqV2 { family: family as u8, protocol: libc::IPPROTO_TCP as u8, states: 1 << TCP_LISTEN, ..Default::default() };
        for p in dump(sock, req.as_bytes())? {
            if let Some(m) = InetDiagMsg::read_from(&p) {
                out.insert(m.inode as u64, (m.rqueue, m.wqueue));
            }
        }
    }
    Ok(out)
}

/// `a`'s address as `inet_diag_sockid` holds it (network byte order).
fn diag_addr(a: &SocketAddr) -> [u32; 4] {
    let mut out = [0u32; 4];
    match a {
        SocketAddr::V4(v) => out[0] = u32::from_ne_bytes(v.ip().octets()),
        SocketAddr::V6(v) => {
            for (i, w) in v.ip().octets().chunks(4).enumerate() {
                out[i] = u32::from_ne_bytes(w.try_into().unwrap());
            }
        }
    }
    out
}

/// Every TCP socket of the namespace, in any state but listening (a
/// `TIME_WAIT` one included), whose local and peer addresses are `local`
/// and `peer`.
pub fn tcp_holders(sock: &OwnedFd, local: SocketAddr, peer: SocketAddr) -> io::Result<Vec<InetDiagMsg>> {
    let family = if local.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    let req = InetDiagReqV2 { family: family as u8, protocol: libc::IPPROTO_TCP as u8, states: !(1u32 << TCP_LISTEN), ..Default::default() };
    let (src, dst) = (diag_addr(&local), diag_addr(&peer));
    let n = if local.is_ipv4() { 1 } else { 4 };
    Ok(dump(sock, req.as_bytes())?
        .iter()
        .filter_map(|p| InetDiagMsg::read_from(p))
        .filter(|m| {
            u16::from_be(m.id.sport) == local.port()
                && u16::from_be(m.id.dport) == peer.port()
                && m.id.src[..n] == src[..n]
                && m.id.dst[..n] == dst[..n]
        })
        .collect())
}

/// The TCP sockets other than listeners on local address `local` (any
/// local address when `local`'s is unspecified), whatever their peer.
pub fn tcp_port_holders(sock: &OwnedFd, local: SocketAddr) -> io::Result<Vec<InetDiagMsg>> {
    let family = if local.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    let req = InetDiagReqV2 { family: family as u8, protocol: libc::IPPROTO_TCP as u8, states: !(1u32 << TCP_LISTEN), ..Default::default() };
    let src = diag_addr(&local);
    let n = if local.is_ipv4() { 1 } else { 4 };
    let any = local.ip().is_unspecified();
    Ok(dump(sock, req.as_bytes())?
        .iter()
        .filter_map(|p| InetDiagMsg::read_from(p))
        .filter(|m| u16::from_be(m.id.sport) == local.port() && (any || m.id.src[..n] == src[..n]))
        .collect())
}

/// Destroys TCP socket `m` (as [`tcp_holders`] found it) with
/// `SOCK_DESTROY`: no packet is sent, its address pair is free. Needs
/// `CAP_NET_ADMIN` and a kernel built with `CONFIG_INET_DIAG_DESTROY`
/// (else `EOPNOTSUPP`).
pub fn destroy_tcp(sock: &OwnedFd, m: &InetDiagMsg) -> io::Result<()> {
    let req = InetDiagReqV2 { family: m.family, protocol: libc::IPPROTO_TCP as u8, states: u32::MAX, id: m.id, ..Default::default() };
    exchange(sock, SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, req.as_bytes()).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_peer_and_queue_of_a_socketpair() {
        use std::os::unix::fs::MetadataExt;
        let (a, b) = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::Stream,
            None,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        nix::unistd::write(&b, b"12345").unwrap();
        let ino = |fd: &OwnedFd| std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap().ino();
        let all = unix_sockets(&open_in_netns_of(0).unwrap()).unwrap();
        let ia = &all[&ino(&a)];
        assert_eq!(ia.peer, ino(&b));
        assert_eq!(ia.rqueue, 5);
        assert_eq!(ia.state, TCP_ESTABLISHED);
        assert_eq!(ia.ty, libc::SOCK_STREAM as u8);
    }
}
