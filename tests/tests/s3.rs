//! S3 stores against a real S3-compatible server on loopback (moto, see
//! `common/s3.rs`): checkpoint to `s3://`, restart on a "fresh host" (empty
//! cache), push/pull, interrupted push, errors, two writers, gc and verify
//! on S3, the cross-host writer lock, and `kill -9` during the catalog
//! upload of a checkpoint and at every phase of a remote gc.
mod common;
#[path = "common/s3.rs"]
mod s3srv;
use s3srv::{S3Server, StallProxy};
use common::*;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const BUCKET: &str = "ckpt-tests";

fn server() -> S3Server {
    S3Server::with_bucket(BUCKET)
}

/// `ckpt SUB ARGS` with the server's variables and `cache` as S3 cache.
fn run_s3(s: &Session, srv: &S3Server, cache: &Path, sub: &str, args: &[&str]) -> Output {
    let mut c = s.cmd(sub);
    c.args(args);
    srv.apply(&mut c, cache);
    run_with_timeout(c, CMD_TIMEOUT)
}

/// Like [`run_s3`], through `endpoint` (a proxy in front of the server: the
/// cache directory under `cache` depends on the endpoint).
fn run_s3_via(s: &Session, srv: &S3Server, endpoint: &str, cache: &Path, sub: &str, args: &[&str]) -> Output {
    let mut c = s.cmd(sub);
    c.args(args);
    srv.apply(&mut c, cache);
    c.env("AWS_ENDPOINT_URL", endpoint);
    run_with_timeout(c, CMD_TIMEOUT)
}

/// `ckpt ARGS` (no options added) with the server's variables and `cache`.
fn raw_s3(s: &Session, srv: &S3Server, cache: &Path, args: &[&str]) -> Output {
    let mut c = Command::new(&s.ckpt);
    c.args(args).current_dir(&s.dir);
    srv.apply(&mut c, cache);
    run_with_timeout(c, CMD_TIMEOUT)
}



/// Restart `g` (or the latest) from the session's store with the S3
/// variables and `cache`; checks the program continues within `g`'s bounds.
fn restart_s3(s: &Session, srv: &S3Server, cache: &Path, g: &Gen, pid: i32, latest: bool) -> Proc {
    let mut c = s.cmd("restart");
    if !latest {
        c.arg(g.id.to_string());
    }
    srv.apply(&mut c, cache);
    s.restart_expect_with(c, g, pid)
}

fn pack_files(dir: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir.join("packs")) {
        for d in rd.flatten() {
            if let Ok(files) = std::fs::read_dir(d.path()) {
                v.extend(files.flatten().map(|f| f.path()));
            }
        }
    }
    v
}

fn quit(s: &Session) {
    let _ = s.run("quit", &[]);
}

fn json_u64(out: &str, key: &str) -> u64 {
    let j = Json::parse(out.trim()).unwrap_or_else(|e| panic!("bad JSON ({e}): {out}"));
    j.get("report").and_then(|r| r.get(key)).and_then(Json::as_u64).unwrap_or_else(|| panic!("no report.{key} in {out}"))
}


#[test]
fn s3_checkpoint_twice_then_restart_on_fresh_host() {
    let srv = server();
    let mut s = Session::new("s3_fresh_host");
    s.store = format!("s3://{BUCKET}/fresh-host");
    let cache_a = s.path("cache-a");
    let stop = s.stop_file();
    let mut p = srv.launch_counter(&s, &cache_a, "64", &stop);
    let pid = p.pid;
    p.wait_ticks(2, LINE_TIMEOUT);
    let _g1 = s.checkpoint_bounded(&mut p);
    p.wait_ticks(3, LINE_TIMEOUT);
    let g2 = s.checkpoint_bounded(&mut p);
    let keys = srv.list_keys(BUCKET, "fresh-host/");
    assert!(keys.iter().any(|k| k == "fresh-host/catalog.db"), "no catalog on S3: {keys:?}");
    assert!(keys.iter().any(|k| k.ends_with(".pack")), "no pack on S3: {keys:?}");
    p.kill9();
    quit(&s);

    // A fresh host: an empty cache; restart fetches the catalog and just the
    // blobs generation 2 needs (ranged GETs: no pack file lands in the cache).
    let cache_b = s.path("cache-b");
    let log = ok(&run_s3(&s, &srv, &cache_b, "log", &["--json"]), "ckpt log --json on a fresh host");
    assert!(log.contains(&format!("\"id\": {}", g2.id)), "generation {} missing from {log}", g2.id);
    let mut r = restart_s3(&s, &srv, &cache_b, &g2, pid, true);
    assert!(pack_files(&cache_b).is_empty(), "restart downloaded whole packs: {:?}", pack_files(&cache_b));
    r.wait_ticks(3, LINE_TIMEOUT);
    // The restarted program checkpoints to S3 through the new coordinator.
    let g3 = s.checkpoint_bounded(&mut r);
    r.kill9();
    quit(&s);
    let cache_c = s.path("cache-c");
    let mut r = restart_s3(&s, &srv, &cache_c, &g3, pid, false);
    r.wait_ticks(2, LINE_TIMEOUT);
    r.finish(&s, 3);
    quit(&s);
}

