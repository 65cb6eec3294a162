//! Lazy restart (`ckpt restart --lazy`, issue 13): the program runs before
//! its memory is all in; the rest is served on fault and in the background
//! by the restart command. Proof of each restart is the program's own
//! check: counter_heap verifies every page of its heap, its sparse
//! mapping and its file mapping every tick.
mod common;
#[path = "common/s3.rs"]
mod s3srv;
use common::*;
use s3srv::S3Server;

use std::path::Path;
use std::time::{Duration, Instant};

const BUCKET: &str = "ckpt-lazy";

/// `ckpt restart --lazy [GEN]` in the background; the restored program is `pid`.
fn restart_lazy(s: &Session, generation: Option<u64>, pid: i32, s3: Option<(&S3Server, &Path)>) -> Proc {
    let mut c = s.cmd("restart");
    c.arg("--lazy");
    if let Some(g) = generation {
        c.arg(g.to_string());
    }
    if let Some((srv, cache)) = s3 {
        srv.apply(&mut c, cache);
    }
    let mut p = Proc::spawn(format!("restart --lazy {generation:?}"), c);
    p.pid = pid;
    s.track(pid);
    p
}

/// Waits until the restart command said the restart is lazy.
fn wait_lazy_notice(p: &mut Proc) {
    let deadline = Instant::now() + RESTART_TIMEOUT;
    while Instant::now() < deadline {
        if p.stderr().contains("ckpt: lazy restart:") {
            return;
        }
        std::thread::sleep(Duration::from_millis(20)); // polling another process's stderr
    }
    panic!("the restart did not say it is lazy\n{}", p.context());
}

/// A 256 MiB checked heap restarts lazily, runs, checks all of its memory
/// every tick (each page served on its first touch or by the background
/// fill), is checkpointed again (the checkpoint waits for the fill) and
/// that generation restarts eagerly with the same content.
#[test]
fn lazy_restart_of_a_checked_heap_then_checkpoint_and_restart_again() {
    let s = Session::new("lazy_heap");
    let stop = s.stop_file();
    let mut p = s.launch(&program("counter_heap"), &["-t", "100", "-m", "256", "-s", stop.to_str().unwrap()]);
    let pid = p.pid;
    p.wait_prefix("READY", LINE_TIMEOUT);
    p.wait_ticks(2, LINE_TIMEOUT);
    let g1 = s.checkpoint_bounded(&mut p);
    p.kill9();

    let mut r = restart_lazy(&s, None, pid, None);
    r.wait_ticks(1, RESTART_TIMEOUT);
    let first = r.first_tick.unwrap();
    assert!(first >= g1.lo && first <= g1.hi, "lazy restart continued at tick {first}, expected {}..={}\n{}", g1.lo, g1.hi, r.context());
    wait_lazy_notice(&mut r);
    assert!(!r.stderr().contains("not lazily"), "the restart fell back to an eager one\n{}", r.context());
    r.wait_ticks(3, LINE_TIMEOUT);

    // The next checkpoint sees all of the memory (it waits for the fill).
    let g2 = s.checkpoint_bounded(&mut r);
    r.wait_ticks(2, LINE_TIMEOUT);
    r.kill9();
    let mut e = s.restart_expect(&g2, pid, true);
    e.wait_ticks(3, LINE_TIMEOUT);
    e.finish(&s, 3);
}

/// A 1 GiB checked heap restarts lazily: its first tick after the restart
/// checks every page of it (each one served on its first touch, or already
/// in from the background fill), and so does every tick after; the next
/// checkpoint waits for the fill, and the program checks its heap again
/// before it runs to DONE. Proof is the program's own check only.
#[test]
fn lazy_restart_of_a_1_gib_heap_checks_all_of_it() {
    let s = Session::new("lazy_big");
    let stop = s.stop_file();
    let mut p = s.launch(&program("counter_heap"), &["-t", "100", "-m", "1024", "-s", stop.to_str().unwrap()]);
    let pid = p.pid;
    p.wait_prefix("READY", CMD_TIMEOUT);
    p.wait_ticks(1, CMD_TIMEOUT);
    let g = s.checkpoint_bounded(&mut p);
    p.kill9();

    let mut r = restart_lazy(&s, None, pid, None);
    r.wait_ticks(1, CMD_TIMEOUT);
    let first = r.first_tick.unwrap();
    assert!(first >= g.lo && first <= g.hi, "lazy restart continued at tick {first}, expected {}..={}\n{}", g.lo, g.hi, r.context());
    wait_lazy_notice(&mut r);
    assert!(!r.stderr().contains("not lazily"), "the restart fell back to an eager one\n{}", r.context());
    r.wait_ticks(2, CMD_TIMEOUT);
    let _g2 = s.checkpoint_bounded(&mut r);
    r.wait_ticks(2, CMD_TIMEOUT);
    r.finish(&s, 2);
}

