//! SysV semaphores and message queues across checkpoint, kill and restart:
//! tests/programs/sysvipc.c shares a semaphore set (a tick count, a lock,
//! a count both processes bump under the lock) and a message queue (about
//! 30 messages of three types always in flight, a fourth type taken by the
//! child) between a parent and its child, and checks every tick the values
//! against its own counts, each message's type, size, content and order,
//! and IPC_STAT's key, mode and message count.
//!
//! The objects are removed (`ipcrm`) after the kill, so a restart cannot
//! pass on leftovers; a second restart finds the killed program's
//! leftovers and replaces them; a queue of another program on the key is
//! refused, naming the `ipcrm` that removes it.
mod common;
use common::*;

use std::process::Command;

/// A row of /proc/sysvipc/{sem,msg} by id: (key, id, perms, field 3, field 4).
fn row(table: &str, id: i32) -> Option<(i32, i32, u32, u64, u64)> {
    let t = std::fs::read_to_string(format!("/proc/sysvipc/{table}")).unwrap();
    t.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let got: i32 = f[1].parse().ok()?;
        (got == id).then(|| (f[0].parse().unwrap(), got, u32::from_str_radix(f[2], 8).unwrap(), f[3].parse().unwrap(), f[4].parse().unwrap()))
    })
}

/// Every id of `table` with `key`.
fn ids_with_key(table: &str, key: i32) -> Vec<i32> {
    let t = std::fs::read_to_string(format!("/proc/sysvipc/{table}")).unwrap();
    t.lines().skip(1).filter_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f[0].parse::<i32>().ok()? == key).then(|| f[1].parse().unwrap())
    }).collect()
}

/// Removes the test's objects however the test ends.
struct RemoveKeys(i32);

impl Drop for RemoveKeys {
    fn drop(&mut self) {
        for (flag, k) in [("-S", self.0), ("-Q", self.0 + 1)] {
            let quiet = || std::process::Stdio::null();
            let _ = Command::new("ipcrm").args([flag, &k.to_string()]).stdout(quiet()).stderr(quiet()).status();
        }
    }
}

fn ipcrm(flag: &str, id: i32) {
    let st = Command::new("ipcrm").args([flag, &id.to_string()]).status().expect("ipcrm is not installed");
    assert!(st.success(), "ipcrm {flag} {id} failed");
}

fn field(line: &str, name: &str) -> i32 {
    let w: Vec<&str> = line.split_whitespace().collect();
    let i = w.iter().position(|x| *x == name).unwrap_or_else(|| panic!("no {name} in {line:?}"));
    w[i + 1].parse().unwrap()
}

