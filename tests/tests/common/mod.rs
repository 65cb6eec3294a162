//! The end-to-end harness: runs the `ckpt` CLI and the test programs.
//!
//! * [`Session`]: one temp dir, one store (`file://<dir>/store`), one
//!   coordinator (`unix:<dir>/coord.sock`); its `Drop` quits the coordinator
//!   and kills whatever the test started that still runs.
//! * [`Proc`]: a running program (launched, or restored by `ckpt restart`)
//!   whose stdout lines are read by a thread into a channel. Every line is
//!   checked: `FAIL ...` panics at once (with the output and stderr), and
//!   `TICK n` numbers must follow each other without gaps.
//! * No sleeps as synchronisation: tests wait for output lines, exit
//!   statuses or /proc entries, each with a deadline.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

unsafe extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}
pub const SIGKILL: i32 = 9;

/// Timeout for one ckpt command (checkpoint of a 256 MiB program included).
pub const CMD_TIMEOUT: Duration = Duration::from_secs(90);
/// Timeout for a program to print its next line in normal operation.
pub const LINE_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeout for a restored program to print its first tick.
pub const RESTART_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------- locating

/// The `ckpt` binary: `$CKPT_BIN`, else beside the test executable's
/// profile dir (`target/<profile>/ckpt`), else the workspace's
/// `target/release/ckpt` or `target/debug/ckpt`.
pub fn ckpt_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("CKPT_BIN") {
        return PathBuf::from(p);
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        // target/<profile>/deps/<test>-<hash>
        if let Some(profile_dir) = exe.parent().and_then(|d| d.parent()) {
            candidates.push(profile_dir.join("ckpt"));
        }
    }
    let ws = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| ws.join("target"));
    candidates.push(target.join("release/ckpt"));
    candidates.push(target.join("debug/ckpt"));
    candidates.push(ws.join("target/release/ckpt"));
    candidates.push(ws.join("target/debug/ckpt"));
    for c in &candidates {
        if c.is_file() && c.with_file_name("libckpt_preload.so").is_file() {
            return c.clone();
        }
    }
    for c in &candidates {
        if c.is_file() {
            return c.clone();
        }
    }
    panic!(
        "cannot find the ckpt binary (looked at {candidates:?}); build it with \
         `cargo build --release --workspace` or set CKPT_BIN"
    );
}

/// A built C test program (`name` or `name-nopie`).
pub fn program(name: &str) -> PathBuf {
    let p = Path::new(ckpt_tests::PROGRAMS_DIR).join(name);
    assert!(p.is_file(), "test program {} was not built", p.display());
    p
}

/// A source-tree program (the Python ones).
pub fn source(name: &str) -> PathBuf {
    Path::new(ckpt_tests::SOURCES_DIR).join(name)
}

/// The real python3 executable (not a pyenv shim script).
pub fn python3() -> PathBuf {
    let out = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3 is not installed");
    assert!(out.status.success(), "python3 -c failed");
    let p = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    std::fs::canonicalize(&p).unwrap_or(p)
}

// ---------------------------------------------------------------- processes

pub fn pid_alive(pid: i32) -> bool {
    // A zombie is not alive: its memory and threads are gone.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            let state = s.rsplit(')').next().and_then(|r| r.split_whitespace().next());
            state != Some("Z") && state != Some("X")
        }
        Err(_) => false,
    }
}

pub fn pid_exists(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

pub fn sigkill(pid: i32) {
    unsafe {
        kill(pid, SIGKILL);
    }
}

/// Waits until `pid` no longer exists (reaped), panicking after `timeout`.
pub fn wait_gone(pid: i32, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while pid_exists(pid) {
        if Instant::now() > deadline {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            panic!("process {pid} still exists {timeout:?} after SIGKILL: {stat}");
        }
        std::thread::sleep(Duration::from_millis(10)); // polling, not synchronisation
    }
}

/// Pids of live processes whose executable is `exe`.
pub fn pids_running(exe: &Path) -> Vec<i32> {
    let exe = std::fs::canonicalize(exe).unwrap_or(exe.to_path_buf());
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Ok(p) = std::fs::read_link(format!("/proc/{pid}/exe"))
            && p == exe && pid_alive(pid)
        {
            v.push(pid);
        }
    }
    v
}

fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs a command to completion with a timeout (killing it on timeout).
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Output {
    let desc = format!("{cmd:?}");
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot spawn {desc}: {e}"));
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t1 = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = so.read_to_end(&mut b);
        b
    });
    let t2 = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = se.read_to_end(&mut b);
        b
    });
    let status = match wait_child(&mut child, timeout) {
        Some(s) => s,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{desc} did not finish within {timeout:?}");
        }
    };
    Output { status, stdout: t1.join().unwrap(), stderr: t2.join().unwrap() }
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The stdout of a command that must have succeeded (`what` names it).
pub fn ok(out: &Output, what: &str) -> String {
    assert!(out.status.success(), "{what} failed ({}):\nstdout: {}\nstderr: {}", out.status, text(&out.stdout), text(&out.stderr));
    text(&out.stdout)
}

/// The stderr of a command that must have failed, saying each of
/// `needles` (in its error, or in its report on stdout: `ckpt verify`
/// lists what it found there).
pub fn failed(out: &Output, what: &str, needles: &[&str]) -> String {
    let (err, so) = (text(&out.stderr), text(&out.stdout));
    assert!(!out.status.success(), "{what} should fail but succeeded:\nstdout: {so}\nstderr: {err}");
    for n in needles {
        assert!(err.contains(n) || so.contains(n), "{what}: the output does not mention {n:?}:\nstdout: {so}\nstderr: {err}");
    }
    eprintln!("{what}: {}", err.trim());
    err
}

/// Make older chunks die, for counter_heap launched with `-c DIR/CHURN`
/// (gc tests): the first time, rewrite the whole heap (the program does
/// that once, printing CHURNED); later, let it run 5 ticks (it rewrites 64
/// heap pages per tick).
pub fn churn(s: &Session, p: &mut Proc) {
    let marker = s.path("CHURN.done");
    if marker.exists() {
        p.wait_ticks(5, LINE_TIMEOUT);
        return;
    }
    let f = s.path("CHURN");
    std::fs::write(&f, b"1").unwrap();
    p.wait_line(|l| l.starts_with("CHURNED"), LINE_TIMEOUT);
    std::fs::remove_file(&f).unwrap();
    std::fs::write(&marker, b"").unwrap();
    p.wait_ticks(1, LINE_TIMEOUT);
}

/// Waits for `ckpt-gc: paused at PHASE` (gc's `CKPT_GC_PAUSE_AT` test hook)
/// on the stderr of a `ckpt gc` spawned with it piped, echoing other lines;
/// false if gc finished first (successfully), panics after `timeout`.
pub fn wait_paused(child: &mut Child, phase: &str, timeout: Duration) -> bool {
    let err = BufReader::new(child.stderr.take().unwrap());
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for l in err.lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let deadline = Instant::now() + timeout;
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(l) if l.contains(&format!("paused at {phase}")) => return true,
            Ok(l) => eprintln!("gc: {l}"),
            Err(_) => {
                if let Some(st) = child.try_wait().unwrap() {
                    assert!(st.success(), "gc failed before reaching {phase}: {st}");
                    return false;
                }
                assert!(Instant::now() < deadline, "gc did not reach {phase}");
            }
        }
    }
}