/// The largest region of content not backed by a file (the heap) of the
/// first process of generation `generation` of `store`, and another region
/// that is not lazy (the one holding the stack pointer's thread frame is
/// not known here: any region with a file): (pid, heap, other).
fn heap_of(store: &ckpt_store::Store, generation: u64) -> (i32, (u64, u64), (u64, u64)) {
    let info = store.generation(generation).unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&store.read_blob(&info.manifest).unwrap()).unwrap();
    let image_hash: ckpt_store::Hash = serde_json::from_value(manifest["processes"][0]["image"].clone()).unwrap();
    let image: serde_json::Value = serde_json::from_slice(&store.read_blob(&image_hash).unwrap()).unwrap();
    let span = |r: &serde_json::Value| (r["start"].as_u64().unwrap(), r["end"].as_u64().unwrap());
    let regions = image["regions"].as_array().unwrap();
    let heap = regions.iter().filter(|r| r["file"].is_null() && r["segments"].as_array().is_some_and(|t| !t.is_empty())).max_by_key(|r| span(r).1 - span(r).0).expect("a region with content");
    let other = regions.iter().find(|r| !r["file"].is_null()).expect("a file-backed region");
    (image["pid"].as_i64().unwrap() as i32, span(heap), span(other))
}

/// A first-touched record body (the engine's format: magic, count, then
/// (pid i32, address u64) entries, little-endian).
fn touched_body(entries: &[(i32, u64)]) -> Vec<u8> {
    let mut b = b"CKPTTCH1".to_vec();
    b.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for (pid, a) in entries {
        b.extend_from_slice(&pid.to_le_bytes());
        b.extend_from_slice(&a.to_le_bytes());
    }
    b
}

