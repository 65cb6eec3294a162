//! Temporary files kept with the image: the small files, FIFOs and
//! directories under the system's temporary directories that a program
//! keeps open or maps shared, made again at a restart when they are gone.
//!
//! ckpt keeps no copy of a file a program has open or maps shared: the
//! file holds the content. A temporary file is the exception, because the
//! system empties its directory (a reboot, a job's end, a launcher's
//! cleanup): Open MPI's session directory (`/tmp/ompi.HOST.UID/pid.N`: the
//! PMIx data store files every process maps shared, hwloc's topology file,
//! the debugger FIFO) is removed by `mpirun` when Slurm stops the job.
//!
//! **The rule** (at capture; [`capture`]). A file is kept when
//! - it is a regular file an fd of the process has open or that it maps
//!   shared, a FIFO an fd has open, or a directory an fd has open;
//! - its path is below one of [`roots`]: `/tmp`, `/var/tmp`, and
//!   `/run/user/UID` of the process's own uid (`/dev/shm` is not: its
//!   objects are POSIX shared memory, which [`crate::restore`] makes
//!   again with the region's content; `$TMPDIR` is not: a variable of the
//!   program's environment cannot tell a restart which directory may be
//!   written);
//! - it, and every directory between the root and it, belongs to the
//!   process's file system uid, and no component is a symlink;
//! - a regular file is at most [`MAX_FILE`] bytes long, and the files of
//!   one checkpoint round (one machine's processes) add up to at most
//!   [`MAX_TOTAL`] bytes; the ones past that are not kept (and behave as
//!   before: a restart without them is refused, naming them).
//!
//! A kept file's contents are read while the processes are stopped, as a
//! deleted file's are ([`crate::fds::deleted::capture_file`]): in chunks
//! addressed by their hash, so an unchanged file stores nothing new at the
//! next checkpoint. Each directory between the root and a kept file is
//! kept too (mode, owner), and a FIFO's path (its bytes in flight are the
//! FIFO's own, [`crate::fds::fifo`]).
//!
//! **At restart** ([`make_missing`], before any fd is opened or file
//! mapped): each kept entry still there is used as it is (a file changed
//! since the checkpoint is not put back: the program sees it as it is
//! now, as any file it has open). Each one gone is made again, directories
//! first, with its recorded mode, group and contents, as the process (its
//! file system identity, [`crate::creds::as_process`]); `--dry-run` says
//! which ([`would_make`]).
//!
//! **Hostile images.** A path must be absolute, below a root, with no
//! `.`, `..` or empty component, and its owner must be the process's file
//! system uid; sizes are checked against the same caps. The walk opens
//! every component relative to the one before (`openat2` with
//! `RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH`, one component at a time), so a
//! symlink planted anywhere on the way is never followed; files are made
//! with `O_CREAT | O_EXCL | O_NOFOLLOW`, directories with `mkdirat`, FIFOs
//! with `mknodat`, each relative to its parent's fd, then `fchmod`/`fchown`
//! on their own fd. Nothing is made in a directory that the process's uid
//! could not have made it in itself: every directory below the root on the
//! way must belong to that uid, and the root must belong to it or be
//! sticky and world-writable (`/tmp`); a directory of another user on the
//! way (planted before the restart) is refused, naming it.

use std::collections::HashSet;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use ckpt_store::Store;
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Problem, Result};
use crate::image::{DeletedFileImage, FdImage, FdKind, ProcessImage};

/// Largest temporary file kept with an image (bytes).
pub const MAX_FILE: u64 = 16 << 20;
/// Most bytes of temporary files one checkpoint round keeps (and one
/// restart makes again).
pub const MAX_TOTAL: u64 = 64 << 20;
/// Most entries (files, FIFOs, directories) one restart makes again.
pub const MAX_ENTRIES: usize = 4096;

/// One kept entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TempFile {
    pub path: String,
    /// Permission bits and owner.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub kind: TempKind,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TempKind {
    Dir,
    Fifo,
    /// A regular file and its contents (`path` there is the file's path).
    File(DeletedFileImage),
}

impl TempKind {
    fn name(&self) -> &'static str {
        match self {
            TempKind::Dir => "directory",
            TempKind::Fifo => "FIFO",
            TempKind::File(_) => "file",
        }
    }
}

/// The temporary directories of a process of file system uid `uid`.
pub fn roots(uid: u32) -> Vec<String> {
    vec!["/tmp".into(), "/var/tmp".into(), format!("/run/user/{uid}")]
}

