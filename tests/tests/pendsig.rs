//! Issue 11, "Pending signals": signals pending for the process and for one
//! thread, with their siginfo and every queued real-time instance in
//! order, come back; the program takes, checks and queues them again
//! every tick.
mod common;
use common::*;

#[test]
fn pending_signals_come_back_with_their_siginfo() {
    let c = Cycle::new(program("pendsig"), &["-t", "100"]);
    standard_cycle("pendsig", &c);
}
