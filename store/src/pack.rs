//! Pack files: the on-disk container of blobs.
//!
//! Format (all integers little-endian):
//!
//! ```text
//! "CKPTPK01"                                   8-byte magic
//! blob*                                        each one zstd frame of the uncompressed blob
//! trailer:
//!   entry*   hash [32] | kind u8 | offset u64 | clen u32 | ulen u32     (49 bytes each)
//!   count    u32                               number of entries
//!   tlen     u32                               length of the whole trailer (entries + 16)
//!   "CKPTPKIX"                                 8-byte magic
//! ```
//!
//! A pack describes itself: the catalog's `blobs` rows for it can be rebuilt
//! from the trailer alone. A pack's name is the BLAKE3 hex of the whole file,
//! and it lives at `<root>/packs/<first 2 hex>/<name>.pack`. It is written in
//! `<root>/tmp/`, fsync'd, renamed into place and the directory fsync'd
//! before any catalog row names it.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use ckpt_chunker::Hash;

use serde::Serialize;

/// What a blob is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[repr(u8)]
pub enum BlobKind {
    /// A chunk of memory (or file) contents.
    Chunk = 0,
    /// Metadata: manifests, chunk lists.
    Meta = 1,
}

impl BlobKind {
    /// Decode the on-disk value.
    pub fn from_u8(v: u8) -> Option<BlobKind> {
        match v {
            0 => Some(BlobKind::Chunk),
            1 => Some(BlobKind::Meta),
            _ => None,
        }
    }
}

/// Magic at the start of every pack.
pub const PACK_MAGIC: &[u8; 8] = b"CKPTPK01";
/// Magic at the very end of every pack (after the trailer).
pub const INDEX_MAGIC: &[u8; 8] = b"CKPTPKIX";
/// Size of one trailer entry.
pub const ENTRY_LEN: usize = 32 + 1 + 8 + 4 + 4;
/// Size of the fixed tail of the trailer (count, tlen, magic).
pub const TAIL_LEN: usize = 4 + 4 + 8;

/// One blob as described by a pack's trailer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackEntry {
    /// Address (BLAKE3 of the uncompressed bytes).
    pub hash: Hash,
    /// What the blob is.
    pub kind: BlobKind,
    /// Offset of its zstd frame in the pack file.
    pub offset: u64,
    /// Compressed length.
    pub clen: u32,
    /// Uncompressed length.
    pub ulen: u32,
}

/// Path of pack `name` (64 hex digits) under store `root`.
pub fn pack_path(root: &Path, name: &str) -> PathBuf {
    root.join("packs")
        .join(name.get(..2).unwrap_or("xx"))
        .join(format!("{name}.pack"))
}

/// Parse the trailer of a whole pack file.
pub fn parse_index(pack: &[u8]) -> Result<Vec<PackEntry>, String> {
    if pack.len() < PACK_MAGIC.len() + TAIL_LEN || &pack[..8] != PACK_MAGIC {
        return Err("not a pack file (bad or missing CKPTPK01 header)".into());
    }
    let n = pack.len();
    let tail: &[u8; TAIL_LEN] = pack[n - TAIL_LEN..].try_into().expect("TAIL_LEN bytes");
    let tlen = parse_tail(tail, n as u64)?;
    parse_entries(&pack[n - tlen as usize..n - TAIL_LEN], n as u64 - tlen)
}

/// The trailer's length (entries and tail) that the last [`TAIL_LEN`]
/// bytes of a pack of `len` bytes give, checked against each other and
/// the pack: what [`parse_index`] and a check reading only a local
/// pack's last bytes (`verify --metadata-only`) both start from.
pub(crate) fn parse_tail(tail: &[u8; TAIL_LEN], len: u64) -> Result<u64, String> {
    if len < (PACK_MAGIC.len() + TAIL_LEN) as u64 {
        return Err("too short to be a pack file (truncated?)".into());
    }
    if &tail[8..] != INDEX_MAGIC {
        return Err("pack trailer missing (no CKPTPKIX at the end): file truncated?".into());
    }
    let count = u32::from_le_bytes(tail[0..4].try_into().expect("4 bytes")) as u64;
    let tlen = u32::from_le_bytes(tail[4..8].try_into().expect("4 bytes")) as u64;
    if tlen != count * ENTRY_LEN as u64 + TAIL_LEN as u64 || tlen > len - PACK_MAGIC.len() as u64 {
        return Err(format!("inconsistent trailer (count {count}, length {tlen})"));
    }
    Ok(tlen)
}

