//! Taking a process's image while its agent holds every thread stopped.
//!
//! Everything is read from outside: `/proc/PID` for the map, fds and mm
//! fields, `process_vm_readv` for memory. Memory is cut into page-aligned
//! chunks per mapping, hashed in parallel; only chunks the store does not
//! already hold are compressed and written.

use std::fs::File;

use ckpt_chunker::Hash;
use ckpt_store::{BlobKind, Writer};
use ckpt_wire::agent::{Hello, Suspended, ThreadState};
use ckpt_wire::restore::{ZONE_END, ZONE_START};
use rayon::prelude::*;

use crate::error::{EngineError, Result};
use crate::image::*;
use crate::procfs::{self, Mapping};
use crate::remote;

/// What the agent reported once every thread stopped.
#[derive(Clone, Debug)]
pub struct AgentReport {
    pub hello: Hello,
    pub suspended: Suspended,
    pub threads: Vec<ThreadState>,
}

/// Byte counts of one capture.
#[derive(Clone, Copy, Debug, Default)]
pub struct CaptureStats {
    /// Size of all regions whose content is recorded.
    pub logical_bytes: u64,
    /// Bytes read from the process.
    pub read_bytes: u64,
}

/// Bytes read and hashed at a time.
const WINDOW: usize = 64 << 20;

/// Classifies a mapping.
pub fn region_kind(m: &Mapping) -> RegionKind {
    match m.name.as_str() {
        "[heap]" => RegionKind::Heap,
        "[stack]" => RegionKind::Stack,
        "[vdso]" => RegionKind::Vdso,
        "[vvar]" => RegionKind::Vvar,
        "[vvar_vclock]" => RegionKind::VvarVclock,
        name if m.shared => {
            if name.is_empty() || name.starts_with("/dev/zero") || name.starts_with("/SYSV") || name.starts_with("/memfd:") || name.starts_with('[') {
                RegionKind::SharedAnon
            } else {
                RegionKind::SharedFile
            }
        }
        _ => RegionKind::Private,
    }
}

fn is_anonymous(m: &Mapping) -> bool {
    m.inode == 0
}

/// Captures one process into `writer`; returns its image (not yet stored)
/// and byte counts.
pub fn capture_process(report: &AgentReport, writer: &Writer, chunk_size: usize, host: &str) -> Result<(ProcessImage, CaptureStats)> {
    let pid = report.hello.pid;
    let timers = procfs::posix_timer_count(pid);
    if timers > 0 {
        return Err(EngineError::Unsupported { pid, what: format!("it holds {timers} POSIX timer(s) (timer_create)") });
    }
    let fds = procfs::fds(pid, report.hello.agent_fd)?;
    let maps = procfs::maps(pid)?;
    let mut mm = procfs::mm_fields(pid)?;
    mm.brk = report.suspended.brk;

    let mem_path = format!("/proc/{pid}/mem");
    let mem = File::open(&mem_path).map_err(|e| EngineError::Proc { pid, path: mem_path.into(), source: e })?;
    let pm_path = format!("/proc/{pid}/pagemap");
    let pagemap = File::open(&pm_path).map_err(|e| EngineError::Proc { pid, path: pm_path.into(), source: e })?;

    let mut stats = CaptureStats::default();
    let mut regions = Vec::new();
    for m in &maps {
        if m.start >= ZONE_START && m.end <= ZONE_END {
            continue; // the restorer's leftovers after a restart
        }
        if m.name == "[vsyscall]" {
            continue;
        }
        let kind = region_kind(m);
        let segments = if kind.has_content() {
            stats.logical_bytes += m.len();
            capture_region(pid, m, &mem, &pagemap, writer, chunk_size, &mut stats)?
        } else {
            Vec::new()
        };
        regions.push(RegionImage { start: m.start, end: m.end, prot: m.prot(), kind, name: m.name.clone(), offset: m.offset, segments });
    }

    let s = &report.suspended;
    let image = ProcessImage {
        version: IMAGE_VERSION,
        pid,
        ppid: report.hello.ppid,
        host: host.to_string(),
        exe: procfs::link(pid, "exe")?,
        comm: procfs::comm(pid)?,
        cmdline: procfs::cmdline(pid)?,
        cwd: procfs::link(pid, "cwd")?,
        umask: procfs::umask(pid)?,
        rlimits: procfs::rlimits(pid)?,
        mm,
        auxv: procfs::auxv(pid)?,
        threads: report.threads.iter().map(ThreadImage::from).collect(),
        sigactions: s.sigactions.iter().map(|a| Sigaction { handler: a.handler, flags: a.flags, restorer: a.restorer, mask: a.mask }).collect(),
        itimers: s
            .itimers
            .iter()
            .map(|t| Itimer { interval_sec: t.interval_sec, interval_usec: t.interval_usec, value_sec: t.value_sec, value_usec: t.value_usec })
            .collect(),
        fds,
        regions,
        agent: AgentImage { fd: report.hello.agent_fd, restart_word_addr: report.hello.restart_word_addr, ckpt_tid: report.hello.ckpt_tid },
        chunk_size: chunk_size as u32,
    };
    Ok((image, stats))
}

