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
//! One module per concept: [`Store`] (opening, keys, generation rows) in
//! `store`, blob reads in `reader` and `read_many` (the pack bytes from one
//! pack source per store, local files or S3, in `source`), the [`Writer`] and its
//! commit in `writer` (its known set kept between writers in
//! `known_cache`), the locks in `lock`, every check of verify in
//! `verify`, every SQL statement in `catalog`, and the S3 side in
//! [`remote`] (client, cache sync, push/pull). This file only declares
//! them and re-exports.
//!
//! This crate must never know about processes, memory layouts or image
//! manifests: it stores opaque blobs and generation rows that point at a
//! manifest blob.

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod error;
pub mod maintenance;
pub mod migrate;
pub mod pack;
pub mod private;
pub mod remote;
pub mod remote_lock;
pub mod seal;

mod catalog;
mod known_cache;
mod lock;
mod read_many;
mod reader;
mod source;
mod store;
mod touched;
mod verify;
mod writer;

pub use catalog::SCHEMA_VERSION;
pub use ckpt_chunker::Hash;
pub use error::{RemoteError, Result, StoreError};
pub use lock::OwnerLock;
pub use pack::BlobKind;
pub use read_many::{BATCH_BLOBS, BlobReader};
/// The SQLite binding used by the catalog (for [`Writer::with_transaction`]).
pub use rusqlite;
pub use touched::MAX_RECORD as MAX_TOUCHED_RECORD;
pub use ckpt_chunker::Codec;
pub use store::{DEFAULT_CODEC, compression_requested, DEFAULT_CHUNK_SIZE, GenerationInfo, MAX_CHUNK_SIZE, Store, StoreStats, parse_url};
pub use verify::VerifyReport;
pub use writer::{BlobSink, DEFAULT_PACK_TARGET, NewGeneration, Writer, WriterOptions};

pub(crate) use lock::{CACHE_LOCK_WAIT, lock, lock_dir, lock_dir_wait};
pub(crate) use store::now_ms;
