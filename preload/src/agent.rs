//! The agent's checkpoint thread: registration with the coordinator and the
//! checkpoint exchange (see [`ckpt_wire::agent`] for the protocol).
//!
//! [`start`] runs in the library constructor, where allocating is fine. From
//! the moment [`checkpoint`] signals the first thread until the threads are
//! released, only raw syscalls on static buffers are used.

use core::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering};

use crate::agentfds;

use ckpt_wire::agent::{
    self as proto, CKPT_SIGNAL, CheckpointRequest, Failed, Forked, Header, Hello, MAX_RANGES, MAX_THREADS, MAX_TIMERS, Prepare, RangeList, Registered, Resume,
    Suspended, ThreadState, TimerList, TimerValue, kind, tracking,
};
use ckpt_wire::{ItimerVal, KernelSigaction, Pod};
use ckpt_wire::restore::{ZONE_END, ZONE_START};

use crate::hooks::{self, SEND_LOCK};
use crate::suspend::{self, CKPT_TID, NEXT_SLOT, PARKED, RELEASE, SLOTS, SUSPENDING};
use crate::channel;
use crate::stopper;
use crate::sys;

/// Its word is written by the restart driver with the generation a process
/// was restored from (unchanged across a plain checkpoint); after it, the
/// keys of a TCP connection the driver placed ([`channel::RestartBlock`]).
#[unsafe(no_mangle)]
pub static CKPT_RESTART_WORD: channel::RestartBlock = channel::RestartBlock::new();
/// Set once the checkpoint thread has registered (or given up).
static REGISTERED: AtomicU32 = AtomicU32::new(0);
/// Outcome of the last exchange (`OUTCOME_*`), set inside the handler.
static OUTCOME: AtomicU32 = AtomicU32::new(proto::OUTCOME_ABORTED);
/// The restorer's zone is still mapped (after a restart, until the next
/// checkpoint: by then no thread can be running restorer code).
static ZONE_MAPPED: AtomicBool = AtomicBool::new(false);

/// Requested tracking backend (`proto::tracking`).
static TRACKING: AtomicU32 = AtomicU32::new(tracking::AUTO);
/// `proto::HELLO_NO_FORK` if forked checkpointing is off for this process.
static HELLO_FLAGS: AtomicU64 = AtomicU64::new(0);
/// The computation's membership key from `CKPT_AGENT_KEY` (zero if none):
/// sent in every HELLO. It lives in the process's memory, so a restored
/// process has it again when it registers after a restart.
static mut AGENT_KEY: [u8; 32] = [0; 32];

/// PID of the snapshot child of the current checkpoint (0 if none).
static SNAPSHOT_PID: AtomicI32 = AtomicI32::new(0);

/// Receive buffer for REGISTER messages (ranges to track).
struct RangeBuf([u8; 8 + MAX_RANGES * 16]);
static mut RANGES: RangeBuf = RangeBuf([0; 8 + MAX_RANGES * 16]);

/// Static scratch for `/proc/self/task` listings and the stopped set. Only
/// the checkpoint thread touches them.
struct Scratch {
    dents: [u8; 16384],
    signaled: [i32; MAX_THREADS],
    nsignaled: usize,
    /// Threads found in this pass, handed to the stopper together.
    batch: [i32; MAX_THREADS],
}
static mut SCRATCH: Scratch = Scratch { dents: [0; 16384], signaled: [0; MAX_THREADS], nsignaled: 0, batch: [0; MAX_THREADS] };

fn scratch() -> &'static mut Scratch {
    // SAFETY: only the checkpoint thread calls this, never re-entrantly.
    unsafe { &mut *core::ptr::addr_of_mut!(SCRATCH) }
}

/// Library constructor: connect, install the handler, start the thread.
pub fn start() {
    crate::interpose::resolve_all();
    let Some(addr) = std::env::var_os(proto::ENV_COORD) else { return };
    let addr = addr.to_string_lossy().into_owned();
    crate::interpose::remember_env();
    crate::interpose::remember_own_path();
    if let Some(key) = std::env::var(proto::ENV_AGENT_KEY).ok().and_then(|h| parse_key(h.trim())) {
        // SAFETY: the constructor runs before the checkpoint thread exists.
        unsafe { *core::ptr::addr_of_mut!(AGENT_KEY) = key };
    }
    let mode = match std::env::var(proto::ENV_TRACKING).as_deref() {
        Ok("soft-dirty") => tracking::SOFT_DIRTY,
        Ok("uffd-wp") => tracking::UFFD_WP,
        Ok("scan") => tracking::SCAN,
        _ => tracking::AUTO,
    };
    TRACKING.store(mode, Ordering::Relaxed);
    if std::env::var(proto::ENV_NO_FORK).as_deref() == Ok("1") {
        HELLO_FLAGS.store(proto::HELLO_NO_FORK, Ordering::Relaxed);
    }
    lookup_rseq();
    stopper::configure();
    if !suspend::install() {
        eprintln!("ckpt: cannot install the checkpoint signal handler; this process runs without checkpoints");
        return;
    }
    // SAFETY: registering a plain extern "C" fn as the fork child handler.
    unsafe { libc::pthread_atfork(None, None, Some(after_fork_in_child)) };
    join(&addr);
}

