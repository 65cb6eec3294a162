//! The private runtime directory that holds the coordinator's socket and
//! log, and the checks that keep another local user out of it.
//!
//! `$XDG_RUNTIME_DIR/ckpt`, or `/tmp/ckpt-UID` without a usable
//! `XDG_RUNTIME_DIR` (sudo, cron, services). `/tmp` is shared: a user who
//! makes `/tmp/ckpt-0` first, with `coord.log` a symlink to
//! `/etc/ld.so.preload`, must get nothing. So the directory is made 0700
//! without following a symlink, then checked through its own fd: a real
//! directory, owned by the effective uid, no group or other bits; every
//! file in it is opened with `O_NOFOLLOW|O_CLOEXEC`, mode 0600, and its
//! owner checked through the fd.
//!
//! What it must never do: follow a symlink in a directory another user can
//! write, or accept a directory or file another user made.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Errors of the runtime directory and the files in it.
#[derive(Debug, thiserror::Error)]
pub enum RunDirError {
    #[error("cannot use the runtime directory {path}: {source}")]
    Io { path: PathBuf, #[source] source: std::io::Error },
    #[error("{path} is not a directory of yours (a {kind} owned by uid {owner}, mode {mode:o}; you are uid {me}): another user may have made it to take over ckpt's socket or log; remove it (`rm -r {path}`) or set XDG_RUNTIME_DIR to a private directory")]
    NotPrivate { path: PathBuf, kind: &'static str, owner: u32, mode: u32, me: u32 },
    #[error("{path} is a {kind} owned by uid {owner}, mode {mode:o}, not a private file of yours (uid {me}): remove it")]
    BadFile { path: PathBuf, kind: &'static str, owner: u32, mode: u32, me: u32 },
    #[error("the coordinator socket's directory {dir} {why}: another user could replace the socket; put it in a directory only you can write (or drop --coord to use the private default)")]
    UnsafeSocketDir { dir: PathBuf, why: String },
}

fn me() -> u32 {
    nix::unistd::geteuid().as_raw()
}

fn kind_of(md: &std::fs::Metadata) -> &'static str {
    let ft = md.file_type();
    if ft.is_symlink() {
        "symlink"
    } else if ft.is_dir() {
        "directory"
    } else if ft.is_file() {
        "file"
    } else {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_socket() { "socket" } else { "special file" }
    }
}

/// This user's runtime directory for ckpt: `$XDG_RUNTIME_DIR/ckpt` when
/// `XDG_RUNTIME_DIR` is an absolute path to a directory of this user's,
/// else `/tmp/ckpt-UID` (with the effective uid). Not made here.
pub fn default_dir() -> PathBuf {
    let usable = |d: &Path| d.is_absolute() && std::fs::symlink_metadata(d).is_ok_and(|m| m.is_dir() && m.uid() == me() && m.mode() & 0o022 == 0);
    match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(d) if usable(&d) => d.join("ckpt"),
        _ => PathBuf::from(format!("/tmp/ckpt-{}", me())),
    }
}

/// Makes `dir` (mode 0700; its parent must exist) unless it exists, and
/// checks it is a private directory of this user's.
pub fn ensure_private_dir(dir: &Path) -> Result<(), RunDirError> {
    let io = |source| RunDirError::Io { path: dir.to_path_buf(), source };
    // mkdir never follows a symlink at the last component: an existing
    // symlink fails with EEXIST and is refused below.
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io(e)),
    }
    check_private_dir(dir)
}

/// Checks, without following a symlink, that `dir` is a directory owned by
/// this user with no group or other bits.
pub fn check_private_dir(dir: &Path) -> Result<(), RunDirError> {
    let io = |source| RunDirError::Io { path: dir.to_path_buf(), source };
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dir)
        .or_else(|e| {
            // O_NOFOLLOW|O_DIRECTORY on a symlink or a file: report what it is.
            let md = std::fs::symlink_metadata(dir).map_err(|_| io(e))?;
            Err(RunDirError::NotPrivate { path: dir.to_path_buf(), kind: kind_of(&md), owner: md.uid(), mode: md.mode() & 0o7777, me: me() })
        })?;
    let md = f.metadata().map_err(io)?;
    if !md.is_dir() || md.uid() != me() || md.mode() & 0o077 != 0 {
        return Err(RunDirError::NotPrivate { path: dir.to_path_buf(), kind: kind_of(&md), owner: md.uid(), mode: md.mode() & 0o7777, me: me() });
    }
    Ok(())
}

/// Opens `path` for appending (made with mode 0600 if missing) without
/// following a symlink; refuses a file that is not a regular file of this
/// user's.
pub fn open_private_append(path: &Path) -> Result<File, RunDirError> {
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .map_err(|source| match std::fs::symlink_metadata(path) {
            Ok(md) if source.raw_os_error() == Some(libc::ELOOP) => {
                RunDirError::BadFile { path: path.to_path_buf(), kind: kind_of(&md), owner: md.uid(), mode: md.mode() & 0o7777, me: me() }
            }
            _ => RunDirError::Io { path: path.to_path_buf(), source },
        })?;
    let md = f.metadata().map_err(|source| RunDirError::Io { path: path.to_path_buf(), source })?;
    if md.is_file() && md.uid() == me() && md.mode() & 0o077 != 0 {
        // Our own file from an older ckpt: made private through the fd.
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(|source| RunDirError::Io { path: path.to_path_buf(), source })?;
        return Ok(f);
    }
    if !md.is_file() || md.uid() != me() {
        return Err(RunDirError::BadFile { path: path.to_path_buf(), kind: kind_of(&md), owner: md.uid(), mode: md.mode() & 0o7777, me: me() });
    }
    Ok(f)
}

/// Checks that `dir`, the directory of an explicit socket path, cannot be
/// changed by another user: owned by this user or root, and not writable by
/// group or others unless sticky (then only the socket's owner may remove
/// or replace it).
pub fn check_socket_dir(dir: &Path) -> Result<(), RunDirError> {
    let md = std::fs::metadata(dir).map_err(|source| RunDirError::Io { path: dir.to_path_buf(), source })?;
    let refuse = |why: String| Err(RunDirError::UnsafeSocketDir { dir: dir.to_path_buf(), why });
    if md.uid() != me() && md.uid() != 0 {
        return refuse(format!("is owned by uid {} (you are uid {})", md.uid(), me()));
    }
    if md.mode() & 0o022 != 0 && md.mode() & 0o1000 == 0 {
        return refuse(format!("others may write (mode {:o}, not sticky)", md.mode() & 0o7777));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn made_private_and_symlinks_refused() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path().join("run");
        ensure_private_dir(&r).unwrap();
        assert_eq!(std::fs::metadata(&r).unwrap().permissions().mode() & 0o777, 0o700);
        let log = r.join("coord.log");
        open_private_append(&log).unwrap();
        assert_eq!(std::fs::metadata(&log).unwrap().permissions().mode() & 0o777, 0o600);

        std::fs::set_permissions(&r, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(matches!(ensure_private_dir(&r), Err(RunDirError::NotPrivate { .. })));

        let link = d.path().join("link");
        std::os::unix::fs::symlink(d.path(), &link).unwrap();
        assert!(matches!(ensure_private_dir(&link), Err(RunDirError::NotPrivate { kind: "symlink", .. })));

        let target = d.path().join("target");
        let l2 = d.path().join("l2");
        std::os::unix::fs::symlink(&target, &l2).unwrap();
        assert!(matches!(open_private_append(&l2), Err(RunDirError::BadFile { kind: "symlink", .. })));
        assert!(!target.exists(), "a file was made through the symlink");
    }
}
