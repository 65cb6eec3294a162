//! The restart driver: recreates every process of a generation.
//!
//! 1. Check that the image's PIDs and TIDs are free (nothing is started
//!    otherwise).
//! 2. Make every open file description once ([`crate::fds::Opener`]): files
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

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use ckpt_chunker::Hash;
use ckpt_store::Store;
use ckpt_wire::restore::{SCRATCH_ADDR, StatusMsg, ZONE_END, ZONE_START, op, status};
use ckpt_wire::{KernelSigaction, Pod};

use crate::error::{EngineError, Result};
use crate::image::*;
use crate::plan::PlanBuilder;
use crate::procfs;
use crate::remote;

const PR_SET_MM: u64 = 35;
const PR_SET_MM_MAP: u64 = 14;
const PR_SET_NAME: u64 = 15;
const THREAD_STACK: u64 = 64 * 1024;
/// Where the vDSO and vvar pages wait while the old address space goes.
const VDSO_PARK: u64 = SCRATCH_ADDR + 0x4000_0000;
/// Where copies of the restorer's own pages are made.
const SELF_COPY: u64 = SCRATCH_ADDR + 0x2000_0000;

/// `struct prctl_mm_map` of the kernel uapi.
#[repr(C)]
#[derive(Clone, Copy)]
struct PrctlMmMap {
    start_code: u64,
    end_code: u64,
    start_data: u64,
    end_data: u64,
    start_brk: u64,
    brk: u64,
    start_stack: u64,
    arg_start: u64,
    arg_end: u64,
    env_start: u64,
    env_end: u64,
    auxv: u64,
    auxv_size: u32,
    exe_fd: u32,
}
// SAFETY: repr(C), u64s then two u32: no padding.
unsafe impl Pod for PrctlMmMap {}

/// `struct clone_args` of the kernel uapi.
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}


/// `prctl` option of Linux 6.17: `timer_create` takes the id `*timer_id`.
const PR_TIMER_CREATE_RESTORE_IDS: u64 = 77;

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

struct FdMove {
    src: OwnedFd,
    dst: RawFd,
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut p = [0; 2];
    // SAFETY: pipe2 writes two fds into `p`.
    if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(EngineError::io("pipe2", std::io::Error::last_os_error()));
    }
    // SAFETY: both fds were just created.
    Ok(unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) })
}

/// Moves `fd` to the lowest free number ≥ `min` (close-on-exec).
fn move_above(fd: OwnedFd, min: RawFd) -> Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on an fd we own; the original closes on drop.
    let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, min) };
    if n < 0 {
        return Err(EngineError::io(format!("moving fd to ≥ {min}"), std::io::Error::last_os_error()));
    }
    // SAFETY: `n` is a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

/// A memfd for a shared memory object of the image, sized to hold every
/// mapping of it.
fn memfd(generation: u64, shm: u64, size: u64) -> Result<OwnedFd> {
    let name = CString::new(format!("ckpt-shm-{shm}")).expect("no NUL");
    // SAFETY: memfd_create with a NUL-terminated name; owned below.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(EngineError::Restore { generation, what: format!("memfd_create for shared memory {shm}: {}", std::io::Error::last_os_error()) });
    }
    // SAFETY: a new fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate on our memfd.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) } != 0 {
        return Err(EngineError::Restore { generation, what: format!("sizing shared memory {shm} to {size} bytes: {}", std::io::Error::last_os_error()) });
    }
    Ok(fd)
}

/// The POSIX shared memory object at `path` of process `pid`, at least
/// `size` bytes long; the image's content is written into it later.
///
/// Made with `O_EXCL` as the process ([`crate::creds::open`]: its
/// identity, no symlink followed). One that exists already is used only if
/// it belongs to the process's fsuid (its own object, left behind when the
/// program was killed): an object another user made before the restart
/// would let that user read and write the program's shared memory, so the
/// restart refuses it, naming it and its owner.
fn posix_shm(generation: u64, pid: i32, path: &str, size: u64) -> Result<OwnedFd> {
    let err = |what: String| EngineError::Restore { generation, what };
    let flags = libc::O_RDWR | libc::O_CREAT | libc::O_EXCL;
    let fd = match crate::creds::open(path, flags, 0o600) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            let fd = crate::creds::open(path, libc::O_RDWR, 0).map_err(|e| err(format!("cannot open the shared memory object {path} of process {pid}: {e}")))?;
            let meta = File::from(crate::fds::dup(&fd)?).metadata().map_err(|e| err(format!("cannot stat the shared memory object {path}: {e}")))?;
            let own = crate::creds::acting_uid();
            use std::os::unix::fs::MetadataExt;
            if !meta.file_type().is_file() || own.is_some_and(|u| u != meta.uid()) {
                return Err(err(format!(
                    "the shared memory object {path} of process {pid} exists and belongs to uid {} (mode {:o}), not to the process's uid {}: another user may have made it to read or write the program's shared memory; check who made it, remove it and restart",
                    meta.uid(),
                    meta.mode() & 0o7777,
                    own.unwrap_or(0)
                )));
            }
            fd
        }
        Err(e) => return Err(err(format!("cannot create the shared memory object {path} of process {pid}: {e}"))),
    };
    let f = File::from(fd);
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len < size {
        f.set_len(size).map_err(|e| err(format!("cannot size the shared memory object {path} to {size} bytes: {e}")))?;
    }
    Ok(f.into())
}

/// How a process comes into the tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    /// A child of the restart driver (its parent was outside the computation).
    Root,
    /// A child of the process at this index of the generation.
    Child(usize),
    /// Its parent had exited (a daemon): it is reparented to init again.
    Orphan,
}

/// Everything one process needs from the moment it is cloned until it
/// execs the restorer: prepared before the first clone, so that the clone
/// children only make async-signal-safe calls on ready data.
struct Launch {
    pid: i32,
    sid: i32,
    pgid: i32,
    /// Indices of its children in the generation, group leaders first.
    children: Vec<usize>,
    zombies: Vec<Zombie>,
    pairs: Vec<(RawFd, RawFd)>,
    keep: Vec<bool>,
    cwd: CString,
    umask: u32,
    /// The driver's end of the status pipe (for errors before the exec).
    status_src: RawFd,
    /// `epoll_ctl(EPOLL_CTL_ADD)` calls made once the fds have their
    /// numbers: (epoll fd, target fd, event).
    epoll_adds: Vec<(RawFd, RawFd, libc::epoll_event)>,
    /// A slave of the pseudo-terminal that was the session's controlling
    /// terminal (a driver fd above every program fd), or -1.
    ctty_src: RawFd,
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
    dests: HashMap<Hash, Vec<(u64, usize)>>,
    descriptions: Vec<String>,
    /// What `connect` gave for the agent's restart block (its channel's
    /// keys over TCP), written just after the restart word.
    agent_block: Vec<u8>,
}

