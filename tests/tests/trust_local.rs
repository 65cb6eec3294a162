//! The local channel: who may talk to the coordinator and who a peer is.
//! Each attack is tried for real (a second user, a raw client, a
//! pre-made runtime directory) and refused, and the coordinator still
//! serves its computation afterwards.
mod common;
use common::*;
#[path = "common/users.rs"]
mod users;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

/// The pids `ckpt status --json` lists.
fn registered(s: &Session) -> Vec<i64> {
    let out = s.run("status", &["--json"]);
    assert!(out.status.success(), "ckpt status: {}", text(&out.stderr));
    let j = Json::parse(&text(&out.stdout)).unwrap();
    j.get("processes").and_then(Json::as_array).map(|v| v.iter().filter_map(|p| p.get("pid").and_then(Json::as_f64)).map(|p| p as i64).collect()).unwrap_or_default()
}

/// A sleeping process that is no child of this test (double fork).
fn unrelated_process() -> i32 {
    let out = std::process::Command::new("sh").args(["-c", "sleep 300 >/dev/null 2>&1 & echo $!"]).output().unwrap();
    text(&out.stdout).trim().parse().unwrap()
}

/// A raw HELLO (protocol version 3, 208-byte payload) claiming `pid`.
fn raw_hello(sock: &str, pid: i32) -> bool {
    let mut c = std::os::unix::net::UnixStream::connect(sock.strip_prefix("unix:").unwrap()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut msg = Vec::new();
    for w in [0x434b_5054u32, 1, 208, 0] {
        msg.extend_from_slice(&w.to_le_bytes());
    }
    let mut hello = vec![0u8; 208];
    hello[0..4].copy_from_slice(&3u32.to_le_bytes());
    hello[4..8].copy_from_slice(&pid.to_le_bytes());
    hello[16..20].copy_from_slice(&800i32.to_le_bytes());
    msg.extend_from_slice(&hello);
    c.write_all(&msg).unwrap();
    let mut b = [0u8; 16];
    // A WELCOME would be registration; a closed connection is refusal.
    matches!(c.read(&mut b), Ok(n) if n > 0)
}

/// Another user who can reach the socket (its directory is open and the
/// socket's mode is widened on purpose, so only the gate stands between
/// them) gets nothing: `kill` and `checkpoint` are refused and nothing dies.
#[test]
fn other_user_commands_refused_and_nothing_dies() {
    let u = users::other_user();
    let s = Session::new("trust-cmds");
    let mut p = s.launch(&program("counter_heap"), &["-m", "4", "-t", "50"]);
    p.wait_ticks(2, LINE_TIMEOUT);
    let sock = s.coord.strip_prefix("unix:").unwrap().to_string();
    assert_eq!(std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777, 0o600, "the socket is not 0600");
    std::fs::set_permissions(&s.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    for sub in ["kill", "checkpoint"] {
        let mut c = u.command(&s.ckpt);
        c.args([sub, "--coord", &s.coord]).current_dir("/");
        let out = run_with_timeout(c, CMD_TIMEOUT);
        assert!(!out.status.success(), "`ckpt {sub}` as {} succeeded: {}", u.name, text(&out.stdout));
    }
    // Raw JSON on a raw socket, as the other user, too.
    let mut c = u.command("/usr/bin/python3");
    c.args(["-c", &format!(
        "import socket,sys\nfor cmd in ('kill','checkpoint'):\n s=socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect({sock:?}); s.sendall(b'{{\"cmd\":\"'+cmd.encode()+b'\"}}\\n')\n try: got = s.recv(100)\n except ConnectionResetError: got = b''\n if got: sys.exit('answered '+cmd)\nprint('refused')"
    )]);
    let out = run_with_timeout(c, CMD_TIMEOUT);
    assert!(out.status.success() && text(&out.stdout).contains("refused"), "raw JSON as {}: {} {}", u.name, text(&out.stdout), text(&out.stderr));
    assert!(pid_alive(p.pid), "the program died");
    assert_eq!(s.generations().len(), 0, "a generation was committed for another user");
    p.wait_ticks(2, LINE_TIMEOUT);
    s.checkpoint_bounded(&mut p);
    p.wait_ticks(1, LINE_TIMEOUT);
}

/// A raw HELLO claiming pid -1, or the pid of a process outside the
/// computation, registers nothing; `ckpt kill` afterwards kills only the
/// computation.
#[test]
fn hello_with_false_pid_registers_nothing() {
    let s = Session::new("trust-pid");
    let mut p = s.launch(&program("counter_heap"), &["-m", "4", "-t", "50"]);
    p.wait_ticks(2, LINE_TIMEOUT);
    let victim = unrelated_process();
    assert!(!raw_hello(&s.coord, -1), "a HELLO claiming pid -1 was welcomed");
    assert!(!raw_hello(&s.coord, victim), "a HELLO claiming pid {victim} was welcomed");
    assert_eq!(registered(&s), vec![p.pid as i64], "only the program may be registered");
    s.checkpoint_bounded(&mut p);
    let out = s.run("kill", &[]);
    assert!(out.status.success(), "ckpt kill: {}", text(&out.stderr));
    assert!(p.wait_exit(CMD_TIMEOUT).code().is_none(), "the program was not killed");
    assert!(pid_alive(victim), "ckpt kill killed pid {victim}, which only claimed to be in the computation");
    sigkill(victim);
}

/// `/tmp/ckpt-UID` made first by someone else, with `coord.log` a symlink:
/// ckpt (run as the test user, `XDG_RUNTIME_DIR` unset) refuses with an
/// error naming the directory, and writes nothing through the link.
#[test]
fn premade_runtime_dir_with_symlinked_log_refused() {
    let u = users::other_user();
    let s = Session::new("trust-rundir");
    let dir = std::path::PathBuf::from(format!("/tmp/ckpt-{}", u.uid));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let target = s.path("target");
    std::os::unix::fs::symlink(&target, dir.join("coord.log")).unwrap();
    let store = format!("file://{}/trust-store-{}", u.home.display(), std::process::id());
    let mut c = u.command(&s.ckpt);
    c.args(["launch", "--store", &store, "--", "/bin/true"]).env_remove("CKPT_COORD").env_remove("CKPT_STORE").current_dir("/");
    let out = run_with_timeout(c, CMD_TIMEOUT);
    let err = text(&out.stderr);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(format!("{}/trust-store-{}", u.home.display(), std::process::id()));
    assert!(!out.status.success(), "ckpt launch in a runtime dir made by root succeeded");
    assert!(err.contains(&dir.display().to_string()) && err.contains("not a directory of yours"), "the error does not name {}: {err}", dir.display());
    assert!(!target.exists(), "ckpt wrote through the coord.log symlink");
}

/// `setpriv --reuid --regid --clear-groups PROG` under `ckpt launch` used
/// to abort with SIGABRT: setpriv sets keepcaps and its capabilities on its
/// own thread between setresuid and setresgid, glibc applies those to every
/// thread, and the agent's thread (without the capabilities) failed
/// setresgid. The agent now mirrors them onto its thread: PROG runs, as
/// the user asked.
#[test]
fn setpriv_under_launch_runs_its_program() {
    let s = Session::new("trust-setpriv");
    let out = s.run("launch", &["--", "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/id"]);
    assert!(out.status.success(), "setpriv under ckpt launch failed ({}): {}", out.status, text(&out.stderr));
    assert!(text(&out.stdout).contains("uid=65534"), "id did not run as 65534: {}", text(&out.stdout));
}

/// A program that drops privileges itself (groups, then gid, then uid, as
/// a daemon does) stays in its computation and checkpoints.
#[test]
fn program_that_drops_privileges_checkpoints() {
    let s = Session::new("trust-drop");
    let script = "import os,sys,time\nprint('PID %d' % os.getpid(), flush=True)\nos.setgroups([]); os.setresgid(65534,65534,65534); os.setresuid(65534,65534,65534)\nn=0\nwhile True:\n n+=1; print('TICK %d' % n, flush=True); time.sleep(0.05)\n";
    let mut p = s.launch(std::path::Path::new("/usr/bin/python3"), &["-c", script]);
    p.wait_ticks(2, LINE_TIMEOUT);
    let status = std::fs::read_to_string(format!("/proc/{}/status", p.pid)).unwrap();
    assert!(status.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("65534")), "the program did not drop to 65534");
    assert_eq!(registered(&s), vec![p.pid as i64], "the program left its computation");
    s.checkpoint_bounded(&mut p);
    p.wait_ticks(2, LINE_TIMEOUT);
}

/// 200 idle connections from another user neither hold 200 threads nor
/// keep the owner out: the excess is closed at once, the rest after the
/// first-message timeout, and a checkpoint succeeds meanwhile.
#[test]
fn idle_connections_are_capped_and_timed_out() {
    let u = users::other_user();
    let s = Session::new("trust-idle");
    let mut p = s.launch(&program("counter_heap"), &["-m", "4", "-t", "50"]);
    p.wait_ticks(2, LINE_TIMEOUT);
    let sock = s.coord.strip_prefix("unix:").unwrap().to_string();
    std::fs::set_permissions(&s.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let st = Json::parse(&text(&s.run("status", &["--json"]).stdout)).unwrap();
    let coord_pid = st.get("coordinator").and_then(|c| c.get("pid")).and_then(Json::as_u64).unwrap();
    let mut c = u.command("/usr/bin/python3");
    c.args(["-c", &format!(
        "import socket,sys,time\nss=[]\nfor i in range(200):\n s=socket.socket(socket.AF_UNIX); s.connect({sock:?}); s.settimeout(15); ss.append(s)\nprint('HELD', flush=True)\nsys.stdin.readline()\nt=time.time()\nfor s in ss:\n try: got=s.recv(1)\n except OSError: got=b''\n if got: sys.exit('a connection answered')\nprint('CLOSED %.1f' % (time.time()-t), flush=True)\n"
    )]);
    let mut idle = Proc::spawn("idle connections".into(), c);
    idle.wait_prefix("HELD", LINE_TIMEOUT);
    let threads = std::fs::read_to_string(format!("/proc/{coord_pid}/status")).unwrap().lines().find(|l| l.starts_with("Threads:")).map(|l| l[8..].trim().parse::<u32>().unwrap()).unwrap();
    assert!(threads < 100, "the coordinator holds {threads} threads for 200 idle connections");
    s.checkpoint_bounded(&mut p);
    idle.close_stdin();
    let line = idle.wait_prefix("CLOSED", Duration::from_secs(20));
    assert!(idle.wait_exit(CMD_TIMEOUT).success(), "{line}");
    assert!(pid_alive(p.pid));
    p.wait_ticks(1, LINE_TIMEOUT);
}

/// A program started by `setpriv` (privileges dropped, then exec) cannot
/// reach the coordinator's private socket as its new uid: it joins through
/// the member socket with the membership key, checkpoints, and comes back
/// from a restart as uid 65534, checked by the program itself every tick.
#[test]
fn setpriv_then_exec_stays_in_its_computation() {
    let s = Session::new("trust-setpriv-exec");
    let script = "import os,time\nprint('PID %d' % os.getpid(), flush=True)\nn=0\nwhile True:\n n+=1\n ids=os.getresuid()+os.getresgid()\n print(('TICK %d' % n) if ids==(65534,)*6 and os.getgroups()==[] else 'FAIL ids %r groups %r' % (ids, os.getgroups()), flush=True); time.sleep(0.05)\n";
    let mut p = s.launch(std::path::Path::new("/usr/bin/setpriv"), &["--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", script]);
    p.wait_ticks(3, LINE_TIMEOUT);
    assert_eq!(registered(&s), vec![p.pid as i64], "the program left its computation when it exec'd as uid 65534\n{}", p.context());
    let g = s.checkpoint_bounded(&mut p);
    p.kill9();
    let mut r = s.restart_expect(&g, p.pid, true);
    r.wait_ticks(3, LINE_TIMEOUT);
    assert_eq!(registered(&s), vec![p.pid as i64], "the restored program is not in its computation");
    s.checkpoint_bounded(&mut r);
    r.wait_ticks(2, LINE_TIMEOUT);
}

/// Nobody can pose as the coordinator on the member socket: an agent whose
/// process changed uid talks only to a listener of the coordinator's user,
/// so a member socket bound by another user gets nothing.
#[test]
fn an_impostor_member_socket_gets_nothing() {
    let u = users::other_user();
    let s = Session::new("trust-member-impostor");
    // Start the coordinator, learn its member socket's name, quit it, and
    // let the other user bind that name first.
    let mut first = s.launch(&program("counter_heap"), &["-m", "1", "-t", "50"]);
    first.wait_ticks(1, LINE_TIMEOUT);
    let env = std::fs::read(format!("/proc/{}/environ", first.pid)).unwrap();
    let name = env.split(|&b| b == 0).find_map(|e| e.strip_prefix(b"CKPT_MEMBER_SOCK=")).map(|v| String::from_utf8_lossy(v).into_owned()).expect("CKPT_MEMBER_SOCK in the program's environment");
    first.kill9();
    assert!(s.run("quit", &[]).status.success());
    let mut c = u.command("/usr/bin/python3");
    c.args(["-c", &format!(
        "import socket\nl=socket.socket(socket.AF_UNIX); l.bind('\\0{name}'); l.listen(8); l.settimeout(20)\nprint('BOUND', flush=True)\ntry:\n c,_=l.accept(); c.settimeout(5); got=c.recv(4096)\nexcept OSError: got=b''\nprint('GOT %d' % len(got), flush=True)\n"
    )]);
    let mut impostor = Proc::spawn("impostor member socket".into(), c);
    impostor.wait_prefix("BOUND", LINE_TIMEOUT);
    // A coordinator on this address refuses to start: someone holds its
    // member socket.
    let out = s.run("launch", &["--", "/bin/true"]);
    assert!(!out.status.success(), "a launch succeeded with the member socket taken");
    // An agent that would join through the member socket sends nothing.
    let coord = s.coord.clone();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "/bin/true"])
        .env("LD_PRELOAD", ckpt_bin().with_file_name("libckpt_preload.so"))
        .env("CKPT_COORD", &coord)
        .env("CKPT_MEMBER_SOCK", &name)
        .env("CKPT_COORD_UID", "0")
        .env("CKPT_AGENT_KEY", "00".repeat(32))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("not by the coordinator's user"), "the agent did not refuse the impostor: {}", text(&out.stderr));
    let got = impostor.wait_prefix("GOT", Duration::from_secs(30));
    assert_eq!(got.trim(), "GOT 0", "the impostor received bytes from an agent");
}