/// The root `path` is below and the components after it; None when
/// `path` is not absolute, has a `.`, `..` or empty component, a NUL, or
/// is below no root.
pub fn split(path: &str, uid: u32) -> Option<(String, Vec<&str>)> {
    if !path.starts_with('/') || path.contains('\0') || path.len() > 4096 {
        return None;
    }
    for root in roots(uid) {
        let Some(rest) = path.strip_prefix(root.as_str()).and_then(|r| r.strip_prefix('/')) else { continue };
        let parts: Vec<&str> = rest.split('/').collect();
        if parts.iter().any(|c| c.is_empty() || *c == "." || *c == "..") {
            return None;
        }
        return Some((root, parts));
    }
    None
}

/// What a round keeps of temporary files: bytes so far, files read.
#[derive(Default)]
pub struct RoundState {
    bytes: u64,
    seen: HashSet<(u64, u64)>,
}

/// The temporary files process `pid` (stopped) keeps open or maps shared,
/// by the rule above, with the directories leading to them. `fds`: its
/// fds as [`crate::fds::Round::capture_process`] read them; `reads`: its
/// maps and status, read once with [`crate::capture::prepare`].
pub fn capture(round: &mut crate::fds::Round, pid: i32, fds: &[FdImage], reads: &crate::capture::ProcReads) -> Result<Vec<TempFile>> {
    let uid = crate::creds::parse_thread_status(pid, pid, reads.status()?)?.creds.uid[3];
    let mut out: Vec<TempFile> = Vec::new();
    // (path, where to read it, the inode it must be, what it is)
    let mut wanted: Vec<(String, String, Option<u64>, TempKind)> = Vec::new();
    for f in fds {
        match &f.kind {
            FdKind::File { path } => wanted.push((path.clone(), format!("/proc/{pid}/fd/{}", f.fd), None, TempKind::File(empty()))),
            FdKind::Dir { path } => wanted.push((path.clone(), format!("/proc/{pid}/fd/{}", f.fd), None, TempKind::Dir)),
            FdKind::Fifo(x) => wanted.push((x.path.clone(), format!("/proc/{pid}/fd/{}", f.fd), None, TempKind::Fifo)),
            _ => {}
        }
    }
    for m in reads.maps()? {
        if m.shared && crate::capture::region_kind(m) == crate::image::RegionKind::SharedFile {
            wanted.push((m.name.clone(), format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end), Some(m.inode), TempKind::File(empty())));
        }
    }
    wanted.sort_by(|a, b| a.0.cmp(&b.0));
    wanted.dedup_by(|a, b| a.0 == b.0);
    for (path, src, inode, kind) in wanted {
        let Some((root, parts)) = split(&path, uid) else { continue };
        match keep(round, pid, uid, &path, &src, inode, kind, &root, &parts) {
            Ok(entries) => {
                for e in entries {
                    if !out.iter().any(|o| o.path == e.path) {
                        out.push(e);
                    }
                }
            }
            Err(why) => tracing::debug!(pid, path, "temporary file not kept with the image: {why}"),
        }
    }
    // Parents before what they hold.
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

fn empty() -> DeletedFileImage {
    DeletedFileImage { path: String::new(), dev: 0, ino: 0, size: 0, mode: 0, uid: 0, gid: 0, memfd_seals: None, chunk_size: 0, segments: vec![], depth: 0 }
}

