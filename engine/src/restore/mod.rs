//! The restart driver: recreates every process of a generation.
//!
//! 1. Check that the image's PIDs and TIDs are free (nothing is started
//!    otherwise).
//! 2. Make again the temporary files kept with the image that are gone
//!    ([`crate::tmpfiles`]); make every open file description once
//!    ([`crate::fds::Opener`]): files
//!    reopened, pipes made again with their bytes in flight; one memfd per
//!    shared memory object, SysV segments made again with their ids
//!    ([`crate::sysv`]); a fresh coordinator connection per agent.
//! 3. Recreate the process tree with `clone3` and `set_tid`: the driver
//!    clones the processes whose parent was outside the computation (and,
//!    through a short-lived middle process, the orphans that init had
//!    adopted); each process makes its session or group, its unreaped
//!    zombies and its own children, puts its fds at their numbers, sets cwd
//!    and umask, blocks all signals and execs the freestanding restorer,
//!    which maps itself at [`ZONE_START`] (far from anything a program uses).
//! 4. Read each restorer's own map and send it a plan: become anonymous (so
//!    the exe link can be set back), move the vDSO and its data pages to the
//!    image's addresses, unmap everything else, map the image's regions.
//! 5. When every restorer waits at the first barrier, write the memory with
//!    `process_vm_writev` (chunks read and decompressed in parallel, each
//!    written where the image has it; a shared page once) and mark each
//!    agent's restart word. No process runs on before all memory is in.
//! 6. The plans go on: final protections, mm fields (`PR_SET_MM_MAP`),
//!    signal actions, timers; at the second barrier the driver sets the
//!    rlimits; then each restorer creates its threads with their TIDs and
//!    every thread resumes with `rt_sigreturn` on the signal frame it was
//!    stopped in.
//!
//! The steps live in their own files: [`shm`] (shared memory objects),
//! [`memory`] (where each chunk goes, writing it), [`fds`] (every fd
//! opened, numbered and lifted), [`tree`] (the clones, sessions, groups,
//! zombies, the exec of the restorer) and [`plan`] (what each restorer
//! runs). [`dry_run`] checks a generation would restore without starting
//! anything. [`Ctx`] carries what every step needs.

mod dry_run;
mod fds;
pub mod lazy;
mod memory;
mod plan;
mod shm;
mod tree;

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use ckpt_store::Store;
use ckpt_wire::Pod;
use ckpt_wire::restore::{StatusMsg, ZONE_END, ZONE_START, status};

use crate::error::{EngineError, Result};
use crate::image::*;
use crate::procfs;
use crate::remote;

pub use dry_run::{check_tree, dry_run, problems, shared_across_hosts};
use memory::Dests;
use tree::step;

/// What every step of a restart needs: the store, the generation, its
/// images.
#[derive(Clone, Copy)]
pub(super) struct Ctx<'a> {
    pub store: &'a Store,
    pub generation: u64,
    pub images: &'a [ProcessImage],
}

/// Fails if any PID or TID of the image is in use.
pub fn check_ids_free(generation: u64, image: &ProcessImage) -> Result<()> {
    let mut ids: Vec<(i32, &str)> = vec![(image.pid, "PID")];
    ids.extend(image.threads.iter().filter(|t| t.tid != image.pid).map(|t| (t.tid, "TID")));
    ids.extend(image.zombies.iter().map(|z| (z.pid, "PID (of an exited child)")));
    for (id, what) in ids {
        // A process just killed may linger a moment as a zombie: give its
        // parent time to reap it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while is_zombie(id) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        if Path::new(&format!("/proc/{id}")).exists() {
            let comm = procfs::comm(id).unwrap_or_default();
            return Err(EngineError::IdTaken { generation, what: format!("{what} {id} (now used by `{comm}`)") });
        }
    }
    Ok(())
}

fn is_zombie(id: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{id}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').and_then(|i| s[i + 1..].split_whitespace().next().map(|st| st == "Z" || st == "X")))
        .unwrap_or(false)
}

