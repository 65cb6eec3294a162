//! Sealed stores: a store that only the holder of its key can read or forge.
//!
//! A sealed store has a random 32-byte master key made with the store and
//! kept **outside** it: in `$CKPT_KEY_FILE` if set, else in
//! `$XDG_CONFIG_HOME/ckpt/keys/<STORE-ID>` (default
//! `~/.config/ckpt/keys/<STORE-ID>`; directory 0700, file 0600, written
//! atomically). The store id is the catalog's `meta.store_id`; the catalog
//! also records `meta.sealed` (the scheme) and `meta.key_check` (a keyed
//! hash of the id, so a wrong key is told apart from a tampered store).
//!
//! Three sub-keys are derived with `blake3::derive_key`:
//! - **addresses**: a blob whose BLAKE3 (the address the engine and the
//!   manifests use) is `H` is stored, in the catalog and the pack trailers,
//!   under `keyed_hash(k_addr, H)`: addresses reveal nothing about the bytes
//!   to a reader without the key, and equal blobs still share one address
//!   (dedup within the store);
//! - **AEAD**: every stored blob (chunks and manifests alike, after zstd) is
//!   sealed with AES-256-GCM (`ring`) under a per-writer subkey: each
//!   [`Keys`] (one per opened store) draws a random 128-bit writer id,
//!   derives its subkey from the AEAD key and the id, and uses a 64-bit
//!   counter as the 96-bit nonce (never reused across threads, processes
//!   or machines), with the stored address as associated data, so a blob
//!   moved to another address, swapped or forged fails to open. Blobs of
//!   stores sealed with scheme v1 (XChaCha20-Poly1305) still open there;
//! - **MAC**: every generation row (id, parent, manifest address and
//!   metadata) carries a keyed BLAKE3 MAC over a canonical encoding, so an
//!   edited, swapped, re-parented or forged row is detected. A replayed
//!   older catalog (validly MAC'd) is detected against the head record kept
//!   beside the key (`<key file>.head`: the newest generation this machine
//!   committed or saw, and its MAC).
//!
//! Stored blob layout (v2): `algorithm [1] = 2 | writer id [16] | nonce [12]
//! | ciphertext of (encoding u8 | bytes) | tag [16]`; v1: `nonce [24] |
//! ciphertext | tag [16]`. Encoding 0 = raw bytes, 1 = compressed: one zstd
//! frame or one LZ4 blob, told by its first bytes (`ckpt_chunker::decode`).
//!
//! This module must never write a key into the store, log a key, or make
//! a nonce from anything but its writer's counter (under a subkey of its
//! own random writer id).

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{KeyInit, Tag, XChaCha20Poly1305, XNonce};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

use crate::error::{Result, StoreError};
use crate::{GenerationInfo, Hash};

/// The value of `meta.sealed` of a store sealed by this scheme (every new
/// store, and every store sealed by `ckpt store seal`).
pub const SCHEME: &str = "aes256gcm-blake3-v2";
/// The first scheme: blobs sealed with XChaCha20-Poly1305. Such stores
/// still open and read; what is written into them now is sealed as v2.
pub const SCHEME_V1: &str = "xchacha20poly1305-blake3-v1";
/// Every scheme this ckpt opens.
pub const SCHEMES: [&str; 2] = [SCHEME, SCHEME_V1];
/// Bytes a sealed blob takes beyond its (compressed) bytes (v2: header,
/// encoding byte, tag).
pub const OVERHEAD: usize = V2_HEADER + 1 + TAG_LEN;
/// The algorithm byte that starts every v2 blob: AES-256-GCM under a
/// per-writer subkey.
const ALG_AES256GCM: u8 = 2;
/// 128 random bits: two writers share an id (and so a subkey) with
/// probability about n^2 / 2^129 for n writers.
const WRITER_ID_LEN: usize = 16;
const V2_NONCE_LEN: usize = 12;
/// `algorithm [1] | writer id [16] | nonce [12]`.
const V2_HEADER: usize = 1 + WRITER_ID_LEN + V2_NONCE_LEN;
const V1_NONCE_LEN: usize = 24;
const V1_OVERHEAD: usize = V1_NONCE_LEN + 1 + TAG_LEN;
const TAG_LEN: usize = 16;
/// Writer subkeys kept for opening (one per writer id met); a hostile
/// store naming more writers only costs their derivation again.
const READER_CACHE: usize = 4096;
const KEY_FILE_MAGIC: &str = "ckpt store key v1";

/// The keys of one sealed store, and this process's writer (a random
/// writer id and its AES-256-GCM subkey, with a nonce counter under it).
pub struct Keys {
    id: String,
    master: [u8; 32],
    addr: [u8; 32],
    mac: [u8; 32],
    /// Where the writer subkeys come from (with a writer id).
    aead_v2: [u8; 32],
    /// The v1 blobs' key, in a v1 store only.
    v1: Option<XChaCha20Poly1305>,
    writer_id: [u8; WRITER_ID_LEN],
    writer: LessSafeKey,
    counter: AtomicU64,
    readers: RwLock<HashMap<[u8; WRITER_ID_LEN], LessSafeKey>>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys").field("store_id", &self.id).finish_non_exhaustive()
    }
}

