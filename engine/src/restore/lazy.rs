//! Lazy restart (`ckpt restart --lazy`): the program runs as soon as its
//! registers, stacks and the memory its threads' state lives in are back;
//! the rest of its private anonymous memory comes on demand from a page
//! server in the driver, and in the background until all of it is in.
//!
//! * Each restorer makes a userfaultfd (not `UFFD_USER_MODE_ONLY`: the
//!   program's own system calls, e.g. a `read()` into a page still missing,
//!   and the kernel's reads of a signal frame fault in kernel mode and must
//!   be served too) and moves it to a number the driver chose
//!   ([`ckpt_wire::restore::flags::MOVE_FD`]). At the first barrier the
//!   driver takes it (`pidfd_getfd`), enables the non-cooperative events
//!   (fork, mremap, munmap, `MADV_DONTNEED`) and registers `MISSING` on
//!   the lazy regions ([`split`]); the restorer closes its copy.
//! * Lazy regions: private anonymous memory with content, except a region
//!   that holds any thread's signal frame (its stack), TLS, rseq area,
//!   robust list or clear-tid word, or the agent's restart word, and
//!   `mlock`ed regions (populated at once anyway). The rest is written
//!   before the program runs, as in an eager restart.
//! * The page server ([`PageServer`]) is one thread that owns every
//!   userfaultfd: it answers faults (`UFFDIO_COPY` of the chunk holding the
//!   address, read on a catalog connection of its own; `UFFDIO_ZEROPAGE`
//!   where the image has no data), follows the events (a forked child gets
//!   the parent's pending pages; a remapped range moves them; an unmapped or
//!   `MADV_DONTNEED` range drops them: they read as zero now), and copies
//!   in the chunks a reader thread decodes in parallel
//!   ([`Store::read_blobs_batched`]) between events. Only this thread
//!   copies, so a page dropped by an event is never filled after it.
//! * A chunk that cannot be read (the store unreachable, a corrupt pack)
//!   kills every process of the restart with `SIGKILL` and says why: a
//!   fault never waits for ever.
//! * When every chunk is in, the server closes the userfaultfds (the kernel
//!   unregisters the ranges) and writes zero to each agent's lazy word
//!   ([`ckpt_wire::agent::LAZY_OFFSET`]): a checkpoint waits for that (a
//!   snapshot fork before it would not see the pages still to come), and
//!   the agent's own write-protect registration can take the ranges again.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::mpsc;
use std::time::Instant;

use ckpt_chunker::Hash;
use ckpt_store::{BlobReader, Store};
use ckpt_wire::uapi::*;

use crate::error::{EngineError, Result};
use crate::image::*;
use crate::remote;

use super::memory::Dests;

const PAGE: u64 = 4096;

/// The lazily served part of one process's memory.
#[derive(Default)]
pub(super) struct LazyPart {
    /// The regions registered `MISSING`, `[start, end)`.
    pub ranges: Vec<(u64, u64)>,
    /// Chunks of those regions and where each goes.
    pub dests: Dests,
}

/// Which regions of `image` come lazily (indices), per the rules above.
fn lazy_regions(image: &ProcessImage, region_fds: &HashMap<usize, RawFd>) -> Vec<usize> {
    let mut hot: Vec<u64> = vec![image.agent.restart_word_addr];
    for t in &image.threads {
        hot.extend([t.ucontext, t.fs_base, t.rseq_addr, t.robust_list, t.clear_child_tid]);
    }
    hot.retain(|&a| a != 0);
    image
        .regions
        .iter()
        .enumerate()
        .filter(|(i, r)| {
            matches!(r.kind, RegionKind::Private | RegionKind::Heap | RegionKind::Stack)
                && !region_fds.contains_key(i)
                && r.file.is_none()
                && r.sysv.is_none()
                && !r.segments.is_empty()
                && !r.attrs.iter().any(|a| a == "lo")
                && !hot.iter().any(|&a| a >= r.start && a < r.end)
        })
        .map(|(i, _)| i)
        .collect()
}

