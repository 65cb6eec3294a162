//! ckpt as an ordinary user (issue 12): every command run by a real second
//! account (`ckpt-user`, made by `scripts/test.sh` or by the harness with
//! `useradd`), through `Session::as_user`, never root with capabilities
//! dropped. Each test checks what the command did (the program's own
//! output, the store, `/proc`), not only exit codes.
//!
//! The restart tests are at the end, in the block marked `RESTART`: the
//! computation runs in namespaces of its own (`engine/src/ns.rs`), where
//! its PIDs are not the host's (`Session::host_pid`).
mod common;
#[path = "common/s3.rs"]
mod s3srv;
use common::*;

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};



/// A field of `/proc/PID/status` (first word after the name).
fn status_field(pid: i32, name: &str) -> String {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_else(|e| panic!("process {pid}: {e}"));
    st.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.split_whitespace().next().unwrap_or("").to_string()).unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
}

/// The program runs as the session's user, with no capabilities.
fn assert_runs_as_user(s: &Session, pid: i32) {
    let uid = s.user.as_ref().unwrap().uid;
    let pid = s.host_pid(pid);
    assert_eq!(status_field(pid, "Uid:"), uid.to_string(), "process {pid} does not run as uid {uid}");
    assert_eq!(status_field(pid, "CapEff:"), "0000000000000000", "process {pid} has capabilities");
}

/// Whether a launch ended by the program's SIGKILL: killed itself (in
/// place, launch is the program) or exiting with 128 + 9 (ckpt's init,
/// in namespaces of the computation's own, reports it so).
fn killed(st: std::process::ExitStatus) -> bool {
    st.code().is_none() || st.code() == Some(128 + 9)
}

fn pack_files(store: &Path) -> Vec<PathBuf> {
    files_under(&store.join("packs")).into_iter().filter(|p| p.extension().is_some_and(|e| e == "pack")).collect()
}

/// Every file and directory under `root` is the user's and private (no
/// group or other bits): 0600/0700 or stricter.
fn assert_private(s: &Session, root: &Path) -> usize {
    let uid = s.user.as_ref().unwrap().uid;
    let mut n = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let md = std::fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert_eq!(md.uid(), uid, "{} is owned by uid {}, not the user's {uid}", p.display(), md.uid());
        assert_eq!(md.mode() & 0o077, 0, "{} has mode {:o}: group or others have access", p.display(), md.mode() & 0o7777);
        n += 1;
        if md.is_dir() {
            stack.extend(std::fs::read_dir(&p).unwrap().flatten().map(|e| e.path()));
        }
    }
    n
}

/// `counter_heap` launched by the user, at its third tick.
fn launch_counter(s: &Session) -> Proc {
    let stop = s.stop_file();
    let mut p = s.launch(&program("counter_heap"), &["-m", "32", "-t", "100", "-s", stop.to_str().unwrap()]);
    p.wait_prefix("READY", LINE_TIMEOUT);
    p.wait_ticks(3, LINE_TIMEOUT);
    p
}

