//! SysV shared memory (shmget/shmat) across checkpoint, kill and restart:
//! tests/programs/sysv.c keeps a keyed segment and a removed private one
//! attached in a parent and its child, and checks every tick that
//! `shmctl(IPC_STAT)` gives their key, size, mode and attach count, that
//! they are mapped where they were (one attach read-only, one partly
//! mprotected), that a new `shmat` of the id shows the same memory and
//! `shmdt` works, and that each process sees the other's writes.
//! The segment the killed program leaves behind is recognized as its own
//! and replaced by a restart right after the kill (twice); a segment on
//! the key that is not the computation's is in the way of the restart,
//! which must say so and name the `ipcrm` that removes it.
mod common;
use common::*;

use std::process::Command;

/// A line of /proc/sysvipc/shm: (key, shmid, perms, size, nattch).
fn sysv_segment(shmid: i32) -> Option<(i32, i32, u32, u64, u32)> {
    let t = std::fs::read_to_string("/proc/sysvipc/shm").unwrap();
    t.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let id: i32 = f[1].parse().ok()?;
        (id == shmid).then(|| (f[0].parse().unwrap(), id, u32::from_str_radix(f[2], 8).unwrap(), f[3].parse().unwrap(), f[6].parse().unwrap()))
    })
}

/// The ids of every SysV segment of this IPC namespace.
fn sysv_ids() -> Vec<i32> {
    let t = std::fs::read_to_string("/proc/sysvipc/shm").unwrap();
    t.lines().skip(1).filter_map(|l| l.split_whitespace().nth(1)?.parse().ok()).collect()
}

/// The keyed segment's attach count seen from outside the running
/// program: 6, 7 while the parent holds its short-lived third attach, 8
/// while that attach is inside `shmat` (the kernel counts it twice for a
/// moment, see check_all in sysv.c).
const ATTACHED: std::ops::RangeInclusive<u32> = 6..=8;

/// Removes the test's keyed segment however the test ends.
struct RemoveKey(i32);

impl Drop for RemoveKey {
    fn drop(&mut self) {
        let quiet = || std::process::Stdio::null();
        let _ = Command::new("ipcrm").args(["-M", &self.0.to_string()]).stdout(quiet()).stderr(quiet()).status();
    }
}

fn ipcrm(id: i32) {
    let st = Command::new("ipcrm").args(["-m", &id.to_string()]).status().expect("ipcrm is not installed");
    assert!(st.success(), "ipcrm -m {id} failed");
}

