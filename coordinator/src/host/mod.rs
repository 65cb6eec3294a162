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
use serde_json::Value;

pub use helper::{HostConfig, run_host};

/// First word of every message of this protocol ("CKPH").
pub const MAGIC: u32 = 0x484b_5043;
/// Version of this protocol, carried in HELLO.
pub const VERSION: u32 = 1;

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

/// Largest message accepted (a PUT carries one compressed chunk, a REQUEST
/// the reports of a machine's processes).
const MAX_MESSAGE: usize = 256 << 20;

/// One message: its kind, JSON part and raw part.
#[derive(Debug)]
pub(crate) struct Msg {
    pub kind: u32,
    pub json: Value,
    pub data: Vec<u8>,
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
/// or a whole one when `first` is None.
pub(crate) fn read_msg(r: &mut impl Read, first: Option<[u8; 4]>) -> std::io::Result<Msg> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("capture helper protocol: {what}"));
    let mut hb = [0u8; 16];
    match first {
        Some(f) => {
            hb[..4].copy_from_slice(&f);
            r.read_exact(&mut hb[4..])?;
        }
        None => r.read_exact(&mut hb)?,
    }
    let h = Header::read_from(&hb).ok_or_else(|| bad("short header"))?;
    if h.magic != MAGIC {
        return Err(bad("bad magic"));
    }
    let len = h.len as usize;
    if !(4..=MAX_MESSAGE).contains(&len) {
        return Err(bad("bad length"));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    let jl = u32::from_le_bytes(payload[..4].try_into().expect("4 bytes")) as usize;
    if 4 + jl > len {
        return Err(bad("bad JSON length"));
    }
    let json = serde_json::from_slice(&payload[4..4 + jl]).map_err(|_| bad("bad JSON"))?;
    let data = payload[4 + jl..].to_vec();
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
