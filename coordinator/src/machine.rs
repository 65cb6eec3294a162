//! One machine's share of a checkpoint.
//!
//! Reading a stopped process needs its kernel: `/proc/PID`, `pidfd_getfd`,
//! `process_vm_readv`, TCP repair. So the work of a round is cut by
//! machine (a kernel and PID namespace): the coordinator does it for the
//! processes it can reach itself, and a capture helper (`ckpt host`, see
//! [`crate::host`]) does it on every other machine, with the same code: the
//! functions here. What differs is behind two seams: where blobs go
//! ([`BlobSink`]: the store's writer, or the connection to the coordinator
//! that owns it) and how the agents are asked things ([`AgentLink`]: the
//! agents talk to the coordinator only).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ckpt_engine::capture::{AgentReport, Base, CopyRule, Prepared, ProcReads, RoundFiles, prepare};
use ckpt_engine::dirty::Backend;
use ckpt_engine::fds::TcpEnd;
use ckpt_engine::image::{ProcessEntry, RegionKind};
use ckpt_engine::procfs;
use ckpt_store::BlobSink;
use ckpt_wire::Pod;
use ckpt_wire::agent::{self as proto, Forked, Hello, RangeList, Registered, kind};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The most memory a round copies out of a process while it is stopped
/// instead of forking a snapshot (a bound on the coordinator's buffers).
const COPY_MAX_BYTES: u64 = 256 << 20;

/// A process is copied out rather than forked while the pages to read are
/// at most one per this many present pages: copying a page out while
/// stopped costs about as much as a snapshot fork's copy of this many
/// page-table entries (bench-stop; docs/design.md, "Checkpoint, step by step").
const PAGES_PER_READ: u64 = 32;

/// ... plus this many pages whatever the size: a snapshot fork has a fixed
/// cost besides its page tables (a new address space, the snapshot's
/// message and exit, copy-on-write faults the program then takes on every
/// page it writes), about 120 µs for a raw fork of a small process here
/// while a page copied out costs 3-7 µs. Without it every small process
/// with a few dozen written pages (its stack, libc's data) was forked: 16
/// such processes stopped together spent 5-7 ms each in `fork` on 2 cores
/// (bench-trees).
const COPY_FREE_PAGES: u64 = 64;

/// How long an agent may take to answer a request while it is stopped.
pub(crate) const AGENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Asks the agent of a process something while the process is stopped.
pub(crate) trait AgentLink: Sync {
    /// Sends `kind` + `payload` to the agent of `pid`; its answer.
    fn call(&self, pid: i32, kind: u32, payload: &[u8]) -> Result<(u32, Vec<u8>), String>;
}

/// A stopped process, as the coordinator hands it to a machine's capture.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Target {
    pub pid: i32,
    /// The coordinator's connection id of its agent: a base of an earlier
    /// connection (the pid was reused) is not this process's.
    pub conn: u64,
    pub host: String,
    /// The agent's HELLO and SUSPENDED payloads, as received (hex).
    pub hello: String,
    pub suspended: String,
}

impl Target {
    pub fn new(pid: i32, conn: u64, host: &str, hello: &Hello, suspended: &[u8]) -> Target {
        Target { pid, conn, host: host.to_string(), hello: hex::encode(hello.as_bytes()), suspended: hex::encode(suspended) }
    }

    pub fn report(&self) -> Result<AgentReport, String> {
        let bad = || format!("process {}: malformed agent report", self.pid);
        let hello = hex::decode(&self.hello).ok().and_then(|b| Hello::parse(&b)).ok_or_else(bad)?;
        let payload = hex::decode(&self.suspended).map_err(|_| bad())?;
        if hello.pid != self.pid {
            return Err(format!("process {}: its report is of process {}", self.pid, hello.pid));
        }
        parse_suspended(&hello, &payload)
    }
}

/// Settings of one round.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct RoundOpts {
    pub generation: u64,
    /// Fork a copy-on-write snapshot of each process (unless it asked not).
    pub fork: bool,
    pub chunk_size: usize,
    /// Fds given to the computation from outside: (fd, readlink target).
    pub externals: Vec<(i32, String)>,
    /// Seconds the stopped phase may take (0: no deadline); past it, the
    /// step in progress fails naming itself and the round is abandoned.
    #[serde(default)]
    pub deadline_s: u64,
    /// Set by `ckpt kill`/`quit` to end the round at once (this machine's
    /// coordinator only).
    #[serde(skip)]
    pub cancel: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// One process's part of a round in progress.
