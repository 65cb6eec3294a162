//! ckpt-gc: pruning a ckpt store.
//!
//! Role: retention policies ([`policy`], in the style of restic's `forget`),
//! mark-and-sweep of the blobs that kept generations no longer need
//! ([`mark`], [`run`]), repacking of packs that are mostly dead, and the
//! per-generation reachability check behind `ckpt verify` ([`verify`]).
//!
//! What it must never do: touch a live process, or run without the store's
//! writer lock when it changes anything. gc takes the lock
//! ([`ckpt_store::Store::writer`]) for its whole run, waiting while a
//! checkpoint holds it; the coordinator takes the same lock for each
//! checkpoint, so gc and checkpoints never overlap, and a chunk a checkpoint
//! reuses is either in the store for that whole checkpoint or was never
//! there. The newest generation is always kept: a coordinator's next
//! incremental checkpoint reuses the chunk hashes of the generation it last
//! committed.
//!
//! Crash safety (a `kill -9` anywhere): the catalog changes in two
//! transactions (sweep, then the repack switch), each all or nothing; pack
//! files are deleted only after the catalog stopped naming them, and new
//! packs are durable before it names them. Leftover pack files that nothing
//! names are harmless and the next gc deletes them.
//!
//! On an `s3://` store the same steps run on the local cache's catalog
//! (packs missing from the cache are read with ranged GETs), under the S3
//! writer lock ([`ckpt_store::remote_lock`]), and are then published: the
//! new packs are uploaded, then the catalog, and only then are the packs on
//! S3 that it no longer names deleted. Until the catalog upload, S3 keeps
//! the old catalog and every pack it names; a gc killed before that leaves
//! the cache marked unsynced, and the next writer of that cache uploads it
//! (or drops it, if another writer changed S3 meanwhile).

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod error;
pub mod mark;
pub mod policy;
pub mod verify;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use ckpt_store::maintenance::PackRow;
use ckpt_store::{Hash, Store, StoreError, Writer};
use serde::Serialize;

pub use error::{GcError, Result};
pub use mark::{Marker, mark};
pub use policy::{Decision, GenTime, Policy, parse_duration};

/// Default share of live bytes under which a pack is repacked.
pub const DEFAULT_REPACK_THRESHOLD: f64 = 0.5;
/// Default time gc waits for the writer lock.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(300);
/// Test hook: `CKPT_GC_PAUSE_AT=PHASE` makes gc print `ckpt-gc: paused at
/// PHASE` on stderr and sleep for an hour at that phase (`after-mark`,
/// `after-sweep`, `after-repack-write`, `after-repack-commit`, and on an
/// S3 store `after-upload-packs`, `after-upload-catalog`,
/// `mid-remote-delete`), so that a test can `kill -9` it there.
pub const ENV_PAUSE_AT: &str = "CKPT_GC_PAUSE_AT";

/// How to run gc.
#[derive(Clone, Debug)]
pub struct GcOptions {
    /// What to keep.
    pub policy: Policy,
    /// Only report what would go.
    pub dry_run: bool,
    /// Repack packs whose live share is below this (0..=1; 0 never repacks).
    pub repack_threshold: f64,
    /// How long to wait for the writer lock.
    pub wait: Duration,
}

impl GcOptions {
    /// Options with the defaults and `policy`.
    pub fn new(policy: Policy) -> GcOptions {
        GcOptions { policy, dry_run: false, repack_threshold: DEFAULT_REPACK_THRESHOLD, wait: DEFAULT_WAIT }
    }
}

/// What gc did (or, with `dry_run`, would do).
#[derive(Clone, Debug, Default, Serialize)]
pub struct GcReport {
    /// Nothing was changed.
    pub dry_run: bool,
    /// Kept generations and the rules that keep them.
    pub kept: BTreeMap<u64, Vec<&'static str>>,
    /// Generations removed.
    pub forgotten: Vec<u64>,
    /// Blobs the kept generations need.
    pub live_blobs: u64,
    /// Blob rows deleted.
    pub blobs_deleted: u64,
    /// Compressed bytes of those blobs.
    pub blob_bytes_deleted: u64,
    /// Pack files deleted because no live blob was left in them.
    pub packs_deleted: u64,
    /// Packs rewritten because their live share was below the threshold.
    pub packs_repacked: u64,
    /// New packs written by the repack.
    pub packs_written: u64,
    /// Pack files that the catalog did not name (left by a crash), deleted.
    pub orphans_deleted: u64,
    /// Bytes of pack files before and after.
    pub pack_bytes_before: u64,
    /// See `pack_bytes_before` (estimated for a dry run).
    pub pack_bytes_after: u64,
    /// Disk bytes freed (estimated for a dry run).
    pub bytes_freed: u64,
    /// Time spent waiting for the writer lock.
    pub lock_wait_ms: u64,
    /// Time spent marking.
    pub mark_ms: u64,
    /// Whole run, lock wait excluded.
    pub duration_ms: u64,
}

