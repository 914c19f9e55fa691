#!/usr/bin/env bash
# Demo of what colo-vmm does today: boots our test guest under KVM with one
# and with two vCPUs, runs its memory workload for a moment, and powers it
# off; then shows a guest crash reported with exit reason and RIP.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -c /dev/kvm ] || { echo "FATAL: /dev/kvm is missing" >&2; exit 1; }

scripts/install-deps.sh
resources/build.sh test-guest
cargo build --release --bins --locked
vmm=target/release/vmm

echo
echo "== test guest, 1 vCPU, memory workload for 3 s"
$vmm --kernel target/guest/test-guest --mem-mib 128 \
    --cmdline "dirty_mib_per_s=32 workload_mib=16 halt_after_ms=3000"
echo "vmm exit status: $?"

echo
echo "== test guest, 2 vCPUs"
$vmm --kernel target/guest/test-guest --vcpus 2 --cmdline "halt_after_ms=100"
echo "vmm exit status: $?"

echo
echo "== a guest that triple-faults"
set +e
$vmm --kernel target/guest/test-guest --cmdline "crash=triple_fault"
echo "vmm exit status: $?"
