//! `ckpt verify`: read back what generations need and check it.

use std::process::ExitCode;

use anyhow::Result;
use ckpt_store::Store;

use crate::human;

/// Run `ckpt verify`: GEN, or every generation and the whole store (`--all`,
/// the default).
pub fn verify(url: &str, generation: Option<u64>, all: bool, metadata_only: bool, json: bool) -> Result<ExitCode> {
    let store = Store::open(url)?;
    let (gens, whole) = match generation {
        Some(g) if !all => (vec![store.generation(g)?], false),
        // Rows that fail their MAC are named by the whole-store check.
        _ => (store.authentic_generations()?.0, true),
    };
    let v = ckpt_gc::verify::verify(&store, &gens, whole, metadata_only)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for p in &v.report.problems {
            println!("problem: {p}");
        }
        let what = if whole { format!("store {url} ({} generations)", gens.len()) } else { format!("generation {}", gens[0].id) };
        let how = match (metadata_only, store.remote().is_some()) {
            (true, false) => "catalog and pack trailers",
            (true, true) => "catalog against the pack objects on S3: names and sizes",
            (false, false) => "every blob read back",
            (false, true) => "every blob read back from S3",
        };
        println!(
            "{}: {} pack(s), {} blob(s), {} checked ({how}); {} problem(s)",
            what,
            v.report.packs,
            v.report.blobs,
            human(v.report.bytes),
            v.report.problems.len()
        );
        if !v.report.orphan_packs.is_empty() {
            println!("note: {} pack file(s) that the catalog does not name (harmless, left by an interrupted write; `ckpt gc` deletes them)", v.report.orphan_packs.len());
        }
    }
    Ok(if v.is_ok() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
