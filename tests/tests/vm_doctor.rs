//! `ckpt doctor` under Yama (issue 12): boots Debian's 6.1 kernel, which
//! has Yama, in qemu (`tests/vm/run-doctor.sh`); the guest sets
//! `kernel.yama.ptrace_scope` 0..3 and checks doctor's stop and capture
//! lines as root and as a user, then prints one verdict line. Needs root
//! and apt, like `vm_softdirty.rs`. `CKPT_SKIP_VM=1` skips it.
mod common;
use common::*;

#[test]
fn doctor_under_yama_in_vm() {
    run_vm_test("run-doctor.sh", "doctor");
}
