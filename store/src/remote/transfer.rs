//! `ckpt push` and `ckpt pull`: copying a whole store between a local
//! directory and S3, the packs the other side lacks (by name and size)
//! first and the catalog last, so that re-running an interrupted copy
//! skips what is already there.
//!
//! This module must never overwrite generations the destination has and
//! the source lacks ([`RemoteError::Diverged`]), nor rename a downloaded
//! pack into place before its size and BLAKE3 are checked.

use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::sync::Arc;

use super::client::{CATALOG_OBJECT, CONCURRENCY, Remote, is_s3_url};
use super::RemoveOnDrop;
use crate::error::{IoCtx, RemoteError, Result, StoreError};
use crate::remote_lock::RemoteLock;

/// Generation ids and manifests of a catalog file (opened read-only).
pub(crate) fn catalog_generations(path: &Path) -> Result<Vec<(u64, Vec<u8>)>> {
    crate::catalog::generations::manifests(&crate::catalog::open_read_only(path)?, path)
}

/// Packs (name, size) named by a catalog file (opened read-only).
pub(crate) fn catalog_packs(path: &Path) -> Result<Vec<(String, u64)>> {
    crate::catalog::packs::names_sizes(&crate::catalog::open_read_only(path)?, path)
}

/// Refuse to overwrite `dest` generations that `src` does not have.
pub(crate) fn check_not_diverged(
    src: &[(u64, Vec<u8>)],
    src_name: &str,
    dest: &[(u64, Vec<u8>)],
    dest_name: &str,
    fix: &str,
) -> Result<()> {
    let s: HashMap<u64, &Vec<u8>> = src.iter().map(|(i, m)| (*i, m)).collect();
    let extra: Vec<u64> = dest
        .iter()
        .filter(|(i, m)| s.get(i) != Some(&m))
        .map(|(i, _)| *i)
        .collect();
    if extra.is_empty() {
        return Ok(());
    }
    Err(RemoteError::Diverged {
        reason: format!(
            "{dest_name} has generations that {src_name} lacks or holds differently ({}); copying would lose them: {fix}",
            crate::store::describe_ids(&extra)
        ),
    }
    .into())
}

/// What a [`push`] or [`pull`] did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct TransferReport {
    /// Packs named by the source catalog.
    pub packs_total: u64,
    /// Packs copied now.
    pub packs_sent: u64,
    /// Their bytes.
    pub bytes_sent: u64,
    /// Packs the destination already had.
    pub packs_skipped: u64,
    /// Their bytes.
    pub bytes_skipped: u64,
    /// Size of the catalog copied last.
    pub catalog_bytes: u64,
    /// Generations in the copied catalog.
    pub generations: u64,
}

/// Progress of a [`push`] or [`pull`].
pub trait TransferProgress: Sync {
    /// The transfer of `packs` packs, `bytes` bytes in all, begins.
    fn start(&self, packs: u64, bytes: u64);
    /// `bytes` more bytes went through.
    fn bytes(&self, bytes: u64);
    /// One more pack is complete.
    fn pack_done(&self);
}

/// A [`TransferProgress`] that reports nothing.
pub struct NoProgress;

impl TransferProgress for NoProgress {
    fn start(&self, _: u64, _: u64) {}
    fn bytes(&self, _: u64) {}
    fn pack_done(&self) {}
}

/// Copy the local store `src` to `dest_url` (`s3://…`): the packs the remote
/// lacks (by name and size), then a snapshot of the catalog. Refuses if the
/// remote has generations `src` lacks. Safe to re-run after an interruption:
/// packs already there are skipped. Holds the cache lock of the remote store
/// (one writer per host) and its S3 writer lock ([`crate::remote_lock`]).
pub fn push(src: &crate::Store, dest_url: &str, progress: &dyn TransferProgress) -> Result<TransferReport> {
    if src.remote().is_some() {
        return Err(StoreError::Invalid(format!(
            "push copies a local store to S3; {} is itself on S3",
            src.url()
        )));
    }
    let remote = Arc::new(Remote::connect(dest_url)?);
    crate::private::create_dir_all(remote.cache_dir())
        .ctx(|| format!("create cache directory {}", remote.cache_dir().display()))?;
    let _lock = crate::lock_dir(remote.cache_dir())?;
    let s3_lock = RemoteLock::acquire(&remote)?;
    let tmp = src.root().join("tmp");
    crate::private::create_dir_all(&tmp).ctx(|| format!("create {}", tmp.display()))?;
    // A consistent view of the source: its catalog snapshot decides what goes.
    let snap = src.snapshot_catalog(&tmp)?;
    let _rm = RemoveOnDrop(snap.clone());
    let src_gens = catalog_generations(&snap)?;
    if let Some(_info) = remote.head(CATALOG_OBJECT)? {
        let theirs = tmp.join(format!("remote-catalog-{}.db", std::process::id()));
        let _rm2 = RemoveOnDrop(theirs.clone());
        remote.download(CATALOG_OBJECT, &theirs, &|_| {})?;
        let dest_gens = catalog_generations(&theirs)?;
        check_not_diverged(
            &src_gens,
            &src.url(),
            &dest_gens,
            dest_url,
            "pull them first, or push to another prefix",
        )?;
    }
    let packs = catalog_packs(&snap)?;
    let have = remote.list_packs()?;
    let mut rep = TransferReport {
        packs_total: packs.len() as u64,
        generations: src_gens.len() as u64,
        ..Default::default()
    };
    let todo_bytes: u64 = packs
        .iter()
        .filter(|(n, s)| have.get(n) != Some(s))
        .map(|(_, s)| *s)
        .sum();
    let todo_n = packs.iter().filter(|(n, s)| have.get(n) != Some(s)).count() as u64;
    rep.packs_skipped = rep.packs_total - todo_n;
    rep.bytes_skipped = packs.iter().map(|(_, s)| *s).sum::<u64>() - todo_bytes;
    progress.start(todo_n, todo_bytes);
    let (n, b) = remote.upload_packs(src.root(), &packs, &have, &|bytes, done| {
        if bytes > 0 {
            progress.bytes(bytes);
        }
        if done {
            progress.pack_done();
        }
    })?;
    rep.packs_sent = n;
    rep.bytes_sent = b;
    rep.catalog_bytes = fs::metadata(&snap).map(|m| m.len()).unwrap_or(0);
    s3_lock.fence()?;
    remote.upload_file(CATALOG_OBJECT, &snap, &|_| {})?;
    drop(s3_lock);
    tracing::info!(dest = dest_url, packs = n, bytes = b, skipped = rep.packs_skipped, "push complete");
    Ok(rep)
}

