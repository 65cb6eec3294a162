//! Credentials: captured per thread, restored exactly, and worn by the
//! restart driver whenever it opens something by path for a process.
//!
//! **What is kept** (per thread, [`ThreadCreds`], in the image as plain
//! data): real/effective/saved/fs uid and gid, supplementary groups, the
//! five capability sets, `no_new_privs` and the seccomp filters with their
//! flags. Everything but the filters comes from `/proc/PID/task/TID/status`;
//! the filters from `PTRACE_SECCOMP_GET_FILTER` and
//! `PTRACE_SECCOMP_GET_METADATA` (the capturing process is root). All of
//! these are per thread in the kernel (glibc makes uids and groups uniform,
//! but `capset`, `prctl` and `seccomp` act on the calling thread only), so a
//! program that sandboxes its main thread after the agent's thread exists
//! has threads that differ: each thread is restored with its own.
//!
//! **Securebits** are not in `/proc` and `PR_GET_SECUREBITS` answers only
//! for the calling thread: each thread's agent signal handler asks, and
//! reports them with its state (`ThreadState::securebits`).
//!
//! **Restore order** (in each thread, by the restorer, as raw syscalls; see
//! [`plan_thread`]): groups, gids, `PR_SET_KEEPCAPS`, uids, fs ids, a capset
//! that keeps every capability the restorer has effective, bounding-set
//! drops, ambient raises, securebits (after the raises, which
//! `SECBIT_NO_CAP_AMBIENT_RAISE` would forbid), the final capset, `no_new_privs`, and
//! the seccomp filters last, oldest first, as the last syscalls before
//! `rt_sigreturn` (a filter may forbid what the restorer still needs).
//!
//! **Opening as the process.** Files, FIFOs and shared memory objects are
//! reopened by the restart driver before any process exists (so that a
//! missing file fails the restart before anything runs, and descriptions
//! shared by several processes are made once). The driver's thread wears
//! the process's identity for each such open ([`acting_as`], [`as_process`]):
//! its fsuid, fsgid, groups and effective capabilities, switched with raw
//! per-thread syscalls (glibc's `setgroups` would change every thread of the
//! driver) and switched back at once. So the kernel checks each open
//! exactly as it would for the process, creations are owned by it, and
//! nothing else the driver does (reading the store, talking to the
//! coordinator) runs with the process's identity.

use std::ffi::CString;
use std::os::fd::{FromRawFd, OwnedFd};

use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};
use crate::image::ProcessImage;
use crate::plan::{Arg, PlanBuilder};

/// One seccomp filter: its BPF program (each `struct sock_filter` as one
/// little-endian u64) and the flags it was installed with.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeccompFilter {
    pub flags: u64,
    pub insns: Vec<u64>,
}

/// The credentials of one thread.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadCreds {
    pub tid: i32,
    /// Real, effective, saved, fs.
    pub uid: [u32; 4],
    pub gid: [u32; 4],
    pub groups: Vec<u32>,
    pub cap_inheritable: u64,
    pub cap_permitted: u64,
    pub cap_effective: u64,
    pub cap_bounding: u64,
    pub cap_ambient: u64,
    pub no_new_privs: bool,
    /// `PR_GET_SECUREBITS`, as the thread itself reported it.
    #[serde(default)]
    pub securebits: u32,
    /// In the order they were installed (oldest first).
    pub seccomp: Vec<SeccompFilter>,
}

/// The credentials of every thread of a process.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessCreds {
    pub threads: Vec<ThreadCreds>,
}

impl ProcessCreds {
    pub fn thread(&self, tid: i32) -> Option<&ThreadCreds> {
        self.threads.iter().find(|t| t.tid == tid)
    }
}

const CAP_SYS_ADMIN: u32 = 21;
const CAP_SETGID: u32 = 6;
const CAP_SETUID: u32 = 7;
const PTRACE_SEIZE: libc::c_uint = 0x4206;
const PTRACE_INTERRUPT: libc::c_uint = 0x4207;
const PTRACE_SECCOMP_GET_FILTER: libc::c_uint = 0x420c;
const PTRACE_SECCOMP_GET_METADATA: libc::c_uint = 0x420d;
const PTRACE_DETACH: libc::c_uint = 17;
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// The status fields of one thread, parsed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Status {
    pub creds: ThreadCreds,
    /// `Seccomp:` 0 off, 1 strict, 2 filter.
    pub seccomp_mode: u32,
    pub seccomp_filters: u32,
}