#[test]
fn push_then_pull_then_restart_from_pulled_store() {
    let srv = server();
    let mut s = Session::new("s3_push_pull");
    let cache = s.path("cache");
    let stop = s.stop_file();
    let mut p = s.launch(&program("counter_heap"), &["-t", "100", "-m", "64", "-s", stop.to_str().unwrap()]);
    let pid = p.pid;
    p.wait_prefix("READY", LINE_TIMEOUT);
    p.wait_ticks(2, LINE_TIMEOUT);
    let _g1 = s.checkpoint_bounded(&mut p);
    p.wait_ticks(2, LINE_TIMEOUT);
    let g2 = s.checkpoint_bounded(&mut p);
    p.kill9();
    quit(&s);
    let dest = format!("s3://{BUCKET}/pushed");
    let out = ok(&run_s3(&s, &srv, &cache, "push", &[&dest, "--json"]), "ckpt push");
    let total = json_u64(&out, "packs_total");
    assert!(total >= 2, "{out}");
    assert_eq!(json_u64(&out, "packs_sent"), total, "{out}");
    // Again: nothing to send.
    let out = ok(&run_s3(&s, &srv, &cache, "push", &[&dest, "--json"]), "second ckpt push");
    assert_eq!(json_u64(&out, "packs_sent"), 0, "{out}");
    assert_eq!(json_u64(&out, "packs_skipped"), total, "{out}");

    let pulled = s.path("pulled");
    let pulled_url = format!("file://{}", pulled.display());
    let out = ok(&run_s3(&s, &srv, &cache, "pull", &[&dest, "--store", &pulled_url, "--json"]), "ckpt pull");
    assert_eq!(json_u64(&out, "packs_sent"), total, "{out}");
    assert_eq!(pack_files(&pulled).len() as u64, total);
    let out = ok(&run_s3(&s, &srv, &cache, "pull", &[&dest, "--store", &pulled_url, "--json"]), "second ckpt pull");
    assert_eq!(json_u64(&out, "packs_sent"), 0, "{out}");
    // The original store is not needed any more.
    std::fs::remove_dir_all(&s.store_dir).unwrap();
    s.store = pulled_url;
    let mut r = s.restart_expect(&g2, pid, true);
    r.wait_ticks(2, LINE_TIMEOUT);
    r.finish(&s, 3);
}

#[test]
fn interrupted_push_resumes_sending_only_missing_packs() {
    let srv = server();
    let s = Session::new("s3_push_kill");
    let cache = s.path("cache");
    let mut p = s.launch(&program("counter_heap"), &["-t", "50", "-m", "64"]);
    p.wait_prefix("READY", LINE_TIMEOUT);
    // Several generations: every commit closes at least one pack.
    for _ in 0..6 {
        p.wait_ticks(1, LINE_TIMEOUT);
        s.checkpoint_bounded(&mut p);
    }
    p.kill9();
    quit(&s);
    let mut killed_mid_push = false;
    let mut prefix = String::new();
    for attempt in 0..5 {
        prefix = format!("interrupted{attempt}");
        let dest = format!("s3://{BUCKET}/{prefix}");
        let mut c = s.cmd("push");
        c.args([&dest, "--json"]);
        srv.apply(&mut c, &cache);
        let mut child = c.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
        let deadline = Instant::now() + CMD_TIMEOUT;
        let mut done = false;
        loop {
            let keys = srv.list_keys(BUCKET, &format!("{prefix}/packs/"));
            if !keys.is_empty() {
                break;
            }
            if child.try_wait().unwrap().is_some() {
                done = true;
                break;
            }
            assert!(Instant::now() < deadline, "push made no progress");
            std::thread::sleep(Duration::from_millis(2)); // polling the server
        }
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        let has_catalog = !srv.list_keys(BUCKET, &format!("{prefix}/catalog.db")).is_empty();
        if !done && !has_catalog {
            killed_mid_push = true;
            break;
        }
        eprintln!("attempt {attempt}: push finished before the kill; again to another prefix");
    }
    let dest = format!("s3://{BUCKET}/{prefix}");
    assert!(killed_mid_push, "push always finished before it could be killed");
    let before = srv.list_keys(BUCKET, &format!("{prefix}/packs/")).len() as u64;
    let out = ok(&run_s3(&s, &srv, &cache, "push", &[&dest, "--json"]), "push after kill -9");
    let (total, sent, skipped) = (json_u64(&out, "packs_total"), json_u64(&out, "packs_sent"), json_u64(&out, "packs_skipped"));
    eprintln!("{before} packs were on S3 after the kill; re-run sent {sent}, skipped {skipped} of {total}");
    assert!(skipped >= 1 && skipped >= before, "{out}");
    assert_eq!(sent + skipped, total, "{out}");
    assert!(sent < total, "the re-run sent every pack again: {out}");
    // The result restarts on a fresh host: log works and everything verifies via pull.
    let pulled = s.path("pulled");
    let out = ok(&run_s3(&s, &srv, &cache, "pull", &[&dest, "--store", &format!("file://{}", pulled.display()), "--json"]), "pull");
    assert_eq!(json_u64(&out, "packs_sent"), total, "{out}");
}

