//! Page-aligned chunking, zero detection, BLAKE3 addressing and zstd
//! compression for ckpt images, parallelised with rayon.
//!
//! This crate is pure computation over byte slices: it cuts memory into
//! fixed-size chunks, names each chunk by the BLAKE3 hash of its uncompressed
//! bytes ([`struct@Hash`]), recognises all-zero chunks (recorded as
//! [`Hash::ZERO_CHUNK`], never stored) and compresses/decompresses blobs.
//!
//! It must never do I/O (no files, sockets, or process inspection) and knows
//! nothing about stores, processes or memory layouts: callers hand it bytes.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::cell::RefCell;
use std::fmt;
use std::str::FromStr;

use rayon::prelude::*;
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Default zstd compression level for chunks (fast; memory images compress
/// well enough at level 1 and compression is the bottleneck).
pub const DEFAULT_LEVEL: i32 = 1;

/// Minimum number of bytes one rayon task hashes in [`hash_chunks`], so that
/// scheduling overhead is amortised over small chunk sizes.
const MIN_BYTES_PER_TASK: usize = 256 * 1024;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    /// The compressed bytes are not a valid zstd frame (or do not fit the
    /// expected length).
    #[error(
        "cannot decompress blob ({clen} compressed bytes, expected {expected} bytes): {reason}"
    )]
    Decompress {
        /// Length of the compressed input.
        clen: usize,
        /// Expected uncompressed length.
        expected: usize,
        /// Message from zstd.
        reason: String,
    },
    /// The blob decompressed to a different length than recorded.
    #[error("blob decompressed to {actual} bytes, expected {expected}")]
    LengthMismatch {
        /// Recorded uncompressed length.
        expected: usize,
        /// Length actually produced.
        actual: usize,
    },
    /// The blob's bytes do not hash to its address.
    #[error("its bytes hash to {actual}, not to its address {expected}")]
    HashMismatch {
        /// The address.
        expected: Hash,
        /// What the bytes hash to.
        actual: Hash,
    },
    /// A string is not a 64-digit hex BLAKE3 hash.
    #[error("invalid hash {input:?}: expected 64 hex digits ({reason})")]
    InvalidHash {
        /// The rejected input (possibly truncated to 80 chars).
        input: String,
        /// Why it was rejected.
        reason: String,
    },
}

