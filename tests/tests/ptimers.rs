//! Issue 11, "POSIX timers": timers of every notification kind keep their
//! ids, clocks, intervals and time left across checkpoint/kill/restart
//! cycles; the program checks them itself every tick.
mod common;
use common::*;

#[test]
fn posix_timers_come_back() {
    let c = Cycle::new(program("ptimers"), &["-t", "100"]);
    standard_cycle("ptimers", &c);
}
