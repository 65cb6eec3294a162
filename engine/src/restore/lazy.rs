//! Lazy restart (`ckpt restart --lazy`): the program runs as soon as its
//! registers, stacks and the memory its threads' state lives in are back;
//! the rest of its private anonymous memory comes on demand from a page
//! server in the driver, and in the background until all of it is in.
//! Nothing done before the program runs grows with the size of the lazy
//! memory: the driver reads no chunk list of a lazy region before then.
//!
//! * Each restorer makes a userfaultfd (not `UFFD_USER_MODE_ONLY`: the
//!   program's own system calls, e.g. a `read()` into a page still missing,
//!   and the kernel's reads of a signal frame fault in kernel mode and must
//!   be served too) and moves it to a number the driver chose
//!   ([`ckpt_wire::restore::flags::MOVE_FD`]). At the first barrier the
//!   driver takes it (`pidfd_getfd`), enables the non-cooperative events
//!   (fork, mremap, munmap, `MADV_DONTNEED`) and registers `MISSING` on
//!   the lazy regions ([`LazyPart`]); the restorer closes its copy.
//! * Lazy regions: private anonymous memory with content, except a region
//!   that holds any thread's signal frame (its stack), TLS, rseq area,
//!   robust list or clear-tid word, or the agent's restart word, and
//!   `mlock`ed regions (populated at once anyway). The rest is written
//!   before the program runs, as in an eager restart. Before the program
//!   runs, a lazy region costs O(1): the shape of its chunk-list tree is
//!   checked ([`crate::chunklist::check_shape`]) and its range registered.
//! * The page server ([`PageServer`]) is one thread that owns every
//!   userfaultfd and keeps, per address space, the set of ranges still
//!   unfilled ([`unfilled`]), each with the image address it holds. It
//!   answers a fault by descending the faulting region's chunk list to the
//!   one chunk holding the address ([`crate::chunklist::chunk_at`]: at most
//!   depth + 1 node reads, nodes cached as they are content-addressed), and
//!   `UFFDIO_COPY` of that chunk's unfilled pages, read on a catalog
//!   connection of its own (`UFFDIO_ZEROPAGE` where the image has no
//!   data), then the rest of the chunk's aligned group of
//!   [`FAULT_AROUND`] chunks in one coalesced read (the program touches
//!   runs of pages; from S3 each next page would wait a round trip). The
//!   faults are kept, in order, for the next restart's prefetch
//!   ([`prefetch`]), which the filler thread issues before the fill. It
//!   follows the events: a forked child gets the parent's
//!   unfilled set; a remapped range moves in it; an unmapped or
//!   `MADV_DONTNEED` range leaves it (it reads as zero now). Between
//!   events it copies in the chunks the filler thread decodes: the filler
//!   walks each lazy region's chunk list ([`crate::chunklist::load_sparse`],
//!   from when the programs start; nothing waits for it) and reads the
//!   chunks in parallel
//!   ([`Store::read_blobs_batched`]); the server copies each where it is
//!   still unfilled. Only the server copies, so a range dropped by an
//!   event is never filled after it.
//! * A chunk or chunk-list node that cannot be read kills every process of
//!   the restart with `SIGKILL` and says which and why, worded by what
//!   failed whichever read met it first (a fault's node or chunk, or the
//!   filler's walk: under load it is often a fault): the store unreachable
//!   ("cannot read ... from the store": make it reachable), damaged data
//!   ("... is damaged": a corrupt or missing blob, a node of the wrong
//!   shape; only an older generation helps), or the kernel refusing the
//!   copy ([`Fix`]). A fault never waits for ever. A watchdog process
//!   ([`watchdog`]) does the same if the server's process dies; after the
//!   server's own kill it kills silently (the server did not die).
//!   [`PageServer::failed`] lets the restart stop waiting for processes
//!   that were killed before they were back at the coordinator.
//! * Measured (BENCHMARKS.md, 2026-12-07, 2 cores under load): first
//!   output of a warm lazy restart 46 ms at 256 MiB, 49 ms at 1 GiB, 52 ms
//!   at 4 GiB (0.026×, 0.0079×, 0.0017× the eager restart of the same run).
//! * When the filler is done, what is still unfilled is what the image has
//!   no data for: the server closes the userfaultfds (the kernel
//!   unregisters the ranges, which read as zero) and writes zero to each
//!   agent's lazy word ([`ckpt_wire::agent::LAZY_OFFSET`]): a checkpoint
//!   waits for that (a snapshot fork before it would not see the pages
//!   still to come), and the agent's own write-protect registration can
//!   take the ranges again.

mod prefetch;
mod unfilled;
mod watchdog;

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, mpsc};
use std::time::Instant;

use ckpt_chunker::Hash;
use ckpt_store::{BlobReader, Store};
use ckpt_wire::uapi::*;

use crate::chunklist;
use crate::error::{EngineError, Result};
use crate::image::*;
use crate::remote;

use unfilled::{Piece, Unfilled};
use watchdog::Watchdog;

const PAGE: u64 = 4096;
/// Chunk-list nodes the server keeps (1 KiB each at most).
const NODE_CACHE: usize = 1 << 16;
/// Chunks read on fault that the server keeps (an image of many equal
/// pages faults the same chunk again and again).
const CHUNK_CACHE: usize = 256;
/// Chunks the filler looks up and reads at a time.
const FILL_SLICE: usize = 1 << 14;
/// Chunks of the aligned group a fault brings in (the faulting one first):
/// [`Server::around`].
const FAULT_AROUND: u64 = 16;

