//! The agent protocol: `libckpt_preload.so` (the agent, one per process)
//! and the coordinator, over a stream socket (Unix or TCP).
//!
//! Every message is a [`Header`] followed by `Header::len` payload bytes.
//! The agent speaks first ([`Hello`]); afterwards the coordinator drives:
//!
//! ```text
//! agent                         coordinator
//!   HELLO ------------------------->
//!   <------------------------- WELCOME
//!   ...                                      (the program runs)
//!   <------------------------- CHECKPOINT    (generation)
//!   (suspend every thread, park them in the signal handler)
//!   SUSPENDED + ThreadState[n] ---->         (or FAILED, and resume)
//!                                            (coordinator reads /proc and memory)
//!   <------------------------- RESUME        (written or aborted)
//!   (release the threads)
//!   RESUMED {released_ns} ---------->
//! ```
//!
//! After a restart the agent's checkpoint thread returns from the middle of
//! this exchange on a fresh connection (placed at the same fd number by the
//! restart driver) and says HELLO again with `restored_gen` set.

use crate::{ItimerVal, KernelSigaction, Pod};

/// First word of every header.
pub const MAGIC: u32 = 0x434b_5054; // "CKPT"
/// Protocol version carried in [`Hello`].
/// 4: PREPARE/PREPARED, ROUND_DONE, CHECKPOINT_NOW/NOW_DONE (hooks).
pub const VERSION: u32 = 4;
/// The signal the agent uses to stop threads (SIGRTMAX - 2). The
/// application can neither handle nor block it.
pub const CKPT_SIGNAL: i32 = 62;
/// Most threads one process can have at a checkpoint.
pub const MAX_THREADS: usize = 4096;
/// Largest payload of a frame an agent sends: a SUSPENDED with the
/// checkpoint thread and [`MAX_THREADS`] parked threads. The coordinator
/// refuses a longer frame before allocating anything for it.
pub const MAX_PAYLOAD: usize = core::mem::size_of::<Suspended>() + (MAX_THREADS + 1) * core::mem::size_of::<ThreadState>();
/// Largest payload the coordinator sends an agent: a REGISTER or FORK
/// [`RangeList`] of [`MAX_RANGES`] ranges.
pub const MAX_REQUEST_PAYLOAD: usize = core::mem::size_of::<RangeList>() + MAX_RANGES * 16;
/// The agent moves its coordinator socket to the first free fd at or above
/// this number, out of the program's way.
pub const AGENT_FD_BASE: i32 = 800;
/// Environment variable naming the coordinator (`unix:PATH` or `tcp:HOST:PORT`).
pub const ENV_COORD: &str = "CKPT_COORD";
/// Environment variable: the computation's membership key (64 hex digits),
/// set by `ckpt launch`. An agent whose process runs as another user than
/// the coordinator (a program that dropped privileges) proves with it that
/// it belongs to the computation; over TCP it is the agent's pre-shared key.
/// It is derived from the coordinator's secret and grants nothing else.
pub const ENV_AGENT_KEY: &str = "CKPT_AGENT_KEY";
/// Environment variable: the abstract Unix socket (name without the
/// leading NUL) an agent joins through when the coordinator's private
/// socket is out of its reach (its process changed uid), set by `ckpt
/// launch` for Unix coordinators.
pub const ENV_MEMBER_SOCK: &str = "CKPT_MEMBER_SOCK";
/// Environment variable: the coordinator's uid. An agent joining through
/// the member socket talks only to a listener of that uid or root
/// (`SO_PEERCRED`), so nobody can pose as the coordinator there.
pub const ENV_COORD_UID: &str = "CKPT_COORD_UID";

