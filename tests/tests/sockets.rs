//! sockets: unix socketpairs (stream, datagram, seqpacket), named and
//! abstract unix sockets, and a TCP connection on loopback, each with data
//! in flight at every checkpoint, survive checkpoint, kill -9 and restart
//! with nothing lost or repeated (the programs check every record's number
//! and print DONE); a socket connected outside the computation is refused
//! with an error that names it.
mod common;
use common::*;

#[test]
fn unix_sockets_checkpoint_restart_cycle() {
    let c = Cycle::new(program("sockpair"), &["-t", "100"]);
    standard_cycle("sockets_unix", &c);
}

#[test]
fn tcp_loopback_checkpoint_restart_cycle() {
    let c = Cycle::new(program("tcp_loop"), &["-t", "100"]);
    let s = standard_cycle("sockets_tcp", &c);
    drop(s);
}

#[test]
fn unix_socket_to_an_outside_server_is_refused() {
    let s = Session::new("sockets_outside");
    let path = s.path("outside.sock");
    let server = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let stop = s.stop_file();
    let mut p = s.launch(&program("sockpair"), &["-t", "100", "-c", path.to_str().unwrap(), "-s", stop.to_str().unwrap()]);
    let pid = p.pid;
    let (_conn, _) = server.accept().unwrap();
    p.wait_prefix("READY", LINE_TIMEOUT);
    p.wait_ticks(2, LINE_TIMEOUT);
    let out = s.try_checkpoint();
    let err = text(&out.stderr);
    assert!(!out.status.success(), "a checkpoint with a socket connected outside succeeded\n{err}");
    assert!(err.contains(&format!("process {pid}")), "the error does not name process {pid}: {err}");
    assert!(err.contains("fd 60"), "the error does not name fd 60: {err}");
    assert!(err.contains("outside.sock") && err.contains("outside the computation"), "the error does not name the peer: {err}");
    assert!(s.generations().is_empty(), "a generation was committed");
    // The program goes on, its sockets untouched.
    p.wait_ticks(3, LINE_TIMEOUT);
    p.finish(&s, 2);
}

/// Runs a restored tcp_fork to the end: every client got every echo.
fn run_to_done(s: &Session, r: &mut Proc, clients: usize) {
    s.stop_at(r.last_tick.unwrap() + 2);
    r.wait_prefix("DONE", LINE_TIMEOUT);
    let st = r.wait_exit(CMD_TIMEOUT);
    assert!(st.success(), "the restored server ended with {st}\n{}", r.context());
    let ok = r.lines.iter().filter(|l| l.starts_with("CLIENT ") && l.contains(" OK records ")).count();
    assert_eq!(ok, clients, "not every client finished cleanly\n{}", r.context());
}

#[test]
fn forking_tcp_server_and_clients_checkpoint_restart() {
    let s = Session::new("sockets_fork");
    let stop = s.stop_file();
    // The server, two clients, a handler per client.
    let (mut p, pids) = s.launch_computation(&program("tcp_fork"), &["-t", "100", "-k", "2", "-s", stop.to_str().unwrap()], 5);
    let g1 = s.checkpoint_bounded(&mut p);
    p.wait_ticks(3, LINE_TIMEOUT);
    let g2 = s.checkpoint_bounded(&mut p);
    assert_eq!(s.generations()[&g2.id].u64_field("nprocs"), 5);
    s.kill_all(&pids, &mut p);

    let mut r = s.restart_expect(&g2, p.pid, true);
    for &pid in &pids {
        assert!(pid_alive(pid), "process {pid} was not restored\n{}", r.context());
    }
    r.wait_ticks(3, LINE_TIMEOUT);
    let g3 = s.checkpoint_bounded(&mut r);
    assert!(g3.id > g2.id);
    r.wait_ticks(2, LINE_TIMEOUT);
    run_to_done(&s, &mut r, 2);

    // The oldest generation too, after everything of the last run is gone.
    std::fs::remove_file(&stop).unwrap();
    for &pid in &pids {
        wait_gone(pid, std::time::Duration::from_secs(20));
    }
    let mut o = s.restart_expect(&g1, p.pid, false);
    o.wait_ticks(3, LINE_TIMEOUT);
    run_to_done(&s, &mut o, 2);
}

