//! Maintenance of a store: the catalog and pack operations behind `ckpt gc`
//! (listing packs and blobs, deleting unreferenced rows, repacking, and
//! publishing the result to S3); the checks of `ckpt verify` are all in
//! the `verify` module.
//!
//! Crash safety: every catalog change is one SQLite transaction, and pack
//! files are only deleted after the transaction that stops naming them has
//! committed; new packs are durable (fsync'd, renamed, directory fsync'd)
//! before a transaction names them. A crash at any point therefore leaves a
//! consistent catalog; at worst, pack files that nothing names (orphans),
//! which [`Writer::remove_orphan_packs`] deletes later.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::PathBuf;

use serde::Serialize;

use crate::catalog;
use crate::error::IoCtx;
use crate::pack::{self, ENTRY_LEN, OpenPack, PACK_MAGIC, TAIL_LEN};
use crate::remote::Remote;
use crate::reader::Loc;
use crate::{BlobKind, Hash, Result, Store, StoreError, Writer, lock, now_ms};

/// One pack file as the catalog records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PackRow {
    /// Catalog id.
    pub id: i64,
    /// BLAKE3 hex of the file (its name).
    pub name: String,
    /// File size in bytes.
    pub size: u64,
    /// Blobs the pack was written with (some may have been deleted since).
    pub nblobs: u64,
}

impl PackRow {
    /// Bytes of blob data in the file (without header and trailer).
    pub fn data_bytes(&self) -> u64 {
        self.size
            .saturating_sub(PACK_MAGIC.len() as u64 + self.nblobs * ENTRY_LEN as u64 + TAIL_LEN as u64)
    }
}

/// One blob row of the catalog.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobRow {
    /// Address.
    pub hash: Hash,
    /// Catalog id of its pack.
    pub pack_id: i64,
    /// Offset of its zstd frame in the pack.
    pub offset: u64,
    /// Compressed length.
    pub clen: u32,
    /// Uncompressed length.
    pub ulen: u32,
    /// Chunk or metadata.
    pub kind: BlobKind,
}

/// What [`Writer::sweep`] did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Swept {
    /// Generation rows deleted.
    pub generations: u64,
    /// Blob rows deleted.
    pub blobs: u64,
    /// Compressed bytes of those blobs.
    pub blob_bytes: u64,
    /// Pack rows deleted (no live blob left); their files are listed in
    /// `dead_packs` and are deleted by [`Writer::remove_pack_files`].
    pub dead_packs: Vec<PathBuf>,
    /// Size of those pack files.
    pub dead_pack_bytes: u64,
}

/// Packs written by [`Writer::repack_write`], durable but not yet named by
/// the catalog (until [`Writer::repack_commit`]).
#[derive(Debug)]
pub struct Repacked {
    /// (old pack id, old pack name, old size) of every pack being replaced.
    old: Vec<(i64, String, u64)>,
    new: Vec<pack::FinishedPack>,
}

impl Repacked {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.old.is_empty()
    }
    /// Number of packs replaced.
    pub fn old_packs(&self) -> usize {
        self.old.len()
    }
    /// Total size of the packs replaced.
    pub fn old_bytes(&self) -> u64 {
        self.old.iter().map(|o| o.2).sum()
    }
    /// Number of packs written.
    pub fn new_packs(&self) -> usize {
        self.new.len()
    }
    /// Total size of the packs written.
    pub fn new_bytes(&self) -> u64 {
        self.new.iter().map(|n| n.size).sum()
    }
    /// Paths of the new pack files.
    pub fn new_paths(&self) -> Vec<PathBuf> {
        self.new.iter().map(|n| n.path.clone()).collect()
    }
}

impl Store {
    /// Every pack the catalog names.
    pub fn pack_rows(&self) -> Result<Vec<PackRow>> {
        catalog::packs::all(&self.inner.conn(), &self.inner.catalog_path)
    }

