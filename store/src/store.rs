//! The store and its catalog reads: opening (and creating) a local or
//! `s3://` store, its keys and the replay check of a sealed one, and the
//! generation rows, each checked against its MAC before it is returned.
//!
//! Reading needs no lock. This module must never write a pack or a
//! catalog row (that is [`crate::writer`]'s), nor return a generation row
//! of a sealed store that fails its MAC.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::Connection;
use serde::{Deserialize, Serialize};

use crate::error::IoCtx;
use crate::remote::{self, Remote};
use ckpt_chunker::Codec;

use crate::{Hash, Result, StoreError, catalog, lock, lock_dir, lock_dir_wait, migrate, private, seal, CACHE_LOCK_WAIT};

/// Default chunk size of a new store: one page, the granularity of dirty
/// tracking, so an incremental checkpoint stores only the pages that changed
/// (BENCHMARKS.md: 16 KiB chunks stored ~4x the changed bytes at 1% random).
pub const DEFAULT_CHUNK_SIZE: usize = 4096;
/// Largest accepted chunk size.
pub const MAX_CHUNK_SIZE: usize = 64 << 20;

/// The codec a new store compresses its blobs with, unless
/// `CKPT_COMPRESSION` says otherwise (docs/design.md, "The chunk codec":
/// LZ4 compresses a 4 KiB chunk ~2x and decompresses it ~3x faster than
/// zstd -1, for ~20-60% more bytes). A store made before stores had a
/// codec (no `meta.compression`) is zstd.
pub const DEFAULT_CODEC: Codec = Codec::Lz4;

/// The codec a new store is made with: `CKPT_COMPRESSION` (`lz4` or
/// `zstd`), else [`DEFAULT_CODEC`].
pub fn compression_requested() -> Result<Codec> {
    match std::env::var("CKPT_COMPRESSION") {
        Ok(v) if !v.is_empty() => v.parse().map_err(|e| StoreError::Invalid(format!("CKPT_COMPRESSION: {e}"))),
        _ => Ok(DEFAULT_CODEC),
    }
}

