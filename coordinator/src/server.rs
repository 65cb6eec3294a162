//! The coordinator daemon.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use std::collections::{HashMap, HashSet};

use ckpt_engine::capture::{AgentReport, Base, Prepared, prepare};
use ckpt_engine::dirty::Backend;
use ckpt_engine::image::RegionKind;
use ckpt_engine::procfs;
use ckpt_engine::image::{GenerationManifest, IMAGE_VERSION, ProcessEntry};
use ckpt_store::{GenerationInfo, NewGeneration, Store, Writer};
use ckpt_wire::Pod;
use ckpt_wire::agent::{self as proto, CheckpointRequest, Failed, Forked, Header, Hello, RangeList, Registered, Resume, Suspended, ThreadState, Welcome, kind};
use serde_json::{Value, json};

use crate::{Address, CoordError, Stream};

/// How the coordinator runs.
#[derive(Clone, Debug)]
pub struct Config {
    pub addr: Address,
    pub store_url: String,
    /// Checkpoint this often while processes are registered.
    pub interval: Option<Duration>,
    /// Forked checkpointing: the program resumes once a copy-on-write
    /// snapshot is taken, and the snapshot is stored while it runs.
    pub fork: bool,
}

/// How long a checkpoint waits for another writer (`ckpt gc`) to finish.
const WRITER_WAIT: Duration = Duration::from_secs(300);
/// How many rounds a checkpoint tries when a round meets a moving target.
const CHECKPOINT_ATTEMPTS: u32 = 4;
/// How long the restart on one host waits for the others'.
const RESTART_BARRIER_SECS: u64 = 120;
/// How long a new child may take to register with the coordinator.
const JOIN_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a process may take to stop all its threads.
const SUSPEND_TIMEOUT: Duration = Duration::from_secs(30);

enum AgentMsg {
    Frame(u32, Vec<u8>),
    Closed,
}

struct Proc {
    conn_id: u64,
    hello: Hello,
    host: String,
    writer: Mutex<Stream>,
    rx: Mutex<Receiver<AgentMsg>>,
    since_ms: i64,
}

impl Proc {
    fn send(&self, kind: u32, payload: &[u8]) -> std::io::Result<()> {
        let mut w = self.writer.lock().unwrap();
        w.write_all(Header::new(kind, payload.len()).as_bytes())?;
        w.write_all(payload)
    }

    fn recv(&self, timeout: Duration) -> Option<(u32, Vec<u8>)> {
        match self.rx.lock().unwrap().recv_timeout(timeout) {
            Ok(AgentMsg::Frame(k, p)) => Some((k, p)),
            Ok(AgentMsg::Closed) | Err(RecvTimeoutError::Disconnected) | Err(RecvTimeoutError::Timeout) => None,
        }
    }
}

