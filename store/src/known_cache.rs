//! The known set ([`crate::Writer`]'s in-memory index of every stored
//! blob) kept from one writer of a [`crate::Store`] to the next.
//!
//! Loading it reads every row of the blob index: 56 ms at 270,000 blobs
//! (1 GiB), 21 s at 10 million (BENCHMARKS.md, bench-catalog), and the
//! coordinator takes a new writer every round. A writer that ends with its
//! set exact (nothing pending: committed or aborted) hands it back here, and
//! the next writer takes it instead of reading the catalog, but only if
//! nothing changed the catalog in between:
//!
//! - no other connection committed to it (SQLite's `PRAGMA data_version`
//!   is unchanged: another process's writer, gc, `ckpt store seal`), and
//! - this connection changed no row (its `total_changes()` is unchanged:
//!   maintenance through this same store), and
//! - the connection was not replaced (the S3 cache installing a new
//!   catalog clears the kept set: [`KnownCache::clear`]).
//!
//! Anything else reloads from the catalog. The danger it guards against is
//! a set that names a blob the store no longer has: a checkpoint would then
//! reuse that blob instead of storing it, and the generation could not be
//! restarted. Every doubt therefore costs a reload, never a guess.

use std::sync::Mutex;

use rusqlite::Connection;

use crate::writer::KnownSet;

/// A set handed back by a writer, and the catalog's state it is exact for.
pub(crate) struct Kept {
    pub set: KnownSet,
    /// The generation the writer committed last (None: it committed
    /// nothing, or ran maintenance after its commit).
    pub last_commit: Option<u64>,
    data_version: i64,
    total_changes: u64,
}

/// At most one kept set per store.
#[derive(Default)]
pub(crate) struct KnownCache(Mutex<Option<Kept>>);

impl KnownCache {
    /// Keeps `set`, exact for the catalog as `conn` sees it now.
    pub fn keep(&self, conn: &Connection, set: KnownSet, last_commit: Option<u64>) {
        let kept = data_version(conn).map(|data_version| Kept { set, last_commit, data_version, total_changes: conn.total_changes() });
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = kept;
    }

    /// The kept set, if nothing changed the catalog since it was kept.
    /// Taken: the writer owns it until it hands it back.
    pub fn take(&self, conn: &Connection) -> Option<Kept> {
        let kept = self.0.lock().unwrap_or_else(|e| e.into_inner()).take()?;
        (data_version(conn) == Some(kept.data_version) && conn.total_changes() == kept.total_changes).then_some(kept)
    }

    /// Forgets the kept set (the catalog's connection is being replaced).
    pub fn clear(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// `PRAGMA data_version`: changes when another connection commits. None if
/// it cannot be read (then nothing is kept).
fn data_version(conn: &Connection) -> Option<i64> {
    conn.query_row("PRAGMA data_version", [], |r| r.get(0)).ok()
}
