//! The ckpt chunk store: content-addressed blobs in pack files, indexed by a
//! SQLite catalog that also records the committed generations.
//!
//! A store is a directory (`file:///abs/path` or a plain path):
//!
//! ```text
//! <root>/catalog.db              SQLite (WAL), PRAGMA user_version = schema version
//! <root>/packs/<hh>/<hex>.pack   immutable pack files (see [`pack`])
//! <root>/tmp/                    packs being written
//! <root>/lock                    flock'd by the one writer; holds its pid
//! ```
//!
//! Reading ([`Store`]) needs no lock. Writing goes through one [`Writer`] at a
//! time (an exclusive `flock` on `<root>/lock`). Crash safety: a pack is
//! complete and durable before the catalog names it, and a generation (its
//! packs, blobs and row) is committed in one SQLite transaction, so a crash
//! leaves every earlier generation intact and no partial one visible (at
//! worst, orphan pack files that nothing references).
//!
//! A store can also live in S3-compatible object storage
//! (`s3://BUCKET/PREFIX`, see [`remote`]): it is then a local store in a
//! cache directory whose packs and catalog are uploaded after every commit
//! (packs first), and whose reads fetch just the blobs they need with ranged
//! GETs. [`remote::push`] and [`remote::pull`] copy whole stores between a
//! directory and S3. Its writers also hold a lock object on S3
//! ([`remote_lock`]: a conditional PUT with a lease) so that writers on
//! different hosts never both commit; maintenance ([`maintenance`]) works
//! on the cache and is published packs first, then the catalog, and only
//! then are unreferenced packs deleted from S3. Verification of an S3 store
//! reads S3, not the cache.
//!
//! This crate must never know about processes, memory layouts or image
//! manifests: it stores opaque blobs and generation rows that point at a
//! manifest blob.

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod error;
pub mod private;
pub mod seal;
pub mod pack;
pub mod remote;
pub mod remote_lock;

mod catalog;
pub mod maintenance;
pub mod migrate;
mod read_many;
pub use read_many::{BATCH_BLOBS, BlobReader};

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use nix::fcntl::{Flock, FlockArg};
use rayon::prelude::*;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::{Deserialize, Serialize};

pub use catalog::SCHEMA_VERSION;
pub use ckpt_chunker::Hash;
pub use error::{Result, StoreError};
/// The SQLite binding used by the catalog (for [`Writer::with_transaction`]).
pub use rusqlite;

use error::{IoCtx, SqlCtx};
use pack::{FinishedPack, OpenPack, PackEntry};
use remote::Remote;
use remote_lock::RemoteLock;

/// Default chunk size of a new store: one page, the granularity of dirty
/// tracking, so an incremental checkpoint stores only the pages that changed
/// (BENCHMARKS.md: 16 KiB chunks stored ~4x the changed bytes at 1% random).
pub const DEFAULT_CHUNK_SIZE: usize = 4096;
/// Largest accepted chunk size.
pub const MAX_CHUNK_SIZE: usize = 64 << 20;
/// Above this many blobs, `read_blobs` scans the index once instead of
/// looking each blob up.
const BULK_LOCATE: usize = 4096;
/// Default target size of a pack file; a pack is also closed at every commit.
pub const DEFAULT_PACK_TARGET: u64 = 32 << 20;

/// What a blob is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[repr(u8)]
pub enum BlobKind {
    /// A chunk of memory (or file) contents.
    Chunk = 0,
    /// Metadata: manifests, chunk lists.
    Meta = 1,
}

impl BlobKind {
    /// Decode the on-disk value.
    pub fn from_u8(v: u8) -> Option<BlobKind> {
        match v {
            0 => Some(BlobKind::Chunk),
            1 => Some(BlobKind::Meta),
            _ => None,
        }
    }
}

/// A committed generation (one row of the catalog).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenerationInfo {
    /// Generation number (ascending, never reused).
    pub id: u64,
    /// Generation this one is incremental to, if any.
    pub parent: Option<u64>,
    /// When the checkpoint started (ms since the Unix epoch).
    pub created_ms: i64,
    /// How long the checkpoint took.
    pub duration_ms: u64,
    /// Number of processes in the image.
    pub nprocs: u32,
    /// Size of the image (uncompressed, all chunks including known ones).
    pub logical_bytes: u64,
    /// Uncompressed bytes of the blobs this generation added to the store.
    pub new_bytes: u64,
    /// Compressed bytes this generation added to the store.
    pub stored_bytes: u64,
    /// Dirty-tracking backend used.
    pub dirty_tracking: String,
    /// Address of the generation's manifest blob.
    pub manifest: Hash,
    /// Free-form details (JSON); `null` if none.
    pub info: serde_json::Value,
}

/// What the caller supplies to [`Writer::commit`]; the store fills in the id,
/// `new_bytes` and `stored_bytes`.
#[derive(Clone, Debug)]
pub struct NewGeneration {
    /// See [`GenerationInfo::parent`]; must exist if set.
    pub parent: Option<u64>,
    /// See [`GenerationInfo::created_ms`].
    pub created_ms: i64,
    /// See [`GenerationInfo::duration_ms`].
    pub duration_ms: u64,
    /// See [`GenerationInfo::nprocs`].
    pub nprocs: u32,
    /// See [`GenerationInfo::logical_bytes`].
    pub logical_bytes: u64,
    /// See [`GenerationInfo::dirty_tracking`].
    pub dirty_tracking: String,
    /// Manifest blob; must have been put (now or earlier).
    pub manifest: Hash,
    /// See [`GenerationInfo::info`].
    pub info: serde_json::Value,
}

/// Totals over the whole store.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StoreStats {
    /// Committed generations.
    pub generations: u64,
    /// Pack files named by the catalog.
    pub packs: u64,
    /// Size of those pack files (including headers and trailers).
    pub pack_bytes: u64,
    /// Blobs in the catalog.
    pub blobs: u64,
    /// Compressed bytes of all blobs.
    pub stored_bytes: u64,
    /// Uncompressed bytes of all blobs.
    pub logical_bytes: u64,
}

/// Result of [`Store::verify`].
#[derive(Clone, Debug, Default, Serialize)]
pub struct VerifyReport {
    /// Pack files checked.
    pub packs: u64,
    /// Blobs that decompressed and hashed correctly.
    pub blobs: u64,
    /// Their uncompressed bytes.
    pub bytes: u64,
    /// Everything wrong, one sentence each (naming the pack and blob).
    pub problems: Vec<String>,
    /// Pack files on disk that the catalog does not name (harmless).
    pub orphan_packs: Vec<PathBuf>,
}

impl VerifyReport {
    /// True if no problem was found (orphans are not problems).
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Options of a [`Writer`].
#[derive(Clone, Copy, Debug)]
pub struct WriterOptions {
    /// A pack is closed once it reaches this many bytes.
    pub pack_target: u64,
    /// zstd level.
    pub level: i32,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            pack_target: DEFAULT_PACK_TARGET,
            level: ckpt_chunker::DEFAULT_LEVEL,
        }
    }
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Inner {
    root: PathBuf,
    catalog_path: PathBuf,
    chunk_size: usize,
    conn: Mutex<Connection>,
    /// The S3 side of an `s3://` store (`root` is then its cache).
    remote: Option<Arc<Remote>>,
    /// The keys of a sealed store (see [`seal`]), and the key file.
    keys: Option<(Arc<seal::Keys>, PathBuf)>,
    /// The last refusal of the S3 writer lock (when, store, holder): polls
    /// within [`LOCK_POLL`] of it are answered without asking S3 again.
    lock_refused: Mutex<Option<(std::time::Instant, String, String)>>,
}

/// How often a writer waiting for the S3 lock asks S3 again.
const LOCK_POLL: std::time::Duration = std::time::Duration::from_millis(500);

impl Inner {
    fn conn(&self) -> MutexGuard<'_, Connection> {
        lock(&self.conn)
    }

    /// The stored address of the blob whose BLAKE3 is `h` (itself in an
    /// unsealed store; [`Hash::ZERO_CHUNK`] stays itself).
    fn addr(&self, h: &Hash) -> Hash {
        match &self.keys {
            Some((k, _)) if !h.is_zero_chunk() => k.address(h),
            _ => *h,
        }
    }

    fn url(&self) -> String {
        match &self.remote {
            Some(r) => r.url().to_string(),
            None => format!("file://{}", self.root.display()),
        }
    }

    fn tampered(&self, what: String) -> StoreError {
        StoreError::Tampered { store: self.url(), what }
    }

    /// A generation row checked against its MAC (in a sealed store).
    fn checked(&self, row: GenRow) -> Result<GenerationInfo> {
        if let Some((k, _)) = &self.keys {
            let want = k.generation_mac(&row.info, row.info_text.as_deref());
            if row.mac.as_deref() != Some(&want[..]) {
                return Err(self.tampered(gen_row_problem(&row)));
            }
        }
        Ok(row.info)
    }

    /// Replay check of a sealed store against the head record beside its
    /// key, which then names the newest generation seen.
    fn check_head(&self) -> Result<()> {
        let Some((_, key_file)) = &self.keys else { return Ok(()) };
        let newest = self.newest_authentic()?;
        let head = seal::read_head(key_file)?;
        let found = newest.as_ref().map_or(0, |g| g.0.id);
        if let Some((hid, hmac)) = head {
            if found < hid {
                // Rows at or above the head that fail their MAC: tampering
                // (refused wherever they are read, named by verify), not
                // a replay; the head stays.
                let conn = self.conn();
                let tampered_above = conn
                    .prepare_cached("SELECT 1 FROM generations WHERE id >= ?1")
                    .db(&self.catalog_path)?
                    .exists([hid as i64])
                    .db(&self.catalog_path)?;
                if tampered_above {
                    return Ok(());
                }
                return Err(StoreError::Replayed { store: self.url(), found, head: hid, head_path: seal::head_path(key_file) });
            }
            if let Some((g, mac)) = &newest
                && g.id == hid
            {
                if *mac != hmac {
                    return Err(self.tampered(format!("generation {hid} is not the one committed or seen on this machine (its MAC differs from the head record {})", seal::head_path(key_file).display())));
                }
                return Ok(());
            }
        }
        self.write_head()
    }

    /// The newest generation whose row is authentic (rows that are not are
    /// refused wherever they are read, and named by verify).
    fn newest_authentic(&self) -> Result<Option<(GenerationInfo, [u8; 32])>> {
        let conn = self.conn();
        let mut st = conn.prepare_cached(&format!("{GEN_SELECT} ORDER BY id DESC")).db(&self.catalog_path)?;
        let mut rows = st.query([]).db(&self.catalog_path)?;
        while let Some(r) = rows.next().db(&self.catalog_path)? {
            if let Ok(row) = row_to_gen(r) {
                let mac = row.mac.as_deref().and_then(|m| <[u8; 32]>::try_from(m).ok()).unwrap_or_default();
                if let Ok(g) = self.checked(row) {
                    return Ok(Some((g, mac)));
                }
            }
        }
        Ok(None)
    }

    /// Record the newest generation in the head record (sealed stores).
    /// Not from an S3 store's cache that holds commits S3 lacks: they may
    /// yet be dropped (another writer moved on), and the head must never
    /// name a generation S3 does not have.
    fn write_head(&self) -> Result<()> {
        let Some((_, key_file)) = &self.keys else { return Ok(()) };
        if self.remote.is_some() && remote::is_unsynced(&self.root) {
            return Ok(());
        }
        match self.newest_authentic()? {
            Some((g, mac)) => seal::write_head(key_file, g.id, &mac),
            None => Ok(()),
        }
    }

    /// Take the S3 writer lock, or [`StoreError::Locked`] naming its
    /// holder (asking S3 at most every [`LOCK_POLL`] while refused).
    fn take_remote_lock(&self, r: &Arc<Remote>) -> Result<RemoteLock> {
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

    /// Close the catalog, run `f` (which may replace the file), reopen it.
    fn with_catalog_closed<R>(&self, f: impl FnOnce() -> Result<R>) -> Result<R> {
        let mut conn = self.conn();
        let placeholder = Connection::open_in_memory().db(&self.catalog_path)?;
        drop(std::mem::replace(&mut *conn, placeholder));
        let r = f();
        let (c, _) = catalog::open(&self.catalog_path, None)?;
        *conn = c;
        r
    }
}