/// The entries of a trailer (its bytes before the tail), each checked:
/// a known kind, and data inside `[8, data_end)`.
pub(crate) fn parse_entries(entries: &[u8], data_end: u64) -> Result<Vec<PackEntry>, String> {
    let mut out = Vec::with_capacity(entries.len() / ENTRY_LEN);
    for e in entries.chunks_exact(ENTRY_LEN) {
        let hash = Hash::from_slice(&e[..32]).expect("32 bytes");
        let kind = BlobKind::from_u8(e[32]).ok_or_else(|| format!("bad blob kind {}", e[32]))?;
        let offset = u64::from_le_bytes(e[33..41].try_into().expect("8 bytes"));
        let clen = u32::from_le_bytes(e[41..45].try_into().expect("4 bytes"));
        let ulen = u32::from_le_bytes(e[45..49].try_into().expect("4 bytes"));
        if offset < 8 || offset + clen as u64 > data_end {
            return Err(format!("entry {hash} points outside the pack's data"));
        }
        out.push(PackEntry { hash, kind, offset, clen, ulen });
    }
    Ok(out)
}

/// A pack that is complete, durable and in its final place.
#[derive(Debug)]
pub(crate) struct FinishedPack {
    pub name: String,
    pub path: PathBuf,
    pub size: u64,
    pub entries: Vec<PackEntry>,
}

/// A pack whose bytes are all written in `<root>/tmp/`, not yet fsync'd
/// nor renamed into place.
#[derive(Debug)]
pub(crate) struct SealedPack {
    tmp_path: PathBuf,
    file: File,
    pub name: String,
    pub size: u64,
    pub entries: Vec<PackEntry>,
}

impl SealedPack {
    /// fsync, rename into `<root>/packs/hh/NAME.pack` and fsync the
    /// directories. On error the temporary file is removed.
    pub fn persist(self, root: &Path) -> std::io::Result<FinishedPack> {
        let r = self.persist_inner(root);
        if r.is_err() {
            let _ = fs::remove_file(&self.tmp_path);
        }
        r.map(|path| FinishedPack { name: self.name, path, size: self.size, entries: self.entries })
    }

    fn persist_inner(&self, root: &Path) -> std::io::Result<PathBuf> {
        self.file.sync_all()?;
        let path = pack_path(root, &self.name);
        let dir = path.parent().expect("pack path has a parent");
        if !dir.exists() {
            crate::private::create_dir_all(dir)?;
            sync_dir(&root.join("packs"))?;
        }
        fs::rename(&self.tmp_path, &path)?;
        sync_dir(dir)?;
        Ok(path)
    }
}

/// A pack being written in `<root>/tmp/`.
pub(crate) struct OpenPack {
    tmp_path: PathBuf,
    file: File,
    /// Bytes not written yet: written and hashed [`PACK_BUFFER`] at a
    /// time. (BLAKE3 fed blob by blob, ~1.5 KiB each, hashed 64 bytes at a
    /// time under the writer's lock: a tenth of a 1% checkpoint's CPU.)
    buf: Vec<u8>,
    hasher: blake3::Hasher,
    len: u64,
    pub entries: Vec<PackEntry>,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Bytes an [`OpenPack`] gathers before it writes and hashes them.
const PACK_BUFFER: usize = 1 << 20;

impl OpenPack {
    /// Start a new pack file in `tmp_dir`.
    pub fn create(tmp_dir: &Path) -> std::io::Result<OpenPack> {
        let tmp_path = tmp_dir.join(format!(
            "{}-{}-{}.pack.tmp",
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed),
            crate::now_ms()
        ));
        let file = crate::private::file_options()
            .write(true)
            .create_new(true)
            .open(&tmp_path)?;
        let mut p = OpenPack {
            tmp_path,
            file,
            buf: Vec::with_capacity(PACK_BUFFER),
            hasher: blake3::Hasher::new(),
            len: 0,
            entries: Vec::new(),
        };
        p.write(PACK_MAGIC)?;
        Ok(p)
    }