/// What the driver keeps per process while the restorers run.
struct Conversation {
    ctl: File,
    status: File,
    ctl_fd: RawFd,
    status_fd: RawFd,
    exe_fd: Option<RawFd>,
    region_fds: HashMap<usize, RawFd>,
    /// A slave of the controlling terminal and the foreground process
    /// group to give it, once every group exists (session leaders).
    tty_pgrp: Option<(RawFd, i32)>,
    dests: Dests,
    descriptions: Vec<String>,
    /// What `connect` gave for the agent's restart block (its channel's
    /// keys over TCP), written just after the restart word.
    agent_block: Vec<u8>,
}

/// Restores every process of generation `generation` (the `images` of
/// [`crate::image::load_generation`]) as it was: the same process tree,
/// PIDs, TIDs, sessions and process groups, each fd's open file description
/// shared as before, shared memory shared again. `connect` makes a fresh
/// connection to the coordinator for each process's agent, and the bytes
/// to write into the agent's restart block after its restart word (empty:
/// none); `before_live`
/// runs once every fd exists, before connections go live (the caller waits
/// there for the restarts on other hosts). Returns the PIDs
/// of the processes that are children of the caller (the ones whose parent
/// was outside the computation) and of all processes, once every thread of
/// every process runs.
pub fn restore_generation(
    store: &Store,
    generation: u64,
    images: &[ProcessImage],
    restorer: &Path,
    connect: impl FnMut() -> Result<(OwnedFd, Vec<u8>)>,
    before_live: impl FnOnce() -> Result<()>,
) -> Result<Restored> {
    restore_generation_with(store, generation, images, restorer, connect, before_live, Options::default())
}

/// How a restart brings memory back.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// Private anonymous memory (but the threads' stacks and state) is
    /// served on fault and filled in the background ([`lazy`]); the
    /// returned [`Restored::server`] runs until it is all in.
    pub lazy: bool,
}

/// A bound on the fd numbers the driver holds during a restart: the
/// highest a process wants (its fds, then its restorer's pipes, exe and
/// mapped files above them), then the driver's copies of all of them above
/// that ([`fds::lift`]).
fn fd_numbers_needed(images: &[ProcessImage]) -> usize {
    let per = |im: &ProcessImage| im.fds.len() + im.regions.len() + 8;
    let top = images.iter().map(|im| im.fds.iter().map(|f| f.fd.max(0) as usize).max().unwrap_or(2) + per(im)).max().unwrap_or(0);
    top + images.iter().map(per).sum::<usize>() + 64
}

