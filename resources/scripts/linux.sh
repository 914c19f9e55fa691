#!/usr/bin/env bash
# Builds Linux 6.1 from Debian's linux-source-6.1 with our microVM config,
# and a busybox-static initramfs, into $GUEST_OUT/{vmlinux,bzImage,initramfs.cpio.gz}.
#
# Cached under $COLO_CACHE/linux-<hash>, the hash covering the source
# package version, the config fragment, the patches and this script: a
# second run copies files.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
inputs="$(cd "$here/../linux" && pwd)"
: "${GUEST_OUT:?run through resources/build.sh}" "${COLO_CACHE:?run through resources/build.sh}"

tarball=/usr/src/linux-source-6.1.tar.xz
[ -f "$tarball" ] || { echo "linux: $tarball missing: apt-get install linux-source-6.1" >&2; exit 1; }
[ -x /bin/busybox ] || { echo "linux: /bin/busybox missing: apt-get install busybox-static" >&2; exit 1; }

source_version=$(dpkg-query -W -f='${Version}' linux-source-6.1)
key=$( { echo "$source_version"; cat "$inputs/microvm.config" "$inputs"/*.patch "$here/linux.sh"; } | sha256sum | cut -c1-16)
build="$COLO_CACHE/linux-$key"

if [ ! -f "$build/vmlinux" ]; then
    echo "linux: building $source_version in $build (takes a while on 2 cores)"
    rm -rf "$build.tmp"
    mkdir -p "$build.tmp"
    tar -xf "$tarball" -C "$build.tmp" --strip-components=1
    cd "$build.tmp"
    for p in "$inputs"/*.patch; do
        patch -p1 --quiet < "$p"
    done
    make -s tinyconfig
    scripts/kconfig/merge_config.sh -m -O . .config "$inputs/microvm.config" > /dev/null
    make -s olddefconfig
    # The options that matter must have survived olddefconfig.
    missing=0
    while read -r line; do
        case "$line" in
            CONFIG_*=*) grep -qx "$line" .config || { echo "linux: config lost $line" >&2; missing=1; } ;;
            "# CONFIG_"*" is not set")
                opt=${line#\# }; opt=${opt%% *}
                if grep -q "^$opt=" .config; then echo "linux: config has $opt set" >&2; missing=1; fi ;;
        esac
    done < "$inputs/microvm.config"
    [ "$missing" -eq 0 ] || { echo "linux: config check failed" >&2; exit 1; }
    nice -n 10 make -s -j"$(nproc)" vmlinux bzImage
    mkdir -p "$build.out"
    cp vmlinux arch/x86/boot/bzImage "$build.out/"
    cp .config "$build.out/config"
    cd /
    rm -rf "$build.tmp" "$build"
    mv "$build.out" "$build"
fi

# The initramfs: busybox and our /init, nothing from the host's /dev.
busybox_version=$(dpkg-query -W -f='${Version}' busybox-static)
ikey=$( { echo "$busybox_version"; cat "$inputs/init" "$here/linux.sh"; } | sha256sum | cut -c1-16)
initramfs="$COLO_CACHE/initramfs-$ikey.cpio.gz"
if [ ! -f "$initramfs" ]; then
    root=$(mktemp -d)
    trap 'rm -rf "$root"' EXIT
    mkdir -p "$root"/{bin,dev,proc,sys,tmp}
    cp /bin/busybox "$root/bin/busybox"
    install -m 0755 "$inputs/init" "$root/init"
    (cd "$root" && find . | LC_ALL=C sort | cpio --quiet -o -H newc --owner=0:0 --reproducible | gzip -n -9) > "$initramfs.tmp"
    mv "$initramfs.tmp" "$initramfs"
fi

install -m 0644 "$build/vmlinux" "$GUEST_OUT/vmlinux"
install -m 0644 "$build/bzImage" "$GUEST_OUT/bzImage"
install -m 0644 "$initramfs" "$GUEST_OUT/initramfs.cpio.gz"
echo "linux: $GUEST_OUT/vmlinux, bzImage, initramfs.cpio.gz ($source_version)"