/// The codec of a catalog's `meta.compression` (absent: zstd, the codec of
/// every store made before stores had one).
pub(crate) fn codec_of(conn: &Connection, p: &Path) -> Result<Codec> {
    match catalog::meta(conn, p, "compression")? {
        None => Ok(Codec::Zstd),
        Some(v) => v.parse().map_err(|e| StoreError::BadCatalog {
            path: p.to_path_buf(),
            reason: format!("meta.compression: {e} (a newer ckpt's codec? use that ckpt, or set a known one with `ckpt store compression zstd`)"),
        }),
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

/// Milliseconds since the Unix epoch (0 if the clock is before it): the
/// time of catalog rows, pack and snapshot names, and S3 lock leases.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The state a [`Store`] and its [`Writer`]s share.
pub(crate) struct Inner {
    pub(crate) root: PathBuf,
    pub(crate) catalog_path: PathBuf,
    pub(crate) chunk_size: usize,
    conn: Mutex<Connection>,
    /// The S3 side of an `s3://` store (`root` is then its cache).
    pub(crate) remote: Option<Arc<Remote>>,
    /// Where pack bytes are read from (chosen here, once: see [`crate::source`]).
    pub(crate) packs: Arc<dyn crate::source::PackSource>,
    /// The keys of a sealed store (see [`seal`]), and the key file.
    pub(crate) keys: Option<(Arc<seal::Keys>, PathBuf)>,
    /// The last refusal of the S3 writer lock (when, store, holder): polls
    /// within [`LOCK_POLL`] of it are answered without asking S3 again.
    pub(crate) lock_refused: Mutex<Option<(std::time::Instant, String, String)>>,
    /// The known set between writers ([`crate::known_cache`]).
    pub(crate) known: crate::known_cache::KnownCache,
    /// The thread folding the catalog's log after a commit, if one runs
    /// ([`Inner::fold_wal_after_commit`]).
    fold: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Inner {
    pub(crate) fn conn(&self) -> MutexGuard<'_, Connection> {
        lock(&self.conn)
    }

    /// Folds the catalog's write-ahead log into the catalog file in a
    /// thread of its own, after a commit (which is durable in the log
    /// already): the fold wrote a 1% checkpoint's pages a second time and
    /// fsynced the catalog inside the commit before. Not for an `s3://`
    /// store, whose upload folds the log itself.
    pub(crate) fn fold_wal_after_commit(&self) {
        if self.remote.is_some() {
            return;
        }
        self.wait_fold();
        let path = self.catalog_path.clone();
        let h = std::thread::Builder::new().name("ckpt-wal-fold".into()).spawn(move || {
            let t = std::time::Instant::now();
            match catalog::fold_wal_passive(&path) {
                Ok(()) => tracing::debug!(ms = t.elapsed().as_secs_f64() * 1000.0, "catalog log folded"),
                Err(e) => tracing::debug!("catalog log not folded (the next commit's will): {e}"),
            }
        });
        *lock(&self.fold) = h.ok();
    }

    /// Waits for the fold of [`Inner::fold_wal_after_commit`], if one runs:
    /// before the catalog file is closed or replaced, no other connection
    /// may be open on it.
    pub(crate) fn wait_fold(&self) {
        if let Some(h) = lock(&self.fold).take() {
            let _ = h.join();
        }
    }

    /// The stored address of the blob whose BLAKE3 is `h` (itself in an
    /// unsealed store; [`Hash::ZERO_CHUNK`] stays itself).
    pub(crate) fn addr(&self, h: &Hash) -> Hash {
        match &self.keys {
            Some((k, _)) if !h.is_zero_chunk() => k.address(h),
            _ => *h,
        }
    }

    pub(crate) fn url(&self) -> String {
        match &self.remote {
            Some(r) => r.url().to_string(),
            None => format!("file://{}", self.root.display()),
        }
    }

    pub(crate) fn tampered(&self, what: String) -> StoreError {
        StoreError::Tampered { store: self.url(), what }
    }

    /// A generation row checked against its MAC (in a sealed store).
    pub(crate) fn checked(&self, row: catalog::generations::GenRow) -> Result<GenerationInfo> {
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
    pub(crate) fn check_head(&self) -> Result<()> {
        let Some((_, key_file)) = &self.keys else { return Ok(()) };
        let newest = self.newest_authentic()?;
        let head = seal::read_head(key_file)?;
        let found = newest.as_ref().map_or(0, |g| g.0.id);
        if let Some((hid, hmac)) = head {
            if found < hid {
                // Rows at or above the head that fail their MAC: tampering
                // (refused wherever they are read, named by verify), not
                // a replay; the head stays.
                let tampered_above = catalog::generations::any_from(&self.conn(), &self.catalog_path, hid)?;
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
    pub(crate) fn newest_authentic(&self) -> Result<Option<(GenerationInfo, [u8; 32])>> {
        let rows = catalog::generations::all(&self.conn(), &self.catalog_path, catalog::generations::Order::Descending)?;
        for row in rows.into_iter().flatten() {
            let mac = row.mac.as_deref().and_then(|m| <[u8; 32]>::try_from(m).ok()).unwrap_or_default();
            if let Ok(g) = self.checked(row) {
                return Ok(Some((g, mac)));
            }
        }
        Ok(None)
    }

    /// Record the newest generation in the head record (sealed stores).
    /// Not from an S3 store's cache that holds commits S3 lacks: they may
    /// yet be dropped (another writer moved on), and the head must never
    /// name a generation S3 does not have.
    pub(crate) fn write_head(&self) -> Result<()> {
        let Some((_, key_file)) = &self.keys else { return Ok(()) };
        if self.remote.is_some() && remote::is_unsynced(&self.root) {
            return Ok(());
        }
        match self.newest_authentic()? {
            Some((g, mac)) => seal::write_head(key_file, g.id, &mac),
            None => Ok(()),
        }
    }


    /// Close the catalog, run `f` (which may replace the file), reopen it.
    pub(crate) fn with_catalog_closed<R>(&self, f: impl FnOnce() -> Result<R>) -> Result<R> {
        // A new connection's counters say nothing about the old one's.
        self.known.clear();
        self.wait_fold();
        let mut conn = self.conn();
        let placeholder = catalog::placeholder(&self.catalog_path)?;
        drop(std::mem::replace(&mut *conn, placeholder));
        let r = f();
        let (c, _) = catalog::open(&self.catalog_path, None)?;
        *conn = c;
        r
    }
}

/// Read side of a store. `Send + Sync`; cheap to clone.
#[derive(Clone)]
pub struct Store {
    pub(crate) inner: Arc<Inner>,
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
        let packs = crate::source::for_store(&root, remote.as_ref());
        let store = Store {
            inner: Arc::new(Inner {
                root,
                catalog_path,
                chunk_size,
                conn: Mutex::new(conn),
                packs,
                remote,
                keys,
                lock_refused: Mutex::new(None),
                known: Default::default(),
                fold: Mutex::new(None),
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

    /// The codec new blobs of this store are compressed with (its
    /// `meta.compression`; its older blobs may be of another: each blob's
    /// first bytes tell, see [`ckpt_chunker::decode`]).
    pub fn codec(&self) -> Result<Codec> {
        let conn = self.inner.conn();
        codec_of(&conn, &self.inner.catalog_path)
    }

    /// Makes `codec` the one this store's next writers compress with. Blobs
    /// stored before keep theirs (they are read as they are): nothing is
    /// rewritten. A local store only: an `s3://` store's codec is the one
    /// it was made with.
    pub fn set_codec(&self, codec: Codec) -> Result<()> {
        if let Some(r) = &self.inner.remote {
            return Err(StoreError::Invalid(format!("the codec of the S3 store {} cannot be changed (it is set when the store is made: CKPT_COMPRESSION)", r.url())));
        }
        let conn = self.inner.conn();
        catalog::set_meta(&conn, &self.inner.catalog_path, "compression", codec.name())
    }

    /// The store id (the catalog's `meta.store_id`).
    pub fn store_id(&self) -> Result<String> {
        let conn = self.inner.conn();
        catalog::meta(&conn, &self.inner.catalog_path, "store_id")?
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
        catalog::snapshot(&conn, &self.inner.catalog_path, dir)
    }

    /// Path of the SQLite catalog (for tools such as gc that need queries
    /// this API does not offer; take a [`Writer`](crate::Writer) before modifying it).
    pub fn catalog_path(&self) -> &Path {
        &self.inner.catalog_path
    }

    /// Path of pack file `name` (64 hex digits).
    pub fn pack_path(&self, name: &str) -> PathBuf {
        crate::pack::pack_path(&self.inner.root, name)
    }

    /// Chunk size of this store (bytes).
    pub fn chunk_size(&self) -> usize {
        self.inner.chunk_size
    }

    /// All committed generations, ascending by id.
    pub fn generations(&self) -> Result<Vec<GenerationInfo>> {
        let rows = catalog::generations::all_strict(&self.inner.conn(), &self.inner.catalog_path)?;
        rows.into_iter().map(|r| self.inner.checked(r)).collect()
    }

    /// The generations whose rows are authentic, ascending by id, and one
    /// sentence for each row that is not (edited, forged: see
    /// [`Store::generations`], which refuses the lot for one such row).
    pub fn authentic_generations(&self) -> Result<(Vec<GenerationInfo>, Vec<String>)> {
        let rows = catalog::generations::all(&self.inner.conn(), &self.inner.catalog_path, catalog::generations::Order::Ascending)?;
        let (mut good, mut bad) = (Vec::new(), Vec::new());
        for row in rows {
            match row {
                Ok(row) => match self.inner.checked(row) {
                    Ok(g) => good.push(g),
                    Err(StoreError::Tampered { what, .. }) => bad.push(what),
                    Err(e) => bad.push(e.to_string()),
                },
                Err(b) => bad.push(format!("generation {}: its catalog row cannot be read ({}): altered", b.id, b.error)),
            }
        }
        Ok((good, bad))
    }

    /// Folds the write-ahead log into the catalog file (for a clean
    /// shutdown: the catalog is then one self-contained file).
    pub fn checkpoint_wal(&self) -> Result<()> {
        catalog::checkpoint_wal(&self.inner.conn(), &self.inner.catalog_path)
    }

    /// One committed generation.
    pub fn generation(&self, id: u64) -> Result<GenerationInfo> {
        let found = catalog::generations::get(&self.inner.conn(), &self.inner.catalog_path, id)?;
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
        let row = catalog::generations::latest(&self.inner.conn(), &self.inner.catalog_path)?;
        row.map(|r| self.inner.checked(r)).transpose()
    }

    /// Whether the catalog holds blob `h` (always true for
    /// [`Hash::ZERO_CHUNK`]).
    pub fn contains(&self, h: &Hash) -> Result<bool> {
        if h.is_zero_chunk() {
            return Ok(true);
        }
        catalog::blobs::contains(&self.inner.conn(), &self.inner.catalog_path, &self.inner.addr(h))
    }

    /// Totals over the whole store.
    pub fn stats(&self) -> Result<StoreStats> {
        catalog::stats(&self.inner.conn(), &self.inner.catalog_path)
    }
}

/// What is wrong with a generation row whose MAC does not match.
fn gen_row_problem(row: &catalog::generations::GenRow) -> String {
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

/// A store closed waits for the fold of its last commit's log: a fold
/// left running wrote into the catalog after its store was gone (seen as
/// `newer_schema_refused_without_modification` failing under load, the
/// catalog changed after the test's copy of it).
impl Drop for Inner {
    fn drop(&mut self) {
        self.wait_fold();
    }
}

/// The keys of the store whose catalog is `conn`: `None` if it is not
/// sealed, else from its key file (refused if missing or not its key).
fn load_keys(conn: &Connection, p: &Path, url: &str) -> Result<Option<(Arc<seal::Keys>, PathBuf)>> {
    let id = catalog::meta(conn, p, "store_id")?
        .ok_or_else(|| StoreError::BadCatalog { path: p.to_path_buf(), reason: "meta.store_id missing".into() })?;
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(StoreError::BadCatalog { path: p.to_path_buf(), reason: format!("meta.store_id {id:?} is not a store id") });
    }
    let scheme = catalog::meta(conn, p, "sealed")?;
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
    if catalog::meta(conn, p, "key_check")?.as_deref() != Some(keys.check_value().as_str()) {
        return Err(StoreError::WrongKey { store: url.to_string(), id, path });
    }
    Ok(Some((Arc::new(keys), path)))
}

/// "generations 1-3, 5" / "no generations (the store is empty)".
pub(crate) fn describe_ids(ids: &[u64]) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_sync() {
        fn ss<T: Send + Sync>() {}
        ss::<Store>();
        ss::<crate::Writer>();
        ss::<StoreError>();
    }

    /// The catalog's log is folded after each commit, by another
    /// connection (`Inner::fold_wal_after_commit`): the log file stays the
    /// size of one commit instead of growing to the autocheckpoint bound,
    /// and the fold leaves the known set handed between writers valid (a
    /// fold that counted as another connection's change would reload it
    /// every round: 21 s at 10 M blobs).
    #[test]
    fn the_log_is_folded_after_each_commit_and_the_known_set_survives_it() {
        use crate::{BlobKind, BlobSink, NewGeneration};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_or_create(&format!("file://{}", dir.path().display()), crate::DEFAULT_CHUNK_SIZE).unwrap();
        let wal = dir.path().join("catalog.db-wal");
        let mut sizes = Vec::new();
        for g in 1..=12u64 {
            let w = store.writer().unwrap();
            if g > 1 {
                assert_eq!(w.intact_generation(), Some(g - 1), "generation {g}: the known set was reloaded");
            }
            for i in 0..400u64 {
                let b: Vec<u8> = (0..4096u64).map(|k| ((g * 1_000_003 + i) ^ k).wrapping_mul(0x9e37_79b9) as u8).collect();
                w.put(BlobKind::Chunk, Hash::of(&b), &b).unwrap();
            }
            let m = w.put_meta(format!("m{g}").as_bytes()).unwrap();
            let parent = (g > 1).then_some(g - 1);
            let info = serde_json::json!({});
            let ng = NewGeneration { parent, created_ms: 1, duration_ms: 1, nprocs: 1, logical_bytes: 1, dirty_tracking: "scan".into(), manifest: m, info };
            assert_eq!(w.commit(ng).unwrap().id, g);
            drop(w);
            store.inner.wait_fold();
            sizes.push(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0));
        }
        // Each commit writes the log from its start again once the last
        // one was folded; unfolded, it would hold all twelve.
        assert!(sizes[11] < 3 * sizes[1].max(1), "the log grew: {sizes:?}");
        assert_eq!(store.generations().unwrap().len(), 12);
    }

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
}
