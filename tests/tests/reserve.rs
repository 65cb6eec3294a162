//! Issue 11, "Huge sparse mappings": a 2 TiB `MAP_NORESERVE` reservation
//! with a few pages used checkpoints and restarts at the cost of what is
//! present. The program checks its pages, that untouched pages read zero,
//! that the mapping is still `MAP_NORESERVE`, and that its own page tables
//! stay small (a checkpointer that write-protects or walks the whole
//! reservation builds gigabytes of them in the program).
mod common;
use common::*;

fn reserve(name: &str, opts: &[&str]) {
    let mut c = Cycle::new(program("reserve"), &["-t", "100"]);
    c.launch_opts = opts.iter().map(|s| s.to_string()).collect();
    let s = standard_cycle(name, &c);
    // Every generation holds kilobytes, whatever was reserved.
    for (id, g) in s.generations() {
        let (logical, new) = (g.u64_field("logical_bytes"), g.u64_field("new_bytes"));
        assert!(logical >= 2 << 40, "generation {id}: logical_bytes {logical} < the 2 TiB reserved");
        assert!(new < 64 << 20, "generation {id} stored {new} new bytes of a reservation with a few MiB used");
    }
}

#[test]
fn reservation_of_2tib_with_uffd_wp() {
    reserve("reserve_uffd", &["--dirty-tracking", "uffd-wp"]);
}

#[test]
fn reservation_of_2tib_with_scan() {
    reserve("reserve_scan", &["--dirty-tracking", "scan"]);
}
