#!/usr/bin/env bash
# Builds the nested tier's L1 guest: Debian's stock cloud kernel and an
# initramfs holding its kvm/kvm-amd/irqbypass/tun modules, busybox-static,
# our vmm and vmmctl (with their shared libraries), and the L2 guests (the
# test guest, our Linux as vmlinux and bzImage with its initramfs, and
# Debian's kernel itself as a stock L2 kernel). /init is l1-init.sh.
#
#   scripts/nested/build-l1.sh BIN_DIR GUEST_DIR
#
# BIN_DIR holds vmm and vmmctl (a cargo target profile dir), GUEST_DIR the
# guest artifacts (target/guest). The kernel package is fetched with
# `apt-get download` and unpacked with `dpkg -x` (nothing is installed on
# the host); everything is cached under ${COLO_CACHE:-~/.cache/colo-vmm}/
# nested. Prints `kernel=PATH` and `initrd=PATH`.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
bin_dir=${1:?usage: build-l1.sh BIN_DIR GUEST_DIR}
guest_dir=${2:?usage: build-l1.sh BIN_DIR GUEST_DIR}
cache=${COLO_CACHE:-$HOME/.cache/colo-vmm}/nested
mkdir -p "$cache"
tmpdirs=()
trap 'rm -rf "${tmpdirs[@]}"' EXIT

# --- Debian's cloud kernel: the package linux-image-cloud-amd64 points at.
pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
    awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
[ -n "$pkg" ] || { echo "build-l1: apt knows no linux-image-cloud-amd64 (apt-get update?)" >&2; exit 1; }
kdir=$cache/$pkg
if [ ! -d "$kdir/boot" ]; then
    tmp=$(mktemp -d "$cache/.dl.XXXXXX")
    tmpdirs+=("$tmp")
    (cd "$tmp" && apt-get download -q "$pkg" >&2)
    mkdir -p "$tmp/x"
    dpkg -x "$tmp"/"$pkg"_*.deb "$tmp/x"
    rm -rf "$kdir"
    mv "$tmp/x" "$kdir"
fi
kernel=$(ls "$kdir"/boot/vmlinuz-*)
moddir=$(ls -d "$kdir"/lib/modules/*)

# --- The initramfs, keyed by the hash of everything that goes in.
inputs=(
    "$here/l1-init.sh" /bin/busybox "$kernel"
    "$bin_dir/vmm" "$bin_dir/vmmctl"
    "$guest_dir/test-guest" "$guest_dir/vmlinux" "$guest_dir/bzImage"
    "$guest_dir/initramfs.cpio.gz"
)
for f in "${inputs[@]}"; do
    [ -f "$f" ] || { echo "build-l1: $f is missing" >&2; exit 1; }
done
key=$(sha256sum "${inputs[@]}" | sha256sum | cut -c1-16)
initrd=$cache/l1-$key.cpio
if [ ! -f "$initrd" ]; then
    root=$(mktemp -d "$cache/.root.XXXXXX")
    tmpdirs+=("$root")
    mkdir -p "$root"/{bin,colo/guest,lib/modules,proc,sys,dev,tmp}
    install -m 755 "$here/l1-init.sh" "$root/init"
    cp /bin/busybox "$root/bin/busybox"
    for m in irqbypass kvm kvm-amd tun; do
        cp "$(find "$moddir" -name "$m.ko")" "$root/lib/modules/"
    done
    for b in vmm vmmctl; do
        strip -o "$root/colo/$b" "$bin_dir/$b"
        # Shared libraries (and the loader) at the paths ldd names.
        for lib in $(ldd "$bin_dir/$b" | grep -o '/[^ ]*'); do
            mkdir -p "$root$(dirname "$lib")"
            cp -L "$lib" "$root$lib"
        done
    done
    for g in test-guest vmlinux bzImage initramfs.cpio.gz; do
        cp "$guest_dir/$g" "$root/colo/guest/"
    done
    cp "$kernel" "$root/colo/guest/debian-vmlinuz"
    # Uncompressed: L1 unpacks it in emulated code.
    (cd "$root" && find . | cpio -o -H newc --quiet) >"$initrd.tmp"
    mv "$initrd.tmp" "$initrd"
    # Keep only the newest few.
    ls -t "$cache"/l1-*.cpio | tail -n +4 | xargs -r rm -f
fi
echo "kernel=$kernel"
echo "initrd=$initrd"