    /// Every blob row of the catalog.
    pub fn blob_rows(&self) -> Result<Vec<BlobRow>> {
        catalog::blobs::all(&self.inner.conn(), &self.inner.catalog_path)
    }

    /// Pack files on disk (`packs/*/*.pack`), named by the catalog or not.
    pub fn pack_files(&self) -> Result<Vec<PathBuf>> {
        crate::source::LocalPacks { root: self.inner.root.clone() }.pack_files()
    }

    /// For an `s3://` store: the packs on S3 (name, size) that the catalog
    /// (as this cache has it) does not name. Empty for a local store.
    pub fn remote_orphan_packs(&self) -> Result<Vec<(String, u64)>> {
        let Some(r) = self.inner.remote.as_deref() else { return Ok(Vec::new()) };
        let named: HashSet<String> = self.pack_rows()?.into_iter().map(|p| p.name).collect();
        let mut v: Vec<(String, u64)> = r.list_packs()?.into_iter().filter(|(n, _)| !named.contains(n)).collect();
        v.sort();
        Ok(v)
    }

    /// The packs that exist (name → size): pack files on disk, or for an
    /// `s3://` store the pack objects on S3 (one listing).
    pub fn present_packs(&self) -> Result<HashMap<String, u64>> {
        self.inner.packs.list()
    }

    /// Where pack `name` lives, for messages: its file, or its S3 URL.
    pub fn pack_location(&self, name: &str) -> String {
        self.inner.packs.location(name)
    }

    /// Pack files on disk that the catalog does not name, with their sizes.
    pub fn orphan_packs(&self) -> Result<Vec<(PathBuf, u64)>> {
        let named: HashSet<PathBuf> = self.pack_rows()?.iter().map(|r| self.pack_path(&r.name)).collect();
        Ok(self
            .pack_files()?
            .into_iter()
            .filter(|p| !named.contains(p))
            .map(|p| {
                let len = fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
                (p, len)
            })
            .collect())
    }
}

impl Writer {
    pub(crate) fn no_pending(&self) -> Result<()> {
        if !lock(&self.pending).hashes.is_empty() {
            return Err(StoreError::Invalid(
                "store maintenance while blobs are pending: commit or abort first".into(),
            ));
        }
        Ok(())
    }

    /// In one transaction: delete the generation rows `drop`, every blob row
    /// whose hash is not in `live`, and every pack row left without blobs.
    /// Refuses (changing nothing) if a generation that stays has its
    /// manifest outside `live`, or if a blob in `live` is not in the catalog:
    /// `live` must be everything the remaining generations need. Pack files
    /// are not touched: delete [`Swept::dead_packs`] with
    /// [`Writer::remove_pack_files`] afterwards.
    pub fn sweep(&self, drop: &[u64], live_blobs: &HashSet<Hash>) -> Result<Swept> {
        self.no_pending()?;
        // The catalog's rows are by stored address.
        let live: HashSet<Hash> = live_blobs.iter().map(|h| self.inner.addr(h)).collect();
        let live = &live;
        let root = self.inner.root.clone();
        let path = self.inner.catalog_path.clone();
        let swept = self.with_transaction(|tx| {
            let mut out = Swept { generations: catalog::generations::delete(tx, &path, drop)?, ..Default::default() };
            {
                for (id, m) in catalog::generations::manifests(tx, &path)? {
                    if !Hash::from_slice(&m).is_some_and(|h| live_blobs.contains(&h)) {
                        return Err(StoreError::Invalid(format!(
                            "sweep refused: generation {id} stays but its manifest is not among the live blobs (gc bug); nothing was deleted"
                        )));
                    }
                }
            }
            let rows = catalog::blobs::all(tx, &path)?;
            let present: HashSet<Hash> = rows.iter().map(|r| r.hash).collect();
            if let Some(h) = live_blobs.iter().find(|h| !h.is_zero_chunk() && !present.contains(&self.inner.addr(h))) {
                return Err(StoreError::Invalid(format!(
                    "sweep refused: live blob {h} is not in the catalog (the store is damaged: run `ckpt verify --all`); nothing was deleted"
                )));
            }
            let mut live_per_pack: HashMap<i64, u64> = HashMap::new();
            let mut dead = Vec::new();
            for r in &rows {
                if live.contains(&r.hash) {
                    *live_per_pack.entry(r.pack_id).or_default() += 1;
                } else {
                    dead.push(&r.hash);
                    out.blobs += 1;
                    out.blob_bytes += r.clen as u64;
                }
            }
            catalog::blobs::delete(tx, &path, dead)?;
            for (id, name, size) in catalog::packs::ids_names_sizes(tx, &path)? {
                if !live_per_pack.contains_key(&id) {
                    catalog::packs::delete(tx, &path, id)?;
                    out.dead_packs.push(pack::pack_path(&root, &name));
                    out.dead_pack_bytes += size;
                }
            }
            Ok(out)
        })?;
        self.remove_touched(drop);
        Ok(swept)
    }

