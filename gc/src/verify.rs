//! Checking that generations can be restored: every blob a generation needs
//! is in the catalog, in a pack that exists, and (unless metadata only)
//! decompresses and hashes to its address. The work behind `ckpt verify`.
//!
//! On an `s3://` store the same checks run against S3, not the local
//! cache: blobs are read back with ranged GETs (whole packs for `--all`),
//! and `--metadata-only` checks one listing of the pack objects (names and
//! sizes) against the catalog.

use std::collections::{BTreeSet, HashMap, HashSet};

use ckpt_store::{GenerationInfo, Hash, Store, VerifyReport};
use serde::Serialize;

use crate::error::Result;
use crate::mark::Marker;

/// The outcome of a verification.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Verification {
    /// Generations checked.
    pub generations: Vec<u64>,
    /// Only the catalog and pack trailers were checked, no chunk data.
    pub metadata_only: bool,
    /// Packs, blobs and bytes checked; the problems found (one sentence
    /// each, naming the generation, pack or blob); orphan pack files.
    pub report: VerifyReport,
}

impl Verification {
    /// No problem found.
    pub fn is_ok(&self) -> bool {
        self.report.is_ok()
    }
}

/// Check the generations `gens` (all of them: [`Store::generations`]).
/// With `all`, the whole store is checked too (every pack, every blob, even
/// the ones no generation needs: [`Store::verify`] or
/// [`Store::verify_metadata`]); otherwise only the blobs of `gens`.
pub fn verify(store: &Store, gens: &[GenerationInfo], all: bool, metadata_only: bool) -> Result<Verification> {
    let mut problems = Vec::new();
    let mut marker = Marker::new();
    // Which generation first needed a chunk (to name it in a problem).
    let mut first_user: HashMap<Hash, u64> = HashMap::new();
    for g in gens {
        let before: HashSet<Hash> = if gens.len() > 1 { marker.chunks.clone() } else { HashSet::new() };
        if let Err(e) = marker.add(store, g) {
            problems.push(format!("generation {}: {e}", g.id));
            continue;
        }
        for c in marker.chunks.difference(&before) {
            first_user.entry(*c).or_insert(g.id);
        }
    }
    let mut report = if all {
        if metadata_only { store.verify_metadata()? } else { store.verify()? }
    } else if metadata_only {
        VerifyReport::default()
    } else {
        let chunks: Vec<Hash> = marker.chunks.iter().copied().collect();
        let mut r = store.verify_blobs(&chunks)?;
        for p in &mut r.problems {
            let gen_of = chunks_named(p, &first_user);
            if let Some(g) = gen_of {
                *p = format!("generation {g}: {p}");
            }
        }
        r
    };
    if all || metadata_only {
        // Every needed blob must have a catalog row in a pack the catalog
        // names and that exists on disk.
        let rows = store.blob_rows()?;
        let packs: HashMap<i64, String> = store.pack_rows()?.into_iter().map(|p| (p.id, p.name)).collect();
        // Which packs exist (files, or one listing of S3), for a metadata-only check.
        let existing = if metadata_only && !all { store.present_packs()? } else { HashMap::new() };
        let present: HashMap<Hash, i64> = rows.iter().map(|r| (r.hash, r.pack_id)).collect();
        let mut missing_packs = BTreeSet::new();
        let mut needed: Vec<&Hash> = marker.meta.iter().chain(marker.chunks.iter()).collect();
        needed.sort_unstable();
        for h in needed {
            let user = first_user.get(h).map(|g| format!("generation {g}: ")).unwrap_or_default();
            match present.get(&store.address(h)) {
                None => problems.push(format!("{user}blob {h} is not in the catalog")),
                Some(pid) => match packs.get(pid) {
                    None => problems.push(format!("{user}blob {h} points to pack id {pid}, which the catalog does not have")),
                    Some(name) if metadata_only && !all => {
                        if !existing.contains_key(name) && missing_packs.insert(name.clone()) {
                            problems.push(format!("{user}pack {} (holding blob {h}) is missing", store.pack_location(name)));
                        }
                    }
                    Some(_) => {}
                },
            }
        }
        if metadata_only && !all {
            report.blobs = (marker.meta.len() + marker.chunks.len()) as u64;
        }
    }
    problems.append(&mut report.problems);
    report.problems = problems;
    Ok(Verification { generations: gens.iter().map(|g| g.id).collect(), metadata_only, report })
}

/// The generation that needs the blob a problem sentence names, if any.
fn chunks_named(problem: &str, first_user: &HashMap<Hash, u64>) -> Option<u64> {
    problem
        .split(|c: char| !c.is_ascii_hexdigit())
        .filter(|w| w.len() == 64)
        .find_map(|w| w.parse::<Hash>().ok().and_then(|h| first_user.get(&h).copied()))
}