/// Take the writer lock, retrying for up to `wait` while another ckpt
/// process (a checkpoint, another gc) holds it.
pub fn wait_writer(store: &Store, wait: Duration) -> Result<Writer> {
    let t0 = Instant::now();
    let mut told = false;
    loop {
        match store.writer() {
            Ok(w) => return Ok(w),
            Err(e @ StoreError::Locked { .. }) => {
                if t0.elapsed() >= wait {
                    return Err(GcError::LockTimeout {
                        store: store.url(),
                        waited: t0.elapsed().as_secs(),
                        source: e,
                    });
                }
                if !told {
                    tracing::info!(store = %store.url(), "waiting for the writer lock: {e}");
                    told = true;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn pause(phase: &str) {
    if std::env::var(ENV_PAUSE_AT).is_ok_and(|p| p == phase) {
        eprintln!("ckpt-gc: paused at {phase}");
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Apply `opts.policy` to `store`: forget the generations no rule keeps,
/// delete the blobs and packs nothing kept needs, repack mostly-dead packs.
/// See the crate documentation for the locking and crash-safety rules.
pub fn run(store: &Store, opts: &GcOptions) -> Result<GcReport> {
    opts.policy.check()?;
    if !(0.0..=1.0).contains(&opts.repack_threshold) {
        return Err(GcError::BadThreshold(opts.repack_threshold));
    }
    let mut report = GcReport { dry_run: opts.dry_run, ..Default::default() };
    let t_lock = Instant::now();
    // A dry run changes nothing and takes no lock: its figures are an
    // estimate if a checkpoint commits meanwhile.
    let writer = if opts.dry_run { None } else { Some(wait_writer(store, opts.wait)?) };
    report.lock_wait_ms = t_lock.elapsed().as_millis() as u64;
    let t0 = Instant::now();

    let gens = store.generations()?;
    let times: Vec<GenTime> = gens.iter().map(|g| GenTime { id: g.id, created_ms: g.created_ms }).collect();
    let decision = if gens.is_empty() { Decision::default() } else { opts.policy.apply(&times, now_ms())? };
    let kept: Vec<_> = gens.iter().filter(|g| decision.keep.contains_key(&g.id)).cloned().collect();
    report.kept = decision.keep.clone();
    report.forgotten = decision.forget.clone();

    let t_mark = Instant::now();
    let live = mark(store, &kept)?.live();
    report.mark_ms = t_mark.elapsed().as_millis() as u64;
    report.live_blobs = live.len() as u64;
    tracing::info!(kept = kept.len(), forget = decision.forget.len(), live = live.len(), ms = report.mark_ms, "mark done");

    let packs = store.pack_rows()?;
    // Unreferenced packs: files in the directory, or objects on S3.
    let orphans = if store.remote().is_some() { store.remote_orphan_packs()? } else { local_orphans(store)? };
    report.pack_bytes_before = packs.iter().map(|p| p.size).sum::<u64>() + orphans.iter().map(|o| o.1).sum::<u64>();

    let Some(writer) = writer else {
        estimate(store, &live, &packs, &orphans, opts.repack_threshold, &mut report)?;
        report.duration_ms = t0.elapsed().as_millis() as u64;
        return Ok(report);
    };
    pause("after-mark");

    let swept = writer.sweep(&decision.forget, &live)?;
    report.blobs_deleted = swept.blobs;
    report.blob_bytes_deleted = swept.blob_bytes;
    report.packs_deleted = swept.dead_packs.len() as u64;
    tracing::info!(generations = swept.generations, blobs = swept.blobs, packs = swept.dead_packs.len(), "catalog swept");
    pause("after-sweep");
    writer.remove_pack_files(&swept.dead_packs)?;
    let (n, _) = writer.remove_orphan_packs()?;
    // On S3 the unreferenced objects go in `publish`, after the catalog.
    report.orphans_deleted = if store.remote().is_some() { orphans.len() as u64 } else { n };

    if opts.repack_threshold > 0.0 {
        let cands = writer.repack_candidates(opts.repack_threshold)?;
        if !cands.is_empty() {
            let rows: Vec<PackRow> = cands.into_iter().map(|c| c.0).collect();
            let r = writer.repack_write(&rows)?;
            pause("after-repack-write");
            let old = writer.repack_commit(&r)?;
            pause("after-repack-commit");
            writer.remove_pack_files(&old)?;
            report.packs_repacked = r.old_packs() as u64;
            report.packs_written = r.new_packs() as u64;
            tracing::info!(old = r.old_packs(), old_bytes = r.old_bytes(), new = r.new_packs(), new_bytes = r.new_bytes(), "repacked");
        }
    }
    if store.remote().is_some() {
        publish(&writer)?;
    }
    let after = store.pack_rows()?.iter().map(|p| p.size).sum::<u64>()
        + if store.remote().is_some() { store.remote_orphan_packs()? } else { local_orphans(store)? }.iter().map(|o| o.1).sum::<u64>();
    report.pack_bytes_after = after;
    report.bytes_freed = report.pack_bytes_before.saturating_sub(after);
    if let Err(e) = store.checkpoint_wal() {
        tracing::debug!(error = %e, "could not fold the catalog's write-ahead log");
    }
    report.duration_ms = t0.elapsed().as_millis() as u64;
    tracing::info!(forgotten = report.forgotten.len(), bytes_freed = report.bytes_freed, ms = report.duration_ms, "gc done");
    drop(writer);
    Ok(report)
}

/// For an `s3://` store, after the cache's catalog was swept and
/// repacked: upload the new packs, then the catalog, and only then delete
/// from S3 the packs it no longer names. A kill at any point leaves S3 with
/// a catalog whose every pack is there (the old one until the upload, the
/// new one after); what is left unreferenced, the next gc deletes.
fn publish(writer: &Writer) -> Result<()> {
    let (n, bytes) = writer.upload_missing_packs()?;
    tracing::info!(packs = n, bytes, "new packs uploaded to S3");
    pause("after-upload-packs");
    writer.upload_catalog()?;
    tracing::info!("catalog uploaded to S3");
    pause("after-upload-catalog");
    let dead = writer.remote_orphan_packs()?;
    if let Some((first, rest)) = dead.split_first() {
        writer.remove_remote_packs(std::slice::from_ref(first))?;
        pause("mid-remote-delete");
        writer.remove_remote_packs(rest)?;
    }
    tracing::info!(packs = dead.len(), bytes = dead.iter().map(|d| d.1).sum::<u64>(), "unreferenced packs deleted from S3");
    Ok(())
}

/// Pack files of a local store (or an S3 store's cache) that the catalog
/// does not name, by name.
fn local_orphans(store: &Store) -> Result<Vec<(String, u64)>> {
    Ok(store
        .orphan_packs()?
        .into_iter()
        .map(|(p, n)| (p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(), n))
        .collect())
}

/// Fill in the dry-run figures: what a sweep and repack would free.
fn estimate(store: &Store, live: &HashSet<Hash>, packs: &[PackRow], orphans: &[(String, u64)], threshold: f64, report: &mut GcReport) -> Result<()> {
    let mut live_bytes: HashMap<i64, (u64, u64)> = HashMap::new(); // clen, count
    // The catalog's rows are by stored address.
    let live: HashSet<Hash> = live.iter().map(|h| store.address(h)).collect();
    for b in store.blob_rows()? {
        if live.contains(&b.hash) {
            let e = live_bytes.entry(b.pack_id).or_default();
            e.0 += b.clen as u64;
            e.1 += 1;
        } else {
            report.blobs_deleted += 1;
            report.blob_bytes_deleted += b.clen as u64;
        }
    }
    let mut after = 0u64;
    let mut repack_live = (0u64, 0u64);
    for p in packs {
        match live_bytes.get(&p.id) {
            None => report.packs_deleted += 1,
            Some(&(l, n)) if threshold > 0.0 && (l as f64) / (p.data_bytes().max(1) as f64) < threshold => {
                report.packs_repacked += 1;
                repack_live.0 += l;
                repack_live.1 += n;
            }
            Some(_) => after += p.size,
        }
    }
    if report.packs_repacked > 0 {
        report.packs_written = 1;
        after += 8 + repack_live.0 + repack_live.1 * ckpt_store::pack::ENTRY_LEN as u64 + ckpt_store::pack::TAIL_LEN as u64;
    }
    report.orphans_deleted = orphans.len() as u64;
    report.pack_bytes_after = after;
    report.bytes_freed = report.pack_bytes_before.saturating_sub(after);
    Ok(())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}
