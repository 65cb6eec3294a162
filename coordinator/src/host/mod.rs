//! Capture helpers: the coordinator's hands on machines it cannot read.
//!
//! A process on another machine (or in another PID namespace) joins the
//! coordinator like any other, but the coordinator cannot read it: its
//! `/proc`, its memory and its sockets belong to another kernel. `ckpt host
//! --coord ADDR`, run once on that machine, connects to the coordinator and
//! does that machine's share of every checkpoint ([`crate::machine`]):
//! it reads the stopped processes, sends only the blobs the store lacks
//! (compressed; the coordinator checks every hash before it writes), and
//! returns each process's image hash. The coordinator keeps the single
//! store writer and the all-or-nothing commit.
//!
//! The protocol, over the coordinator's address (Unix or TCP): every
//! message is a [`Header`] with [`MAGIC`], then a payload of a 4-byte JSON
//! length, the JSON and raw bytes.
//!
//! ```text
//! helper                                 coordinator
//!   HELLO {host, boot_id, pidns} ------------>
//!   <------------------------------- WELCOME {ok}
//!   <------------------------------- REQUEST {id, op, ...}   children | alive | phase_a | phase_b | end | kill
//!   AGENT {id, pid, kind} + payload -------->                (asks an agent; answered by AGENT_REPLY)
//!   MISSING {id} + hashes ------------------->                (answered by MISSING_REPLY: one byte per hash)
//!   PUT {kind, hash, ulen} + zstd frame ----->                (no answer; a bad blob fails the round)
//!   CAPTURED {id, req} ---------------------->                (phase_a: read, connections held)
//!   <------------------------------- RELEASE {id, go}         (every machine is read, or one failed)
//!   REPLY {id, ok, ...} --------------------->
//! ```

pub(crate) mod helper;
pub(crate) mod remote;

use std::io::{Read, Write};

use ckpt_wire::Pod;
use ckpt_wire::agent::Header;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use helper::{HostConfig, run_host};

use crate::machine::{RoundOpts, Target};

/// First word of every message of this protocol ("CKPH").
pub const MAGIC: u32 = 0x484b_5043;
/// Version of this protocol, carried in HELLO (2: the `stopped` op).
pub const VERSION: u32 = 2;

pub(crate) mod kind {
    pub const HELLO: u32 = 1;
    pub const WELCOME: u32 = 2;
    pub const REQUEST: u32 = 3;
    pub const REPLY: u32 = 4;
    pub const AGENT: u32 = 5;
    pub const AGENT_REPLY: u32 = 6;
    pub const MISSING: u32 = 7;
    pub const MISSING_REPLY: u32 = 8;
    pub const PUT: u32 = 9;
    /// Helper → coordinator during phase_a: this machine is read; its TCP
    /// connections wait in repair mode for RELEASE.
    pub const CAPTURED: u32 = 10;
    /// Coordinator → helper: every machine is read (go) or one failed.
    pub const RELEASE: u32 = 11;
}

/// Largest JSON part of a REQUEST or REPLY: a phase_a request carries the
/// reports of a machine's processes (a SUSPENDED of 4096 threads is
/// 530 KiB in hex; an ordinary process's a few KiB).
pub(crate) const MAX_ROUND_JSON: usize = 64 << 20;
/// Largest JSON part of the other messages (ids, a kind, a hash, an error).
pub(crate) const MAX_SMALL_JSON: usize = 64 << 10;
/// Most hashes in one MISSING lookup (the helper asks in batches).
pub(crate) const MAX_MISSING: usize = 1 << 20;
/// Largest blob a PUT carries, compressed or not (a chunk is at most
/// [`ckpt_store::MAX_CHUNK_SIZE`]; a metadata blob, a chunk list or an
/// image, may be larger).
pub(crate) const MAX_BLOB: usize = 256 << 20;
/// Most processes one request names.
pub(crate) const MAX_PROCS: usize = 1 << 16;

