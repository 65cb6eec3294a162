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

use crate::pages::PageRuns;
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

/// Pages of pagemap read per window when no `PAGEMAP_SCAN` is at hand:
/// memory stays bounded whatever the size of the mapping.
const PAGEMAP_WINDOW: u64 = 1 << 16;

/// Which pages of `[start, end)` hold data, and (for soft-dirty) which of
/// them were written, from pagemap read a window at a time: costs time in
/// the size of the range, memory in what is present.
pub fn pagemap_runs(pagemap: &File, start: u64, end: u64, soft_dirty: bool, only_anon: bool) -> std::io::Result<(PageRuns, PageRuns)> {
    let (mut present, mut written) = (PageRuns::new(), PageRuns::new());
    let mut at = start;
    while at < end {
        let to = (at + PAGEMAP_WINDOW * PAGE).min(end);
        let base = (at - start) / PAGE;
        for (i, e) in pagemap_entries(pagemap, at, to)?.into_iter().enumerate() {
            let p = base + i as u64;
            if holds_data(e) && !(only_anon && e & PM_FILE != 0) {
                present.push(p, p + 1);
                if soft_dirty && e & PM_SOFT_DIRTY != 0 {
                    written.push(p, p + 1);
                }
            }
        }
        at = to;
    }
    Ok((present, written))
}

/// A pagemap entry of a page that holds data: present in RAM, or swapped
/// out. A write-protect marker on a never-touched page (userfaultfd) shows
/// as a swap entry of the marker type: no data there.
pub fn holds_data(e: u64) -> bool {
    e & PM_PRESENT != 0 || (e & PM_SWAPPED != 0 && !is_pte_marker(e))
}

/// What one `PAGEMAP_SCAN` walk asks: a page matches when its categories,
/// `inverted` ones flipped, hold all of `required` and (if not 0) one of
/// `anyof`; each match is reported with its categories of `returned`.
#[derive(Clone, Copy)]
struct Query {
    flags: u64,
    inverted: u64,
    required: u64,
    anyof: u64,
    returned: u64,
}

/// A page run a walk reports: `(start, end, categories)`, pages relative
/// to the start of the walk.
pub type Run = (u64, u64, u64);

/// Page runs a walk reports.
type Runs = Vec<Run>;

/// One `PAGEMAP_SCAN` walk over `[start, end)`: the page runs (relative to
/// `start`) that match `q`, each with its categories. The kernel walks
/// page tables, so holes cost nothing; what costs is each page reported
/// (the kernel merges them into runs one page at a time), so a walk asks
/// for the few pages. `Ok(None)`: this kernel has no `PAGEMAP_SCAN`
/// (before 6.7). `EPERM` under `PM_SCAN_CHECK_WPASYNC` (the range is not
/// registered for tracking) is returned as an error.
fn scan(pagemap: &File, start: u64, end: u64, q: Query) -> std::io::Result<Option<Runs>> {
    Ok(scan_until(pagemap, start, end, q, false)?.map(|(runs, _)| runs))
}

/// Runs a walk stops after when asked to stop once its buffer is full
/// ([`scan_until`]).
const RUNS_BEFORE_STOP: usize = 1024;

/// Runs asked of the kernel per call: it copies them through a bounce
/// buffer of that many runs that it allocates per call (at most 512),
/// and above 8 KiB that is a page allocation of order 2 (`kmalloc` large):
/// with 1024 asked, ~20% of the kernel's time in a small process's walks
/// went to it and its free (perf, bench-trees, 2026-12-07).
const RUNS_PER_CALL: usize = 8192 / std::mem::size_of::<PageRegion>();

/// [`scan`], stopping once [`RUNS_BEFORE_STOP`] runs were reported if
/// `stop_when_full`: also returns the address the walk got to (`end`
/// if it got there).
fn scan_until(pagemap: &File, start: u64, end: u64, q: Query, stop_when_full: bool) -> std::io::Result<Option<(Runs, u64)>> {
    scan_each(pagemap, start, end, q, stop_when_full, &mut |_| {})
}

