//! Thin, async-signal-safe wrappers over the syscalls the agent needs.
//!
//! Every function here is a single syscall (or a loop of them) on caller
//! memory: no allocation, no locks, no libc state except `errno`, which
//! callers in signal context save and restore themselves.

use core::sync::atomic::AtomicU32;

pub const ARCH_GET_FS: libc::c_long = 0x1003;
pub const PR_GET_TID_ADDRESS: libc::c_long = 40;

/// The calling thread's kernel TID.
pub fn gettid() -> i32 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

pub fn getpid() -> i32 {
    // SAFETY: getpid cannot fail.
    unsafe { libc::getpid() }
}

/// Sends `sig` to thread `tid` of this process. Returns the raw result.
pub fn tgkill(tid: i32, sig: i32) -> i64 {
    // SAFETY: tgkill takes plain integers.
    unsafe { libc::syscall(libc::SYS_tgkill, getpid(), tid, sig) as i64 }
}

/// Waits while `*word == expected`, at most `timeout_ns` (0 = forever).
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout_ns: u64) {
    let ts = libc::timespec { tv_sec: (timeout_ns / 1_000_000_000) as i64, tv_nsec: (timeout_ns % 1_000_000_000) as i64 };
    let tsp = if timeout_ns == 0 { core::ptr::null() } else { &ts as *const libc::timespec };
    // SAFETY: `word` is a valid, aligned u32 for the duration of the call;
    // FUTEX_WAIT only reads it. A spurious wake-up is handled by callers.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG, expected, tsp);
    }
}

/// Wakes every waiter on `word`.
pub fn futex_wake_all(word: &AtomicU32) {
    // SAFETY: `word` is a valid, aligned u32; FUTEX_WAKE does not access it.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG, i32::MAX);
    }
}

/// The calling thread's `fs` base (its TLS pointer).
pub fn fs_base() -> u64 {
    let mut v: u64 = 0;
    // SAFETY: ARCH_GET_FS writes one u64 to the pointer we pass.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_GET_FS, &mut v as *mut u64) };
    v
}

/// The calling thread's clear-child-tid address.
pub fn tid_address() -> u64 {
    let mut v: u64 = 0;
    // SAFETY: PR_GET_TID_ADDRESS writes one pointer-sized value.
    unsafe { libc::syscall(libc::SYS_prctl, PR_GET_TID_ADDRESS, &mut v as *mut u64, 0, 0, 0) };
    v
}

/// The calling thread's robust futex list `(head, len)`.
pub fn robust_list() -> (u64, u64) {
    let mut head: u64 = 0;
    let mut len: u64 = 0;
    // SAFETY: get_robust_list(0, ..) writes one pointer and one size_t.
    unsafe { libc::syscall(libc::SYS_get_robust_list, 0, &mut head as *mut u64, &mut len as *mut u64) };
    (head, len)
}

/// Whether the calling thread has registered an rseq area with the kernel.
/// A thread glibc has just cloned runs (and can be stopped for a
/// checkpoint) before its `start_thread` registers one; restoring it with
/// an area registered would make that registration fail, which glibc
/// treats as fatal. The kernel has no query, so this asks it to register
/// `addr` (`len`, `sig`: what glibc registers): `EBUSY` says the same area
/// is registered, `EINVAL`/`EPERM` that another one is (both: registered);
/// success says none was, and the registration is undone at once
/// (`RSEQ_FLAG_UNREGISTER`), leaving the thread as it was. Async-signal-safe
/// (two raw syscalls).
pub fn rseq_registered(addr: u64, len: u32, sig: u32) -> bool {
    const RSEQ_FLAG_UNREGISTER: u64 = 1;
    // SAFETY: rseq with `addr` inside the thread's TLS (glibc's own area for
    // it, mapped and aligned); the kernel only records it, or refuses.
    let r = unsafe { libc::syscall(libc::SYS_rseq, addr, len as u64, 0u64, sig as u64) };
    if r != 0 {
        return true;
    }
    // SAFETY: unregisters exactly what the call above registered.
    unsafe { libc::syscall(libc::SYS_rseq, addr, len as u64, RSEQ_FLAG_UNREGISTER, sig as u64) };
    false
}

/// Current program break.
pub fn brk_now() -> u64 {
    // SAFETY: brk(0) only queries.
    unsafe { libc::syscall(libc::SYS_brk, 0) as u64 }
}

