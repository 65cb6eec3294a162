//! The image manifest: what a generation records about each process.
//!
//! These are plain serializable types (no fds, no pointers into live
//! processes), stored as JSON blobs in the store. Memory contents are not in
//! here: each region names the top of its chunk-list tree
//! ([`crate::chunklist`]), so an unchanged part of memory costs nothing in the
//! next generation, and a changed page costs a leaf and the path above it.

use ckpt_chunker::Hash;
use serde::{Deserialize, Serialize};

/// Manifest format version; bump on incompatible change.
pub const IMAGE_VERSION: u32 = 1;

/// The root of a generation: one entry per process.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GenerationManifest {
    pub version: u32,
    pub generation: u64,
    pub processes: Vec<ProcessEntry>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProcessEntry {
    pub pid: i32,
    pub host: String,
    pub exe: String,
    /// Hash of the [`ProcessImage`] blob.
    pub image: Hash,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProcessImage {
    pub version: u32,
    pub pid: i32,
    pub ppid: i32,
    /// Session and process group.
    #[serde(default)]
    pub sid: i32,
    #[serde(default)]
    pub pgid: i32,
    /// Children that had exited but were not waited for: they are zombies
    /// again after a restart, so that `wait` gets their status.
    #[serde(default)]
    pub zombies: Vec<Zombie>,
    /// The controlling terminal, when it is the slave of a pseudo-terminal
    /// (its pts number; the session leader takes it back at restart).
    #[serde(default)]
    pub ctty_pts: Option<u32>,
    /// The foreground process group of that terminal (`tcgetpgrp`); 0:
    /// none recorded.
    #[serde(default)]
    pub tty_pgrp: i32,
    pub host: String,
    pub exe: String,
    pub comm: String,
    pub cmdline: Vec<String>,
    pub cwd: String,
    pub umask: u32,
    pub rlimits: Vec<Rlimit>,
    pub mm: MmFields,
    /// Saved auxiliary vector (pairs of words, AT_NULL included).
    pub auxv: Vec<u64>,
    pub threads: Vec<ThreadImage>,
    /// Actions of signals 1..=64 (index = signal - 1; SIGKILL/SIGSTOP zero).
    pub sigactions: Vec<Sigaction>,
    /// ITIMER_REAL, ITIMER_VIRTUAL, ITIMER_PROF.
    pub itimers: Vec<Itimer>,
    /// Each thread's scheduling: policy, priority, nice, CPU affinity and
    /// I/O priority (empty in images from before they were recorded).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sched: Vec<ThreadSched>,
    /// Signals pending for a thread or for the process, in queue order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<PendingSignal>,
    /// POSIX timers (`timer_create`), in `/proc/PID/timers` order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub posix_timers: Vec<PosixTimer>,
    pub fds: Vec<FdImage>,
    pub regions: Vec<RegionImage>,
    /// The SysV shared memory segments it had attached (`shmat`).
    #[serde(default)]
    pub sysv_shm: Vec<SysvShm>,
    /// The SysV semaphore sets and message queues it used last
    /// ([`crate::sysvipc`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sysv_sem: Vec<crate::sysvipc::SysvSem>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sysv_msq: Vec<crate::sysvipc::SysvMsq>,
    pub agent: AgentImage,
    pub chunk_size: u32,
    /// The credentials of every thread ([`crate::creds`]). None: an image
    /// made before they were recorded; only root may restart it, and its
    /// processes come back with the restarting user's credentials.
    #[serde(default)]
    pub creds: Option<crate::creds::ProcessCreds>,
    /// The namespaces ckpt made for its computation ([`crate::ns`]); None:
    /// the machine's own (or a machine's whose `ckpt host` reads it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<crate::ns::Namespaces>,
    /// The stop signal when the process was stopped by job control at the
    /// checkpoint ([`crate::jobstop`]): it comes back stopped. 0: running.
    #[serde(default, skip_serializing_if = "is_zero_i32")]
    pub job_stop: i32,
    /// Temporary files, FIFOs and directories it keeps open or maps
    /// shared, kept with the image and made again at a restart when gone
    /// ([`crate::tmpfiles`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub temp_files: Vec<crate::tmpfiles::TempFile>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Zombie {
    pub pid: i32,
    /// The status `wait` reports (exit code << 8, or the signal).
    pub status: i32,
    /// Its process group and session (0: not recorded, its parent's).
    #[serde(default)]
    pub pgid: i32,
    #[serde(default)]
    pub sid: i32,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    pub resource: u32,
    pub soft: u64,
    pub hard: u64,
}

/// The `mm_struct` fields `PR_SET_MM_MAP` restores.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmFields {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadImage {
    pub tid: i32,
    pub is_ckpt_thread: bool,
    pub ucontext: u64,
    pub fs_base: u64,
    pub clear_child_tid: u64,
    pub robust_list: u64,
    pub robust_len: u64,
    pub rseq_addr: u64,
    pub rseq_len: u32,
    pub rseq_sig: u32,
}

