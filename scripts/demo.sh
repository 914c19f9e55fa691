#!/usr/bin/env bash
# Demo of colo-vmm's main job: a guest that survives the death of its host.
#
# Three namespaces stand for three machines on one Ethernet segment (a
# bridge in a fourth, "switch"): host-a runs `vmm --role primary` with the
# test guest (10.77.0.10), host-b runs `vmm --role secondary`, which starts
# empty and gets everything from the primary (disk, memory, device state),
# and a client talks to the guest: one TCP echo connection with a numbered,
# checked message every 10 ms, plus HTTP `GET /count` and `POST /kv/KEY`.
# Replication runs in COLO mode: the secondary runs its own copy of the
# guest on the client frames the primary mirrors to it, and a reply goes
# out as soon as both copies sent the same bytes (a difference takes a
# checkpoint). COLO_DEMO_MODE=remus shows Remus mode instead: a checkpoint
# every 20 ms, the guest's output held until the secondary has the
# checkpoint that covers it. Then the primary is SIGKILLed (a host crash), the secondary is
# told to take over, and the client's same TCP connection carries on; the
# longest silence it saw is the failover time. Needs root (namespaces,
# taps) and /dev/kvm.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mode=${COLO_DEMO_MODE:-colo}
case $mode in
    colo) interval=() ;;
    remus) interval=(--checkpoint-ms 20) ;;
    *) echo "COLO_DEMO_MODE is colo or remus, not $mode" >&2; exit 2 ;;
esac
[ -c /dev/kvm ] || { echo "FATAL: /dev/kvm is missing" >&2; exit 1; }

scripts/install-deps.sh
resources/build.sh test-guest
cargo build --release --bins --locked
vmm=$PWD/target/release/vmm
ctl=$PWD/target/release/vmmctl

work=$(mktemp -d)
switch=colo-demo-switch-$$
client=colo-demo-client-$$
host_a=colo-demo-host-a-$$
host_b=colo-demo-host-b-$$
cleanup() {
    rc=$?
    set +e
    if [ "$rc" -ne 0 ]; then
        for side in a b; do
            [ -s "$work/$side.log" ] || continue
            echo "== demo failed (exit $rc); the end of host-$side's vmm log:" >&2
            tail -15 "$work/$side.log" >&2
        done
    fi
    for p in ${pid_a:-} ${pid_b:-}; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null; done
    for ns in "$client" "$host_a" "$host_b" "$switch"; do ip netns del "$ns" 2>/dev/null; done
    rm -rf "$work"
}
trap cleanup EXIT

echo "== network: client 10.77.0.1, host-a 10.77.0.2, host-b 10.77.0.3, one switch; the guest will be 10.77.0.10"
for ns in "$switch" "$client" "$host_a" "$host_b"; do
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1
done
ip -n "$switch" link add br0 type bridge stp_state 0 forward_delay 0
ip -n "$switch" link set br0 up
ip -n "$switch" link add client type veth peer name eth0 netns "$client"
ip -n "$switch" link set client master br0 up
ip -n "$client" addr add 10.77.0.1/24 dev eth0
ip -n "$client" link set eth0 up
# Each host: a bridge with its address, an uplink to the switch, a tap for its vmm.
for side in a b; do
    ns=colo-demo-host-$side-$$
    ip=10.77.0.$([ "$side" = a ] && echo 2 || echo 3)
    ip -n "$ns" link add br0 type bridge stp_state 0 forward_delay 0
    ip -n "$ns" addr add "$ip/24" dev br0
    ip -n "$ns" link set br0 up
    ip -n "$switch" link add "host-$side" type veth peer name uplink netns "$ns"
    ip -n "$switch" link set "host-$side" master br0 up
    ip -n "$ns" link set uplink master br0 up
    ip -n "$ns" tuntap add dev "tap$side" mode tap
    ip -n "$ns" link set "tap$side" master br0 up
done

# The colo object of GET /status, one field.
colo() {
    curl -s --max-time 2 --unix-socket "$1" http://localhost/status |
        python3 -c "import json, sys; print(json.load(sys.stdin)['colo']['$2'])" 2>/dev/null || true
}
wait_state() { # socket state
    for _ in $(seq 600); do
        [ "$(colo "$1" state)" = "$2" ] && return 0
        sleep 0.1
    done
    echo "FATAL: $1 never reached $2 (now: $(colo "$1" state))" >&2
    exit 1
}

# The primary's disk is blank, the secondary's is garbage: the initial sync
# makes them equal without a manual copy.
truncate -s 16M "$work/a.img"
head -c 16M /dev/urandom > "$work/b.img"

echo
echo "== host-b: the secondary starts empty and listens on 10.77.0.3:7070"
ip netns exec "$host_b" "$vmm" --role secondary --listen 10.77.0.3:7070 \
    --mem-mib 128 --vcpus 1 --disk "$work/b.img" --net tap=tapb \
    --api-sock "$work/b.sock" --mode "$mode" > "$work/b-console.log" 2> "$work/b.log" &
pid_b=$!
wait_state "$work/b.sock" waiting
echo "secondary: $(colo "$work/b.sock" state)"

