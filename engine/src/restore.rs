//! The restart driver: recreates one process of an image.
//!
//! 1. Check that the image's PID and TIDs are free (nothing is started
//!    otherwise).
//! 2. Open the image's files, connect its agent, and `clone3` a child with
//!    the image's PID (`set_tid`). The child puts every fd at its number,
//!    sets cwd and umask, blocks all signals and execs the freestanding
//!    restorer, which maps itself at [`ZONE_START`] (far from anything a
//!    program uses).
//! 3. Read the restorer's own map and send it a plan: become anonymous (so
//!    the exe link can be set back), move the vDSO and its data pages to the
//!    image's addresses, unmap everything else, map the image's regions.
//! 4. At the first barrier, write the memory into the child with
//!    `process_vm_writev` (chunks read and decompressed in parallel, each
//!    written where the image has it) and mark the agent's restart word.
//! 5. The plan goes on: final protections, mm fields (`PR_SET_MM_MAP`),
//!    signal actions, timers; at the second barrier the driver sets the
//!    rlimits; then the restorer creates the threads with their TIDs and
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

/// A process being restored: its PID, once it runs on its own.
pub struct Restored {
    pub pid: i32,
}

/// Fails if any PID or TID of the image is in use.
pub fn check_ids_free(generation: u64, image: &ProcessImage) -> Result<()> {
    let mut ids: Vec<(i32, &str)> = vec![(image.pid, "PID")];
    ids.extend(image.threads.iter().filter(|t| t.tid != image.pid).map(|t| (t.tid, "TID")));
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
    cloexec: bool,
}

fn open_fd(generation: u64, f: &FdImage) -> Result<Option<OwnedFd>> {
    let keep = libc::O_ACCMODE | libc::O_APPEND | libc::O_NONBLOCK | libc::O_SYNC | libc::O_DSYNC | libc::O_DIRECT | libc::O_NOATIME;
    let (path, flags) = match &f.kind {
        FdKind::File { path } | FdKind::Device { path } => (path, f.flags & keep),
        FdKind::Dir { path } => (path, libc::O_RDONLY | libc::O_DIRECTORY),
        FdKind::Inherited { .. } if f.fd > 2 => {
            tracing::warn!("fd {} was inherited from outside the computation ({:?}); it is /dev/null after the restart", f.fd, f.kind);
            let devnull = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null").map_err(|e| EngineError::io("/dev/null", e))?;
            return Ok(Some(devnull.into()));
        }
        FdKind::Inherited { .. } | FdKind::Agent => return Ok(None),
    };
    let c = CString::new(path.as_bytes()).map_err(|_| EngineError::Restore { generation, what: format!("bad path {path:?}") })?;
    // SAFETY: open with a NUL-terminated path; the result is owned below.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return Err(EngineError::Restore { generation, what: format!("cannot reopen {path} as fd {}: {e}", f.fd) });
    }
    // SAFETY: `fd` was just opened by us.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    if matches!(f.kind, FdKind::File { .. }) && f.pos > 0 {
        // SAFETY: lseek on our own fd.
        unsafe { libc::lseek(fd, f.pos, libc::SEEK_SET) };
    }
    Ok(Some(owned))
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