impl From<&ckpt_wire::agent::ThreadState> for ThreadImage {
    fn from(t: &ckpt_wire::agent::ThreadState) -> Self {
        ThreadImage {
            tid: t.tid,
            is_ckpt_thread: t.is_ckpt_thread != 0,
            ucontext: t.ucontext,
            fs_base: t.fs_base,
            clear_child_tid: t.clear_child_tid,
            robust_list: t.robust_list,
            robust_len: t.robust_len,
            rseq_addr: t.rseq_addr,
            rseq_len: t.rseq_len,
            rseq_sig: t.rseq_sig,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sigaction {
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Itimer {
    pub interval_sec: i64,
    pub interval_usec: i64,
    pub value_sec: i64,
    pub value_usec: i64,
}

/// A pending signal: its `siginfo_t` as the kernel queued it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingSignal {
    /// The thread it waits for; 0: the process (any thread may take it).
    pub tid: i32,
    /// The raw `siginfo_t` (128 bytes).
    pub info: Vec<u8>,
}

/// A thread's scheduling attributes, set again by the thread itself at
/// restart (before its credentials).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadSched {
    pub tid: i32,
    /// `sched_getattr`: `struct sched_attr` as the kernel wrote it (policy,
    /// flags, nice, priority, deadline parameters, utilization clamps).
    pub attr: Vec<u8>,
    /// `sched_getaffinity`: the CPU mask.
    pub affinity: Vec<u8>,
    /// `ioprio_get(IOPRIO_WHO_PROCESS, tid)`.
    pub ioprio: i32,
}

/// A POSIX timer: created again with the same id (Linux ≥ 6.17's
/// `PR_TIMER_CREATE_RESTORE_IDS`), clock and notification, armed with the
/// time it had left and its interval.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PosixTimer {
    pub id: i32,
    pub clock: i32,
    /// `SIGEV_SIGNAL`, `SIGEV_NONE` or `SIGEV_THREAD_ID` (glibc's
    /// `SIGEV_THREAD` timers are `SIGEV_THREAD_ID` ones to its helper thread).
    pub notify: i32,
    pub signo: i32,
    /// `sigev_value`, handed to the handler in `si_value`.
    pub value: u64,
    /// The thread a `SIGEV_THREAD_ID` timer signals.
    pub tid: i32,
    pub interval_sec: i64,
    pub interval_nsec: i64,
    /// Time left (relative); zero: disarmed.
    pub left_sec: i64,
    pub left_nsec: i64,
    /// Overruns of the last expiry (`timer_getoverrun`); not restored.
    pub overrun: i32,
}

impl Itimer {
    pub fn is_zero(&self) -> bool {
        *self == Itimer::default()
    }
}

/// An open file descriptor and how to bring it back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdImage {
    pub fd: i32,
    pub kind: FdKind,
    /// `open(2)` flags from fdinfo (access mode, O_APPEND, O_NONBLOCK, ...).
    pub flags: i32,
    pub cloexec: bool,
    pub pos: i64,
    /// Which open file description this fd shares with other fds of the
    /// computation (same id: same description, after `dup` or `fork`);
    /// 0: its own.
    #[serde(default)]
    pub ofd: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FdKind {
    /// stdin/stdout/stderr: the restarted process gets the restart
    /// command's. Above 2: a pipe or socket the program inherited from
    /// outside the computation at launch; it becomes /dev/null.
    Inherited {
        was: String,
        /// The launch's fd it was (0-2: the restart command's is used).
        #[serde(default)]
        from: Option<i32>,
    },
    /// A regular file, reopened by path at the same offset.
    File { path: String },
    /// A directory, reopened by path.
    Dir { path: String },
    /// A character device such as /dev/null, reopened by path.
    Device { path: String },
    /// One end of a pipe (`pipe` is its inode: ends with the same one are
    /// one pipe again after a restart).
    Pipe {
        pipe: u64,
        write: bool,
        capacity: u32,
        /// The bytes in flight (recorded once per pipe, on a read end).
        data: Option<Hash>,
    },
    /// A named pipe (FIFO), opened again at its path (made again if it is
    /// gone); ends with the same path are one pipe again after a restart.
    Fifo(FifoImage),
    /// A unix socket (stream, datagram or seqpacket).
    Unix(UnixSocketImage),
    /// A TCP socket (IPv4 or IPv6): unconnected, listening or established.
    Tcp(TcpSocketImage),
    /// A UDP socket (IPv4 or IPv6), with the datagrams in its queue.
    Udp(UdpSocketImage),
    /// The agent's connection to the coordinator: a new one is made.
    Agent,
    /// An eventfd with the counter it held.
    EventFd { count: u64, semaphore: bool },
    /// A timerfd, armed again with the time that remained.
    TimerFd(TimerFdState),
    /// A signalfd and the signals it accepts (bit `n - 1` for signal `n`).
    SignalFd { mask: u64 },
    /// An epoll instance. Its items are added back by the process that
    /// holds the target at `fd` (items are keyed by file and fd number).
    Epoll { items: Vec<EpollItem> },
    /// An inotify instance and its watches, in wd order.
    Inotify { watches: Vec<InotifyWatch> },
    /// The master side of a pseudo-terminal (`/dev/ptmx`); `index` is the
    /// old pts number, which pairs it with its slaves.
    PtyMaster(PtyState),
    /// A slave side (`/dev/pts/N`, `index` = N).
    PtySlave { index: u32, path: String },
    /// A file open after it was unlinked (`tmpfile`, `O_TMPFILE`, unlink
    /// after open) or a memfd: made again, unlinked, with its contents
    /// (engine/src/fds/deleted.rs).
    Deleted(DeletedFileImage),
    /// A POSIX message queue (`mq_open`) with its messages
    /// (engine/src/fds/mqueue.rs).
    Mqueue(MqueueImage),
    /// A file or directory under `/proc/PID/` (`/proc/self/stat`,
    /// `/proc/self/fd`): opened again by the restored process itself once
    /// the processes exist (engine/src/fds/procfile.rs).
    ProcFile { path: String, dir: bool },
}

/// A POSIX message queue. Fds with the same `ino` are one queue again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MqueueImage {
    /// Its name (`/name`).
    pub name: String,
    /// `mq_unlink`ed already: made again under a scratch name, unlinked.
    pub unlinked: bool,
    pub ino: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub maxmsg: i64,
    pub msgsize: i64,
    /// The messages in the order `mq_receive` gives them: priority and
    /// length of each; their bytes, concatenated, in `data`.
    pub messages: Vec<(u32, u32)>,
    pub data: Option<Hash>,
}