/// [`scan_until`], calling `each` with the runs of every call as soon as
/// the kernel gave them (in address order; the whole list is returned
/// too).
fn scan_each(pagemap: &File, start: u64, end: u64, q: Query, stop_when_full: bool, each: &mut dyn FnMut(&[Run])) -> std::io::Result<Option<(Runs, u64)>> {
    let mut out = Vec::new();
    // Written by the kernel, read only where it says it wrote (not
    // zeroed: a fresh zeroed 24 KiB per walk was ~4% of the stopped
    // phase of 16 small processes).
    let mut vec = [std::mem::MaybeUninit::<PageRegion>::uninit(); RUNS_PER_CALL];
    let mut reported = 0;
    let mut cur = start;
    while cur < end {
        let want = if stop_when_full { RUNS_PER_CALL.min(RUNS_BEFORE_STOP - reported) } else { RUNS_PER_CALL };
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            flags: q.flags,
            start: cur,
            end,
            walk_end: 0,
            vec: vec.as_mut_ptr() as u64,
            vec_len: want as u64,
            max_pages: 0,
            category_inverted: q.inverted,
            category_mask: q.required,
            category_anyof_mask: q.anyof,
            return_mask: q.returned,
        };
        // SAFETY: PAGEMAP_SCAN reads `arg` and writes at most `vec_len`
        // page_regions into `vec`, which outlives the call.
        let r = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg as *mut PmScanArg) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENOTTY | libc::EINVAL) if q.flags & PM_SCAN_WP_MATCHING == 0 => Ok(None),
                _ => Err(e),
            };
        }
        let n = (r as usize).min(want);
        let from = out.len();
        for reg in &vec[..n] {
            // SAFETY: the kernel wrote the first `r` entries (at most
            // `vec_len`): PAGEMAP_SCAN returns how many.
            let reg = unsafe { reg.assume_init_ref() };
            let (a, b) = (reg.start.max(start), reg.end.min(end));
            if a < b {
                out.push(((a - start) / PAGE, (b - start) / PAGE, reg.categories));
            }
        }
        reported += n;
        each(&out[from..]);
        if arg.walk_end <= cur {
            break;
        }
        cur = arg.walk_end;
        if stop_when_full && reported >= RUNS_BEFORE_STOP {
            return Ok(Some((out, cur.min(end))));
        }
    }
    Ok(Some((out, end)))
}

/// Which pages of `[start, end)` hold data (present or swapped, not a
/// marker), at the cost of what exists: `PAGEMAP_SCAN` where the kernel
/// has it, pagemap by windows where not.
///
/// The walk first asks for the pages that are *not* present (holes,
/// swapped pages, markers), the rest of the range being present: a
/// populated mapping reports nothing, where asking for the present pages
/// has the kernel report each of them (1 GiB populated: 0.5-0.6 ms against
/// 3-7 ms, both walks in one program, 2026-12-07). A sparse mapping
/// reports its holes, at least one run per 2 MiB the kernel walks at a time
/// (a 2 TiB reservation: a million runs, a minute): once a buffer of runs
/// fills, the rest of the range is asked for its present pages instead.
///
/// `only_anon`: only the pages that are not the file's (the copy-on-write
/// pages of a private file mapping); those are few, so they are asked for.
pub fn present_runs(pagemap: &File, start: u64, end: u64, only_anon: bool) -> std::io::Result<PageRuns> {
    match walk_present(pagemap, start, end, only_anon)? {
        Some(runs) => Ok(runs),
        None => Ok(pagemap_runs(pagemap, start, end, false, only_anon)?.0),
    }
}

