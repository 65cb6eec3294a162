//! Several hosts, made on this machine: each "host" is a network namespace
//! (`ip netns`, a veth into a bridge) with a UTS namespace of its own, so it
//! has its own address and host name. The coordinator listens on a third
//! address (the bridge's); programs on each host join it over TCP, one
//! checkpoint covers them all, `ckpt log` names each process's host, and
//! `ckpt restart` run on each host brings back that host's processes (or,
//! with `--host-map`, another host's).
mod common;
use common::*;

use std::process::Command;

/// Network namespaces and a bridge, removed on drop.
struct Net {
    tag: String,
    hosts: Vec<String>,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip (package iproute2)");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), text(&out.stderr));
}

impl Net {
    /// Hosts `names`, at 10.N.0.2, .3, ... on a bridge at 10.N.0.1.
    fn new(n: u8, names: &[&str]) -> Net {
        let tag = format!("ck{}{n}", std::process::id() % 10000);
        let net = Net { tag: tag.clone(), hosts: names.iter().map(|h| format!("{tag}{h}")).collect() };
        let br = format!("{tag}br");
        ip(&["link", "add", &br, "type", "bridge"]);
        ip(&["addr", "add", &format!("10.{n}.0.1/24"), "dev", &br]);
        ip(&["link", "set", &br, "up"]);
        for (i, ns) in net.hosts.iter().enumerate() {
            let (outer, inner) = (format!("{tag}v{i}"), format!("{tag}i{i}"));
            ip(&["netns", "add", ns]);
            ip(&["link", "add", &outer, "type", "veth", "peer", "name", &inner]);
            ip(&["link", "set", &inner, "netns", ns]);
            ip(&["link", "set", &outer, "master", &br]);
            ip(&["link", "set", &outer, "up"]);
            let addr = format!("10.{n}.0.{}/24", i + 2);
            ip(&["-n", ns, "addr", "add", &addr, "dev", &inner]);
            ip(&["-n", ns, "link", "set", &inner, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        net
    }

    /// `ip netns exec NS unshare --uts sh -c 'hostname NAME; exec "$@"' -- ARGV`:
    /// the command runs on host `name`, keeping its PID through the execs.
    fn on(&self, i: usize, name: &str, argv: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.hosts[i], "unshare", "--uts", "sh", "-c", &format!("hostname {name} && exec \"$@\""), "--"]);
        c.args(argv);
        c
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.hosts {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = Command::new("ip").args(["link", "del", &format!("{}br", self.tag)]).output();
    }
}

#[test]
fn programs_on_two_hosts_checkpoint_together_and_restart_on_their_hosts() {
    let s = Session::new("hosts");
    let net = Net::new(77, &["a", "b", "c"]);
    let coord = "tcp:10.77.0.1:47017";
    let ckpt = s.ckpt.to_str().unwrap().to_string();
    let log = std::fs::File::create(s.path("coordinator.log")).unwrap();
    let st = Command::new(&ckpt)
        .args(["coordinator", "--daemonize", "--coord", coord, "--store", &s.store])
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .status()
        .unwrap();
    assert!(st.success(), "starting the coordinator failed: see {}", s.path("coordinator.log").display());
    let quit = || {
        let _ = Command::new(&ckpt).args(["quit", "--coord", coord]).output();
    };
    struct Quit<F: Fn()>(F);
    impl<F: Fn()> Drop for Quit<F> {
        fn drop(&mut self) {
            (self.0)()
        }
    }
    let _quit = Quit(quit);

    let stop = s.stop_file();
    let prog = program("counter_heap");
    let launch = |i: usize, host: &str| {
        let mut c = net.on(i, host, &[&ckpt, "launch", "--coord", coord, "--store", &s.store, "--"]);
        c.arg(&prog).args(["-m", "16", "-t", "50", "-s", stop.to_str().unwrap()]).current_dir(&s.dir);
        let mut p = Proc::spawn(format!("counter_heap on {host}"), c);
        let line = p.wait_prefix("PID ", LINE_TIMEOUT);
        p.pid = line[4..].trim().parse().unwrap();
        assert_eq!(p.pid, p.child_pid(), "the program on {host} does not have the launch's PID");
        s.track(p.pid);
        p
    };
    let mut a = launch(0, "hosta");
    let mut b = launch(1, "hostb");
    a.wait_ticks(2, LINE_TIMEOUT);
    b.wait_ticks(2, LINE_TIMEOUT);

    let run = |args: &[&str]| {
        let mut c = Command::new(&ckpt);
        c.args(args).current_dir(&s.dir);
        run_with_timeout(c, CMD_TIMEOUT)
    };
    let out = run(&["checkpoint", "--coord", coord]);
    assert!(out.status.success(), "checkpoint of two hosts failed: {}", text(&out.stderr));
    let generation: u64 = text(&out.stdout).trim().lines().last().unwrap().trim().parse().unwrap();
    let log = run(&["log", "--store", &s.store]);
    let log = text(&log.stdout);
    for (p, host) in [(&a, "hosta"), (&b, "hostb")] {
        assert!(log.contains(&format!("{}@{host}", p.pid)), "`ckpt log` does not show process {} on {host}:\n{log}", p.pid);
    }
    a.wait_ticks(2, LINE_TIMEOUT);
    b.wait_ticks(2, LINE_TIMEOUT);
    let last_a = a.last_tick.unwrap();
    let last_b = b.last_tick.unwrap();
    let out = run(&["kill", "--coord", coord]);
    assert!(out.status.success());
    a.wait_exit(CMD_TIMEOUT);
    b.wait_exit(CMD_TIMEOUT);

    // From outside both hosts, a restart says which hosts to run it on.
    let out = run(&["restart", "--coord", coord, "--store", &s.store]);
    assert!(!out.status.success(), "a restart of a two-host generation on a third host succeeded");
    let err = text(&out.stderr);
    assert!(err.contains("hosta") && err.contains("hostb") && err.contains("--host"), "unclear error: {err}");

    // Host a's process on host a; host b's on host c.
    let restart = |i: usize, host: &str, extra: &[&str]| {
        let mut argv = vec![ckpt.as_str(), "restart", "--coord", coord, "--store", &s.store];
        argv.extend_from_slice(extra);
        let mut c = net.on(i, host, &argv);
        c.current_dir(&s.dir);
        Proc::spawn(format!("restart on {host}"), c)
    };
    let mut ra = restart(0, "hosta", &[]);
    let mut rc = restart(2, "hostc", &["--host-map", "hostb=hostc"]);
    ra.pid = a.pid;
    rc.pid = b.pid;
    let ta = ra.wait_ticks(2, RESTART_TIMEOUT);
    let tc = rc.wait_ticks(2, RESTART_TIMEOUT);
    assert!(ra.first_tick.unwrap() <= last_a + 1 && tc > 0 && ta > 0);
    assert!(rc.first_tick.unwrap() <= last_b + 1);
    let st = Command::new("cat").arg(format!("/proc/{}/net/dev", b.pid)).output().unwrap();
    assert!(text(&st.stdout).contains(&format!("{}i2", net.tag)), "process {} does not run in host c's network namespace", b.pid);

    // Both checkpoint again, from their new places.
    let out = run(&["checkpoint", "--coord", coord]);
    assert!(out.status.success(), "checkpoint after the restart failed: {}", text(&out.stderr));
    let log = text(&run(&["log", "--store", &s.store]).stdout);
    assert!(log.contains(&format!("{}@hostc", b.pid)), "`ckpt log` does not show process {} on hostc:\n{log}", b.pid);
    let _ = generation;
    s.stop_at(ra.last_tick.unwrap().max(rc.last_tick.unwrap()) + 3);
    ra.wait_prefix("DONE", LINE_TIMEOUT);
    rc.wait_prefix("DONE", LINE_TIMEOUT);
    assert!(ra.wait_exit(CMD_TIMEOUT).success());
    assert!(rc.wait_exit(CMD_TIMEOUT).success());
}
