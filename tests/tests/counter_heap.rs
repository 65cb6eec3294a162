//! counter_heap: a 256 MiB heap, anonymous and private file mappings,
//! brk heap churn and vDSO clocks survive checkpoint/restart cycles.
mod common;
use common::*;

#[test]
fn counter_heap_checkpoint_restart_cycle() {
    let c = Cycle::new(program("counter_heap"), &["-t", "100", "-m", "256"]);
    standard_cycle("counter_heap", &c);
}

/// Issue 2, "Done when": the second checkpoint of an idle 256 MiB program
/// stores (almost) no new bytes. Then the idle program restarts fine.
#[test]
fn idle_256mib_second_checkpoint_stores_almost_nothing() {
    let s = Session::new("counter_heap_idle");
    let stop = s.stop_file();
    let mut p = s.launch(&program("counter_heap"), &["-t", "100", "-m", "256", "-i", "-s", stop.to_str().unwrap()]);
    let pid = p.pid;
    p.wait_prefix("READY", LINE_TIMEOUT);
    p.wait_ticks(2, LINE_TIMEOUT);
    let g1 = s.checkpoint_bounded(&mut p);
    p.wait_ticks(3, LINE_TIMEOUT);
    let g2 = s.checkpoint_bounded(&mut p);
    let gens = s.generations();
    let j1 = gens.get(&g1.id).unwrap_or_else(|| panic!("no generation {} in log: {gens:?}", g1.id));
    let j2 = gens.get(&g2.id).unwrap_or_else(|| panic!("no generation {} in log: {gens:?}", g2.id));
    let (l1, n1) = (j1.u64_field("logical_bytes"), j1.u64_field("new_bytes"));
    let (l2, n2) = (j2.u64_field("logical_bytes"), j2.u64_field("new_bytes"));
    eprintln!("gen {}: logical {l1} new {n1}; gen {}: logical {l2} new {n2}", g1.id, g2.id);
    assert!(l1 >= 256 << 20, "first generation's logical_bytes {l1} < 256 MiB");
    assert!(l2 >= 256 << 20, "second generation's logical_bytes {l2} < 256 MiB");
    assert!(n1 >= 200 << 20, "first generation stored only {n1} new bytes of a 256 MiB random heap");
    assert!(n2 * 100 < n1, "idle program's second checkpoint stored {n2} new bytes, not < 1% of {n1}");
    assert_eq!(j2.u64_field("parent"), g1.id, "second generation's parent");
    p.kill9();
    let mut r = s.restart_expect(&g2, pid, true);
    r.wait_ticks(3, LINE_TIMEOUT);
    r.finish(&s, 3);
}

/// The codecs of a store's blobs, from its packs' trailers (an unsealed
/// store's: a sealed blob's codec is inside its ciphertext): (raw, zstd,
/// lz4) counts; any other blob fails the test.
fn blob_codecs(store_dir: &std::path::Path) -> (usize, usize, usize) {
    let (mut raw, mut zstd, mut lz4) = (0, 0, 0);
    let mut dirs = vec![store_dir.join("packs")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
                continue;
            }
            let b = std::fs::read(&p).unwrap();
            let entries = ckpt_store::pack::parse_index(&b).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            for (i, e) in entries.iter().enumerate() {
                let (clen, ulen) = (e.clen as usize, e.ulen as usize);
                let blob = &b[e.offset as usize..e.offset as usize + clen];
                if clen == ulen {
                    raw += 1;
                } else if blob.starts_with(&ckpt_chunker::ZSTD_MAGIC) {
                    zstd += 1;
                } else if blob.starts_with(&ckpt_chunker::LZ4_MAGIC) {
                    lz4 += 1;
                } else {
                    panic!("{}: blob {i} is neither raw, zstd nor lz4: {:02x?}", p.display(), &blob[..blob.len().min(8)]);
                }
            }
        }
    }
    (raw, zstd, lz4)
}

/// Issue 13: a store made with `--compression lz4` (sealed, as stores are
/// by default) checkpoints and restarts the program, whose own check of
/// its 256 MiB heap, mappings and counters passes after each restart.
#[test]
fn lz4_store_checkpoint_restart_cycle() {
    let s = Session::new("counter_heap_lz4");
    let out = s.run("store", &["init", "--compression", "lz4", "--store", &s.store]);
    ok(&out, "ckpt store init --compression lz4");
    let out = s.run("store", &["compression", "--store", &s.store]);
    assert_eq!(ok(&out, "ckpt store compression").trim(), "lz4");
    let c = Cycle::new(program("counter_heap"), &["-t", "100", "-m", "256"]);
    standard_cycle_in(s, &c);
}

/// Issue 13: an old zstd store (made before stores had a codec: no
/// `meta.compression`) is written on, its codec is then changed to lz4
/// while its coordinator runs, and the next checkpoint stores the changed
/// pages as LZ4 next to the old zstd blobs: both generations restart, the
/// newer from blobs of both codecs, the program checking its state.
#[test]
fn store_with_zstd_and_lz4_blobs_restarts() {
    let s = Session::new("counter_heap_mixed");
    let unsealed = [("CKPT_UNSEALED", "1")];
    let mut init = s.cmd("store");
    init.args(["init", "--compression", "zstd", "--store", &s.store]).envs(unsealed);
    ok(&run_with_timeout(init, CMD_TIMEOUT), "ckpt store init --compression zstd");
    // As a store made by a ckpt before codecs: no meta.compression.
    let db = ckpt_store::rusqlite::Connection::open(s.store_dir.join("catalog.db")).unwrap();
    assert_eq!(db.execute("DELETE FROM meta WHERE key = 'compression'", []).unwrap(), 1);
    drop(db);
    let out = s.run("store", &["compression", "--store", &s.store]);
    assert_eq!(ok(&out, "ckpt store compression").trim(), "zstd", "a store without meta.compression is zstd");

    let stop = s.stop_file();
    let mut p = s.launch_env(&program("counter_heap"), &["-t", "100", "-m", "64", "-s", stop.to_str().unwrap()], &unsealed);
    let pid = p.pid;
    p.wait_prefix("READY", LINE_TIMEOUT);
    p.wait_ticks(2, LINE_TIMEOUT);
    let g1 = s.checkpoint_bounded(&mut p);
    let (_, z1, l1) = blob_codecs(&s.store_dir);
    assert!(z1 > 100 && l1 == 0, "the zstd store's first generation: {z1} zstd blobs, {l1} lz4");

    let out = s.run("store", &["compression", "lz4", "--store", &s.store]);
    ok(&out, "ckpt store compression lz4");
    // The program changes pages every tick (its heap's are hash-like,
    // stored raw; its brk blocks and manifests compress): the next
    // checkpoint stores some.
    p.wait_ticks(5, LINE_TIMEOUT);
    let g2 = s.checkpoint_bounded(&mut p);
    let (_, z2, l2) = blob_codecs(&s.store_dir);
    assert!(z2 == z1 && l2 > 0, "after the codec's change: {z2} zstd blobs (were {z1}), {l2} lz4");
    p.wait_ticks(1, LINE_TIMEOUT);
    p.kill9();
    s.assert_restores(g1.id);
    s.assert_restores(g2.id);
    let out = s.run("verify", &["--store", &s.store]);
    ok(&out, "ckpt verify of a store with both codecs' blobs");

    let mut r = s.restart_expect(&g2, pid, true);
    r.wait_ticks(3, LINE_TIMEOUT);
    r.kill9();
    let mut r = s.restart_expect(&g1, pid, false);
    r.wait_ticks(3, LINE_TIMEOUT);
    r.finish(&s, 3);
}