/// Restores `image` (of generation `generation`) from `store` as a child of
/// the calling process. `agent_conn` is a fresh connection to the
/// coordinator for the process's agent. Returns once every thread runs.
pub fn restore_process(store: &Store, generation: u64, image: &ProcessImage, restorer: &Path, agent_conn: OwnedFd) -> Result<Restored> {
    let err = |what: String| EngineError::Restore { generation, what };
    // Start the thread pool now: threads created after the clone could take
    // the TIDs the image's threads need.
    rayon::broadcast(|_| ());
    check_ids_free(generation, image)?;
    if image.regions.iter().any(|r| r.start < ZONE_END && r.end > ZONE_START) {
        return Err(err(format!("the image has memory in [{ZONE_START:#x}, {ZONE_END:#x}), where the restorer lives")));
    }
    let main = image.threads.iter().find(|t| t.tid == image.pid).ok_or_else(|| err(format!("the image has no main thread (TID {})", image.pid)))?;

    let t0 = std::time::Instant::now();
    // Where every chunk goes.
    let chunk_size = image.chunk_size as u64;
    let mut dests: HashMap<Hash, Vec<(u64, usize)>> = HashMap::new();
    for r in image.regions.iter().filter(|r| !r.segments.is_empty()) {
        let hashes = crate::chunklist::load(store, generation, &r.segments, r.depth)?;
        let n = (r.end - r.start).div_ceil(chunk_size) as usize;
        if hashes.len() != n {
            return Err(EngineError::BadImage { generation, what: format!("region {:#x}-{:#x} lists {} chunks, expected {n}", r.start, r.end, hashes.len()) });
        }
        for (i, h) in hashes.into_iter().enumerate() {
            if h != Hash::ZERO_CHUNK {
                let addr = r.start + i as u64 * chunk_size;
                dests.entry(h).or_default().push((addr, (r.end - addr).min(chunk_size) as usize));
            }
        }
    }

    tracing::debug!(ms = t0.elapsed().as_millis() as u64, chunks = dests.len(), "chunk lists loaded");
    // Fds of the restored process, then the restorer's own.
    let mut moves: Vec<FdMove> = Vec::new();
    let mut keep_inherited: Vec<RawFd> = Vec::new();
    let mut agent_conn = Some(agent_conn);
    for f in &image.fds {
        match &f.kind {
            FdKind::Inherited { .. } if f.fd <= 2 => keep_inherited.push(f.fd),
            FdKind::Agent => {
                let src = agent_conn.take().ok_or_else(|| err("two agent fds".into()))?;
                moves.push(FdMove { src, dst: f.fd, cloexec: true });
            }
            _ => {
                let src = open_fd(generation, f)?.expect("file kinds open");
                moves.push(FdMove { src, dst: f.fd, cloexec: f.cloexec });
            }
        }
    }
    let max_image_fd = image.fds.iter().map(|f| f.fd).max().unwrap_or(2).max(2);
    let mut next_aux = max_image_fd + 1;
    let mut aux = |src: OwnedFd, moves: &mut Vec<FdMove>| {
        let dst = next_aux;
        next_aux += 1;
        moves.push(FdMove { src, dst, cloexec: false });
        dst
    };
    let (ctl_r, ctl_w) = pipe()?;
    let (status_r, status_w) = pipe()?;
    let ctl_fd = aux(ctl_r, &mut moves);
    let status_fd = aux(status_w, &mut moves);
    let exe_fd = match File::open(&image.exe) {
        Ok(f) => Some(aux(f.into(), &mut moves)),
        Err(e) => {
            tracing::warn!("cannot open {} ({e}); /proc/{}/exe will name the restorer", image.exe, image.pid);
            None
        }
    };
    let mut shared_file_fds = HashMap::new();
    for (i, r) in image.regions.iter().enumerate().filter(|(_, r)| r.kind == RegionKind::SharedFile) {
        let write = r.prot & libc::PROT_WRITE as u32 != 0;
        let f = std::fs::OpenOptions::new().read(true).write(write).open(&r.name).map_err(|e| err(format!("cannot reopen shared mapping of {}: {e}", r.name)))?;
        shared_file_fds.insert(i, aux(f.into(), &mut moves));
    }
    let src_base = moves.iter().map(|m| m.dst).max().unwrap_or(2) + 1;
    for m in moves.iter_mut() {
        let fd = std::mem::replace(&mut m.src, File::open("/dev/null").map_err(|e| EngineError::io("/dev/null", e))?.into());
        m.src = move_above(fd, src_base)?;
    }

    // Everything the child needs, prepared before it exists.
    let restorer_c = CString::new(restorer.as_os_str().as_bytes()).map_err(|_| err("bad restorer path".into()))?;
    let argv_s = [CString::new("ckpt-restorer").unwrap(), CString::new(ctl_fd.to_string()).unwrap(), CString::new(status_fd.to_string()).unwrap()];
    let argv: Vec<*const libc::c_char> = argv_s.iter().map(|s| s.as_ptr()).chain([std::ptr::null()]).collect();
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    let cwd = CString::new(image.cwd.as_bytes()).map_err(|_| err("bad cwd".into()))?;
    let mut keep = vec![false; src_base as usize];
    for m in &moves {
        keep[m.dst as usize] = true;
    }
    for &fd in &keep_inherited {
        keep[fd as usize] = true;
    }
    let pairs: Vec<(RawFd, RawFd, bool)> = moves.iter().map(|m| (m.src.as_raw_fd(), m.dst, m.cloexec)).collect();
    let set_tid = [image.pid];
    let args = CloneArgs { exit_signal: libc::SIGCHLD as u64, set_tid: set_tid.as_ptr() as u64, set_tid_size: 1, ..Default::default() };

    // SAFETY: clone3 without CLONE_VM behaves like fork; `args` and
    // `set_tid` live across the call.
    let pid = unsafe { libc::syscall(libc::SYS_clone3, &args as *const CloneArgs, std::mem::size_of::<CloneArgs>()) };
    if pid == 0 {
        // SAFETY: in the child, only async-signal-safe calls on data
        // prepared above; never returns.
        unsafe { child_exec(&pairs, src_base, &keep, &cwd, image.umask, &restorer_c, &argv, &envp) };
    }
    if pid < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EEXIST) {
            return Err(EngineError::IdTaken { generation, what: format!("PID {}", image.pid) });
        }
        return Err(err(format!("clone3 with PID {} failed: {e} (restoring PIDs needs root or CAP_CHECKPOINT_RESTORE)", image.pid)));
    }
    let pid = pid as i32;
    drop(moves);
    let mut guard = KillOnDrop(Some(pid));
    let mut ctl = File::from(ctl_w);
    let mut status_in = File::from(status_r);

    let first = read_status(&mut status_in).ok_or_else(|| err(format!("the restorer ({}) exited before it started: {}", restorer.display(), child_exit(pid))))?;
    if first.kind != status::READY {
        return Err(err(format!("unexpected first message from the restorer: {first:?}")));
    }
    let own_maps = procfs::maps(pid)?;
    let (plan, descriptions) = build_plan(generation, image, main, &own_maps, restorer, exe_fd, &shared_file_fds, ctl_fd, status_fd)?;
    ctl.write_all(&plan).map_err(|e| EngineError::io("sending the plan to the restorer", e))?;

    loop {
        let Some(msg) = read_status(&mut status_in) else { break };
        match msg.kind {
            status::BARRIER if msg.value == 1 => {
                let t = std::time::Instant::now();
                fill_memory(store, pid, &dests)?;
                tracing::debug!(ms = t.elapsed().as_millis() as u64, "memory written");
                remote::write(pid, image.agent.restart_word_addr, &generation.to_le_bytes())
                    .map_err(|e| err(format!("cannot mark the agent's restart word: {e}")))?;
                ctl.write_all(b"G").map_err(|e| EngineError::io("restorer control pipe", e))?;
            }
            status::BARRIER if msg.value == 2 => {
                for l in &image.rlimits {
                    let new = libc::rlimit64 { rlim_cur: l.soft, rlim_max: l.hard };
                    // SAFETY: prlimit64 setting one limit of our child.
                    if unsafe { libc::prlimit64(pid, l.resource as _, &new, std::ptr::null_mut()) } != 0 {
                        tracing::warn!("cannot restore rlimit {}: {}", l.resource, std::io::Error::last_os_error());
                    }
                }
                ctl.write_all(b"G").map_err(|e| EngineError::io("restorer control pipe", e))?;
            }
            status::ERROR => {
                let what = descriptions.get(msg.op as usize).cloned().unwrap_or_default();
                let errno = std::io::Error::from_raw_os_error((-msg.value) as i32);
                return Err(err(format!("the restorer failed at step {} ({what}): {errno}", msg.op)));
            }
            _ => return Err(err(format!("unexpected message from the restorer: {msg:?}"))),
        }
    }
    // The restorer closed its pipes: it is creating the threads and jumping
    // into the program. Give it a moment to fail visibly.
    guard.0 = None;
    Ok(Restored { pid })
}