/// launch, two checkpoints, status, log, show, stats, verify (and a
/// corrupted pack byte found), gc, kill, quit; every file ckpt made for the
/// user private and the user's.
#[test]
fn every_command_as_an_ordinary_user() {
    let s = Session::as_user(TEST_USER, "nr_cmds");
    let mut p = launch_counter(&s);
    assert_runs_as_user(&s, p.pid);
    let g1 = s.checkpoint_bounded(&mut p);
    p.wait_ticks(2, LINE_TIMEOUT);
    let g2 = s.checkpoint_bounded(&mut p);
    assert!(g2.id > g1.id);

    // status: the coordinator at the user's default socket lists the program.
    let sock = PathBuf::from(s.coord.strip_prefix("unix:").unwrap());
    assert!(sock.exists(), "no coordinator socket at the user's default {}", sock.display());
    assert_eq!(s.computation(), vec![p.pid], "ckpt status --json does not list the program alone");
    let st = ok(&s.run("status", &[]), "ckpt status");
    assert!(st.contains(&p.pid.to_string()), "ckpt status does not name pid {}:\n{st}", p.pid);

    // log, show, stats
    let gens = s.generations();
    assert_eq!(gens.keys().copied().collect::<Vec<_>>(), vec![g1.id, g2.id], "ckpt log --json: {gens:?}");
    let show = ok(&s.run("show", &["--store", &s.store, &g2.id.to_string()]), "ckpt show");
    assert!(show.contains(&format!("generation {}", g2.id)) && show.contains(&format!("process {} ", p.pid)), "ckpt show does not describe generation {} of pid {}:\n{show}", g2.id, p.pid);
    assert!(show.contains("counter_heap"), "ckpt show does not name the program:\n{show}");
    let stats = ok(&s.run("stats", &["--store", &s.store]), "ckpt stats");
    assert!(stats.contains("in 2 generation(s)"), "ckpt stats does not count 2 generations:\n{stats}");
    let v = ok(&s.run("verify", &["--store", &s.store, "--all"]), "ckpt verify --all");
    assert!(v.contains(" 0 problem(s)"), "verify of a clean store: {v}");

    // Everything ckpt made for the user is the user's and private.
    let n = assert_private(&s, &s.store_dir) + assert_private(&s, &s.user.as_ref().unwrap().runtime_dir.join("ckpt"));
    assert!(pack_files(&s.store_dir).len() >= 2 && n > 8, "the store holds too little to check ({n} entries)");
    let key = s.user.as_ref().unwrap().home.join(".config/ckpt");
    if key.exists() {
        assert_private(&s, &key);
    }

    // kill: the program is gone, and the launch command with it.
    let out = s.run("kill", &[]);
    ok(&out, "ckpt kill");
    assert!(killed(p.wait_exit(CMD_TIMEOUT)), "the program was not killed by a signal\n{}", p.context());
    wait_gone(p.host_pid(), Duration::from_secs(20));

    // gc: only the last generation remains, and it verifies.
    ok(&s.run("gc", &["--store", &s.store, "--keep-last", "1"]), "ckpt gc --keep-last 1");
    let gens = s.generations();
    assert_eq!(gens.keys().copied().collect::<Vec<_>>(), vec![g2.id], "after gc --keep-last 1: {gens:?}");
    let v = ok(&s.run("verify", &["--store", &s.store, "--all"]), "ckpt verify --all after gc");
    assert!(v.contains(" 0 problem(s)"), "verify after gc: {v}");
    assert_private(&s, &s.store_dir);

    // A byte of the user's own pack changed in place: verify names it.
    let mut packs = pack_files(&s.store_dir);
    packs.sort_by_key(|p| std::fs::metadata(p).unwrap().len());
    let big = packs.last().unwrap();
    let f = std::fs::OpenOptions::new().read(true).write(true).open(big).unwrap();
    let at = f.metadata().unwrap().len() / 3;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x10], at).unwrap();
    drop(f);
    let name = big.file_stem().unwrap().to_str().unwrap();
    let out = s.run("verify", &["--store", &s.store, "--all"]);
    let o = text(&out.stdout);
    assert!(!out.status.success(), "verify passed a corrupted pack:\n{o}");
    assert!(o.lines().any(|l| l.starts_with("problem:") && l.contains(name)), "verify names no problem with pack {name}:\n{o}");

    // quit: the coordinator goes away.
    ok(&s.run("quit", &[]), "ckpt quit");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&sock).is_ok() {
        assert!(Instant::now() < deadline, "the coordinator still answers on {} after ckpt quit", sock.display());
        std::thread::sleep(Duration::from_millis(50)); // polling a process that is exiting
    }
    let st = ok(&s.run("status", &[]), "ckpt status after quit");
    assert!(st.contains("none running"), "ckpt status after quit: {st}");
}