// ---------------------------------------------------------------- session

static SESSION_SEQ: AtomicUsize = AtomicUsize::new(0);

pub struct Session {
    pub name: String,
    pub dir: PathBuf,
    pub store_dir: PathBuf,
    pub store: String,
    pub coord: String,
    pub ckpt: PathBuf,
    /// Program pids this session started (killed on drop if still alive).
    pids: Mutex<Vec<i32>>,
    /// The ordinary account the session's commands run as (`as_user`).
    pub user: Option<RunAs>,
    /// `ckpt` is not the build tree's ([`Session::with_ckpt`]): it must
    /// find its agent and restorer by itself.
    own_artifacts: bool,
}

impl Session {
    pub fn new(name: &str) -> Session {
        let n = SESSION_SEQ.fetch_add(1, Ordering::SeqCst);
        let base = std::env::var_os("CKPT_TEST_TMP")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/tmp/ckpt-tests"));
        let dir = base.join(format!("{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let store_dir = dir.join("store");
        let sock = dir.join("coord.sock");
        assert!(sock.as_os_str().len() < 100, "socket path too long: {}", sock.display());
        Session {
            name: name.to_string(),
            store: format!("file://{}", store_dir.display()),
            coord: format!("unix:{}", sock.display()),
            dir,
            store_dir,
            ckpt: ckpt_bin(),
            pids: Mutex::new(Vec::new()),
            user: None,
            own_artifacts: false,
        }
    }

    /// This session's commands run `bin` (e.g. an installed
    /// `PREFIX/bin/ckpt`) instead of the build tree's `ckpt`, with
    /// `CKPT_PRELOAD` and `CKPT_RESTORER` removed from their environment:
    /// it must find its agent and restorer by itself.
    pub fn with_ckpt(mut self, bin: PathBuf) -> Session {
        self.ckpt = bin;
        self.own_artifacts = true;
        self
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// The stop file passed to programs with `-s`.
    pub fn stop_file(&self) -> PathBuf {
        self.dir.join("STOP")
    }
    /// Runs a `tcp_fork` client and server, restarted, to their end: both
    /// stop 5 ticks past the later one's last tick, the client reports its
    /// check of the server's replies (`CLIENT 0 OK`), both print DONE and
    /// exit 0. Returns the client's OK line.
    pub fn finish_tcp_pair(&self, client: &mut Proc, server: &mut Proc) -> String {
        let t = client.last_tick.unwrap().max(server.last_tick.unwrap());
        self.stop_at(t + 5);
        let ok = client.wait_prefix("CLIENT 0 OK", LINE_TIMEOUT);
        client.wait_prefix("DONE", LINE_TIMEOUT);
        server.wait_prefix("DONE", LINE_TIMEOUT);
        assert!(client.wait_exit(CMD_TIMEOUT).success(), "{}", client.context());
        assert!(server.wait_exit(CMD_TIMEOUT).success(), "{}", server.context());
        ok
    }


    /// Asks the program to print DONE once its tick counter reaches `tick`.
    pub fn stop_at(&self, tick: u64) {
        let tmp = self.dir.join("STOP.tmp");
        std::fs::write(&tmp, format!("{tick}\n")).unwrap();
        std::fs::rename(&tmp, self.stop_file()).unwrap();
    }

    /// A `ckpt SUB` command with this session's store and coordinator (as
    /// options when the contract lists them for SUB, and in the environment).
    pub fn cmd(&self, sub: &str) -> Command {
        if let Some(u) = &self.user {
            return u.ckpt_cmd(self, sub);
        }
        let mut c = Command::new(&self.ckpt);
        c.arg(sub);
        if self.own_artifacts {
            c.env_remove("CKPT_PRELOAD").env_remove("CKPT_RESTORER");
        }
        match sub {
            "launch" | "restart" => {
                c.args(["--store", &self.store, "--coord", &self.coord]);
            }
            "checkpoint" | "status" | "kill" | "quit" => {
                c.args(["--coord", &self.coord]);
            }
            "log" => {
                c.args(["--store", &self.store]);
            }
            _ => {}
        }
        c.env("CKPT_STORE", &self.store)
            .env("CKPT_COORD", &self.coord)
            .current_dir(&self.dir);
        c
    }

    /// Runs `ckpt SUB ARGS...` to completion.
    pub fn run(&self, sub: &str, args: &[&str]) -> Output {
        let mut c = self.cmd(sub);
        c.args(args);
        run_with_timeout(c, CMD_TIMEOUT)
    }

    /// Live processes running `exe` whose cwd is in this session's dir
    /// (tests of one binary run in parallel: others' copies don't count).
    pub fn running(&self, exe: &Path) -> Vec<i32> {
        pids_running(exe)
            .into_iter()
            .filter(|pid| {
                std::fs::read_link(format!("/proc/{pid}/cwd")).map(|c| c.starts_with(&self.dir)).unwrap_or(false)
            })
            .collect()
    }

    pub fn track(&self, pid: i32) {
        self.pids.lock().unwrap().push(pid);
    }

    /// `ckpt launch -- PROG ARGS...`; waits for the program's `PID` line.
    pub fn launch(&self, prog: &Path, args: &[&str]) -> Proc {
        self.launch_env(prog, args, &[])
    }

    pub fn launch_env(&self, prog: &Path, args: &[&str], env: &[(&str, &str)]) -> Proc {
        self.launch_opts(&[], prog, args, env)
    }

    /// `ckpt launch OPTS... -- PROG ARGS...` (e.g. `--dirty-tracking uffd-wp`).
    pub fn launch_opts(&self, opts: &[&str], prog: &Path, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut c = self.cmd("launch");
        c.args(opts).arg("--").arg(prog).args(args);
        for (k, v) in env {
            c.env(k, v);
        }
        let what = format!("launch {} {}", prog.display(), args.join(" "));
        let mut p = Proc::spawn(what, c);
        self.track(p.child_pid());
        let line = p.wait_prefix("PID ", LINE_TIMEOUT);
        let pid: i32 = line[4..].trim().parse().unwrap();
        p.pid = pid;
        // In place, launch execs the program; in namespaces of its own
        // (issue 12) the program has its pid there, below ckpt's init.
        if pid != p.child_pid() {
            let deadline = Instant::now() + LINE_TIMEOUT;
            while host_pid_below(p.child_pid(), pid).is_none() {
                assert!(Instant::now() < deadline, "the launched program's pid {pid} is neither the pid of `ckpt launch` (in place, launch execs) nor its pid in namespaces below launch\n{}", p.context());
                std::thread::sleep(Duration::from_millis(20));
            }
            p.host_pid();
        }
        p
    }

    /// `ckpt checkpoint`: the committed generation, panicking on failure.
    pub fn checkpoint(&self) -> u64 {
        let out = self.run("checkpoint", &[]);
        assert!(
            out.status.success(),
            "ckpt checkpoint failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        );
        let s = text(&out.stdout);
        s.trim().lines().last().and_then(|l| l.trim().parse().ok()).unwrap_or_else(|| {
            panic!("ckpt checkpoint printed no generation number: {s:?} (stderr {})", text(&out.stderr))
        })
    }

    pub fn try_checkpoint(&self) -> Output {
        self.run("checkpoint", &[])
    }

    /// Checkpoints while `p` runs and records which ticks a restart of the
    /// generation may continue from: the first tick printed by a restored
    /// process must be in `lo..=hi`.
    pub fn checkpoint_bounded(&self, p: &mut Proc) -> Gen {
        p.drain();
        let lo = p.last_tick.expect("checkpoint before the first tick") + 1;
        let out = self.try_checkpoint();
        let generation: Option<u64> = text(&out.stdout).trim().lines().last().and_then(|l| l.trim().parse().ok());
        let Some(generation) = generation.filter(|_| out.status.success()) else {
            p.drain();
            panic!(
                "ckpt checkpoint failed ({}):\nstdout: {}\nstderr: {}\n{}",
                out.status,
                text(&out.stdout),
                text(&out.stderr),
                p.context()
            );
        };
        // Lines printed while the checkpoint ran may still be queued.
        p.drain();
        p.wait_ticks(2, LINE_TIMEOUT);
        let hi = p.last_tick.unwrap() + 1;
        eprintln!("[{}] generation {generation}: restart continues at tick {lo}..={hi}", self.name);
        Gen { id: generation, lo, hi }
    }

    /// `ckpt restart --dry-run GEN`: the whole restore plan is checked
    /// without starting a process; panics, with what would fail, unless the
    /// generation would restart.
    pub fn assert_restores(&self, generation: u64) {
        let out = self.dry_run(generation);
        assert!(
            out.status.success() && text(&out.stdout).contains("would restart"),
            "ckpt restart --dry-run {generation} says the generation would not restart ({}):\nstdout: {}\nstderr: {}",
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        );
    }

    /// `ckpt restart --dry-run GEN`, as it ran.
    pub fn dry_run(&self, generation: u64) -> Output {
        self.run("restart", &["--dry-run", &generation.to_string()])
    }

    /// `ckpt restart [GEN]` in the background; the restored program is `pid`.
    pub fn restart(&self, generation: Option<u64>, pid: i32) -> Proc {
        let mut c = self.cmd("restart");
        if let Some(g) = generation {
            c.arg(g.to_string());
        }
        let mut p = Proc::spawn(format!("restart {generation:?}"), c);
        p.pid = pid;
        self.track(pid);
        p
    }

    /// Restarts `g` and checks that the program continues where the
    /// generation left it (first tick within the generation's bounds).
    pub fn restart_expect(&self, g: &Gen, pid: i32, latest: bool) -> Proc {
        self.expect_continues(self.restart(if latest { None } else { Some(g.id) }, pid), g, pid)
    }

    /// Runs `c`, a `ckpt restart` of `g` made ready by the caller (its
    /// environment: an S3 store, another key directory), as
    /// [`Self::restart_expect`] does.
    pub fn restart_expect_with(&self, c: Command, g: &Gen, pid: i32) -> Proc {
        let mut p = Proc::spawn(format!("restart {} from {}", g.id, self.store), c);
        p.pid = pid;
        self.track(pid);
        self.expect_continues(p, g, pid)
    }

    /// The restarted program `p` continues where `g` left it and is `pid`.
    fn expect_continues(&self, mut p: Proc, g: &Gen, pid: i32) -> Proc {
        let t = p.wait_ticks(1, RESTART_TIMEOUT);
        let first = p.first_tick.unwrap();
        assert!(
            first >= g.lo && first <= g.hi,
            "restart of generation {} continued at tick {first}, expected {}..={}\n{}",
            g.id,
            g.lo,
            g.hi,
            p.context()
        );
        assert!(p.alive(), "restored program is not pid {pid}\n{}", p.context());
        let _ = t;
        p
    }

    /// The PIDs of the processes registered with the coordinator, sorted.
    pub fn computation(&self) -> Vec<i32> {
        let out = self.run("status", &["--json"]);
        assert!(out.status.success(), "ckpt status failed: {}", text(&out.stderr));
        let j = Json::parse(&text(&out.stdout)).unwrap();
        let mut v: Vec<i32> = j
            .get("processes")
            .and_then(Json::as_array)
            .map(|a| a.iter().filter_map(|p| p.get("pid").and_then(Json::as_u64)).map(|p| p as i32).collect())
            .unwrap_or_default();
        v.sort_unstable();
        v
    }

    /// [`Session::computation`] once it has at least `n` processes (or
    /// after [`LINE_TIMEOUT`]).
    pub fn wait_computation(&self, n: usize) -> Vec<i32> {
        let deadline = Instant::now() + LINE_TIMEOUT;
        loop {
            let v = self.computation();
            if v.len() >= n || Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Launches a program that starts a computation of `n` processes:
    /// waits for its READY and three ticks, then for the `n` processes to
    /// be registered (asserted), and tracks them all.
    pub fn launch_computation(&self, prog: &Path, args: &[&str], n: usize) -> (Proc, Vec<i32>) {
        let mut p = self.launch(prog, args);
        p.wait_prefix("READY", LINE_TIMEOUT);
        p.wait_ticks(3, LINE_TIMEOUT);
        let pids = self.wait_computation(n);
        assert_eq!(pids.len(), n, "expected {n} processes in the computation, have {pids:?}\n{}", p.context());
        if !self.in_namespaces() {
            for &pid in &pids {
                self.track(pid);
            }
        }
        (p, pids)
    }

    /// Whether this session's computations run in namespaces of their own
    /// (issue 12: every computation of a user other than root): their pids
    /// are not the host's, and when the command waiting outside (launch or
    /// restart) has exited, every process of the computation is gone.
    pub fn in_namespaces(&self) -> bool {
        self.user.is_some()
    }

    /// The host pid of the session's process that has pid `pid` in its
    /// namespaces ([`Session::in_namespaces`]; else `pid` itself).
    pub fn host_pid(&self, pid: i32) -> i32 {
        if !self.in_namespaces() {
            return pid;
        }
        // The PID namespaces of the session's processes (marked by their
        // environment), then the process with that pid in one of them (a
        // zombie has no environment left, but its namespace).
        let marker = format!("{SESSION_ENV}={}", self.dir.display()).into_bytes();
        let inner = |h: i32| -> Option<i32> {
            let st = std::fs::read_to_string(format!("/proc/{h}/status")).ok()?;
            let ns: Vec<i32> = st.lines().find_map(|l| l.strip_prefix("NSpid:"))?.split_whitespace().filter_map(|x| x.parse().ok()).collect();
            (ns.len() >= 2).then(|| ns.last().copied())?
        };
        let pidns = |h: i32| std::fs::read_link(format!("/proc/{h}/ns/pid")).ok();
        let all: Vec<i32> = std::fs::read_dir("/proc").into_iter().flatten().flatten().filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok()).collect();
        let ours: Vec<_> = all
            .iter()
            .filter(|&&h| inner(h).is_some() && std::fs::read(format!("/proc/{h}/environ")).is_ok_and(|e| e.split(|b| *b == 0).any(|v| v == marker.as_slice())))
            .filter_map(|&h| pidns(h))
            .collect();
        all.into_iter()
            .find(|&h| inner(h) == Some(pid) && pidns(h).is_some_and(|n| ours.contains(&n)))
            .unwrap_or_else(|| panic!("no process of session {} has pid {pid} in its namespaces", self.name))
    }

    /// `ckpt kill`, then waits for `root` (the command we spawned) and for
    /// every process in `pids` to be gone.
    pub fn kill_all(&self, pids: &[i32], root: &mut Proc) {
        let out = self.run("kill", &[]);
        assert!(out.status.success(), "ckpt kill failed: {}", text(&out.stderr));
        root.wait_exit(CMD_TIMEOUT);
        for &pid in pids.iter().filter(|_| !self.in_namespaces()) {
            wait_gone(pid, Duration::from_secs(20));
        }
    }

    /// Waits for the restored computation `root` to print DONE and exit 0,
    /// then removes the stop file and waits for every process in `pids` to
    /// be gone (so that an older generation can be restarted next).
    pub fn finish_computation(&self, pids: &[i32], root: &mut Proc) {
        root.wait_prefix("DONE", LINE_TIMEOUT);
        let st = root.wait_exit(CMD_TIMEOUT);
        assert!(st.success(), "the restored computation ended with {st}\n{}", root.context());
        std::fs::remove_file(self.stop_file()).unwrap();
        for &pid in pids.iter().filter(|_| !self.in_namespaces()) {
            wait_gone(pid, Duration::from_secs(20));
        }
    }

    pub fn log_json(&self) -> Json {
        let out = self.run("log", &["--json"]);
        assert!(
            out.status.success(),
            "ckpt log --json failed ({}): {}",
            out.status,
            text(&out.stderr)
        );
        Json::parse(&text(&out.stdout))
            .unwrap_or_else(|e| panic!("ckpt log --json printed invalid JSON ({e}): {}", text(&out.stdout)))
    }

    /// Generations in the store, by id.
    pub fn generations(&self) -> BTreeMap<u64, Json> {
        let j = self.log_json();
        let arr = j.as_array().unwrap_or_else(|| panic!("ckpt log --json is not an array: {j:?}"));
        arr.iter().map(|g| (g.get("id").and_then(Json::as_u64).expect("generation without id"), g.clone())).collect()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Only processes of this session: a tracked pid may be a pid in
        // namespaces of the computation's own, another process's here.
        for pid in self.pids.lock().unwrap().iter() {
            if pid_alive(*pid) && std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|c| c.starts_with(&self.dir)) {
                sigkill(*pid);
            }
        }
        let mut c = self.cmd("quit");
        c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        if let Ok(mut child) = c.spawn()
            && wait_child(&mut child, Duration::from_secs(15)).is_none()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(u) = &self.user {
            u.kill_leftovers(self);
        }
        if std::thread::panicking() {
            eprintln!("[{}] test failed; its files are kept in {}", self.name, self.dir.display());
        } else if std::env::var_os("CKPT_TEST_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A committed generation and the tick range a restart of it resumes at.
#[derive(Clone, Debug)]
pub struct Gen {
    pub id: u64,
    pub lo: u64,
    pub hi: u64,
}

// ---------------------------------------------------------------- ordinary user
//
// Sessions whose commands run as a real second account (issue 12), not as
// root with capabilities dropped: `setpriv --reuid --regid --init-groups`
// with that user's own environment (HOME, USER, LOGNAME, SHELL, PATH and a
// private XDG_RUNTIME_DIR per session), none of root's. The account is made
// with `useradd` if missing (scripts/test.sh makes it too). Everything else
// (`launch`, `checkpoint_bounded`, `restart_expect`, `Proc`, `Cycle`) is the
// ordinary harness: only `Session::cmd` differs.

/// The account ordinary-user sessions run as.
pub const TEST_USER: &str = "ckpt-user";

/// Marks every process of an ordinary-user session (its environment holds
/// `CKPT_TEST_SESSION=<session dir>`), so that cleanup kills the session's
/// processes only, never the user's others.
pub const SESSION_ENV: &str = "CKPT_TEST_SESSION";

/// The account a [`Session::as_user`] runs its commands as.
#[derive(Clone, Debug)]
pub struct RunAs {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    /// The session's `XDG_RUNTIME_DIR` (`<dir>/run`, 0700, the user's): the
    /// user's default coordinator socket is `ckpt/coord.sock` in it.
    pub runtime_dir: PathBuf,
}

static MAKING_USER: Mutex<()> = Mutex::new(());

/// `getent passwd NAME`: (uid, gid, home).
fn passwd_entry(name: &str) -> Option<(u32, u32, PathBuf)> {
    let out = Command::new("getent").args(["passwd", name]).output().ok()?;
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let f: Vec<&str> = line.split(':').collect();
    (out.status.success() && f.len() >= 7).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?, PathBuf::from(f[5]))))?
}

/// The ordinary account `name`, made (`useradd -m -s /bin/bash`, no other
/// group, no sudo) if missing. Needs root.
pub fn ordinary_account(name: &str) -> (u32, u32, PathBuf) {
    let _one = MAKING_USER.lock().unwrap_or_else(|e| e.into_inner());
    if passwd_entry(name).is_none() {
        let out = Command::new("useradd").args(["-m", "-s", "/bin/bash", name]).output().expect("cannot run useradd (the ordinary-user tests need root)");
        // 9: the name is taken (another test binary made it meanwhile).
        assert!(out.status.success() || out.status.code() == Some(9), "useradd {name}: {}", text(&out.stderr));
    }
    let e = passwd_entry(name).unwrap_or_else(|| panic!("user {name} missing after useradd"));
    assert!(e.0 != 0, "{name} is uid 0, not an ordinary user");
    e
}

impl RunAs {
    /// `program` run as this user in the session's environment (and its dir).
    pub fn command(&self, s: &Session, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("setpriv");
        c.arg(format!("--reuid={}", self.uid)).arg(format!("--regid={}", self.gid)).args(["--init-groups", "--"]).arg(program);
        c.env_clear()
            .env("HOME", &self.home)
            .env("USER", &self.name)
            .env("LOGNAME", &self.name)
            .env("SHELL", "/bin/bash")
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("XDG_RUNTIME_DIR", &self.runtime_dir)
            .env(SESSION_ENV, &s.dir)
            .current_dir(&s.dir);
        for k in ["RUST_LOG", "RUST_BACKTRACE", "TERM"] {
            if let Some(v) = std::env::var_os(k) {
                c.env(k, v);
            }
        }
        c
    }

    /// `ckpt SUB` as this user: the session's store (options and
    /// `CKPT_STORE`), the user's default coordinator (no `--coord`).
    fn ckpt_cmd(&self, s: &Session, sub: &str) -> Command {
        let mut c = self.command(s, &s.ckpt);
        c.arg(sub);
        if matches!(sub, "launch" | "restart" | "log") {
            c.args(["--store", &s.store]);
        }
        c.env("CKPT_STORE", &s.store);
        c
    }

    /// SIGKILLs this user's processes that belong to session `s` (cwd in
    /// its dir, or `CKPT_TEST_SESSION` naming it), then waits for them.
    fn kill_leftovers(&self, s: &Session) {
        let marker = format!("{SESSION_ENV}={}", s.dir.display()).into_bytes();
        let mine = |pid: i32| -> bool {
            let uid = std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|st| st.lines().find(|l| l.starts_with("Uid:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|u| u.parse::<u32>().ok()));
            uid == Some(self.uid)
                && (std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|c| c.starts_with(&s.dir))
                    || std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|e| e.split(|b| *b == 0).any(|v| v == marker.as_slice())))
        };
        let left: Vec<i32> = std::fs::read_dir("/proc")
            .map(|rd| rd.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).filter(|&p| mine(p)).collect())
            .unwrap_or_default();
        for &pid in &left {
            sigkill(pid);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while left.iter().any(|&p| pid_alive(p)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20)); // polling the kernel's reaping
        }
    }
}

impl Session {
    /// A session whose commands run as the ordinary account `user` (made if
    /// missing): its dir under `/tmp/ckpt-tests` is the user's (0700), its
    /// store `<dir>/store`, its coordinator the user's default socket
    /// (`$XDG_RUNTIME_DIR/ckpt/coord.sock`, `XDG_RUNTIME_DIR` = `<dir>/run`).
    pub fn as_user(user: &str, name: &str) -> Session {
        use std::os::unix::fs::PermissionsExt;
        let (uid, gid, home) = ordinary_account(user);
        let mut s = Session::new(name);
        let base = s.dir.parent().unwrap();
        let mode = std::fs::metadata(base).unwrap().permissions().mode();
        assert!(mode & 0o001 != 0, "{} (mode {mode:o}) cannot be entered by {user}: chmod o+x it or set CKPT_TEST_TMP", base.display());
        let runtime_dir = s.dir.join("run");
        std::fs::create_dir(&runtime_dir).unwrap();
        for d in [&s.dir, &runtime_dir] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).unwrap();
            std::os::unix::fs::chown(d, Some(uid), Some(gid)).unwrap();
        }
        s.coord = format!("unix:{}", runtime_dir.join("ckpt/coord.sock").display());
        s.user = Some(RunAs { name: user.to_string(), uid, gid, home, runtime_dir });
        s
    }