/// `n` random bytes from the OS, or an error naming what failed.
fn random<const N: usize>() -> Result<[u8; N]> {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b)
        .map_err(|e| StoreError::io("read random bytes from the OS (getrandom)".to_string(), std::io::Error::other(e.to_string())))?;
    Ok(b)
}

/// The AES-256-GCM subkey of writer `writer_id`.
fn writer_key(aead_v2: &[u8; 32], writer_id: &[u8; WRITER_ID_LEN]) -> LessSafeKey {
    let k = blake3::Hasher::new_derive_key("ckpt 2026 store blob AES-256-GCM writer key v2")
        .update(aead_v2)
        .update(writer_id)
        .finalize();
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, k.as_bytes()).expect("AES-256-GCM takes a 32-byte key"))
}

impl Keys {
    /// The keys of store `id` from its master key, for a store of
    /// [`SCHEME`] (new stores).
    pub fn from_master(id: &str, master: [u8; 32]) -> Result<Keys> {
        Keys::for_scheme(id, master, SCHEME)
    }

    /// The keys of store `id`, whose `meta.sealed` is `scheme` (one of
    /// [`SCHEMES`]), from its master key; with a new writer id.
    pub fn for_scheme(id: &str, master: [u8; 32], scheme: &str) -> Result<Keys> {
        let v1 = match scheme {
            SCHEME => None,
            SCHEME_V1 => Some(XChaCha20Poly1305::new((&blake3::derive_key("ckpt 2026 store blob AEAD key", &master)).into())),
            other => return Err(StoreError::Invalid(format!("store {id} is sealed with {other:?}, which this ckpt does not know (it knows {SCHEMES:?})"))),
        };
        let aead_v2 = blake3::derive_key("ckpt 2026 store blob AES-256-GCM key v2", &master);
        let writer_id = random()?;
        Ok(Keys {
            id: id.to_string(),
            master,
            addr: blake3::derive_key("ckpt 2026 store blob address key", &master),
            mac: blake3::derive_key("ckpt 2026 store catalog MAC key", &master),
            writer: writer_key(&aead_v2, &writer_id),
            aead_v2,
            v1,
            writer_id,
            counter: AtomicU64::new(0),
            readers: RwLock::new(HashMap::new()),
        })
    }

    /// New random keys for store `id`.
    pub fn generate(id: &str) -> Result<Keys> {
        Keys::from_master(id, random()?)
    }

    /// The store id these keys belong to.
    pub fn store_id(&self) -> &str {
        &self.id
    }

    /// `meta.key_check`: proves a key is this store's without revealing it.
    pub fn check_value(&self) -> String {
        let k = blake3::derive_key("ckpt 2026 store key check", &self.master);
        blake3::keyed_hash(&k, self.id.as_bytes()).to_hex().to_string()
    }

    /// The stored address of the blob whose BLAKE3 is `h`.
    pub fn address(&self, h: &Hash) -> Hash {
        Hash(*blake3::keyed_hash(&self.addr, &h.0).as_bytes())
    }

    fn aad(version: &[u8; 16], addr: &Hash) -> [u8; 48] {
        let mut a = [0u8; 48];
        a[..16].copy_from_slice(version);
        a[16..].copy_from_slice(&addr.0);
        a
    }