/// push to and pull from the S3 server of the S3 tests (moto on loopback),
/// as the user: the pulled store holds the generations and verifies.
#[test]
fn push_and_pull_as_an_ordinary_user() {
    const BUCKET: &str = "ckpt-nonroot";
    let srv = s3srv::S3Server::start();
    srv.create_bucket(BUCKET);
    let s = Session::as_user(TEST_USER, "nr_s3");
    let mut p = launch_counter(&s);
    let g1 = s.checkpoint_bounded(&mut p);
    let g2 = s.checkpoint_bounded(&mut p);
    p.kill9();
    let cache = s.path("s3cache");
    let run_s3 = |sub: &str, args: &[&str]| {
        let mut c = s.cmd(sub);
        c.args(args);
        srv.apply(&mut c, &cache);
        run_with_timeout(c, CMD_TIMEOUT)
    };
    let dest = format!("s3://{BUCKET}/user");
    ok(&run_s3("push", &[&dest, "--store", &s.store]), "ckpt push");
    let pulled = s.path("pulled");
    let pulled_url = format!("file://{}", pulled.display());
    ok(&run_s3("pull", &[&dest, "--store", &pulled_url]), "ckpt pull");
    assert_eq!(pack_files(&pulled).len(), pack_files(&s.store_dir).len(), "the pulled store lacks packs");
    let mut c = s.user_command(&s.ckpt);
    c.args(["log", "--store", &pulled_url, "--json"]);
    let log = ok(&run_with_timeout(c, CMD_TIMEOUT), "ckpt log of the pulled store");
    let j = Json::parse(&log).unwrap();
    let ids: Vec<u64> = j.as_array().unwrap().iter().map(|g| g.u64_field("id")).collect();
    assert_eq!(ids, vec![g1.id, g2.id], "the pulled store's generations");
    let v = ok(&run_s3("verify", &["--store", &pulled_url, "--all"]), "verify of the pulled store");
    assert!(v.contains(" 0 problem(s)"), "verify of the pulled store: {v}");
    // The S3 store verifies too, read by the user.
    let v = ok(&run_s3("verify", &["--store", &dest, "--all"]), "verify of the S3 store");
    assert!(v.contains(" 0 problem(s)"), "verify of the S3 store: {v}");
    assert_private(&s, &pulled);
    assert_private(&s, &cache);
}

/// The harness's cleanup: dropping a user session kills that session's
/// processes (its program and the coordinator `launch` started) and none of
/// the user's others.
#[test]
fn dropping_a_user_session_kills_its_processes_only() {
    let (uid, gid, _) = ordinary_account(TEST_USER);
    let mut other = std::process::Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .args(["--init-groups", "--", "sleep", "300"])
        .current_dir("/")
        .spawn()
        .unwrap();
    let pids = {
        let s = Session::as_user(TEST_USER, "nr_drop");
        let mut p = s.launch(&program("counter_heap"), &["-m", "4", "-t", "50"]);
        p.wait_ticks(2, LINE_TIMEOUT);
        let sock = s.coord.strip_prefix("unix:").unwrap().to_string();
        let st = Json::parse(&ok(&s.run("status", &["--json"]), "ckpt status --json")).unwrap();
        let coord = st.get("coordinator").and_then(|c| c.get("pid")).and_then(Json::as_u64).unwrap_or_else(|| panic!("no coordinator pid in {st:?} ({sock})")) as i32;
        assert_eq!(status_field(coord, "Uid:"), uid.to_string(), "the coordinator does not run as the user");
        std::mem::forget(p); // left running on purpose: the session's drop must kill it
        // Two processes nothing tracks: one in the session's dir, one
        // elsewhere but started with the session's environment.
        let in_dir = s.user_command("sleep").arg("300").spawn().unwrap();
        let marked = s.user_command("sleep").arg("300").current_dir("/").spawn().unwrap();
        let pids = (s.host_pid(s.computation()[0]), coord, in_dir.id() as i32, marked.id() as i32);
        std::mem::forget((in_dir, marked));
        pids
    };
    let (prog, coord, in_dir, marked) = pids;
    for pid in [prog, coord, in_dir, marked] {
        let deadline = Instant::now() + Duration::from_secs(10);
        while pid_alive(pid) {
            assert!(Instant::now() < deadline, "process {pid} of the dropped session still runs");
            std::thread::sleep(Duration::from_millis(20)); // polling the kernel's reaping
        }
    }
    assert!(other.try_wait().unwrap().is_none(), "the user's process outside the session was killed");
    other.kill().unwrap();
    other.wait().unwrap();
}

