//! What a killed computation leaves behind, told from what is not its own.
//!
//! A POSIX shared memory object (`/dev/shm/NAME`) outlives the programs
//! that mapped it. A restart uses an object found at the recorded name only
//! if it is the computation's own: the very object the checkpoint saw (the
//! inode recorded with the region, `RegionImage::shm`), or one an earlier
//! restart of the computation made for it, which carries the extended
//! attribute `user.ckpt.shm` with that recorded inode. Anything else (made
//! by another program since) is refused, naming the file to remove.

use std::os::fd::{AsRawFd, OwnedFd};

const XATTR: &std::ffi::CStr = c"user.ckpt.shm";

/// Marks the object a restart made for the object that was `recorded`.
/// tmpfs has user xattrs since Linux 6.6; without them a later restart of
/// the same generation finds an unmarked object (refused, named).
pub fn mark_posix_shm(fd: &OwnedFd, path: &str, recorded: u64) {
    let v = recorded.to_string();
    // SAFETY: fsetxattr reads the name (NUL-terminated) and `v.len()` bytes of `v`.
    if unsafe { libc::fsetxattr(fd.as_raw_fd(), XATTR.as_ptr(), v.as_ptr().cast(), v.len(), 0) } != 0 {
        tracing::warn!(path, "cannot mark the shared memory object as this computation's ({XATTR:?}: {}); a restart after a kill will not recognize it", std::io::Error::last_os_error());
    }
}

/// Whether the existing object `fd` (inode `inode`) is the computation's
/// own for the recorded object `recorded`.
pub fn posix_shm_is_ours(fd: &OwnedFd, inode: u64, recorded: u64) -> bool {
    if inode == recorded {
        return true;
    }
    let mut buf = [0u8; 32];
    // SAFETY: fgetxattr writes at most buf.len() bytes into buf.
    let n = unsafe { libc::fgetxattr(fd.as_raw_fd(), XATTR.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    n > 0 && std::str::from_utf8(&buf[..n as usize]).ok().and_then(|s| s.parse::<u64>().ok()) == Some(recorded)
}
