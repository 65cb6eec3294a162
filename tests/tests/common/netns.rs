//! Namespace "hosts" on this machine, for the tests that cross a network
//! (hosts.rs, mpi_hosts.rs): each host is a network namespace (`ip netns`,
//! a veth into a bridge) with a UTS namespace of its own, so it has its own
//! address and host name; and a coordinator listening on the bridge's
//! address that every host reaches.
#![allow(dead_code)]

use crate::common::*;

use std::process::Command;

/// Network namespaces and a bridge, removed on drop.
pub struct Net {
    pub tag: String,
    /// The namespaces' names (`ip netns`), in the order given.
    pub hosts: Vec<String>,
}

pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip (package iproute2)");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), text(&out.stderr));
}

impl Net {
    /// Hosts `names`, at 10.N.0.2, .3, ... on a bridge at 10.N.0.1.
    pub fn new(n: u8, names: &[&str]) -> Net {
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
    pub fn on(&self, i: usize, name: &str, argv: &[&str]) -> Command {
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

/// A coordinator listening at `coord` (a bridge address) for the session's
/// store; quit on drop.
pub struct Coordinator {
    pub ckpt: String,
    pub coord: String,
}

impl Coordinator {
    pub fn start(s: &Session, coord: &str) -> Coordinator {
        let log = std::fs::File::create(s.path("coordinator.log")).unwrap();
        let ckpt = s.ckpt.to_str().unwrap().to_string();
        let st = Command::new(&ckpt)
            .args(["coordinator", "--daemonize", "--coord", coord, "--store", &s.store])
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .status()
            .unwrap();
        assert!(st.success(), "starting the coordinator failed: see {}", s.path("coordinator.log").display());
        Coordinator { ckpt, coord: coord.to_string() }
    }

    /// `ckpt ARGS...` (run to completion).
    pub fn run(&self, s: &Session, args: &[&str]) -> std::process::Output {
        let mut c = Command::new(&self.ckpt);
        c.args(args).current_dir(&s.dir);
        run_with_timeout(c, CMD_TIMEOUT)
    }

    /// `ckpt launch` of `prog ARGS` on host `i` named `host`.
    pub fn launch(&self, s: &Session, net: &Net, i: usize, host: &str, prog: &std::path::Path, args: &[&str]) -> Proc {
        let mut c = net.on(i, host, &[&self.ckpt, "launch", "--coord", &self.coord, "--store", &s.store, "--"]);
        c.arg(prog).args(args).current_dir(&s.dir);
        let mut p = Proc::spawn(format!("{} on {host}", prog.display()), c);
        let line = p.wait_prefix("PID ", LINE_TIMEOUT);
        p.pid = line[4..].trim().parse().unwrap();
        assert_eq!(p.pid, p.child_pid(), "the program on {host} does not have the launch's PID");
        s.track(p.pid);
        p
    }

    /// `ckpt restart ARGS` on host `i` named `host`, in the background.
    pub fn restart(&self, s: &Session, net: &Net, i: usize, host: &str, pid: i32, extra: &[&str]) -> Proc {
        let mut argv = vec![self.ckpt.as_str(), "restart", "--coord", &self.coord, "--store", &s.store];
        argv.extend_from_slice(extra);
        let mut c = net.on(i, host, &argv);
        c.current_dir(&s.dir);
        let mut p = Proc::spawn(format!("restart on {host}"), c);
        p.pid = pid;
        p
    }

    pub fn checkpoint(&self, s: &Session) -> u64 {
        let out = self.run(s, &["checkpoint", "--coord", &self.coord]);
        assert!(out.status.success(), "checkpoint failed: {}", text(&out.stderr));
        text(&out.stdout).trim().lines().last().unwrap().trim().parse().unwrap()
    }

    pub fn kill(&self, s: &Session, procs: &mut [&mut Proc]) {
        let out = self.run(s, &["kill", "--coord", &self.coord]);
        assert!(out.status.success(), "ckpt kill: {}", text(&out.stderr));
        for p in procs.iter_mut() {
            p.wait_exit(CMD_TIMEOUT);
        }
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = Command::new(&self.ckpt).args(["quit", "--coord", &self.coord]).output();
    }
}