struct Coordinator {
    cfg: Config,
    store: Store,
    procs: Mutex<BTreeMap<i32, Arc<Proc>>>,
    /// Per pid: (connection, what its last committed capture left).
    bases: Mutex<HashMap<i32, (u64, Base)>>,
    ckpt_lock: Mutex<()>,
    next_conn: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// Fds given to the computation from outside by `ckpt restart` (its
    /// stdio): (fd, readlink target).
    externals: Mutex<Vec<(i32, String)>>,
    /// Per generation, the restart barrier of its hosts.
    restarts: Mutex<HashMap<u64, RestartBarrier>>,
    started: Instant,
    host: String,
    /// This coordinator's PID namespace inode and boot id.
    pidns: u64,
    boot_id: String,
    quit: AtomicBool,
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes.
    unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Runs the coordinator until `ckpt quit`.
pub fn run(cfg: Config) -> Result<(), CoordError> {
    let store = Store::open_or_create(&cfg.store_url, ckpt_store::DEFAULT_CHUNK_SIZE)?;
    // Fail now, not at the first checkpoint, if another process owns it.
    drop(store.writer()?);
    let listener = cfg.addr.listen().map_err(|e| CoordError::Listen { addr: cfg.addr.to_string(), source: e })?;
    tracing::info!(addr = %cfg.addr, store = %cfg.store_url, "coordinator listening");
    let c = Arc::new(Coordinator {
        cfg: cfg.clone(),
        store,
        procs: Mutex::new(BTreeMap::new()),
        bases: Mutex::new(HashMap::new()),
        ckpt_lock: Mutex::new(()),
        next_conn: AtomicU64::new(1),
        last_error: Mutex::new(None),
        externals: Mutex::new(Vec::new()),
        restarts: Mutex::new(HashMap::new()),
        started: Instant::now(),
        host: hostname(),
        pidns: std::fs::read_link("/proc/self/ns/pid")
            .ok()
            .and_then(|l| l.to_string_lossy().trim_start_matches("pid:[").trim_end_matches(']').parse().ok())
            .unwrap_or(0),
        boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default().trim().to_string(),
        quit: AtomicBool::new(false),
    });
    if let Some(every) = cfg.interval {
        let c = c.clone();
        std::thread::spawn(move || interval_loop(c, every));
    }
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("accept: {e}");
                continue;
            }
        };
        if c.quit.load(Ordering::Acquire) {
            break;
        }
        let c = c.clone();
        std::thread::spawn(move || c.serve(stream, peer));
    }
    if let Address::Unix(p) = &cfg.addr {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

fn interval_loop(c: Arc<Coordinator>, every: Duration) {
    loop {
        std::thread::sleep(every);
        if c.quit.load(Ordering::Acquire) {
            return;
        }
        if c.procs.lock().unwrap().is_empty() {
            continue;
        }
        match c.checkpoint() {
            Ok(g) => tracing::info!(generation = g.id, "interval checkpoint committed"),
            Err(e) => tracing::warn!("interval checkpoint failed: {e}"),
        }
    }
}

impl Coordinator {
    fn serve(self: Arc<Self>, mut stream: Stream, peer: String) {
        let mut first = [0u8; 4];
        if stream.read_exact(&mut first).is_err() {
            return;
        }
        if u32::from_le_bytes(first) == proto::MAGIC {
            self.serve_agent(stream, first, peer);
        } else {
            self.serve_client(stream, first);
        }
    }

    fn serve_agent(self: Arc<Self>, mut stream: Stream, first: [u8; 4], peer: String) {
        let mut rest = [0u8; 12];
        if stream.read_exact(&mut rest).is_err() {
            return;
        }
        let mut hb = first.to_vec();
        hb.extend_from_slice(&rest);
        let h = Header::read_from(&hb).unwrap_or_default();
        let mut payload = vec![0u8; h.len as usize];
        if h.kind != kind::HELLO || stream.read_exact(&mut payload).is_err() {
            return;
        }
        let Some(hello) = Hello::parse(&payload) else { return };
        let conn_id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (tx, rx): (Sender<AgentMsg>, Receiver<AgentMsg>) = channel();
        let Ok(writer) = stream.try_clone() else { return };
        let host = match hello.host_name() {
            "" if peer == "local" => self.host.clone(),
            "" => peer,
            name => name.to_string(),
        };
        let p = Arc::new(Proc { conn_id, hello, host, writer: Mutex::new(writer), rx: Mutex::new(rx), since_ms: now_ms() });
        let welcome = Welcome { ok: 1, _pad: 0, last_gen: 0 };
        if p.send(kind::WELCOME, welcome.as_bytes()).is_err() {
            return;
        }
        tracing::info!(pid = hello.pid, restored_from = hello.restored_gen, "process joined");
        self.procs.lock().unwrap().insert(hello.pid, p);
        loop {
            let mut hb = [0u8; 16];
            if stream.read_exact(&mut hb).is_err() {
                break;
            }
            let Some(h) = Header::read_from(&hb) else { break };
            if h.magic != proto::MAGIC {
                break;
            }
            let mut payload = vec![0u8; h.len as usize];
            if stream.read_exact(&mut payload).is_err() {
                break;
            }
            if tx.send(AgentMsg::Frame(h.kind, payload)).is_err() {
                break;
            }
        }
        let _ = tx.send(AgentMsg::Closed);
        let mut procs = self.procs.lock().unwrap();
        if procs.get(&hello.pid).map(|p| p.conn_id) == Some(conn_id) {
            procs.remove(&hello.pid);
            tracing::info!(pid = hello.pid, "process left");
        }
    }

    fn serve_client(self: Arc<Self>, stream: Stream, first: [u8; 4]) {
        let Ok(mut out) = stream.try_clone() else { return };
        let mut line = String::from_utf8_lossy(&first).into_owned();
        let mut r = BufReader::new(stream);
        if r.read_line(&mut line).is_err() {
            return;
        }
        let req: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        let cmd = req.get("cmd").and_then(Value::as_str).unwrap_or("");
        let answer = match cmd {
            "hello" => json!({"ok": true, "store": self.cfg.store_url, "addr": self.cfg.addr.to_string(), "pid": std::process::id()}),
            "status" => self.status(),
            "checkpoint" => match self.checkpoint() {
                Ok(g) => json!({"ok": true, "generation": g.id, "info": g}),
                Err(e) => {
                    *self.last_error.lock().unwrap() = Some(e.clone());
                    json!({"ok": false, "error": e})
                }
            },
            "kill" => {
                let procs: Vec<i32> = self.procs.lock().unwrap().keys().copied().collect();
                for pid in &procs {
                    // SAFETY: kill with a pid the agent registered.
                    unsafe { libc::kill(*pid, libc::SIGKILL) };
                }
                json!({"ok": true, "killed": procs})
            }
            "externals" => {
                let mut ext = self.externals.lock().unwrap();
                for item in req.get("fds").and_then(Value::as_array).into_iter().flatten() {
                    if let (Some(fd), Some(target)) = (item.get("fd").and_then(Value::as_i64), item.get("target").and_then(Value::as_str))
                        && !ext.iter().any(|(_, t)| t == target) {
                            ext.push((fd as i32, target.to_string()));
                        }
                }
                json!({"ok": true})
            }
            "restart_barrier" => {
                // The restarts of one generation on several hosts: each
                // names the hosts (as recorded) whose processes it brings
                // back, and is answered once every host has arrived.
                let generation = req.get("generation").and_then(Value::as_u64).unwrap_or(0);
                let names = |k: &str| -> Vec<String> {
                    req.get(k).and_then(Value::as_array).into_iter().flatten().filter_map(|h| h.as_str().map(str::to_string)).collect()
                };
                let (arrived, hosts) = (names("arrived"), names("hosts"));
                {
                    let mut all = self.restarts.lock().unwrap();
                    let entry = all.entry(generation).or_default();
                    // A barrier that opened a while ago belongs to an earlier
                    // restart of this generation.
                    if entry.1.is_some_and(|t| t.elapsed() > Duration::from_secs(5)) {
                        *entry = Default::default();
                    }
                    entry.0.extend(arrived);
                }
                let deadline = Instant::now() + Duration::from_secs(RESTART_BARRIER_SECS);
                loop {
                    let mut all = self.restarts.lock().unwrap();
                    let entry = all.entry(generation).or_default();
                    let missing: Vec<&String> = hosts.iter().filter(|h| !entry.0.contains(*h)).collect();
                    if missing.is_empty() {
                        entry.1.get_or_insert_with(Instant::now);
                        break json!({"ok": true});
                    }
                    drop(all);
                    if Instant::now() >= deadline {
                        break json!({"ok": false, "error": format!("no restart of generation {generation} arrived from host(s) {missing:?} within {RESTART_BARRIER_SECS} s: run `ckpt restart {generation} --host NAME` on each host of the generation")});
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            "wait_process" => {
                let pid = req.get("pid").and_then(Value::as_i64).unwrap_or(0) as i32;
                let deadline = Instant::now() + Duration::from_secs(20);
                let mut found = false;
                while Instant::now() < deadline {
                    if self.procs.lock().unwrap().contains_key(&pid) {
                        found = true;
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                if found { json!({"ok": true}) } else { json!({"ok": false, "error": format!("process {pid} did not register with the coordinator")}) }
            }
            "quit" => {
                self.quit.store(true, Ordering::Release);
                // No checkpoint may be half-way when we go; the catalog is
                // left as one self-contained file before we answer.
                let no_checkpoint = self.ckpt_lock.lock().unwrap();
                if let Err(e) = self.store.checkpoint_wal() {
                    tracing::warn!("folding the catalog's WAL: {e}");
                }
                std::mem::forget(no_checkpoint);
                json!({"ok": true})
            }
            other => json!({"ok": false, "error": format!("unknown command {other:?}")}),
        };
        let mut bytes = serde_json::to_vec(&answer).unwrap_or_default();
        bytes.push(b'\n');
        let _ = out.write_all(&bytes);
        if cmd == "quit" {
            if let Address::Unix(p) = &self.cfg.addr {
                let _ = std::fs::remove_file(p);
            }
            tracing::info!("quit requested");
            std::process::exit(0);
        }
    }

    fn status(&self) -> Value {
        let procs: Vec<Value> = self
            .procs
            .lock()
            .unwrap()
            .values()
            .map(|p| {
                let pid = p.hello.pid;
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim().to_string();
                json!({"pid": pid, "ppid": p.hello.ppid, "host": p.host, "comm": comm, "restored_from": p.hello.restored_gen, "since_ms": p.since_ms,
                       "dirty_tracking": Backend::choose(p.hello.tracking, p.hello.uffd_fd).name(),
                       "fork": self.cfg.fork && p.hello.flags & proto::HELLO_NO_FORK == 0})
            })
            .collect();
        let last = self.store.latest().ok().flatten();
        json!({
            "ok": true,
            "coordinator": {"pid": std::process::id(), "addr": self.cfg.addr.to_string(), "uptime_s": self.started.elapsed().as_secs(),
                            "interval_s": self.cfg.interval.map(|d| d.as_secs())},
            "store": self.cfg.store_url,
            "processes": procs,
            "last_generation": last,
            "last_error": *self.last_error.lock().unwrap(),
        })
    }

    /// One checkpoint of every registered process: all or nothing.
    fn checkpoint(&self) -> Result<GenerationInfo, String> {
        let _one_at_a_time = self.ckpt_lock.lock().unwrap();
        // A round that met a moving target (a TCP connection that received
        // data while the computation was read, a connection not yet
        // accepted) is tried again after the programs ran a moment.
        let mut attempt = 1;
        loop {
            match self.checkpoint_once() {
                Err((e, true)) if attempt < CHECKPOINT_ATTEMPTS => {
                    tracing::info!(attempt, "checkpoint round refused ({e}); trying again");
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(100 * attempt as u64));
                }
                r => return r.map_err(|(e, _)| e),
            }
        }
    }

    /// One round; an error says whether trying again may succeed.
    fn checkpoint_once(&self) -> Result<GenerationInfo, (String, bool)> {
        let t0 = Instant::now();
        let procs: Vec<Arc<Proc>> = self.procs.lock().unwrap().values().cloned().collect();
        if procs.is_empty() {
            return Err(("no processes to checkpoint: start one with `ckpt launch -- PROGRAM`".into(), false));
        }
        for p in &procs {
            if !self.reaches(&p.hello) {
                return Err((format!(
                    "process {} on host {} runs on another machine or in another PID namespace than this coordinator: ckpt reads processes \
                     through /proc and process_vm_readv, so every process must share the coordinator's kernel and PID namespace \
                     (hosts made with network namespaces do; separate machines need a coordinator each)",
                    p.hello.pid, p.host
                ), false));
            }
        }
        // The store's writer lock is taken per checkpoint, so that `ckpt gc`
        // can work between checkpoints; wait for it if gc holds it now.
        let writer = self.take_writer().map_err(|e| (e, false))?;
        let generation = writer.next_generation_id();
        let req = CheckpointRequest { generation, flags: 0 };
        // The programs are stopped from here until RESUME.
        let t_stop = Instant::now();
        let mut sent = Vec::new();
        let mut failure: Option<String> = None;
        for p in &procs {
            match p.send(kind::CHECKPOINT, req.as_bytes()) {
                Ok(()) => sent.push(p.clone()),
                Err(e) => failure = Some(format!("process {} cannot be reached: {e}", p.hello.pid)),
            }
        }
        // Stop everyone; remember who is stopped.
        let mut stopped: Vec<(Arc<Proc>, AgentReport)> = Vec::new();
        for p in &sent {
            match p.recv(SUSPEND_TIMEOUT) {
                Some((kind::SUSPENDED, payload)) => match parse_suspended(&p.hello, &payload) {
                    Some(r) => stopped.push((p.clone(), r)),
                    None => failure = Some(format!("process {} sent a malformed report", p.hello.pid)),
                },
                Some((kind::FAILED, payload)) => {
                    let f = Failed::read_from(&payload);
                    let msg = f.map(|f| String::from_utf8_lossy(f.message()).into_owned()).unwrap_or_default();
                    failure = Some(format!("process {} could not stop: {msg}", p.hello.pid));
                }
                Some((k, _)) => failure = Some(format!("process {} answered with message kind {k}", p.hello.pid)),
                None => failure = Some(format!("process {} died or did not stop within {}s", p.hello.pid, SUSPEND_TIMEOUT.as_secs())),
            }
        }
        if failure.is_none()
            && let Err(f) = self.stop_descendants(&req, &mut stopped) {
                failure = Some(f);
            }
        if failure.is_none() {
            hold_for_tests();
        }
        let suspend_ms = t_stop.elapsed().as_secs_f64() * 1000.0;
        if let Some(f) = failure {
            writer.abort();
            finish_round(&stopped, proto::OUTCOME_ABORTED, generation, &[]);
            tracing::warn!("checkpoint aborted: {f}");
            return Err((f, false));
        }
        // The tracking bases of these processes are consumed: on success they
        // are replaced, on failure tracking starts over with a full read.
        let mut bases: HashMap<i32, Base> = HashMap::new();
        {
            let mut all = self.bases.lock().unwrap();
            for (p, _) in &stopped {
                if let Some((conn, b)) = all.remove(&p.hello.pid)
                    && conn == p.conn_id {
                        bases.insert(p.hello.pid, b);
                    }
            }
        }

        // Phase A, everyone stopped: metadata, dirty pages, snapshot.
        let mut work: Vec<Work> = Vec::new();
        let phase_a = self.phase_a(&stopped, &bases, &writer, &mut work);
        let snapshots: Vec<i32> = work.iter().filter_map(|w| w.snapshot).collect();
        if let Err((e, retry)) = phase_a {
            writer.abort();
            finish_round(&stopped, proto::OUTCOME_ABORTED, generation, &snapshots);
            tracing::warn!("checkpoint aborted: {e}");
            return Err((e, retry));
        }
        let resume = Resume { outcome: proto::OUTCOME_WRITTEN, _pad: 0, generation };
        for (p, _) in &stopped {
            let _ = p.send(kind::RESUME, resume.as_bytes());
        }
        let downtime_ms = t_stop.elapsed().as_secs_f64() * 1000.0;

        // Phase B, the program running again: memory from the snapshots.
        let result = self.phase_b(&writer, generation, &mut work, &bases, t0, downtime_ms, suspend_ms);
        kill_snapshots(&snapshots);
        for (p, _) in &stopped {
            let _ = p.recv(Duration::from_secs(10));
        }
        match result {
            Ok((g, new_bases)) => {
                let mut all = self.bases.lock().unwrap();
                for (pid, conn, b) in new_bases {
                    all.insert(pid, (conn, b));
                }
                tracing::info!(generation = g.id, ms = g.duration_ms, downtime_ms, new_bytes = g.new_bytes, "generation committed");
                Ok(g)
            }
            Err(e) => {
                writer.abort();
                tracing::warn!("checkpoint aborted: {e}");
                Err((e, false))
            }
        }
    }

    /// Brings the children of the stopped processes into the round: a child
    /// forked (or exec'd) since the round began registers within moments,
    /// and is stopped too. A live child that never registers is outside the
    /// agent's reach (a static program, or one started without the agent's
    /// environment): the round fails, naming it. Exited, unreaped children
    /// (zombies) are recorded in their parent's image instead.
    fn stop_descendants(&self, req: &CheckpointRequest, stopped: &mut Vec<(Arc<Proc>, AgentReport)>) -> Result<(), String> {
        loop {
            let known: HashSet<i32> = stopped.iter().map(|(p, _)| p.hello.pid).collect();
            let mut missing = Vec::new();
            for (p, _) in stopped.iter() {
                for c in procfs::children(p.hello.pid) {
                    let zombie = procfs::tree_ids(c).map(|t| t.state == 'Z' || t.state == 'X').unwrap_or(true);
                    if !known.contains(&c) && !zombie {
                        missing.push((c, p.hello.pid));
                    }
                }
            }
            if missing.is_empty() {
                return Ok(());
            }
            for (child, parent) in missing {
                let deadline = Instant::now() + JOIN_TIMEOUT;
                let proc_ = loop {
                    if let Some(p) = self.procs.lock().unwrap().get(&child) {
                        break Some(p.clone());
                    }
                    let alive = procfs::tree_ids(child).map(|t| t.state != 'Z' && t.state != 'X').unwrap_or(false);
                    if !alive || Instant::now() >= deadline {
                        break None;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                };
                let Some(p) = proc_ else {
                    if procfs::tree_ids(child).map(|t| t.state != 'Z' && t.state != 'X').unwrap_or(false) {
                        let comm = procfs::comm(child).unwrap_or_default();
                        return Err(format!(
                            "process {child} ({comm}), a child of {parent}, is not under checkpoint control: it runs without the ckpt agent \
                             (a statically linked program, or its environment lost LD_PRELOAD/CKPT_COORD); run it with the agent or let it finish before checkpointing"
                        ));
                    }
                    continue; // it exited meanwhile: a zombie, seen next time round
                };
                p.send(kind::CHECKPOINT, req.as_bytes()).map_err(|e| format!("process {child} cannot be reached: {e}"))?;
                match p.recv(SUSPEND_TIMEOUT) {
                    Some((kind::SUSPENDED, payload)) => match parse_suspended(&p.hello, &payload) {
                        Some(r) => stopped.push((p.clone(), r)),
                        None => return Err(format!("process {child} sent a malformed report")),
                    },
                    _ => return Err(format!("process {child} (a child of {parent}) did not stop for the checkpoint")),
                }
            }
        }
    }

    /// The stopped phase: the fds of every process, then the rest of each
    /// process in a thread of its own (reading `/proc`, the dirty pages,
    /// the tracking registration and the snapshot fork of one process do
    /// not wait for the others).
    fn phase_a(&self, stopped: &[(Arc<Proc>, AgentReport)], bases: &HashMap<i32, Base>, writer: &Writer, work: &mut Vec<Work>) -> Result<(), (String, bool)> {
        let busy = |e: ckpt_engine::EngineError| {
            let retry = matches!(e, ckpt_engine::EngineError::SocketBusy { .. });
            (e.to_string(), retry)
        };
        let externals = self.externals.lock().unwrap().clone();
        let mut round = ckpt_engine::fds::Round::new(writer).with_externals(&externals);
        // The fds first, every process back to back: connections between
        // processes are read within the shortest time (see fds::socket::tcp).
        let mut fds = Vec::new();
        for (p, _) in stopped {
            fds.push(round.capture_process(p.hello.pid, &[p.hello.agent_fd, p.hello.uffd_fd]).map_err(busy)?);
        }
        let results: Vec<(Option<Work>, Result<(), String>)> = std::thread::scope(|s| {
            let threads: Vec<_> =
                stopped.iter().zip(fds).map(|((p, report), fds)| s.spawn(|| self.phase_a_one(p, report, fds, bases, writer))).collect();
            threads.into_iter().map(|t| t.join().unwrap_or_else(|_| (None, Err("internal: a capture thread panicked".into())))).collect()
        });
        let mut first_err = None;
        for (w, r) in results {
            // Every snapshot forked goes into `work`, so that it is killed
            // whatever happens next.
            work.extend(w);
            if let (Err(e), None) = (r, &first_err) {
                first_err = Some(e);
            }
        }
        if let Some(e) = first_err {
            return Err((e, false));
        }
        // Before RESUME: checks across processes (socket peers), and TCP
        // connections leave repair mode.
        round.finish().map_err(busy)?;
        Ok(())
    }

    /// The stopped phase of one process: its metadata and dirty pages,
    /// write tracking for new mappings, the snapshot, and the memory the
    /// snapshot lacks. Returns its part of the work (with the snapshot, if
    /// one was forked) even when a later step failed.
    fn phase_a_one(
        &self,
        p: &Arc<Proc>,
        report: &AgentReport,
        fds: Vec<ckpt_engine::image::FdImage>,
        bases: &HashMap<i32, Base>,
        writer: &Writer,
    ) -> (Option<Work>, Result<(), String>) {
        let pid = p.hello.pid;
        let t = Instant::now();
        let ms = |t: Instant| t.elapsed().as_secs_f64() * 1000.0;
        let backend = Backend::choose(p.hello.tracking, p.hello.uffd_fd);
        let mut prep = match prepare(report, backend, &p.host, self.store.chunk_size(), fds) {
            Ok(prep) => prep,
            Err(e) => return (None, Err(e.to_string())),
        };
        let prepare_ms = ms(t);
        if backend == Backend::UffdWp && !prep.untracked.is_empty() {
            let mut payload = RangeList { count: prep.untracked.len() as u32, _pad: 0 }.as_bytes().to_vec();
            for (a, b) in &prep.untracked {
                payload.extend_from_slice(&a.to_le_bytes());
                payload.extend_from_slice(&b.to_le_bytes());
            }
            if let Err(e) = p.send(kind::REGISTER, &payload) {
                return (None, Err(format!("process {pid}: {e}")));
            }
            match p.recv(SUSPEND_TIMEOUT) {
                Some((kind::REGISTERED, r)) => {
                    let r = Registered::read_from(&r).unwrap_or_default();
                    tracing::debug!(pid, registered = r.registered, failed = r.failed, "write tracking registered");
                }
                _ => return (None, Err(format!("process {pid} did not answer the tracking registration"))),
            }
        }
        let register_ms = ms(t) - prepare_ms;
        let base = bases.get(&pid);
        let mut snapshot = None;
        if self.cfg.fork && p.hello.flags & proto::HELLO_NO_FORK == 0 {
            // SysV attaches stay out of the snapshot (it would count as
            // attached while it lives).
            let mut payload = RangeList { count: prep.no_fork.len() as u32, _pad: 0 }.as_bytes().to_vec();
            for (a, b) in &prep.no_fork {
                payload.extend_from_slice(&a.to_le_bytes());
                payload.extend_from_slice(&b.to_le_bytes());
            }
            if let Err(e) = p.send(kind::FORK, &payload) {
                return (None, Err(format!("process {pid}: {e}")));
            }
            match p.recv(SUSPEND_TIMEOUT) {
                Some((kind::FORKED, f)) => {
                    let f = Forked::read_from(&f).unwrap_or_default();
                    if f.pid > 0 {
                        snapshot = Some(f.pid);
                    } else {
                        tracing::warn!(pid, errno = f.errno, "fork of the snapshot failed; reading the process while it is stopped");
                    }
                }
                _ => return (None, Err(format!("process {pid} did not answer the snapshot request"))),
            }
        }
        let fork_ms = ms(t) - prepare_ms - register_ms;
        let timings = json!({"prepare_ms": prepare_ms, "register_ms": register_ms, "fork_ms": fork_ms});
        let stored = match snapshot {
            Some(child) => {
                // Shared memory is not snapshotted by fork, and a region
                // marked MADV_DONTFORK is missing from the child: those are
                // read now, while the process is stopped.
                procfs::maps(child).map_err(|e| e.to_string()).and_then(|m| {
                    let child_starts: HashSet<u64> = m.iter().map(|m| m.start).collect();
                    prep.store_memory(pid, |r| r.kind == RegionKind::SharedAnon || !child_starts.contains(&r.start), base, writer).map_err(|e| e.to_string())
                })
            }
            None => prep.store_memory(pid, |_| true, base, writer).map_err(|e| e.to_string()),
        };
        (Some(Work { proc_: p.clone(), prep: Some(prep), snapshot, timings }), stored)
    }

    #[allow(clippy::type_complexity, clippy::too_many_arguments)]
    fn phase_b(
        &self,
        writer: &Writer,
        generation: u64,
        work: &mut [Work],
        bases: &HashMap<i32, Base>,
        t0: Instant,
        downtime_ms: f64,
        suspend_ms: f64,
    ) -> Result<(GenerationInfo, Vec<(i32, u64, Base)>), String> {
        let mut entries = Vec::new();
        let mut logical = 0u64;
        let mut summary = Vec::new();
        let mut new_bases = Vec::new();
        let mut backends = Vec::new();
        for w in work.iter_mut() {
            let pid = w.proc_.hello.pid;
            let mut prep = w.prep.take().ok_or("internal: capture missing")?;
            if let Some(child) = w.snapshot {
                prep.store_memory(child, |_| true, bases.get(&pid), writer).map_err(|e| e.to_string())?;
                kill_snapshots(&[child]);
            }
            let backend = prep.backend;
            let (image, stats, base) = prep.finish(generation, writer).map_err(|e| e.to_string())?;
            logical += stats.logical_bytes;
            let bytes = serde_json::to_vec(&image).map_err(|e| e.to_string())?;
            let hash = writer.put_meta(&bytes).map_err(|e| e.to_string())?;
            summary.push(json!({"pid": image.pid, "host": image.host, "exe": image.exe, "comm": image.comm, "threads": image.threads.len(),
                                "logical_bytes": stats.logical_bytes, "read_bytes": stats.read_bytes, "dirty_tracking": backend.name(),
                                "forked": w.snapshot.is_some(), "stopped_work": w.timings}));
            if !backends.contains(&backend.name()) {
                backends.push(backend.name());
            }
            entries.push(ProcessEntry { pid: image.pid, host: image.host.clone(), exe: image.exe.clone(), image: hash });
            new_bases.push((pid, w.proc_.conn_id, base));
        }
        let manifest = GenerationManifest { version: IMAGE_VERSION, generation, processes: entries };
        let mbytes = serde_json::to_vec(&manifest).map_err(|e| e.to_string())?;
        let mhash = writer.put_meta(&mbytes).map_err(|e| e.to_string())?;
        let parent = self.store.latest().map_err(|e| e.to_string())?.map(|g| g.id);
        let g = writer
            .commit(NewGeneration {
                parent,
                created_ms: now_ms(),
                duration_ms: t0.elapsed().as_millis() as u64,
                nprocs: work.len() as u32,
                logical_bytes: logical,
                dirty_tracking: backends.join(","),
                manifest: mhash,
                info: json!({"processes": summary, "downtime_ms": downtime_ms, "suspend_ms": suspend_ms}),
            })
            .map_err(|e| e.to_string())?;
        if g.id != generation {
            tracing::warn!(expected = generation, got = g.id, "generation number moved");
        }
        Ok((g, new_bases))
    }

    /// Whether a process is reachable through this coordinator's `/proc`
    /// (same kernel, same PID namespace). Agents that do not say are.
    fn reaches(&self, h: &Hello) -> bool {
        let boot = |b: &[u8]| b.iter().take_while(|&&c| c != 0 && c != b'\n').copied().collect::<Vec<u8>>();
        (h.pidns == 0 || h.pidns == self.pidns) && (h.boot_id[0] == 0 || boot(&h.boot_id) == boot(self.boot_id.as_bytes()))
    }

    fn take_writer(&self) -> Result<Writer, String> {
        let deadline = Instant::now() + WRITER_WAIT;
        loop {
            match self.store.writer() {
                Ok(w) => return Ok(w),
                Err(ckpt_store::StoreError::Locked { .. }) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => return Err(e.to_string()),
            }
        }
    }

}

/// Fault injection for tests: when `$CKPT_TEST_HOLD/armed` exists once
/// every process is stopped, the coordinator removes it, creates
/// `$CKPT_TEST_HOLD/held` and waits (at most 60 s) for `$CKPT_TEST_HOLD/go`,
/// so that a test can kill a process at exactly this point of a checkpoint.
fn hold_for_tests() {
    let Some(dir) = std::env::var_os("CKPT_TEST_HOLD").map(std::path::PathBuf::from) else { return };
    if std::fs::remove_file(dir.join("armed")).is_err() {
        return;
    }
    let _ = std::fs::write(dir.join("held"), b"");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !dir.join("go").exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = std::fs::remove_file(dir.join("go"));
    let _ = std::fs::remove_file(dir.join("held"));
}

/// The hosts whose restart of a generation arrived, and when the barrier
/// opened.
type RestartBarrier = (HashSet<String>, Option<Instant>);

/// One process's part of a checkpoint in progress.
struct Work {
    proc_: Arc<Proc>,
    prep: Option<Prepared>,
    snapshot: Option<i32>,
    /// Where the stopped time went (phase A), for `ckpt log --json`.
    timings: Value,
}

fn kill_snapshots(pids: &[i32]) {
    for &pid in pids {
        // SAFETY: the snapshot child's pid, reported by its parent's agent.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Ends a round that failed: snapshots killed, every process resumed.
fn finish_round(stopped: &[(Arc<Proc>, AgentReport)], outcome: u32, generation: u64, snapshots: &[i32]) {
    kill_snapshots(snapshots);
    let resume = Resume { outcome, _pad: 0, generation };
    for (p, _) in stopped {
        let _ = p.send(kind::RESUME, resume.as_bytes());
    }
    for (p, _) in stopped {
        let _ = p.recv(Duration::from_secs(10));
    }
}

fn parse_suspended(hello: &Hello, payload: &[u8]) -> Option<AgentReport> {
    let s = Suspended::read_from(payload)?;
    let mut threads = Vec::with_capacity(s.nthreads as usize);
    let base = std::mem::size_of::<Suspended>();
    let ts = std::mem::size_of::<ThreadState>();
    for i in 0..s.nthreads as usize {
        threads.push(ThreadState::read_from(payload.get(base + i * ts..)?)?);
    }
    Some(AgentReport { hello: *hello, suspended: s, threads })
}