/// No `--store`, no `--coord`: the user's defaults (`$XDG_DATA_HOME/ckpt`,
/// `$XDG_RUNTIME_DIR/ckpt/coord.sock`) are made private and used.
#[test]
fn default_store_and_socket_are_the_users_and_private() {
    let s = Session::as_user(TEST_USER, "nr_defaults");
    let data = s.path("data");
    let mut c = s.user_command(&s.ckpt);
    c.args(["launch", "--", program("counter_heap").to_str().unwrap(), "-m", "4", "-t", "50"]).env("XDG_DATA_HOME", &data);
    let mut p = Proc::spawn("launch with the defaults".into(), c);
    s.track(p.child_pid());
    p.pid = p.child_pid();
    p.wait_ticks(3, LINE_TIMEOUT);
    let mut c = s.user_command(&s.ckpt);
    c.arg("checkpoint");
    ok(&run_with_timeout(c, CMD_TIMEOUT), "ckpt checkpoint at the default socket");
    let store = data.join("ckpt");
    assert!(store.join("catalog.db").is_file(), "no store at the default {}", store.display());
    assert!(assert_private(&s, &store) > 4, "the default store holds too little");
    assert_private(&s, &s.user.as_ref().unwrap().runtime_dir);
    let mut c = s.user_command(&s.ckpt);
    c.arg("kill");
    ok(&run_with_timeout(c, CMD_TIMEOUT), "ckpt kill");
    assert!(killed(p.wait_exit(CMD_TIMEOUT)), "the program was not killed\n{}", p.context());
}

/// A coordinator of the user's on TCP (`ckpt coordinator --coord tcp:`):
/// the secret it makes (`~/.config/ckpt/coord.key`) and its directory are
/// the user's and private; a launch and a checkpoint through it commit.
#[test]
fn tcp_coordinator_key_files_are_private() {
    let s = Session::as_user(TEST_USER, "nr_tcp_key");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let tcp = format!("tcp:127.0.0.1:{port}");
    let mut c = s.user_command(&s.ckpt);
    c.args(["coordinator", "--coord", &tcp, "--store", &s.store]);
    let mut co = Proc::spawn(format!("coordinator on {tcp}"), c);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the user's coordinator on {tcp} did not come up\n{}", co.context());
        std::thread::sleep(Duration::from_millis(50)); // polling a server that is starting
    }
    assert_eq!(status_field(co.child_pid(), "Uid:"), s.user.as_ref().unwrap().uid.to_string(), "the coordinator does not run as the user");
    let stop = s.stop_file();
    let mut p = s.launch_opts(&["--coord", &tcp], &program("counter_heap"), &["-m", "4", "-t", "50", "-s", stop.to_str().unwrap()], &[]);
    p.wait_ticks(3, LINE_TIMEOUT);
    let out = ok(&s.run("checkpoint", &["--coord", &tcp]), "ckpt checkpoint over TCP");
    let g: u64 = out.trim().lines().last().unwrap().trim().parse().unwrap();
    assert!(s.generations().contains_key(&g), "generation {g} is not in the store");
    let key_dir = s.user.as_ref().unwrap().home.join(".config/ckpt");
    assert!(key_dir.join("coord.key").is_file(), "no secret at {}", key_dir.display());
    assert_private(&s, &key_dir);
    assert_private(&s, &s.store_dir);
    assert_private(&s, &s.user.as_ref().unwrap().runtime_dir);
    ok(&s.run("kill", &["--coord", &tcp]), "ckpt kill over TCP");
    assert!(killed(p.wait_exit(CMD_TIMEOUT)), "the program was not killed\n{}", p.context());
    wait_gone(p.host_pid(), Duration::from_secs(20));
    ok(&s.run("quit", &["--coord", &tcp]), "ckpt quit over TCP");
    co.wait_exit(CMD_TIMEOUT);
}