/// [`present_runs`] by `PAGEMAP_SCAN` alone: None if this kernel has none.
fn walk_present(pagemap: &File, start: u64, end: u64, only_anon: bool) -> std::io::Result<Option<PageRuns>> {
    let holding = if only_anon {
        Query { flags: 0, inverted: PAGE_IS_FILE, required: PAGE_IS_FILE, anyof: PAGE_IS_PRESENT | PAGE_IS_SWAPPED, returned: PAGE_IS_PRESENT | PAGE_IS_SWAPPED }
    } else {
        Query { flags: 0, inverted: 0, required: 0, anyof: PAGE_IS_PRESENT | PAGE_IS_SWAPPED, returned: PAGE_IS_PRESENT | PAGE_IS_SWAPPED }
    };
    let absent = Query { flags: 0, inverted: PAGE_IS_PRESENT, required: PAGE_IS_PRESENT, anyof: 0, returned: PAGE_IS_SWAPPED };
    let mut out = PageRuns::new();
    // Pages that are not present, up to where the walk got.
    let mut from = start;
    if !only_anon {
        let Some((regions, walked)) = scan_until(pagemap, start, end, absent, true)? else {
            return Ok(None);
        };
        let mut at = 0;
        for (lo, hi, cat) in regions {
            // Between two pages that are not present, all are.
            out.push(at, lo);
            at = hi;
            if cat & PAGE_IS_SWAPPED != 0 {
                swapped_holding(pagemap, start, lo, hi, false, &mut out)?;
            }
        }
        out.push(at, (walked - start) / PAGE);
        from = walked;
    }
    if from >= end {
        return Ok(Some(out));
    }
    // The pages holding data, asked for (the rest of a sparse mapping).
    let Some(regions) = scan(pagemap, from, end, holding)? else {
        return Ok(None);
    };
    let skip = (from - start) / PAGE;
    for (lo, hi, cat) in regions {
        let (lo, hi) = (lo + skip, hi + skip);
        if cat & PAGE_IS_PRESENT != 0 {
            out.push(lo, hi);
        } else {
            swapped_holding(pagemap, start, lo, hi, only_anon, &mut out)?;
        }
    }
    Ok(Some(out))
}

/// Adds to `out` the pages of `[lo, hi)` (relative to `start`), all
/// swapped out or markers, that hold data: pagemap tells them apart (few
/// pages).
fn swapped_holding(pagemap: &File, start: u64, lo: u64, hi: u64, only_anon: bool, out: &mut PageRuns) -> std::io::Result<()> {
    let entries = pagemap_entries(pagemap, start + lo * PAGE, start + hi * PAGE)?;
    for (i, e) in entries.into_iter().enumerate() {
        if holds_data(e) && !(only_anon && e & PM_FILE != 0) {
            out.push(lo + i as u64, lo + i as u64 + 1);
        }
    }
    Ok(())
}

/// The walk of [`uffd_written`]: written pages that hold data, protected
/// again as they are reported.
const WRITTEN: Query = Query {
    flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
    inverted: 0,
    required: PAGE_IS_WRITTEN,
    anyof: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
    returned: PAGE_IS_WRITTEN | PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
};

/// Pages of `[start, end)` holding data that were written since they were
/// last protected, and protects them again (`PAGEMAP_SCAN` with
/// `PM_SCAN_WP_MATCHING`, present pages then swapped ones). Never-touched
/// pages are left alone: protecting a hole makes the kernel build page
/// tables for it (a whole reservation's worth), and a first write to a hole
/// shows as written anyway. `None`: the range is not registered for
/// tracking (`EPERM` under `PM_SCAN_CHECK_WPASYNC`).
///
/// One walk: `category_mask` = `PAGE_IS_WRITTEN` (required) and
/// `category_anyof_mask` = present or swapped. The kernel (6.7-6.18) has a
/// fast path for a query of `PAGE_IS_WRITTEN` alone (no `anyof`, nothing
/// inverted, return mask `PAGE_IS_WRITTEN`) that counts an empty page-table
/// entry as written, reports it and puts a marker in it: a walk asking for
/// written pages alone made the first checkpoint of a 2 TiB reservation
/// take over a minute (tests/reserve.rs, 2026-12-07), every hole inside a
/// page table reported and protected. The `anyof` keeps the walk off that
/// path: an empty entry is neither present nor swapped, and a marker is
/// never written. It replaced two walks (present and written, then
/// swapped and written: 0.87 + 0.60 ms at 1 GiB with 1% written, timed in
/// the coordinator, 2026-12-07); the stopped phase's scan went from
/// 2.0-2.1 ms to 1.4-1.5 ms (bench-stop A/B; docs/design.md "Dirty-page
/// tracking").
pub fn uffd_written(pagemap: &File, start: u64, end: u64) -> std::io::Result<Option<PageRuns>> {
    uffd_written_each(pagemap, start, end, &mut |_| {})
}

