#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/ (libFuzzer with AddressSanitizer).
#
#   scripts/fuzz.sh                  every target for 60 s
#   scripts/fuzz.sh 600 restore      one target for 10 minutes
#
# Needs cargo-fuzz (scripts/install-deps.sh installs it). The stable
# toolchain runs it with RUSTC_BOOTSTRAP=1 (sanitizer flags are unstable).
# Corpora grow in fuzz/corpus/<target>/ (not committed); a crash lands in
# fuzz/artifacts/<target>/: fix it, then copy the input to
# fuzz/regressions/<target>/, which `cargo test -p devices` (net-proxy for
# packet and rewrite) replays; every run here replays them too (compare's
# only here).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

seconds="${1:-60}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(virtio_blk mmio restore snapshot packet rewrite compare)

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: cargo-fuzz missing: scripts/install-deps.sh (or cargo install cargo-fuzz)" >&2
    exit 1
fi
target_dir="${CARGO_TARGET_DIR:-$PWD/target}/fuzz"
cd fuzz
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
for t in "${targets[@]}"; do
    echo "fuzz: $t for ${seconds}s"
    mkdir -p "corpus/$t" "regressions/$t"
    if ! RUSTC_BOOTSTRAP=1 cargo fuzz run --target-dir "$target_dir" "$t" "corpus/$t" "regressions/$t" \
        -- -max_total_time="$seconds" >"$log" 2>&1; then
        tail -40 "$log" >&2
        echo "fuzz: $t FAILED; the input is in fuzz/artifacts/$t/" >&2
        exit 1
    fi
    grep -E '^Done [0-9]+ runs' "$log" || true
done
