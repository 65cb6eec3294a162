//! UDP sockets (IPv4 and IPv6): bound and connected again at restart, with
//! the datagrams that were waiting in their receive queues.
//!
//! Capture reads the queue of the borrowed socket with `MSG_PEEK`, one
//! datagram at a time through `SO_PEEK_OFF` (put back afterwards), each with
//! its sender's address; it never consumes a datagram. At restart, once
//! every socket of the restart exists ([`Restore::finish`]), each datagram
//! is sent again to its receiver from the restored socket bound to its
//! sender's address, so `recvfrom` names the same sender. A datagram whose
//! sender is not a socket of the computation cannot be sent from its
//! address: it is dropped with a warning (UDP may lose datagrams; the
//! program must cope with that anyway).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};

use ckpt_store::Store;

use super::sys::SO_PEEK_OFF;
use super::tcp::{bind, connect, get_addr, local_addr, raw_addr};
use super::{apply_opts, default_buffers, getsockopt_int, grow_sndbuf, new_socket, read_blob, read_opts, setsockopt_int};
use crate::error::{EngineError, Result};
use crate::fds::{LiveFd, Round};
use crate::image::UdpSocketImage;

pub fn capture(round: &mut Round, live: &LiveFd, fd: OwnedFd, ino: u64, netns: u64) -> Result<UdpSocketImage> {
    let io_err = |what: &str, e: io::Error| EngineError::io(format!("{what} of UDP socket {} (process {}, fd {})", live.target, live.pid, live.fd), e);
    let local = local_addr(&fd).map_err(|e| io_err("getsockname", e))?;
    let peer = get_addr(&fd, true).ok();
    let opts = read_opts(&fd, default_buffers(), false);
    let queue = peek_queue(&fd).map_err(|e| io_err("reading the datagrams in its queue", e))?;
    let bytes: Vec<u8> = queue.iter().flat_map(|(_, d)| d.iter().copied()).collect();
    let data = if bytes.is_empty() { None } else { Some(round.put_blob(&bytes)?) };
    let messages = queue.iter().map(|(a, d)| (*a, d.len() as u32)).collect();
    Ok(UdpSocketImage { netns, ino, local, peer, data, messages, opts })
}

/// The datagrams in the receive queue of `fd`, with their senders, left in
/// place; the program's peek offset is put back.
pub fn peek_queue(fd: &OwnedFd) -> io::Result<Vec<(SocketAddr, Vec<u8>)>> {
    let saved = getsockopt_int(fd, libc::SOL_SOCKET, SO_PEEK_OFF)?;
    let got = peek_all(fd);
    let put_back = setsockopt_int(fd, libc::SOL_SOCKET, SO_PEEK_OFF, saved);
    let msgs = got?;
    put_back?;
    Ok(msgs)
}

fn peek_all(fd: &OwnedFd) -> io::Result<Vec<(SocketAddr, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65536];
    let mut off = 0usize;
    loop {
        if out.len() > 1 << 20 {
            return Err(io::Error::other("more than a million queued datagrams"));
        }
        setsockopt_int(fd, libc::SOL_SOCKET, SO_PEEK_OFF, off as i32)?;
        // SAFETY: an all-zero sockaddr_storage is valid.
        let mut from: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        // SAFETY: an all-zero msghdr is valid; the pointers set below live
        // across the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = (&mut from as *mut libc::sockaddr_storage).cast();
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        // SAFETY: recvmsg writes into the buffers `msg` points to.
        let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, libc::MSG_PEEK | libc::MSG_DONTWAIT | libc::MSG_TRUNC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                break;
            }
            return Err(e);
        }
        let n = n as usize;
        if n > buf.len() {
            buf.resize(n, 0);
            continue;
        }
        out.push((sockaddr_to_std(&from)?, buf[..n].to_vec()));
        off += n;
    }
    Ok(out)
}

