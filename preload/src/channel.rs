//! The agent's end of the secure channel to a coordinator over TCP (the
//! protocol is `ckpt_coordinator::channel`'s: a Noise `NNpsk0` handshake
//! proving the membership key of [`ENV_AGENT_KEY`], then frames of a 2-byte
//! big-endian length and a ChaCha20-Poly1305 sealing under a counter nonce).
//!
//! Where allocation is allowed and where it is not:
//!
//! * The handshake runs with `snow` in the library constructor, or in a
//!   forked child before `fork` returns (glibc has reset its locks there):
//!   it may allocate. It ends with the two transport keys, which go to
//!   static storage ([`STATE`]); the handshake's objects are dropped.
//! * The transport (the checkpoint exchange, while the program's other
//!   threads are stopped, maybe holding malloc's lock) never allocates and
//!   takes no lock: it seals and opens in place in two static frame buffers
//!   with the `chacha20poly1305` crate (the cipher `snow` itself uses, with
//!   Noise's nonce layout: 4 zero bytes, the counter little-endian), and
//!   only the checkpoint thread touches them.
//! * After a restart the restored agent does no handshake at all: the
//!   restart driver (`ckpt restart`) ran it with the coordinator when it
//!   made the connection, as this agent would have, and wrote the transport
//!   keys into the agent's [`RestartBlock`] (just after the restart word,
//!   before the word itself) with `process_vm_writev`. The restored agent
//!   takes them, wipes the block and goes on at nonce 0; it never waits on
//!   the network with a half-built state, and a driver that handed no keys
//!   leaves it a plain (Unix) connection.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU64, Ordering};

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{ChaCha20Poly1305, KeyInit, Nonce, Tag};
use ckpt_wire::agent::ENV_AGENT_KEY;

use crate::sys;

const PATTERN: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
/// Preamble of an agent's connection: "CKPTNZ", channel version 1, role 2
/// (agent).
const PREAMBLE: [u8; 8] = [b'C', b'K', b'P', b'T', b'N', b'Z', 1, 2];
/// The prologue of the agent role, version 1.
const PROLOGUE: &[u8; 24] = b"ckpt secure channel v1r2";
const MAX_FRAME: usize = 65535;
const TAG: usize = 16;
const MAX_PLAIN: usize = MAX_FRAME - TAG;

/// The restart word and, after it, what the restart driver hands a
/// restored agent. The driver writes `chan_gen` and the keys, then the
/// word; `chan_gen` equal to the word means the keys are for this restart.
#[repr(C)]
pub struct RestartBlock {
    pub word: AtomicU64,
    pub chan_gen: AtomicU64,
    keys: UnsafeCell<[u8; 64]>,
    /// The SysV semaphore undo adjustments of this process
    /// (`crate::interpose`), at `ckpt_wire::agent::SEM_UNDO_OFFSET`.
    pub sem_undo: UnsafeCell<ckpt_wire::agent::SemUndoTable>,
    /// Nonzero while a lazy restart still fills this process's memory
    /// (`ckpt_wire::agent::LAZY_OFFSET`): written by the restart driver.
    pub lazy: AtomicU64,
}
const _: () = assert!(core::mem::offset_of!(RestartBlock, sem_undo) == ckpt_wire::agent::SEM_UNDO_OFFSET as usize);
const _: () = assert!(core::mem::offset_of!(RestartBlock, lazy) == ckpt_wire::agent::LAZY_OFFSET as usize);

// SAFETY: `keys` is written only by the restart driver (from outside,
// while the process does not run agent code) and read and wiped only by the
// checkpoint thread; `sem_undo` only under `interpose`'s lock with signals
// blocked, or from outside while the process is stopped.
unsafe impl Sync for RestartBlock {}

impl RestartBlock {
    pub const fn new() -> RestartBlock {
        RestartBlock { word: AtomicU64::new(0), chan_gen: AtomicU64::new(0), keys: UnsafeCell::new([0; 64]), sem_undo: UnsafeCell::new(ckpt_wire::agent::SemUndoTable { overflow: 0, _pad: 0, slots: [ckpt_wire::agent::SemUndoSlot { semid: 0, semnum: 0, adj: 0, used: 0, ctime: 0 }; ckpt_wire::agent::SEM_UNDO_MAX] }), lazy: AtomicU64::new(0) }
    }
}

