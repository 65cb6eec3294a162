//! Deleted files and memfds: files a process holds open (or mapped, or
//! watched with inotify) that no directory names any more: `tmpfile()`,
//! `O_TMPFILE`, a scratch file unlinked after open, `memfd_create`.
//!
//! Capture reads the file's contents (through a new read-only open of
//! `/proc/PID/fd/N`, so the program's offset is untouched and a write-only
//! fd is read too) while the processes are stopped, skipping holes
//! (`SEEK_DATA`/`SEEK_HOLE`), in [`CHUNK`]-byte chunks addressed by BLAKE3:
//! a chunk the store holds already (the same file at the last checkpoint,
//! another copy of it) is not written again, and the chunk list is the
//! same tree memory regions use ([`crate::chunklist`]), so a checkpoint of
//! an unchanged file stores nothing new. A file is read once per round
//! however many fds, processes and watches share it (by device and inode).
//!
//! Restart makes each file once, before any fd or mapping needs it: a file
//! of a file system with `O_TMPFILE` in the directory it was in (so it is
//! on the same file system, and unlinked again; if that directory is gone,
//! in `/tmp`, with a warning), a memfd with `memfd_create` under its old
//! name; then its size, contents, mode, owner, and a memfd's seals (added
//! last: `F_SEAL_WRITE` would refuse the contents). Every fd gets its own
//! open file description of that one file (`/proc/self/fd/N` opened again
//! with the fd's access mode and status flags, at its offset); fds that
//! shared a description still share one ([`super::Opener`]); shared
//! mappings of the file map it (restore.rs asks [`Files::for_mapping`]).
//!
//! Limits: a file that has hard links elsewhere is not "deleted" and is
//! reopened by path; a size above [`MAX_SIZE`] is refused at checkpoint.

use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

use ckpt_chunker::Hash;
use ckpt_store::{BlobKind, Store};

use super::{LiveFd, Round, set_status_flags, take_fd};
use crate::error::{EngineError, Result};
use crate::image::{DeletedFileImage, FdImage, FdKind, ProcessImage};
use crate::pages::SparseChunks;

/// Bytes per chunk of a deleted file's contents.
pub const CHUNK: usize = 16 << 10;
/// Largest deleted file a checkpoint stores (and a restart accepts).
pub const MAX_SIZE: u64 = 1 << 40;
/// Bytes read at a time.
const WINDOW: usize = 4 << 20;

const F_ADD_SEALS: i32 = 1033;
const F_GET_SEALS: i32 = 1034;
/// Every seal `F_ADD_SEALS` knows (SEAL, SHRINK, GROW, WRITE, FUTURE_WRITE, EXEC).
const SEALS_KNOWN: u32 = 0x3f;

/// Whether an fd target names a deleted file or a memfd.
pub fn is_deleted(target: &str) -> bool {
    target.starts_with('/') && target.ends_with(" (deleted)")
}

pub fn capture(round: &mut Round, live: &LiveFd) -> Result<FdKind> {
    if !live.meta.is_file() {
        return Err(live.unsupported("deleted special file"));
    }
    let src = format!("/proc/{}/fd/{}", live.pid, live.fd);
    let d = capture_file(round, &src, live.target, live.meta).map_err(|e| live.unsupported(&format!("deleted file whose contents cannot be read ({e})")))?;
    Ok(FdKind::Deleted(d))
}

/// Reads the deleted file that `src` (a path that opens it: a `/proc` fd
/// link) reaches, once per round.
pub fn capture_file(round: &mut Round, src: &str, name: &str, meta: &std::fs::Metadata) -> std::io::Result<DeletedFileImage> {
    let key = (meta.dev(), meta.ino());
    if let Some(d) = round.deleted_read.get(&key) {
        return Ok(d.clone());
    }
    if meta.size() > MAX_SIZE {
        return Err(std::io::Error::other(format!("it is {} bytes, more than the {MAX_SIZE} a checkpoint stores", meta.size())));
    }
    let file = std::fs::File::open(src)?;
    let fd = file.as_raw_fd();
    let memfd = name.starts_with("/memfd:");
    // SAFETY: F_GET_SEALS takes no argument.
    let seals = unsafe { libc::fcntl(fd, F_GET_SEALS) };
    let memfd_seals = memfd.then_some(seals.max(0) as u32);
    let size = file.metadata()?.size();
    let n = size.div_ceil(CHUNK as u64);
    let mut entries = Vec::new();
    let mut buf = vec![0u8; WINDOW];
    let mut at: u64 = 0;
    while at < size {
        // SAFETY: lseek on our own open file description.
        let data = unsafe { libc::lseek(fd, at as i64, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: only a hole is left
        }
        // SAFETY: as above.
        let hole = (unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) }).max(data) as u64;
        let mut off = data as u64 / CHUNK as u64 * CHUNK as u64;
        // To the end of the chunk the hole starts in (or of the file).
        let end = hole.div_ceil(CHUNK as u64).saturating_mul(CHUNK as u64).min(size);
        while off < end {
            let want = (WINDOW as u64).min(end - off) as usize;
            std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf[..want], off)?;
            for (i, c) in buf[..want].chunks(CHUNK).enumerate() {
                let h = ckpt_chunker::hash_chunk(c);
                if !h.is_zero_chunk() {
                    if !round.writer.known(&h) {
                        round.writer.put(BlobKind::Chunk, h, c).map_err(std::io::Error::other)?;
                    }
                    entries.push((off / CHUNK as u64 + i as u64, h));
                }
            }
            off += want as u64;
        }
        at = end;
    }
    entries.dedup_by_key(|e| e.0);
    let (segments, depth) = crate::chunklist::store_sparse(round.writer, &SparseChunks { len: n, entries }).map_err(std::io::Error::other)?;
    let d = DeletedFileImage {
        path: name.to_string(),
        dev: meta.dev(),
        ino: meta.ino(),
        size,
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        memfd_seals,
        chunk_size: CHUNK as u32,
        segments,
        depth,
    };
    round.deleted_read.insert(key, d.clone());
    Ok(d)
}

