//! Computations in namespaces of their own (issue 12), seen from a real
//! second account: ckpt's init passes signals on and ends with the
//! program; a running computation is never restarted a second time; and
//! where user namespaces are not allowed, a launch still runs (and is
//! checkpointed) with a warning naming the setting, while its restart fails
//! naming it.
//!
//! (The standard cycles as an ordinary user are in `unprivileged.rs`;
//! root's restart in namespaces when its PIDs are taken in `faults.rs`.)
mod common;
#[path = "common/users.rs"]
mod users;
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use users::User;

/// A store, a coordinator socket and a working directory of the user's.
struct Mine {
    user: User,
    dir: PathBuf,
    store: String,
    coord: String,
}

impl Mine {
    fn new(name: &str) -> Mine {
        let user = users::other_user();
        let dir = PathBuf::from(format!("/tmp/ckpt-tests/{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(user.uid), Some(user.gid)).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let store = format!("file://{}/store", dir.display());
        let coord = format!("unix:{}/coord.sock", dir.display());
        Mine { user, dir, store, coord }
    }

    /// `ckpt ARGS` as the user, with its store and coordinator.
    fn ckpt(&self, args: &[&str]) -> Command {
        let mut c = self.user.command(ckpt_bin());
        c.args(args).env("CKPT_STORE", &self.store).env("CKPT_COORD", &self.coord).current_dir(&self.dir);
        c
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        run_with_timeout(self.ckpt(args), CMD_TIMEOUT)
    }

    /// `ckpt launch -- PROG ARGS` as the user; waits for its PID line.
    fn launch(&self, prog: &str, args: &[&str]) -> Proc {
        let mut c = self.ckpt(&["launch", "--"]);
        c.arg(program(prog)).args(args);
        let mut p = Proc::spawn(format!("launch {prog} as {}", self.user.name), c);
        p.wait_prefix("PID ", LINE_TIMEOUT);
        p
    }

    /// The processes the coordinator lists.
    fn listed(&self) -> usize {
        let out = self.run(&["status", "--json"]);
        Json::parse(&text(&out.stdout)).ok().and_then(|j| j.get("processes").and_then(Json::as_array).map(|a| a.len())).unwrap_or(0)
    }
}

impl Drop for Mine {
    fn drop(&mut self) {
        let _ = run_with_timeout(self.ckpt(&["kill"]), CMD_TIMEOUT);
        let _ = run_with_timeout(self.ckpt(&["quit"]), CMD_TIMEOUT);
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// SIGTERM to `ckpt launch` reaches the program in its namespaces (ckpt's
/// init passes it on), and launch ends with the program's status.
#[test]
fn a_signal_to_launch_reaches_the_program_and_launch_ends_with_it() {
    let m = Mine::new("ns-signal");
    let mut p = m.launch("counter_heap", &["-m", "4", "-t", "50"]);
    p.wait_ticks(2, LINE_TIMEOUT);
    assert_eq!(m.listed(), 1, "the coordinator does not list the launched program");
    // SAFETY: kill takes integers.
    unsafe { libc::kill(p.child_pid(), libc::SIGTERM) };
    let st = p.wait_exit(CMD_TIMEOUT);
    assert_eq!(st.code(), Some(128 + libc::SIGTERM), "launch ended with {st}, not the program's death by SIGTERM\n{}", p.context());
    let deadline = std::time::Instant::now() + LINE_TIMEOUT;
    while m.listed() != 0 {
        assert!(std::time::Instant::now() < deadline, "the program is still listed after SIGTERM");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// In namespaces of its own a computation's PIDs are always free: a
/// restart while it runs must still be refused (no second copy).
#[test]
fn a_running_computation_is_not_restarted_a_second_time() {
    let m = Mine::new("ns-twice");
    let mut p = m.launch("counter_heap", &["-m", "4", "-t", "50"]);
    p.wait_ticks(2, LINE_TIMEOUT);
    let out = m.run(&["checkpoint"]);
    assert!(out.status.success(), "checkpoint failed: {}", text(&out.stderr));
    let out = m.run(&["restart"]);
    assert!(!out.status.success(), "a restart while the computation runs succeeded");
    let err = text(&out.stderr);
    assert!(err.contains("still runs") && err.contains("ckpt kill"), "unclear refusal: {err}");
    assert_eq!(m.listed(), 1, "a second copy joined the coordinator");
    p.wait_ticks(2, LINE_TIMEOUT);
}

/// `sh -c SCRIPT` as the user in a user namespace of the test's own where
/// `user.max_user_namespaces` is 0 (the setting is per user namespace: the
/// machine's is never touched); `ckpt` there runs without capabilities.
fn without_user_namespaces(m: &Mine, ckpt_args: &str) -> Command {
    let script = format!(
        "echo 0 > /proc/sys/user/max_user_namespaces || exit 90; exec setpriv --inh-caps=-all --ambient-caps=-all {} {ckpt_args}",
        ckpt_bin().display()
    );
    let mut c = m.user.command("unshare");
    c.args(["--user", "--map-current-user", "--keep-caps", "sh", "-c", &script])
        .env("CKPT_STORE", &m.store)
        .env("CKPT_COORD", &m.coord)
        .current_dir(&m.dir);
    c
}

#[test]
fn without_user_namespaces_launch_runs_with_a_warning_and_restart_names_the_setting() {
    let m = Mine::new("ns-disabled");
    let prog = program("counter_heap");
    let mut p = Proc::spawn("launch without user namespaces".into(), without_user_namespaces(&m, &format!("launch -- {} -m 4 -t 50", prog.display())));
    p.wait_ticks(2, LINE_TIMEOUT);
    let warned = p.stderr();
    assert!(warned.contains("warning") && warned.contains("user.max_user_namespaces"), "launch does not warn naming the setting:\n{}", p.context());
    // Checkpoints work.
    let out = run_with_timeout(without_user_namespaces(&m, "checkpoint"), CMD_TIMEOUT);
    assert!(out.status.success(), "checkpoint failed: {}", text(&out.stderr));
    let out = run_with_timeout(without_user_namespaces(&m, "kill"), CMD_TIMEOUT);
    assert!(out.status.success(), "kill failed: {}", text(&out.stderr));
    p.wait_exit(CMD_TIMEOUT);
    // The restart says what is missing, and starts nothing.
    let out = run_with_timeout(without_user_namespaces(&m, "restart"), CMD_TIMEOUT);
    assert!(!out.status.success(), "a restart without user namespaces succeeded");
    let err = text(&out.stderr);
    assert!(err.contains("user.max_user_namespaces") && err.contains("sysctl -w"), "the restart does not name the setting and its fix: {err}");
    let out = run_with_timeout(without_user_namespaces(&m, "status --json"), CMD_TIMEOUT);
    let listed = Json::parse(&text(&out.stdout)).ok().and_then(|j| j.get("processes").and_then(Json::as_array).map(|a| a.len())).unwrap_or(0);
    assert_eq!(listed, 0, "a failed restart left a process");
}
