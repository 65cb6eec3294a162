//! Issue 10, the store: it is private whatever the umask, names from a
//! tampered catalog are never used as paths, one store serves one
//! computation, and the launch faults (`--interval 0`, a missing program)
//! start nothing.
mod common;
use common::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn launch_counter(s: &Session) -> Proc {
    let stop = s.stop_file();
    let mut p = s.launch(&program("counter_heap"), &["-t", "100", "-m", "8", "-s", stop.to_str().unwrap()]);
    p.wait_prefix("READY", LINE_TIMEOUT);
    p.wait_ticks(2, LINE_TIMEOUT);
    p
}

/// Every entry under `root` (not following symlinks) with its mode.
fn modes(root: &Path) -> Vec<(std::path::PathBuf, u32, bool)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let md = std::fs::symlink_metadata(&p).unwrap();
        out.push((p.clone(), md.mode() & 0o7777, md.is_dir()));
        if md.is_dir() {
            for e in std::fs::read_dir(&p).unwrap().flatten() {
                stack.push(e.path());
            }
        }
    }
    out
}

fn assert_private(root: &Path) {
    let all = modes(root);
    assert!(all.iter().any(|(p, _, _)| p.extension().is_some_and(|e| e == "pack")), "no pack file in {}", root.display());
    for (p, mode, dir) in &all {
        let want = if *dir { 0o700 } else { 0o600 };
        assert_eq!(*mode, want, "{} has mode {mode:o}, not {want:o}", p.display());
    }
}

fn sql(catalog: &Path, q: &str) {
    let out = Command::new("sqlite3").arg(catalog).arg(q).output().unwrap();
    assert!(out.status.success(), "sqlite3 {q}: {}", text(&out.stderr));
}

