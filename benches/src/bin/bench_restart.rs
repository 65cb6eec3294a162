//! Restart to first output (issue 13): a `bench_heap` of `--mib` MiB is
//! checkpointed once, killed, and restarted from the local store, warm (the
//! packs in the page cache) and cold (`drop_caches` first: needs root), eager
//! and with `--lazy`. Printed next to the ceilings of the same run: reading
//! the store's packs from disk (cold) and from the page cache, the
//! decompression of the same kind of data on all cores by the store's
//! codec (zstd or LZ4: the codec of a store this build makes), BLAKE3 (the
//! verification of every chunk) on all cores, memcpy, and filling fresh
//! memory on all cores (each new page faulted in, zeroed and written: what
//! a restart does to every page it fills; the eager rows also give their
//! ratio to decompress + verify + that fill). The restart's own
//! steps come from its `CKPT_LOG=ckpt_engine=debug` lines.
//!
//! `target/release/bench-restart --mib 1024 [--reps 3] [--lazy-mib 4096]`
//!
//! `--ab OTHER/ckpt`: an A/B of two builds on the same store in the same
//! run: each restart is made by this build's `ckpt` and by `OTHER/ckpt`
//! (with its own restorer beside it), alternately (the order swapped each
//! repetition), and each mode's medians are printed side by side with
//! their ratio and the load average.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use ckpt_benches::ceilings;
use ckpt_benches::{Env, PAGE, figure, gbps, median};
use rayon::prelude::*;

struct Ceilings {
    memcpy: f64,
    /// Fresh memory faulted in and written, all cores.
    fill_all: f64,
    blake3_all: f64,
    /// Decompression by the store's codec, all cores.
    uncodec_all: f64,
    codec: ckpt_chunker::Codec,
}

fn ceilings() -> Ceilings {
    let s = ceilings::Sample::new(false);
    let codec = ceilings::codec();
    Ceilings { memcpy: s.memcpy(), fill_all: s.fill_fresh_all(), blake3_all: s.blake3_all(PAGE), uncodec_all: s.decompress_all(PAGE, codec), codec }
}

fn wait_for(rx: &Receiver<String>, prefix: &str, timeout: Duration) -> Option<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        match rx.recv_timeout(left) {
            Ok(l) if l.starts_with(prefix) => return Some(Instant::now()),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
}

fn drop_caches() {
    let _ = Command::new("sync").status();
    if std::fs::write("/proc/sys/vm/drop_caches", "3").is_err() {
        eprintln!("cannot drop the page cache (not root?): the cold figures are warm");
    }
}

fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            files(&p, out);
        } else if p.extension().is_some_and(|x| x == "pack") {
            out.push(p);
        }
    }
}

/// Reads every pack file of the store once (2 threads): bytes, time.
fn read_packs(store: &Path) -> (u64, Duration) {
    let mut packs = Vec::new();
    files(store, &mut packs);
    let t = Instant::now();
    let bytes: u64 = packs
        .par_iter()
        .map(|p| {
            let mut f = std::fs::File::open(p).unwrap();
            let mut buf = vec![0u8; 4 << 20];
            let mut n = 0u64;
            loop {
                let k = f.read(&mut buf).unwrap();
                if k == 0 {
                    break n;
                }
                n += k as u64;
            }
        })
        .sum();
    (bytes, t.elapsed())
}

struct Sample {
    first_ms: f64,
    steps: Vec<(String, f64)>,
}

