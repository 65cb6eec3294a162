//! The writer and commit: the one [`Writer`] of a store, which puts
//! blobs into new packs (sealed in a sealed store) and commits a
//! generation: its packs durable first, then its pack, blob and
//! generation rows in one catalog transaction, then (for an `s3://`
//! store) the upload, packs before the catalog.
//!
//! This module must never make a catalog row visible before the pack it
//! names is durable, nor leave a partial generation visible after an
//! error; and it must never run without the writer lock ([`crate::lock`]).

use std::collections::HashSet;
use std::fs::{self, File};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use nix::fcntl::Flock;
use rusqlite::Connection;

use crate::error::{IoCtx, SqlCtx};
use crate::pack::{FinishedPack, OpenPack, PackEntry, SealedPack};
use crate::remote;
use crate::remote_lock::RemoteLock;
use crate::store::{Inner, describe_ids};
use crate::{BlobKind, GenerationInfo, Hash, Result, Store, StoreError, catalog, lock, lock_dir, now_ms, seal};

/// Default target size of a pack file; a pack is also closed at every commit.
pub const DEFAULT_PACK_TARGET: u64 = 32 << 20;

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

/// Options of a [`Writer`].
#[derive(Clone, Copy, Debug)]
pub struct WriterOptions {
    /// A pack is closed once it reaches this many bytes.
    pub pack_target: u64,
    /// zstd level (in a store whose codec is zstd).
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

impl Store {
    /// Take the writer lock and return the one [`Writer`] (default options).
    pub fn writer(&self) -> Result<Writer> {
        self.writer_with(WriterOptions::default())
    }

    /// Like [`Store::writer`], with options (pack target size, zstd level).
    pub fn writer_with(&self, opts: WriterOptions) -> Result<Writer> {
        Writer::new(self.inner.clone(), opts)
    }
}

/// The hashes a writer knows. A BLAKE3 address is uniformly distributed
/// already: a word of it, mixed with a per-process secret (so that a
/// program cannot choose pages that collide in the table), is the
/// hash-table key. With SipHash over all 32 bytes a lookup took 1.5 µs at
/// 10 M blobs (BENCHMARKS.md, bench-catalog; this hasher's figure is not
/// measured yet).
pub(crate) type KnownSet = HashSet<Hash, KnownHash>;

/// The [`std::hash::BuildHasher`] of a [`KnownSet`].
#[derive(Clone)]
pub(crate) struct KnownHash(u64);

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
pub(crate) struct PrefixHasher(u64, u64);

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

/// The rows of the packs a capture fills, inserted while it goes on: a
/// thread with a connection of its own to the catalog, in one open write
/// transaction that [`Writer::commit`] finishes (its rows are visible only
/// then, after every pack is durable) and that is rolled back otherwise.
/// A first checkpoint of 1 GiB has 262,144 blob rows: inserted by the
/// commit alone, they were a fifth of its time, on one core, after the
/// capture. The writer lock keeps every other writer out meanwhile;
/// readers read the catalog as it was (WAL).
pub(crate) struct EarlyRows {
    tx: std::sync::mpsc::Sender<SealedRows>,
    thread: std::thread::JoinHandle<Result<(Connection, HashSet<String>, f64)>>,
}

/// A sealed pack's rows for [`EarlyRows`]: its name comes from its thread.
struct SealedRows {
    name: std::sync::mpsc::Receiver<String>,
    size: u64,
    entries: Vec<PackEntry>,
}

impl EarlyRows {
    fn start(catalog: &Path) -> Option<EarlyRows> {
        let (tx, rx) = std::sync::mpsc::channel::<SealedRows>();
        let path = catalog.to_path_buf();
        let thread = std::thread::Builder::new().name("ckpt-rows".into()).spawn(move || -> Result<(Connection, HashSet<String>, f64)> {
            let conn = catalog::open_for_rows(&path)?;
            conn.execute_batch("BEGIN IMMEDIATE").db(&path)?;
            let (mut done, now, mut busy) = (HashSet::new(), now_ms(), std::time::Duration::ZERO);
            for m in rx {
                // No name: the pack's thread failed; the commit says so.
                let Ok(name) = m.name.recv() else { continue };
                let t = std::time::Instant::now();
                let pack_id = catalog::packs::insert(&conn, &path, &name, m.size, m.entries.len(), now)?;
                let mut rows: Vec<&PackEntry> = m.entries.iter().collect();
                rows.sort_unstable_by_key(|e| e.hash);
                catalog::blobs::insert_pack(&conn, &path, pack_id, &rows)?;
                done.insert(name);
                busy += t.elapsed();
            }
            Ok((conn, done, busy.as_secs_f64() * 1000.0))
        });
        thread.ok().map(|thread| EarlyRows { tx, thread })
    }

