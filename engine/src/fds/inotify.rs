//! inotify instances: the watches (fdinfo `inotify wd:... mask:...`), each
//! with the path of its inode, found from the file handle fdinfo gives
//! (`open_by_handle_at`, then the `/proc/self/fd` link; needs
//! `CAP_DAC_READ_SEARCH`).
//!
//! Restart makes a new instance and adds the watches in wd order. The
//! kernel numbers wds itself (1, 2, ... cyclically): where the program had
//! removed watches, the gaps are filled with watches on scratch files,
//! removed again at once, so that every wd keeps its number (up to
//! [`MAX_GAP_FILL`] gap wds; beyond that, numbers can differ and a warning
//! says so). The next wd the program gets is the one after the highest
//! restored, which can differ from the original when its highest watches
//! had been removed.
//!
//! Events queued but not read at the checkpoint are lost (they cannot be
//! read without being consumed); a warning gives their size. Never read a
//! program's inotify fd.

use std::ffi::CString;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};

use super::{LiveFd, Round, set_status_flags, take_fd};
use crate::error::{EngineError, Result};
use crate::image::{FdImage, FdKind, InotifyWatch};

/// Most scratch watches made to keep wd numbers.
pub const MAX_GAP_FILL: i32 = 4096;

/// Flags `inotify_add_watch` takes but the kernel does not keep.
const IN_MASK_CREATE: u32 = 0x1000_0000;
const IN_MASK_ADD: u32 = 0x2000_0000;

struct Line {
    wd: i32,
    mask: u32,
    sdev: u32,
    handle_type: i32,
    handle: Vec<u8>,
}

fn parse_line(l: &str) -> Option<Line> {
    let rest = l.strip_prefix("inotify ")?;
    let get = |k: &str| rest.split_whitespace().find_map(|w| w.strip_prefix(k));
    let hex32 = |k: &str| get(k).and_then(|v| u32::from_str_radix(v, 16).ok());
    let handle_hex = get("f_handle:").unwrap_or("");
    let handle = (0..handle_hex.len() / 2).filter_map(|i| u8::from_str_radix(&handle_hex[2 * i..2 * i + 2], 16).ok()).collect();
    Some(Line { wd: hex32("wd:")? as i32, mask: hex32("mask:")?, sdev: hex32("sdev:")?, handle_type: hex32("fhandle-type:").unwrap_or(0) as i32, handle })
}

/// A path of the inode a handle names, on the filesystem `sdev` (the
/// kernel's dev_t: major << 20 | minor).
#[cfg(test)]
fn path_of(sdev: u32, handle_type: i32, handle: &[u8]) -> std::io::Result<String> {
    Ok(inode_of(sdev, handle_type, handle)?.0)
}

/// [`path_of`], and an `O_PATH` fd of the inode.
fn inode_of(sdev: u32, handle_type: i32, handle: &[u8]) -> std::io::Result<(String, OwnedFd)> {
    let want = format!("{}:{}", sdev >> 20, sdev & 0xfffff);
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mount = mountinfo
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&want.as_str())).then(|| f.get(4).map(|m| m.replace("\\040", " ")))?
        })
        .next()
        .ok_or_else(|| std::io::Error::other(format!("no mount of device {want} here")))?;
    let m = CString::new(mount.as_bytes()).map_err(std::io::Error::other)?;
    // Not O_PATH: open_by_handle_at refuses an O_PATH mount fd (EBADF).
    // SAFETY: open with a NUL-terminated path; its result is taken at once.
    let mfd = unsafe { take_fd(libc::open(m.as_ptr(), libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC).into()) }?;
    // struct file_handle: u32 handle_bytes, i32 handle_type, bytes.
    let mut fh = Vec::with_capacity(8 + handle.len());
    fh.extend_from_slice(&(handle.len() as u32).to_ne_bytes());
    fh.extend_from_slice(&handle_type.to_ne_bytes());
    fh.extend_from_slice(handle);
    // SAFETY: open_by_handle_at reads the handle from `fh`; its result is taken at once.
    let fd = unsafe { take_fd(libc::syscall(libc::SYS_open_by_handle_at, mfd.as_raw_fd(), fh.as_ptr(), libc::O_PATH | libc::O_CLOEXEC)) }?;
    Ok((std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?.to_string_lossy().into_owned(), fd))
}

