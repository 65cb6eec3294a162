//! The `blobs` table: where each blob is stored (its pack, offset and
//! lengths), keyed by its stored address.
//!
//! Pack names read here are checked ([`crate::private::check_pack_name`])
//! before they are returned with a blob's location: a hostile row never
//! becomes a path.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

use crate::error::{Result, SqlCtx};
use crate::maintenance::BlobRow;
use crate::pack::PackEntry;
use crate::{BlobKind, Hash, private};

/// Where a blob lives, as the catalog says: (pack name, offset, clen, ulen).
pub(crate) type Place = (String, u64, u32, u32);

/// A blob row as verify reads it: (address, pack id, offset, clen, ulen).
pub(crate) type VerifyRow = (Hash, i64, u64, u32, u32);

/// A blob of one pack: (address, offset, clen, ulen, kind).
pub(crate) type PackBlob = (Hash, u64, u32, u32, BlobKind);

/// Whether a blob is stored at address `addr`.
pub(crate) fn contains(conn: &Connection, p: &Path, addr: &Hash) -> Result<bool> {
    conn.prepare_cached("SELECT 1 FROM blobs WHERE hash = ?1").db(p)?.exists([&addr.0[..]]).db(p)
}

/// Where the blob at address `addr` is stored, if it is (its pack name is
/// checked).
pub(crate) fn locate(conn: &Connection, p: &Path, addr: &Hash) -> Result<Option<Place>> {
    let mut st = conn
        .prepare_cached(
            "SELECT p.name, b.offset, b.clen, b.ulen FROM blobs b \
             JOIN packs p ON p.id = b.pack_id WHERE b.hash = ?1",
        )
        .db(p)?;
    let place = st
        .query_row([&addr.0[..]], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64, r.get::<_, i64>(2)? as u32, r.get::<_, i64>(3)? as u32))
        })
        .optional()
        .db(p)?;
    if let Some((name, ..)) = &place {
        private::check_pack_name(name, p)?;
    }
    Ok(place)
}

/// Where a blob lives by pack id, as the catalog says: (pack id, offset,
/// clen, ulen).
pub(crate) type IdPlace = (i64, u64, u32, u32);

/// One pass over the whole index in address order, merged with `wanted`
/// (addresses, sorted ascending, distinct): `each(i, place)` for every
/// `wanted[i]` the index holds. No join and no allocation per row (a
/// restart of 1 GiB looks up 262,144 blobs): the pack ids are named with
/// [`super::packs::ids_names_sizes`] by the caller, once per pack. Rows
/// whose address is not a 32-byte blob are skipped (no wanted address can
/// be one).
pub(crate) fn scan_merged(conn: &Connection, p: &Path, wanted: &[Hash], mut each: impl FnMut(usize, IdPlace) -> Result<()>) -> Result<()> {
    // The primary key's order: SQLite compares blobs as memcmp does, and
    // `Hash` orders as its bytes do.
    let mut st = conn.prepare("SELECT hash, pack_id, offset, clen, ulen FROM blobs ORDER BY hash").db(p)?;
    let mut rows = st.query([]).db(p)?;
    let mut k = 0;
    while k < wanted.len() {
        let Some(r) = rows.next().db(p)? else { break };
        let rusqlite::types::ValueRef::Blob(raw) = r.get_ref(0).db(p)? else { continue };
        let Ok(addr) = <&[u8; 32]>::try_from(raw) else { continue };
        while k < wanted.len() && wanted[k].0 < *addr {
            k += 1;
        }
        if k < wanted.len() && wanted[k].0 == *addr {
            each(k, (r.get(1).db(p)?, r.get::<_, i64>(2).db(p)? as u64, r.get::<_, i64>(3).db(p)? as u32, r.get::<_, i64>(4).db(p)? as u32))?;
            k += 1;
        }
    }
    Ok(())
}