    /// Delete pack files that the catalog no longer names (the dead packs of
    /// a sweep, the old packs of a repack, orphans). A path the catalog
    /// still names is refused, not deleted. Returns the bytes freed.
    pub fn remove_pack_files(&self, paths: &[PathBuf]) -> Result<u64> {
        let named: HashSet<PathBuf> = self
            .store()
            .pack_rows()?
            .iter()
            .map(|r| pack::pack_path(&self.inner.root, &r.name))
            .collect();
        let mut freed = 0;
        let mut dirs = HashSet::new();
        for p in paths {
            // Whatever the catalog says: only `<root>/packs/hh/NAME.pack`.
            let inside = p.file_name().and_then(|f| f.to_str()).and_then(|f| f.strip_suffix(".pack")).is_some_and(|n| {
                crate::private::is_pack_name(n) && p == &pack::pack_path(&self.inner.root, n)
            });
            if !inside {
                return Err(StoreError::BadName {
                    origin: self.inner.catalog_path.clone(),
                    what: "pack file",
                    name: p.display().to_string(),
                });
            }
            if named.contains(p) {
                return Err(StoreError::Invalid(format!(
                    "refusing to delete pack file {}: the catalog still names it",
                    p.display()
                )));
            }
            let len = fs::metadata(p).map(|m| m.len()).unwrap_or(0);
            match fs::remove_file(p) {
                Ok(()) => {
                    freed += len;
                    if let Some(d) = p.parent() {
                        dirs.insert(d.to_path_buf());
                    }
                    tracing::debug!(pack = %p.display(), bytes = len, "pack file deleted");
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::io(format!("delete pack file {}", p.display()), e)),
            }
        }
        for d in dirs {
            let _ = pack::sync_dir(&d);
        }
        Ok(freed)
    }

    /// Delete every pack file the catalog does not name (left by a crash of
    /// a checkpoint or of gc). Safe only under the writer lock, which this
    /// [`Writer`] holds: nobody else is between writing a pack and naming
    /// it. Returns (files, bytes).
    pub fn remove_orphan_packs(&self) -> Result<(u64, u64)> {
        let orphans = self.store().orphan_packs()?;
        let paths: Vec<PathBuf> = orphans.iter().map(|o| o.0.clone()).collect();
        let bytes = self.remove_pack_files(&paths)?;
        Ok((paths.len() as u64, bytes))
    }

    /// The packs whose live share (blob bytes still in the catalog over the
    /// blob bytes the file holds) is below `threshold` (0..=1) and that
    /// still hold something, with their live share.
    pub fn repack_candidates(&self, threshold: f64) -> Result<Vec<(PackRow, f64)>> {
        let store = self.store();
        let mut live: HashMap<i64, u64> = HashMap::new();
        for b in store.blob_rows()? {
            *live.entry(b.pack_id).or_default() += b.clen as u64;
        }
        Ok(store
            .pack_rows()?
            .into_iter()
            .filter_map(|p| {
                let l = *live.get(&p.id)?;
                let share = l as f64 / p.data_bytes().max(1) as f64;
                (share < threshold).then_some((p, share))
            })
            .collect())
    }

