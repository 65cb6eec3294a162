//! A region's chunk list, stored as a tree of small blobs.
//!
//! Leaves hold up to [`FANOUT`] chunk hashes (1 KiB); inner nodes hold up
//! to [`FANOUT`] hashes of nodes below; the region records the top level
//! (at most [`TOP_MAX`] hashes) and the number of inner levels under it.
//! Every node is content-addressed, so a generation that changed a few
//! pages stores a few leaves and the path above them: the catalog grows
//! with the change, not with the size of the process.

use ckpt_chunker::Hash;
use ckpt_store::{BlobSink, Store};
use rayon::prelude::*;

use crate::error::{EngineError, Result};
use crate::pages::SparseChunks;

/// Hashes per node.
pub const FANOUT: usize = 32;
/// Most hashes in a region's top level.
pub const TOP_MAX: usize = 64;

fn node_bytes(hashes: &[Hash]) -> Vec<u8> {
    hashes.iter().flat_map(|h| h.0).collect()
}

/// Stores `chunks` as a tree; returns the top level and the inner depth.
pub fn store(writer: &dyn BlobSink, chunks: &[Hash]) -> Result<(Vec<Hash>, u32)> {
    let mut level: Vec<Hash> = chunks.chunks(FANOUT).map(|n| writer.put_meta(&node_bytes(n))).collect::<Result<_, _>>()?;
    let mut depth = 0;
    while level.len() > TOP_MAX {
        level = level.chunks(FANOUT).map(|n| writer.put_meta(&node_bytes(n))).collect::<Result<_, _>>()?;
        depth += 1;
    }
    Ok((level, depth))
}

/// The hash of a full node over nothing but zero chunks, per height:
/// `[0]` is [`Hash::ZERO_CHUNK`] itself (height 0: a chunk), `[h]` a node
/// whose `FANOUT` children are all `[h - 1]`. Addresses are those
/// [`BlobSink::put_meta`] gives (a plain BLAKE3 of the node's bytes).
pub fn zero_nodes(height: usize) -> Vec<Hash> {
    let mut z = vec![Hash::ZERO_CHUNK];
    for h in 1..=height {
        z.push(Hash::of(&node_bytes(&[z[h - 1]; FANOUT])));
    }
    z
}

/// Stores a sparse chunk list as the same tree [`store`] makes of its
/// dense form, writing only the nodes above chunks that hold data (and one
/// zero node per height).
pub fn store_sparse(writer: &dyn BlobSink, chunks: &SparseChunks) -> Result<(Vec<Hash>, u32)> {
    Ok(store_sparse_from(writer, chunks, None)?.0)
}

/// The nodes of a stored tree that are not zero nodes, per level (leaves
/// first): `(index in the level, hash)`, in index order. What
/// [`store_sparse_from`] needs of the previous tree of a region to store
/// the next one by its changes.
pub type Levels = Vec<Vec<(u64, Hash)>>;

