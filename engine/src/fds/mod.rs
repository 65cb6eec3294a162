//! Open file descriptors: how each kind is captured from a stopped process
//! and opened again at restart.
//!
//! One module per kind ([`file`], [`deleted`], [`mqueue`], [`procfile`], [`pipe`],
//! [`fifo`], [`pty`], [`eventfd`], [`timerfd`], [`signalfd`], [`epoll`],
//! [`inotify`]), each with a `capture`
//! that turns a live fd into a plain [`FdKind`] and an `open` that makes a
//! new open file description from it in the restart driver. Adding a kind is
//! adding a module and one arm in [`Round::capture_process`] and
//! [`Opener::open`]; an fd of a kind nobody handles is an
//! [`EngineError::UnsupportedFd`] that names the process, the fd and what it is.
//!
//! Sharing across the computation:
//! * a [`Round`] spans every process of one checkpoint, so an open file
//!   description reached through several fds or processes (after `dup` or
//!   `fork`) gets one id (`FdImage::ofd`, found with `kcmp`), and an object
//!   with state of its own (a pipe's buffered bytes) is read once;
//! * an [`Opener`] spans every process of one restart: it makes each open
//!   file description once and hands the same one to every fd that had it.
//!
//! Live fds of a stopped process are borrowed with `pidfd_getfd`: the
//! coordinator reads a pipe's buffer with `tee` and a socket's queues with
//! `MSG_PEEK` (the bytes stay where they are, so nothing has to be written
//! back when the program resumes). [`Round::finish`] runs the checks that
//! need every process (socket peers) before the programs resume, and
//! [`Opener::finish`] the steps that need every fd of a restart.

pub mod deleted;
pub mod epoll;
pub mod eventfd;
pub mod fifo;
pub mod file;
pub mod inotify;
pub mod mqueue;
pub mod pipe;
pub mod procfile;
pub mod pty;
pub mod signalfd;
pub mod timerfd;
pub mod socket;

use std::collections::HashMap;
use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use ckpt_chunker::Hash;
use ckpt_store::{BlobSink, Store};

pub use socket::tcp::{TcpEnd, check_ends as check_tcp_ends};

use crate::error::{EngineError, Result};
use crate::image::{FdImage, FdKind};

/// Environment variable in which `ckpt launch` lists the fds the program
/// inherited from outside the computation (`FD=TARGET;...`, stdin, stdout
/// and stderr included).
pub const ENV_EXTERNAL_FDS: &str = "CKPT_EXTERNAL_FDS";