/// Connects to the coordinator at `addr`, starts the checkpoint thread and
/// waits until it has registered: the process is part of the computation
/// before the program's `main` runs (or before `fork` returns in a child),
/// so an immediate `ckpt checkpoint` includes it.
fn join(addr: &str) {
    let fd = match connect(addr) {
        Ok(fd) => fd,
        Err(e) => {
            eprintln!("ckpt: cannot reach the coordinator at {addr} ({e}); this process runs without checkpoints. Start one with `ckpt coordinator` or check CKPT_COORD.");
            return;
        }
    };
    agentfds::CONN.set(fd);
    open_uffd();
    // SAFETY: pthread_create with a valid start routine and default attrs
    // but a fixed stack size.
    let ok = unsafe {
        let mut attr: libc::pthread_attr_t = core::mem::zeroed();
        libc::pthread_attr_init(&mut attr);
        libc::pthread_attr_setstacksize(&mut attr, 256 * 1024);
        let mut th: libc::pthread_t = 0;
        let r = libc::pthread_create(&mut th, &attr, thread_main, core::ptr::null_mut());
        libc::pthread_attr_destroy(&mut attr);
        if r == 0 {
            libc::pthread_detach(th);
        }
        r == 0
    };
    if !ok {
        eprintln!("ckpt: cannot start the checkpoint thread; this process runs without checkpoints");
        close_agent();
        return;
    }
    let deadline = sys::now_ns() + 10_000_000_000;
    while REGISTERED.load(Ordering::Acquire) == 0 && sys::now_ns() < deadline {
        sys::futex_wait(&REGISTERED, 0, 50_000_000);
    }
}

/// 64 hex digits → 32 bytes.
fn parse_key(hex: &str) -> Option<[u8; 32]> {
    let b = hex.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut key = [0u8; 32];
    for (i, k) in key.iter_mut().enumerate() {
        *k = digit(b[2 * i])? << 4 | digit(b[2 * i + 1])?;
    }
    Some(key)
}

fn connect(addr: &str) -> std::io::Result<i32> {
    use std::os::fd::IntoRawFd;
    let raw = if let Some(path) = addr.strip_prefix("unix:") {
        channel::off();
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(s) => s.into_raw_fd(),
            // The private socket is out of reach of a process that changed
            // its uid: it joins through the member socket instead.
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => connect_member().ok_or(e)??.into_raw_fd(),
            Err(e) => return Err(e),
        }
    } else if let Some(hp) = addr.strip_prefix("tcp:") {
        let mut s = std::net::TcpStream::connect(hp)?;
        s.set_nodelay(true)?;
        channel::handshake(&mut s, addr).map_err(|e| std::io::Error::new(std::io::ErrorKind::PermissionDenied, e))?;
        s.into_raw_fd()
    } else {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "address must be unix:PATH or tcp:HOST:PORT"));
    };
    let high = agentfds::move_high(raw, proto::AGENT_FD_BASE);
    if high < 0 { Err(std::io::Error::last_os_error()) } else { Ok(high) }
}

/// Connects to the coordinator's member socket ([`proto::ENV_MEMBER_SOCK`]),
/// None if `ckpt launch` named none. The listener must run as the
/// coordinator's user ([`proto::ENV_COORD_UID`]) or root: anyone may bind
/// an abstract name, and nothing is sent to an impostor.
fn connect_member() -> Option<std::io::Result<std::os::unix::net::UnixStream>> {
    use std::os::linux::net::SocketAddrExt;
    let name = std::env::var(proto::ENV_MEMBER_SOCK).ok()?;
    let uid: u32 = std::env::var(proto::ENV_COORD_UID).ok()?.parse().ok()?;
    Some((|| {
        let a = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        let s = std::os::unix::net::UnixStream::connect_addr(&a)?;
        let mut cred: libc::ucred = libc::ucred { pid: 0, uid: u32::MAX, gid: u32::MAX };
        let mut len = core::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: SO_PEERCRED fills a ucred of `len` bytes on our own socket.
        let r = unsafe { libc::getsockopt(std::os::fd::AsRawFd::as_raw_fd(&s), libc::SOL_SOCKET, libc::SO_PEERCRED, (&mut cred as *mut libc::ucred).cast(), &mut len) };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if cred.uid != uid && cred.uid != 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, format!("the member socket @{name} is held by uid {}, not by the coordinator's user (uid {uid})", cred.uid)));
        }
        Ok(s)
    })())
}

