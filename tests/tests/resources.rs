//! resources: open files and offsets, cwd, umask, rlimits, signal
//! handlers and masks, timers and environment survive checkpoint/restart.
mod common;
use common::*;

fn check_log(s: &Session, pid: i32) {
    let log = std::fs::read_to_string(s.path(&format!("res.{pid}.d/log"))).unwrap();
    assert!(log.lines().count() > 10, "the program's O_APPEND log is short:\n{log}");
    for l in log.lines() {
        assert!(l.starts_with("tick ") && l.ends_with(&format!("pid {pid}")), "bad log line {l:?}");
    }
}

#[test]
fn resources_itimer_checkpoint_restart_cycle() {
    let mut c = Cycle::new(program("resources"), &["-t", "100"]);
    c.env.push(("CKPT_TEST_MARK", "mark-itimer"));
    let s = standard_cycle("resources_itimer", &c);
    let pid = std::fs::read_dir(&s.dir)
        .unwrap()
        .flatten()
        .find_map(|e| e.file_name().to_str().and_then(|n| n.strip_prefix("res.")?.strip_suffix(".d")?.parse().ok()))
        .expect("no res.<pid>.d dir");
    check_log(&s, pid);
}

#[test]
fn resources_alarm_checkpoint_restart_cycle() {
    let mut c = Cycle::new(program("resources"), &["-t", "100", "-a"]);
    c.env.push(("CKPT_TEST_MARK", "mark-alarm"));
    standard_cycle("resources_alarm", &c);
}
