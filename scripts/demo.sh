#!/usr/bin/env bash
# Demo of what colo-vmm does today: a test guest with a disk and a NIC in a
# "host" network namespace, served to a "client" namespace across a bridge;
# the client talks HTTP and TCP echo to it, stores a value on its disk, the
# VM is paused and resumed over the REST socket; then it is snapshotted,
# killed and restored while the client's TCP connection stays open; then
# it is cold-booted on the same disk and the value is still there. Last, a
# guest crash, reported with exit reason and RIP. Needs root (namespaces, taps) and /dev/kvm.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -c /dev/kvm ] || { echo "FATAL: /dev/kvm is missing" >&2; exit 1; }

scripts/install-deps.sh
resources/build.sh test-guest
cargo build --release --bins --locked
vmm=$PWD/target/release/vmm
ctl=$PWD/target/release/vmmctl

work=$(mktemp -d)
host=colo-demo-host-$$
client=colo-demo-client-$$
cleanup() {
    rc=$?
    set +e
    if [ "$rc" -ne 0 ] && [ -s "$work/vmm.log" ]; then
        echo "== demo failed (exit $rc); the end of vmm's log:" >&2
        tail -15 "$work/vmm.log" >&2
    fi
    [ -n "${pid:-}" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    ip netns del "$host" 2>/dev/null
    ip netns del "$client" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

echo "== network: namespaces $client (10.77.0.1) and $host (bridge + tap0), guest 10.77.0.10"
ip netns add "$host"
ip netns add "$client"
ip -n "$host" link set lo up
ip -n "$client" link set lo up
ip -n "$host" link add br0 type bridge
ip -n "$host" link set br0 up
ip -n "$host" tuntap add dev tap0 mode tap
ip -n "$host" link set tap0 master br0 up
ip -n "$host" link add veth0 type veth peer name eth0 netns "$client"
ip -n "$host" link set veth0 master br0 up
ip -n "$client" addr add 10.77.0.1/24 dev eth0
ip -n "$client" link set eth0 up

start_vm() {
    ip netns exec "$host" "$vmm" --kernel target/guest/test-guest \
        --disk "$work/disk.img" --net tap=tap0 --api-sock "$work/api.sock" \
        --cmdline "ip=10.77.0.10/24" > "$work/console.log" 2> "$work/vmm.log" &
    pid=$!
    for _ in $(seq 100); do
        grep -q "colo-test-guest: ready" "$work/console.log" 2>/dev/null && break
        sleep 0.1
    done
    grep "colo-test-guest: \(disk\|net up\|ready\)" "$work/console.log"
}
in_client() { ip netns exec "$client" "$@"; }
http() { in_client curl -s --max-time 5 "$@"; echo; }

truncate -s 8M "$work/disk.img"
echo
echo "== boot the guest with a disk and a NIC"
start_vm
echo "GET /count x3:"; http http://10.77.0.10/count; http http://10.77.0.10/count; http http://10.77.0.10/count
echo "POST /kv/greeting:"; http -X POST --data-binary "hello from the demo" http://10.77.0.10/kv/greeting
echo "TCP echo on port 7:"; in_client python3 -c "
import socket; s=socket.create_connection(('10.77.0.10',7),timeout=5); s.sendall(b'echo me'); print(s.recv(64).decode())"
echo
echo "== pause over the API: the counter stops answering"
"$ctl" --api-sock "$work/api.sock" pause
"$ctl" --api-sock "$work/api.sock" status
http --max-time 1 http://10.77.0.10/count || true
echo "(no answer while paused)"
"$ctl" --api-sock "$work/api.sock" resume
echo "after resume:"; http http://10.77.0.10/count
"$ctl" --api-sock "$work/api.sock" metrics | grep -E "virtio_requests|serial_tx"
echo "== snapshot: pause, write a full snapshot, kill the vmm, restore it"
in_client python3 -c "
import fcntl, socket, subprocess, sys, time
s = socket.create_connection(('10.77.0.10', 7), timeout=5)
s.sendall(b'before'); print('echo before the snapshot:', s.recv(64).decode())
ctl = ['$ctl', '--api-sock', '$work/api.sock']
subprocess.run(ctl + ['pause'], check=True)
subprocess.run(ctl + ['snapshot', '--type', 'full', '$work/vm.snap'], check=True)
print('snapshot written; killing the vmm'); sys.stdout.flush()
subprocess.run(['kill', '-9', '$pid'], check=True)
# The image stays locked until every thread of the killed vmm is gone:
# a restore before that is refused as 'in use by another VM'. Wait for
# the lock itself.
def locked(path):
    with open(path, 'rb') as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False
while locked('$work/disk.img'):
    time.sleep(0.01)
subprocess.run(['ip', 'netns', 'exec', '$host', 'sh', '-c',
    '$vmm --restore $work/vm.snap --disk $work/disk.img --net tap=tap0 --api-sock $work/api2.sock >> $work/console.log 2>> $work/vmm.log &'],
    check=True)
s.sendall(b'after'); print('same TCP connection after the restore:', s.recv(64).decode())
"
wait "$pid" 2>/dev/null || true
pid=$(pgrep -f "api-sock $work/api2.sock" | head -1)
"$ctl" --api-sock "$work/api2.sock" status
echo "GET /count continues:"; http http://10.77.0.10/count
"$ctl" --api-sock "$work/api2.sock" shutdown
wait "$pid" 2>/dev/null || while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
pid=

echo
echo "== restart from the disk alone (a cold boot): the stored value is still there"
echo "record on the host's disk file at byte 512:"
xxd -s 512 -l 64 "$work/disk.img"
rm -f "$work/console.log"
start_vm
echo "GET /kv/greeting:"; http http://10.77.0.10/kv/greeting
"$ctl" --api-sock "$work/api.sock" shutdown
wait "$pid"; pid=

echo
echo "== a guest that triple-faults"
set +e
"$vmm" --kernel target/guest/test-guest --cmdline "crash=triple_fault"
echo "vmm exit status: $?"
