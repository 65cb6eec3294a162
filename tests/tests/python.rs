//! An unmodified python3 holding >= 100 MB of objects survives
//! checkpoint/restart cycles (its own checksum verification keeps passing).
mod common;
use common::*;

#[test]
fn python_heap_checkpoint_restart_cycle() {
    let script = source("python_heap.py");
    let c = Cycle::new(python3(), &[script.to_str().unwrap(), "-t", "200", "-m", "120"]);
    standard_cycle("python_heap", &c);
}
