//! Builds the benchmark workloads (C) into OUT_DIR.
use std::process::Command;

fn main() {
    let out = std::env::var("OUT_DIR").unwrap();
    for (name, var) in [("bench_heap", "CKPT_BENCH_HEAP"), ("bench_fork", "CKPT_BENCH_FORK"), ("bench_threads", "CKPT_BENCH_THREADS")] {
        let src = format!("programs/{name}.c");
        println!("cargo:rerun-if-changed={src}");
        let bin = format!("{out}/{name}");
        let ok = Command::new("gcc").args(["-O2", "-pthread", "-o", &bin, &src]).status().map(|s| s.success()).unwrap_or(false);
        assert!(ok, "gcc failed to build {src}");
        println!("cargo:rustc-env={var}={bin}");
    }
}
