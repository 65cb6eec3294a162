//! The agent's own fds (its coordinator connection and its userfaultfd),
//! kept out of the program's way and never mistaken for the program's.
//!
//! They sit at [`ckpt_wire::agent::AGENT_FD_BASE`] and up, close-on-exec.
//! The program cannot see them through libc: the wrappers of
//! [`crate::interpose`] (`dup2`, `dup3`, `fcntl`, `close`, `close_range`,
//! `closefrom`) call [`make_room`] before the program takes one of their
//! numbers (the agent's fd moves to another number) and treat them as not
//! open ([`is_agent`]: `EBADF`, as without the agent). A program that
//! replaces one with a raw syscall is caught by [`verify`] at every
//! checkpoint: each fd's identity (`st_dev`/`st_ino`, taken when the agent
//! made it) is checked, and a number that no longer holds the agent's file is
//! the program's from then on.
//!
//! Everything here is raw syscalls on static atomics: async-signal-safe and
//! allocation-free (the wrappers may run in the program's signal handlers,
//! [`verify`] runs with every thread stopped). One window remains: the
//! checkpoint thread loads its connection's number just before a `read`; a
//! program thread moving that number and reusing it in between (a few
//! instructions) would make the agent read the program's file once.

use core::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};

use ckpt_wire::agent::AGENT_FD_BASE;

/// One fd of the agent: its number (-1: none) and the identity of its file.
pub struct Slot {
    fd: AtomicI32,
    dev: AtomicU64,
    ino: AtomicU64,
    /// A wrapper found the number holding another file (and forgot it).
    lost: AtomicBool,
}

impl Slot {
    const fn new() -> Slot {
        Slot { fd: AtomicI32::new(-1), dev: AtomicU64::new(0), ino: AtomicU64::new(0), lost: AtomicBool::new(false) }
    }

    /// The fd's number, or -1.
    pub fn get(&self) -> i32 {
        self.fd.load(Ordering::Acquire)
    }

    /// Takes `fd` as this slot's and remembers its file's identity.
    pub fn set(&self, fd: i32) {
        let (dev, ino) = identity(fd).unwrap_or((0, 0));
        self.dev.store(dev, Ordering::Relaxed);
        self.ino.store(ino, Ordering::Relaxed);
        self.fd.store(fd, Ordering::Release);
    }

    /// Forgets the fd (without closing it); returns the number it had.
    pub fn take(&self) -> i32 {
        self.fd.swap(-1, Ordering::AcqRel)
    }

    /// Whether the number still holds the file the agent put there.
    fn intact(&self) -> bool {
        let fd = self.get();
        fd < 0 || identity(fd) == Some((self.dev.load(Ordering::Relaxed), self.ino.load(Ordering::Relaxed)))
    }

    /// Whether `fd` is this slot's and still holds the agent's file. One
    /// that holds another file now (a raw syscall of the program replaced
    /// it) is forgotten on the spot: the number is the program's.
    fn holds(&self, fd: i32) -> bool {
        if fd < 0 || self.get() != fd {
            return false;
        }
        if self.intact() {
            return true;
        }
        self.lost.store(true, Ordering::Release);
        self.fd.compare_exchange(fd, -1, Ordering::AcqRel, Ordering::Acquire).ok();
        false
    }

    /// Whether the slot's fd was replaced behind the agent's back since the
    /// last call (the slot is cleared then).
    fn replaced(&self) -> bool {
        let lost = self.lost.swap(false, Ordering::AcqRel) || !self.intact();
        if lost {
            self.take();
        }
        lost
    }
}

/// The coordinator connection.
pub static CONN: Slot = Slot::new();
/// The write-protect userfaultfd.
pub static UFFD: Slot = Slot::new();

const SLOTS: [&Slot; 2] = [&CONN, &UFFD];

