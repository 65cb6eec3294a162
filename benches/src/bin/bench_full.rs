//! The first (full) checkpoint of a program with a large heap, next to
//! the ceilings of every stage measured in the same run on the same kind
//! of data: memcpy, BLAKE3 (all cores), the store's codec (zstd at the
//! store's level, or LZ4: the codec of a store this build makes; all
//! cores, through ckpt's own encoder, which stores incompressible chunks
//! raw), its decompression, and the disk's write (with fsync) and read
//! speed in the store's directory. The bound of a pipelined checkpoint is
//! its slowest stage: max(present / encode speed, stored / disk write).
//!
//! Run: `cargo build --release -p ckpt-cli -p ckpt-preload -p ckpt-restorer -p ckpt-benches &&
//! target/release/bench-full [--mib 1024] [--reps 3]`. Prints Markdown.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Instant;

use ckpt_benches::ceilings::Sample;
use ckpt_benches::{Env, PAGE, figure, gbps};

struct Ceil {
    memcpy: f64,
    blake3: f64,
    encode: f64,
    codec_raw: f64,
    decode: f64,
}

fn ceilings(hash: bool) -> Ceil {
    let s = Sample::new(hash);
    let codec = ckpt_benches::ceilings::codec();
    let (encode, decode) = s.encode_decode_with(codec);
    Ceil { memcpy: s.memcpy(), blake3: s.blake3_all(PAGE), encode, codec_raw: s.compress_all(PAGE, codec), decode }
}

