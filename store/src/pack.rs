//! Pack files: the on-disk container of blobs.
//!
//! Format (all integers little-endian):
//!
//! ```text
//! "CKPTPK01"                                   8-byte magic
//! blob*                                        each one zstd frame or LZ4 blob of the uncompressed blob (or the blob raw)
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
    /// Offset of its stored bytes (raw, a zstd frame or an LZ4 blob) in
    /// the pack file.
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

/// A pack whose bytes are all handed to its writing thread: complete,
/// not yet durable nor in place. Its name (the BLAKE3 of the whole file)
/// comes from that thread once it has hashed the last bytes, before it
/// fsyncs.
#[derive(Debug)]
pub(crate) struct SealedPack {
    name_rx: std::sync::mpsc::Receiver<String>,
    name: Option<String>,
    thread: std::thread::JoinHandle<std::io::Result<PathBuf>>,
    pub size: u64,
    pub entries: Vec<PackEntry>,
}

impl SealedPack {
    /// The pack's name, once its thread has hashed the last bytes. None:
    /// the thread failed ([`SealedPack::persist`] gives its error).
    pub fn name(&mut self) -> Option<&str> {
        if self.name.is_none() {
            self.name = self.name_rx.recv().ok();
        }
        self.name.as_deref()
    }

    /// Waits until the pack is durable and in place (fsync'd, renamed into
    /// `<root>/packs/hh/NAME.pack`, the directories fsync'd). On error
    /// the temporary file is removed, and the error comes with the
    /// pack's entries (its blobs are not stored).
    pub fn persist(mut self) -> Result<FinishedPack, (std::io::Error, Vec<PackEntry>)> {
        let name = self.name().map(str::to_string);
        let path = match self.thread.join().unwrap_or_else(|_| Err(std::io::Error::other("the thread writing it panicked"))) {
            Ok(p) => p,
            Err(e) => return Err((e, self.entries)),
        };
        match name {
            Some(name) => Ok(FinishedPack { name, path, size: self.size, entries: self.entries }),
            None => Err((std::io::Error::other("the thread writing it gave no name"), self.entries)),
        }
    }
}

/// A pack being written in `<root>/tmp/`. Its bytes are gathered
/// [`PACK_BUFFER`] at a time and handed to a thread of its own, which
/// hashes them (the pack's name) and writes them with `O_DIRECT` where the
/// file system takes it: neither under the writer's lock (where a 1 GiB
/// checkpoint's appends waited for them), and with no copy into the page
/// cache (the copy into new page-cache pages was a quarter to a half of a
/// 1 GiB first checkpoint's CPU on this machine kind, whose fresh pages
/// are slow to touch).
pub(crate) struct OpenPack {
    tmp_path: PathBuf,
    /// The bytes not handed to the thread yet (always less than a block).
    cur: Block,
    tx: Option<std::sync::mpsc::SyncSender<ToWriter>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<PathBuf>>>,
    len: u64,
    pub entries: Vec<PackEntry>,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Bytes an [`OpenPack`] gathers before its thread writes and hashes
/// them: a multiple of any file system's block size, so that every write
/// but the last may be `O_DIRECT`.
const PACK_BUFFER: usize = 1 << 20;
/// The alignment `O_DIRECT` asks of memory, file offsets and lengths.
const DIRECT_ALIGN: usize = 4096;
/// Blocks a pack's thread may have queued (the appends wait beyond).
const QUEUED: usize = 8;

/// [`PACK_BUFFER`] bytes whose first is aligned for `O_DIRECT` (a vector
/// one alignment longer, used from its first aligned byte); kept in a
/// pool, since new pages are slow to touch.
struct Block {
    v: Vec<u8>,
    off: usize,
    len: usize,
}

static POOL: std::sync::Mutex<Vec<Block>> = std::sync::Mutex::new(Vec::new());
/// Blocks kept in the pool at most.
const POOL_MAX: usize = 2 * QUEUED + 4;

impl Block {
    fn take() -> Block {
        let pooled = POOL.lock().unwrap_or_else(|e| e.into_inner()).pop();
        pooled.unwrap_or_else(|| {
            let v = vec![0u8; PACK_BUFFER + DIRECT_ALIGN];
            let off = v.as_ptr().align_offset(DIRECT_ALIGN);
            Block { v, off, len: 0 }
        })
    }