#[test]
fn sysv_segments_come_back_with_their_ids_and_attaches() {
    let s = Session::new("sysv");
    let stop = s.stop_file();
    let key = 0x5c00_0000 | (std::process::id() as i32 & 0xff_ffff);
    let _cleanup = RemoveKey(key);
    let hex = format!("{key:x}");
    // The keyed segment gets id 0, as the first segment of an IPC
    // namespace does (a fresh machine, an ordinary user's namespaces): its
    // mappings then show inode 0, like anonymous memory, which they are
    // not. The kernel takes the id asked for in shm_next_id if its index
    // is free: an id is its index plus a sequence number times 32768, so a
    // segment left over at index 0 (id 32768·k) takes it too.
    let id0_free = sysv_ids().iter().all(|id| id % 32768 != 0);
    if id0_free {
        std::fs::write("/proc/sys/kernel/shm_next_id", "0").expect("cannot write /proc/sys/kernel/shm_next_id (root?)");
    }
    let mut p = s.launch(&program("sysv"), &["-t", "50", "-k", &hex, "-s", stop.to_str().unwrap()]);
    let ready = p.wait_prefix("READY", LINE_TIMEOUT);
    let field = |name: &str| -> i32 {
        let w: Vec<&str> = ready.split_whitespace().collect();
        let i = w.iter().position(|x| *x == name).unwrap_or_else(|| panic!("no {name} in {ready:?}"));
        w[i + 1].parse().unwrap()
    };
    let (keyed, removed) = (field("keyed"), field("removed"));
    assert!(!id0_free || keyed == 0, "the keyed segment got id {keyed}, not the 0 asked for in shm_next_id");
    p.wait_ticks(3, LINE_TIMEOUT);
    let pids = s.wait_computation(2);
    assert_eq!(pids.len(), 2, "expected the parent and the child, have {pids:?}");
    for &pid in &pids {
        s.track(pid);
    }
    let before = sysv_segment(keyed).expect("the keyed segment is not in /proc/sysvipc/shm");
    assert_eq!((before.0, before.2 & 0o777, before.3), (key, 0o640, 3 * 4096 + 100));
    assert!(ATTACHED.contains(&before.4), "the keyed segment has {} attaches, expected 6", before.4);

    let g1 = s.checkpoint_bounded(&mut p);
    p.wait_ticks(3, LINE_TIMEOUT);
    let g2 = s.checkpoint_bounded(&mut p);
    s.kill_all(&pids, &mut p);
    // The removed segment went with its last attach; the keyed one stays.
    assert!(sysv_segment(removed).is_none(), "the removed segment {removed} outlived the program");
    assert_eq!(sysv_segment(keyed).map(|s| s.4), Some(0), "the keyed segment should stay, unattached");

    // The leftover segment is the killed computation's own (the recorded
    // id, key and size, no attach, last detached by one of its processes):
    // the restart replaces it, right after the kill, twice.
    for _ in 0..2 {
        let mut r = s.restart_expect(&g2, p.pid, true);
        r.wait_ticks(3, LINE_TIMEOUT);
        s.kill_all(&pids, &mut r);
        assert_eq!(sysv_segment(keyed).map(|s| s.4), Some(0), "the restored program's keyed segment should stay, unattached");
    }
    let mut r = s.restart_expect(&g2, p.pid, true);
    r.wait_ticks(5, LINE_TIMEOUT);
    let after = sysv_segment(keyed).expect("the keyed segment was not made again");
    assert_eq!((after.0, after.1, after.2, after.3), (before.0, before.1, before.2, before.3), "the keyed segment differs after the restart");
    assert!(ATTACHED.contains(&after.4), "the keyed segment has {} attaches after the restart, expected 6", after.4);
    let rm = sysv_segment(removed).expect("the removed segment was not made again (while attached)");
    assert_eq!((rm.0, rm.2 & 0o1777, rm.3, rm.4), (0, 0o1600, 8192, 2), "the removed segment differs after the restart");
    let g3 = s.checkpoint_bounded(&mut r);
    assert!(g3.id > g2.id);
    // The program detaches and removes everything at its end.
    s.stop_at(r.last_tick.unwrap() + 3);
    s.finish_computation(&pids, &mut r);
    assert!(sysv_segment(keyed).is_none(), "the program's IPC_RMID did not remove segment {keyed}");

    // The oldest generation, with the segment gone (as on a new host).
    let mut o = s.restart_expect(&g1, p.pid, false);
    o.wait_ticks(5, LINE_TIMEOUT);
    s.kill_all(&pids, &mut o);
    assert!(sysv_segment(removed).is_none(), "the removed segment {removed} outlived the restored program");
    ipcrm(keyed);

    // A segment with the key that is not the computation's (made by this
    // test): in the way, refused, naming the fix; the restart leaves
    // nothing behind and the segment is untouched.
    // SAFETY: shmget takes no pointers.
    let foreign = unsafe { libc::shmget(key, 4096, libc::IPC_CREAT | libc::IPC_EXCL | 0o600) };
    assert!(foreign >= 0, "shmget: {}", std::io::Error::last_os_error());
    let out = s.run("restart", &[]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "the restart went on with a foreign segment {foreign} on its key\n{err}");
    assert!(err.contains(&format!("ipcrm -m {foreign}")), "the error does not name the fix `ipcrm -m {foreign}`: {err}");
    for &pid in &pids {
        assert!(!pid_exists(pid), "the failed restart left process {pid}");
    }
    assert!(sysv_segment(foreign).is_some(), "the restart removed segment {foreign}, which was not the computation's");
    ipcrm(foreign);
}
