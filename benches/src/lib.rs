//! Benchmarks of ckpt (binaries in `src/bin/`): incremental checkpoints per
//! dirty-tracking backend, downtime, restart time, and the raw speed of
//! memcpy, BLAKE3 and zstd measured in the same run as their ceiling
//! ([`ceilings`]), and the headline figures of a run ([`figure`]) that
//! `bench-compare` sets against the previous run.
//! Results are collected in BENCHMARKS.md. Performance is measured here,
//! never in timed tests.

pub mod ceilings;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The lines of `out` (a child's stdout or stderr), read in a thread of
/// their own and handed over a channel until the stream ends.
pub fn lines_of(out: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

/// The page size of the machines ckpt runs on.
pub const PAGE: usize = 4096;

/// xorshift64: the benchmark programs' and the ceilings' page contents.
pub struct Rng(pub u64);

impl Rng {
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The page contents of benches/programs/bench_heap.c: image-like words
/// (zeros, small numbers, pointers), or with `hash` hash-like ones (its
/// `-k hash`, little that zstd can shrink).
pub fn fill_page(rng: &mut Rng, p: &mut [u8], salt: u64, hash: bool) {
    for w in p.chunks_exact_mut(8) {
        let r = rng.next() ^ salt;
        let v = if hash {
            r
        } else {
            match r & 7 {
                0..=2 => 0,
                3 | 4 => r >> 56,
                5 | 6 => 0x0000_7f00_0000_0000 | ((r >> 20) & 0xffffff8),
                _ => r,
            }
        };
        w.copy_from_slice(&v.to_le_bytes());
    }
}

/// One headline figure of a run (issue 13's targets), appended as a JSON
/// line to the file `$CKPT_BENCH_FIGURES` names (scripts/bench.sh sets it;
/// `bench-compare` sets each against the previous run's). `ceiling`: the
/// figure's bound measured in the same run, in the same unit; `target`:
/// the figure to reach. Lower is better for every figure.
pub fn figure(name: &str, value: f64, unit: &str, ceiling: Option<f64>, target: Option<f64>) {
    let Some(path) = std::env::var_os("CKPT_BENCH_FIGURES") else { return };
    let line = serde_json::json!({ "name": name, "value": value, "unit": unit, "ceiling": ceiling, "target": target });
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path).unwrap_or_else(|e| panic!("{}: {e}", Path::new(&path).display()));
    std::io::Write::write_all(&mut f, format!("{line}\n").as_bytes()).unwrap();
}

/// The median of `v` (the upper one of an even count); NaN sorts last.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// GB/s of `bytes` in `d`.
pub fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

/// A store and a coordinator socket of one benchmark run, in a temporary
/// directory of their own; the coordinator is told to quit and the
/// directory removed when it is dropped.
pub struct Env {
    pub ckpt: PathBuf,
    pub dir: PathBuf,
}

impl Env {
    /// `bench` names the benchmark, `tag` the run within it.
    pub fn new(ckpt: &Path, bench: &str, tag: &str) -> Env {
        let dir = std::env::temp_dir().join(format!("ckpt-bench-{bench}-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Env { ckpt: ckpt.to_path_buf(), dir }
    }

    /// A `ckpt` command on this run's store and coordinator.
    pub fn cmd(&self) -> Command {
        self.cmd_with(&self.ckpt)
    }

    /// The same with another build's `ckpt` (an A/B on one store).
    pub fn cmd_with(&self, ckpt: &Path) -> Command {
        let mut c = Command::new(ckpt);
        c.env("CKPT_STORE", self.dir.join("store")).env("CKPT_COORD", format!("unix:{}", self.dir.join("c.sock").display()));
        c
    }

    /// Runs `ckpt ARGS`, which must succeed, and returns its stdout.
    pub fn run(&self, args: &[&str]) -> String {
        let out = self.cmd().args(args).stdin(Stdio::null()).output().expect("run ckpt");
        assert!(out.status.success(), "ckpt {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = self.cmd().arg("quit").stdin(Stdio::null()).stderr(Stdio::null()).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