/// Copy the S3 store `src_url` into the local store `dest_url` (created if
/// need be): the packs it lacks, each verified (size and BLAKE3 = its
/// name) before it is renamed into place, then the catalog. Refuses if the
/// destination has generations the source lacks. Safe to re-run after an
/// interruption. Takes the destination's writer lock.
pub fn pull(src_url: &str, dest_url: &str, progress: &dyn TransferProgress) -> Result<TransferReport> {
    if is_s3_url(dest_url) {
        return Err(StoreError::Invalid(format!(
            "pull copies an S3 store into a local directory; {dest_url} is on S3"
        )));
    }
    let remote = Remote::connect(src_url)?;
    let dest = crate::Store::open_or_create(dest_url, crate::DEFAULT_CHUNK_SIZE)?;
    let writer = dest.writer()?;
    let tmp = dest.root().join("tmp");
    let cat = tmp.join(format!("pulled-catalog-{}.db", std::process::id()));
    let _rm = RemoveOnDrop(cat.clone());
    remote.download(CATALOG_OBJECT, &cat, &|_| {})?;
    crate::catalog::header_version(&cat)?;
    let src_gens = catalog_generations(&cat)?;
    let dest_gens: Vec<(u64, Vec<u8>)> = dest
        .generations()?
        .into_iter()
        .map(|g| (g.id, g.manifest.0.to_vec()))
        .collect();
    check_not_diverged(
        &src_gens,
        src_url,
        &dest_gens,
        &dest.url(),
        "push them first, or pull into another directory",
    )?;
    let packs = catalog_packs(&cat)?;
    let todo: Vec<&(String, u64)> = packs
        .iter()
        .filter(|(n, s)| {
            fs::metadata(dest.pack_path(n)).map(|m| m.len()) .ok() != Some(*s)
        })
        .collect();
    let todo_bytes: u64 = todo.iter().map(|(_, s)| *s).sum();
    let mut rep = TransferReport {
        packs_total: packs.len() as u64,
        packs_skipped: (packs.len() - todo.len()) as u64,
        bytes_skipped: packs.iter().map(|(_, s)| *s).sum::<u64>() - todo_bytes,
        generations: src_gens.len() as u64,
        ..Default::default()
    };
    progress.start(todo.len() as u64, todo_bytes);
    for batch in todo.chunks(CONCURRENCY) {
        let results: Vec<Result<u64>> = std::thread::scope(|sc| {
            let hs: Vec<_> = batch
                .iter()
                .map(|(name, size)| {
                    let remote = &remote;
                    let dest = &dest;
                    let tmp = &tmp;
                    sc.spawn(move || -> Result<u64> {
                        let rel = Remote::pack_rel(name);
                        let part = tmp.join(format!("{name}.pull"));
                        let _rm = RemoveOnDrop(part.clone());
                        let (info, hash) = remote.download(&rel, &part, &|b| progress.bytes(b))?;
                        if info.size != *size || hash != *name {
                            return Err(RemoteError::CorruptObject {
                                object: remote.object_url(&rel),
                                reason: if info.size != *size {
                                    format!("it is {} bytes, the catalog says {size}", info.size)
                                } else {
                                    format!("its bytes hash to {hash}, not to its name")
                                },
                            }
                            .into());
                        }
                        let final_path = dest.pack_path(name);
                        let dir = final_path.parent().expect("pack dir");
                        crate::private::create_dir_all(dir).ctx(|| format!("create {}", dir.display()))?;
                        fs::rename(&part, &final_path)
                            .ctx(|| format!("rename {} into place", final_path.display()))?;
                        crate::pack::sync_dir(dir).ctx(|| format!("fsync {}", dir.display()))?;
                        progress.pack_done();
                        Ok(*size)
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(StoreError::Invalid("download thread panicked".into()))))
                .collect()
        });
        for r in results {
            rep.bytes_sent += r?;
            rep.packs_sent += 1;
        }
    }
    rep.catalog_bytes = fs::metadata(&cat).map(|m| m.len()).unwrap_or(0);
    writer.replace_catalog(&cat)?;
    tracing::info!(src = src_url, packs = rep.packs_sent, bytes = rep.bytes_sent, "pull complete");
    Ok(rep)
}
