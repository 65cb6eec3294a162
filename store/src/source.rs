//! Where a store's pack bytes come from: one [`PackSource`] per backend,
//! chosen once when the store is opened, as rustic's backends are: the
//! pack files of a directory ([`LocalPacks`]), or for an `s3://` store its
//! cache directory first and ranged GETs for the packs the cache lacks
//! ([`S3Packs`]). A reader asks for ranges of packs and decodes what comes
//! back the same way whichever source it is; verify asks the *origin* (the
//! pack files of a local store, S3 itself for an `s3://` one, never its
//! cache) for ranges, whole packs, trailers and the list of what exists,
//! and checks what comes back the same way whichever source it is.
//!
//! Only reads go through here. Writing a pack (and uploading it to S3 at
//! commit, under the S3 lock) is the writer's, and deleting one is gc's
//! (`Writer::remove_pack_files`, `Writer::remove_remote_packs`): both need
//! the store's locks, which a source does not hold.
//!
//! This module must never decode or trust what it reads (the reader checks
//! every blob against its address), and must never hand back a range
//! shorter than asked for: a short pack is an error naming it and the blob.

use std::collections::HashMap;
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use crate::pack::{self, TAIL_LEN};
use crate::reader::{Loc, open_pack};
use crate::remote::{self, Remote};
use crate::{Hash, Result, StoreError};

/// A pack trailer's entry: a blob's hash and its (offset, clen, ulen).
pub(crate) type TrailerEntry = (Hash, (u64, u32, u32));

/// The result of reading one pack of a batch, kept apart from the others'
/// (verify reports every missing pack, not the first).
pub(crate) type Each<T> = std::result::Result<T, String>;

/// The stored bytes of blobs, read from packs.
pub(crate) trait PackSource: Send + Sync {
    /// For each `(pack, blobs)` of `work`, where the pack was read from
    /// (its file or its S3 URL, for messages) and each blob's stored bytes,
    /// in order, each exactly `clen` long.
    fn read(&self, work: &[(String, Vec<Loc>)]) -> Result<Vec<(PathBuf, Vec<Bytes>)>>;
    /// How many packs one [`PackSource::read`] should carry (bounds the
    /// memory of fetched ranges).
    fn packs_at_once(&self) -> usize;
    /// The whole of pack `name` mapped (read ahead), where it is a local
    /// file (a local store's pack, an S3 store's cached one), with the
    /// path it was mapped from; `None` where it is not (then
    /// [`PackSource::read`] fetches its ranges). `first` names the blob
    /// wanted, for a missing pack's message. A caller slicing the map
    /// checks each range against its length.
    fn mapped(&self, name: &str, first: &Hash) -> Option<Result<Mapped>>;

    /// Where pack `name` lives at the origin: its file, or its S3 URL.
    fn location(&self, name: &str) -> String;
    /// The same, as a message names it: `pack file PATH`, or `pack URL`.
    fn label(&self, name: &str) -> String;
    /// Every pack at the origin, with its length: the pack files of the
    /// store's `packs/`, or one listing of the packs on S3.
    fn list(&self) -> Result<HashMap<String, u64>>;
    /// Like [`PackSource::read`], from the origin only (never a cache),
    /// with one result per pack: a missing or short pack is a sentence
    /// naming it, and does not hide the others.
    fn read_origin(&self, work: &[(String, Vec<Loc>)]) -> Vec<Each<Vec<Bytes>>>;
    /// Whole packs from the origin, one result per pack.
    fn read_whole(&self, names: &[String]) -> Vec<Each<Bytes>>;
    /// How many whole packs one [`PackSource::read_whole`] should carry.
    fn whole_at_once(&self) -> usize;
    /// The length and trailer of pack `name`, if the origin gives them
    /// without reading the pack (a local file's last bytes); `None` where it
    /// would cost a request per pack (S3, whose listing gives the lengths).
    fn trailer(&self, name: &str) -> Option<Each<(u64, Vec<TrailerEntry>)>>;
}

