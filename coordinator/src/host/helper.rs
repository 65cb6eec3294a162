//! `ckpt host`: the capture helper that runs on a machine the coordinator
//! cannot read (see the module above for the protocol).
//!
//! It must run in the PID namespace of the programs it serves (on a
//! machine of its own: just run it), as root or as the programs' user with
//! the right to ptrace them. It keeps, per process, what the last committed
//! capture left (the base of the next incremental capture) and the hashes
//! it knows the store holds; it never writes the store itself.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use ckpt_chunker::Hash;
use ckpt_engine::capture::Base;
use ckpt_store::{BlobKind, BlobSink};
use serde_json::{Value, json};

use super::{Msg, Op, Request, kind, read_msg, write_msg};
use crate::machine::{self, AgentLink, RoundOpts, Target, Work};
use crate::{Address, CoordError, Stream};

/// How `ckpt host` runs.
#[derive(Clone, Debug)]
pub struct HostConfig {
    /// The coordinator's address (normally `tcp:HOST:PORT`).
    pub coord: Address,
    /// The name this machine's processes give as their host (default: the
    /// host name); only shown in logs.
    pub name: Option<String>,
    /// Told once the coordinator has welcomed the helper (ckpt's namespace
    /// init starts the program only then).
    pub ready: Option<std::sync::mpsc::Sender<()>>,
}

/// How long the helper waits for a coordinator that does not answer yet.
const CONNECT_WAIT: Duration = Duration::from_secs(30);

/// Most hashes the helper remembers as stored before it starts over.
const MAX_KNOWN: usize = 4 << 20;

/// The connection to the coordinator, shared by the threads of a round.
struct Conn {
    w: Mutex<Stream>,
    pending: Mutex<HashMap<u64, Sender<Msg>>>,
    next: AtomicU64,
}

impl Conn {
    fn send(&self, kind: u32, json: &Value, data: &[u8]) -> Result<(), String> {
        write_msg(&mut *self.w.lock().unwrap(), kind, json, data).map_err(|e| format!("the coordinator connection broke: {e}"))
    }

    /// Sends a message that the coordinator answers, and waits for the answer.
    fn call(&self, kind: u32, mut json: Value, data: &[u8]) -> Result<Msg, String> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        json["id"] = json!(id);
        let (tx, rx) = channel();
        self.pending.lock().unwrap().insert(id, tx);
        self.send(kind, &json, data)?;
        rx.recv_timeout(machine::AGENT_TIMEOUT * 2).map_err(|_| "the coordinator did not answer".to_string())
    }
}

/// Asks agents through the coordinator (they are connected to it).
struct RemoteLink<'a>(&'a Conn);

impl AgentLink for RemoteLink<'_> {
    fn call(&self, pid: i32, k: u32, payload: &[u8]) -> Result<(u32, Vec<u8>), String> {
        let m = self.0.call(kind::AGENT, json!({"pid": pid, "kind": k}), payload)?;
        match m.json.get("ok").and_then(Value::as_bool) {
            Some(true) => match m.json.get("kind").and_then(Value::as_u64).and_then(|k| u32::try_from(k).ok()) {
                Some(k) => Ok((k, m.data)),
                None => Err(format!("the coordinator relayed an answer of process {pid} without a message kind")),
            },
            _ => Err(m.json.get("error").and_then(Value::as_str).unwrap_or("the agent did not answer").to_string()),
        }
    }
}

/// Blobs go to the coordinator, compressed here; only those the store
/// lacks. What is known is remembered across rounds (`stored`) only once
/// the round that sent or learnt it is committed.
struct RemoteSink<'a> {
    conn: &'a Conn,
    stored: &'a RwLock<HashSet<Hash>>,
    round: Mutex<HashSet<Hash>>,
}

impl RemoteSink<'_> {
    fn knows(&self, h: &Hash) -> bool {
        h.is_zero_chunk() || self.stored.read().unwrap().contains(h) || self.round.lock().unwrap().contains(h)
    }
}

fn sink_err(what: String) -> ckpt_store::StoreError {
    ckpt_store::StoreError::Invalid(what)
}