pub(crate) struct Work {
    pub pid: i32,
    pub conn: u64,
    prep: Option<Prepared>,
    pub snapshot: Option<i32>,
    /// Its memory to store was copied out while it was stopped
    /// ([`Prepared::copy_out`]); its `VmFlags` are read after the resume.
    copied: bool,
    /// Where the stopped time went, for `ckpt log --json`.
    timings: Value,
}

/// What a machine's round gives the commit, per process.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Captured {
    pub entry: ProcessEntry,
    pub conn: u64,
    pub logical_bytes: u64,
    pub backend: String,
    /// For the generation's info (`ckpt log --json`).
    pub summary: Value,
    /// The image, for the check before the commit (this machine's
    /// processes; a helper's stay on its host).
    #[serde(skip)]
    pub image: Option<Box<ckpt_engine::image::ProcessImage>>,
}

/// The stopped phase of a machine's processes: the fds of all of them back
/// to back in one thread (connections between them are read within the
/// shortest time), while a worker per process reads the rest of it
/// (metadata, dirty pages, write tracking, snapshot, memory the snapshot
/// lacks), no more workers running at once than there are cores besides
/// the fd reader's. TCP connections leave repair mode at the end. Returns the work begun (every snapshot forked is
/// in it, to be killed whatever happens) and either the TCP ends whose peer
/// was not among these processes or an error saying whether to try again.
///
/// `gate` is called once this machine's processes are read, before its TCP
/// connections leave repair mode: it returns when every machine of the
/// round got there (true), or when one failed (false). A connection whose
/// ends are on two machines is thus held on both until both are read: an
/// end let go early would send (retransmit, flush) to the other end while
/// that one is still being read, and the two images would disagree.
#[allow(clippy::type_complexity)]
pub(crate) fn phase_a(
    targets: &[(Target, AgentReport)],
    bases: &HashMap<i32, Base>,
    sink: &dyn BlobSink,
    link: &dyn AgentLink,
    opts: &RoundOpts,
    gate: &dyn Fn() -> bool,
) -> (Vec<Work>, Result<Vec<TcpEnd>, (String, bool)>) {
    // What the fd reader and each worker read once between them
    // (maps, status), and the round's mapped-file identities.
    let reads: Vec<ProcReads> = targets.iter().map(|(_, r)| ProcReads::new(r.hello.pid)).collect();
    let files = RoundFiles::new().with_members(targets.iter().map(|(_, r)| r.hello.pid));
    let busy = |e: ckpt_engine::EngineError| {
        let retry = matches!(e, ckpt_engine::EngineError::SocketBusy { .. });
        (e.to_string(), retry)
    };
    let mut round = ckpt_engine::fds::Round::new(sink).with_externals(&opts.externals);
    if opts.deadline_s > 0 {
        round = round.with_deadline(opts.deadline_s, opts.cancel.clone());
    }
    let t0 = Instant::now();
    let cpu0 = cpu_ms();
    // The fds need the round's state (a pipe or socket shared by two
    // processes is read once): this thread reads them, process after
    // process, while the workers read the processes' memory and metadata,
    // each taking the next process not begun. (The fds read before any
    // of that kept a core idle for ~0.2 ms per process.)
    let n = targets.len();
    // At most one worker per core runs at a time, the fd reader counting
    // as one while it reads: with a thread per process running at once,
    // the fd reader got 1/17 of 2 cores and ended last, alone (fds 7-12 ms
    // for 3 ms of work). A worker waiting for its agent (a snapshot fork)
    // lets another run meanwhile, and starts one if processes are left:
    // those waits overlap as with a thread per process (one thread per
    // core and no more made the first checkpoint 1.3x slower: the waits
    // queued). Threads are started only so: a thread per process, most of
    // them waiting for a permit, cost the 16 small processes of
    // bench-trees ~10% of the round's CPU while stopped.
    // (Asked once: `available_parallelism` reads the cgroup's files,
    // ~1% of the stopped phase's CPU when asked every round.)
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let cores = *CORES.get_or_init(|| std::thread::available_parallelism().map_or(2, |c| c.get()));
    let places = cores.saturating_sub(1).max(1);
    let pool = Pool {
        targets,
        bases,
        sink,
        link,
        opts,
        reads: &reads,
        files: &files,
        next: AtomicUsize::new(0),
        failed: AtomicBool::new(false),
        done: (0..n).map(|_| Mutex::new(None)).collect(),
        permits: Permits::new(places),
    };
    let mut fds_ms = 0.0;
    let fds: Result<Vec<_>, _> = std::thread::scope(|s| {
        for _ in 0..places.min(n) {
            start_worker(&pool, s);
        }
        let fds = targets
            .iter()
            .zip(&reads)
            .map(|((_, r), reads)| {
                // Its fds, and the temporary files it keeps open or maps
                // shared (read while it is stopped: ckpt_engine::tmpfiles).
                reads.dir().and_then(|dir| round.capture_process(dir, &r.agent_fds())).and_then(|f| ckpt_engine::tmpfiles::capture(&mut round, r.hello.pid, &f, reads).map(|t| (f, t)))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(busy);
        fds_ms = t0.elapsed().as_secs_f64() * 1000.0;
        // After a failure the workers begin no other process.
        pool.failed.store(fds.is_err(), Ordering::Release);
        // Its core goes to the workers (and to this thread, as one).
        pool.permits.add();
        worker(&pool, s);
        // (The scope waits for every worker, those started meanwhile too.)
        fds
    });
    let done = pool.done;
    let mut work = Vec::new();
    let mut first_err = None;
    let mut fds = fds.map(Vec::into_iter);
    for (i, slot) in done.into_iter().enumerate() {
        // None: a worker panicked on it, or it was not begun after a failure.
        let (w, r) = slot.into_inner().unwrap_or_else(|e| e.into_inner()).unwrap_or_else(|| (None, Err(format!("internal: the capture of process {} did not finish (its thread panicked)", targets[i].1.hello.pid))));
        let mut w = w;
        let its_fds = fds.as_mut().ok().and_then(Iterator::next);
        if let (Some(prep), Some((f, temp_files))) = (w.as_mut().and_then(|w| w.prep.as_mut()), its_fds) {
            prep.image.fds = f;
            prep.image.temp_files = temp_files;
        }
        work.extend(w);
        if let (Err(e), None) = (r, &first_err) {
            first_err = Some(e);
        }
    }
    if let Err(e) = fds {
        return (work, Err(e));
    }
    if let Some(e) = first_err {
        return (work, Err((e, false)));
    }
    let rest_ms = t0.elapsed().as_secs_f64() * 1000.0 - fds_ms;
    if !gate() {
        return (work, Err(("the checkpoint failed on another machine".into(), false)));
    }
    let ends = round.finish().map_err(busy);
    tracing::debug!(fds_ms, rest_ms, cpu_ms = cpu_ms() - cpu0, finish_ms = t0.elapsed().as_secs_f64() * 1000.0 - fds_ms - rest_ms, "stopped phase of this machine's processes");
    (work, ends)
}

/// How many of a round's workers may run at once (a counting semaphore).
struct Permits {
    free: Mutex<usize>,
    cv: std::sync::Condvar,
}

/// A permit held; given back when dropped (also by a panicking worker).
struct Permit<'a>(&'a Permits);

impl Permits {
    fn new(n: usize) -> Permits {
        Permits { free: Mutex::new(n), cv: std::sync::Condvar::new() }
    }

    fn take(&self) -> Permit<'_> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        while *free == 0 {
            free = self.cv.wait(free).unwrap_or_else(|e| e.into_inner());
        }
        *free -= 1;
        Permit(self)
    }

    fn add(&self) {
        *self.free.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.cv.notify_one();
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.0.add();
    }
}