/// How long opening an S3 store waits for another process that fills a
/// fresh cache (it downloads one catalog).
const CACHE_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// [`lock_dir`], waiting up to `limit` while another process holds it.
fn lock_dir_wait(dir: &Path, limit: std::time::Duration) -> Result<Flock<File>> {
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

/// Where a blob lives.
#[derive(Clone, Debug)]
struct Loc {
    /// The blob's BLAKE3 if the reader knows it (then checked after
    /// opening), else its stored address.
    hash: Hash,
    /// Its stored address (the catalog's and the trailer's).
    addr: Hash,
    pack: String,
    offset: u64,
    clen: u32,
    ulen: u32,
}

/// Read side of a store. `Send + Sync`; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("root", &self.inner.root)
            .field("chunk_size", &self.inner.chunk_size)
            .finish()
    }
}

/// Turn a store URL into a directory path.
pub fn parse_url(url: &str) -> Result<PathBuf> {
    let unsupported = |reason: &str| StoreError::Unsupported {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let path = if let Some(rest) = url.strip_prefix("file://") {
        if !rest.starts_with('/') {
            return Err(unsupported(
                "file:// URLs need an absolute path (file:///abs/path)",
            ));
        }
        PathBuf::from(rest)
    } else if url.starts_with("s3://") {
        return Err(unsupported(
            "S3 stores have no local directory of their own: open them with Store::open (the cache directory is Store::root)",
        ));
    } else if let Some((scheme, _)) = url.split_once("://") {
        return Err(unsupported(&format!(
            "unknown scheme {scheme:?}: use a directory path or file:///path"
        )));
    } else if url.is_empty() {
        return Err(unsupported("empty store path"));
    } else {
        PathBuf::from(url)
    };
    std::path::absolute(&path).ctx(|| format!("resolve store path {}", path.display()))
}

/// Refuses a store directory (or one on its path) this user may not read:
/// without this, another user's private store looked like "not a store".
fn check_readable(root: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let denied = |e: &std::io::Error| e.kind() == std::io::ErrorKind::PermissionDenied;
    let probe = match fs::metadata(root) {
        Ok(md) if md.is_dir() => fs::read_dir(root).err(),
        Ok(_) => None,
        Err(e) => Some(e),
    };
    match probe {
        Some(e) if denied(&e) => {
            // The directory itself, or the nearest ancestor this user can
            // see (the one that keeps it out), names the owner.
            let (owner, mode) = root.ancestors().find_map(|a| fs::metadata(a).ok()).map(|m| (m.uid(), m.mode() & 0o7777)).unwrap_or((u32::MAX, 0));
            Err(StoreError::NotReadable { path: root.to_path_buf(), owner, mode, me: nix::unistd::geteuid().as_raw() })
        }
        _ => Ok(()),
    }
}

fn dir_is_empty(p: &Path) -> Result<bool> {
    Ok(fs::read_dir(p)
        .ctx(|| format!("list {}", p.display()))?
        .next()
        .is_none())
}

impl Store {
    /// Open an existing store.
    pub fn open(url: &str) -> Result<Store> {
        if remote::is_s3_url(url) {
            return Self::open_s3(url, None);
        }
        let root = parse_url(url)?;
        check_readable(&root)?;
        if !root.exists() {
            return Err(StoreError::NoSuchStore { path: root });
        }
        if !root.is_dir() || !root.join("catalog.db").is_file() {
            return Err(StoreError::NotAStore { path: root });
        }
        Self::finish_open(root, None, None)
    }

    /// Open (or create) `s3://BUCKET/PREFIX`: bring the cache's catalog up
    /// to date with the remote one (unless a local writer holds the cache,
    /// whose catalog is then the newest), open it, and for a new store
    /// upload the empty catalog (so a missing bucket or bad credentials show
    /// at once).
    fn open_s3(url: &str, create: Option<usize>) -> Result<Store> {
        Self::open_s3_at(url, None, create)
    }

    /// Open an `s3://` store with an explicit cache directory (`None`: the
    /// default, see [`remote`]); `create` as in [`Store::open_or_create`].
    pub fn open_s3_at(url: &str, cache: Option<PathBuf>, create: Option<usize>) -> Result<Store> {
        let remote = Arc::new(Remote::connect_with_cache(url, cache)?);
        let cache = remote.cache_dir().to_path_buf();
        private::create_dir_all(&cache)
            .ctx(|| format!("create cache directory {} of {url}", cache.display()))?;
        let guard = match lock_dir(&cache) {
            Ok(g) => Some(g),
            // Held by another process of this host: a writer, whose
            // catalog is the newest; or, in a cache without a catalog yet
            // (a fresh host), a reader downloading it: wait for that one
            // (opening now would find no catalog file).
            Err(StoreError::Locked { .. }) if !cache.join("catalog.db").exists() => Some(lock_dir_wait(&cache, CACHE_LOCK_WAIT)?),
            Err(StoreError::Locked { .. }) => None,
            Err(e) => return Err(e),
        };
        let mut fresh = false;
        if guard.is_some() && remote.prepare_cache()? == remote::CacheState::NoRemoteStore {
            if create.is_none() {
                return Err(remote::RemoteError::NoSuchStore {
                    url: remote.url().to_string(),
                    object: remote.object_url(remote::CATALOG_OBJECT),
                }
                .into());
            }
            // A catalog left from a remote store that is gone is stale.
            for f in ["catalog.db", "catalog.db-wal", "catalog.db-shm", "synced-etag"] {
                let _ = fs::remove_file(cache.join(f));
            }
            fresh = true;
        }
        let store = Self::finish_open(cache, create, Some(remote.clone()))?;
        if fresh {
            let created = {
                let conn = store.inner.conn();
                remote.create_catalog(&conn, &store.inner.catalog_path)?
            };
            if created {
                tracing::info!(store = url, "new store created on S3");
            } else {
                tracing::info!(store = url, "another writer created the store on S3 meanwhile: using its catalog");
                store.inner.with_catalog_closed(|| remote.prepare_cache().map(|_| ()))?;
            }
        }
        drop(guard);
        Ok(store)
    }

    /// Open a store, creating it (directory and catalog) if it does not exist
    /// or is an empty directory. `chunk_size` (a multiple of 4096, see
    /// [`DEFAULT_CHUNK_SIZE`]) applies to a new store only: an existing store
    /// keeps its own (see [`Store::chunk_size`]).
    pub fn open_or_create(url: &str, chunk_size: usize) -> Result<Store> {
        Self::open_or_create_with(url, chunk_size, !seal::unsealed_requested())
    }

    /// [`Store::open_or_create`]; a new local store is sealed if `sealed`
    /// (the default is sealed unless `CKPT_UNSEALED=1`; an unsealed store
    /// is neither encrypted nor authenticated: for measuring, see
    /// BENCHMARKS.md). An `s3://` store follows the default.
    pub fn open_or_create_with(url: &str, chunk_size: usize, sealed: bool) -> Result<Store> {
        if chunk_size == 0 || !chunk_size.is_multiple_of(4096) || chunk_size > MAX_CHUNK_SIZE {
            return Err(StoreError::InvalidChunkSize {
                size: chunk_size,
                default: DEFAULT_CHUNK_SIZE,
            });
        }
        if remote::is_s3_url(url) {
            return Self::open_s3(url, Some(chunk_size));
        }
        let root = parse_url(url)?;
        check_readable(&root)?;
        if !root.exists() {
            private::create_dir_all(&root)
                .ctx(|| format!("create store directory {}", root.display()))?;
        } else if !root.is_dir() || (!root.join("catalog.db").exists() && !dir_is_empty(&root)?) {
            return Err(StoreError::NotAStore { path: root });
        }
        let store = Self::finish_open_with(root, Some(chunk_size), None, sealed)?;
        if store.inner.chunk_size != chunk_size {
            tracing::debug!(
                store = %store.inner.root.display(),
                requested = chunk_size,
                actual = store.inner.chunk_size,
                "existing store keeps its chunk size"
            );
        }
        Ok(store)
    }

    fn finish_open(root: PathBuf, create: Option<usize>, remote: Option<Arc<Remote>>) -> Result<Store> {
        Self::finish_open_with(root, create, remote, !seal::unsealed_requested())
    }

    fn finish_open_with(root: PathBuf, create: Option<usize>, remote: Option<Arc<Remote>>, sealed: bool) -> Result<Store> {
        let catalog_path = root.join("catalog.db");
        private::tighten(&root)?;
        let (conn, chunk_size) = catalog::open_with(&catalog_path, create, sealed)?;
        for d in ["packs", "tmp"] {
            let p = root.join(d);
            if !p.is_dir() {
                private::create_dir_all(&p).ctx(|| format!("create {}", p.display()))?;
            }
        }
        let url = match &remote {
            Some(r) => r.url().to_string(),
            None => format!("file://{}", root.display()),
        };
        let keys = load_keys(&conn, &catalog_path, &url)?;
        tracing::debug!(store = %root.display(), chunk_size, sealed = keys.is_some(), "store opened");
        let store = Store {
            inner: Arc::new(Inner {
                root,
                catalog_path,
                chunk_size,
                conn: Mutex::new(conn),
                remote,
                keys,
                lock_refused: Mutex::new(None),
            }),
        };
        store.inner.check_head()?;
        Ok(store)
    }

    pub(crate) fn keys(&self) -> Option<&seal::Keys> {
        self.inner.keys.as_ref().map(|(k, _)| &**k)
    }

    /// Whether the store is sealed (its blobs encrypted and its catalog
    /// authenticated with a key kept outside it, see [`seal`]).
    pub fn is_sealed(&self) -> bool {
        self.inner.keys.is_some()
    }

    /// The stored address of the blob whose BLAKE3 is `h` (the address the
    /// catalog's blob rows and [`Store::blob_rows`] use; `h` itself in an
    /// unsealed store).
    pub fn address(&self, h: &Hash) -> Hash {
        self.inner.addr(h)
    }

    /// The store's key as the text of a key file (`ckpt key export`);
    /// `None` for an unsealed store.
    pub fn export_key(&self) -> Option<String> {
        self.inner.keys.as_ref().map(|(k, _)| seal::export_text(k))
    }

    /// The store id (the catalog's `meta.store_id`).
    pub fn store_id(&self) -> Result<String> {
        let conn = self.inner.conn();
        catalog_meta(&conn, &self.inner.catalog_path, "store_id")?
            .ok_or_else(|| StoreError::BadCatalog { path: self.inner.catalog_path.clone(), reason: "meta.store_id missing".into() })
    }

    /// The store's directory (for an S3 store, its local cache).
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The store's URL: `s3://BUCKET/PREFIX` or `file:///path`.
    pub fn url(&self) -> String {
        match &self.inner.remote {
            Some(r) => r.url().to_string(),
            None => format!("file://{}", self.inner.root.display()),
        }
    }

    /// The S3 side of an `s3://` store.
    pub fn remote(&self) -> Option<&Remote> {
        self.inner.remote.as_deref()
    }

    /// Write a consistent, self-contained copy of the catalog (`VACUUM
    /// INTO`) into directory `dir`; returns its path.
    pub fn snapshot_catalog(&self, dir: &Path) -> Result<PathBuf> {
        let conn = self.inner.conn();
        remote::snapshot_catalog(&conn, &self.inner.catalog_path, dir)
    }

    /// Path of the SQLite catalog (for tools such as gc that need queries
    /// this API does not offer; take a [`Writer`] before modifying it).
    pub fn catalog_path(&self) -> &Path {
        &self.inner.catalog_path
    }

    /// Path of pack file `name` (64 hex digits).
    pub fn pack_path(&self, name: &str) -> PathBuf {
        pack::pack_path(&self.inner.root, name)
    }

    /// Chunk size of this store (bytes).
    pub fn chunk_size(&self) -> usize {
        self.inner.chunk_size
    }

    /// All committed generations, ascending by id.
    pub fn generations(&self) -> Result<Vec<GenerationInfo>> {
        let conn = self.inner.conn();
        let mut st = conn
            .prepare_cached(&format!("{GEN_SELECT} ORDER BY id"))
            .db(&self.inner.catalog_path)?;
        let rows = st.query_map([], row_to_gen).db(&self.inner.catalog_path)?;
        let rows = rows.collect::<rusqlite::Result<Vec<_>>>().db(&self.inner.catalog_path)?;
        rows.into_iter().map(|r| self.inner.checked(r)).collect()
    }

    /// The generations whose rows are authentic, ascending by id, and one
    /// sentence for each row that is not (edited, forged: see
    /// [`Store::generations`], which refuses the lot for one such row).
    pub fn authentic_generations(&self) -> Result<(Vec<GenerationInfo>, Vec<String>)> {
        let conn = self.inner.conn();
        let p = &self.inner.catalog_path;
        let mut st = conn.prepare_cached(&format!("{GEN_SELECT} ORDER BY id")).db(p)?;
        let mut rows = st.query([]).db(p)?;
        let (mut good, mut bad) = (Vec::new(), Vec::new());
        while let Some(r) = rows.next().db(p)? {
            match row_to_gen(r) {
                Ok(row) => match self.inner.checked(row) {
                    Ok(g) => good.push(g),
                    Err(StoreError::Tampered { what, .. }) => bad.push(what),
                    Err(e) => bad.push(e.to_string()),
                },
                Err(e) => bad.push(format!("generation {}: its catalog row cannot be read ({e}): altered", r.get::<_, i64>(0).unwrap_or(-1))),
            }
        }
        Ok((good, bad))
    }

    /// Folds the write-ahead log into the catalog file (for a clean
    /// shutdown: the catalog is then one self-contained file).
    pub fn checkpoint_wal(&self) -> Result<()> {
        let conn = self.inner.conn();
        // A reader in another process can make the checkpoint report busy:
        // try again for a while.
        for _ in 0..100 {
            let busy: i64 = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0)).db(&self.inner.catalog_path)?;
            if busy == 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Ok(())
    }

    /// One committed generation.
    pub fn generation(&self, id: u64) -> Result<GenerationInfo> {
        let found = {
            let conn = self.inner.conn();
            let mut st = conn
                .prepare_cached(&format!("{GEN_SELECT} WHERE id = ?1"))
                .db(&self.inner.catalog_path)?;
            st.query_row([id as i64], row_to_gen)
                .optional()
                .db(&self.inner.catalog_path)?
        };
        match found {
            Some(g) => self.inner.checked(g),
            None => {
                let ids: Vec<u64> = self.generations()?.iter().map(|g| g.id).collect();
                Err(StoreError::GenerationNotFound {
                    id,
                    path: self.inner.root.clone(),
                    existing: describe_ids(&ids),
                })
            }
        }
    }

    /// The newest committed generation, if any.
    pub fn latest(&self) -> Result<Option<GenerationInfo>> {
        let conn = self.inner.conn();
        let mut st = conn
            .prepare_cached(&format!("{GEN_SELECT} ORDER BY id DESC LIMIT 1"))
            .db(&self.inner.catalog_path)?;
        let row = st.query_row([], row_to_gen).optional().db(&self.inner.catalog_path)?;
        drop(st);
        drop(conn);
        row.map(|r| self.inner.checked(r)).transpose()
    }

    /// Whether the catalog holds blob `h` (always true for
    /// [`Hash::ZERO_CHUNK`]).
    pub fn contains(&self, h: &Hash) -> Result<bool> {
        if h.is_zero_chunk() {
            return Ok(true);
        }
        let conn = self.inner.conn();
        let mut st = conn
            .prepare_cached("SELECT 1 FROM blobs WHERE hash = ?1")
            .db(&self.inner.catalog_path)?;
        st.exists([&self.inner.addr(h).0[..]]).db(&self.inner.catalog_path)
    }

    fn locate(&self, conn: &Connection, h: &Hash) -> Result<Loc> {
        let mut st = conn
            .prepare_cached(
                "SELECT p.name, b.offset, b.clen, b.ulen FROM blobs b \
                 JOIN packs p ON p.id = b.pack_id WHERE b.hash = ?1",
            )
            .db(&self.inner.catalog_path)?;
        let addr = self.inner.addr(h);
        st.query_row([&addr.0[..]], |r| {
            Ok(Loc {
                hash: *h,
                addr,
                pack: r.get(0)?,
                offset: r.get::<_, i64>(1)? as u64,
                clen: r.get::<_, i64>(2)? as u32,
                ulen: r.get::<_, i64>(3)? as u32,
            })
        })
        .optional()
        .db(&self.inner.catalog_path)?
        .ok_or_else(|| StoreError::BlobNotFound {
            hash: *h,
            path: self.inner.root.clone(),
        })
        .and_then(|loc| {
            private::check_pack_name(&loc.pack, &self.inner.catalog_path)?;
            Ok(loc)
        })
    }

    /// Decompress and verify one blob's stored bytes.
    fn decode(&self, loc: &Loc, stored: &[u8]) -> Result<Vec<u8>> {
        let corrupt = |reason: String| StoreError::Corrupt {
            pack: self.pack_path(&loc.pack),
            hash: loc.hash,
            reason,
        };
        let Some((k, _)) = &self.inner.keys else {
            return ckpt_chunker::decode(stored, loc.ulen as usize, &loc.hash).map_err(|e| corrupt(e.to_string()));
        };
        let mut plain = Vec::with_capacity(stored.len());
        let raw = k.open_into(&loc.addr, stored, &mut plain).map_err(corrupt)?;
        let data = if raw {
            plain.remove(0);
            if plain.len() != loc.ulen as usize {
                return Err(corrupt(format!("it is {} bytes, the catalog says {}", plain.len(), loc.ulen)));
            }
            plain
        } else {
            ckpt_chunker::decompress(&plain[1..], loc.ulen as usize).map_err(|e| corrupt(e.to_string()))?
        };
        if loc.hash != loc.addr {
            let actual = Hash::of(&data);
            if actual != loc.hash {
                return Err(corrupt(format!("its bytes hash to {actual}, not to its address")));
            }
        }
        Ok(data)
    }

    /// Like `decode`, naming the S3 object in errors.
    fn decode_remote(&self, r: &Remote, loc: &Loc, stored: &[u8]) -> Result<Vec<u8>> {
        self.decode(loc, stored).map_err(|e| match e {
            StoreError::Corrupt { hash, reason, .. } => StoreError::Corrupt {
                pack: PathBuf::from(r.object_url(&Remote::pack_rel(&loc.pack))),
                hash,
                reason,
            },
            e => e,
        })
    }

    /// Read one blob (decompressed and verified). [`Hash::ZERO_CHUNK`] reads
    /// as `chunk_size` zero bytes.
    pub fn read_blob(&self, h: &Hash) -> Result<Vec<u8>> {
        if h.is_zero_chunk() {
            return Ok(vec![0; self.inner.chunk_size]);
        }
        let loc = {
            let conn = self.inner.conn();
            self.locate(&conn, h)?
        };
        let path = self.pack_path(&loc.pack);
        if let Some(r) = self.inner.remote.as_deref().filter(|_| !path.exists()) {
            let rel = Remote::pack_rel(&loc.pack);
            let range = loc.offset..loc.offset + loc.clen as u64;
            let got = r.get_ranges(&rel, std::slice::from_ref(&range))?;
            return self.decode_remote(r, &loc, &got[0]);
        }
        let f = open_pack(&path, h)?;
        let mut buf = vec![0u8; loc.clen as usize];
        f.read_exact_at(&mut buf, loc.offset).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                StoreError::Corrupt {
                    pack: path.clone(),
                    hash: *h,
                    reason: "pack file is truncated".into(),
                }
            } else {
                StoreError::io(format!("read pack file {}", path.display()), e)
            }
        })?;
        self.decode(&loc, &buf)
    }

    /// Read many blobs in parallel and hand each to `sink` (from rayon
    /// threads, in no particular order). Blobs are grouped by pack; each pack
    /// file is opened and mapped once; every blob is verified. Duplicates in
    /// `hashes` are allowed: `sink` is called once per distinct hash.
    /// [`Hash::ZERO_CHUNK`] is passed as `chunk_size` zero bytes. All
    /// locations are looked up first, so a blob missing from the catalog is
    /// reported before any byte is read. Stops at the first error (of the
    /// store or of `sink`).
    pub fn read_blobs(
        &self,
        hashes: &[Hash],
        sink: impl Fn(&Hash, &[u8]) -> Result<()> + Sync,
    ) -> Result<()> {
        let mut uniq: Vec<Hash> = hashes.to_vec();
        uniq.sort_unstable();
        uniq.dedup();
        let has_zero = uniq.first().is_some_and(|h| h.is_zero_chunk());
        let mut groups: BTreeMap<String, Vec<Loc>> = BTreeMap::new();
        {
            let conn = self.inner.conn();
            if uniq.len() > BULK_LOCATE {
                // Many blobs (a restart): one pass over the index beats a
                // lookup per blob.
                let wanted: std::collections::HashMap<Hash, Hash> =
                    uniq.iter().filter(|h| !h.is_zero_chunk()).map(|h| (self.inner.addr(h), *h)).collect();
                let mut found = 0usize;
                let mut st = conn
                    .prepare("SELECT b.hash, p.name, b.offset, b.clen, b.ulen FROM blobs b JOIN packs p ON p.id = b.pack_id")
                    .db(&self.inner.catalog_path)?;
                let mut rows = st.query([]).db(&self.inner.catalog_path)?;
                while let Some(r) = rows.next().db(&self.inner.catalog_path)? {
                    let raw: Vec<u8> = r.get(0).db(&self.inner.catalog_path)?;
                    let Some(addr) = Hash::from_slice(&raw) else { continue };
                    let Some(&hash) = wanted.get(&addr) else {
                        continue;
                    };
                    found += 1;
                    let loc = Loc {
                        hash,
                        addr,
                        pack: r.get(1).db(&self.inner.catalog_path)?,
                        offset: r.get::<_, i64>(2).db(&self.inner.catalog_path)? as u64,
                        clen: r.get::<_, i64>(3).db(&self.inner.catalog_path)? as u32,
                        ulen: r.get::<_, i64>(4).db(&self.inner.catalog_path)? as u32,
                    };
                    private::check_pack_name(&loc.pack, &self.inner.catalog_path)?;
                    groups.entry(loc.pack.clone()).or_default().push(loc);
                }
                if found < wanted.len() {
                    let located: std::collections::HashSet<Hash> = groups.values().flatten().map(|l| l.hash).collect();
                    let missing = wanted.values().find(|h| !located.contains(h)).copied().unwrap_or_default();
                    return Err(StoreError::BlobNotFound { hash: missing, path: self.inner.root.clone() });
                }
            } else {
                for h in uniq.iter().filter(|h| !h.is_zero_chunk()) {
                    let loc = self.locate(&conn, h)?;
                    groups.entry(loc.pack.clone()).or_default().push(loc);
                }
            }
        }
        if has_zero {
            sink(&Hash::ZERO_CHUNK, &vec![0u8; self.inner.chunk_size])?;
        }
        if let Some(r) = self.inner.remote.as_deref() {
            // Packs not in the cache: ranged GETs of just these blobs, a few
            // packs at a time (bounded memory), decoded in parallel.
            let far: Vec<(String, Vec<Loc>)> = {
                let names: Vec<String> = groups
                    .keys()
                    .filter(|n| !self.pack_path(n).exists())
                    .cloned()
                    .collect();
                names
                    .into_iter()
                    .map(|n| {
                        let locs = groups.remove(&n).unwrap_or_default();
                        (n, locs)
                    })
                    .collect()
            };
            for batch in far.chunks(remote::CONCURRENCY) {
                let work: Vec<(String, Vec<std::ops::Range<u64>>)> = batch
                    .iter()
                    .map(|(n, locs)| {
                        let ranges = locs
                            .iter()
                            .map(|l| l.offset..l.offset + l.clen as u64)
                            .collect();
                        (Remote::pack_rel(n), ranges)
                    })
                    .collect();
                let fetched = r.get_ranges_many(&work)?;
                batch
                    .par_iter()
                    .zip(fetched.par_iter())
                    .try_for_each(|((_, locs), bufs)| {
                        locs.par_iter().zip(bufs.par_iter()).try_for_each(|(loc, b)| {
                            let data = self.decode_remote(r, loc, b)?;
                            sink(&loc.hash, &data)
                        })
                    })?;
            }
        }
        groups.into_par_iter().try_for_each(|(name, mut locs)| {
            locs.sort_unstable_by_key(|l| l.offset);
            let path = self.pack_path(&name);
            let f = open_pack(&path, &locs[0].hash)?;
            #[allow(unsafe_code)]
            // SAFETY: pack files are immutable once renamed into place; no
            // ckpt process writes to or truncates a named pack (gc deletes or
            // replaces whole files, which keeps the mapped inode alive). The
            // map is only read, and every blob read from it is verified.
            let map = unsafe { memmap2::Mmap::map(&f) }
                .ctx(|| format!("map pack file {}", path.display()))?;
            locs.par_iter().with_min_len(16).try_for_each(|loc| {
                let end = loc.offset + loc.clen as u64;
                if end > map.len() as u64 {
                    return Err(StoreError::Corrupt {
                        pack: path.clone(),
                        hash: loc.hash,
                        reason: "pack file is truncated".into(),
                    });
                }
                let data = self.decode(loc, &map[loc.offset as usize..end as usize])?;
                sink(&loc.hash, &data)
            })
        })
    }

    /// Take the writer lock and return the one [`Writer`] (default options).
    pub fn writer(&self) -> Result<Writer> {
        self.writer_with(WriterOptions::default())
    }

    /// Like [`Store::writer`], with options (pack target size, zstd level).
    pub fn writer_with(&self, opts: WriterOptions) -> Result<Writer> {
        Writer::new(self.inner.clone(), opts)
    }

    /// Check the whole store (the work behind `ckpt verify`): every pack the
    /// catalog names exists, has the recorded size, is named by its BLAKE3
    /// and has a trailer that agrees with the catalog; every blob
    /// decompresses and hashes to its address; every generation's manifest
    /// is in the catalog. Pack files on disk that the catalog does not name
    /// (left by a crash or an abort) are listed as orphans: harmless, gc
    /// may delete them. For an `s3://` store every pack is downloaded from
    /// S3 and checked, and the orphans are the pack objects on S3 that the
    /// catalog does not name. Returns `Err` only if the check itself cannot run.
    pub fn verify(&self) -> Result<VerifyReport> {
        let p = &self.inner.catalog_path;
        let (packs, mut by_pack, manifests) = {
            let conn = self.inner.conn();
            let mut st = conn.prepare("SELECT id, name, size FROM packs").db(p)?;
            let packs: Vec<(i64, String, u64)> = st
                .query_map([], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64))
                })
                .db(p)?
                .collect::<rusqlite::Result<_>>()
                .db(p)?;
            for (_, name, _) in &packs {
                private::check_pack_name(name, p)?;
            }
            let mut by_pack: BTreeMap<i64, Vec<Loc>> = BTreeMap::new();
            let mut st = conn
                .prepare("SELECT hash, pack_id, offset, clen, ulen FROM blobs")
                .db(p)?;
            let mut rows = st.query([]).db(p)?;
            while let Some(r) = rows.next().db(p)? {
                let hb: Vec<u8> = r.get(0).db(p)?;
                let hash = Hash::from_slice(&hb).unwrap_or(Hash::ZERO_CHUNK);
                by_pack.entry(r.get(1).db(p)?).or_default().push(Loc {
                    hash,
                    addr: hash,
                    pack: String::new(),
                    offset: r.get::<_, i64>(2).db(p)? as u64,
                    clen: r.get::<_, i64>(3).db(p)? as u32,
                    ulen: r.get::<_, i64>(4).db(p)? as u32,
                });
            }
            let manifests = self.generation_problems(&conn)?;
            (packs, by_pack, manifests)
        };
        let mut problems: Vec<String> = manifests;
        let known_ids: HashSet<i64> = packs.iter().map(|x| x.0).collect();
        for (id, locs) in &by_pack {
            if !known_ids.contains(id) {
                problems.push(format!(
                    "{} blobs (e.g. {}) point to pack id {id}, which the catalog does not have",
                    locs.len(),
                    locs[0].hash
                ));
            }
        }
        let work: Vec<(String, u64, Vec<Loc>)> = packs
            .into_iter()
            .map(|(id, name, size)| {
                let mut locs = by_pack.remove(&id).unwrap_or_default();
                for l in &mut locs {
                    l.pack = name.clone();
                }
                (name, size, locs)
            })
            .collect();
        let results: Vec<(u64, u64, Vec<String>)> = match self.inner.remote.as_deref() {
            // On S3: every pack downloaded whole (a few at a time) and
            // checked like a local one.
            Some(r) => {
                let mut out = Vec::with_capacity(work.len());
                for batch in work.chunks(remote::CONCURRENCY / 2) {
                    let rels: Vec<String> = batch.iter().map(|w| Remote::pack_rel(&w.0)).collect();
                    let got = r.get_many(&rels);
                    out.par_extend(batch.par_iter().zip(got.into_par_iter()).map(|((name, size, locs), got)| match got {
                        Ok(bytes) => self.verify_pack_bytes(name, *size, &bytes, locs),
                        Err(e) => (0, 0, vec![format!("{e} ({} blobs){}", locs.len(), self.unsynced_note(name))]),
                    }));
                }
                out
            }
            None => work
                .par_iter()
                .map(|(name, size, locs)| self.verify_pack(name, *size, locs))
                .collect(),
        };
        let mut report = VerifyReport {
            packs: work.len() as u64,
            ..Default::default()
        };
        for (blobs, bytes, probs) in results {
            report.blobs += blobs;
            report.bytes += bytes;
            problems.extend(probs);
        }
        if self.inner.remote.is_some() {
            report.orphan_packs = self.remote_orphan_packs()?.into_iter().map(|(n, _)| PathBuf::from(self.pack_location(&n))).collect();
            report.problems = problems;
            return Ok(report);
        }
        let named: HashSet<PathBuf> = work.iter().map(|w| self.pack_path(&w.0)).collect();
        if let Ok(dirs) = fs::read_dir(self.inner.root.join("packs")) {
            for d in dirs.flatten() {
                if let Ok(files) = fs::read_dir(d.path()) {
                    for f in files.flatten() {
                        if !named.contains(&f.path()) {
                            report.orphan_packs.push(f.path());
                        }
                    }
                }
            }
        }
        report.orphan_packs.sort();
        report.problems = problems;
        Ok(report)
    }

    /// Every generation row checked: its MAC (in a sealed store) and that
    /// its manifest is in the catalog; one sentence per problem.
    pub(crate) fn generation_problems(&self, conn: &Connection) -> Result<Vec<String>> {
        let p = &self.inner.catalog_path;
        let mut st = conn.prepare(&format!("{GEN_SELECT} ORDER BY id")).db(p)?;
        let mut rows = st.query([]).db(p)?;
        let mut has = conn.prepare("SELECT 1 FROM blobs WHERE hash = ?1").db(p)?;
        let mut problems = Vec::new();
        while let Some(r) = rows.next().db(p)? {
            let row = match row_to_gen(r) {
                Ok(row) => row,
                Err(e) => {
                    let id: i64 = r.get(0).unwrap_or(-1);
                    problems.push(format!("generation {id}: its catalog row cannot be read ({e}): altered"));
                    continue;
                }
            };
            let id = row.info.id;
            let manifest = row.info.manifest;
            if let Err(e) = self.inner.checked(row) {
                problems.push(match e {
                    StoreError::Tampered { what, .. } => what,
                    e => e.to_string(),
                });
                continue;
            }
            if !has.exists([&self.inner.addr(&manifest).0[..]]).db(p)? {
                problems.push(format!("generation {id}: manifest blob {manifest} is not in the catalog"));
            }
        }
        Ok(problems)
    }

    /// For a pack missing from S3 that the cache holds while its commits
    /// are not uploaded: a note saying so (else empty).
    pub(crate) fn unsynced_note(&self, name: &str) -> String {
        if self.inner.remote.is_some() && remote::is_unsynced(&self.inner.root) && self.pack_path(name).exists() {
            format!(
                " (the local cache {} holds it: its last commits are not uploaded yet; the next writer on this host, a checkpoint or `ckpt gc`, uploads them)",
                self.inner.root.display()
            )
        } else {
            String::new()
        }
    }

    /// Verify one pack: returns (blobs checked, uncompressed bytes, problems).
    fn verify_pack(&self, name: &str, size: u64, locs: &[Loc]) -> (u64, u64, Vec<String>) {
        let path = self.pack_path(name);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) => {
                return (0, 0, vec![format!(
                    "pack file {} ({} blobs) cannot be read: {e}",
                    path.display(),
                    locs.len()
                )]);
            }
        };
        self.verify_pack_bytes(name, size, &bytes, locs)
    }

    /// Verify the bytes of one pack (read from disk or S3): size, name,
    /// trailer, every blob.
    fn verify_pack_bytes(&self, name: &str, size: u64, bytes: &[u8], locs: &[Loc]) -> (u64, u64, Vec<String>) {
        let remote = self.inner.remote.as_deref();
        let (label, path) = match remote {
            Some(_) => (format!("pack {}", self.pack_location(name)), PathBuf::from(self.pack_location(name))),
            None => (format!("pack file {}", self.pack_path(name).display()), self.pack_path(name)),
        };
        let mut probs = Vec::new();
        if bytes.len() as u64 != size {
            probs.push(format!(
                "{label} is {} bytes, the catalog says {size}",
                bytes.len()
            ));
        }
        if blake3::hash(bytes).to_hex().as_str() != name {
            probs.push(format!("{label} does not hash to its name"));
        }
        match pack::parse_index(bytes) {
            Err(e) => probs.push(format!("{label}: {e}")),
            Ok(entries) => {
                let idx: std::collections::HashMap<Hash, pack::PackEntry> =
                    entries.into_iter().map(|e| (e.hash, e)).collect();
                for l in locs {
                    let agrees = idx
                        .get(&l.hash)
                        .is_some_and(|e| (e.offset, e.clen, e.ulen) == (l.offset, l.clen, l.ulen));
                    if !agrees {
                        probs.push(format!(
                            "{label}: trailer does not agree with the catalog about blob {}",
                            l.hash
                        ));
                    }
                }
            }
        }
        let (mut n, mut total) = (0u64, 0u64);
        for l in locs {
            let end = l.offset + l.clen as u64;
            let r = if end > bytes.len() as u64 {
                Err(StoreError::Corrupt {
                    pack: path.clone(),
                    hash: l.hash,
                    reason: "pack file is truncated".into(),
                })
            } else {
                let stored = &bytes[l.offset as usize..end as usize];
                match remote {
                    Some(r) => self.decode_remote(r, l, stored),
                    None => self.decode(l, stored),
                }
            };
            match r {
                Ok(_) => {
                    n += 1;
                    total += l.ulen as u64;
                }
                Err(e) => probs.push(e.to_string()),
            }
        }
        (n, total, probs)
    }

    /// Totals over the whole store.
    pub fn stats(&self) -> Result<StoreStats> {
        let conn = self.inner.conn();
        let p = &self.inner.catalog_path;
        let (packs, pack_bytes): (i64, i64) = conn
            .query_row(
                "SELECT count(*), coalesce(sum(size),0) FROM packs",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .db(p)?;
        let (blobs, stored, logical): (i64, i64, i64) = conn
            .query_row(
                "SELECT count(*), coalesce(sum(clen),0), coalesce(sum(ulen),0) FROM blobs",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .db(p)?;
        let generations: i64 = conn
            .query_row("SELECT count(*) FROM generations", [], |r| r.get(0))
            .db(p)?;
        Ok(StoreStats {
            generations: generations as u64,
            packs: packs as u64,
            pack_bytes: pack_bytes as u64,
            blobs: blobs as u64,
            stored_bytes: stored as u64,
            logical_bytes: logical as u64,
        })
    }
}

fn open_pack(path: &Path, h: &Hash) -> Result<File> {
    File::open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            StoreError::MissingPack {
                pack: path.to_path_buf(),
                hash: *h,
            }
        } else {
            StoreError::io(format!("open pack file {}", path.display()), e)
        }
    })
}

