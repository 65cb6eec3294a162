//! Issue 11, "Files under /proc/PID/": /proc/self/stat, status (at an
//! offset), maps, mem (read-write), an open /proc/self/fd directory and a
//! child's /proc status, held open, come back naming the restored
//! processes (tests/programs/procfiles.c checks them every tick).
mod common;
use common::*;

#[test]
fn proc_files_come_back_naming_the_restored_process() {
    let c = Cycle::new(program("procfiles"), &["-t", "100"]);
    standard_cycle("procfiles", &c);
}
