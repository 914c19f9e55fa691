#!/bin/busybox sh
# /init of the nested tier's L1 (see scripts/nested/build-l1.sh): a Debian
# cloud kernel under QEMU TCG with an emulated AMD SVM loads kvm-amd, then
# runs vmm on that hardware-style /dev/kvm. Every result is one line on
# the serial console:
#   colo-nested: <scenario> ok [detail]
#   colo-nested: <scenario> FAIL <reason>
# then `colo-nested: done` and a power-off. tests/tests/nested.rs reads
# them. Which scenarios run: `colo.scenarios=a,b,...` on L1's command line
# (default: all).
/bin/busybox --install -s /bin
export PATH=/bin:/colo
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
G=/colo/guest
W=/tmp/work
mkdir -p $W

say() { echo "colo-nested: $*"; }
ok() { say "$1 ok${2:+ $2}"; }
# fail SCENARIO REASON [LOG]: the reason, then the log's tail for diagnosis.
fail() {
    say "$1 FAIL $2"
    if [ -n "$3" ] && [ -f "$3" ]; then
        tail -n 25 "$3" | sed "s/^/colo-nested: | /"
    fi
}

# wait_for FILE TEXT SECONDS: polls a serial log for a marker line.
wait_for() {
    n=$(($3 * 5))
    while [ $n -gt 0 ]; do
        grep -q "$2" "$1" 2>/dev/null && return 0
        sleep 0.2
        n=$((n - 1))
    done
    return 1
}

# stop PID: ends a background vmm and reaps it.
stop() {
    kill -9 "$1" 2>/dev/null
    wait "$1" 2>/dev/null
}

want() {
    case ",$SCENARIOS," in *",$1,"* | ",all,") return 0 ;; esac
    return 1
}

