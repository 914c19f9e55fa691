#!/usr/bin/env bash
# Installs the Debian packages the build and the tests need; skips the
# apt run entirely when everything is installed already.
set -euo pipefail

packages=(
    # the test guest: a second Rust with its standard library's source
    rustc-web cargo-web rust-web-src
    # Linux guest kernel and its initramfs
    linux-source-6.1 busybox-static flex bison bc libelf-dev libssl-dev cpio
    make gcc binutils xz-utils
    # test rig: namespaces, bridges, taps; the demo's client tools
    iproute2 curl python3
    # the nested tier (tests/tests/nested.rs): QEMU's TCG runs an L1 with
    # an emulated AMD SVM; its initramfs is cut with cpio (Debian's cloud
    # kernel is fetched with apt-get download, never installed)
    qemu-system-x86 binutils cpio
)

# cargo-fuzz for scripts/fuzz.sh (crates.io, through cargo).
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing: cargo-fuzz"
    cargo install --locked cargo-fuzz
fi

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
echo "installing: ${missing[*]}"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo=sudo
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
