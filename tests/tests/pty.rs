//! A program under a pseudo-terminal (tests/programs/pty.c): a child, the
//! session leader of the slave, writes numbered lines through it; the
//! parent reads them from the master and checks every byte. Checkpointed
//! mid-stream (bytes in flight in the terminal), both killed with -9,
//! restarted: no byte lost, repeated or changed (no doubled `\r` either),
//! the slave is the child's controlling terminal again, with its window
//! size and settings.
mod common;
use common::*;

use std::time::{Duration, Instant};

/// The controlling terminal's device number of `pid` (`/proc/PID/stat` field 7).
fn tty_nr(pid: i32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_else(|e| panic!("process {pid}: {e}"));
    stat[stat.rfind(')').unwrap() + 2..].split_whitespace().nth(4).unwrap().parse().unwrap()
}

fn lines(l: &str) -> u64 {
    l.rsplit("lines=").next().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no lines= in {l:?}"))
}

#[test]
fn program_under_a_pty_restarts_mid_stream_byte_for_byte() {
    let s = Session::new("pty");
    let stop = s.stop_file();
    let mut p = s.launch(&program("pty"), &["-t", "100", "-b", "8", "-s", stop.to_str().unwrap()]);
    let child: i32 = p.wait_prefix("CHILD ", LINE_TIMEOUT)[6..].trim().parse().unwrap();
    s.track(child);
    p.wait_prefix("READY", LINE_TIMEOUT);
    p.wait_ticks(3, LINE_TIMEOUT);
    // The child is in the computation once it has registered.
    let deadline = Instant::now() + LINE_TIMEOUT;
    loop {
        let out = s.run("status", &["--json"]);
        if text(&out.stdout).contains(&format!("\"pid\":{child}")) || text(&out.stdout).contains(&format!("\"pid\": {child}")) {
            break;
        }
        assert!(Instant::now() < deadline, "the child {child} never joined the computation: {}", text(&out.stdout));
        std::thread::sleep(Duration::from_millis(50));
    }
    let tty_before = tty_nr(child);
    assert!((136..144).contains(&((tty_before >> 8) & 0xfff)), "the child's controlling terminal {tty_before:#x} is not a pts");

    let g1 = s.checkpoint_bounded(&mut p);
    p.wait_ticks(3, LINE_TIMEOUT);
    let g2 = s.checkpoint_bounded(&mut p);
    let seen = lines(p.lines.iter().rev().find(|l| l.starts_with("TICK")).unwrap());
    s.kill_all(&[p.pid, child], &mut p);

    for (g, latest) in [(&g2, true), (&g1, false)] {
        let mut r = s.restart_expect(g, p.pid, latest);
        assert!(pid_alive(child), "the child {child} was not restored\n{}", r.context());
        let tty = tty_nr(child);
        assert!((136..144).contains(&((tty >> 8) & 0xfff)), "the restored child has no pts as controlling terminal ({tty:#x})\n{}", r.context());
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
            std::fs::remove_file(&stop).unwrap();
        } else {
            s.kill_all(&[r.pid, child], &mut r);
        }
    }
}
