//! The fds of a restart: every process's fds opened by the driver (each
//! open file description once, [`crate::fds::Opener`]), the restorer's own
//! pipes and helper fds numbered above them, and all of them lifted above
//! every number a process wants until the clone children place them.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::error::{EngineError, Result};
use crate::image::*;

use super::memory::Dests;
use super::{Conversation, Ctx};

pub(super) struct FdMove {
    pub src: OwnedFd,
    pub dst: RawFd,
}

pub(super) fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut p = [0; 2];
    // SAFETY: pipe2 writes two fds into `p`.
    if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(EngineError::io("pipe2", std::io::Error::last_os_error()));
    }
    // SAFETY: both fds were just created.
    Ok(unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) })
}

/// Grows this process's fd table to hold `n` fds (it never shrinks), so
/// that the fds made later never grow it: call it while the process has a
/// single thread, where growing costs no RCU grace period. Best effort: a
/// table that stays small only makes the later growth slower.
pub(super) fn reserve(n: usize) {
    let Ok(null) = crate::fds::file::dev_null() else { return };
    let max = i32::try_from(n.saturating_sub(1)).unwrap_or(i32::MAX);
    // SAFETY: F_DUPFD_CLOEXEC on an fd we own; the copy is closed at once.
    unsafe {
        let n = libc::fcntl(null.as_raw_fd(), libc::F_DUPFD_CLOEXEC, max);
        if n >= 0 {
            libc::close(n);
        }
    }
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

/// What [`prepare`] makes: per process, its fds (with their numbers), the
/// driver's side of its restorer, its controlling terminal.
pub(super) type Prepared = (Vec<Vec<FdMove>>, Vec<Conversation>, Vec<Option<OwnedFd>>);

/// Opens every fd of every process, its restorer's pipes and helper fds.
pub(super) fn prepare(
    ctx: &Ctx,
    opener: &mut crate::fds::Opener,
    shm_fds: &HashMap<u64, OwnedFd>,
    all_dests: Vec<Dests>,
    connect: &mut impl FnMut() -> Result<(OwnedFd, Vec<u8>)>,
) -> Result<Prepared> {
    let Ctx { generation, images, .. } = *ctx;
    let err = |what: String| EngineError::Restore { generation, what };
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
    Ok((all_moves, convs, cttys))
}

/// Lifts the driver's copies of every fd above every number a process
/// wants; returns that base.
pub(super) fn lift(all_moves: &mut [Vec<FdMove>], cttys: Vec<Option<OwnedFd>>) -> Result<(RawFd, Vec<Option<OwnedFd>>)> {
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
    Ok((src_base, cttys))
}

/// Opens the file under a private file mapping as the process, checked
/// to be the file the checkpoint saw (its pages the process never changed
/// are not in the image).
pub(super) fn mapped_file(generation: u64, image: &ProcessImage, r: &RegionImage, id: &Option<crate::creds::Identity>) -> Result<OwnedFd> {
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