/// The entries for one file: the directories below `root` leading to it,
/// then itself; Err: why it is not kept.
#[allow(clippy::too_many_arguments)]
fn keep(round: &mut crate::fds::Round, pid: i32, uid: u32, path: &str, src: &str, inode: Option<u64>, kind: TempKind, root: &str, parts: &[&str]) -> std::result::Result<Vec<TempFile>, String> {
    let proc_root = format!("/proc/{pid}/root");
    let mut entries = Vec::new();
    let mut at = root.to_string();
    for c in &parts[..parts.len() - 1] {
        at = format!("{at}/{c}");
        let m = std::fs::symlink_metadata(format!("{proc_root}{at}")).map_err(|e| format!("{at}: {e}"))?;
        if !m.file_type().is_dir() || m.uid() != uid {
            return Err(format!("{at} is not a directory of uid {uid}"));
        }
        entries.push(TempFile { path: at.clone(), mode: m.mode() & 0o7777, uid: m.uid(), gid: m.gid(), kind: TempKind::Dir });
    }
    // The file itself, through the process's fd or mapping (its inode, not
    // whatever the path names now); a mapping `map_files` does not show
    // (no CAP_CHECKPOINT_RESTORE) is opened by its path in the process's
    // root, following no symlink, and must be the mapped inode. A FIFO or a
    // directory is not opened (an open of a FIFO would be a reader or a
    // writer of it).
    let (file, meta) = match kind {
        TempKind::File(_) => {
            let file = match std::fs::File::open(src) {
                Ok(f) => f,
                Err(_) if inode.is_some() => {
                    let root = std::fs::File::open(&proc_root).map_err(|e| format!("{proc_root}: {e}"))?;
                    std::fs::File::from(open_beneath(&root.into(), path.trim_start_matches('/'), libc::O_RDONLY | libc::O_NONBLOCK).map_err(|e| format!("{path}: {e}"))?)
                }
                Err(e) => return Err(format!("{src}: {e}")),
            };
            let meta = file.metadata().map_err(|e| format!("{path}: {e}"))?;
            (Some(file), meta)
        }
        _ => (None, std::fs::metadata(src).map_err(|e| format!("{src}: {e}"))?),
    };
    if inode.is_some_and(|i| i != meta.ino()) {
        return Err(format!("{path} is not the mapped file any more"));
    }
    if meta.uid() != uid {
        return Err(format!("{path} belongs to uid {}, not the process's {uid}", meta.uid()));
    }
    let ft = meta.file_type();
    let (mode, gid) = (meta.mode() & 0o7777, meta.gid());
    let kind = match kind {
        TempKind::Dir if ft.is_dir() => TempKind::Dir,
        TempKind::Fifo if ft.is_fifo() => TempKind::Fifo,
        TempKind::File(_) if ft.is_file() && file.is_some() => {
            let file = file.expect("opened above");
            let key = (meta.dev(), meta.ino());
            let st = round.temp_state();
            if !st.seen.contains(&key) {
                if meta.size() > MAX_FILE {
                    return Err(format!("{path} is {} bytes, more than the {MAX_FILE} kept of a temporary file", meta.size()));
                }
                if st.bytes + meta.size() > MAX_TOTAL {
                    return Err(format!("the temporary files of this checkpoint reach the {MAX_TOTAL} bytes kept"));
                }
                st.bytes += meta.size();
                st.seen.insert(key);
            }
            let src = format!("/proc/self/fd/{}", file.as_raw_fd());
            let mut d = crate::fds::deleted::capture_file(round, &src, path, &meta).map_err(|e| format!("reading {path}: {e}"))?;
            d.path = path.to_string();
            TempKind::File(d)
        }
        _ => return Err(format!("{path} is not a {}", kind.name())),
    };
    entries.push(TempFile { path: path.to_string(), mode, uid, gid, kind });
    Ok(entries)
}

/// The entries of a restart, each path once (the first image naming it),
/// with the identity of the process that makes it; checked as hostile.
fn entries(generation: u64, images: &[ProcessImage]) -> Result<Vec<(&TempFile, &ProcessImage)>> {
    let bad = |what: String| EngineError::BadImage { generation, what };
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut bytes = 0u64;
    for image in images {
        if image.temp_files.is_empty() {
            continue;
        }
        let Some(id) = crate::creds::Identity::of(image) else {
            return Err(bad(format!("process {} keeps temporary files but its image records no credentials", image.pid)));
        };
        for t in &image.temp_files {
            if split(&t.path, id.fsuid).is_none() {
                return Err(bad(format!("process {} keeps the temporary file {:?}, which is not a path below {}", image.pid, t.path, roots(id.fsuid).join(", "))));
            }
            if t.uid != id.fsuid {
                return Err(bad(format!("the temporary {} {} of process {} belongs to uid {}, not to the process's uid {}", t.kind.name(), t.path, image.pid, t.uid, id.fsuid)));
            }
            if let TempKind::File(d) = &t.kind
                && (d.size > MAX_FILE || d.chunk_size as usize != crate::fds::deleted::CHUNK)
            {
                return Err(bad(format!("the temporary file {} of process {} has size {} (at most {MAX_FILE}) and chunk size {}", t.path, image.pid, d.size, d.chunk_size)));
            }
            if !seen.insert(t.path.as_str()) {
                continue;
            }
            if let TempKind::File(d) = &t.kind {
                bytes += d.size;
            }
            out.push((t, image));
        }
    }
    if bytes > MAX_TOTAL || out.len() > MAX_ENTRIES {
        return Err(bad(format!("its temporary files are {} entries and {bytes} bytes, more than the {MAX_ENTRIES} and {MAX_TOTAL} a restart makes again", out.len())));
    }
    out.sort_by(|a, b| a.0.path.cmp(&b.0.path));
    Ok(out)
}

