//! Hooks for programs that know they may be checkpointed (issue 15): the C
//! API (`libckpt/ckpt.h`, `libckpt.so`) used by `hooks.c`, the Python
//! module (`python/ckpt.py`) used by `python_hooks.py`, and command hooks
//! (`ckpt launch --hook KIND=CMD`). The programs count their callbacks and
//! check their order themselves (FAIL otherwise); the tests check what the
//! commands say and what the store holds.
mod common;
use common::*;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Waits until every line of `want` was printed (in any order).
fn wait_all(p: &mut Proc, want: &[String], timeout: Duration) {
    let mut left: Vec<&String> = want.iter().collect();
    let deadline = Instant::now() + timeout;
    while !left.is_empty() {
        let l = p.wait_line(|l| want.iter().any(|w| w == l), deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)));
        left.retain(|w| **w != l);
    }
}

fn touch(p: &Path) {
    std::fs::write(p, b"").unwrap();
}

fn python_env<'a>() -> Vec<(&'a str, &'a str)> {
    vec![("PYTHONPATH", ckpt_tests::PYTHON_DIR), ("CKPT_LIBCKPT", ckpt_tests::LIBCKPT)]
}

fn assert_refused(out: &std::process::Output, needles: &[&str]) {
    let err = text(&out.stderr);
    assert!(!out.status.success(), "the checkpoint was not refused:\nstdout: {}\nstderr: {err}", text(&out.stdout));
    for n in needles {
        assert!(err.contains(n), "the refusal does not say {n:?}:\n{err}");
    }
    assert!(err.contains("no generation was written"), "{err}");
}

