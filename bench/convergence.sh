#!/usr/bin/env bash
# Convergence benchmark (issue 5): three filesync nodes, each in a network namespace, every
# two joined by a veth pair of their own. All links are cut, each node writes its share of
# FILES new files of FILE_KIB KiB of random data through its mount, then the links are
# healed. Printed: the time from the heal until all three folders hold every file, and
# the bytes and packets that crossed the links in that time, against the minimum (each
# file's bytes sent once to each node that lacks it, with no overhead at all).
#
# Usage: sudo bench/convergence.sh            (FILES=1000 FILE_KIB=4 by default)
# Needs root, iproute2 and python3.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
FILES=${FILES:-1000}
FILE_KIB=${FILE_KIB:-4}
NODES=3
cargo build --release --quiet
BIN=$PWD/target/release/filesync

WORK=$(mktemp -d /tmp/filesync-bench-conv.XXXXXX)
TAG=$$
PIDS=()
ns() { echo "fsconv$1-$TAG"; }
cleanup() {
    [ -n "${KEEP_LOGS:-}" ] && mkdir -p "$KEEP_LOGS" && cp "$WORK"/*.log "$KEEP_LOGS"/ 2>/dev/null
    for n in $(seq 0 $((NODES - 1))); do
        umount "$WORK/$n/mnt" 2>/dev/null || umount -l "$WORK/$n/mnt" 2>/dev/null || true
    done
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    for n in $(seq 0 $((NODES - 1))); do ip netns del "$(ns "$n")" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

# The link between nodes i < j is 198.18.(100 + 10 i + j).0/24: i is .1, j is .2; in each
# namespace the device towards node k is called to<k>.
addr() { local i=$1 j=$2 lo hi host; lo=$((i < j ? i : j)); hi=$((i < j ? j : i)); host=$((i == lo ? 1 : 2)); echo "198.18.$((100 + 10 * lo + hi)).$host"; }
for n in $(seq 0 $((NODES - 1))); do
    ip netns add "$(ns "$n")"
    ip -n "$(ns "$n")" link set lo up
done
LINKS=()
for i in $(seq 0 $((NODES - 1))); do
    for j in $(seq $((i + 1)) $((NODES - 1))); do
        ip -n "$(ns "$i")" link add "to$j" type veth peer name "to$i" netns "$(ns "$j")"
        ip -n "$(ns "$i")" addr add "$(addr "$i" "$j")/24" dev "to$j"
        ip -n "$(ns "$j")" addr add "$(addr "$j" "$i")/24" dev "to$i"
        ip -n "$(ns "$i")" link set "to$j" up
        ip -n "$(ns "$j")" link set "to$i" up
        LINKS+=("$i-$j")
    done
done
set_links() {
    for link in "${LINKS[@]}"; do
        ip -n "$(ns "${link%-*}")" link set "to${link#*-}" "$1"
        ip -n "$(ns "${link#*-}")" link set "to${link%-*}" "$1"
    done
}
# Bytes and packets sent on every link end, summed.
traffic() {
    for n in $(seq 0 $((NODES - 1))); do ip -n "$(ns "$n")" -s -j link show; done | python3 -c '
import json, sys
total_bytes = total_packets = 0
for line in sys.stdin:
    for dev in json.loads(line):
        if dev["ifname"].startswith("to"):
            total_bytes += dev["stats64"]["tx"]["bytes"]
            total_packets += dev["stats64"]["tx"]["packets"]
print(total_bytes, total_packets)'
}

for n in $(seq 0 $((NODES - 1))); do
    mkdir -p "$WORK/$n"/{src,mnt,state}
    "$BIN" keygen --key "$WORK/$n/key" >/dev/null
done
id_of() { "$BIN" id --key "$WORK/$1/key"; }
for n in $(seq $((NODES - 1)) -1 0); do
    opts="state_dir=$WORK/$n/state,telemetry=off,key=$WORK/$n/key,node_name=n$n,log=${BENCH_LOG:-warn},listen=0.0.0.0:7878,sync_interval=0"
    for m in $(seq 0 $((NODES - 1))); do
        [ "$m" = "$n" ] && continue
        if [ "$m" -gt "$n" ]; then opts+=",peer=$(id_of "$m")@$(addr "$m" "$n"):7878"; else opts+=",peer=$(id_of "$m")"; fi
    done
    nsenter --net=/run/netns/"$(ns "$n")" -- "$BIN" mount "$WORK/$n/src" "$WORK/$n/mnt" --foreground -o "$opts" >>"$WORK/$n.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 200); do
        grep -q " $WORK/$n/mnt fuse.filesync" /proc/self/mounts && break
        sleep 0.05
    done
done
sleep 2

set_links down
python3 - "$WORK" "$NODES" "$FILES" "$FILE_KIB" <<'PY'
import os, sys
work, nodes, files, kib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
for k in range(files):
    node = k % nodes
    folder = os.path.join(work, str(node), "mnt", "from-n%d" % node, "d%02d" % (k % 20))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "f%05d" % k), "wb") as f:
        f.write(os.urandom(kib * 1024))
PY
# Every node has indexed its own files before the links come back.
sleep 3
read -r bytes_before packets_before < <(traffic)
start=$(date +%s.%N)
set_links up
count() { find "$WORK/$1/src" -type f -name 'f*' | wc -l; }
deadline=$(( $(date +%s) + 600 ))
while :; do
    done_nodes=0
    for n in $(seq 0 $((NODES - 1))); do [ "$(count "$n")" -ge "$FILES" ] && done_nodes=$((done_nodes + 1)); done
    [ "$done_nodes" -eq "$NODES" ] && break
    [ "$(date +%s)" -lt "$deadline" ] || { echo "did not converge in 600 s"; for n in $(seq 0 $((NODES - 1))); do echo "n$n: $(count "$n") files"; done; exit 1; }
    sleep 0.05
done
end=$(date +%s.%N)
read -r bytes_after packets_after < <(traffic)
sums() { (cd "$WORK/$1/src" && find . -type f -name 'f*' -print0 | sort -z | xargs -0 md5sum | md5sum); }
first=$(sums 0)
for n in $(seq 1 $((NODES - 1))); do
    [ "$(sums "$n")" = "$first" ] || { echo "node $n's files differ from node 0's"; exit 1; }
done
python3 - "$start" "$end" "$bytes_before" "$bytes_after" "$packets_before" "$packets_after" "$FILES" "$FILE_KIB" "$NODES" <<'PY'
import sys
start, end = float(sys.argv[1]), float(sys.argv[2])
b0, b1, p0, p1 = (int(x) for x in sys.argv[3:7])
files, kib, nodes = int(sys.argv[7]), int(sys.argv[8]), int(sys.argv[9])
minimum = files * kib * 1024 * (nodes - 1)
sent, packets = b1 - b0, p1 - p0
print(f"convergence after heal: {end - start:.2f} s for {files} files of {kib} KiB on {nodes} nodes")
print(f"bytes on the links: {sent:,} vs minimum {minimum:,} = {sent / minimum:.2f}x")
print(f"packets on the links: {packets:,} ({packets / (files * (nodes - 1)):.1f} per file delivery)")
PY
