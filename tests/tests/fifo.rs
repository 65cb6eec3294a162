//! Named pipes (FIFOs): tests/programs/fifo.c's child writes numbered
//! records into a FIFO that its parent reads, with about a hundred records
//! always in flight. Checkpointed mid-stream, killed, restarted (with the
//! FIFO file gone, as on a new host, and with it still there): the parent
//! checks every record, so a byte lost or read twice fails the program;
//! it also checks each fd's access mode, flags and the pipe's capacity.
mod common;
use common::*;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};

/// The records in flight that the last tick reported.
fn inflight(p: &Proc) -> u64 {
    let l = p.lines.iter().rev().find(|l| l.starts_with("TICK ")).expect("no tick yet");
    l.rsplit(' ').next().unwrap().parse().unwrap()
}

#[test]
fn fifo_with_records_in_flight_survives_kill_and_restart() {
    let s = Session::new("fifo");
    let stop = s.stop_file();
    let fifo = s.path("fifo");
    let (mut p, pids) = s.launch_computation(&program("fifo"), &["-t", "50", "-f", fifo.to_str().unwrap(), "-s", stop.to_str().unwrap()], 2);
    p.wait_ticks(5, LINE_TIMEOUT);
    assert!(inflight(&p) >= 50, "too few records in flight to test anything\n{}", p.context());
    let g1 = s.checkpoint_bounded(&mut p);
    p.wait_ticks(3, LINE_TIMEOUT);
    let g2 = s.checkpoint_bounded(&mut p);
    s.kill_all(&pids, &mut p);

    // As on a new host: the FIFO is gone; the restart makes it again.
    std::fs::remove_file(&fifo).unwrap();
    let mut r = s.restart_expect(&g2, p.pid, true);
    r.wait_ticks(5, LINE_TIMEOUT);
    let m = std::fs::metadata(&fifo).expect("the restart did not make the FIFO again");
    assert!(m.file_type().is_fifo() && m.permissions().mode() & 0o7777 == 0o640, "{} is not a FIFO of mode 0640 ({m:?})", fifo.display());
    // The restored pair checkpoints again, with records in flight.
    let g3 = s.checkpoint_bounded(&mut r);
    assert!(g3.id > g2.id);
    s.stop_at(r.last_tick.unwrap() + 3);
    r.wait_prefix("END", LINE_TIMEOUT);
    s.finish_computation(&pids, &mut r);

    // The oldest generation, with the FIFO file still there.
    let mut o = s.restart_expect(&g1, p.pid, false);
    o.wait_ticks(5, LINE_TIMEOUT);
    s.kill_all(&pids, &mut o);
}
