//! Where a store's pack bytes come from: one [`PackSource`] per backend,
//! chosen once when the store is opened, as rustic's backends are: the
//! pack files of a directory ([`LocalPacks`]), or for an `s3://` store its
//! cache directory first and ranged GETs for the packs the cache lacks
//! ([`S3Packs`]). A reader asks for ranges of packs and decodes what comes
//! back the same way whichever source it is.
//!
//! This module must never decode or trust what it reads (the reader checks
//! every blob against its address), and must never hand back a range
//! shorter than asked for: a short pack is an error naming it and the blob.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use crate::reader::{Loc, open_pack};
use crate::remote::{self, Remote};
use crate::{Result, StoreError};

/// The stored bytes of blobs, read from packs.
pub(crate) trait PackSource: Send + Sync {
    /// For each `(pack, blobs)` of `work`, where the pack was read from
    /// (its file or its S3 URL, for messages) and each blob's stored bytes,
    /// in order, each exactly `clen` long.
    fn read(&self, work: &[(String, Vec<Loc>)]) -> Result<Vec<(PathBuf, Vec<Bytes>)>>;
    /// How many packs one [`PackSource::read`] should carry (bounds the
    /// memory of fetched ranges).
    fn packs_at_once(&self) -> usize;
}

/// The pack files under a store's directory.
pub(crate) struct LocalPacks {
    pub(crate) root: PathBuf,
}

/// An `s3://` store: a pack its cache directory holds is read there, any
/// other with ranged GETs (coalesced per pack).
pub(crate) struct S3Packs {
    pub(crate) local: LocalPacks,
    pub(crate) remote: Arc<Remote>,
}

/// The source of a store: S3 (through the cache) if it has a remote side.
pub(crate) fn for_store(root: &Path, remote: Option<&Arc<Remote>>) -> Arc<dyn PackSource> {
    let local = LocalPacks { root: root.to_path_buf() };
    match remote {
        Some(r) => Arc::new(S3Packs { local, remote: r.clone() }),
        None => Arc::new(local),
    }
}

fn truncated(path: &Path, loc: &Loc) -> StoreError {
    StoreError::Corrupt { pack: path.to_path_buf(), hash: loc.hash, reason: "pack file is truncated".into() }
}

impl LocalPacks {
    fn path(&self, name: &str) -> PathBuf {
        crate::pack::pack_path(&self.root, name)
    }

    /// One pack's blobs: one `pread` for a single blob, else the file
    /// mapped once and each blob a slice of the map.
    fn read_one(&self, name: &str, locs: &[Loc]) -> Result<(PathBuf, Vec<Bytes>)> {
        let path = self.path(name);
        let Some(first) = locs.first() else { return Ok((path, Vec::new())) };
        let f = open_pack(&path, &first.hash)?;
        if locs.len() == 1 {
            let mut buf = vec![0u8; first.clen as usize];
            f.read_exact_at(&mut buf, first.offset).map_err(|e| {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    truncated(&path, first)
                } else {
                    StoreError::io(format!("read pack file {}", path.display()), e)
                }
            })?;
            return Ok((path, vec![Bytes::from(buf)]));
        }
        #[allow(unsafe_code)]
        // SAFETY: pack files are immutable once renamed into place; no
        // ckpt process writes to or truncates a named pack (gc deletes or
        // replaces whole files, which keeps the mapped inode alive). The
        // map is only read, and every blob read from it is verified.
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| StoreError::io(format!("map pack file {}", path.display()), e))?;
        // Read ahead: the blobs of a restart are most of the pack.
        let _ = map.advise(memmap2::Advice::WillNeed);
        let len = map.len() as u64;
        let map = Bytes::from_owner(map);
        let mut out = Vec::with_capacity(locs.len());
        for loc in locs {
            let end = loc.offset + loc.clen as u64;
            if end > len {
                return Err(truncated(&path, loc));
            }
            out.push(map.slice(loc.offset as usize..end as usize));
        }
        Ok((path, out))
    }
}

impl PackSource for LocalPacks {
    fn read(&self, work: &[(String, Vec<Loc>)]) -> Result<Vec<(PathBuf, Vec<Bytes>)>> {
        work.iter().map(|(name, locs)| self.read_one(name, locs)).collect()
    }

    fn packs_at_once(&self) -> usize {
        usize::MAX
    }
}

impl PackSource for S3Packs {
    fn read(&self, work: &[(String, Vec<Loc>)]) -> Result<Vec<(PathBuf, Vec<Bytes>)>> {
        let mut out: Vec<Option<(PathBuf, Vec<Bytes>)>> = Vec::with_capacity(work.len());
        let mut far: Vec<usize> = Vec::new();
        for (i, (name, locs)) in work.iter().enumerate() {
            if self.local.path(name).exists() {
                out.push(Some(self.local.read_one(name, locs)?));
            } else {
                out.push(None);
                far.push(i);
            }
        }
        if !far.is_empty() {
            let req: Vec<(String, Vec<std::ops::Range<u64>>)> = far
                .iter()
                .map(|&i| {
                    let (name, locs) = &work[i];
                    (Remote::pack_rel(name), locs.iter().map(|l| l.offset..l.offset + l.clen as u64).collect())
                })
                .collect();
            let got = self.remote.get_ranges_many(&req)?;
            for (&i, bufs) in far.iter().zip(got) {
                let url = PathBuf::from(self.remote.object_url(&Remote::pack_rel(&work[i].0)));
                out[i] = Some((url, bufs));
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    fn packs_at_once(&self) -> usize {
        remote::CONCURRENCY
    }
}
