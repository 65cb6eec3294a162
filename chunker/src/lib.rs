//! Page-aligned chunking, zero detection, BLAKE3 addressing and zstd or
//! LZ4 compression for ckpt images, parallelised with rayon.
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

/// The first four bytes of a zstd frame (its magic number, little-endian
/// 0xFD2FB528): every compressed blob a zstd store writes starts so.
pub const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// The first four bytes of an LZ4 blob: `c` `L` `4` and a format version
/// (1), followed by one LZ4 block (no length prefix: the catalog's ulen is
/// the length). Neither zstd's frame magic nor its skippable (0x184D2A5?)
/// or legacy (0xFD2FB52?) magics, nor LZ4's own frame magic (0x184D2204).
pub const LZ4_MAGIC: [u8; 4] = *b"cL4\x01";

/// The codec a store compresses its blobs with (its `ckpt init
/// --compression`). A store's blobs may be of either (a store whose codec
/// was changed keeps its older blobs): a blob's codec is told by its first
/// bytes ([`ZSTD_MAGIC`], [`LZ4_MAGIC`]), and [`decode`] reads both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    /// One zstd frame a blob, at the store's level.
    Zstd,
    /// One LZ4 block a blob, after [`LZ4_MAGIC`].
    Lz4,
}

impl Codec {
    /// The codec's name as `ckpt init --compression` and a store's config
    /// spell it.
    pub fn name(self) -> &'static str {
        match self {
            Codec::Zstd => "zstd",
            Codec::Lz4 => "lz4",
        }
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Codec {
    type Err = String;
    fn from_str(s: &str) -> Result<Codec, String> {
        match s {
            "zstd" => Ok(Codec::Zstd),
            "lz4" => Ok(Codec::Lz4),
            _ => Err(format!("unknown compression {s:?}: expected \"lz4\" or \"zstd\"")),
        }
    }
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

/// `data` as one LZ4 blob: [`LZ4_MAGIC`], then one LZ4 block.
pub fn compress_lz4(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; LZ4_MAGIC.len() + lz4_flex::block::get_maximum_output_size(data.len())];
    out[..LZ4_MAGIC.len()].copy_from_slice(&LZ4_MAGIC);
    let n = lz4_flex::block::compress_into(data, &mut out[LZ4_MAGIC.len()..])
        .expect("lz4: the output buffer has the block's maximum size");
    out.truncate(LZ4_MAGIC.len() + n);
    out
}

/// `data` compressed with `codec` (`level`: zstd's), whether or not it
/// came out shorter ([`encode_with`] decides that).
pub fn compress_with(data: &[u8], codec: Codec, level: i32) -> Vec<u8> {
    match codec {
        Codec::Zstd => compress(data, level),
        Codec::Lz4 => compress_lz4(data),
    }
}

/// How a blob is kept in a pack: compressed (a zstd frame or an LZ4
/// blob), or its bytes as they are when the codec cannot make them
/// smaller (hash-like or already compressed data). A stored blob as long
/// as its uncompressed length is raw: a compressed form of such data is
/// never written (see [`decode`]).
#[derive(Debug)]
pub enum Encoded<'a> {
    /// One zstd frame, shorter than the data.
    Zstd(Vec<u8>),
    /// One LZ4 blob ([`LZ4_MAGIC`] and a block), shorter than the data.
    Lz4(Vec<u8>),
    /// The data itself.
    Raw(&'a [u8]),
}

impl Encoded<'_> {
    /// The bytes to store.
    pub fn bytes(&self) -> &[u8] {
        match self {
            Encoded::Zstd(v) | Encoded::Lz4(v) => v,
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
    encode_with(data, Codec::Zstd, level)
}

/// Encode `data` for storing with `codec` (`level`: zstd's), or raw if
/// the codec does not make it shorter.
pub fn encode_with(data: &[u8], codec: Codec, level: i32) -> Encoded<'_> {
    let z = compress_with(data, codec, level);
    if z.len() >= data.len() {
        return Encoded::Raw(data);
    }
    match codec {
        Codec::Zstd => Encoded::Zstd(z),
        Codec::Lz4 => Encoded::Lz4(z),
    }
}

/// The blob whose stored bytes are `stored` and whose address is `hash`
/// ([`encode`]'s output): raw if it is `expected_len` bytes long and hashes
/// to `hash`, else compressed, its codec told by its first bytes (stores
/// written before raw blobs existed may hold a zstd frame exactly as long
/// as its data). The result is checked against `hash` either way.
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

/// Decompress one compressed blob (a zstd frame or an LZ4 blob, told by
/// its first bytes) that must yield exactly `expected_len` bytes.
pub fn decompress(data: &[u8], expected_len: usize) -> Result<Vec<u8>, ChunkError> {
    let mut out = vec![0u8; expected_len];
    decompress_into(data, &mut out)?;
    Ok(out)
}

/// [`decompress`] into `out`, which the blob must fill exactly: a blob
/// that would yield more is refused without writing past `out` (a
/// decompression bomb costs at most `out.len()` bytes of work), one that
/// yields less is a [`ChunkError::LengthMismatch`], one that starts with
/// neither codec's magic a [`ChunkError::Decompress`].
pub fn decompress_into(data: &[u8], out: &mut [u8]) -> Result<(), ChunkError> {
    let expected = out.len();
    let err = |reason: String| ChunkError::Decompress { clen: data.len(), expected, reason };
    let got = if data.starts_with(&ZSTD_MAGIC) {
        DECOMPRESSOR.with(|c| {
            let mut slot = c.borrow_mut();
            if slot.is_none() {
                *slot = Some(zstd::bulk::Decompressor::new().map_err(|e| err(format!("zstd: {e}")))?);
            }
            let d = slot.as_mut().expect("decompressor just created");
            d.decompress_to_buffer(data, out).map_err(|e| err(format!("zstd: {e}")))
        })?
    } else if data.starts_with(&LZ4_MAGIC) {
        lz4_flex::block::decompress_into(&data[LZ4_MAGIC.len()..], out).map_err(|e| err(format!("lz4: {e}")))?
    } else {
        let head = &data[..data.len().min(4)];
        return Err(err(format!(
            "it starts with {}, neither a zstd frame's magic ({}) nor an LZ4 blob's ({}): not a blob ckpt wrote",
            hex::encode(head),
            hex::encode(ZSTD_MAGIC),
            hex::encode(LZ4_MAGIC)
        )));
    };
    if got != expected {
        return Err(ChunkError::LengthMismatch { expected, actual: got });
    }
    Ok(())
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

    fn image_like(pages: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..pages * 4096 / 8)
            .flat_map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let v = match x & 7 {
                    0..=2 => 0,
                    3 | 4 => x >> 56,
                    5 | 6 => 0x7f00_0000_0000 | ((x >> 20) & 0xffffff8),
                    _ => x,
                };
                v.to_le_bytes()
            })
            .collect()
    }

    #[test]
    fn lz4_roundtrip_and_raw() {
        let data = image_like(4);
        for c in data.chunks(4096) {
            let e = encode_with(c, Codec::Lz4, DEFAULT_LEVEL);
            let Encoded::Lz4(b) = &e else { panic!("image-like page not shrunk by lz4") };
            assert!(b.starts_with(&LZ4_MAGIC));
            assert!(b.len() < c.len());
            assert_eq!(decode(b, c.len(), &Hash::of(c)).unwrap(), c);
            assert_eq!(decompress(b, c.len()).unwrap(), c);
        }
        // Sizes other than a page, and empty.
        for len in [0usize, 1, 13, 100, 4095, 65536 + 7] {
            let d: Vec<u8> = (0..len).map(|i| (i % 7) as u8).collect();
            let z = compress_lz4(&d);
            assert_eq!(decompress(&z, len).unwrap(), d, "len {len}");
        }
        // Hash-like data is stored raw, and reads back.
        let mut x = 1u64;
        let random: Vec<u8> = (0..512)
            .flat_map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                x.to_le_bytes()
            })
            .collect();
        let e = encode_with(&random, Codec::Lz4, DEFAULT_LEVEL);
        assert!(matches!(e, Encoded::Raw(_)));
        assert_eq!(decode(e.bytes(), random.len(), &Hash::of(&random)).unwrap(), random);
        // The codec's names.
        for c in [Codec::Zstd, Codec::Lz4] {
            assert_eq!(c.to_string().parse::<Codec>().unwrap(), c);
        }
        assert!("gzip".parse::<Codec>().unwrap_err().contains("lz4"));
    }

    /// The two codecs' blobs are told apart by their first bytes, whatever
    /// codec wrote them: a store whose codec was changed reads both.
    #[test]
    fn both_codecs_decode_side_by_side() {
        let data = image_like(8);
        let blobs: Vec<(Vec<u8>, &[u8])> = data
            .chunks(4096)
            .enumerate()
            .map(|(i, c)| (encode_with(c, if i % 2 == 0 { Codec::Zstd } else { Codec::Lz4 }, 1).bytes().to_vec(), c))
            .collect();
        for (i, (b, c)) in blobs.iter().enumerate() {
            assert!(b.starts_with(if i % 2 == 0 { &ZSTD_MAGIC } else { &LZ4_MAGIC }));
            assert_eq!(decode(b, 4096, &Hash::of(c)).unwrap(), *c);
        }
        assert_ne!(ZSTD_MAGIC, LZ4_MAGIC);
    }

    /// Hostile stored bytes are refused with an error, never a panic, a
    /// wrong length or more output than the catalog's length.
    #[test]
    fn hostile_blobs_are_refused() {
        let page = &image_like(1)[..];
        let h = Hash::of(page);
        let lz = compress_lz4(page);
        let zs = compress(page, 1);
        // Bad magic: neither codec's (the error names both).
        for bad in [&b""[..], b"\x00", b"abc", b"abcd", b"not a blob at all"] {
            let e = decode(bad, 4096, &h).unwrap_err().to_string();
            assert!(e.contains("neither a zstd frame") && e.contains(&hex::encode(LZ4_MAGIC)), "{e}");
        }
        // A different version of the LZ4 header is not LZ4.
        let mut v2 = lz.clone();
        v2[3] = 2;
        assert!(decode(&v2, 4096, &h).is_err());
        for z in [&lz, &zs] {
            // Wrong lengths: shorter or longer than the data.
            assert!(matches!(decompress(z, 4095), Err(ChunkError::Decompress { .. }) | Err(ChunkError::LengthMismatch { .. })));
            assert!(matches!(decompress(z, 4097), Err(ChunkError::LengthMismatch { .. }) | Err(ChunkError::Decompress { .. })));
            // Truncated anywhere: an error. One byte flipped anywhere: an
            // error, or (a bit the codec does not use) the page itself,
            // never other bytes: decode checks the address.
            for cut in 0..z.len() {
                assert!(decode(&z[..cut], 4096, &h).is_err(), "cut at {cut}");
            }
            for pos in 0..z.len() {
                let mut f = z.to_vec();
                f[pos] ^= 0x5a;
                if let Ok(d) = decode(&f, 4096, &h) {
                    assert_eq!(d, page, "flipped byte {pos}");
                }
                let mut out = vec![0u8; 4096];
                let _ = decompress_into(&f, &mut out);
            }
        }
        // Decompression bombs: 1 MiB of zeros in a few bytes, read with
        // the catalog's length of one page: refused, at most a page made.
        let zeros = vec![0u8; 1 << 20];
        for bomb in [compress_lz4(&zeros), compress(&zeros, 1)] {
            assert!(bomb.len() < 8192);
            let mut out = vec![0u8; 4096];
            assert!(decompress_into(&bomb, &mut out).is_err());
            assert!(decode(&bomb, 4096, &Hash::of(&zeros[..4096])).is_err());
        }
        // A hand-made LZ4 block whose match reaches before the output's
        // start (offset 0xffff with nothing written yet).
        let mut evil = LZ4_MAGIC.to_vec();
        evil.extend_from_slice(&[0x1f, b'x', 0xff, 0xff, 0xff, 0xff, 0x40]);
        let mut out = vec![0u8; 4096];
        assert!(decompress_into(&evil, &mut out).is_err());
        // A literal run longer than the input.
        let mut evil = LZ4_MAGIC.to_vec();
        evil.extend_from_slice(&[0xf0, 0xff, 0xff, 0x10, b'a']);
        assert!(decompress_into(&evil, &mut out).is_err());
    }
}
