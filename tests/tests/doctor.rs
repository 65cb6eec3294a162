//! Issue 12, `ckpt doctor`: what it says is what ckpt does. As root and as
//! an ordinary user (the `ckpt-test` account): the dirty-tracking backend
//! doctor names is the one a real `ckpt launch` of a program uses (`ckpt
//! status --json`), root's restart mode is "in place" and the user's is
//! namespaces of its own; and in a user namespace of the test's own where
//! `user.max_user_namespaces` is 0 (the setting is per user namespace: the
//! machine's value is never touched), doctor says missing, names the
//! setting, and exits 1.
mod common;
#[path = "common/users.rs"]
mod users;
use common::*;
use std::process::Command;

/// `ckpt doctor --json` run by `c` (already `ckpt doctor --json`): the
/// items by name, and the exit code.
fn doctor(c: Command) -> (Vec<Json>, Option<i32>, String) {
    let out = run_with_timeout(c, CMD_TIMEOUT);
    let stdout = text(&out.stdout);
    let v = Json::parse(&stdout).unwrap_or_else(|e| panic!("ckpt doctor --json printed no JSON ({e}): {stdout}\n{}", text(&out.stderr)));
    let items = v.as_array().unwrap_or_else(|| panic!("ckpt doctor --json is not an array: {stdout}")).clone();
    (items, out.status.code(), stdout)
}

fn find<'a>(items: &'a [Json], name: &str) -> &'a Json {
    items.iter().find(|i| i.get("item").and_then(Json::as_str) == Some(name)).unwrap_or_else(|| panic!("no item {name} in doctor's output: {items:?}"))
}

fn field<'a>(i: &'a Json, k: &str) -> &'a str {
    i.get(k).and_then(Json::as_str).unwrap_or_else(|| panic!("item without {k}: {i:?}"))
}

/// The backend doctor says `auto` uses ("auto uses NAME: …").
fn doctor_backend(items: &[Json]) -> String {
    let d = field(find(items, "dirty-tracking"), "detail");
    let rest = d.strip_prefix("auto uses ").unwrap_or_else(|| panic!("dirty-tracking detail does not say what auto uses: {d}"));
    rest.split(|c: char| c == ':' || c.is_whitespace()).next().unwrap().to_string()
}

/// The tracking `ckpt status --json` shows for the computation's one process.
fn status_backend(out: &std::process::Output) -> String {
    let s = text(&out.stdout);
    let v = Json::parse(&s).unwrap_or_else(|e| panic!("ckpt status --json: {e}: {s}\n{}", text(&out.stderr)));
    let procs = v.get("processes").and_then(Json::as_array).unwrap_or_else(|| panic!("no processes in status: {s}"));
    assert_eq!(procs.len(), 1, "one process expected: {s}");
    field(&procs[0], "dirty_tracking").to_string()
}

#[test]
fn root_doctor_matches_a_real_launch() {
    let s = Session::new("doctor-root");
    let mut c = s.cmd("doctor");
    c.arg("--json");
    let (items, code, out) = doctor(c);
    let backend = doctor_backend(&items);
    assert_eq!(field(find(&items, "restart"), "status"), "ok", "{out}");
    assert!(field(find(&items, "restart"), "detail").starts_with("in place"), "root's restart is not in place: {out}");
    assert!(field(find(&items, "network"), "detail").contains("repaired"), "{out}");
    assert!(items.iter().all(|i| field(i, "status") != "missing"), "root misses something on the test machine: {out}");
    assert_eq!(code, Some(0), "doctor exits {code:?} with nothing missing: {out}");

    let stop = s.stop_file();
    let mut p = s.launch(&program("counter_heap"), &["-t", "50", "-m", "8", "-s", stop.to_str().unwrap()]);
    p.wait_ticks(2, LINE_TIMEOUT);
    let launched = status_backend(&s.run("status", &["--json"]));
    eprintln!("doctor says {backend}, the launch uses {launched}");
    assert_eq!(backend, launched, "doctor's backend is not the launch's: {out}");
    // And what it says works: a checkpoint and restart of that launch.
    let g = s.checkpoint_bounded(&mut p);
    p.kill9();
    let mut r = s.restart_expect(&g, p.pid, true);
    r.finish(&s, 2);
}