    /// Seal `bytes` (raw if `raw`, else compressed) stored at `addr`:
    /// AES-256-GCM under this process's writer subkey, the next value of
    /// its counter as the nonce.
    pub fn seal(&self, addr: &Hash, raw: bool, bytes: &[u8]) -> Vec<u8> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        assert!(n < u64::MAX, "a writer sealed 2^64 blobs: its nonces are spent");
        let mut nonce = [0u8; V2_NONCE_LEN];
        nonce[..8].copy_from_slice(&n.to_le_bytes());
        let mut out = Vec::with_capacity(bytes.len() + OVERHEAD);
        out.push(ALG_AES256GCM);
        out.extend_from_slice(&self.writer_id);
        out.extend_from_slice(&nonce);
        out.push(if raw { 0 } else { 1 });
        out.extend_from_slice(bytes);
        let tag = self
            .writer
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(Self::aad(b"ckpt blob v2\0\0\0\0", addr)), &mut out[V2_HEADER..])
            .expect("AES-256-GCM seals any blob under 64 GiB");
        out.extend_from_slice(tag.as_ref());
        out
    }

    /// Open a blob stored at `addr` into `out`: its encoding byte, then its
    /// bytes (`&out[1..]`); returns whether they are raw (else compressed).
    /// `Err` (a sentence) if it does not open with this key. A v2 blob
    /// opens in any store; a v1 blob only in a v1 store (whose blobs may
    /// be either: a v1 blob's first byte is random, so a v1 blob that
    /// starts with the v2 algorithm byte is tried as v2 first, which its
    /// tag refuses).
    pub fn open_into(&self, addr: &Hash, stored: &[u8], out: &mut Vec<u8>) -> std::result::Result<bool, String> {
        const FORGED: &str = "it does not open with the store's key: forged, altered, or moved from another address";
        let v2 = if stored.first() == Some(&ALG_AES256GCM) && stored.len() >= OVERHEAD {
            match self.open_v2(addr, stored, out) {
                Ok(()) => true,
                Err(()) if self.v1.is_none() => return Err(FORGED.into()),
                Err(()) => false,
            }
        } else {
            false
        };
        if !v2 {
            let Some(v1) = &self.v1 else {
                return Err(if stored.len() < OVERHEAD {
                    format!("{} bytes are too short for a sealed blob", stored.len())
                } else {
                    format!("its algorithm byte is {}, not {ALG_AES256GCM} (AES-256-GCM): not a blob of this store", stored[0])
                });
            };
            if stored.len() < V1_OVERHEAD {
                return Err(format!("{} bytes are too short for a sealed blob", stored.len()));
            }
            let (nonce, rest) = stored.split_at(V1_NONCE_LEN);
            let (ct, tag) = rest.split_at(rest.len() - TAG_LEN);
            out.clear();
            out.extend_from_slice(ct);
            v1.decrypt_in_place_detached(XNonce::from_slice(nonce), &Self::aad(b"ckpt blob v1\0\0\0\0", addr), out, Tag::from_slice(tag))
                .map_err(|_| FORGED.to_string())?;
        }
        match out[0] {
            0 => Ok(true),
            1 => Ok(false),
            e => Err(format!("unknown blob encoding {e}")),
        }
    }

    /// Open a v2 blob (at least [`OVERHEAD`] bytes, starting with its
    /// algorithm byte) into `out`, leaving `out` as its plaintext.
    fn open_v2(&self, addr: &Hash, stored: &[u8], out: &mut Vec<u8>) -> std::result::Result<(), ()> {
        let writer: [u8; WRITER_ID_LEN] = stored[1..1 + WRITER_ID_LEN].try_into().expect("16 bytes");
        let nonce: [u8; V2_NONCE_LEN] = stored[1 + WRITER_ID_LEN..V2_HEADER].try_into().expect("12 bytes");
        out.clear();
        out.extend_from_slice(&stored[V2_HEADER..]);
        let aad = Self::aad(b"ckpt blob v2\0\0\0\0", addr);
        let open = |k: &LessSafeKey, out: &mut Vec<u8>| -> std::result::Result<(), ()> {
            let n = k.open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), out).map_err(|_| ())?.len();
            out.truncate(n);
            Ok(())
        };
        if writer == self.writer_id {
            return open(&self.writer, out);
        }
        if let Some(k) = self.readers.read().unwrap_or_else(|e| e.into_inner()).get(&writer) {
            return open(k, out);
        }
        let k = writer_key(&self.aead_v2, &writer);
        let r = open(&k, out);
        if r.is_ok() {
            // Only writers whose blobs opened are kept.
            let mut m = self.readers.write().unwrap_or_else(|e| e.into_inner());
            if m.len() >= READER_CACHE {
                m.clear();
            }
            m.insert(writer, k);
        }
        r
    }

    /// The MAC of a generation row whose `info` column holds `info_text`
    /// (exactly as stored: JSON text does not survive a parse and print
    /// byte for byte).
    pub fn generation_mac(&self, g: &GenerationInfo, info_text: Option<&str>) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.mac);
        h.update(b"ckpt generation row v1\0");
        let field = |h: &mut blake3::Hasher, b: &[u8]| {
            h.update(&(b.len() as u64).to_le_bytes());
            h.update(b);
        };
        field(&mut h, self.id.as_bytes());
        field(&mut h, &g.id.to_le_bytes());
        match g.parent {
            Some(p) => field(&mut h, &[&[1u8][..], &p.to_le_bytes()].concat()),
            None => field(&mut h, &[0u8]),
        }
        field(&mut h, &g.created_ms.to_le_bytes());
        field(&mut h, &g.duration_ms.to_le_bytes());
        field(&mut h, &g.nprocs.to_le_bytes());
        field(&mut h, &g.logical_bytes.to_le_bytes());
        field(&mut h, &g.new_bytes.to_le_bytes());
        field(&mut h, &g.stored_bytes.to_le_bytes());
        field(&mut h, g.dirty_tracking.as_bytes());
        field(&mut h, &g.manifest.0);
        match info_text {
            Some(t) => field(&mut h, &[&[1u8][..], t.as_bytes()].concat()),
            None => field(&mut h, &[0u8]),
        }
        *h.finalize().as_bytes()
    }

    /// The MAC of the first-touched record of generation `g` (body
    /// `body`): bound to the store, the generation's id and its manifest,
    /// so a record cannot be moved to another generation or store.
    pub fn touched_mac(&self, g: &GenerationInfo, body: &[u8]) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.mac);
        h.update(b"ckpt first-touched record v1\0");
        for b in [self.id.as_bytes(), &g.id.to_le_bytes()[..], &g.manifest.0[..], body] {
            h.update(&(b.len() as u64).to_le_bytes());
            h.update(b);
        }
        *h.finalize().as_bytes()
    }
}