    /// `program` run as the session's user (as root for a root session).
    pub fn user_command(&self, program: impl AsRef<OsStr>) -> Command {
        match &self.user {
            Some(u) => u.command(self, program),
            None => {
                let mut c = Command::new(program);
                c.current_dir(&self.dir);
                c
            }
        }
    }
}

// ---------------------------------------------------------------- Proc

enum Msg {
    Line(String),
    Eof,
}

pub struct Proc {
    pub what: String,
    child: Child,
    rx: Receiver<Msg>,
    stderr: Arc<Mutex<String>>,
    /// Says when stderr reached its end.
    stderr_done: Receiver<()>,
    /// Kept open so programs reading stdin block instead of seeing EOF.
    stdin: Option<ChildStdin>,
    /// The program's pid (the launched process, or the restored one), as
    /// the program sees it: in namespaces of its own (issue 12) that is not
    /// its pid on the host, see [`Proc::host_pid`].
    pub pid: i32,
    /// Its pid on the host, once known.
    host: Option<i32>,
    pub lines: Vec<String>,
    pub first_tick: Option<u64>,
    pub last_tick: Option<u64>,
    pub eof: bool,
    pub done: bool,
}

impl Proc {
    pub fn spawn(what: String, mut c: Command) -> Proc {
        c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = c.spawn().unwrap_or_else(|e| panic!("cannot spawn {what}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines() {
                match l {
                    Ok(l) => {
                        if tx.send(Msg::Line(l)).is_err() {
                            return;
                        }
                    }
                    Err(_) => break,
                }
            }
            let _ = tx.send(Msg::Eof);
        });
        let err = Arc::new(Mutex::new(String::new()));
        let err2 = err.clone();
        let (err_done_tx, err_done) = channel();
        std::thread::spawn(move || {
            for l in BufReader::new(stderr).lines() {
                match l {
                    Ok(l) => {
                        let mut e = err2.lock().unwrap();
                        e.push_str(&l);
                        e.push('\n');
                    }
                    Err(_) => break,
                }
            }
            let _ = err_done_tx.send(());
        });
        Proc {
            what,
            stdin: child.stdin.take(),
            child,
            rx,
            stderr: err,
            stderr_done: err_done,
            pid: 0,
            host: None,
            lines: Vec::new(),
            first_tick: None,
            last_tick: None,
            eof: false,
            done: false,
        }
    }

    /// The program's pid on the host: [`Proc::pid`] when it runs in the
    /// host's PID namespace, else the descendant of this command (`ckpt
    /// launch` or `ckpt restart`, waiting outside ckpt's init) that has
    /// that pid in its own namespace.
    pub fn host_pid(&mut self) -> i32 {
        if let Some(h) = self.host {
            return h;
        }
        match host_pid_below(self.child_pid(), self.pid) {
            Some(h) => {
                self.host = Some(h);
                h
            }
            None => self.pid,
        }
    }

    /// Whether the program runs (with its pid, in its namespace if any).
    pub fn alive(&mut self) -> bool {
        let h = self.host_pid();
        h > 0 && pid_alive(h)
    }

    pub fn child_pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// The last lines of output and all of stderr, for failure messages.
    pub fn context(&self) -> String {
        let start = self.lines.len().saturating_sub(40);
        format!(
            "--- {} (pid {}): last stdout lines ---\n{}\n--- stderr ---\n{}",
            self.what,
            self.pid,
            self.lines[start..].join("\n"),
            self.stderr()
        )
    }

    fn take(&mut self, l: String) -> String {
        if l.starts_with("FAIL") {
            self.lines.push(l.clone());
            panic!("the program reported a failure: {l}\n{}", self.context());
        }
        if let Some(rest) = l.strip_prefix("TICK ") {
            let n: u64 = rest.split_whitespace().next().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
                panic!("bad TICK line {l:?}\n{}", self.context())
            });
            if let Some(prev) = self.last_tick {
                assert_eq!(n, prev + 1, "tick numbers jumped from {prev} to {n}\n{}", self.context());
            } else {
                self.first_tick = Some(n);
            }
            self.last_tick = Some(n);
        }
        if l == "DONE" {
            self.done = true;
        }
        self.lines.push(l.clone());
        l
    }

    /// The next stdout line, or None at EOF; panics after `timeout`.
    pub fn next_line(&mut self, timeout: Duration) -> Option<String> {
        match self.try_next_line(timeout) {
            Ok(l) => l,
            Err(()) => panic!("no output from {} for {timeout:?}\n{}", self.what, self.context()),
        }
    }

    /// The next stdout line, Ok(None) at EOF, Err on timeout.
    pub fn try_next_line(&mut self, timeout: Duration) -> Result<Option<String>, ()> {
        if self.eof {
            return Ok(None);
        }
        match self.rx.recv_timeout(timeout) {
            Ok(Msg::Line(l)) => Ok(Some(self.take(l))),
            Ok(Msg::Eof) | Err(RecvTimeoutError::Disconnected) => {
                self.eof = true;
                Ok(None)
            }
            Err(RecvTimeoutError::Timeout) => Err(()),
        }
    }

    /// Reads what is left of the output for up to `timeout` (a background
    /// process such as a coordinator may hold the pipe open: no EOF then).
    pub fn drain_for(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.eof {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.try_next_line(left).is_err() {
                break;
            }
        }
    }

    /// Consumes the lines already available without waiting.
    pub fn drain(&mut self) {
        while !self.eof {
            match self.rx.try_recv() {
                Ok(Msg::Line(l)) => {
                    self.take(l);
                }
                Ok(Msg::Eof) => self.eof = true,
                Err(_) => break,
            }
        }
    }

    /// Waits for a line satisfying `pred`; panics on timeout or EOF.
    pub fn wait_line(&mut self, pred: impl Fn(&str) -> bool, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!("timed out waiting for a line from {}\n{}", self.what, self.context());
            }
            match self.next_line(left) {
                Some(l) if pred(&l) => return l,
                Some(_) => {}
                None => {
                    let st = self.child.try_wait().ok().flatten();
                    panic!(
                        "{} ended its output (exit status {st:?}) while a line was awaited\n{}",
                        self.what,
                        self.context()
                    )
                }
            }
        }
    }

    pub fn wait_prefix(&mut self, prefix: &str, timeout: Duration) -> String {
        self.wait_line(|l| l.starts_with(prefix), timeout)
    }

    /// Waits for `k` more TICK lines; returns the last tick number.
    pub fn wait_ticks(&mut self, k: u64, timeout: Duration) -> u64 {
        for _ in 0..k {
            self.wait_prefix("TICK ", timeout);
        }
        self.last_tick.unwrap()
    }

    /// SIGKILLs the program and waits until it is reaped and the command
    /// we spawned (`ckpt launch` / `ckpt restart`) has exited.
    pub fn kill9(&mut self) {
        assert!(self.pid > 0);
        let host = self.host_pid();
        assert!(pid_alive(host), "{} is not running before kill\n{}", self.what, self.context());
        sigkill(host);
        if wait_child(&mut self.child, Duration::from_secs(30)).is_none() {
            panic!("{} did not exit 30 s after its program was SIGKILLed\n{}", self.what, self.context());
        }
        wait_gone(host, Duration::from_secs(30));
        // what is left of the output (no FAIL allowed there either)
        self.drain_for(Duration::from_millis(500));
    }

    /// Waits for the command we spawned to exit, reading its output
    /// meanwhile; returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                self.drain_for(Duration::from_millis(500));
                // All of stderr, unless a background child of the process
                // (a coordinator it started) still holds the pipe.
                let _ = self.stderr_done.recv_timeout(Duration::from_millis(500));
                return st;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!("{} did not exit within {timeout:?}\n{}", self.what, self.context());
            }
            if !self.eof {
                let _ = self.try_next_line(left.min(Duration::from_millis(50)));
            } else {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// Lets the program run to DONE (asking it to stop at `stop_tick` via
    /// the session's stop file) and checks it exits with status 0.
    pub fn finish(&mut self, s: &Session, extra_ticks: u64) {
        self.drain();
        let target = self.last_tick.unwrap_or(0) + extra_ticks;
        s.stop_at(target);
        self.wait_line(|l| l == "DONE", LINE_TIMEOUT + Duration::from_millis(300 * extra_ticks));
        assert!(self.last_tick.unwrap() >= target, "DONE before the stop tick\n{}", self.context());
        let st = self.wait_exit(LINE_TIMEOUT);
        assert!(st.success(), "{} exited with {st} after DONE\n{}", self.what, self.context());
        let host = self.host_pid();
        wait_gone(host, Duration::from_secs(10));
    }

    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let host = if self.pid > 0 { self.host_pid() } else { 0 };
            if host > 0 && pid_alive(host) {
                sigkill(host);
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------- scenario

/// How the standard cycle drives a program.
pub struct Cycle<'a> {
    pub prog: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(&'a str, &'a str)>,
    /// Ticks to wait between steps.
    pub ticks_between: u64,
    /// Timeout for READY (programs that build big heaps take a while).
    pub ready_timeout: Duration,
    /// Options of `ckpt launch` (e.g. `--dirty-tracking scan`).
    pub launch_opts: Vec<String>,
}

impl<'a> Cycle<'a> {
    pub fn new(prog: PathBuf, args: &[&str]) -> Cycle<'a> {
        Cycle {
            prog,
            args: args.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            ticks_between: 3,
            ready_timeout: Duration::from_secs(60),
            launch_opts: Vec::new(),
        }
    }
}

