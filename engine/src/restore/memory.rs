//! The memory of a restart: where every chunk of every process goes, and
//! writing it into the restored processes with `process_vm_writev`.

use ckpt_chunker::Hash;
use ckpt_store::Store;

use crate::error::{EngineError, Result};
use crate::image::*;
use crate::remote;

use super::Ctx;

/// Where a process's chunks go: per chunk with data, in the order of the
/// chunk lists, its hash and the (address, length) it is written to. A
/// restart of 1 GiB has 262,144 of them: two flat lists, no map (the store
/// hands each blob back with the indices of its places,
/// [`Store::read_blobs_indexed`]).
#[derive(Default)]
pub(super) struct Dests {
    hashes: Vec<Hash>,
    places: Vec<(u64, usize)>,
}

/// Where every chunk goes, per process (in the order of the images), but
/// for the regions of `skip[i]` (indices into image `i`'s regions: a lazy
/// restart's lazy regions, whose chunk lists are not read here).
pub(super) fn destinations(ctx: &Ctx, skip: &[Vec<usize>]) -> Result<Vec<Dests>> {
    let Ctx { store, generation, images } = *ctx;
    // Where every chunk goes, per process; a page of shared memory is
    // written once, through the first mapping of it.
    let mut shm_written: std::collections::HashSet<(u64, u64)> = Default::default();
    let mut all_dests = Vec::new();
    for (k, image) in images.iter().enumerate() {
        let mut dests = Dests::default();
        let skip = skip.get(k).map(|v| v.as_slice()).unwrap_or(&[]);
        for (_, r) in image.regions.iter().enumerate().filter(|(i, r)| !r.segments.is_empty() && r.sysv.is_none() && !skip.contains(i)) {
            add_region(store, generation, image, r, &mut shm_written, &mut dests)?;
        }
        all_dests.push(dests);
    }
    Ok(all_dests)
}

/// Adds the chunks of regions `indices` of `image` (private memory: no
/// shared page among them) to `dests`.
pub(super) fn add_regions(store: &Store, generation: u64, image: &ProcessImage, indices: &[usize], dests: &mut Dests) -> Result<()> {
    let mut shm_written = Default::default();
    for &i in indices {
        add_region(store, generation, image, &image.regions[i], &mut shm_written, dests)?;
    }
    Ok(())
}

/// Reads region `r`'s chunk list into `dests`.
fn add_region(store: &Store, generation: u64, image: &ProcessImage, r: &RegionImage, shm_written: &mut std::collections::HashSet<(u64, u64)>, dests: &mut Dests) -> Result<()> {
    let chunk_size = image.chunk_size as u64;
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
        dests.hashes.push(h);
        dests.places.push((addr, (r.end - addr).min(chunk_size) as usize));
    }
    Ok(())
}

/// Writes every chunk of `dests` into process `pid`: chunks read,
/// decompressed and verified in parallel batches as the catalog scan finds
/// them ([`Store::read_blobs_indexed`]), each batch written with one
/// vectored `process_vm_writev` (a chunk once per place it goes).
pub(super) fn fill_memory(store: &Store, pid: i32, dests: &Dests) -> Result<()> {
    store.read_blobs_indexed(&dests.hashes, |batch| {
        let mut items: Vec<(u64, &[u8])> = Vec::with_capacity(batch.len());
        for &(at, data) in batch {
            for &i in at {
                let (addr, len) = dests.places[i];
                if data.len() != len {
                    let e = std::io::Error::other(format!("chunk {} is {} bytes, the image needs {len} at {addr:#x}", dests.hashes[i], data.len()));
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
