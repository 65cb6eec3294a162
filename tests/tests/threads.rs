//! threads: 13 threads with mutexes, condition variables, TLS and threads
//! blocked in read/nanosleep/futex survive checkpoint/restart cycles.
mod common;
use common::*;

#[test]
fn threads_checkpoint_restart_cycle() {
    let c = Cycle::new(program("threads"), &["-t", "100", "-w", "8"]);
    standard_cycle("threads", &c);
}