    /// Copy the live blobs of `packs` (their compressed bytes, each checked
    /// against its address on the way) into new pack files, durable before
    /// this returns; the catalog is not changed (see
    /// [`Writer::repack_commit`]). For an `s3://` store, packs not in the
    /// cache are read with ranged GETs of their live blobs. A pack that cannot be read or holds a
    /// corrupt live blob is an error: nothing is repacked then, and the new
    /// files are deleted.
    pub fn repack_write(&self, packs: &[PackRow]) -> Result<Repacked> {
        self.no_pending()?;
        let store = self.store();
        let mut by_pack: HashMap<i64, Vec<(Loc, BlobKind)>> = HashMap::new();
        {
            let conn = self.inner.conn();
            let p = &self.inner.catalog_path;
            for pk in packs {
                let name: std::sync::Arc<str> = pk.name.as_str().into();
                let locs = catalog::blobs::of_pack(&conn, p, pk.id)?
                    .into_iter()
                    .map(|(addr, offset, clen, ulen, kind)| (Loc { hash: addr, addr, pack: name.clone(), offset, clen, ulen }, kind))
                    .collect();
                by_pack.insert(pk.id, locs);
            }
        }
        let tmp = self.inner.root.join("tmp");
        let mut out = Repacked { old: Vec::new(), new: Vec::new() };
        let mut open: Option<OpenPack> = None;
        let result = (|| -> Result<()> {
            for pk in packs {
                let locs = &by_pack[&pk.id];
                if locs.is_empty() {
                    continue;
                }
                // The live blobs, from the cache's file or by ranged GETs.
                let work = [(pk.name.clone(), locs.iter().map(|(l, _)| l.clone()).collect::<Vec<Loc>>())];
                let got = self.inner.packs.read(&work)?;
                let (place, bufs) = &got[0];
                for ((l, _), b) in locs.iter().zip(bufs) {
                    store.decode_at(place, l, b)?;
                }
                for ((l, kind), buf) in locs.iter().zip(bufs.iter()) {
                    if open.is_none() {
                        open = Some(OpenPack::create(&tmp).ctx(|| format!("create a pack file in {}", tmp.display()))?);
                    }
                    let o = open.as_mut().expect("open pack");
                    o.append(*kind, l.hash, &buf[..], l.ulen).ctx(|| format!("write pack file in {}", tmp.display()))?;
                    if o.len() >= self.opts.pack_target {
                        let f = open.take().expect("open pack").finish(&self.inner.root).ctx(|| "finish a repacked pack file".to_string())?;
                        out.new.push(f);
                    }
                }
                out.old.push((pk.id, pk.name.clone(), pk.size));
            }
            if let Some(o) = open.take() {
                out.new.push(o.finish(&self.inner.root).ctx(|| "finish a repacked pack file".to_string())?);
            }
            Ok(())
        })();
        if let Err(e) = result {
            if let Some(o) = open.take() {
                o.discard();
            }
            for n in &out.new {
                let _ = fs::remove_file(&n.path);
            }
            return Err(e);
        }
        Ok(out)
    }

    /// Switch the catalog to the packs of `r` in one transaction (insert the
    /// new packs, point the moved blobs at them, delete the old pack rows).
    /// Returns the old pack files, to delete with
    /// [`Writer::remove_pack_files`].
    pub fn repack_commit(&self, r: &Repacked) -> Result<Vec<PathBuf>> {
        if r.is_empty() {
            return Ok(Vec::new());
        }
        self.no_pending()?;
        let path = self.inner.catalog_path.clone();
        self.with_transaction(|tx| {
            let now = now_ms();
            for f in &r.new {
                let id = catalog::packs::insert_or_get(tx, &path, &f.name, f.size, f.entries.len(), now)?;
                catalog::blobs::move_to(tx, &path, id, &f.entries)?;
            }
            for (id, name, _) in &r.old {
                let n = catalog::blobs::count_in_pack(tx, &path, *id)?;
                if n != 0 {
                    return Err(StoreError::Invalid(format!(
                        "repack refused: pack {name} still holds {n} blobs that were not copied; nothing was changed"
                    )));
                }
                catalog::packs::delete(tx, &path, *id)?;
            }
            Ok(r.old.iter().map(|o| pack::pack_path(&self.inner.root, &o.1)).collect())
        })
    }