/// A pack file mapped whole ([`PackSource::mapped`]).
pub(crate) struct Mapped {
    /// Where it was mapped from.
    pub(crate) path: PathBuf,
    pub(crate) map: Bytes,
    /// Whether it was in the page cache before it was mapped (probed, not
    /// certain): its blobs can then be read in any order at no cost.
    pub(crate) cached: bool,
}

/// Whether pack file `f` of `len` bytes looks to be in the page cache: 16
/// pages spread over it are read with `RWF_NOWAIT` (which fails rather
/// than wait for the disk).
fn in_page_cache(f: &File, len: u64) -> bool {
    let mut page = [0u8; 4096];
    (0..16u64).all(|i| {
        let at = (len.saturating_sub(page.len() as u64) * i / 15) & !4095;
        let mut bufs = [std::io::IoSliceMut::new(&mut page)];
        let want = (len - at.min(len)).min(4096) as usize;
        matches!(rustix::io::preadv2(f, &mut bufs, at, rustix::io::ReadWriteFlags::NOWAIT), Ok(n) if n == want)
    })
}

/// The pack files under a store's directory.
pub(crate) struct LocalPacks {
    pub(crate) root: PathBuf,
}

/// An `s3://` store: a pack its cache directory holds is read there, any
/// other with ranged GETs (coalesced per pack).
pub(crate) struct S3Packs {
    pub(crate) local: LocalPacks,
    pub(crate) remote: Arc<Remote>,
}

/// The source of a store: S3 (through the cache) if it has a remote side.
pub(crate) fn for_store(root: &Path, remote: Option<&Arc<Remote>>) -> Arc<dyn PackSource> {
    let local = LocalPacks { root: root.to_path_buf() };
    match remote {
        Some(r) => Arc::new(S3Packs { local, remote: r.clone() }),
        None => Arc::new(local),
    }
}

fn truncated(path: &Path, loc: &Loc) -> StoreError {
    StoreError::Corrupt { pack: path.to_path_buf(), hash: loc.hash, reason: "pack file is truncated".into() }
}

impl LocalPacks {
    fn path(&self, name: &str) -> PathBuf {
        crate::pack::pack_path(&self.root, name)
    }

    /// One pack's blobs: one `pread` for a single blob, else the file
    /// mapped once and each blob a slice of the map.
    fn read_one(&self, name: &str, locs: &[Loc]) -> Result<(PathBuf, Vec<Bytes>)> {
        let path = self.path(name);
        let Some(first) = locs.first() else { return Ok((path, Vec::new())) };
        let f = open_pack(&path, &first.hash)?;
        if locs.len() == 1 {
            let mut buf = vec![0u8; first.clen as usize];
            f.read_exact_at(&mut buf, first.offset).map_err(|e| {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    truncated(&path, first)
                } else {
                    StoreError::io(format!("read pack file {}", path.display()), e)
                }
            })?;
            return Ok((path, vec![Bytes::from(buf)]));
        }
        let map = map_pack(&f, &path)?;
        let len = map.len() as u64;
        // Read ahead the span of the blobs asked for (`locs` are in offset
        // order): all of the pack for an eager restart, which asks for most
        // of it at once; one group of chunks for a lazy restart's fault,
        // which a whole-pack read ahead (34 MiB) would queue behind.
        let lo = locs.iter().map(|l| l.offset).min().unwrap_or(0).min(len);
        let hi = locs.iter().map(|l| l.offset.saturating_add(l.clen as u64)).max().unwrap_or(0).min(len);
        if hi > lo {
            let _ = map.advise_range(memmap2::Advice::WillNeed, lo as usize, (hi - lo) as usize);
        }
        let map = Bytes::from_owner(map);
        let mut out = Vec::with_capacity(locs.len());
        for loc in locs {
            let end = loc.offset.saturating_add(loc.clen as u64);
            if end > len {
                return Err(truncated(&path, loc));
            }
            out.push(map.slice(loc.offset as usize..end as usize));
        }
        Ok((path, out))
    }
}

