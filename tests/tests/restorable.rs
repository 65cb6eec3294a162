//! A committed generation always restores: a checkpoint of a process whose
//! working directory was removed is refused (naming the process and the
//! directory) and commits nothing; `ckpt restart --dry-run` checks a
//! generation without starting anything, passing a good one and naming
//! what would fail in a bad one (its directory gone since). The program
//! (tests/programs/cwd.c) checks its own working directory every tick.
mod common;
use common::*;

#[test]
fn checkpoint_refuses_a_removed_working_directory() {
    let s = Session::new("cwd_removed");
    let dir = s.path("work");
    std::fs::create_dir(&dir).unwrap();
    let mut p = s.launch(&program("cwd"), &["-t", "50", "-d", dir.to_str().unwrap()]);
    p.wait_prefix("READY", LINE_TIMEOUT);
    p.wait_ticks(2, LINE_TIMEOUT);
    let before = s.generations().len();
    std::fs::remove_dir(&dir).unwrap();
    let out = s.try_checkpoint();
    let err = text(&out.stderr);
    assert!(!out.status.success(), "a checkpoint of a process whose cwd was removed succeeded\nstdout: {}", text(&out.stdout));
    let d = dir.to_str().unwrap();
    assert!(
        err.contains("working directory") && err.contains(d) && err.contains(&p.pid.to_string()),
        "the refusal does not name the process {} and its directory {d}: {err}",
        p.pid
    );
    assert_eq!(s.generations().len(), before, "a refused checkpoint committed a generation");
    // The program runs on, unharmed.
    p.wait_ticks(2, LINE_TIMEOUT);
    p.kill9();
}

#[test]
fn dry_run_passes_a_good_generation_and_names_what_fails_in_a_bad_one() {
    let s = Session::new("dry_run");
    let stop = s.stop_file();
    let dir = s.path("work");
    std::fs::create_dir(&dir).unwrap();
    let mut p = s.launch(&program("cwd"), &["-t", "50", "-d", dir.to_str().unwrap(), "-s", stop.to_str().unwrap()]);
    let pid = p.pid;
    p.wait_prefix("READY", LINE_TIMEOUT);
    p.wait_ticks(2, LINE_TIMEOUT);
    let g = s.checkpoint_bounded(&mut p);
    // While the program runs, its PID is taken: the dry run says so.
    let out = s.dry_run(g.id);
    assert!(!out.status.success() && text(&out.stdout).contains(&format!("PID {pid}")), "dry run with the program alive:\n{}", text(&out.stdout));
    p.kill9();
    s.assert_restores(g.id);

    // The directory gone: the dry run and the restart name it, nothing starts.
    let away = s.path("away");
    std::fs::rename(&dir, &away).unwrap();
    let out = s.dry_run(g.id);
    let said = text(&out.stdout);
    assert!(!out.status.success(), "dry run of a generation whose cwd is gone passed: {said}");
    assert!(said.contains("working directory") && said.contains(dir.to_str().unwrap()) && said.contains(&pid.to_string()), "dry run does not name the directory: {said}");
    let out = s.run("restart", &[&g.id.to_string()]);
    assert!(!out.status.success() && text(&out.stderr).contains("working directory"), "restart with the cwd gone: {}", text(&out.stderr));
    assert!(!pid_exists(pid), "a refused restart started process {pid}");

    // Back in place: it restores, in its directory (the program checks).
    std::fs::rename(&away, &dir).unwrap();
    s.assert_restores(g.id);
    let mut r = s.restart_expect(&g, pid, true);
    r.wait_ticks(3, LINE_TIMEOUT);
    r.finish(&s, 3);
}
