//! Verification, in one place: the whole store (`ckpt verify --all`:
//! every pack read and every blob decoded), chosen blobs (a generation's),
//! and the metadata only (the catalog against the pack trailers, or
//! against one S3 listing), each problem one sentence naming the pack
//! and the blob. For an `s3://` store every check reads S3, never the
//! cache: it checks what another host would restart.
//!
//! This module must never change the store (it only reads), nor stop at
//! the first problem: `Err` only when the check itself cannot run.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use rayon::prelude::*;
use rusqlite::Connection;
use serde::Serialize;

use crate::maintenance::{BlobRow, PackRow};
use crate::pack::{self, ENTRY_LEN, INDEX_MAGIC, PACK_MAGIC, TAIL_LEN};
use crate::reader::{Loc, open_pack};
use crate::remote::{self, Remote};
use crate::{Hash, Result, Store, StoreError, catalog};

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

impl Store {
    /// Check the whole store (the work behind `ckpt verify`): every pack the
    /// catalog names exists, has the recorded size, is named by its BLAKE3
    /// and has a trailer that agrees with the catalog; every blob
    /// decompresses and hashes to its address; every generation's manifest
    /// is in the catalog. Pack files on disk that the catalog does not name
    /// (left by a crash or an abort) are listed as orphans: harmless, gc
    /// may delete them. For an `s3://` store every pack is downloaded from
    /// S3 and checked, and the orphans are the pack objects on S3 that the
    /// catalog does not name. Returns `Err` only if the check itself cannot run.
    pub fn verify(&self) -> Result<VerifyReport> {
        let p = &self.inner.catalog_path;
        let (packs, mut by_pack, manifests) = {
            let conn = self.inner.conn();
            let packs = catalog::packs::ids_names_sizes(&conn, p)?;
            let mut by_pack: BTreeMap<i64, Vec<Loc>> = BTreeMap::new();
            for (hash, pack_id, offset, clen, ulen) in catalog::blobs::all_for_verify(&conn, p)? {
                by_pack.entry(pack_id).or_default().push(Loc { hash, addr: hash, pack: String::new(), offset, clen, ulen });
            }
            let manifests = self.generation_problems(&conn)?;
            (packs, by_pack, manifests)
        };
        let mut problems: Vec<String> = manifests;
        let known_ids: HashSet<i64> = packs.iter().map(|x| x.0).collect();
        for (id, locs) in &by_pack {
            if !known_ids.contains(id) {
                problems.push(format!(
                    "{} blobs (e.g. {}) point to pack id {id}, which the catalog does not have",
                    locs.len(),
                    locs[0].hash
                ));
            }
        }
        let work: Vec<(String, u64, Vec<Loc>)> = packs
            .into_iter()
            .map(|(id, name, size)| {
                let mut locs = by_pack.remove(&id).unwrap_or_default();
                for l in &mut locs {
                    l.pack = name.clone();
                }
                (name, size, locs)
            })
            .collect();
        let results: Vec<(u64, u64, Vec<String>)> = match self.inner.remote.as_deref() {
            // On S3: every pack downloaded whole (a few at a time) and
            // checked like a local one.
            Some(r) => {
                let mut out = Vec::with_capacity(work.len());
                for batch in work.chunks(remote::CONCURRENCY / 2) {
                    let rels: Vec<String> = batch.iter().map(|w| Remote::pack_rel(&w.0)).collect();
                    let got = r.get_many(&rels);
                    out.par_extend(batch.par_iter().zip(got.into_par_iter()).map(|((name, size, locs), got)| match got {
                        Ok(bytes) => self.verify_pack_bytes(name, *size, &bytes, locs),
                        Err(e) => (0, 0, vec![format!("{e} ({} blobs){}", locs.len(), self.unsynced_note(name))]),
                    }));
                }
                out
            }
            None => work
                .par_iter()
                .map(|(name, size, locs)| self.verify_pack(name, *size, locs))
                .collect(),
        };
        let mut report = VerifyReport {
            packs: work.len() as u64,
            ..Default::default()
        };
        for (blobs, bytes, probs) in results {
            report.blobs += blobs;
            report.bytes += bytes;
            problems.extend(probs);
        }
        if self.inner.remote.is_some() {
            report.orphan_packs = self.remote_orphan_packs()?.into_iter().map(|(n, _)| PathBuf::from(self.pack_location(&n))).collect();
            report.problems = problems;
            return Ok(report);
        }
        let named: HashSet<PathBuf> = work.iter().map(|w| self.pack_path(&w.0)).collect();
        if let Ok(dirs) = fs::read_dir(self.inner.root.join("packs")) {
            for d in dirs.flatten() {
                if let Ok(files) = fs::read_dir(d.path()) {
                    for f in files.flatten() {
                        if !named.contains(&f.path()) {
                            report.orphan_packs.push(f.path());
                        }
                    }
                }
            }
        }
        report.orphan_packs.sort();
        report.problems = problems;
        Ok(report)
    }