/// Pack file `f` (at `path`) mapped whole, read-only; the caller advises
/// the kernel what to read ahead.
fn map_pack(f: &File, path: &Path) -> Result<memmap2::Mmap> {
    #[allow(unsafe_code)]
    // SAFETY: pack files are immutable once renamed into place; no
    // ckpt process writes to or truncates a named pack (gc deletes or
    // replaces whole files, which keeps the mapped inode alive). The
    // map is only read, and every blob read from it is verified.
    unsafe { memmap2::Mmap::map(f) }.map_err(|e| StoreError::io(format!("map pack file {}", path.display()), e))
}

impl LocalPacks {
    fn map_whole(&self, name: &str, first: &Hash) -> Result<Mapped> {
        let path = self.path(name);
        let f = open_pack(&path, first)?;
        let len = f.metadata().map_err(|e| StoreError::io(format!("stat pack file {}", path.display()), e))?.len();
        // Probed before the map's read-ahead starts.
        let cached = in_page_cache(&f, len);
        let map = map_pack(&f, &path)?;
        // Read ahead the whole pack: the blobs of an eager restart are most of it.
        let _ = map.advise(memmap2::Advice::WillNeed);
        Ok(Mapped { path, map: Bytes::from_owner(map), cached })
    }
}

impl PackSource for LocalPacks {
    fn read(&self, work: &[(String, Vec<Loc>)]) -> Result<Vec<(PathBuf, Vec<Bytes>)>> {
        work.iter().map(|(name, locs)| self.read_one(name, locs)).collect()
    }

    fn packs_at_once(&self) -> usize {
        usize::MAX
    }

    fn mapped(&self, name: &str, first: &Hash) -> Option<Result<Mapped>> {
        Some(self.map_whole(name, first))
    }

