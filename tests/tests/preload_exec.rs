//! Issue 11, "an exec'd program with its own LD_PRELOAD": children exec'd
//! with `LD_PRELOAD=libm.so.6:/nonexistent/...` (through execve with their
//! own environment, and through setenv + execvp) stay in the computation
//! with the user's library loaded and the missing one ignored; the three
//! processes are checkpointed, killed, restarted twice and run to the end.
mod common;
use common::*;

#[test]
fn children_with_their_own_ld_preload_stay_in_the_computation() {
    let s = Session::new("preload_exec");
    let stop = s.stop_file();
    let (mut p, pids) = s.launch_computation(&program("preload_exec"), &["-t", "100", "-s", stop.to_str().unwrap()], 3);
    let g1 = s.checkpoint_bounded(&mut p);
    p.wait_ticks(3, LINE_TIMEOUT);
    let g2 = s.checkpoint_bounded(&mut p);
    assert_eq!(s.generations()[&g2.id].u64_field("nprocs"), 3, "generation {} does not hold the 3 processes", g2.id);
    s.kill_all(&pids, &mut p);

    let mut r = s.restart_expect(&g2, p.pid, true);
    for &pid in &pids {
        assert!(pid_alive(pid), "process {pid} was not restored\n{}", r.context());
    }
    r.wait_ticks(3, LINE_TIMEOUT);
    let g3 = s.checkpoint_bounded(&mut r);
    assert_eq!(s.generations()[&g3.id].u64_field("nprocs"), 3);
    s.kill_all(&pids, &mut r);

    let mut r = s.restart_expect(&g3, p.pid, true);
    r.wait_ticks(3, LINE_TIMEOUT);
    let t = r.last_tick.unwrap();
    s.stop_at(t + 3);
    s.finish_computation(&pids, &mut r);
    let _ = g1;
}