/// Message kinds.
pub mod kind {
    pub const HELLO: u32 = 1;
    pub const WELCOME: u32 = 2;
    pub const CHECKPOINT: u32 = 3;
    pub const SUSPENDED: u32 = 4;
    pub const FAILED: u32 = 5;
    pub const RESUME: u32 = 6;
    pub const RESUMED: u32 = 7;
    /// Coordinator → agent while stopped: register these ranges for
    /// write-protect tracking ([`super::RangeList`]).
    pub const REGISTER: u32 = 8;
    /// Agent → coordinator: [`super::Registered`].
    pub const REGISTERED: u32 = 9;
    /// Coordinator → agent while stopped: fork a copy-on-write snapshot,
    /// leaving out the mappings of its [`super::RangeList`] payload.
    pub const FORK: u32 = 10;
    /// Agent → coordinator: [`super::Forked`].
    pub const FORKED: u32 = 11;
    /// Coordinator → agent while stopped: read these POSIX timers
    /// ([`super::TimerList`]: a count, then that many `i32` timer ids).
    pub const TIMERS: u32 = 12;
    /// Agent → coordinator: one [`super::TimerValue`] per id asked, in order.
    pub const TIMER_VALUES: u32 = 13;
    /// Coordinator → agent, the program running, before CHECKPOINT: run
    /// the pre-checkpoint callbacks ([`super::Prepare`]). Sent only to
    /// agents of version 4 or later.
    pub const PREPARE: u32 = 14;
    /// Agent → coordinator: the callbacks returned 0 (no payload); FAILED
    /// (with the hook's name) otherwise.
    pub const PREPARED: u32 = 15;
    /// Coordinator → agent, after a round whose PREPARE this agent
    /// answered: committed or not ([`super::Resume`] layout). The agent runs
    /// its post-checkpoint callbacks, its threads running.
    pub const ROUND_DONE: u32 = 16;
    /// Agent → coordinator, any time outside a round: the program asks for
    /// a checkpoint of the computation (`ckpt_checkpoint_now`); no payload.
    pub const CHECKPOINT_NOW: u32 = 17;
    /// Coordinator → agent: the answer to CHECKPOINT_NOW ([`super::NowDone`]),
    /// once the generation is committed or the round failed.
    pub const NOW_DONE: u32 = 18;
}

/// Environment variable: `auto`, `soft-dirty`, `uffd-wp` or `scan`.
pub const ENV_TRACKING: &str = "CKPT_DIRTY_TRACKING";
/// Environment variable: `1` disables forked checkpointing.
pub const ENV_NO_FORK: &str = "CKPT_NO_FORK";

/// Dirty-tracking backends, as requested in [`Hello::tracking`].
pub mod tracking {
    pub const AUTO: u32 = 0;
    pub const SOFT_DIRTY: u32 = 1;
    pub const UFFD_WP: u32 = 2;
    pub const SCAN: u32 = 3;
}

/// [`Hello::flags`]: the process asked not to be checkpointed by fork.
pub const HELLO_NO_FORK: u64 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub magic: u32,
    pub kind: u32,
    pub len: u32,
    pub _pad: u32,
}
// SAFETY: repr(C), four u32, no padding.
unsafe impl Pod for Header {}

impl Header {
    pub fn new(kind: u32, len: usize) -> Self {
        Header { magic: MAGIC, kind, len: len as u32, _pad: 0 }
    }

    /// The payload length, once the magic is `magic` and the length at
    /// most `max`: checked before anything is allocated for the payload.
    pub fn payload_len(&self, magic: u32, max: usize) -> Result<usize, FrameError> {
        if self.magic != magic {
            return Err(FrameError::BadMagic(self.magic));
        }
        let len = self.len as usize;
        if len > max {
            return Err(FrameError::TooLong { kind: self.kind, len: self.len, max });
        }
        Ok(len)
    }
}

/// Why a frame header is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// The first word is not this protocol's.
    BadMagic(u32),
    /// The payload would be longer than any legitimate message.
    TooLong { kind: u32, len: u32, max: usize },
}

