//! Sessions and process groups that are not simply the parent's
//! (tests/programs/sessions.c): a child that kept an ancestor's session
//! when its parent made a new one, a zombie in a group of its own, two
//! orphans sharing the session of a daemon leader that exited (one in the
//! leader's group, one in its own). Checkpointed, killed, restarted (each
//! member checks its own and its children's ppid, pgid and sid every 20
//! ms, printing FAIL on a difference), checkpointed again and restarted
//! again, then run to DONE; the test compares every process's ids too.
mod common;
use common::*;

use std::collections::BTreeMap;

/// (ppid, pgid, sid) of a process, zombies included.
fn tree_ids(pid: i32) -> (i32, i32, i32) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_else(|e| panic!("process {pid}: {e}"));
    let f: Vec<i32> = stat[stat.rfind(')').unwrap() + 2..].split_whitespace().skip(1).take(3).map(|x| x.parse().unwrap()).collect();
    (f[0], f[1], f[2])
}

/// The pids READY names (A, Z, B, C, D, O1, O2).
fn members(p: &Proc) -> BTreeMap<String, i32> {
    let l = p.lines.iter().find(|l| l.starts_with("READY")).expect("no READY");
    l.split_whitespace().skip(1).map(|kv| kv.split_once('=').unwrap()).map(|(k, v)| (k.to_string(), v.parse().unwrap())).collect()
}

#[test]
fn sessions_groups_zombie_and_orphans_of_a_lost_session_come_back_exactly() {
    let s = Session::new("sessions");
    let stop = s.stop_file();
    // R, A, B, C, O1, O2 (the zombie has no agent; D exited).
    let (mut p, pids) = s.launch_computation(&program("sessions"), &["-t", "50", "-s", stop.to_str().unwrap()], 6);
    let m = members(&p);
    let mut all: Vec<i32> = pids.clone();
    all.push(m["Z"]);
    let before: BTreeMap<i32, (i32, i32, i32)> = all.iter().map(|&pid| (pid, tree_ids(pid))).collect();
    let g1 = s.checkpoint_bounded(&mut p);
    p.wait_ticks(2, LINE_TIMEOUT);
    s.kill_all(&pids, &mut p);
    s.assert_restores(g1.id);

    let mut r = s.restart_expect(&g1, p.pid, true);
    r.wait_ticks(5, LINE_TIMEOUT);
    for (&pid, ids) in &before {
        let mut now = tree_ids(pid);
        if pid == p.pid {
            now.0 = ids.0; // the root's parent is the restart command now
        }
        assert_eq!(now, *ids, "process {pid}: (ppid, pgid, sid) differ after the restart ({m:?})\n{}", r.context());
    }
    // The restored tree checkpoints and restores again.
    let g2 = s.checkpoint_bounded(&mut r);
    r.wait_ticks(2, LINE_TIMEOUT);
    s.kill_all(&pids, &mut r);
    s.assert_restores(g2.id);
    let mut r = s.restart_expect(&g2, p.pid, true);
    r.wait_ticks(5, LINE_TIMEOUT);
    s.stop_at(r.last_tick.unwrap() + 3);
    s.finish_computation(&pids, &mut r);
}
