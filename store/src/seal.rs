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
//!   sealed with XChaCha20-Poly1305 under a fresh 24-byte nonce (16 random
//!   bytes per process + a counter: never reused across processes or
//!   machines), with the stored address as associated data, so a blob
//!   moved to another address, swapped or forged fails to open;
//! - **MAC**: every generation row (id, parent, manifest address and
//!   metadata) carries a keyed BLAKE3 MAC over a canonical encoding, so an
//!   edited, swapped, re-parented or forged row is detected. A replayed
//!   older catalog (validly MAC'd) is detected against the head record kept
//!   beside the key (`<key file>.head`: the newest generation this machine
//!   committed or saw, and its MAC).
//!
//! Stored blob layout: `nonce [24] | ciphertext of (encoding u8 | bytes) |
//! tag [16]`, encoding 0 = raw bytes, 1 = one zstd frame.
//!
//! This module must never write a key into the store, log a key, or make
//! a nonce from anything but the random prefix and the counter.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{KeyInit, Tag, XChaCha20Poly1305, XNonce};

use crate::error::{Result, StoreError};
use crate::{GenerationInfo, Hash};

/// The value of `meta.sealed` of a store sealed by this scheme.
pub const SCHEME: &str = "xchacha20poly1305-blake3-v1";
/// Bytes a sealed blob takes beyond its (compressed) bytes.
pub const OVERHEAD: usize = NONCE_LEN + 1 + TAG_LEN;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
const KEY_FILE_MAGIC: &str = "ckpt store key v1";

/// The keys of one sealed store.
pub struct Keys {
    id: String,
    master: [u8; 32],
    addr: [u8; 32],
    mac: [u8; 32],
    aead: XChaCha20Poly1305,
    nonce_prefix: [u8; 16],
    counter: AtomicU64,
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

impl Keys {
    /// The keys of store `id` from its master key.
    pub fn from_master(id: &str, master: [u8; 32]) -> Result<Keys> {
        let aead_key = blake3::derive_key("ckpt 2026 store blob AEAD key", &master);
        Ok(Keys {
            id: id.to_string(),
            master,
            addr: blake3::derive_key("ckpt 2026 store blob address key", &master),
            mac: blake3::derive_key("ckpt 2026 store catalog MAC key", &master),
            aead: XChaCha20Poly1305::new((&aead_key).into()),
            nonce_prefix: random()?,
            counter: AtomicU64::new(0),
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

    fn aad(addr: &Hash) -> [u8; 48] {
        let mut a = [0u8; 48];
        a[..16].copy_from_slice(b"ckpt blob v1\0\0\0\0");
        a[16..].copy_from_slice(&addr.0);
        a
    }

    /// Seal `bytes` (raw if `raw`, else one zstd frame) stored at `addr`.
    pub fn seal(&self, addr: &Hash, raw: bool, bytes: &[u8]) -> Vec<u8> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut nonce = [0u8; NONCE_LEN];
        nonce[..16].copy_from_slice(&self.nonce_prefix);
        nonce[16..].copy_from_slice(&n.to_le_bytes());
        let mut out = Vec::with_capacity(bytes.len() + OVERHEAD);
        out.extend_from_slice(&nonce);
        out.push(if raw { 0 } else { 1 });
        out.extend_from_slice(bytes);
        let tag = self
            .aead
            .encrypt_in_place_detached(XNonce::from_slice(&nonce), &Self::aad(addr), &mut out[NONCE_LEN..])
            .expect("XChaCha20-Poly1305 seals any blob under 256 GiB");
        out.extend_from_slice(&tag);
        out
    }

    /// Open a blob stored at `addr` into `out`: its encoding byte, then its
    /// bytes (`&out[1..]`); returns whether they are raw (else a zstd frame).
    /// `Err` (a sentence) if it does not open with this key.
    pub fn open_into(&self, addr: &Hash, stored: &[u8], out: &mut Vec<u8>) -> std::result::Result<bool, String> {
        if stored.len() < OVERHEAD {
            return Err(format!("{} bytes are too short for a sealed blob", stored.len()));
        }
        let (nonce, rest) = stored.split_at(NONCE_LEN);
        let (ct, tag) = rest.split_at(rest.len() - TAG_LEN);
        out.clear();
        out.extend_from_slice(ct);
        self.aead
            .decrypt_in_place_detached(XNonce::from_slice(nonce), &Self::aad(addr), out, Tag::from_slice(tag))
            .map_err(|_| "it does not open with the store's key: forged, altered, or moved from another address".to_string())?;
        let raw = match out[0] {
            0 => true,
            1 => false,
            e => return Err(format!("unknown blob encoding {e}")),
        };
        Ok(raw)
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

/// The head record: the newest generation this machine committed or saw
/// in the store, and its MAC. `None` if there is none.
pub fn read_head(key_file: &Path) -> Result<Option<(u64, [u8; 32])>> {
    let p = head_path(key_file);
    let text = match std::fs::read_to_string(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StoreError::io(format!("read head record {}", p.display()), e)),
    };
    let bad = || StoreError::BadKeyFile { path: p.clone(), reason: "not a head record (`generation ID MAC`)".into() };
    let mut w = text.split_whitespace();
    if w.next() != Some("generation") {
        return Err(bad());
    }
    let id: u64 = w.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    let mut mac = [0u8; 32];
    hex::decode_to_slice(w.next().ok_or_else(bad)?, &mut mac).map_err(|_| bad())?;
    Ok(Some((id, mac)))
}

/// Write the head record.
pub fn write_head(key_file: &Path, id: u64, mac: &[u8; 32]) -> Result<()> {
    write_private_atomic(&head_path(key_file), format!("generation {id} {}\n", hex::encode(mac)).as_bytes())
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
        let mut out = Vec::new();
        assert!(k.open_into(&a, &s, &mut out).unwrap());
        assert_eq!(&out[1..], b"secret bytes");
        // Another address, another key, a flipped bit: refused.
        assert!(k.open_into(&k.address(&Hash::of(b"y")), &s, &mut out).is_err());
        let k2 = Keys::generate("s1").unwrap();
        assert!(k2.open_into(&a, &s, &mut out).is_err());
        let mut bad = s.clone();
        bad[30] ^= 1;
        assert!(k.open_into(&a, &bad, &mut out).is_err());
        // Fresh nonces.
        assert_ne!(k.seal(&a, true, b"z")[..24], k.seal(&a, true, b"z")[..24]);
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