/// Parses `/proc/PID/task/TID/status`; None when a field is missing.
pub fn parse_status(tid: i32, text: &str) -> Option<Status> {
    let mut s = Status { creds: ThreadCreds { tid, ..Default::default() }, ..Default::default() };
    let mut seen = 0u32;
    let ids = |v: &str| -> Option<[u32; 4]> {
        let n: Vec<u32> = v.split_whitespace().map(|x| x.parse().ok()).collect::<Option<_>>()?;
        n.try_into().ok()
    };
    let hex = |v: &str| u64::from_str_radix(v.trim(), 16).ok();
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else { continue };
        let c = &mut s.creds;
        let ok = match k {
            "Uid" => ids(v).map(|x| c.uid = x).is_some(),
            "Gid" => ids(v).map(|x| c.gid = x).is_some(),
            "Groups" => v.split_whitespace().map(|x| x.parse().ok()).collect::<Option<Vec<u32>>>().map(|g| c.groups = g).is_some(),
            "CapInh" => hex(v).map(|x| c.cap_inheritable = x).is_some(),
            "CapPrm" => hex(v).map(|x| c.cap_permitted = x).is_some(),
            "CapEff" => hex(v).map(|x| c.cap_effective = x).is_some(),
            "CapBnd" => hex(v).map(|x| c.cap_bounding = x).is_some(),
            "CapAmb" => hex(v).map(|x| c.cap_ambient = x).is_some(),
            "NoNewPrivs" => v.trim().parse::<u32>().ok().map(|x| c.no_new_privs = x != 0).is_some(),
            "Seccomp" => v.trim().parse().ok().map(|x| s.seccomp_mode = x).is_some(),
            "Seccomp_filters" => v.trim().parse().ok().map(|x| s.seccomp_filters = x).is_some(),
            _ => continue,
        };
        if !ok {
            return None;
        }
        seen += 1;
    }
    // Seccomp_filters is missing on kernels before 5.9: then 0 or 1+ is
    // told by the mode alone (and the filters are counted by ptrace).
    (seen >= 11 || (seen == 10 && s.seccomp_mode != 2)).then_some(s)
}

/// Reads the status of thread `tid` of `pid`.
pub fn thread_status(pid: i32, tid: i32) -> Result<Status> {
    parse_thread_status(pid, tid, &status_text(pid, tid)?)
}

/// The text of `/proc/PID/task/TID/status`.
pub fn status_text(pid: i32, tid: i32) -> Result<String> {
    let path = format!("/proc/{pid}/task/{tid}/status");
    std::fs::read_to_string(&path).map_err(|e| EngineError::Proc { pid, path: path.into(), source: e })
}

/// [`parse_status`] of thread `tid`'s status `text`, a missing field an error.
pub fn parse_thread_status(pid: i32, tid: i32, text: &str) -> Result<Status> {
    parse_status(tid, text).ok_or_else(|| EngineError::Unsupported { pid, what: format!("/proc/{pid}/task/{tid}/status lacks a credential field ckpt needs (Uid, Gid, Groups, Cap*, NoNewPrivs, Seccomp)") })
}