/// [`store_sparse`], given the chunk list and [`Levels`] of the tree
/// stored before for the same region (`prev`, whose nodes the store must
/// still hold): a node whose children are those of the node at the same
/// place in `prev` is that node, neither hashed nor looked up again. A 1%
/// change of 1 GiB at random rewrites about a quarter of the 8,192 leaves;
/// the other nodes were hashed and looked up one by one before. The nodes
/// to write are hashed and stored in parallel. Returns the tree and its
/// levels.
pub fn store_sparse_from<'a>(writer: &dyn BlobSink, chunks: &SparseChunks, prev: Option<(&'a SparseChunks, &'a Levels)>) -> Result<((Vec<Hash>, u32), Levels)> {
    let prev = prev.filter(|(c, _)| c.len == chunks.len);
    let mut levels: Levels = Vec::new();
    let mut zeros = vec![Hash::ZERO_CHUNK];
    // The level below: its length, and its nodes that are not zero nodes.
    let mut len = chunks.len;
    let mut explicit: &[(u64, Hash)] = &chunks.entries;
    let mut depth: u32 = 0;
    loop {
        // The previous tree's level below and this level.
        let none: &[(u64, Hash)] = &[];
        let level_of = |l: &'a Levels, i: usize| l.get(i).map_or(none, |v| &v[..]);
        let (prev_below, prev_here) = match prev {
            Some((c, l)) if levels.is_empty() => (&c.entries[..], level_of(l, 0)),
            Some((_, l)) => (level_of(l, levels.len() - 1), level_of(l, levels.len())),
            None => (none, none),
        };
        let zero_child = *zeros.last().expect("zeros starts with one");
        let zero_node_bytes = node_bytes(&[zero_child; FANOUT]);
        let zero_node = Hash::of(&zero_node_bytes);
        let mut zero_used = false;
        let n = len.div_ceil(FANOUT as u64);
        // Each node of this level that is not a zero node: its hash if
        // the previous tree has it, else its bytes to store.
        let mut up: Vec<(u64, Option<Hash>, Vec<u8>)> = Vec::new();
        let (mut k, mut pk, mut pu) = (0, 0, 0);
        let mut node = 0;
        while node < n {
            let lo = node * FANOUT as u64;
            let hi = (lo + FANOUT as u64).min(len);
            let first = k;
            while k < explicit.len() && explicit[k].0 < hi {
                k += 1;
            }
            if first == k && hi - lo == FANOUT as u64 {
                // A full node over zero children: every such node is one blob.
                zero_used = true;
                // Skip ahead to the node of the next explicit child (or the last node).
                let next = explicit.get(k).map_or(n - 1, |e| e.0 / FANOUT as u64);
                node = next.max(node + 1);
                continue;
            }
            if prev.is_some() {
                while pk < prev_below.len() && prev_below[pk].0 < lo {
                    pk += 1;
                }
                let pfirst = pk;
                while pk < prev_below.len() && prev_below[pk].0 < hi {
                    pk += 1;
                }
                while pu < prev_here.len() && prev_here[pu].0 < node {
                    pu += 1;
                }
                if prev_below[pfirst..pk] == explicit[first..k] && prev_here.get(pu).is_some_and(|p| p.0 == node) {
                    up.push((node, Some(prev_here[pu].1), Vec::new()));
                    node += 1;
                    continue;
                }
            }
            let mut children = vec![zero_child; (hi - lo) as usize];
            for &(i, h) in &explicit[first..k] {
                children[(i - lo) as usize] = h;
            }
            up.push((node, None, node_bytes(&children)));
            node += 1;
        }
        let level: Vec<(u64, Hash)> = up
            .par_iter()
            .map(|(i, known, bytes)| Ok((*i, match known {
                Some(h) => *h,
                None => writer.put_meta(bytes)?,
            })))
            .collect::<Result<_>>()?;
        if zero_used {
            writer.put_meta(&zero_node_bytes)?;
        }
        zeros.push(zero_node);
        levels.push(level);
        if n <= TOP_MAX as u64 {
            let mut top = vec![zero_node; n as usize];
            for &(i, h) in levels.last().expect("a level was just pushed") {
                top[i as usize] = h;
            }
            return Ok(((top, depth), levels));
        }
        len = n;
        explicit = levels.last().expect("a level was just pushed");
        depth += 1;
    }
}

/// The chunks of a region that hold data, reading only the nodes above
/// them. `expect` is the region's number of chunks: a tree that names more,
/// whose inner nodes are not full, or that is deeper than a region can be,
/// is a damaged image.
pub fn load_sparse(store: &Store, generation: u64, top: &[Hash], depth: u32, expect: u64) -> Result<SparseChunks> {
    // The nodes of a level are read together, in parallel (a restart of
    // 1 GiB at 4 KiB chunks has 8192 leaves): one lookup pass, no waiting
    // on one read after another.
    let cache: std::sync::Mutex<std::collections::HashMap<Hash, Vec<u8>>> = Default::default();
    let mut prefetch = |nodes: &[Hash]| -> Result<()> {
        if nodes.len() > 1 {
            store.read_blobs(nodes, |h, d| {
                cache.lock().unwrap_or_else(|e| e.into_inner()).insert(*h, d.to_vec());
                Ok(())
            })?;
        }
        Ok(())
    };
    let mut children = |n: &Hash| -> Result<Vec<Hash>> {
        let bytes = match cache.lock().unwrap_or_else(|e| e.into_inner()).remove(n) {
            Some(b) => b,
            None => store.read_blob(n)?,
        };
        node_children(generation, n, &bytes)
    };
    load_sparse_from(&mut children, &mut prefetch, generation, top, depth, expect)
}