    fn write(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.buf.extend_from_slice(b);
        self.len += b.len() as u64;
        if self.buf.len() >= PACK_BUFFER {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes and hashes the buffered bytes.
    fn flush(&mut self) -> std::io::Result<()> {
        self.hasher.update(&self.buf);
        self.file.write_all(&self.buf)?;
        self.buf.clear();
        Ok(())
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Append one compressed blob.
    pub fn append(
        &mut self,
        kind: BlobKind,
        hash: Hash,
        compressed: &[u8],
        ulen: u32,
    ) -> std::io::Result<()> {
        let clen = u32::try_from(compressed.len())
            .map_err(|_| std::io::Error::other("compressed blob larger than 4 GiB"))?;
        let offset = self.len;
        self.write(compressed)?;
        self.entries.push(PackEntry {
            hash,
            kind,
            offset,
            clen,
            ulen,
        });
        Ok(())
    }

    /// Write the trailer, fsync, rename into `<root>/packs/hh/NAME.pack` and
    /// fsync the directories. On error the temporary file is removed.
    pub fn finish(self, root: &Path) -> std::io::Result<FinishedPack> {
        self.seal()?.persist(root)
    }

    /// Write the trailer and hand the file to the kernel (no fsync yet):
    /// the pack is complete in `tmp/` and named, not yet durable nor in
    /// place ([`SealedPack::persist`], which a writer runs in a thread of
    /// its own so that compression goes on while the disk writes). On
    /// error the temporary file is removed.
    pub fn seal(mut self) -> std::io::Result<SealedPack> {
        let r = self.seal_inner();
        if r.is_err() {
            let _ = fs::remove_file(&self.tmp_path);
        }
        r
    }

    fn seal_inner(&mut self) -> std::io::Result<SealedPack> {
        let mut trailer = Vec::with_capacity(self.entries.len() * ENTRY_LEN + TAIL_LEN);
        for e in &self.entries {
            trailer.extend_from_slice(&e.hash.0);
            trailer.push(e.kind as u8);
            trailer.extend_from_slice(&e.offset.to_le_bytes());
            trailer.extend_from_slice(&e.clen.to_le_bytes());
            trailer.extend_from_slice(&e.ulen.to_le_bytes());
        }
        let count = u32::try_from(self.entries.len())
            .map_err(|_| std::io::Error::other("too many blobs in one pack"))?;
        let tlen = u32::try_from(trailer.len() + TAIL_LEN)
            .map_err(|_| std::io::Error::other("pack trailer too large"))?;
        trailer.extend_from_slice(&count.to_le_bytes());
        trailer.extend_from_slice(&tlen.to_le_bytes());
        trailer.extend_from_slice(INDEX_MAGIC);
        self.write(&trailer)?;
        self.flush()?;
        let file = self.file.try_clone()?;
        Ok(SealedPack {
            tmp_path: self.tmp_path.clone(),
            file,
            name: self.hasher.finalize().to_hex().to_string(),
            size: self.len,
            entries: std::mem::take(&mut self.entries),
        })
    }

    /// Throw the pack away (delete its temporary file).
    pub fn discard(self) {
        let _ = fs::remove_file(&self.tmp_path);
    }
}

/// fsync a directory so that renames and creations in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pack of one 5-byte blob, with its entry's kind and offset given.
    fn pack(kind: u8, offset: u64) -> Vec<u8> {
        let mut p = PACK_MAGIC.to_vec();
        p.extend_from_slice(b"hello");
        p.extend_from_slice(Hash::of(b"hello").as_bytes());
        p.push(kind);
        p.extend_from_slice(&offset.to_le_bytes());
        p.extend_from_slice(&5u32.to_le_bytes());
        p.extend_from_slice(&5u32.to_le_bytes());
        p.extend_from_slice(&1u32.to_le_bytes());
        p.extend_from_slice(&((ENTRY_LEN + TAIL_LEN) as u32).to_le_bytes());
        p.extend_from_slice(INDEX_MAGIC);
        p
    }

    /// Whole packs and a pack's last bytes are parsed by the same checks.
    #[test]
    fn trailers_are_checked_whether_read_whole_or_from_the_tail() {
        // `verify --metadata-only`'s read of a local pack's last bytes.
        let tail_then_entries = |p: &[u8]| {
            let path = std::env::temp_dir().join(format!("ckpt-pack-test-{}", std::process::id()));
            std::fs::write(&path, p).unwrap();
            let f = std::fs::File::open(&path).unwrap();
            let _ = std::fs::remove_file(&path);
            let got = crate::source::read_trailer(&f, p.len() as u64)?;
            Ok(got.into_iter().map(|(hash, (offset, clen, ulen))| PackEntry { hash, kind: BlobKind::Chunk, offset, clen, ulen }).collect())
        };
        let good = pack(0, 8);
        for parse in [parse_index as fn(&[u8]) -> Result<Vec<PackEntry>, String>, tail_then_entries] {
            let e = parse(&good).unwrap();
            assert_eq!((e.len(), e[0].offset, e[0].clen, e[0].kind), (1, 8, 5, BlobKind::Chunk));
            assert!(parse(&pack(7, 8)).unwrap_err().contains("bad blob kind"));
            assert!(parse(&pack(0, 9)).unwrap_err().contains("outside the pack's data"));
            assert!(parse(&pack(0, 0)).unwrap_err().contains("outside the pack's data"));
            assert!(parse(&good[..good.len() - 1]).unwrap_err().contains("trailer missing"));
            let mut lying = good.clone();
            let n = lying.len();
            lying[n - 16..n - 12].copy_from_slice(&2u32.to_le_bytes());
            assert!(parse(&lying).unwrap_err().contains("inconsistent trailer"));
        }
    }
}
