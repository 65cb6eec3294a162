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

use super::{Msg, kind, read_msg, write_msg};
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
            Some(true) => Ok((m.json.get("kind").and_then(Value::as_u64).unwrap_or(0) as u32, m.data)),
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
        let bytes: Vec<u8> = ask.iter().flat_map(|&i| hashes[i].0).collect();
        let m = self.conn.call(kind::MISSING, json!({}), &bytes).map_err(sink_err)?;
        if m.data.len() != ask.len() {
            return Err(sink_err("the coordinator answered a store lookup with the wrong count".into()));
        }
        let mut round = self.round.lock().unwrap();
        for (&i, &gone) in ask.iter().zip(&m.data) {
            out[i] = gone != 0;
            if gone == 0 {
                round.insert(hashes[i]);
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
}

impl State {
    fn drop_round(&mut self) {
        machine::kill_all(&self.work.iter().filter_map(|w| w.snapshot).collect::<Vec<_>>());
        self.work.clear();
        self.round_bases.clear();
        self.new_bases.clear();
        self.round_known.clear();
    }

    fn handle(&mut self, conn: &Conn, req: &Value) -> Value {
        let op = req.get("op").and_then(Value::as_str).unwrap_or("");
        match op {
            "children" => {
                let ints = |k: &str| -> Vec<i32> { req.get(k).and_then(Value::as_array).into_iter().flatten().filter_map(|v| v.as_i64().map(|v| v as i32)).collect() };
                let known: HashSet<i32> = ints("known").into_iter().collect();
                json!({"ok": true, "strays": machine::strays(&ints("parents"), &known)})
            }
            "alive" => json!({"ok": true, "alive": machine::alive(req.get("pid").and_then(Value::as_i64).unwrap_or(0) as i32)}),
            "phase_a" => self.phase_a(conn, req),
            "phase_b" => self.phase_b(conn, req),
            "end" => {
                let committed = req.get("committed").and_then(Value::as_bool).unwrap_or(false);
                if committed {
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
                json!({"ok": true})
            }
            "kill" => {
                let pids: Vec<i32> = req.get("pids").and_then(Value::as_array).into_iter().flatten().filter_map(|v| v.as_i64().map(|v| v as i32)).collect();
                machine::kill_all(&pids);
                json!({"ok": true})
            }
            other => json!({"ok": false, "error": format!("unknown request {other:?} (the coordinator is newer than this `ckpt host`)")}),
        }
    }

    fn phase_a(&mut self, conn: &Conn, req: &Value) -> Value {
        self.drop_round();
        let parsed = (|| -> Result<(RoundOpts, Vec<Target>, u64), String> {
            let opts = serde_json::from_value(req.get("opts").cloned().unwrap_or_default()).map_err(|e| e.to_string())?;
            let targets = serde_json::from_value(req.get("targets").cloned().unwrap_or_default()).map_err(|e| e.to_string())?;
            Ok((opts, targets, req.get("epoch").and_then(Value::as_u64).unwrap_or(0)))
        })();
        let (opts, targets, epoch) = match parsed {
            Ok(x) => x,
            Err(e) => return json!({"ok": false, "error": format!("malformed phase_a request: {e}")}),
        };
        if epoch != self.epoch {
            // Blobs may have left the store (gc): forget what it held.
            self.stored.write().unwrap().clear();
            self.epoch = epoch;
        }
        let mut reports = Vec::new();
        for t in targets {
            match t.report() {
                Ok(r) => reports.push((t, r)),
                Err(e) => return json!({"ok": false, "error": e}),
            }
            let (t, _) = reports.last().expect("pushed");
            if let Some((c, b)) = self.bases.remove(&t.pid)
                && c == t.conn
            {
                self.round_bases.insert(t.pid, b);
            }
        }
        let sink = RemoteSink { conn, stored: &self.stored, round: Mutex::new(HashSet::new()) };
        // The coordinator says when every machine is read.
        let req_id = req.get("id").cloned().unwrap_or(Value::Null);
        let gate = || match conn.call(kind::CAPTURED, json!({"req": req_id}), &[]) {
            Ok(m) => m.json.get("go").and_then(Value::as_bool).unwrap_or(false),
            Err(e) => {
                tracing::warn!("{e}");
                false
            }
        };
        let (work, result) = machine::phase_a(&reports, &self.round_bases, &sink, &RemoteLink(conn), &opts, &gate);
        self.work = work;
        self.round_known = sink.round.into_inner().unwrap();
        match result {
            Ok(ends) => json!({"ok": true, "ends": ends}),
            Err((e, retry)) => json!({"ok": false, "error": e, "retry": retry}),
        }
    }

    fn phase_b(&mut self, conn: &Conn, req: &Value) -> Value {
        let generation = req.get("generation").and_then(Value::as_u64).unwrap_or(0);
        let sink = RemoteSink { conn, stored: &self.stored, round: Mutex::new(std::mem::take(&mut self.round_known)) };
        let result = machine::phase_b(&mut self.work, &self.round_bases, &sink, generation);
        self.round_known = sink.round.into_inner().unwrap();
        match result {
            Ok(done) => {
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

    // Requests are served one at a time, off the reading thread (which must
    // keep reading the answers a request in progress waits for).
    let (req_tx, req_rx) = channel::<Value>();
    let worker_conn = conn.clone();
    let worker = std::thread::spawn(move || {
        let mut state = State::default();
        for req in req_rx {
            let mut answer = state.handle(&worker_conn, &req);
            answer["id"] = req.get("id").cloned().unwrap_or(Value::Null);
            if let Err(e) = worker_conn.send(kind::REPLY, &answer, &[]) {
                tracing::warn!("{e}");
                break;
            }
        }
        state.drop_round();
    });
    let result = loop {
        let m = match read_msg(&mut reader, None) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(proto(e)),
        };
        match m.kind {
            kind::REQUEST => {
                if req_tx.send(m.json).is_err() {
                    break Ok(());
                }
            }
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