/// The external fds recorded at launch, from `/proc/PID/environ`.
pub fn external_fds(dir: &crate::procfs::ProcDir) -> Vec<(i32, String)> {
    let env = dir.bytes("environ", crate::procfs::Whole::UntilEnd).unwrap_or_default();
    let prefix = format!("{ENV_EXTERNAL_FDS}=");
    env.split(|&b| b == 0)
        .filter_map(|e| std::str::from_utf8(e).ok()?.strip_prefix(prefix.as_str()).map(str::to_string))
        .flat_map(|v| {
            v.split(';')
                .filter_map(|item| {
                    let (fd, target) = item.split_once('=')?;
                    Some((fd.parse().ok()?, target.to_string()))
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Describes this process's fds 0-2, and its inherited pipes, sockets and
/// other non-file fds above 2, for [`ENV_EXTERNAL_FDS`].
pub fn describe_external_fds() -> String {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir("/proc/self/fd") {
        for e in rd.flatten() {
            let Some(fd) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
            if let Ok(t) = fs::read_link(e.path()) {
                let t = t.to_string_lossy().into_owned();
                if fd <= 2 || t.starts_with("pipe:") || t.starts_with("socket:") || t.starts_with("anon_inode:") {
                    out.push(format!("{fd}={}", t.replace(';', "?")));
                }
            }
        }
    }
    out.join(";")
}

/// What `/proc/PID/fdinfo/FD` says.
#[derive(Clone, Debug, Default)]
pub struct FdInfo {
    pub pos: i64,
    /// `open(2)` status flags without `O_CLOEXEC`.
    pub flags: i32,
    pub cloexec: bool,
    /// The whole text, for kinds with more fields.
    pub text: String,
}

impl FdInfo {
    pub fn read(pid: i32, fd: i32) -> FdInfo {
        FdInfo::of(fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap_or_default())
    }

    /// [`FdInfo::read`] through an open [`crate::procfs::ProcDir`].
    pub fn read_in(dir: &crate::procfs::ProcDir, fd: i32) -> FdInfo {
        FdInfo::of(dir.text(&format!("fdinfo/{fd}"), crate::procfs::Whole::InOneRead).unwrap_or_default())
    }

    fn of(text: String) -> FdInfo {
        let mut info = FdInfo { text, ..Default::default() };
        info.pos = info.field("pos:").and_then(|v| v.parse().ok()).unwrap_or(0);
        let raw = info.field("flags:").and_then(|v| i64::from_str_radix(v, 8).ok()).unwrap_or(0) as i32;
        info.cloexec = raw & libc::O_CLOEXEC != 0;
        info.flags = raw & !libc::O_CLOEXEC;
        info
    }

    /// The value after `name` on the first line that starts with it.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.text.lines().find_map(|l| l.strip_prefix(name)).map(str::trim)
    }
}

/// A field that fdinfo prints in hexadecimal.
pub fn hex_field(info: &FdInfo, name: &str) -> Option<u64> {
    info.field(name).and_then(|v| u64::from_str_radix(v, 16).ok())
}

/// One fd being captured: who has it and what it points to.
pub struct LiveFd<'a> {
    pub pid: i32,
    pub fd: i32,
    /// `readlink /proc/PID/fd/FD`.
    pub target: &'a str,
    pub info: &'a FdInfo,
    /// `stat` of the file it points to.
    pub meta: &'a fs::Metadata,
}

impl LiveFd<'_> {
    pub fn unsupported(&self, kind: &str) -> EngineError {
        EngineError::UnsupportedFd { pid: self.pid, fd: self.fd, kind: kind.to_string(), target: self.target.to_string() }
    }

    /// fdinfo lacks a field this kind needs (an older or different kernel).
    pub fn unreadable(&self, field: &str) -> EngineError {
        EngineError::Unsupported {
            pid: self.pid,
            what: format!("fd {} ({}): /proc/{}/fdinfo/{} has no readable {field} (this kernel's fdinfo differs from what ckpt knows)", self.fd, self.target, self.pid, self.fd),
        }
    }
}

struct Seen {
    pid: i32,
    fd: i32,
    dev: u64,
    ino: u64,
    ofd: u64,
}

/// The fds of every process of one checkpoint.
pub struct Round<'w> {
    writer: &'w dyn BlobSink,
    seen: Vec<Seen>,
    next_ofd: u64,
    pidfds: HashMap<i32, OwnedFd>,
    /// Pipes whose buffered bytes were read already (by inode).
    pipes_read: HashMap<u64, Option<Hash>>,
    /// FIFOs whose buffered bytes were read already (by device and inode).
    fifos_read: HashMap<(u64, u64), Option<Hash>>,
    /// Pseudo-terminals whose bytes in flight were read already (by pts number).
    ptys_read: HashMap<u32, Option<Hash>>,
    /// Fds given to the computation from outside, besides the ones `ckpt
    /// launch` records in each process's environment (e.g. the stdio of a
    /// `ckpt restart`).
    externals: Vec<(i32, String)>,
    /// Sockets read so far; TCP connections held in repair mode.
    sockets: socket::RoundSockets,
    /// When the stopped phase must be over, and a flag that cancels it
    /// (`ckpt kill`/`quit`): loops that read what a program left in
    /// flight check both ([`Round::check`]).
    deadline: Option<(std::time::Instant, u64)>,
    cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// Deleted files read already (by device and inode).
    deleted_read: HashMap<(u64, u64), crate::image::DeletedFileImage>,
    /// Message queues read already (by inode).
    mqueues_read: HashMap<u64, crate::image::MqueueImage>,
    /// Temporary files kept so far ([`crate::tmpfiles`]).
    temp: crate::tmpfiles::RoundState,
}

impl<'w> Round<'w> {
    pub fn new(writer: &'w dyn BlobSink) -> Self {
        Round {
            writer,
            seen: Vec::new(),
            next_ofd: 1,
            pidfds: HashMap::new(),
            pipes_read: HashMap::new(),
            fifos_read: HashMap::new(),
            ptys_read: HashMap::new(),
            externals: Vec::new(),
            sockets: socket::RoundSockets::default(),
            deadline: None,
            cancel: None,
            deleted_read: HashMap::new(),
            mqueues_read: HashMap::new(),
            temp: Default::default(),
        }
    }

    /// What the round kept of temporary files so far.
    pub(crate) fn temp_state(&mut self) -> &mut crate::tmpfiles::RoundState {
        &mut self.temp
    }

    /// Gives the round a deadline (`secs` from now) and a cancel flag.
    pub fn with_deadline(mut self, secs: u64, cancel: std::sync::Arc<std::sync::atomic::AtomicBool>) -> Self {
        self.deadline = Some((std::time::Instant::now() + std::time::Duration::from_secs(secs), secs));
        self.cancel = Some(cancel);
        self
    }

    /// Fails if the round is past its deadline or was cancelled: `step`
    /// names what process `pid` was doing (and `why` may say why it never
    /// ends).
    pub fn check(&self, pid: i32, step: impl Fn() -> String, why: &str) -> Result<()> {
        if self.cancel.as_ref().is_some_and(|c| c.load(std::sync::atomic::Ordering::Acquire)) {
            return Err(EngineError::Cancelled { pid, step: step() });
        }
        match self.deadline {
            Some((at, secs)) if std::time::Instant::now() >= at => Err(EngineError::Deadline { pid, step: step(), secs, why: why.to_string() }),
            _ => Ok(()),
        }
    }

    /// Call once every process of the round was captured, before the
    /// programs resume: checks what needs the whole computation (every
    /// socket's peer is in it; no TCP connection moved while the others
    /// were read) and takes TCP sockets out of repair mode. An error means
    /// the round must be aborted. (Dropping a round without calling this
    /// also leaves repair mode.)
    ///
    /// Returns the TCP connections whose other end was not in this round:
    /// on one machine there must be none; with several machines the ends of
    /// all rounds must pair up ([`check_tcp_ends`]).
    pub fn finish(&mut self) -> Result<Vec<TcpEnd>> {
        self.sockets.finish()
    }

    /// Adds fds (number at the giver, `readlink` target) that came from
    /// outside the computation.
    pub fn with_externals(mut self, externals: &[(i32, String)]) -> Self {
        self.externals.extend_from_slice(externals);
        self
    }

    /// Stores `bytes` as a metadata blob of the generation being written.
    pub fn put_blob(&self, bytes: &[u8]) -> Result<Hash> {
        Ok(self.writer.put_meta(bytes)?)
    }

    /// A duplicate, in this process, of fd `fd` of the stopped process `pid`
    /// (same open file description).
    pub fn grab(&mut self, pid: i32, fd: i32) -> Result<OwnedFd> {
        let io = |what: &str, e| EngineError::io(format!("{what} (process {pid}, fd {fd}; needs Linux ≥ 5.6 and the right to ptrace it)"), e);
        if let std::collections::hash_map::Entry::Vacant(e) = self.pidfds.entry(pid) {
            // SAFETY: pidfd_open returns a new fd or -1.
            let p = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as RawFd;
            if p < 0 {
                return Err(io("pidfd_open", std::io::Error::last_os_error()));
            }
            // SAFETY: a new fd we own.
            e.insert(unsafe { OwnedFd::from_raw_fd(p) });
        }
        let pidfd = self.pidfds[&pid].as_raw_fd();
        // SAFETY: pidfd_getfd returns a new (close-on-exec) fd or -1.
        let n = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0) } as RawFd;
        if n < 0 {
            return Err(io("pidfd_getfd", std::io::Error::last_os_error()));
        }
        // SAFETY: a new fd we own.
        Ok(unsafe { OwnedFd::from_raw_fd(n) })
    }

    /// The id of the open file description behind `pid`'s fd `fd`: the same
    /// as an earlier fd's if `kcmp` says they share it.
    fn ofd_of(&mut self, pid: i32, fd: i32, dev: u64, ino: u64) -> u64 {
        const KCMP_FILE: i32 = 0;
        for s in self.seen.iter().filter(|s| s.dev == dev && s.ino == ino) {
            // SAFETY: kcmp compares two fds of two processes; no memory passed.
            if unsafe { libc::syscall(libc::SYS_kcmp, s.pid, pid, KCMP_FILE, s.fd, fd) } == 0 {
                let ofd = s.ofd;
                self.seen.push(Seen { pid, fd, dev, ino, ofd });
                return ofd;
            }
        }
        let ofd = self.next_ofd;
        self.next_ofd += 1;
        self.seen.push(Seen { pid, fd, dev, ino, ofd });
        ofd
    }

    /// Reads and classifies every open fd of the process of `proc_dir`
    /// (its `fd/N` links and `fdinfo/N` files read relative to it).
    /// `agent_fds` are the agent's own (its connection first); they are
    /// not the program's.
    pub fn capture_process(&mut self, proc_dir: &crate::procfs::ProcDir, agent_fds: &[i32]) -> Result<Vec<FdImage>> {
        use std::os::unix::fs::MetadataExt;
        let pid = proc_dir.pid();
        let agent_fd = agent_fds.first().copied().unwrap_or(-1);
        let mut external = external_fds(proc_dir);
        external.extend(self.externals.iter().cloned());
        let dir = PathBuf::from(format!("/proc/{pid}/fd"));
        let rd = fs::read_dir(&dir).map_err(|e| EngineError::Proc { pid, path: dir.clone(), source: e })?;
        let mut nums: Vec<i32> = rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect();
        nums.sort_unstable();
        let mut out = Vec::new();
        for fd in nums {
            if fd != agent_fd && agent_fds.contains(&fd) {
                continue; // the agent's own userfaultfd: made anew after a restart
            }
            let path = dir.join(fd.to_string());
            let Ok(target) = proc_dir.link(&format!("fd/{fd}")) else { continue };
            let info = FdInfo::read_in(proc_dir, fd);
            let Ok(meta) = fs::metadata(&path) else { continue }; // closed meanwhile
            let live = LiveFd { pid, fd, target: &target, info: &info, meta: &meta };
            let ofd = self.ofd_of(pid, fd, meta.dev(), meta.ino());
            let kind = if fd == agent_fd {
                FdKind::Agent
            } else if let Some((from, _)) = external.iter().find(|(_, t)| *t == target) {
                // Given to the computation at launch: stdio comes from the
                // restart command, anything else becomes /dev/null.
                FdKind::Inherited { was: target.clone(), from: (*from <= 2).then_some(*from) }
            } else if fd <= 2 && external.is_empty() && !target.starts_with("pipe:") && !target.starts_with("socket:") {
                // A process started without `ckpt launch`'s record.
                FdKind::Inherited { was: target.clone(), from: Some(fd) }
            } else if let Some(master) = pty::end_of(&meta) {
                if master { pty::capture_master(self, &live)? } else { pty::capture_slave(&live)? }
            } else if target.starts_with('/') && std::os::unix::fs::FileTypeExt::is_fifo(&meta.file_type()) {
                fifo::capture(self, &live)?
            } else if target.starts_with('/') && mqueue::is_mqueue(pid, fd) {
                mqueue::capture(self, &live)?
            } else if procfile::is_procfile(&target) {
                procfile::capture(&live)?
            } else if deleted::is_deleted(&target) {
                deleted::capture(self, &live)?
            } else if target.starts_with('/') {
                file::capture(&live)?
            } else if target.starts_with("pipe:") {
                pipe::capture(self, &live)?
            } else if target.starts_with("socket:") {
                socket::capture(self, &live)?
            } else if let Some(anon) = target.strip_prefix("anon_inode:") {
                match anon.trim_matches(|c| c == '[' || c == ']') {
                    "eventfd" => eventfd::capture(&live)?,
                    "timerfd" => timerfd::capture(self, &live)?,
                    "signalfd" => signalfd::capture(&live)?,
                    "eventpoll" => epoll::capture(&live)?,
                    "inotify" => inotify::capture(self, &live)?,
                    other => return Err(live.unsupported(other)),
                }
            } else {
                return Err(live.unsupported("unknown"));
            };
            out.push(FdImage { fd, kind, flags: info.flags, cloexec: info.cloexec, pos: info.pos, ofd });
        }
        Ok(out)
    }
}

