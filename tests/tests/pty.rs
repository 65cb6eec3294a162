//! A program under a pseudo-terminal (tests/programs/pty.c): a child, the
//! session leader of the slave, writes numbered lines through it; the
//! parent reads them from the master and checks every byte. Checkpointed
//! mid-stream (bytes in flight in the terminal), both killed with -9,
//! restarted: no byte lost, repeated or changed (no doubled `\r` either),
//! the slave is the child's controlling terminal again, with its window
//! size and settings, and its foreground process group is the grandchild's
//! again (a job the child put in the foreground with tcsetpgrp).
mod common;
use common::*;

use std::time::{Duration, Instant};

/// Field `n` (3 and up) of `/proc/PID/stat`.
fn stat_field(pid: i32, n: usize) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_else(|e| panic!("process {pid}: {e}"));
    stat[stat.rfind(')').unwrap() + 2..].split_whitespace().nth(n - 3).unwrap().parse().unwrap()
}

/// The controlling terminal's device number of `pid`.
fn tty_nr(pid: i32) -> i32 {
    stat_field(pid, 7)
}

/// The foreground process group of `pid`'s controlling terminal.
fn tpgid(pid: i32) -> i32 {
    stat_field(pid, 8)
}

fn lines(l: &str) -> u64 {
    l.rsplit("lines=").next().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no lines= in {l:?}"))
}

#[test]
fn program_under_a_pty_restarts_mid_stream_byte_for_byte() {
    mid_stream("pty", &[]);
}

/// The master in packet mode (`TIOCPKT`): every read starts with a header
/// byte. The drain reads packets (before, a read sized to FIONREAD got the
/// header alone, forever, with the computation stopped), and packet mode
/// is on again after the restart (the program checks with TIOCGPKT, and
/// that every data packet has its header).
#[test]
fn pty_in_packet_mode_checkpoints_and_restarts() {
    mid_stream("pty_packet", &["-p"]);
}

fn mid_stream(name: &str, extra: &[&str]) {
    let s = Session::new(name);
    let stop = s.stop_file();
    let mut args = vec!["-t", "100", "-b", "8", "-s", stop.to_str().unwrap()];
    args.extend_from_slice(extra);
    let mut p = s.launch(&program("pty"), &args);
    let child: i32 = p.wait_prefix("CHILD ", LINE_TIMEOUT)[6..].trim().parse().unwrap();
    s.track(child);
    p.wait_prefix("READY", LINE_TIMEOUT);
    let fg: i32 = p.wait_prefix("FG ", LINE_TIMEOUT)[3..].trim().parse().unwrap();
    s.track(fg);
    p.wait_ticks(3, LINE_TIMEOUT);
    // The child and grandchild are in the computation once they have registered.
    let deadline = Instant::now() + LINE_TIMEOUT;
    while s.computation() != [p.pid, child, fg] {
        assert!(Instant::now() < deadline, "the child {child} and grandchild {fg} never joined the computation: {:?}", s.computation());
        std::thread::sleep(Duration::from_millis(50));
    }
    let tty_before = tty_nr(child);
    assert!((136..144).contains(&((tty_before >> 8) & 0xfff)), "the child's controlling terminal {tty_before:#x} is not a pts");
    assert_eq!(tpgid(child), fg, "the grandchild's group is not the terminal's foreground group");

    let g1 = s.checkpoint_bounded(&mut p);
    p.wait_ticks(3, LINE_TIMEOUT);
    let g2 = s.checkpoint_bounded(&mut p);
    let seen = lines(p.lines.iter().rev().find(|l| l.starts_with("TICK")).unwrap());
    s.kill_all(&[p.pid, child, fg], &mut p);

    for (g, latest) in [(&g2, true), (&g1, false)] {
        let mut r = s.restart_expect(g, p.pid, latest);
        assert!(pid_alive(child), "the child {child} was not restored\n{}", r.context());
        let tty = tty_nr(child);
        assert!((136..144).contains(&((tty >> 8) & 0xfff)), "the restored child has no pts as controlling terminal ({tty:#x})\n{}", r.context());
        assert!(pid_alive(fg), "the grandchild {fg} was not restored\n{}", r.context());
        assert_eq!(tpgid(child), fg, "the terminal's foreground group is not the grandchild's after the restart\n{}", r.context());
        assert_eq!(tpgid(fg), fg, "the grandchild does not see its group in the foreground\n{}", r.context());
        r.wait_ticks(5, LINE_TIMEOUT);
        let now = lines(r.lines.iter().rev().find(|l| l.starts_with("TICK")).unwrap());
        assert!(now > 0 && (!latest || now > seen), "no lines went through the restored pty ({now}, {seen} before)\n{}", r.context());
        if latest {
            // The restored pair checkpoints again and runs to the end.
            s.checkpoint_bounded(&mut r);
            let t = r.last_tick.unwrap();
            s.stop_at(t + 3);
            r.wait_prefix("DONE", LINE_TIMEOUT);
            let st = r.wait_exit(CMD_TIMEOUT);
            assert!(st.success(), "the restored program ended with {st}\n{}", r.context());
            wait_gone(child, Duration::from_secs(20));
            wait_gone(fg, Duration::from_secs(20));
            std::fs::remove_file(&stop).unwrap();
        } else {
            s.kill_all(&[r.pid, child, fg], &mut r);
        }
    }
}
