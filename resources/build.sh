#!/usr/bin/env bash
# Build every guest artifact into target/guest/:
#   test-guest          our no_std test kernel (resources/test-guest)
#   vmlinux             Linux 6.1 from Debian's linux-source-6.1, microVM config
#   initramfs.cpio.gz   busybox-static initramfs for that kernel
#
# Idempotent: expensive outputs are cached under ${COLO_CACHE:-~/.cache/colo-vmm}
# keyed by a hash of their inputs, so a second run only copies files.
#
# Usage: resources/build.sh [test-guest|linux|all]   (default: all)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
export COLO_CACHE="${COLO_CACHE:-$HOME/.cache/colo-vmm}"
export GUEST_OUT="$repo/target/guest"
mkdir -p "$COLO_CACHE" "$GUEST_OUT"

what="${1:-all}"
case "$what" in
    test-guest) "$here/scripts/test-guest.sh" ;;
    linux) "$here/scripts/linux.sh" ;;
    all)
        "$here/scripts/test-guest.sh"
        "$here/scripts/linux.sh"
        ;;
    *)
        echo "usage: $0 [test-guest|linux|all]" >&2
        exit 2
        ;;
esac