/// Creates the write-protect userfaultfd if the requested backend may use
/// it. Async-signal-safe (raw syscalls only): also called after a restart.
fn open_uffd() {
    let mode = TRACKING.load(Ordering::Relaxed);
    if mode != tracking::AUTO && mode != tracking::UFFD_WP {
        return;
    }
    use ckpt_wire::uapi::*;
    // SAFETY: userfaultfd creation and its API handshake on our own fd.
    unsafe {
        let fd = libc::syscall(SYS_USERFAULTFD, libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY) as i32;
        if fd < 0 {
            return;
        }
        let mut ok = false;
        // No WP_UNPOPULATED: its markers on never-touched pages would read as
        // swapped pages in pagemap and cost page tables; a first write to an
        // untouched page shows as written anyway.
        for features in [UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_HUGETLBFS_SHMEM, UFFD_FEATURE_WP_ASYNC] {
            let mut api = UffdioApi { api: UFFD_API, features, ioctls: 0 };
            if libc::syscall(libc::SYS_ioctl, fd, UFFDIO_API, &mut api as *mut UffdioApi) == 0 {
                ok = true;
                break;
            }
        }
        // A failed UFFDIO_API leaves the fd unusable: start over for the next try.
        if !ok {
            libc::syscall(libc::SYS_close, fd);
            return;
        }
        let high = agentfds::move_high(fd, proto::AGENT_FD_BASE);
        if high >= 0 {
            agentfds::UFFD.set(high);
        }
    }
}

/// Registers and write-protects the ranges of a REGISTER message.
fn register_ranges(payload: &[u8]) -> Registered {
    use ckpt_wire::uapi::*;
    let mut r = Registered::default();
    let uffd = agentfds::UFFD.get();
    for (start, end) in ranges(payload) {
        if uffd < 0 || end <= start {
            r.failed += 1;
            continue;
        }
        // Registration only: the coordinator then protects the pages that
        // hold data (PAGEMAP_SCAN). UFFDIO_WRITEPROTECT over the whole
        // range would build page tables for every hole of it: a 2 TiB
        // reservation would cost the program 4 GiB of them.
        let mut reg = UffdioRegister { start, len: end - start, mode: UFFDIO_REGISTER_MODE_WP, ioctls: 0 };
        // SAFETY: an ioctl on our userfaultfd with a struct we own.
        let ok = unsafe { libc::syscall(libc::SYS_ioctl, uffd, UFFDIO_REGISTER, &mut reg as *mut UffdioRegister) == 0 };
        if ok {
            r.registered += 1;
        } else {
            r.failed += 1;
        }
    }
    r
}

/// The `[start, end)` pairs of a [`RangeList`] payload.
fn ranges(payload: &[u8]) -> impl Iterator<Item = (u64, u64)> + '_ {
    let n = RangeList::read_from(payload).map(|l| l.count as usize).unwrap_or(0).min(MAX_RANGES).min(payload.len().saturating_sub(8) / 16);
    (0..n).map(move |i| {
        let off = 8 + i * 16;
        let word = |o: usize| u64::from_le_bytes(payload[o..o + 8].try_into().unwrap_or([0; 8]));
        (word(off), word(off + 8))
    })
}

/// Answers of a TIMERS request. Only the checkpoint thread uses it.
struct TimerBuf([TimerValue; MAX_TIMERS]);
static mut TIMER_VALUES: TimerBuf = TimerBuf([TimerValue { id: 0, errno: 0, overrun: 0, _pad: 0, interval_sec: 0, interval_nsec: 0, value_sec: 0, value_nsec: 0 }; MAX_TIMERS]);