impl core::fmt::Display for FrameError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            FrameError::BadMagic(m) => write!(f, "a frame with magic {m:#010x}, not this protocol's"),
            FrameError::TooLong { kind, len, max } => write!(f, "a frame of kind {kind} claiming {len} payload bytes (at most {max})"),
        }
    }
}

/// Agent → coordinator, first message on a connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    pub version: u32,
    pub pid: i32,
    pub ppid: i32,
    /// TID of the agent's checkpoint thread.
    pub ckpt_tid: i32,
    /// The fd of this connection inside the process (excluded from the image).
    pub agent_fd: i32,
    pub signal: i32,
    /// 0 on a fresh start; the generation restored from after a restart.
    pub restored_gen: u64,
    /// Address of the agent's restart word (the driver writes the restored
    /// generation there).
    pub restart_word_addr: u64,
    pub flags: u64,
    /// The agent's userfaultfd (write-protect tracking), or -1.
    pub uffd_fd: i32,
    /// Requested backend ([`tracking`]).
    pub tracking: u32,
    /// Inode of the process's PID namespace (`/proc/self/ns/pid`) and of
    /// its network namespace; 0 if unknown (agents of version 1).
    pub pidns: u64,
    pub netns: u64,
    /// The host's name (`gethostname`, NUL-padded).
    pub host: [u8; 64],
    /// The running kernel's boot id (`/proc/sys/kernel/random/boot_id`):
    /// with `pidns` it tells whether the coordinator can reach the process
    /// through its own `/proc`.
    pub boot_id: [u8; 40],
    /// The computation's membership key (`CKPT_AGENT_KEY`, from `ckpt
    /// launch`): what lets a process of another user than the
    /// coordinator's register. Zero if the agent has none (version < 3).
    pub key: [u8; 32],
}
// SAFETY: repr(C), fields laid out without padding (4*6 + 8*3 + 4*2 + 8*2
// + 64 + 40 + 32, all at their natural alignment).
unsafe impl Pod for Hello {}

impl Default for Hello {
    fn default() -> Self {
        Hello {
            version: 0,
            pid: 0,
            ppid: 0,
            ckpt_tid: 0,
            agent_fd: 0,
            signal: 0,
            restored_gen: 0,
            restart_word_addr: 0,
            flags: 0,
            uffd_fd: 0,
            tracking: 0,
            pidns: 0,
            netns: 0,
            host: [0; 64],
            boot_id: [0; 40],
            key: [0; 32],
        }
    }
}

impl Hello {
    /// A HELLO payload, also the shorter one of version-1 agents (restored
    /// from old images): missing fields read as zero.
    pub fn parse(payload: &[u8]) -> Option<Hello> {
        let mut full = [0u8; core::mem::size_of::<Hello>()];
        if payload.len() < 56 {
            return None;
        }
        let n = payload.len().min(full.len());
        full[..n].copy_from_slice(&payload[..n]);
        Hello::read_from(&full)
    }

    /// The host name, or "" if the agent did not say.
    pub fn host_name(&self) -> &str {
        let end = self.host.iter().position(|&b| b == 0).unwrap_or(self.host.len());
        core::str::from_utf8(&self.host[..end]).unwrap_or("")
    }
}

/// Coordinator → agent, answer to [`Hello`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Welcome {
    pub ok: u32,
    pub _pad: u32,
    pub last_gen: u64,
}
// SAFETY: repr(C), no padding.
unsafe impl Pod for Welcome {}

/// Coordinator → agent: stop every thread for generation `generation`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckpointRequest {
    pub generation: u64,
    pub flags: u64,
}
// SAFETY: repr(C), no padding.
unsafe impl Pod for CheckpointRequest {}

