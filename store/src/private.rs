//! A store is private to its owner: every directory ckpt makes in it is
//! 0700 and every file 0600, whatever the umask (memory images hold the
//! programs' secrets). Files are created with their final mode (never
//! created open and tightened later), and a store found with looser modes
//! is tightened when opened by its owner or root, with a warning; opened by
//! anyone else it is refused, naming the command that fixes it.
//!
//! Names read from the catalog or from an S3 listing are checked here too:
//! a pack name is exactly what ckpt makes (64 lowercase hex digits, the
//! BLAKE3 of the file), so it can never be a path.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Result, StoreError};

/// Mode of every directory ckpt makes in a store.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file ckpt makes in a store.
pub const FILE_MODE: u32 = 0o600;

/// `mkdir -p` with mode 0700 for every directory it creates (the umask can
/// only take bits away from 0700; the last one is set exactly).
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE))
}

/// Options that create a file with mode 0600 (the umask cannot loosen it).
pub fn file_options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(FILE_MODE);
    o
}

/// Create (or truncate) `path` for writing, mode 0600, not following a
/// symlink in its last component.
pub fn create_file(path: &Path) -> io::Result<File> {
    let f = file_options()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc_o_nofollow())
        .open(path)?;
    f.set_permissions(fs::Permissions::from_mode(FILE_MODE))?;
    Ok(f)
}

/// Write `data` to `path` (see [`create_file`]).
pub fn write_file(path: &Path, data: &[u8]) -> io::Result<()> {
    use std::io::Write;
    create_file(path)?.write_all(data)
}

fn libc_o_nofollow() -> i32 {
    nix::fcntl::OFlag::O_NOFOLLOW.bits()
}

/// Whether `name` is a pack name ckpt makes: 64 lowercase hex digits.
pub fn is_pack_name(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// [`is_pack_name`], or [`StoreError::BadName`] naming `source` (the
/// catalog file or S3 listing the name came from).
pub fn check_pack_name(name: &str, source: &Path) -> Result<()> {
    if is_pack_name(name) {
        Ok(())
    } else {
        Err(StoreError::BadName {
            origin: source.to_path_buf(),
            what: "pack",
            name: name.to_string(),
        })
    }
}

/// Bring the store (or S3 cache) at `root` to 0700/0600: every directory
/// and file in it that is looser is tightened (our own, or any as root),
/// with one warning naming how many; symlinks are neither followed nor
/// changed. A looser entry we may not change refuses the open
/// ([`StoreError::NotPrivate`], naming the fix).
pub fn tighten(root: &Path) -> Result<()> {
    let euid = nix::unistd::geteuid().as_raw();
    let mut fixed: Vec<PathBuf> = Vec::new();
    let mut stack = vec![(root.to_path_buf(), 0usize)];
    while let Some((p, depth)) = stack.pop() {
        let md = match fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(StoreError::io(format!("stat {}", p.display()), e)),
        };
        if md.file_type().is_symlink() {
            continue;
        }
        let want = if md.is_dir() { DIR_MODE } else { FILE_MODE };
        let mode = md.mode() & 0o7777;
        if mode & !want & 0o7077 != 0 {
            if md.uid() != euid && euid != 0 {
                return Err(StoreError::NotPrivate {
                    path: p.clone(),
                    mode,
                    root: root.to_path_buf(),
                });
            }
            fs::set_permissions(&p, fs::Permissions::from_mode(mode & want))
                .map_err(|e| StoreError::io(format!("make {} private (chmod {:o})", p.display(), mode & want), e))?;
            fixed.push(p.clone());
        }
        // The store's own layout is at most three levels deep
        // (packs/hh/NAME.pack); nothing deeper is ckpt's.
        if md.is_dir() && depth < 3 {
            let rd = fs::read_dir(&p).map_err(|e| StoreError::io(format!("list {}", p.display()), e))?;
            for e in rd.flatten() {
                stack.push((e.path(), depth + 1));
            }
        }
    }
    if !fixed.is_empty() {
        tracing::warn!(
            store = %root.display(),
            entries = fixed.len(),
            first = %fixed[0].display(),
            "the store was readable by other users (made before ckpt kept stores private, or copied with loose modes): made it private (directories 0700, files 0600)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_names() {
        assert!(is_pack_name(&"ab".repeat(32)));
        assert!(!is_pack_name(&"AB".repeat(32)));
        assert!(!is_pack_name("../../x"));
        assert!(!is_pack_name(&format!("{}/", "a".repeat(63))));
        assert!(!is_pack_name(&"a".repeat(65)));
        assert!(!is_pack_name(""));
    }
}
