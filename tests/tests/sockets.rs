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
