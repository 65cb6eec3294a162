//! The coordinator's end of a capture helper's connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ckpt_chunker::Hash;
use ckpt_store::{BlobKind, Writer};
use serde_json::{Value, json};

use super::{MAX_BLOB, Msg, Op, Request, kind, write_msg};
use crate::Stream;

/// A connected capture helper: the machine it serves and the round it
/// takes part in.
pub(crate) struct RemoteHost {
    /// [`crate::machine::machine_key`] of its machine.
    pub key: u64,
    /// The name it gave (its host name).
    pub name: String,
    pub conn_id: u64,
    w: Mutex<Stream>,
    pending: Mutex<HashMap<u64, Sender<Msg>>>,
    next: AtomicU64,
    closed: AtomicBool,
    /// The store writer of the round in progress: blobs arrive while the
    /// helper works on phase A and B.
    round: Mutex<Option<Arc<Writer>>>,
    /// The first blob of the round that could not be stored.
    put_error: Mutex<Option<String>>,
}

impl RemoteHost {
    pub fn new(key: u64, name: String, conn_id: u64, w: Stream) -> RemoteHost {
        RemoteHost {
            key,
            name,
            conn_id,
            w: Mutex::new(w),
            pending: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            closed: AtomicBool::new(false),
            round: Mutex::new(None),
            put_error: Mutex::new(None),
        }
    }

    pub fn send(&self, kind: u32, json: &Value, data: &[u8]) -> std::io::Result<()> {
        write_msg(&mut *self.w.lock().unwrap(), kind, json, data)
    }

    /// Sends request `op` and waits up to `timeout` for the answer,
    /// whatever it says.
    pub fn request(&self, op: Op, timeout: Duration) -> Result<Value, String> {
        self.exchange(op, None, timeout)
    }

    /// Sends a phase_a request and waits for its answer; when the helper
    /// says its machine is read (CAPTURED), waits at `gate` and tells it
    /// whether to go on.
    pub fn phase_a(&self, op: Op, gate: &crate::machine::Gate, timeout: Duration) -> Result<Value, String> {
        self.exchange(op, Some(gate), timeout)
    }

    fn exchange(&self, op: Op, gate: Option<&crate::machine::Gate>, timeout: Duration) -> Result<Value, String> {
        let gone = || format!("the capture helper of host {} went away (is `ckpt host` still running there?)", self.name);
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let req = serde_json::to_value(Request { id, op }).map_err(|e| format!("internal: a helper request does not serialize: {e}"))?;
        let (tx, rx) = channel();
        self.pending.lock().unwrap().insert(id, tx);
        let mut arrived = false;
        let result = if self.closed.load(Ordering::Acquire) || self.send(kind::REQUEST, &req, &[]).is_err() {
            Err(gone())
        } else {
            loop {
                match rx.recv_timeout(timeout) {
                    Ok(m) if m.kind == kind::CAPTURED => {
                        arrived = true;
                        let go = gate.is_some_and(|g| g.arrive());
                        let _ = self.send(kind::RELEASE, &json!({"id": m.json.get("id"), "go": go}), &[]);
                    }
                    Ok(m) => break Ok(m.json),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                        break Err(format!("the capture helper of host {} did not answer within {} s", self.name, timeout.as_secs()));
                    }
                    Err(_) => break Err(gone()),
                }
            }
        };
        self.pending.lock().unwrap().remove(&id);
        if let (Some(g), false) = (gate, arrived) {
            g.fail();
        }
        result
    }

    /// Sends `req` and turns an answer that is not ok into an error.
    pub fn call(&self, op: Op, timeout: Duration) -> Result<Value, String> {
        let a = self.request(op, timeout)?;
        if a.get("ok").and_then(Value::as_bool) == Some(true) {
            Ok(a)
        } else {
            Err(format!("host {}: {}", self.name, a.get("error").and_then(Value::as_str).unwrap_or("refused without a reason")))
        }
    }

    /// Starts a round: blobs sent from now on go to `writer`.
    pub fn begin(&self, writer: Arc<Writer>) {
        *self.round.lock().unwrap() = Some(writer);
        *self.put_error.lock().unwrap() = None;
    }

    /// Ends the round's blob traffic; the first error a blob met, if any.
    pub fn end(&self) -> Option<String> {
        *self.round.lock().unwrap() = None;
        self.put_error.lock().unwrap().take()
    }

    /// The first blob error of the round so far.
    pub fn blob_error(&self) -> Option<String> {
        self.put_error.lock().unwrap().clone()
    }

    /// Handles one message from the helper other than an agent request.
    pub fn on_message(&self, m: Msg) {
        match m.kind {
            kind::REPLY => {
                let id = m.json.get("id").and_then(Value::as_u64).unwrap_or(0);
                if let Some(tx) = self.pending.lock().unwrap().remove(&id) {
                    let _ = tx.send(m);
                }
            }
            kind::CAPTURED => {
                // To the phase_a request it belongs to, which stays pending.
                let req = m.json.get("req").and_then(Value::as_u64).unwrap_or(0);
                let tx = self.pending.lock().unwrap().get(&req).cloned();
                match tx {
                    Some(tx) => {
                        let _ = tx.send(m);
                    }
                    None => {
                        let _ = self.send(kind::RELEASE, &json!({"id": m.json.get("id"), "go": false}), &[]);
                    }
                }
            }
            kind::PUT => {
                let writer = self.round.lock().unwrap().clone();
                let result = match writer {
                    None => Err("a blob arrived outside a checkpoint".to_string()),
                    Some(w) => {
                        let hash = m.json.get("hash").and_then(Value::as_str).and_then(|h| h.parse::<Hash>().ok());
                        let k = m.json.get("kind").and_then(Value::as_u64).and_then(|k| BlobKind::from_u8(k as u8));
                        let ulen = m.json.get("ulen").and_then(Value::as_u64).filter(|&u| u <= MAX_BLOB as u64).map(|u| u as u32);
                        match (hash, k, ulen) {
                            (Some(h), Some(k), Some(ulen)) => w.put_compressed(k, h, &m.data, ulen).map(|_| ()).map_err(|e| e.to_string()),
                            _ => Err("a malformed blob".to_string()),
                        }
                    }
                };
                if let Err(e) = result {
                    let mut first = self.put_error.lock().unwrap();
                    if first.is_none() {
                        tracing::warn!(host = %self.name, "blob from the capture helper not stored: {e}");
                        *first = Some(format!("host {}: {e}", self.name));
                    }
                }
            }
            kind::MISSING => {
                if !m.data.len().is_multiple_of(32) {
                    tracing::warn!(host = %self.name, bytes = m.data.len(), "a store lookup that is not a list of hashes");
                    self.put_error.lock().unwrap().get_or_insert_with(|| format!("host {}: a store lookup of {} bytes, not a list of hashes", self.name, m.data.len()));
                }
                let writer = self.round.lock().unwrap().clone();
                let answer: Vec<u8> = m
                    .data
                    .chunks_exact(32)
                    .map(|c| {
                        let h = Hash(c.try_into().expect("32 bytes"));
                        u8::from(!writer.as_ref().is_some_and(|w| w.known(&h)))
                    })
                    .collect();
                let _ = self.send(kind::MISSING_REPLY, &json!({"id": m.json.get("id")}), &answer);
            }
            other => tracing::warn!(host = %self.name, kind = other, "unexpected message from a capture helper"),
        }
    }

    /// The connection ended: every request waiting fails.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.pending.lock().unwrap().clear();
        self.w.lock().unwrap().shutdown();
    }
}
