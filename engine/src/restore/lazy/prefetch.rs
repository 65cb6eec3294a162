//! Prefetch of the pages the program touched first the last time it was
//! restarted lazily, so that a restart from S3 does not wait one round
//! trip per fault for its working set.
//!
//! * **Recorded** by the page server, which sees every fault in order: the
//!   first [`MAX_ENTRIES`] chunks with data whose fault it served, as the
//!   process's PID in the image and the image address of the chunk. A
//!   restart that prefetched keeps the record it used in front (its
//!   pages did not fault this time because they were already in) and
//!   appends the new faults.
//! * **Written** when the fill is done (every fault of the restart is
//!   known then, and nothing waits for it) as generation G's
//!   first-touched record (`Store::put_touched`: a small object beside the
//!   packs, authenticated by a MAC over the store, G's id and manifest in
//!   a sealed store), only when there were new faults.
//! * **Read** by the filler thread of the next lazy restart of G, or of a
//!   later generation that has none of its own (the next checkpoint of the
//!   restarted program: the record of the newest of the
//!   [`LOOK_BACK`] generations before it that has one), before it starts
//!   the background fill, so nothing before the program runs waits for
//!   it. It is hostile input: at most `ckpt_store::MAX_TOUCHED_RECORD`
//!   bytes, its tag checked by the store, its length exactly its count's,
//!   and each entry kept only if it names a process of the restart and a
//!   chunk's start in one of that process's lazy regions. A record that
//!   fails any of that is ignored (with a warning) and the restart goes on
//!   without it: a record can only change the order the image's pages are
//!   read in. Every page still comes through the image's own chunk lists
//!   and every chunk is verified, so a forged record can never put a wrong
//!   page in, nor make the server read outside the image's regions.
//! * **Issued** as batched reads in fault order: the chunk hashes of every
//!   recorded chunk found by one descent of each region's tree, level by
//!   level (depth + 1 batched reads, not one round trip per node), then
//!   the chunks read in slices of growing size (the first ones touched
//!   first), each slice as coalesced ranged GETs per pack
//!   ([`Store::read_blobs_batched`]), and handed to the server as the
//!   fill's batches are. Faults are served alongside, as before; the
//!   background fill follows and skips the chunks prefetched.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use ckpt_chunker::Hash;
use ckpt_store::Store;

use super::{Fill, Filled, LazyPart};
use crate::chunklist;

/// Chunks a record holds at most (256 MiB of 4 KiB chunks).
pub(super) const MAX_ENTRIES: usize = 1 << 16;
/// Generations before the restored one whose record may serve it.
const LOOK_BACK: usize = 3;
const MAGIC: &[u8; 8] = b"CKPTTCH1";
/// Bytes per entry: PID (i32) and image address (u64), little-endian.
const ENTRY: usize = 12;
/// Chunks around each recorded one that are prefetched with it (the
/// aligned group holding it): see [`around`].
const AROUND: u64 = 16;
/// See [`settle`].
const QUIET: std::time::Duration = std::time::Duration::from_millis(30);
const HEAD_START: std::time::Duration = std::time::Duration::from_millis(300);
/// Chunks of the first slice read; each next slice is 4 times larger, up
/// to [`super::FILL_SLICE`].
const FIRST_SLICE: usize = 256;

/// A record's body: `MAGIC | count u32 | count × (pid i32, address u64)`.
pub(super) fn encode(entries: &[(i32, u64)]) -> Vec<u8> {
    let n = entries.len().min(MAX_ENTRIES);
    let mut b = Vec::with_capacity(MAGIC.len() + 4 + n * ENTRY);
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&(n as u32).to_le_bytes());
    for &(pid, addr) in &entries[..n] {
        b.extend_from_slice(&pid.to_le_bytes());
        b.extend_from_slice(&addr.to_le_bytes());
    }
    b
}

/// The entries of a record's body, or why it is not one.
pub(super) fn decode(b: &[u8]) -> Result<Vec<(i32, u64)>, String> {
    let head = MAGIC.len() + 4;
    if b.len() < head || &b[..MAGIC.len()] != MAGIC {
        return Err("it does not start like a first-touched record".into());
    }
    let n = u32::from_le_bytes(b[MAGIC.len()..head].try_into().expect("4 bytes")) as usize;
    if n > MAX_ENTRIES || b.len() != head + n * ENTRY {
        return Err(format!("it says {n} entries in {} bytes (at most {MAX_ENTRIES} entries of {ENTRY} bytes)", b.len()));
    }
    Ok(b[head..]
        .chunks_exact(ENTRY)
        .map(|e| (i32::from_le_bytes(e[..4].try_into().expect("4 bytes")), u64::from_le_bytes(e[4..].try_into().expect("8 bytes"))))
        .collect())
}