/// Makes the open file descriptions of one restart, each once.
pub struct Opener<'s> {
    pub store: &'s Store,
    pub generation: u64,
    /// By `FdImage::ofd`.
    made: HashMap<u64, OwnedFd>,
    pipes: pipe::Pipes,
    fifos: fifo::Fifos,
    ptys: pty::Ptys,
    sockets: socket::Sockets,
    deleted: deleted::Files,
    mqueues: mqueue::Queues,
    /// Each process's controlling terminal (a pts of the image), for its
    /// `/dev/tty` fds.
    ctty: HashMap<i32, u32>,
}

impl<'s> Opener<'s> {
    /// `images` are all the processes of the restart: objects shared by
    /// several (a pipe's ends) are prepared from all of them.
    pub fn new(store: &'s Store, generation: u64, images: &[crate::image::ProcessImage]) -> Result<Self> {
        let pipes = pipe::Pipes::new(store, generation, images)?;
        let ctty = images.iter().filter_map(|i| Some((i.pid, i.ctty_pts?))).collect();
        let deleted = deleted::Files::new(store, generation, images)?;
        Ok(Opener { store, generation, made: HashMap::new(), pipes, fifos: fifo::Fifos::new(images), ptys: pty::Ptys::new(images), sockets: socket::Sockets::new(images), deleted, mqueues: mqueue::Queues::new(images), ctty })
    }