/// Per-thread state saved by the thread itself inside the checkpoint
/// signal handler. Everything else (general and FPU registers, signal mask,
/// alternate stack) is in the kernel's signal frame at `ucontext`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadState {
    pub tid: i32,
    /// 1 for the agent's checkpoint thread.
    pub is_ckpt_thread: u32,
    /// Address of the `ucontext_t` of the signal frame (the handler's third
    /// argument); `rt_sigreturn` with `rsp` there resumes the thread.
    pub ucontext: u64,
    pub fs_base: u64,
    /// `PR_GET_TID_ADDRESS` (clear-child-tid).
    pub clear_child_tid: u64,
    pub robust_list: u64,
    pub robust_len: u64,
    /// rseq area registered by glibc (0 if none).
    pub rseq_addr: u64,
    pub rseq_len: u32,
    pub rseq_sig: u32,
    /// `PR_GET_SECUREBITS` of the thread (per thread, and not in `/proc`).
    pub securebits: u32,
    pub _pad: u32,
}
// SAFETY: repr(C), i32+u32 then u64s, u32+u32, u32+u32: no padding.
unsafe impl Pod for ThreadState {}

/// Agent → coordinator: every thread is parked. Followed by `nthreads`
/// [`ThreadState`]s.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Suspended {
    pub nthreads: u32,
    /// The stop signal if the process was in a job-control stop
    /// (SIGSTOP, SIGTSTP, SIGTTIN, SIGTTOU) when the checkpoint began and
    /// stays in it; 0 if it was running.
    pub job_stop: i32,
    /// Current program break (`brk(0)`).
    pub brk: u64,
    /// ITIMER_REAL, ITIMER_VIRTUAL, ITIMER_PROF.
    pub itimers: [ItimerVal; 3],
    /// `sigactions[i]` is the action of signal `i + 1` (SIGKILL/SIGSTOP zero).
    pub sigactions: [KernelSigaction; 64],
    /// The agent's own fds now (they move when the program takes their
    /// numbers): its connection and its userfaultfd (-1 if none). None of
    /// the program's. Agents of images older than this field send
    /// [`SUSPENDED_V1_LEN`] bytes before the threads.
    pub agent_fd: i32,
    pub uffd_fd: i32,
}
// SAFETY: repr(C), u32+i32, u64, arrays of Pod, two i32: no padding.
unsafe impl Pod for Suspended {}

/// Size of a [`Suspended`] without `agent_fd`/`uffd_fd` (older agents).
pub const SUSPENDED_V1_LEN: usize = core::mem::size_of::<Suspended>() - 8;

/// Agent → coordinator: the checkpoint could not be taken here.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Failed {
    pub errno: i32,
    pub len: u32,
    pub text: [u8; 240],
}
// SAFETY: repr(C), no padding.
unsafe impl Pod for Failed {}

impl Failed {
    /// The message text.
    pub fn message(&self) -> &[u8] {
        &self.text[..(self.len as usize).min(self.text.len())]
    }
}

/// Coordinator → agent: release the threads.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resume {
    /// [`OUTCOME_WRITTEN`] or [`OUTCOME_ABORTED`].
    pub outcome: u32,
    pub _pad: u32,
    pub generation: u64,
}
// SAFETY: repr(C), no padding.
unsafe impl Pod for Resume {}

/// Agent → coordinator, once its threads are released (an older agent
/// sends RESUMED without a payload).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resumed {
    /// `CLOCK_MONOTONIC` (ns) when the agent let its threads go: the end
    /// of the program's stop, which the round's downtime counts to.
    pub released_ns: u64,
}
// SAFETY: repr(C), one u64.
unsafe impl Pod for Resumed {}

/// Header of a REGISTER or FORK payload, followed by `count` `[start, end)` pairs of u64.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RangeList {
    pub count: u32,
    pub _pad: u32,
}
// SAFETY: repr(C), two u32.
unsafe impl Pod for RangeList {}

