//! Taking a process's image while its agent holds every thread stopped.
//!
//! Everything is read from outside: `/proc/PID` for the map, fds and mm
//! fields, `process_vm_readv` for memory. Memory is cut into page-aligned
//! chunks per mapping, hashed in parallel; only chunks the store does not
//! already hold are compressed and written.

use std::collections::HashMap;
use std::fs::File;
use std::sync::OnceLock;

use ckpt_chunker::Hash;
use ckpt_store::BlobSink;
use ckpt_wire::Pod;
use ckpt_wire::agent::{Hello, MAX_THREADS, MAX_TIMERS, Suspended, ThreadState, TimerValue};
use ckpt_wire::restore::{ZONE_END, ZONE_START};
use rayon::prelude::*;

use crate::copybuf::CopyBuf;
use crate::dirty::{self, Backend};
use crate::error::{EngineError, Result};
use crate::image::*;
use crate::pages::{PageRuns, SparseChunks};
use crate::procfs::{self, Mapping};
use crate::remote;

/// What the agent reported once every thread stopped.
#[derive(Clone, Debug)]
pub struct AgentReport {
    pub hello: Hello,
    pub suspended: Suspended,
    pub threads: Vec<ThreadState>,
}

/// Why an agent's SUSPENDED report is refused (it comes from inside the
/// checkpointed program: nothing in it is trusted before it is checked).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    #[error("its HELLO names pid {0}, not a process")]
    BadPid(i32),
    #[error("its SUSPENDED report is {len} bytes, shorter than the {min}-byte header")]
    Short { len: usize, min: usize },
    #[error("its SUSPENDED report counts {0} threads (1 to {max})", max = MAX_THREADS + 1)]
    ThreadCount(u32),
    #[error("its SUSPENDED report counts {nthreads} threads in {len} bytes (that count takes {want})")]
    Size { nthreads: u32, len: usize, want: usize },
    #[error("its SUSPENDED report gives thread {index} the id {tid}")]
    BadTid { index: usize, tid: i32 },
    #[error("its SUSPENDED report lists thread {0} twice")]
    DuplicateTid(i32),
    #[error("its SUSPENDED report marks {0} threads as the checkpoint thread (exactly one is)")]
    CkptThreads(usize),
}

impl AgentReport {
    /// Decodes a SUSPENDED payload: every count is checked against the
    /// wire limits and the payload's actual size before anything is
    /// allocated for it or read from it.
    pub fn parse(hello: &Hello, payload: &[u8]) -> std::result::Result<AgentReport, ReportError> {
        if hello.pid <= 0 {
            return Err(ReportError::BadPid(hello.pid));
        }
        let ts = size_of::<ThreadState>();
        let v1 = ckpt_wire::agent::SUSPENDED_V1_LEN;
        // The thread count comes first in both layouts.
        let nthreads = payload.get(..4).map(|b| u32::from_le_bytes(b.try_into().unwrap_or([0; 4]))).ok_or(ReportError::Short { len: payload.len(), min: v1 })?;
        let n = nthreads as usize;
        if n == 0 || n > MAX_THREADS + 1 {
            return Err(ReportError::ThreadCount(nthreads));
        }
        // An agent restored from an older image sends the shorter header,
        // without its fds: those of its HELLO then hold.
        let base = if payload.len() == v1 + n * ts { v1 } else { size_of::<Suspended>() };
        let want = base + n * ts;
        if payload.len() != want {
            return Err(ReportError::Size { nthreads, len: payload.len(), want });
        }
        let mut head = [0u8; size_of::<Suspended>()];
        head[..base].copy_from_slice(&payload[..base]);
        let mut s = Suspended::read_from(&head).ok_or(ReportError::Short { len: payload.len(), min: base })?;
        if base == v1 {
            (s.agent_fd, s.uffd_fd) = (hello.agent_fd, hello.uffd_fd);
        }
        let threads: Vec<ThreadState> = payload[base..].chunks_exact(ts).filter_map(ThreadState::read_from).collect();
        let mut tids = std::collections::HashSet::with_capacity(n);
        for (index, t) in threads.iter().enumerate() {
            if t.tid <= 0 {
                return Err(ReportError::BadTid { index, tid: t.tid });
            }
            if !tids.insert(t.tid) {
                return Err(ReportError::DuplicateTid(t.tid));
            }
        }
        let ckpt = threads.iter().filter(|t| t.is_ckpt_thread != 0).count();
        if ckpt != 1 {
            return Err(ReportError::CkptThreads(ckpt));
        }
        Ok(AgentReport { hello: *hello, suspended: s, threads })
    }

    /// The agent's own fds at this checkpoint (its connection first, then
    /// its userfaultfd or -1): not the program's. They may have moved
    /// since HELLO (the program took their numbers).
    pub fn agent_fds(&self) -> [i32; 2] {
        [self.suspended.agent_fd, self.suspended.uffd_fd]
    }
}

/// Byte counts of one capture.
#[derive(Clone, Copy, Debug, Default)]
pub struct CaptureStats {
    /// Size of all regions whose content is recorded.
    pub logical_bytes: u64,
    /// Bytes read from the process.
    pub read_bytes: u64,
    /// Milliseconds [`prepare`] spent in the page scans (presence and
    /// dirtiness), part of the stopped time.
    pub scan_ms: f64,
    /// Milliseconds [`prepare`] spent on everything else (metadata).
    pub meta_ms: f64,
}

/// Bytes read and hashed at a time (two windows are in flight: one being
/// read from the process, one being hashed and stored).
const WINDOW: usize = 16 << 20;

/// Classifies a mapping.
pub fn region_kind(m: &Mapping) -> RegionKind {
    match m.name.as_str() {
        "[heap]" => RegionKind::Heap,
        "[stack]" => RegionKind::Stack,
        "[vdso]" => RegionKind::Vdso,
        "[vvar]" => RegionKind::Vvar,
        "[vvar_vclock]" => RegionKind::VvarVclock,
        name if m.shared => {
            if name.is_empty() || name.starts_with("/dev/zero") || name.starts_with("/SYSV") || name.starts_with("/memfd:") || name.starts_with('[') || name.starts_with("/dev/shm/") || name.ends_with(" (deleted)") {
                RegionKind::SharedAnon
            } else {
                RegionKind::SharedFile
            }
        }
        _ => RegionKind::Private,
    }
}

/// The size of the POSIX shared memory object `m` maps: through
/// `/proc/PID/map_files` (the mapped file itself; needs
/// `CAP_CHECKPOINT_RESTORE` over the machine), else through its name if
/// the file there is still the mapped inode. None for other mappings or
/// when neither answers.
fn posix_shm_size(pid: i32, m: &Mapping, kind: RegionKind) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    if kind != RegionKind::SharedAnon || !m.name.starts_with("/dev/shm/") || m.name.ends_with(" (deleted)") {
        return None;
    }
    if let Ok(md) = std::fs::metadata(format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end)) {
        return Some(md.len());
    }
    std::fs::metadata(&m.name).ok().filter(|md| md.ino() == m.inode).map(|md| md.len())
}

/// Private memory of no file: a page no page table holds reads zero.
/// Never a shared mapping: presence is per page table, so another process
/// may have written a page this one never touched; and a SysV segment's
/// mapping shows its id as the inode, which is 0 for the first segment of
/// an IPC namespace.
fn is_anonymous(m: &Mapping) -> bool {
    m.inode == 0 && !m.shared
}

/// What a previous capture of the same process left for the next one:
/// per region (by start address), its chunk hashes and which pages were
/// present. Valid only while dirty tracking has run without a gap since.
#[derive(Clone, Debug, Default)]
pub struct Base {
    pub generation: u64,
    pub regions: HashMap<u64, BaseRegion>,
}

#[derive(Clone, Debug)]
pub struct BaseRegion {
    pub end: u64,
    pub hashes: SparseChunks,
    /// The chunk-list tree stored for `hashes` (its top nodes and depth):
    /// reused as it is when the next capture's hashes are the same.
    pub tree: (Vec<Hash>, u32),
    /// That tree's nodes, per level: the next capture stores only the
    /// nodes whose children changed ([`crate::chunklist::store_sparse_from`]).
    pub levels: crate::chunklist::Levels,
    pub present: PageRuns,
    /// Its `MAP_NORESERVE` and attributes then ([`Prepared::read_vm_flags`]).
    pub noreserve: bool,
    pub attrs: Vec<String>,
}