#[test]
fn sysv_semaphores_and_queues_come_back_with_their_values_and_messages() {
    let s = Session::new("sysvipc");
    let stop = s.stop_file();
    let key = 0x5d00_0000 | ((std::process::id() as i32 & 0xffff) << 4);
    let _cleanup = RemoveKeys(key);
    let mut p = s.launch(&program("sysvipc"), &["-t", "50", "-k", &format!("{key:x}"), "-s", stop.to_str().unwrap()]);
    let ready = p.wait_prefix("READY", LINE_TIMEOUT);
    let (semid, msqid) = (field(&ready, "sem"), field(&ready, "msq"));
    // Past the parent's lag: the queue holds 30 messages of three types.
    p.wait_ticks(12, LINE_TIMEOUT);
    let pids = s.wait_computation(2);
    assert_eq!(pids.len(), 2, "expected the parent and the child, have {pids:?}");
    for &pid in &pids {
        s.track(pid);
    }
    let sem_before = row("sem", semid).expect("the semaphore set is not in /proc/sysvipc/sem");
    let msg_before = row("msg", msqid).expect("the queue is not in /proc/sysvipc/msg");
    assert_eq!((sem_before.0, sem_before.2, sem_before.3), (key, 0o640, 3));
    assert_eq!((msg_before.0, msg_before.2), (key + 1, 0o620));

    let g1 = s.checkpoint_bounded(&mut p);
    p.wait_ticks(3, LINE_TIMEOUT);
    let g2 = s.checkpoint_bounded(&mut p);
    s.kill_all(&pids, &mut p);
    // Neither is attached to a process: both outlive it. Removed, so that
    // only the image can bring them back.
    let left = row("msg", msqid).expect("the queue did not outlive the program");
    assert!(left.4 >= 30, "the queue held {} messages at the kill, expected 30 or more", left.4);
    ipcrm("-s", semid);
    ipcrm("-q", msqid);

    let mut r = s.restart_expect(&g2, p.pid, true);
    r.wait_ticks(LAG_TICKS, LINE_TIMEOUT);
    let sem_after = row("sem", semid).expect("the semaphore set was not made again");
    let msg_after = row("msg", msqid).expect("the queue was not made again");
    assert_eq!((sem_after.0, sem_after.1, sem_after.2, sem_after.3), (key, semid, 0o640, 3), "the set differs after the restart");
    assert_eq!((msg_after.0, msg_after.1, msg_after.2), (key + 1, msqid, 0o620), "the queue differs after the restart");
    let g3 = s.checkpoint_bounded(&mut r);
    r.wait_ticks(2, LINE_TIMEOUT);

    // Killed again, its objects left where they are: the restart replaces
    // them with the image's.
    s.kill_all(&pids, &mut r);
    assert!(row("sem", semid).is_some() && row("msg", msqid).is_some(), "the objects did not outlive the program");
    let mut r2 = s.restart_expect(&g3, p.pid, true);
    r2.wait_ticks(LAG_TICKS, LINE_TIMEOUT);
    s.stop_at(r2.last_tick.unwrap() + 3);
    s.finish_computation(&pids, &mut r2);
    assert!(row("sem", semid).is_none() && row("msg", msqid).is_none(), "the program's IPC_RMID did not remove its objects");

    // Another program's queue on the key is in the way: refused, naming
    // the fix, and nothing is left behind.
    // SAFETY: msgget takes no pointers.
    let other = unsafe { libc::msgget(key + 1, libc::IPC_CREAT | 0o600) };
    assert!(other >= 0 && other != msqid, "cannot make a queue in the way ({other})");
    let out = s.run("restart", &[&g1.id.to_string()]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "the restart went on with queue {other} in the way\n{err}");
    assert!(err.contains(&format!("ipcrm -q {other}")), "the error does not name the fix `ipcrm -q {other}`: {err}");
    for &pid in &pids {
        assert!(!pid_exists(pid), "the failed restart left process {pid}");
    }
    assert_eq!(ids_with_key("sem", key), Vec::<i32>::new(), "the failed restart left the semaphore set");
    ipcrm("-q", other);

    // The oldest generation, nothing in the way (as on a new host).
    let mut o = s.restart_expect(&g1, p.pid, false);
    o.wait_ticks(LAG_TICKS, LINE_TIMEOUT);
    s.kill_all(&pids, &mut o);
}

/// Ticks after a restart that take every message the image brought back.
const LAG_TICKS: u64 = 12;

/// SEM_UNDO adjustments (which Linux shows nowhere) come back: a child
/// holds a lock taken with SEM_UNDO and an "exiter" holds a count it took
/// from with SEM_UNDO, across two checkpoints and two kill-restarts; the
/// program checks GETVAL every tick and, at its stop after the second
/// restart, that the kernel's undo at each process's exit puts the values
/// back (FAIL otherwise).
#[test]
fn sem_undo_adjustments_come_back() {
    let s = Session::new("sysvipc_undo");
    let stop = s.stop_file();
    let key = 0x5e00_0000 | ((std::process::id() as i32 & 0xffff) << 4);
    let _cleanup = RemoveKeys(key);
    let _cleanup2 = RemoveKeys(key + 2);
    let mut p = s.launch(&program("sysvipc"), &["-t", "50", "-u", "-k", &format!("{key:x}"), "-s", stop.to_str().unwrap()]);
    p.wait_prefix("READY", LINE_TIMEOUT);
    p.wait_ticks(3, LINE_TIMEOUT);
    let pids = s.wait_computation(3);
    assert_eq!(pids.len(), 3, "expected the parent, the child and the exiter, have {pids:?}");
    for &pid in &pids {
        s.track(pid);
    }
    let g1 = s.checkpoint_bounded(&mut p);
    p.wait_ticks(2, LINE_TIMEOUT);
    s.kill_all(&pids, &mut p);
    // The kill ran each process's undo: the values the image holds are
    // not those left behind; the restart replaces the set.
    let mut r = s.restart_expect(&g1, p.pid, true);
    r.wait_ticks(4, LINE_TIMEOUT);
    let g2 = s.checkpoint_bounded(&mut r);
    r.wait_ticks(2, LINE_TIMEOUT);
    s.kill_all(&pids, &mut r);
    let mut r2 = s.restart_expect(&g2, p.pid, true);
    r2.wait_ticks(4, LINE_TIMEOUT);
    s.stop_at(r2.last_tick.unwrap() + 2);
    s.finish_computation(&pids, &mut r2);
    assert!(ids_with_key("sem", key + 2).is_empty(), "the program did not remove its undo set");
}