/// One lazily served region, as the image has it.
#[derive(Clone, Debug)]
pub(super) struct LazyRegion {
    pub start: u64,
    pub end: u64,
    /// Its chunk-list tree: top level and inner depth.
    top: Vec<Hash>,
    depth: u32,
}

/// The lazily served part of one process's memory.
#[derive(Clone, Debug, Default)]
pub(super) struct LazyPart {
    /// The regions registered `MISSING`, by address.
    pub regions: Vec<LazyRegion>,
    /// Their indices in the image's regions.
    pub indices: Vec<usize>,
    chunk_size: u64,
    /// The process's PID (for messages).
    pid: i32,
}

impl LazyPart {
    /// The lazy regions of `image`, per the rules above; each checked in
    /// O(1) (page-aligned, a chunk-list tree of a shape that can describe
    /// it) so that a damaged image is refused before anything runs.
    pub(super) fn of(generation: u64, image: &ProcessImage) -> Result<LazyPart> {
        let bad = |what: String| EngineError::BadImage { generation, what };
        let indices = lazy_regions(image);
        let chunk_size = image.chunk_size as u64;
        if !indices.is_empty() && (chunk_size == 0 || !chunk_size.is_multiple_of(PAGE)) {
            return Err(bad(format!("process {} has chunks of {chunk_size} bytes, not a whole number of pages", image.pid)));
        }
        let mut regions = Vec::with_capacity(indices.len());
        for &i in &indices {
            let r = &image.regions[i];
            if !r.start.is_multiple_of(PAGE) || !r.end.is_multiple_of(PAGE) || r.start >= r.end {
                return Err(bad(format!("region {:#x}-{:#x} of process {} is not a range of whole pages", r.start, r.end, image.pid)));
            }
            chunklist::check_shape(generation, &r.segments, r.depth, (r.end - r.start).div_ceil(chunk_size))?;
            regions.push(LazyRegion { start: r.start, end: r.end, top: r.segments.clone(), depth: r.depth });
        }
        regions.sort_unstable_by_key(|r| r.start);
        if regions.windows(2).any(|w| w[0].end > w[1].start) {
            return Err(bad(format!("process {} has overlapping regions", image.pid)));
        }
        Ok(LazyPart { regions, indices, chunk_size, pid: image.pid })
    }

    /// The region holding image address `src`.
    fn region_at(&self, src: u64) -> Option<&LazyRegion> {
        let k = self.regions.partition_point(|r| r.start <= src);
        self.regions[..k].last().filter(|r| src < r.end)
    }

    /// Bytes of the lazy regions.
    fn bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.end - r.start).sum()
    }
}

/// Which regions of `image` come lazily (indices), per the rules above.
fn lazy_regions(image: &ProcessImage) -> Vec<usize> {
    let mut hot: Vec<u64> = vec![image.agent.restart_word_addr];
    for t in &image.threads {
        hot.extend([t.ucontext, t.fs_base, t.rseq_addr, t.robust_list, t.clear_child_tid]);
    }
    hot.retain(|&a| a != 0);
    image
        .regions
        .iter()
        .enumerate()
        .filter(|(_, r)| {
            // Private anonymous: no file (so no fd of its own either).
            matches!(r.kind, RegionKind::Private | RegionKind::Heap | RegionKind::Stack)
                && r.file.is_none()
                && r.sysv.is_none()
                && !r.segments.is_empty()
                && !r.attrs.iter().any(|a| a == "lo")
                && !hot.iter().any(|&a| a >= r.start && a < r.end)
        })
        .map(|(i, _)| i)
        .collect()
}

/// The fd number the restorer gives its userfaultfd: above every fd the
/// process and the restorer hold.
pub(super) fn uffd_number(image: &ProcessImage, restorer_fds: impl Iterator<Item = RawFd>) -> i32 {
    image.fds.iter().map(|f| f.fd).chain(restorer_fds).max().unwrap_or(2) + 1
}

/// One address space the server serves: a restored process, or a child it
/// forked before its memory was all in.
struct Space {
    /// 0 for a forked child (the event does not say its PID).
    pid: i32,
    origin: usize,
    uffd: OwnedFd,
    unfilled: Unfilled,
    /// The agent's lazy word (0: none to clear).
    word: u64,
}

/// A process of a lazy restart, its userfaultfd taken and registered.
pub(super) struct Attached {
    space: Space,
}

/// Takes the userfaultfd the restorer of `pid` left at `fd` and registers
/// `part`'s ranges. `Err` says why the process cannot be served lazily (its
/// lazy part is then written eagerly: nothing is registered).
pub(super) fn attach(pid: i32, origin: usize, fd: i32, part: &LazyPart, word: u64) -> std::result::Result<Attached, String> {
    // SAFETY: pidfd_open returns a new fd or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as RawFd;
    if pidfd < 0 {
        return Err(format!("pidfd_open: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: a new fd we own.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    // SAFETY: pidfd_getfd returns a new fd or -1.
    let u = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) } as RawFd;
    if u < 0 {
        return Err(format!(
            "its restorer could not make a userfaultfd that serves the kernel's accesses too ({}): that needs root (CAP_SYS_PTRACE) or vm.unprivileged_userfaultfd=1",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: a new fd we own.
    let uffd = unsafe { OwnedFd::from_raw_fd(u) };
    let features = UFFD_FEATURE_EVENT_FORK | UFFD_FEATURE_EVENT_REMAP | UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_UNMAP;
    let mut api = UffdioApi { api: UFFD_API, features, ioctls: 0 };
    // SAFETY: UFFDIO_API on our userfaultfd with a struct we own.
    if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API as _, &mut api) } != 0 {
        return Err(format!("UFFDIO_API with the fork, remap, remove and unmap events: {}", std::io::Error::last_os_error()));
    }
    let mut unfilled = Unfilled::default();
    for r in &part.regions {
        let mut reg = UffdioRegister { start: r.start, len: r.end - r.start, mode: UFFDIO_REGISTER_MODE_MISSING, ioctls: 0 };
        // SAFETY: UFFDIO_REGISTER on our userfaultfd with a struct we own.
        if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER as _, &mut reg) } != 0 {
            return Err(format!("UFFDIO_REGISTER of {:#x}-{:#x}: {}", r.start, r.end, std::io::Error::last_os_error()));
        }
        unfilled.insert(Piece { dst: r.start, len: r.end - r.start, src: r.start });
    }
    Ok(Attached { space: Space { pid, origin, uffd, unfilled, word } })
}