/// `st_dev`/`st_ino` of what `fd` holds, None if it is not open.
fn identity(fd: i32) -> Option<(u64, u64)> {
    // SAFETY: fstat into a stat buffer we own.
    let mut st: libc::stat = unsafe { core::mem::zeroed() };
    // SAFETY: as above; a raw syscall (our fstat is not interposed, but
    // glibc's may be by others).
    let r = unsafe { libc::syscall(libc::SYS_fstat, fd, &mut st as *mut libc::stat) };
    (r == 0).then_some((st.st_dev, st.st_ino))
}

/// Whether `fd` is one of the agent's (the program does not own it).
/// Costs one `fstat` when `fd` is an agent number, nothing otherwise.
pub fn is_agent(fd: i32) -> bool {
    fd >= 0 && SLOTS.iter().any(|s| s.holds(fd))
}

/// Moves `fd` to a new number at or above [`AGENT_FD_BASE`] (close-on-exec)
/// and closes the old one. Returns the new number, or -1.
pub fn move_high(fd: i32, at_least: i32) -> i32 {
    // SAFETY: raw fcntl/close on an fd we own.
    unsafe {
        let high = libc::syscall(libc::SYS_fcntl, fd, libc::F_DUPFD_CLOEXEC, at_least.max(AGENT_FD_BASE)) as i32;
        libc::syscall(libc::SYS_close, fd);
        high
    }
}

/// The agent's fds now (each checked by identity; -1 for none).
pub fn current() -> [i32; 2] {
    SLOTS.map(|s| if is_agent(s.get()) { s.get() } else { -1 })
}

/// Frees number `fd` for the program if an agent fd holds it: that fd
/// moves to the first free number above. Returns false if it could not
/// (the program's call then fails with `EMFILE`, as if the table were full).
pub fn make_room(fd: i32) -> bool {
    for s in SLOTS {
        if s.holds(fd) {
            // SAFETY: raw fcntl on our own fd; the new number holds the same file.
            let high = unsafe { libc::syscall(libc::SYS_fcntl, fd, libc::F_DUPFD_CLOEXEC, fd + 1) } as i32;
            if high < 0 {
                return false;
            }
            s.fd.store(high, Ordering::Release);
            // SAFETY: the old number is ours and no longer named anywhere.
            unsafe { libc::syscall(libc::SYS_close, fd) };
        }
    }
    true
}

/// Puts the result `r` of a lowest-free-number call (`dup`, `F_DUPFD` with
/// `min`) where the program expects it: the kernel skipped the agent's fds,
/// but in the program's view their numbers are free. If an agent fd sits in
/// `[min, r)`, it moves away and `r` moves to its number. Costs nothing
/// when no agent fd is skipped (the usual case). Returns the number the
/// program gets.
pub fn lowest(r: i32, min: i32, cloexec: bool) -> i32 {
    if r < 0 {
        return r;
    }
    let Some(a) = SLOTS.iter().map(|s| s.get()).filter(|&a| a >= min.max(0) && a < r && is_agent(a)).min() else { return r };
    if !make_room(a) {
        return r;
    }
    let flags = if cloexec { libc::O_CLOEXEC } else { 0 };
    // SAFETY: raw dup3/close on fds the program just got and one we freed.
    unsafe {
        if libc::syscall(libc::SYS_dup3, r, a, flags) != a as i64 {
            return r;
        }
        libc::syscall(libc::SYS_close, r);
    }
    a
}

/// What [`verify`] found.
pub struct Verified {
    /// The connection's number no longer holds the agent's socket.
    pub conn_lost: bool,
    /// The userfaultfd's number no longer holds it (the slot was cleared).
    pub uffd_lost: bool,
}

/// Checks by identity that the agent's fds are still its own (a program's
/// raw `dup2`/`close` is not seen by the wrappers). A slot whose number now
/// holds something else is forgotten, never closed: that fd is the
/// program's. Raw syscalls only.
pub fn verify() -> Verified {
    Verified { conn_lost: CONN.replaced(), uffd_lost: UFFD.replaced() }
}

/// Writes `msg` to stderr (raw, no allocation).
pub fn warn(msg: &[u8]) {
    // SAFETY: write of a buffer we own to fd 2.
    unsafe { libc::syscall(libc::SYS_write, 2, msg.as_ptr(), msg.len()) };
}