const GEN_SELECT: &str = "SELECT id, parent, created_ms, duration_ms, nprocs, logical_bytes, \
     new_bytes, stored_bytes, dirty_tracking, manifest, info, mac FROM generations";

/// A generation row as read, with its MAC (not yet checked).
struct GenRow {
    info: GenerationInfo,
    /// `info` exactly as the catalog holds it (the MAC covers this text).
    info_text: Option<String>,
    mac: Option<Vec<u8>>,
}

/// What is wrong with a generation row whose MAC does not match.
fn gen_row_problem(row: &GenRow) -> String {
    match &row.mac {
        None => format!("generation {}: its catalog row has no MAC: it was forged (or written without the key)", row.info.id),
        Some(_) => format!(
            "generation {}: its catalog row does not match its MAC: it was edited, swapped or re-parented (manifest {}, parent {})",
            row.info.id,
            row.info.manifest,
            row.info.parent.map_or("none".to_string(), |p| p.to_string())
        ),
    }
}

/// A `meta` value.
fn catalog_meta(conn: &Connection, p: &Path, key: &str) -> Result<Option<String>> {
    conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0)).optional().db(p)
}

/// The keys of the store whose catalog is `conn`: `None` if it is not
/// sealed, else from its key file (refused if missing or not its key).
fn load_keys(conn: &Connection, p: &Path, url: &str) -> Result<Option<(Arc<seal::Keys>, PathBuf)>> {
    let id = catalog_meta(conn, p, "store_id")?
        .ok_or_else(|| StoreError::BadCatalog { path: p.to_path_buf(), reason: "meta.store_id missing".into() })?;
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(StoreError::BadCatalog { path: p.to_path_buf(), reason: format!("meta.store_id {id:?} is not a store id") });
    }
    let scheme = catalog_meta(conn, p, "sealed")?;
    let path = seal::key_path(&id);
    let file = seal::read_key_file(&path)?;
    let scheme = match (scheme, &file) {
        (None, None) => {
            tracing::warn!(store = url, "store is not sealed (made before ckpt sealed stores, or with CKPT_UNSEALED=1): anyone who can read it reads the programs' memory, and anyone who can write it can forge an image; seal it with `ckpt store seal --store {url}`");
            return Ok(None);
        }
        // A key for this store id exists: the store was sealed, and a
        // catalog that says otherwise was altered (a downgrade).
        (None, Some((fid, _))) if *fid == id => {
            return Err(StoreError::Tampered {
                store: url.to_string(),
                what: format!("the catalog says the store is not sealed, but this machine holds its key ({}): its sealing was removed", path.display()),
            });
        }
        (None, Some(_)) => return Ok(None),
        (Some(s), _) => s,
    };
    if !seal::SCHEMES.contains(&scheme.as_str()) {
        return Err(StoreError::BadCatalog { path: p.to_path_buf(), reason: format!("sealed with {scheme:?}, which this ckpt does not know (it knows {:?})", seal::SCHEMES) });
    }
    let (fid, master) = match file {
        Some(f) => f,
        None => {
            // A seal interrupted after its catalog commit: its key is
            // still beside its place (see [`migrate`]).
            let pending = migrate::pending_path(&path);
            match seal::read_key_file(&pending)? {
                Some((pid, m)) if pid == id => {
                    fs::rename(&pending, &path).ctx(|| format!("move the key {} to {}", pending.display(), path.display()))?;
                    (pid, m)
                }
                _ => return Err(StoreError::NoKey { store: url.to_string(), id, path }),
            }
        }
    };
    if fid != id {
        return Err(StoreError::WrongKey { store: url.to_string(), id, path });
    }
    let keys = seal::Keys::for_scheme(&id, master, &scheme)?;
    if catalog_meta(conn, p, "key_check")?.as_deref() != Some(keys.check_value().as_str()) {
        return Err(StoreError::WrongKey { store: url.to_string(), id, path });
    }
    Ok(Some((Arc::new(keys), path)))
}

