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
use std::path::PathBuf;

use rayon::prelude::*;
use rusqlite::Connection;
use serde::Serialize;

use crate::maintenance::{BlobRow, PackRow};
use crate::pack;
use crate::reader::{Loc, by_offset};
use crate::remote;
use crate::source::{Each, TrailerEntry};
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
                by_pack.entry(pack_id).or_default().push(Loc { hash, addr: hash, pack: "".into(), offset, clen, ulen });
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
                let shared: std::sync::Arc<str> = name.as_str().into();
                for l in &mut locs {
                    l.pack = shared.clone();
                }
                (name, size, locs)
            })
            .collect();
        // Every pack read whole from the origin, a few at a time (bounded
        // memory), and checked.
        let src = &self.inner.packs;
        let mut results: Vec<(u64, u64, Vec<String>)> = Vec::with_capacity(work.len());
        for batch in work.chunks(src.whole_at_once().max(1)) {
            let names: Vec<String> = batch.iter().map(|w| w.0.clone()).collect();
            let got = src.read_whole(&names);
            results.par_extend(batch.par_iter().zip(got.into_par_iter()).map(|((name, size, locs), got)| match got {
                Ok(bytes) => self.verify_pack_bytes(name, *size, &bytes, locs),
                Err(e) => (0, 0, vec![format!("{e} ({} blobs){}", locs.len(), self.unsynced_note(name))]),
            }));
        }
        let mut report = VerifyReport {
            packs: work.len() as u64,
            ..Default::default()
        };
        for (blobs, bytes, probs) in results {
            report.blobs += blobs;
            report.bytes += bytes;
            problems.extend(probs);
        }
        let named: HashSet<&str> = work.iter().map(|w| w.0.as_str()).collect();
        report.orphan_packs = self.orphans_of(&named, src.list()?);
        report.problems = problems;
        Ok(report)
    }

    /// The packs of `present` that `named` lacks, where each lives (its
    /// file, or its S3 URL), sorted.
    fn orphans_of(&self, named: &HashSet<&str>, present: HashMap<String, u64>) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> =
            present.keys().filter(|n| !named.contains(n.as_str())).map(|n| PathBuf::from(self.pack_location(n))).collect();
        v.sort();
        v
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

    /// Verify the bytes of one pack (read from disk or S3): size, name,
    /// trailer, every blob.
    fn verify_pack_bytes(&self, name: &str, size: u64, bytes: &[u8], locs: &[Loc]) -> (u64, u64, Vec<String>) {
        let label = self.inner.packs.label(name);
        let path = PathBuf::from(self.pack_location(name));
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
                self.decode_at(&path, l, &bytes[l.offset as usize..end as usize])
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
                    Ok(loc) => groups.entry(loc.pack.to_string()).or_default().push(loc),
                    Err(StoreError::BlobNotFound { .. }) => {
                        problems.push(format!("blob {h} is not in the catalog"))
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        let src = &self.inner.packs;
        let work = by_offset(groups);
        let mut results: Vec<(u64, u64, Vec<String>)> = Vec::with_capacity(work.len());
        for batch in work.chunks(src.packs_at_once()) {
            let fetched = src.read_origin(batch);
            results.par_extend(batch.par_iter().zip(fetched.into_par_iter()).map(|((name, locs), got)| match got {
                Err(e) => (0, 0, vec![format!("{e} ({} blobs of this check live in it){}", locs.len(), self.unsynced_note(name))]),
                Ok(bufs) => {
                    let place = PathBuf::from(self.pack_location(name));
                    let (mut n, mut bytes, mut probs) = (0, 0, Vec::new());
                    for (l, b) in locs.iter().zip(&bufs) {
                        match self.decode_at(&place, l, b) {
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
        // What exists at the origin (one listing on S3), every named pack
        // checked against it; the trailers too where the origin gives them
        // without reading the pack (local files; on S3 no data is read).
        let src = &self.inner.packs;
        let present = src.list()?;
        let results: Vec<Vec<String>> = packs
            .par_iter()
            .map(|pk| {
                let rows = by_pack.get(&pk.id).map(Vec::as_slice).unwrap_or(&[]);
                match src.trailer(&pk.name) {
                    Some(t) => self.check_trailer(pk, rows, t),
                    None => self.check_listed(pk, rows.len(), present.get(&pk.name).copied()),
                }
            })
            .collect();
        for r in results {
            problems.extend(r);
        }
        let named: HashSet<&str> = packs.iter().map(|p| p.name.as_str()).collect();
        report.orphan_packs = self.orphans_of(&named, present);
        for rows in by_pack.values() {
            report.blobs += rows.len() as u64;
            report.bytes += rows.iter().map(|r| r.ulen as u64).sum::<u64>();
        }
        report.problems = problems;
        Ok(report)
    }

    /// Size and trailer of one pack (`got`, from its source) against its
    /// catalog rows.
    fn check_trailer(&self, pk: &PackRow, rows: &[BlobRow], got: Each<(u64, Vec<TrailerEntry>)>) -> Vec<String> {
        let label = self.inner.packs.label(&pk.name);
        let (len, entries) = match got {
            Ok(t) => t,
            Err(e) => return vec![format!("{e} ({} blobs)", rows.len())],
        };
        let mut probs = Vec::new();
        if len != pk.size {
            probs.push(format!("{label} is {len} bytes, the catalog says {}", pk.size));
        }
        let idx: HashMap<Hash, (u64, u32, u32)> = entries.into_iter().collect();
        for r in rows {
            if idx.get(&r.hash) != Some(&(r.offset, r.clen, r.ulen)) {
                probs.push(format!("{label}: trailer does not agree with the catalog about blob {}", r.hash));
            }
        }
        probs
    }

    /// One pack (of `blobs` blobs) against a listing that gives it length
    /// `listed`, or lacks it.
    fn check_listed(&self, pk: &PackRow, blobs: usize, listed: Option<u64>) -> Vec<String> {
        match listed {
            None => vec![format!(
                "{} ({blobs} blobs) is missing from S3, though the catalog names it{}",
                self.pack_location(&pk.name),
                self.unsynced_note(&pk.name)
            )],
            Some(len) if len != pk.size => vec![format!(
                "{} is {len} bytes on S3, the catalog says {}: the pack is damaged; push the store again from a good copy (`ckpt push`)",
                self.pack_location(&pk.name),
                pk.size
            )],
            Some(_) => Vec::new(),
        }
    }
}
