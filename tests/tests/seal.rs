//! Issue 14: a store that only its owner can read or forge. A program
//! holding a known secret is checkpointed to a real S3 server (moto on
//! loopback): no object in the bucket holds the secret (an unsealed store,
//! the control, does), and the restart passes the program's own checks. A
//! forged pack with catalog rows, an edited generation row and a replayed
//! old catalog are each refused by `ckpt verify` (naming what was altered)
//! and by `ckpt restart`, with no process of the image started. The key
//! moves to a "second machine" (another key directory) with `ckpt key
//! export/import`; without it, the restart there fails saying so.
mod common;
#[path = "common/s3.rs"]
mod s3srv;
use common::*;
use s3srv::S3Server;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BUCKET: &str = "ckpt-seal";

fn server() -> S3Server {
    S3Server::with_bucket(BUCKET)
}




/// The objects under `prefix` that hold `needle` (every object read by a
/// second, independent S3 client, boto3, which comes with moto), after
/// checking there are packs and a catalog among them.
fn objects_holding(s: &Session, srv: &S3Server, prefix: &str, needle: &[u8]) -> Vec<String> {
    let keys = srv.list_keys(BUCKET, prefix);
    assert!(keys.iter().any(|k| k.ends_with(".pack")), "no pack under {prefix}: {keys:?}");
    assert!(keys.iter().any(|k| k.ends_with("catalog.db")), "no catalog under {prefix}: {keys:?}");
    let dest = s.path(&format!("bucket-{}", prefix.trim_end_matches('/')));
    std::fs::create_dir_all(&dest).unwrap();
    let code = format!(
        "import sys, os, boto3\n\
         s3 = boto3.client('s3', endpoint_url='{}', region_name='us-east-1', aws_access_key_id='k', aws_secret_access_key='s')\n\
         n = 0\n\
         for page in s3.get_paginator('list_objects_v2').paginate(Bucket='{BUCKET}', Prefix=sys.argv[1]):\n\
         \x20   for o in page.get('Contents', []):\n\
         \x20       s3.download_file('{BUCKET}', o['Key'], os.path.join(sys.argv[2], o['Key'].replace('/', '%')))\n\
         \x20       n += 1\n\
         print(n)\n",
        srv.endpoint
    );
    let out = Command::new("python3").arg("-c").arg(&code).arg(prefix).arg(&dest).output().unwrap();
    assert!(out.status.success(), "boto3 download of {prefix}: {}", text(&out.stderr));
    let n: usize = text(&out.stdout).trim().parse().unwrap();
    assert_eq!(n, keys.len(), "boto3 fetched {n} objects, the listing has {}", keys.len());
    let found: Vec<String> = files_holding(&dest, needle).iter().map(|p| p.file_name().unwrap().to_string_lossy().replace('%', "/")).collect();
    let bytes: u64 = std::fs::read_dir(&dest).unwrap().flatten().map(|e| e.metadata().unwrap().len()).sum();
    eprintln!("scanned {n} objects ({bytes} bytes) under {prefix}: {} hold the secret", found.len());
    found
}

/// Every file under `dir` that holds `needle`.
fn files_holding(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        if p.is_dir() {
            stack.extend(std::fs::read_dir(&p).unwrap().flatten().map(|e| e.path()));
        } else if let Ok(b) = std::fs::read(&p)
            && b.windows(needle.len()).any(|w| w == needle)
        {
            out.push(p);
        }
    }
    out
}

/// A secret no other test uses, in a file for `counter_heap -S`.
fn secret(s: &Session) -> (String, PathBuf) {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let secret = format!("ckpt-seal-secret-{}-{t:x}-do-not-leak", std::process::id());
    let f = s.path("secret.txt");
    std::fs::write(&f, format!("{secret}\n")).unwrap();
    (secret, f)
}

/// `ckpt launch -- counter_heap -S SECRET ...` on `s.store` (S3), with
/// `env` added; waits for its first ticks.
fn launch_secret(s: &Session, srv: &S3Server, cache: &Path, secret_file: &Path, env: &[(&str, &str)]) -> Proc {
    let stop = s.stop_file();
    let mut c = s.cmd("launch");
    c.arg("--").arg(program("counter_heap")).args(["-t", "100", "-m", "8", "-s", stop.to_str().unwrap(), "-S", secret_file.to_str().unwrap()]);
    srv.apply(&mut c, cache);
    for (k, v) in env {
        c.env(k, v);
    }
    let mut p = Proc::spawn("launch counter_heap -S on s3".into(), c);
    s.track(p.child_pid());
    let line = p.wait_prefix("PID ", LINE_TIMEOUT);
    p.pid = line[4..].trim().parse().unwrap();
    p.wait_prefix("READY", LINE_TIMEOUT);
    p.wait_ticks(2, LINE_TIMEOUT);
    p
}

