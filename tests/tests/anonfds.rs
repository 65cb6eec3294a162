//! eventfd, timerfd, signalfd, epoll and inotify across checkpoint, kill -9
//! and restart: tests/programs/anonfds.c checks each of them every tick
//! (epoll wakes for the restored eventfd, timerfd, pipes and inner epoll;
//! EPOLL_CTL_MOD on restored items; the items keep EPOLLET, EPOLLONESHOT
//! and EPOLLEXCLUSIVE; the eventfd counts are right; the timer keeps
//! firing). After the restart the test sends a signal (the signalfd gets
//! it), creates a file in the watched directory (inotify reports it, with
//! the wd the watch had) and asks for the one-shot timer's expiration that
//! was never read before the checkpoint.
mod common;
use common::*;

unsafe extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}
const SIGUSR2: i32 = 12;

fn after_restart_checks(s: &Session, r: &mut Proc, n: u32, first: bool) {
    let watched = s.path("watched");
    r.wait_ticks(3, LINE_TIMEOUT);
    // SAFETY: a signal to the restored test program.
    assert_eq!(unsafe { kill(r.pid, SIGUSR2) }, 0);
    r.wait_line(|l| l == "SIGNAL 12", LINE_TIMEOUT);
    let name = format!("created-after-restart-{n}");
    std::fs::write(watched.join(&name), b"").unwrap();
    let wd = r.wait_prefix(&format!("INOTIFY CREATE {name} "), LINE_TIMEOUT);
    assert!(wd.ends_with("wd=3"), "the watch changed its wd: {wd}\n{}", r.context());
    if first {
        std::fs::write(s.path("ctl.check"), b"").unwrap();
        r.wait_line(|l| l == "UNREAD-TIMER 1", LINE_TIMEOUT);
    }
    r.wait_ticks(3, LINE_TIMEOUT);
}

#[test]
fn eventfd_timerfd_signalfd_epoll_inotify_survive_restart() {
    let s = Session::new("anonfds");
    let watched = s.path("watched");
    std::fs::create_dir_all(&watched).unwrap();
    let ctl = s.path("ctl");
    let stop = s.stop_file();
    let mut p = s.launch(
        &program("anonfds"),
        &["-t", "100", "-w", watched.to_str().unwrap(), "-c", ctl.to_str().unwrap(), "-s", stop.to_str().unwrap()],
    );
    let pid = p.pid;
    p.wait_prefix("READY", LINE_TIMEOUT);
    p.wait_ticks(3, LINE_TIMEOUT);
    let g1 = s.checkpoint_bounded(&mut p);
    p.wait_ticks(1, LINE_TIMEOUT);
    p.kill9();

    let mut r = s.restart_expect(&g1, pid, true);
    after_restart_checks(&s, &mut r, 1, true);
    // A restored program checkpoints and restarts again.
    let g2 = s.checkpoint_bounded(&mut r);
    r.wait_ticks(1, LINE_TIMEOUT);
    r.kill9();
    let mut r = s.restart_expect(&g2, pid, true);
    after_restart_checks(&s, &mut r, 2, false);
    r.finish(&s, 5);
}