/// The cycle of issue 2 for one program:
/// launch; checkpoint twice (g1, g2); kill -9; restart the latest (g2) and
/// check it continues where g2 was; checkpoint it (g3); kill; restart the
/// latest (g3); kill; restart g1 (an older generation) and let it run to
/// DONE with exit status 0. Every restored run must keep printing TICKs
/// without FAIL. Returns the session for further checks.
pub fn standard_cycle(name: &str, c: &Cycle) -> Session {
    standard_cycle_in(Session::new(name), c)
}

/// [`standard_cycle`] in a session of the caller's (e.g. [`Session::as_user`]).
pub fn standard_cycle_in(s: Session, c: &Cycle) -> Session {
    let name = s.name.clone();
    let stop = s.stop_file();
    let mut args: Vec<&str> = c.args.iter().map(|s| s.as_str()).collect();
    let stop_s = stop.to_str().unwrap().to_string();
    args.push("-s");
    args.push(&stop_s);
    let opts: Vec<&str> = c.launch_opts.iter().map(|s| s.as_str()).collect();
    let mut p = s.launch_opts(&opts, &c.prog, &args, &c.env);
    let pid = p.pid;
    p.wait_prefix("READY", c.ready_timeout);
    p.wait_ticks(c.ticks_between, LINE_TIMEOUT);

    let g1 = s.checkpoint_bounded(&mut p);
    p.wait_ticks(c.ticks_between, LINE_TIMEOUT);
    let g2 = s.checkpoint_bounded(&mut p);
    assert!(g2.id > g1.id, "generation numbers must grow: {} then {}", g1.id, g2.id);
    p.wait_ticks(1, LINE_TIMEOUT);
    p.kill9();
    eprintln!("[{name}] original pid {pid} killed after tick {:?}", p.last_tick);
    s.assert_restores(g1.id);
    s.assert_restores(g2.id);

    // restart the latest, keep it running, checkpoint it
    let mut r = s.restart_expect(&g2, pid, true);
    r.wait_ticks(c.ticks_between, LINE_TIMEOUT);
    let g3 = s.checkpoint_bounded(&mut r);
    assert!(g3.id > g2.id);
    r.wait_ticks(1, LINE_TIMEOUT);
    r.kill9();

    // restart the newest again (a restored program restored once more)
    let mut r = s.restart_expect(&g3, pid, true);
    r.wait_ticks(c.ticks_between, LINE_TIMEOUT);
    r.kill9();

    // restart the oldest generation, explicitly named, and run to the end
    let mut r = s.restart_expect(&g1, pid, false);
    r.wait_ticks(c.ticks_between, LINE_TIMEOUT);
    r.finish(&s, 5);

    let gens = s.generations();
    for g in [&g1, &g2, &g3] {
        assert!(gens.contains_key(&g.id), "ckpt log lacks generation {}: {gens:?}", g.id);
    }
    s
}

