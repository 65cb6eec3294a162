//! Memory attributes of a region that `madvise` and `mlock` set and that
//! fork, core dumps, THP and KSM obey: read at checkpoint from the
//! mapping's `VmFlags` (`/proc/PID/smaps`), set again at restart once the
//! region holds its contents.
//!
//! | VmFlags | set with |
//! |---|---|
//! | `dc` | `MADV_DONTFORK` |
//! | `wf` | `MADV_WIPEONFORK` |
//! | `hg` / `nh` | `MADV_HUGEPAGE` / `MADV_NOHUGEPAGE` |
//! | `dd` | `MADV_DONTDUMP` |
//! | `mg` | `MADV_MERGEABLE` (best effort: KSM may be off) |
//! | `lo` | `mlock` (a restart without room under `RLIMIT_MEMLOCK` fails naming the region) |
//!
//! The kernel's own mappings (`[vvar]`, `[vdso]`, ...) carry some of these
//! flags by themselves: they are left out. `mlockall(MCL_FUTURE)` lives in
//! the mm, invisible in `/proc`: not recorded yet.

use crate::error::Result;
use crate::image::RegionImage;
use crate::plan::PlanBuilder;
use crate::procfs;

/// The flags recorded, each with the call that sets it again.
const ATTRS: [(&str, i64, i32); 7] = [
    ("dc", libc::SYS_madvise, libc::MADV_DONTFORK),
    ("wf", libc::SYS_madvise, libc::MADV_WIPEONFORK),
    ("hg", libc::SYS_madvise, libc::MADV_HUGEPAGE),
    ("nh", libc::SYS_madvise, libc::MADV_NOHUGEPAGE),
    ("dd", libc::SYS_madvise, libc::MADV_DONTDUMP),
    ("mg", libc::SYS_madvise, libc::MADV_MERGEABLE),
    ("lo", libc::SYS_mlock, 0),
];

fn ours(r: &RegionImage) -> bool {
    !r.name.starts_with("[v")
}

/// Records each region's attributes (`RegionImage::attrs`) from `smaps`.
pub fn capture(pid: i32, regions: &mut [RegionImage]) -> Result<()> {
    let starts: Vec<u64> = regions.iter().filter(|r| ours(r)).map(|r| r.start).collect();
    apply(regions, &procfs::vm_flags(pid, &starts)?);
    Ok(())
}

/// Records each region's attributes from `VmFlags` already read
/// ([`procfs::vm_flags`], by region start; a region missing there gets none).
pub fn apply(regions: &mut [RegionImage], flags: &std::collections::HashMap<u64, Vec<String>>) {
    for r in regions.iter_mut().filter(|r| ours(r)) {
        r.attrs = flags
            .get(&r.start)
            .map(|v| ATTRS.iter().filter(|(f, ..)| v.iter().any(|x| x == f)).map(|(f, ..)| f.to_string()).collect())
            .unwrap_or_default();
    }
}

/// Whether the region is wiped in a forked child (`MADV_WIPEONFORK`): a
/// forked snapshot reads zeros there, so it is read while the process is
/// stopped.
pub fn wiped_on_fork(r: &RegionImage) -> bool {
    r.attrs.iter().any(|a| a == "wf")
}

/// Restart: the calls that set each region's attributes again, after its
/// memory is filled (an `mlock` then locks the restored pages).
pub fn plan(p: &mut PlanBuilder, regions: &[RegionImage]) {
    for r in regions.iter().filter(|r| ours(r)) {
        for (flag, nr, advice) in ATTRS.iter().filter(|(f, ..)| r.attrs.iter().any(|a| a == f)) {
            let len = r.end - r.start;
            let best_effort = *flag == "mg";
            let what = if *nr == libc::SYS_mlock {
                format!("mlock {:#x}-{:#x} {} (locked at the checkpoint; raise RLIMIT_MEMLOCK or restart as root)", r.start, r.end, r.name)
            } else {
                format!("madvise {:#x}-{:#x} {} (VmFlags {flag})", r.start, r.end, r.name)
            };
            let args = if *nr == libc::SYS_mlock { vec![r.start.into(), len.into()] } else { vec![r.start.into(), len.into(), (*advice as u64).into()] };
            p.syscall(*nr, &args, Some(0), best_effort, what);
        }
    }
}