/// A root computation running at the same time: its coordinator socket and
/// its store refuse the user, with an error naming them; the root program
/// is untouched and nothing is committed to root's store.
#[test]
fn root_coordinator_and_store_refuse_the_user() {
    let root = Session::new("nr_root");
    let mut rp = root.launch(&program("counter_heap"), &["-m", "4", "-t", "50"]);
    rp.wait_ticks(2, LINE_TIMEOUT);
    let rg = root.checkpoint();
    let s = Session::as_user(TEST_USER, "nr_vs_root");
    let sock = root.coord.strip_prefix("unix:").unwrap();
    for sub in ["status", "checkpoint", "kill", "quit"] {
        let mut c = s.user_command(&s.ckpt);
        c.args([sub, "--coord", &root.coord]);
        let out = run_with_timeout(c, CMD_TIMEOUT);
        failed(&out, &format!("ckpt {sub} on root's coordinator as {TEST_USER}"), &[sock, "ermission denied"]);
    }
    let store = root.store_dir.to_str().unwrap();
    for args in [vec!["log", "--store", &root.store], vec!["verify", "--store", &root.store, "--all"], vec!["restart", "--dry-run", "--store", &root.store, "--coord", &s.coord]] {
        let mut c = s.user_command(&s.ckpt);
        c.args(&args);
        let out = run_with_timeout(c, CMD_TIMEOUT);
        failed(&out, &format!("ckpt {} on root's store as {TEST_USER}", args[0]), &[store, "not readable by you", "uid 0"]);
    }
    assert!(pid_alive(rp.pid), "root's program died");
    rp.wait_ticks(2, LINE_TIMEOUT);
    assert_eq!(root.generations().keys().copied().collect::<Vec<_>>(), vec![rg], "root's store changed");
    root.checkpoint_bounded(&mut rp);
}

// ------------------------------------------------------------------------
// RESTART. `ckpt launch`/`ckpt restart` as the user run the computation in
// user + PID + mount + IPC namespaces of its own (engine/src/ns.rs), with
// its PIDs again at every restart; `--net private` adds a network
// namespace where its TCP connections are repaired.
// ------------------------------------------------------------------------

/// The standard cycle (two checkpoints, kill, restart the latest, again,
/// then the oldest by number, run to DONE) of `counter_heap`, as the user.
#[test]
fn restart_counter_heap_as_an_ordinary_user() {
    let c = Cycle::new(program("counter_heap"), &["-m", "64", "-t", "100"]);
    let s = standard_cycle_in(Session::as_user(TEST_USER, "nr_counter"), &c);
    assert_private(&s, &s.store_dir);
}

/// A process of the user's stopped by job control checkpoints where it
/// stands and comes back stopped (its checkpoint thread is woken by the
/// capture helper in ckpt's init, an ancestor: Yama's scope 1 allows it).
#[test]
fn stopped_process_as_an_ordinary_user() {
    job_stop_cycle(Session::as_user(TEST_USER, "nr_stopped"));
}

/// The demo of the README (scripts/demo.sh), as the ordinary user: launch,
/// two checkpoints, kill, restart of the latest and of the older
/// generation; its program checks its own state after each restart
/// ("checksum ok").
#[test]
fn the_demo_as_an_ordinary_user() {
    let s = Session::as_user(TEST_USER, "nr_demo");
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/demo.sh");
    let mut c = s.user_command("bash");
    c.arg(&demo).env("CKPT_BIN", &s.ckpt);
    let out = run_with_timeout(c, Duration::from_secs(240));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "the demo failed as {TEST_USER}:\n{stdout}\n{}", text(&out.stderr));
    assert!(stdout.matches("checksum ok").count() >= 2, "the restarted programs did not check their state:\n{stdout}");
    assert!(stdout.contains("demo finished"), "{stdout}");
}

/// A python3 the user may run: the system's (the test's own may be under
/// root's home, e.g. pyenv in /root).
fn user_python3() -> PathBuf {
    let sys = Path::new("/usr/bin/python3");
    if sys.exists() { std::fs::canonicalize(sys).unwrap() } else { python3() }
}

/// A multi-threaded unmodified python3 (>= 100 MB of objects and four
/// worker threads, each checked every tick), through the standard cycle as
/// the user.
#[test]
fn restart_python_as_an_ordinary_user() {
    let script = source("python_heap.py");
    let c = Cycle::new(user_python3(), &[script.to_str().unwrap(), "-t", "200", "-m", "120", "-w", "4"]);
    standard_cycle_in(Session::as_user(TEST_USER, "nr_python"), &c);
}

