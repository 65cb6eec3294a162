//! Benchmarks of ckpt (binaries in `src/bin/`): incremental checkpoints per
//! dirty-tracking backend, downtime, restart time, and the raw speed of
//! memcpy, BLAKE3 and zstd measured in the same run as their ceiling.
//! Results are collected in BENCHMARKS.md. Performance is measured here,
//! never in timed tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

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
        let mut c = Command::new(&self.ckpt);
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
