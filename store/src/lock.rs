//! The locks of a store: the writer's `flock` on `<root>/lock` (one
//! writer per directory, so per host for an S3 store's cache), the owner
//! lock on `<root>/owner` (one computation per store), and the
//! rate-limited taking of the S3 writer lock ([`crate::remote_lock`]).
//!
//! A `flock` dies with its holder, so no lock here outlives a crash. This
//! module must never wait without bound (every wait has a deadline and
//! then names the holder), and must never take the S3 lock for a writer
//! that does not hold the local one first.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use nix::fcntl::{Flock, FlockArg};

use crate::error::IoCtx;
use crate::remote::Remote;
use crate::remote_lock::{self, RemoteLock};
use crate::store::Inner;
use crate::{Result, Store, StoreError, now_ms, private};

/// A mutex's guard, taken even if an earlier holder panicked (a panic
/// ends the process's checkpoint or restart; the guarded state is only
/// ever read or replaced whole).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How often a writer waiting for the S3 lock asks S3 again.
const LOCK_POLL: std::time::Duration = std::time::Duration::from_millis(500);

impl Inner {
    /// Take the S3 writer lock, or [`StoreError::Locked`] naming its
    /// holder (asking S3 at most every [`LOCK_POLL`] while refused).
    pub(crate) fn take_remote_lock(&self, r: &Arc<Remote>) -> Result<RemoteLock> {
        let mut last = lock(&self.lock_refused);
        if let Some((t, store, holder)) = last.as_ref()
            && t.elapsed() < LOCK_POLL
        {
            return Err(StoreError::Locked { store: store.clone(), holder: holder.clone() });
        }
        match RemoteLock::acquire(r) {
            Err(StoreError::Locked { store, holder }) => {
                *last = Some((std::time::Instant::now(), store.clone(), holder.clone()));
                Err(StoreError::Locked { store, holder })
            }
            other => {
                *last = None;
                other
            }
        }
    }
}

/// How long opening an S3 store waits for another process that fills a
/// fresh cache (it downloads one catalog).
pub(crate) const CACHE_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// [`lock_dir`], waiting up to `limit` while another process holds it.
pub(crate) fn lock_dir_wait(dir: &Path, limit: std::time::Duration) -> Result<Flock<File>> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        match lock_dir(dir) {
            Err(StoreError::Locked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            r => return r,
        }
    }
}

/// Take the exclusive `flock` on `<dir>/lock` and write our pid into it;
/// [`StoreError::Locked`] if another process holds it.
pub(crate) fn lock_dir(dir: &Path) -> Result<Flock<File>> {
    let lock_path = dir.join("lock");
    let file = private::file_options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .ctx(|| format!("open lock file {}", lock_path.display()))?;
    let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut s = String::new();
            let _ = file.read_to_string(&mut s);
            let pid = s.trim();
            return Err(StoreError::Locked {
                store: dir.display().to_string(),
                holder: format!(
                    "pid {}, from the lock file",
                    if pid.is_empty() { "unknown" } else { pid }
                ),
            });
        }
        Err((_, e)) => {
            return Err(StoreError::io(
                format!("lock {}", lock_path.display()),
                std::io::Error::from(e),
            ));
        }
    };
    lock.set_len(0)
        .and_then(|_| lock.rewind())
        .and_then(|_| writeln!(lock, "{}", std::process::id()))
        .ctx(|| format!("write pid to lock file {}", lock_path.display()))?;
    Ok(lock)
}

/// The owner lock of a store: the one computation (coordinator) it
/// serves, for that coordinator's whole life (see [`Store::claim_owner`]).
/// Released when dropped or when the process dies, so a dead owner never
/// blocks the next one.
#[derive(Debug)]
pub struct OwnerLock {
    _lock: Flock<File>,
    path: PathBuf,
}

impl OwnerLock {
    /// The owner file (`<root>/owner`).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// How long [`Store::claim_owner`] waits for an owner that is exiting
/// (a `ckpt quit` just before a new coordinator starts).
const OWNER_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

impl Store {
    /// Claim the store for one computation: an exclusive `flock` on
    /// `<root>/owner` (0600; for an S3 store, in its cache, so it guards one
    /// host), which then names this process: `owner` (e.g. the
    /// coordinator's address), pid, host and time. Held until the lock is
    /// dropped or the process ends (no stale lock survives its holder).
    /// [`StoreError::Owned`] naming the holder if another process has it
    /// (after waiting a few seconds for one that is exiting). Independent
    /// of the writer lock: `ckpt gc` still runs between checkpoints.
    pub fn claim_owner(&self, owner: &str) -> Result<OwnerLock> {
        let path = self.inner.root.join("owner");
        let deadline = std::time::Instant::now() + OWNER_WAIT;
        loop {
            let file = private::file_options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
                .open(&path)
                .ctx(|| format!("open the owner file {}", path.display()))?;
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(mut l) => {
                    let desc = format!(
                        "{owner}, pid {}, host {}, since {} ms after the epoch",
                        std::process::id(),
                        remote_lock::hostname(),
                        now_ms()
                    );
                    l.set_len(0)
                        .and_then(|_| l.rewind())
                        .and_then(|_| writeln!(l, "{desc}"))
                        .and_then(|_| l.sync_all())
                        .ctx(|| format!("write the owner file {}", path.display()))?;
                    tracing::debug!(store = %self.url(), owner = %desc, "store claimed");
                    return Ok(OwnerLock { _lock: l, path });
                }
                Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                    if std::time::Instant::now() < deadline {
                        std::thread::sleep(std::time::Duration::from_millis(100));
                        continue;
                    }
                    let mut s = String::new();
                    let _ = file.read_to_string(&mut s);
                    let holder = s.trim().chars().take(512).collect::<String>();
                    return Err(StoreError::Owned {
                        store: self.url(),
                        holder: if holder.is_empty() { format!("unnamed, see {}", path.display()) } else { holder },
                    });
                }
                Err((_, e)) => return Err(StoreError::io(format!("lock {}", path.display()), std::io::Error::from(e))),
            }
        }
    }
}