/// One restart to its first `BEAT`; the engine's timed steps from its log.
/// A restart refused at once (the coordinator still lists the process just
/// killed) is tried again.
fn restart(env: &Env, ckpt: &Path, lazy: bool) -> Sample {
    for _ in 0..20 {
        let s = restart_once(env, ckpt, lazy);
        if !s.first_ms.is_nan() {
            return s;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    Sample { first_ms: f64::NAN, steps: Vec::new() }
}

fn restart_once(env: &Env, ckpt: &Path, lazy: bool) -> Sample {
    let t = Instant::now();
    let mut rc = env.cmd_with(ckpt);
    rc.arg("restart");
    if lazy {
        rc.arg("--lazy");
    }
    rc.env("CKPT_LOG", "ckpt_engine=debug").stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = rc.spawn().unwrap();
    let out = ckpt_benches::lines_of(child.stdout.take().unwrap());
    let err = ckpt_benches::lines_of(child.stderr.take().unwrap());
    let first = wait_for(&out, "BEAT", Duration::from_secs(300)).map(|at| at.duration_since(t).as_secs_f64() * 1000.0);
    let _ = env.cmd().arg("kill").output();
    let _ = child.wait();
    let mut steps = Vec::new();
    while let Ok(l) = err.try_recv() {
        // `... DEBUG ckpt_engine::restore: step ms=12 what`
        if let Some(i) = l.find(" ms=") {
            let rest = &l[i + 4..];
            let (num, what) = rest.split_once(' ').unwrap_or((rest, ""));
            if let Ok(ms) = num.parse::<f64>() {
                let name = l[..i].rsplit(": ").next().unwrap_or("").trim().to_string();
                let name = if what.is_empty() { name } else { format!("{name} {what}") };
                steps.push((name, ms));
            }
        }
    }
    Sample { first_ms: first.unwrap_or(f64::NAN), steps }
}


/// Launches a heap of `mib` MiB, checkpoints it, kills it.
fn prepare(ckpt: &Path, mib: usize) -> (Env, u64) {
    let env = Env::new(ckpt, "restart", &mib.to_string());
    let mut c = env.cmd();
    c.arg("launch").args(["--", env!("CKPT_BENCH_HEAP"), "-m", &mib.to_string()]).stdin(Stdio::null()).stdout(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let lines = ckpt_benches::lines_of(child.stdout.take().unwrap());
    wait_for(&lines, "READY", Duration::from_secs(300)).expect("READY");
    env.run(&["checkpoint"]);
    env.run(&["kill"]);
    let _ = child.wait();
    let mut packs = Vec::new();
    files(&env.dir.join("store"), &mut packs);
    let bytes = packs.iter().map(|p| p.metadata().map(|m| m.len()).unwrap_or(0)).sum();
    (env, bytes)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let opt = |name: &str, def: usize| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(def);
    let mib = opt("--mib", 1024);
    let reps = opt("--reps", 3);
    let lazy_mib = opt("--lazy-mib", 0);
    let ckpt = std::env::current_exe().unwrap().parent().unwrap().join("ckpt");
    eprintln!("ceilings ...");
    let c = ceilings();
    eprintln!("checkpoint of {mib} MiB ...");
    let (env, pack_bytes) = prepare(&ckpt, mib);
    let image = (mib as u64) << 20;
    drop_caches();
    let (_, cold_read) = read_packs(&env.dir.join("store"));
    let (_, warm_read) = read_packs(&env.dir.join("store"));
    let modes: &[(&str, bool, bool)] = &[("eager, warm", false, false), ("eager, cold", false, true), ("lazy, warm", true, false), ("lazy, cold", true, true)];
    if let Some(other) = args.iter().position(|a| a == "--ab").and_then(|i| args.get(i + 1)) {
        ab(&env, &ckpt, Path::new(other), modes, reps, mib, pack_bytes, &c, cold_read);
        return;
    }
    let mut rows = Vec::new();
    for &(name, lazy, cold) in modes {
        eprintln!("restart {name} ...");
        let mut samples = Vec::new();
        for _ in 0..reps {
            if cold {
                drop_caches();
            }
            samples.push(restart(&env, &ckpt, lazy));
        }
        let first = median(samples.iter().map(|s| s.first_ms).collect());
        rows.push((name, first, samples.pop().unwrap().steps));
    }
    drop(env);
    let mut big = None;
    if lazy_mib > 0 {
        eprintln!("checkpoint of {lazy_mib} MiB ...");
        let (env, _) = prepare(&ckpt, lazy_mib);
        let lazy: Vec<f64> = (0..reps).map(|_| restart(&env, &ckpt, true).first_ms).collect();
        let eager = restart(&env, &ckpt, false).first_ms;
        big = Some((median(lazy), eager));
    }

    let date = Command::new("date").args(["-u", "+%Y-%m-%d"]).output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    println!("## Restart (issue 13, {date})\n");
    println!("`target/release/bench-restart --mib {mib} --reps {reps}{}`; Linux {kernel}, {} cores. Image: {mib} MiB `bench_heap`, {:.1} MiB of packs.\n", if lazy_mib > 0 { format!(" --lazy-mib {lazy_mib}") } else { String::new() }, rayon::current_num_threads(), pack_bytes as f64 / 1048576.0);
    println!("### Ceilings, same run\n");
    println!("| operation | GB/s | time for this image |\n|---|---|---|");
    let ms = |gbps: f64, bytes: u64| bytes as f64 / gbps / 1e6;
    let cold = gbps(pack_bytes, cold_read);
    let warm = gbps(pack_bytes, warm_read);
    println!("| read the packs, cold (disk) | {cold:.2} | {:.0} ms |", cold_read.as_secs_f64() * 1000.0);
    println!("| read the packs, page cache | {warm:.2} | {:.0} ms |", warm_read.as_secs_f64() * 1000.0);
    println!("| {} decompress, all cores (of the image) | {:.2} | {:.0} ms |", c.codec, c.uncodec_all, ms(c.uncodec_all, image));
    println!("| BLAKE3, all cores (of the image) | {:.2} | {:.0} ms |", c.blake3_all, ms(c.blake3_all, image));
    println!("| memcpy (of the image) | {:.2} | {:.0} ms |", c.memcpy, ms(c.memcpy, image));
    println!("| fill fresh memory, all cores (of the image) | {:.2} | {:.0} ms |", c.fill_all, ms(c.fill_all, image));
    let floor_warm = ms(c.uncodec_all, image) + ms(c.blake3_all, image);
    // What an eager restart cannot skip besides: the first touch of every
    // page it fills.
    let floor_fill = floor_warm + ms(c.fill_all, image);
    println!("\n### Restart to first output\n");
    println!("| mode | first output ms (median of {reps}) | vs ceiling |\n|---|---|---|");
    for (name, first, _) in &rows {
        let (ceil, what) = if name.contains("cold") { (cold_read.as_secs_f64() * 1000.0, "cold pack read") } else { (floor_warm, if c.codec == ckpt_chunker::Codec::Lz4 { "lz4 decompress + verify, all cores" } else { "zstd decompress + verify, all cores" }) };
        let with_fill = if name.starts_with("eager") { format!("; {:.2}× decompress + verify + fill fresh memory ({floor_fill:.0} ms)", first / floor_fill) } else { String::new() };
        println!("| {name} | {first:.0} | {:.2}× the {what} ({ceil:.0} ms){with_fill} |", first / ceil);
        let target = match (*name, mib == 1024) {
            ("eager, warm", true) => Some(500.0),
            ("eager, cold", true) => Some(ceil),
            (n, _) if n.starts_with("lazy") => Some(50.0),
            _ => None,
        };
        figure(&format!("restart to first output, {name}, {mib} MiB"), *first, "ms", Some(ceil), target);
    }
    if let Some((lazy, eager)) = big {
        println!("| lazy, warm, {lazy_mib} MiB | {lazy:.0} | eager restart of the same image: {eager:.0} ms ({:.3}×) |", lazy / eager);
        figure(&format!("restart to first output, lazy, warm, {lazy_mib} MiB"), lazy, "ms", None, Some(50.0));
    }
    println!("\n### Steps of the last restart of each mode (the engine's debug log)\n");
    for (name, _, steps) in &rows {
        let s: Vec<String> = steps.iter().map(|(n, ms)| format!("{n}: {ms:.0} ms")).collect();
        println!("- {name}: {}", s.join("; "));
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg").map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" ")).unwrap_or_default()
}

/// `--ab`: every mode restarted by both builds, alternately; medians, ratio.
#[allow(clippy::too_many_arguments)]
fn ab(env: &Env, ckpt: &Path, other: &Path, modes: &[(&str, bool, bool)], reps: usize, mib: usize, pack_bytes: u64, c: &Ceilings, cold_read: Duration) {
    let load_before = load_average();
    let mut rows = Vec::new();
    for &(name, lazy, cold) in modes {
        eprintln!("restart {name}, A/B ...");
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let mut steps = (Vec::new(), Vec::new());
        for r in 0..reps {
            let order: [bool; 2] = if r % 2 == 0 { [false, true] } else { [true, false] };
            for this in order {
                if cold {
                    drop_caches();
                }
                let s = restart(env, if this { ckpt } else { other }, lazy);
                eprintln!("  {} {:.0} ms", if this { "this " } else { "other" }, s.first_ms);
                if this {
                    a.push(s.first_ms);
                    steps.0 = s.steps;
                } else {
                    b.push(s.first_ms);
                    steps.1 = s.steps;
                }
            }
        }
        rows.push((name, median(a), median(b), steps));
    }
    let image = (mib as u64) << 20;
    let ms = |gbps: f64| image as f64 / gbps / 1e6;
    println!("## Restart A/B: {} against {}\n", ckpt.display(), other.display());
    println!("Image: {mib} MiB `bench_heap`, {:.1} MiB of packs; {reps} restarts per build and mode, alternated. Load average (1, 5, 15 min) before {load_before}, after {}.\n", pack_bytes as f64 / 1048576.0, load_average());
    println!("Ceilings, same run: cold pack read {:.0} ms; {} decompress all cores {:.0} ms; BLAKE3 all cores {:.0} ms; memcpy {:.0} ms; fill fresh memory all cores {:.0} ms.\n", cold_read.as_secs_f64() * 1000.0, c.codec, ms(c.uncodec_all), ms(c.blake3_all), ms(c.memcpy), ms(c.fill_all));
    println!("| mode | this (median) | other (median) | this / other |\n|---|---|---|---|");
    for (name, a, b, _) in &rows {
        println!("| {name} | {a:.0} ms | {b:.0} ms | {:.2} |", a / b);
    }
    println!();
    for (name, _, _, (sa, sb)) in &rows {
        let f = |s: &Vec<(String, f64)>| s.iter().map(|(n, ms)| format!("{n}: {ms:.0} ms")).collect::<Vec<_>>().join("; ");
        println!("- {name}: this: {}\n  other: {}", f(sa), f(sb));
    }
}
