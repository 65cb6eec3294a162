//! Temporary files kept with the image (issue 15; engine/src/tmpfiles.rs):
//! tests/programs/tmpfiles.c keeps a session directory as Open MPI does
//! (a file it maps shared with its fd closed, a log it appends to, a FIFO)
//! and checks every tick that they hold what it wrote. Checkpointed,
//! killed, the directory removed: the dry run says what it would make
//! again, the restart makes it (modes, contents, hole) and the program's
//! own checks pass to DONE. A planted symlink or another user's directory
//! on the way is refused and nothing is written through it; the same
//! files outside the temporary directories are not kept, and their
//! restart is refused naming them, as before.
mod common;
use common::*;

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

fn launch(s: &Session, dir: &Path) -> Proc {
    std::fs::create_dir_all(dir).unwrap();
    let mut p = s.launch(&program("tmpfiles"), &["-t", "50", "-d", dir.to_str().unwrap(), "-s", s.stop_file().to_str().unwrap()]);
    p.wait_prefix("READY", LINE_TIMEOUT);
    p.wait_ticks(3, LINE_TIMEOUT);
    p
}

/// The uid of the ordinary test account (another user than root).
fn test_uid() -> u32 {
    let out = std::process::Command::new("id").args(["-u", TEST_USER]).output().unwrap();
    text(&out.stdout).trim().parse().unwrap_or_else(|e| panic!("id -u {TEST_USER}: {e}"))
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).permissions().mode() & 0o7777
}

#[test]
fn a_removed_session_directory_is_made_again() {
    let s = Session::new("tmpfiles");
    let work = s.path("work");
    assert!(work.starts_with("/tmp"), "the session directory {} is not under /tmp: the rule does not apply (CKPT_TEST_TMP?)", work.display());
    let sess = work.join("sess");
    let mut p = launch(&s, &work);
    let pid = p.pid;
    s.checkpoint_bounded(&mut p);
    p.wait_ticks(3, LINE_TIMEOUT);
    let g = s.checkpoint_bounded(&mut p);
    p.kill9();

    // As mpirun does when Slurm stops the job: the session directory goes.
    std::fs::remove_dir_all(&sess).unwrap();
    let out = s.dry_run(g.id);
    let said = text(&out.stdout) + &text(&out.stderr);
    assert!(out.status.success() && said.contains("would restart"), "the dry run refused a generation whose temporary files are kept\n{said}");
    for f in ["sess", "sess/data", "sess/log", "sess/fifo"] {
        let line = format!("{} of process {pid} would be made again", work.join(f).display());
        assert!(said.contains(&line), "the dry run does not say {line:?}\n{said}");
    }
    assert!(!sess.exists(), "the dry run made {}", sess.display());

    let mut r = s.restart_expect(&g, pid, true);
    r.wait_ticks(5, LINE_TIMEOUT);
    // Exactly the checkpoint's contents: not ahead (the program checks
    // they are not behind).
    assert!(!r.lines.iter().any(|l| l.starts_with("AHEAD")), "the files made again are not the checkpoint's\n{}", r.context());
    assert_eq!((mode(&sess), mode(&sess.join("data")), mode(&sess.join("log")), mode(&sess.join("fifo"))), (0o710, 0o640, 0o600, 0o620));
    assert!(std::fs::metadata(sess.join("fifo")).unwrap().file_type().is_fifo());
    // The hole stays a hole (300 KiB + 123 bytes, 64 KiB of it a hole).
    let data = std::fs::metadata(sess.join("data")).unwrap();
    assert!(data.blocks() * 512 < data.len(), "{} lost its hole: {} blocks for {} bytes", sess.join("data").display(), data.blocks(), data.len());

    // Again from the restarted program, then restarted with its files still
    // there (used as they are), run to DONE by its own checks.
    let g2 = s.checkpoint_bounded(&mut r);
    r.kill9();
    let mut r = s.restart_expect(&g2, pid, true);
    r.wait_ticks(3, LINE_TIMEOUT);
    r.finish(&s, 3);
}

