//! Dirty-page tracking: which pages of a process were written since its
//! last checkpoint. Three backends behind one interface:
//!
//! * [`Backend::UffdWp`]: the agent registers the process's memory with a
//!   userfaultfd in write-protect mode with `UFFD_FEATURE_WP_ASYNC` (the
//!   kernel just clears the protection on first write, no fault to handle);
//!   from outside, the `PAGEMAP_SCAN` ioctl on `/proc/PID/pagemap` returns
//!   the written pages and protects them again in the same call. A mapping
//!   that is not registered (created since the last checkpoint) answers
//!   `EPERM` under `PM_SCAN_CHECK_WPASYNC`: it is captured whole, then
//!   registered.
//! * [`Backend::SoftDirty`]: bit 55 of `/proc/PID/pagemap`, reset by writing
//!   `4` to `/proc/PID/clear_refs` (needs `CONFIG_MEM_SOFT_DIRTY`). New
//!   mappings report every page soft-dirty.
//! * [`Backend::Scan`]: no kernel help: every present page is read and
//!   hashed; only chunks whose hash changed are stored.
//!
//! All three answer per page "written since the last reset"; the capture
//! combines that with page presence (see [`crate::capture`]). Reading and
//! resetting happen while the process is stopped.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use ckpt_wire::agent::tracking;
use ckpt_wire::uapi::*;
use serde::{Deserialize, Serialize};

use crate::remote::PAGE;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    SoftDirty,
    UffdWp,
    Scan,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::SoftDirty => "soft-dirty",
            Backend::UffdWp => "uffd-wp",
            Backend::Scan => "scan",
        }
    }

    /// The backend for a process that asked for `requested`
    /// ([`ckpt_wire::agent::tracking`]) and has a userfaultfd if `uffd_fd >= 0`.
    pub fn choose(requested: u32, uffd_fd: i32) -> Backend {
        match requested {
            tracking::SCAN => Backend::Scan,
            tracking::SOFT_DIRTY => Backend::SoftDirty,
            _ if uffd_fd >= 0 => Backend::UffdWp,
            tracking::UFFD_WP => Backend::Scan,
            _ if soft_dirty_supported() => Backend::SoftDirty,
            _ => Backend::Scan,
        }
    }
}

/// Parses `--dirty-tracking` values into the wire's request codes.
pub fn parse_request(s: &str) -> Option<u32> {
    Some(match s {
        "auto" => tracking::AUTO,
        "soft-dirty" => tracking::SOFT_DIRTY,
        "uffd-wp" => tracking::UFFD_WP,
        "scan" => tracking::SCAN,
        _ => return None,
    })
}

/// Does this kernel keep soft-dirty bits? Probed on the calling process:
/// write a page, clear the bits, write again, and look.
pub fn soft_dirty_supported() -> bool {
    static PROBE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PROBE.get_or_init(|| {
        let mut page = vec![0u8; 2 * PAGE as usize];
        let addr = (page.as_ptr() as u64).next_multiple_of(PAGE);
        let off = (addr - page.as_ptr() as u64) as usize;
        page[off] = 1;
        let me = std::process::id() as i32;
        if reset_soft_dirty(me).is_err() {
            return false;
        }
        page[off] = 2;
        std::hint::black_box(&page);
        let Ok(pm) = File::open("/proc/self/pagemap") else { return false };
        let mut e = [0u8; 8];
        pm.read_at(&mut e, addr / PAGE * 8).is_ok() && u64::from_le_bytes(e) & PM_SOFT_DIRTY != 0
    })
}

/// Can this kernel track writes with userfaultfd `WP_ASYNC`?
pub fn uffd_wp_supported() -> bool {
    // SAFETY: create a userfaultfd, ask for the features, close it.
    unsafe {
        let fd = libc::syscall(SYS_USERFAULTFD, libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY) as i32;
        if fd < 0 {
            return false;
        }
        let mut api = UffdioApi { api: UFFD_API, features: UFFD_FEATURE_WP_ASYNC, ioctls: 0 };
        let ok = libc::ioctl(fd, UFFDIO_API as _, &mut api as *mut UffdioApi) == 0;
        libc::close(fd);
        ok
    }
}

