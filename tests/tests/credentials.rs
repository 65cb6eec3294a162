//! Credentials come back exactly, and nobody gets more from a restart than
//! they had: tests/programs/creds.c drops to the test account in its
//! `main` (distinct real/effective/saved ids, two groups, capabilities kept
//! in the permitted set, some dropped from the bounding set, an ambient one
//! raised, no_new_privs, a seccomp filter that makes getppid fail) and
//! checks every tick, itself, that every credential is what it was and
//! that the filter still acts.
mod common;
use common::*;

#[path = "common/users.rs"]
mod users;

use std::os::unix::fs::{MetadataExt, PermissionsExt};

/// The `CREDS` line the program printed.
fn creds_line(p: &mut Proc) -> String {
    p.wait_prefix("CREDS ", LINE_TIMEOUT)
}

/// The credential lines of every thread of a process, from outside.
fn thread_creds(pid: i32) -> Vec<String> {
    let mut tids: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().map(|e| e.unwrap().file_name().to_str().unwrap().parse().unwrap()).collect();
    tids.sort();
    let keys = ["Uid:", "Gid:", "Groups:", "CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:", "NoNewPrivs:", "Seccomp:", "Seccomp_filters:"];
    tids.iter()
        .map(|t| {
            let s = std::fs::read_to_string(format!("/proc/{pid}/task/{t}/status")).unwrap();
            let lines: Vec<&str> = s.lines().filter(|l| keys.iter().any(|k| l.starts_with(k))).collect();
            format!("{t}: {}", lines.join(" | "))
        })
        .collect()
}

/// `Uid:` and `Gid:` of a running process, from outside.
fn ids_from_outside(pid: i32) -> (String, String) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let get = |k: &str| s.lines().find(|l| l.starts_with(k)).unwrap().split_whitespace().skip(1).collect::<Vec<_>>().join(" ");
    (get("Uid:"), get("Gid:"))
}