#[test]
fn a_planted_symlink_or_foreign_directory_is_refused() {
    let s = Session::new("tmpfiles_hostile");
    let work = s.path("work");
    let sess = work.join("sess");
    let mut p = launch(&s, &work);
    let pid = p.pid;
    let g = s.checkpoint_bounded(&mut p);
    p.kill9();
    std::fs::remove_dir_all(&sess).unwrap();

    // A symlink where the directory was, to a directory of someone else's.
    let theirs = s.path("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::symlink(&theirs, &sess).unwrap();
    let out = s.dry_run(g.id);
    let said = text(&out.stdout);
    assert!(!out.status.success() && said.contains("symlink") && said.contains(sess.to_str().unwrap()), "the dry run does not refuse the symlink {}\n{said}", sess.display());
    let out = s.run("restart", &[]);
    let err = text(&out.stderr);
    assert!(!out.status.success() && err.contains("symlink") && err.contains(sess.to_str().unwrap()), "the restart does not refuse the symlink {}\n{err}", sess.display());
    assert!(!pid_exists(pid), "the refused restart started process {pid}");
    assert_eq!(std::fs::read_dir(&theirs).unwrap().count(), 0, "the restart wrote through the symlink into {}", theirs.display());
    std::fs::remove_file(&sess).unwrap();

    // Another user's directory, open to all, where the session directory
    // was: nothing is made in it.
    std::fs::create_dir(&sess).unwrap();
    std::fs::set_permissions(&sess, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::os::unix::fs::chown(&sess, Some(test_uid()), None).unwrap();
    let out = s.run("restart", &[]);
    let err = text(&out.stderr);
    assert!(!out.status.success() && err.contains(&format!("belongs to uid {}", test_uid())) && err.contains(sess.to_str().unwrap()), "the restart does not refuse {}, of uid {}\n{err}", sess.display(), test_uid());
    assert!(!pid_exists(pid), "the refused restart started process {pid}");
    assert_eq!(std::fs::read_dir(&sess).unwrap().count(), 0, "the restart made files in {}", sess.display());
    std::fs::remove_dir(&sess).unwrap();

    // Gone: made again.
    let mut r = s.restart_expect(&g, pid, true);
    r.wait_ticks(3, LINE_TIMEOUT);
    r.finish(&s, 3);
}

#[test]
fn files_outside_the_temporary_directories_are_not_kept() {
    let s = Session::new("tmpfiles_outside");
    // Cargo's test directory, unless the checkout is itself in a temporary
    // directory (a CI clone in /tmp): then /run (root's, not a temporary
    // directory of the rule; the test runs as root).
    let temporary = |d: &Path| d.starts_with("/tmp") || d.starts_with("/var/tmp") || d.starts_with("/run/user");
    let base = [Path::new(env!("CARGO_TARGET_TMPDIR")), Path::new("/run/ckpt-tests")].into_iter().find(|d| !temporary(d)).unwrap();
    let work = base.join(format!("tmpfiles-outside-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let sess = work.join("sess");
    let mut p = launch(&s, &work);
    let pid = p.pid;
    let g = s.checkpoint_bounded(&mut p);
    p.kill9();
    let aside = work.join("aside");
    std::fs::rename(&sess, &aside).unwrap();
    let out = s.dry_run(g.id);
    let said = text(&out.stdout);
    assert!(!out.status.success() && said.contains(sess.join("data").to_str().unwrap()) && said.contains("put it back"), "the dry run does not name {} and the fix\n{said}", sess.join("data").display());
    let out = s.run("restart", &[]);
    assert!(!out.status.success() && text(&out.stderr).contains(sess.to_str().unwrap()), "the restart without {} does not name it\n{}", sess.display(), text(&out.stderr));
    assert!(!pid_exists(pid), "the refused restart started process {pid}");
    assert!(!sess.exists(), "the refused restart made {}", sess.display());
    std::fs::rename(&aside, &sess).unwrap();
    let mut r = s.restart_expect(&g, pid, true);
    r.wait_ticks(3, LINE_TIMEOUT);
    r.finish(&s, 3);
    let _ = std::fs::remove_dir_all(&work);
}