pub fn capture(round: &mut Round, live: &LiveFd) -> Result<FdKind> {
    let mut watches = Vec::new();
    for l in live.info.text.lines().filter(|l| l.starts_with("inotify ")) {
        let w = parse_line(l).ok_or_else(|| live.unreadable("an inotify watch line"))?;
        if w.handle.is_empty() {
            return Err(live.unsupported(&format!("inotify watch {} on an inode without a file handle (device {:#x})", w.wd, w.sdev)));
        }
        let (path, inode) = inode_of(w.sdev, w.handle_type, &w.handle)
            .map_err(|e| live.unsupported(&format!("inotify watch {} whose path cannot be found ({e})", w.wd)))?;
        // A deleted file: its contents are kept and it is made again.
        let deleted = if path.ends_with(" (deleted)") {
            let src = format!("/proc/self/fd/{}", inode.as_raw_fd());
            let meta = std::fs::metadata(&src).map_err(|e| live.unsupported(&format!("inotify watch {} on a deleted file ({path}) that cannot be read ({e})", w.wd)))?;
            if !meta.is_file() {
                return Err(live.unsupported(&format!("inotify watch {} on a deleted directory or special file ({path})", w.wd)));
            }
            Some(super::deleted::capture_file(round, &src, &path, &meta).map_err(|e| live.unsupported(&format!("inotify watch {} on a deleted file ({path}) that cannot be read ({e})", w.wd)))?)
        } else {
            None
        };
        watches.push(InotifyWatch { wd: w.wd, mask: w.mask & !(IN_MASK_ADD | IN_MASK_CREATE), path, deleted });
    }
    watches.sort_by_key(|w| w.wd);
    let fd = round.grab(live.pid, live.fd)?;
    let mut queued: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut queued) } == 0 && queued > 0 {
        tracing::warn!(pid = live.pid, fd = live.fd, "inotify fd {} of process {} has {queued} bytes of unread events; a restart of this checkpoint will not have them", live.fd, live.pid);
    }
    Ok(FdKind::Inotify { watches })
}

fn add_watch(fd: &OwnedFd, path: &str, mask: u32) -> std::io::Result<i32> {
    let c = CString::new(path.as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: inotify_add_watch with a NUL-terminated path.
    let wd = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c.as_ptr(), mask) };
    if wd < 0 { Err(std::io::Error::last_os_error()) } else { Ok(wd) }
}

/// Scratch files whose watches fill wd gaps; removed on drop.
struct Scratch {
    dir: Option<std::path::PathBuf>,
    next: usize,
}

