//! Bad input and faults (issue 2): each must give a clear error and a
//! non-zero exit, start nothing half-way, overwrite nothing, and leave the
//! earlier generations restartable.
mod common;
use common::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn launch_counter(s: &Session, mib: &str, extra: &[&str]) -> Proc {
    let stop = s.stop_file();
    let mut args = vec!["-t", "100", "-m", mib, "-s", stop.to_str().unwrap()];
    args.extend_from_slice(extra);
    let mut p = s.launch(&program("counter_heap"), &args);
    p.wait_prefix("READY", LINE_TIMEOUT);
    p.wait_ticks(2, LINE_TIMEOUT);
    p
}

fn assert_failed(out: &std::process::Output, what: &str) -> String {
    let err = text(&out.stderr);
    assert!(
        !out.status.success(),
        "{what} succeeded but must fail\nstdout: {}\nstderr: {err}",
        text(&out.stdout)
    );
    assert!(!err.trim().is_empty(), "{what} failed ({}) without a message on stderr", out.status);
    assert!(
        !text(&out.stdout).lines().any(|l| l.starts_with("TICK")),
        "{what} failed but the program printed ticks:\n{}",
        text(&out.stdout)
    );
    err
}

fn mentions_any(msg: &str, words: &[&str]) -> bool {
    let m = msg.to_lowercase();
    words.iter().any(|w| m.contains(w))
}

#[test]
fn restart_while_original_runs_is_refused() {
    let s = Session::new("restart_while_running");
    let mut p = launch_counter(&s, "32", &[]);
    let pid = p.pid;
    s.checkpoint_bounded(&mut p);
    let out = s.run("restart", &[]);
    let err = assert_failed(&out, "ckpt restart while the original runs");
    assert!(err.contains(&pid.to_string()), "the error does not name pid {pid}: {err}");
    assert_eq!(s.running(&program("counter_heap")), vec![pid], "a second copy was started");
    // the original is unaffected
    p.wait_ticks(3, LINE_TIMEOUT);
    p.finish(&s, 2);
}

/// Root's restart whose PID an unrelated process took since: the
/// generation comes back in PID, mount and IPC namespaces of its own,
/// with its PID there (the program checks getpid() every tick), is
/// checkpointed again through ckpt's init there, and restarts again.
#[test]
fn restart_when_pid_is_taken_runs_in_a_pid_namespace_of_its_own() {
    let s = Session::new("restart_pid_taken");
    let mut p = launch_counter(&s, "32", &[]);
    let pid = p.pid;
    let g = s.checkpoint_bounded(&mut p);
    p.kill9();
    let mut holder = occupy_pid(pid).unwrap_or_else(|| panic!("could not make a process take pid {pid}"));
    let mut r = s.restart(None, pid);
    r.wait_ticks(2, RESTART_TIMEOUT);
    let first = r.first_tick.unwrap();
    assert!(first >= g.lo && first <= g.hi, "the restart continued at tick {first}, not in {}..={}\n{}", g.lo, g.hi, r.context());
    assert!(r.stderr().contains("namespaces of its own"), "the restart does not say it made namespaces:\n{}", r.context());
    assert_eq!(s.computation(), vec![pid], "the coordinator does not list the restored process with its PID");
    assert!(holder.try_wait().unwrap().is_none(), "the process holding pid {pid} was disturbed");
    // Checkpointed in its namespaces (by ckpt's init there), killed and
    // restarted again: the PID is still taken outside.
    let g2 = s.checkpoint_bounded(&mut r);
    let out = s.run("kill", &[]);
    assert!(out.status.success(), "ckpt kill failed: {}", text(&out.stderr));
    r.wait_exit(CMD_TIMEOUT);
    let mut r2 = s.restart(None, pid);
    r2.wait_ticks(2, RESTART_TIMEOUT);
    let first = r2.first_tick.unwrap();
    assert!(first >= g2.lo && first <= g2.hi, "the second restart continued at tick {first}, not in {}..={}\n{}", g2.lo, g2.hi, r2.context());
    let target = r2.last_tick.unwrap() + 2;
    s.stop_at(target);
    r2.wait_line(|l| l == "DONE", LINE_TIMEOUT);
    let st = r2.wait_exit(LINE_TIMEOUT);
    assert!(st.success(), "the restarted program ended with {st}\n{}", r2.context());
    let _ = holder.kill();
    let _ = holder.wait();
}