fn quit(s: &Session) {
    let _ = s.run("quit", &[]);
}

/// `ckpt SUB ARGS` on the session's store with the S3 variables, `cache`
/// and `env` added.
fn run_env(s: &Session, srv: Option<&S3Server>, cache: &Path, env: &[(&str, &str)], sub: &str, args: &[&str]) -> Output {
    let mut c = s.cmd(sub);
    c.args(args);
    if let Some(srv) = srv {
        srv.apply(&mut c, cache);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    run_with_timeout(c, CMD_TIMEOUT)
}

#[test]
fn sealed_s3_store_holds_no_plaintext_of_a_secret_and_restarts() {
    let srv = server();
    let mut s = Session::new("seal_secret");
    let (secret, secret_file) = secret(&s);

    // The control: an unsealed store keeps the secret's page as it is, so
    // the scan below can find it.
    s.store = format!("s3://{BUCKET}/plain");
    let cache_plain = s.path("cache-plain");
    let mut p = launch_secret(&s, &srv, &cache_plain, &secret_file, &[("CKPT_UNSEALED", "1")]);
    s.checkpoint_bounded(&mut p);
    p.kill9();
    quit(&s);
    let found = objects_holding(&s, &srv, "plain/", secret.as_bytes());
    assert!(!found.is_empty(), "the control failed: no object of the unsealed store holds the secret, so the scan proves nothing");

    // Sealed (the default): no object holds it, nor does the local cache.
    s.store = format!("s3://{BUCKET}/sealed");
    let cache_a = s.path("cache-a");
    let mut p = launch_secret(&s, &srv, &cache_a, &secret_file, &[]);
    let pid = p.pid;
    let _g1 = s.checkpoint_bounded(&mut p);
    p.wait_ticks(2, LINE_TIMEOUT);
    let g2 = s.checkpoint_bounded(&mut p);
    p.kill9();
    quit(&s);
    let found = objects_holding(&s, &srv, "sealed/", secret.as_bytes());
    assert!(found.is_empty(), "objects of the sealed store hold the secret in plaintext: {found:?}");
    let found = files_holding(&cache_a, secret.as_bytes());
    assert!(found.is_empty(), "files of the sealed store's cache hold the secret: {found:?}");

    // A fresh host (empty cache, same key): the restart passes the
    // program's own checks (its secret pages included).
    let cache_b = s.path("cache-b");
    let mut c = s.cmd("restart");
    srv.apply(&mut c, &cache_b);
    let mut r = s.restart_expect_with(c, &g2, pid);
    r.wait_ticks(3, LINE_TIMEOUT);
    r.finish(&s, 3);
    quit(&s);
}

/// Two generations of `counter_heap` in the session's local store; the
/// program is gone afterwards. Returns the generations.
fn two_generations(s: &Session) -> (Gen, Gen, i32) {
    let stop = s.stop_file();
    let mut p = s.launch(&program("counter_heap"), &["-t", "100", "-m", "8", "-s", stop.to_str().unwrap()]);
    p.wait_prefix("READY", LINE_TIMEOUT);
    p.wait_ticks(2, LINE_TIMEOUT);
    let g1 = s.checkpoint_bounded(&mut p);
    p.wait_ticks(2, LINE_TIMEOUT);
    let g2 = s.checkpoint_bounded(&mut p);
    let pid = p.pid;
    p.kill9();
    quit(s);
    (g1, g2, pid)
}

fn sql(catalog: &Path, q: &str) {
    let out = Command::new("sqlite3").arg(catalog).arg(q).output().unwrap();
    assert!(out.status.success(), "sqlite3 {q}: {}", text(&out.stderr));
}

fn copy_store(from: &Path, to: &Path) {
    let st = Command::new("cp").arg("-a").arg(from).arg(to).status().unwrap();
    assert!(st.success());
}

/// `ckpt restart GEN` (or the latest) must fail naming `needles`, and no
/// process of the image may run.
fn restart_refused(s: &Session, generation: Option<u64>, env: &[(&str, &str)], what: &str, needles: &[&str]) {
    let g = generation.map(|g| g.to_string());
    let args: Vec<&str> = g.iter().map(String::as_str).collect();
    let out = run_env(s, None, Path::new("/"), env, "restart", &args);
    failed(&out, what, needles);
    let running = s.running(&program("counter_heap"));
    assert!(running.is_empty(), "{what}: processes of the image run: {running:?}");
}

#[test]
fn forged_pack_edited_row_and_replayed_catalog_are_refused() {
    let mut s = Session::new("seal_tamper");
    let (g1, g2, _pid) = two_generations(&s);
    let good = s.store_dir.clone();
    let url = |d: &Path| format!("file://{}", d.display());
    let out = s.run("verify", &[]);
    ok(&out, "verify of an untouched sealed store");

    // 1. An edited row: generation 2 re-pointed at generation 1's manifest
    //    (a swap), and generation 1's process count changed.
    let edited = s.path("edited");
    copy_store(&good, &edited);
    s.store = url(&edited);
    sql(&edited.join("catalog.db"), &format!(
        "UPDATE generations SET manifest = (SELECT manifest FROM generations WHERE id = {a}) WHERE id = {b}; UPDATE generations SET nprocs = 7 WHERE id = {a};",
        a = g1.id,
        b = g2.id
    ));
    let out = s.run("verify", &[]);
    failed(&out, "verify of an edited catalog", &[&format!("generation {}: its catalog row does not match its MAC", g1.id), &format!("generation {}: its catalog row does not match its MAC", g2.id)]);
    restart_refused(&s, Some(g1.id), &[], "restart of an edited generation", &["tampered", &format!("generation {}", g1.id)]);
    restart_refused(&s, None, &[], "restart of the latest, edited, generation", &["tampered", &format!("generation {}", g2.id)]);

    // 2. A forged pack plus catalog rows: a generation made in another store
    //    (with another key, as anyone who can write the store could) moved
    //    in as the newest, with its pack.
    let forger = Session::new("seal_forger");
    let fkey = forger.path("forger.key");
    let fenv = [("CKPT_KEY_FILE", fkey.to_str().unwrap())];
    {
        let stop = forger.stop_file();
        let mut c = forger.cmd("launch");
        c.arg("--").arg(program("counter_heap")).args(["-t", "100", "-m", "8", "-s", stop.to_str().unwrap()]);
        c.envs(fenv);
        let mut p = Proc::spawn("forger's launch".into(), c);
        forger.track(p.child_pid());
        let line = p.wait_prefix("PID ", LINE_TIMEOUT);
        p.pid = line[4..].trim().parse().unwrap();
        p.wait_ticks(2, LINE_TIMEOUT);
        forger.checkpoint_bounded(&mut p);
        p.kill9();
        quit(&forger);
    }
    assert!(fkey.exists(), "the forger's store made no key at {}", fkey.display());
    let forged = s.path("forged");
    copy_store(&good, &forged);
    s.store = url(&forged);
    copy_store(&forger.store_dir.join("packs"), &forged.join("forged-packs"));
    for d in std::fs::read_dir(forged.join("forged-packs")).unwrap().flatten() {
        let to = forged.join("packs").join(d.file_name());
        std::fs::create_dir_all(&to).unwrap();
        for f in std::fs::read_dir(d.path()).unwrap().flatten() {
            std::fs::rename(f.path(), to.join(f.file_name())).unwrap();
        }
    }
    std::fs::remove_dir_all(forged.join("forged-packs")).unwrap();
    let forged_id = g2.id + 10;
    sql(&forged.join("catalog.db"), &format!(
        "ATTACH '{}' AS f; \
         INSERT INTO packs(name, size, nblobs, created) SELECT name, size, nblobs, created FROM f.packs; \
         INSERT OR IGNORE INTO blobs SELECT b.hash, p.id, b.offset, b.clen, b.ulen, b.kind FROM f.blobs b JOIN f.packs fp ON fp.id = b.pack_id JOIN packs p ON p.name = fp.name; \
         INSERT INTO generations SELECT {forged_id}, NULL, created_ms, duration_ms, nprocs, logical_bytes, new_bytes, stored_bytes, dirty_tracking, manifest, info, mac FROM f.generations; \
         UPDATE meta SET value = '{forged_id}' WHERE key = 'last_generation_id';",
        forger.store_dir.join("catalog.db").display()
    ));
    let out = s.run("verify", &[]);
    let err = failed(&out, "verify of a store with a forged pack and rows", &[&format!("generation {forged_id}: its catalog row does not match its MAC"), "does not open with the store's key"]);
    assert!(!err.contains(&format!("generation {}:", g1.id)) && !err.contains(&format!("generation {}:", g2.id)), "verify blames the untouched generations: {err}");
    restart_refused(&s, None, &[], "restart of the latest (forged) generation", &["tampered", &format!("generation {forged_id}")]);
    restart_refused(&s, Some(forged_id), &[], "restart of the forged generation", &["tampered", &format!("generation {forged_id}")]);

    // 3. A replayed catalog: the store as it was after generation 1 (a
    //    valid, MAC'd, older state) put back after generation 2 was made.
    let replayed = s.path("replayed");
    copy_store(&good, &replayed);
    s.store = url(&replayed);
    sql(&replayed.join("catalog.db"), &format!("DELETE FROM generations WHERE id = {}", g2.id));
    // (The rows that stay are untouched and MAC'd; only the newest is gone,
    // as in a copy of the catalog taken after generation 1.)
    let out = s.run("verify", &[]);
    failed(&out, "verify of a replayed catalog", &["older catalog", &format!("generation {}", g2.id), "head record"]);
    restart_refused(&s, Some(g1.id), &[], "restart from a replayed catalog", &["older catalog", &format!("generation {}", g2.id)]);

    // The untouched store still restarts (the refusals changed nothing).
    s.store = url(&good);
    let out = s.run("verify", &[]);
    ok(&out, "verify of the untouched store afterwards");
}

#[test]
fn key_export_import_restarts_on_a_second_machine() {
    let mut s = Session::new("seal_keys");
    let (_g1, g2, pid) = two_generations(&s);
    // The "second machine": another key directory (XDG_CONFIG_HOME), a
    // copy of the store.
    let other = s.path("machine-b");
    std::fs::create_dir_all(&other).unwrap();
    let benv = [("XDG_CONFIG_HOME", other.to_str().unwrap())];
    let copy = s.path("store-b");
    copy_store(&s.store_dir, &copy);
    let home_store = s.store.clone();
    s.store = format!("file://{}", copy.display());

    // Without the key: refused, saying so and naming the fix.
    restart_refused(&s, None, &benv, "restart without the key", &["has no key", "ckpt key import"]);
    let out = run_env(&s, None, Path::new("/"), &benv, "log", &[]);
    failed(&out, "log without the key", &["has no key", "ckpt key export"]);

    // Export on the first machine, import on the second.
    let exported = s.path("exported.key");
    let out = run_env(&s, None, Path::new("/"), &[], "key", &["export", "--store", &home_store, exported.to_str().unwrap()]);
    ok(&out, "ckpt key export");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&exported).unwrap().mode() & 0o777, 0o600, "the exported key is not private");
    let out = run_env(&s, None, Path::new("/"), &benv, "key", &["import", exported.to_str().unwrap()]);
    ok(&out, "ckpt key import");
    let keys = other.join("ckpt/keys");
    assert_eq!(std::fs::metadata(&keys).unwrap().mode() & 0o777, 0o700);
    for f in std::fs::read_dir(&keys).unwrap().flatten() {
        assert_eq!(f.metadata().unwrap().mode() & 0o777, 0o600, "{} is not private", f.path().display());
    }

    // Restart on the second machine: the program's checks pass.
    let mut c = s.cmd("restart");
    c.envs(benv);
    let mut r = s.restart_expect_with(c, &g2, pid);
    r.wait_ticks(2, LINE_TIMEOUT);
    r.finish(&s, 2);
    quit(&s);

    // A wrong key (another store's, through CKPT_KEY_FILE) is named as such.
    let wrong = s.path("wrong.key");
    std::fs::write(&wrong, exported_text_with_other_key(&std::fs::read_to_string(&exported).unwrap())).unwrap();
    std::fs::set_permissions(&wrong, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let out = run_env(&s, None, Path::new("/"), &[("CKPT_KEY_FILE", wrong.to_str().unwrap())], "log", &[]);
    failed(&out, "log with a wrong key", &["is not the key of store"]);
}

