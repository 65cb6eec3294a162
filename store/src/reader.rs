//! Reading blobs: where a blob lives ([`Loc`]), reading one or many of
//! them, and decoding (opening a sealed blob, decompressing, checking its
//! BLAKE3) every byte read, from a pack file or from S3.
//!
//! This module must never hand out a byte that has not been checked
//! against the blob's address, nor follow a pack name the catalog holds
//! without its check (see [`crate::catalog::blobs`]).

use std::fs::File;
use std::path::Path;

use rayon::prelude::*;
use rusqlite::Connection;

use crate::{Hash, Result, Store, StoreError, catalog};

/// Where a blob lives.
#[derive(Clone, Debug)]
pub(crate) struct Loc {
    /// The blob's BLAKE3 if the reader knows it (then checked after
    /// opening), else its stored address.
    pub(crate) hash: Hash,
    /// Its stored address (the catalog's and the trailer's).
    pub(crate) addr: Hash,
    pub(crate) pack: std::sync::Arc<str>,
    pub(crate) offset: u64,
    pub(crate) clen: u32,
    pub(crate) ulen: u32,
}

impl Store {
    pub(crate) fn locate(&self, conn: &Connection, h: &Hash) -> Result<Loc> {
        let addr = self.inner.addr(h);
        match catalog::blobs::locate(conn, &self.inner.catalog_path, &addr)? {
            Some((pack, offset, clen, ulen)) => Ok(Loc { hash: *h, addr, pack: pack.into(), offset, clen, ulen }),
            None => Err(StoreError::BlobNotFound { hash: *h, path: self.inner.root.clone() }),
        }
    }

    /// Decompress and verify one blob's stored bytes.
    pub(crate) fn decode(&self, loc: &Loc, stored: &[u8]) -> Result<Vec<u8>> {
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

    /// Like `decode`, naming `place` (where the pack was read from) in
    /// errors.
    pub(crate) fn decode_at(&self, place: &Path, loc: &Loc, stored: &[u8]) -> Result<Vec<u8>> {
        self.decode(loc, stored).map_err(|e| match e {
            StoreError::Corrupt { hash, reason, .. } => StoreError::Corrupt { pack: place.to_path_buf(), hash, reason },
            e => e,
        })
    }

    /// One located blob, read from the store's pack source and decoded.
    pub(crate) fn read_located(&self, loc: Loc) -> Result<Vec<u8>> {
        let work = [(loc.pack.to_string(), vec![loc])];
        let got = self.inner.packs.read(&work)?;
        // A source hands back one entry per pack and one buffer per blob.
        let (place, bufs) = &got[0];
        self.decode_at(place, &work[0].1[0], &bufs[0])
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
        self.read_located(loc)
    }

    /// Read many blobs in parallel and hand each to `sink` (from rayon
    /// threads, in no particular order). Blobs are grouped by pack; each pack
    /// is read once from the store's pack source (a file mapped once, or
    /// ranged GETs a few packs at a time); every blob is verified.
    /// Duplicates in `hashes` are allowed: `sink` is called once per
    /// distinct hash. [`Hash::ZERO_CHUNK`] is passed as `chunk_size` zero
    /// bytes. All locations are looked up first, so a blob missing from the
    /// catalog is reported before any byte is read. Stops at the first error
    /// (of the store or of `sink`).
    pub fn read_blobs(
        &self,
        hashes: &[Hash],
        sink: impl Fn(&Hash, &[u8]) -> Result<()> + Sync,
    ) -> Result<()> {
        let (has_zero, groups) = self.locate_distinct(hashes)?;
        let work = by_offset(groups);
        if has_zero {
            sink(&Hash::ZERO_CHUNK, &vec![0u8; self.inner.chunk_size])?;
        }
        let src = &self.inner.packs;
        for batch in work.chunks(src.packs_at_once()) {
            let fetched = src.read(batch)?;
            batch.par_iter().zip(fetched.par_iter()).try_for_each(|((_, locs), (place, bufs))| {
                locs.par_iter().zip(bufs.par_iter()).with_min_len(16).try_for_each(|(loc, b)| {
                    let data = self.decode_at(place, loc, b)?;
                    sink(&loc.hash, &data)
                })
            })?;
        }
        Ok(())
    }
}

/// Groups of blobs by pack, each sorted by offset (the order to read them).
pub(crate) fn by_offset(groups: std::collections::BTreeMap<String, Vec<Loc>>) -> Vec<(String, Vec<Loc>)> {
    groups
        .into_iter()
        .map(|(n, mut locs)| {
            locs.sort_unstable_by_key(|l| l.offset);
            (n, locs)
        })
        .collect()
}

pub(crate) fn open_pack(path: &Path, h: &Hash) -> Result<File> {
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