/// The workers of a round's stopped phase and what they share.
struct Pool<'a> {
    targets: &'a [(Target, AgentReport)],
    bases: &'a HashMap<i32, Base>,
    sink: &'a dyn BlobSink,
    link: &'a dyn AgentLink,
    opts: &'a RoundOpts,
    reads: &'a [ProcReads],
    files: &'a RoundFiles,
    /// The next process not begun.
    next: AtomicUsize,
    failed: AtomicBool,
    done: Vec<Mutex<Option<Outcome>>>,
    permits: Permits,
}

/// A process's read: its work (with its snapshot, if one was forked) and
/// whether every step succeeded.
type Outcome = (Option<Work>, Result<(), String>);

/// Starts a worker of `pool`.
fn start_worker<'scope, 'env, 'a: 'scope>(pool: &'scope Pool<'a>, s: &'scope std::thread::Scope<'scope, 'env>) {
    s.spawn(move || worker(pool, s));
}

/// Takes the next process of `pool` not begun and reads it, until none
/// is left.
fn worker<'scope, 'env, 'a: 'scope>(pool: &'scope Pool<'a>, s: &'scope std::thread::Scope<'scope, 'env>) {
    let more = || start_worker(pool, s);
    let link = Throttled { pool, start: &more };
    while !pool.failed.load(Ordering::Acquire) {
        let i = pool.next.fetch_add(1, Ordering::AcqRel);
        let Some((t, r)) = pool.targets.get(i) else { break };
        let _running = pool.permits.take();
        // A panic leaves its process without a result (an error after
        // the scope), and the round's other processes are read.
        let read = || one(t, r, pool.bases, pool.sink, &link, pool.opts, &pool.reads[i], pool.files);
        if let Ok(result) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(read)) {
            *pool.done[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
        }
    }
}