/// Splits the chunks of one process: those written before it runs (the
/// returned [`Dests`]) and those served lazily.
pub(super) fn split(image: &ProcessImage, region_fds: &HashMap<usize, RawFd>, dests: Dests) -> (Dests, LazyPart) {
    let mut ranges: Vec<(u64, u64)> = lazy_regions(image, region_fds).into_iter().map(|i| (image.regions[i].start, image.regions[i].end)).collect();
    ranges.sort_unstable();
    let lazy_at = |a: u64| {
        let k = ranges.partition_point(|r| r.0 <= a);
        k > 0 && a < ranges[k - 1].1
    };
    let mut eager = Dests::new();
    let mut lazy = Dests::new();
    for (h, v) in dests {
        let (l, e): (Vec<_>, Vec<_>) = v.into_iter().partition(|(a, _)| lazy_at(*a));
        if !l.is_empty() {
            lazy.insert(h, l);
        }
        if !e.is_empty() {
            eager.insert(h, e);
        }
    }
    (eager, LazyPart { ranges, dests: lazy })
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
    /// Chunks still missing: address → (hash, length).
    pending: BTreeMap<u64, (Hash, usize)>,
    /// The same, by hash.
    want: HashMap<Hash, Vec<u64>>,
    /// The agent's lazy word (0: none to clear).
    word: u64,
}

impl Space {
    fn take(&mut self, addr: u64) -> Option<(Hash, usize)> {
        let (h, len) = self.pending.remove(&addr)?;
        if let Some(v) = self.want.get_mut(&h) {
            v.retain(|&a| a != addr);
            if v.is_empty() {
                self.want.remove(&h);
            }
        }
        Some((h, len))
    }
    fn put(&mut self, addr: u64, h: Hash, len: usize) {
        self.pending.insert(addr, (h, len));
        self.want.entry(h).or_default().push(addr);
    }
    /// The pending chunk holding `addr`.
    fn chunk_at(&self, addr: u64) -> Option<u64> {
        self.pending.range(..=addr).next_back().filter(|(s, (_, len))| addr < **s + *len as u64).map(|(s, _)| *s)
    }
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
    for &(start, end) in &part.ranges {
        let mut reg = UffdioRegister { start, len: end - start, mode: UFFDIO_REGISTER_MODE_MISSING, ioctls: 0 };
        // SAFETY: UFFDIO_REGISTER on our userfaultfd with a struct we own.
        if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER as _, &mut reg) } != 0 {
            return Err(format!("UFFDIO_REGISTER of {start:#x}-{end:#x}: {}", std::io::Error::last_os_error()));
        }
    }
    let mut space = Space { pid, origin, uffd, pending: BTreeMap::new(), want: HashMap::new(), word };
    for (h, v) in &part.dests {
        for &(a, len) in v {
            space.put(a, *h, len);
        }
    }
    Ok(Attached { space })
}

enum Copy {
    Done,
    /// The address space is changing (an event to read first).
    Again,
    /// The range or the process is gone.
    Gone,
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
        match errno {
            libc::EEXIST => {
                // Already there (a zero page served, or a child's own page):
                // wake whoever waits on it, go on after it.
                wake(uffd, dst + off, PAGE);
                off += PAGE;
            }
            libc::EAGAIN => return Copy::Again,
            _ => return Copy::Gone,
        }
    }
    Copy::Done
}

fn wake(uffd: RawFd, start: u64, len: u64) {
    let mut r = [start, len];
    // SAFETY: UFFDIO_WAKE with a range struct we own.
    unsafe { libc::ioctl(uffd, UFFDIO_WAKE as _, r.as_mut_ptr()) };
}

fn zeropage(uffd: RawFd, page: u64) -> Copy {
    let mut z = UffdioZeropage { start: page, len: PAGE, mode: 0, zeropage: 0 };
    // SAFETY: UFFDIO_ZEROPAGE with a struct we own.
    if unsafe { libc::ioctl(uffd, UFFDIO_ZEROPAGE as _, &mut z) } == 0 {
        return Copy::Done;
    }
    match std::io::Error::last_os_error().raw_os_error().unwrap_or(0) {
        libc::EEXIST => {
            wake(uffd, page, PAGE);
            Copy::Done
        }
        libc::EAGAIN => Copy::Again,
        _ => Copy::Gone,
    }
}