/// Write `mib` MiB to a new file in `dir` and fsync it; read it back
/// after dropping it from the page cache. (write GB/s, read GB/s)
fn disk(dir: &Path, mib: usize) -> (f64, f64) {
    let path = dir.join("disk-probe");
    let block: Vec<u8> = (0..8 << 20).map(|i: usize| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let t = Instant::now();
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(&path).unwrap();
    for _ in 0..mib / 8 {
        f.write_all(&block).unwrap();
    }
    f.sync_all().unwrap();
    let w = gbps((mib << 20) as u64, t.elapsed());
    drop(f);
    // O_DIRECT reads bypass the page cache the write filled.
    let mut f = std::fs::OpenOptions::new().read(true).custom_flags(libc_o_direct()).open(&path).unwrap();
    let mut buf = AlignedBuf::new(8 << 20);
    let t = Instant::now();
    let mut total = 0;
    loop {
        let n = f.read(buf.as_mut()).unwrap();
        if n == 0 {
            break;
        }
        total += n;
    }
    let r = gbps(total as u64, t.elapsed());
    let _ = std::fs::remove_file(&path);
    (w, r)
}

fn libc_o_direct() -> i32 {
    0o40000 // O_DIRECT on x86-64
}

/// A 4 KiB-aligned buffer for O_DIRECT.
struct AlignedBuf(Vec<u8>, usize);
impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let v = vec![0u8; len + 4096];
        let off = v.as_ptr().align_offset(4096);
        AlignedBuf(v, off)
    }
    fn as_mut(&mut self) -> &mut [u8] {
        let (o, l) = (self.1, self.0.len() - 4096);
        &mut self.0[o..o + l]
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let opt = |name: &str, def: usize| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(def);
    let heap_mib = opt("--mib", 1024);
    let reps = opt("--reps", 3);
    let exe = std::env::current_exe().unwrap();
    let ckpt = exe.parent().unwrap().join("ckpt");
    let prog = env!("CKPT_BENCH_HEAP");
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    println!("## First (full) checkpoint vs its ceilings (bench-full)\n");
    let codec = ckpt_benches::ceilings::codec();
    let codec_name = match codec {
        ckpt_chunker::Codec::Zstd => format!("zstd level {}", ckpt_chunker::DEFAULT_LEVEL),
        c => c.to_string(),
    };
    println!("{} cores, Linux {kernel}, heap {heap_mib} MiB, 4 KiB chunks, {codec_name} (the store's codec), uffd-wp, forked snapshot; wall time of `ckpt checkpoint` to durable commit, median of {reps} fresh stores; load {}.\n", rayon::current_num_threads(), std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split_whitespace().take(3).collect::<Vec<_>>().join(" "));
    println!("| data | memcpy GB/s | BLAKE3 GB/s | {codec} GB/s, all cores | encode ({codec} or raw) GB/s | decode GB/s | stored/present | disk write+fsync GB/s | disk read GB/s | bound s | ckpt wall s | wall / bound | incremental idle ms | incremental 1% ms |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for kind in ["image", "hash"] {
        eprintln!("{kind}: ceilings ...");
        let c = ceilings(kind == "hash");
        let mut walls = Vec::new();
        let mut idle = Vec::new();
        let mut one = Vec::new();
        let mut dw = Vec::new();
        let mut dr = Vec::new();
        let mut stored = 0u64;
        let mut present = 0u64;
        for rep in 0..reps {
            let env = Env::new(&ckpt, "full", &format!("{kind}-{rep}"));
            let (w, r) = disk(&env.dir, 512);
            dw.push(w);
            dr.push(r);
            let mut child = env
                .cmd()
                .args(["launch", "--dirty-tracking", "uffd-wp", "--", prog, "-m", &heap_mib.to_string(), "-k", kind])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let mut stdin = child.stdin.take().unwrap();
            let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
            let mut wait = |p: &str| loop {
                match lines.next() {
                    Some(Ok(l)) if l.starts_with(p) => break,
                    Some(Ok(_)) => {}
                    _ => panic!("the program ended before {p}"),
                }
            };
            wait("READY");
            let t = Instant::now();
            env.run(&["checkpoint"]);
            walls.push(t.elapsed().as_secs_f64());
            let log: serde_json::Value = serde_json::from_str(&env.run(&["log", "--json"])).unwrap();
            let g = log.as_array().unwrap().last().unwrap().clone();
            stored = g["stored_bytes"].as_u64().unwrap_or(0);
            present = g["info"]["processes"][0]["read_bytes"].as_u64().unwrap_or(0);
            for _ in 0..3 {
                let t = Instant::now();
                env.run(&["checkpoint"]);
                idle.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            for _ in 0..3 {
                writeln!(stdin, "mutate 1 random").unwrap();
                wait("MUTATED");
                let t = Instant::now();
                env.run(&["checkpoint"]);
                one.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            let _ = env.cmd().arg("kill").stdin(Stdio::null()).output();
            drop(stdin);
            let _ = child.wait();
        }
        let med = |mut v: Vec<f64>| {
            v.sort_by(|a, b| a.partial_cmp(b).unwrap());
            v[v.len() / 2]
        };
        let (w, r) = (med(dw), med(dr));
        let bound = (present as f64 / 1e9 / c.encode).max(stored as f64 / 1e9 / w);
        let wall = med(walls);
        let (idle, one) = (med(idle), med(one));
        println!(
            "| {kind} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.3} | {w:.2} | {r:.2} | {bound:.2} | {wall:.2} | {:.2} | {:.0} | {:.0} |",
            c.memcpy,
            c.blake3,
            c.codec_raw,
            c.encode,
            c.decode,
            stored as f64 / present.max(1) as f64,
            wall / bound,
            idle,
            one
        );
        let data = if kind == "hash" { "hash-like" } else { "image-like" };
        figure(&format!("full checkpoint, {heap_mib} MiB {data}"), wall, "s", Some(bound), (heap_mib == 1024).then_some(1.5));
        figure(&format!("incremental, idle, {heap_mib} MiB {data}"), idle, "ms", None, (heap_mib == 1024).then_some(50.0));
        figure(&format!("incremental, 1% changed, {heap_mib} MiB {data}"), one, "ms", None, (heap_mib == 1024).then_some(150.0));
    }
}
