//! The ckpt chunk store: content-addressed blobs in pack files, indexed by a
//! SQLite catalog that also records the committed generations.
//!
//! A store is a directory (`file:///abs/path` or a plain path):
//!
//! ```text
//! <root>/catalog.db              SQLite (WAL), PRAGMA user_version = schema version
//! <root>/packs/<hh>/<hex>.pack   immutable pack files (see [`pack`])
//! <root>/tmp/                    packs being written
//! <root>/lock                    flock'd by the one writer; holds its pid
//! ```
//!
//! Reading ([`Store`]) needs no lock. Writing goes through one [`Writer`] at a
//! time (an exclusive `flock` on `<root>/lock`). Crash safety: a pack is
//! complete and durable before the catalog names it, and a generation (its
//! packs, blobs and row) is committed in one SQLite transaction, so a crash
//! leaves every earlier generation intact and no partial one visible (at
//! worst, orphan pack files that nothing references).
//!
//! A store can also live in S3-compatible object storage
//! (`s3://BUCKET/PREFIX`, see [`remote`]): it is then a local store in a
//! cache directory whose packs and catalog are uploaded after every commit
//! (packs first), and whose reads fetch just the blobs they need with ranged
//! GETs. [`remote::push`] and [`remote::pull`] copy whole stores between a
//! directory and S3. Its writers also hold a lock object on S3
//! ([`remote_lock`]: a conditional PUT with a lease) so that writers on
//! different hosts never both commit; maintenance ([`maintenance`]) works
//! on the cache and is published packs first, then the catalog, and only
//! then are unreferenced packs deleted from S3. Verification of an S3 store
//! reads S3, not the cache.
//!
//! This crate must never know about processes, memory layouts or image
//! manifests: it stores opaque blobs and generation rows that point at a
//! manifest blob.

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod error;
pub mod private;
pub mod seal;
pub mod pack;
pub mod remote;
pub mod remote_lock;

mod catalog;
mod lock;
pub mod maintenance;
pub mod migrate;
mod read_many;
mod reader;
mod store;
mod verify;
mod writer;
pub use read_many::{BATCH_BLOBS, BlobReader};

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

pub use catalog::SCHEMA_VERSION;
pub use ckpt_chunker::Hash;
pub use error::{Result, StoreError};
pub use lock::OwnerLock;
/// The SQLite binding used by the catalog (for [`Writer::with_transaction`]).
pub use rusqlite;
pub use store::{Store, parse_url};
pub use writer::{BlobSink, Writer};

pub(crate) use lock::{CACHE_LOCK_WAIT, lock_dir, lock_dir_wait};

/// Default chunk size of a new store: one page, the granularity of dirty
/// tracking, so an incremental checkpoint stores only the pages that changed
/// (BENCHMARKS.md: 16 KiB chunks stored ~4x the changed bytes at 1% random).
pub const DEFAULT_CHUNK_SIZE: usize = 4096;
/// Largest accepted chunk size.
pub const MAX_CHUNK_SIZE: usize = 64 << 20;
/// Above this many blobs, `read_blobs` scans the index once instead of
/// looking each blob up.
pub(crate) const BULK_LOCATE: usize = 4096;
/// Default target size of a pack file; a pack is also closed at every commit.
pub const DEFAULT_PACK_TARGET: u64 = 32 << 20;

/// What a blob is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[repr(u8)]
pub enum BlobKind {
    /// A chunk of memory (or file) contents.
    Chunk = 0,
    /// Metadata: manifests, chunk lists.
    Meta = 1,
}

impl BlobKind {
    /// Decode the on-disk value.
    pub fn from_u8(v: u8) -> Option<BlobKind> {
        match v {
            0 => Some(BlobKind::Chunk),
            1 => Some(BlobKind::Meta),
            _ => None,
        }
    }
}

/// A committed generation (one row of the catalog).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenerationInfo {
    /// Generation number (ascending, never reused).
    pub id: u64,
    /// Generation this one is incremental to, if any.
    pub parent: Option<u64>,
    /// When the checkpoint started (ms since the Unix epoch).
    pub created_ms: i64,
    /// How long the checkpoint took.
    pub duration_ms: u64,
    /// Number of processes in the image.
    pub nprocs: u32,
    /// Size of the image (uncompressed, all chunks including known ones).
    pub logical_bytes: u64,
    /// Uncompressed bytes of the blobs this generation added to the store.
    pub new_bytes: u64,
    /// Compressed bytes this generation added to the store.
    pub stored_bytes: u64,
    /// Dirty-tracking backend used.
    pub dirty_tracking: String,
    /// Address of the generation's manifest blob.
    pub manifest: Hash,
    /// Free-form details (JSON); `null` if none.
    pub info: serde_json::Value,
}

/// What the caller supplies to [`Writer::commit`]; the store fills in the id,
/// `new_bytes` and `stored_bytes`.
#[derive(Clone, Debug)]
pub struct NewGeneration {
    /// See [`GenerationInfo::parent`]; must exist if set.
    pub parent: Option<u64>,
    /// See [`GenerationInfo::created_ms`].
    pub created_ms: i64,
    /// See [`GenerationInfo::duration_ms`].
    pub duration_ms: u64,
    /// See [`GenerationInfo::nprocs`].
    pub nprocs: u32,
    /// See [`GenerationInfo::logical_bytes`].
    pub logical_bytes: u64,
    /// See [`GenerationInfo::dirty_tracking`].
    pub dirty_tracking: String,
    /// Manifest blob; must have been put (now or earlier).
    pub manifest: Hash,
    /// See [`GenerationInfo::info`].
    pub info: serde_json::Value,
}

/// Totals over the whole store.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StoreStats {
    /// Committed generations.
    pub generations: u64,
    /// Pack files named by the catalog.
    pub packs: u64,
    /// Size of those pack files (including headers and trailers).
    pub pack_bytes: u64,
    /// Blobs in the catalog.
    pub blobs: u64,
    /// Compressed bytes of all blobs.
    pub stored_bytes: u64,
    /// Uncompressed bytes of all blobs.
    pub logical_bytes: u64,
}

/// Result of [`Store::verify`].
#[derive(Clone, Debug, Default, Serialize)]
pub struct VerifyReport {
    /// Pack files checked.
    pub packs: u64,
    /// Blobs that decompressed and hashed correctly.
    pub blobs: u64,
    /// Their uncompressed bytes.
    pub bytes: u64,
    /// Everything wrong, one sentence each (naming the pack and blob).
    pub problems: Vec<String>,
    /// Pack files on disk that the catalog does not name (harmless).
    pub orphan_packs: Vec<PathBuf>,
}

impl VerifyReport {
    /// True if no problem was found (orphans are not problems).
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Options of a [`Writer`].
#[derive(Clone, Copy, Debug)]
pub struct WriterOptions {
    /// A pack is closed once it reaches this many bytes.
    pub pack_target: u64,
    /// zstd level.
    pub level: i32,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            pack_target: DEFAULT_PACK_TARGET,
            level: ckpt_chunker::DEFAULT_LEVEL,
        }
    }
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_sync() {
        fn ss<T: Send + Sync>() {}
        ss::<Store>();
        ss::<Writer>();
        ss::<StoreError>();
    }
}
