//! S3-compatible object storage behind a store (`s3://BUCKET/PREFIX`).
//!
//! An S3 store is a normal local store in a cache directory plus a remote
//! copy of it:
//!
//! ```text
//! s3://BUCKET/PREFIX/catalog.db               a consistent snapshot of the catalog
//! s3://BUCKET/PREFIX/packs/<hh>/<hex>.pack    the pack files, byte for byte
//!
//! $CKPT_S3_CACHE or $XDG_CACHE_HOME/ckpt/s3/<bucket>/<hash of endpoint+prefix>/
//!     catalog.db, packs/, tmp/, lock          the local store (see the crate doc)
//!     synced-etag                             ETag of the remote catalog the local one equals
//!     unsynced                                present while local commits are not uploaded
//! ```
//!
//! * Writers commit locally, then upload the commit's new packs (multipart
//!   for large ones) and then a snapshot of the catalog (`VACUUM INTO`):
//!   packs strictly before the catalog that names them, so a reader of the
//!   remote never sees a generation whose data is missing. A failed upload
//!   leaves the `unsynced` marker; the next writer (or `ckpt push`) uploads
//!   whatever the remote lacks before anything else.
//! * Opening the store downloads the remote catalog when its ETag differs
//!   from the one the cache holds. Pack files are never downloaded for a
//!   read: the blobs a restart needs are fetched with ranged GETs, coalesced
//!   per pack, and BLAKE3-verified like local blobs.
//! * [`push`] / [`pull`] copy a whole store between a local directory and
//!   S3, sending only the packs the other side lacks (by name, which is the
//!   pack's BLAKE3, and size), then the catalog: re-running an interrupted
//!   copy skips what is already there.
//!
//! Configuration comes from the usual variables: `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` /
//! `AWS_DEFAULT_REGION` and `AWS_ENDPOINT_URL` (for S3-compatible servers,
//! path-style requests). Plain `http://` endpoints are allowed on loopback
//! addresses, or anywhere with `AWS_ALLOW_HTTP=true`.
//!
//! The object_store client is async; this module hides it behind a blocking
//! API with a private current-thread tokio runtime per [`Remote`].
//!
//! One writer at a time: the cache directory's `lock` keeps writers on one
//! host apart, and the lock object `s3://BUCKET/PREFIX/lock` (a conditional
//! PUT, see [`crate::remote_lock`]) keeps writers on different hosts apart.
//! A writer first uploads what an earlier, interrupted write of its cache
//! left unsynced, unless another writer changed the remote catalog since:
//! then those local commits (never acknowledged as uploaded) are dropped
//! and the remote catalog is taken, so a stale cache never overwrites
//! someone else's generations.
//!
//! Maintenance (`ckpt gc`) works on the cache's catalog and then publishes
//! it in the same order: new packs, then the catalog, and only then deletes
//! the remote packs the uploaded catalog no longer names
//! ([`crate::Writer::remove_remote_packs`]).
//!
//! The module is in three parts: [`client`] (the blocking S3 client: URLs,
//! requests, ranged GETs, uploads, error classification), `sync` (the
//! cache directory against S3: the catalog's ETag, the `unsynced` marker,
//! uploads after a commit) and [`transfer`] (`push` and `pull` of whole
//! stores). Its errors are [`RemoteError`], defined beside
//! [`crate::StoreError`] in [`crate::error`].
//!
//! This module must never decide what a pack or catalog means (the store
//! does that); it moves bytes between the cache and S3, and must never
//! upload a catalog before the packs it names.

use std::fs;
use std::path::PathBuf;

pub mod client;
pub(crate) mod sync;
pub mod transfer;

pub use crate::error::RemoteError;
pub use client::{CATALOG_OBJECT, COALESCE_GAP, CONCURRENCY, MULTIPART_THRESHOLD, ObjectInfo, Remote, is_s3_url, parse_s3_url};
pub(crate) use client::CondPut;
pub(crate) use sync::{CacheState, clear_unsynced, install_catalog, is_unsynced, mark_unsynced};
pub use transfer::{NoProgress, TransferProgress, TransferReport, pull, push};

/// A file removed when this is dropped (temporary catalogs and downloads).
pub(crate) struct RemoveOnDrop(pub(crate) PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}