    fn give_back(mut self) {
        self.len = 0;
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < POOL_MAX {
            pool.push(self);
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.v[self.off..self.off + self.len]
    }

    /// Appends as much of `b` as fits; returns how much did.
    fn fill(&mut self, b: &[u8]) -> usize {
        let n = b.len().min(PACK_BUFFER - self.len);
        let at = self.off + self.len;
        self.v[at..at + n].copy_from_slice(&b[..n]);
        self.len += n;
        n
    }

    fn is_full(&self) -> bool {
        self.len == PACK_BUFFER
    }
}

/// What a pack's thread is handed.
enum ToWriter {
    /// [`PACK_BUFFER`] bytes, the next of the file.
    Block(Block),
    /// The last bytes: then name the pack, make it durable and put it in
    /// place under this root.
    Last(Block, PathBuf, Vec<std::sync::mpsc::SyncSender<String>>),
}

/// The thread of one pack: hashes and writes what it is handed, in
/// order; at the last bytes, names the pack, fsyncs it and renames it
/// into place. Without the last bytes (the pack was dropped) it stops.
/// On error the temporary file is removed.
fn pack_thread(mut file: File, tmp_path: PathBuf, mut direct: bool, rx: std::sync::mpsc::Receiver<ToWriter>) -> std::io::Result<PathBuf> {
    let mut hasher = blake3::Hasher::new();
    let mut failed: Option<std::io::Error> = None;
    let r = loop {
        match rx.recv() {
            Ok(ToWriter::Block(b)) => {
                if failed.is_none() {
                    hasher.update(b.bytes());
                    if let Err(e) = write_block(&mut file, &mut direct, b.bytes()) {
                        failed = Some(e);
                    }
                }
                b.give_back();
            }
            Ok(ToWriter::Last(b, root, name_txs)) => {
                if let Some(e) = failed {
                    break Err(e);
                }
                hasher.update(b.bytes());
                let name = hasher.finalize().to_hex().to_string();
                // The last write is not a whole block: through the page cache.
                let r = set_direct(&file, false).and_then(|()| file.write_all(b.bytes()));
                b.give_back();
                if let Err(e) = r {
                    break Err(e);
                }
                for tx in name_txs {
                    let _ = tx.send(name.clone());
                }
                break persist(&file, &tmp_path, &root, &name);
            }
            Err(_) => break Err(std::io::Error::other("the pack was discarded")),
        }
    };
    if r.is_err() {
        let _ = fs::remove_file(&tmp_path);
    }
    r
}

/// Writes one block, `O_DIRECT` while the file system takes it (a file
/// system that refuses it is written through the page cache from then).
fn write_block(file: &mut File, direct: &mut bool, b: &[u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < b.len() {
        match file.write(&b[done..]) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // A short direct write leaves an unaligned rest; a file
            // system may refuse direct writes only when they are made.
            Err(e) if *direct && e.raw_os_error() == Some(libc_einval()) => {
                set_direct(file, false)?;
                *direct = false;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn libc_einval() -> i32 {
    nix::errno::Errno::EINVAL as i32
}

/// Sets or clears `O_DIRECT` on an open file.
fn set_direct(file: &File, on: bool) -> std::io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL).map_err(std::io::Error::from)?);
    let want = if on { flags | OFlag::O_DIRECT } else { flags - OFlag::O_DIRECT };
    if want != flags {
        fcntl(fd, FcntlArg::F_SETFL(want)).map_err(std::io::Error::from)?;
    }
    Ok(())
}

/// fsync, rename into `<root>/packs/hh/NAME.pack` and fsync the directories.
fn persist(file: &File, tmp_path: &Path, root: &Path, name: &str) -> std::io::Result<PathBuf> {
    file.sync_all()?;
    let path = pack_path(root, name);
    let dir = path.parent().expect("pack path has a parent");
    if !dir.exists() {
        crate::private::create_dir_all(dir)?;
        sync_dir(&root.join("packs"))?;
    }
    fs::rename(tmp_path, &path)?;
    sync_dir(dir)?;
    Ok(path)
}

impl OpenPack {
    /// Start a new pack file in `tmp_dir`, and its thread.
    pub fn create(tmp_dir: &Path) -> std::io::Result<OpenPack> {
        let tmp_path = tmp_dir.join(format!(
            "{}-{}-{}.pack.tmp",
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed),
            crate::now_ms()
        ));
        let file = crate::private::file_options().write(true).create_new(true).open(&tmp_path)?;
        // O_DIRECT set once the file exists: a file system without it
        // refuses it (EINVAL), and an open with O_DIRECT there would have
        // created the file before refusing (the fallback's create then
        // found it: Linux 6.1's ramfs, seen in the soft-dirty VM test).
        let direct = match set_direct(&file, true) {
            Ok(()) => true,
            Err(e) if e.raw_os_error() == Some(libc_einval()) => false,
            Err(e) => {
                let _ = fs::remove_file(&tmp_path);
                return Err(e);
            }
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUED);
        let path = tmp_path.clone();
        let thread = match std::thread::Builder::new().name("ckpt-pack-write".into()).spawn(move || pack_thread(file, path, direct, rx)) {
            Ok(t) => t,
            Err(e) => {
                let _ = fs::remove_file(&tmp_path);
                return Err(e);
            }
        };
        let mut p = OpenPack { tmp_path, cur: Block::take(), tx: Some(tx), thread: Some(thread), len: 0, entries: Vec::new() };
        p.write(PACK_MAGIC)?;
        Ok(p)
    }

    fn write(&mut self, mut b: &[u8]) -> std::io::Result<()> {
        self.len += b.len() as u64;
        while !b.is_empty() {
            let n = self.cur.fill(b);
            b = &b[n..];
            if self.cur.is_full() {
                let full = std::mem::replace(&mut self.cur, Block::take());
                self.send(ToWriter::Block(full))?;
            }
        }
        Ok(())
    }

    fn send(&mut self, m: ToWriter) -> std::io::Result<()> {
        let sent = self.tx.as_ref().is_some_and(|tx| tx.send(m).is_ok());
        if sent {
            return Ok(());
        }
        // The thread ended: its error says why.
        self.tx = None;
        let e = match self.thread.take().map(|t| t.join()) {
            Some(Ok(Err(e))) => e,
            _ => std::io::Error::other("the thread writing the pack ended"),
        };
        Err(e)
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
        self.seal(root)?.persist().map_err(|(e, _)| e)
    }

    /// Write the trailer and hand the last bytes to the pack's thread,
    /// which names the pack, makes it durable and puts it in place under
    /// `root` ([`SealedPack::persist`] waits for it), so that compression
    /// goes on while the disk writes. On error the temporary file is
    /// removed.
    pub fn seal(self, root: &Path) -> std::io::Result<SealedPack> {
        self.seal_named(root, None)
    }

    /// [`OpenPack::seal`], the pack's name also sent to `also` once known.
    pub fn seal_named(mut self, root: &Path, also: Option<std::sync::mpsc::SyncSender<String>>) -> std::io::Result<SealedPack> {
        let r = self.seal_inner(root, also);
        if r.is_err() {
            self.tx = None;
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
            let _ = fs::remove_file(&self.tmp_path);
        }
        r
    }

    fn seal_inner(&mut self, root: &Path, also: Option<std::sync::mpsc::SyncSender<String>>) -> std::io::Result<SealedPack> {
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
        let (name_tx, name_rx) = std::sync::mpsc::sync_channel(1);
        let last = std::mem::replace(&mut self.cur, Block::take());
        self.send(ToWriter::Last(last, root.to_path_buf(), std::iter::once(name_tx).chain(also).collect()))?;
        self.tx = None;
        let thread = self.thread.take().ok_or_else(|| std::io::Error::other("the thread writing the pack ended"))?;
        Ok(SealedPack {
            name_rx,
            name: None,
            thread,
            size: self.len,
            entries: std::mem::take(&mut self.entries),
        })
    }

    /// Throw the pack away (delete its temporary file).
    pub fn discard(mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = fs::remove_file(&self.tmp_path);
    }
}

impl Drop for OpenPack {
    fn drop(&mut self) {
        std::mem::replace(&mut self.cur, Block { v: Vec::new(), off: 0, len: 0 }).give_back_if_real();
    }
}

impl Block {
    fn give_back_if_real(self) {
        if !self.v.is_empty() {
            self.give_back();
        }
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

    /// A pack of several blocks (written O_DIRECT where the file system
    /// takes it) and a last partial one: named by the BLAKE3 of its
    /// bytes, in place, its blobs where its trailer says.
    #[test]
    fn a_pack_of_many_blocks_is_whole_and_named_by_its_bytes() {
        let d = tempfile::tempdir().unwrap();
        let (tmp, root) = (d.path().join("tmp"), d.path().join("root"));
        std::fs::create_dir_all(&tmp).unwrap();
        std::fs::create_dir_all(root.join("packs")).unwrap();
        let mut open = OpenPack::create(&tmp).unwrap();
        // Blobs of odd sizes, so that blocks end inside them.
        let blobs: Vec<Vec<u8>> = (0..700u32).map(|i| (0..(3000 + i * 7)).map(|k| (k ^ i) as u8).collect()).collect();
        for b in &blobs {
            open.append(BlobKind::Chunk, Hash::of(b), b, b.len() as u32).unwrap();
        }
        let f = open.finish(&root).unwrap();
        let bytes = std::fs::read(&f.path).unwrap();
        assert!(bytes.len() > 2 * PACK_BUFFER, "the test must span several blocks");
        assert_eq!(f.size, bytes.len() as u64);
        assert_eq!(f.name, blake3::hash(&bytes).to_hex().to_string());
        assert_eq!(f.path, pack_path(&root, &f.name));
        let entries = parse_index(&bytes).unwrap();
        assert_eq!(entries.len(), blobs.len());
        for (e, b) in entries.iter().zip(&blobs) {
            assert_eq!(&bytes[e.offset as usize..e.offset as usize + e.clen as usize], &b[..]);
        }
        assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0, "the temporary file is gone");
        // A discarded pack leaves nothing behind.
        let mut open = OpenPack::create(&tmp).unwrap();
        open.append(BlobKind::Chunk, Hash::of(&blobs[0]), &blobs[0], blobs[0].len() as u32).unwrap();
        open.discard();
        assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0);
    }
}