    /// The connection in its open transaction, and the packs whose rows
    /// it holds. Err: nothing is kept (the transaction is rolled back).
    /// Also the milliseconds it spent inserting.
    fn finish(self) -> Result<(Connection, HashSet<String>, f64)> {
        drop(self.tx);
        self.thread.join().unwrap_or_else(|_| Err(StoreError::Invalid("the thread inserting a commit's rows panicked".into())))
    }
}

/// An open write transaction on a connection: rolled back when dropped
/// unless committed.
struct OpenTx<'c>(&'c Connection, bool);

impl OpenTx<'_> {
    fn commit(mut self, p: &Path) -> Result<()> {
        self.0.execute_batch("COMMIT").db(p)?;
        self.1 = true;
        Ok(())
    }
}

impl Drop for OpenTx<'_> {
    fn drop(&mut self) {
        if !self.1 {
            let _ = self.0.execute_batch("ROLLBACK");
        }
    }
}

/// Blobs written since the last commit.
#[derive(Default)]
pub(crate) struct Pending {
    open: Option<OpenPack>,
    /// Packs written whole, being made durable by their thread
    /// ([`SealedPack::persist`]); [`Writer::commit`] waits for them.
    sealing: Vec<SealedPack>,
    finished: Vec<FinishedPack>,
    pub(crate) hashes: Vec<Hash>,
    /// The rows of the packs sealed so far, being inserted.
    early: Option<EarlyRows>,
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
    /// [`BlobSink::put`] of a [`BlobKind::Chunk`], with a hint: `try_compress:
    /// false` stores it raw without trying the store's codec (a raw blob is a valid
    /// blob whatever its bytes; only its size may be larger). None if it
    /// was known, else whether it was stored raw. A sink that cannot tell
    /// answers `Some(false)`, so that its caller never stops trying.
    fn put_chunk(&self, h: Hash, data: &[u8], try_compress: bool) -> Result<Option<bool>> {
        let _ = try_compress;
        Ok(self.put(BlobKind::Chunk, h, data)?.then_some(false))
    }
    /// Hashes `data`, stores it as a [`BlobKind::Meta`] blob, returns its hash.
    fn put_meta(&self, data: &[u8]) -> Result<Hash> {
        let h = Hash::of(data);
        self.put(BlobKind::Meta, h, data)?;
        Ok(h)
    }
    /// A generation whose blobs are all surely still stored: the one this
    /// process's previous writer committed last, when nothing has changed
    /// the catalog since (no other writer, no gc). A capture whose base is
    /// that generation may reuse the base's chunks without asking about
    /// each. None: unknown (ask).
    fn intact_generation(&self) -> Option<u64> {
        None
    }
}

impl BlobSink for Writer {
    fn known(&self, h: &Hash) -> bool {
        Writer::known(self, h)
    }
    fn put(&self, kind: BlobKind, h: Hash, data: &[u8]) -> Result<bool> {
        Writer::put(self, kind, h, data)
    }
    fn put_chunk(&self, h: Hash, data: &[u8], try_compress: bool) -> Result<Option<bool>> {
        self.put_encoded(BlobKind::Chunk, h, data, try_compress)
    }
    fn put_meta(&self, data: &[u8]) -> Result<Hash> {
        Writer::put_meta(self, data)
    }
    fn intact_generation(&self) -> Option<u64> {
        self.intact
    }
}