/// The file behind [`FdKind::Deleted`] (also a deleted file an inotify
/// watch holds). Fds and mappings with the same `dev`/`ino` share one file
/// again after a restart.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeletedFileImage {
    /// The kernel's name for it (`/tmp/x (deleted)`, `/memfd:name (deleted)`).
    pub path: String,
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    /// Permission bits, owner.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// A memfd: its seals (`F_GET_SEALS`); None: a file of a file system.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memfd_seals: Option<u32>,
    /// The contents: a chunk-list tree ([`crate::chunklist`]) of
    /// `chunk_size` chunks; holes and zero chunks are not stored.
    pub chunk_size: u32,
    pub segments: Vec<Hash>,
    pub depth: u32,
}

impl FdKind {
    /// The blobs this fd's data needs in the store, for gc and verify:
    /// metadata blobs, and chunk-list trees (top level, depth).
    pub fn data_blobs(&self) -> (Vec<Hash>, Vec<(&[Hash], u32)>) {
        let mut meta = Vec::new();
        let mut trees = Vec::new();
        match self {
            FdKind::Pipe { data: Some(h), .. } => meta.push(*h),
            FdKind::Fifo(f) => meta.extend(f.data),
            FdKind::Mqueue(q) => meta.extend(q.data),
            FdKind::PtyMaster(p) => meta.extend(p.data),
            FdKind::Unix(u) => meta.extend(u.data),
            FdKind::Udp(u) => meta.extend(u.data),
            FdKind::Tcp(TcpSocketImage { state: TcpState::Established(c), .. }) => meta.extend(c.send.iter().chain(&c.recv)),
            FdKind::Deleted(d) => trees.push((d.segments.as_slice(), d.depth)),
            FdKind::Inotify { watches } => trees.extend(watches.iter().filter_map(|w| w.deleted.as_ref()).map(|d| (d.segments.as_slice(), d.depth))),
            _ => {}
        }
        (meta, trees)
    }
}

