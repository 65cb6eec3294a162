//! `ckpt show GEN` and `ckpt stats`: what a generation holds, and what the
//! store holds.

use std::process::ExitCode;

use anyhow::Result;
use ckpt_store::Store;
use serde_json::{Value, json};

use crate::{human, utc};

fn prot(p: u32) -> String {
    format!("{}{}{}", if p & 1 != 0 { 'r' } else { '-' }, if p & 2 != 0 { 'w' } else { '-' }, if p & 4 != 0 { 'x' } else { '-' })
}

/// Run `ckpt show [GEN]` (default: the latest generation).
pub fn show(url: &str, generation: Option<u64>, as_json: bool) -> Result<ExitCode> {
    let store = Store::open(url)?;
    let (g, manifest, images) = ckpt_engine::image::load_generation(&store, generation)?;
    let mut procs = Vec::new();
    for (p, img) in manifest.processes.iter().zip(&images) {
        let regions: Vec<Value> = img
            .regions
            .iter()
            .map(|r| {
                json!({
                    "start": format!("{:#x}", r.start),
                    "end": format!("{:#x}", r.end),
                    "prot": prot(r.prot),
                    "kind": r.kind,
                    "name": r.name,
                    "bytes": r.end - r.start,
                    "recorded": r.kind.has_content(),
                })
            })
            .collect();
        procs.push(json!({
            "pid": img.pid,
            "ppid": img.ppid,
            "host": img.host,
            "exe": img.exe,
            "comm": img.comm,
            "cmdline": img.cmdline,
            "threads": img.threads.iter().map(|t| t.tid).collect::<Vec<_>>(),
            "fds": img.fds.len(),
            "logical_bytes": img.logical_bytes(),
            "image": p.image,
            "regions": regions,
        }));
    }
    if as_json {
        println!("{}", serde_json::to_string_pretty(&json!({ "generation": g, "processes": procs }))?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("generation {}  ({} UTC, took {} ms, tracking {})", g.id, utc(g.created_ms / 1000), g.duration_ms, g.dirty_tracking);
    println!("parent:     {}", g.parent.map(|p| p.to_string()).unwrap_or_else(|| "none (full image)".into()));
    println!("bytes:      {} logical, {} new, {} stored", human(g.logical_bytes), human(g.new_bytes), human(g.stored_bytes));
    println!("manifest:   {}", g.manifest);
    for p in &procs {
        let threads = p["threads"].as_array().map(Vec::len).unwrap_or(0);
        println!();
        println!("process {} (ppid {}) on {}: {}  [{} thread(s), {} fd(s), {}]", p["pid"], p["ppid"], p["host"].as_str().unwrap_or(""), p["exe"].as_str().unwrap_or(""), threads, p["fds"], human(p["logical_bytes"].as_u64().unwrap_or(0)));
        println!("  {:<33}  {:<4}  {:<12}  {:>10}  NAME", "ADDRESS", "PROT", "KIND", "BYTES");
        for r in p["regions"].as_array().into_iter().flatten() {
            println!(
                "  {:>16}-{:<16}  {:<4}  {:<12}  {:>10}  {}",
                r["start"].as_str().unwrap_or(""),
                r["end"].as_str().unwrap_or(""),
                r["prot"].as_str().unwrap_or(""),
                r["kind"].as_str().unwrap_or(""),
                human(r["bytes"].as_u64().unwrap_or(0)),
                r["name"].as_str().unwrap_or("")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Store statistics: logical bytes of all generations, distinct bytes
/// stored, bytes on disk, and the dedup and compression ratios.
pub fn stats_json(store: &Store) -> Result<Value> {
    let s = store.stats()?;
    let gens = store.generations()?;
    let logical: u64 = gens.iter().map(|g| g.logical_bytes).sum();
    let ratio = |a: u64, b: u64| if b == 0 { Value::Null } else { json!(((a as f64 / b as f64) * 100.0).round() / 100.0) };
    Ok(json!({
        "generations": s.generations,
        "logical_bytes": logical,
        "unique_bytes": s.logical_bytes,
        "stored_bytes": s.stored_bytes,
        "pack_bytes": s.pack_bytes,
        "packs": s.packs,
        "blobs": s.blobs,
        "dedup_ratio": ratio(logical, s.logical_bytes),
        "compression_ratio": ratio(s.logical_bytes, s.stored_bytes),
        "total_ratio": ratio(logical, s.pack_bytes),
    }))
}

/// One line of statistics (the footer of `ckpt log`).
pub fn stats_line(store: &Store) -> Result<String> {
    let v = stats_json(store)?;
    let r = |k: &str| v[k].as_f64().map(|x| format!("{x:.2}x")).unwrap_or_else(|| "-".into());
    Ok(format!(
        "store: {} logical in {} generation(s); {} distinct after dedup ({}), {} stored after compression ({}), {} in {} pack(s)",
        human(v["logical_bytes"].as_u64().unwrap_or(0)),
        v["generations"],
        human(v["unique_bytes"].as_u64().unwrap_or(0)),
        r("dedup_ratio"),
        human(v["stored_bytes"].as_u64().unwrap_or(0)),
        r("compression_ratio"),
        human(v["pack_bytes"].as_u64().unwrap_or(0)),
        v["packs"]
    ))
}

/// Run `ckpt stats`.
pub fn stats(url: &str, as_json: bool) -> Result<ExitCode> {
    let store = Store::open(url)?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&stats_json(&store)?)?);
    } else {
        println!("{}", stats_line(&store)?);
    }
    Ok(ExitCode::SUCCESS)
}
