//! The plan each restorer runs: become anonymous, move the vDSO, unmap the
//! restorer's surroundings, map the image's regions, then (after the memory
//! is written) protections, mm fields, signal actions, timers, threads and
//! credentials, and the jump back into the program.

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::path::Path;

use ckpt_wire::restore::{SCRATCH_ADDR, ZONE_END, ZONE_START, op};
use ckpt_wire::{KernelSigaction, Pod};

use crate::error::{EngineError, Result};
use crate::image::*;
use crate::plan::PlanBuilder;
use crate::procfs;

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

/// `prctl` option of Linux 6.17: `timer_create` takes the id `*timer_id`.
const PR_TIMER_CREATE_RESTORE_IDS: u64 = 77;

#[allow(clippy::too_many_arguments)]
pub(super) fn build_plan(
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
    uffd_fd: Option<RawFd>,
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

    // A lazy restart's userfaultfd, taken by the driver at the barrier
    // (allowed to fail: the driver then writes all memory first). Not
    // UFFD_USER_MODE_ONLY: the kernel's own accesses must be served too.
    if let Some(fd) = uffd_fd {
        let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64;
        p.syscall_to_fd(ckpt_wire::uapi::SYS_USERFAULTFD, &[flags], fd, true, format!("make the userfaultfd of the lazy restart (fd {fd})"));
    }

    // 6. Memory is written by the driver.
    p.barrier(1, "wait for memory");
    if let Some(fd) = uffd_fd {
        p.syscall(libc::SYS_close, &[(fd as u64).into()], None, true, format!("close the lazy restart's userfaultfd (fd {fd}): the driver holds it"));
    }
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
    crate::memattrs::plan(&mut p, &image.regions);
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
    crate::fds::procfile::plan(&mut p, generation, image)?; // /proc/PID files: the processes exist now
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