#[test]
fn user_doctor_matches_a_real_launch_and_says_namespaces() {
    let u = users::other_user();
    let dir = u.home.join(format!("doctor-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut mk = u.command("mkdir");
    mk.arg("-p").arg(&dir);
    assert!(mk.status().unwrap().success());
    let store = format!("file://{}/store", dir.display());
    let coord = format!("unix:{}/coord.sock", dir.display());
    let ckpt = |sub: &str| {
        let mut c = u.command(ckpt_bin());
        c.arg(sub).args(["--coord", &coord]).env("CKPT_STORE", &store).current_dir(&dir);
        c
    };
    let mut c = ckpt("doctor");
    c.arg("--json");
    let (items, code, out) = doctor(c);
    let backend = doctor_backend(&items);
    let restart = find(&items, "restart");
    assert!(field(restart, "detail").contains("namespaces of its own (user+pid+mount+ipc)"), "the user's restart mode is not namespaces: {out}");
    assert_eq!(field(restart, "status"), "ok", "user namespaces cannot be made on the test machine: {out}");
    assert!(field(find(&items, "network"), "detail").contains("--net private"), "{out}");
    assert!(field(find(&items, "store"), "detail").contains(&dir.display().to_string()), "doctor did not check the store given: {out}");
    assert_eq!(code, Some(0), "{out}");

    // A real launch by the same user uses the backend doctor named.
    let mut launch = ckpt("launch");
    launch.arg("--").arg(program("counter_heap")).args(["-t", "50", "-m", "8"]);
    let mut p = Proc::spawn("user launch counter_heap".into(), launch);
    let line = p.wait_prefix("PID ", LINE_TIMEOUT);
    p.pid = line[4..].trim().parse().unwrap();
    p.wait_ticks(2, LINE_TIMEOUT);
    let mut st = ckpt("status");
    st.arg("--json");
    let launched = status_backend(&run_with_timeout(st, CMD_TIMEOUT));
    eprintln!("doctor (uid {}) says {backend}, the launch uses {launched}", u.uid);
    assert_eq!(backend, launched, "doctor's backend is not the user's launch's: {out}");
    p.kill9();
    let _ = run_with_timeout(ckpt("quit"), CMD_TIMEOUT);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn no_user_namespaces_allowed_is_missing_and_named() {
    let u = users::other_user();
    // The user makes a user namespace of its own (mapped to itself, its
    // capabilities there kept across exec), sets the limit of namespaces
    // below it to 0, then runs doctor without any capability.
    let script = format!(
        "echo 0 > /proc/sys/user/max_user_namespaces || exit 90; exec setpriv --inh-caps=-all --ambient-caps=-all {} doctor --json",
        ckpt_bin().display()
    );
    let mut c = u.command("unshare");
    c.args(["--user", "--map-current-user", "--keep-caps", "sh", "-c", &script]).current_dir(&u.home);
    let (items, code, out) = doctor(c);
    let restart = find(&items, "restart");
    assert_eq!(field(restart, "status"), "missing", "doctor does not see that namespaces cannot be made: {out}");
    let fix = restart.get("fix").and_then(Json::as_str).unwrap_or_else(|| panic!("no fix: {out}"));
    assert!(fix.contains("user.max_user_namespaces") && fix.contains("sysctl -w user.max_user_namespaces="), "the fix does not name the sysctl: {out}");
    assert_eq!(code, Some(1), "doctor exits {code:?} with restart missing: {out}");
    // The machine's own value was not touched.
    let host = std::fs::read_to_string("/proc/sys/user/max_user_namespaces").unwrap();
    assert_ne!(host.trim(), "0", "the machine's user.max_user_namespaces is 0");
}