/// UDP between a parent (unconnected socket) and its child (connected),
/// datagrams always waiting in both queues: each comes back after the
/// restart, from its sender's address, none lost or repeated (udp.c checks
/// every one).
#[test]
fn udp_datagrams_in_flight_survive_kill_and_restart() {
    let s = Session::new("sockets_udp");
    let stop = s.stop_file();
    let (mut p, pids) = s.launch_computation(&program("udp"), &["-t", "50", "-s", stop.to_str().unwrap()], 2);
    let g1 = s.checkpoint_bounded(&mut p);
    p.wait_ticks(2, LINE_TIMEOUT);
    let g2 = s.checkpoint_bounded(&mut p);
    s.kill_all(&pids, &mut p);
    for g in [&g2, &g1] {
        let mut r = s.restart_expect(g, p.pid, g.id == g2.id);
        r.wait_ticks(5, LINE_TIMEOUT);
        if g.id == g2.id {
            s.stop_at(r.last_tick.unwrap() + 3);
            r.wait_prefix("DONE", LINE_TIMEOUT);
            assert!(r.wait_exit(CMD_TIMEOUT).success(), "{}", r.context());
            let _ = std::fs::remove_file(&stop);
            for &pid in &pids {
                wait_gone(pid, std::time::Duration::from_secs(20));
            }
        } else {
            s.kill_all(&pids, &mut r);
        }
    }
}

/// `tcp_loop -6`: an IPv6 listener with IPV6_V6ONLY on the port of an IPv4
/// one (as each Open MPI rank listens). The option is set again before the
/// bind, else the IPv6 bind fails with EADDRINUSE and the restart with it;
/// the program checks it, the address and a probe through it every tick.
#[test]
fn ipv6_only_listener_beside_an_ipv4_one() {
    let c = Cycle::new(program("tcp_loop"), &["-t", "100", "-6"]);
    standard_cycle("sockets_v6only", &c);
}

/// A TCP listener without SO_REUSEADDR, restarted right after `ckpt kill`,
/// twice: the connections of its earlier life (the killed accepted
/// connection, the probes' TIME_WAIT) still hold its port; the restart
/// removes those leftovers (sockets no process holds) before binding, and
/// the listener comes back with SO_REUSEADDR off, as the program set it
/// (tcp_loop -R checks it every tick, and its probes connect through it).
#[test]
fn tcp_listener_restarts_right_after_kill_twice() {
    let s = Session::new("sockets_relisten");
    let stop = s.stop_file();
    let mut p = s.launch(&program("tcp_loop"), &["-t", "100", "-R", "-s", stop.to_str().unwrap()]);
    let port: u16 = p.wait_prefix("PORT ", LINE_TIMEOUT)[5..].trim().parse().unwrap();
    p.wait_ticks(3, LINE_TIMEOUT);
    let g = s.checkpoint_bounded(&mut p);
    s.kill_all(&[p.pid], &mut p);
    for round in 0..2 {
        // No pause: the port's leftovers are all still there (the test's
        // premise: without them it would prove nothing).
        let left = leftovers_on(port);
        assert!(!left.is_empty(), "round {round}: nothing of the killed program's connections is left on port {port}");
        eprintln!("[sockets_relisten] round {round}: states left on port {port}: {left:?}");
        let mut r = s.restart_expect(&g, p.pid, true);
        r.wait_ticks(3, LINE_TIMEOUT);
        if round == 1 {
            s.stop_at(r.last_tick.unwrap() + 2);
            r.wait_prefix("DONE", LINE_TIMEOUT);
            let st = r.wait_exit(CMD_TIMEOUT);
            assert!(st.success(), "the restored program ended with {st}\n{}", r.context());
        } else {
            s.kill_all(&[r.pid], &mut r);
        }
    }
}

/// The TCP states (hex, /proc/net/tcp) of sockets other than listeners
/// whose local port is `port`.
fn leftovers_on(port: u16) -> Vec<String> {
    let t = std::fs::read_to_string("/proc/net/tcp").unwrap();
    t.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local_port = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
            (local_port == port && f[3] != "0A").then(|| f[3].to_string())
        })
        .collect()
}