/// Captures the credentials of threads `tids` of process `pid` (stopped by
/// its agent), each with the securebits its handler reported. Fails, naming the process and thread, for what cannot be
/// brought back: strict seccomp, or filters installed without
/// `no_new_privs` by a thread that no longer holds `CAP_SYS_ADMIN` (the
/// restorer could only install them before dropping its capabilities, and
/// then the filters would judge the rest of the restore). `status(i)`:
/// the status text of thread `tids[i]` ([`status_text`]), read while stopped.
pub fn capture_from<'a, S: AsRef<str> + ?Sized + 'a>(pid: i32, tids: &[(i32, u32)], status: impl Fn(usize) -> &'a S) -> Result<ProcessCreds> {
    let mut threads = Vec::new();
    for (i, &(tid, securebits)) in tids.iter().enumerate() {
        let st = parse_thread_status(pid, tid, status(i).as_ref())?;
        let mut c = st.creds;
        c.securebits = securebits;
        match st.seccomp_mode {
            0 => {}
            1 => return Err(EngineError::Unsupported { pid, what: format!("thread {tid} runs in strict seccomp mode (SECCOMP_MODE_STRICT)") }),
            2 => {
                if !c.no_new_privs && c.cap_effective & (1 << CAP_SYS_ADMIN) == 0 {
                    return Err(EngineError::Unsupported {
                        pid,
                        what: format!("thread {tid} has seccomp filters but neither no_new_privs nor CAP_SYS_ADMIN, so a restart could not install them last; set no_new_privs (prctl PR_SET_NO_NEW_PRIVS) before installing filters"),
                    });
                }
                c.seccomp = seccomp_filters(pid, tid)?;
            }
            m => return Err(EngineError::Unsupported { pid, what: format!("thread {tid} has seccomp mode {m}, unknown to ckpt") }),
        }
        threads.push(c);
    }
    Ok(ProcessCreds { threads })
}

/// The seccomp filters of thread `tid`, oldest first, read with ptrace
/// (seized, interrupted, read, detached: the thread, parked by its agent,
/// goes back to its wait).
fn seccomp_filters(pid: i32, tid: i32) -> Result<Vec<SeccompFilter>> {
    let fail = |what: &str, e: std::io::Error| EngineError::Unsupported { pid, what: format!("the seccomp filters of thread {tid} cannot be read ({what}: {e}; is it traced by a debugger?)") };
    // SAFETY: ptrace requests on a thread id with no memory passed.
    if unsafe { libc::ptrace(PTRACE_SEIZE, tid, 0usize, 0usize) } != 0 {
        return Err(fail("PTRACE_SEIZE", std::io::Error::last_os_error()));
    }
    let out = (|| {
        // SAFETY: as above.
        if unsafe { libc::ptrace(PTRACE_INTERRUPT, tid, 0usize, 0usize) } != 0 {
            return Err(fail("PTRACE_INTERRUPT", std::io::Error::last_os_error()));
        }
        let mut st = 0;
        loop {
            // SAFETY: waiting for our tracee; `st` is a local.
            let r = unsafe { libc::waitpid(tid, &mut st, libc::__WALL) };
            if r == tid {
                break;
            }
            let e = std::io::Error::last_os_error();
            if r < 0 && e.raw_os_error() != Some(libc::EINTR) {
                return Err(fail("waitpid", e));
            }
        }
        let mut filters = Vec::new();
        for index in 0u64.. {
            // SAFETY: with a null buffer the kernel only returns the length.
            let n = unsafe { libc::ptrace(PTRACE_SECCOMP_GET_FILTER, tid, index as usize, 0usize) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ENOENT) {
                    break;
                }
                return Err(fail("PTRACE_SECCOMP_GET_FILTER", e));
            }
            let mut insns = vec![0u64; n as usize];
            // SAFETY: the buffer holds `n` struct sock_filter (8 bytes each).
            let m = unsafe { libc::ptrace(PTRACE_SECCOMP_GET_FILTER, tid, index as usize, insns.as_mut_ptr()) };
            if m != n {
                return Err(fail("PTRACE_SECCOMP_GET_FILTER", std::io::Error::last_os_error()));
            }
            let mut meta = [index, 0u64];
            // SAFETY: struct seccomp_metadata { u64 filter_off; u64 flags; }.
            if unsafe { libc::ptrace(PTRACE_SECCOMP_GET_METADATA, tid, std::mem::size_of_val(&meta), meta.as_mut_ptr()) } < 0 {
                return Err(fail("PTRACE_SECCOMP_GET_METADATA", std::io::Error::last_os_error()));
            }
            filters.push(SeccompFilter { flags: meta[1], insns });
        }
        // Index 0 is the newest.
        filters.reverse();
        Ok(filters)
    })();
    // SAFETY: detaching our tracee; no memory passed.
    unsafe { libc::ptrace(PTRACE_DETACH, tid, 0usize, 0usize) };
    out
}