/// Every blob row as verify reads it; an address that is not 32 bytes reads as [`Hash::ZERO_CHUNK`]
/// (and then fails its checks, so verify names it).
pub(crate) fn all_for_verify(conn: &Connection, p: &Path) -> Result<Vec<VerifyRow>> {
    let mut st = conn.prepare("SELECT hash, pack_id, offset, clen, ulen FROM blobs").db(p)?;
    let mut rows = st.query([]).db(p)?;
    let mut out = Vec::new();
    while let Some(r) = rows.next().db(p)? {
        let hb: Vec<u8> = r.get(0).db(p)?;
        let hash = Hash::from_slice(&hb).unwrap_or(Hash::ZERO_CHUNK);
        out.push((hash, r.get(1).db(p)?, r.get::<_, i64>(2).db(p)? as u64, r.get::<_, i64>(3).db(p)? as u32, r.get::<_, i64>(4).db(p)? as u32));
    }
    Ok(out)
}

/// Every blob row (rows whose address is not 32 bytes are skipped).
pub(crate) fn all(conn: &Connection, p: &Path) -> Result<Vec<BlobRow>> {
    let mut st = conn.prepare("SELECT hash, pack_id, offset, clen, ulen, kind FROM blobs").db(p)?;
    let mut rows = st.query([]).db(p)?;
    let mut out = Vec::new();
    while let Some(r) = rows.next().db(p)? {
        let hb: Vec<u8> = r.get(0).db(p)?;
        let Some(hash) = Hash::from_slice(&hb) else { continue };
        out.push(BlobRow {
            hash,
            pack_id: r.get(1).db(p)?,
            offset: r.get::<_, i64>(2).db(p)? as u64,
            clen: r.get::<_, i64>(3).db(p)? as u32,
            ulen: r.get::<_, i64>(4).db(p)? as u32,
            kind: BlobKind::from_u8(r.get::<_, i64>(5).db(p)? as u8).unwrap_or(BlobKind::Chunk),
        });
    }
    Ok(out)
}

/// The blobs of pack `pack_id` in file order; rows whose address is not 32 bytes are skipped.
pub(crate) fn of_pack(conn: &Connection, p: &Path, pack_id: i64) -> Result<Vec<PackBlob>> {
    let mut st = conn
        .prepare_cached("SELECT hash, offset, clen, ulen, kind FROM blobs WHERE pack_id = ?1 ORDER BY offset")
        .db(p)?;
    let rows: Vec<(Vec<u8>, i64, i64, i64, i64)> = st
        .query_map([pack_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))
        .db(p)?
        .collect::<rusqlite::Result<_>>()
        .db(p)?;
    Ok(rows
        .into_iter()
        .filter_map(|(h, off, c, u, k)| {
            Some((Hash::from_slice(&h)?, off as u64, c as u32, u as u32, BlobKind::from_u8(k as u8).unwrap_or(BlobKind::Chunk)))
        })
        .collect())
}

/// Number of blob rows of pack `pack_id`.
pub(crate) fn count_in_pack(conn: &Connection, p: &Path, pack_id: i64) -> Result<i64> {
    conn.prepare_cached("SELECT count(*) FROM blobs WHERE pack_id = ?1").db(p)?.query_row([pack_id], |x| x.get(0)).db(p)
}

/// `each` stored address (for a writer's known set); rows whose address
/// is not 32 bytes are skipped.
pub(crate) fn addresses(conn: &Connection, p: &Path, mut each: impl FnMut(Hash)) -> Result<()> {
    let mut st = conn.prepare("SELECT hash FROM blobs").db(p)?;
    let mut rows = st.query([]).db(p)?;
    while let Some(r) = rows.next().db(p)? {
        if let Ok(b) = r.get_ref(0).db(p)?.as_blob()
            && let Some(h) = Hash::from_slice(b)
        {
            each(h);
        }
    }
    Ok(())
}

/// Number of blob rows.
pub(crate) fn count(conn: &Connection, p: &Path) -> Result<i64> {
    conn.query_row("SELECT count(*) FROM blobs", [], |r| r.get(0)).db(p)
}

