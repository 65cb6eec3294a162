//! bench-codec: the chunk codecs a store could use, on 4 KiB chunks as
//! they are stored (one frame per chunk, raw when the codec cannot shrink
//! it, zero chunks never stored), on three kinds of data: the image-like
//! pages of benches/programs/bench_heap.c, an executable and JSON text.
//! For each codec: compression and decompression MB/s on one thread,
//! each also as a share of memcpy of the same bytes in the same run, and
//! the stored bytes over the input. The codec ceiling of ckpt's
//! checkpoint and restart figures.
//!
//! Usage: bench-codec [--mib N] [--exe PATH] [--reps N]

use std::time::Instant;

use ckpt_benches::{PAGE, Rng, fill_page, median};

#[derive(Clone, Copy)]
enum Codec {
    Zstd(i32),
    Lz4Flex,
    Lz4Sys,
    /// ckpt's own chunk encoding with the given store codec.
    Store(ckpt_chunker::Codec),
}

impl Codec {
    fn name(self) -> String {
        match self {
            Codec::Zstd(l) => format!("zstd {l}"),
            Codec::Lz4Flex => "lz4_flex (block)".into(),
            Codec::Lz4Sys => "liblz4 (block, accel 1)".into(),
            Codec::Store(c) => format!("ckpt encode/decode, {c}"),
        }
    }
}

/// The data's non-zero 4 KiB chunks (the ones a store keeps).
fn chunks_of(data: &[u8]) -> Vec<&[u8]> {
    data.chunks_exact(PAGE).filter(|c| !ckpt_chunker::is_zero(c)).collect()
}

/// JSON records like an application's state or log: ids, names, numbers,
/// timestamps, nested arrays; `bytes` of it.
fn json_text(bytes: usize) -> Vec<u8> {
    let words = ["alpha", "beta", "gamma", "delta", "epsilon", "request", "response", "user", "session", "checkpoint", "restart", "memory", "region", "error", "ok", "pending", "done", "worker", "queue", "shard"];
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut out = Vec::with_capacity(bytes + 4096);
    out.extend_from_slice(b"[\n");
    let mut i = 0u64;
    while out.len() < bytes {
        let r = rng.next();
        let w = |k: u64| words[(k % words.len() as u64) as usize];
        let rec = serde_json::json!({
            "id": i,
            "uuid": format!("{:016x}{:016x}", rng.next(), rng.next()),
            "name": format!("{}-{}-{}", w(r), w(r >> 8), (r >> 16) % 10000),
            "status": w(r >> 24),
            "score": ((r >> 32) % 1_000_000) as f64 / 1000.0,
            "ts": 1_765_000_000_000u64 + i * 137 + (r >> 40) % 100,
            "tags": [w(r >> 3), w(r >> 11), w(r >> 19)],
            "attrs": { "retries": (r >> 50) % 5, "host": format!("node{:03}", (r >> 45) % 256), "ok": r & 1 == 0 },
        });
        out.extend_from_slice(serde_json::to_string_pretty(&rec).unwrap().as_bytes());
        out.extend_from_slice(b",\n");
        i += 1;
    }
    out.truncate(bytes);
    out
}

/// (compress MB/s, decompress MB/s, stored bytes / input bytes) of `codec`
/// over `chunks`, on one thread.
fn measure(codec: Codec, chunks: &[&[u8]]) -> (f64, f64, f64) {
    let total = (chunks.len() * PAGE) as f64;
    let mut zc = zstd::bulk::Compressor::new(match codec {
        Codec::Zstd(l) => l,
        _ => 1,
    })
    .unwrap();
    let mut zd = zstd::bulk::Decompressor::new().unwrap();
    let mut buf = vec![0u8; 2 * PAGE];
    // Compress: every chunk into one reused buffer, its stored form kept.
    let mut stored: Vec<(Vec<u8>, bool)> = Vec::with_capacity(chunks.len());
    let t = Instant::now();
    for c in chunks {
        let (n, raw) = match codec {
            Codec::Zstd(_) => {
                let n = zc.compress_to_buffer(c, &mut buf).unwrap();
                (n, n >= c.len())
            }
            Codec::Lz4Flex => {
                let n = lz4_flex::block::compress_into(c, &mut buf).unwrap();
                (n, n >= c.len())
            }
            Codec::Lz4Sys => {
                let n = lz4::block::compress_to_buffer(c, None, false, &mut buf).unwrap();
                (n, n >= c.len())
            }
            Codec::Store(k) => {
                let e = ckpt_chunker::encode_with(c, k, ckpt_chunker::DEFAULT_LEVEL);
                let b = e.bytes();
                buf[..b.len()].copy_from_slice(b);
                (b.len(), b.len() == c.len())
            }
        };
        stored.push(if raw { (c.to_vec(), true) } else { (buf[..n].to_vec(), false) });
    }
    let ct = t.elapsed();
    let csize: usize = stored.iter().map(|(s, _)| s.len()).sum();
    let hashes: Vec<ckpt_chunker::Hash> = match codec {
        Codec::Store(_) => chunks.iter().map(|c| ckpt_chunker::Hash::of(c)).collect(),
        _ => Vec::new(),
    };
    let mut out = vec![0u8; PAGE];
    let t = Instant::now();
    for (i, (s, raw)) in stored.iter().enumerate() {
        if *raw && !matches!(codec, Codec::Store(_)) {
            out.copy_from_slice(s);
            continue;
        }
        let n = match codec {
            Codec::Zstd(_) => zd.decompress_to_buffer(s, &mut out).unwrap(),
            Codec::Lz4Flex => lz4_flex::block::decompress_into(s, &mut out).unwrap(),
            Codec::Lz4Sys => lz4::block::decompress_to_buffer(s, Some(PAGE as i32), &mut out).unwrap(),
            Codec::Store(_) => ckpt_chunker::decode(s, PAGE, &hashes[i]).unwrap().len(),
        };
        assert_eq!(n, PAGE);
        std::hint::black_box(&out);
    }
    let dt = t.elapsed();
    (total / ct.as_secs_f64() / 1e6, total / dt.as_secs_f64() / 1e6, csize as f64 / total)
}