/// What two readers of one stopped process share within a round: the
/// round's fd reader (its fds and temporary files,
/// [`crate::fds::Round::capture_process`], [`crate::tmpfiles::capture`])
/// and the worker that runs [`prepare`] read `/proc/PID/maps` and the
/// status file of its main thread once between them (each was read
/// twice, the status file up to five times). The process is stopped, so
/// one read serves both. Both open its files through one
/// [`procfs::ProcDir`].
pub struct ProcReads {
    pid: i32,
    dir: OnceLock<Shared<procfs::ProcDir>>,
    maps: OnceLock<Shared<Vec<Mapping>>>,
    status: OnceLock<Shared<String>>,
    stat: OnceLock<Shared<String>>,
}

/// A shared read's outcome: a failure is kept as what it said (an
/// [`EngineError`] is not `Clone`) and given to every caller as it was,
/// without reading again.
type Shared<T> = std::result::Result<T, Failed>;

/// A failed read of `/proc/PID/...`, to be told to each caller.
#[derive(Clone, Debug)]
struct Failed {
    path: std::path::PathBuf,
    os: Option<i32>,
    kind: std::io::ErrorKind,
    text: String,
}

impl Failed {
    fn of(pid: i32, what: &str, e: EngineError) -> Failed {
        match e {
            EngineError::Proc { path, source, .. } => Failed { path, os: source.raw_os_error(), kind: source.kind(), text: source.to_string() },
            other => Failed { path: format!("/proc/{pid}/{what}").into(), os: None, kind: std::io::ErrorKind::Other, text: other.to_string() },
        }
    }

    fn error(&self, pid: i32) -> EngineError {
        let source = self.os.map_or_else(|| std::io::Error::new(self.kind, self.text.clone()), std::io::Error::from_raw_os_error);
        EngineError::Proc { pid, path: self.path.clone(), source }
    }
}

impl ProcReads {
    pub fn new(pid: i32) -> ProcReads {
        ProcReads { pid, dir: OnceLock::new(), maps: OnceLock::new(), status: OnceLock::new(), stat: OnceLock::new() }
    }

    /// The first read of `cell` by `read`, or its failure again.
    fn shared<'a, T>(&self, cell: &'a OnceLock<Shared<T>>, what: &str, read: impl FnOnce() -> Result<T>) -> Result<&'a T> {
        cell.get_or_init(|| read().map_err(|e| Failed::of(self.pid, what, e))).as_ref().map_err(|f| f.error(self.pid))
    }

    /// `/proc/PID`, opened by the first caller.
    pub fn dir(&self) -> Result<&procfs::ProcDir> {
        self.shared(&self.dir, "", || procfs::ProcDir::open(self.pid))
    }

    /// The text of `/proc/PID/stat` (tree ids and mm fields both).
    pub fn stat(&self) -> Result<&str> {
        self.shared(&self.stat, "stat", || self.dir()?.text("stat", procfs::Whole::InOneRead)).map(String::as_str)
    }

    /// `/proc/PID/maps`, read by the first caller.
    pub fn maps(&self) -> Result<&[Mapping]> {
        self.shared(&self.maps, "maps", || procfs::maps_in(self.dir()?)).map(Vec::as_slice)
    }

    /// The text of `/proc/PID/task/PID/status` (the main thread's).
    pub fn status(&self) -> Result<&str> {
        self.shared(&self.status, "task/PID/status", || self.read_status(self.pid)).map(String::as_str)
    }

    fn read_status(&self, tid: i32) -> Result<String> {
        self.dir()?.text(&format!("task/{tid}/status"), procfs::Whole::InOneRead)
    }

    /// The status text of thread `tid`: the shared one for the main
    /// thread, a read of its own otherwise.
    fn thread_status(&self, tid: i32) -> Result<std::borrow::Cow<'_, str>> {
        if tid == self.pid { self.status().map(std::borrow::Cow::Borrowed) } else { self.read_status(tid).map(std::borrow::Cow::Owned) }
    }
}

/// The identities of the files mapped by one round's processes
/// ([`mapped_file`]): a library mapped by every process of a computation
/// (libc, the loader, the agent) is opened and identified once per round,
/// not once per mapping of every process (a path walk through
/// `/proc/PID/root`, an open and two `fstat`s each; 5 files under 24
/// mappings per process of bench-trees). The key is what the answer
/// depends on: the process's mount namespace and root directory (the
/// same path names the same file in both), the path and the inode the
/// mapping shows. A round's processes are all stopped at once, and a
/// generation is one instant: all of them record the file as the round
/// found it (a file changed on disk afterwards is refused at restart as
/// before, [`crate::restore`]).
///
/// It also keeps the round's read of the SysV IPC tables
/// ([`crate::sysvipc::Tables`]), the namespace's and not a process's.
#[derive(Default)]
pub struct RoundFiles {
    /// Each file's identity, made by the first worker that asks (a second
    /// one asking meanwhile waits for it rather than opening it too).
    ids: std::sync::Mutex<HashMap<FileKey, std::sync::Arc<OnceLock<Option<MappedFile>>>>>,
    ipc: crate::sysvipc::Tables,
    /// The round's processes ([`RoundFiles::with_members`]).
    members: std::collections::HashSet<i32>,
}

/// (mount namespace, root directory: each `(st_dev, st_ino)`), path, the
/// mapping's inode.
type FileKey = ((u64, u64), (u64, u64), String, u64);

impl RoundFiles {
    pub fn new() -> RoundFiles {
        RoundFiles::default()
    }

    /// Says which processes the round reads (all stopped): a child among
    /// them is not looked at as a possible zombie of its parent.
    pub fn with_members(mut self, pids: impl IntoIterator<Item = i32>) -> RoundFiles {
        self.members = pids.into_iter().collect();
        self
    }
}

/// Where a process resolves paths: its mount namespace and root
/// directory, None when either cannot be read (no sharing then).
fn resolution_of(dir: &procfs::ProcDir) -> Option<((u64, u64), (u64, u64))> {
    Some((dir.dev_ino("ns/mnt").ok()?, dir.dev_ino("root").ok()?))
}

/// A capture in progress: metadata taken and dirty pages known (while the
/// process was stopped); memory still to store.
pub struct Prepared {
    pub image: ProcessImage,
    pub backend: Backend,
    pub stats: CaptureStats,
    /// Regions whose writes were not tracked (to register for uffd-wp).
    pub untracked: Vec<(u64, u64)>,
    /// Mappings the snapshot fork must not copy (SysV attaches).
    pub no_fork: Vec<(u64, u64)>,
    regions: Vec<RegionState>,
    /// [`Prepared::read_vm_flags`] ran.
    flags_read: bool,
    /// When the process may be copied out ([`prepare`]'s `copy`).
    copy: Option<CopyRule>,
    /// The copy begun while the pages were scanned.
    ahead: Option<crate::stopcopy::StopCopy>,
    /// The bytes [`Prepared::copy_out`] read, every region's.
    copy_buf: Option<CopyBuf>,
}

struct RegionState {
    /// Index into `image.regions`.
    index: usize,
    /// Only chunks with a page in `present` can hold data: anonymous
    /// memory, or a file mapped again (the other pages are the file's). A
    /// file mapping stored whole has data in pages never touched.
    sparse: bool,
    /// A chunk of zeros must be stored as data, not as
    /// [`Hash::ZERO_CHUNK`] (which means "the file's page" there).
    zero_is_data: bool,
    /// Pages that hold data (present or swapped).
    present: PageRuns,
    /// Pages written since the last reset; None: unknown (all written).
    written: Option<PageRuns>,
    hashes: Option<SparseChunks>,
    /// Chunks whose copy began while the scan went on (chunks of written
    /// pages), each with its place in the copy's buffer; in chunk order.
    early: Vec<(u64, usize)>,
    /// What [`Prepared::copy_out`] read while the process was stopped.
    copied: Option<Copied>,
}

/// A region's share of a copy made while the process was stopped: the
/// base's chunks to reuse, and the chunks read, each with the place of
/// its bytes in [`Prepared`]'s buffer, in chunk order.
struct Copied {
    /// The chunks the base cannot give (see [`reusable`]); None: no base.
    reuse: Option<PageRuns>,
    chunks: Vec<(u64, usize)>,
}

