//! The raw speeds a benchmark's figures are compared with, measured in the
//! same run on the same kind of data: memcpy, BLAKE3, the store's codec
//! (zstd or LZ4: [`codec`], the one a store made by this build's `ckpt`
//! uses) and the store's chunk encoding, one thread or all cores; and the
//! AEADs a sealed store could use ([`Aead`]), per core.

use std::time::Instant;

use ckpt_chunker::Codec;
use rayon::prelude::*;

use crate::{PAGE, Rng, fill_page, gbps};

/// The codec of a store made by this build's `ckpt` in this environment
/// (`CKPT_COMPRESSION`, else the default): the one whose speed bounds
/// its checkpoint and restart.
pub fn codec() -> Codec {
    ckpt_store::compression_requested().unwrap_or_else(|e| panic!("{e}"))
}

/// Bytes of data the ceilings are measured on: big enough to leave the
/// caches, small enough to take a second or two.
pub const SAMPLE: usize = 256 << 20;

/// A buffer of the benchmark programs' page contents (see [`fill_page`]).
pub struct Sample {
    data: Vec<u8>,
}

/// GB/s of `f` over `bytes`.
fn rate(bytes: usize, f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    gbps(bytes as u64, t.elapsed())
}

impl Sample {
    /// [`SAMPLE`] bytes of image-like pages, or hash-like ones with `hash`.
    pub fn new(hash: bool) -> Sample {
        let mut data = vec![0u8; SAMPLE];
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for (i, p) in data.chunks_exact_mut(PAGE).enumerate() {
            fill_page(&mut rng, p, i as u64, hash);
        }
        Sample { data }
    }

    /// Filling fresh memory on all cores: the sample copied, 1 MiB at a
    /// time, into a new zeroed allocation (mapped untouched by the
    /// allocator), so each page is faulted in, zeroed and written once,
    /// as a restart fills the memory it restores. The unmapping is not
    /// timed.
    pub fn fill_fresh_all(&self) -> f64 {
        let n = self.data.len();
        let mut kept = Vec::new();
        let r = rate(n, || {
            let mut dst = vec![0u8; n];
            dst.par_chunks_mut(1 << 20).zip(self.data.par_chunks(1 << 20)).for_each(|(d, s)| d.copy_from_slice(s));
            kept = std::hint::black_box(dst);
        });
        drop(kept);
        r
    }

    /// memcpy into memory already faulted in (the copy a restart or a
    /// capture makes lands in pages that exist).
    pub fn memcpy(&self) -> f64 {
        let mut dst = vec![0u8; self.data.len()];
        dst.copy_from_slice(&self.data);
        rate(self.data.len(), || {
            dst.copy_from_slice(&self.data);
            std::hint::black_box(&dst);
        })
    }

    /// BLAKE3 of every `chunk` bytes on one thread.
    pub fn blake3_1(&self, chunk: usize) -> f64 {
        rate(self.data.len(), || {
            for c in self.data.chunks(chunk) {
                std::hint::black_box(blake3::hash(c));
            }
        })
    }

    /// BLAKE3 of every `chunk` bytes on all cores, as ckpt's chunker does.
    pub fn blake3_all(&self, chunk: usize) -> f64 {
        rate(self.data.len(), || {
            std::hint::black_box(ckpt_chunker::hash_chunks(&self.data, chunk));
        })
    }

    /// zstd at `level` of every `chunk` bytes of the first 64 MiB on one
    /// thread, and the compressed size over the input size.
    pub fn zstd_1(&self, chunk: usize, level: i32) -> (f64, f64) {
        let part = &self.data[..64 << 20];
        let mut csize = 0;
        let r = rate(part.len(), || {
            for c in part.chunks(chunk) {
                csize += zstd::bulk::compress(c, level).unwrap().len();
            }
        });
        (r, csize as f64 / part.len() as f64)
    }

    /// zstd at `level` of every `chunk` bytes on all cores.
    pub fn zstd_all(&self, chunk: usize, level: i32) -> f64 {
        rate(self.data.len(), || {
            let n: usize = self.data.par_chunks(chunk).map(|c| zstd::bulk::compress(c, level).unwrap().len()).sum();
            std::hint::black_box(n);
        })
    }

    /// zstd decompression of every `chunk` bytes (compressed at `level`),
    /// of the first 64 MiB on one thread, or of all of it on all cores.
    pub fn unzstd(&self, chunk: usize, level: i32, all_cores: bool) -> f64 {
        let part = if all_cores { &self.data[..] } else { &self.data[..64 << 20] };
        let comp: Vec<Vec<u8>> = part.par_chunks(chunk).map(|c| zstd::bulk::compress(c, level).unwrap()).collect();
        rate(part.len(), || {
            let n: usize = if all_cores {
                comp.par_iter().map_init(|| zstd::bulk::Decompressor::new().unwrap(), |d, z| d.decompress(z, chunk).unwrap().len()).sum()
            } else {
                let mut d = zstd::bulk::Decompressor::new().unwrap();
                comp.iter().map(|z| d.decompress(z, chunk).unwrap().len()).sum()
            };
            std::hint::black_box(n);
        })
    }

    /// `codec`'s compression (zstd at the store's level) of every `chunk`
    /// bytes on all cores, each chunk one frame.
    pub fn compress_all(&self, chunk: usize, codec: Codec) -> f64 {
        match codec {
            Codec::Zstd => self.zstd_all(chunk, ckpt_chunker::DEFAULT_LEVEL),
            Codec::Lz4 => rate(self.data.len(), || {
                let n: usize = self.data.par_chunks(chunk).map(|c| ckpt_chunker::compress_lz4(c).len()).sum();
                std::hint::black_box(n);
            }),
        }
    }

