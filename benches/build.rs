//! Builds the benchmark workload (C) into OUT_DIR.
use std::process::Command;

fn main() {
    let out = std::env::var("OUT_DIR").unwrap();
    let src = "programs/bench_heap.c";
    println!("cargo:rerun-if-changed={src}");
    let bin = format!("{out}/bench_heap");
    let ok = Command::new("gcc").args(["-O2", "-pthread", "-o", &bin, src]).status().map(|s| s.success()).unwrap_or(false);
    assert!(ok, "gcc failed to build {src}");
    println!("cargo:rustc-env=CKPT_BENCH_HEAP={bin}");
}