/// The largest JSON and data parts of a message of `kind`; None for a kind
/// this protocol does not have.
pub(crate) fn caps(k: u32) -> Option<(usize, usize)> {
    use ckpt_wire::agent::{MAX_PAYLOAD, MAX_REQUEST_PAYLOAD};
    Some(match k {
        kind::HELLO | kind::WELCOME | kind::CAPTURED | kind::RELEASE => (MAX_SMALL_JSON, 0),
        kind::REQUEST | kind::REPLY => (MAX_ROUND_JSON, 0),
        kind::AGENT => (MAX_SMALL_JSON, MAX_REQUEST_PAYLOAD),
        kind::AGENT_REPLY => (MAX_SMALL_JSON, MAX_PAYLOAD),
        kind::MISSING => (MAX_SMALL_JSON, MAX_MISSING * 32),
        kind::MISSING_REPLY => (MAX_SMALL_JSON, MAX_MISSING),
        kind::PUT => (MAX_SMALL_JSON, MAX_BLOB),
        _ => return None,
    })
}

/// One message: its kind, JSON part and raw part.
#[derive(Debug)]
pub(crate) struct Msg {
    pub kind: u32,
    pub json: Value,
    pub data: Vec<u8>,
}

/// What the coordinator asks a capture helper (a REQUEST's JSON part).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Request {
    pub id: u64,
    #[serde(flatten)]
    pub op: Op,
}

/// The operations of a REQUEST.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum Op {
    /// The live children of `parents` that are not in `known`.
    Children { parents: Vec<i32>, known: Vec<i32> },
    /// Whether `pid` lives.
    Alive { pid: i32 },
    /// Which of `pids` are stopped by job control (they are not asked to
    /// run their pre-checkpoint callbacks).
    Stopped { pids: Vec<i32> },
    /// The stopped phase of this machine's processes.
    PhaseA { opts: RoundOpts, targets: Vec<Target>, epoch: u64 },
    /// The running phase.
    PhaseB { generation: u64 },
    /// The round ended (committed or not).
    End { committed: bool },
    /// Kill these processes of the computation.
    Kill { pids: Vec<i32> },
    /// For this round, keep the checkpoint thread (`[pid, tid]`) of those
    /// of these processes that are stopped by job control running; an
    /// empty list lets the last ones stop again.
    Wake { targets: Vec<[i32; 2]> },
}

impl Op {
    /// Checks the values a well-formed request may still get wrong.
    pub fn validate(&self) -> Result<(), String> {
        let pids = |what: &str, v: &[i32]| {
            if v.len() > MAX_PROCS {
                return Err(format!("{what} lists {} processes (at most {MAX_PROCS})", v.len()));
            }
            match v.iter().find(|&&p| p <= 0) {
                Some(p) => Err(format!("{what} names pid {p}, not a process")),
                None => Ok(()),
            }
        };
        match self {
            Op::Children { parents, known } => pids("parents", parents).and(pids("known", known)),
            Op::Alive { pid } => pids("alive", &[*pid]),
            Op::Stopped { pids: p } => pids("stopped", p),
            Op::Kill { pids: p } => pids("kill", p),
            Op::Wake { targets } => pids("wake", &targets.iter().flatten().copied().collect::<Vec<_>>()),
            Op::PhaseA { opts, targets, .. } => {
                if targets.len() > MAX_PROCS {
                    return Err(format!("phase_a names {} processes (at most {MAX_PROCS})", targets.len()));
                }
                pids("phase_a", &targets.iter().map(|t| t.pid).collect::<Vec<_>>())?;
                if opts.chunk_size == 0 || !opts.chunk_size.is_multiple_of(4096) || opts.chunk_size > ckpt_store::MAX_CHUNK_SIZE {
                    return Err(format!("phase_a asks for chunks of {} bytes", opts.chunk_size));
                }
                if opts.externals.len() > crate::protocol::MAX_LIST {
                    return Err(format!("phase_a lists {} external fds", opts.externals.len()));
                }
                Ok(())
            }
            Op::PhaseB { .. } | Op::End { .. } => Ok(()),
        }
    }