#[test]
fn s3_errors_are_clear() {
    let srv = server();
    let s = Session::new("s3_errors");
    let cache = s.path("cache");
    // No store at this prefix.
    let url = format!("s3://{BUCKET}/nothing-here");
    failed(&raw_s3(&s, &srv, &cache, &["log", "--store", &url]), "log of an empty prefix", &["holds no ckpt store", &url]);
    // Missing bucket.
    failed(&raw_s3(&s, &srv, &cache, &["log", "--store", "s3://no-such-bucket/x"]), "missing bucket", &["bucket no-such-bucket does not exist"]);
    // Unreachable endpoint.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut c = Command::new(&s.ckpt);
    c.args(["log", "--store", &format!("s3://{BUCKET}/x")]);
    srv.apply(&mut c, &cache);
    c.env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{dead}"));
    let t0 = Instant::now();
    let out = run_with_timeout(c, CMD_TIMEOUT);
    failed(&out, "unreachable endpoint", &["cannot reach the S3 endpoint", &format!("127.0.0.1:{dead}")]);
    assert!(t0.elapsed() < Duration::from_secs(60), "took {:?} to report an unreachable endpoint", t0.elapsed());
    // Wrong credentials (a server that checks them).
    let strict = S3Server::start_with(true);
    failed(&raw_s3(&s, &strict, &cache, &["log", "--store", &format!("s3://{BUCKET}/x")]), "wrong credentials", &["refused access", "AWS_ACCESS_KEY_ID"]);
    // Plain HTTP to a non-loopback endpoint is refused before any request.
    let mut c = Command::new(&s.ckpt);
    c.args(["log", "--store", &format!("s3://{BUCKET}/x")]);
    srv.apply(&mut c, &cache);
    c.env("AWS_ENDPOINT_URL", "http://192.0.2.1:9000");
    failed(&run_with_timeout(c, CMD_TIMEOUT), "plain http off loopback", &["AWS_ALLOW_HTTP"]);
}

fn copy_dir(from: &Path, to: &Path) {
    let st = Command::new("cp").arg("-a").arg(from).arg(to).status().unwrap();
    assert!(st.success(), "cp -a {} {}", from.display(), to.display());
}

#[test]
fn corrupt_or_truncated_pack_on_s3_is_reported_never_restarted() {
    let srv = server();
    let s = Session::new("s3_corrupt");
    let cache = s.path("cache");
    let mut p = s.launch(&program("counter_heap"), &["-t", "100", "-m", "16"]);
    let pid = p.pid;
    p.wait_prefix("READY", LINE_TIMEOUT);
    p.wait_ticks(2, LINE_TIMEOUT);
    let g = s.checkpoint_bounded(&mut p);
    p.kill9();
    quit(&s);
    for case in ["bitflip", "truncated"] {
        // A damaged copy of the store goes to S3 (push checks sizes against
        // the catalog, not contents: the server now holds a bad pack).
        let bad = s.path(&format!("bad-{case}"));
        copy_dir(&s.store_dir, &bad);
        let (pack, size) = pack_files(&bad).into_iter().map(|f| { let n = std::fs::metadata(&f).unwrap().len(); (f, n) }).max_by_key(|x| x.1).unwrap();
        let mut body = std::fs::read(&pack).unwrap();
        let name = pack.file_stem().unwrap().to_str().unwrap().to_string();
        if case == "bitflip" {
            for i in (8..body.len() / 2).step_by(4096) {
                body[i] ^= 0x40;
            }
        } else {
            body.truncate(body.len() / 2);
            // The catalog of the copy agrees with the truncated size.
            let st = Command::new("python3")
                .args(["-c", "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute('UPDATE packs SET size=? WHERE name=?', (int(sys.argv[2]), sys.argv[3])); c.commit()"])
                .arg(bad.join("catalog.db"))
                .arg(body.len().to_string())
                .arg(&name)
                .status()
                .unwrap();
            assert!(st.success());
        }
        assert!(size > 0);
        std::fs::write(&pack, &body).unwrap();
        let dest = format!("s3://{BUCKET}/{case}");
        ok(&raw_s3(&s, &srv, &cache, &["push", &dest, "--store", &format!("file://{}", bad.display())]), "push of a damaged copy");
        let mut s2 = Session::new(&format!("s3_corrupt_{case}"));
        s2.store = dest.clone();
        let fresh = s2.path("cache");
        // verify reads S3 back and names the damaged object (exit 1).
        let v = raw_s3(&s2, &srv, &s2.path("vcache"), &["verify", "--all", "--store", &dest]);
        let vo = text(&v.stdout);
        assert_eq!(v.status.code(), Some(1), "verify --all of a {case} pack on S3:\n{vo}\n{}", text(&v.stderr));
        assert!(vo.lines().any(|l| l.starts_with("problem:") && l.contains(&name) && l.contains("s3://")), "verify does not name {name}:\n{vo}");
        eprintln!("verify of a {case} pack:\n{vo}");
        let mut c = s2.cmd("restart");
        c.arg(g.id.to_string());
        srv.apply(&mut c, &fresh);
        let out = run_with_timeout(c, CMD_TIMEOUT);
        let err = failed(&out, &format!("restart from a {case} pack"), &[&name, "s3://"]);
        assert!(err.contains("corrupt") || err.contains("truncated"), "{err}");
        assert!(!pid_alive(pid), "a restart from a {case} pack left the program running");
        // pull checks whole packs against their names.
        let out = raw_s3(&s2, &srv, &fresh, &["pull", &dest, "--store", &format!("file://{}", s2.path("pulled").display())]);
        failed(&out, &format!("pull of a {case} pack"), &[&name, "corrupt"]);
        quit(&s2);
    }
}

