//! Issue 11, "the agent's fds": a program that takes the numbers where the
//! agent keeps its connection and userfaultfd (dup2, dup3, F_DUPFD,
//! close_range over them, close of the agent's socket, and a raw dup2
//! syscall onto the userfaultfd) keeps exactly its own fds across
//! checkpoints and restarts, and the agent keeps working.
mod common;
use common::*;

#[test]
fn program_fds_on_the_agents_numbers_come_back() {
    let dir = std::env::temp_dir().join(format!("ckpt-agentfd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let d = dir.to_str().unwrap().to_string();
    let mut c = Cycle::new(program("agentfd"), &["-t", "100", "-u", "-d", &d]);
    c.launch_opts = vec!["--dirty-tracking".into(), "uffd-wp".into()];
    standard_cycle("agentfd", &c);
    let _ = std::fs::remove_dir_all(&dir);
}