    fn location(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    fn label(&self, name: &str) -> String {
        format!("pack file {}", self.location(name))
    }

    fn list(&self) -> Result<HashMap<String, u64>> {
        Ok(self
            .pack_files()?
            .into_iter()
            .filter_map(|p| {
                let name = p.file_stem()?.to_str()?.to_string();
                let len = fs::metadata(&p).ok()?.len();
                Some((name, len))
            })
            .collect())
    }

    fn read_origin(&self, work: &[(String, Vec<Loc>)]) -> Vec<Each<Vec<Bytes>>> {
        work.iter()
            .map(|(name, locs)| match self.read_one(name, locs) {
                Ok((_, bufs)) => Ok(bufs),
                Err(StoreError::MissingPack { .. }) => Err(format!("{} is missing", self.label(name))),
                Err(e) => Err(e.to_string()),
            })
            .collect()
    }

    fn read_whole(&self, names: &[String]) -> Vec<Each<Bytes>> {
        use rayon::prelude::*;
        names
            .par_iter()
            .map(|n| fs::read(self.path(n)).map(Bytes::from).map_err(|e| format!("{} cannot be read: {e}", self.label(n))))
            .collect()
    }

    fn whole_at_once(&self) -> usize {
        rayon::current_num_threads()
    }

    fn trailer(&self, name: &str) -> Option<Each<(u64, Vec<TrailerEntry>)>> {
        let label = self.label(name);
        Some(File::open(self.path(name)).map_err(|e| format!("{label} cannot be opened: {e}")).and_then(|f| {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            read_trailer(&f, len).map(|t| (len, t)).map_err(|e| format!("{label}: {e}"))
        }))
    }
}

impl LocalPacks {
    /// Files under `packs/` named like a ckpt pack where a pack of that name
    /// belongs (`packs/XX/NAME.pack`); any other `.pack` file is warned
    /// about and left out.
    pub(crate) fn pack_files(&self) -> Result<Vec<PathBuf>> {
        let dir = self.root.join("packs");
        let mut out = Vec::new();
        let entries = fs::read_dir(&dir).map_err(|e| StoreError::io(format!("list {}", dir.display()), e))?;
        for d in entries.flatten() {
            if let Ok(files) = fs::read_dir(d.path()) {
                for f in files.flatten() {
                    let path = f.path();
                    let named_like_a_pack = path
                        .file_name()
                        .and_then(|n| n.to_str())
                        .and_then(|n| n.strip_suffix(".pack"))
                        .is_some_and(|n| crate::private::is_pack_name(n) && path == self.path(n));
                    if named_like_a_pack {
                        out.push(path);
                    } else if path.extension().is_some_and(|e| e == "pack") {
                        tracing::warn!(file = %path.display(), "ignoring a file in the store's packs/ that is not named like a ckpt pack");
                    }
                }
            }
        }
        out.sort();
        Ok(out)
    }
}

/// Just the trailer of a pack file of `len` bytes.
pub(crate) fn read_trailer(f: &File, len: u64) -> std::result::Result<Vec<TrailerEntry>, String> {
    let mut tail = [0u8; TAIL_LEN];
    if len >= TAIL_LEN as u64 {
        f.read_exact_at(&mut tail, len - TAIL_LEN as u64).map_err(|e| e.to_string())?;
    }
    let tlen = pack::parse_tail(&tail, len)?;
    let mut buf = vec![0u8; tlen as usize - TAIL_LEN];
    f.read_exact_at(&mut buf, len - tlen).map_err(|e| e.to_string())?;
    Ok(pack::parse_entries(&buf, len - tlen)?.into_iter().map(|e| (e.hash, (e.offset, e.clen, e.ulen))).collect())
}

impl PackSource for S3Packs {
    fn read(&self, work: &[(String, Vec<Loc>)]) -> Result<Vec<(PathBuf, Vec<Bytes>)>> {
        let mut out: Vec<Option<(PathBuf, Vec<Bytes>)>> = Vec::with_capacity(work.len());
        let mut far: Vec<usize> = Vec::new();
        for (i, (name, locs)) in work.iter().enumerate() {
            if self.local.path(name).exists() {
                out.push(Some(self.local.read_one(name, locs)?));
            } else {
                out.push(None);
                far.push(i);
            }
        }
        if !far.is_empty() {
            let req: Vec<(String, Vec<std::ops::Range<u64>>)> = far
                .iter()
                .map(|&i| {
                    let (name, locs) = &work[i];
                    (Remote::pack_rel(name), locs.iter().map(|l| l.offset..l.offset + l.clen as u64).collect())
                })
                .collect();
            let got = self.remote.get_ranges_many(&req)?;
            for (&i, bufs) in far.iter().zip(got) {
                let url = PathBuf::from(self.remote.object_url(&Remote::pack_rel(&work[i].0)));
                out[i] = Some((url, bufs));
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    fn packs_at_once(&self) -> usize {
        remote::CONCURRENCY
    }

    fn mapped(&self, name: &str, first: &Hash) -> Option<Result<Mapped>> {
        self.local.path(name).exists().then(|| self.local.map_whole(name, first))
    }

    fn location(&self, name: &str) -> String {
        self.remote.object_url(&Remote::pack_rel(name))
    }

    fn label(&self, name: &str) -> String {
        format!("pack {}", self.location(name))
    }

    fn list(&self) -> Result<HashMap<String, u64>> {
        self.remote.list_packs()
    }

    fn read_origin(&self, work: &[(String, Vec<Loc>)]) -> Vec<Each<Vec<Bytes>>> {
        let req: Vec<(String, Vec<std::ops::Range<u64>>)> = work
            .iter()
            .map(|(n, locs)| (Remote::pack_rel(n), locs.iter().map(|l| l.offset..l.offset + l.clen as u64).collect()))
            .collect();
        self.remote.get_ranges_each(&req).into_iter().map(|r| r.map_err(|e| e.to_string())).collect()
    }

    fn read_whole(&self, names: &[String]) -> Vec<Each<Bytes>> {
        let rels: Vec<String> = names.iter().map(|n| Remote::pack_rel(n)).collect();
        self.remote.get_many(&rels).into_iter().map(|r| r.map_err(|e| e.to_string())).collect()
    }

    fn whole_at_once(&self) -> usize {
        remote::CONCURRENCY / 2
    }

    fn trailer(&self, _name: &str) -> Option<Each<(u64, Vec<TrailerEntry>)>> {
        None
    }
}
