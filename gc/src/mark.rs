//! Mark: every blob a generation needs.
//!
//! A generation needs its manifest blob, each process's image blob, every
//! node of each region's chunk-list tree ([`ckpt_engine::chunklist`]) and
//! every chunk those trees name, the bytes its fds held in flight and the
//! chunk lists of its deleted files (except [`Hash::ZERO_CHUNK`], which is never
//! stored). Nodes are content-addressed, so a node already marked (at the
//! same height in a tree) has its whole subtree marked: marking many
//! generations that share most of their memory reads each distinct node
//! once. Nodes are read level by level, in parallel, with
//! [`Store::read_blobs`] (which verifies every blob it reads).

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;

use ckpt_engine::chunklist::FANOUT;
use ckpt_engine::image::{GenerationManifest, ProcessImage};
use ckpt_store::{GenerationInfo, Hash, Store, StoreError};

use crate::error::{GcError, Result};

/// The blobs a set of generations needs.
#[derive(Debug, Default)]
pub struct Marker {
    /// Manifests, process images and chunk-list nodes.
    pub meta: HashSet<Hash>,
    /// Memory chunks (never [`Hash::ZERO_CHUNK`]).
    pub chunks: HashSet<Hash>,
    /// Nodes already expanded, with the number of levels below them.
    expanded: HashSet<(Hash, u32)>,
}

impl Marker {
    /// An empty mark.
    pub fn new() -> Marker {
        Marker::default()
    }

    /// Every blob marked (meta and chunks).
    pub fn live(&self) -> HashSet<Hash> {
        self.meta.union(&self.chunks).copied().collect()
    }

    /// Mark everything generation `g` needs. Fails (naming the blob) if a
    /// metadata blob is missing or damaged; chunks are not read.
    pub fn add(&mut self, store: &Store, g: &GenerationInfo) -> Result<()> {
        let unreadable = |what: String| GcError::Unreadable { generation: g.id, what };
        let read = |h: &Hash| store.read_blob(h).map_err(|e| unreadable(e.to_string()));
        let manifest: GenerationManifest = serde_json::from_slice(&read(&g.manifest)?)
            .map_err(|e| unreadable(format!("manifest blob {} is not a manifest: {e}", g.manifest)))?;
        self.meta.insert(g.manifest);
        // (top-level node, levels below it)
        let mut frontier: BTreeMap<u32, HashSet<Hash>> = BTreeMap::new();
        for p in &manifest.processes {
            if !self.meta.insert(p.image) {
                continue; // the same image in another generation: already marked
            }
            let image: ProcessImage = serde_json::from_slice(&read(&p.image)?).map_err(|e| {
                unreadable(format!("image blob {} of process {} is not a process image: {e}", p.image, p.pid))
            })?;
            for r in &image.regions {
                frontier.entry(r.depth).or_default().extend(r.segments.iter().copied());
            }
            // Fd data: bytes in flight (metadata blobs), deleted files' chunk lists.
            for f in &image.fds {
                let (meta, trees) = f.kind.data_blobs();
                self.meta.extend(meta);
                for (top, depth) in trees {
                    frontier.entry(depth).or_default().extend(top.iter().copied());
                }
            }
            // Temporary files kept with the image: their chunk lists.
            for t in &image.temp_files {
                if let ckpt_engine::tmpfiles::TempKind::File(d) = &t.kind {
                    frontier.entry(d.depth).or_default().extend(d.segments.iter().copied());
                }
            }
        }
        self.expand(store, g.id, frontier)
    }

    /// Expand tree nodes from the highest level down.
    fn expand(&mut self, store: &Store, generation: u64, mut frontier: BTreeMap<u32, HashSet<Hash>>) -> Result<()> {
        while let Some((depth, nodes)) = frontier.pop_last() {
            let todo: Vec<Hash> = nodes.into_iter().filter(|n| !self.expanded.contains(&(*n, depth))).collect();
            if todo.is_empty() {
                continue;
            }
            let out: Mutex<Vec<Hash>> = Mutex::new(Vec::new());
            store
                .read_blobs(&todo, |h, bytes| {
                    if bytes.len() % 32 != 0 || bytes.len() > FANOUT * 32 {
                        return Err(StoreError::callback(GcError::BadNode { node: *h, len: bytes.len(), max: FANOUT }));
                    }
                    let mut o = out.lock().unwrap_or_else(|e| e.into_inner());
                    o.extend(bytes.chunks_exact(32).map(|c| Hash::from_slice(c).expect("32 bytes")));
                    Ok(())
                })
                .map_err(|e| GcError::Unreadable { generation, what: e.to_string() })?;
            for n in todo {
                self.expanded.insert((n, depth));
                self.meta.insert(n);
            }
            let children = out.into_inner().unwrap_or_else(|e| e.into_inner());
            if depth == 0 {
                self.chunks.extend(children.into_iter().filter(|h| !h.is_zero_chunk()));
            } else {
                frontier.entry(depth - 1).or_default().extend(children);
            }
        }
        Ok(())
    }
}

/// Mark everything `gens` need.
pub fn mark(store: &Store, gens: &[GenerationInfo]) -> Result<Marker> {
    let mut m = Marker::new();
    for g in gens {
        m.add(store, g)?;
    }
    tracing::debug!(generations = gens.len(), meta = m.meta.len(), chunks = m.chunks.len(), "marked");
    Ok(m)
}