/// A BLAKE3 hash: the address of a chunk or blob (of its uncompressed bytes).
///
/// Displays, parses and (de)serializes as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    /// Sentinel standing for "an all-zero chunk" (of whatever length the
    /// context implies). Such chunks are recorded, never stored.
    pub const ZERO_CHUNK: Hash = Hash([0u8; 32]);

    /// BLAKE3 hash of `data` (no zero detection: see [`hash_chunk`]).
    /// Inputs of 1 MiB and more are hashed with rayon.
    pub fn of(data: &[u8]) -> Hash {
        if data.len() >= 1 << 20 {
            let mut h = blake3::Hasher::new();
            h.update_rayon(data);
            Hash(*h.finalize().as_bytes())
        } else {
            Hash(*blake3::hash(data).as_bytes())
        }
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Build from a byte slice of length 32 (e.g. a SQLite BLOB column).
    pub fn from_slice(b: &[u8]) -> Option<Hash> {
        <[u8; 32]>::try_from(b).ok().map(Hash)
    }

    /// True for [`Hash::ZERO_CHUNK`].
    pub fn is_zero_chunk(&self) -> bool {
        *self == Hash::ZERO_CHUNK
    }

    /// Lowercase hex (64 characters).
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 64];
        hex::encode_to_slice(self.0, &mut buf).map_err(|_| fmt::Error)?;
        // hex output is ASCII
        f.write_str(std::str::from_utf8(&buf).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Hash {
    type Err = ChunkError;

    fn from_str(s: &str) -> Result<Hash, ChunkError> {
        let bad = |reason: String| ChunkError::InvalidHash {
            input: s.chars().take(80).collect(),
            reason,
        };
        if s.len() != 64 {
            return Err(bad(format!("got {} characters", s.len())));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|e| bad(e.to_string()))?;
        Ok(Hash(out))
    }
}

impl Serialize for Hash {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Hash {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Hash, D::Error> {
        struct HexVisitor;
        impl Visitor<'_> for HexVisitor {
            type Value = Hash;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a 64-digit hex BLAKE3 hash")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Hash, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(HexVisitor)
    }
}

/// True if every byte of `data` is zero. Compares 128-byte blocks as u128
/// words, stopping at the first non-zero block.
pub fn is_zero(data: &[u8]) -> bool {
    let mut blocks = data.chunks_exact(128);
    for block in &mut blocks {
        let mut acc = 0u128;
        for w in block.chunks_exact(16) {
            // chunks_exact(16) always yields 16-byte slices
            acc |= u128::from_ne_bytes(w.try_into().unwrap_or([1; 16]));
        }
        if acc != 0 {
            return false;
        }
    }
    let rest = blocks.remainder();
    let mut words = rest.chunks_exact(8);
    for w in &mut words {
        if u64::from_ne_bytes(w.try_into().unwrap_or([1; 8])) != 0 {
            return false;
        }
    }
    words.remainder().iter().all(|&b| b == 0)
}

/// Address of one chunk: [`Hash::ZERO_CHUNK`] if it is all zeros, else its
/// BLAKE3 hash.
pub fn hash_chunk(data: &[u8]) -> Hash {
    if is_zero(data) {
        Hash::ZERO_CHUNK
    } else {
        Hash::of(data)
    }
}

/// Cut `data` into `chunk_size` pieces (the last may be shorter) and return
/// the address of each ([`hash_chunk`]), computed in parallel with rayon.
///
/// # Panics
/// If `chunk_size` is 0.
pub fn hash_chunks(data: &[u8], chunk_size: usize) -> Vec<Hash> {
    assert!(chunk_size > 0, "hash_chunks: chunk_size must be > 0");
    let min_len = (MIN_BYTES_PER_TASK / chunk_size).max(1);
    data.par_chunks(chunk_size)
        .with_min_len(min_len)
        .map(hash_chunk)
        .collect()
}

thread_local! {
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
}

/// Compress `data` into one zstd frame at `level` (clamped to zstd's range).
/// A per-thread compression context is reused across calls.
pub fn compress(data: &[u8], level: i32) -> Vec<u8> {
    let range = zstd::compression_level_range();
    let level = level.clamp(*range.start(), *range.end());
    let fast = COMPRESSOR.with(|c| {
        let mut slot = c.borrow_mut();
        if slot.as_ref().map(|(l, _)| *l) != Some(level) {
            *slot = zstd::bulk::Compressor::new(level)
                .ok()
                .map(|comp| (level, comp));
        }
        slot.as_mut().and_then(|(_, comp)| comp.compress(data).ok())
    });
    match fast {
        Some(v) => v,
        // Compressing into a growable in-memory buffer only fails on
        // allocation failure inside zstd; the stream API is a last resort.
        None => zstd::stream::encode_all(data, level)
            .expect("zstd: compressing into memory failed (out of memory?)"),
    }
}

/// How a blob is kept in a pack: a zstd frame, or its bytes as they are
/// when zstd cannot make them smaller (hash-like or already compressed
/// data). A stored blob as long as its uncompressed length is raw: a zstd
/// frame of such data is never written (see [`decode`]).
#[derive(Debug)]
pub enum Encoded<'a> {
    /// One zstd frame, shorter than the data.
    Zstd(Vec<u8>),
    /// The data itself.
    Raw(&'a [u8]),
}

impl Encoded<'_> {
    /// The bytes to store.
    pub fn bytes(&self) -> &[u8] {
        match self {
            Encoded::Zstd(v) => v,
            Encoded::Raw(d) => d,
        }
    }
}

/// Encode `data` for storing: one zstd frame at `level`, or the data raw
/// if zstd does not make it shorter. (zstd gives up on incompressible
/// input about as fast as a one-pass entropy estimate of it runs:
/// 0.50 vs 0.45 GB/s on hash-like words, BENCHMARKS.md "bench-full"; so
/// no estimate is made first.)
pub fn encode(data: &[u8], level: i32) -> Encoded<'_> {
    let z = compress(data, level);
    if z.len() >= data.len() { Encoded::Raw(data) } else { Encoded::Zstd(z) }
}

/// The blob whose stored bytes are `stored` and whose address is `hash`
/// ([`encode`]'s output): raw if it is `expected_len` bytes long and hashes
/// to `hash`, else a zstd frame (stores written before raw blobs existed
/// may hold a frame exactly as long as its data). The result is checked
/// against `hash` either way.
pub fn decode(stored: &[u8], expected_len: usize, hash: &Hash) -> Result<Vec<u8>, ChunkError> {
    if stored.len() == expected_len && Hash::of(stored) == *hash {
        return Ok(stored.to_vec());
    }
    let data = decompress(stored, expected_len)?;
    let actual = Hash::of(&data);
    if actual != *hash {
        return Err(ChunkError::HashMismatch { expected: *hash, actual });
    }
    Ok(data)
}