/// [`uffd_written`], calling `each` with the written runs (pages relative
/// to `start`, in address order) as each call of the walk returns them:
/// the copy of the first ones may begin while the walk goes on.
pub fn uffd_written_each(pagemap: &File, start: u64, end: u64, each: &mut dyn FnMut(&[Run])) -> std::io::Result<Option<PageRuns>> {
    match scan_each(pagemap, start, end, WRITTEN, false, each) {
        Ok(Some((r, _))) => Ok(Some(PageRuns::from_unsorted(r.into_iter().map(|(lo, hi, _)| (lo, hi)).collect()))),
        Ok(None) => unreachable!("scan answers None only without PM_SCAN_WP_MATCHING"),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Ok(None),
        Err(e) => Err(e),
    }
}

/// [`present_runs`] of several mappings in one walk: `ranges` are
/// mappings in increasing order (of one process, stopped), all of the
/// same `only_anon`; one answer per range. The walk covers the span from
/// the first to the last: a gap between two (no mapping) reports nothing
/// and what a walk says of another mapping inside the span is clipped
/// away, so any ranges give the per-range answers; the caller gives
/// neighbours (maps lines one after another) so that nothing else is
/// walked. A small process has ~30 mappings, mostly 4-5 segments per
/// library: a call each was most of its scan (bench-trees).
pub fn present_runs_group(pagemap: &File, ranges: &[(u64, u64)], only_anon: bool) -> std::io::Result<Vec<PageRuns>> {
    let per_range = || ranges.iter().map(|&(a, b)| present_runs(pagemap, a, b, only_anon)).collect();
    let (Some(&(start, _)), Some(&(_, end))) = (ranges.first(), ranges.last()) else { return Ok(Vec::new()) };
    if ranges.len() == 1 {
        return per_range();
    }
    // Without PAGEMAP_SCAN, pagemap is read page by page: the span's gaps
    // would cost, so each range is read alone.
    let Some(all) = walk_present(pagemap, start, end, only_anon)? else { return per_range() };
    Ok(ranges.iter().map(|&(a, b)| split(&all, start, a, b)).collect())
}

/// The runs of `all` (pages relative to `span_start`) inside `[a, b)`,
/// relative to `a`.
fn split(all: &PageRuns, span_start: u64, a: u64, b: u64) -> PageRuns {
    let (lo, hi) = ((a - span_start) / PAGE, (b - span_start) / PAGE);
    let mut out = PageRuns::new();
    for (x, y) in all.clip(lo, hi) {
        out.push(x - lo, y - lo);
    }
    out
}

/// [`uffd_written`] of several mappings in one walk (and one more call
/// that asks whether all of them are tracked): `ranges` are mappings one
/// after another in the process's maps, in increasing order, with no
/// other mapping between them (the walk protects again what it reports in
/// every mapping of the span). One answer per range.
///
/// A mapping not registered for tracking makes the walk fail (`EPERM`)
/// only when it gets there, after protecting the written pages of the
/// mappings before it: their writes would be lost. So the walk is made
/// only once a walk that changes nothing found every mapping of the span
/// registered (`PAGE_IS_WPALLOWED`: its registered mappings are skipped
/// without a look at their pages); otherwise each range is walked alone.
/// Should the walk fail anyway (a mapping that the first walk does not
/// see, `VM_PFNMAP`), no range's writes are known: each is captured
/// whole and registered again, as a new mapping would be.
pub fn uffd_written_group(pagemap: &File, ranges: &[(u64, u64)]) -> std::io::Result<Vec<Option<PageRuns>>> {
    uffd_written_group_each(pagemap, ranges, &mut |_, _| {})
}