/// Reads the POSIX timers a [`TimerList`] payload names (the coordinator
/// found their ids in `/proc/PID/timers`): time left, interval, overrun.
/// Timer ids belong to the process, so only a thread of it can ask.
/// Async-signal-safe: raw syscalls into a static buffer.
fn read_timers(payload: &[u8]) -> &'static [u8] {
    let n = TimerList::read_from(payload).map(|l| l.count as usize).unwrap_or(0).min(MAX_TIMERS).min(payload.len().saturating_sub(8) / 4);
    // SAFETY: only the checkpoint thread uses TIMER_VALUES, never re-entrantly.
    let out = unsafe { &mut (*core::ptr::addr_of_mut!(TIMER_VALUES)).0 };
    for (i, v) in out.iter_mut().take(n).enumerate() {
        let id = i32::from_le_bytes(payload[8 + 4 * i..12 + 4 * i].try_into().unwrap_or([0; 4]));
        let mut its = [0i64; 4];
        // SAFETY: timer_gettime writes one itimerspec (four i64) into `its`.
        let r = unsafe { libc::syscall(libc::SYS_timer_gettime, id as libc::c_long, its.as_mut_ptr()) };
        // SAFETY: timer_getoverrun takes no pointer.
        let overrun = if r == 0 { unsafe { libc::syscall(libc::SYS_timer_getoverrun, id as libc::c_long) } } else { 0 };
        *v = TimerValue {
            id,
            errno: if r == 0 { 0 } else { sys::errno() },
            overrun: overrun.max(0) as i32,
            _pad: 0,
            interval_sec: its[0],
            interval_nsec: its[1],
            value_sec: its[2],
            value_nsec: its[3],
        };
    }
    // SAFETY: TimerValue is Pod; the first `n` entries as bytes.
    unsafe { core::slice::from_raw_parts(out.as_ptr() as *const u8, n * core::mem::size_of::<TimerValue>()) }
}

/// Forks the copy-on-write snapshot the coordinator reads while the
/// program runs on. The child has exit signal 0, so the program's `wait`
/// never sees it (only `__WALL` would); it closes every fd, blocks every
/// signal and sleeps until the coordinator kills it (or 10 minutes pass).
/// The mappings `payload` lists (a [`RangeList`]: SysV segments, which a
/// copy would count as attached) are left out of the child
/// (`MADV_DONTFORK` around the fork).
fn fork_snapshot(payload: &[u8]) -> Forked {
    let advise = |advice: i32| {
        for (start, end) in ranges(payload) {
            // SAFETY: madvise on whole mappings the coordinator named; it
            // changes only whether fork copies them.
            unsafe { libc::syscall(libc::SYS_madvise, start, end - start, advice) };
        }
    };
    advise(libc::MADV_DONTFORK);
    let f = clone_snapshot();
    advise(libc::MADV_DOFORK);
    f
}

fn clone_snapshot() -> Forked {
    // SAFETY: a fork-like raw clone (no CLONE_VM, exit signal 0); the child
    // only makes raw syscalls and never returns from this function.
    unsafe {
        let pid = libc::syscall(libc::SYS_clone, 0u64, 0u64, 0u64, 0u64, 0u64);
        if pid == 0 {
            libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32);
            let all: u64 = !0;
            libc::syscall(libc::SYS_rt_sigprocmask, libc::SIG_SETMASK, &all as *const u64, 0usize, 8usize);
            let ts = libc::timespec { tv_sec: 1, tv_nsec: 0 };
            for _ in 0..600 {
                libc::syscall(libc::SYS_nanosleep, &ts as *const libc::timespec, 0usize);
            }
            libc::syscall(libc::SYS_exit_group, 0);
        }
        if pid < 0 {
            return Forked { pid: 0, errno: sys::errno() };
        }
        SNAPSHOT_PID.store(pid as i32, Ordering::Release);
        Forked { pid: pid as i32, errno: 0 }
    }
}

