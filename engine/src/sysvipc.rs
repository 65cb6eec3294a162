//! SysV semaphore sets (`semget`) and message queues (`msgget`) across a
//! restart.
//!
//! Neither is attached to a process the way a shared memory segment is:
//! a program names them by id. The objects of a computation are those a
//! process of it used last, as the kernel records it: a semaphore set one
//! of whose semaphores a process of the computation changed last
//! (`semctl(GETPID)`, the `sempid` of `semop`, `SETVAL`, `SETALL`), a
//! message queue a process of it sent to or received from last
//! (`lspid`/`lrpid` of `/proc/sysvipc/msg`). An object the computation
//! made but never used, or that another program used after it, is not
//! recorded (README, "Not yet").
//!
//! Capture (while the computation is stopped): a set's values
//! (`GETALL`), key, id, mode and owner; a queue's key, id, mode, owner,
//! `msg_qbytes` and every message in order with its type, read without
//! being removed (`msgrcv(MSG_COPY)`, which needs
//! `CONFIG_CHECKPOINT_RESTORE`).
//!
//! Restart (before any process exists): each object is made again with
//! its key and id (`/proc/sys/kernel/sem_next_id`, `msg_next_id`), mode and
//! owner, a set's values written with `SETALL`. An object with the same
//! id and key is what the killed computation left: it is removed and made
//! again from the image. Anything else in the way (the id or the key
//! taken by another object) is refused with the `ipcrm` that removes it.
//! Then each restored process, in its restorer plan, touches the
//! semaphores it had changed last (a net-zero `semop`, so that `GETPID`
//! names it again and the next checkpoint recognizes the set), and the
//! process that sent last to a queue sends its messages into it, in order.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};
use crate::image::ProcessImage;
use crate::plan::PlanBuilder;

const SEM_NEXT_ID: &str = "/proc/sys/kernel/sem_next_id";
const MSG_NEXT_ID: &str = "/proc/sys/kernel/msg_next_id";
/// Most semaphores in a set (the kernel's `SEMMSL` ceiling).
const MAX_SEMS: usize = 32000;
/// Largest message queue recorded, in bytes of messages (`msg_qbytes` is
/// 16 KiB by default; root may raise it).
const MAX_QUEUE_BYTES: u64 = 64 << 20;
/// Most messages one queue may hold in an image.
const MAX_MESSAGES: usize = 1 << 20;

/// A semaphore set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SysvSem {
    pub semid: i32,
    pub key: i32,
    /// Permission bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Each semaphore's value.
    pub values: Vec<u16>,
    /// The semaphores this process changed last (`GETPID`).
    #[serde(default)]
    pub last: Vec<u16>,
    /// This process's `SEM_UNDO` adjustments on the set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub undo: Vec<SemAdj>,
}

/// An undo adjustment: what the kernel adds to semaphore `sem` when the
/// process exits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SemAdj {
    pub sem: u16,
    pub adj: i32,
}

/// A set's `sem_ctime`, or None if it is gone.
fn sem_ctime(semid: i32) -> Option<i64> {
    // SAFETY: a zeroed semid_ds filled by IPC_STAT.
    unsafe {
        let mut ds: libc::semid_ds = std::mem::zeroed();
        (libc::semctl(semid, 0, libc::IPC_STAT, &mut ds as *mut libc::semid_ds) == 0).then_some(ds.sem_ctime)
    }
}