#[test]
fn unsupported_fd_fails_checkpoint_and_program_keeps_running() {
    let s = Session::new("unsupported_fd");
    let ctl = s.path("ctl");
    let stop = s.stop_file();
    let mut p = s.launch(
        &program("bad_fd"),
        &["-t", "100", "-k", "pidfd", "-f", "57", "-c", ctl.to_str().unwrap(), "-s", stop.to_str().unwrap()],
    );
    let pid = p.pid;
    p.wait_prefix("READY", LINE_TIMEOUT);
    p.wait_ticks(2, LINE_TIMEOUT);
    let g1 = s.checkpoint_bounded(&mut p);

    std::fs::write(ctl.with_extension("open"), "").unwrap();
    p.wait_prefix("OPENED fd=57", LINE_TIMEOUT);
    p.wait_ticks(1, LINE_TIMEOUT);
    let out = s.try_checkpoint();
    let err = assert_failed(&out, "ckpt checkpoint of a process holding a pidfd");
    assert!(err.contains(&pid.to_string()), "the error does not name the process {pid}: {err}");
    assert!(err.contains("57"), "the error does not name fd 57: {err}");
    assert!(err.to_lowercase().contains("pidfd"), "the error does not name the fd kind pidfd: {err}");
    // the program keeps running, its pidfd working
    p.wait_ticks(3, LINE_TIMEOUT);
    assert!(p.lines.iter().rev().take(2).all(|l| !l.starts_with("TICK") || l.ends_with("open=1")));
    let gens = s.generations();
    assert_eq!(gens.keys().copied().collect::<Vec<_>>(), vec![g1.id], "a generation was committed");

    // without the pidfd, checkpoints work again and restart
    std::fs::write(ctl.with_extension("close"), "").unwrap();
    p.wait_prefix("CLOSED fd=57", LINE_TIMEOUT);
    p.wait_ticks(1, LINE_TIMEOUT);
    let g2 = s.checkpoint_bounded(&mut p);
    assert_eq!(s.generations().len(), 2);
    p.kill9();
    let mut r = s.restart_expect(&g2, pid, true);
    r.wait_ticks(2, LINE_TIMEOUT);
    r.finish(&s, 2);
}

fn make_not_a_store(dir: &Path) {
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(dir.join("notes.txt"), "my precious notes\n").unwrap();
    std::fs::write(dir.join("sub/data.bin"), [1u8, 2, 3, 4]).unwrap();
}

#[test]
fn store_path_that_is_not_a_store_is_refused() {
    let s = Session::new("not_a_store");
    let bad = s.path("notastore");
    make_not_a_store(&bad);
    let before = snapshot_dir(&bad);
    let url = format!("file://{}", bad.display());

    for args in [vec!["log", "--store", &url], vec!["log", "--store", &url, "--json"], vec!["restart", "--store", &url, "--coord", &s.coord]] {
        let mut c = Command::new(&s.ckpt);
        c.args(&args).current_dir(&s.dir).env_remove("CKPT_STORE");
        let out = run_with_timeout(c, CMD_TIMEOUT);
        let err = assert_failed(&out, &format!("ckpt {}", args.join(" ")));
        assert!(err.contains(bad.to_str().unwrap()), "the error does not name the path {}: {err}", bad.display());
        assert_eq!(snapshot_dir(&bad), before, "ckpt {} modified {}", args.join(" "), bad.display());
    }

    // a computation launched with it: launch or checkpoint must fail, and the dir stays as it was
    let mut c = Command::new(&s.ckpt);
    let stop = s.stop_file();
    c.args(["launch", "--store", &url, "--coord", &s.coord, "--"])
        .arg(program("counter_heap"))
        .args(["-t", "100", "-m", "16", "-s", stop.to_str().unwrap()])
        .current_dir(&s.dir)
        .env_remove("CKPT_STORE");
    let mut p = Proc::spawn("launch with a non-store".into(), c);
    s.track(p.child_pid());
    p.pid = p.child_pid();
    match p.try_next_line(LINE_TIMEOUT) {
        Ok(Some(l)) if l.starts_with("PID") => {
            p.wait_ticks(2, LINE_TIMEOUT);
            let out = s.try_checkpoint();
            let err = assert_failed(&out, "ckpt checkpoint into a non-store");
            assert!(err.contains(bad.to_str().unwrap()), "the error does not name the path: {err}");
            p.wait_ticks(2, LINE_TIMEOUT);
        }
        other => {
            let st = p.wait_exit(CMD_TIMEOUT);
            assert!(!st.success(), "launch printed {other:?} and exited 0");
            assert!(p.stderr().contains(bad.to_str().unwrap()), "launch's error does not name the path: {}", p.stderr());
        }
    }
    assert_eq!(snapshot_dir(&bad), before, "ckpt modified {}", bad.display());
}