/// Reaps the snapshot child once the coordinator has killed it. If the
/// coordinator goes away first, the snapshot is killed here.
///
/// The coordinator kills the snapshot just before RESUME and then waits for
/// RESUMED, so how soon the death is seen is time to commit: the waits
/// between looks grow from 1 ms (a killed snapshot is usually gone within a
/// few) to 100 ms. A fixed 100 ms wait cost every forked checkpoint about
/// 100 ms (an idle process's time to commit, bench-trees).
fn reap_snapshot() {
    let pid = SNAPSHOT_PID.swap(0, Ordering::AcqRel);
    if pid <= 0 {
        return;
    }
    let fd = agentfds::CONN.get();
    let mut wait_ms = 1;
    loop {
        // SAFETY: non-blocking wait for our own clone child (__WALL finds
        // exit-signal-0 children).
        let r = unsafe { libc::syscall(libc::SYS_wait4, pid, 0usize, libc::__WALL | libc::WNOHANG, 0usize) };
        if r != 0 {
            return; // reaped, or gone
        }
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: poll on our own socket; peek one byte without consuming.
        let gone = unsafe {
            libc::poll(&mut pfd, 1, wait_ms) > 0 && {
                let mut b = 0u8;
                pfd.revents & (libc::POLLHUP | libc::POLLERR) != 0
                    || libc::recv(fd, &mut b as *mut u8 as *mut libc::c_void, 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) == 0
            }
        };
        if gone || fd < 0 {
            // SAFETY: killing our own snapshot child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        wait_ms = (wait_ms * 2).min(100);
    }
}

fn lookup_rseq() {
    // SAFETY: dlsym lookups of glibc's exported rseq variables; the values
    // are read once they are known to exist.
    unsafe {
        let off = libc::dlsym(libc::RTLD_DEFAULT, c"__rseq_offset".as_ptr()) as *const isize;
        let size = libc::dlsym(libc::RTLD_DEFAULT, c"__rseq_size".as_ptr()) as *const u32;
        if !off.is_null() && !size.is_null() {
            suspend::RSEQ_OFFSET.store(*off as i64, Ordering::Relaxed);
            suspend::RSEQ_SIZE.store(*size, Ordering::Relaxed);
        }
    }
}

fn close_agent() {
    let fd = agentfds::CONN.take();
    if fd >= 0 {
        // SAFETY: closing our own fd (raw: the `close` wrapper is ours too).
        unsafe { libc::syscall(libc::SYS_close, fd) };
    }
    REGISTERED.store(1, Ordering::Release);
    sys::futex_wake_all(&REGISTERED);
    hooks::coordinator_gone();
}

/// A forked child is a process of the computation of its own: it drops the
/// parent's connection and userfaultfd (which track the parent) and joins
/// the coordinator with a checkpoint thread of its own before `fork`
/// returns. Runs in the child right after `fork` (glibc has reset its locks:
/// allocation and thread creation are allowed there).
extern "C" fn after_fork_in_child() {
    crate::interpose::forget_sem_undo();
    hooks::after_fork_in_child();
    for fd in [agentfds::CONN.take(), agentfds::UFFD.take()] {
        if fd >= 0 {
            // SAFETY: closing the inherited copies of our own fds.
            unsafe { libc::syscall(libc::SYS_close, fd) };
        }
    }
    CKPT_TID.store(0, Ordering::Release);
    REGISTERED.store(0, Ordering::Release);
    SUSPENDING.store(false, Ordering::Release);
    PARKED.store(0, Ordering::Release);
    NEXT_SLOT.store(0, Ordering::Release);
    SNAPSHOT_PID.store(0, Ordering::Release);
    channel::off();
    suspend::reset_mirror();
    if let Some(addr) = std::env::var_os(proto::ENV_COORD) {
        join(&addr.to_string_lossy());
    }
}

/// The program's CHECKPOINT_NOW (the caller holds [`SEND_LOCK`]).
pub fn send_now_request() -> bool {
    send(kind::CHECKPOINT_NOW, &[])
}

fn send(kind: u32, parts: &[&[u8]]) -> bool {
    let fd = agentfds::CONN.get();
    let len: usize = parts.iter().map(|p| p.len()).sum();
    channel::write_parts(fd, Header::new(kind, len).as_bytes(), parts)
}

/// Reads one message; the payload goes to `buf` (truncated to its size,
/// the rest skipped). Returns the kind, or None on EOF/error.
fn recv(buf: &mut [u8]) -> Option<u32> {
    let fd = agentfds::CONN.get();
    let mut hb = [0u8; core::mem::size_of::<Header>()];
    if !channel::read_exact(fd, &mut hb) {
        return None;
    }
    let h = Header::read_from(&hb)?;
    if h.magic != proto::MAGIC {
        return None;
    }
    let mut left = h.len as usize;
    let take = left.min(buf.len());
    if !channel::read_exact(fd, &mut buf[..take]) {
        return None;
    }
    left -= take;
    let mut sink = [0u8; 256];
    while left > 0 {
        let n = left.min(sink.len());
        if !channel::read_exact(fd, &mut sink[..n]) {
            return None;
        }
        left -= n;
    }
    Some(h.kind)
}

fn hello(restored_gen: u64) -> bool {
    let mut h = Hello {
        version: proto::VERSION,
        pid: sys::getpid(),
        // SAFETY: getppid cannot fail.
        ppid: unsafe { libc::getppid() },
        ckpt_tid: CKPT_TID.load(Ordering::Relaxed),
        agent_fd: agentfds::CONN.get(),
        signal: CKPT_SIGNAL,
        restored_gen,
        restart_word_addr: &CKPT_RESTART_WORD.word as *const AtomicU64 as u64,
        flags: HELLO_FLAGS.load(Ordering::Relaxed),
        uffd_fd: agentfds::UFFD.get(),
        tracking: TRACKING.load(Ordering::Relaxed),
        pidns: sys::ns_inode(c"/proc/self/ns/pid"),
        netns: sys::ns_inode(c"/proc/self/ns/net"),
        host: [0; 64],
        boot_id: [0; 40],
        // SAFETY: written only by the constructor, before this thread.
        key: unsafe { *core::ptr::addr_of!(AGENT_KEY) },
    };
    sys::hostname(&mut h.host);
    sys::read_small_file(c"/proc/sys/kernel/random/boot_id", &mut h.boot_id[..36]);
    let mut buf = [0u8; 64];
    send(kind::HELLO, &[h.as_bytes()]) && recv(&mut buf) == Some(kind::WELCOME)
}

extern "C" fn thread_main(_: *mut libc::c_void) -> *mut libc::c_void {
    CKPT_TID.store(sys::gettid(), Ordering::Release);
    // The checkpoint thread takes no application signal, only ours.
    // SAFETY: raw rt_sigprocmask on a mask we build (bypasses our wrapper).
    unsafe {
        let mut set: libc::sigset_t = core::mem::zeroed();
        libc::sigfillset(&mut set);
        libc::sigdelset(&mut set, CKPT_SIGNAL);
        libc::syscall(libc::SYS_rt_sigprocmask, libc::SIG_SETMASK, &set as *const libc::sigset_t, 0usize, 8usize);
    }
    SEND_LOCK.lock();
    let ok = hello(0);
    SEND_LOCK.unlock();
    hooks::MEMBER.store(ok, Ordering::Release);
    REGISTERED.store(1, Ordering::Release);
    sys::futex_wake_all(&REGISTERED);
    if !ok {
        close_agent();
        return core::ptr::null_mut();
    }
    let mut buf = [0u8; 256];
    loop {
        if !wait_readable() {
            close_agent();
            return core::ptr::null_mut();
        }
        match recv(&mut buf) {
            None => {
                // The coordinator went away: the program goes on unmanaged.
                close_agent();
                return core::ptr::null_mut();
            }
            Some(kind::CHECKPOINT) => {
                let req = CheckpointRequest::read_from(&buf).unwrap_or_default();
                // Held for the whole round: no program thread is parked
                // while it holds the lock (see hooks::SEND_LOCK).
                SEND_LOCK.lock();
                checkpoint(req.generation);
                SEND_LOCK.unlock();
            }
            Some(kind::PREPARE) => {
                let p = Prepare::read_from(&buf).unwrap_or_default();
                let r = hooks::prepare(p.timeout_ms);
                SEND_LOCK.lock();
                match r {
                    Ok(()) => {
                        send(kind::PREPARED, &[]);
                    }
                    Err(e) => fail(libc::ECANCELED, &e),
                }
                SEND_LOCK.unlock();
            }
            Some(kind::ROUND_DONE) => {
                let r = Resume::read_from(&buf).unwrap_or_default();
                hooks::round_done(if r.outcome == proto::OUTCOME_WRITTEN { r.generation } else { 0 });
            }
            Some(kind::NOW_DONE) => hooks::now_done(&buf),
            Some(_) => {}
        }
    }
}

/// Waits until the connection has a message to read. The program may
/// move the connection to another number meanwhile (it took its number,
/// see [`agentfds`]): the wait is a poll of at most a second at a time on
/// the current number, never a read blocked on an old one (whose message
/// would then be read through the number the program reused).
fn wait_readable() -> bool {
    loop {
        let fd = agentfds::CONN.get();
        if fd < 0 {
            return false;
        }
        if channel::buffered() {
            return true;
        }
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: poll of one pollfd we own.
        let r = unsafe { libc::poll(&mut pfd, 1, 1000) };
        if r > 0 && pfd.revents & libc::POLLNVAL == 0 {
            return true;
        }
        if r < 0 && sys::errno() != libc::EINTR {
            return false;
        }
    }
}

fn fail(errno: i32, msg: &str) {
    let mut f = Failed { errno, len: 0, text: [0; 240] };
    let n = msg.len().min(f.text.len());
    f.text[..n].copy_from_slice(&msg.as_bytes()[..n]);
    f.len = n as u32;
    send(kind::FAILED, &[f.as_bytes()]);
}

/// Stops every other thread, then takes the checkpoint thread's own state by
/// signalling itself: the exchange with the coordinator runs inside that
/// handler ([`checkpoint_in_handler`]), so the thread's saved frame is the
/// point it returns to after a restart.
fn checkpoint(_generation: u64) {
    // A lazy restart still bringing memory in: a snapshot now would miss the
    // pages still to come. Wait for the page server to finish.
    let until = sys::now_ns() + ckpt_wire::agent::LAZY_WAIT_SECS * 1_000_000_000;
    while CKPT_RESTART_WORD.lazy.load(Ordering::Acquire) != 0 {
        if sys::now_ns() > until {
            fail(libc::EBUSY, "its lazy restart (ckpt restart --lazy) has not brought all of its memory in yet: checkpoint again once that restart's fill is done");
            return;
        }
        // A word nobody wakes: a 2 ms nap.
        static NAP: AtomicU32 = AtomicU32::new(0);
        sys::futex_wait(&NAP, 0, 2_000_000);
    }
    if crate::interpose::sem_undo_overflowed() {
        fail(libc::EOPNOTSUPP, "it holds SysV semaphore undo adjustments (semop with SEM_UNDO) on more than 64 semaphores, more than ckpt's table records: use fewer semaphores with SEM_UNDO");
        return;
    }
    // Threads of the previous round must have left the handler.
    loop {
        let p = PARKED.load(Ordering::Acquire);
        if p == 0 {
            break;
        }
        sys::futex_wait(&PARKED, p, 1_000_000);
    }
    let me = sys::gettid();
    let s = scratch();
    s.nsignaled = 0;
    NEXT_SLOT.store(0, Ordering::Release);
    SUSPENDING.store(true, Ordering::Release);

    let deadline = sys::now_ns() + 10_000_000_000;
    let mut stopped = false;
    stopper::JOB_STOPPED.store(0, Ordering::Release);
    while sys::now_ns() < deadline {
        let mut present = 0u32;
        let mut newly = false;
        let (dents, signaled, nsignaled, batch) = (&mut s.dents, &mut s.signaled, &mut s.nsignaled, &mut s.batch);
        let mut nbatch = 0usize;
        let listed = sys::for_each_task(dents, |tid| {
            if tid == me {
                return;
            }
            present += 1;
            if !signaled[..*nsignaled].contains(&tid) && *nsignaled < MAX_THREADS {
                signaled[*nsignaled] = tid;
                *nsignaled += 1;
                batch[nbatch] = tid;
                nbatch += 1;
                newly = true;
            }
        });
        stopper::stop_threads(&batch[..nbatch]);
        if !listed {
            break;
        }
        let parked = PARKED.load(Ordering::Acquire);
        if !newly && parked == present {
            stopped = true;
            break;
        }
        sys::futex_wait(&PARKED, parked, 200_000);
    }
    if !stopped {
        stopper::finish_round(release);
        fail(libc::ETIMEDOUT, "not every thread stopped within 10 s (a thread in uninterruptible sleep, or one that blocks signal 62 while traced by another tracer or with CKPT_STOP=signal)");
        return;
    }
    if ZONE_MAPPED.swap(false, Ordering::AcqRel) {
        // Every thread is parked in our handler: none runs restorer code.
        // SAFETY: the zone holds only the restorer's leftovers after a restart.
        unsafe { libc::munmap(ZONE_START as *mut libc::c_void, (ZONE_END - ZONE_START) as usize) };
    }

    let before = CKPT_RESTART_WORD.word.load(Ordering::Acquire);
    OUTCOME.store(proto::OUTCOME_ABORTED, Ordering::Release);
    sys::tgkill(me, CKPT_SIGNAL);
    let after = CKPT_RESTART_WORD.word.load(Ordering::Acquire);
    if after != before {
        // We are a restarted process: the other threads already run (the
        // restorer resumed them from their frames). Reset the round and
        // register again on the connection the restart driver placed at
        // our fd number.
        SUSPENDING.store(false, Ordering::Release);
        PARKED.store(0, Ordering::Release);
        NEXT_SLOT.store(0, Ordering::Release);
        stopper::forget();
        ZONE_MAPPED.store(true, Ordering::Release);
        SNAPSHOT_PID.store(0, Ordering::Release);
        // The driver placed a new connection at our number: remember
        // its identity. The old userfaultfd was not restored: a new one
        // tracks from now.
        agentfds::CONN.set(agentfds::CONN.get());
        agentfds::UFFD.take();
        // mlockall(MCL_FUTURE) is not in /proc, so not in the image: the
        // program's last mlockall is made again (raw; its own rights).
        let lock = crate::interpose::MLOCKALL_FLAGS.load(Ordering::Acquire);
        if lock != 0 {
            // SAFETY: mlockall takes no pointer.
            if unsafe { libc::syscall(libc::SYS_mlockall, lock) } != 0 {
                agentfds::warn(b"ckpt: the restored process cannot mlockall() again as it had (RLIMIT_MEMLOCK?); its memory is not locked\n");
            }
        }
        open_uffd();
        // A TCP connection comes with the keys of the handshake the
        // driver ran for us (no allocation here).
        channel::take_restart_keys(&CKPT_RESTART_WORD, after);
        if !hello(after) {
            close_agent();
        } else {
            hooks::restarted(after);
        }
        return;
    }
    stopper::finish_round(release);
    let resumed = proto::Resumed { released_ns: sys::now_ns() };
    reap_snapshot();
    send(kind::RESUMED, &[resumed.as_bytes()]);
}

fn release() {
    SUSPENDING.store(false, Ordering::Release);
    RELEASE.fetch_add(1, Ordering::AcqRel);
    sys::futex_wake_all(&RELEASE);
}

/// Runs in the checkpoint thread's own signal handler with every other
/// thread parked: report, then wait for the coordinator to finish reading.
pub fn checkpoint_in_handler(own: ThreadState) {
    // With every thread stopped, nothing moves the agent's fds: check that
    // they are still its own (a raw dup2/close of the program is not seen
    // by the wrappers).
    let v = agentfds::verify();
    if v.conn_lost {
        agentfds::warn(b"ckpt: the program replaced the agent's coordinator connection (a raw dup2/close onto it); this process runs without checkpoints from now\n");
        return;
    }
    if v.uffd_lost {
        // The number is the program's now. A new userfaultfd starts write
        // tracking over: every region reads as untracked and is stored whole.
        open_uffd();
    }
    let n = (NEXT_SLOT.load(Ordering::Acquire) as usize).min(MAX_THREADS);
    let mut msg = Suspended {
        nthreads: n as u32 + 1,
        job_stop: stopper::JOB_STOPPED.load(Ordering::Acquire),
        brk: sys::brk_now(),
        itimers: [ItimerVal::default(); 3],
        sigactions: [KernelSigaction::default(); 64],
        agent_fd: agentfds::CONN.get(),
        uffd_fd: agentfds::UFFD.get(),
    };
    for (which, slot) in msg.itimers.iter_mut().enumerate() {
        // SAFETY: getitimer writes one itimerval, whose layout ItimerVal mirrors.
        unsafe { libc::syscall(libc::SYS_getitimer, which as i32, slot as *mut ItimerVal) };
    }
    for sig in 1..=64i32 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: rt_sigaction query into a struct laid out like the kernel's.
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                core::ptr::null::<KernelSigaction>(),
                &mut msg.sigactions[(sig - 1) as usize] as *mut KernelSigaction,
                8usize,
            )
        };
    }
    // SAFETY: every thread that took one of the first `n` slots is parked.
    let slots = unsafe { SLOTS.filled(n) };
    // SAFETY: ThreadState is Pod; viewing the slice as bytes.
    let slot_bytes = unsafe { core::slice::from_raw_parts(slots.as_ptr() as *const u8, core::mem::size_of_val(slots)) };
    if !send(kind::SUSPENDED, &[msg.as_bytes(), slot_bytes, own.as_bytes()]) {
        return;
    }
    // SAFETY: only the checkpoint thread uses RANGES, never re-entrantly.
    let buf = unsafe { &mut (*core::ptr::addr_of_mut!(RANGES)).0 };
    loop {
        // A message without a payload leaves an empty range list.
        buf[..8].fill(0);
        match recv(buf) {
            Some(kind::REGISTER) => {
                let r = register_ranges(buf);
                if !send(kind::REGISTERED, &[r.as_bytes()]) {
                    return;
                }
            }
            Some(kind::FORK) => {
                let f = fork_snapshot(buf);
                if !send(kind::FORKED, &[f.as_bytes()]) {
                    return;
                }
            }
            Some(kind::TIMERS) => {
                if !send(kind::TIMER_VALUES, &[read_timers(buf)]) {
                    return;
                }
            }
            // The answer to the program's own request, sent once the
            // round that request made ended: it may come during the next.
            Some(kind::NOW_DONE) => hooks::now_done(buf),
            Some(kind::RESUME) => {
                let r = Resume::read_from(buf).unwrap_or_default();
                OUTCOME.store(r.outcome, Ordering::Release);
                return;
            }
            _ => return,
        }
    }
}