/// The undo adjustments the agent of `pid` recorded
/// (`ckpt_wire::agent::SemUndoTable`, read from the stopped process):
/// (set, semaphore) to adjustment, without those a later `SETVAL`/`SETALL`
/// cleared (the set's `sem_ctime` moved past the adjustment's) or whose
/// set is gone.
fn undo_table(pid: i32, restart_word_addr: u64) -> Result<BTreeMap<(i32, u16), i32>> {
    use ckpt_wire::Pod;
    let mut t = ckpt_wire::agent::SemUndoTable::default();
    // SAFETY: SemUndoTable is Pod: any bytes are a value.
    let buf = unsafe { std::slice::from_raw_parts_mut(&mut t as *mut _ as *mut u8, std::mem::size_of_val(&t)) };
    let addr = restart_word_addr + ckpt_wire::agent::SEM_UNDO_OFFSET;
    let n = crate::remote::read(pid, addr, buf).map_err(|e| EngineError::Unsupported { pid, what: format!("cannot read its SysV semaphore undo table at {addr:#x}: {e}") })?;
    if n != t.as_bytes().len() {
        return Err(EngineError::Unsupported { pid, what: format!("its SysV semaphore undo table at {addr:#x} is short ({n} bytes)") });
    }
    if t.overflow != 0 {
        return Err(EngineError::Unsupported { pid, what: format!("it holds SysV semaphore undo adjustments on more than {} semaphores, more than ckpt records", ckpt_wire::agent::SEM_UNDO_MAX) });
    }
    let mut out: BTreeMap<(i32, u16), i32> = BTreeMap::new();
    for s in t.slots.iter().filter(|s| s.used != 0 && s.adj != 0) {
        let Ok(sem) = u16::try_from(s.semnum) else { continue };
        match sem_ctime(s.semid) {
            Some(c) if c <= s.ctime => *out.entry((s.semid, sem)).or_default() += s.adj,
            _ => tracing::debug!(pid, semid = s.semid, sem, "undo adjustment cleared since (SETVAL/SETALL) or set gone"),
        }
    }
    out.retain(|_, a| *a != 0);
    Ok(out)
}

/// A message queue and its messages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SysvMsq {
    pub msqid: i32,
    pub key: i32,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// `msg_qbytes`: the most bytes of messages it may hold.
    pub qbytes: u64,
    /// This process sent to it last (`lspid`): it sends the messages back
    /// at restart.
    pub sender: bool,
    pub messages: Vec<SysvMessage>,
}

/// One message: its type and its bytes (hexadecimal).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SysvMessage {
    pub mtype: i64,
    pub hex: String,
}

