//! The `generations` table: one row per committed generation, with its
//! MAC in a sealed store.
//!
//! Rows are returned as read, MAC not checked: checking is the store's
//! (it holds the keys). A row that cannot be decoded (edited into a shape
//! no writer makes) is returned as a [`BadRow`], never skipped, so that
//! verify names it.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

use crate::error::{Result, SqlCtx};
use crate::{GenerationInfo, Hash};

const GEN_SELECT: &str = "SELECT id, parent, created_ms, duration_ms, nprocs, logical_bytes, \
     new_bytes, stored_bytes, dirty_tracking, manifest, info, mac FROM generations";

/// A generation row as read, with its MAC (not yet checked).
pub(crate) struct GenRow {
    pub(crate) info: GenerationInfo,
    /// `info` exactly as the catalog holds it (the MAC covers this text).
    pub(crate) info_text: Option<String>,
    pub(crate) mac: Option<Vec<u8>>,
}

/// A generation row that cannot be decoded.
pub(crate) struct BadRow {
    /// Its id (-1 if even that cannot be read).
    pub(crate) id: i64,
    /// Why.
    pub(crate) error: rusqlite::Error,
}

/// Order of [`all`].
#[derive(Clone, Copy)]
pub(crate) enum Order {
    /// Ascending by id.
    Ascending,
    /// Newest first.
    Descending,
}

fn row_to_gen(r: &rusqlite::Row<'_>) -> rusqlite::Result<GenRow> {
    let manifest: Vec<u8> = r.get(9)?;
    let manifest = Hash::from_slice(&manifest).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            9,
            rusqlite::types::Type::Blob,
            "manifest hash is not 32 bytes".into(),
        )
    })?;
    let info_text: Option<String> = r.get(10)?;
    let info = match &info_text {
        Some(s) => serde_json::from_str(s).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(10, rusqlite::types::Type::Text, e.into())
        })?,
        None => serde_json::Value::Null,
    };
    let info = GenerationInfo {
        id: r.get::<_, i64>(0)? as u64,
        parent: r.get::<_, Option<i64>>(1)?.map(|p| p as u64),
        created_ms: r.get(2)?,
        duration_ms: r.get::<_, i64>(3)? as u64,
        nprocs: r.get::<_, i64>(4)? as u32,
        logical_bytes: r.get::<_, i64>(5)? as u64,
        new_bytes: r.get::<_, i64>(6)? as u64,
        stored_bytes: r.get::<_, i64>(7)? as u64,
        dirty_tracking: r.get(8)?,
        manifest,
        info,
    };
    Ok(GenRow { info, info_text, mac: r.get(11)? })
}

/// Every generation row, in `order`; a row that cannot be decoded is a
/// [`BadRow`] in its place.
pub(crate) fn all(conn: &Connection, p: &Path, order: Order) -> Result<Vec<std::result::Result<GenRow, BadRow>>> {
    let sql = match order {
        Order::Ascending => format!("{GEN_SELECT} ORDER BY id"),
        Order::Descending => format!("{GEN_SELECT} ORDER BY id DESC"),
    };
    let mut st = conn.prepare_cached(&sql).db(p)?;
    let mut rows = st.query([]).db(p)?;
    let mut out = Vec::new();
    while let Some(r) = rows.next().db(p)? {
        out.push(row_to_gen(r).map_err(|error| BadRow { id: r.get(0).unwrap_or(-1), error }));
    }
    Ok(out)
}

/// Every generation row ascending, failing on the first that cannot be
/// decoded.
pub(crate) fn all_strict(conn: &Connection, p: &Path) -> Result<Vec<GenRow>> {
    let mut st = conn.prepare_cached(&format!("{GEN_SELECT} ORDER BY id")).db(p)?;
    let rows = st.query_map([], row_to_gen).db(p)?;
    rows.collect::<rusqlite::Result<Vec<_>>>().db(p)
}