/// Whether new stores are to be made unsealed: `CKPT_UNSEALED=1` (for
/// measuring the cost of sealing, see BENCHMARKS.md; such a store is
/// neither encrypted nor authenticated).
pub fn unsealed_requested() -> bool {
    std::env::var_os("CKPT_UNSEALED").is_some_and(|v| v == "1")
}

/// The catalog's text of a generation's `info` (`None` for null).
pub(crate) fn info_text(v: &serde_json::Value) -> Option<String> {
    if v.is_null() { None } else { Some(v.to_string()) }
}

/// Where the key of store `id` is kept: `$CKPT_KEY_FILE`, else
/// `$XDG_CONFIG_HOME/ckpt/keys/<id>` (else `~/.config/ckpt/keys/<id>`).
pub fn key_path(id: &str) -> PathBuf {
    if let Some(f) = std::env::var_os("CKPT_KEY_FILE").filter(|f| !f.is_empty()) {
        return PathBuf::from(f);
    }
    key_dir().join(id)
}

/// The directory of the default key files.
pub fn key_dir() -> PathBuf {
    let config = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").filter(|d| !d.is_empty()).map(|h| PathBuf::from(h).join(".config")))
        .or_else(|| {
            nix::unistd::User::from_uid(nix::unistd::geteuid()).ok().flatten().map(|u| u.dir.join(".config"))
        })
        .unwrap_or_else(|| PathBuf::from("/nonexistent/.config"));
    config.join("ckpt").join("keys")
}

/// The head record beside a key file.
pub fn head_path(key_file: &Path) -> PathBuf {
    let mut s = key_file.as_os_str().to_owned();
    s.push(".head");
    PathBuf::from(s)
}

/// The text of a key file.
pub fn key_file_text(id: &str, master: &[u8; 32]) -> String {
    format!("{KEY_FILE_MAGIC}\nstore {id}\nkey {}\n", hex::encode(master))
}

/// Parse a key file's text: (store id, master key).
pub fn parse_key_file(text: &str, origin: &Path) -> Result<(String, [u8; 32])> {
    let bad = |why: &str| StoreError::BadKeyFile { path: origin.to_path_buf(), reason: why.to_string() };
    let mut lines = text.lines();
    if lines.next() != Some(KEY_FILE_MAGIC) {
        return Err(bad(&format!("it does not start with {KEY_FILE_MAGIC:?}")));
    }
    let id = lines.next().and_then(|l| l.strip_prefix("store ")).ok_or_else(|| bad("no `store ID` line"))?;
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(bad("the store id is not a store id"));
    }
    let k = lines.next().and_then(|l| l.strip_prefix("key ")).ok_or_else(|| bad("no `key HEX` line"))?;
    let mut master = [0u8; 32];
    hex::decode_to_slice(k, &mut master).map_err(|_| bad("the key is not 64 hex digits"))?;
    Ok((id.to_string(), master))
}

/// Write `data` to `path` atomically (a 0600 temporary file beside it,
/// fsync'd, renamed over it, the directory fsync'd), making the
/// directory (0700) if needed.
pub fn write_private_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().ok_or_else(|| StoreError::Invalid(format!("{} has no directory", path.display())))?;
    let ctx = |what: &str, e: std::io::Error| StoreError::io(format!("{what} {}", path.display()), e);
    if !dir.is_dir() {
        crate::private::create_dir_all(dir).map_err(|e| ctx("make the directory of", e))?;
    }
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    let mut f = crate::private::file_options()
        .write(true)
        .create_new(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(&tmp)
        .map_err(|e| ctx("create a temporary file for", e))?;
    let r = f.write_all(data).and_then(|_| f.sync_all()).and_then(|_| std::fs::rename(&tmp, path));
    if let Err(e) = r {
        let _ = std::fs::remove_file(&tmp);
        return Err(ctx("write", e));
    }
    crate::pack::sync_dir(dir).map_err(|e| ctx("sync the directory of", e))
}

