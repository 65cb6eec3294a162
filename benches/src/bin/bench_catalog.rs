//! The catalog at scale: a store grown to `--blobs` blobs (default 10
//! million: 38 GiB of memory at 4 KiB chunks, 26 million rows are 100 GiB)
//! in generations of `--batch` new blobs each (262,144: one full
//! checkpoint of 1 GiB), timing every commit; then, at full size: the
//! commit of a 1% incremental (2,621 new blobs), opening a writer (which
//! loads the known set), dedup lookups in the writer's memory and in
//! SQLite, reading blobs by hash, and gc's sweep of one generation.
//! The blobs are 16 bytes each (unique): the figures are those of the
//! catalog, not of compression or the disk.
//!
//! Run: `cargo build --release -p ckpt-benches && target/release/bench-catalog [--blobs 10000000] [--batch 262144]`.

use std::collections::HashSet;
use std::time::Instant;

use ckpt_store::{BlobKind, Hash, NewGeneration, Store};

fn gen_of(manifest: Hash, parent: Option<u64>) -> NewGeneration {
    NewGeneration { parent, created_ms: 0, duration_ms: 0, nprocs: 1, logical_bytes: 0, dirty_tracking: "bench".into(), manifest, info: serde_json::Value::Null }
}

fn blob(i: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&i.to_le_bytes());
    b[8..].copy_from_slice(&(!i).to_le_bytes());
    b
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let opt = |name: &str, def: u64| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(def);
    let total = opt("--blobs", 10_000_000);
    let batch = opt("--batch", 262_144);
    let dir = std::env::temp_dir().join(format!("ckpt-bench-catalog-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = Store::open_or_create(dir.to_str().unwrap(), 4096).unwrap();
    let w = store.writer().unwrap();
    let mut next = 0u64;
    let mut parent = None;
    let mut commits: Vec<(u64, f64, f64)> = Vec::new(); // (blobs before, put s, commit s)
    let mut gen_blobs: Vec<(u64, u64)> = Vec::new(); // (first, end) of each generation's blobs
    while next < total {
        let n = batch.min(total - next);
        let t = Instant::now();
        for i in next..next + n {
            let b = blob(i);
            w.put(BlobKind::Chunk, Hash::of(&b), &b).unwrap();
        }
        let m = w.put_meta(format!("manifest {next}").as_bytes()).unwrap();
        let put = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let g = w.commit(gen_of(m, parent)).unwrap();
        commits.push((next, put, t.elapsed().as_secs_f64()));
        gen_blobs.push((next, next + n));
        eprintln!("{} blobs: commit of {n} in {:.3} s", next + n, commits.last().unwrap().2);
        parent = Some(g.id);
        next += n;
    }
    // A 1% incremental at full size.
    let small = (batch / 100).max(1);
    let mut small_commits = Vec::new();
    for _ in 0..3 {
        for i in next..next + small {
            let b = blob(i);
            w.put(BlobKind::Chunk, Hash::of(&b), &b).unwrap();
        }
        let m = w.put_meta(format!("manifest {next}").as_bytes()).unwrap();
        let t = Instant::now();
        let g = w.commit(gen_of(m, parent)).unwrap();
        small_commits.push(t.elapsed().as_secs_f64() * 1000.0);
        gen_blobs.push((next, next + small));
        parent = Some(g.id);
        next += small;
    }
    let empty_m = w.put_meta(b"idle").unwrap();
    let t = Instant::now();
    let g = w.commit(gen_of(empty_m, parent)).unwrap();
    let idle_commit = t.elapsed().as_secs_f64() * 1000.0;
    parent = Some(g.id);
    let _ = parent;
    drop(w);
    // The next writer of the same store takes the set the last one handed
    // over (store/src/known_cache.rs); the first writer of a store just
    // opened (a new coordinator's) loads every hash.
    let t = Instant::now();
    let w = store.writer().unwrap();
    let next_writer = t.elapsed().as_secs_f64();
    drop(w);
    let t = Instant::now();
    let fresh = Store::open(dir.to_str().unwrap()).unwrap();
    let w = fresh.writer().unwrap();
    let open_writer = t.elapsed().as_secs_f64();
    drop(w);
    drop(fresh);
    let w = store.writer().unwrap();
    // Dedup lookups: the writer's in-memory set, then SQLite.
    let probes: Vec<Hash> = (0..1_000_000u64).map(|k| Hash::of(&blob(k.wrapping_mul(7919) % next))).collect();
    let t = Instant::now();
    let hits = probes.iter().filter(|h| w.known(h)).count();
    let known_ns = t.elapsed().as_secs_f64() * 1e9 / probes.len() as f64;
    assert_eq!(hits, probes.len());
    let t = Instant::now();
    for h in &probes[..100_000] {
        assert!(store.contains(h).unwrap());
    }
    let contains_us = t.elapsed().as_secs_f64() * 1e6 / 100_000.0;
    let t = Instant::now();
    let mut nread = 0usize;
    store.read_blobs(&probes[..100_000], |_, _| Ok(())).unwrap();
    nread += 100_000;
    let read_us = t.elapsed().as_secs_f64() * 1e6 / nread as f64;
    // gc: sweep the first generation (its blobs are dead, the rest live).
    let gens = store.generations().unwrap();
    let mut live: HashSet<Hash> = HashSet::with_capacity(next as usize);
    for (&(a, b), g) in gen_blobs.iter().zip(&gens).skip(1) {
        live.extend((a..b).map(|i| Hash::of(&blob(i))));
        live.insert(g.manifest);
    }
    live.insert(gens.last().unwrap().manifest);
    let t = Instant::now();
    let swept = w.sweep(&[gens[0].id], &live).unwrap();
    let sweep = t.elapsed().as_secs_f64();
    let db = std::fs::metadata(store.catalog_path()).map(|m| m.len()).unwrap_or(0);
    drop(w);
    let _ = std::fs::remove_dir_all(&dir);

    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    println!("## The catalog at scale (bench-catalog)\n");
    println!("{} cores, Linux {kernel}; {total} blobs in generations of {batch}, catalog {:.0} MB at the end.\n", rayon::current_num_threads(), db as f64 / 1e6);
    println!("| blobs in the store before | commit of {batch} new blobs s | puts s (16-byte blobs: hashing, packing) |\n|---|---|---|");
    let show: Vec<usize> = {
        let n = commits.len();
        let mut v = vec![0, 1, n / 4, n / 2, 3 * n / 4, n.saturating_sub(1)];
        v.sort_unstable();
        v.dedup();
        v.into_iter().filter(|&i| i < n).collect()
    };
    for i in show {
        let (before, put, commit) = commits[i];
        println!("| {before} | {commit:.3} | {put:.3} |");
    }
    println!("\n| at {next} blobs | figure |\n|---|---|");
    small_commits.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!("| commit of a 1% incremental ({small} new blobs), median of 3 | {:.1} ms |", small_commits[1]);
    println!("| commit of an idle generation (one new blob) | {idle_commit:.1} ms |");
    println!("| open the store and its first writer (loads every hash into memory) | {open_writer:.2} s |");
    println!("| the next writer of the same store (the set handed over) | {:.1} ms |", next_writer * 1000.0);
    println!("| dedup lookup in the writer's memory | {known_ns:.0} ns |");
    println!("| dedup lookup in SQLite (Store::contains) | {contains_us:.1} µs |");
    println!("| read_blobs, per blob of 100,000 random | {read_us:.1} µs |");
    println!("| gc sweep of one generation ({} dead blobs, {} live) | {sweep:.2} s |", swept.blobs, live.len());
    ckpt_benches::figure(&format!("catalog at {next} blobs: commit of a 1% incremental"), small_commits[1], "ms", None, None);
    ckpt_benches::figure(&format!("catalog at {next} blobs: open a writer"), open_writer, "s", None, None);
    ckpt_benches::figure(&format!("catalog at {next} blobs: dedup lookup in SQLite"), contains_us, "µs", None, None);
    ckpt_benches::figure(&format!("catalog at {next} blobs: gc sweep of one generation"), sweep, "s", None, None);
}