enum Copy {
    Done,
    /// The address space is changing (an event to read first).
    Again,
    /// The range or the process is gone.
    Gone,
    /// The kernel refused for another reason (errno): the page cannot be
    /// served.
    Failed(i32),
}

fn copy_errno(uffd: RawFd, at: u64, errno: i32) -> Option<Copy> {
    match errno {
        libc::EEXIST => {
            // Already there (a zero page served, or a child's own page):
            // wake whoever waits on it, go on after it.
            wake(uffd, at, PAGE);
            None
        }
        libc::EAGAIN => Some(Copy::Again),
        // The range was unregistered or unmapped, or the process exited.
        libc::ENOENT | libc::ENOSPC | libc::ESRCH => Some(Copy::Gone),
        e => Some(Copy::Failed(e)),
    }
}

/// `UFFDIO_COPY` of `data` to `dst`, page by page past pages already there.
fn copy(uffd: RawFd, dst: u64, data: &[u8]) -> Copy {
    let mut off = 0u64;
    while off < data.len() as u64 {
        let mut c = UffdioCopy { dst: dst + off, src: data.as_ptr() as u64 + off, len: data.len() as u64 - off, mode: 0, copy: 0 };
        // SAFETY: UFFDIO_COPY from our buffer (only read) into the
        // registered range of the process the fd belongs to.
        let r = unsafe { libc::ioctl(uffd, UFFDIO_COPY as _, &mut c) };
        if r == 0 {
            return Copy::Done;
        }
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        if c.copy > 0 {
            off += c.copy as u64;
            continue;
        }
        if let Some(c) = copy_errno(uffd, dst + off, errno) {
            return c;
        }
        off += PAGE;
    }
    Copy::Done
}

/// `UFFDIO_ZEROPAGE` of `len` bytes at `dst`, past pages already there.
fn zero(uffd: RawFd, dst: u64, len: u64) -> Copy {
    let mut off = 0u64;
    while off < len {
        let mut z = UffdioZeropage { start: dst + off, len: len - off, mode: 0, zeropage: 0 };
        // SAFETY: UFFDIO_ZEROPAGE with a struct we own.
        if unsafe { libc::ioctl(uffd, UFFDIO_ZEROPAGE as _, &mut z) } == 0 {
            return Copy::Done;
        }
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        if z.zeropage > 0 {
            off += z.zeropage as u64;
            continue;
        }
        if let Some(c) = copy_errno(uffd, dst + off, errno) {
            return c;
        }
        off += PAGE;
    }
    Copy::Done
}

fn wake(uffd: RawFd, start: u64, len: u64) {
    let mut r = [start, len];
    // SAFETY: UFFDIO_WAKE with a range struct we own.
    unsafe { libc::ioctl(uffd, UFFDIO_WAKE as _, r.as_mut_ptr()) };
}

/// One chunk the filler read: its bytes and the image addresses it goes to.
struct Filled {
    hash: Hash,
    data: Arc<[u8]>,
    srcs: Vec<u64>,
}

/// What the filler thread sends: decoded chunks of one origin process.
enum Fill {
    Batch(usize, Vec<Filled>),
    Done,
    Failed(Fix, String),
}

type Job = Box<dyn FnOnce() + Send>;

/// The two threads of a lazy restart (the reader and the page server),
/// started before any process is cloned: a thread made later could take
/// a TID the image's threads need. Each waits for its one job.
pub(super) struct Threads {
    workers: Vec<(mpsc::Sender<Job>, std::thread::JoinHandle<()>)>,
}

impl Threads {
    pub(super) fn start() -> Result<Threads> {
        let mut workers = Vec::new();
        for name in ["ckpt-lazy-read", "ckpt-page-server"] {
            let (tx, rx) = mpsc::channel::<Job>();
            let h = std::thread::Builder::new()
                .name(name.into())
                .spawn(move || {
                    if let Ok(job) = rx.recv() {
                        job()
                    }
                })
                .map_err(|e| EngineError::io(format!("starting the lazy restart's thread {name}"), e))?;
            workers.push((tx, h));
        }
        Ok(Threads { workers })
    }
}