/// [`uffd_written_group`], calling `each(j, runs)` with the written runs
/// of range `j` (pages relative to its start, in address order) as each
/// call of the walk returns them ([`uffd_written_each`]).
pub fn uffd_written_group_each(pagemap: &File, ranges: &[(u64, u64)], each: &mut dyn FnMut(usize, &[Run])) -> std::io::Result<Vec<Option<PageRuns>>> {
    let per_range = |each: &mut dyn FnMut(usize, &[Run])| -> std::io::Result<Vec<Option<PageRuns>>> {
        let mut out = Vec::with_capacity(ranges.len());
        for (j, &(a, b)) in ranges.iter().enumerate() {
            out.push(uffd_written_each(pagemap, a, b, &mut |r| each(j, r))?);
        }
        Ok(out)
    };
    let (Some(&(start, _)), Some(&(_, end))) = (ranges.first(), ranges.last()) else { return Ok(Vec::new()) };
    if ranges.len() == 1 {
        return per_range(each);
    }
    let untracked = Query { flags: 0, inverted: PAGE_IS_WPALLOWED, required: PAGE_IS_WPALLOWED, anyof: 0, returned: 0 };
    match scan_once(pagemap, start, end, untracked, 1) {
        Ok(0) => {}
        Ok(_) => return per_range(each),
        Err(e) => return Err(e),
    }
    // Each call's runs (pages relative to `start`) cut at the ranges'
    // bounds, relative to each range's start.
    let mut split_each = |runs: &[Run]| {
        let mut part = Vec::new();
        for (j, &(a, b)) in ranges.iter().enumerate() {
            let (lo, hi) = ((a - start) / PAGE, (b - start) / PAGE);
            part.clear();
            part.extend(runs.iter().filter(|r| r.0 < hi && r.1 > lo).map(|&(x, y, c)| (x.max(lo) - lo, y.min(hi) - lo, c)));
            if !part.is_empty() {
                each(j, &part);
            }
        }
    };
    match scan_each(pagemap, start, end, WRITTEN, false, &mut split_each) {
        Ok(Some((r, _))) => {
            let all = PageRuns::from_unsorted(r.into_iter().map(|(lo, hi, _)| (lo, hi)).collect());
            Ok(ranges.iter().map(|&(a, b)| Some(split(&all, start, a, b))).collect())
        }
        Ok(None) => unreachable!("scan answers None only without PM_SCAN_WP_MATCHING"),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Ok(vec![None; ranges.len()]),
        Err(e) => Err(e),
    }
}

/// How many runs (at most `max`, ≥ 1) one `PAGEMAP_SCAN` call reports
/// for `q` over `[start, end)`, stopping at the first `max` pages.
fn scan_once(pagemap: &File, start: u64, end: u64, q: Query, max: usize) -> std::io::Result<usize> {
    let mut vec = vec![PageRegion::default(); max.max(1)];
    let mut arg = PmScanArg {
        size: std::mem::size_of::<PmScanArg>() as u64,
        flags: q.flags,
        start,
        end,
        walk_end: 0,
        vec: vec.as_mut_ptr() as u64,
        vec_len: vec.len() as u64,
        max_pages: vec.len() as u64,
        category_inverted: q.inverted,
        category_mask: q.required,
        category_anyof_mask: q.anyof,
        return_mask: q.returned,
    };
    // SAFETY: PAGEMAP_SCAN reads `arg` and writes at most `vec_len`
    // page_regions into `vec`, which outlives the call.
    let r = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg as *mut PmScanArg) };
    if r < 0 { Err(std::io::Error::last_os_error()) } else { Ok(r as usize) }
}

