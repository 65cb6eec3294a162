//! The computation's secret: 32 random bytes in a private file, from which
//! every key of the coordinator's channels is derived.
//!
//! * Clients and capture helpers on other machines prove they hold the
//!   secret itself (the pre-shared key of their TCP channel).
//! * Agents hold only the [`Secret::agent_key`] derived from it, handed to
//!   the computation by `ckpt launch` in [`ckpt_wire::agent::ENV_AGENT_KEY`]:
//!   it makes a process a member of the computation (it may register and be
//!   checkpointed) and nothing more, so a program that leaks its environment
//!   leaks no right to command the coordinator.
//!
//! The file is `$CKPT_SECRET_FILE`, else `~/.config/ckpt/coord.key` in the
//! home directory of the password database (not `$HOME`, which may name
//! another user's directory under sudo; `$HOME` only for a user the
//! database does not know, as in a minimal container). It is made on first use with mode
//! 0600 in a 0700 directory, opened without following symlinks, and refused
//! if another user owns it or others may read it. To run a computation
//! across machines, copy the file to each of them (as Slurm's munge key is).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Environment variable naming the secret file.
pub const ENV_SECRET_FILE: &str = "CKPT_SECRET_FILE";

/// KDF context of the agent key (BLAKE3 `derive_key`).
const AGENT_KEY_CONTEXT: &str = "ckpt 2026-12-02 computation membership key v1";

/// Errors of loading or making the secret.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read the coordinator secret {path}: {source}")]
    Io { path: PathBuf, #[source] source: std::io::Error },
    #[error("the coordinator secret {path} is owned by uid {owner}, not by you (uid {me}): remove it or set {ENV_SECRET_FILE} to a file of yours")]
    NotOwned { path: PathBuf, owner: u32, me: u32 },
    #[error("the coordinator secret {path} may be read by others (mode {mode:o}): run `chmod 600 {path}`")]
    Exposed { path: PathBuf, mode: u32 },
    #[error("the coordinator secret {path} is not 64 hex digits: restore it from another machine of the computation, or remove it to make a new one (the computation's other machines then need the new file)")]
    Malformed { path: PathBuf },
    #[error("no home directory for uid {0} in the password database: set {ENV_SECRET_FILE}")]
    NoHome(u32),
}

/// 32 secret bytes. Never printed: `Debug` shows nothing of them.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret([u8; 32]);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// The secret file this user's commands use: `$CKPT_SECRET_FILE`, else
    /// `~/.config/ckpt/coord.key`.
    pub fn default_path() -> Result<PathBuf, SecretError> {
        if let Some(p) = std::env::var_os(ENV_SECRET_FILE).filter(|p| !p.is_empty()) {
            return Ok(PathBuf::from(p));
        }
        let uid = nix::unistd::geteuid();
        // `$HOME` only where the password database knows no such user (a
        // minimal container or initramfs): the file must be this user's
        // and private wherever it is, which `load` checks.
        let home = nix::unistd::User::from_uid(uid)
            .ok()
            .flatten()
            .map(|u| u.dir)
            .or_else(|| std::env::var_os("HOME").map(PathBuf::from).filter(|h| h.is_absolute()))
            .ok_or(SecretError::NoHome(uid.as_raw()))?;
        Ok(home.join(".config/ckpt/coord.key"))
    }

    /// Reads the secret at `path`, making it first if there is none.
    pub fn load_or_create(path: &Path) -> Result<Secret, SecretError> {
        match Secret::load(path) {
            Err(SecretError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
            r => return r,
        }
        let io = |source| SecretError::Io { path: path.to_path_buf(), source };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io)?;
        }
        let mut bytes = [0u8; 32];
        fill_random(&mut bytes).map_err(io)?;
        // Exclusive: of two commands making it at once, one wins and the
        // other reads the winner's.
        match OpenOptions::new().write(true).create_new(true).mode(0o600).custom_flags(libc::O_NOFOLLOW).open(path) {
            Ok(mut f) => {
                f.write_all(format!("{}\n", hex::encode(bytes)).as_bytes()).map_err(io)?;
                f.sync_all().map_err(io)?;
                Ok(Secret(bytes))
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Secret::load(path),
            Err(e) => Err(io(e)),
        }
    }

    /// Reads the secret at `path`; it must be this user's and private.
    pub fn load(path: &Path) -> Result<Secret, SecretError> {
        let io = |source| SecretError::Io { path: path.to_path_buf(), source };
        let mut f: File = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(path).map_err(io)?;
        let md = f.metadata().map_err(io)?;
        let me = nix::unistd::geteuid().as_raw();
        if md.uid() != me {
            return Err(SecretError::NotOwned { path: path.to_path_buf(), owner: md.uid(), me });
        }
        if md.mode() & 0o077 != 0 || !md.is_file() {
            return Err(SecretError::Exposed { path: path.to_path_buf(), mode: md.mode() & 0o7777 });
        }
        let mut text = String::new();
        Read::by_ref(&mut f).take(256).read_to_string(&mut text).map_err(io)?;
        Secret::from_hex(text.trim()).ok_or_else(|| SecretError::Malformed { path: path.to_path_buf() })
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Secret> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(s, &mut bytes).ok()?;
        Some(Secret(bytes))
    }

    /// The raw bytes (a pre-shared key).
    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The computation's membership key: what agents hold.
    pub fn agent_key(&self) -> [u8; 32] {
        blake3::derive_key(AGENT_KEY_CONTEXT, &self.0)
    }

    /// [`Secret::agent_key`] as 64 hex digits, for
    /// [`ckpt_wire::agent::ENV_AGENT_KEY`].
    pub fn agent_key_hex(&self) -> String {
        hex::encode(self.agent_key())
    }
}

/// Compares two keys in time that does not depend on where they differ.
pub fn keys_equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Fills `buf` from the kernel's CSPRNG (`getrandom(2)`, blocking until it
/// is seeded).
pub fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: writes at most buf.len() - done bytes into buf[done..].
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn made_private_then_read_back() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/coord.key");
        let a = Secret::load_or_create(&p).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(p.parent().unwrap()).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(Secret::load_or_create(&p).unwrap(), a);
        assert_ne!(a.agent_key(), *a.bytes());
    }

    #[test]
    fn exposed_symlinked_or_malformed_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("coord.key");
        Secret::load_or_create(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(Secret::load(&p), Err(SecretError::Exposed { .. })));
        let l = d.path().join("link");
        std::os::unix::fs::symlink(&p, &l).unwrap();
        assert!(matches!(Secret::load(&l), Err(SecretError::Io { .. })));
        let m = d.path().join("bad");
        std::fs::write(&m, "zz").unwrap();
        std::fs::set_permissions(&m, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(Secret::load(&m), Err(SecretError::Malformed { .. })));
    }
}