/// The running page server of a lazy restart.
pub struct PageServer {
    /// Bytes of memory it brings in (on fault or in the background).
    pub bytes: u64,
    /// Why it killed the computation, once it has.
    failure: Arc<std::sync::Mutex<Option<String>>>,
    done: mpsc::Receiver<Result<FillReport>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// What the background fill did.
#[derive(Debug, Default, Clone, Copy)]
pub struct FillReport {
    pub faults: u64,
    pub copied_bytes: u64,
    pub ms: f64,
}

impl PageServer {
    /// Why the server killed the computation (a page it could not get),
    /// once it has (it said so on stderr): the restart need not wait for
    /// the processes to come back.
    pub fn failed(&self) -> Option<String> {
        self.failure.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits until every page is in (or the processes are gone).
    pub fn wait(mut self) -> Result<FillReport> {
        let r = self.done.recv().unwrap_or(Ok(FillReport::default()));
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        r
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        // Dropping the server must not leave faults unserved: wait for it.
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}


/// The filler's work: every lazy region's chunk list walked, its chunks
/// read in slices and sent to the server. Runs after the programs do.
fn fill_all(store: &Store, generation: u64, parts: &[LazyPart], skip: &HashSet<(usize, u64)>, send: &(dyn Fn(Fill) -> bool + Sync)) -> std::result::Result<(), (Fix, String)> {
    for (origin, part) in parts.iter().enumerate() {
        for r in &part.regions {
            let n = (r.end - r.start).div_ceil(part.chunk_size);
            let what = || format!("the chunk list of region {:#x}-{:#x} of process {}", r.start, r.end, part.pid);
            let list = chunklist::load_sparse(store, generation, &r.top, r.depth, n).map_err(|e| match e {
                EngineError::Store(e) => unreadable(&what(), &e),
                e => (Fix::Image, format!("{}: {e}", what())),
            })?;
            if list.len != n {
                return Err((Fix::Image, format!("the chunk list of region {:#x}-{:#x} lists {} chunks, expected {n} (generation {generation}: a damaged image)", r.start, r.end, list.len)));
            }
            for slice in list.entries.chunks(FILL_SLICE) {
                let mut dests: HashMap<Hash, Vec<u64>> = HashMap::new();
                for &(i, h) in slice {
                    let src = r.start + i * part.chunk_size;
                    // Already read by the prefetch (and copied or stashed).
                    if !skip.contains(&(origin, src)) {
                        dests.entry(h).or_default().push(src);
                    }
                }
                if dests.is_empty() {
                    continue;
                }
                let hashes: Vec<Hash> = dests.keys().copied().collect();
                store
                    .read_blobs_batched(&hashes, |batch| {
                        let items = batch.iter().map(|(h, d)| Filled { hash: *h, data: Arc::from(*d), srcs: dests.get(h).cloned().unwrap_or_default() }).collect();
                        if send(Fill::Batch(origin, items)) { Ok(()) } else { Err(ckpt_store::StoreError::Callback("the page server stopped".into())) }
                    })
                    .map_err(|e| unreadable(&format!("the memory of region {:#x}-{:#x} of process {}", r.start, r.end, part.pid), &e))?;
            }
        }
    }
    Ok(())
}

/// Why `what` did not come from the store: it holds it damaged (or not at
/// all), or it cannot be read now (unreachable, an I/O error).
fn unreadable(what: &str, e: &ckpt_store::StoreError) -> (Fix, String) {
    use ckpt_store::StoreError as E;
    match e {
        E::Corrupt { .. } | E::BlobNotFound { .. } | E::MissingPack { .. } | E::Tampered { .. } | E::BadName { .. } => (Fix::Image, format!("{what} is damaged in the store: {e}")),
        _ => (Fix::Store, format!("cannot read {what} from the store: {e}")),
    }
}

/// What the user can do about a page the server could not bring in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fix {
    /// The store could not be read now: make it reachable, restart again.
    Store,
    /// The image or the store holds damaged data: no restart of this
    /// generation can bring that memory back.
    Image,
    /// The kernel refused the copy.
    Kernel,
}

/// Starts the page server for `attached` (their lazy parts: `parts`, by
/// origin index; the part of a process not attached is empty), killing
/// `all_pids` if a chunk cannot be read.
pub(super) fn serve(threads: Threads, store: &Store, generation: u64, attached: Vec<Attached>, parts: Vec<LazyPart>, all_pids: Vec<i32>) -> Result<PageServer> {
    let reader = store.blob_reader()?;
    let bytes: u64 = parts.iter().map(|p| p.bytes()).sum();
    let parts = Arc::new(parts);
    let (tx, rx) = mpsc::sync_channel::<Fill>(8);
    // SAFETY: eventfd returns a new fd or -1.
    let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if efd < 0 {
        return Err(EngineError::io("eventfd for the page server", std::io::Error::last_os_error()));
    }
    // SAFETY: a new fd we own.
    let wakeup = Arc::new(unsafe { OwnedFd::from_raw_fd(efd) });
    let ping = wakeup.clone();
    let send = move |f: Fill| -> bool {
        let ok = tx.send(f).is_ok();
        // SAFETY: writing a u64 to our eventfd.
        unsafe { libc::write(ping.as_raw_fd(), &1u64 as *const u64 as *const libc::c_void, 8) };
        ok
    };
    let fill_store = store.clone();
    let fill_parts = parts.clone();
    // The record the prefetch used (origin, image address), for the next.
    let used: Arc<std::sync::Mutex<Vec<(usize, u64)>>> = Default::default();
    let used_by_filler = used.clone();
    // Faults served so far (the prefetch lets the program's first ones go first).
    let faults = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let faults_seen = faults.clone();
    let mut workers = threads.workers.into_iter();
    let (read_tx, read_h) = workers.next().expect("two workers");
    let (serve_tx, serve_h) = workers.next().expect("two workers");
    let stopped = || EngineError::Restore { generation, what: "a thread of the lazy restart stopped before it started".into() };
    read_tx
        .send(Box::new(move || {
            // The pages touched first last time, ahead of the fill.
            let t = Instant::now();
            let (from, wanted) = prefetch::find(&fill_store, generation, &fill_parts);
            *used_by_filler.lock().unwrap_or_else(|e| e.into_inner()) = wanted.clone();
            let settle = || prefetch::settle(&faults_seen);
            let done = prefetch::prefetch(&fill_store, generation, &fill_parts, &prefetch::around(&wanted, &fill_parts), &settle, &send);
            if let Some(g) = from {
                tracing::debug!(record = g, entries = wanted.len(), chunks = done.len(), ms = t.elapsed().as_millis() as u64, "prefetched the pages touched first");
            }
            match fill_all(&fill_store, generation, &fill_parts, &done, &send) {
            Ok(()) => {
                send(Fill::Done);
            }
            Err(e) => {
                send(Fill::Failed(e.0, e.1));
            }
        }}))
        .map_err(|_| stopped())?;
    let spaces: Vec<Space> = attached.into_iter().map(|a| a.space).collect();
    let depth = parts.iter().flat_map(|p| p.regions.iter().map(|r| r.depth)).max().unwrap_or(0);
    let zeros = chunklist::zero_nodes(depth as usize + 1);
    // Forked while it can still take a copy of every userfaultfd.
    let watchdog = Watchdog::start(generation, &all_pids)?;
    let (done_tx, done) = mpsc::channel();
    let failure: Arc<std::sync::Mutex<Option<String>>> = Default::default();
    let failed = failure.clone();
    let record_store = store.clone();
    serve_tx
        .send(Box::new(move || {
            let server = Server {
                generation,
                parts,
                spaces,
                reader,
                zeros,
                nodes: HashMap::new(),
                chunks: HashMap::new(),
                rx,
                all_pids,
                report: FillReport::default(),
                wakeup,
                stash: Vec::new(),
                watchdog,
                failed,
                faulted: Vec::new(),
                faulted_seen: HashSet::new(),
                faults,
            };
            let r = server.run();
            if let Ok((_, faulted, parts)) = &r {
                let used = used.lock().unwrap_or_else(|e| e.into_inner()).clone();
                write_record(&record_store, generation, &used, faulted, parts);
            }
            let _ = done_tx.send(r.map(|(report, _, _)| report));
        }))
        .map_err(|_| stopped())?;
    Ok(PageServer { bytes, failure, done, threads: vec![read_h, serve_h] })
}

struct Server {
    generation: u64,
    /// The lazy regions of each origin process.
    parts: Arc<Vec<LazyPart>>,
    spaces: Vec<Space>,
    reader: BlobReader,
    /// [`chunklist::zero_nodes`] up to the deepest tree.
    zeros: Vec<Hash>,
    /// Chunk-list nodes read on fault: their children.
    nodes: HashMap<Hash, Arc<[Hash]>>,
    /// Chunks read on fault.
    chunks: HashMap<Hash, Arc<[u8]>>,
    rx: mpsc::Receiver<Fill>,
    all_pids: Vec<i32>,
    report: FillReport,
    /// Written by the filler after each batch (an eventfd).
    wakeup: Arc<OwnedFd>,
    /// Chunks whose copy met a changing address space: copied again after
    /// the events (origin, image address, chunk).
    stash: Vec<(usize, u64, Hash, Arc<[u8]>)>,
    /// Kills the computation if this process dies before the fill ends.
    watchdog: Watchdog,
    /// [`PageServer::failed`]'s answer.
    failed: Arc<std::sync::Mutex<Option<String>>>,
    /// The chunks with data whose faults it served, in order (origin,
    /// image address), at most [`prefetch::MAX_ENTRIES`]: the next
    /// restart's prefetch.
    faulted: Vec<(usize, u64)>,
    faulted_seen: HashSet<(usize, u64)>,
    /// [`FillReport::faults`], for the prefetch to see.
    faults: Arc<std::sync::atomic::AtomicU64>,
}

/// Writes generation `generation`'s first-touched record for the next
/// restart, if this one had new faults. A failure only costs the next
/// restart its prefetch: warned about, not an error.
fn write_record(store: &Store, generation: u64, used: &[(usize, u64)], faulted: &[(usize, u64)], parts: &[LazyPart]) {
    let Some(body) = prefetch::next_record(used, faulted, parts) else { return };
    match store.generation(generation).and_then(|g| store.put_touched(&g, &body)) {
        Ok(()) => tracing::debug!(generation, entries = (body.len() - 12) / 12, "wrote the first-touched record"),
        Err(e) => tracing::warn!(generation, "cannot write the first-touched record (the next lazy restart will not prefetch): {e}"),
    }
}

type Ran = (FillReport, Vec<(usize, u64)>, Arc<Vec<LazyPart>>);

impl Server {
    fn run(mut self) -> Result<Ran> {
        let t0 = Instant::now();
        let mut reading = true;
        loop {
            self.events()?;
            for (origin, src, h, data) in std::mem::take(&mut self.stash) {
                self.fill(origin, src, &h, &data)?;
            }
            if !reading && self.stash.is_empty() {
                break;
            }
            // One batch at a time, the userfaultfds read between batches: a
            // fault waits for at most one batch's copies.
            match self.rx.try_recv() {
                Ok(Fill::Batch(origin, items)) => {
                    for f in items {
                        for &src in &f.srcs {
                            self.fill(origin, src, &f.hash, &f.data)?;
                        }
                    }
                    continue;
                }
                Ok(Fill::Done) | Err(mpsc::TryRecvError::Disconnected) => {
                    reading = false;
                    continue;
                }
                Ok(Fill::Failed(fix, why)) => return Err(self.die(fix, format!("the background fill: {why}"))),
                Err(mpsc::TryRecvError::Empty) => {}
            }
            // Nothing to copy: sleep until a fault, an event or a batch.
            let mut fds: Vec<libc::pollfd> = self.spaces.iter().map(|s| libc::pollfd { fd: s.uffd.as_raw_fd(), events: libc::POLLIN, revents: 0 }).collect();
            fds.push(libc::pollfd { fd: self.wakeup.as_raw_fd(), events: libc::POLLIN, revents: 0 });
            // SAFETY: poll on fds we own.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as _, 100) };
            let mut v = 0u64;
            // SAFETY: reading the eventfd's counter into a u64 we own.
            unsafe { libc::read(self.wakeup.as_raw_fd(), &mut v as *mut u64 as *mut libc::c_void, 8) };
        }
        // Everything is in: what is still unfilled the image has no data
        // for, zero as a fresh mapping is. Closing the userfaultfds
        // unregisters the ranges (the watchdog's copies first).
        self.watchdog.disarm();
        for s in self.spaces.drain(..) {
            if s.word != 0 && s.pid > 0
                && let Err(e) = remote::write(s.pid, s.word, &0u64.to_le_bytes())
            {
                tracing::debug!(pid = s.pid, "cannot clear the lazy word: {e}");
            }
            tracing::debug!(pid = s.pid, zero_bytes = s.unfilled.bytes(), "left to read as zero");
        }
        self.report.ms = t0.elapsed().as_secs_f64() * 1000.0;
        tracing::debug!(ms = self.report.ms as u64, faults = self.report.faults, bytes = self.report.copied_bytes, "lazy fill done");
        Ok((self.report, std::mem::take(&mut self.faulted), self.parts.clone()))
    }