/// The `key=value` field of the first stderr line holding `needle`.
fn log_field(err: &str, needle: &str, key: &str) -> Option<u64> {
    let l = err.lines().find(|l| l.contains(needle))?;
    let at = l.find(&format!("{key}="))? + key.len() + 1;
    l[at..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// `counter_heap -m MIB` launched on the session's S3 store (cache
/// `cache-a`), checkpointed after `ticks` ticks and killed: the generation,
/// the program's pid and its stop file.
fn checkpointed_on_s3(s: &Session, srv: &S3Server, mib: &str, ticks: u64) -> (Gen, i32, std::path::PathBuf) {
    let stop = s.stop_file();
    let mut p = srv.launch_counter(s, &s.path("cache-a"), mib, &stop);
    let pid = p.pid;
    p.wait_ticks(ticks, LINE_TIMEOUT);
    let g = s.checkpoint_bounded(&mut p);
    p.kill9();
    (g, pid, stop)
}

/// A lazy restart from S3 on a fresh host records the pages the program
/// touched first (the first-touched record of the generation, in the
/// store); the next lazy restart of that generation, on another fresh
/// host, prefetches them before the background fill, and the program's
/// own check of its whole heap every tick passes with the prefetch in
/// use. Fewer faults wait for a GET the second time.
#[test]
fn lazy_restart_from_s3_prefetches_what_the_last_one_touched_first() {
    let srv = S3Server::start();
    srv.create_bucket(BUCKET);
    let mut s = Session::new("lazy_prefetch");
    s.store = format!("s3://{BUCKET}/prefetch");
    let (g, pid, stop) = checkpointed_on_s3(&s, &srv, "64", 2);
    let _ = s.run("quit", &[]);

    let mut faults = Vec::new();
    for (round, cache) in [(1, "cache-b"), (2, "cache-c")] {
        let mut c = s.cmd("restart");
        c.args(["--lazy", &g.id.to_string()]).env("CKPT_LOG", "ckpt_engine=debug");
        srv.apply(&mut c, &s.path(cache));
        let mut r = Proc::spawn(format!("restart --lazy {} (round {round})", g.id), c);
        r.pid = pid;
        s.track(pid);
        r.wait_ticks(1, RESTART_TIMEOUT);
        let first = r.first_tick.unwrap();
        assert!(first >= g.lo && first <= g.hi, "lazy restart continued at tick {first}, expected {}..={}\n{}", g.lo, g.hi, r.context());
        wait_lazy_notice(&mut r);
        r.wait_ticks(3, LINE_TIMEOUT);
        s.stop_at(r.last_tick.unwrap() + 2);
        r.wait_line(|l| l == "DONE", LINE_TIMEOUT);
        let st = r.wait_exit(RESTART_TIMEOUT);
        assert!(st.success(), "restart round {round} failed\n{}", r.context());
        let err = r.stderr();
        let prefetched = log_field(&err, "prefetched the pages touched first", "chunks");
        match round {
            1 => {
                assert_eq!(prefetched, None, "the first restart found a record nobody wrote\n{err}");
                assert!(err.contains("wrote the first-touched record"), "the first restart wrote no record\n{err}");
            }
            _ => assert!(prefetched.is_some_and(|n| n > 0), "the second restart prefetched nothing\n{err}"),
        }
        faults.push(log_field(&err, "lazy fill done", "faults").unwrap_or_else(|| panic!("no fill report\n{err}")));
        let _ = s.run("quit", &[]);
        let _ = std::fs::remove_file(&stop);
    }
    eprintln!("faults served: {} without a record, {} with its prefetch", faults[0], faults[1]);
}

/// A first-touched record is hostile input. One that authenticates but
/// names pages outside the image (unknown PIDs, addresses outside every
/// region, in a region that is not lazy, not at a chunk's start, at the
/// top of the address space) keeps only its entries in the heap: the
/// prefetch reads those and nothing else. One whose bytes were edited does
/// not authenticate and is ignored with a warning. Either way the program's
/// own check of its whole heap passes (never a wrong page).
#[test]
fn a_forged_or_hostile_first_touched_record_is_refused_or_trimmed() {
    let s = Session::new("lazy_forged");
    let stop = s.stop_file();
    let mut p = s.launch(&program("counter_heap"), &["-t", "100", "-m", "32", "-s", stop.to_str().unwrap()]);
    let pid = p.pid;
    p.wait_prefix("READY", LINE_TIMEOUT);
    p.wait_ticks(1, LINE_TIMEOUT);
    let g = s.checkpoint_bounded(&mut p);
    p.kill9();

    let store = ckpt_store::Store::open(&s.store).unwrap();
    let (ipid, (hs, he), (os, _)) = heap_of(&store, g.id);
    assert_eq!(ipid, pid);
    let good = [hs, hs + 4096 * 7, he - 4096];
    let mut entries: Vec<(i32, u64)> = good.iter().map(|&a| (pid, a)).collect();
    entries.extend([(pid + 1, hs), (pid, he), (pid, hs + 1), (pid, os), (pid, u64::MAX - 4095), (pid, 0), (-1, hs)]);
    let info = store.generation(g.id).unwrap();
    store.put_touched(&info, &touched_body(&entries)).unwrap();
    let record = store.root().join(format!("touched/{}.rec", g.id));
    assert!(record.is_file(), "the record is not where the store keeps it: {}", record.display());

    for round in ["hostile", "edited"] {
        if round == "edited" {
            let mut b = std::fs::read(&record).unwrap();
            b[20] ^= 0x10;
            std::fs::write(&record, &b).unwrap();
        }
        let mut c = s.cmd("restart");
        c.args(["--lazy", &g.id.to_string()]).env("CKPT_LOG", "ckpt_engine=debug");
        let mut r = Proc::spawn(format!("restart --lazy ({round} record)"), c);
        r.pid = pid;
        s.track(pid);
        r.wait_ticks(1, RESTART_TIMEOUT);
        wait_lazy_notice(&mut r);
        r.wait_ticks(3, LINE_TIMEOUT);
        s.stop_at(r.last_tick.unwrap() + 2);
        r.wait_line(|l| l == "DONE", LINE_TIMEOUT);
        let st = r.wait_exit(RESTART_TIMEOUT);
        assert!(st.success(), "restart with the {round} record failed\n{}", r.context());
        let err = r.stderr();
        match round {
            "hostile" => {
                assert_eq!(log_field(&err, "prefetched the pages touched first", "entries"), Some(good.len() as u64), "the prefetch kept entries outside the heap\n{err}");
                assert!(log_field(&err, "prefetched the pages touched first", "chunks").is_some_and(|n| n <= good.len() as u64), "{err}");
            }
            _ => {
                assert!(err.contains("ignoring the first-touched record") && err.contains("does not authenticate"), "an edited record was not refused\n{err}");
                assert!(!err.contains("prefetched the pages touched first"), "an edited record was used\n{err}");
            }
        }
        let _ = std::fs::remove_file(&stop);
        // The restart wrote its own record over the hostile one: forge again.
        if round == "hostile" {
            store.put_touched(&info, &touched_body(&entries)).unwrap();
        }
    }
}

/// The node of the heap's chunk-list tree at the middle of its top level
/// in generation `generation` of the session's local store, damaged on
/// disk (a byte of its stored frame flipped in its pack file); its hash.
fn damage_heap_node(s: &Session, generation: u64) -> String {
    let store = ckpt_store::Store::open(&s.store).unwrap();
    let info = store.generation(generation).unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&store.read_blob(&info.manifest).unwrap()).unwrap();
    let image_hash: ckpt_store::Hash = serde_json::from_value(manifest["processes"][0]["image"].clone()).unwrap();
    let image: serde_json::Value = serde_json::from_slice(&store.read_blob(&image_hash).unwrap()).unwrap();
    let len = |r: &serde_json::Value| r["end"].as_u64().unwrap() - r["start"].as_u64().unwrap();
    // The heap: the largest region of content not backed by a file.
    let heap = image["regions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["file"].is_null() && r["segments"].as_array().is_some_and(|t| !t.is_empty()))
        .max_by_key(|r| len(r))
        .expect("a region with content");
    let top = heap["segments"].as_array().unwrap();
    let node: ckpt_store::Hash = serde_json::from_value(top[top.len() / 2].clone()).unwrap();
    let addr = store.address(&node);
    let row = store.blob_rows().unwrap().into_iter().find(|b| b.hash == addr).unwrap_or_else(|| panic!("chunk-list node {node} is not in the store"));
    let pack = store.pack_rows().unwrap().into_iter().find(|p| p.id == row.pack_id).unwrap();
    let path = store.pack_path(&pack.name);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[(row.offset + row.clen as u64 / 2) as usize] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    node.to_string()
}

/// A chunk-list node of the heap damaged in the store: nothing reads it
/// before the program runs (a lazy region costs O(1) until then), so the
/// program runs; the first read of that node (a fault under it, or the
/// background fill's walk) kills every process of the restart and names the
/// node, in bounded time: no fault waits for ever, and no page comes in as
/// zeros (the program's own check would print FAIL).
#[test]
fn lazy_restart_with_a_damaged_chunk_list_node_is_killed_naming_it() {
    let s = Session::new("lazy_damaged");
    let stop = s.stop_file();
    let mut p = s.launch(&program("counter_heap"), &["-t", "100", "-m", "128", "-s", stop.to_str().unwrap()]);
    let pid = p.pid;
    p.wait_prefix("READY", LINE_TIMEOUT);
    p.wait_ticks(1, LINE_TIMEOUT);
    let g = s.checkpoint_bounded(&mut p);
    p.kill9();
    let node = damage_heap_node(&s, g.id);

    let mut r = restart_lazy(&s, None, pid, None);
    let st = r.wait_exit(Duration::from_secs(120));
    let err = r.stderr();
    assert!(!st.success(), "the restart ended well with a damaged node\n{}", r.context());
    assert!(err.contains("ckpt: lazy restart:"), "the restart was not lazy (nothing read the node after the program ran)\n{}", r.context());
    let line = err.lines().find(|l| l.contains(&node)).unwrap_or_else(|| panic!("no message names the damaged node {node}:\n{err}"));
    assert!(line.contains("damaged") && line.contains("killed") && line.contains("older generation"), "the message names the node but not the damage, the kill and the fix: {line}");
    assert!(!err.contains("page server died"), "the watchdog claims the page server died:\n{err}");
    assert!(!pid_alive(pid), "the program still runs without its memory\n{}", r.context());
    eprintln!("lazy restart with a damaged node: {line}");
}

/// The same program from an S3 store on a fresh host: the restart fetches
/// chunks by ranged reads (no whole pack), on fault and in the background.
#[test]
fn lazy_restart_from_s3_on_a_fresh_host() {
    let srv = S3Server::start();
    srv.create_bucket(BUCKET);
    let mut s = Session::new("lazy_s3");
    s.store = format!("s3://{BUCKET}/lazy");
    let (g, pid, _stop) = checkpointed_on_s3(&s, &srv, "64", 2);
    let _ = s.run("quit", &[]);

    let cache_b = s.path("cache-b");
    let mut r = restart_lazy(&s, None, pid, Some((&srv, &cache_b)));
    r.wait_ticks(1, RESTART_TIMEOUT);
    let first = r.first_tick.unwrap();
    assert!(first >= g.lo && first <= g.hi, "lazy restart continued at tick {first}, expected {}..={}\n{}", g.lo, g.hi, r.context());
    wait_lazy_notice(&mut r);
    r.wait_ticks(5, LINE_TIMEOUT);
    r.finish(&s, 3);
    let whole: Vec<_> = std::fs::read_dir(cache_b.join("packs")).into_iter().flatten().flatten().flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten()).collect();
    assert!(whole.is_empty(), "the lazy restart downloaded whole packs: {:?}", whole.iter().map(|e| e.path()).collect::<Vec<_>>());
}

/// The store goes away while a lazy restart still fills the program: the
/// restart fails loudly, naming the cause, and the program is killed, in
/// bounded time (no fault waits for ever).
#[test]
fn lazy_restart_whose_store_goes_away_kills_the_program_and_says_why() {
    let srv = S3Server::start();
    srv.create_bucket(BUCKET);
    let mut s = Session::new("lazy_gone");
    s.store = format!("s3://{BUCKET}/gone");
    let (_g, pid, _stop) = checkpointed_on_s3(&s, &srv, "512", 1);
    let _ = s.run("quit", &[]);

    let cache_b = s.path("cache-b");
    let mut r = restart_lazy(&s, None, pid, Some((&srv, &cache_b)));
    wait_lazy_notice(&mut r);
    // The program may or may not have printed a tick yet: the fill of
    // 512 MiB over ranged GETs is far from done. The store goes away.
    drop(srv);
    let t = Instant::now();
    let st = r.wait_exit(Duration::from_secs(120));
    let err = r.stderr();
    assert!(!st.success(), "the restart ended well without its store\n{}", r.context());
    // The cause is the store, whichever read met it first (a fault's
    // chunk or chunk-list node, or the background fill): never a damaged
    // image, never the page server's death (the watchdog kills silently
    // after the server did).
    assert!(err.contains("cannot read") && err.contains("from the store") && err.contains("killed"), "the failure does not name its cause and the kill:\n{err}");
    assert!(!err.contains("damaged") && !err.contains("page server died") && err.contains("Make the store reachable"), "a store that went away is reported as something else:\n{err}");
    assert!(!pid_alive(pid), "the program still runs without its memory\n{}", r.context());
    eprintln!("lazy restart without its store ended after {:?}: {}", t.elapsed(), err.lines().filter(|l| l.contains("lazy restart")).collect::<Vec<_>>().join(" | "));
}

/// `ckpt restart --lazy` itself is SIGKILLed while it still fills the
/// program: its watchdog kills the program (which would otherwise get the
/// missing pages as zeros from the kernel: its own check of every page
/// would print FAIL) and says why, in bounded time.
#[test]
fn lazy_restart_whose_server_dies_kills_the_program() {
    let srv = S3Server::start();
    srv.create_bucket(BUCKET);
    let mut s = Session::new("lazy_watchdog");
    s.store = format!("s3://{BUCKET}/watchdog");
    let (_g, pid, _stop) = checkpointed_on_s3(&s, &srv, "512", 1);

    let cache_b = s.path("cache-b");
    let mut r = restart_lazy(&s, None, pid, Some((&srv, &cache_b)));
    wait_lazy_notice(&mut r);
    // The fill of 512 MiB over ranged GETs is far from done: the server dies.
    sigkill(r.child_pid());
    let t = Instant::now();
    while pid_alive(pid) {
        assert!(t.elapsed() < Duration::from_secs(20), "the program still runs 20 s after its page server died\n{}", r.context());
        std::thread::sleep(Duration::from_millis(20)); // polling the kernel's reaping
    }
    r.drain_for(Duration::from_secs(2));
    assert!(r.stderr().contains("page server died"), "the watchdog did not say why it killed the program\n{}", r.context());
}

/// Five processes (`tree`: pipes full of records, shared memory, a zombie,
/// a daemon) restart lazily, each with its own userfaultfd on the one page
/// server; they check their data, are checkpointed again and run to DONE.
#[test]
fn lazy_restart_of_a_process_tree() {
    let s = Session::new("lazy_tree");
    let stop = s.stop_file();
    let (mut p, pids) = s.launch_computation(&program("tree"), &["-t", "100", "-z", "30", "-s", stop.to_str().unwrap()], 5);
    p.wait_ticks(2, LINE_TIMEOUT);
    let g = s.checkpoint_bounded(&mut p);
    s.kill_all(&pids, &mut p);
    let mut r = restart_lazy(&s, None, p.pid, None);
    r.wait_ticks(1, RESTART_TIMEOUT);
    let first = r.first_tick.unwrap();
    assert!(first >= g.lo && first <= g.hi, "lazy restart continued at tick {first}, expected {}..={}\n{}", g.lo, g.hi, r.context());
    wait_lazy_notice(&mut r);
    r.wait_ticks(3, LINE_TIMEOUT);
    let g2 = s.checkpoint_bounded(&mut r);
    assert_eq!(s.generations()[&g2.id].u64_field("nprocs"), 5);
    r.wait_line(|l| l.starts_with("REAPED"), LINE_TIMEOUT);
    s.stop_at(r.last_tick.unwrap() + 3);
    s.finish_computation(&pids, &mut r);
}

/// An ordinary user's restart cannot have a userfaultfd that serves the
/// kernel's accesses (vm.unprivileged_userfaultfd=0 here): `--lazy` says
/// so, naming the setting, and the restart writes all memory first; the
/// program checks its heap and runs to DONE.
#[test]
fn lazy_restart_as_an_ordinary_user_falls_back_to_eager_and_says_why() {
    let unpriv = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd").unwrap_or_default();
    if unpriv.trim() == "1" {
        eprintln!("vm.unprivileged_userfaultfd=1 here: an ordinary user's lazy restart is lazy; nothing to check");
        return;
    }
    let s = Session::as_user(TEST_USER, "lazy_user");
    let stop = s.stop_file();
    let mut p = s.launch(&program("counter_heap"), &["-t", "100", "-m", "32", "-s", stop.to_str().unwrap()]);
    let pid = p.pid;
    p.wait_prefix("READY", LINE_TIMEOUT);
    p.wait_ticks(2, LINE_TIMEOUT);
    let g = s.checkpoint_bounded(&mut p);
    p.kill9();
    let mut r = restart_lazy(&s, None, pid, None);
    r.wait_ticks(1, RESTART_TIMEOUT);
    let first = r.first_tick.unwrap();
    assert!(first >= g.lo && first <= g.hi, "restart continued at tick {first}, expected {}..={}\n{}", g.lo, g.hi, r.context());
    assert!(r.alive(), "restored program is not pid {pid}\n{}", r.context());
    let err = r.stderr();
    assert!(err.contains("not lazily") && err.contains("vm.unprivileged_userfaultfd"), "the fallback is not explained:\n{err}");
    r.wait_ticks(2, LINE_TIMEOUT);
    r.finish(&s, 3);
}