    /// Every generation row checked: its MAC (in a sealed store) and that
    /// its manifest is in the catalog; one sentence per problem.
    pub(crate) fn generation_problems(&self, conn: &Connection) -> Result<Vec<String>> {
        let p = &self.inner.catalog_path;
        let mut problems = Vec::new();
        for row in catalog::generations::all(conn, p, catalog::generations::Order::Ascending)? {
            let row = match row {
                Ok(row) => row,
                Err(b) => {
                    problems.push(format!("generation {}: its catalog row cannot be read ({}): altered", b.id, b.error));
                    continue;
                }
            };
            let id = row.info.id;
            let manifest = row.info.manifest;
            if let Err(e) = self.inner.checked(row) {
                problems.push(match e {
                    StoreError::Tampered { what, .. } => what,
                    e => e.to_string(),
                });
                continue;
            }
            if !catalog::blobs::contains(conn, p, &self.inner.addr(&manifest))? {
                problems.push(format!("generation {id}: manifest blob {manifest} is not in the catalog"));
            }
        }
        Ok(problems)
    }

    /// For a pack missing from S3 that the cache holds while its commits
    /// are not uploaded: a note saying so (else empty).
    pub(crate) fn unsynced_note(&self, name: &str) -> String {
        if self.inner.remote.is_some() && remote::is_unsynced(&self.inner.root) && self.pack_path(name).exists() {
            format!(
                " (the local cache {} holds it: its last commits are not uploaded yet; the next writer on this host, a checkpoint or `ckpt gc`, uploads them)",
                self.inner.root.display()
            )
        } else {
            String::new()
        }
    }