    /// Reads and handles every queued message of every userfaultfd.
    fn events(&mut self) -> Result<()> {
        let mut i = 0;
        while i < self.spaces.len() {
            loop {
                let mut msg = UffdMsg::default();
                // SAFETY: reading one uffd_msg into a struct of its size.
                let n = unsafe { libc::read(self.spaces[i].uffd.as_raw_fd(), &mut msg as *mut UffdMsg as *mut libc::c_void, std::mem::size_of::<UffdMsg>()) };
                if n != std::mem::size_of::<UffdMsg>() as isize {
                    break;
                }
                self.message(i, msg)?;
            }
            i += 1;
        }
        Ok(())
    }

    fn message(&mut self, i: usize, msg: UffdMsg) -> Result<()> {
        match msg.event {
            UFFD_EVENT_PAGEFAULT => {
                self.report.faults += 1;
                self.faults.store(self.report.faults, std::sync::atomic::Ordering::Relaxed);
                let addr = msg.arg[1] & !(PAGE - 1);
                self.fault(i, addr)?;
            }
            UFFD_EVENT_FORK => {
                // SAFETY: the kernel installed this fd in our table for us.
                let uffd = unsafe { OwnedFd::from_raw_fd(msg.arg[0] as u32 as RawFd) };
                let p = &self.spaces[i];
                // Which child: the parent's one we do not know yet (the
                // event does not say; several forks at once come as several
                // events, in order: the lowest PID first). Its lazy word is
                // the parent's, cleared with the others at the end.
                let pid = if p.pid > 0 { self.new_child_of(p.pid) } else { 0 };
                let child = Space { pid, origin: p.origin, uffd, unfilled: p.unfilled.clone(), word: if pid > 0 { p.word } else { 0 } };
                self.spaces.push(child);
            }
            UFFD_EVENT_REMAP => {
                let (from, to, len) = (msg.arg[0], msg.arg[1], msg.arg[2]);
                self.spaces[i].unfilled.moved(from, to, len);
            }
            UFFD_EVENT_REMOVE | UFFD_EVENT_UNMAP => {
                // Gone, or dropped: reads as zero from now on, never filled.
                let (start, end) = (msg.arg[0], msg.arg[1]);
                self.spaces[i].unfilled.carve(start, end);
            }
            _ => {}
        }
        Ok(())
    }

