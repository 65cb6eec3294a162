//! TCP to the coordinator is authenticated and encrypted, both ways: raw
//! clients, clients with another computation's secret and fake
//! coordinators get nothing, and the coordinator goes on serving its
//! computation.
mod common;
use common::*;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A secret file of another computation, in the session's directory.
fn other_secret(s: &Session) -> std::path::PathBuf {
    let p = s.path("other.key");
    std::fs::write(&p, format!("{}\n", "5a".repeat(32))).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// `ckpt coordinator` on `addr` in the foreground, its log in the session's
/// directory; killed on drop.
struct Coord {
    child: Child,
    log: std::path::PathBuf,
}

impl Coord {
    fn start(s: &Session, addr: &str, secret: Option<&std::path::Path>, name: &str) -> Coord {
        let log = s.path(&format!("{name}.log"));
        let mut c = Command::new(&s.ckpt);
        c.args(["coordinator", "--coord", addr, "--store", &format!("{}-{name}", s.store)])
            .current_dir(&s.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if let Some(p) = secret {
            c.env("CKPT_SECRET_FILE", p);
        }
        let child = c.spawn().unwrap();
        let hp = addr.strip_prefix("tcp:").unwrap().to_string();
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(&hp).is_err() {
            assert!(Instant::now() < deadline, "the coordinator on {addr} did not come up: {}", std::fs::read_to_string(&log).unwrap_or_default());
            std::thread::sleep(Duration::from_millis(50));
        }
        Coord { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Coord {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A listener that answers nothing and records what every peer sent.
fn plain_listener() -> (u16, Arc<Mutex<Vec<Vec<u8>>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let g = g.clone();
            std::thread::spawn(move || {
                let mut c = c;
                c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let mut buf = Vec::new();
                let _ = c.read_to_end(&mut buf);
                g.lock().unwrap().push(buf);
            });
        }
    });
    (port, got)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Sends `bytes` on a raw TCP connection; returns what came back before
/// the coordinator closed it.
fn raw_exchange(port: u16, bytes: &[u8]) -> Vec<u8> {
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = c.write_all(bytes);
    let mut back = Vec::new();
    match c.read_to_end(&mut back) {
        Ok(_) => {}
        // Closed with our bytes unread: the kernel resets.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the coordinator must close the connection, not leave it waiting: {e}"),
    }
    back
}

/// A session whose coordinator listens on a free loopback port, with a
/// counter program launched under it and ticking.
fn tcp_computation(name: &str) -> (Session, Coord, u16, Proc) {
    let mut s = Session::new(name);
    let port = free_port();
    s.coord = format!("tcp:127.0.0.1:{port}");
    let co = Coord::start(&s, &s.coord, None, "coord");
    // The session's commands use that coordinator's store.
    s.store = format!("{}-coord", s.store);
    let stop = s.stop_file();
    let mut p = s.launch(&program("counter_heap"), &["-m", "4", "-t", "50", "-s", stop.to_str().unwrap()]);
    p.wait_ticks(2, LINE_TIMEOUT);
    (s, co, port, p)
}

#[test]
fn raw_clients_are_closed_before_anything_is_parsed() {
    let (s, co, port, mut p) = tcp_computation("trust_tcp_raw");

    // An agent's HELLO as a plain agent would send it: the header magic
    // ("CKPT") and a HELLO claiming pid 1.
    let mut hello = Vec::new();
    hello.extend_from_slice(&0x434b_5054u32.to_le_bytes());
    hello.extend_from_slice(&[1, 0, 0, 0, 200, 0, 0, 0, 0, 0, 0, 0]);
    hello.extend_from_slice(&[1u8; 200]);
    let garbage: Vec<u8> = (0..20000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    for (what, bytes) in [("kill", b"{\"cmd\":\"kill\"}\n".to_vec()), ("hello", hello), ("garbage", garbage)] {
        let back = raw_exchange(port, &bytes);
        assert!(back.is_empty(), "a raw {what} got an answer: {:?}", String::from_utf8_lossy(&back));
    }
    // Nothing was killed; the computation is still served.
    assert!(pid_alive(p.pid), "a raw kill killed the program");
    p.wait_ticks(2, LINE_TIMEOUT);
    s.checkpoint();
    let log = co.log();
    assert!(log.matches("closed a TCP connection before reading it").count() >= 3, "no log line for each raw peer:\n{log}");
    assert!(log.contains("127.0.0.1"), "the log does not name the peer:\n{log}");
    p.kill9();
}

#[test]
fn a_client_with_another_secret_is_refused_and_told_what_to_do() {
    let (s, co, _port, mut p) = tcp_computation("trust_tcp_key");
    let other = other_secret(&s);
    for sub in ["kill", "checkpoint", "status"] {
        let mut c = s.cmd(sub);
        c.env("CKPT_SECRET_FILE", &other);
        let out = run_with_timeout(c, CMD_TIMEOUT);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "`ckpt {sub}` with another secret succeeded");
        assert!(err.contains("secure handshake") && err.contains("CKPT_SECRET_FILE") && err.contains("copy the secret file"), "unclear error for `ckpt {sub}`: {err}");
    }
    let mut c = s.cmd("status");
    c.env("CKPT_SECRET_FILE", s.path("missing.key"));
    let out = run_with_timeout(c, CMD_TIMEOUT);
    let err = text(&out.stderr);
    assert!(!out.status.success() && err.contains("missing.key") && err.contains("copy the file"), "unclear error without a secret: {err}");
    assert!(co.log().contains("failed the secure handshake"), "no log line for the wrong key:\n{}", co.log());
    assert!(pid_alive(p.pid), "a client with another secret killed the program");
    p.wait_ticks(2, LINE_TIMEOUT);
    s.checkpoint();
    p.kill9();
}

/// Runs a counter whose agent connects to `coord` with the right
/// membership key; returns its stderr once it ran a few ticks.
fn agent_against(s: &Session, coord: &str) -> String {
    let key = std::fs::read_to_string(std::env::var_os("CKPT_SECRET_FILE").map(std::path::PathBuf::from).unwrap_or_else(|| "/root/.config/ckpt/coord.key".into()))
        .expect("this machine's secret (made by the coordinators of these tests)");
    let key = blake3::derive_key("ckpt 2026-12-02 computation membership key v1", &hex_bytes(key.trim()));
    let stop = s.path("STOP-agent");
    std::fs::write(&stop, "3\n").unwrap();
    let mut c = Command::new(program("counter_heap"));
    c.args(["-m", "4", "-t", "20", "-s", stop.to_str().unwrap()])
        .env("LD_PRELOAD", s.ckpt.with_file_name("libckpt_preload.so"))
        .env("CKPT_COORD", coord)
        .env("CKPT_AGENT_KEY", key.iter().map(|b| format!("{b:02x}")).collect::<String>())
        .current_dir(&s.dir);
    let out = run_with_timeout(c, CMD_TIMEOUT);
    assert!(text(&out.stdout).contains("DONE"), "the program did not run on without checkpoints: {}", text(&out.stderr));
    text(&out.stderr)
}

fn hex_bytes(s: &str) -> [u8; 32] {
    let mut b = [0u8; 32];
    for (i, x) in b.iter_mut().enumerate() {
        *x = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
    }
    b
}

#[test]
fn fake_coordinators_get_no_hello_and_no_memory() {
    let s = Session::new("trust_tcp_fake");
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap().trim().to_string();

    // 1. A plain listener: it receives the handshake's first message only.
    let (port, got) = plain_listener();
    let fake = format!("tcp:127.0.0.1:{port}");
    let out = run_with_timeout({
        let mut c = s.cmd("host");
        c.args(["--coord", &fake]);
        c
    }, CMD_TIMEOUT);
    assert!(!out.status.success(), "`ckpt host` served a plain listener");
    assert!(text(&out.stderr).contains("did not answer the secure handshake"), "unclear error: {}", text(&out.stderr));
    let err = agent_against(&s, &fake);
    assert!(err.contains("cannot reach the coordinator"), "the agent did not refuse the plain listener: {err}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.lock().unwrap().len() < 2 {
        assert!(Instant::now() < deadline, "the fake coordinator saw {} connections", got.lock().unwrap().len());
        std::thread::sleep(Duration::from_millis(50));
    }
    for bytes in got.lock().unwrap().iter() {
        assert!(bytes.starts_with(b"CKPTNZ") && bytes.len() == 8 + 2 + 48, "the fake coordinator received {} bytes: {:?}", bytes.len(), String::from_utf8_lossy(bytes));
        for needle in [b"boot_id".as_slice(), boot_id.as_bytes(), b"HELLO", b"\"host\""] {
            assert!(!contains(bytes, needle), "the fake coordinator received {:?}", String::from_utf8_lossy(needle));
        }
    }

    // 2. A coordinator that speaks the handshake with another secret.
    let other = other_secret(&s);
    let port = free_port();
    let fake = format!("tcp:127.0.0.1:{port}");
    let co = Coord::start(&s, &fake, Some(&other), "fake");
    let out = run_with_timeout({
        let mut c = s.cmd("host");
        c.args(["--coord", &fake]);
        c
    }, CMD_TIMEOUT);
    assert!(!out.status.success(), "`ckpt host` served a coordinator with another secret");
    assert!(text(&out.stderr).contains("secure handshake"), "unclear error: {}", text(&out.stderr));
    let err = agent_against(&s, &fake);
    assert!(err.contains("cannot reach the coordinator"), "the agent joined a coordinator with another secret: {err}");
    let log = co.log();
    assert!(!log.contains("capture helper joined") && !log.contains("process joined"), "the fake coordinator accepted a peer:\n{log}");
    assert_eq!(log.matches("failed the secure handshake").count(), 2, "the fake coordinator's log:\n{log}");
}

/// A loopback listener whose accept queue is full and never drained: the
/// kernel drops every further SYN, so a connection times out, as to a
/// coordinator behind a firewall or on a machine that went away. The
/// connections that fill the queue are returned with it.
fn silent_listener() -> (u16, TcpListener, Vec<TcpStream>) {
    use nix::sys::socket::{Backlog, listen};
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    // listen(2) again on our own listening socket: a backlog of 0.
    listen(&l, Backlog::new(0).unwrap()).unwrap();
    let port = l.local_addr().unwrap().port();
    let mut held = Vec::new();
    // The queue holds backlog + 1; fill it until a connection times out.
    loop {
        match TcpStream::connect_timeout(&format!("127.0.0.1:{port}").parse().unwrap(), Duration::from_millis(300)) {
            Ok(c) => held.push(c),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => break,
            Err(e) => panic!("filling the accept queue: {e}"),
        }
        assert!(held.len() < 16, "the accept queue never filled");
    }
    (port, l, held)
}

#[test]
fn a_launch_never_replaces_a_coordinator_that_does_not_answer() {
    // Something listens at the address but the connection times out: a
    // busy coordinator, a firewall, a machine gone, not an absent
    // coordinator. The launch must say so, not start a coordinator (and
    // make a store) of its own there.
    let s = Session::new("trust_tcp_noanswer");
    let (port, _l, _held) = silent_listener();
    let silent = format!("tcp:127.0.0.1:{port}");
    let store = s.path("never-made");
    let out = run_with_timeout({
        let mut c = Command::new(&s.ckpt);
        c.args(["launch", "--coord", &silent, "--store", store.to_str().unwrap(), "--", "/bin/true"]).current_dir(&s.dir);
        c
    }, CMD_TIMEOUT);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "the launch went ahead without its coordinator: {err}");
    assert!(err.contains("cannot talk to the coordinator at") && err.contains(&silent), "unclear error: {err}");
    assert!(!store.exists(), "the launch made a store of its own at {} for a coordinator it could not reach", store.display());
}

/// A forwarding proxy from a new port to `to`, recording every byte of
/// both directions.
fn recording_proxy(to: u16) -> (u16, Arc<Mutex<Vec<u8>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    std::thread::spawn(move || {
        for a in l.incoming().flatten() {
            let Ok(b) = TcpStream::connect(("127.0.0.1", to)) else { continue };
            for (mut from, mut into) in [(a.try_clone().unwrap(), b.try_clone().unwrap()), (b, a)] {
                let seen = s2.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 1 << 16];
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 || into.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        seen.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                    let _ = into.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    (port, seen)
}

#[test]
fn memory_never_crosses_the_wire_in_cleartext() {
    let mut s = Session::new("trust_tcp_wire");
    let port = free_port();
    s.coord = format!("tcp:127.0.0.1:{port}");
    let _co = Coord::start(&s, &s.coord, None, "coord");
    s.store = format!("{}-coord", s.store);
    let (pport, seen) = recording_proxy(port);
    // Incompressible bytes in the program's memory (zstd stores them as
    // they are): in cleartext they would be on the wire verbatim.
    let marker: Vec<u8> = {
        let mut m = vec![0u8; 1 << 20];
        std::fs::File::open("/dev/urandom").unwrap().read_exact(&mut m).unwrap();
        m
    };
    std::fs::write(s.path("marker.bin"), &marker).unwrap();
    let prog = s.path("hold.py");
    std::fs::write(&prog, "import sys, time\ndata = bytearray(open(sys.argv[1], 'rb').read())\nprint('READY', flush=True)\nwhile True:\n    time.sleep(0.05)\n").unwrap();
    // A machine of its own (a PID namespace) whose capture helper and
    // program reach the coordinator through the proxy.
    let via = format!("tcp:127.0.0.1:{pport}");
    let script = format!(
        "{ckpt} host --coord {via} & sleep 1; {ckpt} launch --coord {via} --store {store} -- {py} {prog} {marker} & wait",
        ckpt = s.ckpt.display(),
        store = s.store,
        py = python3().display(),
        prog = prog.display(),
        marker = s.path("marker.bin").display()
    );
    let mut c = Command::new("unshare");
    c.args(["--pid", "--fork", "--mount-proc", "--kill-child", "sh", "-c", &script]).current_dir(&s.dir);
    let mut p = Proc::spawn("machine with helper".into(), c);
    p.pid = p.child_pid();
    p.wait_prefix("READY", LINE_TIMEOUT);
    let t0 = Instant::now();
    s.checkpoint();
    eprintln!("helper checkpoint of 1 MiB through the channel: {:?}", t0.elapsed());
    let wire = seen.lock().unwrap().clone();
    assert!(wire.len() > marker.len(), "only {} bytes crossed the proxy: the image did not travel through it", wire.len());
    for at in (0..marker.len() - 64).step_by(4096) {
        assert!(!contains(&wire, &marker[at..at + 32]), "bytes of the program's memory crossed the wire in cleartext");
    }
    p.kill9();
}
