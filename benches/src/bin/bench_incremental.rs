//! Incremental-checkpoint benchmark: a program with a large heap changes a
//! share of its pages (random or sequential) between checkpoints; for each
//! dirty-tracking backend we record program downtime, checkpoint wall time to
//! durable commit, bytes read from the program, bytes written to the store,
//! store growth, and restart time to first output; next to the raw speed of
//! memcpy, BLAKE3 and zstd on the same kind of data, measured in the same run.
//!
//! Run: `cargo build --release --workspace && target/release/bench-incremental [--mib 1024] [--reps 5]`
//! It prints a Markdown report (BENCHMARKS.md is made from it).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use ckpt_benches::ceilings::Sample;
use ckpt_benches::{PAGE, median};
use serde_json::Value;

struct Raw {
    memcpy: f64,
    blake3_1: f64,
    blake3_all: f64,
    zstd_1: f64,
    zstd_all: f64,
    unzstd_1: f64,
    ratio: f64,
}

fn raw_speeds(chunk: usize) -> Raw {
    let s = Sample::new(false);
    let (zstd_1, ratio) = s.zstd_1(chunk, 1);
    Raw {
        memcpy: s.memcpy(),
        blake3_1: s.blake3_1(chunk),
        blake3_all: s.blake3_all(chunk),
        zstd_1,
        zstd_all: s.zstd_all(chunk, 1),
        unzstd_1: s.unzstd(chunk, 1, false),
        ratio,
    }
}