/// The agents as a worker asks them: its permit is given back while it
/// waits for the answer, and another worker is started if processes
/// remain to be begun.
struct Throttled<'p, 'a> {
    pool: &'p Pool<'a>,
    start: &'p (dyn Fn() + Sync),
}

impl AgentLink for Throttled<'_, '_> {
    fn call(&self, pid: i32, kind: u32, payload: &[u8]) -> Result<(u32, Vec<u8>), String> {
        if self.pool.next.load(Ordering::Acquire) < self.pool.targets.len() && !self.pool.failed.load(Ordering::Acquire) {
            (self.start)();
        }
        self.pool.permits.add();
        let r = self.pool.link.call(pid, kind, payload);
        // Taken again, and kept by the worker's own permit (dropped at
        // the end of its process).
        std::mem::forget(self.pool.permits.take());
        r
    }
}

/// CPU time this process used so far (every thread), in ms: the stopped
/// phase's debug line says how much of its time was work.
fn cpu_ms() -> f64 {
    let t = |v: nix::sys::time::TimeVal| v.tv_sec() as f64 * 1000.0 + v.tv_usec() as f64 / 1000.0;
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF).map_or(0.0, |u| t(u.user_time()) + t(u.system_time()))
}

/// Where the machines of a round wait for each other before their TCP
/// connections leave repair mode (see [`phase_a`]).
pub(crate) struct Gate {
    state: std::sync::Mutex<(usize, bool)>,
    cv: std::sync::Condvar,
    machines: usize,
}

impl Gate {
    pub fn new(machines: usize) -> Gate {
        Gate { state: std::sync::Mutex::new((0, false)), cv: std::sync::Condvar::new(), machines }
    }

    /// A machine got there; true once all have, false if one failed.
    pub fn arrive(&self) -> bool {
        let mut s = self.state.lock().unwrap();
        s.0 += 1;
        self.cv.notify_all();
        while s.0 < self.machines && !s.1 {
            s = self.cv.wait(s).unwrap();
        }
        !s.1
    }

    /// A machine failed before it got there.
    pub fn fail(&self) {
        let mut s = self.state.lock().unwrap();
        if s.0 < self.machines {
            s.1 = true;
        }
        self.cv.notify_all();
    }
}