/// memcpy MB/s of `chunks` into one 4 KiB buffer after another (what a
/// decoder writes), on one thread.
fn memcpy(chunks: &[&[u8]]) -> f64 {
    let mut dst = vec![0u8; chunks.len() * PAGE];
    dst.fill(1);
    let t = Instant::now();
    for (d, c) in dst.chunks_exact_mut(PAGE).zip(chunks) {
        d.copy_from_slice(c);
    }
    std::hint::black_box(&dst);
    (chunks.len() * PAGE) as f64 / t.elapsed().as_secs_f64() / 1e6
}

fn main() {
    let mut mib = 64usize;
    let mut reps = 3usize;
    let mut exe = std::env::current_exe().unwrap();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--mib" => mib = args.next().and_then(|v| v.parse().ok()).expect("--mib N"),
            "--reps" => reps = args.next().and_then(|v| v.parse().ok()).expect("--reps N"),
            "--exe" => exe = args.next().expect("--exe PATH").into(),
            _ => panic!("usage: bench-codec [--mib N] [--exe PATH] [--reps N]"),
        }
    }
    let bytes = mib << 20;
    let mut image = vec![0u8; bytes];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for (i, p) in image.chunks_exact_mut(PAGE).enumerate() {
        fill_page(&mut rng, p, i as u64, false);
    }
    let mut exe_bytes = std::fs::read(&exe).unwrap_or_else(|e| panic!("{}: {e}", exe.display()));
    exe_bytes.truncate(exe_bytes.len() / PAGE * PAGE);
    let json = json_text(bytes.min(64 << 20));
    let kinds: [(&str, &[u8]); 3] = [("image-like (bench_heap)", &image), ("executable", &exe_bytes), ("JSON text", &json)];
    let codecs = [
        Codec::Zstd(1),
        Codec::Zstd(-1),
        Codec::Zstd(-3),
        Codec::Lz4Flex,
        Codec::Lz4Sys,
        Codec::Store(ckpt_chunker::Codec::Zstd),
        Codec::Store(ckpt_chunker::Codec::Lz4),
    ];
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("4 KiB chunks, one frame each (raw when not shrunk; zero chunks left out), one thread; medians of {reps} runs; load {}\n", load.split_whitespace().take(3).collect::<Vec<_>>().join(" "));
    for (kind, data) in kinds {
        let chunks = chunks_of(data);
        println!("### {kind}: {} chunks ({:.1} MiB){}\n", chunks.len(), (chunks.len() * PAGE) as f64 / (1 << 20) as f64, if kind == "executable" { format!(", {}", exe.display()) } else { String::new() });
        println!("| codec | compress MB/s | x memcpy | decompress MB/s | x memcpy | stored / input |");
        println!("|---|---|---|---|---|---|");
        for codec in codecs {
            let mut c = Vec::new();
            let mut d = Vec::new();
            let mut m = Vec::new();
            let mut ratio = 0.0;
            for _ in 0..reps {
                m.push(memcpy(&chunks));
                let (cr, dr, r) = measure(codec, &chunks);
                c.push(cr);
                d.push(dr);
                ratio = r;
            }
            let (c, d, m) = (median(c), median(d), median(m));
            println!("| {} | {c:.0} | {:.3} | {d:.0} | {:.3} | {ratio:.3} |", codec.name(), c / m, d / m);
        }
        println!();
    }
}