#[test]
fn c_api_without_ckpt_does_nothing() {
    let dir = std::env::temp_dir().join(format!("ckpt-hooks-plain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for prog in [program("hooks"), program("hooks-nopie")] {
        let mut c = Command::new(&prog);
        c.args(["-n", "4", "-t", "20", "-N", "2"]).current_dir(&dir);
        let mut p = Proc::spawn(format!("{} alone", prog.display()), c);
        p.wait_line(|l| l == "NOCKPT ok", LINE_TIMEOUT);
        p.wait_line(|l| l == "NOW not under ckpt", LINE_TIMEOUT);
        p.wait_line(|l| l == "DONE", LINE_TIMEOUT);
        assert!(p.wait_exit(LINE_TIMEOUT).success(), "{}", p.context());
    }
    let mut c = Command::new(python3());
    c.arg(source("python_hooks.py")).args(["-n", "4", "-t", "20", "-N", "2"]).current_dir(&dir);
    for (k, v) in python_env() {
        c.env(k, v);
    }
    let mut p = Proc::spawn("python_hooks.py alone".into(), c);
    p.wait_line(|l| l == "NOCKPT ok", LINE_TIMEOUT);
    p.wait_line(|l| l == "NOW not under ckpt", LINE_TIMEOUT);
    p.wait_line(|l| l == "DONE", LINE_TIMEOUT);
    assert!(p.wait_exit(LINE_TIMEOUT).success(), "{}", p.context());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Callbacks around checkpoints and after a restart, in order, for the C
/// program or the Python one (`prog`, `args`, `env`).
fn callbacks_cycle(name: &str, prog: &Path, pre_args: &[&str], env: &[(&str, &str)]) {
    let s = Session::new(name);
    let stop = s.stop_file();
    let mut args: Vec<&str> = pre_args.to_vec();
    args.extend(["-t", "100", "-s", stop.to_str().unwrap()]);
    let mut p = s.launch_env(prog, &args, env);
    let pid = p.pid;
    p.wait_prefix("READY", LINE_TIMEOUT);
    p.wait_ticks(2, LINE_TIMEOUT);
    let g1 = s.checkpoint();
    // The pre-checkpoint callback printed before it returned, so before
    // the round; the post-checkpoint one comes after the commit.
    p.wait_line(|l| l == "HOOK pre 1", LINE_TIMEOUT);
    p.wait_line(|l| *l == format!("HOOK post 1 gen {g1}"), LINE_TIMEOUT);
    p.wait_ticks(2, LINE_TIMEOUT);
    let g2 = s.checkpoint();
    p.wait_line(|l| l == "HOOK pre 2", LINE_TIMEOUT);
    p.wait_line(|l| *l == format!("HOOK post 2 gen {g2}"), LINE_TIMEOUT);
    p.wait_ticks(1, LINE_TIMEOUT);
    p.kill9();

    // The restored memory is that of between pre 2 and post 2: the
    // program checks it, and its post-restart callback runs instead.
    let mut r = s.restart(None, pid);
    r.wait_line(|l| *l == format!("HOOK restart 1 gen {g2}"), RESTART_TIMEOUT);
    r.wait_ticks(2, LINE_TIMEOUT);
    let g3 = s.checkpoint();
    r.wait_line(|l| l == "HOOK pre 3", LINE_TIMEOUT);
    r.wait_line(|l| *l == format!("HOOK post 3 gen {g3}"), LINE_TIMEOUT);
    r.kill9();

    // An older generation: restored before its post-checkpoint callback.
    let mut r = s.restart(Some(g1), pid);
    r.wait_line(|l| *l == format!("HOOK restart 1 gen {g1}"), RESTART_TIMEOUT);
    r.wait_ticks(2, LINE_TIMEOUT);
    r.finish(&s, 3);
}

#[test]
fn c_callbacks_run_around_checkpoints_and_after_restart() {
    callbacks_cycle("hooks_c", &program("hooks"), &[], &[]);
}

#[test]
fn python_callbacks_run_around_checkpoints_and_after_restart() {
    callbacks_cycle("hooks_py", &python3(), &[source("python_hooks.py").to_str().unwrap()], &python_env());
}

/// `ckpt_checkpoint_now()` from inside: the generation it returns is in the
/// store, and a restart of it returns from the same call as "restarted".
fn checkpoint_now(name: &str, prog: &Path, pre_args: &[&str], env: &[(&str, &str)]) {
    let s = Session::new(name);
    let stop = s.stop_file();
    let mut args: Vec<&str> = pre_args.to_vec();
    args.extend(["-t", "100", "-N", "4", "-s", stop.to_str().unwrap()]);
    let mut p = s.launch_env(prog, &args, env);
    let pid = p.pid;
    let line = p.wait_prefix("NOW ", LINE_TIMEOUT);
    let g: u64 = line.strip_prefix("NOW checkpointed ").and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{line:?}\n{}", p.context()));
    assert!(s.generations().contains_key(&g), "generation {g} that ckpt_checkpoint_now returned is not in the store");
    p.wait_ticks(2, LINE_TIMEOUT);
    p.kill9();
    let mut r = s.restart(Some(g), pid);
    wait_all(&mut r, &[format!("NOW restarted {g}"), format!("HOOK restart 1 gen {g}")], RESTART_TIMEOUT);
    r.wait_ticks(1, LINE_TIMEOUT);
    assert_eq!(r.first_tick, Some(4), "the restart must go on from the tick that asked for the checkpoint\n{}", r.context());
    r.finish(&s, 3);
}

#[test]
fn c_checkpoint_now_from_inside() {
    checkpoint_now("hooks_now_c", &program("hooks"), &[], &[]);
}

#[test]
fn python_checkpoint_now_from_inside() {
    checkpoint_now("hooks_now_py", &python3(), &[source("python_hooks.py").to_str().unwrap()], &python_env());
}

/// A pre-checkpoint callback that fails, then one that hangs past the
/// hook timeout: each refuses its checkpoint, naming the process and the
/// callback; the program goes on, nothing is committed, and the next
/// checkpoint works.
#[test]
fn failing_and_hanging_c_callbacks_refuse_the_checkpoint() {
    let s = Session::new("hooks_fail_c");
    let (failf, hangf, stop) = (s.path("fail"), s.path("hang"), s.stop_file());
    let args = ["-t", "100", "-f", failf.to_str().unwrap(), "-H", hangf.to_str().unwrap(), "-s", stop.to_str().unwrap()];
    let mut p = s.launch_opts(&["--hook-timeout", "2"], &program("hooks"), &args, &[]);
    let pid = p.pid;
    p.wait_prefix("READY", LINE_TIMEOUT);
    p.wait_ticks(2, LINE_TIMEOUT);

    touch(&failf);
    let out = s.try_checkpoint();
    assert_refused(&out, &[&format!("process {pid} (hooks)"), "pre-checkpoint callback \"fail_if_file\" returned 3"]);
    // Its post-checkpoint callback says the checkpoint failed (generation 0).
    p.wait_line(|l| l == "HOOK post 1 gen 0", LINE_TIMEOUT);
    assert!(s.generations().is_empty(), "a refused checkpoint left a generation");
    p.wait_ticks(2, LINE_TIMEOUT);
    std::fs::remove_file(&failf).unwrap();
    let g1 = s.checkpoint();
    p.wait_line(|l| *l == format!("HOOK post 2 gen {g1}"), LINE_TIMEOUT);

    touch(&hangf);
    let t0 = Instant::now();
    let out = s.try_checkpoint();
    let took = t0.elapsed();
    assert_refused(&out, &[&format!("process {pid} (hooks)"), "pre-checkpoint callback \"hang_if_file\" is still running after 2 s"]);
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(20), "the hung callback's checkpoint took {took:?}");
    // The program goes on (the main thread ticks) while the callback
    // hangs, and the failed round's post-checkpoint callback waits for it.
    p.wait_ticks(20, LINE_TIMEOUT);
    assert!(!p.lines.iter().any(|l| l.starts_with("HOOK post 3")), "a post-checkpoint callback ran while the pre-checkpoint one hung\n{}", p.context());
    std::fs::remove_file(&hangf).unwrap();
    // Once it returns, the failed round's post-checkpoint callback runs.
    p.wait_line(|l| l == "HOOK post 3 gen 0", LINE_TIMEOUT);
    let g2 = s.checkpoint();
    p.wait_line(|l| *l == format!("HOOK post 4 gen {g2}"), LINE_TIMEOUT);
    let gens: Vec<u64> = s.generations().keys().copied().collect();
    assert_eq!(gens, vec![g1, g2]);
    p.finish(&s, 3);
}

/// The same for a Python callback that raises.
#[test]
fn raising_python_callback_refuses_the_checkpoint() {
    let s = Session::new("hooks_fail_py");
    let (failf, stop) = (s.path("fail"), s.stop_file());
    let script = source("python_hooks.py");
    let args = [script.to_str().unwrap(), "-t", "100", "-f", failf.to_str().unwrap(), "-s", stop.to_str().unwrap()];
    let mut p = s.launch_env(&python3(), &args, &python_env());
    let pid = p.pid;
    p.wait_prefix("READY", LINE_TIMEOUT);
    p.wait_ticks(2, LINE_TIMEOUT);
    touch(&failf);
    let out = s.try_checkpoint();
    assert_refused(&out, &[&format!("process {pid}"), "pre-checkpoint callback \"py_fail\" returned 1"]);
    p.wait_line(|l| l == "HOOK post 1 gen 0", LINE_TIMEOUT);
    assert!(p.stderr().contains("RuntimeError: the fail file exists"), "{}", p.context());
    std::fs::remove_file(&failf).unwrap();
    let g = s.checkpoint();
    p.wait_line(|l| *l == format!("HOOK post 2 gen {g}"), LINE_TIMEOUT);
    p.finish(&s, 3);
}

/// Command hooks: a pre-checkpoint command that writes what it was told,
/// one that fails and one that hangs (each refuses its checkpoint, the
/// program goes on, the next works), a post-checkpoint command, and a
/// post-restart command stored with the generation that `ckpt restart`
/// runs without being told again.
#[test]
fn command_hooks_succeed_fail_hang_and_survive_a_restart() {
    let s = Session::new("hooks_cmd");
    let d = s.dir.display().to_string();
    let log = s.path("hooks.log");
    let pre = format!("test ! -e {d}/fail || exit 4; if test -e {d}/hang; then sleep 60; fi; env > {d}/pre.env; echo \"pre $CKPT_PIDS\" >> {d}/hooks.log");
    let post = format!("echo \"post $CKPT_GENERATION $CKPT_OUTCOME\" >> {d}/hooks.log");
    let restart = format!("echo \"restart $CKPT_GENERATION $CKPT_PIDS\" >> {d}/hooks.log");
    let stop = s.stop_file();
    let hooks = [
        "--hook".to_string(),
        format!("pre-checkpoint={pre}"),
        "--hook".into(),
        format!("post-checkpoint={post}"),
        "--hook".into(),
        format!("post-restart={restart}"),
        "--hook-timeout".into(),
        "2".into(),
    ];
    let opts: Vec<&str> = hooks.iter().map(String::as_str).collect();
    let mut p = s.launch_opts(&opts, &program("counter_heap"), &["-t", "100", "-m", "16", "-s", stop.to_str().unwrap()], &[]);
    let pid = p.pid;
    p.wait_prefix("READY", LINE_TIMEOUT);
    p.wait_ticks(2, LINE_TIMEOUT);
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();

    let g1 = s.checkpoint();
    assert_eq!(read_log(), format!("pre {pid}\npost {g1} committed\n"));
    // The command's environment is its own: ckpt's variables and a few of
    // the coordinator's, nothing else (no LD_PRELOAD, no secret).
    let env = std::fs::read_to_string(s.path("pre.env")).unwrap();
    let allowed = ["PATH", "HOME", "USER", "LOGNAME", "LANG", "TMPDIR", "PWD", "SHLVL", "_", "CKPT_HOOK", "CKPT_STORE", "CKPT_COORD", "CKPT_PIDS", "CKPT_GENERATION"];
    for line in env.lines() {
        let k = line.split('=').next().unwrap();
        assert!(allowed.contains(&k), "the hook's environment has {line:?}:\n{env}");
    }
    assert!(env.contains("CKPT_HOOK=pre-checkpoint\n") && env.contains(&format!("CKPT_STORE={}\n", s.store)), "{env}");

    touch(&s.path("fail"));
    let out = s.try_checkpoint();
    assert_refused(&out, &["the pre-checkpoint hook `test ! -e", "exited with status 4"]);
    std::fs::remove_file(s.path("fail")).unwrap();
    p.wait_ticks(2, LINE_TIMEOUT);

    touch(&s.path("hang"));
    let t0 = Instant::now();
    let out = s.try_checkpoint();
    assert_refused(&out, &["did not finish within 2 s and was killed"]);
    assert!(t0.elapsed() < Duration::from_secs(20));
    std::fs::remove_file(s.path("hang")).unwrap();
    p.wait_ticks(2, LINE_TIMEOUT);
    // Neither refused round ran a post-checkpoint command (their
    // pre-checkpoint command failed), nor left a generation.
    assert_eq!(read_log(), format!("pre {pid}\npost {g1} committed\n"));
    let g2 = s.checkpoint();
    assert_eq!(s.generations().keys().copied().collect::<Vec<_>>(), vec![g1, g2]);
    assert!(read_log().ends_with(&format!("pre {pid}\npost {g2} committed\n")), "{}", read_log());
    p.wait_ticks(1, LINE_TIMEOUT);
    p.kill9();

    // Nothing said at the restart: the hooks come from the generation.
    let mut r = s.restart(None, pid);
    r.wait_ticks(2, RESTART_TIMEOUT);
    let deadline = Instant::now() + LINE_TIMEOUT;
    while !read_log().contains("restart ") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(read_log().ends_with(&format!("restart {g2} {pid}\n")), "{}", read_log());
    let g3 = s.checkpoint();
    assert!(read_log().ends_with(&format!("pre {pid}\npost {g3} committed\n")), "{}", read_log());
    r.finish(&s, 3);
}

/// An ordinary user's computation (in namespaces of its own, restarted
/// through ckpt's init): the callbacks and the command hooks run as that
/// user, and the post-restart command, run by the init, names the
/// program's pid as the program sees it.
#[test]
fn hooks_as_an_ordinary_user() {
    let s = Session::as_user(TEST_USER, "hooks_user");
    let (uid, _, _) = ordinary_account(TEST_USER);
    let d = s.dir.display().to_string();
    let log = s.path("hooks.log");
    let stop = s.stop_file();
    let hooks = [
        "--hook".to_string(),
        format!("pre-checkpoint=echo \"pre $(id -u)\" >> {d}/hooks.log"),
        "--hook".into(),
        format!("post-restart=echo \"restart $CKPT_GENERATION $CKPT_PIDS $(id -u)\" >> {d}/hooks.log"),
    ];
    let opts: Vec<&str> = hooks.iter().map(String::as_str).collect();
    let mut p = s.launch_opts(&opts, &program("hooks"), &["-t", "100", "-s", stop.to_str().unwrap()], &[]);
    let pid = p.pid;
    p.wait_prefix("READY", LINE_TIMEOUT);
    p.wait_ticks(2, LINE_TIMEOUT);
    let g = s.checkpoint();
    p.wait_line(|l| *l == format!("HOOK post 1 gen {g}"), LINE_TIMEOUT);
    assert_eq!(std::fs::read_to_string(&log).unwrap(), format!("pre {uid}\n"));
    p.wait_ticks(1, LINE_TIMEOUT);
    p.kill9();
    let mut r = s.restart(None, pid);
    r.wait_line(|l| *l == format!("HOOK restart 1 gen {g}"), RESTART_TIMEOUT);
    // Its pid outside the namespaces, found while it runs.
    assert!(r.alive(), "the restored program is not pid {pid}\n{}", r.context());
    let deadline = Instant::now() + LINE_TIMEOUT;
    while !std::fs::read_to_string(&log).unwrap().contains("restart") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(std::fs::read_to_string(&log).unwrap(), format!("pre {uid}\nrestart {g} {pid} {uid}\n"));
    r.wait_ticks(2, LINE_TIMEOUT);
    r.finish(&s, 3);
}

/// A post-restart command that fails, then one that hangs (given to `ckpt
/// restart`, over the stored one): each is reported on the restart's
/// stderr, and the restored program goes on.
#[test]
fn failing_and_hanging_post_restart_commands_are_reported() {
    let s = Session::new("hooks_restart_cmd");
    let stop = s.stop_file();
    let d = s.dir.display().to_string();
    let stored = format!("post-restart=echo stored >> {d}/hooks.log");
    let mut p = s.launch_opts(&["--hook", &stored], &program("counter_heap"), &["-t", "100", "-m", "16", "-s", stop.to_str().unwrap()], &[]);
    let pid = p.pid;
    p.wait_prefix("READY", LINE_TIMEOUT);
    p.wait_ticks(2, LINE_TIMEOUT);
    let g = s.checkpoint();
    p.wait_ticks(1, LINE_TIMEOUT);
    p.kill9();
    let restart = |extra: &[&str]| {
        let mut c = s.cmd("restart");
        c.args(extra).arg(g.to_string());
        let mut r = Proc::spawn(format!("restart {g} {}", extra.join(" ")), c);
        r.pid = pid;
        s.track(pid);
        r
    };
    let mut r = restart(&["--hook", "post-restart=exit 5"]);
    r.wait_ticks(3, RESTART_TIMEOUT);
    let deadline = Instant::now() + LINE_TIMEOUT;
    while !r.stderr().contains("post-restart hook") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(r.stderr().contains("warning: the post-restart hook `exit 5` exited with status 5"), "{}", r.context());
    assert!(!s.path("hooks.log").exists(), "the stored post-restart hook ran although the restart gave its own");
    r.kill9();

    let t0 = Instant::now();
    let mut r = restart(&["--hook", "post-restart=sleep 60", "--hook-timeout", "1"]);
    r.wait_ticks(3, RESTART_TIMEOUT);
    let deadline = Instant::now() + LINE_TIMEOUT;
    while !r.stderr().contains("post-restart hook") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(r.stderr().contains("warning: the post-restart hook `sleep 60` did not finish within 1 s and was killed"), "{}", r.context());
    assert!(t0.elapsed() < Duration::from_secs(30));
    r.wait_ticks(2, LINE_TIMEOUT);
    r.finish(&s, 3);
}
