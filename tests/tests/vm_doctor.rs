//! `ckpt doctor` under Yama (issue 12): boots Debian's 6.1 kernel, which
//! has Yama, in qemu (`tests/vm/run-doctor.sh`); the guest sets
//! `kernel.yama.ptrace_scope` 0..3 and checks doctor's stop and capture
//! lines as root and as a user, then prints one verdict line. Needs root
//! and apt, like `vm_softdirty.rs`. `CKPT_SKIP_VM=1` skips it.
mod common;
use common::*;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

#[test]
fn doctor_under_yama_in_vm() {
    if std::env::var_os("CKPT_SKIP_VM").is_some_and(|v| v == "1") {
        eprintln!("CKPT_SKIP_VM=1: doctor VM test skipped");
        return;
    }
    let ws = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let script = ws.join("tests/vm/run-doctor.sh");
    // The binaries this test run uses (same lookup as the other tests) and
    // the programs built with it.
    let bin_dir = ckpt_bin().parent().unwrap().to_path_buf();
    let mut cmd = Command::new("bash");
    cmd.arg(&script)
        .env("CKPT_VM_BIN_DIR", &bin_dir)
        .env("CKPT_VM_PROGRAMS", ckpt_tests::PROGRAMS_DIR);
    // The kernel cache and console log go next to the binaries' target dir.
    if std::env::var_os("CKPT_VM_TARGET").is_none() {
        if let Some(target) = bin_dir.parent() {
            cmd.env("CKPT_VM_TARGET", target);
        }
    }
    // The script times the VM out itself (300 s); this bounds installs too.
    let out = run_with_timeout(cmd, Duration::from_secs(900));
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    eprintln!("{stderr}");
    let verdict = stdout.lines().rev().find(|l| l.starts_with("CKPT-VM-VERDICT:")).unwrap_or("");
    assert_eq!(
        verdict, "CKPT-VM-VERDICT: PASS",
        "doctor VM test failed (script exit {}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert!(out.status.success(), "script printed PASS but exited {}", out.status);
}