    /// Verify one pack: returns (blobs checked, uncompressed bytes, problems).
    fn verify_pack(&self, name: &str, size: u64, locs: &[Loc]) -> (u64, u64, Vec<String>) {
        let path = self.pack_path(name);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) => {
                return (0, 0, vec![format!(
                    "pack file {} ({} blobs) cannot be read: {e}",
                    path.display(),
                    locs.len()
                )]);
            }
        };
        self.verify_pack_bytes(name, size, &bytes, locs)
    }

    /// Verify the bytes of one pack (read from disk or S3): size, name,
    /// trailer, every blob.
    fn verify_pack_bytes(&self, name: &str, size: u64, bytes: &[u8], locs: &[Loc]) -> (u64, u64, Vec<String>) {
        let remote = self.inner.remote.as_deref();
        let (label, path) = match remote {
            Some(_) => (format!("pack {}", self.pack_location(name)), PathBuf::from(self.pack_location(name))),
            None => (format!("pack file {}", self.pack_path(name).display()), self.pack_path(name)),
        };
        let mut probs = Vec::new();
        if bytes.len() as u64 != size {
            probs.push(format!(
                "{label} is {} bytes, the catalog says {size}",
                bytes.len()
            ));
        }
        if blake3::hash(bytes).to_hex().as_str() != name {
            probs.push(format!("{label} does not hash to its name"));
        }
        match pack::parse_index(bytes) {
            Err(e) => probs.push(format!("{label}: {e}")),
            Ok(entries) => {
                let idx: std::collections::HashMap<Hash, pack::PackEntry> =
                    entries.into_iter().map(|e| (e.hash, e)).collect();
                for l in locs {
                    let agrees = idx
                        .get(&l.hash)
                        .is_some_and(|e| (e.offset, e.clen, e.ulen) == (l.offset, l.clen, l.ulen));
                    if !agrees {
                        probs.push(format!(
                            "{label}: trailer does not agree with the catalog about blob {}",
                            l.hash
                        ));
                    }
                }
            }
        }
        let (mut n, mut total) = (0u64, 0u64);
        for l in locs {
            let end = l.offset + l.clen as u64;
            let r = if end > bytes.len() as u64 {
                Err(StoreError::Corrupt {
                    pack: path.clone(),
                    hash: l.hash,
                    reason: "pack file is truncated".into(),
                })
            } else {
                let stored = &bytes[l.offset as usize..end as usize];
                match remote {
                    Some(r) => self.decode_remote(r, l, stored),
                    None => self.decode(l, stored),
                }
            };
            match r {
                Ok(_) => {
                    n += 1;
                    total += l.ulen as u64;
                }
                Err(e) => probs.push(e.to_string()),
            }
        }
        (n, total, probs)
    }
}