/// An fd open on a FIFO (`mkfifo`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FifoImage {
    pub path: String,
    /// Its inode (and device): fds with the same are one pipe.
    pub ino: u64,
    pub dev: u64,
    /// Permission bits and owner, for making it again.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub capacity: u32,
    /// The bytes in flight (recorded once per FIFO, from an fd that can
    /// read it).
    pub data: Option<Hash>,
}

/// A timerfd's settings (`timerfd_gettime`) and its unread expirations.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimerFdState {
    pub clock: i32,
    /// `timerfd_settime` flags (`TFD_TIMER_ABSTIME`, `TFD_TIMER_CANCEL_ON_SET`).
    pub settime_flags: i32,
    /// Time left until the next expiration (0: disarmed).
    pub value_ns: u64,
    pub interval_ns: u64,
    /// Expirations not read yet.
    pub ticks: u64,
    /// An absolute wall-clock timer: its deadline (`CLOCK_REALTIME` ns).
    #[serde(default)]
    pub deadline_ns: Option<i64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpollItem {
    /// The fd number the program registered (and uses in `epoll_ctl`).
    pub fd: i32,
    /// `events` as registered, flags (`EPOLLET`, `EPOLLONESHOT`,
    /// `EPOLLEXCLUSIVE`, ...) included.
    pub events: u32,
    pub data: u64,
    /// When fd `fd` was closed (or reused) after the item was added, the
    /// fd of the same process that holds the watched file now: the item is
    /// added through it, put at number `fd` for the call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<i32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InotifyWatch {
    pub wd: i32,
    pub mask: u32,
    /// The watched inode's path, found from its file handle at checkpoint.
    pub path: String,
    /// A watch on a deleted file: the file, made again at restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted: Option<DeletedFileImage>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtyState {
    pub index: u32,
    /// The slave's terminal settings and window size.
    pub termios: Termios,
    pub winsize: [u16; 4],
    /// Still locked (`unlockpt` not called).
    pub locked: bool,
    /// Output of the slave not yet read on the master side.
    pub data: Option<Hash>,
    /// The master is in packet mode (`TIOCPKT`).
    #[serde(default)]
    pub packet: bool,
    /// The slave's mode (permission bits) and owner (`/dev/pts/N`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slave_file: Option<SocketFile>,
}

/// `struct termios` as `tcgetattr` gives it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Termios {
    pub iflag: u32,
    pub oflag: u32,
    pub cflag: u32,
    pub lflag: u32,
    pub line: u8,
    pub cc: Vec<u8>,
    pub ispeed: u32,
    pub ospeed: u32,
}

