//! Shared memory of a restart: one memfd per shared anonymous object of the
//! image, sized for every mapping of it; POSIX shared memory (`shm_open`)
//! made again at its name, as the process. (SysV segments: [`crate::sysv`].)

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::error::{EngineError, Result};
use crate::image::*;

use super::Ctx;

/// Makes every shared memory object of the generation (SysV segments
/// aside), by the image's shm id.
pub(super) fn objects(ctx: &Ctx, opener: &crate::fds::Opener<'_>) -> Result<HashMap<u64, OwnedFd>> {
    let Ctx { generation, images, .. } = *ctx;
    // Shared memory objects: one memfd each, big enough for every mapping.
    // POSIX shared memory (`shm_open`) comes back at its name.
    let mut shm_size: HashMap<u64, (u64, &str, &ProcessImage, Option<u64>)> = HashMap::new();
    for image in images {
        for r in image.regions.iter().filter(|r| r.kind == RegionKind::SharedAnon && r.shm != 0 && r.sysv.is_none()) {
            let e = shm_size.entry(r.shm).or_insert((0, &r.name, image, None));
            e.0 = e.0.max(r.offset + (r.end - r.start));
            e.3 = e.3.or(r.shm_size);
        }
    }
    let mut shm_fds: HashMap<u64, OwnedFd> = HashMap::new();
    for (&shm, &(extent, name, image, recorded)) in &shm_size {
        // The recorded size when every mapped page is within it and it
        // ends in the last mapped page (the page may end past it, as at the
        // checkpoint); else the mappings' extent, so that no page the image
        // fills is past the end. A size past the mappings is not believed:
        // the image holds nothing there, and a hostile image could ask for
        // any length.
        let page = crate::remote::PAGE;
        let exact = recorded.filter(|&s| s <= extent && extent - s < page);
        let size = exact.unwrap_or(extent);
        let fd = if let Some(fd) = opener.deleted_for_mapping(shm, name) {
            crate::fds::dup(fd)?
        } else if name.starts_with("/dev/shm/") && !name.ends_with(" (deleted)") {
            crate::creds::acting_as(crate::creds::Identity::of(image), || posix_shm(generation, image.pid, name, size, exact.is_some(), shm))?
        } else {
            memfd(generation, shm, size)?
        };
        shm_fds.insert(shm, fd);
    }
    Ok(shm_fds)
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
/// `size` bytes long, or exactly (`exact`: the checkpoint's size; a
/// leftover of another length is sized again); the image's content is
/// written into it later.
///
/// Made with `O_EXCL` as the process ([`crate::creds::open`]: its
/// identity, no symlink followed). One that exists already is used only if
/// it belongs to the process's fsuid (its own object, left behind when the
/// program was killed): an object another user made before the restart
/// would let that user read and write the program's shared memory, so the
/// restart refuses it, naming it and its owner; so is one of the process's
/// uid that is not the computation's own ([`crate::leftovers`]; `recorded`:
/// the inode the checkpoint saw).
fn posix_shm(generation: u64, pid: i32, path: &str, size: u64, exact: bool, recorded: u64) -> Result<OwnedFd> {
    let err = |what: String| EngineError::Restore { generation, what };
    let flags = libc::O_RDWR | libc::O_CREAT | libc::O_EXCL;
    let fd = match crate::creds::open(path, flags, 0o600) {
        Ok(fd) => {
            crate::leftovers::mark_posix_shm(&fd, path, recorded);
            fd
        }
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
            if !crate::leftovers::posix_shm_is_ours(&fd, meta.ino(), recorded) {
                return Err(err(format!(
                    "the shared memory object {path} of process {pid} exists but is not the one the checkpointed computation left (inode {}, not {recorded}, and no ckpt mark): another program may use it; if not, remove it (`rm {path}`) and restart",
                    meta.ino()
                )));
            }
            fd
        }
        Err(e) => return Err(err(format!("cannot create the shared memory object {path} of process {pid}: {e}"))),
    };
    let f = File::from(fd);
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len < size || (exact && len != size) {
        f.set_len(size).map_err(|e| err(format!("cannot size the shared memory object {path} to {size} bytes: {e}")))?;
    }
    Ok(f.into())
}
