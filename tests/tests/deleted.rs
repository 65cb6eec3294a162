//! Issue 11, "Deleted files": a `tmpfile()`, an `O_TMPFILE` file, a
//! scratch file unlinked after open (mapped shared and private, dup'ed and
//! opened again), a sealed memfd open but not mapped, and an inotify watch
//! on a deleted file come back unlinked with their contents, size, mode,
//! offsets and flags; tests/programs/deleted.c checks them every tick.
mod common;
use common::*;

#[test]
fn deleted_files_and_memfds_come_back_unlinked() {
    let c = Cycle::new(program("deleted"), &["-t", "100"]);
    standard_cycle("deleted", &c);
}