/// `tree` (five processes, pipes full of records, shared memory, a zombie,
/// a daemon) checkpointed twice, killed, restarted (latest), checkpointed
/// again, run to DONE, then the oldest generation restarted and run to DONE.
#[test]
fn restart_tree_as_an_ordinary_user() {
    let s = Session::as_user(TEST_USER, "nr_tree");
    let stop = s.stop_file();
    let (mut p, pids) = s.launch_computation(&program("tree"), &["-t", "100", "-z", "30", "-s", stop.to_str().unwrap()], 5);
    for &pid in &pids {
        assert_runs_as_user(&s, pid);
    }
    let g1 = s.checkpoint_bounded(&mut p);
    p.wait_ticks(3, LINE_TIMEOUT);
    let g2 = s.checkpoint_bounded(&mut p);
    assert_eq!(s.generations()[&g2.id].u64_field("nprocs"), 5);
    s.kill_all(&pids, &mut p);
    let mut r = s.restart_expect(&g2, p.pid, true);
    r.wait_ticks(3, LINE_TIMEOUT);
    let g3 = s.checkpoint_bounded(&mut r);
    assert!(g3.id > g2.id);
    r.wait_line(|l| l.starts_with("REAPED"), LINE_TIMEOUT);
    s.stop_at(r.last_tick.unwrap() + 3);
    s.finish_computation(&pids, &mut r);
    let mut o = s.restart_expect(&g1, p.pid, false);
    o.wait_ticks(3, LINE_TIMEOUT);
    o.wait_line(|l| l.starts_with("REAPED"), LINE_TIMEOUT);
    s.stop_at(o.last_tick.unwrap() + 3);
    s.finish_computation(&pids, &mut o);
}

/// `tcp_loop` (a TCP connection between two threads of the computation,
/// bytes in flight) launched with `--net private`: the standard cycle.
#[test]
fn restart_tcp_loop_in_a_private_network_as_an_ordinary_user() {
    let mut c = Cycle::new(program("tcp_loop"), &["-t", "100"]);
    c.launch_opts = vec!["--net".into(), "private".into()];
    standard_cycle_in(Session::as_user(TEST_USER, "nr_tcp_loop"), &c);
}

/// `tcp_fork` (a server, two clients, a handler each: TCP between the
/// computation's processes) with `--net private`: two checkpoints, kill,
/// restart the latest, checkpoint, run to DONE (every client got every
/// echo); then the oldest generation, run to DONE.
#[test]
fn restart_tcp_fork_in_a_private_network_as_an_ordinary_user() {
    let s = Session::as_user(TEST_USER, "nr_tcp_fork");
    let stop = s.stop_file();
    let mut p = s.launch_opts(&["--net", "private"], &program("tcp_fork"), &["-t", "100", "-k", "2", "-s", stop.to_str().unwrap()], &[]);
    p.wait_prefix("READY", LINE_TIMEOUT);
    p.wait_ticks(3, LINE_TIMEOUT);
    let pids = s.wait_computation(5);
    assert_eq!(pids.len(), 5, "expected 5 processes, have {pids:?}\n{}", p.context());
    let g1 = s.checkpoint_bounded(&mut p);
    p.wait_ticks(3, LINE_TIMEOUT);
    let g2 = s.checkpoint_bounded(&mut p);
    s.kill_all(&pids, &mut p);
    let run_to_done = |r: &mut Proc| {
        s.stop_at(r.last_tick.unwrap() + 2);
        r.wait_prefix("DONE", LINE_TIMEOUT);
        let st = r.wait_exit(CMD_TIMEOUT);
        assert!(st.success(), "the restored server ended with {st}\n{}", r.context());
        let ok = r.lines.iter().filter(|l| l.starts_with("CLIENT ") && l.contains(" OK records ")).count();
        assert_eq!(ok, 2, "not every client finished cleanly\n{}", r.context());
        // The restart has exited: its namespaces, and every process in
        // them, are gone.
        std::fs::remove_file(&stop).unwrap();
    };
    let mut r = s.restart_expect(&g2, p.pid, true);
    r.wait_ticks(3, LINE_TIMEOUT);
    let g3 = s.checkpoint_bounded(&mut r);
    assert!(g3.id > g2.id);
    run_to_done(&mut r);
    let mut o = s.restart_expect(&g1, p.pid, false);
    o.wait_ticks(3, LINE_TIMEOUT);
    run_to_done(&mut o);
}