/// When a round copies a process's pages out while it is stopped rather
/// than forking a snapshot ([`Prepared::copy_out`]): at most `max_bytes`,
/// and at most `free_pages` pages plus one page read per
/// `pages_per_read` present pages.
#[derive(Clone, Copy, Debug)]
pub struct CopyRule {
    pub max_bytes: u64,
    pub pages_per_read: u64,
    pub free_pages: u64,
}

impl CopyRule {
    /// Whether `pages` pages to read, of `present` present, are few
    /// enough to copy.
    fn copies(&self, pages: u64, present: u64) -> bool {
        pages * remote::PAGE <= self.max_bytes && pages <= self.free_pages + present / self.pages_per_read.max(1)
    }
}

/// Step 1, while the process is stopped: read its metadata, which pages
/// exist and which were written, and start the next tracking interval.
/// With `copy` (the round may copy the process out instead of forking),
/// the pages found written begin to be copied while the scan goes on
/// ([`crate::stopcopy`]).
/// `fds` are the process's fds, read beforehand for the whole round
/// ([`crate::fds::Round::capture_process`]); the processes of a round may
/// then be prepared in parallel.
/// `reads`: this process's shared reads (the fd reader uses them too);
/// `files`: the round's mapped-file identities.
#[allow(clippy::too_many_arguments)]
pub fn prepare(report: &AgentReport, backend: Backend, host: &str, chunk_size: usize, fds: Vec<FdImage>, reads: &ProcReads, files: &RoundFiles, copy: Option<CopyRule>) -> Result<Prepared> {
    let pid = report.hello.pid;
    let t0 = std::time::Instant::now();
    let mut scan_time = std::time::Duration::ZERO;
    let dir = reads.dir()?;
    let posix_timers = procfs::posix_timers(dir)?;
    if posix_timers.len() > MAX_TIMERS {
        return Err(EngineError::Unsupported { pid, what: format!("it holds {} POSIX timers (timer_create), more than the {MAX_TIMERS} a checkpoint records", posix_timers.len()) });
    }
    let cwd = dir.link("cwd")?;
    check_dirs_exist(dir, &cwd)?;
    let stat = reads.stat()?;
    let ids = procfs::tree_ids_of(stat);
    // (A child that is one of the round's processes is stopped, not a
    // zombie: its stat is not read again.)
    let zombies = procfs::children_in(dir)
        .into_iter()
        .filter(|c| !files.members.contains(c))
        .filter_map(|c| procfs::tree_ids(c).ok().filter(|t| t.state == 'Z').map(|t| Zombie { pid: c, status: t.exit_status, pgid: t.pgid, sid: t.sid }))
        .collect();
    let tids: Vec<(i32, u32)> = report.threads.iter().map(|t| (t.tid, t.securebits)).collect();
    // Each thread's status file, read once for its credentials and its
    // pending signals (the main thread's also for the umask).
    let statuses = report.threads.iter().map(|t| reads.thread_status(t.tid)).collect::<Result<Vec<_>>>()?;
    let creds = crate::creds::capture_from(pid, &tids, |i| &statuses[i])?;
    let sched = report.threads.iter().map(|t| procfs::thread_sched(pid, t.tid)).collect::<Result<Vec<_>>>()?;
    let pending = crate::signals::capture_from(pid, &report.threads.iter().map(|t| t.tid).collect::<Vec<_>>(), |i| &statuses[i])?;
    let umask = procfs::parse_umask(reads.status()?);
    drop(statuses);
    let maps = reads.maps()?;
    let resolution = resolution_of(dir);
    // Per mapping of a file: (path, inode) → identity, for this process.
    let mut own_files: HashMap<(&str, u64), Option<MappedFile>> = HashMap::new();
    let mut mm = procfs::mm_fields_of(stat);
    mm.brk = report.suspended.brk;
    let pagemap = dir.open_file("pagemap")?;

    let mut regions = Vec::new();
    let mut states = Vec::new();
    let mut untracked = Vec::new();
    let mut stats = CaptureStats::default();
    // The mappings kept, in order: (index in maps, kind, file identity).
    let mut kept: Vec<(usize, RegionKind, Option<MappedFile>)> = Vec::new();
    for (i, m) in maps.iter().enumerate() {
        if (m.start >= ZONE_START && m.end <= ZONE_END) || m.name == "[vsyscall]" {
            continue;
        }
        let kind = region_kind(m);
        // A private file mapping of a file we can name again is mapped
        // again at restart; only the pages the process changed are kept.
        let file = if kind == RegionKind::Private && !is_anonymous(m) {
            *own_files.entry((m.name.as_str(), m.inode)).or_insert_with(|| match resolution {
                Some((ns, root)) => {
                    let key = (ns, root, m.name.clone(), m.inode);
                    // (The map's lock is not held while the file is
                    // identified: the cell's is.)
                    let cell = files.ids.lock().unwrap_or_else(|e| e.into_inner()).entry(key).or_default().clone();
                    *cell.get_or_init(|| mapped_file(pid, m))
                }
                None => mapped_file(pid, m),
            })
        } else {
            None
        };
        kept.push((i, kind, file));
    }
    // Which pages of each mapping with content hold data and which were
    // written. Costs what exists, not what is reserved: page runs, and
    // PAGEMAP_SCAN walks page tables only where there are some. Of a
    // file mapped again, only its copy-on-write pages count.
    //
    // Under uffd-wp, the written pages' chunks are copied as the walk
    // reports them, while the walk (and the rest of the scan) goes on
    // (`copy`, [`crate::stopcopy`]): at most as much as the copy could be
    // were every page of the mappings so far present. The copy's buffer is
    // reserved for the most the rule could let it copy were every page
    // present.
    let copy_cap = |rule: CopyRule, pages: u64| (rule.free_pages + pages / rule.pages_per_read.max(1)).saturating_mul(remote::PAGE).min(rule.max_bytes) as usize;
    let pages_upto: Vec<u64> = kept
        .iter()
        .scan(0u64, |sum, &(i, kind, _)| {
            if kind.has_content() {
                *sum += maps[i].len() / remote::PAGE;
            }
            Some(*sum)
        })
        .collect();
    let all_pages = pages_upto.last().copied().unwrap_or(0);
    let mut ahead: Option<crate::stopcopy::StopCopy> = None;
    let mut early: Vec<Vec<(u64, usize)>> = vec![Vec::new(); kept.len()];
    let mut copy_early = |k: usize, runs: &[dirty::Run]| {
        let Some(rule) = copy else { return };
        let cap = copy_cap(rule, pages_upto[k]);
        if ahead.is_none() {
            ahead = crate::stopcopy::StopCopy::new(pid, copy_cap(rule, all_pages)).ok();
        }
        let Some(a) = ahead.as_mut() else { return };
        let m = &maps[kept[k].0];
        let early = &mut early[k];
        let (cs, len, ppc) = (chunk_size as u64, m.len(), (chunk_size as u64 / remote::PAGE).max(1));
        for &(lo, hi, _) in runs {
            for c in lo / ppc..hi.div_ceil(ppc) {
                let (off, end) = (c * cs, (c * cs + cs).min(len));
                let n = (end - off) as usize;
                if early.last().is_some_and(|&(last, _)| last >= c) || off >= end || a.len() + n > cap {
                    continue;
                }
                early.push((c, a.push(m.start + off, n)));
            }
        }
    };
    let ts = std::time::Instant::now();
    let scanned = scan_mappings(maps, &kept, backend, &pagemap, &mut copy_early).map_err(|(addr, e)| EngineError::Memory { pid, addr, source: e })?;
    scan_time += ts.elapsed();
    for (((i, kind, file), scan), early) in kept.into_iter().zip(scanned).zip(early) {
        let m = &maps[i];
        if let Some((present, written)) = scan {
            stats.logical_bytes += m.len();
            let only_anon = file.is_some();
            if written.is_none() && backend == Backend::UffdWp {
                untracked.push((m.start, m.end));
            }
            // Write tracking is per page table: another process writing the
            // same shared memory leaves this one's entries clean. Shared
            // memory is read whole every time (dedup keeps what is unchanged).
            let written = if kind == RegionKind::SharedAnon { None } else { written };
            states.push(RegionState { index: regions.len(), sparse: is_anonymous(m) || only_anon, zero_is_data: only_anon, present, written, hashes: None, early, copied: None });
        }
        // A SysV segment's mapping: its inode number is the segment's id.
        let sysv = (kind == RegionKind::SharedAnon && m.name.starts_with("/SYSV")).then_some(SysvAttach { shmid: m.inode as i32, rdonly: false });
        regions.push(RegionImage {
            start: m.start,
            end: m.end,
            prot: m.prot(),
            kind,
            name: m.name.clone(),
            offset: m.offset,
            shm: if kind == RegionKind::SharedAnon { m.inode } else { 0 },
            sysv,
            segments: Vec::new(),
            depth: 0,
            noreserve: false,
            file,
            attrs: Vec::new(),
            shm_size: posix_shm_size(pid, m, kind),
        });
    }
    let (sysv_shm, no_fork) = sysv_segments(pid, &mut regions)?;
    let (sysv_sem, sysv_msq) = crate::sysvipc::capture(pid, report.hello.restart_word_addr, &files.ipc)?;
    if backend == Backend::SoftDirty {
        dirty::reset_soft_dirty(pid).map_err(|e| EngineError::Proc { pid, path: format!("/proc/{pid}/clear_refs").into(), source: e })?;
    }

    let s = &report.suspended;
    let image = ProcessImage {
        version: IMAGE_VERSION,
        pid,
        ppid: ids.ppid,
        sid: ids.sid,
        pgid: ids.pgid,
        zombies,
        ctty_pts: ids.ctty_pts(),
        tty_pgrp: if ids.ctty_pts().is_some() { ids.tpgid.max(0) } else { 0 },
        host: host.to_string(),
        exe: dir.link("exe")?,
        comm: procfs::comm_in(dir)?,
        cmdline: procfs::cmdline(dir)?,
        cwd,
        umask,
        rlimits: procfs::rlimits(pid)?,
        mm,
        auxv: procfs::auxv(dir)?,
        threads: report.threads.iter().map(ThreadImage::from).collect(),
        sigactions: s.sigactions.iter().map(|a| Sigaction { handler: a.handler, flags: a.flags, restorer: a.restorer, mask: a.mask }).collect(),
        itimers: s
            .itimers
            .iter()
            .map(|t| Itimer { interval_sec: t.interval_sec, interval_usec: t.interval_usec, value_sec: t.value_sec, value_usec: t.value_usec })
            .collect(),
        sched,
        pending,
        posix_timers,
        fds,
        regions,
        sysv_shm,
        sysv_sem,
        sysv_msq,
        agent: AgentImage { fd: report.suspended.agent_fd, restart_word_addr: report.hello.restart_word_addr, ckpt_tid: report.hello.ckpt_tid },
        chunk_size: chunk_size as u32,
        creds: Some(creds),
        namespaces: crate::ns::current(),
        job_stop: report.suspended.job_stop,
        // Set by the caller, which reads them with the round's fds
        // ([`crate::tmpfiles::capture`]).
        temp_files: Vec::new(),
    };
    stats.scan_ms = scan_time.as_secs_f64() * 1000.0;
    stats.meta_ms = t0.elapsed().as_secs_f64() * 1000.0 - stats.scan_ms;
    Ok(Prepared { image, backend, stats, untracked, no_fork, regions: states, flags_read: false, copy, ahead, copy_buf: None })
}

