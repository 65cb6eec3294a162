//! Downtime of the two ways of stopping threads: the ptrace stopper (the
//! default) next to the plain signal stop (`CKPT_STOP=signal`), for a
//! process of N threads (half in 1 ms nanosleep loops, half blocked in
//! poll) and a 16 MiB heap, in the same run.
//!
//! Then the downtime of one large process (`bench_heap`, `--mib`, 1024 by
//! default) after a share of its pages changed, with the split of the
//! stopped phase per step, next to a raw `fork` of a process as large and a
//! raw copy of the changed pages, measured in the same run.
//!
//! Run: `cargo build --release --workspace && target/release/bench-stop [--reps 7] [--mib 1024] [--only threads|memory] [--pcts 0,0.1,1,10]`
//! It prints a Markdown table (BENCHMARKS.md is made from it).

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;

use ckpt_benches::{Env, figure, median};


/// Median downtime (ms) of `reps` checkpoints after the first.
fn downtime(ckpt: &Path, prog: &str, threads: usize, stop: &str, reps: usize) -> f64 {
    let env = Env::new(ckpt, "stop", &format!("{stop}-{threads}"));
    let mut child = env
        .cmd()
        .args(["launch", "--", prog, &threads.to_string(), "16"])
        .env("CKPT_STOP", stop)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert!(lines.any(|l| l.map(|l| l.starts_with("READY")).unwrap_or(false)), "no READY");
    env.run(&["checkpoint"]);
    let mut down = Vec::new();
    for _ in 0..reps {
        env.run(&["checkpoint"]);
        let log: Value = serde_json::from_str(&env.run(&["log", "--json"])).unwrap();
        let g = log.as_array().unwrap().last().unwrap().clone();
        down.push(g["info"]["downtime_ms"].as_f64().unwrap_or(0.0));
    }
    drop(child.stdin.take());
    let _ = child.wait();
    median(down)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let opt = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let reps = opt("--reps").and_then(|v| v.parse().ok()).unwrap_or(7);
    let mib = opt("--mib").and_then(|v| v.parse().ok()).unwrap_or(1024);
    let only = opt("--only").unwrap_or_default();
    let pcts: Vec<f64> = opt("--pcts").map(|v| v.split(',').filter_map(|p| p.parse().ok()).collect()).unwrap_or_else(|| vec![0.0, 0.1, 1.0, 10.0]);
    let ckpt = std::env::current_exe().unwrap().parent().unwrap().join("ckpt");
    let prog = env!("CKPT_BENCH_THREADS");
    println!("## Stopping threads (bench-stop)\n");
    if only != "memory" {
        println!("Median downtime of {reps} checkpoints after the first; 16 MiB heap.\n");
        println!("| threads | signal stop | ptrace stopper | ratio |\n|---|---|---|---|");
        for threads in [1usize, 8, 32, 128] {
            let sig = downtime(&ckpt, prog, threads, "signal", reps);
            let pt = downtime(&ckpt, prog, threads, "ptrace", reps);
            println!("| {threads} | {sig:.1} ms | {pt:.1} ms | {:.2}× |", pt / sig);
        }
    }
    if only != "threads" {
        memory_downtime(&ckpt, env!("CKPT_BENCH_HEAP"), mib, &pcts, reps);
    }
}

/// Lines of a child's stdout, read by a thread of their own (the heap
/// program beats every 20 ms: its pipe must never fill).
fn lines_of(out: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

fn wait_line(rx: &std::sync::mpsc::Receiver<String>, prefix: &str) {
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline {
        if let Ok(l) = rx.recv_timeout(Duration::from_secs(1))
            && l.starts_with(prefix)
        {
            return;
        }
    }
    panic!("no {prefix} line");
}

/// The same machine's raw costs the stopped phase is made of, measured in
/// this run: a fork of a process with `mib` MiB populated (page tables
/// copied), and a copy of `mib` × `pct`% at random pages with
/// `process_vm_readv`-sized memcpys.
fn raw_fork_ms(mib: usize) -> f64 {
    let len = mib << 20;
    let mut heap = vec![0u8; len];
    for p in heap.chunks_mut(4096) {
        p[0] = 1;
    }
    let mut v = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        // SAFETY: the child exits at once without touching anything.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: leaving the child without running destructors.
            unsafe { libc::_exit(0) };
        }
        v.push(t.elapsed().as_secs_f64() * 1000.0);
        // SAFETY: reaping our own child.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
    }
    std::hint::black_box(&heap);
    median(v)
}

