//! Costs of whole computations: what joining the coordinator adds to `fork`
//! and to `fork`+`exec` (each child registers before `fork` returns), next
//! to the same loop run without ckpt in the same run; and how checkpoint
//! downtime and time to commit grow with the number of processes (K idle
//! processes of 16 MiB each), next to one process holding all the memory;
//! and what capturing through a capture helper (`ckpt host`, a process in
//! another PID namespace) costs next to the coordinator's own capture of
//! the same program.
//!
//! Run: `cargo build --release --workspace && target/release/bench-trees [--forks 300] [--reps 3] [--only trees]`
//! (`--only trees`: the K-process checkpoints alone.)
//!
//! Downtime is the generation's `downtime_ms`: from the coordinator's first
//! CHECKPOINT message to the moment the last agent let its threads go (its
//! RESUMED says when; a coordinator before 2026-12-07 counted to its last
//! RESUME sent, which left out the last process's wake-up).
//! It prints a Markdown report (BENCHMARKS.md is made from it).

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use serde_json::Value;

use ckpt_benches::{Env, figure, median};

/// Runs `prog args` (under `ckpt launch` when `env` is given) and returns
/// its NS_PER_OP figure.
fn ns_per_op(env: Option<&Env>, prog: &str, args: &[&str]) -> f64 {
    let out = match env {
        Some(e) => e.cmd().arg("launch").arg("--").arg(prog).args(args).stdin(Stdio::null()).output(),
        None => Command::new(prog).args(args).stdin(Stdio::null()).output(),
    }
    .expect("run bench_fork");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().find_map(|l| l.strip_prefix("NS_PER_OP ")).and_then(|v| v.trim().parse().ok()).unwrap_or_else(|| panic!("no figure in {text:?}"))
}


fn main() {
    let args: Vec<String> = std::env::args().collect();
    let opt = |name: &str, def: usize| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(def);
    let forks = opt("--forks", 300).to_string();
    let reps = opt("--reps", 3);
    let ckpt = std::env::current_exe().unwrap().parent().unwrap().join("ckpt");
    let prog = env!("CKPT_BENCH_FORK");
    let only_trees = args.iter().position(|a| a == "--only").and_then(|i| args.get(i + 1)).is_some_and(|v| v == "trees");

    println!("## Process trees (bench-trees)\n");
    if !only_trees {
        creation(&ckpt, prog, &forks, reps);
    }
    trees(&ckpt, prog, reps);
    if !only_trees {
        helper_vs_local(&ckpt, env!("CKPT_BENCH_HEAP"), reps);
    }
}

/// What joining the coordinator adds to `fork` and `fork`+`exec`.
fn creation(ckpt: &Path, prog: &str, forks: &str, reps: usize) {
    println!("### Creating processes under ckpt (median of {reps} runs of {forks})\n");
    println!("| operation | without ckpt | under ckpt | ratio |\n|---|---|---|---|");
    let env = Env::new(ckpt, "trees", "fork");
    for mode in ["fork", "exec"] {
        let raw = median((0..reps).map(|_| ns_per_op(None, prog, &[mode, forks])).collect());
        let under = median((0..reps).map(|_| ns_per_op(Some(&env), prog, &[mode, forks])).collect());
        let what = if mode == "fork" { "fork + exit + waitpid" } else { "fork + exec /bin/true + waitpid" };
        println!("| {what} | {:.0} µs | {:.0} µs | {:.1}× |", raw / 1e3, under / 1e3, under / raw);
    }
    drop(env);
}