fn cap_names(mask: u64) -> String {
    let v: Vec<String> = (0..64).filter(|b| mask & (1u64 << b) != 0).map(|b| b.to_string()).collect();
    v.join(",")
}

/// Refuses, before any process is started, a restart the caller is not
/// allowed to make: a caller that is not root (uid 0 with
/// `CAP_SETUID`/`CAP_SETGID`) may restart only processes that ran with its
/// own uid, gids among its own, and no capability it lacks. Images made
/// before credentials were recorded can be restarted by root only (they
/// come back with root's credentials, as before).
pub fn check_may_restore(generation: u64, images: &[ProcessImage]) -> Result<()> {
    let me = thread_status(std::process::id() as i32, std::process::id() as i32)?.creds;
    let root = me.uid[1] == 0 && me.cap_effective & (1 << CAP_SETUID) != 0 && me.cap_effective & (1 << CAP_SETGID) != 0;
    let refuse = |what: String| EngineError::Restore { generation, what };
    for image in images {
        let Some(creds) = &image.creds else {
            if !root {
                return Err(refuse(format!("process {} was checkpointed before ckpt recorded credentials, so whose it is is unknown; only root may restart it", image.pid)));
            }
            tracing::warn!(pid = image.pid, "generation {generation} records no credentials for process {}: it comes back with the restarting user's", image.pid);
            continue;
        };
        for t in &image.threads {
            if creds.thread(t.tid).is_none() {
                return Err(EngineError::BadImage { generation, what: format!("thread {} of process {} has no recorded credentials", t.tid, image.pid) });
            }
        }
        if root {
            continue;
        }
        // Groups that a user namespace did not map show as the overflow
        // gid: they were this user's, whatever they are.
        let overflow = crate::ns::overflow_gid();
        let my_gids: Vec<u32> = me.gid.iter().chain(&me.groups).copied().chain(image.namespaces.filter(|n| n.user).map(|_| overflow)).collect();
        for t in &creds.threads {
            if let Some(u) = t.uid.iter().find(|&&u| u != me.uid[0]) {
                return Err(refuse(format!("process {} (thread {}) ran as uid {u}, and only root may restart another user's processes (you are uid {})", image.pid, t.tid, me.uid[0])));
            }
            if let Some(g) = t.gid.iter().chain(&t.groups).find(|g| !my_gids.contains(g)) {
                return Err(refuse(format!("process {} (thread {}) ran with gid {g}, which is not one of yours", image.pid, t.tid)));
            }
            let extra = (t.cap_permitted | t.cap_inheritable | t.cap_ambient) & !me.cap_permitted;
            if extra != 0 {
                return Err(refuse(format!("process {} (thread {}) held capabilities {} that you lack", image.pid, t.tid, cap_names(extra))));
            }
        }
    }
    Ok(())
}

/// What the restorer of a process holds (from its `/proc` status), which
/// bounds what it can give.
#[derive(Clone, Copy, Debug)]
pub struct Held {
    pub permitted: u64,
    pub bounding: u64,
}

impl Held {
    pub fn of(pid: i32) -> Result<Held> {
        let s = thread_status(pid, pid)?.creds;
        Ok(Held { permitted: s.cap_permitted, bounding: s.cap_bounding })
    }
}

