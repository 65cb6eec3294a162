//! Downtime of the two ways of stopping threads: the ptrace stopper (the
//! default) next to the plain signal stop (`CKPT_STOP=signal`), for a
//! process of N threads (half in 1 ms nanosleep loops, half blocked in
//! poll) and a 16 MiB heap, in the same run.
//!
//! Run: `cargo build --release --workspace && target/release/bench-stop [--reps 7]`
//! It prints a Markdown table (BENCHMARKS.md is made from it).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;

use serde_json::Value;

use ckpt_benches::Env;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

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
    let reps = args.iter().position(|a| a == "--reps").and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(7);
    let ckpt = std::env::current_exe().unwrap().parent().unwrap().join("ckpt");
    let prog = env!("CKPT_BENCH_THREADS");
    println!("## Stopping threads (bench-stop)\n");
    println!("Median downtime of {reps} checkpoints after the first; 16 MiB heap.\n");
    println!("| threads | signal stop | ptrace stopper | ratio |\n|---|---|---|---|");
    for threads in [1usize, 8, 32, 128] {
        let sig = downtime(&ckpt, prog, threads, "signal", reps);
        let pt = downtime(&ckpt, prog, threads, "ptrace", reps);
        println!("| {threads} | {sig:.1} ms | {pt:.1} ms | {:.2}× |", pt / sig);
    }
}