/// (count, compressed bytes, uncompressed bytes) of all blob rows.
pub(crate) fn totals(conn: &Connection, p: &Path) -> Result<(i64, i64, i64)> {
    conn.query_row(
        "SELECT count(*), coalesce(sum(clen),0), coalesce(sum(ulen),0) FROM blobs",
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )
    .db(p)
}

/// Insert the rows of `entries` (each with its pack id), in the order
/// given; an address already present is left as it is.
pub(crate) fn insert<'a>(conn: &Connection, p: &Path, entries: impl IntoIterator<Item = (&'a PackEntry, i64)>) -> Result<()> {
    let mut ins = conn
        .prepare_cached(
            "INSERT OR IGNORE INTO blobs(hash, pack_id, offset, clen, ulen, kind) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .db(p)?;
    for (e, pack_id) in entries {
        ins.execute(params![&e.hash.0[..], pack_id, e.offset as i64, e.clen as i64, e.ulen as i64, e.kind as u8 as i64])
            .db(p)?;
    }
    Ok(())
}

/// Rows one statement of [`insert_pack`] takes (6 parameters each).
const ROWS_PER_INSERT: usize = 64;

/// The rows of one pack (`entries`, sorted by address, all of pack
/// `pack_id`), [`ROWS_PER_INSERT`] to a statement: for one pack's rows a
/// statement per row cost more in SQLite's statement machinery than in
/// its B-tree (a commit of 262,144 rows of one pack: 0.75x). Not for the
/// rows of many packs sorted together: that was slower (docs/design.md,
/// "The catalog at scale").
pub(crate) fn insert_pack(conn: &Connection, p: &Path, pack_id: i64, entries: &[&PackEntry]) -> Result<()> {
    const HEAD: &str = "INSERT OR IGNORE INTO blobs(hash, pack_id, offset, clen, ulen, kind) VALUES ";
    let many_sql = format!("{HEAD}{}", vec!["(?, ?, ?, ?, ?, ?)"; ROWS_PER_INSERT].join(", "));
    let mut many = conn.prepare_cached(&many_sql).db(p)?;
    let mut batches = entries.chunks_exact(ROWS_PER_INSERT);
    for batch in &mut batches {
        for (k, e) in batch.iter().enumerate() {
            let at = k * 6;
            many.raw_bind_parameter(at + 1, &e.hash.0[..]).db(p)?;
            many.raw_bind_parameter(at + 2, pack_id).db(p)?;
            many.raw_bind_parameter(at + 3, e.offset as i64).db(p)?;
            many.raw_bind_parameter(at + 4, e.clen as i64).db(p)?;
            many.raw_bind_parameter(at + 5, e.ulen as i64).db(p)?;
            many.raw_bind_parameter(at + 6, e.kind as u8 as i64).db(p)?;
        }
        many.raw_execute().db(p)?;
    }
    insert(conn, p, batches.remainder().iter().map(|e| (*e, pack_id)))
}

/// Point each blob of `entries` at pack `pack_id`, at its new offset.
pub(crate) fn move_to(conn: &Connection, p: &Path, pack_id: i64, entries: &[PackEntry]) -> Result<()> {
    let mut upd = conn.prepare_cached("UPDATE blobs SET pack_id = ?1, offset = ?2 WHERE hash = ?3").db(p)?;
    for e in entries {
        upd.execute(params![pack_id, e.offset as i64, &e.hash.0[..]]).db(p)?;
    }
    Ok(())
}

/// Delete the rows at `addrs`.
pub(crate) fn delete<'a>(conn: &Connection, p: &Path, addrs: impl IntoIterator<Item = &'a Hash>) -> Result<()> {
    let mut del = conn.prepare("DELETE FROM blobs WHERE hash = ?1").db(p)?;
    for h in addrs {
        del.execute([&h.0[..]]).db(p)?;
    }
    Ok(())
}

/// Delete every blob row.
pub(crate) fn delete_all(conn: &Connection, p: &Path) -> Result<()> {
    conn.execute("DELETE FROM blobs", []).db(p)?;
    Ok(())
}
