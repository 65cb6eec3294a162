//! Every message is validated: raw clients and raw agents send what no
//! ckpt would (an endless line, bad JSON, unknown commands, a request
//! missing a field, a SUSPENDED counting 2^32-1 threads, a frame claiming
//! 4 GiB) to a real coordinator of a real launched program. Each is
//! refused, naming what was wrong; the coordinator's memory stays bounded
//! and it still checkpoints its program afterwards.
mod common;
use common::*;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

const MAGIC: u32 = 0x434b_5054;
const HELLO: u32 = 1;
const WELCOME: u32 = 2;
const CHECKPOINT: u32 = 3;
const SUSPENDED: u32 = 4;
/// `size_of::<Suspended>()` in ckpt-wire.
const SUSPENDED_LEN: usize = 2168;

fn sock(s: &Session) -> UnixStream {
    let path = s.coord.strip_prefix("unix:").unwrap();
    let c = UnixStream::connect(path).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    c
}

/// Sends `bytes` as a client request; the coordinator's answer line, or
/// None if it closed the connection without one.
fn raw_request(s: &Session, bytes: &[u8]) -> Option<String> {
    let mut c = sock(s);
    // The coordinator may stop reading (and close) before all is written.
    let _ = c.write_all(bytes);
    let mut answer = Vec::new();
    let _ = c.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer).trim().to_string();
    (!answer.is_empty()).then_some(answer)
}

fn coordinator_pid(s: &Session) -> i32 {
    let out = s.run("status", &["--json"]);
    assert!(out.status.success(), "ckpt status: {}", text(&out.stderr));
    let j = Json::parse(&text(&out.stdout)).unwrap();
    j.get("coordinator").and_then(|c| c.get("pid")).and_then(Json::as_u64).expect("status names the coordinator's pid") as i32
}

fn vm_rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn assert_rss_bounded(coord: i32, after: &str) {
    let rss = vm_rss_kib(coord);
    eprintln!("coordinator VmRSS after {after}: {rss} KiB");
    assert!(rss < 200 << 10, "the coordinator's RSS is {rss} KiB after {after}");
}

#[test]
fn bad_client_requests_are_refused_and_the_coordinator_still_checkpoints() {
    let s = Session::new("trust_proto_client");
    let stop = s.stop_file();
    let mut p = s.launch(&program("counter_heap"), &["-m", "8", "-t", "50", "-s", stop.to_str().unwrap()]);
    p.wait_ticks(2, LINE_TIMEOUT);
    s.checkpoint_bounded(&mut p);
    let coord = coordinator_pid(&s);

    // 10 MiB without a newline: refused once past 64 KiB, connection closed.
    let answer = raw_request(&s, &vec![b'x'; 10 << 20]);
    if let Some(a) = &answer {
        assert!(a.contains("\"ok\":false") && a.contains("longer than 65536"), "the endless line got {a}");
    }
    assert_rss_bounded(coord, "a 10 MiB line");
    s.checkpoint_bounded(&mut p);

    let cases: [(&str, &str); 5] = [
        ("{\"cmd\": \"checkpoint\"\n", "EOF while parsing"),
        ("{\"cmd\":\"format_disk\"}\n", "unknown variant `format_disk`"),
        ("{\"cmd\":\"restart_barrier\",\"arrived\":[],\"hosts\":[\"a\"]}\n", "missing field `generation`"),
        ("{\"cmd\":\"wait_process\",\"pid\":-1}\n", "pid -1 is not a process"),
        ("{\"cmd\":\"kill\",\"pids\":[1]}\n", "unknown field `pids`"),
    ];
    for (req, why) in cases {
        let a = raw_request(&s, req.as_bytes()).unwrap_or_else(|| panic!("no answer to {req:?}"));
        assert!(a.contains("\"ok\":false") && a.contains(why), "{req:?} got {a}, not a refusal saying {why:?}");
        s.checkpoint_bounded(&mut p);
    }
    // The kill with a stray field killed nothing.
    assert!(pid_alive(p.pid));
    // A well-formed request still works on a raw connection.
    let a = raw_request(&s, b"{\"cmd\":\"hello\"}\n").unwrap();
    assert!(a.contains("\"ok\":true") && a.contains("\"store\""), "hello got {a}");
    s.stop_at(p.last_tick.unwrap() + 2);
    p.wait_prefix("DONE", LINE_TIMEOUT);
    assert!(p.wait_exit(CMD_TIMEOUT).success(), "{}", p.context());
}