/// Read the key file at `path`: `Ok(None)` if there is none. Refuses a
/// file others may read or another user's file.
pub fn read_key_file(path: &Path) -> Result<Option<(String, [u8; 32])>> {
    let md = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StoreError::io(format!("read key file {}", path.display()), e)),
    };
    let me = nix::unistd::geteuid().as_raw();
    if md.mode() & 0o077 != 0 || (md.uid() != me && me != 0) {
        return Err(StoreError::BadKeyFile {
            path: path.to_path_buf(),
            reason: format!(
                "it is mode {:o}, uid {}: a key must be private to its owner (`chmod 600 {}` as its owner)",
                md.mode() & 0o7777,
                md.uid(),
                path.display()
            ),
        });
    }
    let text = std::fs::read_to_string(path).map_err(|e| StoreError::io(format!("read key file {}", path.display()), e))?;
    parse_key_file(&text, path).map(Some)
}

/// Make a new key for store `id` and write it where [`key_path`] says
/// (before the catalog says the store is sealed). Refuses to overwrite a
/// key file of another store.
pub fn create_key(id: &str) -> Result<Keys> {
    let path = key_path(id);
    if let Some((other, _)) = read_key_file(&path)? {
        return Err(StoreError::BadKeyFile {
            path,
            reason: format!("it already holds the key of store {other}: unset CKPT_KEY_FILE or name a new file to make store {id}"),
        });
    }
    let keys = Keys::generate(id)?;
    write_private_atomic(&path, key_file_text(id, &keys.master).as_bytes())?;
    tracing::info!(store_id = id, key = %path.display(), "new sealed store: key written (export it with `ckpt key export` to restart on another machine)");
    Ok(keys)
}

/// The master key of these keys (for `ckpt key export`).
pub fn export_text(keys: &Keys) -> String {
    key_file_text(&keys.id, &keys.master)
}

/// The head record's first line in its current form (two slots).
const HEAD_MAGIC: &str = "ckpt head v2";
/// One slot of a head record: a sector of its own, so a torn write of one
/// leaves the other whole.
const HEAD_SLOT: usize = 512;
/// The size of a head record (two slots).
const HEAD_LEN: u64 = 2 * HEAD_SLOT as u64;

/// One slot of the head record: `ckpt head v2 seq S generation ID MAC
/// check C`, C the first 32 hex digits of the BLAKE3 of what precedes
/// ` check `, padded with spaces to [`HEAD_SLOT`] bytes, the last one a
/// newline.
fn head_slot(seq: u64, id: u64, mac: &[u8; 32]) -> Vec<u8> {
    let body = format!("{HEAD_MAGIC} seq {seq} generation {id} {}", hex::encode(mac));
    let check = blake3::hash(body.as_bytes()).to_hex();
    let mut b = format!("{body} check {}", &check[..32]).into_bytes();
    debug_assert!(b.len() < HEAD_SLOT);
    b.resize(HEAD_SLOT - 1, b' ');
    b.push(b'\n');
    b
}

/// A slot's (seq, generation, MAC), or `None` if it is not a whole slot
/// (a torn write, or anything else).
fn parse_head_slot(slot: &[u8]) -> Option<(u64, u64, [u8; 32])> {
    let text = std::str::from_utf8(slot).ok()?.trim_end();
    let (body, check) = text.rsplit_once(" check ")?;
    if blake3::hash(body.as_bytes()).to_hex().get(..32) != Some(check) {
        return None;
    }
    let rest = body.strip_prefix(HEAD_MAGIC)?;
    let w: Vec<&str> = rest.split(' ').collect();
    let [_, "seq", seq, "generation", id, mac_hex] = w[..] else { return None };
    let mut mac = [0u8; 32];
    hex::decode_to_slice(mac_hex, &mut mac).ok()?;
    Some((seq.parse().ok()?, id.parse().ok()?, mac))
}

/// The newest whole slot of a head record's bytes: (its index, seq,
/// generation, MAC). `None` if it is not of the two-slot form or no slot
/// is whole.
fn newest_head_slot(bytes: &[u8]) -> Option<(usize, u64, u64, [u8; 32])> {
    if bytes.len() as u64 != HEAD_LEN {
        return None;
    }
    bytes
        .chunks(HEAD_SLOT)
        .enumerate()
        .filter_map(|(i, s)| parse_head_slot(s).map(|(seq, id, mac)| (i, seq, id, mac)))
        .max_by_key(|&(_, seq, _, _)| seq)
}