// ---------------------------------------------------------------- JSON

/// A minimal JSON value (the harness has no dependencies).
#[derive(Clone, Debug, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    pub fn parse(s: &str) -> Result<Json, String> {
        let b = s.as_bytes();
        let mut i = 0;
        let v = parse_value(b, &mut i)?;
        skip_ws(b, &mut i);
        if i != b.len() {
            return Err(format!("trailing data at byte {i}"));
        }
        Ok(v)
    }
    pub fn get(&self, k: &str) -> Option<&Json> {
        match self {
            Json::Obj(v) => v.iter().find(|(kk, _)| kk == k).map(|(_, v)| v),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&Vec<Json>> {
        match self {
            Json::Arr(v) => Some(v),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Json::Num(n) => Some(*n),
            _ => None,
        }
    }
    pub fn as_u64(&self) -> Option<u64> {
        self.as_f64().filter(|n| *n >= 0.0 && n.fract() == 0.0).map(|n| n as u64)
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }
    /// Field `k` as an unsigned integer, panicking with the object otherwise.
    pub fn u64_field(&self, k: &str) -> u64 {
        self.get(k).and_then(Json::as_u64).unwrap_or_else(|| panic!("no integer field {k:?} in {self:?}"))
    }
}

fn skip_ws(b: &[u8], i: &mut usize) {
    while *i < b.len() && b[*i].is_ascii_whitespace() {
        *i += 1;
    }
}

fn parse_value(b: &[u8], i: &mut usize) -> Result<Json, String> {
    skip_ws(b, i);
    let Some(&c) = b.get(*i) else { return Err("unexpected end".into()) };
    match c {
        b'{' => {
            *i += 1;
            let mut v = Vec::new();
            skip_ws(b, i);
            if b.get(*i) == Some(&b'}') {
                *i += 1;
                return Ok(Json::Obj(v));
            }
            loop {
                skip_ws(b, i);
                let Json::Str(k) = parse_value(b, i)? else { return Err("object key".into()) };
                skip_ws(b, i);
                if b.get(*i) != Some(&b':') {
                    return Err(format!("expected ':' at {i}"));
                }
                *i += 1;
                let val = parse_value(b, i)?;
                v.push((k, val));
                skip_ws(b, i);
                match b.get(*i) {
                    Some(b',') => *i += 1,
                    Some(b'}') => {
                        *i += 1;
                        return Ok(Json::Obj(v));
                    }
                    _ => return Err(format!("expected ',' or '}}' at {i}")),
                }
            }
        }
        b'[' => {
            *i += 1;
            let mut v = Vec::new();
            skip_ws(b, i);
            if b.get(*i) == Some(&b']') {
                *i += 1;
                return Ok(Json::Arr(v));
            }
            loop {
                v.push(parse_value(b, i)?);
                skip_ws(b, i);
                match b.get(*i) {
                    Some(b',') => *i += 1,
                    Some(b']') => {
                        *i += 1;
                        return Ok(Json::Arr(v));
                    }
                    _ => return Err(format!("expected ',' or ']' at {i}")),
                }
            }
        }
        b'"' => {
            *i += 1;
            let mut s = String::new();
            loop {
                let Some(&c) = b.get(*i) else { return Err("unterminated string".into()) };
                *i += 1;
                match c {
                    b'"' => return Ok(Json::Str(s)),
                    b'\\' => {
                        let e = *b.get(*i).ok_or("bad escape")?;
                        *i += 1;
                        match e {
                            b'n' => s.push('\n'),
                            b't' => s.push('\t'),
                            b'r' => s.push('\r'),
                            b'b' => s.push('\u{8}'),
                            b'f' => s.push('\u{c}'),
                            b'u' => {
                                let h = std::str::from_utf8(b.get(*i..*i + 4).ok_or("bad \\u")?)
                                    .map_err(|e| e.to_string())?;
                                let cp = u32::from_str_radix(h, 16).map_err(|e| e.to_string())?;
                                *i += 4;
                                s.push(char::from_u32(cp).unwrap_or('\u{fffd}'));
                            }
                            other => s.push(other as char),
                        }
                    }
                    _ => {
                        // copy a UTF-8 sequence
                        let start = *i - 1;
                        let mut end = *i;
                        while end < b.len() && (b[end] & 0xc0) == 0x80 {
                            end += 1;
                        }
                        s.push_str(std::str::from_utf8(&b[start..end]).map_err(|e| e.to_string())?);
                        *i = end;
                    }
                }
            }
        }
        b't' if b[*i..].starts_with(b"true") => {
            *i += 4;
            Ok(Json::Bool(true))
        }
        b'f' if b[*i..].starts_with(b"false") => {
            *i += 5;
            Ok(Json::Bool(false))
        }
        b'n' if b[*i..].starts_with(b"null") => {
            *i += 4;
            Ok(Json::Null)
        }
        _ => {
            let start = *i;
            while *i < b.len() && matches!(b[*i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9') {
                *i += 1;
            }
            let t = std::str::from_utf8(&b[start..*i]).unwrap();
            t.parse::<f64>().map(Json::Num).map_err(|_| format!("bad value at byte {start}"))
        }
    }
}

// ---------------------------------------------------------------- misc

/// All files under `dir`, recursively, with their contents (for "the
/// directory is untouched" checks).
pub fn snapshot_dir(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut m = BTreeMap::new();
    fn walk(d: &Path, m: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                m.insert(p.clone(), b"<dir>".to_vec());
                walk(&p, m);
            } else {
                m.insert(p.clone(), std::fs::read(&p).unwrap_or_default());
            }
        }
    }
    walk(dir, &mut m);
    m
}