#[test]
fn second_writer_on_one_s3_store_fails_clearly() {
    let srv = server();
    let s = Session::new("s3_two_writers");
    let cache = s.path("cache");
    let mut p = s.launch(&program("counter_heap"), &["-t", "100", "-m", "8"]);
    p.wait_prefix("READY", LINE_TIMEOUT);
    p.wait_ticks(1, LINE_TIMEOUT);
    s.checkpoint_bounded(&mut p);
    p.kill9();
    quit(&s);
    let dest = format!("s3://{BUCKET}/two");
    ok(&run_s3(&s, &srv, &cache, "push", &[&dest]), "push");
    // Another ckpt process holds the S3 store's writer lock on this host
    // (e.g. a coordinator committing): a push must not interleave with it.
    let pcache = s.path("pcache");
    let probe = raw_s3(&s, &srv, &pcache, &["log", "--store", &dest]);
    ok(&probe, "log");
    let lockdir = std::fs::read_dir(pcache.join(BUCKET)).unwrap().flatten().next().unwrap().path();
    let holder = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(lockdir.join("lock")).unwrap();
    {
        use std::os::fd::AsRawFd;
        unsafe extern "C" {
            fn flock(fd: i32, op: i32) -> i32;
        }
        // SAFETY: flock(2) on a file we own; LOCK_EX | LOCK_NB.
        assert_eq!(unsafe { flock(holder.as_raw_fd(), 2 | 4) }, 0, "cannot lock {}", lockdir.display());
    }
    let mut c = s.cmd("push");
    c.arg(&dest);
    srv.apply(&mut c, &pcache);
    let out = run_with_timeout(c, CMD_TIMEOUT);
    failed(&out, "push while another writer holds the store", &["in use by another ckpt process"]);
    drop(holder); // releases the lock
    ok(&run_s3(&s, &srv, &pcache, "push", &[&dest]), "push once the lock is free");
}

/// counter_heap under `ckpt launch --store s3://…` (through `endpoint`:
/// the server or a proxy in front of it), with a churn file.
fn launch_counter_s3(s: &Session, srv: &S3Server, endpoint: &str, cache: &Path) -> Proc {
    let stop = s.stop_file();
    let churn = s.path("CHURN");
    let mut c = s.cmd("launch");
    c.arg("--").arg(program("counter_heap")).args(["-t", "100", "-m", "32", "-s", stop.to_str().unwrap(), "-c", churn.to_str().unwrap()]);
    srv.apply(&mut c, cache);
    c.env("AWS_ENDPOINT_URL", endpoint);
    let mut p = Proc::spawn(format!("launch counter_heap on {}", s.store), c);
    s.track(p.child_pid());
    let line = p.wait_prefix("PID ", LINE_TIMEOUT);
    p.pid = line[4..].trim().parse().unwrap();
    s.track(p.pid);
    p.wait_prefix("READY", LINE_TIMEOUT);
    p.wait_ticks(2, LINE_TIMEOUT);
    p
}