/// The head record: the newest generation this machine committed or saw
/// in the store, and its MAC. `None` if there is none.
///
/// Two forms: `generation ID MAC` (one line, as written before the head
/// was rewritten in place), and two slots of [`HEAD_SLOT`] bytes, each a
/// record with a sequence number and a checksum ([`write_head`]); the
/// whole slot of the higher sequence number is the head.
pub fn read_head(key_file: &Path) -> Result<Option<(u64, [u8; 32])>> {
    let p = head_path(key_file);
    let bytes = match std::fs::read(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StoreError::io(format!("read head record {}", p.display()), e)),
    };
    let bad = || StoreError::BadKeyFile {
        path: p.clone(),
        reason: "not a head record (`generation ID MAC`, or two whole `ckpt head v2` slots): if it was damaged, delete it (the next open writes it again)".into(),
    };
    if bytes.starts_with(HEAD_MAGIC.as_bytes()) {
        return match newest_head_slot(&bytes) {
            Some((_, _, id, mac)) => Ok(Some((id, mac))),
            None => Err(bad()),
        };
    }
    let text = std::str::from_utf8(&bytes).map_err(|_| bad())?;
    let mut w = text.split_whitespace();
    if w.next() != Some("generation") {
        return Err(bad());
    }
    let id: u64 = w.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    let mut mac = [0u8; 32];
    hex::decode_to_slice(w.next().ok_or_else(bad)?, &mut mac).map_err(|_| bad())?;
    Ok(Some((id, mac)))
}

/// Write the head record: in place, into the slot that does not hold the
/// newest record, then `fdatasync` (one flush; the file keeps its size and
/// its blocks, so no metadata is journalled), under an exclusive `flock`
/// of the file so that two writers do not pick the same slot. A torn write
/// leaves the other slot whole: the head before, as a crash before the
/// write would have. A head record of the old form, a missing one, one not
/// ours or not private, or one with no whole slot is written anew
/// atomically ([`write_private_atomic`]: a temporary file fsync'd and
/// renamed, the directory fsync'd).
pub fn write_head(key_file: &Path, id: u64, mac: &[u8; 32]) -> Result<()> {
    let p = head_path(key_file);
    if write_head_in_place(&p, id, mac)? {
        return Ok(());
    }
    let mut both = head_slot(0, id, mac);
    both.extend_from_slice(&head_slot(0, id, mac));
    write_private_atomic(&p, &both)
}