/// Socket options kept across a restart.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SockOpts {
    /// `SO_RCVBUF`/`SO_SNDBUF` as `getsockopt` reports them, when the
    /// program set them (not the defaults).
    #[serde(default)]
    pub rcvbuf: Option<i32>,
    #[serde(default)]
    pub sndbuf: Option<i32>,
    #[serde(default)]
    pub passcred: bool,
    #[serde(default)]
    pub reuseaddr: bool,
    #[serde(default)]
    pub keepalive: bool,
    /// TCP_NODELAY.
    #[serde(default)]
    pub nodelay: bool,
    /// `IPV6_V6ONLY` of an IPv6 socket (None for other families): set
    /// before the bind, since a dual-stack `[::]:P` and `0.0.0.0:P` of the
    /// same program (Open MPI's TCP BTL) cannot both be bound without it.
    #[serde(default)]
    pub v6only: Option<bool>,
}

/// A unix socket. Two sockets connected to each other (`peer` names the
/// other's `ino`) are one connected pair again after a restart.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnixSocketImage {
    /// The network namespace it lived in (inode of `/proc/PID/ns/net`).
    pub netns: u64,
    pub ino: u64,
    /// `SOCK_STREAM`, `SOCK_DGRAM` or `SOCK_SEQPACKET`.
    pub ty: i32,
    /// The `sun_path` bytes it was bound to (an abstract name starts with
    /// a NUL).
    pub name: Option<Vec<u8>>,
    /// Listening, with this backlog.
    pub listen_backlog: Option<u32>,
    /// The socket it is connected to (0: none).
    pub peer: u64,
    /// The peer's name, if it had one.
    pub peer_name: Option<Vec<u8>>,
    /// A stream or seqpacket socket whose peer was closed already: reads
    /// give what was in flight, then end of file.
    pub peer_gone: bool,
    /// The bytes in its receive queue, in order.
    pub data: Option<Hash>,
    /// Datagram and seqpacket sockets: the length of each message in
    /// `data` (their boundaries are kept).
    pub messages: Vec<u32>,
    pub opts: SockOpts,
    /// The socket file of a path name: mode (permission bits) and owner,
    /// made again after the bind at restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<SocketFile>,
    /// `shutdown()` state (`sk_shutdown`: 1 reads, 2 writes shut down).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub shutdown: u8,
}

fn is_zero(v: &u8) -> bool {
    *v == 0
}

/// Mode and owner of a bound unix socket's file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketFile {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// A UDP socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UdpSocketImage {
    /// The network namespace it lived in (inode of `/proc/PID/ns/net`).
    pub netns: u64,
    pub ino: u64,
    /// Its local address (port 0: not bound).
    pub local: std::net::SocketAddr,
    /// The address it is connected to, if any.
    pub peer: Option<std::net::SocketAddr>,
    /// The datagrams in its receive queue, concatenated, and per datagram
    /// its sender and length.
    pub data: Option<Hash>,
    pub messages: Vec<(std::net::SocketAddr, u32)>,
    pub opts: SockOpts,
}

/// A TCP socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpSocketImage {
    /// The network namespace it lived in (inode of `/proc/PID/ns/net`).
    pub netns: u64,
    pub ino: u64,
    /// Its local address (port 0: not bound).
    pub local: std::net::SocketAddr,
    pub state: TcpState,
    pub opts: SockOpts,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TcpState {
    /// Not connected (maybe bound).
    Closed,
    /// Listening; connections not accepted yet are not kept.
    Listen { backlog: u32 },
    /// A connection, recreated with `TCP_REPAIR`.
    Established(TcpConnImage),
}

/// An established connection as `TCP_REPAIR` reads and writes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpConnImage {
    pub peer: std::net::SocketAddr,
    /// Sequence number of the first byte of the send queue (the oldest
    /// unacknowledged one).
    pub send_seq: u32,
    /// Sequence number of the first byte of the receive queue (the next
    /// one the program reads).
    pub recv_seq: u32,
    /// Send queue: unacknowledged bytes, then `unsent` never sent ones.
    pub send: Option<Hash>,
    pub send_len: u32,
    pub unsent: u32,
    /// Receive queue: received, not read by the program.
    pub recv: Option<Hash>,
    pub recv_len: u32,
    pub mss: u32,
    pub snd_wscale: u8,
    pub rcv_wscale: u8,
    pub sack: bool,
    pub timestamps: bool,
    /// `TCP_TIMESTAMP`: the connection's timestamp clock.
    pub tsval: u32,
    pub window: TcpWindow,
}