/// The children of node `n` from its stored bytes: a node of other than a
/// whole number of hashes, or of more than [`FANOUT`], is a damaged image.
pub fn node_children(generation: u64, n: &Hash, bytes: &[u8]) -> Result<Vec<Hash>> {
    if !bytes.len().is_multiple_of(32) || bytes.len() > FANOUT * 32 {
        return Err(EngineError::BadImage { generation, what: format!("chunk-list node {n} is {} bytes", bytes.len()) });
    }
    Ok(bytes.chunks_exact(32).map(|c| Hash(c.try_into().unwrap())).collect())
}

/// [`load_sparse`] with the children of a node from `children`; `prefetch`
/// is told each level's nodes first.
fn load_sparse_from(children_of: &mut dyn FnMut(&Hash) -> Result<Vec<Hash>>, prefetch: &mut dyn FnMut(&[Hash]) -> Result<()>, generation: u64, top: &[Hash], depth: u32, expect: u64) -> Result<SparseChunks> {
    let bad = |what: String| EngineError::BadImage { generation, what };
    let height = depth as usize + 1;
    let span = |h: usize| (FANOUT as u64).checked_pow(h as u32);
    // Nothing to describe (an empty deleted file or memfd): the tree
    // store_sparse makes of it is no node at all.
    if expect == 0 && depth == 0 && top.is_empty() {
        return Ok(SparseChunks { len: 0, entries: Vec::new() });
    }
    check_shape(generation, top, depth, expect)?;
    let zeros = zero_nodes(height);
    let top_span = span(height).unwrap_or(u64::MAX);
    let mut cur: Vec<(u64, Hash)> = top.iter().enumerate().map(|(i, h)| (i as u64 * top_span, *h)).collect();
    let mut len: Option<u64> = None;
    for h in (1..=height).rev() {
        let child_span = span(h - 1).unwrap_or(u64::MAX);
        let last = cur.len().checked_sub(1);
        let level: Vec<Hash> = cur.iter().filter(|(_, n)| *n != zeros[h]).map(|(_, n)| *n).collect();
        prefetch(&level)?;
        let mut next = Vec::new();
        for (idx, &(first, node)) in cur.iter().enumerate() {
            let is_last = Some(idx) == last && len.is_none();
            if node == zeros[h] {
                if is_last {
                    len = Some(first.saturating_add(child_span.saturating_mul(FANOUT as u64)));
                }
                continue;
            }
            let children = children_of(&node)?;
            if children.is_empty() || (children.len() < FANOUT && !is_last) {
                return Err(bad(format!("chunk-list node {node} has {} children and is not the last of its level", children.len())));
            }
            for (j, c) in children.iter().enumerate() {
                let at = first + j as u64 * child_span;
                if at >= expect {
                    return Err(bad(format!("chunk-list node {node} names chunk {at} of a region of {expect}")));
                }
                if *c != zeros[h - 1] {
                    next.push((at, *c));
                }
            }
            if is_last && (h == 1 || children.last() == Some(&zeros[h - 1])) {
                len = Some(first + children.len() as u64 * child_span);
            }
        }
        cur = next;
    }
    Ok(SparseChunks { len: len.unwrap_or(0), entries: cur })
}

/// Fails unless a tree of `top.len()` top nodes over `depth` inner levels
/// can describe a region of `expect` chunks: no more than [`TOP_MAX`] top
/// nodes, not deeper than such a region needs, and room for every chunk.
pub fn check_shape(generation: u64, top: &[Hash], depth: u32, expect: u64) -> Result<()> {
    let span = (FANOUT as u64).checked_pow(depth + 1);
    let fits = span.is_some_and(|s| s / FANOUT as u64 <= expect && (top.len() as u64).checked_mul(s).is_none_or(|all| all >= expect));
    if top.len() > TOP_MAX || !fits {
        return Err(EngineError::BadImage { generation, what: format!("a chunk-list tree of depth {depth} and {} top nodes cannot describe {expect} chunks", top.len()) });
    }
    Ok(())
}