    /// A child of `parent` that no space has yet (the lowest), or 0.
    fn new_child_of(&self, parent: i32) -> i32 {
        let mut kids: Vec<i32> = Vec::new();
        for t in std::fs::read_dir(format!("/proc/{parent}/task")).into_iter().flatten().flatten() {
            if let Ok(c) = std::fs::read_to_string(t.path().join("children")) {
                kids.extend(c.split_whitespace().filter_map(|w| w.parse::<i32>().ok()));
            }
        }
        kids.into_iter().filter(|k| !self.spaces.iter().any(|s| s.pid == *k) && !self.all_pids.contains(k)).min().unwrap_or(0)
    }

    fn who(&self, i: usize) -> String {
        match self.spaces[i].pid {
            0 => "a child forked by the computation".to_string(),
            p => format!("process {p}"),
        }
    }

    /// Serves a fault at `page` of space `i`: the chunk holding it, found
    /// by descending its region's chunk list, copied where it is unfilled.
    fn fault(&mut self, i: usize, page: u64) -> Result<()> {
        let uffd = self.spaces[i].uffd.as_raw_fd();
        let origin = self.spaces[i].origin;
        let parts = self.parts.clone();
        let part = &parts[origin];
        let target = self.spaces[i].unfilled.at(page).map(|p| p.src + (page - p.dst)).and_then(|src| part.region_at(src).map(|r| (src, r)));
        let r = match target {
            // Filled, dropped since, or never the image's: a zero page.
            None => zero(uffd, page, PAGE),
            Some((src, region)) => {
                let index = (src - region.start) / part.chunk_size;
                let start = region.start + index * part.chunk_size;
                let len = (region.end - start).min(part.chunk_size);
                let h = self.hash_of(i, page, region, index)?;
                if !h.is_zero_chunk() && self.faulted.len() < prefetch::MAX_ENTRIES && self.faulted_seen.insert((origin, start)) {
                    self.faulted.push((origin, start));
                }
                if h.is_zero_chunk() {
                    self.place(i, start, len, None)
                } else {
                    let data = self.chunk(i, page, &h)?;
                    if data.len() as u64 != len {
                        return Err(self.die(Fix::Image, format!("chunk {h} is {} bytes, the image needs {len} at {start:#x} of {}", data.len(), self.who(i))));
                    }
                    match self.place(i, start, len, Some(&data)) {
                        // The thread runs on; its neighbours come next.
                        Copy::Done => self.around(i, page, region, index)?,
                        other => other,
                    }
                }
            }
        };
        match r {
            // The thread faults again once the events are read: it is served then.
            Copy::Again => wake(uffd, page, PAGE),
            Copy::Gone | Copy::Done => {}
            Copy::Failed(e) => return Err(self.die(Fix::Kernel, format!("the kernel refused the memory at {page:#x} of {}: {}", self.who(i), std::io::Error::from_raw_os_error(e)))),
        }
        Ok(())
    }