/// Failure codes of the pre-exec steps, reported as `op` of an ERROR status.
mod step {
    pub const DUP2: u32 = 0xffff_0001;
    pub const CHDIR: u32 = 0xffff_0002;
    pub const EXEC: u32 = 0xffff_0003;
    pub const CLONE: u32 = 0xffff_0004;
    pub const SETSID: u32 = 0xffff_0005;
    pub const EPOLL: u32 = 0xffff_0006;
    pub const CTTY: u32 = 0xffff_0007;

    pub fn name(op: u32) -> &'static str {
        match op {
            DUP2 => "placing the fds",
            CHDIR => "changing to the working directory",
            EXEC => "executing the restorer",
            CLONE => "creating a child process or zombie with its PID",
            SETSID => "creating its session",
            EPOLL => "adding its epoll items back (epoll_ctl)",
            CTTY => "taking back its controlling terminal (TIOCSCTTY)",
            _ => "",
        }
    }
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
    mut connect: impl FnMut() -> Result<(OwnedFd, Vec<u8>)>,
    before_live: impl FnOnce() -> Result<()>,
) -> Result<Restored> {
    let err = |what: String| EngineError::Restore { generation, what };
    // Start the thread pool now: threads created after the clones could take
    // the TIDs the image's threads need.
    rayon::broadcast(|_| ());
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
    let origins: Vec<Origin> = images
        .iter()
        .map(|im| match index.get(&im.ppid) {
            Some(&p) if im.ppid != im.pid => Origin::Child(p),
            _ if im.ppid == 1 => Origin::Orphan,
            _ => Origin::Root,
        })
        .collect();

    let t0 = std::time::Instant::now();
    // SysV segments: made again with their ids and content; the restorers
    // attach them.
    let sysv_segments = crate::sysv::Segments::make(store, generation, images)?;
    let sysv_objects = crate::sysvipc::Objects::make(generation, images)?;
    // Shared memory objects: one memfd each, big enough for every mapping.
    // POSIX shared memory (`shm_open`) comes back at its name.
    let mut shm_size: HashMap<u64, (u64, &str, &ProcessImage)> = HashMap::new();
    for image in images {
        for r in image.regions.iter().filter(|r| r.kind == RegionKind::SharedAnon && r.shm != 0 && r.sysv.is_none()) {
            let e = shm_size.entry(r.shm).or_insert((0, &r.name, image));
            e.0 = e.0.max(r.offset + (r.end - r.start));
        }
    }
    let mut shm_fds: HashMap<u64, OwnedFd> = HashMap::new();
    for (&shm, &(size, name, image)) in &shm_size {
        let fd = if name.starts_with("/dev/shm/") && !name.ends_with(" (deleted)") {
            crate::creds::acting_as(crate::creds::Identity::of(image), || posix_shm(generation, image.pid, name, size))?
        } else {
            memfd(generation, shm, size)?
        };
        shm_fds.insert(shm, fd);
    }
    // Where every chunk goes, per process; a page of shared memory is
    // written once, through the first mapping of it.
    let mut shm_written: std::collections::HashSet<(u64, u64)> = Default::default();
    let mut all_dests = Vec::new();
    for image in images {
        let chunk_size = image.chunk_size as u64;
        let mut dests: HashMap<Hash, Vec<(u64, usize)>> = HashMap::new();
        for r in image.regions.iter().filter(|r| !r.segments.is_empty() && r.sysv.is_none()) {
            let n = (r.end - r.start).div_ceil(chunk_size);
            let hashes = crate::chunklist::load_sparse(store, generation, &r.segments, r.depth, n)?;
            if hashes.len != n {
                return Err(EngineError::BadImage { generation, what: format!("region {:#x}-{:#x} of process {} lists {} chunks, expected {n}", r.start, r.end, image.pid, hashes.len) });
            }
            // Zero chunks are not in the list: a fresh mapping is zero already.
            for (i, h) in hashes.entries {
                let off = i * chunk_size;
                if r.kind == RegionKind::SharedAnon && r.shm != 0 && !shm_written.insert((r.shm, r.offset + off)) {
                    continue;
                }
                let addr = r.start + off;
                dests.entry(h).or_default().push((addr, (r.end - addr).min(chunk_size) as usize));
            }
        }
        all_dests.push(dests);
    }
    tracing::debug!(ms = t0.elapsed().as_millis() as u64, "chunk lists loaded");

    // The fds of every process, then the restorer's own above them.
    let mut opener = crate::fds::Opener::new(store, generation, images)?;
    let mut all_moves: Vec<Vec<FdMove>> = Vec::new();
    let mut convs: Vec<Conversation> = Vec::new();
    let mut cttys: Vec<Option<OwnedFd>> = Vec::new();
    for (image, dests) in images.iter().zip(all_dests) {
        let mut moves = Vec::new();
        let mut agent_block = Vec::new();
        for f in &image.fds {
            let src = match f.kind {
                FdKind::Agent => {
                    let (fd, block) = connect()?;
                    agent_block = block;
                    fd
                }
                _ => match crate::creds::acting_as(crate::creds::Identity::of(image), || opener.open(image.pid, f))? {
                    Some(fd) => fd,
                    None => continue,
                },
            };
            moves.push(FdMove { src, dst: f.fd });
        }
        let id = crate::creds::Identity::of(image);
        cttys.push(match image.ctty_pts {
            Some(index) if image.sid == image.pid => crate::creds::acting_as(id.clone(), || opener.ctty(index))?,
            _ => None,
        });
        let mut next_aux = image.fds.iter().map(|f| f.fd).max().unwrap_or(2).max(2) + 1;
        let mut aux = |src: OwnedFd, moves: &mut Vec<FdMove>| {
            let dst = next_aux;
            next_aux += 1;
            moves.push(FdMove { src, dst });
            dst
        };
        let (ctl_r, ctl_w) = pipe()?;
        let (status_r, status_w) = pipe()?;
        let ctl_fd = aux(ctl_r, &mut moves);
        let status_fd = aux(status_w, &mut moves);
        let exe_fd = match crate::creds::acting_as(id.clone(), || crate::creds::open(&image.exe, libc::O_RDONLY, 0)) {
            Ok(f) => Some(aux(f, &mut moves)),
            Err(e) => {
                tracing::warn!("cannot open {} ({e}); /proc/{}/exe will name the restorer", image.exe, image.pid);
                None
            }
        };
        let mut region_fds = HashMap::new();
        for (i, r) in image.regions.iter().enumerate() {
            let fd: OwnedFd = match r.kind {
                RegionKind::SharedFile => {
                    let write = r.prot & libc::PROT_WRITE as u32 != 0;
                    let mode = if write { libc::O_RDWR } else { libc::O_RDONLY };
                    crate::creds::acting_as(id.clone(), || crate::creds::open(&r.name, mode, 0)).map_err(|e| err(format!("cannot reopen shared mapping of {} for process {}: {e}", r.name, image.pid)))?
                }
                RegionKind::SharedAnon if r.shm != 0 && r.sysv.is_none() => crate::fds::dup(&shm_fds[&r.shm])?,
                RegionKind::Private if r.file.is_some() => mapped_file(generation, image, r, &id)?,
                _ => continue,
            };
            region_fds.insert(i, aux(fd, &mut moves));
        }
        // The terminal's foreground group, when it is not the leader's own
        // (which TIOCSCTTY makes the foreground): set by the leader's
        // restorer once every process group exists.
        let mut tty_pgrp = None;
        if let (Some(index), true) = (image.ctty_pts, image.sid == image.pid && image.tty_pgrp > 0 && image.tty_pgrp != image.pgid) {
            if images.iter().any(|o| o.pgid == image.tty_pgrp && o.sid == image.sid) {
                if let Some(fd) = crate::creds::acting_as(id.clone(), || opener.ctty(index))? {
                    tty_pgrp = Some((aux(fd, &mut moves), image.tty_pgrp));
                }
            } else {
                tracing::warn!(pid = image.pid, "the foreground process group {} of the terminal of session {} is not in the generation; the session leader's group is the foreground one after the restart", image.tty_pgrp, image.sid);
            }
        }
        convs.push(Conversation {
            ctl: File::from(ctl_w),
            status: File::from(status_r),
            ctl_fd,
            status_fd,
            exe_fd,
            region_fds,
            tty_pgrp,
            dests,
            descriptions: Vec::new(),
            agent_block,
        });
        all_moves.push(moves);
    }
    // Every socket exists here; peers on other hosts must exist too before
    // a TCP connection leaves repair mode (else their kernel answers with a
    // reset).
    before_live()?;
    opener.finish()?;
    // The driver's copies of every fd sit above every number a process
    // wants, so that placing one never overwrites another.
    let src_base = all_moves.iter().flatten().map(|m| m.dst).max().unwrap_or(2) + 1;
    for moves in all_moves.iter_mut() {
        for m in moves.iter_mut() {
            let fd = std::mem::replace(&mut m.src, crate::fds::file::dev_null()?);
            m.src = move_above(fd, src_base)?;
        }
    }
    let cttys: Vec<Option<OwnedFd>> = cttys.into_iter().map(|c| c.map(|fd| move_above(fd, src_base)).transpose()).collect::<Result<_>>()?;

    // Everything the clone children need, prepared before any exists.
    let mut launches = Vec::new();
    for (i, image) in images.iter().enumerate() {
        let moves = &all_moves[i];
        let mut keep = vec![false; src_base as usize];
        for m in moves {
            keep[m.dst as usize] = true;
        }
        let mut children: Vec<usize> = (0..images.len()).filter(|&c| origins[c] == Origin::Child(i)).collect();
        // Group leaders before the members that join their group.
        children.sort_by_key(|&c| (images[c].pgid != images[c].pid, images[c].pid));
        let status_src = moves.iter().find(|m| m.dst == convs[i].status_fd).map(|m| m.src.as_raw_fd()).unwrap_or(-1);
        launches.push(Launch {
            pid: image.pid,
            sid: image.sid,
            pgid: image.pgid,
            children,
            zombies: image.zombies.clone(),
            pairs: moves.iter().map(|m| (m.src.as_raw_fd(), m.dst)).collect(),
            keep,
            cwd: CString::new(image.cwd.as_bytes()).map_err(|_| err(format!("bad cwd {:?}", image.cwd)))?,
            umask: image.umask,
            status_src,
            epoll_adds: crate::fds::epoll::additions(image),
            ctty_src: cttys[i].as_ref().map(|f| f.as_raw_fd()).unwrap_or(-1),
        });
    }
    let restorer_c = CString::new(restorer.as_os_str().as_bytes()).map_err(|_| err("bad restorer path".into()))?;
    let argvs: Vec<[CString; 3]> = convs
        .iter()
        .map(|c| [CString::new("ckpt-restorer").unwrap(), CString::new(c.ctl_fd.to_string()).unwrap(), CString::new(c.status_fd.to_string()).unwrap()])
        .collect();
    let argv_ptrs: Vec<Vec<*const libc::c_char>> = argvs.iter().map(|a| a.iter().map(|s| s.as_ptr()).chain([std::ptr::null()]).collect()).collect();
    let ctx = Spawn { launches: &launches, restorer: &restorer_c, argv: &argv_ptrs, src_base };

    // The tree: roots and orphans from here, every other process from its
    // parent.
    // On failure: the processes made so far are killed. (Their descendants
    // that never said READY die on their own: their restorer reads the
    // end of its control pipe when the driver's copy closes.)
    let mut guard = KillOnDrop { children: Vec::new(), pidfds: Vec::new(), armed: true };
    let mut roots = Vec::new();
    for (i, image) in images.iter().enumerate() {
        match origins[i] {
            Origin::Child(_) => continue,
            Origin::Root => {
                let pid = clone_with_pid(image.pid, libc::SIGCHLD);
                if pid == 0 {
                    // SAFETY: in the clone child; never returns.
                    unsafe { ctx.become_process(i) };
                }
                if pid < 0 {
                    return Err(clone_error(generation, image.pid));
                }
                guard.children.push(pid as i32);
                roots.push(pid as i32);
            }
            Origin::Orphan => {
                // The middle process exits at once, so that init adopts the
                // orphan again. When the orphan's session leader is gone
                // (a daemon's double fork), the middle process takes the
                // leader's PID and makes the session first.
                let lost_session = image.sid != image.pid && image.sid > 0 && !index.contains_key(&image.sid);
                let mid = if lost_session {
                    clone_with_pid(image.sid, libc::SIGCHLD) as libc::pid_t
                } else {
                    // SAFETY: a fork whose child only clones and exits.
                    unsafe { libc::fork() }
                };
                if mid == 0 {
                    if lost_session {
                        // SAFETY: setsid in the middle process.
                        unsafe { libc::setsid() };
                    }
                    let pid = clone_with_pid(image.pid, libc::SIGCHLD);
                    if pid == 0 {
                        // SAFETY: in the clone child; never returns.
                        unsafe { ctx.become_process(i) };
                    }
                    // SAFETY: leaving the intermediate process.
                    unsafe { libc::_exit(if pid < 0 { 1 } else { 0 }) };
                }
                if mid < 0 || wait_exit(mid) != 0 {
                    return Err(clone_error(generation, image.pid));
                }
            }
        }
    }
    drop(all_moves);
    drop(cttys);

    // The restorers, each through its own pipes, all in step.
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
        let (plan, descriptions) = build_plan(generation, image, main, &own_maps, restorer, c.exe_fd, &c.region_fds, c.tty_pgrp, c.ctl_fd, c.status_fd, held)?;
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
    for (i, c) in convs.iter_mut().enumerate() {
        let t = std::time::Instant::now();
        fill_memory(store, images[i].pid, &c.dests)?;
        tracing::debug!(pid = images[i].pid, ms = t.elapsed().as_millis() as u64, "memory written");
        if !c.agent_block.is_empty() {
            remote::write(images[i].pid, images[i].agent.restart_word_addr + 8, &c.agent_block)
                .map_err(|e| err(format!("cannot hand its channel to the agent of process {}: {e}", images[i].pid)))?;
        }
        remote::write(images[i].pid, images[i].agent.restart_word_addr, &generation.to_le_bytes())
            .map_err(|e| err(format!("cannot mark the agent's restart word in process {}: {e}", images[i].pid)))?;
    }
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
    Ok(Restored { roots, all: images.iter().map(|i| i.pid).collect() })
}