/// The exported key text with another master key (same store id).
fn exported_text_with_other_key(t: &str) -> String {
    t.lines()
        .filter(|l| !l.starts_with("head "))
        .map(|l| if l.starts_with("key ") { format!("key {}", "ab".repeat(32)) } else { l.to_string() })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

#[test]
fn old_unsealed_store_is_sealed_in_place_and_restarts() {
    let s = Session::new("seal_migrate");
    let (secret, secret_file) = secret(&s);
    let stop = s.stop_file();
    let mut p = s.launch_env(&program("counter_heap"), &["-t", "100", "-m", "8", "-s", stop.to_str().unwrap(), "-S", secret_file.to_str().unwrap()], &[("CKPT_UNSEALED", "1")]);
    p.wait_prefix("READY", LINE_TIMEOUT);
    p.wait_ticks(2, LINE_TIMEOUT);
    let g1 = s.checkpoint_bounded(&mut p);
    p.wait_ticks(2, LINE_TIMEOUT);
    let g2 = s.checkpoint_bounded(&mut p);
    let pid = p.pid;
    p.kill9();
    quit(&s);
    // The control: the unsealed store holds the secret; ckpt says it is
    // not sealed and names the command.
    assert!(!files_holding(&s.store_dir, secret.as_bytes()).is_empty(), "the unsealed store does not hold the secret: the check below proves nothing");
    let out = s.run("log", &[]);
    let err = text(&out.stderr);
    assert!(out.status.success() && err.contains("not sealed") && err.contains("ckpt store seal"), "log of an unsealed store: {err}");

    let out = s.run("store", &["seal", "--store", &s.store]);
    let err = text(&out.stderr);
    assert!(out.status.success(), "ckpt store seal failed: {err}");
    assert!(err.contains("sealed:") && err.contains("2 generations"), "{err}");
    let found = files_holding(&s.store_dir, secret.as_bytes());
    assert!(found.is_empty(), "the sealed store still holds the secret: {found:?}");
    let out = s.run("log", &[]);
    assert!(out.status.success() && !text(&out.stderr).contains("not sealed"), "{}", text(&out.stderr));
    let log = text(&out.stdout);
    assert!(log.contains(&g1.id.to_string()) && log.contains(&g2.id.to_string()), "a generation was lost: {log}");
    ok(&s.run("verify", &[]), "verify after sealing");
    // Sealing again is a no-op.
    ok(&s.run("store", &["seal", "--store", &s.store]), "second ckpt store seal");

    let mut r = s.restart_expect(&g2, pid, true);
    r.wait_ticks(2, LINE_TIMEOUT);
    r.finish(&s, 2);
    quit(&s);
}

/// `kill -9` of `ckpt store seal` after writing the key, after writing the
/// sealed packs, after the catalog commit and after moving the key: each
/// time the store opens with both generations, a second seal completes,
/// `verify` is clean; the last one restarts. Each copy of the store has a
/// key file of its own (`CKPT_KEY_FILE`): the copies share a store id.
#[test]
fn store_seal_killed_at_every_step_loses_no_generation() {
    let mut s = Session::new("seal_kill9");
    let stop = s.stop_file();
    let mut p = s.launch_env(&program("counter_heap"), &["-t", "100", "-m", "8", "-s", stop.to_str().unwrap()], &[("CKPT_UNSEALED", "1")]);
    p.wait_prefix("READY", LINE_TIMEOUT);
    p.wait_ticks(2, LINE_TIMEOUT);
    let g1 = s.checkpoint_bounded(&mut p);
    p.wait_ticks(2, LINE_TIMEOUT);
    let g2 = s.checkpoint_bounded(&mut p);
    let pid = p.pid;
    p.kill9();
    quit(&s);
    let template = s.store_dir.clone();
    for phase in ["after-key", "after-packs", "after-commit", "after-key-move"] {
        let copy = s.path(&format!("store-{phase}"));
        copy_store(&template, &copy);
        s.store = format!("file://{}", copy.display());
        let key = s.path(&format!("key-{phase}"));
        let env = [("CKPT_KEY_FILE", key.to_str().unwrap())];
        let mut c = s.cmd("store");
        c.args(["seal", "--store", &s.store]).envs(env).env("CKPT_SEAL_PAUSE_AT", phase);
        c.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
        let mut child = c.spawn().unwrap();
        assert!(wait_paused(&mut child, phase, CMD_TIMEOUT), "the seal finished without reaching {phase}");
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let log = ok(&run_env(&s, None, Path::new("/"), &env, "log", &[]), &format!("log after a seal killed {phase}"));
        assert!(log.contains(&g1.id.to_string()) && log.contains(&g2.id.to_string()), "killed {phase}: a generation was lost: {log}");
        ok(&run_env(&s, None, Path::new("/"), &env, "verify", &[]), &format!("verify after a seal killed {phase}"));
        let out = run_env(&s, None, Path::new("/"), &env, "store", &["seal", "--store", &s.store]);
        ok(&out, &format!("seal again after one killed {phase}"));
        ok(&run_env(&s, None, Path::new("/"), &env, "verify", &[]), &format!("verify after sealing again ({phase})"));
        let out = run_env(&s, None, Path::new("/"), &env, "log", &[]);
        assert!(out.status.success() && !text(&out.stderr).contains("not sealed"), "killed {phase}, sealed again: {}", text(&out.stderr));
        if phase == "after-key-move" {
            let mut c = s.cmd("restart");
            c.envs(env);
            let mut r = s.restart_expect_with(c, &g2, pid);
            r.wait_ticks(2, LINE_TIMEOUT);
            r.finish(&s, 2);
            quit(&s);
        }
    }
}
