#!/usr/bin/env bash
# The whole test suite, KVM tests included: what CI (.ci/run) and developers run.
#
#   scripts/test.sh            everything: deps, guest build, lint, tests, demo, fuzz
#   scripts/test.sh -- ARGS    extra arguments for `cargo test`
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ ! -c /dev/kvm ]; then
    echo "FATAL: /dev/kvm is missing. colo-vmm's tests boot real guests under KVM;" >&2
    echo "FATAL: they cannot run (and are not skipped) without it." >&2
    exit 1
fi

extra=()
if [ "${1:-}" = "--" ]; then
    shift
    extra=("$@")
fi

step() { printf '\n==> %s\n' "$*"; }

step "system packages"
scripts/install-deps.sh
step "guest artifacts (cached under ${COLO_CACHE:-~/.cache/colo-vmm})"
resources/build.sh
step "format"
cargo fmt --all -- --check
cargo fmt --manifest-path resources/test-guest/Cargo.toml -- --check
step "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
step "build"
cargo build --workspace --bins --locked
step "tests"
# The test guest's pure logic, on the host.
cargo test --manifest-path resources/test-guest/Cargo.toml --lib --locked
cargo test --workspace --locked "${extra[@]}"
step "demo (the README's first command: a pair, a client, SIGKILL, failover; fails if the client lost or doubled anything)"
scripts/demo.sh
step "fuzz (20 s per target; longer runs: scripts/fuzz.sh SECONDS)"
scripts/fuzz.sh 20
