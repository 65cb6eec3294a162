//! Issue 11: `ckpt gc` keeps the blobs that fd data references (deleted
//! files' contents, message queues' messages; pipe and socket bytes in
//! flight too). Each program's fd data changes every tick, so the blobs of
//! a generation that is kept are the ones the generations gc forgets
//! would leave behind; after gc, `verify --all` is clean and the oldest
//! kept generation restarts and passes the program's own checks.
mod common;
use common::*;

fn ok(s: &Session, sub: &str, args: &[&str]) -> String {
    let mut c = s.cmd(sub);
    c.args(["--store", &s.store]).args(args);
    let out = run_with_timeout(c, std::time::Duration::from_secs(120));
    assert!(out.status.success(), "ckpt {sub} {args:?} failed:\nstdout: {}\nstderr: {}", text(&out.stdout), text(&out.stderr));
    text(&out.stdout)
}

fn gc_then_restart_oldest_kept(name: &str, prog: &str, args: &[&str]) {
    let s = Session::new(name);
    let stop = s.stop_file();
    let mut all: Vec<&str> = args.to_vec();
    let stop_s = stop.to_str().unwrap().to_string();
    all.extend(["-s", &stop_s]);
    let mut p = s.launch(&program(prog), &all);
    let pid = p.pid;
    p.wait_prefix("READY", LINE_TIMEOUT);
    p.wait_ticks(2, LINE_TIMEOUT);
    let mut gens = Vec::new();
    for _ in 0..5 {
        gens.push(s.checkpoint_bounded(&mut p));
        p.wait_ticks(2, LINE_TIMEOUT);
    }
    p.kill9();
    wait_gone(pid, std::time::Duration::from_secs(10));
    // Keep the second and the last: the first, third and fourth go.
    let keep = gens[1].id.to_string();
    let out = ok(&s, "gc", &["--keep-last", "1", "--keep", &keep]);
    eprintln!("{out}");
    let left: Vec<u64> = s.generations().keys().copied().collect();
    assert_eq!(left, vec![gens[1].id, gens[4].id], "generations after gc");
    let v = ok(&s, "verify", &["--all"]);
    assert!(v.contains("0 problem(s)"), "verify --all after gc: {v}");
    let mut r = s.restart_expect(&gens[1], pid, false);
    r.wait_ticks(3, LINE_TIMEOUT);
    r.finish(&s, 3);
}

#[test]
fn gc_keeps_deleted_file_contents() {
    gc_then_restart_oldest_kept("gc_fd_deleted", "deleted", &["-t", "100"]);
}

#[test]
fn gc_keeps_message_queue_messages() {
    gc_then_restart_oldest_kept("gc_fd_mqueue", "mqueue", &["-t", "100", "-q", "/ckpt-test-mq-gc"]);
}