/// A raw agent, as `preload/src/agent.rs` `hello` speaks: HELLO with this
/// test's own pid, then the WELCOME read.
fn raw_agent(s: &Session) -> UnixStream {
    let mut c = sock(s);
    let mut hello = Vec::with_capacity(176);
    let me = std::process::id() as i32;
    for v in [2i32, me, 0, me, 800, 62] {
        hello.extend_from_slice(&v.to_le_bytes());
    }
    hello.extend_from_slice(&[0u8; 24]); // restored_gen, restart_word_addr, flags
    hello.extend_from_slice(&(-1i32).to_le_bytes()); // uffd_fd
    hello.extend_from_slice(&3u32.to_le_bytes()); // tracking: scan
    hello.extend_from_slice(&[0u8; 16 + 64 + 40]); // pidns, netns, host, boot_id
    assert_eq!(hello.len(), 176);
    c.write_all(&frame(HELLO, hello.len() as u32)).unwrap();
    c.write_all(&hello).unwrap();
    let (kind, len) = read_frame(&mut c).expect("no WELCOME");
    assert_eq!(kind, WELCOME);
    let mut w = vec![0u8; len as usize];
    c.read_exact(&mut w).unwrap();
    c
}

fn frame(kind: u32, len: u32) -> Vec<u8> {
    [MAGIC, kind, len, 0].iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn read_frame(c: &mut UnixStream) -> Option<(u32, u32)> {
    let mut h = [0u8; 16];
    c.read_exact(&mut h).ok()?;
    let word = |i: usize| u32::from_le_bytes(h[i * 4..i * 4 + 4].try_into().unwrap());
    assert_eq!(word(0), MAGIC);
    Some((word(1), word(2)))
}

/// Waits for the coordinator's CHECKPOINT on a raw agent's connection.
fn await_checkpoint(c: &mut UnixStream) {
    let (kind, len) = read_frame(c).expect("no CHECKPOINT reached the raw agent");
    assert_eq!(kind, CHECKPOINT);
    let mut req = vec![0u8; len as usize];
    c.read_exact(&mut req).unwrap();
}

/// The coordinator closed the raw agent's connection.
fn assert_closed(c: &mut UnixStream) {
    let mut b = [0u8; 64];
    match c.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the coordinator kept the bad agent's connection: {other:?}"),
    }
}

#[test]
fn malformed_agent_reports_fail_the_round_and_close_only_that_agent() {
    let s = Session::new("trust_proto_agent");
    let stop = s.stop_file();
    let mut p = s.launch(&program("counter_heap"), &["-m", "8", "-t", "50", "-s", stop.to_str().unwrap()]);
    p.wait_ticks(2, LINE_TIMEOUT);
    s.checkpoint_bounded(&mut p);
    let coord = coordinator_pid(&s);
    let me = std::process::id().to_string();

    // A SUSPENDED counting 0xffffffff threads (it used to abort the
    // coordinator on allocation).
    let mut agent = raw_agent(&s);
    assert_eq!(s.wait_computation(2).len(), 2, "the raw agent did not join");
    let mut ck = Proc::spawn("checkpoint".into(), s.cmd("checkpoint"));
    await_checkpoint(&mut agent);
    let mut report = vec![0u8; SUSPENDED_LEN];
    report[..4].copy_from_slice(&u32::MAX.to_le_bytes());
    agent.write_all(&frame(SUSPENDED, report.len() as u32)).unwrap();
    agent.write_all(&report).unwrap();
    assert!(!ck.wait_exit(CMD_TIMEOUT).success(), "a checkpoint with a malformed report succeeded");
    let err = ck.stderr();
    assert!(err.contains(&format!("process {me} sent a malformed report")) && err.contains("4294967295 threads"), "the error does not say what was wrong: {err}");
    assert_closed(&mut agent);
    p.wait_ticks(2, LINE_TIMEOUT); // resumed
    assert_rss_bounded(coord, "a SUSPENDED of 2^32-1 threads");
    let g = s.checkpoint_bounded(&mut p);
    assert_eq!(s.generations()[&g.id].u64_field("nprocs"), 1);

    // A frame claiming 4 GiB, and 1 MiB of it sent.
    let mut agent = raw_agent(&s);
    assert_eq!(s.wait_computation(2).len(), 2, "the raw agent did not join");
    let mut ck = Proc::spawn("checkpoint".into(), s.cmd("checkpoint"));
    await_checkpoint(&mut agent);
    agent.write_all(&frame(SUSPENDED, u32::MAX)).unwrap();
    let _ = agent.write_all(&vec![0xa5u8; 1 << 20]);
    assert!(!ck.wait_exit(CMD_TIMEOUT).success(), "a checkpoint with a 4 GiB frame succeeded");
    let err = ck.stderr();
    assert!(err.contains(&format!("process {me}")) && err.contains("claiming 4294967295 payload bytes"), "the error does not name the frame: {err}");
    assert_closed(&mut agent);
    p.wait_ticks(2, LINE_TIMEOUT);
    assert_rss_bounded(coord, "a frame claiming 4 GiB");
    let g = s.checkpoint_bounded(&mut p);
    assert_eq!(s.generations()[&g.id].u64_field("nprocs"), 1);

    s.stop_at(p.last_tick.unwrap() + 2);
    p.wait_prefix("DONE", LINE_TIMEOUT);
    assert!(p.wait_exit(CMD_TIMEOUT).success(), "{}", p.context());
}