impl BlobSink for RemoteSink<'_> {
    fn known(&self, h: &Hash) -> bool {
        self.knows(h)
    }

    fn missing(&self, hashes: &[Hash]) -> ckpt_store::Result<Vec<bool>> {
        let mut out: Vec<bool> = hashes.iter().map(|h| !self.knows(h)).collect();
        let ask: Vec<usize> = (0..hashes.len()).filter(|&i| out[i]).collect();
        if ask.is_empty() {
            return Ok(out);
        }
        // In batches the coordinator accepts (super::MAX_MISSING hashes).
        for batch in ask.chunks(super::MAX_MISSING) {
            let bytes: Vec<u8> = batch.iter().flat_map(|&i| hashes[i].0).collect();
            let m = self.conn.call(kind::MISSING, json!({}), &bytes).map_err(sink_err)?;
            if m.data.len() != batch.len() {
                return Err(sink_err("the coordinator answered a store lookup with the wrong count".into()));
            }
            let mut round = self.round.lock().unwrap();
            for (&i, &gone) in batch.iter().zip(&m.data) {
                out[i] = gone != 0;
                if gone == 0 {
                    round.insert(hashes[i]);
                }
            }
        }
        Ok(out)
    }

    fn put(&self, k: BlobKind, h: Hash, data: &[u8]) -> ckpt_store::Result<bool> {
        if self.knows(&h) {
            return Ok(false);
        }
        let compressed = ckpt_chunker::compress(data, ckpt_chunker::DEFAULT_LEVEL);
        self.conn
            .send(kind::PUT, &json!({"kind": k as u8, "hash": h.to_string(), "ulen": data.len()}), &compressed)
            .map_err(sink_err)?;
        self.round.lock().unwrap().insert(h);
        Ok(true)
    }
}

/// What the helper keeps between requests.
#[derive(Default)]
struct State {
    /// Per pid: (agent connection, what its last committed capture left).
    bases: HashMap<i32, (u64, Base)>,
    /// The bases the round in progress started from.
    round_bases: HashMap<i32, Base>,
    work: Vec<Work>,
    /// New bases, installed when the coordinator says the round committed.
    new_bases: Vec<(i32, u64, Base)>,
    /// Hashes the store surely holds (as of `epoch`).
    stored: RwLock<HashSet<Hash>>,
    /// Hashes sent or learnt in the round in progress.
    round_known: HashSet<Hash>,
    /// The coordinator's count of times blobs may have left the store.
    epoch: u64,
    /// Pidfds of the processes of the last round.
    served: HashMap<i32, std::os::fd::OwnedFd>,
    /// Processes a Kill request names, killed once it is answered.
    kills: Vec<(i32, std::os::fd::OwnedFd)>,
    /// Checkpoint threads of job-stopped processes kept running this round
    /// (from Wake to End: phase A starts a round's state afresh, not these).
    wakers: Vec<ckpt_engine::jobstop::Waker>,
}

/// Whether `pid` has the ckpt agent loaded (a process of some computation).
fn runs_agent(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map(|m| m.lines().any(|l| l.ends_with("/libckpt_preload.so") || l.ends_with("/libckpt_preload.so (deleted)")))
        .unwrap_or(false)
}

impl State {
    fn drop_round(&mut self) {
        machine::kill_all(&self.work.iter().filter_map(|w| w.snapshot).collect::<Vec<_>>());
        self.work.clear();
        self.round_bases.clear();
        self.new_bases.clear();
        self.round_known.clear();
    }

    fn handle(&mut self, conn: &Conn, req: &Request) -> Value {
        if let Err(e) = req.op.validate() {
            tracing::warn!("refused a malformed {} request from the coordinator: {e}", req.op.name());
            return json!({"ok": false, "error": format!("malformed {} request: {e}", req.op.name())});
        }
        match &req.op {
            Op::Children { parents, known } => {
                let known: HashSet<i32> = known.iter().copied().collect();
                json!({"ok": true, "strays": machine::strays(parents, &known)})
            }
            Op::Alive { pid } => json!({"ok": true, "alive": machine::alive(*pid)}),
            Op::Stopped { pids } => json!({"ok": true, "stopped": pids.iter().copied().filter(|&p| ckpt_engine::jobstop::is_stopped(p)).collect::<Vec<i32>>()}),
            Op::PhaseA { opts, targets, epoch } => self.phase_a(conn, req.id, opts, targets, *epoch),
            Op::PhaseB { generation } => self.phase_b(conn, *generation),
            Op::End { committed } => {
                if *committed {
                    for (pid, c, b) in std::mem::take(&mut self.new_bases) {
                        self.bases.insert(pid, (c, b));
                    }
                    let mut stored = self.stored.write().unwrap();
                    if stored.len() > MAX_KNOWN {
                        stored.clear();
                    }
                    stored.extend(self.round_known.drain());
                }
                self.drop_round();
                self.wakers.clear();
                json!({"ok": true})
            }
            Op::Wake { targets } => {
                self.wakers.clear();
                let mut refused = Vec::new();
                for &[pid, tid] in targets {
                    if !ckpt_engine::jobstop::is_stopped(pid) {
                        continue;
                    }
                    // Only a thread of a process of a computation.
                    if !runs_agent(pid) || !std::path::Path::new(&format!("/proc/{pid}/task/{tid}")).exists() {
                        refused.push(format!("process {pid} (thread {tid}) is not a process of a computation this helper serves"));
                        continue;
                    }
                    match ckpt_engine::jobstop::Waker::start(pid, tid) {
                        Ok(w) => self.wakers.push(w),
                        Err(e) => refused.push(e),
                    }
                }
                if refused.is_empty() {
                    json!({"ok": true, "woken": self.wakers.len()})
                } else {
                    self.wakers.clear();
                    json!({"ok": false, "error": refused.join("; ")})
                }
            }
            Op::Kill { pids } => {
                let refused: Vec<String> = pids.iter().filter_map(|&pid| self.kill(pid).err()).collect();
                if refused.is_empty() { json!({"ok": true}) } else { json!({"ok": false, "error": refused.join("; ")}) }
            }
        }
    }

