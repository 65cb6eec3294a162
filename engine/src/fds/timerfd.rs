//! timerfds: clock, flags, the time left and the interval
//! (`timerfd_gettime` on a duplicate of the live fd), and the expirations
//! the program has not read yet (fdinfo `ticks`).
//!
//! Restart arms a new timerfd with the time that was left (the clock
//! stands still while the computation is down, as for other timers), and
//! puts the unread expirations back with `TFD_IOC_SET_TICKS` (needs
//! `CONFIG_CHECKPOINT_RESTORE`), so a `read` or `epoll_wait` sees them. An
//! absolute `CLOCK_REALTIME` timer keeps its wall-clock deadline instead.
//!
//! Never read a program's timerfd: that takes its expirations.

use std::os::fd::{AsRawFd, OwnedFd};

use super::{LiveFd, Round, set_status_flags, take_fd};
use crate::error::{EngineError, Result};
use crate::image::{FdImage, FdKind, TimerFdState};

/// `_IOW('T', 0, u64)`.
const TFD_IOC_SET_TICKS: libc::c_ulong = 0x4008_5400;
const NS: u64 = 1_000_000_000;

fn ns(t: &libc::timespec) -> u64 {
    t.tv_sec as u64 * NS + t.tv_nsec as u64
}

fn ts(ns: u64) -> libc::timespec {
    libc::timespec { tv_sec: (ns / NS) as libc::time_t, tv_nsec: (ns % NS) as libc::c_long }
}

fn ticks(pid: i32, fd: i32) -> Option<u64> {
    super::FdInfo::read(pid, fd).field("ticks:").and_then(|v| v.parse().ok())
}

pub fn capture(round: &mut Round, live: &LiveFd) -> Result<FdKind> {
    let clock: i32 = live.info.field("clockid:").and_then(|v| v.parse().ok()).ok_or_else(|| live.unreadable("clockid"))?;
    let settime_flags = live.info.field("settime flags:").and_then(|v| i32::from_str_radix(v, 8).ok()).unwrap_or(0);
    let fd = round.grab(live.pid, live.fd)?;
    // The timer runs on while we look: read the ticks on both sides of the
    // time left, and again if an expiration fell in between.
    for _ in 0..10 {
        let before = ticks(live.pid, live.fd).ok_or_else(|| live.unreadable("ticks"))?;
        let mut cur: libc::itimerspec = zero_spec();
        // SAFETY: timerfd_gettime writes one itimerspec.
        if unsafe { libc::timerfd_gettime(fd.as_raw_fd(), &mut cur) } != 0 {
            return Err(EngineError::io(format!("timerfd_gettime (process {}, fd {})", live.pid, live.fd), std::io::Error::last_os_error()));
        }
        if ticks(live.pid, live.fd) != Some(before) {
            continue;
        }
        let value_ns = ns(&cur.it_value);
        let abs_wall = settime_flags & libc::TFD_TIMER_ABSTIME != 0 && matches!(clock, libc::CLOCK_REALTIME | libc::CLOCK_REALTIME_ALARM);
        let deadline_ns = (abs_wall && value_ns > 0).then(|| now_ns(libc::CLOCK_REALTIME) + value_ns as i64);
        return Ok(FdKind::TimerFd(TimerFdState { clock, settime_flags, value_ns, interval_ns: ns(&cur.it_interval), ticks: before, deadline_ns }));
    }
    Err(live.unreadable("a stable ticks count (the timer fires too fast)"))
}

fn zero_spec() -> libc::itimerspec {
    libc::itimerspec { it_interval: ts(0), it_value: ts(0) }
}

fn now_ns(clock: libc::clockid_t) -> i64 {
    let mut t = ts(0);
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(clock, &mut t) };
    ns(&t) as i64
}

pub fn open(generation: u64, pid: i32, f: &FdImage) -> Result<OwnedFd> {
    let FdKind::TimerFd(t) = &f.kind else { unreachable!("timerfd::open of another kind") };
    let err = |what: String| EngineError::Restore { generation, what: format!("timerfd (fd {} of process {pid}): {what}", f.fd) };
    // SAFETY: timerfd_create returns a new fd or -1.
    let fd = unsafe { take_fd(libc::timerfd_create(t.clock, libc::TFD_CLOEXEC).into()) }.map_err(|e| err(format!("timerfd_create(clock {}): {e}", t.clock)))?;
    if t.value_ns > 0 {
        let (flags, value) = match t.deadline_ns {
            Some(d) => (t.settime_flags, ts(d.max(1) as u64)),
            None => (t.settime_flags & !(libc::TFD_TIMER_ABSTIME | libc::TFD_TIMER_CANCEL_ON_SET), ts(t.value_ns)),
        };
        let new = libc::itimerspec { it_interval: ts(t.interval_ns), it_value: value };
        // SAFETY: timerfd_settime reads one itimerspec.
        if unsafe { libc::timerfd_settime(fd.as_raw_fd(), flags, &new, std::ptr::null_mut()) } != 0 {
            return Err(err(format!("timerfd_settime: {}", std::io::Error::last_os_error())));
        }
    }
    if t.ticks > 0 {
        // SAFETY: the ioctl reads one u64.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TFD_IOC_SET_TICKS, &t.ticks as *const u64) } != 0 {
            return Err(err(format!(
                "putting back {} unread expirations (TFD_IOC_SET_TICKS, needs a kernel with CONFIG_CHECKPOINT_RESTORE): {}",
                t.ticks,
                std::io::Error::last_os_error()
            )));
        }
    }
    set_status_flags(&fd, f.flags);
    Ok(fd)
}
