//! Reading blobs: where a blob lives ([`Loc`]), reading one or many of
//! them, and decoding (opening a sealed blob, decompressing, checking its
//! BLAKE3) every byte read, from a pack file or from S3.
//!
//! This module must never hand out a byte that has not been checked
//! against the blob's address, nor follow a pack name the catalog holds
//! without its check (see [`crate::catalog::blobs`]).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use rusqlite::Connection;

use crate::error::IoCtx;
use crate::remote::{self, Remote};
use crate::{Hash, Result, Store, StoreError, catalog};

/// Where a blob lives.
#[derive(Clone, Debug)]
pub(crate) struct Loc {
    /// The blob's BLAKE3 if the reader knows it (then checked after
    /// opening), else its stored address.
    pub(crate) hash: Hash,
    /// Its stored address (the catalog's and the trailer's).
    pub(crate) addr: Hash,
    pub(crate) pack: String,
    pub(crate) offset: u64,
    pub(crate) clen: u32,
    pub(crate) ulen: u32,
}

impl Store {
    pub(crate) fn locate(&self, conn: &Connection, h: &Hash) -> Result<Loc> {
        let addr = self.inner.addr(h);
        match catalog::blobs::locate(conn, &self.inner.catalog_path, &addr)? {
            Some((pack, offset, clen, ulen)) => Ok(Loc { hash: *h, addr, pack, offset, clen, ulen }),
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

    /// Like `decode`, naming the S3 object in errors.
    pub(crate) fn decode_remote(&self, r: &Remote, loc: &Loc, stored: &[u8]) -> Result<Vec<u8>> {
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
        self.read_located(&loc, h)
    }

    /// Reads blob `h`, found at `loc`, from its pack (a ranged GET when an
    /// S3 store's cache lacks the pack), decompressed and verified.
    pub(crate) fn read_located(&self, loc: &Loc, h: &Hash) -> Result<Vec<u8>> {
        let path = self.pack_path(&loc.pack);
        if let Some(r) = self.inner.remote.as_deref().filter(|_| !path.exists()) {
            let rel = Remote::pack_rel(&loc.pack);
            let range = loc.offset..loc.offset + loc.clen as u64;
            let got = r.get_ranges(&rel, std::slice::from_ref(&range))?;
            return self.decode_remote(r, loc, &got[0]);
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
        self.decode(loc, &buf)
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
        let (has_zero, mut groups) = self.locate_distinct(hashes)?;
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
            let (path, map) = self.map_pack(&name, &locs[0].hash)?;
            locs.par_iter().with_min_len(16).try_for_each(|loc| {
                let data = self.decode(loc, stored_bytes(&map, &path, loc)?)?;
                sink(&loc.hash, &data)
            })
        })
    }

    /// Pack `name` mapped whole (`h`: a blob wanted from it, named if the
    /// pack is missing), and its path.
    pub(crate) fn map_pack(&self, name: &str, h: &Hash) -> Result<(PathBuf, memmap2::Mmap)> {
        let path = self.pack_path(name);
        let f = open_pack(&path, h)?;
        #[allow(unsafe_code)]
        // SAFETY: pack files are immutable once renamed into place; no
        // ckpt process writes to or truncates a named pack (gc deletes or
        // replaces whole files, which keeps the mapped inode alive). The
        // map is only read, and every blob read from it is verified.
        let map = unsafe { memmap2::Mmap::map(&f) }.ctx(|| format!("map pack file {}", path.display()))?;
        Ok((path, map))
    }
}

/// The stored bytes of the blob at `loc` in a mapped pack (at `path`).
pub(crate) fn stored_bytes<'a>(map: &'a [u8], path: &Path, loc: &Loc) -> Result<&'a [u8]> {
    let end = loc.offset + loc.clen as u64;
    if end > map.len() as u64 {
        return Err(StoreError::Corrupt { pack: path.to_path_buf(), hash: loc.hash, reason: "pack file is truncated".into() });
    }
    Ok(&map[loc.offset as usize..end as usize])
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