/// Starts a new tracking interval for soft-dirty.
pub fn reset_soft_dirty(pid: i32) -> std::io::Result<()> {
    std::fs::OpenOptions::new().write(true).open(format!("/proc/{pid}/clear_refs"))?.write_all(b"4")
}

/// Raw pagemap entries of `[start, end)`.
pub fn pagemap_entries(pagemap: &File, start: u64, end: u64) -> std::io::Result<Vec<u64>> {
    let n = ((end - start) / PAGE) as usize;
    let mut raw = vec![0u8; n * 8];
    let mut off = 0;
    while off < raw.len() {
        let got = pagemap.read_at(&mut raw[off..], (start / PAGE) * 8 + off as u64)?;
        if got == 0 {
            break;
        }
        off += got;
    }
    Ok(raw.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect())
}

/// Runs `PAGEMAP_SCAN` over `[start, end)` and marks, per page, those
/// matching `anyof` (any of these categories). With `protect`, the matched
/// pages are write-protected again (`PM_SCAN_WP_MATCHING`). `None`: the
/// range is not registered for write-protect tracking (`EPERM` under
/// `PM_SCAN_CHECK_WPASYNC`, asked for when `protect`).
fn scan(pagemap: &File, start: u64, end: u64, anyof: u64, protect: bool) -> std::io::Result<Option<Vec<bool>>> {
    let n = ((end - start) / PAGE) as usize;
    let mut out = vec![false; n];
    let mut vec = vec![PageRegion::default(); 4096];
    let mut cur = start;
    while cur < end {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            flags: if protect { PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC } else { 0 },
            start: cur,
            end,
            walk_end: 0,
            vec: vec.as_mut_ptr() as u64,
            vec_len: vec.len() as u64,
            max_pages: 0,
            category_inverted: 0,
            category_mask: 0,
            category_anyof_mask: anyof,
            return_mask: anyof,
        };
        // SAFETY: PAGEMAP_SCAN reads `arg` and writes at most `vec_len`
        // page_regions into `vec`, which outlives the call.
        let r = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg as *mut PmScanArg) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if protect && e.raw_os_error() == Some(libc::EPERM) {
                return Ok(None);
            }
            return Err(e);
        }
        for reg in &vec[..r as usize] {
            let a = ((reg.start.max(start) - start) / PAGE) as usize;
            let b = ((reg.end.min(end) - start) / PAGE) as usize;
            out[a..b].iter_mut().for_each(|x| *x = true);
        }
        if arg.walk_end <= cur {
            break;
        }
        cur = arg.walk_end;
    }
    Ok(Some(out))
}

/// Pages of `[start, end)` written since they were last protected, and
/// protects them again. `None`: the range is not registered for tracking.
pub fn uffd_written(pagemap: &File, start: u64, end: u64) -> std::io::Result<Option<Vec<bool>>> {
    scan(pagemap, start, end, PAGE_IS_WRITTEN, true)
}

/// Pages of `[start, end)` that exist (in RAM or swap), from one
/// `PAGEMAP_SCAN` (ranges, not a word per page). `None` where the kernel
/// has no `PAGEMAP_SCAN` (before 6.7): read pagemap instead.
pub fn present_pages(pagemap: &File, start: u64, end: u64) -> std::io::Result<Option<Vec<bool>>> {
    match scan(pagemap, start, end, PAGE_IS_PRESENT | PAGE_IS_SWAPPED, false) {
        Ok(v) => Ok(v),
        Err(e) if e.raw_os_error() == Some(libc::ENOTTY) || e.raw_os_error() == Some(libc::EINVAL) => Ok(None),
        Err(e) => Err(e),
    }
}
