//! The cache directory of an S3 store against S3: which remote catalog
//! the cache equals (`synced-etag`), whether it holds commits S3 lacks
//! (`unsynced`), bringing it up to date, and the uploads of a commit or of
//! maintenance: packs first, then the catalog.
//!
//! This module must never upload a catalog before the packs it names, nor
//! without fencing the writer's S3 lock first ([`RemoteLock::fence`]).

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use object_store::PutMode;
use rusqlite::Connection;

use super::client::{CATALOG_OBJECT, CONCURRENCY, CondPut, Remote};
use super::RemoveOnDrop;
use crate::error::{IoCtx, Result, StoreError};
use crate::remote_lock::RemoteLock;

impl Remote {
    /// Upload a consistent snapshot of the catalog behind `conn` (its own
    /// file is `catalog`), after `VACUUM INTO` a temporary file in `tmp_dir`.
    /// Returns the remote catalog's new ETag.
    pub fn upload_catalog(
        &self,
        conn: &Connection,
        catalog: &Path,
        tmp_dir: &Path,
    ) -> Result<Option<String>> {
        let snap = crate::catalog::snapshot(conn, catalog, tmp_dir)?;
        let r = self.upload_file(CATALOG_OBJECT, &snap, &|_| {});
        let _ = fs::remove_file(&snap);
        let etag = r?;
        tracing::debug!(object = %self.object_url(CATALOG_OBJECT), ?etag, "catalog uploaded");
        Ok(etag)
    }

    /// Upload the packs `names` (files under the local store `root`) that the
    /// remote lacks (`have`: name → size, as from [`Remote::list_packs`]; a
    /// pack of another size is sent again), up to [`CONCURRENCY`] at a time.
    /// `progress(bytes, pack_done)` is called as data goes out.
    pub fn upload_packs(
        &self,
        root: &Path,
        packs: &[(String, u64)],
        have: &HashMap<String, u64>,
        progress: &(dyn Fn(u64, bool) + Sync),
    ) -> Result<(u64, u64)> {
        let todo: Vec<&(String, u64)> = packs
            .iter()
            .filter(|(n, s)| have.get(n) != Some(s))
            .collect();
        let (mut n, mut bytes) = (0u64, 0u64);
        // Small packs in one request each, concurrently; large ones in parts.
        for batch in todo.chunks(CONCURRENCY) {
            let results: Vec<Result<u64>> = std::thread::scope(|sc| {
                let hs: Vec<_> = batch
                    .iter()
                    .map(|(name, size)| {
                        sc.spawn(move || -> Result<u64> {
                            let path = crate::pack::pack_path(root, name);
                            let actual = fs::metadata(&path)
                                .ctx(|| format!("stat pack file {}", path.display()))?
                                .len();
                            if actual != *size {
                                return Err(StoreError::Corrupt {
                                    pack: path,
                                    hash: crate::Hash::ZERO_CHUNK,
                                    reason: format!(
                                        "it is {actual} bytes, the catalog says {size}; run `ckpt verify`"
                                    ),
                                });
                            }
                            self.upload_file(&Self::pack_rel(name), &path, &|b| progress(b, false))?;
                            progress(0, true);
                            Ok(*size)
                        })
                    })
                    .collect();
                hs.into_iter()
                    .map(|h| h.join().unwrap_or_else(|_| Err(StoreError::Invalid("upload thread panicked".into()))))
                    .collect()
            });
            for r in results {
                bytes += r?;
                n += 1;
            }
        }
        Ok((n, bytes))
    }
}

// ------------------------------------------------------------ cache state

fn synced_etag_path(cache: &Path) -> PathBuf {
    cache.join("synced-etag")
}

fn unsynced_path(cache: &Path) -> PathBuf {
    cache.join("unsynced")
}

/// Whether the cache holds commits the remote lacks.
pub(crate) fn is_unsynced(cache: &Path) -> bool {
    unsynced_path(cache).exists()
}

/// Mark the cache as ahead of the remote (before a local commit).
pub(crate) fn mark_unsynced(cache: &Path) -> Result<()> {
    let p = unsynced_path(cache);
    crate::private::write_file(&p, b"local commits not yet uploaded\n").ctx(|| format!("write {}", p.display()))
}

/// Forget that the cache holds unsynced commits (they are being discarded).
pub(crate) fn clear_unsynced(cache: &Path) -> Result<()> {
    let u = unsynced_path(cache);
    match fs::remove_file(&u) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(StoreError::io(format!("remove {}", u.display()), e)),
        _ => Ok(()),
    }
}

/// Record that the local catalog equals the remote one with `etag`.
pub(crate) fn mark_synced(cache: &Path, etag: Option<&str>) -> Result<()> {
    let p = synced_etag_path(cache);
    crate::private::write_file(&p, etag.unwrap_or("").as_bytes()).ctx(|| format!("write {}", p.display()))?;
    let u = unsynced_path(cache);
    if u.exists() {
        fs::remove_file(&u).ctx(|| format!("remove {}", u.display()))?;
    }
    Ok(())
}

fn synced_etag(cache: &Path) -> Option<String> {
    fs::read_to_string(synced_etag_path(cache))
        .ok()
        .filter(|s| !s.is_empty())
}

/// What [`Remote::prepare_cache`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum CacheState {
    /// The cache catalog is current (or newer: unsynced local commits).
    Current,
    /// The remote has no store yet.
    NoRemoteStore,
}