#[test]
fn dropped_privileges_and_a_sandbox_come_back_exactly() {
    let s = Session::new("creds-drop");
    let user = users::other_user();
    let shm = format!("ckpt-creds-{}", std::process::id());
    let shm_path = format!("/dev/shm/{shm}");
    let _ = std::fs::remove_file(&shm_path);
    struct Unlink(String);
    impl Drop for Unlink {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _unlink = Unlink(shm_path.clone());
    let stop = s.stop_file();
    let (uid, gid) = (user.uid.to_string(), user.gid.to_string());
    let mut p = s.launch(&program("creds"), &["-t", "50", "-u", &uid, "-g", &gid, "-m", &shm, "-s", stop.to_str().unwrap()]);
    let creds = creds_line(&mut p);
    assert!(creds.contains(&format!("Uid: {uid} 65534 65533 65534")), "the program did not drop as asked: {creds}");
    let pid = p.pid;
    let expected_ids = ids_from_outside(pid);
    // The agent's thread kept what the main thread dropped per thread
    // (capabilities, no_new_privs, the filter): each comes back as it was.
    let expected_threads = thread_creds(pid);
    assert!(expected_threads.len() >= 2 && expected_threads.iter().collect::<std::collections::HashSet<_>>().len() >= 2, "expected threads with different credentials: {expected_threads:?}");
    p.wait_ticks(3, LINE_TIMEOUT);
    let g1 = s.checkpoint_bounded(&mut p);
    p.wait_ticks(3, LINE_TIMEOUT);
    let g2 = s.checkpoint_bounded(&mut p);
    p.kill9();

    // Another user makes the computation's shared memory object before the
    // restart (the old one is gone, as after a reboot): the restart refuses
    // it, naming it, and starts nothing.
    std::fs::remove_file(&shm_path).unwrap();
    let mut make = user.command("sh");
    make.args(["-c", &format!("umask 0; printf spy > {shm_path}")]);
    assert!(run_with_timeout(make, CMD_TIMEOUT).status.success(), "the other user could not make {shm_path}");
    let out = s.run("restart", &[]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "a restart used a shared memory object another user made\n{err}");
    assert!(err.contains(&shm_path) && err.contains(&format!("uid {}", user.uid)), "the refusal does not name the object and its owner: {err}");
    assert!(!pid_exists(pid), "the refused restart left process {pid} behind");
    let meta = std::fs::metadata(&shm_path).unwrap();
    assert_eq!((meta.uid(), meta.len()), (user.uid, 3), "the other user's object was changed");
    std::fs::remove_file(&shm_path).unwrap();

    // The restart makes the object itself, as the process: owned by its
    // fsuid, private.
    let mut r = s.restart_expect(&g2, pid, true);
    r.wait_ticks(3, RESTART_TIMEOUT);
    assert_eq!(ids_from_outside(pid), expected_ids, "the restored process runs with other ids");
    let strip = |v: Vec<String>| -> Vec<String> { v.into_iter().map(|l| l.split_once(": ").unwrap().1.to_string()).collect() };
    assert_eq!(strip(thread_creds(pid)), strip(expected_threads.clone()), "a thread came back with other credentials");
    let meta = std::fs::metadata(&shm_path).unwrap();
    assert_eq!((meta.uid(), meta.gid(), meta.permissions().mode() & 0o777), (65534, 65534, 0o600), "the shared memory object was not made as the process");

    // The restored program checkpoints again; then the older generation
    // comes back too (its object is the process's own now: used).
    let g3 = s.checkpoint_bounded(&mut r);
    r.kill9();
    let mut r = s.restart_expect(&g1, pid, false);
    r.wait_ticks(3, RESTART_TIMEOUT);
    assert_eq!(ids_from_outside(pid), expected_ids);
    r.kill9();
    let mut r = s.restart_expect(&g3, pid, false);
    r.finish(&s, 3);
}

#[test]
fn root_stays_root_and_a_user_cannot_restart_root() {
    let s = Session::new("creds-root");
    let user = users::other_user();
    let stop = s.stop_file();
    let data = s.path("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("file"), "mine\n").unwrap();
    let file = data.join("file");
    let mut p = s.launch(&program("creds"), &["-t", "50", "-f", file.to_str().unwrap(), "-s", stop.to_str().unwrap()]);
    let creds = creds_line(&mut p);
    assert!(creds.contains("Uid: 0 0 0 0"), "not started as root: {creds}");
    let pid = p.pid;
    p.wait_ticks(3, LINE_TIMEOUT);
    let g = s.checkpoint_bounded(&mut p);
    p.kill9();

    // The other user holds a copy of root's store (as after a `ckpt pull`
    // of a bucket it can read): its restart is refused before any process,
    // the coordinator included, is started.
    let copy = user.home.join(format!("stolen-store-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&copy);
    let st = std::process::Command::new("cp").arg("-a").arg(&s.store_dir).arg(&copy).status().unwrap();
    assert!(st.success());
    let st = std::process::Command::new("chown").arg("-R").arg(format!("{}:{}", user.uid, user.gid)).arg(&copy).status().unwrap();
    assert!(st.success());
    let sock_dir = user.home.join(format!("coord-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&sock_dir);
    // Without root's key the sealed copy reads as nothing at all; with it
    // (root shared it, or it leaked), the image's credentials still stop
    // the restart. Either way nothing starts.
    let key = user.home.join(format!("stolen-key-{}", std::process::id()));
    let _ = std::fs::remove_file(&key);
    let out = s.run("key", &["export", "--store", &s.store, key.to_str().unwrap()]);
    assert!(out.status.success(), "ckpt key export: {}", text(&out.stderr));
    let st = std::process::Command::new("chown").arg(format!("{}:{}", user.uid, user.gid)).arg(&key).status().unwrap();
    assert!(st.success());
    for with_key in [false, true] {
        let mut c = user.command(ckpt_bin());
        c.args(["restart", "--store", copy.to_str().unwrap(), "--coord", &format!("unix:{}/coord.sock", sock_dir.display())]);
        c.current_dir(&user.home);
        if with_key {
            c.env("CKPT_KEY_FILE", &key);
        }
        let out = run_with_timeout(c, CMD_TIMEOUT);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "a user restarted root's image (key given: {with_key})\n{err}");
        if with_key {
            assert!(err.contains(&format!("process {pid}")) && err.contains("uid 0"), "the refusal does not name the process and its uid: {err}");
        } else {
            assert!(err.contains("no key") && err.contains("ckpt key import"), "the refusal does not say the key is missing: {err}");
        }
        assert!(!pid_exists(pid), "the refused restart started process {pid}");
        assert!(!sock_dir.join("coord.sock").exists(), "the refused restart started a coordinator");
    }
    let _ = std::fs::remove_file(&key);
    let _ = std::fs::remove_dir_all(&copy);

    // Someone swaps the file's directory for a symlink to a directory of
    // theirs: root's restart does not follow it (the program never did).
    let theirs = s.path("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::fs::write(theirs.join("file"), "theirs\n").unwrap();
    std::fs::rename(&data, s.path("data.moved")).unwrap();
    std::os::unix::fs::symlink(&theirs, &data).unwrap();
    let out = s.run("restart", &[]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "the restart followed a symlink the program never followed\n{err}");
    assert!(err.contains(file.to_str().unwrap()) && err.contains("symlink"), "the refusal does not name the file and the symlink: {err}");
    assert!(!pid_exists(pid), "the refused restart left process {pid} behind");
    std::fs::remove_file(&data).unwrap();
    std::fs::rename(s.path("data.moved"), &data).unwrap();

    // Root's own restart: root again, every capability as before (the
    // program checks), and the coordinator still serves the computation.
    let mut r = s.restart_expect(&g, pid, true);
    r.wait_ticks(3, RESTART_TIMEOUT);
    assert_eq!(ids_from_outside(pid), ("0 0 0 0".to_string(), "0 0 0 0".to_string()));
    s.checkpoint_bounded(&mut r);
    r.finish(&s, 3);
}
