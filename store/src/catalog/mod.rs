//! The SQLite catalog: schema, versioning and migrations, and every SQL
//! statement the store runs, as typed functions by table
//! ([`generations`], [`blobs`], [`packs`]; the `meta` table and whole-file
//! operations here).
//!
//! `PRAGMA user_version` holds the schema version. A catalog with a newer
//! version than [`SCHEMA_VERSION`] is refused before anything is written
//! (the version is first read from the file header, without SQLite).
//!
//! This module must never decide anything: it reads and writes rows as
//! told, and leaves checking them (MACs, what a row may name) to its
//! callers, except that a pack name it returns has been checked to be one
//! ckpt makes. No other module of the crate prepares or executes SQL.

use std::io::Read;
use std::path::Path;

use rusqlite::{Connection, OpenFlags, OptionalExtension, Transaction, TransactionBehavior, params};

use crate::error::{IoCtx, Result, SqlCtx, StoreError};

pub(crate) mod blobs;
pub(crate) mod generations;
pub(crate) mod packs;

/// Schema version written by this build.
pub const SCHEMA_VERSION: u32 = 2;

/// SQLite page cache of a catalog connection, in KiB (negative: a size,
/// not a page count).
const CACHE_KIB: i64 = -(64 << 10);

/// WAL pages past which a commit folds the log into the catalog file
/// itself (SQLite's autocheckpoint, 1000 by default). A writer's commit
/// folds it in a thread of its own instead, after the commit
/// ([`fold_wal_passive`]): a 1% checkpoint of 1 GiB writes ~2,900 pages,
/// and folding them inside the commit wrote them all a second time and
/// fsynced the catalog before the commit returned. This bound only
/// matters when that thread did not run (a process that exited at once).
const WAL_AUTOCHECKPOINT_PAGES: i64 = 16384;

/// Migration steps: `MIGRATIONS[v]` upgrades a catalog from version `v` to
/// `v + 1` (step 0 creates a fresh catalog).
const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE IF NOT EXISTS meta(
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS packs(
    id      INTEGER PRIMARY KEY,
    name    TEXT UNIQUE NOT NULL,
    size    INTEGER NOT NULL,
    nblobs  INTEGER NOT NULL,
    created INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS blobs(
    hash    BLOB PRIMARY KEY,
    pack_id INTEGER NOT NULL REFERENCES packs(id),
    offset  INTEGER NOT NULL,
    clen    INTEGER NOT NULL,
    ulen    INTEGER NOT NULL,
    kind    INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS blobs_by_pack ON blobs(pack_id);
CREATE TABLE IF NOT EXISTS generations(
    id             INTEGER PRIMARY KEY,
    parent         INTEGER,
    created_ms     INTEGER NOT NULL,
    duration_ms    INTEGER NOT NULL,
    nprocs         INTEGER NOT NULL,
    logical_bytes  INTEGER NOT NULL,
    new_bytes      INTEGER NOT NULL,
    stored_bytes   INTEGER NOT NULL,
    dirty_tracking TEXT NOT NULL,
    manifest       BLOB NOT NULL,
    info           TEXT
);
"#, r#"
ALTER TABLE generations ADD COLUMN mac BLOB;
"#];

/// Read `user_version` straight from the SQLite file header (offset 60,
/// big-endian), without opening the database: guarantees nothing is written
/// when the version is refused. An empty file counts as version 0.
pub(crate) fn header_version(path: &Path) -> Result<u32> {
    let mut f = std::fs::File::open(path)
        .map_err(|e| StoreError::io(format!("open {}", path.display()), e))?;
    let mut hdr = Vec::with_capacity(100);
    (&mut f)
        .take(100)
        .read_to_end(&mut hdr)
        .map_err(|e| StoreError::io(format!("read {}", path.display()), e))?;
    if hdr.is_empty() {
        return Ok(0);
    }
    if hdr.len() < 100 || &hdr[..16] != b"SQLite format 3\0" {
        return Err(StoreError::BadCatalog {
            path: path.to_path_buf(),
            reason: "not an SQLite database".into(),
        });
    }
    Ok(u32::from_be_bytes(hdr[60..64].try_into().expect("4 bytes")))
}

fn check_version(path: &Path, found: u32) -> Result<()> {
    if found > SCHEMA_VERSION {
        return Err(StoreError::NewerSchema {
            path: path.to_path_buf(),
            found,
            supported: SCHEMA_VERSION,
        });
    }
    Ok(())
}

/// Open (and, if `create` is set and the catalog is new, initialise) the
/// catalog at `path`. Returns the connection and the store's chunk size.
pub(crate) fn open(path: &Path, create: Option<usize>) -> Result<(Connection, usize)> {
    open_with(path, create, !crate::seal::unsealed_requested())
}

/// [`open`]; a new catalog is of a sealed store if `sealed`.
pub(crate) fn open_with(path: &Path, create: Option<usize>, sealed: bool) -> Result<(Connection, usize)> {
    if path.exists() {
        check_version(path, header_version(path)?)?;
    } else if create.is_some() {
        // Made 0600 before SQLite sees it: SQLite gives the -wal and -shm
        // files the mode of the database file.
        crate::private::file_options()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| StoreError::io(format!("create catalog {}", path.display()), e))?;
    }
    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    if create.is_some() {
        flags |= OpenFlags::SQLITE_OPEN_CREATE;
    }
    let mut conn = Connection::open_with_flags(path, flags).db(path)?;
    // The header may lag behind the WAL: check again, still before writing.
    let v: u32 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .db(path)?;
    check_version(path, v)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .db(path)?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .db(path)?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(catalog = %path.display(), mode, "catalog is not in WAL mode");
    }
    conn.pragma_update(None, "synchronous", "FULL").db(path)?;
    conn.pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES).db(path)?;
    // The blob index of a large store is hundreds of MB: a commit's
    // lookups and inserts read its pages back from the OS at SQLite's
    // default 2 MB cache (docs/design.md, "The catalog at scale").
    conn.pragma_update(None, "cache_size", CACHE_KIB).db(path)?;

    let v: u32 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .db(path)?;
    check_version(path, v)?;
    if v < SCHEMA_VERSION {
        match (v, create) {
            (0, None) => {
                return Err(StoreError::BadCatalog {
                    path: path.to_path_buf(),
                    reason: "catalog was never initialised (interrupted creation?)".into(),
                });
            }
            _ => migrate(&mut conn, path, v, create, sealed)?,
        }
    }
    let cs: Option<String> = conn
        .query_row("SELECT value FROM meta WHERE key = 'chunk_size'", [], |r| {
            r.get(0)
        })
        .optional()
        .db(path)?;
    let chunk_size = cs
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|&c| c > 0 && c.is_multiple_of(4096))
        .ok_or_else(|| StoreError::BadCatalog {
            path: path.to_path_buf(),
            reason: "meta.chunk_size missing or invalid".into(),
        })?;
    Ok((conn, chunk_size))
}