/// Page runs of one mapping: (holding data, written since the last
/// reset; None: unknown).
type Scanned = (PageRuns, Option<PageRuns>);

/// The page runs of each of `kept` (index in `maps`, kind, file identity)
/// that has content, None for the others; an error names the address of
/// the walk that failed. Under uffd-wp, mappings one after another in
/// `maps` are walked together ([`dirty::uffd_written_group`],
/// [`dirty::present_runs_group`]): a small process's ~30 mappings took
/// ~60 `PAGEMAP_SCAN` calls, most of its scan (bench-trees).
///
/// `on_written(k, runs)` is called with kept mapping `k`'s written runs
/// (pages relative to its start) as the walk finds them (uffd-wp only).
fn scan_mappings(
    maps: &[Mapping],
    kept: &[(usize, RegionKind, Option<MappedFile>)],
    backend: Backend,
    pagemap: &File,
    on_written: &mut dyn FnMut(usize, &[dirty::Run]),
) -> std::result::Result<Vec<Option<Scanned>>, (u64, std::io::Error)> {
    let mut out: Vec<Option<Scanned>> = vec![None; kept.len()];
    let range = |k: usize| (maps[kept[k].0].start, maps[kept[k].0].end);
    let at = |k: usize| move |e| (maps[kept[k].0].start, e);
    if backend != Backend::UffdWp {
        for (k, &(i, kind, file)) in kept.iter().enumerate() {
            if !kind.has_content() {
                continue;
            }
            let m = &maps[i];
            let only_anon = file.is_some();
            out[k] = Some(match backend {
                Backend::SoftDirty => {
                    let (present, written) = dirty::pagemap_runs(pagemap, m.start, m.end, true, only_anon).map_err(at(k))?;
                    (present, Some(written))
                }
                _ => (dirty::present_runs(pagemap, m.start, m.end, only_anon).map_err(at(k))?, None),
            });
        }
        return Ok(out);
    }
    // Walked together: private memory (not shared memory, whose writes
    // are not kept, nor a device's, which may refuse tracking) next to
    // each other in maps, nothing skipped between them.
    let together = |k: usize| matches!(kept[k].1, RegionKind::Private | RegionKind::Heap | RegionKind::Stack) && !maps[kept[k].0].name.starts_with("/dev/");
    let mut k = 0;
    while k < kept.len() {
        if !kept[k].1.has_content() {
            k += 1;
            continue;
        }
        let mut l = k + 1;
        if together(k) {
            while l < kept.len() && together(l) && kept[l].0 == kept[l - 1].0 + 1 {
                l += 1;
            }
        }
        let ranges: Vec<(u64, u64)> = (k..l).map(range).collect();
        let written = dirty::uffd_written_group_each(pagemap, &ranges, &mut |j, runs| on_written(k + j, runs)).map_err(at(k))?;
        // Presence by runs of the same kind (a file's copy-on-write pages,
        // or all the pages holding data).
        let mut a = k;
        while a < l {
            let only_anon = kept[a].2.is_some();
            let mut b = a + 1;
            while b < l && kept[b].2.is_some() == only_anon {
                b += 1;
            }
            let present = dirty::present_runs_group(pagemap, &ranges[a - k..b - k], only_anon).map_err(at(a))?;
            for (j, p) in (a..b).zip(present) {
                out[j] = Some((p, written[j - k].clone()));
            }
            a = b;
        }
        k = l;
    }
    Ok(out)
}

/// Refuses a process whose working directory or root directory was
/// removed: a restart could not enter it, so the generation would never
/// restore.
fn check_dirs_exist(dir: &procfs::ProcDir, cwd: &str) -> Result<()> {
    let pid = dir.pid();
    let root = dir.link("root")?;
    let mut problems = Vec::new();
    for (what, path) in [("working directory", cwd), ("root directory", root.as_str())] {
        if let Some(gone) = path.strip_suffix(" (deleted)") {
            problems.push(crate::Problem {
                pid,
                what: format!("its {what} {gone} was removed, so a restart could not enter it; the program must change to a directory that exists (or be restarted in one) before it can be checkpointed"),
            });
        }
    }
    if problems.is_empty() { Ok(()) } else { Err(EngineError::Unrestorable { problems }) }
}

/// The identity of the file under a private mapping, if a restart can map
/// it again: a regular file that the process's mount namespace still has
/// at the mapping's path, with the inode the mapping shows. Otherwise
/// (deleted, replaced, unreadable) the mapping is stored whole, as
/// anonymous memory.
fn mapped_file(pid: i32, m: &Mapping) -> Option<MappedFile> {
    use std::os::unix::fs::MetadataExt;
    if !m.name.starts_with('/') || m.name.ends_with(" (deleted)") {
        return None;
    }
    let path = format!("/proc/{pid}/root{}", m.name);
    let mut f = File::open(&path).ok()?;
    let md = f.metadata().ok()?;
    if !md.is_file() || md.ino() != m.inode {
        return None;
    }
    identify_as(&mut f, &md).ok()
}

/// The identity of an open regular file (the hash of its head is
/// remembered per inode, size and mtime: a library mapped by every
/// process of a computation is read once).
pub fn identify(f: &mut File) -> std::io::Result<MappedFile> {
    let md = f.metadata()?;
    identify_as(f, &md)
}

