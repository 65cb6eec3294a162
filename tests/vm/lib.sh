# Shared by the VM tests' host scripts (run-softdirty.sh, run-machines.sh):
# host packages, Debian's stock kernel (and the few modules the guests
# need), ckpt's artifacts, the initramfs and the qemu command line.
# Sourced with bash after the caller set `me` (its name, for log lines).
#
# Environment (all optional):
#   CKPT_VM_TARGET     cargo target dir to take artifacts from
#                      (default $CARGO_TARGET_DIR, else <repo>/target)
#   CKPT_VM_BIN_DIR    dir with ckpt, libckpt_preload.so, ckpt-restorer
#                      (default $CKPT_VM_TARGET/release; built there if missing)
#   CKPT_VM_PROGRAMS   dir with the built test programs (counter_heap)
#                      (default: newest $CKPT_VM_TARGET/release/build/ckpt-tests-*/out/bin)
#   CKPT_VM_CACHE      kernel cache (default $CKPT_VM_TARGET/vm-cache)
#   CKPT_VM_KERNEL_PKG kernel package (default: what linux-image-amd64 depends on)
#   CKPT_VM_SMP        guest cpus (default 2)

vm_here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
vm_root=$(cd "$vm_here/../.." && pwd)
vm_target=${CKPT_VM_TARGET:-${CARGO_TARGET_DIR:-$vm_root/target}}
vm_bin_dir=${CKPT_VM_BIN_DIR:-$vm_target/release}
vm_cache=${CKPT_VM_CACHE:-$vm_target/vm-cache}
vm_smp=${CKPT_VM_SMP:-2}
vm_kernel=$vm_cache/vmlinuz
# Modules the guests may load (kernel/ paths in the package, in an order
# that loads), kept next to the kernel: the e1000 NIC driver for user
# networking; virtio-blk and minix for a disk that outlives a guest.
vm_modules="drivers/net/ethernet/intel/e1000/e1000.ko
    drivers/virtio/virtio_ring.ko drivers/virtio/virtio.ko
    drivers/virtio/virtio_pci_modern_dev.ko drivers/virtio/virtio_pci_legacy_dev.ko
    drivers/virtio/virtio_pci.ko drivers/block/virtio_blk.ko fs/minix/minix.ko"
vm_t_start=$(date +%s)
log() { echo "[$me +$(( $(date +%s) - vm_t_start ))s] $*" >&2; }
die() { log "$*"; echo "CKPT-VM-VERDICT: FAIL $*"; exit 1; }

# vm_host_setup: root, qemu, busybox-static, cpio.
vm_host_setup() {
    [ "$(id -u)" -eq 0 ] || die "must run as root (apt-get, mknod)"
    local need=()
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
}

# vm_kernel_fetch: $vm_kernel and $vm_cache/modules/*.ko from Debian's
# kernel package (downloaded once; again if the cache lacks a module).
vm_kernel_fetch() {
    mkdir -p "$vm_cache"
    if [ -n "${CKPT_VM_KERNEL_PKG:-}" ] && [ "$(cat "$vm_cache/vmlinuz.pkg" 2>/dev/null)" != "$CKPT_VM_KERNEL_PKG" ]; then
        rm -f "$vm_kernel"
    fi
    local m have=1
    for m in $vm_modules; do [ -s "$vm_cache/modules/$(basename "$m")" ] || have=0; done
    if [ ! -s "$vm_kernel" ] || [ $have = 0 ]; then
        local pkg=${CKPT_VM_KERNEL_PKG:-}
        if [ -z "$pkg" ]; then
            pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
            if [ -z "$pkg" ]; then
                apt-get update -qq
                pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
            fi
        fi
        [ -n "$pkg" ] || die "cannot tell which linux-image package to use (set CKPT_VM_KERNEL_PKG)"
        log "downloading $pkg"
        local dl
        dl=$(mktemp -d "$vm_cache/dl.XXXXXX")
        chmod 755 "$dl"
        (cd "$dl" && { apt-get download "$pkg" >/dev/null 2>&1 || { apt-get update -qq && apt-get download "$pkg" >/dev/null; }; })
        dpkg-deb -x "$dl"/*.deb "$dl/x"
        local vmlinuz
        vmlinuz=$(ls "$dl"/x/boot/vmlinuz-* | head -n 1)
        [ -s "$vmlinuz" ] || die "no /boot/vmlinuz-* in $pkg"
        grep -q '^CONFIG_MEM_SOFT_DIRTY=y' "$dl"/x/boot/config-* || die "$pkg is built without CONFIG_MEM_SOFT_DIRTY"
        mkdir -p "$vm_cache/modules"
        for m in $vm_modules; do
            local ko
            ko=$(ls "$dl"/x/lib/modules/*/kernel/"$m" 2>/dev/null | head -n 1)
            [ -s "$ko" ] || die "$pkg has no module kernel/$m"
            cp "$ko" "$vm_cache/modules/"
        done
        cp "$vmlinuz" "$vm_kernel.tmp" && mv "$vm_kernel.tmp" "$vm_kernel"
        echo "$pkg" > "$vm_cache/vmlinuz.pkg"
        rm -rf "$dl"
    fi
    log "kernel: $(cat "$vm_cache/vmlinuz.pkg" 2>/dev/null || echo "$vm_kernel")"
}

