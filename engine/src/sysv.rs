//! SysV shared memory segments (`shmget`/`shmat`) at restart.
//!
//! A checkpoint records each segment a process has attached
//! ([`SysvShm`], from `/proc/sysvipc/shm`) and, per mapping, the segment's
//! id and whether the attach was read-only ([`crate::image::SysvAttach`]).
//! The content is recorded once, in the mappings, like other shared memory.
//!
//! At restart, before any process exists, the driver makes each segment
//! again with its key and its id (`/proc/sys/kernel/shm_next_id`, which
//! needs `CONFIG_CHECKPOINT_RESTORE`), its size, mode and owner, and writes
//! its content through an attach of its own, detached right after. Each
//! restorer then attaches it with `shmat(SHM_REMAP)` at the recorded
//! address, so that `shm_nattch`, `shmdt` and `shmctl` behave as before.
//! A segment that had been removed (`IPC_RMID`) while attached is removed
//! again once every process has attached it.
//!
//! What a killed computation leaves: a keyed segment outlives its last
//! detach. A segment in the way of the restart (same id or key) is
//! replaced only if it is that leftover, recognized from what the kernel
//! says of it in `/proc/sysvipc/shm`: the recorded id, key and size, no
//! attach, and the last process that attached or detached it (or its
//! creator) one of the generation's processes. Anything else is refused
//! naming the `ipcrm` that removes it.

use std::collections::{BTreeMap, HashMap};

use ckpt_chunker::Hash;
use ckpt_store::Store;

use crate::error::{EngineError, Result};
use crate::image::{ProcessImage, RegionImage, SysvShm};
use crate::plan::PlanBuilder;
use crate::procfs;

const SHM_NEXT_ID: &str = "/proc/sys/kernel/shm_next_id";
const PAGE: u64 = 4096;

/// The segments a restart made. Until [`Segments::keep`], dropping them
/// removes them (a failed restart leaves none behind).
pub struct Segments {
    made: Vec<SysvShm>,
    armed: bool,
}

impl Drop for Segments {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        for s in &self.made {
            rmid(s.shmid);
        }
    }
}

fn rmid(shmid: i32) -> bool {
    // SAFETY: IPC_RMID takes no buffer.
    unsafe { libc::shmctl(shmid, libc::IPC_RMID, std::ptr::null_mut()) == 0 }
}

/// The fix for a segment in the way.
fn in_the_way(generation: u64, seg: &SysvShm, what: String, other: i32) -> EngineError {
    EngineError::Restore {
        generation,
        what: format!(
            "the SysV shared memory segment {} (key {:#x}, {} bytes) cannot be made again: {what}. If it is what the checkpointed program left behind, remove it with `ipcrm -m {other}` and restart again",
            seg.shmid, seg.key, seg.size
        ),
    }
}

impl Segments {
    /// Makes every SysV segment the `images` attach, with its content.
    pub fn make(store: &Store, generation: u64, images: &[ProcessImage]) -> Result<Segments> {
        let mut segs: BTreeMap<i32, SysvShm> = BTreeMap::new();
        for s in images.iter().flat_map(|i| &i.sysv_shm) {
            segs.entry(s.shmid).or_insert(*s);
        }
        let pids: std::collections::HashSet<i32> = images.iter().map(|i| i.pid).collect();
        let mut out = Segments { made: Vec::new(), armed: true };
        for seg in segs.values() {
            remove_our_leftover(seg, &pids);
            make_one(generation, seg)?;
            out.made.push(*seg);
            fill(store, generation, seg, images)?;
        }
        Ok(out)
    }

    /// Removes again the segments that had been removed while attached
    /// (once every process has attached them).
    pub fn remove_removed(&self, generation: u64) -> Result<()> {
        for s in self.made.iter().filter(|s| s.removed()) {
            if !rmid(s.shmid) {
                return Err(EngineError::Restore { generation, what: format!("cannot remove SysV segment {} again (IPC_RMID): {}", s.shmid, std::io::Error::last_os_error()) });
            }
        }
        Ok(())
    }

    /// The restart went through: the segments stay.
    pub fn keep(mut self) {
        self.armed = false;
    }
}