/// [`identify`] with the file's `fstat` (`md`) already taken.
fn identify_as(f: &mut File, md: &std::fs::Metadata) -> std::io::Result<MappedFile> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let key = (md.dev(), md.ino(), md.size(), md.mtime(), md.mtime_nsec());
    type Heads = HashMap<(u64, u64, u64, i64, i64), Hash>;
    static HEADS: std::sync::Mutex<Option<Heads>> = std::sync::Mutex::new(None);
    let cached = HEADS.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(HashMap::new).get(&key).copied();
    let head = match cached {
        Some(h) => h,
        None => {
            let mut buf = Vec::new();
            f.by_ref().take(MAPPED_FILE_HEAD).read_to_end(&mut buf)?;
            let h = Hash::of(&buf);
            HEADS.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(HashMap::new).insert(key, h);
            h
        }
    };
    Ok(MappedFile { size: md.size(), mtime_sec: md.mtime(), mtime_nsec: md.mtime_nsec(), head })
}

/// Marks the large private anonymous regions mapped `MAP_NORESERVE`.
fn noreserve(regions: &mut [RegionImage], flags: &HashMap<u64, Vec<String>>) {
    let large = |r: &RegionImage| r.kind == RegionKind::Private && r.name.is_empty() && r.end - r.start >= NORESERVE_MIN;
    for r in regions.iter_mut().filter(|r| large(r)) {
        r.noreserve = flags.get(&r.start).is_some_and(|v| v.iter().any(|f| f == "nr"));
    }
}

impl Prepared {
    /// Records each region's `VmFlags` (`MAP_NORESERVE`, the `madvise` and
    /// `mlock` attributes) from one read of `/proc/PID/smaps`. That read
    /// walks every page table of the process (tens of ms per GiB), so a
    /// round whose memory was copied out while stopped does it after
    /// the resume; a round that forks needs `MADV_WIPEONFORK` before the
    /// fork and does it while stopped.
    ///
    /// After the resume, a region the program unmapped meanwhile (or all of
    /// them, if it exited) keeps the flags `previous` (the last round's
    /// base) recorded for the same range.
    pub fn read_vm_flags(&mut self, pid: i32, previous: Option<&Base>) -> Result<()> {
        let starts: Vec<u64> = self.image.regions.iter().map(|r| r.start).collect();
        self.apply_vm_flags(procfs::vm_flags(pid, &starts), previous)
    }

    /// After [`Self::copy_out`], the process running again:
    /// [`Self::store_copied`], with [`Self::read_vm_flags`] in a thread of
    /// its own meanwhile (the kernel's walk of the page tables for smaps,
    /// 30-60 ms per GiB, no longer follows the compression).
    pub fn store_copied_with_flags(&mut self, base: Option<&Base>, writer: &dyn BlobSink) -> Result<()> {
        let pid = self.image.pid;
        let starts: Vec<u64> = self.image.regions.iter().map(|r| r.start).collect();
        let t = std::time::Instant::now();
        let (stored, flags) = std::thread::scope(|s| {
            let flags = s.spawn(|| {
                let f = procfs::vm_flags(pid, &starts);
                (f, t.elapsed())
            });
            let stored = self.store_copied(base, writer);
            let stored_in = t.elapsed();
            let flags = flags.join().map(|(f, read_in)| {
                tracing::debug!(pid, store_ms = stored_in.as_secs_f64() * 1000.0, smaps_ms = read_in.as_secs_f64() * 1000.0, "copied memory stored");
                f
            });
            (stored, flags)
        });
        stored?;
        let flags = flags.unwrap_or_else(|_| Err(EngineError::Unsupported { pid, what: "internal: the thread reading smaps panicked".into() }));
        self.apply_vm_flags(flags, base)
    }

    /// [`Self::read_vm_flags`] with smaps read (`read`).
    fn apply_vm_flags(&mut self, read: Result<HashMap<u64, Vec<String>>>, previous: Option<&Base>) -> Result<()> {
        let mut flags = match (read, previous) {
            (Ok(f), _) => f,
            (Err(_), Some(_)) => HashMap::new(),
            (Err(e), None) => return Err(e),
        };
        if let Some(b) = previous {
            for r in &self.image.regions {
                if let (false, Some(br)) = (flags.contains_key(&r.start), b.regions.get(&r.start).filter(|br| br.end == r.end)) {
                    let mut v = br.attrs.clone();
                    if br.noreserve {
                        v.push("nr".into());
                    }
                    flags.insert(r.start, v);
                }
            }
        }
        noreserve(&mut self.image.regions, &flags);
        crate::memattrs::apply(&mut self.image.regions, &flags);
        self.flags_read = true;
        Ok(())
    }

    /// The TIMERS request for the agent (None: no POSIX timer).
    pub fn timer_request(&self) -> Option<Vec<u8>> {
        let t = &self.image.posix_timers;
        if t.is_empty() {
            return None;
        }
        let mut req = ckpt_wire::agent::TimerList { count: t.len() as u32, _pad: 0 }.as_bytes().to_vec();
        req.extend(t.iter().flat_map(|t| t.id.to_le_bytes()));
        Some(req)
    }

    /// Takes the agent's answer to [`Self::timer_request`].
    pub fn set_timer_values(&mut self, answer: &[u8]) -> Result<()> {
        let pid = self.image.pid;
        let n = self.image.posix_timers.len();
        let size = std::mem::size_of::<TimerValue>();
        if answer.len() != n * size {
            return Err(EngineError::Unsupported { pid, what: format!("its agent answered for {} bytes of POSIX timers, not {n} timers", answer.len()) });
        }
        for (t, v) in self.image.posix_timers.iter_mut().zip(answer.chunks_exact(size)) {
            let v = TimerValue::read_from(v).ok_or_else(|| EngineError::Unsupported { pid, what: "a short POSIX timer answer".into() })?;
            if v.id != t.id || v.errno != 0 {
                return Err(EngineError::Unsupported { pid, what: format!("its POSIX timer {} cannot be read (timer_gettime: {})", t.id, std::io::Error::from_raw_os_error(v.errno)) });
            }
            (t.interval_sec, t.interval_nsec, t.left_sec, t.left_nsec, t.overrun) = (v.interval_sec, v.interval_nsec, v.value_sec, v.value_nsec, v.overrun);
        }
        Ok(())
    }
}

/// `[start, end)` of a mapping.
type Range = (u64, u64);

/// The SysV segments the regions map (from `/proc/sysvipc/shm`), which
/// attaches are read-only, and the mappings a snapshot fork must leave out
/// (a copy would count as an attach, which the program can see).
fn sysv_segments(pid: i32, regions: &mut [RegionImage]) -> Result<(Vec<SysvShm>, Vec<Range>)> {
    let starts: Vec<u64> = regions.iter().filter(|r| r.sysv.is_some()).map(|r| r.start).collect();
    if starts.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let all = procfs::sysv_shm().map_err(|e| EngineError::Proc { pid, path: "/proc/sysvipc/shm".into(), source: e })?;
    let flags = procfs::vm_flags(pid, &starts)?;
    let mut out: Vec<SysvShm> = Vec::new();
    let mut no_fork = Vec::new();
    for r in regions.iter_mut() {
        let Some(a) = r.sysv.as_mut() else { continue };
        let has = |f: &str| flags.get(&r.start).is_some_and(|v| v.iter().any(|x| x == f));
        a.rdonly = flags.contains_key(&r.start) && !has("mw");
        if !has("dc") {
            no_fork.push((r.start, r.end));
        }
        if out.iter().any(|s| s.shmid == a.shmid) {
            continue;
        }
        let seg = all.get(&a.shmid).copied().ok_or_else(|| EngineError::Unsupported {
            pid,
            what: format!("its mapping {:#x}-{:#x} of SysV segment {} is not in /proc/sysvipc/shm (a segment of another IPC namespace?)", r.start, r.end, a.shmid),
        })?;
        out.push(seg);
    }
    Ok((out, no_fork))
}