struct Running {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
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

struct Env {
    ckpt: PathBuf,
    dir: PathBuf,
}

impl Env {
    fn cmd(&self) -> Command {
        let mut c = Command::new(&self.ckpt);
        c.env("CKPT_STORE", self.dir.join("store")).env("CKPT_COORD", format!("unix:{}", self.dir.join("c.sock").display()));
        c
    }
    fn run(&self, args: &[&str]) -> String {
        let out = self.cmd().args(args).stdin(Stdio::null()).output().expect("run ckpt");
        if !out.status.success() {
            panic!("ckpt {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
    fn store_bytes(&self) -> u64 {
        fn walk(p: &Path) -> u64 {
            std::fs::read_dir(p)
                .map(|rd| {
                    rd.flatten()
                        .map(|e| {
                            let m = e.metadata().unwrap();
                            if m.is_dir() { walk(&e.path()) } else { m.len() }
                        })
                        .sum()
                })
                .unwrap_or(0)
        }
        walk(&self.dir.join("store"))
    }
    fn last_gen(&self) -> Value {
        let v: Value = serde_json::from_str(&self.run(&["log", "--json"])).unwrap();
        v.as_array().unwrap().last().unwrap().clone()
    }
}

#[derive(Clone)]
struct Row {
    backend: String,
    pattern: String,
    pct: f64,
    downtime_ms: f64,
    wall_ms: f64,
    read: u64,
    new: u64,
    stored: u64,
    growth: u64,
    changed_zstd: f64,
}


fn mib(b: f64) -> String {
    format!("{:.1}", b / 1048576.0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let opt = |name: &str, def: usize| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(def);
    let heap_mib = opt("--mib", 1024);
    let reps = opt("--reps", 5);
    let exe = std::env::current_exe().unwrap();
    let ckpt = exe.parent().unwrap().join("ckpt");
    let prog = env!("CKPT_BENCH_HEAP");
    let chunk = 4096;
    eprintln!("raw speeds ...");
    let raw = raw_speeds(chunk);
    let pages = heap_mib * 1024 * 1024 / PAGE;

    let backends: [(&str, &[&str]); 3] = [
        ("scan (full read)", &["--dirty-tracking", "scan"]),
        ("uffd-wp", &["--dirty-tracking", "uffd-wp"]),
        ("uffd-wp, no fork", &["--dirty-tracking", "uffd-wp", "--no-fork-ckpt"]),
    ];
    let mut rows: Vec<Row> = Vec::new();
    let mut firsts = Vec::new();
    let mut restarts = Vec::new();
    for (name, flags) in backends {
        eprintln!("backend {name} ...");
        let dir = std::env::temp_dir().join(format!("ckpt-bench-{}-{}", std::process::id(), rows.len()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let env = Env { ckpt: ckpt.clone(), dir: dir.clone() };
        let mut c = env.cmd();
        c.arg("launch").args(flags).args(["--", prog, "-m", &heap_mib.to_string()]).stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut child = c.spawn().unwrap();
        let stdin = child.stdin.take().unwrap();
        let lines = ckpt_benches::lines_of(child.stdout.take().unwrap());
        let mut r = Running { child, stdin, lines };
        wait_for(&r.lines, "READY", Duration::from_secs(120)).expect("READY");
        let t = Instant::now();
        env.run(&["checkpoint"]);
        let first_wall = t.elapsed().as_secs_f64() * 1000.0;
        let g = env.last_gen();
        let present = g["info"]["processes"][0]["read_bytes"].as_u64().unwrap_or(0);
        firsts.push((name, first_wall, g["info"]["downtime_ms"].as_f64().unwrap_or(0.0), present, g["stored_bytes"].as_u64().unwrap_or(0)));
        for pattern in ["random", "sequential"] {
            for pct in [0.1, 1.0, 10.0, 100.0] {
                let n = if pct == 1.0 && pattern == "random" { reps } else { 1 };
                let mut samples = Vec::new();
                for _ in 0..n {
                    writeln!(r.stdin, "mutate {pct} {pattern}").unwrap();
                    wait_for(&r.lines, "MUTATED", Duration::from_secs(120)).expect("MUTATED");
                    let before = env.store_bytes();
                    let t = Instant::now();
                    env.run(&["checkpoint"]);
                    let wall_ms = t.elapsed().as_secs_f64() * 1000.0;
                    let g = env.last_gen();
                    let changed = (pages as f64 * pct / 100.0).max(1.0) * PAGE as f64;
                    samples.push(Row {
                        backend: name.to_string(),
                        pattern: pattern.to_string(),
                        pct,
                        downtime_ms: g["info"]["downtime_ms"].as_f64().unwrap_or(0.0),
                        wall_ms,
                        read: g["info"]["processes"][0]["read_bytes"].as_u64().unwrap_or(0),
                        new: g["new_bytes"].as_u64().unwrap_or(0),
                        stored: g["stored_bytes"].as_u64().unwrap_or(0),
                        growth: env.store_bytes() - before,
                        changed_zstd: changed * raw.ratio,
                    });
                }
                let mut row = samples[0].clone();
                row.downtime_ms = median(samples.iter().map(|s| s.downtime_ms).collect());
                row.wall_ms = median(samples.iter().map(|s| s.wall_ms).collect());
                row.read = median(samples.iter().map(|s| s.read as f64).collect()) as u64;
                row.growth = median(samples.iter().map(|s| s.growth as f64).collect()) as u64;
                rows.push(row);
            }
        }
        // Restart time to first output from the local store.
        env.run(&["kill"]);
        let _ = r.child.wait();
        let t = Instant::now();
        let mut rc = env.cmd();
        rc.arg("restart").stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null());
        let mut rchild = rc.spawn().unwrap();
        let rl = ckpt_benches::lines_of(rchild.stdout.take().unwrap());
        let first = wait_for(&rl, "BEAT", Duration::from_secs(120)).map(|at| at.duration_since(t).as_secs_f64() * 1000.0);
        restarts.push((name, first.unwrap_or(f64::NAN)));
        let _ = env.cmd().arg("kill").output();
        let _ = rchild.wait();
        let _ = env.cmd().arg("quit").output();
        let _ = std::fs::remove_dir_all(&dir);
    }

    let date = Command::new("date").arg("-u").arg("+%Y-%m-%d").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string()))
        .unwrap_or_default();
    println!("## Incremental checkpoints ({date})\n");
    println!("Machine: {cpu}, {} cores, Linux {kernel}. Heap: {heap_mib} MiB (`benches/programs/bench_heap.c`), chunks {} KiB.\n", rayon::current_num_threads(), chunk / 1024);
    println!("### Ceilings, same run\n");
    println!("| operation | GB/s |\n|---|---|");
    println!("| memcpy | {:.2} |", raw.memcpy);
    println!("| BLAKE3, 1 thread, 16 KiB chunks | {:.2} |", raw.blake3_1);
    println!("| BLAKE3, all cores (ckpt's chunker) | {:.2} |", raw.blake3_all);
    println!("| zstd -1, 1 thread, 16 KiB chunks | {:.2} |", raw.zstd_1);
    println!("| zstd -1, all cores | {:.2} |", raw.zstd_all);
    println!("| zstd decompress, 1 thread | {:.2} |", raw.unzstd_1);
    println!("\nzstd -1 ratio on this data: {:.3}\n", raw.ratio);
    println!("### First (full) checkpoint\n");
    println!("| backend | wall ms | downtime ms | present MiB read | MB/s of present memory | vs zstd all cores | stored MiB |\n|---|---|---|---|---|---|---|");
    for (name, wall, down, present, stored) in &firsts {
        let rate = *present as f64 / (wall / 1000.0) / 1e6;
        println!("| {name} | {wall:.0} | {down:.1} | {} | {rate:.0} | {:.2}x | {} |", mib(*present as f64), rate / 1000.0 / raw.zstd_all, mib(*stored as f64));
    }
    println!("\n### Incremental checkpoints (medians over {reps} runs for 1% random)\n");
    println!("| backend | pattern | changed % | downtime ms | wall ms | read MiB | read / full read | new MiB | stored MiB | store growth MiB | growth / zstd(changed) |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let full_read = |pattern: &str, pct: f64| rows.iter().find(|r| r.backend.starts_with("scan") && r.pattern == pattern && r.pct == pct).map(|r| r.read as f64).unwrap_or(f64::NAN);
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.1} | {:.0} | {} | {:.3} | {} | {} | {} | {:.2} |",
            r.backend,
            r.pattern,
            r.pct,
            r.downtime_ms,
            r.wall_ms,
            mib(r.read as f64),
            r.read as f64 / full_read(&r.pattern, r.pct),
            mib(r.new as f64),
            mib(r.stored as f64),
            mib(r.growth as f64),
            r.growth as f64 / r.changed_zstd
        );
    }
    println!("\n### Restart to first output (local store)\n");
    println!("| backend of the image | ms |\n|---|---|");
    for (name, ms) in restarts {
        println!("| {name} | {ms:.0} |");
    }
}
