//! counter_heap: a 256 MiB heap, anonymous and private file mappings,
//! brk heap churn and vDSO clocks survive checkpoint/restart cycles.
mod common;
use common::*;

#[test]
fn counter_heap_checkpoint_restart_cycle() {
    let c = Cycle::new(program("counter_heap"), &["-t", "100", "-m", "256"]);
    standard_cycle("counter_heap", &c);
}

/// Issue 2, "Done when": the second checkpoint of an idle 256 MiB program
/// stores (almost) no new bytes. Then the idle program restarts fine.
#[test]
fn idle_256mib_second_checkpoint_stores_almost_nothing() {
    let s = Session::new("counter_heap_idle");
    let stop = s.stop_file();
    let mut p = s.launch(&program("counter_heap"), &["-t", "100", "-m", "256", "-i", "-s", stop.to_str().unwrap()]);
    let pid = p.pid;
    p.wait_prefix("READY", LINE_TIMEOUT);
    p.wait_ticks(2, LINE_TIMEOUT);
    let g1 = s.checkpoint_bounded(&mut p);
    p.wait_ticks(3, LINE_TIMEOUT);
    let g2 = s.checkpoint_bounded(&mut p);
    let gens = s.generations();
    let j1 = gens.get(&g1.id).unwrap_or_else(|| panic!("no generation {} in log: {gens:?}", g1.id));
    let j2 = gens.get(&g2.id).unwrap_or_else(|| panic!("no generation {} in log: {gens:?}", g2.id));
    let (l1, n1) = (j1.u64_field("logical_bytes"), j1.u64_field("new_bytes"));
    let (l2, n2) = (j2.u64_field("logical_bytes"), j2.u64_field("new_bytes"));
    eprintln!("gen {}: logical {l1} new {n1}; gen {}: logical {l2} new {n2}", g1.id, g2.id);
    assert!(l1 >= 256 << 20, "first generation's logical_bytes {l1} < 256 MiB");
    assert!(l2 >= 256 << 20, "second generation's logical_bytes {l2} < 256 MiB");
    assert!(n1 >= 200 << 20, "first generation stored only {n1} new bytes of a 256 MiB random heap");
    assert!(n2 * 100 < n1, "idle program's second checkpoint stored {n2} new bytes, not < 1% of {n1}");
    assert_eq!(j2.u64_field("parent"), g1.id, "second generation's parent");
    p.kill9();
    let mut r = s.restart_expect(&g2, pid, true);
    r.wait_ticks(3, LINE_TIMEOUT);
    r.finish(&s, 3);
}