/// Opens `name` in `dir` as a directory, following no symlink.
fn open_beneath(dir: &OwnedFd, name: &str, flags: i32) -> std::io::Result<OwnedFd> {
    let c = CString::new(name).map_err(std::io::Error::other)?;
    // SAFETY: open_how is plain data; zeroed is valid.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC | libc::O_NOFOLLOW) as u64;
    how.resolve = libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_BENEATH;
    // SAFETY: openat2 reads the name and `how`; the fd is owned below.
    let fd = unsafe { libc::syscall(libc::SYS_openat2, dir.as_raw_fd(), c.as_ptr(), &how as *const libc::open_how, std::mem::size_of::<libc::open_how>()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn fstat(fd: &OwnedFd) -> std::io::Result<libc::stat> {
    // SAFETY: stat is plain data; fstat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat on our fd.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st)
}

/// What is at the entry's path now.
enum Found {
    /// There, of the right type: used as it is.
    There,
    /// Gone; its parent directory (None: a parent is gone too, to be made
    /// first).
    Gone(Option<OwnedFd>),
}

/// Walks to `t` as the process (the identity [`crate::creds::acting_as`]
/// set), one component at a time, following no symlink; checks that the
/// process could make it where it is gone.
fn look(t: &TempFile, uid: u32) -> std::result::Result<Found, String> {
    let (root, parts) = split(&t.path, uid).ok_or_else(|| format!("{} is below no temporary directory", t.path))?;
    crate::creds::as_process(|| {
        let mut dir = crate::creds::open(&root, libc::O_PATH | libc::O_DIRECTORY, 0)?;
        let mut at = root.clone();
        // The first directory below the root on the way that is not the
        // process's uid's.
        let mut foreign: Option<(String, u32, u32)> = None;
        for (i, c) in parts.iter().enumerate() {
            let last = i == parts.len() - 1;
            let st = fstat(&dir)?;
            if i > 0 && st.st_uid != uid && foreign.is_none() {
                foreign = Some((at.clone(), st.st_uid, st.st_mode & 0o7777));
            }
            // The root: the process's own, or sticky and world-writable.
            let root_ok = st.st_uid == uid || st.st_mode & 0o1002 == 0o1002 || uid == 0;
            let flags = if last { libc::O_PATH } else { libc::O_PATH | libc::O_DIRECTORY };
            match open_beneath(&dir, c, flags) {
                Ok(fd) => {
                    if last {
                        let st = fstat(&fd)?;
                        let ok = match t.kind {
                            TempKind::Dir => st.st_mode & libc::S_IFMT == libc::S_IFDIR,
                            TempKind::Fifo => st.st_mode & libc::S_IFMT == libc::S_IFIFO,
                            TempKind::File(_) => st.st_mode & libc::S_IFMT == libc::S_IFREG,
                        };
                        if !ok {
                            return Err(std::io::Error::other(format!("{} is there but is not a {}; move it away so that it can be made again", t.path, t.kind.name())));
                        }
                        return Ok(Found::There);
                    }
                    dir = fd;
                    at = format!("{at}/{c}");
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    let refused = match &foreign {
                        Some(f) => Some(f.clone()),
                        None if i == 0 && !root_ok => Some((at.clone(), st.st_uid, st.st_mode & 0o7777)),
                        None => None,
                    };
                    if let Some((d, owner, mode)) = refused {
                        return Err(std::io::Error::other(format!(
                            "{d} belongs to uid {owner} (mode {mode:o}), not to the process's uid {uid}: another user may have made it, and ckpt makes nothing below it (check who made it, remove it and restart)"
                        )));
                    }
                    return Ok(Found::Gone(last.then_some(dir)));
                }
                Err(e) if e.raw_os_error() == Some(libc::ELOOP) || e.raw_os_error() == Some(libc::EXDEV) => {
                    return Err(std::io::Error::other(format!("{at}/{c} is a symlink (or leads out of {root}): not followed; remove it and restart")));
                }
                Err(e) => return Err(std::io::Error::other(format!("{at}/{c}: {e}"))),
            }
        }
        Ok(Found::There)
    })
    .map_err(|e| e.to_string())
}

/// Makes `t` in `dir` (its parent) as the process, with its contents,
/// mode and group.
fn make(store: &Store, generation: u64, t: &TempFile, dir: &OwnedFd) -> std::result::Result<(), String> {
    let name = t.path.rsplit('/').next().unwrap_or_default();
    let c = CString::new(name).map_err(|e| e.to_string())?;
    let fd = crate::creds::as_process(|| {
        // SAFETY: mkdirat/mknodat/openat on our directory fd with a NUL-terminated name.
        let r = unsafe {
            match t.kind {
                TempKind::Dir => libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), 0o700),
                TempKind::Fifo => libc::mknodat(dir.as_raw_fd(), c.as_ptr(), libc::S_IFIFO | 0o600, 0),
                TempKind::File(_) => libc::openat(dir.as_raw_fd(), c.as_ptr(), libc::O_CREAT | libc::O_EXCL | libc::O_RDWR | libc::O_NOFOLLOW | libc::O_CLOEXEC, 0o600),
            }
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        match t.kind {
            // SAFETY: openat returned a new fd we own.
            TempKind::File(_) => Ok(unsafe { OwnedFd::from_raw_fd(r) }),
            TempKind::Dir => open_beneath(dir, name, libc::O_RDONLY | libc::O_DIRECTORY),
            // O_RDWR: a FIFO opened so never blocks.
            TempKind::Fifo => open_beneath(dir, name, libc::O_RDWR | libc::O_NONBLOCK),
        }
    })
    .map_err(|e| format!("cannot make it: {e}"))?;
    if let TempKind::File(d) = &t.kind {
        let file = std::fs::File::from(crate::fds::dup(&fd).map_err(|e| e.to_string())?);
        crate::fds::deleted::write_contents(store, generation, &file, d).map_err(|e| e.to_string())?;
    }
    let mode = match t.kind {
        TempKind::Dir => t.mode & 0o3777,
        _ => t.mode & 0o1777,
    };
    crate::creds::as_process(|| {
        // SAFETY: fchmod/fchown on our own fd.
        unsafe {
            if libc::fchmod(fd.as_raw_fd(), mode) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::fchown(fd.as_raw_fd(), u32::MAX, t.gid) != 0 {
                tracing::warn!("temporary {} {}: cannot give it group {} again: {}", t.kind.name(), t.path, t.gid, std::io::Error::last_os_error());
            }
        }
        Ok(())
    })
    .map_err(|e| format!("cannot set its mode {mode:o}: {e}"))
}

/// Makes again, before the restart opens anything, every kept temporary
/// entry of `images` that is gone; returns the paths made.
pub fn make_missing(store: &Store, generation: u64, images: &[ProcessImage]) -> Result<Vec<String>> {
    let mut made = Vec::new();
    for (t, image) in entries(generation, images)? {
        let id = crate::creds::Identity::of(image).expect("checked by entries");
        let uid = id.fsuid;
        let err = |what: String| EngineError::Restore { generation, what: format!("the temporary {} {} of process {}: {what}", t.kind.name(), t.path, image.pid) };
        crate::creds::acting_as(Some(id), || match look(t, uid).map_err(err)? {
            Found::There => Ok(()),
            Found::Gone(None) => Err(err("its directory is gone and is not in the image".into())),
            Found::Gone(Some(dir)) => {
                make(store, generation, t, &dir).map_err(err)?;
                tracing::info!(pid = image.pid, "made the temporary {} {} again", t.kind.name(), t.path);
                made.push(t.path.clone());
                Ok(())
            }
        })?;
    }
    Ok(made)
}

/// What [`make_missing`] would make again (one line each), and what would
/// stop it.
pub fn would_make(generation: u64, images: &[ProcessImage]) -> (Vec<String>, Vec<Problem>) {
    let mut notes = Vec::new();
    let mut problems = Vec::new();
    let list = match entries(generation, images) {
        Ok(l) => l,
        Err(e) => {
            problems.push(Problem { pid: images.first().map_or(0, |i| i.pid), what: e.to_string() });
            return (notes, problems);
        }
    };
    let mut gone: Vec<&str> = Vec::new();
    for (t, image) in list {
        let id = crate::creds::Identity::of(image).expect("checked by entries");
        let uid = id.fsuid;
        let under_gone = gone.iter().any(|g| t.path.strip_prefix(g).is_some_and(|r| r.starts_with('/')));
        let found = if under_gone { Ok(Found::Gone(None)) } else { crate::creds::acting_as(Some(id), || look(t, uid)) };
        match found {
            Ok(Found::There) => {}
            Ok(Found::Gone(dir)) if dir.is_some() || under_gone => {
                if matches!(t.kind, TempKind::Dir) {
                    gone.push(&t.path);
                }
                let size = match &t.kind {
                    TempKind::File(d) => format!(", {} bytes", d.size),
                    _ => String::new(),
                };
                notes.push(format!("the temporary {} {} of process {} would be made again (mode {:o}, uid {}, gid {}{size})", t.kind.name(), t.path, image.pid, t.mode, t.uid, t.gid));
            }
            Ok(Found::Gone(_)) => problems.push(Problem { pid: image.pid, what: format!("the directory of its temporary {} {} is gone and is not in the image", t.kind.name(), t.path) }),
            Err(why) => problems.push(Problem { pid: image.pid, what: format!("its temporary {} {} cannot be made again: {why}", t.kind.name(), t.path) }),
        }
    }
    (notes, problems)
}

/// Whether `path` is a kept temporary file of `image` (a restart makes it
/// again if it is gone).
pub fn is_kept(image: &ProcessImage, path: &str) -> bool {
    image.temp_files.iter().any(|t| t.path == path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(uid: u32, temp: Vec<TempFile>) -> ProcessImage {
        let mut img: ProcessImage = serde_json::from_value(serde_json::json!({
            "version": 1, "pid": 7, "ppid": 0, "host": "h", "exe": "/bin/x", "comm": "x", "cmdline": [], "cwd": "/",
            "umask": 18, "rlimits": [], "mm": crate::image::MmFields::default(), "auxv": [], "threads": [], "sigactions": [], "itimers": [],
            "fds": [], "regions": [], "agent": {"fd": 0, "restart_word_addr": 0, "ckpt_tid": 0}, "chunk_size": 4096
        }))
        .unwrap_or_else(|e| panic!("test image: {e}"));
        let t = crate::creds::ThreadCreds { tid: 7, uid: [uid; 4], gid: [uid; 4], ..Default::default() };
        img.creds = Some(crate::creds::ProcessCreds { threads: vec![t] });
        img.temp_files = temp;
        img
    }

    fn file(path: &str, uid: u32, size: u64) -> TempFile {
        let mut d = empty();
        (d.size, d.chunk_size) = (size, crate::fds::deleted::CHUNK as u32);
        TempFile { path: path.into(), mode: 0o600, uid, gid: uid, kind: TempKind::File(d) }
    }

    #[test]
    fn a_hostile_image_is_refused_before_anything_is_made() {
        let good = [image(1001, vec![file("/tmp/a/b", 1001, 10)])];
        assert_eq!(entries(1, &good).unwrap().len(), 1);
        let refused = |images: &[ProcessImage], what: &str| {
            let e = entries(1, images).map(|_| ()).expect_err(what).to_string();
            assert!(e.contains(what), "{e}");
        };
        refused(&[image(1001, vec![file("/etc/passwd", 1001, 10)])], "not a path below");
        refused(&[image(1001, vec![file("/tmp/../etc/passwd", 1001, 10)])], "not a path below");
        refused(&[image(1001, vec![file("/run/user/0/x", 1001, 10)])], "not a path below");
        refused(&[image(1001, vec![file("/tmp/x", 0, 10)])], "belongs to uid 0");
        refused(&[image(1001, vec![file("/tmp/x", 1001, MAX_FILE + 1)])], "has size");
        let many: Vec<TempFile> = (0..5).map(|i| file(&format!("/tmp/f{i}"), 1001, MAX_FILE)).collect();
        refused(&[image(1001, many)], "more than the");
        let mut no_creds = image(1001, vec![file("/tmp/x", 1001, 1)]);
        no_creds.creds = None;
        refused(&[no_creds], "records no credentials");
    }

    #[test]
    fn paths_below_a_root_only() {
        assert_eq!(split("/tmp/ompi.h.0/pid.7/contact.txt", 0), Some(("/tmp".to_string(), vec!["ompi.h.0", "pid.7", "contact.txt"])));
        assert_eq!(split("/run/user/1001/x", 1001).map(|s| s.1), Some(vec!["x"]));
        for bad in ["/tmp", "/tmp/", "/tmpx/a", "tmp/a", "/tmp/../etc/passwd", "/tmp/a/./b", "/tmp//a", "/etc/passwd", "/run/user/0/x", "/dev/shm/x", "/tmp/a\0b", "/var/tmp/a/"] {
            assert!(split(bad, 1001).is_none(), "{bad:?} accepted");
        }
    }
}
