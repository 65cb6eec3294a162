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
        let (has_zero, groups) = self.locate_distinct(hashes)?;
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
            // One pass over the index beats a lookup per blob.
            let wanted: HashMap<Hash, Hash> = uniq.iter().filter(|h| !h.is_zero_chunk()).map(|h| (self.inner.addr(h), *h)).collect();
            let mut found = HashSet::with_capacity(wanted.len());
            catalog::blobs::scan_located(&conn, cat, |a| wanted.contains_key(a), |addr, (pack, offset, clen, ulen)| {
                let hash = wanted[&addr];
                if found.insert(hash) {
                    groups.entry(pack.clone()).or_default().push(Loc { hash, addr, pack, offset, clen, ulen });
                }
                Ok(())
            })?;
            if let Some(missing) = wanted.values().find(|h| !found.contains(*h)) {
                return Err(StoreError::BlobNotFound { hash: *missing, path: self.inner.root.clone() });
            }
        } else {
            for h in uniq.iter().filter(|h| !h.is_zero_chunk()) {
                let loc = self.locate(&conn, h)?;
                groups.entry(loc.pack.clone()).or_default().push(loc);
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
                groups.entry(loc.pack.clone()).or_default().push(loc);
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