/// Flips bytes all over every pack file: the restart must fail clearly
/// instead of restoring wrong memory.
#[test]
fn corrupt_pack_fails_restart_clearly() {
    let s = Session::new("corrupt_pack");
    let mut p = launch_counter(&s, "32", &[]);
    s.checkpoint_bounded(&mut p);
    p.kill9();
    let packs = files_under(&s.store_dir.join("packs"));
    assert!(!packs.is_empty(), "no pack files under {}/packs", s.store_dir.display());
    for f in &packs {
        let mut b = std::fs::read(f).unwrap();
        let n = b.len();
        let mut off = n / 3;
        while off < n {
            b[off] ^= 0x5a;
            off += 64 * 1024;
        }
        if n > 1 {
            b[n / 2] ^= 0xff;
        }
        std::fs::write(f, b).unwrap();
    }
    let out = s.run("restart", &[]);
    let err = assert_failed(&out, "ckpt restart from a corrupt pack");
    assert!(
        mentions_any(&err, &["corrupt", "checksum", "hash", "mismatch", "decompress", "zstd", "pack", "chunk"]),
        "the error does not say what is wrong: {err}"
    );
    assert!(s.running(&program("counter_heap")).is_empty(), "a process was left running");
}

#[test]
fn missing_pack_fails_restart_clearly() {
    let s = Session::new("missing_pack");
    let mut p = launch_counter(&s, "16", &[]);
    s.checkpoint_bounded(&mut p);
    p.kill9();
    let packs = files_under(&s.store_dir.join("packs"));
    assert!(!packs.is_empty(), "no pack files under {}/packs", s.store_dir.display());
    for f in &packs {
        std::fs::remove_file(f).unwrap();
    }
    let out = s.run("restart", &[]);
    let err = assert_failed(&out, "ckpt restart with its packs deleted");
    assert!(
        mentions_any(&err, &["missing", "not found", "no such", "pack", "chunk"]),
        "the error does not say what is missing: {err}"
    );
    assert!(s.running(&program("counter_heap")).is_empty(), "a process was left running");
}

/// A catalog written by a newer ckpt (higher `PRAGMA user_version`, read
/// from the SQLite header) is refused, and not modified.
#[test]
fn catalog_from_newer_schema_is_refused() {
    let s = Session::new("newer_schema");
    let mut p = launch_counter(&s, "16", &[]);
    s.checkpoint_bounded(&mut p);
    p.kill9();
    let q = s.run("quit", &[]);
    assert!(q.status.success(), "ckpt quit failed: {}", text(&q.stderr));
    let cat = s.store_dir.join("catalog.db");
    let wal = s.store_dir.join("catalog.db-wal");
    assert!(cat.is_file(), "no catalog at {}", cat.display());
    assert!(
        std::fs::metadata(&wal).map(|m| m.len() == 0).unwrap_or(true),
        "the catalog's WAL was not checkpointed after ckpt quit"
    );
    let mut b = std::fs::read(&cat).unwrap();
    assert_eq!(&b[..16], b"SQLite format 3\0");
    b[60..64].copy_from_slice(&9999u32.to_be_bytes());
    std::fs::write(&cat, &b).unwrap();
    let before = snapshot_dir(&s.store_dir);
    for sub in ["log", "restart"] {
        let out = s.run(sub, &[]);
        let err = assert_failed(&out, &format!("ckpt {sub} on a newer catalog"));
        assert!(mentions_any(&err, &["schema", "version", "newer"]), "ckpt {sub}: unclear error: {err}");
        let after = snapshot_dir(&s.store_dir);
        assert_eq!(after.get(&cat), before.get(&cat), "ckpt {sub} modified the catalog");
    }
}