/// An agent that names another process as its snapshot (a FORKED reply
/// with the PID of a process it did not fork) gets that process neither
/// read nor killed: the round fails naming the reply, and the coordinator
/// goes on serving its computation. The fake agent is a real process
/// speaking the agent protocol from Python, so the coordinator captures it
/// for real up to the snapshot.
#[test]
fn a_forged_snapshot_pid_is_neither_read_nor_killed() {
    let s = Session::new("trust-forked");
    let mut p = s.launch(&program("counter_heap"), &["-m", "4", "-t", "50"]);
    p.wait_ticks(2, LINE_TIMEOUT);
    let victim = unrelated_process();
    let sock = s.coord.strip_prefix("unix:").unwrap().to_string();
    let script = format!(
        r#"import os, socket, struct, sys
s = socket.socket(socket.AF_UNIX); s.connect({sock:?})
pid = os.getpid()
def frame(k, n): return struct.pack('<4I', 0x434b5054, k, n, 0)
def recv():
    h = b''
    while len(h) < 16:
        b = s.recv(16 - len(h))
        if not b: sys.exit('the coordinator closed the connection')
        h += b
    _, k, n, _ = struct.unpack('<4I', h)
    d = b''
    while len(d) < n: d += s.recv(n - len(d))
    return k
hello = struct.pack('<6i', 3, pid, os.getppid(), pid, s.fileno(), 62) + bytes(24) + struct.pack('<iI', -1, 3) + bytes(16 + 64 + 40 + 32)
s.sendall(frame(1, len(hello)) + hello)
assert recv() == 2
print('JOINED', flush=True)
while True:
    k = recv()
    if k == 3:
        rep = struct.pack('<IIQ', 1, 0, 0) + bytes(96 + 64 * 32) + struct.pack('<iIQ', pid, 1, 0) + bytes(72 - 16)
        s.sendall(frame(4, len(rep)) + rep)
    elif k == 10:
        s.sendall(frame(11, 8) + struct.pack('<ii', {victim}, 0))
        print('FORGED', flush=True)
    elif k == 6:
        s.sendall(frame(7, 0))
        print('RESUMED', flush=True)
"#
    );
    let mut c = Command::new("/usr/bin/python3");
    c.args(["-c", &script]);
    let mut fake = Proc::spawn("fake agent".into(), c);
    fake.wait_prefix("JOINED", LINE_TIMEOUT);
    let out = s.try_checkpoint();
    let err = text(&out.stderr);
    assert!(!out.status.success(), "a checkpoint with a forged snapshot succeeded");
    fake.wait_prefix("FORGED", LINE_TIMEOUT);
    assert!(err.contains(&format!("named process {victim} as its snapshot")), "the refusal does not name the forged snapshot: {err}");
    fake.wait_prefix("RESUMED", LINE_TIMEOUT);
    assert!(pid_alive(victim), "the process named as a snapshot was killed");
    sigkill(fake.child_pid());
    sigkill(victim);
    // The computation is still served: the program resumed and checkpoints.
    p.wait_ticks(2, LINE_TIMEOUT);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while registered(&s).len() != 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    s.checkpoint_bounded(&mut p);
}