/// The one writer of a store (holds the exclusive lock on `<root>/lock`
/// until dropped). `Send + Sync`: [`Writer::put`] may be called from many
/// threads at once. Dropping a writer with uncommitted blobs aborts them.
pub struct Writer {
    pub(crate) inner: Arc<Inner>,
    pub(crate) opts: WriterOptions,
    /// The codec blobs are compressed with: the store's when the writer
    /// was made ([`Store::codec`]).
    codec: ckpt_chunker::Codec,
    /// The S3 writer lock of an `s3://` store (released before the flock).
    pub(crate) remote_lock: Option<RemoteLock>,
    _lock: Flock<File>,
    known: RwLock<KnownSet>,
    pub(crate) pending: Mutex<Pending>,
    next_id: AtomicU64,
    /// The generation this writer committed last, while nothing but its
    /// commits changed the catalog (handed on with the known set).
    last_commit: Mutex<Option<u64>>,
    /// The generation the previous writer committed last, if its known set
    /// was taken over with nothing changed since ([`BlobSink::intact_generation`]).
    intact: Option<u64>,
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

        let conn = inner.conn();
        let (known, next_id, intact, reused) = match inner.known.take(&conn) {
            Some(k) => (k.set, catalog::next_generation_id(&conn, &inner.catalog_path)?, k.last_commit, true),
            None => {
                let (known, next_id) = load_known(&conn, &inner.catalog_path)?;
                (known, next_id, None, false)
            }
        };
        let codec = crate::store::codec_of(&conn, &inner.catalog_path)?;
        drop(conn);
        tracing::debug!(store = %inner.root.display(), blobs = known.len(), next_id, reused, %codec, "writer ready");
        Ok(Writer {
            inner,
            opts,
            codec,
            remote_lock,
            _lock: lock,
            known: RwLock::new(known),
            pending: Mutex::new(Pending::default()),
            next_id: AtomicU64::new(next_id),
            last_commit: Mutex::new(intact),
            intact,
        })
    }

    /// The codec this writer compresses blobs with.
    pub fn codec(&self) -> ckpt_chunker::Codec {
        self.codec
    }

    /// Waits for the fold of the previous commit's catalog log into the
    /// catalog file (a thread of its own after each commit), if one still
    /// runs. The coordinator waits for it before it stops the programs,
    /// so that the stopped phase does not share the cores with it: after a
    /// checkpoint of 1 GiB with 1% changed, the fold (SQLite pages and an
    /// fsync) took 70-170 ms and was still running when bench-stop's next
    /// checkpoint stopped the program (2026-12-07).
    pub fn wait_catalog_fold(&self) {
        self.inner.wait_fold();
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

    /// `bytes` (raw, or compressed) as stored at `addr`: sealed in a
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
        Ok(self.put_encoded(kind, h, data, true)?.is_some())
    }

    /// [`Writer::put`], trying the store's codec only if `try_compress`
    /// (else the blob is stored raw). None if it was known, else whether it
    /// was stored raw.
    pub fn put_encoded(&self, kind: BlobKind, h: Hash, data: &[u8], try_compress: bool) -> Result<Option<bool>> {
        if h.is_zero_chunk() {
            return Ok(None);
        }
        let a = self.inner.addr(&h);
        if self.known_addr(&a) {
            return Ok(None);
        }
        debug_assert_eq!(h, Hash::of(data), "put: hash does not match data");
        let ulen = u32::try_from(data.len()).map_err(|_| {
            StoreError::Invalid(format!(
                "blob {h} is {} bytes; the limit is 4 GiB",
                data.len()
            ))
        })?;
        let stored = if try_compress { ckpt_chunker::encode_with(data, self.codec, self.opts.level) } else { ckpt_chunker::Encoded::Raw(data) };
        let raw = matches!(stored, ckpt_chunker::Encoded::Raw(_));
        let sealed = self.stored_form(&a, raw, stored.bytes());
        Ok(self.append(kind, a, &sealed, ulen)?.then_some(raw))
    }

    /// Store a blob that was compressed elsewhere (by a capture helper on
    /// another host): `compressed` is the blob of `ulen` bytes (raw, a zstd
    /// frame or an LZ4 blob, as [`ckpt_chunker::decode`] reads them) whose
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
            self.close_pack(&mut p, true)?;
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
    fn close_pack(&self, p: &mut Pending, early_rows: bool) -> Result<()> {
        let Some(open) = p.open.take() else {
            return Ok(());
        };
        let entries = open.entries.clone();
        // A pack filled by a capture has its rows inserted meanwhile.
        if early_rows && p.early.is_none() {
            p.early = EarlyRows::start(&self.inner.catalog_path);
        }
        let (name_tx, name_rx) = std::sync::mpsc::sync_channel(1);
        let also = p.early.is_some().then_some(name_tx);
        match open.seal_named(&self.inner.root, also) {
            Ok(s) => {
                if let Some(e) = &p.early {
                    let _ = e.tx.send(SealedRows { name: name_rx, size: s.size, entries: s.entries.clone() });
                }
                p.sealing.push(s)
            }
            Err(e) => {
                self.forget(p, &entries);
                return Err(StoreError::io(format!("finish a pack file in {}", self.inner.root.join("tmp").display()), e));
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
        for s in std::mem::take(&mut p.sealing) {
            match s.persist() {
                Ok(f) => {
                    tracing::debug!(pack = %f.path.display(), blobs = f.entries.len(), size = f.size, "pack written");
                    p.finished.push(f);
                }
                Err((e, entries)) => {
                    self.forget(p, &entries);
                    first.get_or_insert(StoreError::io(format!("finish a pack file in {}", self.inner.root.join("packs").display()), e));
                }
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Make everything put since the last commit durable and visible, as
    /// generation [`Writer::next_generation_id`]: closes the open pack
    /// (fsync + rename, in a thread of its own), inserts the packs, blobs
    /// and generation row in one SQLite transaction meanwhile, and commits
    /// that transaction once every pack is durable. The manifest must have been put (now or in an
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
        let t0 = std::time::Instant::now();
        self.close_pack(&mut p, false)?;
        if self.inner.remote.is_some() {
            remote::mark_unsynced(&self.inner.root)?;
        }
        let id = self.next_generation_id();
        let row_mac;
        let (rows_ms, packs_ms, tx_ms, early_packs);
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
            // The rows of the packs sealed during the capture are in the
            // early connection's open transaction; the rest go there too.
            // Without it (none, or it failed), in one of the store's own.
            let early = match p.early.take().map(EarlyRows::finish) {
                Some(Ok((c, done, ms))) => {
                    tracing::debug!(packs = done.len(), ms, "rows inserted while the capture went on");
                    Some((c, done))
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "rows not inserted early: the commit inserts them all");
                    None
                }
                None => None,
            };
            let main;
            let (conn, done) = match &early {
                Some((c, done)) => (c, Some(done)),
                None => {
                    main = self.inner.conn();
                    main.execute_batch("BEGIN IMMEDIATE").db(path)?;
                    (&*main, None)
                }
            };
            early_packs = done.map_or(0, |d| d.len());
            let tx = OpenTx(conn, false);
            if let Some(parent) = info.parent
                && !catalog::generations::exists(conn, path, parent)?
            {
                return Err(StoreError::Invalid(format!(
                    "parent generation {parent} of the new generation does not exist"
                )));
            }
            let now = now_ms();
            // Rows in hash order: the blob index is a B-tree keyed by
            // hash, and random-order inserts touched a page each
            // (docs/design.md, "The catalog at scale"). The rows of the
            // packs still being made durable are inserted while they are;
            // the transaction commits after.
            // A pack still being written is named by its thread once it
            // has hashed its last bytes (before its fsync); one that
            // cannot be named failed, and settling says how.
            let names: Option<Vec<String>> = p.sealing.iter_mut().map(|s| s.name().map(str::to_string)).collect();
            let names = match names {
                Some(n) => n,
                None => {
                    self.settle(&mut p)?;
                    Vec::new()
                }
            };
            let packs: Vec<(&str, u64, &[PackEntry])> = p
                .finished
                .iter()
                .map(|f| (f.name.as_str(), f.size, &f.entries[..]))
                .chain(p.sealing.iter().zip(&names).map(|(s, n)| (n.as_str(), s.size, &s.entries[..])))
                .filter(|(name, ..)| !done.is_some_and(|d| d.contains(*name)))
                .collect();
            let mut rows: Vec<(&PackEntry, i64)> = Vec::with_capacity(packs.iter().map(|f| f.2.len()).sum());
            for (name, size, entries) in packs {
                let pack_id = catalog::packs::insert(conn, path, name, size, entries.len(), now)?;
                rows.extend(entries.iter().map(|e| (e, pack_id)));
            }
            rows.sort_unstable_by_key(|(e, _)| e.hash);
            catalog::blobs::insert(conn, path, rows)?;
            let info_json = seal::info_text(&info.info);
            let mac = self.inner.keys.as_ref().map(|(k, _)| k.generation_mac(&info, info_json.as_deref()));
            row_mac = mac;
            catalog::generations::insert(conn, path, &info, info_json.as_deref(), mac.as_ref())?;
            catalog::set_meta(conn, path, "last_generation_id", &id.to_string())?;
            rows_ms = t0.elapsed().as_secs_f64() * 1000.0;
            // No row is visible before the pack it names is durable: on an
            // error here the transaction is rolled back (dropped).
            self.settle(&mut p)?;
            packs_ms = t0.elapsed().as_secs_f64() * 1000.0 - rows_ms;
            tx.commit(path)?;
            tx_ms = t0.elapsed().as_secs_f64() * 1000.0 - packs_ms - rows_ms;
            *lock(&self.last_commit) = Some(id);
        }
        tracing::info!(
            store = %self.inner.root.display(),
            generation = id,
            packs = p.finished.len(),
            blobs = p.hashes.len(),
            new_bytes = info.new_bytes,
            stored_bytes = info.stored_bytes,
            packs_ms,
            rows_ms,
            tx_ms,
            early_packs,
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
        tracing::debug!(generation = id, total_ms = t0.elapsed().as_secs_f64() * 1000.0, "commit durable");
        self.inner.fold_wal_after_commit();
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
        let tx = catalog::immediate(&mut conn, path)?;
        // Blobs may go: no generation is known intact from here on.
        *lock(&self.last_commit) = None;
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
        *lock(&self.last_commit) = None;
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
        // Its rows are rolled back (the connection closes in its transaction).
        if let Some(e) = p.early.take() {
            drop(e.finish());
        }
        if let Some(open) = p.open.take() {
            open.discard();
        }
        for s in std::mem::take(&mut p.sealing) {
            if let Ok(f) = s.persist() {
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
        // Nothing pending: the known set is exactly the catalog's blobs.
        // The next writer may take it over (still under our lock, which
        // is released after this).
        if !std::thread::panicking() {
            let set = std::mem::take(&mut *self.known.write().unwrap_or_else(|e| e.into_inner()));
            let last_commit = *lock(&self.last_commit);
            self.inner.known.keep(&self.inner.conn(), set, last_commit);
        }
    }
}

/// All committed blob hashes and the next generation id.
fn load_known(conn: &Connection, p: &Path) -> Result<(KnownSet, u64)> {
    let n = catalog::blobs::count(conn, p)?;
    let mut known = KnownSet::with_capacity_and_hasher(n.max(0) as usize, Default::default());
    catalog::blobs::addresses(conn, p, |h| {
        known.insert(h);
    })?;
    Ok((known, catalog::next_generation_id(conn, p)?))
}