/// A program with a 256 MiB heap, checkpointed once (`g1`), then its whole
/// heap rewritten and a checkpoint of it started in the background and given
/// a moment to get under way (no output tells that it is).
fn start_large_checkpoint(s: &Session) -> (Proc, Gen, Proc) {
    let churn = s.path("churn");
    let mut p = launch_counter(s, "256", &["-c", churn.to_str().unwrap()]);
    let g1 = s.checkpoint_bounded(&mut p);
    std::fs::write(&churn, "").unwrap();
    p.wait_prefix("CHURNED", LINE_TIMEOUT);
    p.wait_ticks(1, LINE_TIMEOUT);
    let mut c = s.cmd("checkpoint");
    c.stdin(std::process::Stdio::null());
    let ck = Proc::spawn("checkpoint".into(), c);
    std::thread::sleep(Duration::from_millis(300));
    (p, g1, ck)
}

/// `kill -9` of the program while a large checkpoint is being taken: no
/// half-committed generation; the earlier one still restarts.
#[test]
fn kill9_program_during_checkpoint_commits_nothing_partial() {
    let s = Session::new("kill9_program");
    let (mut p, g1, mut ck) = start_large_checkpoint(&s);
    let pid = p.pid;
    p.kill9();
    let st = ck.wait_exit(CMD_TIMEOUT);
    let gens = s.generations();
    eprintln!("checkpoint during kill: {st}, stderr {}; generations {:?}", ck.stderr(), gens.keys());
    if st.success() {
        // it completed before the kill: then it must be whole and restartable
        let last = *gens.keys().last().unwrap();
        assert!(last > g1.id);
        let mut r = s.restart(None, pid);
        r.wait_ticks(2, RESTART_TIMEOUT);
        r.finish(&s, 2);
    } else {
        assert!(!ck.stderr().trim().is_empty(), "the failed checkpoint gave no message");
        assert_eq!(gens.keys().copied().collect::<Vec<_>>(), vec![g1.id], "a generation was committed");
        let mut r = s.restart_expect(&g1, pid, true);
        r.wait_ticks(2, LINE_TIMEOUT);
        r.finish(&s, 2);
    }
}

/// `kill -9` of the `ckpt checkpoint` command itself mid-checkpoint: the
/// program keeps running, later checkpoints work, every generation in the
/// log restarts.
#[test]
fn kill9_ckpt_command_during_checkpoint() {
    let s = Session::new("kill9_ckpt");
    let (mut p, g1, mut ck) = start_large_checkpoint(&s);
    let pid = p.pid;
    ck.pid = ck.child_pid();
    if pid_alive(ck.pid) {
        ck.kill9();
    }
    // the program keeps running and can be checkpointed again
    p.wait_ticks(3, Duration::from_secs(60));
    let g = s.checkpoint_bounded(&mut p);
    assert!(g.id > g1.id);
    let gens = s.generations();
    assert!(gens.contains_key(&g1.id) && gens.contains_key(&g.id), "{gens:?}");
    p.kill9();
    let mut r = s.restart_expect(&g, pid, true);
    r.wait_ticks(2, LINE_TIMEOUT);
    r.kill9();
    let mut r = s.restart_expect(&g1, pid, false);
    r.wait_ticks(2, LINE_TIMEOUT);
    r.finish(&s, 2);
}

