//! Issue 3, "Tests", first bullet: every dirty-tracking backend this kernel
//! has (uffd-wp, scan; soft-dirty is tested in a VM) captures memory that
//! changes in every way between checkpoints (`mem_churn`: random and
//! sequential page writes, mremap moves and in-place grow/shrink,
//! munmap + mmap at the same address, MAP_FIXED over a mapping, mprotect
//! runs incl. PROT_NONE holding data, MADV_DONTNEED, new mappings every
//! tick, brk up and down, a thread writing all the time). A chain of
//! incremental generations is taken; every one of them is restarted and must
//! verify all of its memory (the program checks every page every tick) and
//! print, tick for tick, the same state checksum as the original run.
//!
//! `CKPT_DIRTY_BACKENDS=soft-dirty` (comma-separated) runs the chain for
//! other backends too (the VM test), `CKPT_DIRTY_GENERATIONS=N` sets the
//! chain's length (default 10).
mod common;
use common::*;
use std::collections::BTreeMap;
use std::time::Instant;

const TICK_MS: &str = "50";

fn churn_args(stop: &str) -> Vec<String> {
    ["-t", TICK_MS, "-m", "64", "-S", "3", "-s", stop].iter().map(|s| s.to_string()).collect()
}

/// The same churn with 1/20 of the heap's random page writes (for byte counts).
fn light_churn_args(stop: &str) -> Vec<String> {
    let mut v = churn_args(stop);
    v.extend(["-d".to_string(), "20".to_string()]);
    v
}

/// `sum=` of every TICK line seen so far, by tick.
fn sums(p: &Proc, into: &mut BTreeMap<u64, String>) {
    for l in &p.lines {
        let Some(rest) = l.strip_prefix("TICK ") else { continue };
        let mut it = rest.split_whitespace();
        let n: u64 = it.next().unwrap().parse().unwrap();
        if let Some(s) = it.find_map(|w| w.strip_prefix("sum=")) {
            into.insert(n, s.to_string());
        }
    }
}

/// The restored run's checksums must be the original's at the same ticks.
fn same_sums(what: &str, p: &Proc, reference: &BTreeMap<u64, String>) {
    let mut mine = BTreeMap::new();
    sums(p, &mut mine);
    let mut compared = 0;
    for (t, s) in &mine {
        if let Some(r) = reference.get(t) {
            assert_eq!(s, r, "{what}: tick {t} state checksum {s} differs from the original run's {r}\n{}", p.context());
            compared += 1;
        }
    }
    assert!(compared > 0 || mine.is_empty(), "{what}: no tick to compare with the original run\n{}", p.context());
}

struct GenInfo {
    tracking: String,
    read_bytes: u64,
    downtime_ms: f64,
    forked: Option<bool>,
    /// Its changed pages were copied out while it was stopped (no fork).
    copied: bool,
    /// How many bytes were.
    copied_bytes: u64,
}

fn gen_info(s: &Session, id: u64) -> GenInfo {
    let gens = s.generations();
    let g = gens.get(&id).unwrap_or_else(|| panic!("no generation {id} in ckpt log: {gens:?}"));
    let tracking = g.get("dirty_tracking").and_then(Json::as_str).unwrap_or_else(|| panic!("generation {id} has no dirty_tracking: {g:?}")).to_string();
    let info = g.get("info").unwrap_or_else(|| panic!("generation {id} has no info: {g:?}"));
    let procs = info.get("processes").and_then(Json::as_array).unwrap_or_else(|| panic!("generation {id}: no info.processes: {g:?}"));
    assert_eq!(procs.len(), 1, "generation {id}: one process expected: {g:?}");
    GenInfo {
        tracking,
        read_bytes: procs[0].u64_field("read_bytes"),
        downtime_ms: info.get("downtime_ms").and_then(Json::as_f64).unwrap_or(f64::NAN),
        forked: procs[0].get("forked").and_then(|v| if let Json::Bool(b) = v { Some(*b) } else { None }),
        copied: procs[0].get("copied").and_then(|v| if let Json::Bool(b) = v { Some(*b) } else { None }).unwrap_or(false),
        copied_bytes: procs[0].get("stopped_work").map_or(0, |w| w.u64_field("copied_bytes")),
    }
}

