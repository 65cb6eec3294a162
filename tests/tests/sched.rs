//! Issue 11, "Scheduling": each thread's policy, real-time priority, nice,
//! CPU affinity and I/O priority come back; every thread of the program
//! checks its own every 50 ms.
mod common;
use common::*;

#[test]
fn scheduling_of_every_thread_comes_back() {
    let c = Cycle::new(program("sched"), &["-t", "100"]);
    standard_cycle("sched", &c);
}