/// `struct tcp_repair_window`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpWindow {
    pub snd_wl1: u32,
    pub snd_wnd: u32,
    pub max_window: u32,
    pub rcv_wnd: u32,
    pub rcv_wup: u32,
}

/// One mapping of the address space.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionImage {
    pub start: u64,
    pub end: u64,
    /// PROT_READ | PROT_WRITE | PROT_EXEC bits.
    pub prot: u32,
    pub kind: RegionKind,
    /// Backing file (file mappings), or the kernel's name (`[heap]`, ...).
    pub name: String,
    pub offset: u64,
    /// Shared memory: the inode of the object mapped (regions of the
    /// computation with the same one share their memory after a restart).
    #[serde(default)]
    pub shm: u64,
    /// A mapping of a SysV segment (`shmat`): attached again with `shmat`
    /// at the same address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sysv: Option<SysvAttach>,
    /// Top level of the chunk-list tree; empty when the region has no
    /// recorded content.
    pub segments: Vec<Hash>,
    /// Inner levels of the tree below `segments`.
    #[serde(default)]
    pub depth: u32,
    /// Mapped with `MAP_NORESERVE` (VmFlags `nr`): a reservation of more
    /// than the machine could commit, mapped again the same way. Recorded
    /// for private anonymous mappings of [`NORESERVE_MIN`] and more.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub noreserve: bool,
    /// A private mapping of a file that is mapped again at restart: the
    /// chunk list then holds only the pages the process changed (its
    /// copy-on-write pages); a chunk it does not list is the file's.
    /// `None`: every page is in the chunk list (anonymous memory, or a
    /// file that could not be identified at the checkpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<MappedFile>,
    /// The `VmFlags` of `madvise`/`mlock` it had (`dc`, `wf`, `hg`, `nh`,
    /// `dd`, `mg`, `lo`), set again at restart ([`crate::memattrs`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attrs: Vec<String>,
    /// A POSIX shared memory object's size (`st_size`) at the checkpoint,
    /// which need not be a whole number of pages (Open MPI's vader
    /// segments are 4 MiB + 8 bytes): the restart gives the object that
    /// size again rather than the end of its last mapping.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shm_size: Option<u64>,
}

/// What identifies the file under a private file mapping: a restart maps
/// the file at the region's `name` again only if it is still this file.
/// Inode numbers are left out on purpose: a restart on another machine
/// with the same packages installed maps the same libraries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappedFile {
    pub size: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: i64,
    /// BLAKE3 of the file's first [`MAPPED_FILE_HEAD`] bytes (an ELF file's
    /// headers and build id are there).
    pub head: Hash,
}

/// How much of a mapped file its identity hashes.
pub const MAPPED_FILE_HEAD: u64 = 64 << 10;

/// Private anonymous mappings at least this large have their
/// `MAP_NORESERVE` recorded (reading VmFlags costs a walk of `smaps`; below
/// this size the flag changes only the kernel's commit accounting).
pub const NORESERVE_MIN: u64 = 1 << 30;

/// How a region maps a SysV segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SysvAttach {
    pub shmid: i32,
    /// Attached with `SHM_RDONLY` (the mapping may never be made writable).
    pub rdonly: bool,
}

/// A SysV shared memory segment, as `/proc/sysvipc/shm` shows it. Its
/// content is in the regions that map it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SysvShm {
    pub shmid: i32,
    /// `IPC_PRIVATE` (0) for a private segment, and for one marked for
    /// removal.
    pub key: i32,
    /// Permission bits, with `SHM_DEST` (removed with `IPC_RMID` while
    /// attached) and `SHM_LOCKED`.
    pub mode: u32,
    pub size: u64,
    pub uid: u32,
    pub gid: u32,
}

impl SysvShm {
    pub const SHM_DEST: u32 = 0o1000;
    pub const SHM_LOCKED: u32 = 0o2000;

