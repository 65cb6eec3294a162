//! The `packs` table: the pack files the catalog names (name = BLAKE3 of
//! the file, size, blobs written).
//!
//! Every name read here is checked ([`crate::private::check_pack_name`])
//! before it is returned: a hostile row never becomes a path or an S3 key.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

use crate::error::{Result, SqlCtx};
use crate::maintenance::PackRow;
use crate::private;

/// Every pack row, ascending by id.
pub(crate) fn all(conn: &Connection, p: &Path) -> Result<Vec<PackRow>> {
    let mut st = conn.prepare("SELECT id, name, size, nblobs FROM packs ORDER BY id").db(p)?;
    let rows: Vec<PackRow> = st
        .query_map([], |r| {
            Ok(PackRow { id: r.get(0)?, name: r.get(1)?, size: r.get::<_, i64>(2)? as u64, nblobs: r.get::<_, i64>(3)? as u64 })
        })
        .db(p)?
        .collect::<rusqlite::Result<_>>()
        .db(p)?;
    for r in &rows {
        private::check_pack_name(&r.name, p)?;
    }
    Ok(rows)
}

/// (id, name, size) of every pack row, in no particular order.
pub(crate) fn ids_names_sizes(conn: &Connection, p: &Path) -> Result<Vec<(i64, String, u64)>> {
    let mut st = conn.prepare("SELECT id, name, size FROM packs").db(p)?;
    let packs: Vec<(i64, String, u64)> = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64)))
        .db(p)?
        .collect::<rusqlite::Result<_>>()
        .db(p)?;
    for (_, name, _) in &packs {
        private::check_pack_name(name, p)?;
    }
    Ok(packs)
}

/// The names of the packs of `ids` (each checked), by id; an id the
/// table lacks is left out.
pub(crate) fn names_of(conn: &Connection, p: &Path, ids: &std::collections::HashSet<i64>) -> Result<std::collections::HashMap<i64, String>> {
    let mut st = conn.prepare("SELECT id, name FROM packs").db(p)?;
    let mut rows = st.query([]).db(p)?;
    let mut out = std::collections::HashMap::with_capacity(ids.len());
    while let Some(r) = rows.next().db(p)? {
        let id: i64 = r.get(0).db(p)?;
        if ids.contains(&id) {
            let name: String = r.get(1).db(p)?;
            private::check_pack_name(&name, p)?;
            out.insert(id, name);
        }
    }
    Ok(out)
}

/// The name of pack `id`, checked, if the table has it.
pub(crate) fn name_of(conn: &Connection, p: &Path, id: i64) -> Result<Option<String>> {
    let name: Option<String> = conn.prepare_cached("SELECT name FROM packs WHERE id = ?1").db(p)?.query_row([id], |r| r.get(0)).optional().db(p)?;
    if let Some(n) = &name {
        private::check_pack_name(n, p)?;
    }
    Ok(name)
}

/// (name, size) of every pack row, ascending by id.
pub(crate) fn names_sizes(conn: &Connection, p: &Path) -> Result<Vec<(String, u64)>> {
    let mut st = conn.prepare("SELECT name, size FROM packs ORDER BY id").db(p)?;
    let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))).db(p)?;
    let packs = rows.collect::<rusqlite::Result<Vec<_>>>().db(p)?;
    for (name, _) in &packs {
        private::check_pack_name(name, p)?;
    }
    Ok(packs)
}

/// (count, bytes) of all pack rows.
pub(crate) fn totals(conn: &Connection, p: &Path) -> Result<(i64, i64)> {
    conn.query_row("SELECT count(*), coalesce(sum(size),0) FROM packs", [], |r| Ok((r.get(0)?, r.get(1)?))).db(p)
}

/// Insert a pack row; returns its id.
pub(crate) fn insert(conn: &Connection, p: &Path, name: &str, size: u64, nblobs: usize, created_ms: i64) -> Result<i64> {
    conn.prepare_cached("INSERT INTO packs(name, size, nblobs, created) VALUES (?1, ?2, ?3, ?4)")
        .db(p)?
        .execute(params![name, size as i64, nblobs as i64, created_ms])
        .db(p)?;
    Ok(conn.last_insert_rowid())
}

/// Insert a pack row unless one of that name exists; returns the id of
/// the row of that name.
pub(crate) fn insert_or_get(conn: &Connection, p: &Path, name: &str, size: u64, nblobs: usize, created_ms: i64) -> Result<i64> {
    conn.prepare_cached("INSERT OR IGNORE INTO packs(name, size, nblobs, created) VALUES (?1, ?2, ?3, ?4)")
        .db(p)?
        .execute(params![name, size as i64, nblobs as i64, created_ms])
        .db(p)?;
    conn.query_row("SELECT id FROM packs WHERE name = ?1", [name], |x| x.get(0)).db(p)
}

/// Delete pack row `id`.
pub(crate) fn delete(conn: &Connection, p: &Path, id: i64) -> Result<()> {
    conn.prepare_cached("DELETE FROM packs WHERE id = ?1").db(p)?.execute([id]).db(p)?;
    Ok(())
}

/// Delete every pack row.
pub(crate) fn delete_all(conn: &Connection, p: &Path) -> Result<()> {
    conn.execute("DELETE FROM packs", []).db(p)?;
    Ok(())
}