/// Opens the file under a private file mapping as the process, checked
/// to be the file the checkpoint saw (its pages the process never changed
/// are not in the image).
fn mapped_file(generation: u64, image: &ProcessImage, r: &RegionImage, id: &Option<crate::creds::Identity>) -> Result<OwnedFd> {
    let want = r.file.expect("called for file regions");
    let err = |what: String| EngineError::Restore { generation, what };
    let fd = crate::creds::acting_as(id.clone(), || crate::creds::open(&r.name, libc::O_RDONLY, 0))
        .map_err(|e| err(format!("cannot open {}, mapped by process {} at {:#x}: {e} (the image keeps only the pages the process changed; the file must be there again)", r.name, image.pid, r.start)))?;
    let mut f = File::from(fd);
    let got = crate::capture::identify(&mut f).map_err(|e| err(format!("cannot read {} (mapped by process {}): {e}", r.name, image.pid)))?;
    if got != want {
        return Err(err(format!(
            "{} changed since the checkpoint (size {} → {}, mtime {}.{:09} → {}.{:09}{}); process {} maps it at {:#x} and the image keeps only the pages it changed: put the checkpoint's version of the file back, or restart a generation taken after the change",
            r.name, want.size, got.size, want.mtime_sec, want.mtime_nsec, got.mtime_sec, got.mtime_nsec,
            if want.head != got.head { ", different content" } else { "" },
            image.pid, r.start
        )));
    }
    Ok(OwnedFd::from(f))
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

fn clone_error(generation: u64, pid: i32) -> EngineError {
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EEXIST) {
        return EngineError::IdTaken { generation, what: format!("PID {pid}") };
    }
    EngineError::Restore { generation, what: format!("clone3 with PID {pid} failed: {e} (restoring PIDs needs root or CAP_CHECKPOINT_RESTORE)") }
}