fn row_to_gen(r: &rusqlite::Row<'_>) -> rusqlite::Result<GenRow> {
    let manifest: Vec<u8> = r.get(9)?;
    let manifest = Hash::from_slice(&manifest).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            9,
            rusqlite::types::Type::Blob,
            "manifest hash is not 32 bytes".into(),
        )
    })?;
    let info_text: Option<String> = r.get(10)?;
    let info = match &info_text {
        Some(s) => serde_json::from_str(s).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(10, rusqlite::types::Type::Text, e.into())
        })?,
        None => serde_json::Value::Null,
    };
    let info = GenerationInfo {
        id: r.get::<_, i64>(0)? as u64,
        parent: r.get::<_, Option<i64>>(1)?.map(|p| p as u64),
        created_ms: r.get(2)?,
        duration_ms: r.get::<_, i64>(3)? as u64,
        nprocs: r.get::<_, i64>(4)? as u32,
        logical_bytes: r.get::<_, i64>(5)? as u64,
        new_bytes: r.get::<_, i64>(6)? as u64,
        stored_bytes: r.get::<_, i64>(7)? as u64,
        dirty_tracking: r.get(8)?,
        manifest,
        info,
    };
    Ok(GenRow { info, info_text, mac: r.get(11)? })
}

/// "generations 1-3, 5" / "no generations (the store is empty)".
fn describe_ids(ids: &[u64]) -> String {
    if ids.is_empty() {
        return "no generations (the store is empty)".into();
    }
    let mut parts = Vec::new();
    let mut i = 0;
    while i < ids.len() {
        let mut j = i;
        while j + 1 < ids.len() && ids[j + 1] == ids[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            ids[i].to_string()
        } else {
            format!("{}-{}", ids[i], ids[j])
        });
        i = j + 1;
    }
    format!("generations {}", parts.join(", "))
}