/// The hash of chunk `index` of a region's tree (its top level `top`,
/// `depth` inner levels under it, of the shape [`check_shape`] accepts),
/// reading only the nodes on the path down to it, at most `depth + 1`,
/// each with `children` (which may cache them: nodes are
/// content-addressed). `zeros` is [`zero_nodes`]`(depth + 1)`: a zero node
/// on the way needs no read, and the answer is then
/// [`Hash::ZERO_CHUNK`], as it is for a chunk the image has no data for.
/// A node too short for the path is a damaged image.
pub fn chunk_at(children: &mut dyn FnMut(&Hash) -> Result<std::sync::Arc<[Hash]>>, generation: u64, top: &[Hash], depth: u32, zeros: &[Hash], index: u64) -> Result<Hash> {
    let bad = |what: String| EngineError::BadImage { generation, what };
    let height = depth as usize + 1;
    let span = |h: usize| (FANOUT as u64).checked_pow(h as u32).unwrap_or(u64::MAX);
    if zeros.len() <= height {
        return Err(bad(format!("a chunk-list tree of depth {depth} needs {} zero nodes, {} given", height + 1, zeros.len())));
    }
    let Some(mut node) = top.get((index / span(height)) as usize).copied() else {
        return Err(bad(format!("a chunk-list tree of {} top nodes and depth {depth} has no chunk {index}", top.len())));
    };
    for h in (1..=height).rev() {
        if node == zeros[h] {
            return Ok(Hash::ZERO_CHUNK);
        }
        let kids = children(&node)?;
        let j = ((index / span(h - 1)) % FANOUT as u64) as usize;
        node = *kids.get(j).ok_or_else(|| bad(format!("chunk-list node {node} has {} children: chunk {index} needs child {j}", kids.len())))?;
    }
    Ok(node)
}

/// The hashes of chunks `indices` of a region's tree (as [`chunk_at`],
/// for many at once): the nodes of each level on the way read together
/// ([`Store::read_blobs`], batched per pack), so that the whole set costs
/// depth + 1 rounds of reads, not one read after another per node.
pub fn chunks_at(store: &Store, generation: u64, top: &[Hash], depth: u32, indices: &[u64]) -> Result<Vec<Hash>> {
    let mut read = |need: &[Hash]| -> Result<std::collections::HashMap<Hash, Vec<u8>>> {
        let got: std::sync::Mutex<std::collections::HashMap<Hash, Vec<u8>>> = Default::default();
        store.read_blobs(need, |n, d| {
            got.lock().unwrap_or_else(|e| e.into_inner()).insert(*n, d.to_vec());
            Ok(())
        })?;
        Ok(got.into_inner().unwrap_or_else(|e| e.into_inner()))
    };
    chunks_at_from(&mut read, generation, top, depth, indices)
}

/// Stored nodes by hash.
type NodeBytes = std::collections::HashMap<Hash, Vec<u8>>;

/// [`chunks_at`] with each level's nodes read by `read`.
fn chunks_at_from(read: &mut dyn FnMut(&[Hash]) -> Result<NodeBytes>, generation: u64, top: &[Hash], depth: u32, indices: &[u64]) -> Result<Vec<Hash>> {
    let bad = |what: String| EngineError::BadImage { generation, what };
    let height = depth as usize + 1;
    let span = |h: usize| (FANOUT as u64).checked_pow(h as u32).unwrap_or(u64::MAX);
    let zeros = zero_nodes(height);
    let mut cur: Vec<Hash> = indices
        .iter()
        .map(|&i| top.get((i / span(height)) as usize).copied().ok_or_else(|| bad(format!("a chunk-list tree of {} top nodes and depth {depth} has no chunk {i}", top.len()))))
        .collect::<Result<_>>()?;
    for h in (1..=height).rev() {
        let mut need: Vec<Hash> = cur.iter().copied().filter(|n| *n != zeros[h]).collect();
        need.sort_unstable();
        need.dedup();
        let got = read(&need)?;
        let mut kids: std::collections::HashMap<Hash, Vec<Hash>> = std::collections::HashMap::with_capacity(got.len());
        for (n, bytes) in &got {
            kids.insert(*n, node_children(generation, n, bytes)?);
        }
        for (node, &i) in cur.iter_mut().zip(indices) {
            if *node == zeros[h] {
                *node = zeros[h - 1];
                continue;
            }
            let j = ((i / span(h - 1)) % FANOUT as u64) as usize;
            let k = kids.get(node).ok_or_else(|| bad(format!("chunk-list node {node} was not read")))?;
            *node = *k.get(j).ok_or_else(|| bad(format!("chunk-list node {node} has {} children: chunk {i} needs child {j}", k.len())))?;
        }
    }
    Ok(cur)
}

