#!/usr/bin/env bash
# Builds the no_std test guest (resources/test-guest) into $GUEST_OUT/test-guest.
#
# The guest is built with Debian's rustc-web for the soft-float target
# x86_64-unknown-none, compiling `core` itself (-Z build-std): the host
# toolchain's precompiled `core` contains SSE, which the KVM of our machines
# cannot run in guest kernel mode. The build fails if the binary holds any
# xmm/ymm/zmm instruction. Cargo's target dir is in the cache, so a second
# run is a no-op build and a copy.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
src="$(cd "$here/../test-guest" && pwd)"
: "${GUEST_OUT:?run through resources/build.sh}" "${COLO_CACHE:?run through resources/build.sh}"

for tool in /usr/bin/rustc /usr/bin/cargo; do
    [ -x "$tool" ] || { echo "test-guest: $tool missing: apt-get install rustc-web cargo-web rust-web-src" >&2; exit 1; }
done

target_dir="$COLO_CACHE/test-guest-target"
echo "test-guest: building ($(/usr/bin/rustc --version))"
env PATH="/usr/bin:$PATH" \
    RUSTC=/usr/bin/rustc \
    RUSTC_BOOTSTRAP=1 \
    RUSTFLAGS="-C linker=ld -C linker-flavor=ld -C link-arg=-T$src/linker.ld -C relocation-model=static" \
    /usr/bin/cargo build --quiet --release \
        --manifest-path "$src/Cargo.toml" \
        --target-dir "$target_dir" \
        --target x86_64-unknown-none \
        -Z build-std=core,alloc,compiler_builtins \
        -Z build-std-features=compiler-builtins-mem

binary="$target_dir/x86_64-unknown-none/release/test-guest"
sse=$(objdump -d --no-show-raw-insn "$binary" | grep -cE '%[xyz]mm[0-9]' || true)
if [ "$sse" -ne 0 ]; then
    echo "test-guest: FAILED: $sse SSE/AVX instructions in the binary; this KVM cannot run them:" >&2
    objdump -d --no-show-raw-insn "$binary" | grep -E '%[xyz]mm[0-9]' | head -5 >&2
    exit 1
fi
install -m 0644 "$binary" "$GUEST_OUT/test-guest"
echo "test-guest: $GUEST_OUT/test-guest ($(stat -c %s "$GUEST_OUT/test-guest") bytes, no SSE)"
