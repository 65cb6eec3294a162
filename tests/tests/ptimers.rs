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

/// `-T` adds a SIGEV_THREAD timer: glibc's helper thread blocks every
/// signal with raw rt_sigprocmask, so only the ptrace stopper stops it.
#[test]
fn posix_timers_with_sigev_thread_come_back() {
    let c = Cycle::new(program("ptimers"), &["-t", "100", "-T"]);
    standard_cycle("ptimers-T", &c);
}