/// The hashes a writer knows. A BLAKE3 address is uniformly distributed
/// already: a word of it, mixed with a per-process secret (so that a
/// program cannot choose pages that collide in the table), is the
/// hash-table key. With SipHash over all 32 bytes a lookup took 1.5 µs at
/// 10 M blobs (BENCHMARKS.md, bench-catalog; this hasher's figure is not
/// measured yet).
type KnownSet = HashSet<Hash, KnownHash>;

/// The [`std::hash::BuildHasher`] of a [`KnownSet`].
#[derive(Clone)]
struct KnownHash(u64);

impl Default for KnownHash {
    fn default() -> Self {
        use std::hash::BuildHasher;
        KnownHash(std::collections::hash_map::RandomState::new().hash_one(0x636b_7074u64) | 1)
    }
}

impl std::hash::BuildHasher for KnownHash {
    type Hasher = PrefixHasher;
    fn build_hasher(&self) -> PrefixHasher {
        PrefixHasher(self.0, 0)
    }
}

/// [`std::hash::Hasher`] of a [`Hash`]: its words folded, then keyed.
struct PrefixHasher(u64, u64);

impl std::hash::Hasher for PrefixHasher {
    fn finish(&self) -> u64 {
        (self.1 ^ self.0).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29) ^ self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // `Hash` hashes as its [u8; 32]: a length prefix, then the bytes.
        for c in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            self.1 = self.1.rotate_left(5) ^ u64::from_le_bytes(w);
        }
    }
}