    /// Fault-around: after a fault at chunk `index` of `region`, the other
    /// chunks of its aligned group of [`FAULT_AROUND`] still unfilled in
    /// space `i`, read together (one coalesced read: a group's chunks are
    /// mostly neighbours in one pack) and copied in. A fault is where the
    /// program overtook the fill, and it touches runs of pages: without
    /// this each next page of the run faults and waits a round trip of its
    /// own.
    fn around(&mut self, i: usize, page: u64, region: &LazyRegion, index: u64) -> Result<Copy> {
        let part = self.parts[self.spaces[i].origin].clone();
        let n = (region.end - region.start).div_ceil(part.chunk_size);
        let first = index / FAULT_AROUND * FAULT_AROUND;
        let mut want: Vec<(u64, u64, Hash)> = Vec::new();
        for k in (first..(first + FAULT_AROUND).min(n)).filter(|&k| k != index) {
            let src = region.start + k * part.chunk_size;
            let len = (region.end - src).min(part.chunk_size);
            if self.spaces[i].unfilled.of_source(src, src + len).is_empty() {
                continue;
            }
            let h = self.hash_of(i, page, region, k)?;
            if !h.is_zero_chunk() {
                want.push((src, len, h));
            }
        }
        if want.is_empty() {
            return Ok(Copy::Done);
        }
        let mut hashes: Vec<Hash> = want.iter().map(|w| w.2).collect();
        hashes.sort_unstable();
        hashes.dedup();
        // On the server's own reader: never behind the fill's reads.
        let got: HashMap<Hash, Vec<u8>> = match self.reader.read_many(&hashes) {
            Ok(v) => v.into_iter().collect(),
            Err(e) => {
                let (fix, why) = unreadable(&format!("the memory around {page:#x} of {}", self.who(i)), &e);
                return Err(self.die(fix, why));
            }
        };
        for (src, len, h) in want {
            let Some(data) = got.get(&h) else { continue };
            if data.len() as u64 != len {
                return Err(self.die(Fix::Image, format!("chunk {h} is {} bytes, the image needs {len} at {src:#x} of {}", data.len(), self.who(i))));
            }
            match self.place(i, src, len, Some(data)) {
                Copy::Done | Copy::Gone => {}
                // The address space changes: the fill (or a fault) brings these.
                Copy::Again => break,
                failed => return Ok(failed),
            }
        }
        Ok(Copy::Done)
    }

    /// The hash of chunk `index` of `region`, from its chunk-list tree (the
    /// nodes on the way cached).
    fn hash_of(&mut self, i: usize, page: u64, region: &LazyRegion, index: u64) -> Result<Hash> {
        let (generation, reader, nodes) = (self.generation, &self.reader, &mut self.nodes);
        // Why a node read failed, when it was the store's answer (it is
        // unreachable, or holds the node damaged): said as such, not as a
        // damaged image.
        let mut failed: Option<(Fix, String)> = None;
        let mut read = |n: &Hash| -> Result<Arc<[Hash]>> {
            if let Some(k) = nodes.get(n) {
                return Ok(k.clone());
            }
            let bytes = reader.read(n).map_err(|e| {
                failed = Some(unreadable(&format!("chunk-list node {n}"), &e));
                EngineError::Store(e)
            })?;
            let kids: Arc<[Hash]> = chunklist::node_children(generation, n, &bytes)?.into();
            if nodes.len() >= NODE_CACHE {
                nodes.clear();
            }
            nodes.insert(*n, kids.clone());
            Ok(kids)
        };
        let found = chunklist::chunk_at(&mut read, generation, &region.top, region.depth, &self.zeros, index);
        found.map_err(|e| {
            let at = format!("the memory at {page:#x} of {} (region {:#x}-{:#x})", self.who(i), region.start, region.end);
            match failed {
                Some((fix, why)) => self.die(fix, format!("{at}: {why}")),
                None => self.die(Fix::Image, format!("{at} cannot be found: {e}")),
            }
        })
    }