/// Most ranges in one REGISTER message.
pub const MAX_RANGES: usize = 65536;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Registered {
    pub registered: u32,
    pub failed: u32,
}
// SAFETY: repr(C), two u32.
unsafe impl Pod for Registered {}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Forked {
    /// PID of the snapshot process (0 on failure).
    pub pid: i32,
    pub errno: i32,
}
// SAFETY: repr(C), two i32.
unsafe impl Pod for Forked {}

/// Most POSIX timers a checkpoint records per process.
pub const MAX_TIMERS: usize = 4096;

/// Header of a TIMERS request; `count` `i32` ids follow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimerList {
    pub count: u32,
    pub _pad: u32,
}
// SAFETY: repr(C), two u32.
unsafe impl Pod for TimerList {}

/// One POSIX timer as the process sees it (`timer_gettime`,
/// `timer_getoverrun`). `errno` is nonzero when the timer could not be read
/// (the id is not the process's).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimerValue {
    pub id: i32,
    pub errno: i32,
    pub overrun: i32,
    pub _pad: i32,
    pub interval_sec: i64,
    pub interval_nsec: i64,
    /// Time left until it fires (relative), zero if disarmed.
    pub value_sec: i64,
    pub value_nsec: i64,
}
// SAFETY: repr(C), four i32 and four i64, no padding.
unsafe impl Pod for TimerValue {}

/// Coordinator → agent: run the pre-checkpoint callbacks, each within
/// `timeout_ms` (the program's threads all run meanwhile).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Prepare {
    pub timeout_ms: u64,
    pub _reserved: u64,
}
// SAFETY: repr(C), two u64.
unsafe impl Pod for Prepare {}

/// Coordinator → agent: how a checkpoint the program asked for ended.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NowDone {
    /// 1: committed as `generation`; 0: failed, `text` says why.
    pub ok: u32,
    pub len: u32,
    pub generation: u64,
    pub text: [u8; 240],
}
// SAFETY: repr(C), u32+u32, u64, bytes: no padding.
unsafe impl Pod for NowDone {}

impl NowDone {
    /// An answer; `text` is cut at 240 bytes (on a character boundary).
    pub fn new(generation: Option<u64>, text: &str) -> NowDone {
        let mut d = NowDone { ok: generation.is_some() as u32, len: 0, generation: generation.unwrap_or(0), text: [0; 240] };
        let mut n = text.len().min(d.text.len());
        while !text.is_char_boundary(n) {
            n -= 1;
        }
        d.text[..n].copy_from_slice(&text.as_bytes()[..n]);
        d.len = n as u32;
        d
    }

    /// The message text.
    pub fn message(&self) -> &[u8] {
        &self.text[..(self.len as usize).min(self.text.len())]
    }
}