/// `kill -9` of the coordinator while it writes a large checkpoint: the
/// program is released (its agent sees the connection drop), no partial
/// generation appears, the forked snapshot does not linger, and earlier
/// generations still restart.
#[test]
fn kill9_coordinator_during_checkpoint() {
    let s = Session::new("kill9_coordinator");
    let (mut p, g1, mut ck) = start_large_checkpoint(&s);
    let pid = p.pid;
    let status = s.run("status", &["--json"]);
    let coord_pid = text(&status.stdout)
        .lines()
        .find_map(|l| l.trim().strip_prefix("\"pid\": ").map(|v| v.trim_end_matches(',').parse::<i32>().unwrap()))
        .expect("coordinator pid in `ckpt status --json`");
    let killed = std::process::Command::new("kill").args(["-9", &coord_pid.to_string()]).status().unwrap();
    assert!(killed.success());
    let _ = ck.wait_exit(CMD_TIMEOUT);
    // The program goes on (it was stopped or being snapshotted).
    p.wait_ticks(3, Duration::from_secs(30));
    let gens = s.generations();
    for (id, g) in &gens {
        assert!(g.get("manifest").is_some(), "generation {id} lacks a manifest");
    }
    assert!(gens.contains_key(&g1.id), "generation {} is gone: {gens:?}", g1.id);
    // No snapshot child of the program survives for long.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let children = || -> Vec<i32> {
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|&q| q != pid && std::fs::read_to_string(format!("/proc/{q}/stat")).map(|st| st.rsplit(')').next().unwrap_or("").split_whitespace().nth(1) == Some(&pid.to_string())).unwrap_or(false))
            .collect()
    };
    while !children().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(children().is_empty(), "snapshot children of {pid} linger: {:?}", children());
    p.kill9();
    let mut r = s.restart_expect(&g1, pid, false);
    r.wait_ticks(2, LINE_TIMEOUT);
    r.finish(&s, 2);
}

/// The snapshot children of `pid` (the agent forks them; a live one holds
/// the agent in its round).
fn children(pid: i32) -> Vec<i32> {
    // of any thread (the agent's own thread forks them)
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let kids = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
        out.extend(kids.split_whitespace().filter_map(|c| c.parse::<i32>().ok()));
    }
    out
}

/// Issue 10: a store that fills up while the snapshot is read (phase B)
/// fails that checkpoint only: the snapshot is killed, the program runs on,
/// and once there is room the next checkpoint succeeds.
#[test]
fn full_store_in_phase_b_kills_the_snapshot_and_the_next_checkpoint_succeeds() {
    let s = Session::new("full_store_phase_b");
    let small = s.path("small");
    std::fs::create_dir_all(&small).unwrap();
    let st = Command::new("mount").args(["-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs"]).arg(&small).status().unwrap();
    assert!(st.success(), "cannot mount a tmpfs");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _u = Unmount(small.clone());
    let store = format!("file://{}", small.join("store").display());
    let stop = s.stop_file();
    let mut c = Command::new(&s.ckpt);
    c.args(["launch", "--store", &store, "--coord", &s.coord, "--"]).current_dir(&s.dir).env("CKPT_COORD", &s.coord).env_remove("CKPT_STORE").arg(program("counter_heap")).args(["-t", "100", "-m", "64", "-s", stop.to_str().unwrap()]);
    let mut p = Proc::spawn("launch on a small tmpfs".into(), c);
    s.track(p.child_pid());
    p.pid = p.child_pid();
    p.wait_prefix("READY", LINE_TIMEOUT);
    p.wait_ticks(2, LINE_TIMEOUT);
    let out = s.try_checkpoint();
    let err = text(&out.stderr);
    assert!(!out.status.success(), "a checkpoint of 64 MiB into 2 MiB succeeded");
    assert!(mentions_any(&err, &["space", "full"]), "the error does not say the store is full: {err}");
    let t0 = std::time::Instant::now();
    while !children(p.pid).is_empty() && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(children(p.pid), Vec::<i32>::new(), "a snapshot of the failed checkpoint is still alive");
    p.wait_ticks(2, LINE_TIMEOUT);
    let st = Command::new("mount").args(["-o", "remount,size=512m"]).arg(&small).status().unwrap();
    assert!(st.success(), "cannot grow the tmpfs");
    let out = s.try_checkpoint();
    assert!(out.status.success(), "the checkpoint after freeing space failed: {}", text(&out.stderr));
    assert_eq!(children(p.pid), Vec::<i32>::new(), "a snapshot is still alive after the checkpoint");
    p.wait_ticks(2, LINE_TIMEOUT);
    p.finish(&s, 2);
}