impl Store {
    /// Read back every blob in `hashes` (duplicates and [`Hash::ZERO_CHUNK`]
    /// allowed) and check that it decompresses and hashes to its address.
    /// Unlike [`Store::read_blobs`] it does not stop at the first problem:
    /// each one (a blob missing from the catalog, a missing or truncated
    /// pack, a corrupt blob) is a sentence in the report naming the pack
    /// and the blob. `Err` only if the catalog cannot be queried. For an
    /// `s3://` store the blobs are read from S3 with ranged GETs (never
    /// from the cache), so this checks what another host would restart.
    pub fn verify_blobs(&self, hashes: &[Hash]) -> Result<VerifyReport> {
        let mut uniq: Vec<Hash> = hashes.iter().copied().filter(|h| !h.is_zero_chunk()).collect();
        uniq.sort_unstable();
        uniq.dedup();
        let mut problems = Vec::new();
        let mut groups: BTreeMap<String, Vec<Loc>> = BTreeMap::new();
        {
            let conn = self.inner.conn();
            for h in &uniq {
                match self.locate(&conn, h) {
                    Ok(loc) => groups.entry(loc.pack.clone()).or_default().push(loc),
                    Err(StoreError::BlobNotFound { .. }) => {
                        problems.push(format!("blob {h} is not in the catalog"))
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        let results: Vec<(u64, u64, Vec<String>)> = if let Some(r) = self.inner.remote.as_deref() {
            let mut all = Vec::new();
            let groups: Vec<(String, Vec<Loc>)> = groups.into_iter().collect();
            for batch in groups.chunks(crate::remote::CONCURRENCY) {
                let work: Vec<(String, Vec<std::ops::Range<u64>>)> = batch
                    .iter()
                    .map(|(n, locs)| (Remote::pack_rel(n), locs.iter().map(|l| l.offset..l.offset + l.clen as u64).collect()))
                    .collect();
                let fetched = r.get_ranges_each(&work);
                all.par_extend(batch.par_iter().zip(fetched.into_par_iter()).map(|((name, locs), got)| match got {
                    Err(e) => (0, 0, vec![format!("{e} ({} blobs of this check live in it){}", locs.len(), self.unsynced_note(name))]),
                    Ok(bufs) => {
                        let (mut n, mut bytes, mut probs) = (0, 0, Vec::new());
                        for (l, b) in locs.iter().zip(&bufs) {
                            match self.decode_remote(r, l, b) {
                                Ok(_) => {
                                    n += 1;
                                    bytes += l.ulen as u64;
                                }
                                Err(e) => probs.push(e.to_string()),
                            }
                        }
                        (n, bytes, probs)
                    }
                }));
            }
            all
        } else {
            groups
            .into_par_iter()
            .map(|(name, mut locs)| {
                locs.sort_unstable_by_key(|l| l.offset);
                let path = self.pack_path(&name);
                let f = match open_pack(&path, &locs[0].hash) {
                    Ok(f) => f,
                    Err(e) => {
                        return (0, 0, vec![format!("{e} ({} blobs of this check live in it)", locs.len())]);
                    }
                };
                let (mut n, mut bytes, mut probs) = (0, 0, Vec::new());
                for l in &locs {
                    let mut buf = vec![0u8; l.clen as usize];
                    let r = match f.read_exact_at(&mut buf, l.offset) {
                        Ok(()) => self.decode(l, &buf).map(|_| ()),
                        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(StoreError::Corrupt {
                            pack: path.clone(),
                            hash: l.hash,
                            reason: "pack file is truncated".into(),
                        }),
                        Err(e) => Err(StoreError::io(format!("read pack file {}", path.display()), e)),
                    };
                    match r {
                        Ok(()) => {
                            n += 1;
                            bytes += l.ulen as u64;
                        }
                        Err(e) => probs.push(e.to_string()),
                    }
                }
                (n, bytes, probs)
            })
            .collect()
        };
        let mut report = VerifyReport::default();
        for (n, bytes, probs) in results {
            report.packs += 1;
            report.blobs += n;
            report.bytes += bytes;
            problems.extend(probs);
        }
        report.problems = problems;
        Ok(report)
    }

    /// Check the catalog against the pack files without reading blob data:
    /// every named pack exists with the recorded size and a trailer that
    /// agrees with the catalog about each of its blobs; every blob row points
    /// to a known pack; every generation's manifest is in the catalog.
    /// Orphan pack files are listed (harmless). For an `s3://` store, one
    /// listing of the packs on S3 is checked against the catalog (names and
    /// sizes; trailers are not read).
    pub fn verify_metadata(&self) -> Result<VerifyReport> {
        let packs = self.pack_rows()?;
        let blobs = self.blob_rows()?;
        let mut problems = Vec::new();
        {
            let conn = self.inner.conn();
            problems.extend(self.generation_problems(&conn)?);
        }
        let mut by_pack: HashMap<i64, Vec<BlobRow>> = HashMap::new();
        for b in blobs {
            by_pack.entry(b.pack_id).or_default().push(b);
        }
        let ids: HashSet<i64> = packs.iter().map(|p| p.id).collect();
        for (id, rows) in &by_pack {
            if !ids.contains(id) {
                problems.push(format!(
                    "{} blobs (e.g. {}) point to pack id {id}, which the catalog does not have",
                    rows.len(),
                    rows[0].hash
                ));
            }
        }
        let mut report = VerifyReport { packs: packs.len() as u64, ..Default::default() };
        if self.inner.remote.is_some() {
            // On S3: one listing; every named pack must be there with its
            // size (no data is read, trailers included).
            let present = self.present_packs()?;
            for pk in &packs {
                let n = by_pack.get(&pk.id).map_or(0, Vec::len);
                match present.get(&pk.name) {
                    None => problems.push(format!(
                        "{} ({n} blobs) is missing from S3, though the catalog names it{}",
                        self.pack_location(&pk.name),
                        self.unsynced_note(&pk.name)
                    )),
                    Some(&len) if len != pk.size => problems.push(format!(
                        "{} is {len} bytes on S3, the catalog says {}: the pack is damaged; push the store again from a good copy (`ckpt push`)",
                        self.pack_location(&pk.name),
                        pk.size
                    )),
                    Some(_) => {}
                }
            }
            let named: HashSet<&str> = packs.iter().map(|p| p.name.as_str()).collect();
            let mut orphans: Vec<PathBuf> =
                present.keys().filter(|n| !named.contains(n.as_str())).map(|n| PathBuf::from(self.pack_location(n))).collect();
            orphans.sort();
            report.orphan_packs = orphans;
        } else {
            let results: Vec<Vec<String>> = packs
                .par_iter()
                .map(|pk| {
                    let rows = by_pack.get(&pk.id).map(Vec::as_slice).unwrap_or(&[]);
                    self.check_trailer(pk, rows)
                })
                .collect();
            for r in results {
                problems.extend(r);
            }
            report.orphan_packs = self.orphan_packs()?.into_iter().map(|o| o.0).collect();
        }
        for rows in by_pack.values() {
            report.blobs += rows.len() as u64;
            report.bytes += rows.iter().map(|r| r.ulen as u64).sum::<u64>();
        }
        report.problems = problems;
        Ok(report)
    }

    /// Size and trailer of one pack against its catalog rows.
    fn check_trailer(&self, pk: &PackRow, rows: &[BlobRow]) -> Vec<String> {
        let path = self.pack_path(&pk.name);
        let mut probs = Vec::new();
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                probs.push(format!("pack file {} ({} blobs) cannot be opened: {e}", path.display(), rows.len()));
                return probs;
            }
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if len != pk.size {
            probs.push(format!("pack file {} is {len} bytes, the catalog says {}", path.display(), pk.size));
        }
        let entries = match read_trailer(&f, len) {
            Ok(e) => e,
            Err(e) => {
                probs.push(format!("pack file {}: {e}", path.display()));
                return probs;
            }
        };
        let idx: HashMap<Hash, (u64, u32, u32)> = entries.into_iter().collect();
        for r in rows {
            let agrees = idx.get(&r.hash) == Some(&(r.offset, r.clen, r.ulen));
            if !agrees {
                probs.push(format!(
                    "pack file {}: trailer does not agree with the catalog about blob {}",
                    path.display(),
                    r.hash
                ));
            }
        }
        probs
    }
}

/// A trailer entry: hash and (offset, clen, ulen).
type TrailerEntry = (Hash, (u64, u32, u32));

/// Read just the trailer of a pack file.
fn read_trailer(f: &File, len: u64) -> std::result::Result<Vec<TrailerEntry>, String> {
    if len < (PACK_MAGIC.len() + TAIL_LEN) as u64 {
        return Err("too short to be a pack file (truncated?)".into());
    }
    let mut tail = [0u8; TAIL_LEN];
    f.read_exact_at(&mut tail, len - TAIL_LEN as u64).map_err(|e| e.to_string())?;
    if &tail[8..] != INDEX_MAGIC {
        return Err("pack trailer missing (no CKPTPKIX at the end): file truncated?".into());
    }
    let count = u32::from_le_bytes(tail[0..4].try_into().expect("4 bytes")) as usize;
    let tlen = u32::from_le_bytes(tail[4..8].try_into().expect("4 bytes")) as u64;
    if tlen != (count * ENTRY_LEN + TAIL_LEN) as u64 || tlen > len - PACK_MAGIC.len() as u64 {
        return Err(format!("inconsistent trailer (count {count}, length {tlen})"));
    }
    let mut buf = vec![0u8; count * ENTRY_LEN];
    f.read_exact_at(&mut buf, len - tlen).map_err(|e| e.to_string())?;
    Ok(buf
        .chunks_exact(ENTRY_LEN)
        .map(|e| {
            let hash = Hash::from_slice(&e[..32]).expect("32 bytes");
            let offset = u64::from_le_bytes(e[33..41].try_into().expect("8 bytes"));
            let clen = u32::from_le_bytes(e[41..45].try_into().expect("4 bytes"));
            let ulen = u32::from_le_bytes(e[45..49].try_into().expect("4 bytes"));
            (hash, (offset, clen, ulen))
        })
        .collect())
}