/// The entries that name a chunk's start in a lazy region of a process of
/// this restart, as (origin index, image address), in order, each once.
pub(super) fn check(entries: &[(i32, u64)], parts: &[LazyPart]) -> Vec<(usize, u64)> {
    let by_pid: HashMap<i32, usize> = parts.iter().enumerate().filter(|(_, p)| !p.regions.is_empty()).map(|(i, p)| (p.pid, i)).collect();
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for &(pid, addr) in entries {
        let Some(&origin) = by_pid.get(&pid) else { continue };
        let part = &parts[origin];
        let Some(r) = part.region_at(addr) else { continue };
        if !(addr - r.start).is_multiple_of(part.chunk_size) {
            continue;
        }
        if seen.insert((origin, addr)) {
            out.push((origin, addr));
        }
    }
    out
}

/// The record to prefetch from for a restart of `generation`: its own, or
/// the newest of the [`LOOK_BACK`] generations before it that has one;
/// its entries as [`check`] keeps them. A record that does not
/// authenticate or parse is warned about and passed over.
pub(super) fn find(store: &Store, generation: u64, parts: &[LazyPart]) -> (Option<u64>, Vec<(usize, u64)>) {
    let mut ids = vec![generation];
    if let Ok(all) = store.generations() {
        let mut older: Vec<u64> = all.iter().map(|g| g.id).filter(|&id| id < generation).collect();
        older.sort_unstable_by(|a, b| b.cmp(a));
        ids.extend(older.into_iter().take(LOOK_BACK));
    }
    for id in ids {
        let Ok(g) = store.generation(id) else { continue };
        match store.touched(&g) {
            Ok(None) => {}
            Ok(Some(body)) => match decode(&body) {
                Ok(entries) => return (Some(id), check(&entries, parts)),
                Err(why) => tracing::warn!(generation = id, "ignoring the first-touched record: {why}"),
            },
            Err(e) => tracing::warn!(generation = id, "ignoring the first-touched record: {e}"),
        }
    }
    (None, Vec::new())
}

/// `wanted` with each chunk's aligned group of [`AROUND`] chunks (within
/// its region), in order, each once, at most [`MAX_ENTRIES`]. Why: a record
/// holds the faults only, and while the fill races the program most of the
/// pages it touches are brought in by the fill before the touch, so they
/// never fault. A fault is where a pass of the program overtook the fill,
/// and its neighbours were touched by the same pass (a program's working
/// set is runs of pages: arrays, arenas, stacks). Measured
/// (BENCHMARKS.md): a first lazy restart from S3 had ~250 faults in a
/// working set of 4,096 pages, and their groups were ~3,950 of those.
pub(super) fn around(wanted: &[(usize, u64)], parts: &[LazyPart]) -> Vec<(usize, u64)> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for &(origin, addr) in wanted {
        let part = &parts[origin];
        let Some(r) = part.region_at(addr) else { continue };
        let group = part.chunk_size * AROUND;
        let first = r.start + (addr - r.start) / group * group;
        // The chunk itself first, then the rest of its group.
        let rest = (0..AROUND).map(|k| first + k * part.chunk_size).filter(|&a| a < r.end && a != addr);
        for a in std::iter::once(addr).chain(rest) {
            if out.len() >= MAX_ENTRIES {
                return out;
            }
            if seen.insert((origin, a)) {
                out.push((origin, a));
            }
        }
    }
    out
}

/// Waits until the program's first faults (its first output's pages) are
/// served: until no fault came for [`QUIET`], at most [`HEAD_START`]. The
/// prefetch's reads would otherwise be ahead of them at the store (a local
/// S3 server answers one request after another).
pub(super) fn settle(faults: &std::sync::atomic::AtomicU64) {
    let t = std::time::Instant::now();
    let mut last = faults.load(std::sync::atomic::Ordering::Relaxed);
    let mut quiet_since = t;
    while t.elapsed() < HEAD_START && quiet_since.elapsed() < QUIET {
        std::thread::sleep(std::time::Duration::from_millis(5)); // polling the server's fault count
        let now = faults.load(std::sync::atomic::Ordering::Relaxed);
        if now != last {
            last = now;
            quiet_since = std::time::Instant::now();
        }
    }
}