struct KillOnDrop(Option<i32>);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            // SAFETY: killing and reaping our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
        }
    }
}

fn child_exit(pid: i32) -> String {
    let mut st = 0;
    // SAFETY: reaping our own child.
    let r = unsafe { libc::waitpid(pid, &mut st, 0) };
    if r != pid {
        return "unknown status".into();
    }
    if libc::WIFEXITED(st) { format!("exit code {}", libc::WEXITSTATUS(st)) } else { format!("signal {}", libc::WTERMSIG(st)) }
}

fn read_status(f: &mut File) -> Option<StatusMsg> {
    let mut b = [0u8; 16];
    f.read_exact(&mut b).ok()?;
    StatusMsg::read_from(&b)
}

/// # Safety
/// Only in the child of a fork-like clone: uses async-signal-safe calls
/// only, and never returns.
#[allow(clippy::too_many_arguments)]
unsafe fn child_exec(
    pairs: &[(RawFd, RawFd, bool)],
    src_base: RawFd,
    keep: &[bool],
    cwd: &CString,
    umask: u32,
    restorer: &CString,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
) -> ! {
    // SAFETY: plain syscalls on fds and prepared, NUL-terminated strings.
    unsafe {
        for &(src, dst, cloexec) in pairs {
            if libc::dup2(src, dst) < 0 {
                libc::_exit(120);
            }
            // Close-on-exec is set by the plan: the restorer is exec'd.
            let _ = cloexec;
        }
        libc::syscall(libc::SYS_close_range, src_base as u32, u32::MAX, 0u32);
        for (fd, &k) in keep.iter().enumerate() {
            if !k {
                libc::close(fd as RawFd);
            }
        }
        if libc::chdir(cwd.as_ptr()) != 0 {
            libc::_exit(121);
        }
        libc::umask(umask as libc::mode_t);
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::syscall(libc::SYS_rt_sigprocmask, libc::SIG_SETMASK, &all as *const libc::sigset_t, 0usize, 8usize);
        libc::execve(restorer.as_ptr(), argv.as_ptr(), envp.as_ptr());
        libc::_exit(122);
    }
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
    shared_file_fds: &HashMap<usize, RawFd>,
    ctl_fd: RawFd,
    status_fd: RawFd,
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

    // 5. The image's regions.
    let rw = (libc::PROT_READ | libc::PROT_WRITE) as u32;
    for (i, r) in image.regions.iter().enumerate() {
        let len = r.end - r.start;
        let what = format!("map {:#x}-{:#x} {}", r.start, r.end, r.name);
        match r.kind {
            RegionKind::Vdso | RegionKind::Vvar | RegionKind::VvarVclock => continue,
            RegionKind::SharedFile => {
                let fd = shared_file_fds[&i];
                let flags = (libc::MAP_SHARED | libc::MAP_FIXED) as u64;
                p.syscall(libc::SYS_mmap, &[r.start.into(), len.into(), (r.prot as u64).into(), flags.into(), (fd as u64).into(), r.offset.into()], Some(r.start), false, what);
            }
            kind => {
                let mut flags = libc::MAP_FIXED | libc::MAP_ANONYMOUS;
                flags |= if kind == RegionKind::SharedAnon { libc::MAP_SHARED } else { libc::MAP_PRIVATE };
                if kind == RegionKind::Stack {
                    flags |= libc::MAP_GROWSDOWN;
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

    // 7. Final protections, mm, signals, timers.
    for r in image.regions.iter().filter(|r| !r.segments.is_empty() && r.prot != rw) {
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
        let v = ckpt_wire::ItimerVal { interval_sec: t.interval_sec, interval_usec: t.interval_usec, value_sec: t.value_sec, value_usec: t.value_usec };
        let r = p.data_pod(&v);
        p.syscall(libc::SYS_setitimer, &[(which as u64).into(), r.into(), 0u64.into()], None, false, format!("restore interval timer {which}"));
    }
    for f in image.fds.iter().filter(|f| f.cloexec || matches!(f.kind, FdKind::Agent)) {
        let fd = f.fd as u64;
        p.syscall(libc::SYS_fcntl, &[fd.into(), (libc::F_SETFD as u64).into(), (libc::FD_CLOEXEC as u64).into()], None, false, format!("mark fd {fd} close-on-exec"));
    }
    for fd in exe_fd.iter().chain(shared_file_fds.values()) {
        p.syscall(libc::SYS_close, &[(*fd as u64).into()], None, false, format!("close helper fd {fd}"));
    }
    p.barrier(2, "wait for rlimits");
    p.syscall(libc::SYS_close, &[(ctl_fd as u64).into()], None, false, "close the control pipe");
    p.syscall(libc::SYS_close, &[(status_fd as u64).into()], None, true, "close the status pipe");

    // 8. Threads, then the main thread.
    let targs = |t: &ThreadImage, stack: u64| {
        [t.tid as u64, t.fs_base, t.ucontext, t.clear_child_tid, t.robust_list, t.robust_len, t.rseq_addr, t.rseq_len as u64 | (t.rseq_sig as u64) << 32, stack, THREAD_STACK]
    };
    for (k, t) in others.iter().enumerate() {
        p.thread(op::THREAD, targs(t, SCRATCH_ADDR + k as u64 * THREAD_STACK), format!("create thread {}", t.tid));
    }
    p.thread(op::RESUME, targs(main, 0), "resume the main thread");

    Ok(p.finish())
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