impl Prepared {
    /// Step 2: store the memory of the regions `which` selects (not yet
    /// stored), reading from `source` (the process itself while stopped, or
    /// its forked snapshot). Chunks whose pages are all unwritten and
    /// present as before reuse `base`'s hashes without being read.
    pub fn store_memory(&mut self, source: i32, which: impl Fn(&RegionImage) -> bool, base: Option<&Base>, writer: &dyn BlobSink) -> Result<()> {
        let chunk_size = self.image.chunk_size as usize;
        let mem_path = format!("/proc/{source}/mem");
        let mem = File::open(&mem_path).map_err(|e| EngineError::Proc { pid: source, path: mem_path.into(), source: e })?;
        let intact = base_intact(base, writer);
        // Another process than the one captured: its forked snapshot,
        // whose private pages are shared copy-on-write with it.
        let snapshot = source != self.image.pid;
        for st in self.regions.iter_mut().filter(|st| st.hashes.is_none()) {
            let r = &self.image.regions[st.index];
            if !which(r) {
                continue;
            }
            let b = base.and_then(|b| b.regions.get(&r.start));
            let hashes = store_region(source, snapshot, r, st, b, intact, &mem, writer, chunk_size, &mut self.stats)?;
            st.hashes = Some(hashes);
        }
        Ok(())
    }

    /// While the process is stopped: if the chunks that must be read (of
    /// the regions not stored yet) are few, reads them now into buffers
    /// of ours, and returns their size; the process may then resume at
    /// once and [`Self::store_copied`] stores them. "Few": by the
    /// [`CopyRule`] given to [`prepare`] (a page read costs about
    /// `pages_per_read` page-table entries copied by a snapshot fork, and
    /// a fork has a fixed cost worth `free_pages` reads; measured in
    /// bench-stop and bench-trees). Otherwise (or without a rule) reads
    /// nothing and returns None. The chunks whose copy began during the
    /// scan are not read again; the copy's own thread and this one share
    /// the rest ([`crate::stopcopy`]).
    pub fn copy_out(&mut self, pid: i32, base: Option<&Base>) -> Result<Option<u64>> {
        let ahead = self.ahead.take();
        let Some(rule) = self.copy else { return Ok(None) };
        let chunk_size = self.image.chunk_size as usize;
        let mut plans = Vec::new();
        let (mut bytes, mut present) = (0u64, 0u64);
        for (k, st) in self.regions.iter().enumerate().filter(|(_, st)| st.hashes.is_none()) {
            let r = &self.image.regions[st.index];
            let b = base.and_then(|b| b.regions.get(&r.start));
            let (fresh, to_read) = plan_reads(r, st, b, chunk_size);
            let reuse = fresh;
            let len = r.end - r.start;
            bytes += to_read.iter().map(|&c| (c * chunk_size as u64 + chunk_size as u64).min(len) - c * chunk_size as u64).sum::<u64>();
            present += if st.sparse { st.present.count() } else { len / remote::PAGE };
            plans.push((k, reuse, to_read));
        }
        if !rule.copies(bytes / remote::PAGE, present) {
            // (The copy begun, if any, is abandoned with `ahead`.)
            return Ok(None);
        }
        let mut copy = match ahead {
            Some(a) if a.room() as u64 >= bytes => a,
            _ => {
                for st in &mut self.regions {
                    st.early.clear();
                }
                crate::stopcopy::StopCopy::new(pid, bytes as usize).map_err(|e| EngineError::Proc { pid, path: format!("/proc/{pid}/mem").into(), source: e })?
            }
        };
        // Each region's chunks: those begun during the scan where they
        // are, the others queued now.
        for (k, reuse, to_read) in plans {
            let st = &mut self.regions[k];
            let r = &self.image.regions[st.index];
            let len = r.end - r.start;
            let cs = chunk_size as u64;
            let mut early = std::mem::take(&mut st.early).into_iter().peekable();
            let mut chunks = Vec::with_capacity(to_read.len());
            for c in to_read {
                while early.peek().is_some_and(|&(e, _)| e < c) {
                    early.next();
                }
                let at = match early.peek() {
                    Some(&(e, at)) if e == c => at,
                    _ => {
                        let (off, end) = (c * cs, (c * cs + cs).min(len));
                        copy.push(r.start + off, (end - off) as usize)
                    }
                };
                chunks.push((c, at));
            }
            st.copied = Some(Copied { reuse, chunks });
        }
        let (buf, read) = copy.finish().map_err(|(addr, e)| EngineError::Memory { pid, addr, source: e })?;
        self.stats.read_bytes += read;
        self.copy_buf = Some(buf);
        Ok(Some(bytes))
    }

    /// After [`Self::copy_out`], the process running again: hashes and
    /// stores what was copied. A chunk of the base that the store no
    /// longer holds (gc removed its generation meanwhile) cannot be read
    /// again as it was: [`EngineError::BaseGone`] (the round is abandoned;
    /// its bases are dropped, so the next round reads the process whole).
    /// `base` is the one [`Self::copy_out`] was given.
    pub fn store_copied(&mut self, base: Option<&Base>, writer: &dyn BlobSink) -> Result<()> {
        let chunk_size = self.image.chunk_size as usize;
        let pid = self.image.pid;
        let intact = base_intact(base, writer);
        let buf = self.copy_buf.take();
        let data: &[u8] = buf.as_ref().map_or(&[], |b| b.as_slice());
        for st in self.regions.iter_mut().filter(|st| st.hashes.is_none()) {
            let r = &self.image.regions[st.index];
            let Some(c) = st.copied.take() else {
                return Err(EngineError::Unsupported { pid, what: format!("internal: region {:#x} was neither copied nor stored while stopped", r.start) });
            };
            let b = base.and_then(|b| b.regions.get(&r.start));
            let hashes = reusable(r, b, c.reuse.as_ref(), chunk_size);
            if !intact && writer.missing(&hashes.iter().map(|&(_, h)| h).collect::<Vec<_>>())?.iter().any(|&g| g) {
                return Err(EngineError::BaseGone { pid });
            }
            let len = (r.end - r.start) as usize;
            // The copied chunks, back to back in chunk order: hashed,
            // looked up and stored all at once, in parallel (chunk by
            // chunk, a 1% change of 1 GiB was 2,600 single-chunk batches
            // on one core).
            let pieces: Vec<(u64, &[u8])> = c
                .chunks
                .iter()
                .map(|&(k, at)| {
                    let off = k as usize * chunk_size;
                    let n = (off + chunk_size).min(len) - off;
                    (k, &data[at..at + n])
                })
                .collect();
            let fresh = store_pieces(&pieces, st.zero_is_data, writer)?;
            st.hashes = Some(SparseChunks { len: len.div_ceil(chunk_size) as u64, entries: merge_sorted(hashes, fresh) });
        }
        Ok(())
    }

    /// Step 3: the finished image (segments stored) and the base for the
    /// next capture. A region whose chunks are those of `base` (the one
    /// the capture was given) keeps the base's chunk-list tree, when the
    /// store vouches for the base's generation: an idle 1 GiB region's
    /// tree is 8 MiB of node bytes to hash again otherwise.
    pub fn finish(mut self, generation: u64, base: Option<&Base>, writer: &dyn BlobSink) -> Result<(ProcessImage, CaptureStats, Base)> {
        if !self.flags_read {
            let pid = self.image.pid;
            return Err(EngineError::Unsupported { pid, what: "internal: its mappings' VmFlags were never read".into() });
        }
        let intact = base_intact(base, writer);
        let mut next = Base { generation, regions: HashMap::new() };
        for st in self.regions {
            let r = &mut self.image.regions[st.index];
            let hashes = st.hashes.ok_or_else(|| EngineError::Unsupported { pid: self.image.pid, what: format!("region {:#x} was never stored", r.start) })?;
            // The base's nodes are reused only if the store vouches that
            // they are all still stored.
            let prev = base.and_then(|b| b.regions.get(&r.start)).filter(|b| intact && b.end == r.end);
            let (tree, levels) = match prev {
                Some(b) if b.hashes == hashes => (b.tree.clone(), b.levels.clone()),
                prev => crate::chunklist::store_sparse_from(writer, &hashes, prev.map(|b| (&b.hashes, &b.levels)))?,
            };
            (r.segments, r.depth) = tree.clone();
            next.regions.insert(r.start, BaseRegion { end: r.end, hashes, tree, levels, present: st.present, noreserve: r.noreserve, attrs: r.attrs.clone() });
        }
        Ok((self.image, self.stats, next))
    }
}