const HOST_MAGIC: u32 = 0x484b_5043;

fn host_send(c: &mut UnixStream, kind: u32, json: &str) {
    let mut v: Vec<u8> = [HOST_MAGIC, kind, 4 + json.len() as u32, 0].iter().flat_map(|w| w.to_le_bytes()).collect();
    v.extend_from_slice(&(json.len() as u32).to_le_bytes());
    v.extend_from_slice(json.as_bytes());
    c.write_all(&v).unwrap();
}

/// The next message from the helper: its kind and JSON part.
fn host_recv(c: &mut UnixStream) -> (u32, Json) {
    let mut h = [0u8; 16];
    c.read_exact(&mut h).expect("the helper closed the connection");
    let word = |i: usize| u32::from_le_bytes(h[i * 4..i * 4 + 4].try_into().unwrap());
    assert_eq!(word(0), HOST_MAGIC);
    let mut payload = vec![0u8; word(2) as usize];
    c.read_exact(&mut payload).unwrap();
    let jl = u32::from_le_bytes(payload[..4].try_into().unwrap()) as usize;
    (word(1), Json::parse(&String::from_utf8_lossy(&payload[4..4 + jl])).unwrap())
}

/// A fake coordinator asks a real `ckpt host` to kill pid -1, a process
/// outside any computation, and sends it a request missing a field: each
/// is refused naming why, nothing is killed, and the helper goes on
/// answering.
#[test]
fn a_capture_helper_kills_only_processes_it_serves() {
    let s = Session::new("trust_proto_host");
    let path = s.path("fake.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let mut helper = Proc::spawn("ckpt host".into(), {
        let mut c = std::process::Command::new(&s.ckpt);
        c.args(["host", "--coord", &format!("unix:{}", path.display())]);
        c
    });
    let (mut c, _) = listener.accept().unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let (kind, _) = host_recv(&mut c);
    assert_eq!(kind, 1, "the helper did not say HELLO");
    host_send(&mut c, 2, r#"{"ok":true}"#);
    let mut bystander = std::process::Command::new("sleep").arg("60").spawn().unwrap();
    let pid = bystander.id();

    let ask = |c: &mut UnixStream, id: u64, req: &str| -> Json {
        host_send(c, 3, req);
        let (kind, j) = host_recv(c);
        assert_eq!(kind, 4, "the helper's answer to {req} is not a REPLY");
        assert_eq!(j.get("id").and_then(Json::as_u64), Some(id), "the answer to {req} has the wrong id");
        j
    };
    let refused = |j: &Json, why: &str, req: &str| {
        let e = j.get("error").and_then(Json::as_str).unwrap_or("");
        assert!(matches!(j.get("ok"), Some(Json::Bool(false))) && e.contains(why), "{req} was not refused saying {why:?}: {j:?}");
    };
    let req = r#"{"id":1,"op":"kill","pids":[-1]}"#;
    refused(&ask(&mut c, 1, req), "pid -1", req);
    let req = format!(r#"{{"id":2,"op":"kill","pids":[{pid}]}}"#);
    refused(&ask(&mut c, 2, &req), "does not run the ckpt agent", &req);
    let req = r#"{"id":3,"op":"kill"}"#;
    refused(&ask(&mut c, 3, req), "missing field `pids`", req);
    let req = r#"{"id":4,"op":"alive","pid":0}"#;
    refused(&ask(&mut c, 4, req), "pid 0", req);
    std::thread::sleep(Duration::from_millis(200));
    assert!(bystander.try_wait().unwrap().is_none(), "the helper killed a process outside the computation");
    // Still serving.
    let j = ask(&mut c, 5, &format!(r#"{{"id":5,"op":"alive","pid":{pid}}}"#));
    assert!(matches!(j.get("alive"), Some(Json::Bool(true))), "{j:?}");
    drop(c);
    assert!(helper.wait_exit(CMD_TIMEOUT).success(), "{}", helper.context());
    bystander.kill().unwrap();
    bystander.wait().unwrap();
}