/// Copy of `pages` random 4 KiB pages of a `mib` MiB buffer, in ms.
fn raw_copy_ms(mib: usize, pages: usize) -> f64 {
    let len = mib << 20;
    let src = vec![1u8; len];
    let mut dst = vec![2u8; pages * 4096];
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let idx: Vec<usize> = (0..pages)
        .map(|_| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng as usize) % (len / 4096)
        })
        .collect();
    let t = Instant::now();
    for (k, &p) in idx.iter().enumerate() {
        dst[k * 4096..(k + 1) * 4096].copy_from_slice(&src[p * 4096..(p + 1) * 4096]);
    }
    std::hint::black_box(&dst);
    t.elapsed().as_secs_f64() * 1000.0
}

/// One checkpoint's downtime and the first process's stopped-phase split.
struct Stopped {
    downtime: f64,
    suspend: f64,
    steps: Value,
    forked: bool,
    wall: f64,
}

fn last_round(env: &Env, wall: f64) -> Stopped {
    let log: Value = serde_json::from_str(&env.run(&["log", "--json"])).unwrap();
    let g = log.as_array().unwrap().last().unwrap().clone();
    let info = &g["info"];
    let p = &info["processes"][0];
    Stopped {
        downtime: info["downtime_ms"].as_f64().unwrap_or(0.0),
        suspend: info["suspend_ms"].as_f64().unwrap_or(0.0),
        steps: p["stopped_work"].clone(),
        forked: p["forked"].as_bool().unwrap_or(false),
        wall,
    }
}

/// Downtime of a `mib` MiB heap after `pct`% of its pages changed at
/// random: the median of `reps` checkpoints after the first.
fn memory_downtime(ckpt: &Path, heap: &str, mib: usize, pcts: &[f64], reps: usize) {
    let env = Env::new(ckpt, "stop", &format!("mem-{mib}"));
    let mut child = env.cmd().args(["launch", "--", heap, "-m", &mib.to_string()]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let rx = lines_of(child.stdout.take().unwrap());
    let mut stdin = child.stdin.take().unwrap();
    wait_line(&rx, "READY");
    let t = Instant::now();
    env.run(&["checkpoint"]);
    let first = last_round(&env, t.elapsed().as_secs_f64() * 1000.0);
    let fork = raw_fork_ms(mib);
    println!("\n### Downtime of one {mib} MiB process (bench_heap), medians of {reps}\n");
    println!("Baselines of the same run: a raw `fork` of a process with {mib} MiB populated took {fork:.1} ms (page tables copied).\n");
    println!("| pages changed | downtime | vs raw fork | vs raw copy of the changed pages | suspend | per step (ms) | copied while stopped | time to commit |");
    println!("|---|---|---|---|---|---|---|---|");
    let row = |what: String, s: &Stopped, copy: f64| {
        let steps = s.steps.as_object().map(|o| o.iter().map(|(k, v)| format!("{} {:.1}", k.trim_end_matches("_ms"), v.as_f64().unwrap_or(0.0))).collect::<Vec<_>>().join(", ")).unwrap_or_default();
        println!(
            "| {what} | {:.1} ms | {:.2}× | {} | {:.1} ms | {steps} | {} | {:.0} ms |",
            s.downtime,
            s.downtime / fork,
            if copy > 0.0 { format!("{:.1}× ({copy:.2} ms)", s.downtime / copy) } else { "—".into() },
            s.suspend,
            if s.forked { "no (forked)" } else { "yes" },
            s.wall
        );
    };
    row("first (all)".into(), &first, 0.0);
    for &pct in pcts {
        let mut runs = Vec::new();
        for _ in 0..reps {
            writeln!(stdin, "mutate {pct} random").unwrap();
            wait_line(&rx, "MUTATED");
            let t = Instant::now();
            env.run(&["checkpoint"]);
            runs.push(last_round(&env, t.elapsed().as_secs_f64() * 1000.0));
        }
        runs.sort_by(|a, b| a.downtime.partial_cmp(&b.downtime).unwrap());
        let m = runs.swap_remove(runs.len() / 2);
        let pages = ((mib << 20) / 4096) as f64 * pct / 100.0;
        let copy = raw_copy_ms(mib, pages as usize);
        row(format!("{pct}%"), &m, copy);
        figure(&format!("downtime, {mib} MiB, {pct}% changed"), m.downtime, "ms", (copy > 0.0).then_some(copy), (mib == 1024 && pct == 1.0).then_some(5.0));
    }
    writeln!(stdin, "quit").ok();
    drop(stdin);
    let _ = child.wait();
}