/// What the reader thread sends: decoded chunks of one origin process.
enum Fill {
    Batch(usize, Vec<(Hash, Vec<u8>)>),
    Done,
    Failed(String),
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

/// Starts the page server for `attached` (their lazy parts: `parts`, by
/// origin index), killing `all_pids` if a chunk cannot be read.
pub(super) fn serve(threads: Threads, store: &Store, generation: u64, attached: Vec<Attached>, parts: Vec<Dests>, all_pids: Vec<i32>) -> Result<PageServer> {
    let reader = store.blob_reader()?;
    let bytes: u64 = parts.iter().flat_map(|d| d.values()).flatten().map(|(_, len)| *len as u64).sum();
    let (tx, rx) = mpsc::sync_channel::<Fill>(8);
    // SAFETY: eventfd returns a new fd or -1.
    let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if efd < 0 {
        return Err(EngineError::io("eventfd for the page server", std::io::Error::last_os_error()));
    }
    // SAFETY: a new fd we own.
    let wakeup = std::sync::Arc::new(unsafe { OwnedFd::from_raw_fd(efd) });
    let ping = wakeup.clone();
    let send = move |f: Fill| -> bool {
        let ok = tx.send(f).is_ok();
        // SAFETY: writing a u64 to our eventfd.
        unsafe { libc::write(ping.as_raw_fd(), &1u64 as *const u64 as *const libc::c_void, 8) };
        ok
    };
    let fill_store = store.clone();
    let mut workers = threads.workers.into_iter();
    let (read_tx, read_h) = workers.next().expect("two workers");
    let (serve_tx, serve_h) = workers.next().expect("two workers");
    let stopped = || EngineError::Restore { generation, what: "a thread of the lazy restart stopped before it started".into() };
    read_tx
        .send(Box::new(move || {
            for (origin, dests) in parts.into_iter().enumerate() {
                if dests.is_empty() {
                    continue;
                }
                let hashes: Vec<Hash> = dests.keys().copied().collect();
                let r = fill_store.read_blobs_batched(&hashes, |batch| {
                    let owned = batch.iter().map(|(h, d)| (*h, d.to_vec())).collect();
                    if send(Fill::Batch(origin, owned)) { Ok(()) } else { Err(ckpt_store::StoreError::Callback("the page server stopped".into())) }
                });
                if let Err(e) = r {
                    send(Fill::Failed(e.to_string()));
                    return;
                }
            }
            send(Fill::Done);
        }))
        .map_err(|_| stopped())?;
    let spaces: Vec<Space> = attached.into_iter().map(|a| a.space).collect();
    // Forked while it can still take a copy of every userfaultfd.
    let watchdog = Watchdog::start(generation, &all_pids)?;
    let (done_tx, done) = mpsc::channel();
    serve_tx
        .send(Box::new(move || {
            let r = Server { generation, spaces, reader, rx, all_pids, report: FillReport::default(), wakeup, stash: Vec::new(), watchdog }.run();
            let _ = done_tx.send(r);
        }))
        .map_err(|_| stopped())?;
    Ok(PageServer { bytes, done, threads: vec![read_h, serve_h] })
}

struct Server {
    generation: u64,
    spaces: Vec<Space>,
    reader: BlobReader,
    rx: mpsc::Receiver<Fill>,
    all_pids: Vec<i32>,
    report: FillReport,
    /// Written by the reader after each batch (an eventfd).
    wakeup: std::sync::Arc<OwnedFd>,
    /// Chunks whose copy met a changing address space: copied again after
    /// the events.
    stash: Vec<(usize, Hash, Vec<u8>)>,
    /// Kills the computation if this process dies before the fill ends.
    watchdog: Watchdog,
}

/// A process of ours that kills the computation if the page server's
/// process (`ckpt restart`, or ckpt's init) dies before every page is in:
/// killed with it, the server's userfaultfds would close, and the kernel
/// would then give the missing pages as zeros, memory the program never
/// had. The watchdog holds a copy of each userfaultfd, so those pages
/// cannot fill with zeros while it lives: it waits on a pipe whose only
/// writer is the server, and at end of file without the server's "done"
/// kills every restored process and every process group one of them leads
/// (children forked during the fill), then exits. Forked from a
/// multithreaded process, it runs raw system calls only, on data prepared
/// before the fork.
struct Watchdog {
    pid: i32,
    pipe: Option<OwnedFd>,
}

impl Watchdog {
    fn start(generation: u64, all_pids: &[i32]) -> Result<Watchdog> {
        let err = |what: &str| EngineError::io(format!("the lazy restart's watchdog: {what}"), std::io::Error::last_os_error());
        let pidfds: Vec<OwnedFd> = all_pids
            .iter()
            // SAFETY: pidfd_open returns a new fd or -1.
            .filter_map(|&p| match unsafe { libc::syscall(libc::SYS_pidfd_open, p, 0) } {
                fd if fd >= 0 => Some(unsafe { OwnedFd::from_raw_fd(fd as RawFd) }),
                _ => None,
            })
            .collect();
        let mut groups: Vec<i32> = all_pids.iter().copied().filter(|&p| crate::procfs::tree_ids(p).is_ok_and(|t| t.pgid == p)).collect();
        groups.sort_unstable();
        groups.dedup();
        let msg = format!(
            "ckpt: generation {generation}: the lazy restart's page server died before all memory was in: every process of the restart was killed (SIGKILL); restart again\n"
        );
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(err("pipe"));
        }
        // SAFETY: both are new fds we own.
        let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: the child runs only the raw system calls below (no
        // allocation, no lock: other threads of ours may hold them) and
        // leaves with _exit.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(err("fork"));
        }
        if pid == 0 {
            // SAFETY: raw calls on fds and buffers prepared before the fork.
            unsafe {
                libc::close(wr.as_raw_fd());
                let mut b = 0u8;
                let n = loop {
                    let n = libc::read(rd.as_raw_fd(), &mut b as *mut u8 as *mut libc::c_void, 1);
                    if n < 0 && *libc::__errno_location() == libc::EINTR {
                        continue;
                    }
                    break n;
                };
                if n == 1 && b == b'D' {
                    libc::_exit(0);
                }
                for fd in &pidfds {
                    libc::syscall(libc::SYS_pidfd_send_signal, fd.as_raw_fd(), libc::SIGKILL, 0usize, 0u32);
                }
                for &g in &groups {
                    libc::kill(-g, libc::SIGKILL);
                }
                libc::write(2, msg.as_ptr() as *const libc::c_void, msg.len());
                libc::_exit(1);
            }
        }
        Ok(Watchdog { pid, pipe: Some(wr) })
    }