/// Writes all of `buf`, retrying on EINTR and short writes.
pub fn write_all(fd: i32, mut buf: &[u8]) -> bool {
    while !buf.is_empty() {
        // SAFETY: `buf` is valid for reads of its length.
        let n = unsafe { libc::syscall(libc::SYS_write, fd, buf.as_ptr(), buf.len()) };
        if n < 0 {
            if errno() == libc::EINTR {
                continue;
            }
            return false;
        }
        buf = &buf[n as usize..];
    }
    true
}

/// Fills all of `buf`, retrying on EINTR; false on EOF or error.
pub fn read_exact(fd: i32, buf: &mut [u8]) -> bool {
    let mut off = 0;
    while off < buf.len() {
        // SAFETY: the tail of `buf` is valid for writes of its length.
        let n = unsafe { libc::syscall(libc::SYS_read, fd, buf[off..].as_mut_ptr(), buf.len() - off) };
        if n < 0 {
            if errno() == libc::EINTR {
                continue;
            }
            return false;
        }
        if n == 0 {
            return false;
        }
        off += n as usize;
    }
    true
}

pub fn errno() -> i32 {
    // SAFETY: __errno_location returns this thread's errno slot.
    unsafe { *libc::__errno_location() }
}

pub fn set_errno(v: i32) {
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = v };
}

/// Calls `f` with each TID in `/proc/self/task`, using `buf` for the
/// directory entries. Returns false if the directory cannot be read.
pub fn for_each_task(buf: &mut [u8], mut f: impl FnMut(i32)) -> bool {
    // SAFETY: the path is a NUL-terminated literal.
    let fd = unsafe {
        libc::syscall(libc::SYS_openat, libc::AT_FDCWD, c"/proc/self/task".as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC)
    } as i32;
    if fd < 0 {
        return false;
    }
    loop {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), buf.len()) };
        if n <= 0 {
            break;
        }
        let mut off = 0usize;
        while off < n as usize {
            // linux_dirent64: u64 ino, i64 off, u16 reclen, u8 type, name.
            let reclen = u16::from_ne_bytes([buf[off + 16], buf[off + 17]]) as usize;
            let name = &buf[off + 19..off + reclen];
            let mut tid: i32 = 0;
            let mut digits = 0;
            for &c in name {
                if c.is_ascii_digit() {
                    tid = tid * 10 + (c - b'0') as i32;
                    digits += 1;
                } else {
                    break;
                }
            }
            if digits > 0 {
                f(tid);
            }
            off += reclen;
        }
    }
    // SAFETY: closing the fd we opened.
    unsafe { libc::syscall(libc::SYS_close, fd) };
    true
}

/// Monotonic clock in nanoseconds.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::syscall(libc::SYS_clock_gettime, libc::CLOCK_MONOTONIC, &mut ts as *mut libc::timespec) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The inode of a namespace of this process (`/proc/self/ns/NAME` is a
/// link to `NAME:[INODE]`), or 0. Raw syscalls only.
pub fn ns_inode(path: &core::ffi::CStr) -> u64 {
    let mut buf = [0u8; 64];
    // SAFETY: readlink into a buffer we own, bounded by its length.
    let n = unsafe { libc::syscall(libc::SYS_readlinkat, libc::AT_FDCWD, path.as_ptr(), buf.as_mut_ptr(), buf.len()) };
    if n <= 0 {
        return 0;
    }
    let text = &buf[..n as usize];
    let Some(open) = text.iter().position(|&b| b == b'[') else { return 0 };
    text[open + 1..].iter().take_while(|b| b.is_ascii_digit()).fold(0u64, |acc, &b| acc * 10 + (b - b'0') as u64)
}

/// Reads up to `buf.len()` bytes of a small file (raw syscalls only);
/// returns how many.
pub fn read_small_file(path: &core::ffi::CStr, buf: &mut [u8]) -> usize {
    // SAFETY: open/read/close on a path and a buffer we own.
    unsafe {
        let fd = libc::syscall(libc::SYS_openat, libc::AT_FDCWD, path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) as i32;
        if fd < 0 {
            return 0;
        }
        let n = libc::syscall(libc::SYS_read, fd, buf.as_mut_ptr(), buf.len());
        libc::syscall(libc::SYS_close, fd);
        n.max(0) as usize
    }
}

/// This host's name (`uname` nodename), NUL-padded into `out`.
pub fn hostname(out: &mut [u8]) {
    // SAFETY: uname fills a utsname we own.
    let mut u: libc::utsname = unsafe { core::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::syscall(libc::SYS_uname, &mut u as *mut libc::utsname) } != 0 {
        return;
    }
    for (o, c) in out.iter_mut().zip(u.nodename.iter().take_while(|&&c| c != 0)) {
        *o = *c as u8;
    }
}