/// Appends to `p` the syscalls that give the calling thread credentials
/// `t`, in the order of the module doc; `seccomp` false leaves the filters
/// out (for [`plan_filters`] to add later). The restorer runs as root with
/// capabilities `held`; anything `t` has beyond them cannot be given, and
/// the restart fails here naming the process and thread.
pub fn plan_thread(p: &mut PlanBuilder, pid: i32, t: &ThreadCreds, held: Held, generation: u64) -> Result<()> {
    let who = format!("thread {} of process {pid}", t.tid);
    let lack = |set: &str, m: u64| EngineError::Restore { generation, what: format!("{who} had {set} capabilities {} that this restart does not hold (restart as root, with the same capabilities)", cap_names(m)) };
    if t.cap_permitted & !held.permitted != 0 {
        return Err(lack("permitted", t.cap_permitted & !held.permitted));
    }
    if t.cap_inheritable & !(held.permitted | held.bounding) != 0 {
        return Err(lack("inheritable", t.cap_inheritable & !(held.permitted | held.bounding)));
    }
    if t.cap_bounding & !held.bounding != 0 {
        return Err(lack("bounding-set", t.cap_bounding & !held.bounding));
    }
    let v = |x: u64| Arg::Val(x);
    if crate::ns::setgroups_denied() {
        // In a user namespace of ckpt's own the groups are the user's and
        // stay so: they must be what the thread had.
        if !groups_are_own(&t.groups) {
            return Err(EngineError::Restore {
                generation,
                what: format!(
                    "{who} had the supplementary groups {:?}; in the restart's user namespace groups cannot be changed, and yours are {:?} (restart as the same user with the same groups, or as root)",
                    t.groups,
                    own_groups().unwrap_or_default()
                ),
            });
        }
    } else {
        let groups: Vec<u8> = t.groups.iter().flat_map(|g| g.to_ne_bytes()).collect();
        let gref = p.data(&groups);
        p.syscall(libc::SYS_setgroups, &[v(t.groups.len() as u64), gref.into()], Some(0), false, format!("set the groups of {who} to {:?}", t.groups));
    }
    let [rg, eg, sg, fg] = t.gid.map(u64::from);
    p.syscall(libc::SYS_setresgid, &[v(rg), v(eg), v(sg)], Some(0), false, format!("set the gids of {who} to {rg}/{eg}/{sg}"));
    p.syscall(libc::SYS_prctl, &[v(libc::PR_SET_KEEPCAPS as u64), v(1)], Some(0), false, format!("keep the capabilities of {who} across its uid change"));
    let [ru, eu, su, fu] = t.uid.map(u64::from);
    p.syscall(libc::SYS_setresuid, &[v(ru), v(eu), v(su)], Some(0), false, format!("set the uids of {who} to {ru}/{eu}/{su}"));
    // setfs*id returns the previous id, never an error: checked by asking
    // again (-1 changes nothing and returns the current id).
    p.syscall(libc::SYS_setfsgid, &[v(fg)], None, false, format!("set the fsgid of {who} to {fg}"));
    p.syscall(libc::SYS_setfsgid, &[v(u32::MAX as u64)], Some(fg), false, format!("check the fsgid of {who} is {fg}"));
    p.syscall(libc::SYS_setfsuid, &[v(fu)], None, false, format!("set the fsuid of {who} to {fu}"));
    p.syscall(libc::SYS_setfsuid, &[v(u32::MAX as u64)], Some(fu), false, format!("check the fsuid of {who} is {fu}"));
    capset(p, held.permitted, held.permitted, t.cap_inheritable, format!("keep every capability of {who} effective until its credentials are set"));
    for cap in (0..64).filter(|c| held.bounding & (1u64 << c) != 0 && t.cap_bounding & (1u64 << c) == 0) {
        p.syscall(libc::SYS_prctl, &[v(libc::PR_CAPBSET_DROP as u64), v(cap)], Some(0), false, format!("drop capability {cap} from the bounding set of {who}"));
    }
    p.syscall(libc::SYS_prctl, &[v(libc::PR_CAP_AMBIENT as u64), v(libc::PR_CAP_AMBIENT_CLEAR_ALL as u64), v(0), v(0), v(0)], Some(0), false, format!("clear the ambient set of {who}"));
    for cap in (0..64).filter(|c| t.cap_ambient & (1u64 << c) != 0) {
        p.syscall(libc::SYS_prctl, &[v(libc::PR_CAP_AMBIENT as u64), v(libc::PR_CAP_AMBIENT_RAISE as u64), v(cap), v(0), v(0)], Some(0), false, format!("raise ambient capability {cap} of {who}"));
    }
    p.syscall(libc::SYS_prctl, &[v(libc::PR_SET_SECUREBITS as u64), v(t.securebits as u64)], Some(0), false, format!("set the securebits of {who} to {:#x}", t.securebits));
    capset(p, t.cap_effective, t.cap_permitted, t.cap_inheritable, format!("set the capabilities of {who} (effective {:#x}, permitted {:#x}, inheritable {:#x})", t.cap_effective, t.cap_permitted, t.cap_inheritable));
    if t.no_new_privs {
        p.syscall(libc::SYS_prctl, &[v(libc::PR_SET_NO_NEW_PRIVS as u64), v(1), v(0), v(0), v(0)], Some(0), false, format!("set no_new_privs of {who}"));
    }
    Ok(())
}

