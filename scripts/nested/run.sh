#!/usr/bin/env bash
# Boots the nested tier's L1 (scripts/nested/build-l1.sh) under QEMU's TCG
# with an emulated AMD CPU (SVM, and nested paging with EPYC), serial on
# stdout. The QEMU process replaces this script, so whoever started it can
# end it by its pid.
#
#   scripts/nested/run.sh KERNEL INITRD [CPU [SCENARIOS]]
#
# CPU: EPYC (default) or qemu64 (no XSAVE, no NPT). SCENARIOS: a comma
# list of l1-init.sh's scenarios, default all.
set -euo pipefail
kernel=${1:?usage: run.sh KERNEL INITRD [CPU [SCENARIOS]]}
initrd=${2:?usage: run.sh KERNEL INITRD [CPU [SCENARIOS]]}
cpu=${3:-EPYC}
scenarios=${4:-all}
exec qemu-system-x86_64 -accel tcg -cpu "$cpu" -smp 2 -m 4096 \
    -display none -monitor none -serial stdio -no-reboot \
    -kernel "$kernel" -initrd "$initrd" \
    -append "console=ttyS0 panic=-1 rdinit=/init mitigations=off colo.scenarios=$scenarios"