    /// The request's name, as in `"op"`.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Children { .. } => "children",
            Op::Alive { .. } => "alive",
            Op::Stopped { .. } => "stopped",
            Op::PhaseA { .. } => "phase_a",
            Op::PhaseB { .. } => "phase_b",
            Op::End { .. } => "end",
            Op::Kill { .. } => "kill",
            Op::Wake { .. } => "wake",
        }
    }
}

pub(crate) fn write_msg(w: &mut impl Write, kind: u32, json: &Value, data: &[u8]) -> std::io::Result<()> {
    let j = serde_json::to_vec(json).map_err(std::io::Error::other)?;
    let len = 4 + j.len() + data.len();
    let mut buf = Vec::with_capacity(16 + len);
    let mut h = Header::new(kind, len);
    h.magic = MAGIC;
    buf.extend_from_slice(h.as_bytes());
    buf.extend_from_slice(&(j.len() as u32).to_le_bytes());
    buf.extend_from_slice(&j);
    buf.extend_from_slice(data);
    w.write_all(&buf)
}

/// Reads a message whose header's first word (`first`) was read already,
/// or a whole one when `first` is None. Its kind, then the length of its
/// JSON and data parts are checked against [`caps`] before anything is
/// allocated for them.
pub(crate) fn read_msg(r: &mut impl Read, first: Option<[u8; 4]>) -> std::io::Result<Msg> {
    let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("capture helper protocol: {what}"));
    let mut hb = [0u8; 16];
    match first {
        Some(f) => {
            hb[..4].copy_from_slice(&f);
            r.read_exact(&mut hb[4..])?;
        }
        None => r.read_exact(&mut hb)?,
    }
    let h = Header::read_from(&hb).ok_or_else(|| bad("short header".into()))?;
    let (max_json, max_data) = caps(h.kind).ok_or_else(|| bad(format!("unknown message kind {}", h.kind)))?;
    let len = h.payload_len(MAGIC, 4 + max_json + max_data).map_err(|e| bad(e.to_string()))?;
    if len < 4 {
        return Err(bad(format!("a message of kind {} of {len} bytes", h.kind)));
    }
    let mut jl = [0u8; 4];
    r.read_exact(&mut jl)?;
    let jl = u32::from_le_bytes(jl) as usize;
    if jl > max_json || jl > len - 4 {
        return Err(bad(format!("a JSON part of {jl} bytes in a message of kind {} of {len} (at most {max_json})", h.kind)));
    }
    let dl = len - 4 - jl;
    if dl > max_data {
        return Err(bad(format!("a data part of {dl} bytes in a message of kind {} (at most {max_data})", h.kind)));
    }
    let mut j = vec![0u8; jl];
    r.read_exact(&mut j)?;
    let json = serde_json::from_slice(&j).map_err(|e| bad(format!("bad JSON in a message of kind {}: {e}", h.kind)))?;
    let mut data = vec![0u8; dl];
    r.read_exact(&mut data)?;
    Ok(Msg { kind: h.kind, json, data })
}

/// This kernel's boot id.
pub(crate) fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default().trim().to_string()
}