/// [`restore_generation`] with [`Options`].
pub fn restore_generation_with(
    store: &Store,
    generation: u64,
    images: &[ProcessImage],
    restorer: &Path,
    mut connect: impl FnMut() -> Result<(OwnedFd, Vec<u8>)>,
    before_live: impl FnOnce() -> Result<()>,
    opts: Options,
) -> Result<Restored> {
    let err = |what: String| EngineError::Restore { generation, what };
    // Before any thread of ours: the fd table grown to the numbers the
    // restart will use (it lifts its copies above every fd the images
    // want), while no other thread shares it. Growing a shared table waits
    // for an RCU grace period (`expand_files`: 10-13 ms on 2 loaded cores,
    // on the way to the first output).
    fds::reserve(fd_numbers_needed(images));
    // Start the thread pool now: threads created after the clones could take
    // the TIDs the image's threads need.
    rayon::broadcast(|_| ());
    let lazy_threads = if opts.lazy { Some(lazy::Threads::start()?) } else { None };
    crate::creds::check_may_restore(generation, images)?;
    for image in images {
        check_ids_free(generation, image)?;
        if image.regions.iter().any(|r| r.start < ZONE_END && r.end > ZONE_START) {
            return Err(err(format!("process {} has memory in [{ZONE_START:#x}, {ZONE_END:#x}), where the restorer lives", image.pid)));
        }
        if !image.threads.iter().any(|t| t.tid == image.pid) {
            return Err(err(format!("the image of process {} has no main thread", image.pid)));
        }
    }
    let index: HashMap<i32, usize> = images.iter().enumerate().map(|(i, im)| (im.pid, i)).collect();
    let origins = tree::origins(images, &index);
    let ctx = Ctx { store, generation, images };

    let t0 = std::time::Instant::now();
    // SysV segments: made again with their ids and content; the restorers
    // attach them.
    let sysv_segments = crate::sysv::Segments::make(store, generation, images)?;
    let sysv_objects = crate::sysvipc::Objects::make(generation, images)?;
    // Temporary files kept with the image and gone since: made again
    // before anything opens or maps them.
    let made = crate::tmpfiles::make_missing(store, generation, images)?;
    if !made.is_empty() {
        tracing::info!("made {} temporary files and directories again: {}", made.len(), made.join(", "));
    }
    // Deleted files are made before shared memory: a shared mapping of one
    // is that file again.
    let mut opener = crate::fds::Opener::new(store, generation, images)?;
    let shm_fds = shm::objects(&ctx, &opener)?;
    // A lazy restart reads no chunk list of a lazy region here: the page
    // server descends them on fault, its filler walks them after the
    // programs run.
    let mut lazy_parts: Vec<lazy::LazyPart> = match opts.lazy {
        true => images.iter().map(|im| lazy::LazyPart::of(generation, im)).collect::<Result<_>>()?,
        false => images.iter().map(|_| lazy::LazyPart::default()).collect(),
    };
    let skip: Vec<Vec<usize>> = lazy_parts.iter().map(|p| p.indices.clone()).collect();
    let all_dests = memory::destinations(&ctx, &skip)?;
    tracing::debug!(ms = t0.elapsed().as_millis() as u64, "chunk lists loaded");

    // The fds of every process, then the restorer's own above them.
    let (mut all_moves, mut convs, cttys) = fds::prepare(&ctx, &mut opener, &shm_fds, all_dests, &mut connect)?;
    // Every socket exists here; peers on other hosts must exist too before
    // a TCP connection leaves repair mode (else their kernel answers with a
    // reset).
    before_live()?;
    opener.finish()?;
    let (src_base, cttys) = fds::lift(&mut all_moves, cttys)?;

    let (mut guard, roots) = tree::spawn(&ctx, &origins, &index, all_moves, cttys, src_base, &convs, restorer)?;

    // The restorers, each through its own pipes, all in step.
    let mut uffd_fds: Vec<Option<i32>> = vec![None; images.len()];
    for (i, c) in convs.iter_mut().enumerate() {
        let image = &images[i];
        let first = read_status(&mut c.status).ok_or_else(|| err(format!("the restorer of process {} ({}) exited before it started", image.pid, restorer.display())))?;
        if first.kind == status::ERROR {
            return Err(err(format!("process {}: {} failed: {}", image.pid, step::name(first.op), std::io::Error::from_raw_os_error((-first.value) as i32))));
        }
        if first.kind != status::READY {
            return Err(err(format!("unexpected first message from the restorer of process {}: {first:?}", image.pid)));
        }
        // SAFETY: pidfd_open returns a new fd or -1.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, image.pid, 0) } as RawFd;
        if pidfd >= 0 {
            // SAFETY: a new fd we own.
            guard.pidfds.push(unsafe { OwnedFd::from_raw_fd(pidfd) });
        }
        let own_maps = procfs::maps(image.pid)?;
        let held = image.creds.is_some().then(|| crate::creds::Held::of(image.pid)).transpose()?;
        let main = image.threads.iter().find(|t| t.tid == image.pid).expect("checked above");
        let uffd_fd = if lazy_parts[i].regions.is_empty() {
            None
        } else {
            let held = [c.ctl_fd, c.status_fd].into_iter().chain(c.exe_fd).chain(c.region_fds.values().copied()).chain(c.tty_pgrp.map(|t| t.0));
            Some(lazy::uffd_number(image, held))
        };
        uffd_fds[i] = uffd_fd;
        let (plan, descriptions) = plan::build_plan(generation, image, main, &own_maps, restorer, c.exe_fd, &c.region_fds, c.tty_pgrp, c.ctl_fd, c.status_fd, held, uffd_fd)?;
        c.descriptions = descriptions;
        c.ctl.write_all(&plan).map_err(|e| EngineError::io("sending the plan to the restorer", e))?;
    }
    // Barrier 1 everywhere, then memory (no process may run before all
    // shared memory holds the image), barrier 2 everywhere, then rlimits.
    for (i, c) in convs.iter_mut().enumerate() {
        expect_barrier(generation, &images[i], c, 1)?;
    }
    // Every process has attached its SysV segments.
    sysv_segments.remove_removed(generation)?;
    // A lazy restart: each restorer made its userfaultfd; take them and
    // register the lazy regions (a process that cannot be served lazily is
    // written whole below).
    let mut attached = Vec::new();
    let mut lazy_words: Vec<u64> = vec![0; images.len()];
    for (i, part) in lazy_parts.iter_mut().enumerate() {
        let Some(fd) = uffd_fds[i] else { continue };
        let word = match images[i].agent.restart_word_addr {
            0 => 0,
            a => a + ckpt_wire::agent::LAZY_OFFSET,
        };
        match lazy::attach(images[i].pid, i, fd, part, word) {
            Ok(a) => {
                attached.push(a);
                lazy_words[i] = word;
            }
            Err(why) => {
                tracing::warn!("process {} restarts with all of its memory written first (not lazily): {why}", images[i].pid);
                memory::add_regions(store, generation, &images[i], &part.indices, &mut convs[i].dests)?;
                *part = lazy::LazyPart::default();
            }
        }
    }
    for (i, c) in convs.iter_mut().enumerate() {
        let t = std::time::Instant::now();
        memory::fill_memory(store, images[i].pid, &c.dests)?;
        tracing::debug!(pid = images[i].pid, ms = t.elapsed().as_millis() as u64, "memory written");
        if images[i].agent.restart_word_addr != 0 {
            let addr = images[i].agent.restart_word_addr + ckpt_wire::agent::SEM_UNDO_OFFSET;
            remote::write(images[i].pid, addr, &crate::sysvipc::undo_table_bytes(&images[i]))
                .map_err(|e| err(format!("cannot hand its SysV semaphore undo table to the agent of process {}: {e}", images[i].pid)))?;
        }
        if !c.agent_block.is_empty() {
            remote::write(images[i].pid, images[i].agent.restart_word_addr + 8, &c.agent_block)
                .map_err(|e| err(format!("cannot hand its channel to the agent of process {}: {e}", images[i].pid)))?;
        }
        if lazy_words[i] != 0 {
            remote::write(images[i].pid, lazy_words[i], &generation.max(1).to_le_bytes())
                .map_err(|e| err(format!("cannot mark the agent's lazy word in process {}: {e}", images[i].pid)))?;
        }
        remote::write(images[i].pid, images[i].agent.restart_word_addr, &generation.to_le_bytes())
            .map_err(|e| err(format!("cannot mark the agent's restart word in process {}: {e}", images[i].pid)))?;
    }
    // The page server runs before any process does.
    let server = match lazy_threads {
        Some(threads) if !attached.is_empty() => {
            tracing::debug!(ms = t0.elapsed().as_millis() as u64, "page server starts");
            Some(lazy::serve(threads, store, generation, attached, lazy_parts, images.iter().map(|i| i.pid).collect())?)
        }
        _ => None,
    };
    for c in convs.iter_mut() {
        c.ctl.write_all(b"G").map_err(|e| EngineError::io("restorer control pipe", e))?;
    }
    for (i, c) in convs.iter_mut().enumerate() {
        expect_barrier(generation, &images[i], c, 2)?;
        for l in &images[i].rlimits {
            let new = libc::rlimit64 { rlim_cur: l.soft, rlim_max: l.hard };
            // SAFETY: prlimit64 setting one limit of a process we restore.
            if unsafe { libc::prlimit64(images[i].pid, l.resource as _, &new, std::ptr::null_mut()) } != 0 {
                tracing::warn!("cannot restore rlimit {} of process {}: {}", l.resource, images[i].pid, std::io::Error::last_os_error());
            }
        }
    }
    // Processes stopped by job control at the checkpoint are held at their
    // first instruction, to be stopped once their agents have registered.
    let stopped: Vec<crate::jobstop::Held> = images
        .iter()
        .filter(|im| im.job_stop != 0)
        .map(|im| crate::jobstop::Held { pid: im.pid, ckpt_tid: im.agent.ckpt_tid, threads: im.threads.len() })
        .collect();
    let holder = if stopped.is_empty() { None } else { Some(crate::jobstop::Holder::start(stopped).map_err(err)?) };
    for c in convs.iter_mut() {
        c.ctl.write_all(b"G").map_err(|e| EngineError::io("restorer control pipe", e))?;
    }
    for (i, c) in convs.iter_mut().enumerate() {
        if let Some(msg) = read_status(&mut c.status) {
            return Err(restorer_failed(generation, &images[i], c, msg));
        }
    }
    // Every restorer closed its pipes: the threads are being created and the
    // programs go on.
    guard.armed = false;
    sysv_segments.keep();
    sysv_objects.keep();
    Ok(Restored { roots, all: images.iter().map(|i| i.pid).collect(), stopped: holder, server })
}