/// Which chunks of a region a capture must read, and which it takes from
/// the base unread: `(reuse, to_read)`. Chunks whose pages are all
/// unwritten and present as before reuse the base's hash (if the store
/// still holds it); chunks with no page are zero and in neither list.
/// Computed on page runs: the cost follows what changed and what the base
/// holds, never the region's size (it runs while the process is stopped).
fn plan_region(r: &RegionImage, st: &RegionState, base: Option<&BaseRegion>, chunk_size: usize) -> (Vec<(u64, Hash)>, Vec<u64>) {
    let (fresh, to_read) = plan_reads(r, st, base, chunk_size);
    (reusable(r, base, fresh.as_ref(), chunk_size), to_read)
}

/// The base's chunks that [`plan_reads`] left unread (`fresh`: the chunks
/// that cannot be reused; None: none can). One pass over the base's list.
fn reusable(r: &RegionImage, base: Option<&BaseRegion>, fresh: Option<&PageRuns>, chunk_size: usize) -> Vec<(u64, Hash)> {
    let nchunks = (r.end - r.start).div_ceil(chunk_size as u64);
    let (Some(f), Some(b)) = (fresh, base) else { return Vec::new() };
    let mut runs = f.runs().iter().peekable();
    b.hashes
        .entries
        .iter()
        .filter(|&&(c, _)| {
            while runs.peek().is_some_and(|r| r.1 <= c) {
                runs.next();
            }
            c < nchunks && runs.peek().is_none_or(|r| r.0 > c)
        })
        .copied()
        .collect()
}

/// The chunks of a region a capture must read, and the chunks whose base
/// hash cannot be reused (None: no base to reuse).
fn plan_reads(r: &RegionImage, st: &RegionState, base: Option<&BaseRegion>, chunk_size: usize) -> (Option<PageRuns>, Vec<u64>) {
    let len = (r.end - r.start) as usize;
    let nchunks = len.div_ceil(chunk_size) as u64;
    let ppc = (chunk_size / remote::PAGE as usize) as u64;
    // The chunks whose base hash cannot be reused: a page written, or
    // present now and not then (or the reverse), or a chunk that does not
    // cover the same bytes as the base's (the region changed size).
    let fresh = match (base, &st.written) {
        (Some(b), Some(w)) => {
            let mut f = st.present.intersect(w).union(&st.present.sym_diff(&b.present)).groups(ppc);
            let blen = (b.end - r.start) as usize;
            if blen != len {
                let from = (len.min(blen) / chunk_size) as u64;
                f = f.union(&PageRuns::from_unsorted(vec![(from, nchunks.max(from + 1))]));
            }
            Some(f)
        }
        _ => None,
    };
    // Of the others, those with a page that holds data (a file mapping
    // stored whole has data in pages never touched: every chunk).
    let to_read: Vec<u64> = match (&fresh, st.sparse) {
        (None, true) => st.present.groups(ppc).iter().filter(|&c| c < nchunks).collect(),
        (None, false) => (0..nchunks).collect(),
        (Some(f), sparse) => f.iter().filter(|&c| c < nchunks && (!sparse || st.present.any_in(c * ppc, c * ppc + ppc))).collect(),
    };
    (fresh, to_read)
}

/// Whether the store's codec (zstd or LZ4: the writer's, which says
/// whether it stored each chunk tried raw) is worth trying on the next
/// chunks of a region, learnt from the chunks of the region stored before
/// (a window at a time). On hash-like data (random words, compressed or
/// encrypted bytes) the codec gives up on every chunk, and trying cost
/// (zstd) a fifth of the CPU of a 1 GiB first checkpoint: after a window
/// in which every chunk tried was stored raw, only one chunk in
/// [`Compressibility::SAMPLE`] is tried, and the first of those that the
/// codec shrinks has every chunk after it tried again. A chunk not tried is stored raw, which is a valid blob
/// whatever its bytes: only its size may be larger than it could have
/// been (at most the chunks between two samples, per thread, where the
/// data turns compressible).
#[derive(Clone, Copy, Debug, Default)]
struct Compressibility {
    /// The last window's chunks tried were all stored raw.
    skip: bool,
}

impl Compressibility {
    /// While skipping, one chunk in this many (by index) is tried.
    const SAMPLE: u64 = 32;
    /// Chunks a window must have tried, all raw, for the next to skip.
    const MIN_TRIED: usize = 32;
}

/// Hashes the chunks of `data` (consecutive, the first of index `first`),
/// stores those the store lacks, and returns the hashes of those that are
/// not zero.
fn store_chunks(data: &[u8], first: u64, zero_is_data: bool, chunk_size: usize, writer: &dyn BlobSink, comp: &mut Compressibility) -> Result<Vec<(u64, Hash)>> {
    let pieces: Vec<(u64, &[u8])> = data.chunks(chunk_size).enumerate().map(|(k, d)| (first + k as u64, d)).collect();
    store_pieces_with(&pieces, zero_is_data, writer, comp)
}

/// [`store_chunks`] of chunks given one by one: `(index, bytes)`, in
/// increasing index order; hashed and stored in parallel, with one lookup
/// for all of them. The store's codec is tried on each.
fn store_pieces(pieces: &[(u64, &[u8])], zero_is_data: bool, writer: &dyn BlobSink) -> Result<Vec<(u64, Hash)>> {
    store_pieces_with(pieces, zero_is_data, writer, &mut Compressibility::default())
}

/// [`store_pieces`], trying the codec as `comp` says, which learns from them.
fn store_pieces_with(pieces: &[(u64, &[u8])], zero_is_data: bool, writer: &dyn BlobSink, comp: &mut Compressibility) -> Result<Vec<(u64, Hash)>> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
    // Tasks of at least 64 KiB: a task per 4 KiB chunk costs more in
    // rayon's scheduling than the chunk's hash.
    let min_len = (64 << 10) / pieces.first().map_or(1, |p| p.1.len().max(1));
    let wh: Vec<Hash> = pieces
        .par_iter()
        .with_min_len(min_len.max(1))
        .map(|&(_, d)| match ckpt_chunker::hash_chunk(d) {
            // A changed page of a file mapping that is now all zeros: stored
            // under its real address, since the sentinel means "the file's".
            h if zero_is_data && h == Hash::ZERO_CHUNK => Hash::of(d),
            h => h,
        })
        .collect();
    let missing = writer.missing(&wh)?;
    let (skip, shrunk, tried) = (comp.skip, AtomicBool::new(false), AtomicUsize::new(0));
    wh.par_iter().with_min_len(min_len.max(1)).zip(missing).zip(pieces).try_for_each(|((h, missing), &(k, d))| -> Result<()> {
        if *h != Hash::ZERO_CHUNK && missing {
            let try_compress = !skip || k % Compressibility::SAMPLE == 0 || shrunk.load(Relaxed);
            if let Some(raw) = writer.put_chunk(*h, d, try_compress)?
                && try_compress
            {
                tried.fetch_add(1, Relaxed);
                if !raw {
                    shrunk.store(true, Relaxed);
                }
            }
        }
        Ok(())
    })?;
    if shrunk.into_inner() {
        comp.skip = false;
    } else if tried.into_inner() >= Compressibility::MIN_TRIED {
        comp.skip = true;
    }
    Ok(wh.into_iter().zip(pieces).filter(|(h, _)| *h != Hash::ZERO_CHUNK).map(|(h, &(k, _))| (k, h)).collect())
}

/// Two lists of `(chunk, hash)` sorted by chunk and with no chunk in
/// both, as one sorted list.
fn merge_sorted(a: Vec<(u64, Hash)>, b: Vec<(u64, Hash)>) -> Vec<(u64, Hash)> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut a, mut b) = (a.into_iter().peekable(), b.into_iter().peekable());
    loop {
        let take_a = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) => x.0 <= y.0,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => return out,
        };
        out.extend(if take_a { a.next() } else { b.next() });
    }
}

/// Whether `base`'s chunks may be reused without asking the store about
/// each: the store vouches that nothing was removed since the base's
/// generation was committed ([`BlobSink::intact_generation`]). Asking costs
/// a keyed hash and a lookup per chunk (30-50 ms per GiB of memory, every
/// checkpoint).
fn base_intact(base: Option<&Base>, writer: &dyn BlobSink) -> bool {
    base.is_some_and(|b| writer.intact_generation() == Some(b.generation))
}