/// A fork-like `clone3` whose child gets PID `pid`. Returns as `fork` does.
fn clone_with_pid(pid: i32, exit_signal: i32) -> libc::c_long {
    let set_tid = [pid];
    let args = CloneArgs { exit_signal: exit_signal as u64, set_tid: set_tid.as_ptr() as u64, set_tid_size: 1, ..Default::default() };
    // SAFETY: clone3 without CLONE_VM behaves like fork; `args` and
    // `set_tid` live across the call.
    unsafe { libc::syscall(libc::SYS_clone3, &args as *const CloneArgs, std::mem::size_of::<CloneArgs>()) }
}

/// The PIDs of a restart.
pub struct Restored {
    /// Children of the caller: wait for these.
    pub roots: Vec<i32>,
    /// Every process restored.
    pub all: Vec<i32>,
}

/// The prepared data the clone children work from.
struct Spawn<'a> {
    launches: &'a [Launch],
    restorer: &'a CString,
    argv: &'a [Vec<*const libc::c_char>],
    src_base: RawFd,
}

impl Spawn<'_> {
    /// Reports a pre-exec failure to the driver and exits.
    ///
    /// # Safety
    /// Only in a clone child; async-signal-safe.
    unsafe fn fail(&self, i: usize, op: u32) -> ! {
        // SAFETY: errno read and a write to an fd the child inherited.
        unsafe {
            let errno = *libc::__errno_location();
            let msg = StatusMsg { kind: status::ERROR, op, value: -(errno as i64) };
            let b = msg.as_bytes();
            libc::write(self.launches[i].status_src, b.as_ptr() as *const libc::c_void, b.len());
            libc::_exit(120);
        }
    }

    /// Turns the calling clone child into process `i`: session and group,
    /// its zombies and children, its fds, then the restorer.
    ///
    /// # Safety
    /// Only in the child of a fork-like clone: async-signal-safe calls on
    /// prepared data only; never returns.
    unsafe fn become_process(&self, i: usize) -> ! {
        let l = &self.launches[i];
        // SAFETY: plain syscalls on prepared data (see the function's contract).
        unsafe {
            if l.sid == l.pid {
                if libc::setsid() < 0 {
                    self.fail(i, step::SETSID);
                }
                // Before any child is made, so that they inherit it.
                if l.ctty_src >= 0 && libc::ioctl(l.ctty_src, libc::TIOCSCTTY, 0) != 0 {
                    self.fail(i, step::CTTY);
                }
            } else if l.pgid == l.pid {
                libc::setpgid(0, 0);
            } else if l.pgid > 0 && libc::getpgid(0) != l.pgid {
                libc::setpgid(0, l.pgid);
            }
            for z in &l.zombies {
                let pid = clone_with_pid(z.pid, libc::SIGCHLD);
                if pid == 0 {
                    if libc::WIFSIGNALED(z.status) {
                        let sig = libc::WTERMSIG(z.status);
                        libc::signal(sig, libc::SIG_DFL);
                        let mut set: libc::sigset_t = std::mem::zeroed();
                        libc::sigemptyset(&mut set);
                        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
                        libc::kill(libc::getpid(), sig);
                    }
                    libc::_exit(libc::WEXITSTATUS(z.status));
                }
                if pid < 0 {
                    self.fail(i, step::CLONE);
                }
                // Dead before we go on (still a zombie: WNOWAIT).
                let mut info: libc::siginfo_t = std::mem::zeroed();
                libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, libc::WEXITED | libc::WNOWAIT);
            }
            for &c in &l.children {
                let child = &self.launches[c];
                let pid = clone_with_pid(child.pid, libc::SIGCHLD);
                if pid == 0 {
                    self.become_process(c);
                }
                if pid < 0 {
                    self.fail(i, step::CLONE);
                }
                // As a shell does: the parent sets the child's group too, so
                // that later siblings find the group already there.
                if child.sid != child.pid && child.pgid > 0 {
                    libc::setpgid(pid as libc::pid_t, child.pgid);
                }
            }
            for &(src, dst) in &l.pairs {
                if libc::dup2(src, dst) < 0 {
                    self.fail(i, step::DUP2);
                }
            }
            let status_fd = l.pairs.iter().find(|p| p.0 == l.status_src).map(|p| p.1).unwrap_or(-1);
            libc::syscall(libc::SYS_close_range, self.src_base as u32, u32::MAX, 0u32);
            for (fd, &k) in l.keep.iter().enumerate() {
                if !k {
                    libc::close(fd as RawFd);
                }
            }
            let report = |op: u32| {
                let errno = *libc::__errno_location();
                let msg = StatusMsg { kind: status::ERROR, op, value: -(errno as i64) };
                let b = msg.as_bytes();
                libc::write(status_fd, b.as_ptr() as *const libc::c_void, b.len());
                libc::_exit(121);
            };
            // Epoll items are keyed by (file, fd number): added now that
            // the fds have their numbers. A second process sharing the
            // epoll finds them there already.
            for &(epfd, tfd, ev) in &l.epoll_adds {
                let mut ev = ev;
                if libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, tfd, &mut ev) != 0 && *libc::__errno_location() != libc::EEXIST {
                    report(step::EPOLL);
                }
            }
            if libc::chdir(l.cwd.as_ptr()) != 0 {
                report(step::CHDIR);
            }
            libc::umask(l.umask as libc::mode_t);
            let mut all: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::syscall(libc::SYS_rt_sigprocmask, libc::SIG_SETMASK, &all as *const libc::sigset_t, 0usize, 8usize);
            let envp: [*const libc::c_char; 1] = [std::ptr::null()];
            libc::execve(self.restorer.as_ptr(), self.argv[i].as_ptr(), envp.as_ptr());
            report(step::EXEC);
            libc::_exit(122);
        }
    }
}