fn sockaddr_to_std(ss: &libc::sockaddr_storage) -> io::Result<SocketAddr> {
    match ss.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in.
            let a = unsafe { *(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Ok(SocketAddr::from((u32::from_be(a.sin_addr.s_addr).to_be_bytes(), u16::from_be(a.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: the kernel wrote a sockaddr_in6.
            let a = unsafe { *(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Ok(SocketAddr::V6(std::net::SocketAddrV6::new(a.sin6_addr.s6_addr.into(), u16::from_be(a.sin6_port), a.sin6_flowinfo, a.sin6_scope_id)))
        }
        f => Err(io::Error::other(format!("a datagram from address family {f}"))),
    }
}

/// The UDP sockets of one restart.
#[derive(Default)]
pub(super) struct Restore {
    /// Every socket made, by (network namespace, local address).
    made: Vec<(u64, SocketAddr, OwnedFd)>,
    refills: Vec<Refill>,
}

/// A queue to refill: the receiver (network namespace, address, pid, fd)
/// and its datagrams with their senders.
struct Refill {
    netns: u64,
    to: SocketAddr,
    dgrams: Vec<(SocketAddr, Vec<u8>)>,
    pid: i32,
    fd: i32,
}

impl Restore {
    pub fn open(&mut self, store: &Store, generation: u64, pid: i32, fd: i32, u: &UdpSocketImage) -> Result<OwnedFd> {
        let err = |what: String| EngineError::Restore { generation, what: format!("UDP socket {} at fd {fd} of process {pid}: {what}", u.local) };
        let family = if u.local.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
        let s = new_socket(family, libc::SOCK_DGRAM).map_err(|e| err(format!("socket: {e}")))?;
        apply_opts(&s, &u.opts, false).map_err(|e| err(format!("options: {e}")))?;
        if u.local.port() != 0 {
            bind(&s, u.local).map_err(|e| err(format!("bind: {e}")))?;
        }
        if let Some(peer) = u.peer {
            connect(&s, peer).map_err(|e| err(format!("connect to {peer}: {e}")))?;
        }
        if !u.messages.is_empty() {
            let bytes = read_blob(store, generation, pid, fd, "datagrams", &u.data)?;
            let total: usize = u.messages.iter().map(|(_, n)| *n as usize).sum();
            if bytes.len() != total {
                return Err(EngineError::BadImage { generation, what: format!("the datagrams of the UDP socket at fd {fd} of process {pid} have the wrong length") });
            }
            let mut at = 0;
            let mut dgrams = Vec::new();
            for (from, n) in &u.messages {
                dgrams.push((*from, bytes[at..at + *n as usize].to_vec()));
                at += *n as usize;
            }
            self.refills.push(Refill { netns: u.netns, to: u.local, dgrams, pid, fd });
        }
        self.made.push((u.netns, u.local, crate::fds::dup(&s)?));
        Ok(s)
    }

    /// Once every socket exists: each queued datagram is sent again from
    /// the socket at its sender's address.
    pub fn finish(self, generation: u64) -> Result<()> {
        for Refill { netns, to, dgrams, pid, fd } in &self.refills {
            let mut dropped = 0usize;
            for (from, data) in dgrams {
                let sender = self.made.iter().find(|(n, a, _)| n == netns && (a == from || (a.port() == from.port() && a.ip().is_unspecified())));
                let Some((_, _, s)) = sender else {
                    dropped += 1;
                    continue;
                };
                grow_sndbuf(s, data.len()).ok();
                let (ss, len) = raw_addr(*to);
                // SAFETY: sendto reads `data` and `len` bytes of `ss`.
                let r = unsafe { libc::sendto(s.as_raw_fd(), data.as_ptr().cast(), data.len(), libc::MSG_DONTWAIT, (&ss as *const libc::sockaddr_storage).cast(), len) };
                if r < 0 {
                    return Err(EngineError::Restore {
                        generation,
                        what: format!("refilling the UDP socket at fd {fd} of process {pid} from {from}: {}", io::Error::last_os_error()),
                    });
                }
            }
            if dropped > 0 {
                tracing::warn!(pid, fd, dropped, "{dropped} datagram(s) queued for UDP socket {to} came from outside the computation and are dropped");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peek_keeps_datagrams_and_their_senders() {
        let r = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for m in [&b"one"[..], b"", b"three!"] {
            s.send_to(m, r.local_addr().unwrap()).unwrap();
        }
        let fd: OwnedFd = r.try_clone().unwrap().into();
        setsockopt_int(&fd, libc::SOL_SOCKET, SO_PEEK_OFF, -1).unwrap();
        let q = peek_queue(&fd).unwrap();
        let got: Vec<(SocketAddr, &[u8])> = q.iter().map(|(a, d)| (*a, d.as_slice())).collect();
        let from = s.local_addr().unwrap();
        assert_eq!(got, vec![(from, &b"one"[..]), (from, &b""[..]), (from, &b"three!"[..])]);
        assert_eq!(getsockopt_int(&fd, libc::SOL_SOCKET, SO_PEEK_OFF).unwrap(), -1);
        let mut buf = [0u8; 16];
        assert_eq!(r.recv_from(&mut buf).unwrap(), (3, from), "the queue was consumed");
    }
}
