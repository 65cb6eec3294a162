#!/usr/bin/env bash
# The soft-dirty dirty-tracking backend on a real kernel that has it.
#
# Boots Debian's stock kernel (CONFIG_MEM_SOFT_DIRTY=y) in qemu (TCG, no KVM
# needed) with an initramfs holding busybox, ckpt (+ agent, restorer, their
# libraries) and counter_heap; the guest (tests/vm/guest-softdirty.sh) runs
# launch --dirty-tracking soft-dirty / checkpoints / restarts and prints one
# line `CKPT-VM-VERDICT: PASS` or `CKPT-VM-VERDICT: FAIL <why>`, then powers
# off. This script exits 0 only on PASS.
#
# Needs root (apt-get, mknod) on Debian 12 x86-64; installs what it lacks:
# qemu-system-x86, busybox-static, cpio; downloads the kernel package once
# into the cache dir.
#
# Environment (all optional; and those of tests/vm/lib.sh):
#   CKPT_VM_WORK       initramfs and console log (default $CKPT_VM_CACHE/run)
#   CKPT_VM_TIMEOUT    seconds before the VM is killed (default 300)
set -euo pipefail
me=run-softdirty
. "$(dirname "$0")/lib.sh"
work=${CKPT_VM_WORK:-$vm_cache/run}
timeout_s=${CKPT_VM_TIMEOUT:-300}

vm_host_setup
vm_kernel_fetch
vm_artifacts
mkdir -p "$work"
vm_initramfs "$work/initramfs.cpio" "$vm_here/guest-softdirty.sh"
vm_qemu_argv "$work/initramfs.cpio" ""

# ---------------------------------------------------------------- boot
console=$work/console.log
rm -f "$console"
log "booting ($vm_kernel, -smp $vm_smp, timeout ${timeout_s}s); console: $console"
t_boot=$(date +%s)
set +e
timeout -k 10 "$timeout_s" "${qemu_argv[@]}" -nic none </dev/null >"$console" 2>&1
qrc=$?
set -e
t_vm=$(( $(date +%s) - t_boot ))
tr -d '\r' < "$console" > "$console.tmp" && mv "$console.tmp" "$console"
grep '^CKPT-VM' "$console" >&2 || true
verdict=$(grep -a '^CKPT-VM-VERDICT:' "$console" | tail -n 1 || true)
if [ -z "$verdict" ]; then
    if [ $qrc -eq 124 ] || [ $qrc -eq 137 ]; then why="the VM did not finish within ${timeout_s}s"; else why="qemu exited $qrc without a verdict"; fi
    echo "---- console (last 40 lines)" >&2
    tail -n 40 "$console" >&2
    verdict="CKPT-VM-VERDICT: FAIL $why"
fi
log "VM ran ${t_vm}s (qemu exit $qrc); total $(( $(date +%s) - vm_t_start ))s"
echo "$verdict"
if [ "$verdict" = "CKPT-VM-VERDICT: PASS" ]; then
    exit 0
fi
case "$verdict" in
    *'FAIL '*) grep -q -- '---- ' "$console" && sed -n '/^CKPT-VM: .*FAILED/,$p' "$console" >&2 ;;
esac
exit 1