struct State {
    on: bool,
    tx_key: [u8; 32],
    tx_n: u64,
    rx_key: [u8; 32],
    rx_n: u64,
    tx: [u8; 2 + MAX_FRAME],
    tx_len: usize,
    rx: [u8; 2 + MAX_FRAME],
    rx_pos: usize,
    rx_len: usize,
}

static mut STATE: State =
    State { on: false, tx_key: [0; 32], tx_n: 0, rx_key: [0; 32], rx_n: 0, tx: [0; 2 + MAX_FRAME], tx_len: 0, rx: [0; 2 + MAX_FRAME], rx_pos: 0, rx_len: 0 };

fn state() -> &'static mut State {
    // SAFETY: only one thread at a time uses the channel: the constructor
    // (or the fork child's handler) before the checkpoint thread exists,
    // then the checkpoint thread alone, never re-entrantly.
    unsafe { &mut *core::ptr::addr_of_mut!(STATE) }
}

fn install(tx: [u8; 32], rx: [u8; 32]) {
    let s = state();
    s.tx_key = tx;
    s.rx_key = rx;
    s.tx_n = 0;
    s.rx_n = 0;
    s.tx_len = 0;
    s.rx_pos = 0;
    s.rx_len = 0;
    s.on = true;
}

/// Plain from now on (a Unix connection, or none).
pub fn off() {
    let s = state();
    s.on = false;
    s.tx_key = [0; 32];
    s.rx_key = [0; 32];
}

/// After a restart: takes the keys the restart driver left for the
/// restart of generation `generation`, if any (else the connection is
/// plain). Allocation-free.
pub fn take_restart_keys(block: &RestartBlock, generation: u64) {
    if block.chan_gen.load(Ordering::Acquire) == generation && generation != 0 {
        // SAFETY: the driver wrote the keys before the restart word, which
        // we have read; nobody else touches them.
        let keys = unsafe { &mut *block.keys.get() };
        let mut tx = [0u8; 32];
        let mut rx = [0u8; 32];
        tx.copy_from_slice(&keys[..32]);
        rx.copy_from_slice(&keys[32..]);
        keys.fill(0);
        block.chan_gen.store(0, Ordering::Release);
        install(tx, rx);
    } else {
        off();
    }
}

/// The membership key from the environment.
fn agent_key() -> Result<[u8; 32], String> {
    let hex = std::env::var(ENV_AGENT_KEY).map_err(|_| {
        format!("the coordinator is on TCP and {ENV_AGENT_KEY} is not set: run the program under `ckpt launch`, which sets it from the computation's secret")
    })?;
    let hex = hex.trim().as_bytes();
    let mut key = [0u8; 32];
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    if hex.len() != 64 {
        return Err(format!("{ENV_AGENT_KEY} is not 64 hex digits"));
    }
    for (i, k) in key.iter_mut().enumerate() {
        match (digit(hex[2 * i]), digit(hex[2 * i + 1])) {
            (Some(a), Some(b)) => *k = a << 4 | b,
            _ => return Err(format!("{ENV_AGENT_KEY} is not 64 hex digits")),
        }
    }
    Ok(key)
}

/// Runs the agent's handshake on the connected `sock` and switches the
/// channel on. Allocates: only in the constructor or a fork child.
pub fn handshake(sock: &mut std::net::TcpStream, addr: &str) -> Result<(), String> {
    use std::io::{Read, Write};
    let key = agent_key()?;
    let params: snow::params::NoiseParams = PATTERN.parse().map_err(|e| format!("{e}"))?;
    let mut hs = snow::Builder::new(params)
        .psk(0, &key)
        .and_then(|b| b.prologue(PROLOGUE))
        .and_then(|b| b.build_initiator())
        .map_err(|e| format!("cannot start the secure handshake: {e}"))?;
    let mut buf = [0u8; 256];
    let n = hs.write_message(&[], &mut buf).map_err(|e| format!("secure handshake: {e}"))?;
    let mut first = PREAMBLE.to_vec();
    first.extend_from_slice(&(n as u16).to_be_bytes());
    first.extend_from_slice(&buf[..n]);
    let io = |e: std::io::Error| format!("the coordinator at {addr} closed the connection in the secure handshake ({e}): it does not hold this computation's secret, or {ENV_AGENT_KEY} is another computation's");
    sock.set_read_timeout(Some(std::time::Duration::from_secs(10))).map_err(io)?;
    sock.write_all(&first).map_err(io)?;
    let mut l = [0u8; 2];
    sock.read_exact(&mut l).map_err(io)?;
    let len = u16::from_be_bytes(l) as usize;
    if len > buf.len() {
        return Err(format!("the peer at {addr} is not a ckpt coordinator (a handshake answer of {len} bytes)"));
    }
    let mut answer = [0u8; 256];
    sock.read_exact(&mut answer[..len]).map_err(io)?;
    hs.read_message(&answer[..len], &mut buf)
        .map_err(|_| format!("the peer at {addr} failed the secure handshake: it is not the coordinator of this computation (check CKPT_COORD)"))?;
    sock.set_read_timeout(None).map_err(io)?;
    let (tx, rx) = hs.dangerously_get_raw_split();
    install(tx, rx);
    Ok(())
}

