//! Issue 11, "POSIX message queues": a named queue opened twice (read-only
//! and write-only) and an unlinked, full, non-blocking one come back with
//! their attributes and messages in order with their priorities
//! (tests/programs/mqueue.c checks them every tick). The named queue the
//! killed program leaves is recognized as its own and replaced; a queue of
//! that name that is not the computation's is refused, naming it and the
//! command that removes it, and no process starts.
mod common;
use common::*;

#[test]
fn message_queues_come_back_with_their_messages() {
    let c = Cycle::new(program("mqueue"), &["-t", "100", "-q", "/ckpt-test-mq-cycle"]);
    standard_cycle("mqueue", &c);
}

#[test]
fn a_foreign_queue_of_the_same_name_is_refused() {
    let name = c"/ckpt-test-mq-foreign";
    let s = Session::new("mqueue_foreign");
    let stop = s.stop_file();
    let mut p = s.launch(&program("mqueue"), &["-t", "100", "-q", "/ckpt-test-mq-foreign", "-s", stop.to_str().unwrap()]);
    let pid = p.pid;
    p.wait_prefix("READY", LINE_TIMEOUT);
    p.wait_ticks(2, LINE_TIMEOUT);
    let g = s.checkpoint_bounded(&mut p);
    p.kill9();
    wait_gone(pid, std::time::Duration::from_secs(10));

    // Someone else's queue under the name: other attributes.
    // SAFETY: mq_unlink/mq_open/mq_close with a NUL-terminated name and plain attributes.
    unsafe {
        libc::mq_unlink(name.as_ptr());
        let mut a: libc::mq_attr = std::mem::zeroed();
        a.mq_maxmsg = 3;
        a.mq_msgsize = 16;
        let q = libc::mq_open(name.as_ptr(), libc::O_RDWR | libc::O_CREAT, 0o644 as libc::c_uint, &a as *const libc::mq_attr);
        assert!(q >= 0, "mq_open: {}", std::io::Error::last_os_error());
        libc::mq_close(q);
    }
    let out = run_with_timeout(s.cmd("restart"), std::time::Duration::from_secs(60));
    let err = text(&out.stderr);
    assert!(!out.status.success(), "restart over a foreign queue succeeded:\n{err}");
    assert!(err.contains("/ckpt-test-mq-foreign") && err.contains("rm /dev/mqueue/ckpt-test-mq-foreign"), "the error does not name the queue and the fix:\n{err}");
    assert!(!pid_exists(pid), "a process {pid} was started by the refused restart");

    // SAFETY: as above.
    unsafe { libc::mq_unlink(name.as_ptr()) };
    let mut r = s.restart_expect(&g, pid, true);
    r.wait_ticks(3, LINE_TIMEOUT);
    r.finish(&s, 3);
}