# vm_artifacts: sets programs (the test programs' dir); builds what lacks.
vm_artifacts() {
    if [ ! -x "$vm_bin_dir/ckpt" ] || [ ! -f "$vm_bin_dir/libckpt_preload.so" ] || [ ! -x "$vm_bin_dir/ckpt-restorer" ]; then
        [ -z "${CKPT_VM_BIN_DIR:-}" ] || die "no ckpt, libckpt_preload.so, ckpt-restorer in CKPT_VM_BIN_DIR=$vm_bin_dir"
        log "building the release binaries into $vm_target"
        (cd "$vm_root" && CARGO_TARGET_DIR=$vm_target cargo build --release --workspace)
    fi
    programs=${CKPT_VM_PROGRAMS:-}
    if [ -z "$programs" ]; then
        programs=$(ls -dt "$vm_target"/release/build/ckpt-tests-*/out/bin 2>/dev/null | while read -r d; do
            [ -x "$d/counter_heap" ] && { echo "$d"; break; }; done || true)
        if [ -z "$programs" ]; then
            log "building the test programs into $vm_target"
            (cd "$vm_root" && CARGO_TARGET_DIR=$vm_target cargo build --release -p ckpt-tests)
            programs=$(ls -dt "$vm_target"/release/build/ckpt-tests-*/out/bin | head -n 1)
        fi
    fi
    [ -x "$programs/counter_heap" ] || die "no counter_heap in $programs"
    log "binaries: $vm_bin_dir; program: $programs/counter_heap"
}

# vm_initramfs OUT GUEST_SCRIPT [MODULE...]: busybox, ckpt (+ agent,
# restorer, libraries), counter_heap, tests/vm/init, the guest script as
# /guest.sh and the named cached modules under /lib/modules (their names,
# in the order given, in /lib/modules/order: the order to load them in).
vm_initramfs() {
    local out=$1 guest=$2
    shift 2
    local ird=$out.d
    rm -rf "$ird"
    mkdir -p "$ird"/{bin,dev,proc,sys,tmp,opt/ckpt,lib/modules}
    cp "$busybox" "$ird/bin/busybox"
    local a
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
    strip_copy "$vm_bin_dir/ckpt" "$ird/opt/ckpt/ckpt"
    strip_copy "$vm_bin_dir/libckpt_preload.so" "$ird/opt/ckpt/libckpt_preload.so"
    cp "$vm_bin_dir/ckpt-restorer" "$ird/opt/ckpt/ckpt-restorer"
    cp "$programs/counter_heap" "$ird/opt/ckpt/counter_heap"
    # Shared libraries at the paths ldd names (the loader at its own path).
    local elf lib
    for elf in "$vm_bin_dir/ckpt" "$vm_bin_dir/libckpt_preload.so" "$programs/counter_heap"; do
        { ldd "$elf" 2>/dev/null || true; } | grep -o '/[^ ]*' | while read -r lib; do
            [ -e "$ird$lib" ] && continue
            mkdir -p "$ird$(dirname "$lib")"
            cp -L "$lib" "$ird$lib"
        done
    done
    for a in "$@"; do
        cp "$vm_cache/modules/$a" "$ird/lib/modules/$a" || die "module $a is not in $vm_cache/modules"
        echo "$a" >> "$ird/lib/modules/order"
    done
    cp "$vm_here/init" "$ird/init"
    cp "$guest" "$ird/guest.sh"
    chmod 755 "$ird/init" "$ird/guest.sh"
    (cd "$ird" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet) > "$out"
    rm -rf "$ird"
    log "initramfs: $(( $(stat -c %s "$out") >> 20 )) MiB"
}

# vm_qemu_argv INITRAMFS APPEND: sets qemu_argv to the qemu command line of
# a guest that writes its console to stdout and has no network (callers
# append their own -nic ...).
vm_qemu_argv() {
    qemu_argv=(qemu-system-x86_64
        -accel tcg -cpu max -smp "$vm_smp" -m 512
        -display none -monitor none -serial stdio -no-reboot
        -kernel "$vm_kernel" -initrd "$1"
        -append "console=ttyS0 quiet loglevel=3 panic=-1 rdinit=/init mitigations=off $2")
}