    /// For an `s3://` store: upload the packs the cache's catalog names
    /// that S3 lacks (after a repack, the new packs). Returns (packs,
    /// bytes) sent; nothing for a local store.
    pub fn upload_missing_packs(&self) -> Result<(u64, u64)> {
        let Some(r) = self.inner.remote.as_deref() else { return Ok((0, 0)) };
        let conn = self.inner.conn();
        r.upload_missing_packs(&conn, &self.inner.catalog_path)
    }

    /// For an `s3://` store: upload the cache's catalog (after checking
    /// that this writer still holds the S3 lock), making maintenance done
    /// in the cache visible on S3. Upload the packs it names first
    /// ([`Writer::upload_missing_packs`]). Nothing for a local store.
    pub fn upload_catalog(&self) -> Result<()> {
        let (Some(r), Some(rl)) = (self.inner.remote.as_deref(), self.remote_lock.as_ref()) else {
            return Ok(());
        };
        let conn = self.inner.conn();
        r.publish_catalog(&conn, &self.inner.catalog_path, rl)
    }

    /// For an `s3://` store: the packs on S3 (name, size) that its catalog
    /// no longer names (dead packs of a sweep, old packs of a repack,
    /// leftovers of a crashed writer). Refused while the cache holds
    /// catalog changes not yet uploaded (S3's catalog may still name them).
    pub fn remote_orphan_packs(&self) -> Result<Vec<(String, u64)>> {
        let Some(r) = self.inner.remote.as_deref() else { return Ok(Vec::new()) };
        if crate::remote::is_unsynced(&self.inner.root) {
            return Err(StoreError::Invalid(format!(
                "refusing to look for unreferenced packs on {}: the local cache {} holds catalog changes not uploaded yet (upload the catalog first)",
                r.url(),
                self.inner.root.display()
            )));
        }
        self.store().remote_orphan_packs()
    }

    /// For an `s3://` store: delete these packs from S3 (from
    /// [`Writer::remote_orphan_packs`]). Refused, deleting nothing, if the
    /// catalog names one of them, if the cache holds changes not uploaded,
    /// or if this writer lost the S3 lock. Returns the bytes freed.
    pub fn remove_remote_packs(&self, packs: &[(String, u64)]) -> Result<u64> {
        let (Some(r), Some(rl)) = (self.inner.remote.as_deref(), self.remote_lock.as_ref()) else {
            return Ok(0);
        };
        if packs.is_empty() {
            return Ok(0);
        }
        if crate::remote::is_unsynced(&self.inner.root) {
            return Err(StoreError::Invalid(format!(
                "refusing to delete packs from {}: the local cache holds catalog changes not uploaded yet",
                r.url()
            )));
        }
        let named: HashSet<String> = self.store().pack_rows()?.into_iter().map(|p| p.name).collect();
        if let Some((n, _)) = packs.iter().find(|(n, _)| named.contains(n)) {
            return Err(StoreError::Invalid(format!(
                "refusing to delete {} from S3: the catalog still names it",
                r.object_url(&Remote::pack_rel(n))
            )));
        }
        rl.fence()?;
        let rels: Vec<String> = packs.iter().map(|(n, _)| Remote::pack_rel(n)).collect();
        r.delete_many(&rels)?;
        tracing::debug!(store = r.url(), packs = packs.len(), "packs deleted from S3");
        Ok(packs.iter().map(|p| p.1).sum())
    }

    /// A read handle on the same store.
    pub fn store(&self) -> Store {
        Store { inner: self.inner.clone() }
    }
}