    /// Marked for removal (`IPC_RMID`) while attached: removed again once
    /// every process has attached it at restart.
    pub fn removed(&self) -> bool {
        self.mode & Self::SHM_DEST != 0
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegionKind {
    /// Private memory (anonymous or a private file mapping): content recorded.
    Private,
    /// `[heap]`: private, and brk's region.
    Heap,
    /// `[stack]`: private and grows down.
    Stack,
    /// Anonymous shared memory: content recorded, restored shared.
    SharedAnon,
    /// Shared file mapping: the file holds the content; remapped.
    SharedFile,
    /// The kernel's vDSO and its data pages: moved, never recorded.
    Vdso,
    Vvar,
    VvarVclock,
}

impl RegionKind {
    pub fn has_content(self) -> bool {
        matches!(self, RegionKind::Private | RegionKind::Heap | RegionKind::Stack | RegionKind::SharedAnon)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentImage {
    pub fd: i32,
    pub restart_word_addr: u64,
    pub ckpt_tid: i32,
}

fn is_zero_i32(v: &i32) -> bool {
    *v == 0
}

impl ProcessImage {
    pub fn logical_bytes(&self) -> u64 {
        self.regions.iter().filter(|r| r.kind.has_content()).map(|r| r.end - r.start).sum()
    }
}

/// A generation's manifest and process images, read from `store`: the
/// named generation, or the latest one.
pub fn load_generation(
    store: &ckpt_store::Store,
    generation: Option<u64>,
) -> crate::Result<(ckpt_store::GenerationInfo, GenerationManifest, Vec<ProcessImage>)> {
    use crate::EngineError;
    let info = match generation {
        Some(g) => store.generation(g)?,
        None => store.latest()?.ok_or_else(|| EngineError::Restore {
            generation: 0,
            what: format!("the store {} has no generations yet: checkpoint something first", store.root().display()),
        })?,
    };
    let bad = |what: String| EngineError::BadImage { generation: info.id, what };
    let manifest: GenerationManifest =
        serde_json::from_slice(&store.read_blob(&info.manifest)?).map_err(|e| bad(format!("its manifest is not readable ({e})")))?;
    let images = manifest
        .processes
        .iter()
        .map(|p| {
            let img: ProcessImage = serde_json::from_slice(&store.read_blob(&p.image)?)
                .map_err(|e| bad(format!("the image of process {} is not readable ({e})", p.pid)))?;
            check_image(&img).map_err(|what| bad(format!("process {}: {what}; the store may have been tampered with", img.pid)))?;
            Ok(img)
        })
        .collect::<crate::Result<Vec<ProcessImage>>>()?;
    Ok((info, manifest, images))
}

/// Checks what a restart turns into paths and mappings, right after decoding,
/// before any process starts: a region backed by a file names an absolute
/// path with no `.` or `..` component (and no NUL); one under `/dev/shm/`
/// names exactly one component there (a POSIX shm object). Kernel names
/// (`[heap]`, `[stack]`, ...) and anonymous regions (empty) pass.
///
/// Also the geometry a restart turns into `mmap` calls and object sizes:
/// each region is page-aligned, non-empty and below the top of the user
/// address space, and its file offset plus its length does not overflow.
pub fn check_image(img: &ProcessImage) -> Result<(), String> {
    use crate::remote::PAGE;
    // x86-64's 47-bit user address space (the vsyscall page is never in an image).
    const USER_TOP: u64 = 1 << 47;
    for r in &img.regions {
        let n = r.name.as_str();
        if r.start >= r.end || r.start % PAGE != 0 || r.end % PAGE != 0 || r.end > USER_TOP {
            return Err(format!("region {:#x}-{:#x} ({n:?}) is not a page-aligned, non-empty range of user addresses", r.start, r.end));
        }
        if r.offset % PAGE != 0 || r.offset.checked_add(r.end - r.start).is_none_or(|e| e > i64::MAX as u64) {
            return Err(format!("region {:#x}-{:#x} ({n:?}) has file offset {:#x}, not page-aligned or past what a file can hold", r.start, r.end, r.offset));
        }
        let bad = |why: &str| Err(format!("region {:#x}-{:#x} names {n:?}, which {why}", r.start, r.end));
        if n.contains('\0') {
            return bad("holds a NUL byte");
        }
        if !n.starts_with('/') {
            continue;
        }
        // The kernel appends " (deleted)" to a removed file's name.
        let path = n.strip_suffix(" (deleted)").unwrap_or(n);
        if path.split('/').any(|c| c == ".." || c == ".") {
            return bad("has a . or .. component");
        }
        if let Some(obj) = path.strip_prefix("/dev/shm/")
            && (obj.is_empty() || obj.contains('/'))
        {
            return bad("is not one object directly under /dev/shm");
        }
    }
    Ok(())
}

/// The processes of a generation that restart on host `here`: those whose
/// recorded host, renamed by `host_map` (old name → new name), is `here`.
/// A generation whose processes all ran on one host restarts whole on any
/// host (a computation moved to a new machine); for a generation spread
/// over several hosts, `ckpt restart` runs on each of them.
pub fn select_host(generation: u64, images: Vec<ProcessImage>, here: &str, host_map: &[(String, String)]) -> crate::Result<Vec<ProcessImage>> {
    let mapped = |h: &str| host_map.iter().find(|(old, _)| old == h).map(|(_, new)| new.clone()).unwrap_or_else(|| h.to_string());
    let mut hosts: Vec<String> = images.iter().map(|i| mapped(&i.host)).collect();
    hosts.sort();
    hosts.dedup();
    if hosts.len() <= 1 {
        return Ok(images);
    }
    let chosen: Vec<ProcessImage> = images.into_iter().filter(|i| mapped(&i.host) == here).collect();
    if chosen.is_empty() {
        return Err(crate::EngineError::Restore {
            generation,
            what: format!(
                "no process of it ran on host {here:?}; it spans hosts {}: run `ckpt restart --host NAME` on each of them, or map old hosts to new ones with --host-map OLD=NEW",
                hosts.join(", ")
            ),
        });
    }
    Ok(chosen)
}

#[cfg(test)]
mod name_tests {
    use super::*;

    fn with_region(name: &str) -> ProcessImage {
        let mut img: ProcessImage = serde_json::from_value(serde_json::json!({
            "version": 1, "pid": 1, "ppid": 0, "host": "h", "exe": "/bin/x", "comm": "x", "cmdline": [], "cwd": "/",
            "umask": 18, "rlimits": [], "mm": MmFields::default(), "auxv": [], "threads": [], "sigactions": [], "itimers": [],
            "fds": [], "regions": [], "agent": {"fd": 0, "restart_word_addr": 0, "ckpt_tid": 0}, "chunk_size": 4096
        }))
        .unwrap_or_else(|e| panic!("test image: {e}"));
        img.regions.push(RegionImage { start: 0x1000, end: 0x2000, prot: 3, kind: RegionKind::SharedFile, name: name.into(), offset: 0, shm: 0, sysv: None, segments: vec![], depth: 0, noreserve: false, file: None, attrs: vec![], shm_size: None });
        img
    }

    #[test]
    fn region_names() {
        for ok in ["", "[heap]", "/usr/lib/libc.so.6", "/dev/shm/obj", "/dev/shm/obj (deleted)", "/memfd:x (deleted)"] {
            assert!(check_image(&with_region(ok)).is_ok(), "{ok:?} refused");
        }
        for bad in ["/dev/shm/../../etc/passwd", "/dev/shm/a/b", "/dev/shm/", "/tmp/./x", "/a\0b"] {
            let e = check_image(&with_region(bad)).expect_err(bad);
            assert!(e.contains(bad.split('\0').next().unwrap_or("")), "{e}");
        }
    }

    #[test]
    fn region_geometry() {
        let cases: [(u64, u64, u64); 6] =
            [(0x2000, 0x1000, 0), (0x1000, 0x1000, 0), (0x1001, 0x2000, 0), (0x1000, 1 << 48, 0), (0x1000, 0x2000, 12), (0x1000, 0x2000, u64::MAX - 0xfff)];
        for (start, end, offset) in cases {
            let mut img = with_region("/dev/shm/obj");
            img.regions[0].start = start;
            img.regions[0].end = end;
            img.regions[0].offset = offset;
            let e = check_image(&img).expect_err("a bad range is refused");
            assert!(e.contains(&format!("{start:#x}-{end:#x}")), "{e}");
        }
    }
}
