//! The same programs compiled without PIE (`-fno-pie -no-pie`, fixed
//! load address) survive the cycle too. (The PIE builds are tested in the
//! program's own test file.)
mod common;
use common::*;

#[test]
fn counter_heap_nopie_cycle() {
    standard_cycle("counter_heap_nopie", &Cycle::new(program("counter_heap-nopie"), &["-t", "100", "-m", "64"]));
}

#[test]
fn threads_nopie_cycle() {
    standard_cycle("threads_nopie", &Cycle::new(program("threads-nopie"), &["-t", "100"]));
}

#[test]
fn resources_nopie_cycle() {
    standard_cycle("resources_nopie", &Cycle::new(program("resources-nopie"), &["-t", "100"]));
}

#[test]
fn rseq_vdso_nopie_cycle() {
    standard_cycle("rseq_vdso_nopie", &Cycle::new(program("rseq_vdso-nopie"), &["-t", "100"]));
}
