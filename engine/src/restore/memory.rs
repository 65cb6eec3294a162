//! The memory of a restart: where every chunk of every process goes, and
//! writing it into the restored processes with `process_vm_writev`.

use std::collections::HashMap;

use ckpt_chunker::Hash;
use ckpt_store::Store;

use crate::error::{EngineError, Result};
use crate::image::*;
use crate::remote;

use super::Ctx;

/// Per chunk, the (address, length) pairs it is written to.
pub(super) type Dests = HashMap<Hash, Vec<(u64, usize)>>;

/// Where every chunk goes, per process (in the order of the images).
pub(super) fn destinations(ctx: &Ctx) -> Result<Vec<Dests>> {
    let Ctx { store, generation, images } = *ctx;
    // Where every chunk goes, per process; a page of shared memory is
    // written once, through the first mapping of it.
    let mut shm_written: std::collections::HashSet<(u64, u64)> = Default::default();
    let mut all_dests = Vec::new();
    for image in images {
        let chunk_size = image.chunk_size as u64;
        let mut dests: HashMap<Hash, Vec<(u64, usize)>> = HashMap::new();
        for r in image.regions.iter().filter(|r| !r.segments.is_empty() && r.sysv.is_none()) {
            let n = (r.end - r.start).div_ceil(chunk_size);
            let hashes = crate::chunklist::load_sparse(store, generation, &r.segments, r.depth, n)?;
            if hashes.len != n {
                return Err(EngineError::BadImage { generation, what: format!("region {:#x}-{:#x} of process {} lists {} chunks, expected {n}", r.start, r.end, image.pid, hashes.len) });
            }
            // Zero chunks are not in the list: a fresh mapping is zero already.
            for (i, h) in hashes.entries {
                let off = i * chunk_size;
                if r.kind == RegionKind::SharedAnon && r.shm != 0 && !shm_written.insert((r.shm, r.offset + off)) {
                    continue;
                }
                let addr = r.start + off;
                dests.entry(h).or_default().push((addr, (r.end - addr).min(chunk_size) as usize));
            }
        }
        all_dests.push(dests);
    }
    Ok(all_dests)
}

/// Writes every chunk of `dests` into process `pid`: chunks read,
/// decompressed and verified in parallel batches
/// ([`Store::read_blobs_batched`]), each batch written with one vectored
/// `process_vm_writev` (a chunk once per place it goes).
pub(super) fn fill_memory(store: &Store, pid: i32, dests: &Dests) -> Result<()> {
    let hashes: Vec<Hash> = dests.keys().copied().collect();
    store.read_blobs_batched(&hashes, |batch| {
        let mut items: Vec<(u64, &[u8])> = Vec::with_capacity(batch.len());
        for (h, data) in batch {
            for &(addr, len) in dests.get(h).map(|v| v.as_slice()).unwrap_or(&[]) {
                if data.len() != len {
                    let e = std::io::Error::other(format!("chunk {h} is {} bytes, the image needs {len} at {addr:#x}", data.len()));
                    return Err(ckpt_store::StoreError::Callback(Box::new(e)));
                }
                items.push((addr, data));
            }
        }
        remote::write_many(pid, &items).map_err(|e| {
            let e = std::io::Error::other(format!("writing {} chunks into the restored process {pid}: {e}", items.len()));
            ckpt_store::StoreError::Callback(Box::new(e))
        })
    })?;
    Ok(())
}