/// The deleted files of one restart, each made once.
pub struct Files {
    made: HashMap<(u64, u64), OwnedFd>,
}

impl Files {
    /// Makes every deleted file the images' fds and inotify watches name.
    pub fn new(store: &Store, generation: u64, images: &[ProcessImage]) -> Result<Files> {
        let mut files = Files { made: HashMap::new() };
        for image in images {
            let id = crate::creds::Identity::of(image);
            for f in &image.fds {
                let list: Vec<&DeletedFileImage> = match &f.kind {
                    FdKind::Deleted(d) => vec![d],
                    FdKind::Inotify { watches } => watches.iter().filter_map(|w| w.deleted.as_ref()).collect(),
                    _ => continue,
                };
                for d in list {
                    if let std::collections::hash_map::Entry::Vacant(e) = files.made.entry((d.dev, d.ino)) {
                        let fd = crate::creds::acting_as(id.clone(), || make(store, generation, image.pid, d))?;
                        e.insert(fd);
                    }
                }
            }
        }
        Ok(files)
    }

    /// The file made for `d`.
    pub fn file(&self, generation: u64, d: &DeletedFileImage) -> Result<&OwnedFd> {
        self.made.get(&(d.dev, d.ino)).ok_or_else(|| EngineError::Restore { generation, what: format!("internal: deleted file {} was not made", d.path) })
    }

    /// The file a shared mapping of inode `ino` named `name` maps, if one
    /// of the restart's fds has it open too.
    pub fn for_mapping(&self, ino: u64, name: &str) -> Option<&OwnedFd> {
        if !is_deleted(name) {
            return None;
        }
        self.made.iter().find(|((_, i), _)| *i == ino).map(|(_, fd)| fd)
    }
}

/// Makes the file `d` describes, unlinked, with its contents.
fn make(store: &Store, generation: u64, pid: i32, d: &DeletedFileImage) -> Result<OwnedFd> {
    let err = |what: String| EngineError::Restore { generation, what: format!("deleted file {} of process {pid}: {what}", d.path) };
    if d.size > MAX_SIZE || d.chunk_size as usize != CHUNK {
        return Err(EngineError::BadImage { generation, what: format!("deleted file {} of process {pid} has size {} and chunk size {}", d.path, d.size, d.chunk_size) });
    }
    let name = d.path.strip_suffix(" (deleted)").unwrap_or(&d.path);
    let fd = if let Some(memfd) = name.strip_prefix("/memfd:") {
        let c = CString::new(memfd.as_bytes()).map_err(|_| err("a NUL in its name".into()))?;
        let flags = libc::MFD_CLOEXEC | if d.memfd_seals.is_some_and(|s| s & SEALS_KNOWN != 1) { libc::MFD_ALLOW_SEALING } else { 0 };
        // SAFETY: memfd_create with a NUL-terminated name; taken at once.
        unsafe { take_fd(libc::memfd_create(c.as_ptr(), flags).into()) }.map_err(|e| err(format!("memfd_create: {e}")))?
    } else {
        let dir = std::path::Path::new(name).parent().and_then(|p| p.to_str()).unwrap_or("/tmp");
        match crate::creds::open(dir, libc::O_TMPFILE | libc::O_RDWR, d.mode & 0o777) {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!(pid, "deleted file {} cannot be made again in {dir} ({e}); it is made in /tmp", d.path);
                crate::creds::open("/tmp", libc::O_TMPFILE | libc::O_RDWR, d.mode & 0o777).map_err(|e| err(format!("O_TMPFILE in /tmp: {e}")))?
            }
        }
    };
    let file = std::fs::File::from(fd);
    write_contents(store, generation, &file, d).map_err(|e| match e {
        EngineError::Restore { what, .. } => err(what),
        e => e,
    })?;
    let fd: OwnedFd = file.into();
    // SAFETY: fchmod/fchown on our own fd.
    unsafe {
        libc::fchmod(fd.as_raw_fd(), d.mode & 0o7777);
        if libc::fchown(fd.as_raw_fd(), d.uid, d.gid) != 0 {
            tracing::warn!(pid, "deleted file {}: owner {}:{} cannot be set back ({})", d.path, d.uid, d.gid, std::io::Error::last_os_error());
        }
    }
    // A memfd made without MFD_ALLOW_SEALING has F_SEAL_SEAL (1) and nothing else already.
    if let Some(seals) = d.memfd_seals.map(|s| s & SEALS_KNOWN).filter(|s| *s != 0 && *s != 1) {
        // SAFETY: F_ADD_SEALS with an int argument on our memfd.
        if unsafe { libc::fcntl(fd.as_raw_fd(), F_ADD_SEALS, seals as libc::c_int) } != 0 {
            return Err(err(format!("F_ADD_SEALS {seals:#x}: {}", std::io::Error::last_os_error())));
        }
    }
    Ok(fd)
}

