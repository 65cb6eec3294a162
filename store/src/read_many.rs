//! Batched reads of many blobs (a restart's memory): [`Store::read_blobs_batched`].
//!
//! [`Store::read_blobs`] hands each blob to its sink in a `Vec` of its own;
//! a restart of 1 GiB at 4 KiB chunks is 262 144 blobs, and the per-blob
//! costs (an allocation, a call, one `process_vm_writev` each on the
//! caller's side) add up. Here a run of blobs of one pack (in file order) is
//! decompressed into one reused buffer, each verified, and the whole batch
//! handed over at once, so the caller can write it with one vectored call.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use rayon::prelude::*;

use bytes::Bytes;

use crate::seal::Keys;
use crate::reader::{Loc, by_offset};
use crate::{Hash, Result, Store, StoreError, catalog};

/// Above this many blobs, `read_blobs` scans the index once instead of
/// looking each blob up.
pub(crate) const BULK_LOCATE: usize = 4096;

/// Blobs per batch: a batch is at most this many blobs (and, at 4 KiB
/// chunks, 1 MiB), under the kernel's `IOV_MAX` (1024) for one vectored
/// write.
pub const BATCH_BLOBS: usize = 256;

thread_local! {
    static BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    static OPENED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl Store {
    /// Reads the distinct blobs of `hashes` in parallel and hands them to
    /// `sink` in batches (from rayon threads, in no particular order): each
    /// batch is a list of `(hash, bytes)`, the bytes decompressed and
    /// verified, at most [`BATCH_BLOBS`] of them, all of one pack.
    /// [`Hash::ZERO_CHUNK`] comes as `chunk_size` zero bytes in a batch of
    /// its own. Every blob is located before any is read (a blob missing
    /// from the catalog is reported first). Stops at the first error of the
    /// store or of `sink`.
    pub fn read_blobs_batched(&self, hashes: &[Hash], sink: impl Fn(&[(Hash, &[u8])]) -> Result<()> + Sync) -> Result<()> {
        let t = std::time::Instant::now();
        let (has_zero, groups) = self.locate_distinct(hashes)?;
        tracing::debug!(ms = t.elapsed().as_millis() as u64, blobs = hashes.len(), "blobs located");
        if has_zero {
            sink(&[(Hash::ZERO_CHUNK, &vec![0u8; self.inner.chunk_size])])?;
        }
        let src = &self.inner.packs;
        for batch in by_offset(groups).chunks(src.packs_at_once()) {
            let fetched = src.read(batch)?;
            batch.par_iter().zip(fetched.par_iter()).try_for_each(|((_, locs), (place, bufs))| {
                let idx: Vec<usize> = (0..locs.len()).collect();
                idx.par_chunks(BATCH_BLOBS).try_for_each(|ix| {
                    let part: Vec<(&Loc, &[u8], Hash)> = ix.iter().map(|&i| (&locs[i], &bufs[i][..], locs[i].hash)).collect();
                    decode_batch(self.keys(), place, &part, &sink)
                })
            })?;
        }
        Ok(())
    }

    /// Reads every blob of `hashes` (a restart's chunks in the order of its
    /// chunk lists; a blob listed more than once is read once) and hands
    /// them to `sink` in batches, from rayon threads, in no particular
    /// order: each entry the indices into `hashes` of one blob and its
    /// bytes, decompressed and verified; at most [`BATCH_BLOBS`] blobs a
    /// batch, all of one pack. [`Hash::ZERO_CHUNK`] comes as `chunk_size`
    /// zero bytes in a batch of its own.
    ///
    /// Streamed: the catalog is scanned once in its key order, merged with
    /// the stored addresses sorted, and a pack's blobs are decoded in
    /// batches as the scan finds them, so decompression starts with the
    /// scan instead of after it. A pack that is a local file is mapped
    /// once and read ahead whole; another (an S3 pack not cached) is read
    /// after the scan, its ranges coalesced as [`Self::read_blobs_batched`]
    /// does. A blob missing from the catalog is reported before any error
    /// of a blob read; stops at the first error of the store or of `sink`
    /// (a batch already begun may still reach `sink`).
    pub fn read_blobs_indexed(&self, hashes: &[Hash], sink: impl Fn(&[(&[usize], &[u8])]) -> Result<()> + Sync) -> Result<()> {
        let t = std::time::Instant::now();
        // (stored address, index), sorted by address: the places of one
        // blob side by side. Zero chunks are stored nowhere.
        let (zeros, rest): (Vec<usize>, Vec<usize>) = (0..hashes.len()).partition(|&i| hashes[i].is_zero_chunk());
        let mut order: Vec<(Hash, usize)> = rest.into_par_iter().map(|i| (self.inner.addr(&hashes[i]), i)).collect();
        order.par_sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let idx: Vec<usize> = order.iter().map(|o| o.1).collect();
        // Distinct addresses and where each one's indices start in `idx`.
        let mut wanted: Vec<Hash> = Vec::new();
        let mut starts: Vec<usize> = Vec::new();
        for (j, (a, _)) in order.iter().enumerate() {
            if wanted.last() != Some(a) {
                wanted.push(*a);
                starts.push(j);
            }
        }
        starts.push(order.len());
        drop(order);
        let places = |k: usize| &idx[starts[k]..starts[k + 1]];
        if !zeros.is_empty() {
            sink(&[(&zeros[..], &vec![0u8; self.inner.chunk_size])])?;
        }
        if wanted.len() <= BULK_LOCATE {
            // A few blobs (a lazy restart's stacks): a lookup each beats a
            // scan of the whole index.
            let mut groups: HashMap<Arc<str>, Vec<(Loc, usize)>> = HashMap::new();
            {
                let conn = self.inner.conn();
                for k in 0..wanted.len() {
                    let loc = self.locate(&conn, &hashes[places(k)[0]])?;
                    groups.entry(loc.pack.clone()).or_default().push((loc, k));
                }
            }
            return self.read_by_pack(groups.into_iter().map(|(n, v)| (n.to_string(), v)).collect(), &places, &sink);
        }
        let keys = self.keys();
        let src = &self.inner.packs;
        let cat = &self.inner.catalog_path;
        let chunk_size = self.inner.chunk_size;
        let failed: std::sync::Mutex<Option<StoreError>> = std::sync::Mutex::new(None);
        let stop = std::sync::atomic::AtomicBool::new(false);
        let fail = |e: StoreError| {
            let mut f = failed.lock().unwrap_or_else(|e| e.into_inner());
            f.get_or_insert(e);
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        };
        // A batch of one mapped pack, each blob with its index into `wanted`.
        let decode = |place: &Path, map: &Bytes, mut part: Vec<(Loc, usize)>| {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
            part.sort_unstable_by_key(|(l, _)| l.offset);
            let mut items: Vec<(&Loc, &[u8], &[usize])> = Vec::with_capacity(part.len());
            for (loc, k) in &part {
                // Both from a catalog row: an offset past the map, or a
                // length no chunk has (the buffer is sized by it), is corrupt.
                let end = loc.offset.saturating_add(loc.clen as u64);
                if end > map.len() as u64 {
                    return fail(StoreError::Corrupt { pack: place.to_path_buf(), hash: loc.hash, reason: "pack file is truncated".into() });
                }
                if loc.ulen as usize > chunk_size {
                    let reason = format!("the catalog says it is {} bytes, more than a chunk ({chunk_size})", loc.ulen);
                    return fail(StoreError::Corrupt { pack: place.to_path_buf(), hash: loc.hash, reason });
                }
                items.push((loc, &map[loc.offset as usize..end as usize], places(*k)));
            }
            if let Err(e) = decode_batch(keys, place, &items, &sink) {
                fail(e);
            }
        };
        struct Pack {
            name: Arc<str>,
            /// The pack's file and map, if it is a local file.
            mapped: Option<(Arc<Path>, Bytes)>,
            /// Whether its batches are decoded during the scan: the pack
            /// was in the page cache. One on disk is decoded after the
            /// scan, in file order, while the scan runs its read-ahead.
            now: bool,
            pending: Vec<(Loc, usize)>,
        }
        let mut packs: HashMap<i64, Option<Pack>> = HashMap::new();
        let mut found = vec![false; wanted.len()];
        let scanned = rayon::in_place_scope(|s| -> Result<()> {
            let conn = self.inner.conn();
            let r = catalog::blobs::scan_merged(&conn, cat, &wanted, |k, (id, offset, clen, ulen)| {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    return Err(StoreError::Callback("stopped".into()));
                }
                let hash = hashes[places(k)[0]];
                let pack = match packs.entry(id) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        // A row naming a pack the table lacks is no
                        // location (as a join would have it).
                        let p = match catalog::packs::name_of(&conn, cat, id)? {
                            Some(name) => {
                                let mapped = src.mapped(&name, &hash).transpose()?;
                                let now = mapped.as_ref().is_some_and(|m| m.cached);
                                let mapped = mapped.map(|m| (Arc::from(m.path), m.map));
                                Some(Pack { name: Arc::from(name), mapped, now, pending: Vec::new() })
                            }
                            None => None,
                        };
                        e.insert(p)
                    }
                };
                let Some(pack) = pack else { return Ok(()) };
                found[k] = true;
                pack.pending.push((Loc { hash, addr: wanted[k], pack: pack.name.clone(), offset, clen, ulen }, k));
                if let Some((place, map)) = &pack.mapped
                    && pack.now
                    && pack.pending.len() == BATCH_BLOBS
                {
                    let part = std::mem::take(&mut pack.pending);
                    let (place, map) = (place.clone(), map.clone());
                    s.spawn(move |_| decode(&place, &map, part));
                }
                Ok(())
            });
            // What is left of each mapped pack, in file order.
            for p in packs.values_mut().flatten() {
                if let Some((place, map)) = &p.mapped {
                    let mut left = std::mem::take(&mut p.pending);
                    left.sort_unstable_by_key(|(l, _)| l.offset);
                    while !left.is_empty() {
                        let part: Vec<(Loc, usize)> = left.drain(..BATCH_BLOBS.min(left.len())).collect();
                        let (place, map) = (place.clone(), map.clone());
                        s.spawn(move |_| decode(&place, &map, part));
                    }
                }
            }
            r
        });
        // A blob missing from the catalog first (known once the scan went
        // through), then what a read met.
        if scanned.is_ok()
            && let Some(k) = found.iter().position(|f| !f)
        {
            return Err(StoreError::BlobNotFound { hash: hashes[places(k)[0]], path: self.inner.root.clone() });
        }
        if let Some(e) = failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
            return Err(e);
        }
        scanned?;
        tracing::debug!(ms = t.elapsed().as_millis() as u64, blobs = hashes.len(), "blobs located and read from the mapped packs");
        // Packs that are not local files: read after the scan, by pack,
        // in file order, as `read_blobs_batched` does.
        let (near, far): (Vec<Pack>, Vec<Pack>) = packs.into_values().flatten().partition(|p| p.mapped.is_some());
        // Unmapping the packs (~20 ms for 1 GiB) is left to a pool thread
        // (no new thread: one made now could take a TID the image needs).
        rayon::spawn(move || drop(near));
        self.read_by_pack(far.into_iter().map(|p| (p.name.to_string(), p.pending)).collect(), &places, &sink)
    }

    /// The blobs of `groups` (by pack: each blob's location and its index
    /// into the caller's distinct blobs, whose places `places` gives),
    /// read per pack in file order with [`crate::source::PackSource::read`]
    /// (ranges coalesced), decoded in batches and handed to `sink`.
    fn read_by_pack<'p>(&self, mut groups: Vec<(String, Vec<(Loc, usize)>)>, places: &(dyn Fn(usize) -> &'p [usize] + Sync), sink: &(impl Fn(&[(&'p [usize], &[u8])]) -> Result<()> + Sync)) -> Result<()> {
        let src = &self.inner.packs;
        let keys = self.keys();
        groups.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut work: Vec<(String, Vec<Loc>)> = Vec::new();
        let mut ks: Vec<Vec<usize>> = Vec::new();
        for (name, mut pending) in groups {
            pending.sort_unstable_by_key(|(l, _)| l.offset);
            let (locs, k): (Vec<Loc>, Vec<usize>) = pending.into_iter().unzip();
            work.push((name, locs));
            ks.push(k);
        }
        let at_once = src.packs_at_once().max(1);
        for (batch, ks) in work.chunks(at_once).zip(ks.chunks(at_once)) {
            let fetched = src.read(batch)?;
            batch.par_iter().zip(ks).zip(fetched.par_iter()).try_for_each(|(((_, locs), ks), (place, bufs))| {
                let ix: Vec<usize> = (0..locs.len()).collect();
                ix.par_chunks(BATCH_BLOBS).try_for_each(|ix| {
                    let part: Vec<(&Loc, &[u8], &[usize])> = ix.iter().map(|&i| (&locs[i], &bufs[i][..], places(ks[i]))).collect();
                    decode_batch(keys, place, &part, sink)
                })
            })?;
        }
        Ok(())
    }

    /// `hashes` made distinct and located ([`Self::locate_all`]), and
    /// whether [`Hash::ZERO_CHUNK`] was among them (it is stored nowhere).
    pub(crate) fn locate_distinct(&self, hashes: &[Hash]) -> Result<(bool, BTreeMap<String, Vec<Loc>>)> {
        let mut uniq: Vec<Hash> = hashes.to_vec();
        uniq.sort_unstable();
        uniq.dedup();
        let has_zero = uniq.first().is_some_and(|h| h.is_zero_chunk());
        Ok((has_zero, self.locate_all(&uniq)?))
    }

    /// Where each of `uniq` (sorted, distinct) is stored, by pack.
    pub(crate) fn locate_all(&self, uniq: &[Hash]) -> Result<BTreeMap<String, Vec<Loc>>> {
        let mut groups: BTreeMap<String, Vec<Loc>> = BTreeMap::new();
        let conn = self.inner.conn();
        let cat = &self.inner.catalog_path;
        if uniq.len() > BULK_LOCATE {
            // One pass over the index beats a lookup per blob: the wanted
            // addresses sorted, merged with the index's order.
            let mut wanted: Vec<(Hash, Hash)> = uniq.iter().filter(|h| !h.is_zero_chunk()).map(|h| (self.inner.addr(h), *h)).collect();
            wanted.par_sort_unstable_by(|a, b| a.0.cmp(&b.0));
            let addrs: Vec<Hash> = wanted.iter().map(|w| w.0).collect();
            let mut found: Vec<Option<catalog::blobs::IdPlace>> = vec![None; addrs.len()];
            catalog::blobs::scan_merged(&conn, cat, &addrs, |i, place| {
                found[i] = Some(place);
                Ok(())
            })?;
            let ids: HashSet<i64> = found.iter().flatten().map(|p| p.0).collect();
            let names: HashMap<i64, Arc<str>> = catalog::packs::names_of(&conn, cat, &ids)?.into_iter().map(|(id, n)| (id, Arc::from(n))).collect();
            let mut by_id: HashMap<i64, Vec<Loc>> = HashMap::new();
            for ((addr, hash), place) in wanted.into_iter().zip(found) {
                // A row naming a pack the table lacks is no location (as
                // a join would have it).
                let Some((id, offset, clen, ulen)) = place.filter(|p| names.contains_key(&p.0)) else {
                    return Err(StoreError::BlobNotFound { hash, path: self.inner.root.clone() });
                };
                by_id.entry(id).or_default().push(Loc { hash, addr, pack: names[&id].clone(), offset, clen, ulen });
            }
            groups.extend(by_id.into_iter().map(|(id, locs)| (names[&id].to_string(), locs)));
        } else {
            for h in uniq.iter().filter(|h| !h.is_zero_chunk()) {
                let loc = self.locate(&conn, h)?;
                groups.entry(loc.pack.to_string()).or_default().push(loc);
            }
        }
        Ok(groups)
    }
}

/// Decompresses and verifies `part` (each blob's location, stored bytes
/// and the caller's tag for it) into this thread's buffer and hands the
/// batch to `sink`, each blob's bytes with its tag.
fn decode_batch<T: Copy>(keys: Option<&Keys>, pack: &Path, part: &[(&Loc, &[u8], T)], sink: &(impl Fn(&[(T, &[u8])]) -> Result<()> + Sync)) -> Result<()> {
    let corrupt = |loc: &Loc, reason: String| StoreError::Corrupt { pack: pack.to_path_buf(), hash: loc.hash, reason };
    let total: usize = part.iter().map(|(l, _, _)| l.ulen as usize).sum();
    // The buffer is taken out of its slot while the sink runs: a sink that
    // reads again on this thread gets a buffer of its own.
    let mut buf = BUFFER.with(|b| std::mem::take(&mut *b.borrow_mut()));
    if buf.len() < total {
        buf.resize(total, 0);
    }
    let mut spans = Vec::with_capacity(part.len());
    let mut off = 0usize;
    let res = (|| -> Result<()> {
        let mut opened = OPENED.with(|b| std::mem::take(&mut *b.borrow_mut()));
        for &(loc, stored, tag) in part {
            let n = loc.ulen as usize;
            let out = &mut buf[off..off + n];
            // A sealed blob is opened first (its encoding is then known);
            // else raw (incompressible data, stored as it is) or compressed
            // (a zstd frame or an LZ4 blob, told by its first bytes): the
            // rule of `ckpt_chunker::decode`.
            let stored: &[u8] = match keys {
                Some(k) => {
                    let raw = k.open_into(&loc.addr, stored, &mut opened).map_err(|e| corrupt(loc, e))?;
                    if raw {
                        if opened.len() - 1 != n {
                            return Err(corrupt(loc, format!("it is {} bytes, the catalog says {n}", opened.len() - 1)));
                        }
                        out.copy_from_slice(&opened[1..]);
                        let actual = Hash::of(out);
                        if actual != loc.hash {
                            return Err(corrupt(loc, format!("its bytes hash to {actual}")));
                        }
                        spans.push((tag, off..off + n));
                        off += n;
                        continue;
                    }
                    &opened[1..]
                }
                None => {
                    if stored.len() == n && Hash::of(stored) == loc.hash {
                        out.copy_from_slice(stored);
                        spans.push((tag, off..off + n));
                        off += n;
                        continue;
                    }
                    stored
                }
            };
            ckpt_chunker::decompress_into(stored, out).map_err(|e| corrupt(loc, e.to_string()))?;
            let actual = Hash::of(out);
            if actual != loc.hash {
                return Err(corrupt(loc, format!("its bytes hash to {actual}")));
            }
            spans.push((tag, off..off + n));
            off += n;
        }
        OPENED.with(|b| *b.borrow_mut() = opened);
        Ok(())
    })();
    let res = res.and_then(|()| {
        let refs: Vec<(T, &[u8])> = spans.iter().map(|(t, r)| (*t, &buf[r.clone()])).collect();
        sink(&refs)
    });
    BUFFER.with(|b| *b.borrow_mut() = buf);
    res
}

/// Reads single blobs on a catalog connection of its own, so that it never
/// waits for the store's connection (busy with a long
/// [`Store::read_blobs_batched`] in another thread): a lazy restart's page
/// faults are served with it while the background fill runs.
pub struct BlobReader {
    store: Store,
    conn: std::sync::Mutex<rusqlite::Connection>,
}

impl Store {
    /// A [`BlobReader`] on this store.
    pub fn blob_reader(&self) -> Result<BlobReader> {
        let (conn, _) = crate::catalog::open(&self.inner.catalog_path, None)?;
        Ok(BlobReader { store: self.clone(), conn: std::sync::Mutex::new(conn) })
    }
}

impl BlobReader {
    /// One blob, decompressed and verified ([`Store::read_blob`]).
    pub fn read(&self, h: &Hash) -> Result<Vec<u8>> {
        let s = &self.store;
        if h.is_zero_chunk() {
            return Ok(vec![0; s.inner.chunk_size]);
        }
        let loc = {
            let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
            s.locate(&conn, h)?
        };
        s.read_located(loc)
    }

    /// A few blobs (a lazy restart's fault-around), each decompressed and
    /// verified: located on this reader's connection, read with one
    /// [`crate::source::PackSource::read`] (ranges of a pack coalesced),
    /// decoded on this thread (never waiting for the rayon pool, which a
    /// long [`Store::read_blobs_batched`] may hold). In no particular order;
    /// [`Hash::ZERO_CHUNK`] is left out.
    pub fn read_many(&self, hashes: &[Hash]) -> Result<Vec<(Hash, Vec<u8>)>> {
        let s = &self.store;
        let mut groups: BTreeMap<String, Vec<Loc>> = BTreeMap::new();
        {
            let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
            for h in hashes.iter().filter(|h| !h.is_zero_chunk()) {
                let loc = s.locate(&conn, h)?;
                groups.entry(loc.pack.to_string()).or_default().push(loc);
            }
        }
        let work = by_offset(groups);
        let fetched = s.inner.packs.read(&work)?;
        let mut out = Vec::with_capacity(hashes.len());
        for ((_, locs), (place, bufs)) in work.iter().zip(&fetched) {
            for (loc, b) in locs.iter().zip(bufs) {
                out.push((loc.hash, s.decode_at(place, loc, b)?));
            }
        }
        Ok(out)
    }
}
