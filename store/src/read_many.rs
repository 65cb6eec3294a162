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
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
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
                    let part: Vec<(&Loc, &[u8])> = ix.iter().map(|&i| (&locs[i], &bufs[i][..])).collect();
                    decode_batch(self.keys(), place, &part, &sink)
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

/// Decompresses and verifies `part` (each blob's location and stored
/// bytes) into this thread's buffer and hands the batch to `sink`.
fn decode_batch(keys: Option<&Keys>, pack: &Path, part: &[(&Loc, &[u8])], sink: &(impl Fn(&[(Hash, &[u8])]) -> Result<()> + Sync)) -> Result<()> {
    let corrupt = |loc: &Loc, reason: String| StoreError::Corrupt { pack: pack.to_path_buf(), hash: loc.hash, reason };
    let total: usize = part.iter().map(|(l, _)| l.ulen as usize).sum();
    // The buffer is taken out of its slot while the sink runs: a sink that
    // reads again on this thread gets a buffer of its own.
    let mut buf = BUFFER.with(|b| std::mem::take(&mut *b.borrow_mut()));
    if buf.len() < total {
        buf.resize(total, 0);
    }
    let mut spans = Vec::with_capacity(part.len());
    let mut off = 0usize;
    let res = DECOMPRESSOR.with(|d| -> Result<()> {
        let mut slot = d.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new().map_err(|e| StoreError::io("create a zstd decompressor", e))?);
        }
        let d = slot.as_mut().expect("just created");
        let mut opened = OPENED.with(|b| std::mem::take(&mut *b.borrow_mut()));
        for (loc, stored) in part {
            let n = loc.ulen as usize;
            let out = &mut buf[off..off + n];
            // A sealed blob is opened first (its encoding is then known);
            // else raw (incompressible data, stored as it is) or one zstd
            // frame: the rule of `ckpt_chunker::decode`.
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
                        spans.push((loc.hash, off..off + n));
                        off += n;
                        continue;
                    }
                    &opened[1..]
                }
                None => {
                    if stored.len() == n && Hash::of(stored) == loc.hash {
                        out.copy_from_slice(stored);
                        spans.push((loc.hash, off..off + n));
                        off += n;
                        continue;
                    }
                    stored
                }
            };
            let got = d.decompress_to_buffer(stored, out).map_err(|e| corrupt(loc, format!("zstd: {e}")))?;
            if got != n {
                return Err(corrupt(loc, format!("decompresses to {got} bytes, the catalog says {n}")));
            }
            let actual = Hash::of(out);
            if actual != loc.hash {
                return Err(corrupt(loc, format!("its bytes hash to {actual}")));
            }
            spans.push((loc.hash, off..off + n));
            off += n;
        }
        OPENED.with(|b| *b.borrow_mut() = opened);
        Ok(())
    });
    let res = res.and_then(|()| {
        let refs: Vec<(Hash, &[u8])> = spans.iter().map(|(h, r)| (*h, &buf[r.clone()])).collect();
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