fn migrate(conn: &mut Connection, path: &Path, from: u32, create: Option<usize>, sealed: bool) -> Result<()> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .db(path)?;
    // Re-read under the write lock: another process may have migrated.
    let mut v: u32 = tx
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .db(path)?;
    check_version(path, v)?;
    if v != from {
        tracing::debug!(from, now = v, "catalog migrated concurrently");
    }
    while v < SCHEMA_VERSION {
        tracing::info!(catalog = %path.display(), from = v, to = v + 1, "migrating catalog");
        tx.execute_batch(MIGRATIONS[v as usize]).db(path)?;
        if v == 0 {
            let chunk_size = create.unwrap_or(crate::DEFAULT_CHUNK_SIZE);
            let mut m = tx
                .prepare("INSERT OR IGNORE INTO meta(key, value) VALUES (?1, ?2)")
                .db(path)?;
            m.execute(params!["chunk_size", chunk_size.to_string()])
                .db(path)?;
            let id = random_hex();
            m.execute(params!["store_id", id]).db(path)?;
            if create.is_some() && sealed {
                // The key exists (outside the store) before the catalog
                // that says the store is sealed.
                let keys = crate::seal::create_key(&id)?;
                m.execute(params!["sealed", crate::seal::SCHEME]).db(path)?;
                m.execute(params!["key_check", keys.check_value()]).db(path)?;
            }
            if create.is_some() {
                m.execute(params!["compression", crate::store::compression_requested()?.name()]).db(path)?;
            }
            m.execute(params!["created", crate::now_ms().to_string()])
                .db(path)?;
            m.execute(params!["last_generation_id", "0"]).db(path)?;
        }
        v += 1;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)
        .db(path)?;
    tx.commit().db(path)?;
    Ok(())
}

/// 128 random bits as hex (from /dev/urandom; falls back to hashing the
/// time, pid and a stack address).
fn random_hex() -> String {
    let mut b = [0u8; 16];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_ok();
    if !ok {
        let seed = format!(
            "{:?}{}{:p}",
            std::time::SystemTime::now(),
            std::process::id(),
            &b
        );
        b.copy_from_slice(&blake3::hash(seed.as_bytes()).as_bytes()[..16]);
    }
    hex::encode(b)
}

/// A `meta` value.
pub(crate) fn meta(conn: &Connection, p: &Path, key: &str) -> Result<Option<String>> {
    conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0)).optional().db(p)
}