    /// Every page is in: the watchdog leaves (and its copies of the
    /// userfaultfds with it), killing nothing.
    fn disarm(&mut self) {
        if let Some(p) = self.pipe.take() {
            // SAFETY: one byte to our pipe.
            unsafe { libc::write(p.as_raw_fd(), b"D".as_ptr() as *const libc::c_void, 1) };
        }
        self.reap();
    }

    fn reap(&mut self) {
        if self.pid > 0 {
            // SAFETY: waiting for our own child.
            unsafe { libc::waitpid(self.pid, std::ptr::null_mut(), libc::__WALL) };
            self.pid = 0;
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        // Not disarmed: the fill failed or stopped; the watchdog kills.
        self.pipe.take();
        self.reap();
    }
}

impl Server {
    fn run(mut self) -> Result<FillReport> {
        let t0 = Instant::now();
        let mut reading = true;
        loop {
            self.events()?;
            for (origin, h, data) in std::mem::take(&mut self.stash) {
                self.fill(origin, &h, &data);
            }
            if !reading && self.stash.is_empty() {
                break;
            }
            // One batch at a time, the userfaultfds read between batches: a
            // fault waits for at most one batch's copies.
            match self.rx.try_recv() {
                Ok(Fill::Batch(origin, items)) => {
                    for (h, data) in items {
                        self.fill(origin, &h, &data);
                    }
                    continue;
                }
                Ok(Fill::Done) | Err(mpsc::TryRecvError::Disconnected) => {
                    reading = false;
                    continue;
                }
                Ok(Fill::Failed(e)) => return Err(self.die(format!("the background fill cannot read the store: {e}"))),
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
        // Everything is in: pages no chunk lists are zero, as a fresh
        // mapping's. Closing the userfaultfds unregisters the ranges (the
        // watchdog's copies first).
        self.watchdog.disarm();
        for s in self.spaces.drain(..) {
            if s.word != 0 && s.pid > 0 {
                if let Err(e) = remote::write(s.pid, s.word, &0u64.to_le_bytes()) {
                    tracing::debug!(pid = s.pid, "cannot clear the lazy word: {e}");
                }
            }
            let left = s.pending.len();
            if left > 0 {
                tracing::debug!(pid = s.pid, left, "chunks never filled (their range went away)");
            }
        }
        self.report.ms = t0.elapsed().as_secs_f64() * 1000.0;
        tracing::debug!(ms = self.report.ms as u64, faults = self.report.faults, bytes = self.report.copied_bytes, "lazy fill done");
        Ok(self.report)
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
                let child = Space { pid, origin: p.origin, uffd, pending: p.pending.clone(), want: p.want.clone(), word: if pid > 0 { p.word } else { 0 } };
                self.spaces.push(child);
            }
            UFFD_EVENT_REMAP => {
                let (from, to, len) = (msg.arg[0], msg.arg[1], msg.arg[2]);
                let s = &mut self.spaces[i];
                let moved: Vec<u64> = s.pending.range(from..from + len).map(|(a, _)| *a).collect();
                for a in moved {
                    if let Some((h, l)) = s.take(a) {
                        s.put(a - from + to, h, l);
                    }
                }
            }
            UFFD_EVENT_REMOVE | UFFD_EVENT_UNMAP => {
                let (start, end) = (msg.arg[0], msg.arg[1]);
                // A chunk partly inside keeps its other pages: they are
                // copied now, the pages inside read as zero from now on.
                let first = self.spaces[i].chunk_at(start);
                let gone: Vec<u64> = first.into_iter().chain(self.spaces[i].pending.range(start..end).map(|(a, _)| *a)).collect();
                for a in gone {
                    let Some((h, len)) = self.spaces[i].take(a) else { continue };
                    if a >= start && a + len as u64 <= end {
                        continue;
                    }
                    let data = self.read(i, a, &h)?;
                    let uffd = self.spaces[i].uffd.as_raw_fd();
                    for p in (0..len as u64).step_by(PAGE as usize) {
                        let at = a + p;
                        if at < start || at >= end {
                            let e = (p + PAGE).min(len as u64);
                            let _ = copy(uffd, at, &data[p as usize..e as usize]);
                        }
                    }
                }
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

    fn read(&self, i: usize, addr: u64, h: &Hash) -> Result<Vec<u8>> {
        self.reader.read(h).map_err(|e| {
            let who = match self.spaces[i].pid {
                0 => "a child forked by the computation".to_string(),
                p => format!("process {p}"),
            };
            self.die(format!("cannot read the memory at {addr:#x} of {who} from the store: {e}"))
        })
    }

    fn fault(&mut self, i: usize, page: u64) -> Result<()> {
        let uffd = self.spaces[i].uffd.as_raw_fd();
        let r = match self.spaces[i].chunk_at(page) {
            Some(start) => {
                let (h, len) = self.spaces[i].pending[&start];
                let data = self.read(i, page, &h)?;
                if data.len() != len {
                    return Err(self.die(format!("chunk {h} is {} bytes, the image needs {len} at {start:#x}", data.len())));
                }
                self.spaces[i].take(start);
                self.report.copied_bytes += len as u64;
                let r = copy(uffd, start, &data);
                if matches!(r, Copy::Again) {
                    self.spaces[i].put(start, h, len);
                }
                r
            }
            // Zero in the image (or dropped since): a zero page.
            None => zeropage(uffd, page),
        };
        match r {
            // The thread faults again once the events are read: it is served then.
            Copy::Again => wake(uffd, page, PAGE),
            Copy::Gone => {}
            Copy::Done => {}
        }
        Ok(())
    }

    /// Copies chunk `h` wherever it is still missing in the spaces of `origin`.
    fn fill(&mut self, origin: usize, h: &Hash, data: &[u8]) {
        for s in self.spaces.iter_mut().filter(|s| s.origin == origin) {
            let addrs = s.want.get(h).cloned().unwrap_or_default();
            for a in addrs {
                let Some((_, len)) = s.take(a) else { continue };
                if len != data.len() {
                    continue;
                }
                match copy(s.uffd.as_raw_fd(), a, data) {
                    Copy::Done => self.report.copied_bytes += len as u64,
                    Copy::Again => {
                        s.put(a, *h, len);
                        self.stash.push((origin, *h, data.to_vec()));
                        return;
                    }
                    Copy::Gone => {}
                }
            }
        }
    }

    /// Kills the computation and says why.
    fn die(&self, why: String) -> EngineError {
        // The restored processes and the children they forked since.
        for pid in self.all_pids.iter().copied().chain(self.spaces.iter().map(|s| s.pid).filter(|&p| p > 0)) {
            // SAFETY: kill takes no pointer.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let what = format!("lazy restart: {why}; every process of the restart was killed (SIGKILL) rather than left waiting for memory that cannot come. Make the store reachable and restart again (or restart without --lazy)");
        eprintln!("ckpt: generation {}: {what}", self.generation);
        EngineError::Restore { generation: self.generation, what }
    }
}
