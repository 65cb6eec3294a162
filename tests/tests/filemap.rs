//! Issue 11, "File-backed memory comes back file-backed": a private file
//! mapping, the executable and the libraries are mapped from their files
//! again at restart, and only the pages the process changed are stored.
//! The program checks its pages, that the file kept its original content,
//! and that /proc/self/maps names the data file (with its inode) and libc.
mod common;
use std::time::Duration;

use common::*;

#[test]
fn private_file_mappings_come_back_from_their_files() {
    let mut c = Cycle::new(program("filemap"), &["-t", "100", "-m", "64"]);
    c.ticks_between = 3;
    let s = standard_cycle("filemap", &c);
    // 64 MiB of incompressible file content mapped, ~700 pages changed:
    // a generation stores the changed pages, not the file.
    for (id, g) in s.generations() {
        let new = g.u64_field("new_bytes");
        assert!(new < 24 << 20, "generation {id} stored {new} new bytes: the mapped file was stored, not just its changed pages");
    }
}

/// The file changed under a mapping between checkpoint and restart: the
/// restart fails before any process starts, naming the file; with the
/// file put back it restarts.
#[test]
fn a_changed_mapped_file_is_named_and_refused() {
    let s = Session::new("filemap_changed");
    let stop = s.stop_file();
    let mut p = s.launch(&program("filemap"), &["-t", "100", "-m", "8", "-s", stop.to_str().unwrap()]);
    let pid = p.pid;
    let ready = p.wait_prefix("READY", LINE_TIMEOUT);
    let file = ready.split("file=").nth(1).expect("READY names the file").trim().to_string();
    p.wait_ticks(2, LINE_TIMEOUT);
    let g = s.checkpoint_bounded(&mut p);
    p.kill9();
    wait_gone(pid, Duration::from_secs(10));

    let original = std::fs::read(&file).unwrap();
    let mtime = std::fs::metadata(&file).unwrap().modified().unwrap();
    let mut changed = original.clone();
    changed[5000] ^= 0xff;
    std::fs::write(&file, &changed).unwrap();
    let out = run_with_timeout(s.cmd("restart"), Duration::from_secs(60));
    let err = text(&out.stderr);
    assert!(!out.status.success(), "restart over a changed mapped file succeeded:\n{err}");
    assert!(err.contains(&file) && err.contains("changed since the checkpoint"), "the error does not name the changed file {file}:\n{err}");
    assert!(!pid_exists(pid), "a process {pid} was started by the refused restart");

    // The checkpoint's version back (content and mtime): it restarts.
    std::fs::write(&file, &original).unwrap();
    std::fs::File::options().write(true).open(&file).unwrap().set_modified(mtime).unwrap();
    let mut r = s.restart_expect(&g, pid, true);
    r.wait_ticks(3, LINE_TIMEOUT);
    r.finish(&s, 3);
}