/// Decompress one zstd frame that must yield exactly `expected_len` bytes.
pub fn decompress(data: &[u8], expected_len: usize) -> Result<Vec<u8>, ChunkError> {
    let out = DECOMPRESSOR.with(|c| {
        let mut slot = c.borrow_mut();
        if slot.is_none() {
            *slot = Some(
                zstd::bulk::Decompressor::new().map_err(|e| ChunkError::Decompress {
                    clen: data.len(),
                    expected: expected_len,
                    reason: e.to_string(),
                })?,
            );
        }
        let d = slot.as_mut().expect("decompressor just created");
        d.decompress(data, expected_len)
            .map_err(|e| ChunkError::Decompress {
                clen: data.len(),
                expected: expected_len,
                reason: e.to_string(),
            })
    })?;
    if out.len() != expected_len {
        return Err(ChunkError::LengthMismatch {
            expected: expected_len,
            actual: out.len(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_roundtrip_and_display() {
        let h = Hash::of(b"hello");
        let s = h.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(s, s.to_lowercase());
        assert_eq!(s, blake3::hash(b"hello").to_hex().as_str());
        assert_eq!(s.parse::<Hash>().unwrap(), h);
        assert_eq!(format!("{h:?}"), s);
        assert!("abc".parse::<Hash>().is_err());
        assert!("zz".repeat(32).parse::<Hash>().is_err());
        assert_eq!(Hash::ZERO_CHUNK.to_string(), "0".repeat(64));
        let big: Vec<u8> = (0..3_000_000u32).map(|i| i as u8).collect();
        assert_eq!(Hash::of(&big).0, *blake3::hash(&big).as_bytes());
    }

    #[test]
    fn serde_as_hex_string() {
        let h = Hash::of(b"x");
        let j = serde_json::to_string(&h).unwrap();
        assert_eq!(j, format!("\"{h}\""));
        let back: Hash = serde_json::from_str(&j).unwrap();
        assert_eq!(back, h);
        assert!(serde_json::from_str::<Hash>("\"00\"").is_err());
        assert!(serde_json::from_str::<Hash>("12").is_err());
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        for len in [1usize, 7, 8, 9, 127, 128, 129, 4096, 16384 + 3] {
            let mut v = vec![0u8; len];
            assert!(is_zero(&v), "len {len}");
            for pos in [0, len / 2, len - 1] {
                v[pos] = 1;
                assert!(!is_zero(&v), "len {len} pos {pos}");
                v[pos] = 0;
            }
        }
    }

    #[test]
    fn chunking() {
        let cs = 4096;
        let mut data = vec![0u8; cs * 100 + 100];
        data[cs * 3 + 5] = 9; // chunk 3 non-zero
        data[cs * 100 + 99] = 1; // last partial chunk non-zero
        let hs = hash_chunks(&data, cs);
        assert_eq!(hs.len(), 101);
        for (i, h) in hs.iter().enumerate() {
            match i {
                3 => assert_eq!(*h, Hash::of(&data[cs * 3..cs * 4])),
                100 => assert_eq!(*h, Hash::of(&data[cs * 100..])),
                _ => assert_eq!(*h, Hash::ZERO_CHUNK),
            }
        }
        assert!(hash_chunks(&[], cs).is_empty());
        // identical content gives identical addresses
        let pat: Vec<u8> = (0..cs * 2).map(|i| (i % 251) as u8).collect();
        let two = [pat.clone(), pat].concat();
        let hs = hash_chunks(&two, cs);
        assert_eq!(hs[0], hs[2]);
        assert_eq!(hs[1], hs[3]);
        assert_ne!(hs[0], hs[1]);
    }

    #[test]
    fn raw_and_zstd_encodings() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let random: Vec<u8> = (0..4096 / 8)
            .flat_map(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng.to_le_bytes()
            })
            .collect();
        let e = encode(&random, DEFAULT_LEVEL);
        assert!(matches!(e, Encoded::Raw(_)));
        let h = Hash::of(&random);
        assert_eq!(decode(e.bytes(), random.len(), &h).unwrap(), random);
        // Memory-image-like data is compressed.
        let text: Vec<u8> = (0..4096u32).map(|i| (i % 17) as u8).collect();
        let e = encode(&text, DEFAULT_LEVEL);
        assert!(matches!(e, Encoded::Zstd(_)));
        assert_eq!(decode(e.bytes(), text.len(), &Hash::of(&text)).unwrap(), text);
        // Wrong bytes are refused either way.
        let mut bad = random.clone();
        bad[7] ^= 1;
        assert!(decode(&bad, random.len(), &h).is_err());
        assert!(decode(e.bytes(), text.len(), &h).is_err());
    }

    #[test]
    fn compression_roundtrip_and_errors() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i / 7 % 256) as u8).collect();
        let c = compress(&data, DEFAULT_LEVEL);
        assert!(c.len() < data.len());
        assert_eq!(decompress(&c, data.len()).unwrap(), data);
        // other level, thread-local context reset
        let c19 = compress(&data, 3);
        assert_eq!(decompress(&c19, data.len()).unwrap(), data);
        // wrong expected lengths
        assert!(decompress(&c, data.len() - 1).is_err());
        assert!(matches!(
            decompress(&c, data.len() + 1),
            Err(ChunkError::LengthMismatch { .. })
        ));
        // garbage
        assert!(decompress(b"not zstd at all", 10).is_err());
        let mut bad = c.clone();
        bad.truncate(c.len() / 2);
        assert!(decompress(&bad, data.len()).is_err());
        // empty
        assert_eq!(decompress(&compress(&[], 1), 0).unwrap(), Vec::<u8>::new());
    }
}
