//! S3 stores against a real S3-compatible server on loopback (moto, see
//! `common/s3.rs`): checkpoint to `s3://`, restart on a "fresh host" (empty
//! cache), push/pull, interrupted push, errors, two writers.
mod common;
#[path = "common/s3.rs"]
mod s3srv;
use s3srv::{S3Server, http};
use common::*;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const BUCKET: &str = "ckpt-tests";

fn server() -> S3Server {
    let srv = S3Server::start();
    srv.create_bucket(BUCKET);
    srv
}

/// `ckpt SUB ARGS` with the server's variables and `cache` as S3 cache.
fn run_s3(s: &Session, srv: &S3Server, cache: &Path, sub: &str, args: &[&str]) -> Output {
    let mut c = s.cmd(sub);
    c.args(args);
    srv.apply(&mut c, cache);
    run_with_timeout(c, CMD_TIMEOUT)
}

/// `ckpt ARGS` (no options added) with the server's variables and `cache`.
fn raw_s3(s: &Session, srv: &S3Server, cache: &Path, args: &[&str]) -> Output {
    let mut c = Command::new(&s.ckpt);
    c.args(args).current_dir(&s.dir);
    srv.apply(&mut c, cache);
    run_with_timeout(c, CMD_TIMEOUT)
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn failed(out: &Output, what: &str, needles: &[&str]) -> String {
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{what} should fail but succeeded:\nstdout: {}\nstderr: {err}", text(&out.stdout));
    for n in needles {
        assert!(err.contains(n), "{what}: error does not mention {n:?}:\n{err}");
    }
    eprintln!("{what}: {}", err.trim());
    err
}

/// Restart `g` (or the latest) from the session's store with the S3
/// variables and `cache`; checks the program continues within `g`'s bounds.
fn restart_s3(s: &Session, srv: &S3Server, cache: &Path, g: &Gen, pid: i32, latest: bool) -> Proc {
    let mut c = s.cmd("restart");
    if !latest {
        c.arg(g.id.to_string());
    }
    srv.apply(&mut c, cache);
    let mut p = Proc::spawn(format!("restart {} from {}", g.id, s.store), c);
    p.pid = pid;
    s.track(pid);
    p.wait_ticks(1, RESTART_TIMEOUT);
    let first = p.first_tick.unwrap();
    assert!(first >= g.lo && first <= g.hi, "restart of generation {} continued at tick {first}, expected {}..={}\n{}", g.id, g.lo, g.hi, p.context());
    assert!(pid_alive(pid), "restored program is not pid {pid}\n{}", p.context());
    p
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

/// Keys under `prefix` in the bucket (unsigned ListObjectsV2).
fn list_keys(srv: &S3Server, prefix: &str) -> Vec<String> {
    let (code, body) = http(srv.port, "GET", &format!("/{BUCKET}?list-type=2&prefix={prefix}")).expect("LIST");
    assert_eq!(code, 200, "{body}");
    body.split("<Key>").skip(1).filter_map(|s| s.split("</Key>").next()).map(str::to_string).collect()
}

#[test]
fn s3_checkpoint_twice_then_restart_on_fresh_host() {
    let srv = server();
    let mut s = Session::new("s3_fresh_host");
    s.store = format!("s3://{BUCKET}/fresh-host");
    let cache_a = s.path("cache-a");
    let stop = s.stop_file();
    let mut c = s.cmd("launch");
    c.arg("--").arg(program("counter_heap")).args(["-t", "100", "-m", "64", "-s", stop.to_str().unwrap()]);
    srv.apply(&mut c, &cache_a);
    let mut p = Proc::spawn("launch counter_heap on s3".into(), c);
    s.track(p.child_pid());
    let line = p.wait_prefix("PID ", LINE_TIMEOUT);
    p.pid = line[4..].trim().parse().unwrap();
    let pid = p.pid;
    p.wait_prefix("READY", LINE_TIMEOUT);
    p.wait_ticks(2, LINE_TIMEOUT);
    let _g1 = s.checkpoint_bounded(&mut p);
    p.wait_ticks(3, LINE_TIMEOUT);
    let g2 = s.checkpoint_bounded(&mut p);
    let keys = list_keys(&srv, "fresh-host/");
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
            let keys = list_keys(&srv, &format!("{prefix}/packs/"));
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
        let has_catalog = !list_keys(&srv, &format!("{prefix}/catalog.db")).is_empty();
        if !done && !has_catalog {
            killed_mid_push = true;
            break;
        }
        eprintln!("attempt {attempt}: push finished before the kill; again to another prefix");
    }
    let dest = format!("s3://{BUCKET}/{prefix}");
    assert!(killed_mid_push, "push always finished before it could be killed");
    let before = list_keys(&srv, &format!("{prefix}/packs/")).len() as u64;
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