/// Blobs written since the last commit.
#[derive(Default)]
struct Pending {
    open: Option<OpenPack>,
    /// Packs written whole, being made durable in a thread each
    /// ([`pack::SealedPack::persist`]); [`Writer::commit`] waits for them.
    sealing: Vec<(Vec<PackEntry>, std::thread::JoinHandle<std::io::Result<FinishedPack>>)>,
    finished: Vec<FinishedPack>,
    hashes: Vec<Hash>,
    new_bytes: u64,
    stored_bytes: u64,
}

/// Where a capture puts its blobs: the store's [`Writer`] in the process
/// that owns it, or a connection to that process from a capture helper on
/// another host. `Sync`: captures put from many threads at once.
pub trait BlobSink: Sync {
    /// Whether blob `h` is surely in the store (or put in this round); a
    /// false answer may be wrong the safe way (the blob is stored again).
    fn known(&self, h: &Hash) -> bool;
    /// For each hash, whether the store lacks it: [`BlobSink::known`] asked
    /// in one go (one round trip for a remote sink).
    fn missing(&self, hashes: &[Hash]) -> Result<Vec<bool>> {
        Ok(hashes.iter().map(|h| !self.known(h)).collect())
    }
    /// Stores blob `data` whose BLAKE3 is `h`; false if it was known.
    fn put(&self, kind: BlobKind, h: Hash, data: &[u8]) -> Result<bool>;
    /// Hashes `data`, stores it as a [`BlobKind::Meta`] blob, returns its hash.
    fn put_meta(&self, data: &[u8]) -> Result<Hash> {
        let h = Hash::of(data);
        self.put(BlobKind::Meta, h, data)?;
        Ok(h)
    }
}

impl BlobSink for Writer {
    fn known(&self, h: &Hash) -> bool {
        Writer::known(self, h)
    }
    fn put(&self, kind: BlobKind, h: Hash, data: &[u8]) -> Result<bool> {
        Writer::put(self, kind, h, data)
    }
    fn put_meta(&self, data: &[u8]) -> Result<Hash> {
        Writer::put_meta(self, data)
    }
}

/// The one writer of a store (holds the exclusive lock on `<root>/lock`
/// until dropped). `Send + Sync`: [`Writer::put`] may be called from many
/// threads at once. Dropping a writer with uncommitted blobs aborts them.
pub struct Writer {
    inner: Arc<Inner>,
    opts: WriterOptions,
    /// The S3 writer lock of an `s3://` store (released before the flock).
    remote_lock: Option<RemoteLock>,
    _lock: Flock<File>,
    known: RwLock<KnownSet>,
    pending: Mutex<Pending>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("root", &self.inner.root)
            .field("next_id", &self.next_id)
            .finish()
    }
}

impl Writer {
    fn new(inner: Arc<Inner>, opts: WriterOptions) -> Result<Writer> {
        let lock = lock_dir(&inner.root)?;
        let remote_lock = match &inner.remote {
            Some(r) => Some(inner.take_remote_lock(r)?),
            None => None,
        };
        if let (Some(r), Some(rl)) = (inner.remote.as_deref(), remote_lock.as_ref()) {
            // Under both locks: first upload what an earlier commit could
            // not (unless another writer changed the remote since: then
            // those unacknowledged local commits are dropped), else pick up
            // a catalog another host committed meanwhile.
            if remote::is_unsynced(&inner.root) && r.moved_since_sync()? {
                let ids = |s: &Store| s.generations().map(|g| g.iter().map(|g| g.id).collect::<Vec<_>>());
                let local = ids(&Store { inner: inner.clone() })?;
                remote::clear_unsynced(&inner.root)?;
                inner.with_catalog_closed(|| r.prepare_cache().map(|_| ()))?;
                let now = ids(&Store { inner: inner.clone() })?;
                let dropped: Vec<u64> = local.into_iter().filter(|g| !now.contains(g)).collect();
                tracing::warn!(
                    store = r.url(),
                    cache = %inner.root.display(),
                    dropped = %describe_ids(&dropped),
                    "the local cache held commits that were never uploaded, and another writer has changed the store on S3 since: took the S3 catalog, dropped the local-only commits"
                );
            } else if remote::is_unsynced(&inner.root) {
                let conn = inner.conn();
                r.sync_up(&conn, &inner.catalog_path, rl)?;
            } else if r.remote_changed()? {
                inner.with_catalog_closed(|| r.prepare_cache().map(|_| ()))?;
            }
            inner.check_head()?;
        }

        // Leftovers of a crashed writer: nothing references them.
        let tmp = inner.root.join("tmp");
        if let Ok(rd) = fs::read_dir(&tmp) {
            for e in rd.flatten() {
                tracing::debug!(file = %e.path().display(), "removing stale temporary file");
                let _ = fs::remove_file(e.path());
            }
        }

        let (known, next_id) = load_known(&inner.conn(), &inner.catalog_path)?;
        tracing::debug!(store = %inner.root.display(), blobs = known.len(), next_id, "writer ready");
        Ok(Writer {
            inner,
            opts,
            remote_lock,
            _lock: lock,
            known: RwLock::new(known),
            pending: Mutex::new(Pending::default()),
            next_id: AtomicU64::new(next_id),
        })
    }