impl Scratch {
    fn file(&mut self) -> std::io::Result<String> {
        if self.dir.is_none() {
            let mut tmpl = *b"/tmp/ckpt-inotify-XXXXXX\0";
            // SAFETY: mkdtemp rewrites the template in place.
            if unsafe { libc::mkdtemp(tmpl.as_mut_ptr() as *mut libc::c_char) }.is_null() {
                return Err(std::io::Error::last_os_error());
            }
            self.dir = Some(std::str::from_utf8(&tmpl[..tmpl.len() - 1]).map_err(std::io::Error::other)?.into());
        }
        let p = self.dir.as_ref().unwrap().join(self.next.to_string());
        self.next += 1;
        std::fs::write(&p, b"")?;
        Ok(p.to_string_lossy().into_owned())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

pub fn open(deleted: &super::deleted::Files, generation: u64, pid: i32, f: &FdImage) -> Result<OwnedFd> {
    let FdKind::Inotify { watches } = &f.kind else { unreachable!("inotify::open of another kind") };
    let err = |what: String| EngineError::Restore { generation, what: format!("inotify (fd {} of process {pid}): {what}", f.fd) };
    // SAFETY: inotify_init1 returns a new fd or -1.
    let fd = unsafe { take_fd(libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK).into()) }.map_err(|e| err(format!("inotify_init1: {e}")))?;
    let gaps = watches.last().map(|w| w.wd).unwrap_or(0) - watches.len() as i32;
    let fill = gaps > 0 && gaps <= MAX_GAP_FILL;
    if gaps > MAX_GAP_FILL {
        tracing::warn!(pid, fd = f.fd, "inotify fd {} of process {pid}: {gaps} removed watches below the highest wd; the restored watches get new numbers", f.fd);
    }
    let mut scratch = Scratch { dir: None, next: 0 };
    let mut fillers = Vec::new();
    let mut next_wd = 1;
    for w in watches {
        while fill && next_wd < w.wd {
            let p = scratch.file().map_err(|e| err(format!("scratch file for wd {next_wd}: {e}")))?;
            fillers.push(add_watch(&fd, &p, libc::IN_DELETE_SELF).map_err(|e| err(format!("scratch watch {p}: {e}")))?);
            next_wd += 1;
        }
        // A deleted file is watched through its fd's /proc link (followed to the inode).
        let path = match &w.deleted {
            Some(d) => format!("/proc/self/fd/{}", deleted.file(generation, d)?.as_raw_fd()),
            None => w.path.clone(),
        };
        let mask = if w.deleted.is_some() { w.mask & !libc::IN_DONT_FOLLOW } else { w.mask };
        let wd = add_watch(&fd, &path, mask).map_err(|e| err(format!("watching {} (wd {}): {e}", w.path, w.wd)))?;
        if wd != w.wd {
            tracing::warn!(pid, fd = f.fd, "inotify watch on {} is wd {wd} after the restart (was {})", w.path, w.wd);
        }
        next_wd = wd + 1;
    }
    if !fillers.is_empty() {
        for wd in &fillers {
            // SAFETY: removing a watch we added.
            unsafe { libc::inotify_rm_watch(fd.as_raw_fd(), *wd) };
        }
        // Each removal queued an IN_IGNORED event: take them out.
        let mut buf = vec![0u8; 64 * 1024];
        let mut file = std::fs::File::from(super::dup(&fd)?);
        let mut lost = 0;
        while let Ok(k) = file.read(&mut buf) {
            if k == 0 {
                break;
            }
            let mut off = 0;
            while off + 16 <= k {
                let wd = i32::from_ne_bytes(buf[off..off + 4].try_into().unwrap());
                let len = u32::from_ne_bytes(buf[off + 12..off + 16].try_into().unwrap()) as usize;
                if !fillers.contains(&wd) {
                    lost += 1;
                }
                off += 16 + len;
            }
        }
        if lost > 0 {
            tracing::warn!(pid, fd = f.fd, "{lost} inotify events came while the watches were being restored and were lost");
        }
    }
    set_status_flags(&fd, f.flags);
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_watch_lines() {
        let l = "inotify wd:3 ino:4a1 sdev:fd00001 mask:100 ignored_mask:0 fhandle-bytes:8 fhandle-type:1 f_handle:a1040000f3c2e91b";
        let w = parse_line(l).unwrap();
        assert_eq!((w.wd, w.mask, w.sdev, w.handle_type), (3, 0x100, 0xfd00001, 1));
        assert_eq!(w.handle, vec![0xa1, 0x04, 0, 0, 0xf3, 0xc2, 0xe9, 0x1b]);
    }

    #[test]
    fn finds_the_path_of_a_watched_dir() {
        let dir = tempfile::tempdir().unwrap();
        // SAFETY: a new inotify fd, taken at once.
        let fd = unsafe { take_fd(libc::inotify_init1(libc::IN_CLOEXEC).into()) }.unwrap();
        add_watch(&fd, dir.path().to_str().unwrap(), libc::IN_CREATE).unwrap();
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).unwrap();
        let w = info.lines().find_map(parse_line).unwrap();
        match path_of(w.sdev, w.handle_type, &w.handle) {
            Ok(p) => assert_eq!(p, std::fs::canonicalize(dir.path()).unwrap().to_str().unwrap()),
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => eprintln!("not root: {e}"),
            Err(e) => panic!("{e}"),
        }
    }
}