    /// Chunk `h`, read for a fault at `page` of space `i`.
    fn chunk(&mut self, i: usize, page: u64, h: &Hash) -> Result<Arc<[u8]>> {
        if let Some(d) = self.chunks.get(h) {
            return Ok(d.clone());
        }
        let data: Arc<[u8]> = match self.reader.read(h) {
            Ok(d) => d.into(),
            Err(e) => {
                let (fix, why) = unreadable(&format!("the memory at {page:#x} of {} (chunk {h})", self.who(i)), &e);
                return Err(self.die(fix, why));
            }
        };
        if self.chunks.len() >= CHUNK_CACHE {
            self.chunks.clear();
        }
        self.chunks.insert(*h, data.clone());
        Ok(data)
    }

    /// Copies the image's `[src, src + len)` (`data`, or zeros) wherever it
    /// is still unfilled in space `i`, and takes it out of the set.
    fn place(&mut self, i: usize, src: u64, len: u64, data: Option<&[u8]>) -> Copy {
        let s = &mut self.spaces[i];
        let uffd = s.uffd.as_raw_fd();
        for p in s.unfilled.of_source(src, src + len) {
            let off = (p.src - src) as usize;
            let r = match data {
                Some(d) => copy(uffd, p.dst, &d[off..off + p.len as usize]),
                None => zero(uffd, p.dst, p.len),
            };
            match r {
                Copy::Done | Copy::Gone => {
                    if matches!(r, Copy::Done) && data.is_some() {
                        self.report.copied_bytes += p.len;
                    }
                    s.unfilled.carve(p.dst, p.dst + p.len);
                }
                again_or_failed => return again_or_failed,
            }
        }
        Copy::Done
    }

    /// Copies chunk `h` (the image's memory at `src` of process `origin`)
    /// wherever it is still unfilled in the spaces of `origin`.
    fn fill(&mut self, origin: usize, src: u64, h: &Hash, data: &Arc<[u8]>) -> Result<()> {
        let parts = self.parts.clone();
        let part = &parts[origin];
        let Some(region) = part.region_at(src) else { return Ok(()) };
        let want = (region.end - src).min(part.chunk_size);
        if data.len() as u64 != want {
            return Err(self.die(Fix::Image, format!("chunk {h} is {} bytes, the image needs {want} at {src:#x} of process {}", data.len(), self.all_pids.get(origin).copied().unwrap_or(0))));
        }
        for i in 0..self.spaces.len() {
            if self.spaces[i].origin != origin {
                continue;
            }
            match self.place(i, src, want, Some(data)) {
                Copy::Done | Copy::Gone => {}
                Copy::Again => {
                    self.stash.push((origin, src, *h, data.clone()));
                    return Ok(());
                }
                Copy::Failed(e) => return Err(self.die(Fix::Kernel, format!("the kernel refused the memory at {src:#x} of {}: {}", self.who(i), std::io::Error::from_raw_os_error(e)))),
            }
        }
        Ok(())
    }

    /// Kills the computation and says why.
    fn die(&self, fix: Fix, why: String) -> EngineError {
        // The restored processes and the children they forked since.
        for pid in self.all_pids.iter().copied().chain(self.spaces.iter().map(|s| s.pid).filter(|&p| p > 0)) {
            // SAFETY: kill takes no pointer.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        // The watchdog kills too (the process groups as well: children
        // forked during the fill that no space names), silently: this says why.
        self.watchdog.killed();
        let fix = match fix {
            Fix::Store => "Make the store reachable and restart again (or restart without --lazy)",
            Fix::Image => "This generation cannot be restarted whole: run `ckpt verify` and restart an older generation",
            Fix::Kernel => "Restart again without --lazy",
        };
        let what = format!("lazy restart: {why}; every process of the restart was killed (SIGKILL) rather than left waiting for memory that cannot come. {fix}");
        eprintln!("ckpt: generation {}: {what}", self.generation);
        *self.failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
        EngineError::Restore { generation: self.generation, what }
    }
}

#[cfg(test)]
mod tests {
    use super::{Fix, unreadable};
    use ckpt_store::StoreError;

    /// A store that cannot be read now is said as such, damaged data as
    /// damage: the fix differs (make the store reachable, or restart an
    /// older generation), whichever read met it.
    #[test]
    fn a_store_error_is_worded_by_its_cause() {
        let gone = StoreError::Io { context: "GET s3://b/p/packs/ab/x.pack".into(), source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused) };
        let (fix, why) = unreadable("chunk-list node n", &gone);
        assert_eq!(fix, Fix::Store);
        assert!(why.starts_with("cannot read chunk-list node n from the store: GET"), "{why}");
        let h = ckpt_chunker::Hash([7; 32]);
        let bad = StoreError::Corrupt { pack: "/s/packs/ab/x.pack".into(), hash: h, reason: "its bytes hash to something else".into() };
        let (fix, why) = unreadable("chunk-list node n", &bad);
        assert_eq!(fix, Fix::Image);
        assert!(why.starts_with("chunk-list node n is damaged in the store: blob") && why.contains(&h.to_string()), "{why}");
        let missing = StoreError::BlobNotFound { hash: h, path: "/s".into() };
        assert_eq!(unreadable("x", &missing).0, Fix::Image);
    }
}