impl SysvMessage {
    fn bytes(&self) -> Option<Vec<u8>> {
        let h = self.hex.as_bytes();
        if !h.len().is_multiple_of(2) {
            return None;
        }
        h.chunks(2).map(|c| u8::from_str_radix(std::str::from_utf8(c).ok()?, 16).ok()).collect()
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The rows of a `/proc/sysvipc/*` table (header skipped), as fields.
fn table(path: &str) -> std::io::Result<Vec<Vec<String>>> {
    Ok(std::fs::read_to_string(path)?.lines().skip(1).map(|l| l.split_whitespace().map(str::to_string).collect()).collect())
}

/// `/proc/sysvipc/sem` and `/proc/sysvipc/msg`, read once for a round's
/// processes: the tables are the IPC namespace's, not a process's, and
/// every process of the round is stopped while they are read (two reads
/// per process were ~8% of the stopped phase of 16 small processes,
/// bench-trees).
#[derive(Default)]
pub struct Tables {
    read: std::sync::OnceLock<Option<[Vec<Vec<String>>; 2]>>,
}

impl Tables {
    /// The two tables, read by the first caller; a failed read is made
    /// again for its error.
    fn get(&self, pid: i32) -> Result<&[Vec<Vec<String>>; 2]> {
        let read = |path: &str| table(path).map_err(|e| EngineError::Proc { pid, path: path.into(), source: e });
        let both = || Ok::<_, EngineError>([read("/proc/sysvipc/sem")?, read("/proc/sysvipc/msg")?]);
        match self.read.get_or_init(|| both().ok()) {
            Some(t) => Ok(t),
            None => Err(both().err().unwrap_or_else(|| EngineError::Proc { pid, path: "/proc/sysvipc".into(), source: std::io::Error::other("read failed, then read again") })),
        }
    }
}

/// The semaphore sets and message queues of the IPC namespace that `pid`
/// used last or holds `SEM_UNDO` adjustments on, with their contents and
/// its adjustments (`tables`: the round's read of the namespace's).
pub fn capture(pid: i32, restart_word_addr: u64, tables: &Tables) -> Result<(Vec<SysvSem>, Vec<SysvMsq>)> {
    let undo = if restart_word_addr != 0 { undo_table(pid, restart_word_addr)? } else { BTreeMap::new() };
    let [sem_table, msg_table] = tables.get(pid)?;
    let mut sems = Vec::new();
    for f in sem_table {
        // key semid perms nsems uid gid cuid cgid otime ctime
        let parsed = (|| Some((f.first()?.parse::<i32>().ok()?, f.get(1)?.parse::<i32>().ok()?, u32::from_str_radix(f.get(2)?, 8).ok()?, f.get(3)?.parse::<usize>().ok()?, f.get(4)?.parse().ok()?, f.get(5)?.parse().ok()?)))();
        let Some((key, semid, mode, nsems, uid, gid)) = parsed else { continue };
        if nsems == 0 || nsems > MAX_SEMS {
            continue;
        }
        // SAFETY: GETPID takes no buffer.
        let last: Vec<u16> = (0..nsems).filter(|&i| unsafe { libc::semctl(semid, i as i32, libc::GETPID) } == pid).map(|i| i as u16).collect();
        let adj: Vec<SemAdj> = undo.range((semid, 0)..=(semid, u16::MAX)).filter(|(k, _)| (k.1 as usize) < nsems).map(|(k, &adj)| SemAdj { sem: k.1, adj }).collect();
        if last.is_empty() && adj.is_empty() {
            continue;
        }
        let mut values = vec![0u16; nsems];
        // SAFETY: GETALL writes nsems shorts into values, which has nsems.
        if unsafe { libc::semctl(semid, 0, libc::GETALL, values.as_mut_ptr()) } != 0 {
            return Err(EngineError::Unsupported { pid, what: format!("cannot read the values of its SysV semaphore set {semid} (GETALL): {}", std::io::Error::last_os_error()) });
        }
        sems.push(SysvSem { semid, key, mode: mode & 0o777, uid, gid, values, last, undo: adj });
    }
    let mut msqs = Vec::new();
    for f in msg_table {
        // key msqid perms cbytes qnum lspid lrpid uid gid ...
        let parsed = (|| {
            Some((
                f.first()?.parse::<i32>().ok()?,
                f.get(1)?.parse::<i32>().ok()?,
                u32::from_str_radix(f.get(2)?, 8).ok()?,
                f.get(5)?.parse::<i32>().ok()?,
                f.get(6)?.parse::<i32>().ok()?,
                f.get(7)?.parse().ok()?,
                f.get(8)?.parse().ok()?,
            ))
        })();
        let Some((key, msqid, mode, lspid, lrpid, uid, gid)) = parsed else { continue };
        if lspid != pid && lrpid != pid {
            continue;
        }
        let (qbytes, messages) = read_queue(pid, msqid)?;
        msqs.push(SysvMsq { msqid, key, mode: mode & 0o777, uid, gid, qbytes, sender: lspid == pid, messages });
    }
    Ok((sems, msqs))
}

/// A queue's `msg_qbytes` and its messages, copied in order
/// (`MSG_COPY`: the n-th message, left in the queue).
fn read_queue(pid: i32, msqid: i32) -> Result<(u64, Vec<SysvMessage>)> {
    let fail = |what: String| EngineError::Unsupported { pid, what: format!("its SysV message queue {msqid}: {what}") };
    // SAFETY: a zeroed msqid_ds filled by IPC_STAT.
    let mut ds: libc::msqid_ds = unsafe { std::mem::zeroed() };
    // SAFETY: IPC_STAT writes one msqid_ds.
    if unsafe { libc::msgctl(msqid, libc::IPC_STAT, &mut ds) } != 0 {
        return Err(fail(format!("IPC_STAT: {}", std::io::Error::last_os_error())));
    }
    let (qnum, cbytes) = (ds.msg_qnum as usize, ds.__msg_cbytes as u64);
    if cbytes > MAX_QUEUE_BYTES || qnum > MAX_MESSAGES {
        return Err(fail(format!("it holds {qnum} messages of {cbytes} bytes, more than ckpt records ({MAX_QUEUE_BYTES} bytes, {MAX_MESSAGES} messages)")));
    }
    // Every message fits in the bytes the queue holds.
    let mut buf = vec![0u8; 8 + cbytes as usize];
    let mut out = Vec::with_capacity(qnum);
    for n in 0..qnum {
        let flags = libc::IPC_NOWAIT | libc::MSG_COPY;
        // SAFETY: buf holds a long and cbytes bytes of text.
        let got = unsafe { libc::msgrcv(msqid, buf.as_mut_ptr().cast(), cbytes as usize, n as i64, flags) };
        if got < 0 {
            let e = std::io::Error::last_os_error();
            let hint = if e.raw_os_error() == Some(libc::ENOSYS) { " (the kernel lacks CONFIG_CHECKPOINT_RESTORE)" } else { "" };
            return Err(fail(format!("cannot copy message {n} of {qnum} (msgrcv MSG_COPY): {e}{hint}")));
        }
        let mtype = i64::from_ne_bytes(buf[..8].try_into().unwrap());
        out.push(SysvMessage { mtype, hex: hex(&buf[8..8 + got as usize]) });
    }
    Ok((ds.msg_qbytes as u64, out))
}

/// The objects a restart made. Until [`Objects::keep`], dropping them
/// removes them (a failed restart leaves none behind).
pub struct Objects {
    sems: Vec<i32>,
    msqs: Vec<i32>,
    armed: bool,
}

impl Drop for Objects {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        for &id in &self.sems {
            // SAFETY: IPC_RMID takes no buffer.
            unsafe { libc::semctl(id, 0, libc::IPC_RMID) };
        }
        for &id in &self.msqs {
            // SAFETY: IPC_RMID takes no buffer.
            unsafe { libc::msgctl(id, libc::IPC_RMID, std::ptr::null_mut()) };
        }
    }
}

/// Which kind of object, for messages and `ipcrm`.
#[derive(Clone, Copy)]
enum Kind {
    Sem,
    Msg,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Sem => "semaphore set",
            Kind::Msg => "message queue",
        }
    }
    fn ipcrm(self) -> &'static str {
        match self {
            Kind::Sem => "-s",
            Kind::Msg => "-q",
        }
    }
    fn table(self) -> &'static str {
        match self {
            Kind::Sem => "/proc/sysvipc/sem",
            Kind::Msg => "/proc/sysvipc/msg",
        }
    }
    fn next_id(self) -> &'static str {
        match self {
            Kind::Sem => SEM_NEXT_ID,
            Kind::Msg => MSG_NEXT_ID,
        }
    }
    fn rmid(self, id: i32) -> bool {
        // SAFETY: IPC_RMID takes no buffer.
        unsafe {
            match self {
                Kind::Sem => libc::semctl(id, 0, libc::IPC_RMID) == 0,
                Kind::Msg => libc::msgctl(id, libc::IPC_RMID, std::ptr::null_mut()) == 0,
            }
        }
    }
}

