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

/// The same with four worker threads changing records of their own (each
/// checked every tick by the main thread: checksum, progress, thread id).
#[test]
fn python_threads_checkpoint_restart_cycle() {
    let script = source("python_heap.py");
    let c = Cycle::new(python3(), &[script.to_str().unwrap(), "-t", "200", "-m", "120", "-w", "4"]);
    standard_cycle("python_threads", &c);
}