fn expand(store: &Store, generation: u64, nodes: &[Hash], seen: &mut Vec<Hash>) -> Result<Vec<Hash>> {
    let mut out = Vec::with_capacity(nodes.len() * FANOUT);
    for n in nodes {
        let bytes = store.read_blob(n)?;
        if bytes.len() % 32 != 0 || bytes.len() > FANOUT * 32 {
            return Err(EngineError::BadImage { generation, what: format!("chunk-list node {n} is {} bytes", bytes.len()) });
        }
        seen.push(*n);
        out.extend(bytes.chunks_exact(32).map(|c| Hash(c.try_into().unwrap())));
    }
    Ok(out)
}

/// The chunk hashes of a region.
pub fn load(store: &Store, generation: u64, top: &[Hash], depth: u32) -> Result<Vec<Hash>> {
    Ok(walk(store, generation, top, depth)?.1)
}

/// Every node blob of a region's tree and its chunk hashes (for gc and
/// verify: everything a generation needs).
pub fn walk(store: &Store, generation: u64, top: &[Hash], depth: u32) -> Result<(Vec<Hash>, Vec<Hash>)> {
    let mut nodes = Vec::new();
    let mut cur = top.to_vec();
    for _ in 0..depth {
        cur = expand(store, generation, &cur, &mut nodes)?;
    }
    let chunks = expand(store, generation, &cur, &mut nodes)?;
    Ok((nodes, chunks))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use ckpt_store::BlobKind;

    use super::*;

    #[test]
    fn an_empty_list_round_trips() {
        let m = Mem::default();
        let (top, depth) = store_sparse(&m, &SparseChunks { len: 0, entries: Vec::new() }).unwrap();
        assert!(top.is_empty());
        let back = m.load(&top, depth, 0).unwrap();
        assert_eq!((back.len, back.entries.len()), (0, 0));
        // A tree that names chunks is still refused for an empty object.
        let (top, depth) = store_sparse(&m, &SparseChunks { len: 3, entries: vec![(1, Hash::of(b"x"))] }).unwrap();
        assert!(m.load(&top, depth, 0).is_err());
    }

    #[derive(Default)]
    struct Mem(Mutex<HashMap<Hash, Vec<u8>>>);

    impl BlobSink for Mem {
        fn known(&self, h: &Hash) -> bool {
            self.0.lock().unwrap().contains_key(h)
        }
        fn put(&self, _: BlobKind, h: Hash, data: &[u8]) -> ckpt_store::Result<bool> {
            Ok(self.0.lock().unwrap().insert(h, data.to_vec()).is_none())
        }
    }

    impl Mem {
        fn load(&self, top: &[Hash], depth: u32, expect: u64) -> Result<SparseChunks> {
            let blobs = self.0.lock().unwrap().clone();
            let mut read = |n: &Hash| -> Result<Vec<Hash>> {
                let b = blobs.get(n).ok_or_else(|| EngineError::BadImage { generation: 1, what: format!("no node {n}") })?;
                Ok(b.chunks_exact(32).map(|c| Hash(c.try_into().unwrap())).collect())
            };
            load_sparse_from(&mut read, &mut |_| Ok(()), 1, top, depth, expect)
        }
    }

    fn dense(len: usize, data: &[usize]) -> Vec<Hash> {
        let mut v = vec![Hash::ZERO_CHUNK; len];
        for &i in data {
            v[i] = Hash::of(&i.to_le_bytes());
        }
        v
    }

    #[test]
    fn sparse_trees_are_the_dense_trees() {
        let cases: &[(usize, &[usize])] = &[
            (1, &[]),
            (1, &[0]),
            (31, &[3]),
            (32, &[]),
            (33, &[32]),
            (64 * 32, &[0, 2047]),
            (64 * 32 + 1, &[]),
            (64 * 32 + 1, &[5]),
            (100_000, &[0, 1, 31, 32, 999, 65_535, 99_999]),
            (100_000, &[]),
            (32 * 32 * 64 * 2, &[77_777]),
        ];
        for &(len, data) in cases {
            let hashes = dense(len, data);
            let (d, s) = (Mem::default(), Mem::default());
            let want = store(&d, &hashes).unwrap();
            let sparse = SparseChunks::from_dense(&hashes);
            let got = store_sparse(&s, &sparse).unwrap();
            assert_eq!(got, want, "len {len} data {data:?}");
            // Every node the sparse tree needs is stored, and no other.
            let (dk, sk): (std::collections::HashSet<_>, std::collections::HashSet<_>) =
                (d.0.lock().unwrap().keys().copied().collect(), s.0.lock().unwrap().keys().copied().collect());
            assert_eq!(sk, dk, "len {len} data {data:?}");
            assert_eq!(s.load(&got.0, got.1, len as u64).unwrap(), sparse, "len {len} data {data:?}");
        }
    }

    /// Many chunks at once, level by level, are what the dense list has
    /// at each index (zero subtrees included), and a node that is not
    /// there fails.
    #[test]
    fn many_chunks_at_once_are_what_the_whole_list_has() {
        for &(len, data) in &[(100_000usize, &[0usize, 1, 31, 32, 999, 65_535, 99_999][..]), (32 * 32 * 64 * 2, &[77_777][..]), (33, &[32][..])] {
            let hashes = dense(len, data);
            let m = Mem::default();
            let (top, depth) = store_sparse(&m, &SparseChunks::from_dense(&hashes)).unwrap();
            let blobs = m.0.lock().unwrap().clone();
            let mut read = |need: &[Hash]| -> Result<HashMap<Hash, Vec<u8>>> { Ok(need.iter().filter_map(|n| blobs.get(n).map(|b| (*n, b.clone()))).collect()) };
            let idx: Vec<u64> = data.iter().map(|&i| i as u64).chain([0, len as u64 / 2, len as u64 - 1]).collect();
            let got = chunks_at_from(&mut read, 1, &top, depth, &idx).unwrap();
            for (i, h) in idx.iter().zip(got) {
                assert_eq!(h, hashes[*i as usize], "len {len} chunk {i}");
            }
            let mut none = |_: &[Hash]| -> Result<HashMap<Hash, Vec<u8>>> { Ok(HashMap::new()) };
            if !data.is_empty() {
                assert!(chunks_at_from(&mut none, 1, &top, depth, &[data[0] as u64]).is_err());
            }
        }
    }

    #[test]
    fn descending_to_a_chunk_finds_what_the_whole_list_has() {
        let cases: &[(usize, &[usize])] = &[
            (1, &[0]),
            (33, &[32]),
            (64 * 32 + 1, &[5, 2048]),
            (100_000, &[0, 1, 31, 32, 999, 65_535, 99_999]),
            (32 * 32 * 64 * 2, &[0, 77_777, 32 * 32 * 64 * 2 - 1]),
        ];
        for &(len, data) in cases {
            let m = Mem::default();
            let sparse = SparseChunks::from_dense(&dense(len, data));
            let (top, depth) = store_sparse(&m, &sparse).unwrap();
            check_shape(1, &top, depth, len as u64).unwrap();
            let zeros = zero_nodes(depth as usize + 1);
            let blobs = m.0.lock().unwrap().clone();
            let reads = std::cell::Cell::new(0);
            let mut read = |n: &Hash| -> Result<std::sync::Arc<[Hash]>> {
                reads.set(reads.get() + 1);
                Ok(node_children(1, n, &blobs[n])?.into())
            };
            let mut probe: Vec<u64> = data.iter().map(|&i| i as u64).collect();
            probe.extend([0, len as u64 / 2, len as u64 - 1, len as u64 / 3]);
            for i in probe {
                reads.set(0);
                assert_eq!(chunk_at(&mut read, 1, &top, depth, &zeros, i).unwrap(), sparse.get(i), "len {len} chunk {i}");
                assert!(reads.get() <= depth as usize + 1, "len {len} chunk {i}: {} node reads", reads.get());
            }
            // Past the end of the region: refused, not a chunk of another.
            let past = (top.len() as u64) * (FANOUT as u64).pow(depth + 1);
            assert!(chunk_at(&mut read, 1, &top, depth, &zeros, past).is_err());
        }
        // A shape that cannot be the region's is refused before any read.
        let m = Mem::default();
        let (top, depth) = store_sparse(&m, &SparseChunks { len: 100_000, entries: vec![(7, Hash::of(b"x"))] }).unwrap();
        assert!(check_shape(1, &top, depth, 200_000).is_err(), "too few chunks for the region");
        assert!(check_shape(1, &top, depth, 1000).is_err(), "deeper than the region needs");
        assert!(check_shape(1, &top, depth + 40, 100_000).is_err());
    }

    #[test]
    fn a_tree_stored_by_its_changes_is_the_tree_stored_whole() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for &len in &[1usize, 31, 33, 64 * 32, 64 * 32 + 1, 100_000, 32 * 32 * 64 * 2 + 5] {
            let mut hashes: Vec<Hash> = (0..len).map(|i| if next() % 3 == 0 { Hash::ZERO_CHUNK } else { Hash::of(&i.to_le_bytes()) }).collect();
            let first = Mem::default();
            let mut prev = store_sparse_from(&first, &SparseChunks::from_dense(&hashes), None).unwrap();
            let mut prev_chunks = SparseChunks::from_dense(&hashes);
            for round in 0..4u64 {
                // Some chunks change, some become zero, some hold data again.
                for _ in 0..(len / 100).max(1) {
                    let i = next() as usize % len;
                    hashes[i] = match next() % 3 {
                        0 => Hash::ZERO_CHUNK,
                        _ => Hash::of(format!("{round} {i} {}", next()).as_bytes()),
                    };
                }
                let sparse = SparseChunks::from_dense(&hashes);
                let (whole, changed) = (Mem::default(), Mem::default());
                let want = store_sparse_from(&whole, &sparse, None).unwrap();
                let got = store_sparse_from(&changed, &sparse, Some((&prev_chunks, &prev.1))).unwrap();
                assert_eq!(got, want, "len {len} round {round}");
                // Only nodes of the new tree are written, and fewer of them
                // when the change is small.
                let (w, c) = (whole.0.lock().unwrap(), changed.0.lock().unwrap());
                assert!(c.keys().all(|k| w.contains_key(k)), "len {len} round {round}");
                if len >= 100_000 {
                    assert!(c.len() * 2 < w.len(), "len {len}: {} of {} nodes written", c.len(), w.len());
                }
                // With every node of both trees stored, the new one loads.
                let mut all = first.0.lock().unwrap().clone();
                all.extend(c.iter().map(|(k, v)| (*k, v.clone())));
                let both = Mem(Mutex::new(all));
                assert_eq!(both.load(&got.0.0, got.0.1, len as u64).unwrap(), sparse, "len {len} round {round}");
                *first.0.lock().unwrap() = both.0.into_inner().unwrap();
                drop((w, c));
                prev = got;
                prev_chunks = sparse;
            }
        }
        // A previous list of another length is not used.
        let m = Mem::default();
        let a = SparseChunks { len: 64, entries: vec![(1, Hash::of(b"a"))] };
        let b = SparseChunks { len: 65, entries: vec![(1, Hash::of(b"a"))] };
        let pa = store_sparse_from(&m, &a, None).unwrap();
        assert_eq!(store_sparse_from(&m, &b, Some((&a, &pa.1))).unwrap(), store_sparse_from(&Mem::default(), &b, None).unwrap());
    }

    #[test]
    fn a_terabyte_of_reservation_costs_its_data() {
        // 2 TiB of 4 KiB chunks, 16 holding data.
        let len = (2u64 << 40) / 4096;
        let entries: Vec<(u64, Hash)> = (0..16u64).map(|i| (i * (len / 16) + 3, Hash::of(&i.to_le_bytes()))).collect();
        let sparse = SparseChunks { len, entries };
        let m = Mem::default();
        let (top, depth) = store_sparse(&m, &sparse).unwrap();
        assert!(m.0.lock().unwrap().len() < 200, "{} nodes", m.0.lock().unwrap().len());
        assert_eq!(m.load(&top, depth, len).unwrap(), sparse);
        // A region that is smaller than the tree says is refused.
        assert!(m.load(&top, depth, len / 2).is_err());
    }
}