impl Objects {
    /// Makes every semaphore set and message queue of `images` again.
    pub fn make(generation: u64, images: &[ProcessImage]) -> Result<Objects> {
        let mut sems: BTreeMap<i32, &SysvSem> = BTreeMap::new();
        let mut msqs: BTreeMap<i32, &SysvMsq> = BTreeMap::new();
        for i in images {
            let n: usize = i.sysv_sem.iter().map(|s| s.undo.len()).sum();
            if n > ckpt_wire::agent::SEM_UNDO_MAX {
                return Err(bad(generation, format!("process {} holds {n} SysV semaphore undo adjustments (at most {})", i.pid, ckpt_wire::agent::SEM_UNDO_MAX)));
            }
            for s in &i.sysv_sem {
                check_sem(generation, s)?;
                sems.entry(s.semid).or_insert(s);
            }
            for q in &i.sysv_msq {
                check_msq(generation, q)?;
                msqs.entry(q.msqid).or_insert(q);
            }
        }
        let mut out = Objects { sems: Vec::new(), msqs: Vec::new(), armed: true };
        for s in sems.values() {
            make_one(generation, Kind::Sem, s.semid, s.key, s.mode, s.uid, s.gid, |flags| {
                // SAFETY: semget takes no pointers.
                unsafe { libc::semget(s.key, s.values.len() as i32, flags) }
            })?;
            out.sems.push(s.semid);
            let mut v = s.values.clone();
            // SAFETY: SETALL reads nsems shorts from v, which has nsems.
            if unsafe { libc::semctl(s.semid, 0, libc::SETALL, v.as_mut_ptr()) } != 0 {
                return Err(EngineError::Restore { generation, what: format!("SysV semaphore set {}: cannot set its values (SETALL): {}", s.semid, std::io::Error::last_os_error()) });
            }
        }
        for q in msqs.values() {
            make_one(generation, Kind::Msg, q.msqid, q.key, q.mode, q.uid, q.gid, |flags| {
                // SAFETY: msgget takes no pointers.
                unsafe { libc::msgget(q.key, flags) }
            })?;
            out.msqs.push(q.msqid);
            set_qbytes(generation, q)?;
            // A queue nobody in the image sent to last: the driver sends.
            if !images.iter().any(|i| i.sysv_msq.iter().any(|x| x.msqid == q.msqid && x.sender)) {
                for m in &q.messages {
                    send(generation, q.msqid, m)?;
                }
            }
        }
        Ok(out)
    }