/// The stopped phase of one process. Returns its work (with the snapshot,
/// if one was forked) even when a later step failed.
#[allow(clippy::too_many_arguments)]
fn one(
    t: &Target,
    report: &AgentReport,
    bases: &HashMap<i32, Base>,
    sink: &dyn BlobSink,
    link: &dyn AgentLink,
    opts: &RoundOpts,
    reads: &ProcReads,
    files: &RoundFiles,
) -> (Option<Work>, Result<(), String>) {
    let hello = &report.hello;
    let pid = hello.pid;
    let t0 = Instant::now();
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1000.0;
    let backend = Backend::choose(hello.tracking, report.suspended.uffd_fd);
    let forking = opts.fork && hello.flags & proto::HELLO_NO_FORK == 0;
    // Few pages to read: copied while it is stopped and no snapshot
    // forked (its page-table copy costs more than the copy; see
    // `copy_out`); the copy begins during the scan.
    let rule = CopyRule { max_bytes: COPY_MAX_BYTES, pages_per_read: PAGES_PER_READ, free_pages: COPY_FREE_PAGES };
    // Its fds are read meanwhile by the round's fd reader (`phase_a`).
    let mut prep = match prepare(report, backend, &t.host, opts.chunk_size, Vec::new(), reads, files, forking.then_some(rule)) {
        Ok(prep) => prep,
        Err(e) => return (None, Err(e.to_string())),
    };
    let prepare_ms = ms(t0);
    if backend == Backend::UffdWp && !prep.untracked.is_empty() {
        match link.call(pid, kind::REGISTER, &range_list(&prep.untracked)) {
            Ok((kind::REGISTERED, r)) => {
                let r = Registered::read_from(&r).unwrap_or_default();
                tracing::debug!(pid, registered = r.registered, failed = r.failed, "write tracking registered");
                if let Err(e) = ckpt_engine::dirty::protect_registered(pid, &prep.untracked) {
                    return (None, Err(format!("cannot start write tracking of process {pid}: {e}")));
                }
            }
            Ok(_) => return (None, Err(format!("process {pid} did not answer the tracking registration"))),
            Err(e) => return (None, Err(e)),
        }
    }
    // POSIX timers belong to the process: its agent reads them.
    if let Some(req) = prep.timer_request() {
        match link.call(pid, kind::TIMERS, &req) {
            Ok((kind::TIMER_VALUES, v)) => {
                if let Err(e) = prep.set_timer_values(&v) {
                    return (None, Err(e.to_string()));
                }
            }
            Ok(_) => return (None, Err(format!("process {pid} did not answer the POSIX timer request"))),
            Err(e) => return (None, Err(e)),
        }
    }
    let register_ms = ms(t0) - prepare_ms;
    let base = bases.get(&pid);
    let copied = match prep.copy_out(pid, base) {
        Ok(c) => c,
        Err(e) => return (None, Err(e.to_string())),
    };
    let copy_ms = ms(t0) - prepare_ms - register_ms;
    if copied.is_none()
        && let Err(e) = prep.read_vm_flags(pid, None)
    {
        return (None, Err(e.to_string()));
    }
    let flags_ms = ms(t0) - prepare_ms - register_ms - copy_ms;
    let mut snapshot = None;
    if forking && copied.is_none() {
        // SysV attaches stay out of the snapshot (it would count as
        // attached while it lives).
        match link.call(pid, kind::FORK, &range_list(&prep.no_fork)) {
            Ok((kind::FORKED, f)) => {
                let Some(f) = Forked::read_from(&f).filter(|_| f.len() == std::mem::size_of::<Forked>()) else {
                    return (None, Err(format!("process {pid} answered the snapshot request with {} bytes, not a FORKED", f.len())));
                };
                if f.pid != 0 {
                    if let Err(e) = check_snapshot(pid, f.pid) {
                        return (None, Err(e));
                    }
                    snapshot = Some(f.pid);
                } else {
                    tracing::warn!(pid, errno = f.errno, "fork of the snapshot failed; reading the process while it is stopped");
                }
            }
            Ok(_) => return (None, Err(format!("process {pid} did not answer the snapshot request"))),
            Err(e) => return (None, Err(e)),
        }
    }
    let fork_ms = ms(t0) - prepare_ms - register_ms - copy_ms - flags_ms;
    let mut timings = json!({"prepare_ms": prepare_ms, "meta_ms": prep.stats.meta_ms, "scan_ms": prep.stats.scan_ms, "register_ms": register_ms,
                             "copy_ms": copy_ms, "copied_bytes": copied.unwrap_or(0), "vm_flags_ms": flags_ms, "fork_ms": fork_ms});
    let stored = match snapshot {
        _ if copied.is_some() => Ok(()),
        Some(child) => {
            // Shared memory is not snapshotted by fork, a region marked
            // MADV_DONTFORK is missing from the child and one marked
            // MADV_WIPEONFORK reads zeros there: those are read now, while
            // the process is stopped.
            procfs::maps(child).map_err(|e| e.to_string()).and_then(|m| {
                let child_starts: HashSet<u64> = m.iter().map(|m| m.start).collect();
                prep.store_memory(pid, |r| r.kind == RegionKind::SharedAnon || !child_starts.contains(&r.start) || ckpt_engine::memattrs::wiped_on_fork(r), base, sink).map_err(|e| e.to_string())
            })
        }
        None => prep.store_memory(pid, |_| true, base, sink).map_err(|e| e.to_string()),
    };
    timings["stopped_read_ms"] = json!(ms(t0) - prepare_ms - register_ms - copy_ms - flags_ms - fork_ms);
    (Some(Work { pid, conn: t.conn, prep: Some(prep), snapshot, copied: copied.is_some(), timings }), stored)
}