#[allow(clippy::too_many_arguments)]
fn store_region(
    pid: i32,
    snapshot: bool,
    r: &RegionImage,
    st: &RegionState,
    base: Option<&BaseRegion>,
    base_intact: bool,
    mem: &File,
    writer: &dyn BlobSink,
    chunk_size: usize,
    stats: &mut CaptureStats,
) -> Result<SparseChunks> {
    let len = (r.end - r.start) as usize;
    let nchunks = len.div_ceil(chunk_size) as u64;
    let (reuse, mut to_read) = plan_region(r, st, base, chunk_size);
    let mut hashes: Vec<(u64, Hash)> = Vec::with_capacity(reuse.len() + to_read.len());
    // Only a chunk the store still holds (gc may have pruned the generation
    // the base came from) is reused; the others are read again. Unless
    // the store vouches for the base's generation (nothing removed since).
    if base_intact {
        hashes.extend(reuse.iter().copied());
    } else if !reuse.is_empty() {
        let gone = writer.missing(&reuse.iter().map(|&(_, h)| h).collect::<Vec<_>>())?;
        for (&(c, h), gone) in reuse.iter().zip(gone) {
            if gone {
                to_read.push(c);
            } else {
                hashes.push((c, h));
            }
        }
        to_read.sort_unstable();
    }
    // Read runs of consecutive chunks, a window at a time, in a thread of
    // its own: the next window is read from the process while this one is
    // hashed, looked up and compressed (two buffers in flight).
    let max_run = (WINDOW / chunk_size).max(1);
    let mut runs: Vec<(u64, usize, usize)> = Vec::new(); // (first chunk, offset, length)
    let mut i = 0;
    while i < to_read.len() {
        let mut j = i + 1;
        while j < to_read.len() && to_read[j] == to_read[j - 1] + 1 && j - i < max_run {
            j += 1;
        }
        let off = to_read[i] as usize * chunk_size;
        runs.push((to_read[i], off, ((to_read[j - 1] as usize + 1) * chunk_size).min(len) - off));
        i = j;
    }
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<Result<(u64, Vec<u8>)>>(1);
    let (free_tx, free_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    for _ in 0..2 {
        let _ = free_tx.send(Vec::new());
    }
    let (start, shared) = (r.start, r.kind == RegionKind::SharedAnon || r.kind == RegionKind::SharedFile);
    let read_bytes = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| -> Result<()> {
        // Owned here, so that an early return ends the reading thread.
        let (full_rx, free_tx) = (full_rx, free_tx);
        let read_bytes = &read_bytes;
        s.spawn(move || {
            for &(first, off, rlen) in &runs {
                let Ok(mut buf) = free_rx.recv() else { return };
                buf.resize(rlen, 0);
                // A snapshot's private pages through /proc/PID/mem: read
                // with process_vm_readv, each would be copied into the
                // snapshot first ([`remote::read_shared`]).
                let r = if snapshot && !shared { remote::read_shared(mem, start + off as u64, &mut buf) } else { remote::read_tolerant(pid, Some(mem), start + off as u64, &mut buf) };
                let r = r
                    .map(|n| {
                        read_bytes.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                        (first, buf)
                    })
                    .map_err(|e| EngineError::Memory { pid, addr: start + off as u64, source: e });
                let failed = r.is_err();
                if full_tx.send(r).is_err() || failed {
                    return;
                }
            }
        });
        let mut comp = Compressibility::default();
        for got in full_rx.iter() {
            let (first, buf) = got?;
            hashes.extend(store_chunks(&buf, first, st.zero_is_data, chunk_size, writer, &mut comp)?);
            let _ = free_tx.send(buf);
        }
        Ok(())
    })?;
    stats.read_bytes += read_bytes.into_inner();
    hashes.sort_unstable_by_key(|e| e.0);
    Ok(SparseChunks { len: nchunks, entries: hashes })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A sink that encodes as the store's writer does (with its codec) and
    /// records, per blob, whether the codec was tried and whether it was
    /// stored raw.
    struct Probe(Mutex<HashMap<Hash, (bool, bool)>>, ckpt_chunker::Codec);

    impl BlobSink for Probe {
        fn known(&self, h: &Hash) -> bool {
            self.0.lock().unwrap().contains_key(h)
        }
        fn put(&self, _: ckpt_store::BlobKind, h: Hash, d: &[u8]) -> ckpt_store::Result<bool> {
            Ok(self.put_chunk(h, d, true)?.is_some())
        }
        fn put_chunk(&self, h: Hash, d: &[u8], try_compress: bool) -> ckpt_store::Result<Option<bool>> {
            let raw = !try_compress || matches!(ckpt_chunker::encode_with(d, self.1, ckpt_chunker::DEFAULT_LEVEL), ckpt_chunker::Encoded::Raw(_));
            Ok(self.0.lock().unwrap().insert(h, (try_compress, raw)).is_none().then_some(raw))
        }
    }

    const CS: usize = 4096;

    fn hashlike(seed: u64, chunks: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..chunks * CS / 8)
            .flat_map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()
            })
            .collect()
    }

    fn text(seed: u64, chunks: usize) -> Vec<u8> {
        (0..chunks * CS).map(|i| b"some words of a heap, "[(i + seed as usize * 7) % 22] ^ ((i / CS) as u8 & 1)).collect::<Vec<u8>>().chunks(CS).enumerate().flat_map(|(k, c)| {
            let mut c = c.to_vec();
            c[..8].copy_from_slice(&(seed * 1_000_000 + k as u64).to_le_bytes());
            c
        }).collect()
    }

    /// The codec (zstd or LZ4) stops being tried on a region it cannot
    /// shrink, except for samples, and is tried again as soon as the data
    /// shrinks: every chunk is stored either way.
    #[test]
    fn codec_is_skipped_on_incompressible_windows_and_resumed_when_data_shrinks() {
        for codec in [ckpt_chunker::Codec::Zstd, ckpt_chunker::Codec::Lz4] {
            skipped_and_resumed(codec);
        }
    }

    fn skipped_and_resumed(codec: ckpt_chunker::Codec) {
        let sink = Probe(Mutex::default(), codec);
        let mut comp = Compressibility::default();
        let n = 2048;
        let tried = |sink: &Probe, data: &[u8]| data.chunks(CS).filter(|c| sink.0.lock().unwrap()[&Hash::of(c)].0).count();
        // A first window of random words: every chunk tried, all raw.
        let w1 = hashlike(1, n);
        assert_eq!(store_chunks(&w1, 0, false, CS, &sink, &mut comp).unwrap().len(), n);
        assert_eq!(tried(&sink, &w1), n);
        assert!(comp.skip);
        // The next: one chunk in SAMPLE tried.
        let w2 = hashlike(2, n);
        assert_eq!(store_chunks(&w2, n as u64, false, CS, &sink, &mut comp).unwrap().len(), n);
        assert_eq!(tried(&sink, &w2), n / Compressibility::SAMPLE as usize);
        assert!(comp.skip);
        // Random words, then text: the text is tried again from the first
        // sample of it on (a few per thread may be stored raw before).
        let mut w3 = hashlike(3, n / 2);
        w3.extend(text(3, n / 2));
        assert_eq!(store_chunks(&w3, 2 * n as u64, false, CS, &sink, &mut comp).unwrap().len(), n);
        let raw_text = w3[n / 2 * CS..].chunks(CS).filter(|c| sink.0.lock().unwrap()[&Hash::of(c)].1).count();
        assert!(raw_text <= Compressibility::SAMPLE as usize * rayon::current_num_threads(), "{raw_text} chunks of text stored raw");
        assert!(!comp.skip);
        // And a window of text after it: every chunk tried, none raw.
        let w4 = text(4, n);
        store_chunks(&w4, 3 * n as u64, false, CS, &sink, &mut comp).unwrap();
        assert_eq!(tried(&sink, &w4), n);
        assert!(w4.chunks(CS).all(|c| !sink.0.lock().unwrap()[&Hash::of(c)].1));
        assert_eq!(sink.0.lock().unwrap().len(), 4 * n);
    }

    /// A shared read that failed gives each caller the same error, and
    /// is not read again.
    #[test]
    fn a_failed_shared_read_is_told_to_each_caller() {
        // A pid above the kernel's pid_max (4194304 at most): never a process.
        let reads = ProcReads::new(1 << 23);
        let a = reads.maps().unwrap_err().to_string();
        let b = reads.maps().unwrap_err().to_string();
        assert_eq!(a, b);
        assert!(a.contains("/proc/8388608") && a.contains("No such file"), "{a}");
        assert!(reads.status().is_err() && reads.stat().is_err());
    }
}