    /// The restart went through: the objects stay.
    pub fn keep(mut self) {
        self.armed = false;
    }
}

fn bad(generation: u64, what: String) -> EngineError {
    EngineError::BadImage { generation, what }
}

fn check_sem(generation: u64, s: &SysvSem) -> Result<()> {
    if s.values.is_empty() || s.values.len() > MAX_SEMS || s.values.iter().any(|&v| v > i16::MAX as u16) || s.last.iter().any(|&i| i as usize >= s.values.len()) || s.undo.iter().any(|u| u.sem as usize >= s.values.len()) {
        return Err(bad(generation, format!("SysV semaphore set {} has {} semaphores (values up to 32767, at most {MAX_SEMS})", s.semid, s.values.len())));
    }
    for u in &s.undo {
        // The adjustment is made again by raising the value by |adj| for
        // a moment: it must fit under SEMVMX.
        if u.adj == 0 || u.adj.unsigned_abs() + s.values[u.sem as usize] as u32 > i16::MAX as u32 {
            return Err(EngineError::Restore { generation, what: format!("SysV semaphore set {} semaphore {}: its undo adjustment {} cannot be made again (value {} plus {} would exceed SEMVMX 32767)", s.semid, u.sem, u.adj, s.values[u.sem as usize], u.adj.unsigned_abs()) });
        }
    }
    Ok(())
}

fn check_msq(generation: u64, q: &SysvMsq) -> Result<()> {
    let mut total = 0u64;
    for m in &q.messages {
        let Some(b) = m.bytes() else { return Err(bad(generation, format!("a message of SysV queue {} is not hexadecimal", q.msqid))) };
        if m.mtype < 1 {
            return Err(bad(generation, format!("a message of SysV queue {} has type {} (types are positive)", q.msqid, m.mtype)));
        }
        total += b.len() as u64;
    }
    if q.messages.len() > MAX_MESSAGES || total > MAX_QUEUE_BYTES || q.qbytes > MAX_QUEUE_BYTES {
        return Err(bad(generation, format!("SysV queue {} holds {} messages of {total} bytes (at most {MAX_MESSAGES}, {MAX_QUEUE_BYTES} bytes)", q.msqid, q.messages.len())));
    }
    Ok(())
}