fn chain_len() -> usize {
    std::env::var("CKPT_DIRTY_GENERATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(10)
}

/// Launch with `opts`; checkpoint `n` times while the program churns; kill;
/// restart every generation (newest first), each verifying >= 2 ticks with
/// the original's checksums; the oldest runs to DONE. Returns the session
/// and the generations.
fn chain(name: &str, backend: &str, opts: &[&str]) -> (Session, Vec<Gen>) {
    let t0 = Instant::now();
    let s = Session::new(name);
    let stop = s.stop_file();
    let args = churn_args(stop.to_str().unwrap());
    let args: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
    let prog = program("mem_churn");
    let mut p = s.launch_opts(opts, &prog, &args, &[]);
    let pid = p.pid;
    p.wait_prefix("READY", LINE_TIMEOUT);
    p.wait_ticks(2, LINE_TIMEOUT);
    let mut gens = Vec::new();
    for _ in 0..chain_len() {
        gens.push(s.checkpoint_bounded(&mut p));
        p.wait_ticks(1, LINE_TIMEOUT);
    }
    p.kill9();
    let mut reference = BTreeMap::new();
    sums(&p, &mut reference);
    let t_chain = t0.elapsed();

    // What the log says about the chain.
    let infos: Vec<GenInfo> = gens.iter().map(|g| gen_info(&s, g.id)).collect();
    for (g, i) in gens.iter().zip(&infos) {
        eprintln!(
            "[{name}] generation {}: dirty_tracking {} read {:.1} MiB downtime {:.1} ms forked {:?} copied {}",
            g.id,
            i.tracking,
            i.read_bytes as f64 / 1048576.0,
            i.downtime_ms,
            i.forked,
            i.copied
        );
        assert_eq!(i.tracking, backend, "generation {} records dirty_tracking {:?}, asked for {backend}", g.id, i.tracking);
        let fork_expected = !opts.contains(&"--no-fork-ckpt");
        // A round that may fork copies the changed pages out instead
        // when they are few; one that may not does neither.
        if let Some(f) = i.forked {
            assert_eq!(f || i.copied, fork_expected, "generation {}: forked {f}, copied {}, launched with {opts:?}", g.id, i.copied);
            assert!(!(f && i.copied), "generation {}: both forked and copied", g.id);
        }
    }

    // Restart every generation, newest first; the oldest runs to DONE.
    let t1 = Instant::now();
    for (k, g) in gens.iter().enumerate().rev() {
        let mut r = s.restart_expect(g, pid, false);
        r.wait_ticks(2, LINE_TIMEOUT);
        if k == 0 {
            r.finish(&s, 3);
        } else {
            r.kill9();
        }
        same_sums(&format!("[{name}] restart of generation {}", g.id), &r, &reference);
        assert!(r.lines.iter().all(|l| !l.starts_with("FAIL")));
    }
    eprintln!("[{name}] chain of {} generations in {:.1?}, restarts in {:.1?}", gens.len(), t_chain, t1.elapsed());
    (s, gens)
}

/// uffd-wp: later generations read a fraction of the first's bytes.
fn assert_incremental(s: &Session, gens: &[Gen]) {
    let reads: Vec<u64> = gens.iter().map(|g| gen_info(s, g.id).read_bytes).collect();
    let first = reads[0];
    assert!(first >= 40 << 20, "first generation read only {first} bytes of a 64 MiB heap with 48 MiB written");
    let mut later = reads[1..].to_vec();
    later.sort();
    let median = later[later.len() / 2];
    assert!(
        median * 3 < first && later.iter().all(|&r| r * 3 < first * 2),
        "incremental generations do not read well below the first: first {first}, later {:?}",
        &reads[1..]
    );
}

#[test]
fn uffd_wp_chain_every_generation_restarts() {
    chain("dirty_uffd_wp", "uffd-wp", &["--dirty-tracking", "uffd-wp"]);
}

#[test]
fn uffd_wp_no_fork_chain_every_generation_restarts() {
    chain("dirty_uffd_nofork", "uffd-wp", &["--dirty-tracking", "uffd-wp", "--no-fork-ckpt"]);
}

/// The incremental part is real: with uffd-wp, generations after the first
/// read well below the first's bytes, before and after a restart (the
/// first checkpoint of a restored program reads everything again).
#[test]
fn uffd_wp_later_generations_read_less() {
    let s = Session::new("dirty_uffd_reads");
    let stop = s.stop_file();
    let args = light_churn_args(stop.to_str().unwrap());
    let args: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
    let mut p = s.launch_opts(&["--dirty-tracking", "uffd-wp"], &program("mem_churn"), &args, &[]);
    let pid = p.pid;
    p.wait_prefix("READY", LINE_TIMEOUT);
    p.wait_ticks(2, LINE_TIMEOUT);
    let mut before = Vec::new();
    for _ in 0..4 {
        before.push(s.checkpoint_bounded(&mut p));
    }
    p.kill9();
    let mut r = s.restart_expect(before.last().unwrap(), pid, true);
    r.wait_ticks(2, LINE_TIMEOUT);
    let mut after = Vec::new();
    for _ in 0..4 {
        after.push(s.checkpoint_bounded(&mut r));
    }
    r.finish(&s, 2);
    for g in before.iter().chain(&after) {
        let i = gen_info(&s, g.id);
        eprintln!("[dirty_uffd_reads] generation {}: read {:.1} MiB downtime {:.1} ms copied {}", g.id, i.read_bytes as f64 / 1048576.0, i.downtime_ms, i.copied);
    }
    assert_incremental(&s, &before);
    assert_incremental(&s, &after);
}

/// A large heap with a few pages changed between checkpoints: the changed
/// pages are copied out while the program is stopped (no snapshot fork),
/// and a restart of such a generation passes the program's own check of
/// its whole heap, every tick to the end.
#[test]
fn copied_out_generations_restart() {
    let s = Session::new("dirty_copied");
    let stop = s.stop_file();
    let mut p = s.launch_opts(&["--dirty-tracking", "uffd-wp"], &program("counter_heap"), &["-m", "128", "-t", "200", "-s", stop.to_str().unwrap()], &[]);
    let pid = p.pid;
    p.wait_prefix("READY", LINE_TIMEOUT);
    p.wait_ticks(2, LINE_TIMEOUT);
    let gens: Vec<Gen> = (0..4).map(|_| s.checkpoint_bounded(&mut p)).collect();
    let copied: Vec<bool> = gens.iter().map(|g| gen_info(&s, g.id).copied).collect();
    assert!(!copied[0], "the first generation reads everything: it cannot be copied out");
    // The later rounds change a few pages of 32768 (at most 1 in 32 is copied).
    let Some(k) = (1..gens.len()).rev().find(|&k| copied[k]) else {
        panic!("no incremental generation of a 128 MiB heap with a few pages changed was copied out: {copied:?}")
    };
    p.kill9();
    let mut r = s.restart_expect(&gens[k], pid, k == gens.len() - 1);
    r.wait_ticks(3, LINE_TIMEOUT);
    r.finish(&s, 3);
}

/// The same with megabytes changed between checkpoints (64 heap pages and
/// more a tick, a few ticks: under the one page in 32 of a 512 MiB heap
/// that is copied rather than forked): the copy while stopped begins under the scan and is
/// shared by two threads (engine/src/stopcopy.rs; its own thread starts
/// past 1 MiB), and a restart of such a generation passes the program's
/// own check of its whole heap, every tick to the end.
#[test]
fn copied_out_by_two_threads_restarts() {
    let s = Session::new("dirty_copied2");
    let stop = s.stop_file();
    let mut p = s.launch_opts(&["--dirty-tracking", "uffd-wp"], &program("counter_heap"), &["-m", "512", "-t", "10", "-s", stop.to_str().unwrap()], &[]);
    let pid = p.pid;
    p.wait_prefix("READY", LINE_TIMEOUT);
    p.wait_ticks(2, LINE_TIMEOUT);
    let mut gens = vec![s.checkpoint_bounded(&mut p)];
    for _ in 0..3 {
        p.wait_ticks(4, LINE_TIMEOUT);
        gens.push(s.checkpoint_bounded(&mut p));
    }
    let infos: Vec<GenInfo> = gens.iter().map(|g| gen_info(&s, g.id)).collect();
    let seen: Vec<(bool, u64, u64)> = infos.iter().map(|i| (i.copied, i.copied_bytes, i.read_bytes)).collect();
    let Some(k) = (1..gens.len()).rev().find(|&k| infos[k].copied && infos[k].copied_bytes >= 2 << 20) else {
        panic!("no generation of a 512 MiB heap with a few ticks of changes was copied out with over 2 MiB (copied, bytes copied, bytes read): {seen:?}")
    };
    p.kill9();
    let mut r = s.restart_expect(&gens[k], pid, k == gens.len() - 1);
    r.wait_ticks(3, LINE_TIMEOUT);
    r.finish(&s, 3);
}

#[test]
fn scan_chain_every_generation_restarts() {
    chain("dirty_scan", "scan", &["--dirty-tracking", "scan"]);
}

/// Other backends named in `CKPT_DIRTY_BACKENDS` (e.g. `soft-dirty` in the
/// VM); nothing by default.
#[test]
fn extra_backends_chain() {
    let Ok(list) = std::env::var("CKPT_DIRTY_BACKENDS") else { return };
    for b in list.split(',').map(str::trim).filter(|b| !b.is_empty()) {
        let (s, gens) = chain(&format!("dirty_{b}"), b, &["--dirty-tracking", b]);
        if b != "scan" {
            assert_incremental(&s, &gens);
        }
    }
}

/// Tracking after a restart: restart, checkpoint the restored program three
/// times (the first one reads everything again, the next ones only what
/// changed), then restart each of those.
fn after_restart(name: &str, backend: &str, opts: &[&str]) {
    let s = Session::new(name);
    let stop = s.stop_file();
    let args = churn_args(stop.to_str().unwrap());
    let args: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
    let mut p = s.launch_opts(opts, &program("mem_churn"), &args, &[]);
    let pid = p.pid;
    p.wait_prefix("READY", LINE_TIMEOUT);
    p.wait_ticks(2, LINE_TIMEOUT);
    let g1 = s.checkpoint_bounded(&mut p);
    p.wait_ticks(1, LINE_TIMEOUT);
    let g2 = s.checkpoint_bounded(&mut p);
    p.wait_ticks(1, LINE_TIMEOUT);
    p.kill9();
    let mut reference = BTreeMap::new();
    sums(&p, &mut reference);

    let mut r = s.restart_expect(&g2, pid, false);
    r.wait_ticks(2, LINE_TIMEOUT);
    let mut after = Vec::new();
    for _ in 0..3 {
        after.push(s.checkpoint_bounded(&mut r));
        r.wait_ticks(1, LINE_TIMEOUT);
    }
    r.kill9();
    same_sums(&format!("[{name}] restart of generation {}", g2.id), &r, &reference);
    sums(&r, &mut reference);

    let infos: Vec<GenInfo> = [&g1, &g2].into_iter().chain(after.iter()).map(|g| gen_info(&s, g.id)).collect();
    for (g, i) in [&g1, &g2].into_iter().chain(after.iter()).zip(&infos) {
        eprintln!("[{name}] generation {}: dirty_tracking {} read {:.1} MiB downtime {:.1} ms", g.id, i.tracking, i.read_bytes as f64 / 1048576.0, i.downtime_ms);
        assert_eq!(i.tracking, backend, "generation {}: dirty_tracking", g.id);
    }

    for (k, g) in after.iter().enumerate().rev() {
        let mut r = s.restart_expect(g, pid, false);
        r.wait_ticks(2, LINE_TIMEOUT);
        if k == 0 {
            r.finish(&s, 2);
        } else {
            r.kill9();
        }
        same_sums(&format!("[{name}] restart of generation {}", g.id), &r, &reference);
    }
}

#[test]
fn uffd_wp_checkpoints_of_a_restarted_program() {
    after_restart("dirty_uffd_after_restart", "uffd-wp", &["--dirty-tracking", "uffd-wp"]);
}

#[test]
fn scan_checkpoints_of_a_restarted_program() {
    after_restart("dirty_scan_after_restart", "scan", &["--dirty-tracking", "scan"]);
}