/// A [`RangeList`] payload: the count, then each range's start and end.
fn range_list(ranges: &[(u64, u64)]) -> Vec<u8> {
    let mut payload = RangeList { count: ranges.len() as u32, _pad: 0 }.as_bytes().to_vec();
    for (a, b) in ranges {
        payload.extend_from_slice(&a.to_le_bytes());
        payload.extend_from_slice(&b.to_le_bytes());
    }
    payload
}

/// The running phase: memory from the snapshots, then each image. Returns,
/// per process, what the commit needs and the base for its next capture.
pub(crate) fn phase_b(work: &mut [Work], bases: &HashMap<i32, Base>, sink: &dyn BlobSink, generation: u64) -> Result<Vec<(Captured, Base)>, String> {
    let mut out = Vec::new();
    for i in 0..work.len() {
        // On a failure (a full store), the snapshots not read yet are
        // killed too: a snapshot left alive holds its agent in its round.
        let rest: Vec<i32> = work[i + 1..].iter().filter_map(|w| w.snapshot).collect();
        let fail = |e: String| {
            kill_all(&rest);
            e
        };
        let w = &mut work[i];
        let t0 = Instant::now();
        let stored = match (w.prep.take(), w.snapshot) {
            (None, child) => {
                kill_all(child.as_slice());
                Err("internal: capture missing".to_string())
            }
            (Some(mut prep), None) if w.copied => {
                let r = prep.store_copied_with_flags(bases.get(&w.pid), sink).map_err(|e| e.to_string());
                r.map(|_| prep)
            }
            (Some(mut prep), Some(child)) => {
                let r = prep.store_memory(child, |_| true, bases.get(&w.pid), sink).map_err(|e| e.to_string());
                kill_all(&[child]);
                r.map(|_| prep)
            }
            (Some(prep), None) => Ok(prep),
        };
        let prep = match stored {
            Ok(p) => p,
            Err(e) => return Err(fail(e)),
        };
        let w = &work[i];
        let memory_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let backend = prep.backend;
        let (image, stats, base) = prep.finish(generation, bases.get(&w.pid), sink).map_err(|e| fail(e.to_string()))?;
        let bytes = serde_json::to_vec(&image).map_err(|e| fail(e.to_string()))?;
        let hash = sink.put_meta(&bytes).map_err(|e| fail(e.to_string()))?;
        let finish_ms = t0.elapsed().as_secs_f64() * 1000.0 - memory_ms;
        let summary = json!({"pid": image.pid, "host": image.host, "exe": image.exe, "comm": image.comm, "threads": image.threads.len(),
                             "logical_bytes": stats.logical_bytes, "read_bytes": stats.read_bytes, "dirty_tracking": backend.name(),
                             "forked": w.snapshot.is_some(), "copied": w.copied, "stopped_work": w.timings,
                             "running_work": {"memory_ms": memory_ms, "finish_ms": finish_ms}});
        let entry = ProcessEntry { pid: image.pid, host: image.host.clone(), exe: image.exe.clone(), image: hash };
        out.push((Captured { entry, conn: w.conn, logical_bytes: stats.logical_bytes, backend: backend.name().to_string(), summary, image: Some(Box::new(image)) }, base));
    }
    Ok(out)
}

/// SIGKILL to each of `pids`, each through a pidfd (never a pid ≤ 0,
/// which `kill` reads as a process group or every process).
pub(crate) fn kill_all(pids: &[i32]) {
    for &pid in pids.iter().filter(|&&p| p > 0) {
        if let Some(fd) = pidfd_open(pid) {
            pidfd_kill(&fd);
        }
    }
}

/// Waits (until `deadline`) for the process behind `fd` to be gone: its
/// pidfd readable (it exited), then its pid free or a zombie (whose
/// reaping is its parent's). False if it is still there at `deadline`.
pub(crate) fn wait_gone(fd: &std::os::fd::OwnedFd, pid: i32, deadline: Instant) -> bool {
    use std::os::fd::AsRawFd;
    loop {
        let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let left = deadline.saturating_duration_since(Instant::now()).as_millis().min(100) as i32;
        // SAFETY: poll on one pollfd of ours.
        let exited = unsafe { libc::poll(&mut p, 1, left) } > 0;
        if exited {
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|s| s.rsplit_once(") ").and_then(|(_, r)| r.chars().next()));
            if matches!(state, None | Some('Z') | Some('X')) {
                return true;
            }
        }
        if Instant::now() >= deadline {
            return false;
        }
    }
}

