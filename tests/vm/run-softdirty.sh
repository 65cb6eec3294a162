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
# Environment (all optional):
#   CKPT_VM_TARGET     cargo target dir to take artifacts from
#                      (default $CARGO_TARGET_DIR, else <repo>/target)
#   CKPT_VM_BIN_DIR    dir with ckpt, libckpt_preload.so, ckpt-restorer
#                      (default $CKPT_VM_TARGET/release; built there if missing)
#   CKPT_VM_PROGRAMS   dir with the built test programs (counter_heap)
#                      (default: newest $CKPT_VM_TARGET/release/build/ckpt-tests-*/out/bin)
#   CKPT_VM_CACHE      kernel cache (default $CKPT_VM_TARGET/vm-cache)
#   CKPT_VM_WORK       initramfs staging dir and console log
#                      (default $CKPT_VM_CACHE/run)
#   CKPT_VM_KERNEL_PKG kernel package (default: what linux-image-amd64 depends on)
#   CKPT_VM_TIMEOUT    seconds before the VM is killed (default 300)
#   CKPT_VM_SMP        guest cpus (default 2)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
target=${CKPT_VM_TARGET:-${CARGO_TARGET_DIR:-$root/target}}
bin_dir=${CKPT_VM_BIN_DIR:-$target/release}
cache=${CKPT_VM_CACHE:-$target/vm-cache}
work=${CKPT_VM_WORK:-$cache/run}
timeout_s=${CKPT_VM_TIMEOUT:-300}
smp=${CKPT_VM_SMP:-2}
t_start=$(date +%s)
log() { echo "[run-softdirty +$(( $(date +%s) - t_start ))s] $*" >&2; }
die() { log "$*"; echo "CKPT-VM-VERDICT: FAIL $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (apt-get, mknod)"

# ---------------------------------------------------------------- host packages
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'install ok installed' || need+=(busybox-static)
command -v cpio >/dev/null || need+=(cpio)
if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
busybox=/bin/busybox
if ldd "$busybox" >/dev/null 2>&1; then die "$busybox is not static (install busybox-static)"; fi

# ---------------------------------------------------------------- kernel
mkdir -p "$cache"
kernel=$cache/vmlinuz
if [ -n "${CKPT_VM_KERNEL_PKG:-}" ] && [ "$(cat "$cache/vmlinuz.pkg" 2>/dev/null)" != "$CKPT_VM_KERNEL_PKG" ]; then
    rm -f "$kernel"
fi
if [ ! -s "$kernel" ]; then
    pkg=${CKPT_VM_KERNEL_PKG:-}
    if [ -z "$pkg" ]; then
        pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
        if [ -z "$pkg" ]; then
            apt-get update -qq
            pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
        fi
    fi
    [ -n "$pkg" ] || die "cannot tell which linux-image package to use (set CKPT_VM_KERNEL_PKG)"
    log "downloading $pkg"
    dl=$(mktemp -d "$cache/dl.XXXXXX")
    chmod 755 "$dl"
    (cd "$dl" && { apt-get download "$pkg" >/dev/null 2>&1 || { apt-get update -qq && apt-get download "$pkg" >/dev/null; }; })
    dpkg-deb -x "$dl"/*.deb "$dl/x"
    vmlinuz=$(ls "$dl"/x/boot/vmlinuz-* | head -n 1)
    [ -s "$vmlinuz" ] || die "no /boot/vmlinuz-* in $pkg"
    grep -q '^CONFIG_MEM_SOFT_DIRTY=y' "$dl"/x/boot/config-* || die "$pkg is built without CONFIG_MEM_SOFT_DIRTY"
    cp "$vmlinuz" "$kernel.tmp" && mv "$kernel.tmp" "$kernel"
    echo "$pkg" > "$cache/vmlinuz.pkg"
    rm -rf "$dl"
fi
log "kernel: $(cat "$cache/vmlinuz.pkg" 2>/dev/null || echo "$kernel")"

# ---------------------------------------------------------------- artifacts
if [ ! -x "$bin_dir/ckpt" ] || [ ! -f "$bin_dir/libckpt_preload.so" ] || [ ! -x "$bin_dir/ckpt-restorer" ]; then
    [ -z "${CKPT_VM_BIN_DIR:-}" ] || die "no ckpt, libckpt_preload.so, ckpt-restorer in CKPT_VM_BIN_DIR=$bin_dir"
    log "building the release binaries into $target"
    (cd "$root" && CARGO_TARGET_DIR=$target cargo build --release --workspace)
fi
programs=${CKPT_VM_PROGRAMS:-}
if [ -z "$programs" ]; then
    programs=$(ls -dt "$target"/release/build/ckpt-tests-*/out/bin 2>/dev/null | while read -r d; do
        [ -x "$d/counter_heap" ] && { echo "$d"; break; }; done || true)
    if [ -z "$programs" ]; then
        log "building the test programs into $target"
        (cd "$root" && CARGO_TARGET_DIR=$target cargo build --release -p ckpt-tests)
        programs=$(ls -dt "$target"/release/build/ckpt-tests-*/out/bin | head -n 1)
    fi