/// Regular files under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    snapshot_dir(dir).into_iter().filter(|(p, _)| p.is_file()).map(|(p, _)| p).collect()
}

pub fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

/// Makes the kernel hand out `pid` to the next process we spawn (root,
/// `/proc/sys/kernel/ns_last_pid`), retrying a few times against other
/// processes being created meanwhile. Returns the child holding the pid.
/// The descendant of `ancestor` that has pid `inner` in a PID namespace
/// below the host's (ckpt's namespaces, issue 12): its host pid.
pub fn host_pid_below(ancestor: i32, inner: i32) -> Option<i32> {
    let mut parent = std::collections::HashMap::new();
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        let Ok(st) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { continue };
        let field = |k: &str| st.lines().find_map(|l| l.strip_prefix(k)).map(|v| v.split_whitespace().filter_map(|x| x.parse::<i32>().ok()).collect::<Vec<_>>());
        if let Some(pp) = field("PPid:").and_then(|v| v.first().copied()) {
            parent.insert(pid, pp);
        }
        if let Some(ns) = field("NSpid:")
            && ns.len() >= 2 && ns.last() == Some(&inner)
        {
            found.push(pid);
        }
    }
    found.into_iter().find(|&p| {
        let mut q = p;
        for _ in 0..64 {
            match parent.get(&q) {
                Some(&pp) if pp == ancestor => return true,
                Some(&pp) if pp > 1 => q = pp,
                _ => return false,
            }
        }
        false
    })
}