    /// Id the next [`Writer::commit`] will get: one more than the largest id
    /// ever committed (ids are never reused, even after gc); 1 for a new store.
    pub fn next_generation_id(&self) -> u64 {
        self.next_id.load(Ordering::SeqCst)
    }

    /// Whether blob `h` is in the store or was put since the last commit
    /// (true for [`Hash::ZERO_CHUNK`]). Answered from memory.
    pub fn known(&self, h: &Hash) -> bool {
        h.is_zero_chunk() || self.known_addr(&self.inner.addr(h))
    }

    /// Whether the blob stored at address `a` is known.
    fn known_addr(&self, a: &Hash) -> bool {
        self.known.read().unwrap_or_else(|e| e.into_inner()).contains(a)
    }

    /// `bytes` (raw, or a zstd frame) as stored at `addr`: sealed in a
    /// sealed store, as they are otherwise.
    fn stored_form<'a>(&self, addr: &Hash, raw: bool, bytes: &'a [u8]) -> std::borrow::Cow<'a, [u8]> {
        match &self.inner.keys {
            Some((k, _)) => std::borrow::Cow::Owned(k.seal(addr, raw, bytes)),
            None => std::borrow::Cow::Borrowed(bytes),
        }
    }

    /// Store blob `data` whose BLAKE3 is `h` (the caller computed it).
    /// Returns false without doing anything if it is already known or is
    /// [`Hash::ZERO_CHUNK`]; otherwise compresses it (outside any lock),
    /// appends it to the open pack and returns true. Blobs become visible to
    /// readers at [`Writer::commit`].
    pub fn put(&self, kind: BlobKind, h: Hash, data: &[u8]) -> Result<bool> {
        if h.is_zero_chunk() {
            return Ok(false);
        }
        let a = self.inner.addr(&h);
        if self.known_addr(&a) {
            return Ok(false);
        }
        debug_assert_eq!(h, Hash::of(data), "put: hash does not match data");
        let ulen = u32::try_from(data.len()).map_err(|_| {
            StoreError::Invalid(format!(
                "blob {h} is {} bytes; the limit is 4 GiB",
                data.len()
            ))
        })?;
        let stored = ckpt_chunker::encode(data, self.opts.level);
        let raw = matches!(stored, ckpt_chunker::Encoded::Raw(_));
        let sealed = self.stored_form(&a, raw, stored.bytes());
        self.append(kind, a, &sealed, ulen)
    }

    /// Store a blob that was compressed elsewhere (by a capture helper on
    /// another host): `compressed` is the zstd frame of `ulen` bytes whose
    /// BLAKE3 is `h`. The frame is decompressed and the hash checked before
    /// anything is written, so a faulty sender cannot put wrong bytes under a
    /// hash. Returns false if the blob is already known.
    pub fn put_compressed(&self, kind: BlobKind, h: Hash, compressed: &[u8], ulen: u32) -> Result<bool> {
        if h.is_zero_chunk() {
            return Ok(false);
        }
        let a = self.inner.addr(&h);
        if self.known_addr(&a) {
            return Ok(false);
        }
        ckpt_chunker::decode(compressed, ulen as usize, &h).map_err(|e| {
            StoreError::Invalid(format!("blob sent for storing as {h} is not its bytes ({e}): the sender is faulty"))
        })?;
        // The rule of `ckpt_chunker::decode`: raw if as long as the data
        // and its hash.
        let raw = compressed.len() == ulen as usize && Hash::of(compressed) == h;
        let sealed = self.stored_form(&a, raw, compressed);
        self.append(kind, a, &sealed, ulen)
    }

    /// Appends a stored blob (compressed, and sealed in a sealed store) at
    /// address `h` to the open pack (unless another thread put it
    /// meanwhile).
    fn append(&self, kind: BlobKind, h: Hash, compressed: &[u8], ulen: u32) -> Result<bool> {
        let mut p = lock(&self.pending);
        if self.known_addr(&h) {
            return Ok(false); // another thread put it meanwhile
        }
        let tmp = self.inner.root.join("tmp");
        if p.open.is_none() {
            p.open = Some(
                OpenPack::create(&tmp)
                    .ctx(|| format!("create a pack file in {}", tmp.display()))?,
            );
        }
        let open = p.open.as_mut().expect("open pack");
        if let Err(e) = open.append(kind, h, compressed, ulen) {
            self.drop_open_pack(&mut p);
            return Err(StoreError::io(
                format!("write pack file in {}", tmp.display()),
                e,
            ));
        }
        let full = open.len() >= self.opts.pack_target;
        self.known
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(h);
        p.hashes.push(h);
        p.new_bytes += ulen as u64;
        p.stored_bytes += compressed.len() as u64;
        if full {
            self.close_pack(&mut p)?;
        }
        Ok(true)
    }

    /// Hash `data`, store it as a [`BlobKind::Meta`] blob, return its hash.
    pub fn put_meta(&self, data: &[u8]) -> Result<Hash> {
        let h = Hash::of(data);
        self.put(BlobKind::Meta, h, data)?;
        Ok(h)
    }

    /// (uncompressed, compressed) bytes of the blobs put since the last
    /// commit.
    pub fn pending_stats(&self) -> (u64, u64) {
        let p = lock(&self.pending);
        (p.new_bytes, p.stored_bytes)
    }

    /// Forget the open pack after a write error: its blobs are not stored.
    fn drop_open_pack(&self, p: &mut Pending) {
        if let Some(open) = p.open.take() {
            let lost: HashSet<Hash> = open.entries.iter().map(|e| e.hash).collect();
            let mut known = self.known.write().unwrap_or_else(|e| e.into_inner());
            for e in &open.entries {
                known.remove(&e.hash);
                p.new_bytes -= e.ulen as u64;
                p.stored_bytes -= e.clen as u64;
            }
            p.hashes.retain(|h| !lost.contains(h));
            open.discard();
        }
    }

    /// Seal the open pack (trailer written, no fsync) and make it durable
    /// and put it in place in a thread of its own, so that puts go on
    /// while the disk writes: [`Writer::settle`] collects the result.
    fn close_pack(&self, p: &mut Pending) -> Result<()> {
        let Some(open) = p.open.take() else {
            return Ok(());
        };
        let entries = open.entries.clone();
        let sealed = match open.seal() {
            Ok(s) => s,
            Err(e) => {
                self.forget(p, &entries);
                return Err(StoreError::io(format!("finish a pack file in {}", self.inner.root.join("tmp").display()), e));
            }
        };
        let root = self.inner.root.clone();
        match std::thread::Builder::new().name("ckpt-pack-sync".into()).spawn(move || sealed.persist(&root)) {
            Ok(h) => p.sealing.push((entries, h)),
            Err(e) => {
                self.forget(p, &entries);
                return Err(StoreError::io("start a thread to write a pack file".to_string(), e));
            }
        }
        Ok(())
    }

    /// The blobs of a pack that was lost are not stored after all.
    fn forget(&self, p: &mut Pending, entries: &[PackEntry]) {
        let lost: HashSet<Hash> = entries.iter().map(|e| e.hash).collect();
        let mut known = self.known.write().unwrap_or_else(|e| e.into_inner());
        for e in entries {
            known.remove(&e.hash);
            p.new_bytes -= e.ulen as u64;
            p.stored_bytes -= e.clen as u64;
        }
        p.hashes.retain(|h| !lost.contains(h));
    }

    /// Wait for the packs being made durable: each is then finished, or
    /// forgotten (its blobs no longer pending) with the first error.
    fn settle(&self, p: &mut Pending) -> Result<()> {
        let mut first = None;
        for (entries, h) in std::mem::take(&mut p.sealing) {
            let r = h.join().unwrap_or_else(|_| Err(std::io::Error::other("the thread writing it panicked")));
            match r {
                Ok(f) => {
                    tracing::debug!(pack = %f.path.display(), blobs = f.entries.len(), size = f.size, "pack written");
                    p.finished.push(f);
                }
                Err(e) => {
                    self.forget(p, &entries);
                    first.get_or_insert(StoreError::io(format!("finish a pack file in {}", self.inner.root.join("packs").display()), e));
                }
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Make everything put since the last commit durable and visible, as
    /// generation [`Writer::next_generation_id`]: closes the open pack
    /// (fsync + rename), then inserts the packs, blobs and generation row in
    /// one SQLite transaction. The manifest must have been put (now or in an
    /// earlier generation) and the parent, if any, must exist. On error
    /// nothing is visible; the pending blobs stay pending (retry or abort).
    pub fn commit(&self, g: NewGeneration) -> Result<GenerationInfo> {
        let mut p = lock(&self.pending);
        if g.manifest.is_zero_chunk() || !self.known(&g.manifest) {
            return Err(StoreError::Invalid(format!(
                "generation manifest {} was never put into the store",
                g.manifest
            )));
        }
        self.close_pack(&mut p)?;
        self.settle(&mut p)?;
        if self.inner.remote.is_some() {
            remote::mark_unsynced(&self.inner.root)?;
        }
        let id = self.next_generation_id();
        let row_mac;
        let info = GenerationInfo {
            id,
            parent: g.parent,
            created_ms: g.created_ms,
            duration_ms: g.duration_ms,
            nprocs: g.nprocs,
            logical_bytes: g.logical_bytes,
            new_bytes: p.new_bytes,
            stored_bytes: p.stored_bytes,
            dirty_tracking: g.dirty_tracking,
            manifest: g.manifest,
            info: g.info,
        };
        {
            let path = &self.inner.catalog_path;
            let mut conn = self.inner.conn();
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .db(path)?;
            if let Some(parent) = info.parent {
                let exists = tx
                    .prepare_cached("SELECT 1 FROM generations WHERE id = ?1")
                    .db(path)?
                    .exists([parent as i64])
                    .db(path)?;
                if !exists {
                    return Err(StoreError::Invalid(format!(
                        "parent generation {parent} of the new generation does not exist"
                    )));
                }
            }
            let now = now_ms();
            {
                let mut ins_pack = tx
                    .prepare_cached(
                        "INSERT INTO packs(name, size, nblobs, created) VALUES (?1, ?2, ?3, ?4)",
                    )
                    .db(path)?;
                let mut ins_blob = tx
                    .prepare_cached(
                        "INSERT OR IGNORE INTO blobs(hash, pack_id, offset, clen, ulen, kind) \
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    )
                    .db(path)?;
                // Rows in hash order: the blob index is a B-tree keyed by
                // hash, and random-order inserts touched a page each
                // (docs/design.md, "The catalog at scale").
                let mut rows: Vec<(&PackEntry, i64)> = Vec::with_capacity(p.finished.iter().map(|f| f.entries.len()).sum());
                for f in &p.finished {
                    ins_pack
                        .execute(params![f.name, f.size as i64, f.entries.len() as i64, now])
                        .db(path)?;
                    let pack_id = tx.last_insert_rowid();
                    rows.extend(f.entries.iter().map(|e| (e, pack_id)));
                }
                rows.sort_unstable_by_key(|(e, _)| e.hash);
                for (e, pack_id) in rows {
                    ins_blob
                        .execute(params![
                            &e.hash.0[..],
                            pack_id,
                            e.offset as i64,
                            e.clen as i64,
                            e.ulen as i64,
                            e.kind as u8 as i64
                        ])
                        .db(path)?;
                }
            }
            let info_json = seal::info_text(&info.info);
            let mac = self.inner.keys.as_ref().map(|(k, _)| k.generation_mac(&info, info_json.as_deref()));
            row_mac = mac;
            tx.execute(
                "INSERT INTO generations(id, parent, created_ms, duration_ms, nprocs, \
                 logical_bytes, new_bytes, stored_bytes, dirty_tracking, manifest, info, mac) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                params![
                    id as i64,
                    info.parent.map(|x| x as i64),
                    info.created_ms,
                    info.duration_ms as i64,
                    info.nprocs as i64,
                    info.logical_bytes as i64,
                    info.new_bytes as i64,
                    info.stored_bytes as i64,
                    info.dirty_tracking,
                    &info.manifest.0[..],
                    info_json,
                    mac.map(|m| m.to_vec())
                ],
            )
            .db(path)?;
            tx.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES ('last_generation_id', ?1)",
                [id.to_string()],
            )
            .db(path)?;
            tx.commit().db(path)?;
        }
        tracing::info!(
            store = %self.inner.root.display(),
            generation = id,
            packs = p.finished.len(),
            blobs = p.hashes.len(),
            new_bytes = info.new_bytes,
            stored_bytes = info.stored_bytes,
            "generation committed"
        );
        let new_packs: Vec<(String, u64)> =
            p.finished.iter().map(|f| (f.name.clone(), f.size)).collect();
        *p = Pending::default();
        self.next_id.store(id + 1, Ordering::SeqCst);
        if let Some(r) = self.inner.remote.as_deref() {
            let conn = self.inner.conn();
            let rl = self.remote_lock.as_ref().expect("an S3 writer holds the S3 lock");
            r.upload_commit(&new_packs, &conn, &self.inner.catalog_path, rl)
                .map_err(|e| StoreError::NotUploaded {
                    id,
                    url: r.url().to_string(),
                    cache: self.inner.root.clone(),
                    source: Box::new(e),
                })?;
            tracing::info!(store = r.url(), generation = id, packs = new_packs.len(), "generation uploaded");
        }
        // After the upload: the head record never names a generation S3
        // does not have.
        if let (Some((_, key_file)), Some(mac)) = (&self.inner.keys, row_mac) {
            seal::write_head(key_file, id, &mac)?;
        }
        Ok(info)
    }

    /// Run `f` in one IMMEDIATE SQLite transaction on the catalog, under the
    /// writer lock, for maintenance this API does not cover (gc: deleting
    /// generations, blobs and packs). Commits if `f` returns `Ok`. Refused
    /// while blobs are pending (commit or abort first). Afterwards the
    /// in-memory known set and the next generation id are reloaded from the
    /// catalog. Delete pack files only after this returns `Ok`. For an
    /// `s3://` store the change is local to the cache until
    /// [`Writer::upload_catalog`].
    pub fn with_transaction<R>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<R>,
    ) -> Result<R> {
        let p = lock(&self.pending);
        if !p.hashes.is_empty() {
            return Err(StoreError::Invalid(
                "catalog maintenance while blobs are pending: commit or abort first".into(),
            ));
        }
        if self.inner.remote.is_some() {
            // The cache's catalog is about to differ from the one on S3
            // until [`Writer::upload_catalog`]; a crash before then leaves
            // the marker, and the next writer uploads it.
            remote::mark_unsynced(&self.inner.root)?;
        }
        let path = &self.inner.catalog_path;
        let mut conn = self.inner.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .db(path)?;
        let r = f(&tx)?;
        tx.commit().db(path)?;
        let (known, next) = load_known(&conn, path)?;
        *self.known.write().unwrap_or_else(|e| e.into_inner()) = known;
        self.next_id.store(next, Ordering::SeqCst);
        drop(conn);
        drop(p);
        // gc may have deleted the newest generation: the head follows.
        self.inner.write_head()?;
        Ok(r)
    }

    /// Replace the whole catalog with the SQLite file `new` (moved into
    /// place), e.g. one pulled from S3 whose packs are all present. Refused
    /// while blobs are pending. Reloads the known set and next id.
    pub fn replace_catalog(&self, new: &Path) -> Result<()> {
        let p = lock(&self.pending);
        if !p.hashes.is_empty() {
            return Err(StoreError::Invalid(
                "replacing the catalog while blobs are pending: commit or abort first".into(),
            ));
        }
        catalog::header_version(new)?;
        self.inner
            .with_catalog_closed(|| remote::install_catalog(new, &self.inner.catalog_path))?;
        let conn = self.inner.conn();
        let (known, next) = load_known(&conn, &self.inner.catalog_path)?;
        *self.known.write().unwrap_or_else(|e| e.into_inner()) = known;
        self.next_id.store(next, Ordering::SeqCst);
        Ok(())
    }

    /// Forget everything put since the last commit: remove those blobs from
    /// the known set and delete the pack files written for them.
    pub fn abort(&self) {
        let mut p = lock(&self.pending);
        let mut p = std::mem::take(&mut *p);
        if let Some(open) = p.open.take() {
            open.discard();
        }
        for (_, h) in std::mem::take(&mut p.sealing) {
            if let Ok(Ok(f)) = h.join() {
                p.finished.push(f);
            }
        }
        for f in &p.finished {
            if let Err(e) = fs::remove_file(&f.path) {
                tracing::warn!(pack = %f.path.display(), error = %e, "cannot remove aborted pack");
            }
        }
        let mut known = self.known.write().unwrap_or_else(|e| e.into_inner());
        for h in &p.hashes {
            known.remove(h);
        }
        if !p.hashes.is_empty() {
            tracing::info!(store = %self.inner.root.display(), blobs = p.hashes.len(), "pending blobs aborted");
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let pending = !lock(&self.pending).hashes.is_empty();
        if pending {
            tracing::warn!(store = %self.inner.root.display(), "writer dropped with uncommitted blobs: aborting them");
            self.abort();
        }
    }
}

/// All committed blob hashes and the next generation id.
fn load_known(conn: &Connection, p: &Path) -> Result<(KnownSet, u64)> {
    let n: i64 = conn.query_row("SELECT count(*) FROM blobs", [], |r| r.get(0)).db(p)?;
    let mut known = KnownSet::with_capacity_and_hasher(n.max(0) as usize, Default::default());
    let mut st = conn.prepare("SELECT hash FROM blobs").db(p)?;
    let mut rows = st.query([]).db(p)?;
    while let Some(r) = rows.next().db(p)? {
        if let Ok(b) = r.get_ref(0).db(p)?.as_blob()
            && let Some(h) = Hash::from_slice(b)
        {
            known.insert(h);
        }
    }
    Ok((known, next_generation_id(conn, p)?))
}

fn next_generation_id(conn: &Connection, p: &Path) -> Result<u64> {
    let max: i64 = conn
        .query_row("SELECT coalesce(max(id), 0) FROM generations", [], |r| {
            r.get(0)
        })
        .db(p)?;
    let last: Option<String> = conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'last_generation_id'",
            [],
            |r| r.get(0),
        )
        .optional()
        .db(p)?;
    let last = last.and_then(|s| s.parse::<i64>().ok()).unwrap_or(0);
    Ok(max.max(last) as u64 + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_description() {
        assert_eq!(describe_ids(&[]), "no generations (the store is empty)");
        assert_eq!(describe_ids(&[1, 2, 3, 5, 7, 8]), "generations 1-3, 5, 7-8");
    }

    #[test]
    fn urls() {
        assert_eq!(parse_url("file:///a/b").unwrap(), PathBuf::from("/a/b"));
        assert_eq!(parse_url("/a/b").unwrap(), PathBuf::from("/a/b"));
        assert!(parse_url("rel").unwrap().is_absolute());
        let e = parse_url("s3://bucket/x").unwrap_err();
        assert!(matches!(e, StoreError::Unsupported { .. }));
        assert!(e.to_string().contains("S3"), "{e}");
        assert!(parse_url("file://rel").is_err());
        assert!(parse_url("http://x").is_err());
    }

    #[test]
    fn send_sync() {
        fn ss<T: Send + Sync>() {}
        ss::<Store>();
        ss::<Writer>();
        ss::<StoreError>();
    }
}