    /// SIGKILL to `pid`, only if this helper serves it: a process named in
    /// its last round (held by a pidfd since), or one that runs the ckpt
    /// agent. Never any other process, never pid <= 0, never itself.
    fn kill(&mut self, pid: i32) -> Result<(), String> {
        let refuse = |why: &str| Err(format!("process {pid} {why}: this helper kills only the processes of the computation it serves"));
        if pid <= 1 || pid as u32 == std::process::id() {
            return refuse("is not a process of a computation");
        }
        let pidfd = match self.served.get(&pid) {
            Some(fd) => fd.try_clone().map_err(|e| format!("process {pid}: {e}"))?,
            None => {
                let Some(p) = rustix::process::Pid::from_raw(pid) else { return refuse("is not a process") };
                let fd = match rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()) {
                    Ok(fd) => fd,
                    Err(rustix::io::Errno::SRCH) => return Ok(()), // gone already
                    Err(e) => return Err(format!("process {pid}: pidfd_open: {e}")),
                };
                // The pidfd holds the process: what is checked now is what
                // the signal reaches.
                if !runs_agent(pid) {
                    return refuse("does not run the ckpt agent");
                }
                fd
            }
        };
        // Sent once the answer is out (`send_kills`): a helper in ckpt's
        // init ends with the last process of its namespaces, and its
        // answer must not end with it.
        self.kills.push((pid, pidfd));
        Ok(())
    }

    /// SIGKILL to every process a Kill request named (after its answer).
    fn send_kills(&mut self) {
        for (pid, pidfd) in self.kills.drain(..) {
            match rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::KILL) {
                Ok(()) | Err(rustix::io::Errno::SRCH) => {}
                Err(e) => tracing::warn!("process {pid}: kill: {e}"),
            }
        }
    }

    fn phase_a(&mut self, conn: &Conn, req_id: u64, opts: &RoundOpts, targets: &[Target], epoch: u64) -> Value {
        self.drop_round();
        if epoch != self.epoch {
            // Blobs may have left the store (gc): forget what it held.
            self.stored.write().unwrap().clear();
            self.epoch = epoch;
        }
        // The processes of this round are the ones a kill may reach: held
        // by pidfds from now on, so that a pid reused later is not.
        self.served.clear();
        let mut reports = Vec::new();
        for t in targets {
            match t.report() {
                Ok(r) => reports.push((t.clone(), r)),
                Err(e) => return json!({"ok": false, "error": e}),
            }
            if let Some(fd) = rustix::process::Pid::from_raw(t.pid).and_then(|p| rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok()) {
                self.served.insert(t.pid, fd);
            }
            if let Some((c, b)) = self.bases.remove(&t.pid)
                && c == t.conn
            {
                self.round_bases.insert(t.pid, b);
            }
        }
        let sink = RemoteSink { conn, stored: &self.stored, round: Mutex::new(HashSet::new()) };
        // The coordinator says when every machine is read.
        let gate = || match conn.call(kind::CAPTURED, json!({"req": req_id}), &[]) {
            Ok(m) => m.json.get("go").and_then(Value::as_bool).unwrap_or(false),
            Err(e) => {
                tracing::warn!("{e}");
                false
            }
        };
        let (work, result) = machine::phase_a(&reports, &self.round_bases, &sink, &RemoteLink(conn), opts, &gate);
        self.work = work;
        self.round_known = sink.round.into_inner().unwrap();
        match result {
            Ok(ends) => json!({"ok": true, "ends": ends}),
            Err((e, retry)) => json!({"ok": false, "error": e, "retry": retry}),
        }
    }

    fn phase_b(&mut self, conn: &Conn, generation: u64) -> Value {
        let sink = RemoteSink { conn, stored: &self.stored, round: Mutex::new(std::mem::take(&mut self.round_known)) };
        let result = machine::phase_b(&mut self.work, &self.round_bases, &sink, generation);
        self.round_known = sink.round.into_inner().unwrap();
        match result {
            Ok(done) => {
                // What the coordinator checks of its own machine's images
                // before the commit and needs all of them for (they stay here).
                let shared = ckpt_engine::restore::shared_across_hosts(done.iter().filter_map(|(c, _)| c.image.as_deref()));
                if !shared.is_empty() {
                    return json!({"ok": false, "error": ckpt_engine::EngineError::Unrestorable { problems: shared }.to_string()});
                }
                let mut captured = Vec::new();
                for (c, base) in done {
                    self.new_bases.push((c.entry.pid, c.conn, base));
                    captured.push(c);
                }
                json!({"ok": true, "captured": captured})
            }
            Err(e) => json!({"ok": false, "error": e}),
        }
    }
}