/// Removes the segment the killed computation left where `seg` must be
/// made again, if there is one (see the module's doc): same id, key and
/// size, no attach, last used (or made) by one of `pids`.
fn remove_our_leftover(seg: &SysvShm, pids: &std::collections::HashSet<i32>) {
    let Ok(text) = std::fs::read_to_string("/proc/sysvipc/shm") else { return };
    for l in text.lines().skip(1) {
        // key shmid perms size cpid lpid nattch ...
        let f: Vec<i64> = l.split_whitespace().take(7).map_while(|x| x.parse().ok()).collect();
        let [key, shmid, _perms, size, cpid, lpid, nattch] = f[..] else { continue };
        if shmid != seg.shmid as i64 || key != seg.key as i64 || size != seg.size as i64 || nattch != 0 {
            continue;
        }
        if !pids.contains(&(lpid as i32)) && !pids.contains(&(cpid as i32)) {
            continue;
        }
        if rmid(seg.shmid) {
            tracing::info!(shmid = seg.shmid, key = seg.key, "removed the SysV segment the killed computation left (no attach, last used by its process {lpid}) to make it again");
        } else {
            tracing::warn!(shmid = seg.shmid, "cannot remove the SysV segment the killed computation left: {}", std::io::Error::last_os_error());
        }
    }
}

/// `shmget` with the segment's key that yields the segment's id.
fn make_one(generation: u64, seg: &SysvShm) -> Result<()> {
    let err = |what: String| EngineError::Restore { generation, what: format!("SysV shared memory segment {} (key {:#x}): {what}", seg.shmid, seg.key) };
    let now = procfs::sysv_shm().map_err(|e| err(format!("cannot read /proc/sysvipc/shm: {e}")))?;
    if let Some(o) = now.get(&seg.shmid) {
        return Err(in_the_way(generation, seg, format!("id {} is taken (key {:#x}, {} bytes)", o.shmid, o.key, o.size), o.shmid));
    }
    let keyed = seg.key != libc::IPC_PRIVATE;
    if keyed && let Some(o) = now.values().find(|o| o.key == seg.key) {
        return Err(in_the_way(generation, seg, format!("its key is taken by segment {}", o.shmid), o.shmid));
    }
    std::fs::write(SHM_NEXT_ID, seg.shmid.to_string())
        .map_err(|e| err(format!("cannot ask for its id through {SHM_NEXT_ID}: {e} (needs root or CAP_CHECKPOINT_RESTORE, and a kernel with CONFIG_CHECKPOINT_RESTORE)")))?;
    let flags = libc::IPC_CREAT | libc::IPC_EXCL | (seg.mode & 0o777) as i32;
    // SAFETY: shmget takes no pointers.
    let id = unsafe { libc::shmget(seg.key, seg.size as usize, flags) };
    if id < 0 {
        let e = std::io::Error::last_os_error();
        let _ = std::fs::write(SHM_NEXT_ID, "-1");
        return Err(err(format!("shmget of {} bytes failed: {e}", seg.size)));
    }
    if id != seg.shmid {
        rmid(id);
        // Another segment holds the same slot under another sequence number.
        let holder = now.values().find(|o| o.shmid & 0x7fff == seg.shmid & 0x7fff).map(|o| o.shmid);
        return Err(match holder {
            Some(h) => in_the_way(generation, seg, format!("its slot is taken by segment {h}"), h),
            None => err(format!("the kernel gave it id {id} (is {SHM_NEXT_ID} supported? another program may have made a segment at the same moment: restart again)")),
        });
    }
    let fail = |what: &str| {
        let e = std::io::Error::last_os_error();
        rmid(id);
        err(format!("{what}: {e}"))
    };
    // SAFETY: a zeroed shmid_ds filled by IPC_STAT, then passed to IPC_SET.
    unsafe {
        let mut ds: libc::shmid_ds = std::mem::zeroed();
        if libc::shmctl(id, libc::IPC_STAT, &mut ds) != 0 {
            return Err(fail("IPC_STAT"));
        }
        ds.shm_perm.uid = seg.uid;
        ds.shm_perm.gid = seg.gid;
        ds.shm_perm.mode = (seg.mode & 0o777) as _;
        if libc::shmctl(id, libc::IPC_SET, &mut ds) != 0 {
            return Err(fail("setting its owner and mode (IPC_SET)"));
        }
        if seg.mode & SysvShm::SHM_LOCKED != 0 && libc::shmctl(id, libc::SHM_LOCK, std::ptr::null_mut()) != 0 {
            return Err(fail("locking it in memory (SHM_LOCK)"));
        }
    }
    Ok(())
}