/// Makes an object with its key and id: removes what the killed
/// computation left (same id, same key), refuses anything else in the way.
#[allow(clippy::too_many_arguments)]
fn make_one(generation: u64, kind: Kind, id: i32, key: i32, mode: u32, uid: u32, gid: u32, get: impl Fn(i32) -> i32) -> Result<()> {
    let name = kind.name();
    let err = |what: String| EngineError::Restore { generation, what: format!("the SysV {name} {id} (key {key:#x}) cannot be made again: {what}") };
    let in_way = |what: String, other: i32| err(format!("{what}. If it is yours and not needed, remove it with `ipcrm {} {other}` and restart again", kind.ipcrm()));
    // The id is asked for through the namespace's one `*_next_id` knob:
    // two restarts making objects at the same moment took each other's
    // (seen with two tests' restarts side by side). Held from the table's
    // read to the object's creation; released when `next_f` closes.
    let next = kind.next_id();
    let next_f = std::fs::OpenOptions::new().write(true).open(next).map_err(|e| err(format!("cannot ask for its id through {next}: {e} (needs root or CAP_CHECKPOINT_RESTORE, and a kernel with CONFIG_CHECKPOINT_RESTORE)")))?;
    lock_next_id(&next_f).map_err(|e| err(format!("{next} stays locked by another process (another restart making SysV objects?): {e}; restart again")))?;
    let rows = table(kind.table()).map_err(|e| err(format!("cannot read {}: {e}", kind.table())))?;
    let now: Vec<(i32, i32)> = rows.iter().filter_map(|f| Some((f.first()?.parse().ok()?, f.get(1)?.parse().ok()?))).collect();
    if let Some(&(okey, oid)) = now.iter().find(|o| o.1 == id) {
        if okey != key {
            return Err(in_way(format!("id {id} is taken by another {name} (key {okey:#x})"), oid));
        }
        // The killed computation's own object, left behind: replaced.
        tracing::info!(id, key, "replacing the SysV {name} the killed computation left");
        if !kind.rmid(id) {
            return Err(err(format!("cannot remove the one the killed computation left (IPC_RMID): {}", std::io::Error::last_os_error())));
        }
    } else if key != libc::IPC_PRIVATE
        && let Some(&(_, oid)) = now.iter().find(|o| o.0 == key)
    {
        return Err(in_way(format!("its key is taken by {name} {oid}"), oid));
    }
    use std::os::unix::fs::FileExt;
    next_f.write_all_at(id.to_string().as_bytes(), 0).map_err(|e| err(format!("cannot ask for its id through {next}: {e} (needs root or CAP_CHECKPOINT_RESTORE, and a kernel with CONFIG_CHECKPOINT_RESTORE)")))?;
    let got = get(libc::IPC_CREAT | libc::IPC_EXCL | (mode & 0o777) as i32);
    if got < 0 {
        let e = std::io::Error::last_os_error();
        let _ = next_f.write_all_at(b"-1", 0);
        return Err(err(format!("the kernel refused it: {e}")));
    }
    if got != id {
        kind.rmid(got);
        // (The leftover removed above is no holder.)
        let holder = now.iter().find(|o| o.1 != id && o.1 & 0x7fff == id & 0x7fff).map(|o| o.1);
        return Err(match holder {
            Some(h) => in_way(format!("its slot is taken by {name} {h}"), h),
            None => err(format!("the kernel gave it id {got} (another program may have made one at the same moment: restart again)")),
        });
    }
    let fail = |what: &str| {
        let e = std::io::Error::last_os_error();
        kind.rmid(id);
        err(format!("{what}: {e}"))
    };
    // SAFETY: zeroed ds structs filled by IPC_STAT, then passed to IPC_SET.
    let ok = unsafe {
        match kind {
            Kind::Sem => {
                let mut ds: libc::semid_ds = std::mem::zeroed();
                libc::semctl(id, 0, libc::IPC_STAT, &mut ds as *mut libc::semid_ds) == 0 && {
                    ds.sem_perm.uid = uid;
                    ds.sem_perm.gid = gid;
                    ds.sem_perm.mode = (mode & 0o777) as _;
                    libc::semctl(id, 0, libc::IPC_SET, &mut ds as *mut libc::semid_ds) == 0
                }
            }
            Kind::Msg => {
                let mut ds: libc::msqid_ds = std::mem::zeroed();
                libc::msgctl(id, libc::IPC_STAT, &mut ds) == 0 && {
                    ds.msg_perm.uid = uid;
                    ds.msg_perm.gid = gid;
                    ds.msg_perm.mode = (mode & 0o777) as _;
                    libc::msgctl(id, libc::IPC_SET, &mut ds) == 0
                }
            }
        }
    };
    if !ok {
        return Err(fail("setting its owner and mode (IPC_STAT, IPC_SET)"));
    }
    Ok(())
}

/// Takes the exclusive `flock` of a `*_next_id` file, waiting at most
/// 10 s: anyone who can read the file can lock it, so a lock held longer
/// is an error to retry, not a wait without end.
fn lock_next_id(f: &std::fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        // SAFETY: flock on an fd we own; no memory is passed.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) && e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
        if std::time::Instant::now() >= deadline {
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "held for 10 s"));
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

fn set_qbytes(generation: u64, q: &SysvMsq) -> Result<()> {
    // SAFETY: a zeroed msqid_ds filled by IPC_STAT, then passed to IPC_SET.
    let ok = unsafe {
        let mut ds: libc::msqid_ds = std::mem::zeroed();
        libc::msgctl(q.msqid, libc::IPC_STAT, &mut ds) == 0 && (ds.msg_qbytes as u64 == q.qbytes || {
            ds.msg_qbytes = q.qbytes as _;
            libc::msgctl(q.msqid, libc::IPC_SET, &mut ds) == 0
        })
    };
    if !ok {
        return Err(EngineError::Restore { generation, what: format!("SysV message queue {}: cannot set its size to {} bytes (IPC_SET): {}", q.msqid, q.qbytes, std::io::Error::last_os_error()) });
    }
    Ok(())
}

/// The message as `msgsnd` takes it: its type, then its bytes.
fn msgbuf(m: &SysvMessage) -> Vec<u8> {
    let mut b = m.mtype.to_ne_bytes().to_vec();
    b.extend(m.bytes().unwrap_or_default());
    b
}