/// [`write_head`] in place; `Ok(false)` if the file at `p` is not a
/// two-slot head record of ours (to be written anew).
fn write_head_in_place(p: &Path, id: u64, mac: &[u8; 32]) -> Result<bool> {
    use std::os::unix::fs::FileExt;
    let ctx = |what: &str, e: std::io::Error| StoreError::io(format!("{what} head record {}", p.display()), e);
    let f = match std::fs::OpenOptions::new().read(true).write(true).custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits()).open(p) {
        Ok(f) => f,
        // Missing, a symlink (ELOOP: replaced, not followed), unreadable.
        Err(_) => return Ok(false),
    };
    let md = f.metadata().map_err(|e| ctx("stat", e))?;
    if !md.is_file() || md.len() != HEAD_LEN || md.mode() & 0o077 != 0 || md.uid() != nix::unistd::geteuid().as_raw() {
        return Ok(false);
    }
    let f = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| ctx("lock", std::io::Error::from(e)))?;
    let mut bytes = vec![0u8; HEAD_LEN as usize];
    f.read_exact_at(&mut bytes, 0).map_err(|e| ctx("read", e))?;
    let Some((slot, seq, ..)) = newest_head_slot(&bytes) else { return Ok(false) };
    let next = seq.checked_add(1).ok_or_else(|| StoreError::BadKeyFile { path: p.to_path_buf(), reason: "its sequence number is spent: delete it".into() })?;
    let at = (1 - slot) as u64 * HEAD_SLOT as u64;
    f.write_all_at(&head_slot(next, id, mac), at).map_err(|e| ctx("write", e))?;
    f.sync_data().map_err(|e| ctx("sync", e))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_and_refusals() {
        let k = Keys::generate("s1").unwrap();
        let a = k.address(&Hash::of(b"x"));
        assert_ne!(a, Hash::of(b"x"));
        let s = k.seal(&a, true, b"secret bytes");
        assert!(!s.windows(6).any(|w| w == b"secret"));
        assert_eq!(s.len(), b"secret bytes".len() + OVERHEAD);
        assert_eq!((s[0], &s[1..1 + WRITER_ID_LEN]), (ALG_AES256GCM, &k.writer_id[..]));
        let mut out = Vec::new();
        assert!(k.open_into(&a, &s, &mut out).unwrap());
        assert_eq!(&out[1..], b"secret bytes");
        // Another address, another key, a flipped bit: refused.
        assert!(k.open_into(&k.address(&Hash::of(b"y")), &s, &mut out).is_err());
        let k2 = Keys::generate("s1").unwrap();
        assert!(k2.open_into(&a, &s, &mut out).is_err());
        for at in [0, 5, 40, 50, s.len() - 1] {
            let mut bad = s.clone();
            bad[at] ^= 1;
            assert!(k.open_into(&a, &bad, &mut out).is_err(), "a flipped bit at {at} opened");
        }
        assert!(k.open_into(&a, &s[..OVERHEAD - 1], &mut out).unwrap_err().contains("too short"));
        // Fresh nonces under one writer; a new writer id per Keys.
        assert_ne!(k.seal(&a, true, b"z")[1 + WRITER_ID_LEN..V2_HEADER], k.seal(&a, true, b"z")[1 + WRITER_ID_LEN..V2_HEADER]);
        assert_ne!(k.writer_id, k2.writer_id);
    }

    #[test]
    fn another_writer_of_the_same_store_opens() {
        let master = [3u8; 32];
        let w1 = Keys::from_master("s", master).unwrap();
        let w2 = Keys::from_master("s", master).unwrap();
        let a = w1.address(&Hash::of(b"p"));
        assert_eq!(a, w2.address(&Hash::of(b"p")));
        let s = w1.seal(&a, false, b"frame");
        let mut out = Vec::new();
        for _ in 0..2 {
            // Twice: the second time from the cache of writer subkeys.
            assert!(!w2.open_into(&a, &s, &mut out).unwrap());
            assert_eq!(&out[1..], b"frame");
        }
        // A writer id that is not the one the blob was sealed under fails.
        let mut other = s.clone();
        other[1..1 + WRITER_ID_LEN].copy_from_slice(&w2.writer_id);
        assert!(w2.open_into(&a, &other, &mut out).is_err());
    }

    #[test]
    fn nonces_never_repeat_across_writers_or_threads() {
        // Writers of one store (one master key), each sealing from 4
        // threads at once: every (writer id, nonce) pair is new, and two
        // writers at the same counter value seal under different subkeys.
        let master = [11u8; 32];
        let a = Hash::of(b"same address");
        let writers: Vec<Keys> = (0..3).map(|_| Keys::from_master("s", master).unwrap()).collect();
        let mut seen = std::collections::HashSet::new();
        let mut firsts = Vec::new();
        for w in &writers {
            let headers: Vec<Vec<u8>> = std::thread::scope(|sc| {
                let hs: Vec<_> = (0..4).map(|_| sc.spawn(|| (0..500).map(|_| w.seal(&a, true, b"same bytes")[1..V2_HEADER].to_vec()).collect::<Vec<_>>())).collect();
                hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
            });
            assert_eq!(headers.len(), 2000);
            for h in headers {
                assert_eq!(&h[..WRITER_ID_LEN], &w.writer_id[..]);
                assert!(seen.insert(h), "a (writer id, nonce) pair came twice");
            }
            // The counter goes on from 2000: the next nonce is 2000.
            let next = w.seal(&a, true, b"same bytes");
            assert_eq!(u64::from_le_bytes(next[1 + WRITER_ID_LEN..1 + WRITER_ID_LEN + 8].try_into().unwrap()), 2000);
            firsts.push(next);
        }
        // Same counter, same address, same bytes: the ciphertexts and tags
        // differ (different subkeys), and each opens only under its writer id.
        assert_ne!(firsts[0][V2_HEADER..], firsts[1][V2_HEADER..]);
        let mut out = Vec::new();
        let mut swapped = firsts[0].clone();
        swapped[1..1 + WRITER_ID_LEN].copy_from_slice(&writers[1].writer_id);
        assert!(writers[2].open_into(&a, &swapped, &mut out).is_err());
        assert!(writers[2].open_into(&a, &firsts[0], &mut out).is_ok());
    }

    /// A blob as the v1 code sealed it (XChaCha20-Poly1305, 24-byte nonce
    /// whose first byte is `first`).
    fn seal_v1(master: &[u8; 32], addr: &Hash, first: u8, bytes: &[u8]) -> Vec<u8> {
        let c = XChaCha20Poly1305::new((&blake3::derive_key("ckpt 2026 store blob AEAD key", master)).into());
        let mut nonce = [9u8; V1_NONCE_LEN];
        nonce[0] = first;
        let mut out = nonce.to_vec();
        out.push(0);
        out.extend_from_slice(bytes);
        let tag = c.encrypt_in_place_detached(XNonce::from_slice(&nonce), &Keys::aad(b"ckpt blob v1\0\0\0\0", addr), &mut out[V1_NONCE_LEN..]).unwrap();
        out.extend_from_slice(&tag);
        out
    }

    #[test]
    fn v1_blobs_open_in_v1_stores_only() {
        let master = [5u8; 32];
        let v1 = Keys::for_scheme("s", master, SCHEME_V1).unwrap();
        let v2 = Keys::for_scheme("s", master, SCHEME).unwrap();
        let a = v1.address(&Hash::of(b"q"));
        let mut out = Vec::new();
        // Any first byte, the v2 algorithm byte among them (tried as v2,
        // refused by its tag, then opened as v1).
        for first in [0u8, 1, ALG_AES256GCM, 0xff] {
            let b = seal_v1(&master, &a, first, b"old bytes, long enough to pass for a v2 blob's header and tag");
            assert!(v1.open_into(&a, &b, &mut out).unwrap(), "first byte {first}");
            assert_eq!(&out[1..], &b"old bytes, long enough to pass for a v2 blob's header and tag"[..]);
            assert!(v2.open_into(&a, &b, &mut out).is_err(), "a v2 store opened a v1 blob");
            let mut bad = b.clone();
            bad[30] ^= 1;
            assert!(v1.open_into(&a, &bad, &mut out).is_err());
        }
        // What a v1 store's writer seals now is v2, and opens in both.
        let n = v1.seal(&a, true, b"new");
        assert_eq!(n[0], ALG_AES256GCM);
        assert!(v2.open_into(&a, &n, &mut out).unwrap() && &out[1..] == b"new");
        assert!(Keys::for_scheme("s", master, "rot13-v0").is_err());
    }

    #[test]
    fn head_record_in_place_and_torn() {
        let d = tempfile::tempdir().unwrap();
        let key = d.path().join("k");
        let head = head_path(&key);
        let m = |b: u8| [b; 32];
        assert_eq!(read_head(&key).unwrap(), None);
        // The old one-line form reads, and is rewritten in the two-slot form.
        std::fs::write(&head, format!("generation 4 {}\n", hex::encode(m(4)))).unwrap();
        std::fs::set_permissions(&head, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        assert_eq!(read_head(&key).unwrap(), Some((4, m(4))));
        write_head(&key, 5, &m(5)).unwrap();
        assert_eq!(read_head(&key).unwrap(), Some((5, m(5))));
        let ino = std::fs::metadata(&head).unwrap().ino();
        // Then in place (same file), alternating slots, down as well as up (gc).
        for (id, b) in [(6, 6u8), (7, 7), (3, 3), (8, 8)] {
            write_head(&key, id, &m(b)).unwrap();
            assert_eq!(read_head(&key).unwrap(), Some((id, m(b))));
            let md = std::fs::metadata(&head).unwrap();
            assert_eq!((md.ino(), md.len(), md.mode() & 0o777), (ino, HEAD_LEN, 0o600));
        }
        // A torn write of the newest slot: the other slot (the head before) is read.
        let bytes = std::fs::read(&head).unwrap();
        let (slot, ..) = newest_head_slot(&bytes).unwrap();
        let mut torn = bytes.clone();
        torn[slot * HEAD_SLOT + 40] ^= 1;
        std::fs::write(&head, &torn).unwrap();
        assert_eq!(read_head(&key).unwrap(), Some((3, m(3))));
        // The next write goes over the torn slot, keeping the whole one.
        write_head(&key, 9, &m(9)).unwrap();
        assert_eq!(read_head(&key).unwrap(), Some((9, m(9))));
        assert_eq!(std::fs::metadata(&head).unwrap().ino(), ino);
        let bytes = std::fs::read(&head).unwrap();
        assert_eq!(bytes[(1 - slot) * HEAD_SLOT..][..HEAD_SLOT], torn[(1 - slot) * HEAD_SLOT..][..HEAD_SLOT]);
        // No whole slot: refused, naming the fix; written anew by write_head.
        let mut both = bytes.clone();
        both[40] ^= 1;
        both[HEAD_SLOT + 40] ^= 1;
        std::fs::write(&head, &both).unwrap();
        assert!(read_head(&key).unwrap_err().to_string().contains("delete it"));
        write_head(&key, 10, &m(10)).unwrap();
        assert_eq!(read_head(&key).unwrap(), Some((10, m(10))));
        // A head record others may read is not written in place.
        std::fs::set_permissions(&head, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        write_head(&key, 11, &m(11)).unwrap();
        let md = std::fs::metadata(&head).unwrap();
        assert_eq!((md.mode() & 0o777, read_head(&key).unwrap()), (0o600, Some((11, m(11)))));
        // A symlink planted in its place is replaced, never followed.
        let target = d.path().join("elsewhere");
        std::fs::write(&target, vec![b' '; HEAD_LEN as usize]).unwrap();
        std::fs::remove_file(&head).unwrap();
        std::os::unix::fs::symlink(&target, &head).unwrap();
        write_head(&key, 12, &m(12)).unwrap();
        assert!(!std::fs::symlink_metadata(&head).unwrap().file_type().is_symlink());
        assert_eq!(std::fs::read(&target).unwrap(), vec![b' '; HEAD_LEN as usize]);
        assert_eq!(read_head(&key).unwrap(), Some((12, m(12))));
    }

    #[test]
    fn key_file_roundtrip() {
        let t = key_file_text("abc", &[7; 32]);
        let (id, m) = parse_key_file(&t, Path::new("f")).unwrap();
        assert_eq!((id.as_str(), m), ("abc", [7; 32]));
        assert!(parse_key_file("nope", Path::new("f")).is_err());
        assert!(parse_key_file(&t.replace("store abc", "store ../x"), Path::new("f")).is_err());
    }
}