fn nonce(n: u64) -> Nonce {
    let mut b = [0u8; 12];
    b[4..].copy_from_slice(&n.to_le_bytes());
    b.into()
}

/// Seals what is buffered into one frame and writes it.
fn flush(fd: i32) -> bool {
    let s = state();
    if s.tx_len == 0 {
        return true;
    }
    let n = s.tx_len;
    let cipher = ChaCha20Poly1305::new(&s.tx_key.into());
    let Ok(tag) = cipher.encrypt_in_place_detached(&nonce(s.tx_n), &[], &mut s.tx[2..2 + n]) else { return false };
    s.tx_n += 1;
    s.tx[2 + n..2 + n + TAG].copy_from_slice(&tag);
    s.tx[..2].copy_from_slice(&((n + TAG) as u16).to_be_bytes());
    s.tx_len = 0;
    sys::write_all(fd, &s.tx[..2 + n + TAG])
}

/// Writes the concatenation of `parts` as one message: sealed frames when
/// the channel is on, else plain. Allocation-free.
pub fn write_parts(fd: i32, head: &[u8], parts: &[&[u8]]) -> bool {
    let s = state();
    if !s.on {
        return sys::write_all(fd, head) && parts.iter().all(|p| sys::write_all(fd, p));
    }
    for p in core::iter::once(&head).chain(parts) {
        let mut p: &[u8] = p;
        while !p.is_empty() {
            let s = state();
            let n = p.len().min(MAX_PLAIN - s.tx_len);
            s.tx[2 + s.tx_len..2 + s.tx_len + n].copy_from_slice(&p[..n]);
            s.tx_len += n;
            p = &p[n..];
            if s.tx_len == MAX_PLAIN && !flush(fd) {
                return false;
            }
        }
    }
    flush(fd)
}

/// Reads exactly `buf.len()` bytes of the peer's stream (opening frames
/// when the channel is on). False on EOF, error or a frame that fails
/// authentication (the connection is then useless). Allocation-free.
/// Whether decrypted bytes wait in the receive buffer (a poll of the
/// socket would not show them).
pub fn buffered() -> bool {
    let s = state();
    s.on && s.rx_pos < s.rx_len
}

pub fn read_exact(fd: i32, buf: &mut [u8]) -> bool {
    let s = state();
    if !s.on {
        return sys::read_exact(fd, buf);
    }
    let mut done = 0;
    while done < buf.len() {
        let s = state();
        if s.rx_pos < s.rx_len {
            let n = (buf.len() - done).min(s.rx_len - s.rx_pos);
            buf[done..done + n].copy_from_slice(&s.rx[2 + s.rx_pos..2 + s.rx_pos + n]);
            s.rx_pos += n;
            done += n;
            continue;
        }
        if !sys::read_exact(fd, &mut s.rx[..2]) {
            return false;
        }
        let len = u16::from_be_bytes([s.rx[0], s.rx[1]]) as usize;
        if len < TAG || !sys::read_exact(fd, &mut s.rx[2..2 + len]) {
            return false;
        }
        let n = len - TAG;
        let tag = *Tag::from_slice(&s.rx[2 + n..2 + len]);
        let cipher = ChaCha20Poly1305::new(&s.rx_key.into());
        if cipher.decrypt_in_place_detached(&nonce(s.rx_n), &[], &mut s.rx[2..2 + n], &tag).is_err() {
            off();
            return false;
        }
        s.rx_n += 1;
        s.rx_pos = 0;
        s.rx_len = n;
    }
    true
}