/// Set a `meta` value.
pub(crate) fn set_meta(conn: &Connection, p: &Path, key: &str, value: &str) -> Result<()> {
    conn.prepare_cached("INSERT OR REPLACE INTO meta(key, value) VALUES (?1, ?2)").db(p)?.execute(params![key, value]).db(p)?;
    Ok(())
}

/// One more than the largest generation id ever committed (the row ids
/// and `meta.last_generation_id`: ids are never reused, even after gc).
pub(crate) fn next_generation_id(conn: &Connection, p: &Path) -> Result<u64> {
    let max = generations::max_id(conn, p)?;
    let last = meta(conn, p, "last_generation_id")?.and_then(|s| s.parse::<i64>().ok()).unwrap_or(0);
    Ok((max as i64).max(last) as u64 + 1)
}

/// Begin an IMMEDIATE transaction (the write lock taken at once).
pub(crate) fn immediate<'c>(conn: &'c mut Connection, p: &Path) -> Result<Transaction<'c>> {
    conn.transaction_with_behavior(TransactionBehavior::Immediate).db(p)
}

/// A connection to nothing, to hold a catalog's place while its file is
/// replaced.
pub(crate) fn placeholder(p: &Path) -> Result<Connection> {
    Connection::open_in_memory().db(p)
}

/// Open the catalog file `path` read-only (a snapshot or a download).
pub(crate) fn open_read_only(path: &Path) -> Result<Connection> {
    Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).db(path)
}

/// Fold the write-ahead log into the catalog file, trying again for a
/// while when a reader in another process makes it report busy.
pub(crate) fn checkpoint_wal(conn: &Connection, p: &Path) -> Result<()> {
    for _ in 0..100 {
        let busy: i64 = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0)).db(p)?;
        if busy == 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Ok(())
}

/// A second connection to the writer's catalog `p` (opened, initialised
/// and checked already by [`open`]), with the settings a commit's writes
/// have there: for the rows a writer inserts while its capture goes on.
pub(crate) fn open_for_rows(p: &Path) -> Result<Connection> {
    let conn = Connection::open_with_flags(p, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX).db(p)?;
    conn.busy_timeout(std::time::Duration::from_secs(10)).db(p)?;
    check_version(p, conn.query_row("PRAGMA user_version", [], |r| r.get(0)).db(p)?)?;
    conn.pragma_update(None, "synchronous", "FULL").db(p)?;
    conn.pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES).db(p)?;
    conn.pragma_update(None, "cache_size", CACHE_KIB).db(p)?;
    Ok(conn)
}

/// Folds what it can of the write-ahead log into the catalog file
/// (`PRAGMA wal_checkpoint(PASSIVE)`) through a connection of its own:
/// it waits for no reader and blocks no writer, and another connection's
/// passive checkpoint leaves `PRAGMA data_version` as it was (the known
/// set handed between writers stays valid, [`crate::known_cache`]).
/// Committed data is durable in the log already: this only bounds it.
pub(crate) fn fold_wal_passive(p: &Path) -> Result<()> {
    let conn = Connection::open_with_flags(p, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX).db(p)?;
    conn.busy_timeout(std::time::Duration::from_secs(1)).db(p)?;
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())).db(p)?;
    Ok(())
}

/// `VACUUM INTO` a fresh file in `tmp_dir`: a consistent, self-contained
/// copy of the catalog behind `conn` (whose file is `catalog`; no WAL).
pub(crate) fn snapshot(conn: &Connection, catalog: &Path, tmp_dir: &Path) -> Result<std::path::PathBuf> {
    let snap = tmp_dir.join(format!("catalog-snapshot-{}-{}.db", std::process::id(), crate::now_ms()));
    let _ = std::fs::remove_file(&snap);
    let s = snap.to_str().ok_or_else(|| StoreError::Invalid(format!("non-UTF-8 path {}", snap.display())))?;
    // VACUUM INTO accepts an empty file: made first, so the copy is 0600.
    crate::private::create_file(&snap).ctx(|| format!("create {}", snap.display()))?;
    conn.execute("VACUUM INTO ?1", [s]).db(catalog)?;
    Ok(snap)
}

/// Totals over the whole catalog.
pub(crate) fn stats(conn: &Connection, p: &Path) -> Result<crate::StoreStats> {
    let (packs, pack_bytes) = packs::totals(conn, p)?;
    let (blobs, stored, logical) = blobs::totals(conn, p)?;
    let generations = generations::count(conn, p)?;
    Ok(crate::StoreStats {
        generations,
        packs: packs as u64,
        pack_bytes: pack_bytes as u64,
        blobs: blobs as u64,
        stored_bytes: stored as u64,
        logical_bytes: logical as u64,
    })
}