/// Writes `d`'s size and contents into `file` (new and empty), each chunk
/// checked against its hash.
pub fn write_contents(store: &Store, generation: u64, file: &std::fs::File, d: &DeletedFileImage) -> Result<()> {
    let err = |what: String| EngineError::Restore { generation, what };
    if d.size > MAX_SIZE || d.chunk_size as usize != CHUNK {
        return Err(EngineError::BadImage { generation, what: format!("file {} has size {} and chunk size {}", d.path, d.size, d.chunk_size) });
    }
    file.set_len(d.size).map_err(|e| err(format!("ftruncate to {} bytes: {e}", d.size)))?;
    let n = d.size.div_ceil(CHUNK as u64);
    let chunks = crate::chunklist::load_sparse(store, generation, &d.segments, d.depth, n)?;
    if chunks.len != n {
        return Err(EngineError::BadImage { generation, what: format!("file {} lists {} chunks for {} bytes", d.path, chunks.len, d.size) });
    }
    for (i, h) in &chunks.entries {
        let bytes = store.read_blob(h)?;
        let off = i * CHUNK as u64;
        let want = (d.size - off).min(CHUNK as u64) as usize;
        if bytes.len() != want || Hash::of(&bytes) != *h {
            return Err(EngineError::BadImage { generation, what: format!("chunk {h} of file {} is {} bytes, not {want}", d.path, bytes.len()) });
        }
        std::os::unix::fs::FileExt::write_all_at(file, &bytes, off).map_err(|e| err(format!("writing its contents: {e}")))?;
    }
    Ok(())
}

/// A new open file description of the file made for `f`, with its access
/// mode, status flags and offset.
pub fn open(files: &Files, generation: u64, pid: i32, f: &FdImage) -> Result<OwnedFd> {
    let FdKind::Deleted(d) = &f.kind else { unreachable!("deleted::open of another kind") };
    let file = files.file(generation, d)?;
    let fd = reopen(file, f.flags & (libc::O_ACCMODE | libc::O_APPEND | libc::O_NONBLOCK | libc::O_SYNC | libc::O_DSYNC | libc::O_NOATIME))
        .map_err(|e| EngineError::Restore { generation, what: format!("deleted file {} as fd {} of process {pid}: {e}", d.path, f.fd) })?;
    set_status_flags(&fd, f.flags);
    if f.pos > 0 {
        // SAFETY: lseek on our own fd.
        unsafe { libc::lseek(fd.as_raw_fd(), f.pos, libc::SEEK_SET) };
    }
    Ok(fd)
}

/// Opens the file behind `fd` again (a new open file description).
pub fn reopen(fd: &OwnedFd, flags: i32) -> std::io::Result<OwnedFd> {
    reopen_path(&format!("/proc/self/fd/{}", fd.as_raw_fd()), flags)
}

/// Opens `path` (a `/proc` fd link: followed), close-on-exec.
pub fn reopen_path(path: &str, flags: i32) -> std::io::Result<OwnedFd> {
    let path = CString::new(path).map_err(std::io::Error::other)?;
    // SAFETY: open with a NUL-terminated path; taken at once.
    unsafe { take_fd(libc::open(path.as_ptr(), flags | libc::O_CLOEXEC).into()) }
}