#[test]
fn store_is_private_whatever_the_umask() {
    let s = Session::new("trust_store_umask");
    // The whole chain (launch, its coordinator, the checkpoint) under umask 000.
    let mut c = s.cmd("launch");
    let stop = s.stop_file();
    c.arg("--").arg(program("counter_heap")).args(["-t", "100", "-m", "8", "-s", stop.to_str().unwrap()]);
    // SAFETY: umask is async-signal-safe; nothing else runs in the child.
    unsafe {
        c.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let mut p = Proc::spawn("launch under umask 000".into(), c);
    s.track(p.child_pid());
    p.pid = p.child_pid();
    p.wait_prefix("READY", LINE_TIMEOUT);
    let mut ck = s.cmd("checkpoint");
    // SAFETY: as above.
    unsafe {
        ck.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let out = run_with_timeout(ck, CMD_TIMEOUT);
    assert!(out.status.success(), "checkpoint failed: {}", text(&out.stderr));
    assert_private(&s.store_dir);
    assert!(s.store_dir.join("catalog.db-wal").exists(), "no WAL file to check");

    // A store with loose modes (made by an older ckpt, or copied) is
    // tightened when its owner opens it.
    let pack = modes(&s.store_dir).into_iter().find(|(p, _, _)| p.extension().is_some_and(|e| e == "pack")).unwrap().0;
    std::fs::set_permissions(&pack, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(&s.store_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(s.store_dir.join("catalog.db"), std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = s.run("log", &[]);
    assert!(out.status.success(), "ckpt log failed: {}", text(&out.stderr));
    assert!(text(&out.stderr).contains("private"), "no warning that the store was made private: {}", text(&out.stderr));
    assert_private(&s.store_dir);
    // and the computation is still served
    s.checkpoint();
    p.wait_ticks(2, LINE_TIMEOUT);
    p.finish(&s, 2);
}

#[test]
fn tampered_pack_name_makes_gc_delete_nothing_outside_the_store() {
    let s = Session::new("trust_store_gc");
    let mut p = launch_counter(&s);
    s.checkpoint();
    s.checkpoint();
    // gc between checkpoints works while the coordinator owns the store
    let out = s.run("gc", &["--keep-last", "1"]);
    assert!(out.status.success(), "gc of an untampered store failed: {}", text(&out.stderr));

    // A pack row no blob uses (gc would delete its file) named to leave the
    // store: `<root>/packs/../../x.pack` is the session dir's x.pack.
    let canary = s.dir.join("x.pack");
    std::fs::write(&canary, b"not ckpt's").unwrap();
    let canary2 = s.dir.parent().unwrap().join(format!("trust-store-canary-{}.pack", std::process::id()));
    std::fs::write(&canary2, b"not ckpt's").unwrap();
    let catalog = s.store_dir.join("catalog.db");
    sql(&catalog, &format!(
        "INSERT INTO packs(name, size, nblobs, created) VALUES ('../x', 10, 0, 0), ('../../trust-store-canary-{}', 10, 0, 0)",
        std::process::id()
    ));
    let out = s.run("gc", &["--keep-last", "1"]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "gc of a tampered catalog succeeded:\n{}", text(&out.stdout));
    assert!(err.contains("../x") || err.contains("trust-store-canary"), "gc does not name the bad row: {err}");
    assert!(err.contains("tampered"), "gc does not say the store may have been tampered with: {err}");
    assert_eq!(std::fs::read(&canary).unwrap(), b"not ckpt's", "gc touched {}", canary.display());
    assert_eq!(std::fs::read(&canary2).unwrap(), b"not ckpt's", "gc touched {}", canary2.display());
    let _ = std::fs::remove_file(&canary2);
    // verify reports it too, and the coordinator still serves its computation
    let out = s.run("verify", &[]);
    assert!(!out.status.success(), "verify passed a tampered catalog");
    s.checkpoint();
    p.wait_ticks(2, LINE_TIMEOUT);
    p.finish(&s, 2);
}

#[test]
fn second_coordinator_on_a_store_is_refused_naming_the_first() {
    let s = Session::new("trust_store_owner");
    let mut p = launch_counter(&s);
    let other = format!("unix:{}", s.path("other.sock").display());
    let mut c = Command::new(&s.ckpt);
    c.args(["coordinator", "--coord", &other, "--store", &s.store]).current_dir(&s.dir);
    let t0 = Instant::now();
    let out = run_with_timeout(c, CMD_TIMEOUT);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "a second coordinator on the store started");
    assert!(t0.elapsed() < Duration::from_secs(20), "refusal took {:?}", t0.elapsed());
    assert!(err.contains("one store serves one computation"), "{err}");
    assert!(err.contains(&s.coord), "the refusal does not name the first coordinator's address {}: {err}", s.coord);
    assert!(err.contains("pid "), "the refusal does not name the first coordinator's pid: {err}");
    // the first still serves its computation
    s.checkpoint();
    p.wait_ticks(2, LINE_TIMEOUT);

    // A dead owner does not block: kill -9 the first coordinator, then a
    // new one takes the store.
    let out = s.run("status", &["--json"]);
    let st = Json::parse(&text(&out.stdout)).unwrap();
    let cpid = st.get("coordinator").and_then(|c| c.get("pid")).and_then(Json::as_u64).expect("coordinator pid") as i32;
    sigkill(cpid);
    wait_gone(cpid, Duration::from_secs(10));
    let mut c = Command::new(&s.ckpt);
    // (the daemon keeps its stdio: a log file, not the test's pipes)
    let log = std::fs::File::create(s.path("second-coordinator.log")).unwrap();
    c.args(["coordinator", "--daemonize", "--coord", &other, "--store", &s.store])
        .current_dir(&s.dir)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    let st = c.status().unwrap();
    assert!(
        st.success(),
        "a coordinator after the first died was refused: {}",
        std::fs::read_to_string(s.path("second-coordinator.log")).unwrap_or_default()
    );
    let mut q = Command::new(&s.ckpt);
    q.args(["quit", "--coord", &other]);
    let out = run_with_timeout(q, CMD_TIMEOUT);
    assert!(out.status.success(), "quit: {}", text(&out.stderr));
    p.kill9();
}

#[test]
fn interval_below_the_minimum_is_refused() {
    let s = Session::new("trust_store_interval");
    let mut c = s.cmd("launch");
    c.args(["--interval", "0", "--"]).arg(program("counter_heap")).args(["-t", "100"]);
    let out = run_with_timeout(c, CMD_TIMEOUT);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "--interval 0 was accepted");
    assert!(err.contains("too short") && err.contains("1 s"), "the refusal does not give the minimum: {err}");
    assert!(!text(&out.stdout).contains("PID"), "the program ran");
    assert!(!s.store_dir.exists(), "a store was created");
    let out = s.run("status", &[]);
    assert!(text(&out.stdout).contains("none running"), "a coordinator runs: {}", text(&out.stdout));
}

#[test]
fn launch_of_a_missing_program_leaves_nothing_behind() {
    let s = Session::new("trust_store_noprog");
    for prog in ["/nonexistent/prog", "ckpt-no-such-program"] {
        let mut c = s.cmd("launch");
        c.args(["--", prog]);
        let out = run_with_timeout(c, CMD_TIMEOUT);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "launch of {prog} succeeded");
        assert!(err.contains(prog) && err.contains("no such executable"), "the error does not say {prog} was not found: {err}");
        assert!(!s.store_dir.exists(), "launch of {prog} left a store behind");
        let out = s.run("status", &[]);
        assert!(text(&out.stdout).contains("none running"), "launch of {prog} left a coordinator: {}", text(&out.stdout));
    }
    // A program that exists but cannot be executed (exec fails after the
    // coordinator started): the coordinator and the new store are undone.
    let bad = s.path("no-interpreter");
    std::fs::write(&bad, b"#!/nonexistent/interpreter\n").unwrap();
    std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut c = s.cmd("launch");
    c.arg("--").arg(&bad);
    let out = run_with_timeout(c, CMD_TIMEOUT);
    assert!(!out.status.success(), "launch of a non-executable succeeded");
    assert!(text(&out.stderr).contains("cannot run"), "{}", text(&out.stderr));
    assert!(!s.store_dir.exists(), "launch of a non-executable left a store behind");
    let out = s.run("status", &[]);
    assert!(text(&out.stdout).contains("none running"), "launch of a non-executable left a coordinator: {}", text(&out.stdout));
}

/// A forged generation whose image names a region `/dev/shm/../../PATH`
/// (a well-formed blob under its right hash, committed through the store's
/// own writer, as anyone who can write the store could) is refused by
/// `ckpt restart` before any process starts, and no file is made there.
#[test]
fn forged_region_name_is_refused_before_any_process_starts() {
    let s = Session::new("trust-forged-region");
    let mut p = launch_counter(&s);
    let g = s.checkpoint_bounded(&mut p);
    p.kill9();
    assert!(s.run("quit", &[]).status.success());

    let target = s.dir.join("forged-by-the-image");
    let store = ckpt_store::Store::open(&s.store).unwrap();
    let info = store.generation(g.id).unwrap();
    let mut manifest: serde_json::Value = serde_json::from_slice(&store.read_blob(&info.manifest).unwrap()).unwrap();
    let entry = &mut manifest["processes"][0];
    let image_hash: ckpt_store::Hash = serde_json::from_value(entry["image"].clone()).unwrap();
    let mut image: serde_json::Value = serde_json::from_slice(&store.read_blob(&image_hash).unwrap()).unwrap();
    let region = image["regions"].as_array_mut().unwrap().iter_mut().find(|r| r["name"].as_str().is_some_and(|n| n.starts_with('/'))).expect("a file-backed region");
    let evil = format!("/dev/shm/../..{}", target.display());
    region["name"] = serde_json::Value::String(evil.clone());
    let w = store.writer().unwrap();
    let forged_image = w.put_meta(&serde_json::to_vec(&image).unwrap()).unwrap();
    entry["image"] = serde_json::Value::String(forged_image.to_hex());
    let forged_manifest = w.put_meta(&serde_json::to_vec(&manifest).unwrap()).unwrap();
    let forged = w
        .commit(ckpt_store::NewGeneration {
            parent: Some(info.id),
            created_ms: info.created_ms + 1,
            duration_ms: 1,
            nprocs: info.nprocs,
            logical_bytes: info.logical_bytes,
            dirty_tracking: info.dirty_tracking.clone(),
            manifest: forged_manifest,
            info: serde_json::json!({}),
        })
        .unwrap();
    drop(w);
    drop(store);

    let out = s.run("restart", &[&forged.id.to_string()]);
    assert!(!out.status.success(), "the forged generation restarted");
    let err = text(&out.stderr);
    assert!(err.contains(&evil) && err.contains("tampered"), "the refusal does not name the value and the tampering: {err}");
    assert!(!pid_exists(p.pid), "a process was started for the forged generation");
    assert!(!target.exists(), "the forged name made a file");
    // The genuine generation still restarts.
    let mut r = s.restart_expect(&g, p.pid, false);
    r.wait_ticks(2, LINE_TIMEOUT);
    r.kill9();
}
