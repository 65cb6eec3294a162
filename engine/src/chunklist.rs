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

use crate::error::{EngineError, Result};

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