/// Starts write tracking of ranges just registered with the process's
/// userfaultfd: protects the pages that hold data (holes need nothing; see
/// [`uffd_written`]). Runs while the process is stopped.
pub fn protect_registered(pid: i32, ranges: &[(u64, u64)]) -> std::io::Result<()> {
    let pagemap = File::open(format!("/proc/{pid}/pagemap"))?;
    for &(start, end) in ranges {
        // A range the agent could not register stays untracked: it is
        // captured whole again next time.
        uffd_written(&pagemap, start, end)?;
    }
    Ok(())
}

/// Is this pagemap entry a PTE marker (a swap entry of the marker type,
/// `SWP_PTE_MARKER`, whose offset holds marker bits such as
/// `PTE_MARKER_UFFD_WP`) rather than a page in swap? Pagemap shows swap type
/// and offset to root readers (the coordinator); to others they read 0 and
/// the page counts as present, which costs a read but is never wrong.
pub fn is_pte_marker(entry: u64) -> bool {
    const SWP_TYPE_MASK: u64 = 0x1f;
    const SWP_PTE_MARKER: u64 = 31;
    let offset = (entry >> 5) & ((1 << 50) - 1);
    entry & PM_SWAPPED != 0 && entry & SWP_TYPE_MASK == SWP_PTE_MARKER && offset != 0 && offset < 8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pagemap_sees_untouched_pages() {
        let len = 16 * PAGE as usize;
        // SAFETY: plain anonymous mapping, unmapped below.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: writing inside the mapping.
        unsafe { *(p as *mut u8).add(3 * PAGE as usize) = 1 };
        let pm = File::open("/proc/self/pagemap").unwrap();
        let e = pagemap_entries(&pm, p as u64, p as u64 + len as u64).unwrap();
        // SAFETY: unmapping what we mapped.
        unsafe { libc::munmap(p, len) };
        let present: Vec<usize> = e.iter().enumerate().filter(|(_, e)| *e & PM_PRESENT != 0).map(|(i, _)| i).collect();
        assert_eq!(present, vec![3]);
    }

    /// The walk for holes, the switch to the walk for present pages once
    /// holes are many, and pagemap read page by page agree.
    #[test]
    fn presence_walks_agree_with_pagemap() {
        let len = 1usize << 30;
        // SAFETY: an anonymous reservation, unmapped below.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE, -1, 0) };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: advice on our own mapping: 4 KiB pages, holes stay holes.
        unsafe { libc::madvise(p, len, libc::MADV_NOHUGEPAGE) };
        let (start, end) = (p as u64, p as u64 + len as u64);
        let pm = File::open("/proc/self/pagemap").unwrap();
        let touch = |pages: &mut dyn Iterator<Item = u64>| {
            for i in pages {
                // SAFETY: writing inside the mapping.
                unsafe { *(p as *mut u8).add((i * PAGE) as usize) = 1 };
            }
        };
        let agree = |what: &str| {
            let walked = present_runs(&pm, start, end, false).unwrap();
            let read = pagemap_runs(&pm, start, end, false, false).unwrap().0;
            assert_eq!(walked, read, "{what}");
            walked.count()
        };
        assert_eq!(agree("nothing touched"), 0);
        // Populated, with one hole: the holes' walk alone.
        touch(&mut (0..4096).filter(|&i| i != 1000));
        assert_eq!(agree("one hole"), 4095);
        // Thousands of holes (every third page of 24 MiB), then pages far
        // apart: the walk switches to asking for present pages.
        touch(&mut (8192..14336).filter(|i| i % 3 != 0));
        touch(&mut (100_000..262_144).step_by(9_999));
        assert_eq!(agree("many holes"), 4095 + 4096 + 17);
        // SAFETY: unmapping what we mapped.
        unsafe { libc::munmap(p, len) };
    }

    /// An anonymous mapping of `pages` pages, written whole, 4 KiB pages.
    fn written_mapping(pages: usize) -> u64 {
        let len = pages * PAGE as usize;
        // SAFETY: a plain anonymous mapping (the tests unmap it).
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: advice on the mapping just made; writing inside it.
        unsafe {
            libc::madvise(p, len, libc::MADV_NOHUGEPAGE);
            std::ptr::write_bytes(p as *mut u8, 1, len);
        }
        p as u64
    }

    fn write_page(addr: u64) {
        // SAFETY: the tests write pages of their own mappings.
        unsafe { std::ptr::write_volatile(addr as *mut u8, 7) };
    }

    /// A userfaultfd in async write-protect mode with `ranges` registered.
    fn track(ranges: &[(u64, u64)]) -> std::os::fd::OwnedFd {
        use std::os::fd::FromRawFd;
        // SAFETY: a new userfaultfd, owned below; API handshake and
        // registration with structs we own.
        unsafe {
            let fd = libc::syscall(SYS_USERFAULTFD, libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY) as i32;
            assert!(fd >= 0, "userfaultfd: {}", std::io::Error::last_os_error());
            let owned = std::os::fd::OwnedFd::from_raw_fd(fd);
            let mut api = UffdioApi { api: UFFD_API, features: UFFD_FEATURE_WP_ASYNC, ioctls: 0 };
            assert_eq!(libc::ioctl(fd, UFFDIO_API as _, &mut api as *mut UffdioApi), 0);
            for &(start, end) in ranges {
                let mut reg = UffdioRegister { start, len: end - start, mode: UFFDIO_REGISTER_MODE_WP, ioctls: 0 };
                assert_eq!(libc::ioctl(fd, UFFDIO_REGISTER as _, &mut reg as *mut UffdioRegister), 0, "{}", std::io::Error::last_os_error());
            }
            owned
        }
    }

    /// Written pages of mappings walked together are those of each
    /// walked alone; with one mapping among them not tracked, the walk
    /// together is not made, and the others' writes are not lost.
    #[test]
    fn written_walks_together_agree_and_lose_nothing() {
        let pm = File::open("/proc/self/pagemap").unwrap();
        let runs = |v: &[u64]| PageRuns::from_unsorted(v.iter().map(|&i| (i, i + 1)).collect());
        // Three mappings next to each other (the middle one read-only).
        let p = written_mapping(12);
        // SAFETY: a protection change inside our mapping.
        assert_eq!(unsafe { libc::mprotect((p + 4 * PAGE) as *mut libc::c_void, 4 * PAGE as usize, libc::PROT_READ) }, 0);
        let ranges = [(p, p + 4 * PAGE), (p + 4 * PAGE, p + 8 * PAGE), (p + 8 * PAGE, p + 12 * PAGE)];
        let uffd = track(&[(p, p + 12 * PAGE)]);
        // The first walk reports every page holding data (none protected yet).
        let first = uffd_written_group(&pm, &ranges).unwrap();
        assert_eq!(first, vec![Some(PageRuns::all(4)); 3]);
        write_page(p + PAGE);
        write_page(p + 9 * PAGE);
        write_page(p + 11 * PAGE);
        // What the walk hands out as it goes (per range, relative to its
        // start) is what it returns.
        let mut seen = vec![Vec::new(); 3];
        let got = uffd_written_group_each(&pm, &ranges, &mut |j, r| seen[j].extend(r.iter().map(|&(a, b, _)| (a, b)))).unwrap();
        assert_eq!(got, vec![Some(runs(&[1])), Some(runs(&[])), Some(runs(&[1, 3]))]);
        assert_eq!(seen, vec![vec![(1, 2)], vec![], vec![(1, 2), (3, 4)]]);
        write_page(p + 2 * PAGE);
        write_page(p + 8 * PAGE);
        let alone: Vec<_> = ranges.iter().map(|&(a, b)| uffd_written(&pm, a, b).unwrap()).collect();
        assert_eq!(alone, vec![Some(runs(&[2])), Some(runs(&[])), Some(runs(&[0]))]);
        drop(uffd);

        // The middle one not registered: None for it, the writes of the
        // one before it still reported.
        let q = written_mapping(12);
        let ranges = [(q, q + 4 * PAGE), (q + 4 * PAGE, q + 8 * PAGE), (q + 8 * PAGE, q + 12 * PAGE)];
        let uffd = track(&[ranges[0], ranges[2]]);
        uffd_written_group(&pm, &ranges).unwrap();
        write_page(q + 3 * PAGE);
        write_page(q + 5 * PAGE);
        write_page(q + 10 * PAGE);
        let mut seen = vec![Vec::new(); 3];
        let got = uffd_written_group_each(&pm, &ranges, &mut |j, r| seen[j].extend(r.iter().map(|&(a, b, _)| (a, b)))).unwrap();
        assert_eq!(got, vec![Some(runs(&[3])), None, Some(runs(&[2]))]);
        assert_eq!(seen, vec![vec![(3, 4)], vec![], vec![(2, 3)]]);
        drop(uffd);
        // SAFETY: unmapping what we mapped.
        unsafe {
            libc::munmap(p as *mut libc::c_void, 12 * PAGE as usize);
            libc::munmap(q as *mut libc::c_void, 12 * PAGE as usize);
        }
    }

    /// Presence of mappings walked together (neighbours, or with a gap of
    /// nothing mapped between them) is that of each walked alone.
    #[test]
    fn presence_walks_together_agree() {
        let pm = File::open("/proc/self/pagemap").unwrap();
        let p = written_mapping(16);
        // Holes: pages dropped; a different protection splits mappings;
        // a gap unmapped.
        // SAFETY: advice, protection change and unmapping inside our mapping.
        unsafe {
            libc::madvise((p + PAGE) as *mut libc::c_void, 2 * PAGE as usize, libc::MADV_DONTNEED);
            libc::madvise((p + 6 * PAGE) as *mut libc::c_void, PAGE as usize, libc::MADV_DONTNEED);
            assert_eq!(libc::mprotect((p + 4 * PAGE) as *mut libc::c_void, 4 * PAGE as usize, libc::PROT_READ), 0);
            libc::munmap((p + 8 * PAGE) as *mut libc::c_void, 2 * PAGE as usize);
            libc::madvise((p + 15 * PAGE) as *mut libc::c_void, PAGE as usize, libc::MADV_DONTNEED);
        }
        let ranges = [(p, p + 4 * PAGE), (p + 4 * PAGE, p + 8 * PAGE), (p + 10 * PAGE, p + 16 * PAGE)];
        let alone: Vec<_> = ranges.iter().map(|&(a, b)| present_runs(&pm, a, b, false).unwrap()).collect();
        assert_eq!(alone[0], PageRuns::from_unsorted(vec![(0, 1), (3, 4)]));
        assert_eq!(alone[1], PageRuns::from_unsorted(vec![(0, 2), (3, 4)]));
        assert_eq!(alone[2], PageRuns::all(5));
        assert_eq!(present_runs_group(&pm, &ranges, false).unwrap(), alone);
        // SAFETY: unmapping what we mapped.
        unsafe {
            libc::munmap(p as *mut libc::c_void, 8 * PAGE as usize);
            libc::munmap((p + 10 * PAGE) as *mut libc::c_void, 6 * PAGE as usize);
        }
    }

    #[test]
    fn markers_are_not_swapped_pages() {
        let marker = PM_SWAPPED | (1 << 5) | 31;
        assert!(is_pte_marker(marker));
        assert!(!is_pte_marker(PM_SWAPPED | (12345 << 5) | 1));
        assert!(!is_pte_marker(PM_PRESENT | 31));
    }
}
