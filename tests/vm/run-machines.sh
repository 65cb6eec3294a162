#!/usr/bin/env bash
# VMs with a kernel of their own (Debian's stock kernel under qemu TCG) as
# the other machines of a computation, for tests/tests/vm_machines.rs.
#
#   run-machines.sh prepare WORK
#       installs what lacks (tests/vm/lib.sh), writes WORK/initramfs.cpio
#       (ckpt, counter_heap, the e1000/virtio-blk/minix modules,
#       tests/vm/guest-machines.sh as /guest.sh) and WORK/disk.img, an
#       empty minix file system.
#   run-machines.sh boot WORK ckpt_KEY=VALUE...
#       boots a guest in the foreground (it becomes qemu: same pid, killed
#       with its parent): its serial console is stdout, the KEY=VALUEs go
#       on the kernel command line for the guest script (see there), its
#       NIC is qemu user networking (the host is 10.0.2.2 to the guest), its
#       disk is WORK/disk.img (it outlives the guest, like a cloud volume).
#
# Environment: that of tests/vm/lib.sh.
set -euo pipefail
me=run-machines
. "$(dirname "$0")/lib.sh"
[ $# -ge 2 ] || die "usage: $0 prepare WORK | boot WORK ckpt_KEY=VALUE..."
op=$1 work=$2
shift 2
case $op in
    prepare)
        vm_host_setup
        vm_kernel_fetch
        vm_artifacts
        mkdir -p "$work"
        mods=()
        for m in $vm_modules; do mods+=("$(basename "$m")"); done
        vm_initramfs "$work/initramfs.cpio" "$vm_here/guest-machines.sh" "${mods[@]}"
        rm -f "$work/disk.img"
        truncate -s 32M "$work/disk.img"
        # minix (util-linux; busybox has no mkfs for it): a file system the
        # guest kernel needs one module for, with names up to 60 bytes.
        mkfs.minix -3 "$work/disk.img" >/dev/null || die "mkfs.minix -3 $work/disk.img failed"
        ;;
    boot)
        [ -s "$work/initramfs.cpio" ] || die "no $work/initramfs.cpio: run $0 prepare $work first"
        vm_qemu_argv "$work/initramfs.cpio" "$*"
        # The test's thread is the parent: qemu dies with it, whatever ends it.
        exec setpriv --pdeathsig KILL -- "${qemu_argv[@]}" \
            -nic user,model=e1000 \
            -drive "file=$work/disk.img,format=raw,if=virtio" \
            </dev/null
        ;;
    *) die "unknown operation $op (prepare or boot)" ;;
esac