/// Generation ids of the S3 store as a host with an empty cache sees them.
fn remote_gens(s: &Session, srv: &S3Server) -> Vec<u64> {
    let cache = s.path(&format!("probe-{}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()));
    let out = ok(&run_s3(s, srv, &cache, "log", &["--json"]), "ckpt log --json");
    let _ = std::fs::remove_dir_all(&cache);
    let j = Json::parse(out.trim()).unwrap();
    let arr = j.get("generations").and_then(Json::as_array).or_else(|| j.as_array()).unwrap_or_else(|| panic!("no generations in {out}"));
    arr.iter().map(|g| g.u64_field("id")).collect()
}

/// `ckpt verify --all` of the S3 store from a host with an empty cache
/// (so S3 itself is checked): must find no problem. Returns stdout.
fn verify_s3_clean(s: &Session, srv: &S3Server, what: &str) -> String {
    let cache = s.path(&format!("verify-{}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()));
    let out = ok(&run_s3(s, srv, &cache, "verify", &["--all"]), &format!("verify --all {what}"));
    assert!(out.contains(" 0 problem(s)"), "{what}: {out}");
    let _ = std::fs::remove_dir_all(&cache);
    eprintln!("[{what}] {}", out.trim());
    out
}

/// gc and verify on an S3 store, from a host that never saw it: kept
/// generations restart, the freed packs are gone from S3, verify reads S3
/// back (all, one generation, metadata only), and the lock is released.
#[test]
fn gc_and_verify_on_s3_from_another_host() {
    let srv = server();
    let mut s = Session::new("s3_gc");
    s.store = format!("s3://{BUCKET}/gc");
    let cache_a = s.path("cache-a");
    let mut p = launch_counter_s3(&s, &srv, &srv.endpoint, &cache_a);
    let pid = p.pid;
    let mut gens = vec![s.checkpoint_bounded(&mut p)];
    for _ in 0..5 {
        churn(&s, &mut p);
        gens.push(s.checkpoint_bounded(&mut p));
    }
    p.kill9();
    quit(&s);
    let first = gens[0].id.to_string();
    let ids: Vec<u64> = gens.iter().map(|g| g.id).collect();
    assert_eq!(remote_gens(&s, &srv), ids);

    let cache_b = s.path("cache-b");
    let packs_before = srv.list_keys(BUCKET, "gc/packs/").len();
    let dry = ok(&run_s3(&s, &srv, &cache_b, "gc", &["--keep-last", "2", "--keep", &first, "--dry-run"]), "gc --dry-run on S3");
    assert!(dry.contains("would forget 3 generation(s)") && dry.contains("dry run"), "{dry}");
    assert_eq!(srv.list_keys(BUCKET, "gc/packs/").len(), packs_before, "a dry run changed S3");
    // A repack threshold near 1: the packs the forgotten generations share
    // with the kept ones are rewritten (read from S3, uploaded anew).
    let out = ok(&run_s3(&s, &srv, &cache_b, "gc", &["--keep-last", "2", "--keep", &first, "--repack-threshold", "0.99", "--json"]), "gc on S3");
    eprintln!("{out}");
    let r = Json::parse(&out).unwrap();
    assert!(r.u64_field("bytes_freed") > 0 && r.u64_field("blobs_deleted") > 0 && r.u64_field("packs_repacked") > 0, "{out}");
    let kept = vec![ids[0], ids[4], ids[5]];
    assert_eq!(remote_gens(&s, &srv), kept);
    let packs_after = srv.list_keys(BUCKET, "gc/packs/");
    assert!(packs_after.len() != packs_before || r.u64_field("packs_written") > 0, "S3's packs did not change");
    assert!(srv.list_keys(BUCKET, "gc/lock").is_empty(), "gc left its lock object behind");
    // Every pack object is named by the catalog, and vice versa.
    let stats = ok(&run_s3(&s, &srv, &s.path("cache-c"), "stats", &["--json"]), "stats");
    assert_eq!(Json::parse(&stats).unwrap().u64_field("packs"), packs_after.len() as u64, "{stats}");
    let v = verify_s3_clean(&s, &srv, "after gc");
    assert!(!v.contains("note:"), "unreferenced packs left on S3: {v}");
    for g in &kept {
        let out = ok(&run_s3(&s, &srv, &s.path("cache-d"), "verify", &[&g.to_string()]), "verify GEN on S3");
        assert!(out.contains(" 0 problem(s)"), "{out}");
    }
    let out = ok(&run_s3(&s, &srv, &s.path("cache-d"), "verify", &["--metadata-only"]), "verify --metadata-only on S3");
    assert!(out.contains(" 0 problem(s)"), "{out}");
    // A pack missing from S3 is named by --metadata-only (no data read).
    let victim = &packs_after[0];
    boto3(&srv, "s3.delete_object(Bucket=sys.argv[1], Key=sys.argv[2])", &[BUCKET, victim]);
    let mut c = s.cmd("verify");
    c.args(["--metadata-only"]);
    srv.apply(&mut c, &s.path("cache-e"));
    let o = run_with_timeout(c, CMD_TIMEOUT);
    let so = text(&o.stdout);
    assert!(!o.status.success() && so.contains(victim.as_str()) && so.contains("missing from S3"), "{so}\n{}", text(&o.stderr));
    eprintln!("{so}");
    // Put it back (from the cache of the host that wrote it) for the restarts.
    let file = victim.rsplit('/').next().unwrap().to_string();
    let local = find_file(&s.dir, &file).expect("the pack in a cache");
    boto3(&srv, "s3.put_object(Bucket=sys.argv[1], Key=sys.argv[2], Body=open(sys.argv[3], 'rb').read())", &[BUCKET, victim, local.to_str().unwrap()]);
    verify_s3_clean(&s, &srv, "pack restored");

    // The kept generations restart on a fresh host.
    let mut r = restart_s3(&s, &srv, &s.path("cache-f"), &gens[0], pid, false);
    r.wait_ticks(2, LINE_TIMEOUT);
    r.kill9();
    quit(&s);
    let mut r = restart_s3(&s, &srv, &s.path("cache-g"), &gens[5], pid, true);
    r.wait_ticks(2, LINE_TIMEOUT);
    r.finish(&s, 2);
    quit(&s);
}

/// Runs `stmt` with a boto3 client `s3` of the test server (boto3 comes
/// with moto) and `sys.argv[1..]` = `args`: a second, independent S3 client
/// to damage or repair objects behind ckpt's back.
fn boto3(srv: &S3Server, stmt: &str, args: &[&str]) {
    let code = format!("import sys, boto3\ns3 = boto3.client('s3', endpoint_url='{}', region_name='us-east-1', aws_access_key_id='k', aws_secret_access_key='s')\n{stmt}\n", srv.endpoint);
    let out = Command::new("python3").arg("-c").arg(&code).args(args).output().unwrap();
    assert!(out.status.success(), "boto3 {stmt}: {}", text(&out.stderr));
}

/// The first file named `name` under `dir`.
fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.is_dir() {
            if let Some(f) = find_file(&p, name) {
                return Some(f);
            }
        } else if p.file_name().is_some_and(|n| n == name) {
            return Some(p);
        }
    }
    None
}

/// Spawns `ckpt gc ARGS` on the S3 store with extra variables; stderr piped.
fn spawn_gc(s: &Session, srv: &S3Server, endpoint: &str, cache: &Path, args: &[&str], env: &[(&str, &str)]) -> std::process::Child {
    let mut c = s.cmd("gc");
    c.args(args);
    srv.apply(&mut c, cache);
    c.env("AWS_ENDPOINT_URL", endpoint);
    for (k, v) in env {
        c.env(k, v);
    }
    c.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
    c.spawn().unwrap()
}

/// The S3 writer lock between hosts (distinct `CKPT_HOSTNAME`s, one cache
/// each): a gc on host b holds it; a gc on host c gives up naming it; a
/// checkpoint on host a waits; gc b is killed with SIGKILL, and once its
/// lease runs out the checkpoint breaks the stale lock and commits.
#[test]
fn s3_lock_between_hosts_waits_names_the_holder_and_breaks_when_stale() {
    let srv = server();
    let mut s = Session::new("s3_lock");
    s.store = format!("s3://{BUCKET}/lock");
    let mut p = launch_counter_s3(&s, &srv, &srv.endpoint, &s.path("cache-a"));
    let g1 = s.checkpoint_bounded(&mut p);
    churn(&s, &mut p);
    let g2 = s.checkpoint_bounded(&mut p);
    let first = g1.id.to_string();
    let lease = 4;
    let mut gc_b = spawn_gc(&s, &srv, &srv.endpoint, &s.path("cache-b"), &["--keep-last", "1", "--keep", &first], &[
        ("CKPT_HOSTNAME", "host-b"),
        ("CKPT_S3_LOCK_LEASE", &lease.to_string()),
        ("CKPT_GC_PAUSE_AT", "after-mark"),
    ]);
    assert!(wait_paused(&mut gc_b, "after-mark", CMD_TIMEOUT));
    let holder = format!("pid {} on host host-b", gc_b.id());
    // Host c: gives up after --wait, naming the holder and the lock.
    let mut c = s.cmd("gc");
    c.args(["--keep-last", "1", "--wait", "2"]);
    srv.apply(&mut c, &s.path("cache-c"));
    c.env("CKPT_HOSTNAME", "host-c");
    let err = failed(&run_with_timeout(c, CMD_TIMEOUT), "gc while another host's gc holds the lock", &[&holder, "lease", &format!("{}/lock", s.store)]);
    assert!(err.contains("gc"), "{err}");
    // Host a: the coordinator waits for the lock.
    let mut ck = s.cmd("checkpoint");
    ck.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let mut ck = ck.spawn().unwrap();
    std::thread::sleep(Duration::from_secs(2)); // the checkpoint is waiting for the lock meanwhile
    assert!(ck.try_wait().unwrap().is_none(), "a checkpoint committed while gc on another host held the lock");
    assert_eq!(remote_gens(&s, &srv), vec![g1.id, g2.id]);
    // gc b dies holding the lock: host a cannot see its pid, so it waits for the lease.
    let t = Instant::now();
    gc_b.kill().unwrap(); // SIGKILL
    gc_b.wait().unwrap();
    let out = ck.wait_with_output().unwrap();
    assert!(out.status.success(), "checkpoint after the stale lock: {}", text(&out.stderr));
    eprintln!("checkpoint committed {:.1} s after the holder was killed (lease {lease} s)", t.elapsed().as_secs_f64());
    let g3: u64 = text(&out.stdout).trim().parse().unwrap();
    assert_eq!(remote_gens(&s, &srv), vec![g1.id, g2.id, g3]);
    let log = std::fs::read_to_string(s.path("coord.log")).unwrap_or_default();
    if !log.is_empty() {
        assert!(log.contains("broke the stale") && log.contains("host-b"), "{log}");
    }
    verify_s3_clean(&s, &srv, "after the stale lock");
    p.kill9();
    quit(&s);
    let mut r = restart_s3(&s, &srv, &s.path("cache-r"), &g2, p.pid, false);
    r.wait_ticks(2, LINE_TIMEOUT);
    r.finish(&s, 2);
    quit(&s);
}

/// `kill -9` of the coordinator during the catalog upload of a checkpoint
/// to S3, then of `ckpt gc` on the S3 store at each of its phases
/// (after the local sweep, after uploading the repacked packs, during the
/// catalog upload, after it, and in the middle of deleting packs from S3).
/// After each kill, `ckpt verify --all` of S3 from an empty cache is clean
/// and S3 has either the old or the new set of generations; at the end a
/// normal gc leaves no unreferenced pack, and the kept generations restart
/// on a fresh host.
///
/// Deterministic: the uploads go through a proxy ([`StallProxy`]) that
/// forwards the catalog PUT's headers and half its body and then holds it,
/// so the kill lands while that PUT is on the wire and before S3 has the
/// object; the gc phases are gc's own pause points (`CKPT_GC_PAUSE_AT`),
/// reached only after the previous step returned.
#[test]
fn kill9_during_s3_catalog_upload_and_remote_gc_leaves_a_sound_store() {
    let srv = server();
    let proxy = StallProxy::start(srv.port);
    let mut s = Session::new("s3_kill9");
    s.store = format!("s3://{BUCKET}/kill9");
    let cache_a = s.path("cache-a");
    let mut p = launch_counter_s3(&s, &srv, &proxy.endpoint, &cache_a);
    let pid = p.pid;
    let mut gens = vec![s.checkpoint_bounded(&mut p)];
    for _ in 0..7 {
        churn(&s, &mut p);
        gens.push(s.checkpoint_bounded(&mut p));
    }
    let before: Vec<u64> = gens.iter().map(|g| g.id).collect();
    assert_eq!(remote_gens(&s, &srv), before);

    // 1. The coordinator dies while it uploads a checkpoint's catalog (its
    // pid asked for first: it does not answer while it commits).
    let status = s.run("status", &["--json"]);
    let coord_pid = text(&status.stdout)
        .lines()
        .find_map(|l| l.trim().strip_prefix("\"pid\": ").map(|v| v.trim_end_matches(',').parse::<i32>().unwrap()))
        .expect("coordinator pid in `ckpt status --json`");
    churn(&s, &mut p);
    proxy.arm("/kill9/catalog.db ");
    let mut ck = s.cmd("checkpoint");
    ck.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    let mut ck = ck.spawn().unwrap();
    let line = proxy.wait_stalled(CMD_TIMEOUT).expect("the checkpoint never uploaded its catalog");
    eprintln!("stalled: {line}");
    sigkill(coord_pid);
    let _ = ck.wait();
    p.kill9();
    // S3 still has its catalog of before (the new one never arrived), and
    // every pack it names.
    assert_eq!(remote_gens(&s, &srv), before, "a half-uploaded catalog is visible");
    verify_s3_clean(&s, &srv, "coordinator killed during the catalog upload");
    // The cache of host a: its commit was local only (the catalog did not
    // reach S3), and its packs are on S3 already.
    let v = ok(&run_s3_via(&s, &srv, &proxy.endpoint, &cache_a, "verify", &["--all"]), "verify --all with the killed coordinator's cache");
    let local: Vec<u64> = Json::parse(ok(&run_s3_via(&s, &srv, &proxy.endpoint, &cache_a, "log", &["--json"]), "log").trim()).unwrap().as_array().unwrap().iter().map(|g| g.u64_field("id")).collect();
    assert_eq!(local.len(), before.len() + 1, "the killed coordinator's cache lacks its local commit: {local:?}");
    assert!(v.contains(" 0 problem(s)"), "{v}");

    // 2. gc killed at each phase. Each gc asks for less, so each has work;
    // a repack threshold near 1 makes it write and upload new packs. The
    // catalog-upload kill follows a gc that completed its upload, so the
    // stalled PUT is gc's own catalog (not the upload of a cache left
    // behind by the previous kill, which a writer does first).
    let first = gens[0].id.to_string();
    let phases = ["after-sweep", "after-upload-packs", "after-upload-catalog", "catalog-upload", "mid-remote-delete"];
    for (i, phase) in phases.iter().enumerate() {
        let keep_last = 6 - i;
        let keep_s = keep_last.to_string();
        let args = ["--keep-last", keep_s.as_str(), "--keep", &first, "--repack-threshold", "0.99"];
        // What S3 has, and what host a's cache has (it may hold a commit
        // or a sweep that a kill kept from S3: gc uploads that first).
        let was_remote = remote_gens(&s, &srv);
        let was_local = {
            let out = ok(&run_s3_via(&s, &srv, &proxy.endpoint, &cache_a, "log", &["--json"]), "log with host a's cache");
            Json::parse(out.trim()).unwrap().as_array().unwrap().iter().map(|g| g.u64_field("id")).collect::<Vec<u64>>()
        };
        let mut kept: Vec<u64> = was_local.iter().rev().take(keep_last).copied().collect();
        kept.push(gens[0].id);
        kept.sort();
        kept.dedup();
        let mut gc = if *phase == "catalog-upload" {
            assert_eq!(was_local, was_remote, "host a's cache is not in sync before the catalog-upload kill");
            proxy.arm("/kill9/catalog.db ");
            let gc = spawn_gc(&s, &srv, &proxy.endpoint, &cache_a, &args, &[]);
            let line = proxy.wait_stalled(CMD_TIMEOUT).expect("gc never uploaded its catalog");
            eprintln!("[{phase}] stalled: {line}");
            gc
        } else {
            let mut gc = spawn_gc(&s, &srv, &proxy.endpoint, &cache_a, &args, &[("CKPT_GC_PAUSE_AT", phase)]);
            assert!(wait_paused(&mut gc, phase, CMD_TIMEOUT), "gc finished before {phase}");
            gc
        };
        gc.kill().unwrap(); // SIGKILL
        gc.wait().unwrap();
        let now = remote_gens(&s, &srv);
        eprintln!("[{phase}] S3 generations {was_remote:?} (host a: {was_local:?}) -> {now:?}, policy keeps {kept:?}");
        // All or nothing: S3 shows a whole catalog, never a mix.
        assert!(now == was_remote || now == was_local || now == kept, "[{phase}] S3 shows {now:?}");
        if ["after-sweep", "after-upload-packs", "catalog-upload"].contains(phase) {
            assert_ne!(now, kept, "[{phase}] gc's catalog reached S3 before its upload");
        } else {
            assert_eq!(now, kept, "[{phase}] gc's catalog upload had completed");
        }
        verify_s3_clean(&s, &srv, &format!("gc killed {phase}"));
    }
    // A normal gc (on another host) finishes the job: nothing unreferenced left.
    let out = ok(&run_s3(&s, &srv, &s.path("cache-z"), "gc", &["--keep-last", "2", "--keep", &first, "--json"]), "final gc");
    eprintln!("{out}");
    let v = verify_s3_clean(&s, &srv, "after a full gc");
    assert!(!v.contains("note:"), "unreferenced packs left on S3: {v}");
    let left = remote_gens(&s, &srv);
    assert_eq!(left.first(), Some(&gens[0].id), "{left:?}");
    quit(&s);
    // The kept generations restart on hosts that never saw the store: the
    // first one, and every one that the fault left (the latest included).
    let mut r = restart_s3(&s, &srv, &s.path("cache-r1"), &gens[0], pid, false);
    r.wait_ticks(2, LINE_TIMEOUT);
    r.kill9();
    quit(&s);
    for g in gens.iter().filter(|g| left.contains(&g.id) && g.id != gens[0].id) {
        let mut r = restart_s3(&s, &srv, &s.path(&format!("cache-r{}", g.id)), g, pid, false);
        r.wait_ticks(2, LINE_TIMEOUT);
        r.kill9();
        quit(&s);
    }
}

/// Benchmark for BENCHMARKS.md: gc of a 100-generation history on S3
/// (moto on loopback) next to gc of the same history pulled into a local
/// directory (32 MiB heap rewritten once, then 64 pages per tick, 5 ticks
/// between checkpoints), `--keep-last 10`, run from a host with an empty
/// cache. `cargo test --release -p ckpt-tests --test s3 -- --ignored --nocapture gc_bench`.
#[test]
#[ignore]
fn gc_bench_100_generations_s3() {
    let srv = server();
    let mut s = Session::new("s3_gc_bench");
    s.store = format!("s3://{BUCKET}/bench");
    let mut p = launch_counter_s3(&s, &srv, &srv.endpoint, &s.path("cache-a"));
    let t = Instant::now();
    for _ in 0..100 {
        churn(&s, &mut p);
        s.checkpoint();
        p.drain();
    }
    eprintln!("100 checkpoints to S3 in {:.1} s", t.elapsed().as_secs_f64());
    p.kill9();
    quit(&s);
    let local = s.path("local");
    let local_url = format!("file://{}", local.display());
    ok(&run_s3(&s, &srv, &s.path("cache-p"), "pull", &[&s.store, "--store", &local_url]), "pull");
    let stats = |url: &str, cache: &str| Json::parse(&ok(&raw_s3(&s, &srv, &s.path(cache), &["stats", "--json", "--store", url]), "stats")).unwrap();
    let before = stats(&s.store, "cache-s");
    let timed = |url: &str, cache: &str| {
        let t = Instant::now();
        let out = ok(&raw_s3(&s, &srv, &s.path(cache), &["gc", "--keep-last", "10", "--json", "--store", url]), "gc");
        (t.elapsed().as_millis(), Json::parse(&out).unwrap())
    };
    let (local_ms, lr) = timed(&local_url, "cache-l");
    let (s3_ms, sr) = timed(&s.store, "cache-b");
    let after = stats(&s.store, "cache-s2");
    let tv = Instant::now();
    verify_s3_clean(&s, &srv, "bench");
    let verify_ms = tv.elapsed().as_millis();
    eprintln!(
        "GC_BENCH_S3 generations 100 -> {}; packs {} -> {}; pack bytes {} -> {} (S3 freed {}, local freed {}); S3 gc wall {} ms (mark {} ms, inside {} ms); local gc wall {} ms (mark {} ms); ratio {:.1}; verify --all on S3 after {} ms",
        after.u64_field("generations"),
        before.u64_field("packs"),
        after.u64_field("packs"),
        before.u64_field("pack_bytes"),
        after.u64_field("pack_bytes"),
        sr.u64_field("bytes_freed"),
        lr.u64_field("bytes_freed"),
        s3_ms,
        sr.u64_field("mark_ms"),
        sr.u64_field("duration_ms"),
        local_ms,
        lr.u64_field("mark_ms"),
        s3_ms as f64 / local_ms.max(1) as f64,
        verify_ms
    );
}