/// Runs the capture helper until the coordinator goes away.
pub fn run_host(cfg: HostConfig) -> Result<(), CoordError> {
    let addr = cfg.coord.to_string();
    // A helper started before its coordinator (at boot, say) waits for it.
    let deadline = std::time::Instant::now() + CONNECT_WAIT;
    let stream = loop {
        match cfg.coord.connect(Duration::from_secs(10)) {
            Ok(s) => break s,
            Err(e) if std::time::Instant::now() < deadline && matches!(e.kind(), std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound) => {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(crate::client::connect_error(&cfg.coord, e)),
        }
    };
    stream.set_read_timeout(None).map_err(|e| CoordError::Protocol { addr: addr.clone(), source: e })?;
    let proto = |e: std::io::Error| CoordError::Protocol { addr: addr.clone(), source: e };
    let name = cfg.name.clone().unwrap_or_else(crate::server::hostname);
    let mut reader = stream.try_clone().map_err(proto)?;
    let conn = Arc::new(Conn { w: Mutex::new(stream), pending: Mutex::new(HashMap::new()), next: AtomicU64::new(1) });
    conn.send(kind::HELLO, &json!({"version": super::VERSION, "host": name, "boot_id": super::boot_id(), "pidns": super::pidns()}), &[])
        .map_err(|e| CoordError::Protocol { addr: addr.clone(), source: std::io::Error::other(e) })?;
    let welcome = read_msg(&mut reader, None).map_err(proto)?;
    if welcome.kind != kind::WELCOME || welcome.json.get("ok").and_then(Value::as_bool) != Some(true) {
        let why = welcome.json.get("error").and_then(Value::as_str).unwrap_or("no reason given");
        return Err(CoordError::Refused(format!("the coordinator at {addr} refused this capture helper: {why}")));
    }
    tracing::info!(coordinator = %addr, host = %name, "capture helper serving this machine's processes");
    if let Some(ready) = &cfg.ready {
        let _ = ready.send(());
    }

    // Requests are served one at a time, off the reading thread (which must
    // keep reading the answers a request in progress waits for).
    let (req_tx, req_rx) = channel::<Request>();
    let worker_conn = conn.clone();
    let worker = std::thread::spawn(move || {
        let mut state = State::default();
        for req in req_rx {
            let mut answer = state.handle(&worker_conn, &req);
            answer["id"] = json!(req.id);
            let sent = worker_conn.send(kind::REPLY, &answer, &[]);
            state.send_kills();
            if let Err(e) = sent {
                tracing::warn!("{e}");
                break;
            }
        }
        state.drop_round();
        state.wakers.clear();
    });
    let result = loop {
        let m = match read_msg(&mut reader, None) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(proto(e)),
        };
        match m.kind {
            kind::REQUEST => match serde_json::from_value::<Request>(m.json.clone()) {
                Ok(req) => {
                    if req_tx.send(req).is_err() {
                        break Ok(());
                    }
                }
                Err(e) => {
                    // Answered at once (the coordinator would wait for it),
                    // and the connection goes on.
                    tracing::warn!("refused a malformed request from the coordinator: {e}");
                    let id = m.json.get("id").and_then(Value::as_u64);
                    let answer = json!({"id": id, "ok": false, "error": format!("malformed request ({e}): run the same ckpt on every host")});
                    if let Err(e) = conn.send(kind::REPLY, &answer, &[]) {
                        tracing::warn!("{e}");
                        break Ok(());
                    }
                }
            },
            kind::AGENT_REPLY | kind::MISSING_REPLY | kind::RELEASE => {
                let id = m.json.get("id").and_then(Value::as_u64).unwrap_or(0);
                if let Some(tx) = conn.pending.lock().unwrap().remove(&id) {
                    let _ = tx.send(m);
                }
            }
            other => tracing::warn!(kind = other, "unexpected message from the coordinator"),
        }
    };
    drop(req_tx);
    conn.pending.lock().unwrap().clear();
    let _ = worker.join();
    tracing::info!(coordinator = %addr, "the coordinator went away; capture helper stops");
    result
}