/// A pidfd on `pid` (`pidfd_open`), None if it is gone or `pid` ≤ 0.
pub(crate) fn pidfd_open(pid: i32) -> Option<std::os::fd::OwnedFd> {
    if pid <= 0 {
        return None;
    }
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the fd was just made and is owned by nobody else.
    Some(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd as i32) })
}

/// SIGKILL through a pidfd: it reaches the process the pidfd was opened
/// on, or nothing if that one is gone (never a reuser of its pid).
pub(crate) fn pidfd_kill(fd: &std::os::fd::OwnedFd) {
    use std::os::fd::AsRawFd;
    // SAFETY: pidfd_send_signal on our own pidfd, no siginfo, no flags.
    unsafe { libc::syscall(libc::SYS_pidfd_send_signal, fd.as_raw_fd(), libc::SIGKILL, 0usize, 0u32) };
}

/// A live child of one of `parents` that is not in `known`: (child, parent, comm).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Stray {
    pub child: i32,
    pub parent: i32,
    pub comm: String,
}

/// The live children of `parents` that are not in `known` (exited,
/// unreaped children are recorded in their parent's image instead).
pub(crate) fn strays(parents: &[i32], known: &HashSet<i32>) -> Vec<Stray> {
    let mut out = Vec::new();
    for &p in parents {
        for c in procfs::children(p) {
            if !known.contains(&c) && alive(c) && !traces(c, p) {
                out.push(Stray { child: c, parent: p, comm: procfs::comm(c).unwrap_or_default() });
            }
        }
    }
    out
}

/// Whether `child` traces a thread of `parent`: the agent's stopper, which
/// holds the threads of a job-stopped process for a round (a process of
/// ours sharing the program's memory, not a child of the program's).
fn traces(child: i32, parent: i32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{parent}/task")) else { return false };
    tasks.flatten().any(|t| {
        std::fs::read_to_string(t.path().join("status"))
            .ok()
            .and_then(|s| s.lines().find_map(|l| l.strip_prefix("TracerPid:")).and_then(|v| v.trim().parse::<i32>().ok()))
            == Some(child)
    })
}

/// Whether `pid` exists and has not exited.
pub(crate) fn alive(pid: i32) -> bool {
    procfs::tree_ids(pid).map(|t| t.state != 'Z' && t.state != 'X').unwrap_or(false)
}

/// Decodes the SUSPENDED report of the process that said `hello`; a
/// malformed one is refused naming the process and what was wrong.
pub(crate) fn parse_suspended(hello: &Hello, payload: &[u8]) -> Result<AgentReport, String> {
    AgentReport::parse(hello, payload).map_err(|e| format!("process {} sent a malformed report: {e}", hello.pid))
}

/// Checks the snapshot an agent says it forked: the agent forks it from
/// its own process, so it is a live child of `pid` (never some other
/// process that the round would then read and kill).
pub(crate) fn check_snapshot(pid: i32, snapshot: i32) -> Result<(), String> {
    let refuse = |why: &str| Err(format!("process {pid} named process {snapshot} as its snapshot, which {why}: the checkpoint is refused"));
    if snapshot <= 0 || snapshot == pid {
        return refuse("is not a process it forked");
    }
    match procfs::tree_ids(snapshot) {
        Ok(t) if t.ppid == pid && t.state != 'Z' && t.state != 'X' => Ok(()),
        Ok(_) => refuse("is not its live child"),
        Err(_) => refuse("does not exist"),
    }
}