SCENARIOS=all
for arg in $(cat /proc/cmdline); do
    case $arg in colo.scenarios=*) SCENARIOS=${arg#colo.scenarios=} ;; esac
done
say "L1 up: $(uname -r), $(grep -c ^processor /proc/cpuinfo) CPUs, $(grep -o -w -E 'svm|npt|xsave' /proc/cpuinfo | sort -u | tr '\n' ' ')"

# --- KVM -----------------------------------------------------------------
for m in irqbypass kvm kvm-amd tun; do
    insmod /lib/modules/$m.ko || say "insmod $m failed"
done
if [ -c /dev/kvm ]; then
    ok kvm "$(grep -o -w -m1 -E 'npt' /proc/cpuinfo || echo 'no npt: shadow paging')"
else
    fail kvm "no /dev/kvm after loading kvm-amd"
    say done
    poweroff -f
fi

# --- the test guest with 2 vCPUs ----------------------------------------
if want smp; then
    log=$W/smp.log
    vmm --kernel $G/test-guest --vcpus 2 --mem-mib 32 --serial $log >$W/smp.vmm 2>&1 &
    pid=$!
    if wait_for $log "colo-test-guest: ready" 60; then
        cpus=$(sed -n 's/.*colo-test-guest: cpus \([0-9]*\).*/\1/p' $log | head -n1)
        if [ "$cpus" = 2 ]; then ok smp "cpus=2"; else fail smp "guest counts ${cpus:-no} CPUs" $log; fi
    else
        fail smp "no ready marker in 60 s" $log
    fi
    stop $pid
fi

# --- the networked test guest: kv, pause, snapshot, kill, restore -------
# hash_of SOCK: the paused VM's state hash (JSON, its parts included).
hash_of() { vmmctl --api-sock "$1" state-hash; }
if want net; then
    tunctl -t tap0 >/dev/null && ip addr add 10.77.0.1/24 dev tap0 && ip link set tap0 up
    truncate -s 1M $W/disk.img
    sock=$W/api.sock
    log=$W/net.log
    net_args="--kernel $G/test-guest --mem-mib 32 --net tap=tap0 --disk $W/disk.img --track-dirty-pages --api-sock $sock"
    vmm $net_args --cmdline "ip=10.77.0.10/24" --serial $log >$W/net.vmm 2>&1 &
    pid=$!
    url=http://10.77.0.10/kv/nested
    if ! wait_for $log "colo-test-guest: ready" 60; then
        fail net "no ready marker in 60 s" $log
    elif ! wget -q -O /dev/null --post-data=hello-l2 $url; then
        fail net "kv: POST /kv/nested failed" $log
    elif [ "$(wget -q -O - $url)" != hello-l2 ]; then
        fail net "kv: GET /kv/nested did not return hello-l2" $log
    else
        ok net "kv"
        vmmctl --api-sock $sock pause >/dev/null
        h1=$(hash_of $sock)
        sleep 2
        h2=$(hash_of $sock)
        if [ -n "$h1" ] && [ "$h1" = "$h2" ]; then ok hash-paused; else
            fail hash-paused "the state hash of the paused VM changed"
            say "| before: $h1"
            say "| after:  $h2"
        fi
        vmmctl --api-sock $sock snapshot $W/snap >/dev/null && ok snapshot || fail snapshot "PUT /snapshot failed" $W/net.vmm
        vmmctl --api-sock $sock resume >/dev/null
        stop $pid
        rm -f $sock
        vmm $net_args --restore $W/snap --start-paused --serial $W/restored.log >$W/restored.vmm 2>&1 &
        pid=$!
        n=50
        while [ ! -S $sock ] && [ $n -gt 0 ] && kill -0 $pid 2>/dev/null; do sleep 0.2; n=$((n - 1)); done
        h3=$(hash_of $sock 2>&1)
        if [ -z "$h3" ] || ! kill -0 $pid 2>/dev/null; then
            fail restore "the restored vmm did not come up" $W/restored.vmm
        elif [ "$h3" = "$h1" ]; then
            ok restore "state hash equal"
        else
            fail restore "the restored VM hashes differently"
            say "| source:   $h1"
            say "| restored: $h3"
        fi
        vmmctl --api-sock $sock resume >/dev/null 2>&1
        got=$(timeout 20 wget -O - $url 2>$W/wget.err)
        rc=$?
        if [ "$got" = hello-l2 ]; then ok kv-after-restore; else
            fail kv-after-restore "GET /kv/nested: '$got' (wget exit $rc)" $W/wget.err
            { ping -c 2 -W 2 10.77.0.10; ip neigh; vmmctl --api-sock $sock status; tail -n 5 $W/restored.log; } 2>&1 | sed "s/^/colo-nested: | /"
        fi
    fi
    stop $pid
fi

# --- Linux to /init ------------------------------------------------------
# boot_linux LOG KERNEL VCPUS [CMDLINE EXTRA]: boots KERNEL with our
# initramfs, whose /init reports the CPUs it sees and resets the machine.
# Each boot takes 15-45 s here and prints all along; a console silent for
# 45 s, or 200 s in all, counts as hung and is ended. Sets `took` (s),
# `rc` (vmm's exit status) and `why` (empty, or why it was ended).
boot_linux() {
    start=$(cut -d' ' -f1 /proc/uptime)
    vmm --kernel $2 --initrd $G/initramfs.cpio.gz --vcpus $3 --mem-mib 256 \
        --cmdline "console=ttyS0 reboot=k panic=-1 $4" >$1 2>&1 &
    pid=$!
    why=""
    size=0
    still=0
    n=0
    while kill -0 $pid 2>/dev/null; do
        sleep 1
        n=$((n + 1))
        now=$(wc -c <$1)
        if [ "$now" = "$size" ]; then still=$((still + 1)); else still=0; size=$now; fi
        if [ $still -ge 45 ]; then why="console silent for 45 s"; break; fi
        if [ $n -ge 200 ]; then why="still running after 200 s"; break; fi
    done
    kill -9 $pid 2>/dev/null
    wait $pid
    rc=$?
    end=$(cut -d' ' -f1 /proc/uptime)
    took=$(echo "$end $start" | awk '{printf "%.0f", $1 - $2}')
}

# linux NAME KERNEL VCPUS [CMDLINE EXTRA]: one scenario. A boot that does
# not reach /init (hung or crashed) is tried again, up to 3 boots, and each
# failure is reported as a note: QEMU's TCG (7.2 and 10.0 alike) sometimes
# delivers an interrupt it has just injected into L2 a second time, inside
# that interrupt's handler with interrupts off (README, "Which KVMs it is
# tested on"), in about one boot in 15 to 35. A wrong CPU count is not
# retried.
linux() {
    log=$W/$1.log
    attempt=1
    while :; do
        boot_linux $log $2 $3 "$4"
        cpus=$(sed -n 's/.*colo-linux: .* cpus=\([0-9]*\).*/\1/p' $log | head -n1)
        if ! grep -q "colo-linux: init running" $log; then
            reason="no /init after ${took} s (${why:-vmm exit $rc})"
            if [ $attempt -lt 3 ]; then
                say "note $1: attempt $attempt FAIL $reason; booting it again"
                tail -n 8 $log | sed "s/^/colo-nested: note $1: | /"
                attempt=$((attempt + 1))
                continue
            fi
            fail $1 "$reason (attempt $attempt)" $log
        elif [ "$cpus" != "$3" ]; then
            fail $1 "/init sees ${cpus:-no} CPUs, not $3" $log
        else
            ok $1 "cpus=$cpus ${took}s$([ $attempt = 1 ] || echo " (attempt $attempt)")"
        fi
        break
    done
    # Kernel warnings (TCG artefacts such as an XSAVE size complaint) are
    # reported, not hidden.
    grep -i -m 3 -E "WARNING:|xsave.*(size|mismatch|inconsisten)|x2apic.*(stall|fail)" $log |
        sed "s/^/colo-nested: note $1: /"
}
want linux-vmlinux-1 && linux linux-vmlinux-1 $G/vmlinux 1
want linux-vmlinux-2 && linux linux-vmlinux-2 $G/vmlinux 2
want linux-bzimage-1 && linux linux-bzimage-1 $G/bzImage 1
want linux-bzimage-2 && linux linux-bzimage-2 $G/bzImage 2
want debian-2 && linux debian-2 $G/debian-vmlinuz 2

say done
poweroff -f