echo
echo "== host-a: the primary boots the guest (dirtying 16 MiB/s of its memory) and syncs it to host-b"
ip netns exec "$host_a" "$vmm" --role primary --peer 10.77.0.3:7070 \
    --kernel target/guest/test-guest --cmdline "ip=10.77.0.10/24 dirty_mib_per_s=16" \
    --mem-mib 128 --vcpus 1 --disk "$work/a.img" --net tap=tapa \
    --api-sock "$work/a.sock" --mode "$mode" "${interval[@]}" \
    > "$work/a-console.log" 2> "$work/a.log" &
pid_a=$!
start=$(date +%s%N)
wait_state "$work/a.sock" protected
wait_state "$work/b.sock" protected
echo "protected after $(( ($(date +%s%N) - start) / 1000000 )) ms (disks compared by block hashes, memory copied live)"
"$ctl" --api-sock "$work/a.sock" colo-status

echo
echo "== the client: one TCP echo connection (a message every 10 ms), GET /count, POST /kv"
echo "   then SIGKILL of the primary's vmm, and 'vmmctl failover' on the secondary"
ip netns exec "$client" python3 - "$pid_a" "$ctl" "$work/b.sock" <<'EOF'
import http.client, socket, struct, subprocess, sys, threading, time, zlib

pid_a, ctl, b_sock = sys.argv[1:4]
GUEST = "10.77.0.10"
LEN = 60

def message(i):
    body = struct.pack("<Q", i) + bytes((i * 7 + k) & 255 for k in range(48))
    return body + struct.pack("<I", zlib.crc32(body))

echo = socket.create_connection((GUEST, 7), timeout=30)
echo.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
echo.settimeout(0.2)  # the reader wakes to see whether it is done
sent, stop, replies, problems = [0], [False], [], []

def writer():
    t0 = time.monotonic()
    while not stop[0]:
        echo.sendall(message(sent[0]))
        sent[0] += 1
        time.sleep(max(0.0, t0 + sent[0] * 0.01 - time.monotonic()))

def reader():
    buf, last = b"", time.monotonic()
    while not (stop[0] and len(replies) >= sent[0]):
        try:
            data = echo.recv(4096)
        except TimeoutError:
            if time.monotonic() - last > 30:
                problems.append("no echo for 30 s")
                return
            continue
        last = time.monotonic()
        if not data:
            problems.append("echo connection closed")
            return
        buf += data
        while len(buf) >= LEN:
            got, buf = buf[:LEN], buf[LEN:]
            if got != message(len(replies)):
                problems.append(f"echo message {len(replies)} came back wrong")
                return
            replies.append(time.monotonic())

threads = [threading.Thread(target=f) for f in (writer, reader)]
for t in threads:
    t.start()

web = http.client.HTTPConnection(GUEST, 80, timeout=30)
web.connect()
web.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
counts, stored = [], {}
def traffic(seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        web.request("GET", "/count")
        counts.append(int(web.getresponse().read()))
        if counts[-1] <= max(counts[:-1], default=0):
            problems.append(f"/count went back to {counts[-1]}")
        key, value = f"demo-{len(counts)}", f"value {len(counts)} crc {zlib.crc32(bytes(len(counts)))}".encode()
        web.request("POST", f"/kv/{key}", body=value)
        reply = web.getresponse()
        reply.read()
        if reply.status == 201:
            stored[key] = value
        time.sleep(0.05)

traffic(2)
count_before = counts[-1]
print(f"client: {len(replies)} echo messages back, /count at {count_before}, {len(stored)} kv records stored")
killed = time.monotonic()
subprocess.run(["kill", "-9", pid_a], check=True)
print(f"== SIGKILL the primary (pid {pid_a}): host-a is gone")
subprocess.run([ctl, "--api-sock", b_sock, "failover"], check=True)
print(f"== 'vmmctl failover' on host-b, {1000 * (time.monotonic() - killed):.0f} ms after the kill: the secondary's guest carries on")
before = len(replies)
traffic(2)
stop[0] = True
for t in threads:
    t.join()
first_after = next((t for t in replies if t > killed), None)
gap = max(b - a for a, b in zip(replies, replies[1:]))
for key, value in stored.items():
    web.request("GET", f"/kv/{key}")
    if web.getresponse().read() != value:
        problems.append(f"kv {key} lost")
print(f"client: the same TCP connection carried on: {len(replies)} echo messages in all "
      f"({len(replies) - before} after the kill), each checked, none lost or duplicated")
print(f"client: /count went on from {count_before} to {counts[-1]}, above every value seen; "
      f"all {len(stored)} kv records read back identical")
if first_after is not None:
    print(f"failover time seen by the client: first echo {1000 * (first_after - killed):.0f} ms after the kill; "
          f"longest echo silence {1000 * gap:.0f} ms")
if problems:
    print("PROBLEMS:", *problems, sep="\n  ")
    sys.exit(1)
EOF

echo
echo "== host-b after the takeover"
"$ctl" --api-sock "$work/b.sock" colo-status
echo "the guest's console on host-b (its memory self-check keeps passing):"
grep "workload generation" "$work/b-console.log" | tail -2
"$ctl" --api-sock "$work/b.sock" shutdown
wait "$pid_b" || true
pid_b=
wait "$pid_a" 2>/dev/null || true
pid_a=
