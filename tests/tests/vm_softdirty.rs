//! The soft-dirty backend on a real kernel that has it (issue 3): boots
//! Debian's kernel in qemu with an initramfs holding ckpt and counter_heap
//! (`tests/vm/run-softdirty.sh`), which launches with `--dirty-tracking
//! soft-dirty`, checkpoints, restarts, and prints one verdict line.
//! Needs root and apt (the script installs qemu, busybox-static, cpio and
//! fetches the kernel package once into `<target>/vm-cache`).
//! `CKPT_SKIP_VM=1` skips it.
mod common;
use common::*;

#[test]
fn soft_dirty_in_vm() {
    run_vm_test("run-softdirty.sh", "soft-dirty");
}
