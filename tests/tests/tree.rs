//! Process trees: a parent with children in their own group, an exec'd
//! child, a daemon adopted by init, a child sharing memory under a
//! process-shared mutex (and a POSIX shared memory object), an unreaped zombie, and pipes full of bytes in
//! flight between them (tests/programs/tree.c checks every record and
//! every shared page itself). Checkpointed, killed, restarted as the same
//! tree (PIDs, parents, groups, sessions), checkpointed again, run to the
//! end, where the parent reaps the zombie's real status.
mod common;
use common::*;

use std::collections::BTreeMap;

/// (ppid, pgid, sid) of a live process.
fn tree_ids(pid: i32) -> (i32, i32, i32) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_else(|e| panic!("process {pid}: {e}"));
    let f: Vec<i32> = stat[stat.rfind(')').unwrap() + 2..].split_whitespace().skip(1).take(3).map(|x| x.parse().unwrap()).collect();
    (f[0], f[1], f[2])
}

#[test]
fn process_tree_with_pipes_shared_memory_zombie_and_daemon() {
    let s = Session::new("tree");
    let stop = s.stop_file();
    // The parent, the producer, the exec'd producer, the daemon and the
    // shared-memory writer (the zombie has no agent any more).
    let (mut p, pids) = s.launch_computation(&program("tree"), &["-t", "100", "-z", "30", "-s", stop.to_str().unwrap()], 5);
    let before: BTreeMap<i32, (i32, i32, i32)> = pids.iter().map(|&pid| (pid, tree_ids(pid))).collect();
    let g1 = s.checkpoint_bounded(&mut p);
    p.wait_ticks(3, LINE_TIMEOUT);
    let g2 = s.checkpoint_bounded(&mut p);
    let gens = s.generations();
    assert_eq!(gens[&g2.id].u64_field("nprocs"), 5, "generation {} does not hold the 5 processes", g2.id);
    // The downtime counts to the moment the last of the 5 programs ran
    // again (its agent's RESUMED says when), which is after the last
    // RESUME was sent and after they were all stopped.
    let info = gens[&g2.id].get("info").unwrap_or_else(|| panic!("generation {} has no info", g2.id));
    let ms = |k: &str| info.get(k).and_then(Json::as_f64).unwrap_or_else(|| panic!("no figure {k:?} in the generation's info: {info:?}"));
    let (down, sent, stopping) = (ms("downtime_ms"), ms("resume_sent_ms"), ms("suspend_ms"));
    assert!(stopping > 0.0 && stopping <= sent && sent <= down, "downtime {down} ms, last RESUME sent at {sent} ms, all stopped at {stopping} ms");

    s.kill_all(&pids, &mut p);
    // As on a new host: the POSIX shared memory object is gone too; the
    // restart makes it again from the image.
    let shm = format!("/dev/shm/ckpt-tree-{}", p.pid);
    std::fs::remove_file(&shm).unwrap_or_else(|e| panic!("{shm}: {e}"));

    let mut r = s.restart_expect(&g2, p.pid, true);
    for (&pid, ids) in &before {
        assert!(pid_alive(pid), "process {pid} was not restored\n{}", r.context());
        let mut now = tree_ids(pid);
        if pid == p.pid {
            now.0 = ids.0; // the root's parent is the restart command now
        }
        assert_eq!(now, *ids, "process {pid}: (ppid, pgid, sid) differ after the restart\n{}", r.context());
    }
    r.wait_ticks(3, LINE_TIMEOUT);
    // The restored tree checkpoints again.
    let g3 = s.checkpoint_bounded(&mut r);
    assert!(g3.id > g2.id);
    r.wait_line(|l| l.starts_with("REAPED"), LINE_TIMEOUT);
    let t = r.last_tick.unwrap();
    s.stop_at(t + 3);
    s.finish_computation(&pids, &mut r);

    // An older generation restarts too, with its own zombie still there;
    // right after the kill again: the POSIX object the killed tree left is
    // its own (the one a restart made for it, marked) and is used again.
    for _ in 0..2 {
        let mut o = s.restart_expect(&g1, p.pid, false);
        o.wait_ticks(3, LINE_TIMEOUT);
        s.kill_all(&pids, &mut o);
        assert!(std::path::Path::new(&shm).exists(), "the killed tree left no {shm}");
    }

    // An object at the name that is not the computation's (another
    // program's, same user): refused, naming the fix; left alone.
    std::fs::remove_file(&shm).unwrap();
    std::fs::write(&shm, vec![7u8; 4096]).unwrap();
    let out = s.run("restart", &[&g1.id.to_string()]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "the restart used a foreign {shm}\n{err}");
    assert!(err.contains(&format!("rm {shm}")), "the error does not name the fix `rm {shm}`: {err}");
    for &pid in &pids {
        assert!(!pid_exists(pid), "the failed restart left process {pid}");
    }
    assert_eq!(std::fs::read(&shm).unwrap(), vec![7u8; 4096], "the restart changed the foreign {shm}");
    std::fs::remove_file(&shm).unwrap();
}

#[test]
fn checkpoint_catches_short_lived_system_and_popen_children() {
    let s = Session::new("tree_spawns");
    let stop = s.stop_file();
    let mut p = s.launch(&program("tree"), &["-t", "20", "-p", "-s", stop.to_str().unwrap()]);
    p.wait_prefix("READY", LINE_TIMEOUT);
    p.wait_ticks(3, LINE_TIMEOUT);
    let mut last = None;
    for _ in 0..6 {
        let g = s.checkpoint_bounded(&mut p);
        last = Some(g);
    }
    let pids = s.computation();
    for &pid in &pids {
        s.track(pid);
    }
    s.kill_all(&pids, &mut p);
    let g = last.unwrap();
    let mut r = s.restart_expect(&g, p.pid, true);
    r.wait_ticks(12, LINE_TIMEOUT);
    s.stop_at(r.last_tick.unwrap() + 2);
    r.wait_prefix("DONE", LINE_TIMEOUT);
    let st = r.wait_exit(CMD_TIMEOUT);
    assert!(st.success(), "the restored tree ended with {st}\n{}", r.context());
}
