//! `ckpt gc`: retention policy, mark-and-sweep and repack (glue over
//! `ckpt-gc`).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use ckpt_gc::{GcOptions, GcReport, Policy};
use ckpt_store::Store;

use crate::human;

/// Options of `ckpt gc`.
#[derive(clap::Args, Clone, Debug)]
pub struct GcArgs {
    /// Keep the N newest generations.
    #[arg(long, value_name = "N")]
    keep_last: Option<u32>,
    /// Keep generations created within DURATION before now (e.g. 30m, 2h, 7d, 1d12h).
    #[arg(long, value_name = "DURATION")]
    keep_within: Option<String>,
    /// Keep the newest generation of each of the N most recent hours (UTC) that have one.
    #[arg(long, value_name = "N")]
    keep_hourly: Option<u32>,
    /// Keep the newest generation of each of the N most recent days (UTC) that have one.
    #[arg(long, value_name = "N")]
    keep_daily: Option<u32>,
    /// Keep the newest generation of each of the N most recent weeks (Monday to Sunday, UTC).
    #[arg(long, value_name = "N")]
    keep_weekly: Option<u32>,
    /// Keep these generations.
    #[arg(long, value_name = "GEN", num_args = 1..)]
    keep: Vec<u64>,
    /// List what would go and how many bytes would be freed; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Repack packs whose live share is below this fraction (0 never repacks).
    #[arg(long, value_name = "F", default_value_t = ckpt_gc::DEFAULT_REPACK_THRESHOLD)]
    repack_threshold: f64,
    /// Wait up to SECS for the store's writer lock while a checkpoint holds it.
    #[arg(long, value_name = "SECS", default_value_t = ckpt_gc::DEFAULT_WAIT.as_secs())]
    wait: u64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Run `ckpt gc`.
pub fn gc(url: &str, a: GcArgs) -> Result<ExitCode> {
    let policy = Policy {
        keep_last: a.keep_last,
        keep_within: a.keep_within.as_deref().map(ckpt_gc::parse_duration).transpose()?,
        keep_hourly: a.keep_hourly,
        keep_daily: a.keep_daily,
        keep_weekly: a.keep_weekly,
        keep: a.keep.clone(),
    };
    policy.check()?;
    let store = Store::open(url)?;
    let opts = GcOptions { policy, dry_run: a.dry_run, repack_threshold: a.repack_threshold, wait: Duration::from_secs(a.wait) };
    let r = ckpt_gc::run(&store, &opts)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print_report(&r);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_report(r: &GcReport) {
    let would = if r.dry_run { "would " } else { "" };
    println!("{}forget {} generation(s): {}", would, r.forgotten.len(), ckpt_gc::policy::id_ranges(r.forgotten.iter().copied()));
    println!("keep {} generation(s):", r.kept.len());
    for (id, why) in &r.kept {
        println!("  {id:>5}  {}", why.join(", "));
    }
    println!(
        "{}delete {} blob(s) ({} compressed), {} pack(s) with nothing live, {} orphan pack(s); {}repack {} pack(s) into {}",
        would,
        r.blobs_deleted,
        human(r.blob_bytes_deleted),
        r.packs_deleted,
        r.orphans_deleted,
        would,
        r.packs_repacked,
        r.packs_written
    );
    println!(
        "{}free {} (packs {} -> {}){}",
        would,
        human(r.bytes_freed),
        human(r.pack_bytes_before),
        human(r.pack_bytes_after),
        if r.dry_run { String::new() } else { format!(" in {} ms", r.duration_ms) }
    );
    if r.dry_run {
        println!("dry run: nothing was changed");
    }
}