fn expect_barrier(generation: u64, image: &ProcessImage, c: &mut Conversation, n: i64) -> Result<()> {
    match read_status(&mut c.status) {
        Some(msg) if msg.kind == status::BARRIER && msg.value == n => Ok(()),
        Some(msg) => Err(restorer_failed(generation, image, c, msg)),
        None => Err(EngineError::Restore { generation, what: format!("the restorer of process {} died before step {n}", image.pid) }),
    }
}

fn restorer_failed(generation: u64, image: &ProcessImage, c: &Conversation, msg: StatusMsg) -> EngineError {
    if msg.kind != status::ERROR {
        return EngineError::Restore { generation, what: format!("unexpected message from the restorer of process {}: {msg:?}", image.pid) };
    }
    let what = c.descriptions.get(msg.op as usize).cloned().unwrap_or_default();
    let errno = std::io::Error::from_raw_os_error((-msg.value) as i32);
    EngineError::Restore { generation, what: format!("the restorer of process {} failed at step {} ({what}): {errno}", image.pid, msg.op) }
}

/// The PIDs of a restart.
pub struct Restored {
    /// Children of the caller: wait for these.
    pub roots: Vec<i32>,
    /// Every process restored.
    pub all: Vec<i32>,
    /// Processes that were stopped by job control, held at their first
    /// instruction: [`Restored::stop_held`] once their agents registered.
    pub stopped: Option<crate::jobstop::Holder>,
    /// The page server of a lazy restart: keep it (the process that holds
    /// it) alive until [`lazy::PageServer::wait`] returns, or the pages not
    /// yet in are lost with it.
    pub server: Option<lazy::PageServer>,
}

impl Restored {
    /// Puts the processes that were stopped by job control into their stop
    /// again (`SIGSTOP`), before they run an instruction of their own.
    pub fn stop_held(&mut self) -> Result<()> {
        match self.stopped.take() {
            Some(h) => h.stop().map_err(|what| EngineError::Restore { generation: 0, what }),
            None => Ok(()),
        }
    }
}

fn read_status(f: &mut File) -> Option<StatusMsg> {
    let mut b = [0u8; 16];
    f.read_exact(&mut b).ok()?;
    StatusMsg::read_from(&b)
}

/// Waits for a restored process (a child of ours) and returns its exit code
/// in the shell's convention (128 + signal if killed).
pub fn wait_exit(pid: i32) -> i32 {
    let mut st = 0;
    loop {
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::waitpid(pid, &mut st, 0) };
        if r == pid {
            break;
        }
        if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return 1;
        }
    }
    if libc::WIFEXITED(st) { libc::WEXITSTATUS(st) } else { 128 + libc::WTERMSIG(st) }
}
