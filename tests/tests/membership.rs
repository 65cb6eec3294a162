//! Who is in the computation: processes that die in the middle of a
//! checkpoint, and processes that finish between checkpoints.
mod common;
use common::*;

use std::time::{Duration, Instant};

fn wait_file(path: &std::path::Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        assert!(Instant::now() < deadline, "{} did not appear within {timeout:?}", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Three independent programs under one coordinator. One is killed with
/// `-9` while the coordinator holds them all stopped in a checkpoint (a
/// test hook makes that moment exact): the checkpoint fails naming it and
/// commits nothing, the survivors run on, and the next checkpoint holds
/// just them. One finishes normally between checkpoints and simply leaves.
#[test]
fn process_killed_mid_checkpoint_aborts_it_and_survivors_go_on() {
    let s = Session::new("membership");
    let hold = s.path("hold");
    std::fs::create_dir_all(&hold).unwrap();
    let holdv = hold.to_str().unwrap().to_string();
    let env = [("CKPT_TEST_HOLD", holdv.as_str())];
    let mut a = s.launch_env(&program("counter_heap"), &["-m", "8", "-t", "50"], &env);
    let mut b = s.launch_env(&program("counter_heap"), &["-m", "8", "-t", "50"], &env);
    let mut c = s.launch_env(&program("counter_heap"), &["-m", "8", "-t", "50", "-n", "40"], &env);
    a.wait_ticks(2, LINE_TIMEOUT);
    let g1 = s.checkpoint_bounded(&mut a);
    assert_eq!(s.generations()[&g1.id].u64_field("nprocs"), 3);

    // c finishes on its own: it leaves the computation.
    c.wait_prefix("DONE", LINE_TIMEOUT);
    assert!(c.wait_exit(CMD_TIMEOUT).success());

    std::fs::write(hold.join("armed"), b"").unwrap();
    let mut ck = Proc::spawn("checkpoint".into(), s.cmd("checkpoint"));
    wait_file(&hold.join("held"), LINE_TIMEOUT);
    let victim = b.pid;
    b.kill9();
    std::fs::write(hold.join("go"), b"").unwrap();
    let st = ck.wait_exit(CMD_TIMEOUT);
    assert!(!st.success(), "the checkpoint with a process killed in it succeeded");
    assert!(ck.stderr().contains(&victim.to_string()), "the error does not name process {victim}: {}", ck.stderr());
    assert_eq!(s.generations().keys().copied().collect::<Vec<_>>(), vec![g1.id], "a generation was committed");

    // The survivor was resumed and checkpoints alone now.
    a.wait_ticks(3, LINE_TIMEOUT);
    let g2 = s.checkpoint_bounded(&mut a);
    assert_eq!(s.generations()[&g2.id].u64_field("nprocs"), 1, "the next generation should hold only the survivor");
    let apid = a.pid;
    a.kill9();
    let mut r = s.restart_expect(&g2, apid, true);
    r.wait_ticks(2, LINE_TIMEOUT);
    r.kill9();
}

/// A program checkpointed, killed and restarted, its restored agent's join
/// held by the coordinator's test hook (`join-armed`): the restart, the
/// program's pid and the hook's directory (`join-go` lets the join go on).
fn restarted_with_its_join_held(s: &Session) -> (Proc, i32, std::path::PathBuf) {
    let hold = s.path("hold");
    std::fs::create_dir_all(&hold).unwrap();
    if let Some(u) = &s.user {
        // The coordinator runs as the session's user and writes `join-held` here.
        std::os::unix::fs::chown(&hold, Some(u.uid), Some(u.gid)).unwrap();
    }
    let holdv = hold.to_str().unwrap().to_string();
    let env = [("CKPT_TEST_HOLD", holdv.as_str())];
    let mut a = s.launch_env(&program("counter_heap"), &["-m", "8", "-t", "50"], &env);
    a.wait_ticks(2, LINE_TIMEOUT);
    let g = s.checkpoint_bounded(&mut a);
    let pid = a.pid;
    a.kill9();

    std::fs::write(hold.join("join-armed"), b"").unwrap();
    let r = s.restart_expect(&g, pid, true);
    wait_file(&hold.join("join-held"), LINE_TIMEOUT);
    (r, pid, hold)
}

/// A restarted program runs before its agent is back at the coordinator
/// (the restorer resumes its threads, then the agent says HELLO), so its
/// first output can come before it is a member. A test hook holds that
/// join: `ckpt kill` sent then waits for the process and kills it, where it
/// used to find nothing to kill and return while the program ran on.
#[test]
fn kill_right_after_a_restart_kills_the_process_still_joining() {
    kill_right_after_a_restart(&Session::new("membership_kill_joining"));
}

/// The same as an ordinary user (`ckpt-user`): the user's own coordinator
/// tracks the joining connection of its own uid and kills it.
#[test]
fn kill_right_after_a_restart_as_an_ordinary_user() {
    kill_right_after_a_restart(&Session::as_user(TEST_USER, "membership_kill_joining_user"));
}

fn kill_right_after_a_restart(s: &Session) {
    let (mut r, pid, hold) = restarted_with_its_join_held(s);
    // It ticks, and is not a member yet.
    r.wait_ticks(2, LINE_TIMEOUT);
    assert!(s.computation().is_empty(), "the held process is already a member: {:?}", s.computation());
    let mut kill = Proc::spawn("kill".into(), s.cmd("kill"));
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(hold.join("join-go"), b"").unwrap();
    let st = kill.wait_exit(CMD_TIMEOUT);
    assert!(st.success(), "ckpt kill failed: {}", kill.stderr());
    assert!(!pid_alive(pid), "restored process {pid} still runs after ckpt kill returned\n{}", r.context());
    r.wait_exit(CMD_TIMEOUT);
}

/// The same, with the join held past the time `ckpt kill` waits for it
/// (10 s): the kill returns, and the process is killed the moment it
/// joins, never left running outside a killed computation.
#[test]
fn a_process_joining_after_kill_stopped_waiting_is_killed_as_it_joins() {
    let s = Session::new("membership_kill_late");
    let (mut r, pid, hold) = restarted_with_its_join_held(&s);
    let out = s.run("kill", &[]);
    assert!(out.status.success(), "ckpt kill failed: {}", text(&out.stderr));
    r.wait_ticks(1, LINE_TIMEOUT);
    assert!(pid_alive(pid), "the held process died before it joined\n{}", r.context());
    std::fs::write(hold.join("join-go"), b"").unwrap();
    let deadline = Instant::now() + LINE_TIMEOUT;
    while pid_alive(pid) {
        assert!(Instant::now() < deadline, "restored process {pid} joined after the kill and still runs\n{}", r.context());
        std::thread::sleep(Duration::from_millis(20));
    }
    r.wait_exit(CMD_TIMEOUT);
}