/// A short key for a machine: its kernel's boot id and the PID namespace
/// its processes are seen in.
pub(crate) fn machine_key(boot_id: &[u8], pidns: u64) -> u64 {
    let boot: Vec<u8> = boot_id.iter().take_while(|&&c| c != 0 && c != b'\n').copied().collect();
    let mut bytes = boot;
    bytes.extend_from_slice(&pidns.to_le_bytes());
    let h = ckpt_chunker::Hash::of(&bytes);
    u64::from_le_bytes(h.0[..8].try_into().expect("8 bytes")).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ckpt_wire::agent::{MAX_PAYLOAD, MAX_THREADS, Suspended, ThreadState};
    use proptest::prelude::*;

    fn hello() -> Hello {
        Hello { version: proto::VERSION, pid: 4242, ckpt_tid: 4243, ..Default::default() }
    }

    /// A SUSPENDED of `n` threads, the last the checkpoint thread.
    fn suspended(n: usize) -> Vec<u8> {
        let s = Suspended { nthreads: n as u32, job_stop: 0, brk: 0x1000, itimers: Default::default(), sigactions: [Default::default(); 64], agent_fd: 800, uffd_fd: -1 };
        let mut v = s.as_bytes().to_vec();
        for i in 0..n {
            let t = ThreadState { tid: 4242 + i as i32, is_ckpt_thread: u32::from(i + 1 == n), ucontext: 0x7000 + i as u64, ..Default::default() };
            v.extend_from_slice(t.as_bytes());
        }
        v
    }

    #[test]
    fn reports_are_checked_before_use() {
        assert_eq!(parse_suspended(&hello(), &suspended(3)).unwrap().threads.len(), 3);
        assert_eq!(suspended(MAX_THREADS + 1).len(), MAX_PAYLOAD);
        assert!(parse_suspended(&hello(), &suspended(MAX_THREADS + 1)).is_ok());
        let mut huge = suspended(1);
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        let e = parse_suspended(&hello(), &huge).unwrap_err();
        assert!(e.contains("process 4242") && e.contains("4294967295 threads"), "{e}");
        let e = parse_suspended(&hello(), &suspended(2)[..2168 + 72]).unwrap_err();
        assert!(e.contains("counts 2 threads in 2240 bytes"), "{e}");
        // The agent names its fds; an older agent's shorter report takes
        // those of its HELLO.
        assert_eq!(parse_suspended(&hello(), &suspended(2)).unwrap().agent_fds(), [800, -1]);
        let old: Vec<u8> = suspended(2).iter().enumerate().filter(|(i, _)| !(2160..2168).contains(i)).map(|(_, b)| *b).collect();
        let h = Hello { agent_fd: 803, uffd_fd: 804, ..hello() };
        let r = parse_suspended(&h, &old).unwrap();
        assert_eq!((r.agent_fds(), r.threads.len(), r.threads[1].tid), ([803, 804], 2, 4243));
        let e = parse_suspended(&hello(), &suspended(0)).unwrap_err();
        assert!(e.contains("counts 0 threads"), "{e}");
        let mut dup = suspended(2);
        dup[2168 + 72..2168 + 76].copy_from_slice(&4242i32.to_le_bytes());
        assert!(parse_suspended(&hello(), &dup).unwrap_err().contains("twice"));
        let e = parse_suspended(&Hello { pid: -1, ..hello() }, &suspended(1)).unwrap_err();
        assert!(e.contains("pid -1"), "{e}");
    }

    #[test]
    fn a_snapshot_must_be_a_live_child() {
        let me = std::process::id() as i32;
        assert!(check_snapshot(me, 1).unwrap_err().contains("not its live child"));
        assert!(check_snapshot(me, -1).is_err());
        assert!(check_snapshot(me, me).is_err());
        let mut child = std::process::Command::new("sleep").arg("10").spawn().unwrap();
        assert_eq!(check_snapshot(me, child.id() as i32), Ok(()));
        child.kill().unwrap();
        child.wait().unwrap();
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn valid_reports_round_trip(n in 1..64usize) {
            let r = parse_suspended(&hello(), &suspended(n)).unwrap();
            prop_assert_eq!(r.threads.len(), n);
            prop_assert_eq!(r.suspended.brk, 0x1000);
        }

        #[test]
        fn arbitrary_reports_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..8192)) {
            let _ = parse_suspended(&hello(), &bytes);
            let _ = Hello::parse(&bytes);
            let _ = Forked::read_from(&bytes);
            let _ = Registered::read_from(&bytes);
        }

        #[test]
        fn mutated_reports_never_panic(n in 1..16usize, at in any::<prop::sample::Index>(), byte in any::<u8>(), cut in any::<prop::sample::Index>()) {
            let mut v = suspended(n);
            let i = at.index(v.len());
            v[i] = byte;
            let v = &v[..cut.index(v.len() + 1)];
            if let Ok(r) = parse_suspended(&hello(), v) {
                prop_assert!(r.threads.len() <= MAX_THREADS + 1);
                let head = v.len() - r.threads.len() * std::mem::size_of::<ThreadState>();
                prop_assert!(head == std::mem::size_of::<Suspended>() || head == proto::SUSPENDED_V1_LEN);
            }
        }

        #[test]
        fn frame_headers_are_capped(h in any::<[u8; 16]>()) {
            let h = proto::Header::read_from(&h).unwrap();
            if let Ok(len) = h.payload_len(proto::MAGIC, MAX_PAYLOAD) {
                prop_assert!(len <= MAX_PAYLOAD);
            }
        }
    }
}