    /// `codec`'s decompression of every `chunk` bytes (as
    /// [`ckpt_chunker::decompress_into`] does it, into a reused buffer, no
    /// hash check) on all cores.
    pub fn decompress_all(&self, chunk: usize, codec: Codec) -> f64 {
        let comp: Vec<Vec<u8>> = self.data.par_chunks(chunk).map(|c| ckpt_chunker::compress_with(c, codec, ckpt_chunker::DEFAULT_LEVEL)).collect();
        rate(self.data.len(), || {
            comp.par_iter().for_each_init(|| vec![0u8; chunk], |out, z| ckpt_chunker::decompress_into(z, out).unwrap());
        })
    }

    /// The store's chunk encoding (zstd at its level, or raw when zstd
    /// does not shrink a chunk) and decoding (with the check of each
    /// chunk's address) of every page, on all cores.
    pub fn encode_decode(&self) -> (f64, f64) {
        self.encode_decode_with(Codec::Zstd)
    }

    /// [`Sample::encode_decode`] with `codec`.
    pub fn encode_decode_with(&self, codec: Codec) -> (f64, f64) {
        let mut enc = Vec::new();
        let encode = rate(self.data.len(), || {
            enc = self.data.par_chunks(PAGE).map(|c| ckpt_chunker::encode_with(c, codec, ckpt_chunker::DEFAULT_LEVEL).bytes().to_vec()).collect();
        });
        let hashes = ckpt_chunker::hash_chunks(&self.data, PAGE);
        let decode = rate(self.data.len(), || {
            enc.par_iter().zip(hashes.par_iter()).for_each(|(e, h)| {
                std::hint::black_box(ckpt_chunker::decode(e, PAGE, h).unwrap());
            });
        });
        (encode, decode)
    }

    /// Sealing and opening (GB/s, one thread) of every 4 KiB page of the
    /// first 64 MiB with `aead`, in place, a fresh counter nonce per page
    /// and 48 bytes of associated data (as the store seals a blob).
    pub fn aead_1(&self, aead: Aead) -> (f64, f64) {
        let part = &self.data[..64 << 20];
        let mut buf = part.to_vec();
        let mut tags = vec![[0u8; 16]; part.len() / PAGE];
        let aad = [7u8; 48];
        let key = [9u8; 32];
        let nonce = |i: usize| {
            let mut n = [0u8; 24];
            n[..8].copy_from_slice(&(i as u64).to_le_bytes());
            n
        };
        match aead {
            Aead::XChaCha20Poly1305 => {
                use chacha20poly1305::aead::AeadInPlace;
                use chacha20poly1305::{KeyInit, XChaCha20Poly1305};
                let c = XChaCha20Poly1305::new((&key).into());
                let s = rate(part.len(), || {
                    for (i, (p, t)) in buf.chunks_mut(PAGE).zip(tags.iter_mut()).enumerate() {
                        t.copy_from_slice(&c.encrypt_in_place_detached((&nonce(i)).into(), &aad, p).unwrap());
                    }
                });
                let o = rate(part.len(), || {
                    for (i, (p, t)) in buf.chunks_mut(PAGE).zip(tags.iter()).enumerate() {
                        c.decrypt_in_place_detached((&nonce(i)).into(), &aad, p, t.into()).unwrap();
                    }
                });
                (s, o)
            }
            Aead::RustCryptoAes256Gcm => {
                use aes_gcm::aead::AeadInPlace;
                use aes_gcm::{Aes256Gcm, KeyInit};
                let c = Aes256Gcm::new((&key).into());
                let s = rate(part.len(), || {
                    for (i, (p, t)) in buf.chunks_mut(PAGE).zip(tags.iter_mut()).enumerate() {
                        t.copy_from_slice(&c.encrypt_in_place_detached(nonce(i)[..12].into(), &aad, p).unwrap());
                    }
                });
                let o = rate(part.len(), || {
                    for (i, (p, t)) in buf.chunks_mut(PAGE).zip(tags.iter()).enumerate() {
                        c.decrypt_in_place_detached(nonce(i)[..12].into(), &aad, p, t.into()).unwrap();
                    }
                });
                (s, o)
            }
            Aead::RingAes256Gcm => {
                use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, Tag, UnboundKey};
                let c = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key).unwrap());
                let n12 = |i: usize| Nonce::assume_unique_for_key(nonce(i)[..12].try_into().unwrap());
                let s = rate(part.len(), || {
                    for (i, (p, t)) in buf.chunks_mut(PAGE).zip(tags.iter_mut()).enumerate() {
                        t.copy_from_slice(c.seal_in_place_separate_tag(n12(i), Aad::from(&aad), p).unwrap().as_ref());
                    }
                });
                let o = rate(part.len(), || {
                    for (i, (p, t)) in buf.chunks_mut(PAGE).zip(tags.iter()).enumerate() {
                        let tag = Tag::try_from(&t[..]).unwrap();
                        c.open_in_place_separate_tag(n12(i), Aad::from(&aad), tag, p, 0..).unwrap();
                    }
                });
                (s, o)
            }
        }
    }
}

/// The AEADs [`Sample::aead_1`] measures.
#[derive(Clone, Copy, Debug)]
pub enum Aead {
    /// `chacha20poly1305`'s XChaCha20-Poly1305 (the store's first scheme).
    XChaCha20Poly1305,
    /// RustCrypto `aes-gcm` (AES-NI and CLMUL detected at run time).
    RustCryptoAes256Gcm,
    /// `ring`'s AES-256-GCM (BoringSSL's assembly, detected at run time).
    RingAes256Gcm,
}