/// Reads the chunks of `wanted` (origin, image address: [`check`]ed) in
/// its order and sends them to the server; the chunks sent, as
/// (origin, image address). Stops quietly at the first error: the fill
/// (or a fault) meets the same and says so.
pub(super) fn prefetch(store: &Store, generation: u64, parts: &[LazyPart], wanted: &[(usize, u64)], settle: &dyn Fn(), send: &(dyn Fn(Fill) -> bool + Sync)) -> HashSet<(usize, u64)> {
    let mut sent = HashSet::new();
    // The hash of every wanted chunk: one descent per region, all its
    // wanted chunks at once.
    let mut by_region: HashMap<(usize, u64), Vec<u64>> = HashMap::new();
    for &(origin, addr) in wanted {
        let r = parts[origin].region_at(addr).expect("checked");
        by_region.entry((origin, r.start)).or_default().push(addr);
    }
    let mut hash_of: HashMap<(usize, u64), Hash> = HashMap::new();
    for ((origin, start), addrs) in &by_region {
        let part = &parts[*origin];
        let r = part.region_at(*start).expect("a region");
        let indices: Vec<u64> = addrs.iter().map(|a| (a - r.start) / part.chunk_size).collect();
        match chunklist::chunks_at(store, generation, &r.top, r.depth, &indices) {
            Ok(hashes) => {
                for (a, h) in addrs.iter().zip(hashes) {
                    hash_of.insert((*origin, *a), h);
                }
            }
            Err(e) => {
                tracing::debug!("prefetch stopped: {e}");
                return sent;
            }
        }
    }
    // Zero chunks need no read (a fault zero-fills them).
    let order: Vec<(usize, u64, Hash)> = wanted.iter().filter_map(|&(o, a)| hash_of.get(&(o, a)).filter(|h| !h.is_zero_chunk()).map(|h| (o, a, *h))).collect();
    if order.is_empty() {
        return sent;
    }
    settle();
    let mut at = 0;
    let mut slice = FIRST_SLICE;
    while at < order.len() {
        let part = &order[at..(at + slice).min(order.len())];
        at += part.len();
        slice = (slice * 4).min(super::FILL_SLICE);
        let mut dests: HashMap<Hash, Vec<(usize, u64)>> = HashMap::new();
        for &(o, a, h) in part {
            dests.entry(h).or_default().push((o, a));
        }
        let hashes: Vec<Hash> = dests.keys().copied().collect();
        let r = store.read_blobs_batched(&hashes, |batch| {
            let mut per: HashMap<usize, Vec<Filled>> = HashMap::new();
            for (h, d) in batch {
                let data: Arc<[u8]> = Arc::from(*d);
                let mut srcs: HashMap<usize, Vec<u64>> = HashMap::new();
                for &(o, a) in dests.get(h).map(|v| &v[..]).unwrap_or(&[]) {
                    srcs.entry(o).or_default().push(a);
                }
                for (o, s) in srcs {
                    per.entry(o).or_default().push(Filled { hash: *h, data: data.clone(), srcs: s });
                }
            }
            for (o, items) in per {
                if !send(Fill::Batch(o, items)) {
                    return Err(ckpt_store::StoreError::Callback("the page server stopped".into()));
                }
            }
            Ok(())
        });
        if let Err(e) = r {
            tracing::debug!("prefetch stopped: {e}");
            return sent;
        }
        sent.extend(part.iter().map(|&(o, a, _)| (o, a)));
    }
    sent
}

/// The record to write after a restart that prefetched `used` and served
/// faults on `faulted` (both as (origin, address)): `used` first, then the
/// new faults, at most [`MAX_ENTRIES`]; `None` if nothing new faulted.
pub(super) fn next_record(used: &[(usize, u64)], faulted: &[(usize, u64)], parts: &[LazyPart]) -> Option<Vec<u8>> {
    let seen: HashSet<&(usize, u64)> = used.iter().collect();
    let new: Vec<&(usize, u64)> = faulted.iter().filter(|e| !seen.contains(e)).collect();
    if new.is_empty() || used.len() >= MAX_ENTRIES {
        return None;
    }
    let entries: Vec<(i32, u64)> = used.iter().chain(new).take(MAX_ENTRIES).map(|&(o, a)| (parts[o].pid, a)).collect();
    Some(encode(&entries))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body decodes to what was encoded; a wrong magic, a count that
    /// does not match the length or exceeds the bound is refused.
    #[test]
    fn a_record_decodes_or_is_refused() {
        let e = vec![(12, 0x7f00_0000_1000u64), (13, 0x2000)];
        assert_eq!(decode(&encode(&e)).unwrap(), e);
        let mut b = encode(&e);
        b[0] ^= 1;
        assert!(decode(&b).is_err());
        let mut b = encode(&e);
        b.pop();
        assert!(decode(&b).is_err());
        let mut b = encode(&e);
        b[8..12].copy_from_slice(&(MAX_ENTRIES as u32 + 1).to_le_bytes());
        assert!(decode(&b).is_err());
        assert!(decode(&[]).is_err());
    }
}