/// Writes the segment's content (from the first mapping of each chunk)
/// through an attach of the driver's own.
fn fill(store: &Store, generation: u64, seg: &SysvShm, images: &[ProcessImage]) -> Result<()> {
    let err = |what: String| EngineError::Restore { generation, what: format!("SysV shared memory segment {}: {what}", seg.shmid) };
    let len = seg.size.next_multiple_of(PAGE);
    let mut dests: HashMap<Hash, Vec<(u64, usize)>> = HashMap::new();
    let mut written = std::collections::HashSet::new();
    for image in images {
        let chunk = image.chunk_size as u64;
        for r in image.regions.iter().filter(|r| r.sysv.is_some_and(|a| a.shmid == seg.shmid) && !r.segments.is_empty()) {
            let hashes = crate::chunklist::load(store, generation, &r.segments, r.depth)?;
            check_region(generation, image, r, hashes.len(), len)?;
            for (i, h) in hashes.into_iter().enumerate() {
                let off = r.offset + i as u64 * chunk;
                let n = (r.end - r.start - i as u64 * chunk).min(chunk);
                if written.insert(off) && h != Hash::ZERO_CHUNK {
                    dests.entry(h).or_default().push((off, n as usize));
                }
            }
        }
    }
    if dests.is_empty() {
        return Ok(());
    }
    // SAFETY: shmat of a segment we just made, anywhere in our space.
    let at = unsafe { libc::shmat(seg.shmid, std::ptr::null(), 0) };
    if at as isize == -1 {
        return Err(err(format!("the driver cannot attach it to fill it: {}", std::io::Error::last_os_error())));
    }
    let base = at as usize;
    let hashes: Vec<Hash> = dests.keys().copied().collect();
    let r = store.read_blobs(&hashes, |h, data| {
        for &(off, n) in dests.get(h).map(|v| v.as_slice()).unwrap_or(&[]) {
            if data.len() != n {
                let e = std::io::Error::other(format!("chunk {h} is {} bytes, the segment needs {n} at offset {off}", data.len()));
                return Err(ckpt_store::StoreError::Callback(Box::new(e)));
            }
            // SAFETY: off + n <= len (check_region): inside our attach,
            // which no one else writes while the restart runs.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), (base + off as usize) as *mut u8, n) };
        }
        Ok(())
    });
    // SAFETY: detaching our own attach; nothing refers to it any more.
    unsafe { libc::shmdt(at) };
    r?;
    Ok(())
}

fn check_region(generation: u64, image: &ProcessImage, r: &RegionImage, nhashes: usize, len: u64) -> Result<()> {
    let n = (r.end - r.start).div_ceil(image.chunk_size as u64) as usize;
    if nhashes != n || r.offset + (r.end - r.start) > len {
        return Err(EngineError::BadImage {
            generation,
            what: format!("region {:#x}-{:#x} of process {} does not fit its SysV segment ({} chunks, offset {}, segment of {len} bytes)", r.start, r.end, image.pid, nhashes, r.offset),
        });
    }
    Ok(())
}

/// Plan steps that attach the process's SysV segments where they were
/// (each attach maps the whole segment; parts the process had unmapped are
/// unmapped again, and parts whose protection it had changed protected
/// again). Before the other regions are mapped, which may map over a part
/// the process had unmapped.
pub fn plan_attaches(p: &mut PlanBuilder, image: &ProcessImage) {
    // (shmid, attach address) → the regions of that attach, in order.
    let mut attaches: BTreeMap<(i32, u64), Vec<&RegionImage>> = BTreeMap::new();
    for r in &image.regions {
        if let Some(a) = r.sysv {
            attaches.entry((a.shmid, r.start - r.offset)).or_default().push(r);
        }
    }
    for ((shmid, base), regions) in attaches {
        let Some(seg) = image.sysv_shm.iter().find(|s| s.shmid == shmid) else { continue };
        let len = seg.size.next_multiple_of(PAGE);
        let rdonly = regions.iter().all(|r| r.sysv.is_some_and(|a| a.rdonly));
        let flags = libc::SHM_REMAP | if rdonly { libc::SHM_RDONLY } else { 0 };
        let prot = (libc::PROT_READ | if rdonly { 0 } else { libc::PROT_WRITE }) as u32;
        p.syscall(libc::SYS_shmat, &[(shmid as u64).into(), base.into(), (flags as u64).into()], Some(base), false, format!("attach SysV segment {shmid} at {base:#x}"));
        let mut at = base;
        for r in &regions {
            if r.start > at {
                p.syscall(libc::SYS_munmap, &[at.into(), (r.start - at).into()], None, false, format!("unmap {at:#x}-{:#x} of SysV segment {shmid}", r.start));
            }
            if r.prot != prot {
                p.syscall(libc::SYS_mprotect, &[r.start.into(), (r.end - r.start).into(), (r.prot as u64).into()], None, false, format!("protect {:#x}-{:#x} of SysV segment {shmid}", r.start, r.end));
            }
            at = r.end;
        }
        if base + len > at {
            p.syscall(libc::SYS_munmap, &[at.into(), (base + len - at).into()], None, false, format!("unmap {at:#x}-{:#x} of SysV segment {shmid}", base + len));
        }
    }
}