/// The inode of this process's PID namespace.
pub(crate) fn pidns() -> u64 {
    std::fs::read_link("/proc/self/ns/pid")
        .ok()
        .and_then(|l| l.to_string_lossy().trim_start_matches("pid:[").trim_end_matches(']').parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn msg(k: u32, json: &Value, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        write_msg(&mut v, k, json, data).unwrap();
        v
    }

    #[test]
    fn message_parts_are_capped() {
        let m = read_msg(&mut &msg(kind::PUT, &serde_json::json!({"hash": "x"}), b"abc")[..], None).unwrap();
        assert_eq!((m.kind, m.data.as_slice()), (kind::PUT, &b"abc"[..]));
        // A data part on a message that has none.
        let e = read_msg(&mut &msg(kind::RELEASE, &serde_json::json!({}), b"abc")[..], None).unwrap_err();
        assert!(e.to_string().contains("at most"), "{e}");
        // A header claiming 4 GiB is refused before anything is read.
        let mut h = Header::new(kind::PUT, u32::MAX as usize);
        h.magic = MAGIC;
        let e = read_msg(&mut std::io::Read::chain(h.as_bytes(), std::io::repeat(0)), None).unwrap_err();
        assert!(e.to_string().contains("claiming 4294967295"), "{e}");
        // A JSON length past the message's end.
        let mut v = msg(kind::REPLY, &serde_json::json!({}), &[]);
        v[16..20].copy_from_slice(&1000u32.to_le_bytes());
        assert!(read_msg(&mut &v[..], None).is_err());
        let mut v = msg(kind::REPLY, &serde_json::json!({}), &[]);
        v[4..8].copy_from_slice(&77u32.to_le_bytes());
        assert!(read_msg(&mut &v[..], None).unwrap_err().to_string().contains("unknown message kind 77"));
    }

    #[test]
    fn requests_are_typed_and_checked() {
        let req: Request = serde_json::from_value(serde_json::json!({"id": 3, "op": "kill", "pids": [-1]})).unwrap();
        assert!(req.op.validate().unwrap_err().contains("pid -1"));
        let req: Request = serde_json::from_value(serde_json::json!({"id": 3, "op": "kill", "pids": [0, 5]})).unwrap();
        assert!(req.op.validate().is_err());
        assert!(serde_json::from_value::<Request>(serde_json::json!({"id": 3, "op": "phase_b"})).is_err(), "a missing generation must not default");
        assert!(serde_json::from_value::<Request>(serde_json::json!({"op": "end", "committed": true})).is_err(), "a missing id must not default");
        assert!(serde_json::from_value::<Request>(serde_json::json!({"id": 1, "op": "format"})).is_err());
        let req: Request = serde_json::from_value(serde_json::json!({"id": 9, "op": "alive", "pid": 12})).unwrap();
        assert!(matches!(req.op, Op::Alive { pid: 12 }) && req.id == 9);
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        let pids = || proptest::collection::vec(1..i32::MAX, 0..8);
        prop_oneof![
            (pids(), pids()).prop_map(|(parents, known)| Op::Children { parents, known }),
            (1..i32::MAX).prop_map(|pid| Op::Alive { pid }),
            any::<u64>().prop_map(|generation| Op::PhaseB { generation }),
            any::<bool>().prop_map(|committed| Op::End { committed }),
            pids().prop_map(|pids| Op::Kill { pids }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn valid_messages_round_trip(op in arb_op(), id in any::<u64>(), k in 1..=11u32, data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let json = serde_json::to_value(Request { id, op: op.clone() }).unwrap();
            let data = if caps(k).unwrap().1 == 0 { Vec::new() } else { data };
            let m = read_msg(&mut &msg(k, &json, &data)[..], None).unwrap();
            prop_assert_eq!(m.kind, k);
            prop_assert_eq!(&m.data, &data);
            let back: Request = serde_json::from_value(m.json).unwrap();
            prop_assert_eq!(back.id, id);
            prop_assert!(back.op.validate().is_ok());
            prop_assert_eq!(back.op.name(), op.name());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1024), magic in any::<bool>()) {
            let mut bytes = bytes;
            if magic && bytes.len() >= 4 {
                bytes[..4].copy_from_slice(&MAGIC.to_le_bytes());
            }
            if let Ok(m) = read_msg(&mut &bytes[..], None) {
                prop_assert!(m.data.len() <= caps(m.kind).unwrap().1);
                if let Ok(r) = serde_json::from_value::<Request>(m.json) {
                    let _ = r.op.validate();
                }
            }
        }

        #[test]
        fn mutated_messages_never_panic(op in arb_op(), at in any::<prop::sample::Index>(), byte in any::<u8>(), cut in any::<prop::sample::Index>()) {
            let mut v = msg(kind::REQUEST, &serde_json::to_value(Request { id: 1, op }).unwrap(), &[]);
            let i = at.index(v.len());
            v[i] = byte;
            let v = &v[..cut.index(v.len() + 1)];
            if let Ok(m) = read_msg(&mut &v[..], None) {
                prop_assert!(m.data.len() <= caps(m.kind).unwrap().1);
                if let Ok(r) = serde_json::from_value::<Request>(m.json) {
                    let _ = r.op.validate();
                }
            }
        }
    }
}