    /// The file a shared mapping (inode `ino`, kernel name `name`) of a
    /// deleted file or memfd maps, when an fd of the restart has it too:
    /// the mapping and the fds share one file again.
    pub fn deleted_for_mapping(&self, ino: u64, name: &str) -> Option<&OwnedFd> {
        self.deleted.for_mapping(ino, name)
    }

    /// A new slave fd (not yet anyone's controlling terminal) of the
    /// pseudo-terminal that was `/dev/pts/{index}`, for a session leader
    /// that had it as its controlling terminal; None when its master was not
    /// in the computation.
    pub fn ctty(&mut self, index: u32) -> Result<Option<OwnedFd>> {
        self.ptys.slave_for_ctty(self.store, self.generation, index)
    }

    /// Call once every fd of the restart was opened, before any process
    /// runs: connects what needs its peer to exist and takes TCP
    /// connections out of repair mode.
    pub fn finish(self) -> Result<()> {
        self.sockets.finish(self.generation)
    }

    pub fn err(&self, what: String) -> EngineError {
        EngineError::Restore { generation: self.generation, what }
    }

    /// An fd (close-on-exec, any number) with the open file description
    /// `f` had, or None for fds the restart fills in otherwise (the
    /// agent's connection, stdio from the restart command).
    pub fn open(&mut self, pid: i32, f: &FdImage) -> Result<Option<OwnedFd>> {
        if f.ofd != 0
            && let Some(fd) = self.made.get(&f.ofd) {
                return Ok(Some(dup(fd)?));
            }
        let fd = match &f.kind {
            FdKind::Agent => return Ok(None),
            FdKind::ProcFile { .. } => return Ok(None), // opened by the restored process (procfile::plan)
            FdKind::Inherited { from, .. } => match from.or((f.fd <= 2).then_some(f.fd)) {
                Some(n) => return Ok(Some(dup_raw(n).or_else(|_| file::dev_null())?)),
                None => {
                    tracing::warn!(pid, fd = f.fd, "fd {} was inherited from outside the computation ({:?}); it is /dev/null after the restart", f.fd, f.kind);
                    file::dev_null()?
                }
            },
            // Its controlling terminal, a pty of the image: a slave of the
            // new pair (not the restart command's terminal).
            FdKind::Device { path } if path == "/dev/tty" && self.ctty.contains_key(&pid) => {
                let index = self.ctty[&pid];
                let fd = self.ptys.slave_for_ctty(self.store, self.generation, index)?;
                match fd {
                    Some(fd) => {
                        set_status_flags(&fd, f.flags);
                        fd
                    }
                    None => file::open(self, pid, f)?,
                }
            }
            FdKind::File { .. } | FdKind::Dir { .. } | FdKind::Device { .. } => file::open(self, pid, f)?,
            FdKind::Pipe { .. } => pipe::open(&mut self.pipes, self.generation, pid, f)?,
            FdKind::Fifo(_) => fifo::open(&mut self.fifos, self.store, self.generation, pid, f)?,
            FdKind::EventFd { .. } => eventfd::open(self.generation, pid, f)?,
            FdKind::TimerFd(_) => timerfd::open(self.generation, pid, f)?,
            FdKind::SignalFd { .. } => signalfd::open(self.generation, pid, f)?,
            FdKind::Epoll { .. } => epoll::open(self.generation, pid, f)?,
            FdKind::Inotify { .. } => inotify::open(&self.deleted, self.generation, pid, f)?,
            FdKind::Deleted(_) => deleted::open(&self.deleted, self.generation, pid, f)?,
            FdKind::Mqueue(_) => mqueue::open(&mut self.mqueues, self.store, self.generation, pid, f)?,
            FdKind::PtyMaster(_) | FdKind::PtySlave { .. } => pty::open(self, pid, f)?,
            FdKind::Unix(_) | FdKind::Tcp(_) | FdKind::Udp(_) => socket::open(&mut self.sockets, self.store, self.generation, pid, f)?,
        };
        if f.ofd != 0 {
            self.made.insert(f.ofd, dup(&fd)?);
        }
        Ok(Some(fd))
    }
}

/// Takes a new fd a syscall returned (or the error it set when negative).
///
/// # Safety
/// `n` is the return value of the syscall just made: a fresh fd nobody
/// else owns, or negative.
pub unsafe fn take_fd(n: libc::c_long) -> std::io::Result<OwnedFd> {
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd (the function's contract).
    Ok(unsafe { OwnedFd::from_raw_fd(n as RawFd) })
}

/// A close-on-exec duplicate.
pub fn dup(fd: &OwnedFd) -> Result<OwnedFd> {
    dup_raw(fd.as_raw_fd())
}

fn dup_raw(fd: RawFd) -> Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC makes a new fd we own.
    let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if n < 0 {
        return Err(EngineError::io(format!("duplicating fd {fd}"), std::io::Error::last_os_error()));
    }
    // SAFETY: a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

/// Sets the status flags (`O_NONBLOCK`, `O_APPEND`, ...) of an open file
/// description to the image's.
pub fn set_status_flags(fd: &OwnedFd, flags: i32) {
    let settable = libc::O_APPEND | libc::O_NONBLOCK | libc::O_ASYNC | libc::O_DIRECT | libc::O_NOATIME;
    // SAFETY: F_SETFL on an fd we own.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags & settable) };
}