/// Appends the seccomp filters of `t`, oldest first.
pub fn plan_filters(p: &mut PlanBuilder, pid: i32, t: &ThreadCreds) {
    for (k, f) in t.seccomp.iter().enumerate() {
        let insns: Vec<u8> = f.insns.iter().flat_map(|i| i.to_le_bytes()).collect();
        let iref = p.data(&insns);
        // struct sock_fprog { unsigned short len; struct sock_filter *filter; }
        let mut prog = [0u8; 16];
        prog[..2].copy_from_slice(&(f.insns.len() as u16).to_ne_bytes());
        let pref = p.data(&prog);
        p.pointer_in_data(pref, 8, iref);
        p.syscall(libc::SYS_seccomp, &[Arg::Val(libc::SECCOMP_SET_MODE_FILTER as u64), Arg::Val(f.flags), pref.into()], None, false, format!("install seccomp filter {k} ({} instructions) of thread {} of process {pid}", f.insns.len(), t.tid));
    }
}

fn capset(p: &mut PlanBuilder, eff: u64, prm: u64, inh: u64, what: String) {
    let hdr = p.data(&[LINUX_CAPABILITY_VERSION_3.to_ne_bytes(), 0i32.to_ne_bytes()].concat());
    let lo = |x: u64| (x as u32).to_ne_bytes();
    let hi = |x: u64| ((x >> 32) as u32).to_ne_bytes();
    let data = p.data(&[lo(eff), lo(prm), lo(inh), hi(eff), hi(prm), hi(inh)].concat());
    p.syscall(libc::SYS_capset, &[hdr.into(), data.into()], Some(0), false, what);
}

/// The identity the driver's thread wears to open something for a process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub fsuid: u32,
    pub fsgid: u32,
    pub groups: Vec<u32>,
    pub cap_effective: u64,
}

impl Identity {
    /// The identity of the main thread of `image` (None: not recorded).
    pub fn of(image: &ProcessImage) -> Option<Identity> {
        let t = image.creds.as_ref()?.thread(image.pid)?;
        Some(Identity { fsuid: t.uid[3], fsgid: t.gid[3], groups: t.groups.clone(), cap_effective: t.cap_effective })
    }
}