impl Remote {
    /// Make the cache's catalog file match the remote catalog, downloading
    /// it if its ETag changed. Call with the cache lock held and no
    /// connection open on the cache catalog. A cache with unsynced commits
    /// is left alone (it is newer).
    pub(crate) fn prepare_cache(&self) -> Result<CacheState> {
        let cache = self.cache_dir();
        let catalog = cache.join("catalog.db");
        if is_unsynced(cache) && catalog.exists() {
            tracing::warn!(store = %self.url(), cache = %cache.display(), "the local cache holds commits not yet uploaded; they go up with the next commit or `ckpt push`");
            return Ok(CacheState::Current);
        }
        let Some(info) = self.head(CATALOG_OBJECT)? else {
            return Ok(CacheState::NoRemoteStore);
        };
        if catalog.exists() && info.etag.is_some() && synced_etag(cache) == info.etag {
            return Ok(CacheState::Current);
        }
        let tmp = cache.join("tmp");
        crate::private::create_dir_all(&tmp).ctx(|| format!("create {}", tmp.display()))?;
        let dl = tmp.join(format!("catalog-download-{}.db", std::process::id()));
        let _rm = RemoveOnDrop(dl.clone());
        let (info, _) = self.download(CATALOG_OBJECT, &dl, &|_| {})?;
        crate::catalog::header_version(&dl)?;
        install_catalog(&dl, &catalog)?;
        mark_synced(cache, info.etag.as_deref())?;
        tracing::debug!(store = %self.url(), size = info.size, "catalog downloaded");
        Ok(CacheState::Current)
    }

    /// Upload every pack of the cache's catalog that the remote lacks;
    /// returns (packs, bytes) sent.
    pub(crate) fn upload_missing_packs(&self, conn: &Connection, catalog: &Path) -> Result<(u64, u64)> {
        let packs = crate::catalog::packs::names_sizes(conn, catalog)?;
        let have = self.list_packs()?;
        self.upload_packs(self.cache_dir(), &packs, &have, &|_, _| {})
    }

    /// Upload the catalog behind `conn` (after checking that `lock` is
    /// still ours) and clear the unsynced marker.
    pub(crate) fn publish_catalog(&self, conn: &Connection, catalog: &Path, lock: &RemoteLock) -> Result<()> {
        lock.fence()?;
        let etag = self.upload_catalog(conn, catalog, &self.cache_dir().join("tmp"))?;
        mark_synced(self.cache_dir(), etag.as_deref())
    }

    /// Upload every pack of the cache the remote lacks, then the catalog
    /// behind `conn`; clears the unsynced marker.
    pub(crate) fn sync_up(&self, conn: &Connection, catalog: &Path, lock: &RemoteLock) -> Result<()> {
        self.upload_missing_packs(conn, catalog)?;
        self.publish_catalog(conn, catalog, lock)
    }

    /// A new store: upload the (empty) catalog behind `conn` only if no
    /// catalog exists yet (`If-None-Match: *`). Returns false, changing
    /// nothing, if another writer created the store meanwhile.
    pub(crate) fn create_catalog(&self, conn: &Connection, catalog: &Path) -> Result<bool> {
        let snap = crate::catalog::snapshot(conn, catalog, &self.cache_dir().join("tmp"))?;
        let _rm = RemoveOnDrop(snap.clone());
        let bytes = fs::read(&snap).ctx(|| format!("read {}", snap.display()))?;
        match self.put_if(CATALOG_OBJECT, bytes, PutMode::Create)? {
            CondPut::Written(etag) => {
                mark_synced(self.cache_dir(), Some(&etag))?;
                Ok(true)
            }
            CondPut::Refused => Ok(false),
        }
    }

    /// After a local commit that wrote `new_packs`: upload them, then the
    /// catalog; clears the unsynced marker.
    pub(crate) fn upload_commit(
        &self,
        new_packs: &[(String, u64)],
        conn: &Connection,
        catalog: &Path,
        lock: &RemoteLock,
    ) -> Result<()> {
        self.upload_packs(self.cache_dir(), new_packs, &HashMap::new(), &|_, _| {})?;
        self.publish_catalog(conn, catalog, lock)
    }

    /// Whether the remote catalog is not the one the cache last synced with
    /// (another writer uploaded since). False if there is no remote catalog.
    pub(crate) fn moved_since_sync(&self) -> Result<bool> {
        Ok(match self.head(CATALOG_OBJECT)? {
            Some(i) => i.etag.is_none() || i.etag != synced_etag(self.cache_dir()),
            None => false,
        })
    }

    /// Whether the remote catalog changed since the cache last matched it.
    pub(crate) fn remote_changed(&self) -> Result<bool> {
        if is_unsynced(self.cache_dir()) {
            return Ok(false);
        }
        let info = self.head(CATALOG_OBJECT)?;
        Ok(match info {
            Some(i) => i.etag.is_none() || i.etag != synced_etag(self.cache_dir()),
            None => false,
        })
    }
}

/// Replace `catalog` (no connection may be open on it) with the file
/// `new`: drop the old WAL and shared-memory files, rename, fsync.
pub(crate) fn install_catalog(new: &Path, catalog: &Path) -> Result<()> {
    for ext in ["db-wal", "db-shm"] {
        let p = catalog.with_extension(ext);
        if p.exists() {
            fs::remove_file(&p).ctx(|| format!("remove {}", p.display()))?;
        }
    }
    fs::rename(new, catalog).ctx(|| format!("rename {} to {}", new.display(), catalog.display()))?;
    if let Some(d) = catalog.parent() {
        crate::pack::sync_dir(d).ctx(|| format!("fsync {}", d.display()))?;
    }
    Ok(())
}
