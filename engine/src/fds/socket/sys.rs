//! Kernel uapi constants and structs for sockets that the `libc` crate
//! lacks (or that it has only for some targets): values from
//! `include/uapi/linux/{sock_diag,unix_diag,inet_diag,netlink,tcp}.h` and
//! `asm-generic/socket.h`. Kept here so that nothing else in the engine
//! spells a socket number by hand.

use ckpt_wire::Pod;

pub const SO_PEEK_OFF: i32 = 42;
pub const SO_SNDBUFFORCE: i32 = 32;
pub const SO_RCVBUFFORCE: i32 = 33;
pub const SO_PASSCRED: i32 = 16;

/// `ioctl`s of `linux/sockios.h`: bytes in the receive queue, in the send
/// queue (unacknowledged + unsent), and unsent only.
pub const SIOCINQ: libc::c_ulong = 0x541B;
pub const SIOCOUTQ: libc::c_ulong = 0x5411;
pub const SIOCOUTQNSD: libc::c_ulong = 0x894B;

pub const NETLINK_SOCK_DIAG: i32 = 4;
pub const SOCK_DIAG_BY_FAMILY: u16 = 20;
pub const SOCK_DESTROY: u16 = 21;
pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;

pub const UDIAG_SHOW_NAME: u32 = 0x01;
pub const UDIAG_SHOW_PEER: u32 = 0x04;
pub const UDIAG_SHOW_ICONS: u32 = 0x08;
pub const UDIAG_SHOW_RQLEN: u32 = 0x10;
pub const UNIX_DIAG_NAME: u16 = 0;
pub const UNIX_DIAG_PEER: u16 = 2;
pub const UNIX_DIAG_ICONS: u16 = 3;
pub const UNIX_DIAG_RQLEN: u16 = 4;
pub const UNIX_DIAG_SHUTDOWN: u16 = 6;

/// `sk_state` values (`include/net/tcp_states.h`), shared by unix sockets.
pub const TCP_ESTABLISHED: u8 = 1;
pub const TCP_CLOSE: u8 = 7;
pub const TCP_LISTEN: u8 = 10;

pub const TCP_REPAIR_ON: i32 = 1;
/// Leave repair mode without sending a window probe.
pub const TCP_REPAIR_OFF_NO_WP: i32 = -1;
pub const TCP_REPAIR_OFF: i32 = 0;
pub const TCP_NO_QUEUE: i32 = 0;
pub const TCP_RECV_QUEUE: i32 = 1;
pub const TCP_SEND_QUEUE: i32 = 2;

pub const TCPOPT_MSS: u32 = 2;
pub const TCPOPT_WINDOW: u32 = 3;
pub const TCPOPT_SACK_PERM: u32 = 4;
pub const TCPOPT_TIMESTAMP: u32 = 8;
/// `tcpi_options` bits of `struct tcp_info`.
pub const TCPI_OPT_TIMESTAMPS: u8 = 1;
pub const TCPI_OPT_SACK: u8 = 2;
pub const TCPI_OPT_WSCALE: u8 = 4;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct NlMsgHdr {
    pub len: u32,
    pub ty: u16,
    pub flags: u16,
    pub seq: u32,
    pub pid: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UnixDiagReq {
    pub family: u8,
    pub protocol: u8,
    pub pad: u16,
    pub states: u32,
    pub ino: u32,
    pub show: u32,
    pub cookie: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UnixDiagMsg {
    pub family: u8,
    pub ty: u8,
    pub state: u8,
    pub pad: u8,
    pub ino: u32,
    pub cookie: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct InetDiagSockId {
    pub sport: u16,
    pub dport: u16,
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub iface: u32,
    pub cookie: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct InetDiagReqV2 {
    pub family: u8,
    pub protocol: u8,
    pub ext: u8,
    pub pad: u8,
    pub states: u32,
    pub id: InetDiagSockId,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct InetDiagMsg {
    pub family: u8,
    pub state: u8,
    pub timer: u8,
    pub retrans: u8,
    pub id: InetDiagSockId,
    pub expires: u32,
    pub rqueue: u32,
    pub wqueue: u32,
    pub uid: u32,
    pub inode: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TcpRepairOpt {
    pub code: u32,
    pub val: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpRepairWindow {
    pub snd_wl1: u32,
    pub snd_wnd: u32,
    pub max_window: u32,
    pub rcv_wnd: u32,
    pub rcv_wup: u32,
}

// SAFETY: all of these are repr(C), made of integers only, with no implicit
// padding (each field is naturally aligned and the sizes add up), and every
// bit pattern is a valid value.
unsafe impl Pod for NlMsgHdr {}
// SAFETY: as above.
unsafe impl Pod for UnixDiagReq {}
// SAFETY: as above.
unsafe impl Pod for UnixDiagMsg {}
// SAFETY: as above.
unsafe impl Pod for InetDiagSockId {}
// SAFETY: as above.
unsafe impl Pod for InetDiagReqV2 {}
// SAFETY: as above.
unsafe impl Pod for InetDiagMsg {}
// SAFETY: as above.
unsafe impl Pod for TcpRepairOpt {}
// SAFETY: as above.
unsafe impl Pod for TcpRepairWindow {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_the_kernel() {
        assert_eq!(std::mem::size_of::<NlMsgHdr>(), 16);
        assert_eq!(std::mem::size_of::<UnixDiagReq>(), 24);
        assert_eq!(std::mem::size_of::<UnixDiagMsg>(), 16);
        assert_eq!(std::mem::size_of::<InetDiagReqV2>(), 56);
        assert_eq!(std::mem::size_of::<InetDiagMsg>(), 72);
        assert_eq!(std::mem::size_of::<TcpRepairWindow>(), 20);
    }
}
