//! epoll instances: the items (fdinfo `tfd:` lines: fd number, events with
//! their flags, data).
//!
//! An item is keyed by (file, fd number) in the kernel, so it must be added
//! back with the fd number the program registered, by a process whose fd
//! of that number is the target: the driver makes an empty epoll, and each
//! restored process adds the items whose targets it holds, right after its
//! fds have their numbers ([`crate::restore`]; `EEXIST` from a second
//! process sharing the epoll is fine). At checkpoint each item is checked
//! with `kcmp(KCMP_EPOLL_TFD)`. When the process's fd `tfd` is no longer
//! the target (closed, or reused for another file) but another of its fds
//! holds the watched file, the item records that fd (`via`): at restart the
//! process puts it at number `tfd` for the `epoll_ctl` and puts back what
//! was there. A watched file no fd of the process holds is not added back.
//!
//! Readiness is not recorded: the kernel computes it again when an item is
//! added. An `EPOLLET` item whose target is ready reports one edge after a
//! restart even if the program had seen it before.
//!
//! Never `epoll_wait` on a program's epoll: that consumes its events (and
//! disarms `EPOLLONESHOT` items).

use std::os::fd::OwnedFd;

use super::{LiveFd, set_status_flags, take_fd};
use crate::error::{EngineError, Result};
use crate::image::{EpollItem, FdImage, FdKind};

const KCMP_EPOLL_TFD: i32 = 7;

/// `struct kcmp_epoll_slot` of the kernel uapi.
#[repr(C)]
struct KcmpEpollSlot {
    efd: u32,
    tfd: u32,
    toff: u32,
}

/// The items of an epoll fdinfo text, in the kernel's order.
pub fn parse_items(text: &str) -> Vec<EpollItem> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            if w.next()? != "tfd:" {
                return None;
            }
            let fd = w.next()?.parse().ok()?;
            let events = (w.next()? == "events:").then(|| w.next()).flatten().and_then(|v| u32::from_str_radix(v, 16).ok())?;
            let data = (w.next()? == "data:").then(|| w.next()).flatten().and_then(|v| u64::from_str_radix(v, 16).ok())?;
            Some(EpollItem { fd, events, data, via: None })
        })
        .collect()
}

pub fn capture(live: &LiveFd) -> Result<FdKind> {
    let all = parse_items(&live.info.text);
    let mut items = Vec::new();
    for (i, item) in all.iter().enumerate() {
        let toff = all[..i].iter().filter(|o| o.fd == item.fd).count() as u32;
        let slot = KcmpEpollSlot { efd: live.fd as u32, tfd: item.fd as u32, toff };
        // SAFETY: kcmp reads `slot` (our memory) and compares files of a
        // stopped process; nothing is written.
        let r = unsafe { libc::syscall(libc::SYS_kcmp, live.pid, live.pid, KCMP_EPOLL_TFD, item.fd, &slot as *const KcmpEpollSlot) };
        let errno = std::io::Error::last_os_error();
        if r == 0 {
            items.push(*item);
        } else if r < 0 && !matches!(errno.raw_os_error(), Some(libc::EBADF) | Some(libc::ENOENT)) {
            return Err(EngineError::Unsupported {
                pid: live.pid,
                what: format!("epoll fd {}: cannot tell which file its item for fd {} watches (kcmp KCMP_EPOLL_TFD: {errno}; needs a kernel with CONFIG_KCMP and CONFIG_CHECKPOINT_RESTORE)", live.fd, item.fd),
            });
        } else if let Some(via) = holder(live.pid, item.fd, &slot) {
            // Registered through an fd closed (or reused) since: the file
            // is at `via` now.
            items.push(EpollItem { via: Some(via), ..*item });
        } else {
            tracing::warn!(
                pid = live.pid,
                epoll = live.fd,
                tfd = item.fd,
                "the epoll item for fd {} watches a file that no fd of process {} holds (closed or reused; held elsewhere); it is not added back at restart",
                item.fd,
                live.pid
            );
        }
    }
    Ok(FdKind::Epoll { items })
}

/// The fd of `pid` (other than `tfd`) that holds the file the epoll item
/// `slot` watches, if any.
fn holder(pid: i32, tfd: i32, slot: &KcmpEpollSlot) -> Option<i32> {
    let mut fds: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect();
    fds.sort_unstable();
    fds.into_iter().filter(|&o| o != tfd).find(|&o| {
        // SAFETY: as in `capture`: kcmp only reads `slot`.
        unsafe { libc::syscall(libc::SYS_kcmp, pid, pid, KCMP_EPOLL_TFD, o, slot as *const KcmpEpollSlot) == 0 }
    })
}

pub fn open(generation: u64, pid: i32, f: &FdImage) -> Result<OwnedFd> {
    // SAFETY: epoll_create1 returns a new fd or -1.
    let fd = unsafe { take_fd(libc::epoll_create1(libc::EPOLL_CLOEXEC).into()) }
        .map_err(|e| EngineError::Restore { generation, what: format!("epoll_create1 (fd {} of process {pid}): {e}", f.fd) })?;
    set_status_flags(&fd, f.flags);
    Ok(fd)
}

/// The `epoll_ctl(EPOLL_CTL_ADD)` calls process `image` makes once its fds
/// have their numbers: (epoll fd, target fd, event, fd holding the target's
/// file now or -1). Items through a closed or reused fd come last: fd
/// `via` is put at the target's number for the call, and what was there is
/// put back. Items whose file the image lacks are left out, with a warning.
pub fn additions(image: &crate::image::ProcessImage) -> Vec<(i32, i32, libc::epoll_event, i32)> {
    let mut out = Vec::new();
    for f in &image.fds {
        let FdKind::Epoll { items } = &f.kind else { continue };
        for it in items {
            let holds = |fd: i32| image.fds.iter().any(|t| t.fd == fd);
            let ev = libc::epoll_event { events: it.events, u64: it.data };
            match it.via {
                None if holds(it.fd) => out.push((f.fd, it.fd, ev, -1)),
                Some(via) if holds(via) && via != it.fd => out.push((f.fd, it.fd, ev, via)),
                _ => tracing::warn!(pid = image.pid, epoll = f.fd, tfd = it.fd, "epoll fd {} of process {} watched fd {}, whose file the image does not hold; the item is dropped", f.fd, image.pid, it.fd),
            }
        }
    }
    out.sort_by_key(|a| a.3 >= 0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tfd_lines() {
        let text = "pos:\t0\nflags:\t02\nmnt_id:\t15\nino:\t1057\ntfd:        5 events:       19 data:       deadbeef0005  pos:0 ino:3a sdev:d\ntfd:       12 events: 80000001 data:                7  pos:0 ino:3b sdev:d\n";
        let items = parse_items(text);
        assert_eq!(items, vec![EpollItem { fd: 5, events: 0x19, data: 0xdeadbeef0005, via: None }, EpollItem { fd: 12, events: 0x8000_0001, data: 7, via: None }]);
    }
}