/// On a failed restart: every process made so far is killed (the PIDs of
/// the image), and the driver's own children reaped.
struct KillOnDrop {
    /// Our children (unreaped, so their PIDs cannot be anyone else's).
    children: Vec<i32>,
    /// The other processes, once their restorer has said READY on its own
    /// status pipe (so the pidfd is surely of a process of ours).
    pidfds: Vec<OwnedFd>,
    armed: bool,
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        for fd in &self.pidfds {
            // SAFETY: pidfd_send_signal on a pidfd we own; no memory passed.
            unsafe { libc::syscall(libc::SYS_pidfd_send_signal, fd.as_raw_fd(), libc::SIGKILL, 0usize, 0u32) };
        }
        for &pid in &self.children {
            // SAFETY: killing and reaping our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
        }
    }
}

fn read_status(f: &mut File) -> Option<StatusMsg> {
    let mut b = [0u8; 16];
    f.read_exact(&mut b).ok()?;
    StatusMsg::read_from(&b)
}

fn fill_memory(store: &Store, pid: i32, dests: &HashMap<Hash, Vec<(u64, usize)>>) -> Result<()> {
    let hashes: Vec<Hash> = dests.keys().copied().collect();
    store.read_blobs(&hashes, |h, data| {
        for &(addr, len) in dests.get(h).map(|v| v.as_slice()).unwrap_or(&[]) {
            if data.len() != len {
                let e = std::io::Error::other(format!("chunk {h} is {} bytes, the image needs {len} at {addr:#x}", data.len()));
                return Err(ckpt_store::StoreError::Callback(Box::new(e)));
            }
            remote::write(pid, addr, data).map_err(|e| {
                let e = std::io::Error::other(format!("writing {len} bytes at {addr:#x} into the restored process: {e}"));
                ckpt_store::StoreError::Callback(Box::new(e))
            })?;
        }
        Ok(())
    })?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn build_plan(
    generation: u64,
    image: &ProcessImage,
    main: &ThreadImage,
    own_maps: &[procfs::Mapping],
    restorer: &Path,
    exe_fd: Option<RawFd>,
    region_fds: &HashMap<usize, RawFd>,
    tty_pgrp: Option<(RawFd, i32)>,
    ctl_fd: RawFd,
    status_fd: RawFd,
    held: Option<crate::creds::Held>,
) -> Result<(Vec<u8>, Vec<String>)> {
    let err = |what: String| EngineError::Restore { generation, what };
    let mut p = PlanBuilder::default();
    let restorer_path = std::fs::canonicalize(restorer).unwrap_or_else(|_| restorer.to_path_buf());
    let in_zone = |m: &procfs::Mapping| m.start >= ZONE_START && m.end <= ZONE_END;

    // 1. Become anonymous memory, so that the exe link can be set back.
    let mut copy_at = SELF_COPY;
    for m in own_maps.iter().filter(|m| in_zone(m) && Path::new(&m.name) == restorer_path) {
        let len = m.len();
        let anon = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED) as u64;
        p.syscall(libc::SYS_mmap, &[copy_at.into(), len.into(), ((libc::PROT_READ | libc::PROT_WRITE) as u64).into(), anon.into(), u64::MAX.into(), 0u64.into()], Some(copy_at), false, "map a copy of the restorer");
        if m.read {
            p.copy(copy_at, m.start, len, "copy the restorer");
        }
        p.syscall(libc::SYS_mprotect, &[copy_at.into(), len.into(), (m.prot() as u64).into()], None, false, "protect the restorer copy");
        let mv = (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64;
        p.syscall(libc::SYS_mremap, &[copy_at.into(), len.into(), len.into(), mv.into(), m.start.into()], Some(m.start), false, "move the restorer copy in place");
        copy_at += len.next_multiple_of(0x10_0000);
    }

    // 2. Park the vDSO block (vvar pages and vDSO keep their relative layout).
    let vnames = ["[vvar]", "[vvar_vclock]", "[vdso]"];
    let own_v: Vec<&procfs::Mapping> = own_maps.iter().filter(|m| vnames.contains(&m.name.as_str())).collect();
    let img_v: Vec<&RegionImage> = image.regions.iter().filter(|r| matches!(r.kind, RegionKind::Vdso | RegionKind::Vvar | RegionKind::VvarVclock)).collect();
    let own_vdso = own_v.iter().find(|m| m.name == "[vdso]");
    let img_vdso = img_v.iter().find(|r| r.kind == RegionKind::Vdso);
    let move_vdso = match (own_vdso, img_vdso) {
        (Some(o), Some(i)) => {
            // Same pieces, same sizes, same offsets from the vDSO.
            let layout_own: Vec<(String, i64, u64)> = own_v.iter().map(|m| (m.name.clone(), m.start as i64 - o.start as i64, m.len())).collect();
            let mut layout_img: Vec<(String, i64, u64)> = img_v.iter().map(|r| (r.name.clone(), r.start as i64 - i.start as i64, r.end - r.start)).collect();
            let mut lo = layout_own.clone();
            lo.sort();
            layout_img.sort();
            if lo != layout_img {
                return Err(err(format!(
                    "the kernel's vDSO differs from the image's (image {layout_img:?}, here {lo:?}); restart on a host with the same kernel"
                )));
            }
            true
        }
        (None, Some(_)) => return Err(err("the image uses a vDSO but this kernel provides none".into())),
        _ => false,
    };
    let base = own_v.iter().map(|m| m.start).min().unwrap_or(0);
    if move_vdso {
        for m in &own_v {
            let to = VDSO_PARK + (m.start - base);
            let mv = (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64;
            p.syscall(libc::SYS_mremap, &[m.start.into(), m.len().into(), m.len().into(), mv.into(), to.into()], Some(to), false, format!("park {}", m.name));
        }
    }

    // 3. Unmap everything else outside the zone.
    for m in own_maps.iter().filter(|m| !in_zone(m) && m.name != "[vsyscall]") {
        if move_vdso && vnames.contains(&m.name.as_str()) {
            continue;
        }
        p.syscall(libc::SYS_munmap, &[m.start.into(), m.len().into()], None, false, format!("unmap {:#x}-{:#x} {}", m.start, m.end, m.name));
    }

    // 4. vDSO block to the image's addresses.
    if move_vdso {
        let img_vdso = img_vdso.unwrap();
        let own_vdso = own_vdso.unwrap();
        for m in &own_v {
            let from = VDSO_PARK + (m.start - base);
            let to = (img_vdso.start as i64 + (m.start as i64 - own_vdso.start as i64)) as u64;
            let mv = (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64;
            p.syscall(libc::SYS_mremap, &[from.into(), m.len().into(), m.len().into(), mv.into(), to.into()], Some(to), false, format!("move {} to {to:#x}", m.name));
        }
    }

    // 5. The image's regions: SysV segments attached first (an attach maps
    // the whole segment), then the others.
    crate::sysv::plan_attaches(&mut p, image);
    crate::sysvipc::plan(&mut p, image);
    let rw = (libc::PROT_READ | libc::PROT_WRITE) as u32;
    for (i, r) in image.regions.iter().enumerate() {
        let len = r.end - r.start;
        let what = format!("map {:#x}-{:#x} {}", r.start, r.end, r.name);
        match r.kind {
            RegionKind::Vdso | RegionKind::Vvar | RegionKind::VvarVclock => continue,
            RegionKind::SharedAnon if r.sysv.is_some() => continue,
            RegionKind::SharedFile | RegionKind::SharedAnon if region_fds.contains_key(&i) => {
                let fd = region_fds[&i];
                let flags = (libc::MAP_SHARED | libc::MAP_FIXED) as u64;
                // Writable until its content is in (protected at step 7).
                let prot = if r.segments.is_empty() { r.prot } else { rw };
                p.syscall(libc::SYS_mmap, &[r.start.into(), len.into(), (prot as u64).into(), flags.into(), (fd as u64).into(), r.offset.into()], Some(r.start), false, what);
            }
            RegionKind::Private if region_fds.contains_key(&i) => {
                // The file again; the pages the process changed are written
                // over it (copy-on-write), then it is protected at step 7.
                let fd = region_fds[&i];
                let flags = (libc::MAP_PRIVATE | libc::MAP_FIXED) as u64;
                let prot = if r.segments.is_empty() { r.prot } else { rw };
                p.syscall(libc::SYS_mmap, &[r.start.into(), len.into(), (prot as u64).into(), flags.into(), (fd as u64).into(), r.offset.into()], Some(r.start), false, what);
            }
            kind => {
                let mut flags = libc::MAP_FIXED | libc::MAP_ANONYMOUS;
                flags |= if kind == RegionKind::SharedAnon { libc::MAP_SHARED } else { libc::MAP_PRIVATE };
                if kind == RegionKind::Stack {
                    flags |= libc::MAP_GROWSDOWN;
                }
                if r.noreserve {
                    flags |= libc::MAP_NORESERVE;
                }
                let prot = if r.segments.is_empty() { r.prot } else { rw };
                p.syscall(libc::SYS_mmap, &[r.start.into(), len.into(), (prot as u64).into(), (flags as u64).into(), u64::MAX.into(), 0u64.into()], Some(r.start), false, what);
            }
        }
    }
    let others: Vec<&ThreadImage> = image.threads.iter().filter(|t| t.tid != image.pid).collect();
    let stacks = (others.len() as u64 * THREAD_STACK).max(THREAD_STACK);
    let anon = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED) as u64;
    p.syscall(libc::SYS_mmap, &[SCRATCH_ADDR.into(), stacks.into(), (rw as u64).into(), anon.into(), u64::MAX.into(), 0u64.into()], Some(SCRATCH_ADDR), false, "map thread start stacks");

    // 6. Memory is written by the driver.
    p.barrier(1, "wait for memory");
    // Every process (and so every process group) exists now.
    if let Some((fd, pgrp)) = tty_pgrp {
        let pgrp_ref = p.data(&pgrp.to_ne_bytes());
        p.syscall(libc::SYS_ioctl, &[(fd as u64).into(), libc::TIOCSPGRP.into(), pgrp_ref.into()], Some(0), false, format!("make process group {pgrp} the terminal's foreground group (tcsetpgrp)"));
        p.syscall(libc::SYS_close, &[(fd as u64).into()], None, false, format!("close helper fd {fd}"));
    }

    // 7. Final protections, mm, signals, timers.
    for r in image.regions.iter().filter(|r| !r.segments.is_empty() && r.prot != rw && r.sysv.is_none()) {
        p.syscall(libc::SYS_mprotect, &[r.start.into(), (r.end - r.start).into(), (r.prot as u64).into()], None, false, format!("protect {:#x}-{:#x} {}", r.start, r.end, r.name));
    }
    let auxv_bytes: Vec<u8> = image.auxv.iter().flat_map(|w| w.to_le_bytes()).collect();
    let auxv_ref = p.data(&auxv_bytes);
    let mm = &image.mm;
    let map = PrctlMmMap {
        start_code: mm.start_code,
        end_code: mm.end_code,
        start_data: mm.start_data,
        end_data: mm.end_data,
        start_brk: mm.start_brk,
        brk: mm.brk.max(mm.start_brk),
        start_stack: mm.start_stack,
        arg_start: mm.arg_start,
        arg_end: mm.arg_end,
        env_start: mm.env_start,
        env_end: mm.env_end,
        auxv: 0,
        auxv_size: auxv_bytes.len() as u32,
        exe_fd: exe_fd.map(|f| f as u32).unwrap_or(u32::MAX),
    };
    let map_ref = p.data_pod(&map);
    p.pointer_in_data(map_ref, std::mem::offset_of!(PrctlMmMap, auxv), auxv_ref);
    p.syscall(libc::SYS_prctl, &[PR_SET_MM.into(), PR_SET_MM_MAP.into(), map_ref.into(), (std::mem::size_of::<PrctlMmMap>() as u64).into(), 0u64.into()], None, false, "restore mm fields (PR_SET_MM_MAP)");
    let mut comm = image.comm.as_bytes().to_vec();
    comm.truncate(15);
    comm.push(0);
    let comm_ref = p.data(&comm);
    p.syscall(libc::SYS_prctl, &[PR_SET_NAME.into(), comm_ref.into(), 0u64.into(), 0u64.into(), 0u64.into()], None, true, "restore the name");
    for (i, a) in image.sigactions.iter().enumerate() {
        let sig = i as u64 + 1;
        if sig == libc::SIGKILL as u64 || sig == libc::SIGSTOP as u64 {
            continue;
        }
        let k = KernelSigaction { handler: a.handler, flags: a.flags, restorer: a.restorer, mask: a.mask };
        let r = p.data_pod(&k);
        p.syscall(libc::SYS_rt_sigaction, &[sig.into(), r.into(), 0u64.into(), 8u64.into()], None, false, format!("restore the action of signal {sig}"));
    }
    for (which, t) in image.itimers.iter().enumerate() {
        if t.is_zero() {
            continue;
        }
        let mut v = ckpt_wire::ItimerVal { interval_sec: t.interval_sec, interval_usec: t.interval_usec, value_sec: t.value_sec, value_usec: t.value_usec };
        // A periodic timer that had expired, its signal not yet delivered
        // (the program was stopped), reads 0 left; setitimer with 0 would
        // disarm it, interval and all. It is due: 1 µs.
        if (v.value_sec, v.value_usec) == (0, 0) {
            v.value_usec = 1;
        }
        let r = p.data_pod(&v);
        p.syscall(libc::SYS_setitimer, &[(which as u64).into(), r.into(), 0u64.into()], None, false, format!("restore interval timer {which}"));
    }
    for f in image.fds.iter().filter(|f| f.cloexec || matches!(f.kind, FdKind::Agent)) {
        let fd = f.fd as u64;
        p.syscall(libc::SYS_fcntl, &[fd.into(), (libc::F_SETFD as u64).into(), (libc::FD_CLOEXEC as u64).into()], None, false, format!("mark fd {fd} close-on-exec"));
    }
    for fd in exe_fd.iter().chain(region_fds.values()) {
        p.syscall(libc::SYS_close, &[(*fd as u64).into()], None, false, format!("close helper fd {fd}"));
    }
    p.barrier(2, "wait for rlimits");

    // 8. Threads, each setting its own credentials and filters last
    // (crate::creds); then the main thread's credentials, its filters at the
    // very end.
    let creds = image.creds.as_ref();
    let thread_creds = |tid: i32| match creds {
        Some(c) => c.thread(tid).map(Some).ok_or_else(|| EngineError::BadImage { generation, what: format!("thread {tid} of process {} has no recorded credentials", image.pid) }),
        None => Ok(None),
    };
    let targs = |t: &ThreadImage, stack: u64| {
        [t.tid as u64, t.fs_base, t.ucontext, t.clear_child_tid, t.robust_list, t.robust_len, t.rseq_addr, t.rseq_len as u64 | (t.rseq_sig as u64) << 32, stack, THREAD_STACK]
    };
    for (k, t) in others.iter().enumerate() {
        let mut tail = 0;
        let sched = image.sched.iter().find(|s| s.tid == t.tid);
        let creds = match (thread_creds(t.tid)?, held) {
            (Some(tc), Some(held)) => Some((tc, held)),
            _ => None,
        };
        if sched.is_some() || creds.is_some() {
            tail = p.begin_tail(format!("scheduling and credentials of thread {}", t.tid));
            if let Some(s) = sched {
                plan_sched(&mut p, s);
            }
            if let Some((tc, held)) = creds {
                crate::creds::plan_thread(&mut p, image.pid, tc, held, generation)?;
                crate::creds::plan_filters(&mut p, image.pid, tc);
            }
            p.end_tail(tail);
        }
        p.thread_with_tail(op::THREAD, targs(t, SCRATCH_ADDR + k as u64 * THREAD_STACK), tail, format!("create thread {}", t.tid));
    }
    p.join("wait for every thread to set its credentials");
    // POSIX timers, under their ids, once every thread a timer may signal
    // exists.
    if !image.posix_timers.is_empty() {
        p.syscall(libc::SYS_prctl, &[PR_TIMER_CREATE_RESTORE_IDS.into(), 1u64.into(), 0u64.into(), 0u64.into(), 0u64.into()], Some(0), false, "let timer_create take the recorded timer ids (PR_TIMER_CREATE_RESTORE_IDS: Linux 6.17 or later)");
        for t in &image.posix_timers {
            let mut sev = [0u8; 64];
            sev[0..8].copy_from_slice(&t.value.to_ne_bytes());
            sev[8..12].copy_from_slice(&t.signo.to_ne_bytes());
            sev[12..16].copy_from_slice(&t.notify.to_ne_bytes());
            sev[16..20].copy_from_slice(&t.tid.to_ne_bytes());
            let sev = p.data(&sev);
            let id = p.data(&t.id.to_ne_bytes());
            p.syscall(libc::SYS_timer_create, &[(t.clock as i64 as u64).into(), sev.into(), id.into()], Some(0), false, format!("create POSIX timer {} (clock {})", t.id, t.clock));
            if (t.interval_sec, t.interval_nsec, t.left_sec, t.left_nsec) != (0, 0, 0, 0) {
                // An expired periodic timer whose signal is still pending
                // reads 0 left: it is due.
                let left = if (t.left_sec, t.left_nsec) == (0, 0) { (0, 1) } else { (t.left_sec, t.left_nsec) };
                let its = [t.interval_sec, t.interval_nsec, left.0, left.1];
                let its = p.data(&its.iter().flat_map(|v| v.to_ne_bytes()).collect::<Vec<u8>>());
                p.syscall(libc::SYS_timer_settime, &[(t.id as u64).into(), 0u64.into(), its.into(), 0u64.into()], Some(0), false, format!("arm POSIX timer {}", t.id));
            }
        }
        p.syscall(libc::SYS_prctl, &[PR_TIMER_CREATE_RESTORE_IDS.into(), 0u64.into(), 0u64.into(), 0u64.into(), 0u64.into()], Some(0), false, "back to timer ids of the kernel's choosing");
    }
    // Pending signals, queued again in their order (every restorer thread
    // blocks all signals until its rt_sigreturn, so none reaches restorer
    // code). Queued to our own process, any si_code is accepted.
    for s in &image.pending {
        if s.info.len() != crate::signals::SIGINFO_SIZE {
            return Err(EngineError::BadImage { generation, what: format!("a pending signal of process {} has a siginfo of {} bytes", image.pid, s.info.len()) });
        }
        let sig = crate::signals::signo(&s.info);
        let info = p.data(&s.info);
        if s.tid == 0 {
            p.syscall(libc::SYS_rt_sigqueueinfo, &[(image.pid as u64).into(), (sig as u64).into(), info.into()], Some(0), false, format!("queue pending signal {sig} of the process again"));
        } else {
            p.syscall(libc::SYS_rt_tgsigqueueinfo, &[(image.pid as u64).into(), (s.tid as u64).into(), (sig as u64).into(), info.into()], Some(0), false, format!("queue pending signal {sig} of thread {} again", s.tid));
        }
    }
    let main_creds = thread_creds(main.tid)?;
    if let Some(s) = image.sched.iter().find(|s| s.tid == main.tid) {
        plan_sched(&mut p, s);
    }
    if let (Some(tc), Some(held)) = (main_creds, held) {
        crate::creds::plan_thread(&mut p, image.pid, tc, held, generation)?;
    }
    p.syscall(libc::SYS_close, &[(ctl_fd as u64).into()], None, false, "close the control pipe");
    p.syscall(libc::SYS_close, &[(status_fd as u64).into()], None, true, "close the status pipe");
    let mut tail = 0;
    if let Some(tc) = main_creds.filter(|tc| !tc.seccomp.is_empty()) {
        tail = p.begin_tail("seccomp filters of the main thread");
        crate::creds::plan_filters(&mut p, image.pid, tc);
        p.end_tail(tail);
    }
    p.thread_with_tail(op::RESUME, targs(main, 0), tail, "resume the main thread");

    Ok(p.finish())
}

/// The calling thread's scheduling as recorded: policy and priority (or
/// nice), then I/O priority, then CPU affinity. Run by the thread itself
/// before its credentials, so with the rights of whoever runs the restart:
/// it gives back what the restarter could give the process from outside
/// (`renice`, `chrt`, `taskset`), nothing more. An
/// affinity naming no CPU this machine has leaves the thread on every CPU
/// (a restart on a smaller machine); policy and priorities the restart is
/// not allowed to set fail it, naming them.
fn plan_sched(p: &mut PlanBuilder, s: &ThreadSched) {
    if s.attr.len() >= 8 {
        let mut attr = s.attr.clone();
        let size = attr.len() as u32;
        attr[0..4].copy_from_slice(&size.to_ne_bytes());
        let policy = u32::from_ne_bytes(attr[4..8].try_into().unwrap_or_default());
        let nice = attr.get(16..20).map_or(0, |b| i32::from_ne_bytes(b.try_into().unwrap_or_default()));
        let prio = attr.get(20..24).map_or(0, |b| u32::from_ne_bytes(b.try_into().unwrap_or_default()));
        let a = p.data(&attr);
        p.syscall(libc::SYS_sched_setattr, &[0u64.into(), a.into(), 0u64.into()], Some(0), false, format!("set the scheduling of thread {} (policy {policy}, priority {prio}, nice {nice}; a higher priority than the restart may give needs CAP_SYS_NICE or RLIMIT_RTPRIO/RLIMIT_NICE)", s.tid));
    }
    p.syscall(libc::SYS_ioprio_set, &[1u64.into(), 0u64.into(), (s.ioprio as u32 as u64).into()], Some(0), false, format!("set the I/O priority of thread {} ({:#x})", s.tid, s.ioprio));
    if !s.affinity.is_empty() {
        let m = p.data(&s.affinity);
        p.syscall(libc::SYS_sched_setaffinity, &[0u64.into(), (s.affinity.len() as u64).into(), m.into()], None, true, format!("set the CPU affinity of thread {}", s.tid));
    }
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
