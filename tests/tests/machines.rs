//! Separate machines, made on this machine: each "machine" has a PID
//! namespace with its own `/proc` (a mount namespace), a network namespace
//! on a bridge and a host name, so that its processes' PIDs mean nothing to
//! the coordinator outside (the two machines' programs even get the same
//! PID) and nothing of them can be read through the coordinator's `/proc`.
//! Each machine runs a capture helper (`ckpt host`), as a real second
//! machine would; the coordinator listens on the bridge.
mod common;
use common::*;

use std::process::Command;
use std::time::{Duration, Instant};

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip (package iproute2)");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), text(&out.stderr));
}

/// What a machine's init runs: it reaps every child, forever.
const REAPER: &str = "import os, time\nwhile True:\n    try:\n        os.wait()\n    except ChildProcessError:\n        time.sleep(0.05)";

/// A bridge at 10.N.0.1 and machines at 10.N.0.2, .3, ...; every process of
/// a machine dies with it (its PID namespace's init is killed on drop).
struct Machines {
    tag: String,
    names: Vec<String>,
    /// The outer PID of each machine's init.
    inits: Vec<std::process::Child>,
}

impl Machines {
    fn new(n: u8, names: &[&str]) -> Machines {
        let tag = format!("cm{}{n}", std::process::id() % 10000);
        let mut m = Machines { tag: tag.clone(), names: names.iter().map(|s| s.to_string()).collect(), inits: Vec::new() };
        let br = format!("{tag}br");
        ip(&["link", "add", &br, "type", "bridge"]);
        ip(&["addr", "add", &format!("10.{n}.0.1/24"), "dev", &br]);
        ip(&["link", "set", &br, "up"]);
        for (i, name) in names.iter().enumerate() {
            let ns = format!("{tag}{i}");
            let (outer, inner) = (format!("{tag}v{i}"), format!("{tag}i{i}"));
            ip(&["netns", "add", &ns]);
            ip(&["link", "add", &outer, "type", "veth", "peer", "name", &inner]);
            ip(&["link", "set", &inner, "netns", &ns]);
            ip(&["link", "set", &outer, "master", &br]);
            ip(&["link", "set", &outer, "up"]);
            ip(&["-n", &ns, "addr", "add", &format!("10.{n}.0.{}/24", i + 2), "dev", &inner]);
            ip(&["-n", &ns, "link", "set", &inner, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            // The machine's init: PID 1 of a new PID namespace with its own
            // /proc, reaping orphans as an init does (their PIDs are free
            // again for the restart).
            let init = Command::new("ip")
                .args(["netns", "exec", &ns, "unshare", "--pid", "--fork", "--mount-proc", "--uts", "sh", "-c"])
                .arg(format!("hostname {name} && exec {} -c '{REAPER}'", python3().display()))
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("unshare (util-linux)");
            m.inits.push(init);
        }
        // Wait until each init is the reaper, in its namespace.
        for (i, name) in names.iter().enumerate() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while m.init_pid(i).is_none() {
                assert!(Instant::now() < deadline, "machine {name} did not come up");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        m
    }

    /// The outer PID of machine `i`'s init (the reaper, the child of `unshare`).
    fn init_pid(&self, i: usize) -> Option<i32> {
        let unshare = self.inits[i].id();
        let children = std::fs::read_to_string(format!("/proc/{unshare}/task/{unshare}/children")).ok()?;
        let pid: i32 = children.split_whitespace().next()?.parse().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        comm.trim().starts_with("python").then_some(pid)
    }

    /// A command run on machine `i`: in all of its namespaces.
    /// `argv` run on machine `i`, in directory `wd` (entering a mount
    /// namespace sets the working directory to its root otherwise).
    fn on(&self, i: usize, wd: &std::path::Path, argv: &[&str]) -> Command {
        let init = self.init_pid(i).expect("machine up").to_string();
        let mut c = Command::new("nsenter");
        c.args(["-t", &init, "-p", "-m", "-u", "-n"]).arg(format!("--wd={}", wd.display())).arg("--").args(argv);
        c
    }

    /// Every process of machine `i` dies (with its PID namespace's init).
    fn power_off(&mut self, i: usize) {
        if let Some(init) = self.init_pid(i) {
            sigkill(init);
        }
        let _ = self.inits[i].kill();
        let _ = self.inits[i].wait();
    }
}

impl Drop for Machines {
    fn drop(&mut self) {
        for i in 0..self.inits.len() {
            self.power_off(i);
        }
        for i in 0..self.names.len() {
            let _ = Command::new("ip").args(["netns", "del", &format!("{}{i}", self.tag)]).output();
        }
        let _ = Command::new("ip").args(["link", "del", &format!("{}br", self.tag)]).output();
    }
}

/// `ckpt ARGS` on machine `i`, in the background.
fn on(s: &Session, m: &Machines, i: usize, what: &str, args: &[&str]) -> Proc {
    let mut argv = vec![s.ckpt.to_str().unwrap()];
    argv.extend_from_slice(args);
    // Each machine works in a directory of its own, as separate machines
    // would: programs name files by their PID, and the machines' programs
    // have the same PIDs (counter_heap.5.map written by both at once is a
    // file truncated under the other's mapping: SIGBUS).
    let dir = s.path(&m.names[i]);
    std::fs::create_dir_all(&dir).unwrap();
    let c = m.on(i, &dir, &argv);
    Proc::spawn(format!("{what} on {}", m.names[i]), c)
}

/// A program launched on machine `i`; its pid is the one it has there.
fn launch(s: &Session, m: &Machines, i: usize, coord: &str, args: &[&str]) -> Proc {
    let mut argv = vec!["launch", "--coord", coord, "--store", &s.store, "--"];
    argv.extend_from_slice(args);
    let mut p = on(s, m, i, args[0], &argv);
    let line = p.wait_prefix("PID ", LINE_TIMEOUT);
    p.pid = line[4..].trim().parse().unwrap();
    p
}

/// Waits until the coordinator lists `n` processes.
fn wait_processes(s: &Session, n: usize) {
    let deadline = Instant::now() + LINE_TIMEOUT;
    loop {
        let out = s.run("status", &["--json"]);
        let v = Json::parse(&text(&out.stdout)).unwrap_or(Json::Null);
        let have = v.get("processes").and_then(Json::as_array).map(|a| a.len()).unwrap_or(0);
        if have == n {
            return;
        }
        assert!(Instant::now() < deadline, "the coordinator lists {have} processes, not {n}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A coordinator on the bridge of `m` (10.N.0.1), for a session whose
/// commands go there.
fn coordinator(n: u8, name: &str) -> Session {
    let mut s = Session::new(name);
    let coord = format!("tcp:10.{n}.0.1:470{n}");
    s.coord = coord.clone(); // the session's commands (and its quit on drop) go there
    let log = std::fs::File::create(s.path("coordinator.log")).unwrap();
    let st = Command::new(&s.ckpt)
        .args(["coordinator", "--daemonize", "--coord", &coord, "--store", &s.store])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .status()
        .unwrap();
    assert!(st.success(), "the coordinator did not start: see {}", s.path("coordinator.log").display());
    s
}

/// Capture helpers on machines `which`, joined.
fn helpers(s: &Session, m: &Machines, which: &[usize]) -> Vec<Proc> {
    let helpers: Vec<Proc> = which.iter().map(|&i| on(s, m, i, "ckpt host", &["host", "--coord", &s.coord])).collect();
    let deadline = Instant::now() + LINE_TIMEOUT;
    while std::fs::read_to_string(s.path("coordinator.log")).unwrap_or_default().matches("capture helper joined").count() < which.len() {
        let ctx: Vec<String> = helpers.iter().map(Proc::context).collect();
        assert!(Instant::now() < deadline, "the capture helpers did not join:\n{}", ctx.join("\n"));
        std::thread::sleep(Duration::from_millis(20));
    }
    helpers
}

#[test]
fn programs_on_separate_machines_checkpoint_through_their_helpers_and_restart_there() {
    // The machines go after the session (which quits the coordinator on
    // the bridge).
    let mut m = Machines::new(79, &["alpha", "beta", "gamma"]);
    let s = coordinator(79, "machines");
    let coord = s.coord.as_str();

    // A program on a machine without a helper: the checkpoint says what to run.
    let mut lone = launch(&s, &m, 2, coord, &[program("counter_heap").to_str().unwrap(), "-m", "4", "-t", "50"]);
    lone.wait_ticks(1, LINE_TIMEOUT);
    let out = s.try_checkpoint();
    assert!(!out.status.success(), "a checkpoint of a machine without a capture helper succeeded");
    let err = text(&out.stderr);
    assert!(err.contains("ckpt host --coord") && err.contains("gamma"), "unclear error: {err}");
    lone.wait_ticks(1, LINE_TIMEOUT); // it runs on
    m.power_off(2);
    lone.wait_exit(CMD_TIMEOUT);
    wait_processes(&s, 0);

    let mut helpers = helpers(&s, &m, &[0, 1]);
    let stop = s.stop_file();
    // 200 ms ticks: each tick rewrites 64 of the heap's 4096 pages, so the
    // second checkpoint's new bytes stay under a third of the first's until
    // ~55 ticks (11 s) pass between the two snapshots, however loaded the
    // machine (at 50 ms ticks, 3 s under a load of 16 rewrote most of it).
    let args = [program("counter_heap").to_str().unwrap().to_string(), "-m".into(), "16".into(), "-t".into(), "200".into(), "-s".into(), stop.to_str().unwrap().into()];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut a = launch(&s, &m, 0, coord, &args);
    let mut b = launch(&s, &m, 1, coord, &args);
    assert_eq!(a.pid, b.pid, "the test wants both machines' programs to have the same PID (fresh PID namespaces, same steps)");
    a.wait_ticks(2, LINE_TIMEOUT);
    b.wait_ticks(2, LINE_TIMEOUT);
    wait_processes(&s, 2);

    // Two checkpoints: the second is incremental on each machine.
    let g1 = s.checkpoint();
    a.wait_ticks(2, LINE_TIMEOUT);
    let g2 = s.checkpoint();
    let gens = s.generations();
    let (full, incr) = (gens[&g1].u64_field("new_bytes"), gens[&g2].u64_field("new_bytes"));
    assert!(incr * 3 < full, "the second checkpoint stored {incr} new bytes, the first {full}: not incremental");
    let out = text(&s.run("log", &[]).stdout);
    for host in ["alpha", "beta"] {
        assert!(out.contains(&format!("{}@{host}", a.pid)), "`ckpt log` does not show process {} on {host}:\n{out}", a.pid);
    }
    a.wait_ticks(1, LINE_TIMEOUT);
    b.wait_ticks(1, LINE_TIMEOUT);

    // `ckpt kill` reaches both machines through their helpers.
    let out = s.run("kill", &[]);
    assert!(out.status.success(), "ckpt kill: {}", text(&out.stderr));
    a.wait_exit(CMD_TIMEOUT);
    b.wait_exit(CMD_TIMEOUT);
    a.drain();
    b.drain();
    let (last_a, last_b) = (a.last_tick.unwrap(), b.last_tick.unwrap());
    wait_processes(&s, 0);

    // Each machine restarts its own process, with the same PID there.
    let mut ra = on(&s, &m, 0, "restart", &["restart", "--coord", coord, "--store", &s.store]);
    let mut rb = on(&s, &m, 1, "restart", &["restart", "--coord", coord, "--store", &s.store]);
    ra.wait_ticks(2, RESTART_TIMEOUT);
    rb.wait_ticks(2, RESTART_TIMEOUT);
    assert!(ra.first_tick.unwrap() <= last_a + 1 && rb.first_tick.unwrap() <= last_b + 1);
    wait_processes(&s, 2);
    // Restored agents stay members through a quiet spell (their connection,
    // made by the restart, once had a 10 s read timeout).
    std::thread::sleep(Duration::from_secs(11));
    wait_processes(&s, 2);

    // And both checkpoint again from there.
    let g3 = s.checkpoint();
    assert!(g3 > g2);
    s.stop_at(ra.last_tick.unwrap().max(rb.last_tick.unwrap()) + 3);
    ra.wait_prefix("DONE", LINE_TIMEOUT);
    rb.wait_prefix("DONE", LINE_TIMEOUT);
    assert!(ra.wait_exit(CMD_TIMEOUT).success(), "{}", ra.context());
    assert!(rb.wait_exit(CMD_TIMEOUT).success(), "{}", rb.context());

    // Every generation is whole in the store.
    let out = s.run("verify", &["--all", "--store", &s.store]);
    assert!(out.status.success(), "verify: {}{}", text(&out.stdout), text(&out.stderr));
    for h in helpers.iter_mut() {
        assert!(!h.stderr().contains("ERROR"), "{}", h.context());
    }
}

/// A TCP client on one machine and its server on another (each with a
/// forked worker), records in flight both ways: checkpointed twice
/// mid-stream through the two helpers (each holds one end of the
/// connection; the coordinator pairs the ends up across machines), killed,
/// restarted on both machines at once; both run to the end and every
/// record is checked.
#[test]
fn tcp_connection_between_two_machines_survives_kill_and_restart() {
    let m = Machines::new(80, &["alpha", "beta"]);
    let s = coordinator(80, "machines_tcp");
    let coord = s.coord.as_str();
    let mut helpers = helpers(&s, &m, &[0, 1]);
    let stop = s.stop_file();
    let stop = stop.to_str().unwrap();
    let prog = program("tcp_fork");
    let prog = prog.to_str().unwrap();
    let mut server = launch(&s, &m, 1, coord, &[prog, "-S", "47100", "-t", "50", "-s", stop]);
    server.wait_prefix("LISTENING", LINE_TIMEOUT);
    let mut client = launch(&s, &m, 0, coord, &[prog, "-C", "10.80.0.3:47100", "-t", "50", "-s", stop]);
    client.wait_ticks(3, LINE_TIMEOUT);
    server.wait_ticks(3, LINE_TIMEOUT);
    wait_processes(&s, 4);
    s.checkpoint();
    client.wait_ticks(2, LINE_TIMEOUT);
    let g = s.checkpoint();
    let log = text(&s.run("log", &[]).stdout);
    assert!(
        log.contains(&format!("{}@alpha", client.pid)) && log.contains(&format!("{}@beta", server.pid)),
        "`ckpt log` does not show the two machines:\n{log}"
    );
    let out = s.run("kill", &[]);
    assert!(out.status.success(), "ckpt kill: {}", text(&out.stderr));
    client.wait_exit(CMD_TIMEOUT);
    server.wait_exit(CMD_TIMEOUT);
    wait_processes(&s, 0);

    let g = g.to_string();
    let mut rs = on(&s, &m, 1, "restart", &["restart", &g, "--coord", coord, "--store", &s.store]);
    let mut rc = on(&s, &m, 0, "restart", &["restart", &g, "--coord", coord, "--store", &s.store]);
    rc.wait_ticks(5, RESTART_TIMEOUT);
    rs.wait_ticks(5, RESTART_TIMEOUT);
    // The restored pair checkpoints again, through the helpers.
    wait_processes(&s, 4);
    s.checkpoint();
    s.finish_tcp_pair(&mut rc, &mut rs);
    for h in helpers.iter_mut() {
        assert!(!h.stderr().contains("ERROR"), "{}", h.context());
    }
}
