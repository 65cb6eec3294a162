//! Issue 11, "memory attributes": regions marked MADV_WIPEONFORK (with
//! contents: a forked snapshot would read zeros), DONTFORK, HUGEPAGE,
//! NOHUGEPAGE, DONTDUMP, MERGEABLE and mlock'ed come back with their
//! contents and their VmFlags, as the program checks in its own smaps.
mod common;
use common::*;

#[test]
fn madvise_and_mlock_attributes_come_back() {
    let c = Cycle::new(program("madv"), &["-t", "100"]);
    standard_cycle("madv", &c);
}
