//! S3 stores against a real S3-compatible server on loopback (moto, see
//! `common/s3.rs`): checkpoint to `s3://`, restart on a "fresh host" (empty
//! cache), push/pull, interrupted push, errors, two writers.
mod common;
use common::s3::{S3Server, http};
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
    let dest = format!("s3://{BUCKET}/interrupted");
    let mut killed_mid_push = false;
    for attempt in 0..5 {
        let mut c = s.cmd("push");
        c.args([&dest, "--json"]);
        srv.apply(&mut c, &cache);
        let mut child = c.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
        let deadline = Instant::now() + CMD_TIMEOUT;
        let mut done = false;
        loop {
            let keys = list_keys(&srv, "interrupted/packs/");
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
        let has_catalog = !list_keys(&srv, "interrupted/catalog.db").is_empty();
        if !done && !has_catalog {
            killed_mid_push = true;
            break;
        }
        eprintln!("attempt {attempt}: push finished before the kill; starting over");
        for k in list_keys(&srv, "interrupted/") {
            let (code, _) = http(srv.port, "DELETE", &format!("/{BUCKET}/{k}")).unwrap();
            assert!(code == 204 || code == 200);
        }
    }
    assert!(killed_mid_push, "push always finished before it could be killed");
    let before = list_keys(&srv, "interrupted/packs/").len() as u64;
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

/// One raw request with a body; returns (status, body bytes).
fn http_bytes(port: u16, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len()).unwrap();
    s.write_all(body).unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let split = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(!head.to_ascii_lowercase().contains("transfer-encoding: chunked"), "chunked answer: {head}");
    (code, buf[split + 4..].to_vec())
}

#[test]
fn corrupt_or_truncated_pack_on_s3_is_reported_never_restarted() {
    let srv = server();
    let mut s = Session::new("s3_corrupt");
    let cache = s.path("cache");
    let mut p = s.launch(&program("counter_heap"), &["-t", "100", "-m", "16"]);
    let pid = p.pid;
    p.wait_prefix("READY", LINE_TIMEOUT);
    p.wait_ticks(2, LINE_TIMEOUT);
    let g = s.checkpoint_bounded(&mut p);
    p.kill9();
    quit(&s);
    for (case, mangle) in [("bitflip", 0usize), ("truncated", 1)] {
        let dest = format!("s3://{BUCKET}/{case}");
        ok(&run_s3(&s, &srv, &cache, "push", &[&dest]), "push");
        // The largest pack holds memory chunks the restart needs.
        let keys = list_keys(&srv, &format!("{case}/packs/"));
        let mut best = (0usize, String::new());
        for k in &keys {
            let (code, body) = http_bytes(srv.port, "GET", &format!("/{BUCKET}/{k}"), b"");
            assert_eq!(code, 200);
            if body.len() > best.0 {
                best = (body.len(), k.clone());
            }
        }
        let key = best.1;
        let (_, mut body) = http_bytes(srv.port, "GET", &format!("/{BUCKET}/{key}"), b"");
        if mangle == 0 {
            for i in (8..body.len() / 2).step_by(4096) {
                body[i] ^= 0x40;
            }
        } else {
            body.truncate(body.len() / 2);
        }
        let (code, _) = http_bytes(srv.port, "PUT", &format!("/{BUCKET}/{key}"), &body);
        assert_eq!(code, 200);
        let name = key.rsplit('/').next().unwrap().trim_end_matches(".pack").to_string();
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
        let out = run_s3(&s2, &srv, &fresh, "pull", &[&dest, "--store", &format!("file://{}", s2.path("pulled").display())]);
        failed(&out, &format!("pull of a {case} pack"), &[&name, "corrupt"]);
        quit(&s2);
    }
    let _ = &mut s;
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
    let mut holder = Command::new("flock")
        .arg(lockdir.join("lock"))
        .args(["sleep", "30"])
        .spawn()
        .expect("flock(1)");
    std::thread::sleep(Duration::from_millis(300)); // let flock take the lock
    let mut c = s.cmd("push");
    c.arg(&dest);
    srv.apply(&mut c, &pcache);
    let out = run_with_timeout(c, CMD_TIMEOUT);
    failed(&out, "push while another writer holds the store", &["in use by another ckpt process"]);
    let _ = holder.kill();
    let _ = holder.wait();
    ok(&run_s3(&s, &srv, &pcache, "push", &[&dest]), "push once the lock is free");
}