/// K idle processes of 16 MiB each, and one process of 256 MiB.
fn trees(ckpt: &Path, prog: &str, reps: usize) {
    println!("\n### Checkpointing K processes of 16 MiB each (medians of {reps} checkpoints after the first)\n");
    println!("| processes | memory | downtime | time to commit | commit per process |\n|---|---|---|---|---|");
    let mut one_256 = None;
    for (k, mib) in [(1usize, 16usize), (1, 256), (4, 16), (16, 16)] {
        let env = Env::new(ckpt, "trees", &format!("tree{k}-{mib}"));
        let mut child = env
            .cmd()
            .args(["launch", "--", prog, "tree", &k.to_string(), &mib.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        assert!(lines.any(|l| l.map(|l| l.starts_with("READY")).unwrap_or(false)), "no READY");
        // Every process registered.
        for _ in 0..200 {
            let st: Value = serde_json::from_str(&env.run(&["status", "--json"])).unwrap();
            if st["processes"].as_array().map(|a| a.len()).unwrap_or(0) >= k {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        env.run(&["checkpoint"]);
        let (mut down, mut wall) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            let t = Instant::now();
            env.run(&["checkpoint"]);
            wall.push(t.elapsed().as_secs_f64() * 1000.0);
            let log: Value = serde_json::from_str(&env.run(&["log", "--json"])).unwrap();
            let g = log.as_array().unwrap().last().unwrap().clone();
            assert_eq!(g["nprocs"].as_u64(), Some(k as u64), "generation without all {k} processes");
            down.push(g["info"]["downtime_ms"].as_f64().unwrap_or(0.0));
        }
        drop(child.stdin.take());
        let _ = child.wait();
        let (d, w) = (median(down), median(wall));
        println!("| {k} | {} MiB | {d:.1} ms | {w:.0} ms | {:.0} ms |", k * mib, w / k as f64);
        // The baseline of 16 processes of 16 MiB: one process of 256 MiB.
        match (k, mib) {
            (1, 256) => one_256 = Some(d),
            (16, 16) => figure("downtime, 16 processes of 16 MiB", d, "ms", one_256, one_256.map(|b| 2.0 * b)),
            _ => {}
        }
    }
}

/// One checkpoint's figures: (time to commit, downtime), in ms.
fn timed_checkpoint(env: &Env) -> (f64, f64) {
    let t = Instant::now();
    env.run(&["checkpoint"]);
    let wall = t.elapsed().as_secs_f64() * 1000.0;
    let log: Value = serde_json::from_str(&env.run(&["log", "--json"])).unwrap();
    let g = log.as_array().unwrap().last().unwrap().clone();
    (wall, g["info"]["downtime_ms"].as_f64().unwrap_or(0.0))
}

/// A 256 MiB heap of image-like data (`bench_heap`) checkpointed by the
/// coordinator itself, then the same program in a PID namespace of its own,
/// read by a capture helper there (every new chunk compressed by the helper,
/// sent over the coordinator's socket, decompressed and hash-checked): the
/// first (full) checkpoint, and incremental ones after 1% of the pages
/// changed at random.
fn helper_vs_local(ckpt: &Path, prog: &str, reps: usize) {
    println!("\n### Capture by a helper (`ckpt host` in another PID namespace) vs by the coordinator (256 MiB, medians of {reps})\n");
    println!("| checkpoint | coordinator | helper | ratio |\n|---|---|---|---|");
    let mut rows: Vec<[(f64, f64); 2]> = vec![[(0.0, 0.0); 2]; 2];
    for (col, via_helper) in [(0, false), (1, true)] {
        let env = Env::new(ckpt, "trees", if via_helper { "helper" } else { "local" });
        // The helper's machine: PID 1 of a new PID namespace (with its own
        // /proc), killed with everything in it at the end.
        let mut init: Option<(std::process::Child, u32)> = None;
        let in_ns = |c: &mut Command, init: Option<u32>| {
            if let Some(pid) = init {
                let mut n = Command::new("nsenter");
                n.args(["-t", &pid.to_string(), "-p", "-m", "--"]).arg(&env.ckpt);
                for (k, v) in c.get_envs() {
                    if let Some(v) = v {
                        n.env(k, v);
                    }
                }
                n.args(c.get_args());
                *c = n;
            }
        };
        if via_helper {
            let u = Command::new("unshare").args(["--pid", "--fork", "--mount-proc", "sleep", "1000000"]).spawn().expect("unshare (util-linux)");
            let mut pid = None;
            for _ in 0..200 {
                pid = std::fs::read_to_string(format!("/proc/{}/task/{}/children", u.id(), u.id()))
                    .ok()
                    .and_then(|c| c.split_whitespace().next().and_then(|p| p.parse().ok()));
                if pid.is_some() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            init = Some((u, pid.expect("the namespace's init")));
        }
        let mut launch = env.cmd();
        launch.args(["launch", "--", prog, "-m", "256"]);
        in_ns(&mut launch, init.as_ref().map(|i| i.1));
        let mut child = launch.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        assert!(lines.any(|l| l.map(|l| l.starts_with("READY")).unwrap_or(false)), "no READY");
        let mut helper = None;
        if let Some((_, pid)) = &init {
            let pid = *pid;
            let mut h = env.cmd();
            h.args(["host"]);
            let coord = format!("unix:{}", env.dir.join("c.sock").display());
            h.args(["--coord", &coord]);
            in_ns(&mut h, Some(pid));
            helper = Some(h.stdin(Stdio::null()).stderr(Stdio::null()).spawn().unwrap());
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
        rows[0][col] = timed_checkpoint(&env);
        let mut stdin = child.stdin.take().unwrap();
        let idle: Vec<(f64, f64)> = (0..reps)
            .map(|_| {

                writeln!(stdin, "mutate 1 random").unwrap();
                assert!(lines.any(|l| l.map(|l| l.starts_with("MUTATED")).unwrap_or(false)), "no MUTATED");
                timed_checkpoint(&env)
            })
            .collect();
        writeln!(stdin, "quit").ok();
        drop(stdin);
        rows[1][col] = (median(idle.iter().map(|x| x.0).collect()), median(idle.iter().map(|x| x.1).collect()));
        let _ = child.wait();
        if let Some((mut unshare, pid)) = init {
            // The namespace's init: everything in it dies with it.
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            let _ = unshare.kill();
            let _ = unshare.wait();
        }
        if let Some(mut h) = helper {
            let _ = h.kill();
            let _ = h.wait();
        }
    }
    for (i, what) in ["first (full)", "after 1% of pages changed"].iter().enumerate() {
        let [(lw, ld), (hw, hd)] = rows[i];
        println!("| {what}: time to commit | {lw:.0} ms | {hw:.0} ms | {:.2}× |", hw / lw);
        println!("| {what}: downtime | {ld:.1} ms | {hd:.1} ms | {:.2}× |", hd / ld);
    }
}
