#!/usr/bin/env bash
# `ckpt doctor` on a kernel with Yama (Debian's stock 6.1 kernel in qemu,
# TCG): the guest (tests/vm/guest-doctor.sh) sets kernel.yama.ptrace_scope
# 0, 1, 2, 3 and checks what doctor says as root and as a user, then prints
# one line `CKPT-VM-VERDICT: PASS` or `CKPT-VM-VERDICT: FAIL <why>`. This
# script exits 0 only on PASS. Needs what run-softdirty.sh needs
# (tests/vm/lib.sh).
#
# Environment (all optional; and those of tests/vm/lib.sh):
#   CKPT_VM_WORK       initramfs and console log (default $CKPT_VM_CACHE/run-doctor)
#   CKPT_VM_TIMEOUT    seconds before the VM is killed (default 300)
set -euo pipefail
me=run-doctor
. "$(dirname "$0")/lib.sh"
work=${CKPT_VM_WORK:-$vm_cache/run-doctor}
timeout_s=${CKPT_VM_TIMEOUT:-300}

vm_host_setup
vm_kernel_fetch
vm_artifacts
mkdir -p "$work"
vm_initramfs "$work/initramfs.cpio" "$vm_here/guest-doctor.sh"
vm_qemu_argv "$work/initramfs.cpio" ""

console=$work/console.log
rm -f "$console"
log "booting ($vm_kernel, timeout ${timeout_s}s); console: $console"
set +e
timeout -k 10 "$timeout_s" "${qemu_argv[@]}" -nic none </dev/null >"$console" 2>&1
qrc=$?
set -e
tr -d '\r' < "$console" > "$console.tmp" && mv "$console.tmp" "$console"
grep '^CKPT-VM' "$console" >&2 || true
verdict=$(grep -a '^CKPT-VM-VERDICT:' "$console" | tail -n 1 || true)
if [ -z "$verdict" ]; then
    echo "---- console (last 40 lines)" >&2
    tail -n 40 "$console" >&2
    verdict="CKPT-VM-VERDICT: FAIL qemu exited $qrc without a verdict"
fi
echo "$verdict"
if [ "$verdict" = "CKPT-VM-VERDICT: PASS" ]; then
    exit 0
fi
sed -n '/^CKPT-VM: FAILED/,$p' "$console" >&2
exit 1