fn capture_region(
    pid: i32,
    m: &Mapping,
    mem: &File,
    pagemap: &File,
    writer: &Writer,
    chunk_size: usize,
    stats: &mut CaptureStats,
) -> Result<Vec<Hash>> {
    let len = m.len() as usize;
    let nchunks = len.div_ceil(chunk_size);
    let mut hashes = vec![Hash::ZERO_CHUNK; nchunks];
    // Pages never touched in anonymous memory are zero: skip them. File
    // pages not yet faulted in still hold the file's bytes: read them.
    let present = if is_anonymous(m) {
        Some(remote::present_pages(pagemap, m.start, m.end).map_err(|e| EngineError::Memory { pid, addr: m.start, source: e })?)
    } else {
        None
    };
    let pages_per_chunk = chunk_size / remote::PAGE as usize;
    let window = WINDOW - WINDOW % chunk_size;
    let mut buf = vec![0u8; window.min(len)];
    let mut off = 0usize;
    while off < len {
        let wlen = window.min(len - off);
        let first_chunk = off / chunk_size;
        let wchunks = wlen.div_ceil(chunk_size);
        let touched: Vec<bool> = (0..wchunks)
            .map(|c| match &present {
                None => true,
                Some(p) => {
                    let p0 = (first_chunk + c) * pages_per_chunk;
                    p[p0..(p0 + pages_per_chunk).min(p.len())].iter().any(|&x| x)
                }
            })
            .collect();
        if touched.iter().any(|&t| t) {
            let data = &mut buf[..wlen];
            stats.read_bytes += remote::read_tolerant(pid, Some(mem), m.start + off as u64, data)
                .map_err(|e| EngineError::Memory { pid, addr: m.start + off as u64, source: e })?;
            let data = &buf[..wlen];
            let wh = ckpt_chunker::hash_chunks(data, chunk_size);
            wh.par_iter().enumerate().try_for_each(|(c, h)| -> Result<()> {
                if touched[c] && *h != Hash::ZERO_CHUNK && !writer.known(h) {
                    let s = c * chunk_size;
                    writer.put(BlobKind::Chunk, *h, &data[s..(s + chunk_size).min(wlen)])?;
                }
                Ok(())
            })?;
            for (c, h) in wh.into_iter().enumerate() {
                if touched[c] {
                    hashes[first_chunk + c] = h;
                }
            }
        }
        off += wlen;
    }
    store_segments(writer, &hashes)
}

/// Stores a region's chunk list as segment blobs.
pub fn store_segments(writer: &Writer, hashes: &[Hash]) -> Result<Vec<Hash>> {
    hashes
        .chunks(SEGMENT_LEN)
        .map(|seg| {
            let bytes: Vec<u8> = seg.iter().flat_map(|h| h.0).collect();
            Ok(writer.put_meta(&bytes)?)
        })
        .collect()
}

/// Reads a region's chunk list back.
pub fn load_segments(store: &ckpt_store::Store, generation: u64, segments: &[Hash]) -> Result<Vec<Hash>> {
    let mut out = Vec::with_capacity(segments.len() * SEGMENT_LEN);
    for s in segments {
        let bytes = store.read_blob(s)?;
        if bytes.len() % 32 != 0 {
            return Err(EngineError::BadImage { generation, what: format!("chunk list {s} has a length that is not a multiple of 32") });
        }
        out.extend(bytes.chunks_exact(32).map(|c| Hash(c.try_into().unwrap())));
    }
    Ok(out)
}