fi
[ -x "$programs/counter_heap" ] || die "no counter_heap in $programs"
log "binaries: $bin_dir; program: $programs/counter_heap"

# ---------------------------------------------------------------- initramfs
mkdir -p "$work"
ird=$work/initramfs
rm -rf "$ird"
mkdir -p "$ird"/{bin,dev,proc,sys,tmp,opt/ckpt}
cp "$busybox" "$ird/bin/busybox"
for a in $("$busybox" --list); do
    [ -e "$ird/bin/$a" ] || ln -s busybox "$ird/bin/$a"
done
mknod -m 600 "$ird/dev/console" c 5 1 2>/dev/null || true
mknod -m 666 "$ird/dev/null" c 1 3 2>/dev/null || true
# Debug info makes ckpt ~50 MB; the guest needs none of it.
strip_copy() {
    objcopy --strip-debug "$1" "$2" 2>/dev/null || cp "$1" "$2"
    chmod --reference="$1" "$2"
}
strip_copy "$bin_dir/ckpt" "$ird/opt/ckpt/ckpt"
strip_copy "$bin_dir/libckpt_preload.so" "$ird/opt/ckpt/libckpt_preload.so"
cp "$bin_dir/ckpt-restorer" "$ird/opt/ckpt/ckpt-restorer"
cp "$programs/counter_heap" "$ird/opt/ckpt/counter_heap"
# Shared libraries at the paths ldd names (the loader at its own path).
for elf in "$bin_dir/ckpt" "$bin_dir/libckpt_preload.so" "$programs/counter_heap"; do
    { ldd "$elf" 2>/dev/null || true; } | grep -o '/[^ ]*' | while read -r lib; do
        [ -e "$ird$lib" ] && continue
        mkdir -p "$ird$(dirname "$lib")"
        cp -L "$lib" "$ird$lib"
    done
done
cp "$here/init" "$ird/init"
cp "$here/guest-softdirty.sh" "$ird/guest-softdirty.sh"
chmod 755 "$ird/init" "$ird/guest-softdirty.sh"
(cd "$ird" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet) > "$work/initramfs.cpio"
rm -rf "$ird"
log "initramfs: $(( $(stat -c %s "$work/initramfs.cpio") >> 20 )) MiB"

# ---------------------------------------------------------------- boot
console=$work/console.log
rm -f "$console"
log "booting ($kernel, -smp $smp, timeout ${timeout_s}s); console: $console"
t_boot=$(date +%s)
set +e
timeout -k 10 "$timeout_s" qemu-system-x86_64 \
    -accel tcg -cpu max -smp "$smp" -m 512 \
    -display none -monitor none -serial stdio -nic none -no-reboot \
    -kernel "$kernel" -initrd "$work/initramfs.cpio" \
    -append "console=ttyS0 quiet loglevel=3 panic=-1 rdinit=/init mitigations=off" \
    </dev/null >"$console" 2>&1
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
log "VM ran ${t_vm}s (qemu exit $qrc); total $(( $(date +%s) - t_start ))s"
echo "$verdict"
if [ "$verdict" = "CKPT-VM-VERDICT: PASS" ]; then
    exit 0
fi
case "$verdict" in
    *'FAIL '*) grep -q -- '---- ' "$console" && sed -n '/^CKPT-VM: .*FAILED/,$p' "$console" >&2 ;;
esac
exit 1