/// Generation `id`'s row, if it exists.
pub(crate) fn get(conn: &Connection, p: &Path, id: u64) -> Result<Option<GenRow>> {
    let mut st = conn.prepare_cached(&format!("{GEN_SELECT} WHERE id = ?1")).db(p)?;
    st.query_row([id as i64], row_to_gen).optional().db(p)
}

/// The newest generation's row, if any.
pub(crate) fn latest(conn: &Connection, p: &Path) -> Result<Option<GenRow>> {
    let mut st = conn.prepare_cached(&format!("{GEN_SELECT} ORDER BY id DESC LIMIT 1")).db(p)?;
    st.query_row([], row_to_gen).optional().db(p)
}

/// Whether generation `id` has a row.
pub(crate) fn exists(conn: &Connection, p: &Path, id: u64) -> Result<bool> {
    conn.prepare_cached("SELECT 1 FROM generations WHERE id = ?1").db(p)?.exists([id as i64]).db(p)
}

/// Whether any row has an id of `id` or above.
pub(crate) fn any_from(conn: &Connection, p: &Path, id: u64) -> Result<bool> {
    conn.prepare_cached("SELECT 1 FROM generations WHERE id >= ?1").db(p)?.exists([id as i64]).db(p)
}

/// Number of rows.
pub(crate) fn count(conn: &Connection, p: &Path) -> Result<u64> {
    let n: i64 = conn.query_row("SELECT count(*) FROM generations", [], |r| r.get(0)).db(p)?;
    Ok(n as u64)
}

/// The largest id of a row (0 if none).
pub(crate) fn max_id(conn: &Connection, p: &Path) -> Result<u64> {
    let max: i64 = conn.query_row("SELECT coalesce(max(id), 0) FROM generations", [], |r| r.get(0)).db(p)?;
    Ok(max as u64)
}

/// (id, manifest as stored) of every row, ascending.
pub(crate) fn manifests(conn: &Connection, p: &Path) -> Result<Vec<(u64, Vec<u8>)>> {
    let mut st = conn.prepare("SELECT id, manifest FROM generations ORDER BY id").db(p)?;
    let rows = st.query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, Vec<u8>>(1)?))).db(p)?;
    rows.collect::<rusqlite::Result<Vec<_>>>().db(p)
}

/// Insert the row of `info` (`info_json`: its `info` as stored, see
/// [`crate::seal::info_text`]).
pub(crate) fn insert(conn: &Connection, p: &Path, info: &GenerationInfo, info_json: Option<&str>, mac: Option<&[u8; 32]>) -> Result<()> {
    conn.execute(
        "INSERT INTO generations(id, parent, created_ms, duration_ms, nprocs, \
         logical_bytes, new_bytes, stored_bytes, dirty_tracking, manifest, info, mac) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        params![
            info.id as i64,
            info.parent.map(|x| x as i64),
            info.created_ms,
            info.duration_ms as i64,
            info.nprocs as i64,
            info.logical_bytes as i64,
            info.new_bytes as i64,
            info.stored_bytes as i64,
            info.dirty_tracking,
            &info.manifest.0[..],
            info_json,
            mac.map(|m| m.to_vec())
        ],
    )
    .db(p)?;
    Ok(())
}

/// Delete the rows `ids`; returns how many existed.
pub(crate) fn delete(conn: &Connection, p: &Path, ids: &[u64]) -> Result<u64> {
    let mut del = conn.prepare("DELETE FROM generations WHERE id = ?1").db(p)?;
    let mut n = 0;
    for g in ids {
        n += del.execute([*g as i64]).db(p)? as u64;
    }
    Ok(n)
}

/// Set the MAC of each row `(id, mac)`.
pub(crate) fn set_macs<'a>(conn: &Connection, p: &Path, macs: impl IntoIterator<Item = (&'a i64, &'a [u8; 32])>) -> Result<()> {
    let mut upd = conn.prepare("UPDATE generations SET mac = ?1 WHERE id = ?2").db(p)?;
    for (id, mac) in macs {
        upd.execute(params![&mac[..], id]).db(p)?;
    }
    Ok(())
}