fn send(generation: u64, msqid: i32, m: &SysvMessage) -> Result<()> {
    let b = msgbuf(m);
    // SAFETY: b holds a long and b.len() - 8 bytes of text.
    if unsafe { libc::msgsnd(msqid, b.as_ptr().cast(), b.len() - 8, libc::IPC_NOWAIT) } != 0 {
        return Err(EngineError::Restore { generation, what: format!("SysV message queue {msqid}: cannot send a message of type {} back: {}", m.mtype, std::io::Error::last_os_error()) });
    }
    Ok(())
}

/// The agent's undo table as the restarted process must hold it: the
/// image's adjustments, stamped with the remade sets' `sem_ctime` (written
/// over the restored memory at `SEM_UNDO_OFFSET` after the restart word).
pub fn undo_table_bytes(image: &ProcessImage) -> Vec<u8> {
    use ckpt_wire::Pod;
    let mut t = ckpt_wire::agent::SemUndoTable::default();
    let all = image.sysv_sem.iter().flat_map(|s| s.undo.iter().map(move |u| (s.semid, u)));
    for (slot, (semid, u)) in t.slots.iter_mut().zip(all) {
        *slot = ckpt_wire::agent::SemUndoSlot { semid, semnum: u.sem as i32, adj: u.adj, used: 1, ctime: sem_ctime(semid).unwrap_or(0) };
    }
    t.as_bytes().to_vec()
}

/// Plan steps of one process: a net-zero `semop` on each semaphore it had
/// changed last (so `GETPID` names it again), and the messages of each
/// queue it had sent to last, in order.
pub fn plan(p: &mut PlanBuilder, image: &ProcessImage) {
    for s in &image.sysv_sem {
        for &n in &s.last {
            // +1 then -1 (or -1 then +1 on a semaphore at its ceiling),
            // in one atomic call: the value does not change.
            let up = s.values[n as usize] < i16::MAX as u16;
            let (a, b): (i16, i16) = if up { (1, -1) } else { (-1, 1) };
            let mut ops = Vec::new();
            for op in [a, b] {
                ops.extend_from_slice(&n.to_ne_bytes());
                ops.extend_from_slice(&op.to_ne_bytes());
                ops.extend_from_slice(&(libc::IPC_NOWAIT as i16).to_ne_bytes());
            }
            let d = p.data(&ops);
            p.syscall(libc::SYS_semop, &[(s.semid as u64).into(), d.into(), 2u64.into()], Some(0), false, format!("touch semaphore {n} of SysV set {}", s.semid));
        }
    }
    // Each undo adjustment A again, by two semops of the process itself,
    // the raise first so neither blocks: A > 0: +A, then -A with SEM_UNDO;
    // A < 0: +|A| with SEM_UNDO, then -|A|. The value is unchanged, the
    // kernel's semadj is A.
    for s in &image.sysv_sem {
        for u in &s.undo {
            let m = u.adj.unsigned_abs() as i16;
            let undo = libc::SEM_UNDO as i16;
            let (first, second) = if u.adj > 0 { (0, undo) } else { (undo, 0) };
            for (op, flg, what) in [(m, first, "raise"), (-m, second, "lower")] {
                let mut b = Vec::new();
                b.extend_from_slice(&u.sem.to_ne_bytes());
                b.extend_from_slice(&op.to_ne_bytes());
                b.extend_from_slice(&(flg | libc::IPC_NOWAIT as i16).to_ne_bytes());
                let d = p.data(&b);
                p.syscall(libc::SYS_semop, &[(s.semid as u64).into(), d.into(), 1u64.into()], Some(0), false, format!("{what} semaphore {} of SysV set {} to make its undo adjustment {} again", u.sem, s.semid, u.adj));
            }
        }
    }
    for q in image.sysv_msq.iter().filter(|q| q.sender) {
        for (i, m) in q.messages.iter().enumerate() {
            let b = msgbuf(m);
            let len = (b.len() - 8) as u64;
            let d = p.data(&b);
            p.syscall(libc::SYS_msgsnd, &[(q.msqid as u64).into(), d.into(), len.into(), (libc::IPC_NOWAIT as u64).into()], Some(0), false, format!("send message {i} (type {}) back to SysV queue {}", m.mtype, q.msqid));
        }
    }
}