thread_local! {
    static ACTING: std::cell::RefCell<Option<Identity>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` with `id` as the identity [`as_process`] wears on this thread.
pub fn acting_as<R>(id: Option<Identity>, f: impl FnOnce() -> R) -> R {
    let old = ACTING.with(|a| a.replace(id));
    struct Back(Option<Identity>);
    impl Drop for Back {
        fn drop(&mut self) {
            let old = self.0.take();
            ACTING.with(|a| *a.borrow_mut() = old);
        }
    }
    let _back = Back(old);
    f()
}

/// The fsuid that [`as_process`] wears on this thread (None: its own).
pub fn acting_uid() -> Option<u32> {
    ACTING.with(|a| a.borrow().as_ref().map(|i| i.fsuid))
}

/// The calling thread's capability sets (effective, permitted, inheritable).
fn capget() -> std::io::Result<[u64; 3]> {
    let mut hdr = [LINUX_CAPABILITY_VERSION_3, 0u32];
    let mut d = [0u32; 6];
    // SAFETY: capget fills two struct __user_cap_data_struct (6 u32).
    if unsafe { libc::syscall(libc::SYS_capget, hdr.as_mut_ptr(), d.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let w = |lo: u32, hi: u32| lo as u64 | (hi as u64) << 32;
    Ok([w(d[0], d[3]), w(d[1], d[4]), w(d[2], d[5])])
}

fn capset_self(c: [u64; 3]) -> std::io::Result<()> {
    let hdr = [LINUX_CAPABILITY_VERSION_3, 0u32];
    let lo = |x: u64| x as u32;
    let hi = |x: u64| (x >> 32) as u32;
    let d = [lo(c[0]), lo(c[1]), lo(c[2]), hi(c[0]), hi(c[1]), hi(c[2])];
    // SAFETY: capset reads the header and two data structs.
    if unsafe { libc::syscall(libc::SYS_capset, hdr.as_ptr(), d.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn own_groups() -> std::io::Result<Vec<u32>> {
    // SAFETY: getgroups(0, NULL) returns the count.
    let n = unsafe { libc::syscall(libc::SYS_getgroups, 0, std::ptr::null_mut::<u32>()) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut g = vec![0u32; n as usize];
    // SAFETY: the buffer holds n gids.
    let m = unsafe { libc::syscall(libc::SYS_getgroups, n, g.as_mut_ptr()) };
    if m != n {
        return Err(std::io::Error::last_os_error());
    }
    Ok(g)
}

/// The gids of `groups` as this user namespace shows them: those it maps
/// as they are, the others as the overflow gid.
fn as_seen_here(groups: &[u32]) -> Vec<u32> {
    let map: Vec<(u32, u32)> = std::fs::read_to_string("/proc/self/gid_map")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace().map(|x| x.parse::<u32>().ok());
            Some((w.next()??, w.nth(1)??))
        })
        .collect();
    let overflow = crate::ns::overflow_gid();
    let mut v: Vec<u32> = groups.iter().map(|&g| if map.iter().any(|&(first, n)| g >= first && g - first < n) { g } else { overflow }).collect();
    v.sort_unstable();
    v
}

/// Whether `groups` are (as this namespace shows them) the calling
/// thread's own.
fn groups_are_own(groups: &[u32]) -> bool {
    let mut own = own_groups().unwrap_or_default();
    own.sort_unstable();
    as_seen_here(groups) == own
}

fn set_groups(g: &[u32]) -> std::io::Result<()> {
    if crate::ns::setgroups_denied() {
        // Kept, never set, in ckpt's user namespace (see plan_thread).
        return if groups_are_own(g) {
            Ok(())
        } else {
            Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, format!("the groups {g:?} are not this user's, and a user namespace cannot change them")))
        };
    }
    // SAFETY: the raw syscall (per thread, unlike glibc's) reads `g`.
    if unsafe { libc::syscall(libc::SYS_setgroups, g.len(), g.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// setfsuid/setfsgid report nothing: the id is checked by asking again.
fn set_fs(nr: libc::c_long, id: u32) -> std::io::Result<()> {
    // SAFETY: raw per-thread setfsuid/setfsgid; no memory passed.
    unsafe { libc::syscall(nr, id) };
    // SAFETY: as above; -1 changes nothing and returns the current id.
    let now = unsafe { libc::syscall(nr, u32::MAX) } as u32;
    if now != id {
        return Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, format!("cannot take fs id {id} (still {now})")));
    }
    Ok(())
}

/// What the thread wore before.
struct Worn {
    fsuid: u32,
    fsgid: u32,
    groups: Vec<u32>,
    caps: [u64; 3],
}

impl Drop for Worn {
    fn drop(&mut self) {
        // Effective capabilities first (permitted never changed), then the
        // ids that need them.
        let r = capset_self(self.caps)
            .and_then(|()| set_fs(libc::SYS_setfsuid, self.fsuid))
            .and_then(|()| set_fs(libc::SYS_setfsgid, self.fsgid))
            .and_then(|()| set_groups(&self.groups));
        if let Err(e) = r {
            // The driver cannot go on with another identity than its own.
            eprintln!("ckpt: cannot take back the restart driver's own credentials: {e}");
            std::process::abort();
        }
    }
}

fn wear(id: &Identity) -> std::io::Result<Option<Worn>> {
    let caps = capget()?;
    // SAFETY: -1 changes nothing and returns the current id.
    let (fsuid, fsgid) = unsafe { (libc::syscall(libc::SYS_setfsuid, u32::MAX) as u32, libc::syscall(libc::SYS_setfsgid, u32::MAX) as u32) };
    let groups = own_groups()?;
    let eff = id.cap_effective & caps[1];
    if (fsuid, fsgid, &groups, caps[0]) == (id.fsuid, id.fsgid, &id.groups, eff) {
        return Ok(None);
    }
    let worn = Worn { fsuid, fsgid, groups, caps };
    set_groups(&id.groups)?;
    set_fs(libc::SYS_setfsgid, id.fsgid)?;
    set_fs(libc::SYS_setfsuid, id.fsuid)?;
    capset_self([eff, caps[1], caps[2]])?;
    Ok(Some(worn))
}

/// Runs `f` (a few syscalls on paths) wearing the identity set by
/// [`acting_as`] on this thread, if any.
pub fn as_process<R>(f: impl FnOnce() -> std::io::Result<R>) -> std::io::Result<R> {
    let id = ACTING.with(|a| a.borrow().clone());
    let _worn = match &id {
        Some(id) => wear(id)?,
        None => None,
    };
    f()
}

/// Opens `path` as the process ([`as_process`]) without following any
/// symlink (`openat2` with `RESOLVE_NO_SYMLINKS`): the paths of an image
/// are the kernel's resolved names, so a symlink on the way is one the
/// process did not follow.
pub fn open(path: &str, flags: i32, mode: u32) -> std::io::Result<OwnedFd> {
    let c = CString::new(path.as_bytes()).map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "a NUL in the path"))?;
    as_process(|| {
        // SAFETY: open_how is plain data; zeroed is valid.
        let mut how: libc::open_how = unsafe { std::mem::zeroed() };
        how.flags = (flags | libc::O_CLOEXEC | libc::O_NOFOLLOW) as u64;
        how.mode = if flags & (libc::O_CREAT | libc::O_TMPFILE) != 0 { mode as u64 } else { 0 };
        how.resolve = libc::RESOLVE_NO_SYMLINKS;
        // SAFETY: openat2 reads the path and `how`; the fd is owned below.
        let fd = unsafe { libc::syscall(libc::SYS_openat2, libc::AT_FDCWD, c.as_ptr(), &how as *const libc::open_how, std::mem::size_of::<libc::open_how>()) };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ELOOP) {
                return Err(std::io::Error::new(e.kind(), format!("{e}: a symlink is on the way, which the process did not follow when it opened {path}")));
            }
            return Err(e);
        }
        // SAFETY: a new fd we own.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_status() {
        let text = "Name:\tx\nUid:\t1\t2\t3\t4\nGid:\t5\t6\t7\t8\nGroups:\t10 20 \nCapInh:\t0000000000000001\nCapPrm:\t0000000000000400\nCapEff:\t0000000000000000\nCapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000000\nNoNewPrivs:\t1\nSeccomp:\t2\nSeccomp_filters:\t1\n";
        let s = parse_status(9, text).unwrap();
        assert_eq!(s.creds.uid, [1, 2, 3, 4]);
        assert_eq!(s.creds.gid, [5, 6, 7, 8]);
        assert_eq!(s.creds.groups, vec![10, 20]);
        assert_eq!((s.creds.cap_inheritable, s.creds.cap_permitted, s.creds.cap_bounding), (1, 0x400, 0x1ff_ffff_ffff));
        assert!(s.creds.no_new_privs);
        assert_eq!((s.seccomp_mode, s.seccomp_filters), (2, 1));
        assert!(parse_status(9, "Uid:\t1\t2\n").is_none());
    }

    #[test]
    fn own_status_parses() {
        let me = std::process::id() as i32;
        let s = thread_status(me, me).unwrap();
        assert_eq!(s.creds.uid[0], unsafe { libc::getuid() });
    }
}