pub const OUTCOME_WRITTEN: u32 = 0;
pub const OUTCOME_ABORTED: u32 = 1;

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_are_stable() {
        assert_eq!(size_of::<Header>(), 16);
        assert_eq!(size_of::<Hello>(), 208);
        // A version-1 agent (restored from an older image) sends 56 bytes.
        let old = Hello { version: 1, pid: 42, tracking: 3, ..Default::default() };
        let h = Hello::parse(&old.as_bytes()[..56]).unwrap();
        assert_eq!((h.pid, h.tracking, h.pidns, h.host_name()), (42, 3, 0, ""));
        assert!(Hello::parse(&old.as_bytes()[..40]).is_none());
        assert_eq!(size_of::<ThreadState>(), 72);
        assert_eq!(size_of::<Suspended>(), 16 + 3 * 32 + 64 * 32 + 8);
        assert_eq!(size_of::<Failed>(), 248);
        assert_eq!(MAX_PAYLOAD, 2168 + 4097 * 72);
        assert_eq!(size_of::<TimerValue>(), 48);
        assert_eq!(size_of::<Prepare>(), 16);
        // The agent reads messages outside a round into 256 bytes.
        assert_eq!(size_of::<NowDone>(), 256);
        let d = NowDone::new(None, &"é".repeat(200));
        assert_eq!((d.ok, d.len), (0, 240));
        assert!(core::str::from_utf8(d.message()).is_ok());
        // A TIMERS request and its answer fit the frames' caps.
        assert!(size_of::<TimerList>() + MAX_TIMERS * 4 <= MAX_REQUEST_PAYLOAD);
        assert!(MAX_TIMERS * size_of::<TimerValue>() <= MAX_PAYLOAD);
    }

    #[test]
    fn frame_lengths_are_capped() {
        let h = Header::new(kind::SUSPENDED, MAX_PAYLOAD);
        assert_eq!(h.payload_len(MAGIC, MAX_PAYLOAD), Ok(MAX_PAYLOAD));
        let h = Header { len: u32::MAX, ..h };
        assert_eq!(h.payload_len(MAGIC, MAX_PAYLOAD), Err(FrameError::TooLong { kind: kind::SUSPENDED, len: u32::MAX, max: MAX_PAYLOAD }));
        assert_eq!(Header { magic: 7, ..h }.payload_len(MAGIC, MAX_PAYLOAD), Err(FrameError::BadMagic(7)));
    }

    #[test]
    fn pod_round_trip() {
        let t = ThreadState { tid: 7, ucontext: 0xdead_beef, rseq_sig: 0x5305_3053, ..Default::default() };
        assert_eq!(ThreadState::read_from(t.as_bytes()), Some(t));
        assert_eq!(ThreadState::read_from(&t.as_bytes()[1..]), None);
    }
}

// ------------------------------------------------- SysV semaphore undo

/// Where the agent's SysV semaphore undo table ([`SemUndoTable`]) lives:
/// this many bytes after the restart word (`Hello::restart_word_addr`), in
/// the preload's static memory. The coordinator reads it from the stopped
/// process (`process_vm_readv`) and, at restart, writes it back.
pub const SEM_UNDO_OFFSET: u64 = 80;
/// Where the lazy-restart word lives: this many bytes after the restart
/// word, after the undo table. A lazy restart (`ckpt restart --lazy`)
/// writes a nonzero token there before the process runs and zero once the
/// last of its memory is in (the page server is done): until then a
/// checkpoint waits (a snapshot fork would not see the pages still to come).
pub const LAZY_OFFSET: u64 = SEM_UNDO_OFFSET + core::mem::size_of::<SemUndoTable>() as u64;
/// How long a checkpoint waits for a lazy restart's fill before it fails.
pub const LAZY_WAIT_SECS: u64 = 120;
/// Most (set, semaphore) pairs a process may hold undo adjustments on.
pub const SEM_UNDO_MAX: usize = 64;

/// One undo adjustment the process holds: what the kernel will add to
/// semaphore `semnum` of set `semid` when the process exits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SemUndoSlot {
    pub semid: i32,
    pub semnum: i32,
    pub adj: i32,
    /// 1 if the slot is in use.
    pub used: u32,
    /// The set's `sem_ctime` when the adjustment was last changed: a later
    /// one means a `SETVAL`/`SETALL` cleared it.
    pub ctime: i64,
}
// SAFETY: repr(C), 4*4 + 8 bytes, no padding.
unsafe impl Pod for SemUndoSlot {}

/// The agent's undo adjustments.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SemUndoTable {
    /// Nonzero once an adjustment did not fit: the checkpoint is refused.
    pub overflow: u32,
    pub _pad: u32,
    pub slots: [SemUndoSlot; SEM_UNDO_MAX],
}
// SAFETY: repr(C), 8 bytes then 24-byte slots, no padding.
unsafe impl Pod for SemUndoTable {}

impl Default for SemUndoTable {
    fn default() -> Self {
        SemUndoTable { overflow: 0, _pad: 0, slots: [SemUndoSlot { semid: 0, semnum: 0, adj: 0, used: 0, ctime: 0 }; SEM_UNDO_MAX] }
    }
}