pub fn occupy_pid(pid: i32) -> Option<Child> {
    for _ in 0..50 {
        if std::fs::write("/proc/sys/kernel/ns_last_pid", format!("{}", pid - 1)).is_err() {
            return None;
        }
        let child = Command::new("sleep")
            .arg("600")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        if child.id() as i32 == pid {
            // Move the allocator past the image's TIDs (pid + 1, ...), so
            // that processes and threads made later by the test do not
            // take them by accident.
            let _ = std::fs::write("/proc/sys/kernel/ns_last_pid", format!("{}", pid + 200));
            return Some(child);
        }
        let mut c = child;
        let _ = c.kill();
        let _ = c.wait();
    }
    None
}

/// Runs the VM test script `tests/vm/SCRIPT` (it boots Debian's 6.1
/// kernel under qemu, installing what it needs) with this run's binaries
/// and programs, and asserts its verdict line says PASS. `CKPT_SKIP_VM=1`
/// skips it.
pub fn run_vm_test(script: &str, what: &str) {
    if std::env::var_os("CKPT_SKIP_VM").is_some_and(|v| v == "1") {
        eprintln!("CKPT_SKIP_VM=1: {what} VM test skipped");
        return;
    }
    let ws = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    // The binaries this test run uses (same lookup as the other tests) and
    // the programs built with it.
    let bin_dir = ckpt_bin().parent().unwrap().to_path_buf();
    let mut cmd = Command::new("bash");
    cmd.arg(ws.join("tests/vm").join(script)).env("CKPT_VM_BIN_DIR", &bin_dir).env("CKPT_VM_PROGRAMS", ckpt_tests::PROGRAMS_DIR);
    // The kernel cache and console log go next to the binaries' target dir.
    if std::env::var_os("CKPT_VM_TARGET").is_none()
        && let Some(target) = bin_dir.parent()
    {
        cmd.env("CKPT_VM_TARGET", target);
    }
    // The script times the VM out itself (300 s); this bounds installs too.
    let out = run_with_timeout(cmd, Duration::from_secs(900));
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    eprintln!("{stderr}");
    let verdict = stdout.lines().rev().find(|l| l.starts_with("CKPT-VM-VERDICT:")).unwrap_or("");
    assert_eq!(verdict, "CKPT-VM-VERDICT: PASS", "{what} VM test failed (script exit {}):\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status);
    assert!(out.status.success(), "script printed PASS but exited {}", out.status);
}

/// A process stopped by job control (`kill -STOP`) is checkpointed where it
/// stands: through two checkpoints it stays stopped and prints nothing (no
/// SIGCONT behind the user's back); after SIGCONT it runs on; stopped again,
/// checkpointed, killed and restarted, it comes back stopped (state T, not a
/// line), checkpoints so, and after SIGCONT its own per-tick checks of its
/// worker threads pass to the end.
pub fn job_stop_cycle(s: Session) {
    let stop = s.stop_file();
    let stop_s = stop.to_str().unwrap().to_string();
    // `threads`, not `eintr`: SIGSTOP/SIGCONT themselves make epoll_wait,
    // semop and sigtimedwait fail with EINTR (the kernel's doing, signal(7)).
    let mut p = s.launch(&program("threads"), &["-t", "100", "-w", "4", "-s", &stop_s]);
    p.wait_prefix("READY", LINE_TIMEOUT);
    p.wait_ticks(3, LINE_TIMEOUT);
    let (pid, host) = (p.pid, p.host_pid());
    stop_and_quiet(&mut p, host);
    for _ in 0..2 {
        let t = Instant::now();
        s.checkpoint();
        assert!(t.elapsed() < Duration::from_secs(10), "the checkpoint of a stopped process took {:?}", t.elapsed());
        assert_quiet_and_stopped(&mut p, host, "after a checkpoint");
    }
    kill_sig(host, "-CONT");
    p.wait_ticks(3, LINE_TIMEOUT);
    stop_and_quiet(&mut p, host);
    let g = s.checkpoint();
    assert_quiet_and_stopped(&mut p, host, "after the third checkpoint");
    p.kill9();
    let mut q = s.restart(Some(g), pid);
    let until = Instant::now() + RESTART_TIMEOUT;
    let host = loop {
        let h = q.host_pid();
        if h > 0 && job_stopped(h) {
            break h;
        }
        assert!(Instant::now() < until, "the restored process is not stopped\n{}", q.context());
        if let Ok(Some(l)) = q.try_next_line(Duration::from_millis(20)) {
            panic!("the restored process ran while it should be stopped: {l}\n{}", q.context());
        }
    };
    assert_quiet_and_stopped(&mut q, host, "after the restart");
    s.checkpoint();
    assert_quiet_and_stopped(&mut q, host, "after a checkpoint of the restored process");
    kill_sig(host, "-CONT");
    q.wait_ticks(3, LINE_TIMEOUT);
    s.checkpoint_bounded(&mut q);
    q.finish(&s, 5);
}

/// Whether `pid` (of the host) is in a job-control stop.
pub fn job_stopped(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|st| st.rsplit_once(')').unwrap().1.trim_start().starts_with('T'))
        .unwrap_or(false)
}

fn kill_sig(pid: i32, sig: &str) {
    let st = Command::new("kill").args([sig, &pid.to_string()]).status().unwrap();
    assert!(st.success(), "kill {sig} {pid} failed");
}

/// SIGSTOP, then read what it printed before the stop took it.
fn stop_and_quiet(p: &mut Proc, host: i32) {
    kill_sig(host, "-STOP");
    while !job_stopped(host) {
        std::thread::sleep(Duration::from_millis(5));
    }
    while let Ok(Some(_)) = p.try_next_line(Duration::from_millis(300)) {}
}

fn assert_quiet_and_stopped(p: &mut Proc, host: i32, when: &str) {
    if let Ok(Some(l)) = p.try_next_line(Duration::from_millis(700)) {
        panic!("the stopped process ran {when}: it printed {l}\n{}", p.context());
    }
    assert!(job_stopped(host), "the process is not stopped {when}\n{}", p.context());
}
