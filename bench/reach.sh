#!/usr/bin/env bash
# Reaching peers behind NATs (issue 6): two nodes, each behind a home router that
# masquerades (nftables), a STUN server and a rendezvous in a "public" namespace between
# them. Run twice: with two port-keeping NATs (the nodes punch a hole and talk directly)
# and with one port-changing NAT (they talk through the rendezvous's relay).
#
# Printed for each: the time from starting both daemons to the first file (present on a
# before the start) being on b, and the throughput of one SIZE_MIB file of random data
# written on a afterwards; then relay vs direct as ratios.
#
# Usage: sudo bench/reach.sh            (SIZE_MIB=64 by default)
# Needs root, iproute2, nftables and python3.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
SIZE_MIB=${SIZE_MIB:-64}
cargo build --release --quiet
BIN=$PWD/target/release/filesync

WORK=$(mktemp -d /tmp/filesync-bench-reach.XXXXXX)
TAG=$$
PIDS=()
NAMESPACES=()
# What one run made: its daemons, mounts and namespaces.
cleanup_run() {
    for side in a b; do
        umount "$WORK/$side/mnt" 2>/dev/null || umount -l "$WORK/$side/mnt" 2>/dev/null || true
    done
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    for n in "${NAMESPACES[@]}"; do ip netns del "$n" 2>/dev/null || true; done
    PIDS=()
    NAMESPACES=()
}
trap 'cleanup_run; rm -rf "$WORK"' EXIT

now() { date +%s.%N; }

# world NAT_A NAT_B: the namespaces, routers and servers.
world() {
    local run=$1 nat_a=$2 nat_b=$3
    P=rbp-$TAG-$run
    NAMESPACES+=("$P")
    ip netns add "$P"
    ip -n "$P" link set lo up
    ip -n "$P" addr add 198.18.0.1/32 dev lo
    ip -n "$P" addr add 198.18.0.3/32 dev lo
    ip netns exec "$P" sh -c 'echo 1 > /proc/sys/net/ipv4/ip_forward'
    local i=1 side nat
    for side in a b; do
        if [ "$side" = a ]; then nat=$nat_a; else nat=$nat_b; fi
        local r=rbr$side-$TAG-$run h=rbh$side-$TAG-$run
        NAMESPACES+=("$r" "$h")
        ip netns add "$r"
        ip netns add "$h"
        ip -n "$r" link set lo up
        ip -n "$h" link set lo up
        ip -n "$r" link add wan type veth peer name "up$i" netns "$P"
        ip -n "$r" link add lan type veth peer name eth0 netns "$h"
        ip -n "$P" addr add "198.19.$i.1/24" dev "up$i"
        ip -n "$r" addr add "198.19.$i.2/24" dev wan
        ip -n "$r" addr add "10.7$i.0.1/24" dev lan
        ip -n "$h" addr add "10.7$i.0.2/24" dev eth0
        ip -n "$P" link set "up$i" up
        ip -n "$r" link set wan up
        ip -n "$r" link set lan up
        ip -n "$h" link set eth0 up
        ip -n "$r" route add default via "198.19.$i.1"
        ip -n "$h" route add default via "10.7$i.0.1"
        ip netns exec "$r" sh -c 'echo 1 > /proc/sys/net/ipv4/ip_forward'
        ip netns exec "$r" nft add table ip nat
        ip netns exec "$r" nft 'add chain ip nat post { type nat hook postrouting priority srcnat; }'
        ip netns exec "$r" nft "add rule ip nat post oifname \"wan\" $nat"
        ip netns exec "$r" nft add table ip filter
        ip netns exec "$r" nft 'add chain ip filter input { type filter hook input priority 0; policy accept; }'
        ip netns exec "$r" nft 'add rule ip filter input iifname "wan" ct state new drop'
        i=$((i + 1))
    done
    ip netns exec "$P" "$BIN" stun-server --listen 198.18.0.1:3478 --listen 198.18.0.3:3478 \
        --log warn >>"$WORK/stun-$run.log" 2>&1 &
    PIDS+=($!)
    ip netns exec "$P" "$BIN" rendezvous --listen 198.18.0.1:7879 --key "$WORK/rv.key" \
        --peer "$(id_of a)" --peer "$(id_of b)" --relay --log warn >>"$WORK/rv-$run.log" 2>&1 &
    PIDS+=($!)
    sleep 0.5
}

id_of() { "$BIN" id --key "$WORK/$1.key"; }
"$BIN" keygen --key "$WORK/rv.key" >/dev/null
for side in a b; do "$BIN" keygen --key "$WORK/$side.key" >/dev/null; done

mount_node() {
    local run=$1 side=$2 other=$3
    local opts="state_dir=$WORK/$side/state,telemetry=off,key=$WORK/$side.key,node_name=$side"
    opts+=",log=${BENCH_LOG:-warn},sync_interval=0,compression=off,peer=$(id_of "$other")"
    opts+=",rendezvous=$(id_of rv)@198.18.0.1:7879,stun=198.18.0.1:3478,stun=198.18.0.3:3478"
    nsenter --net=/run/netns/"rbh$side-$TAG-$run" -- "$BIN" mount "$WORK/$side/src" "$WORK/$side/mnt" \
        --foreground -o "$opts" >>"$WORK/$side-$run.log" 2>&1 &
    PIDS+=($!)
}

wait_for() {
    local what=$1 deadline=$(( $(date +%s) + 120 ))
    shift
    until "$@"; do
        [ "$(date +%s)" -lt "$deadline" ] || { echo "timed out waiting for $what"; exit 1; }
        sleep 0.01
    done
}

path_of() { "$BIN" status --json --state-dir "$WORK/$1/state" "$WORK/$1/mnt" 2>/dev/null |
    python3 -c 'import json,sys; p=json.load(sys.stdin)["mounts"][0]["peers"][0]; print(p["path"] if p["connected"] else "-")'; }

same_big_file() {
    [ -f "$WORK/b/src/big.bin" ] && [ "$(stat -c %s "$WORK/b/src/big.bin")" -eq $((SIZE_MIB * 1048576)) ] &&
        cmp -s "$WORK/a/src/big.bin" "$WORK/b/src/big.bin"
}

# run NAME NAT_A NAT_B: adds "NAME first_file_s throughput_MiB_s path" to $WORK/results
run() {
    local name=$1
    for side in a b; do
        rm -rf "${WORK:?}/$side"
        mkdir -p "$WORK/$side"/{src,mnt,state}
    done
    world "$name" "$2" "$3"
    echo "first file" >"$WORK/a/src/first.txt"
    local start
    start=$(now)
    mount_node "$name" a b
    mount_node "$name" b a
    wait_for "the first file on b" test -f "$WORK/b/src/first.txt"
    local first
    first=$(python3 -c "print($(now) - $start)")
    local path
    path=$(path_of a)
    head -c $((SIZE_MIB * 1048576)) /dev/urandom >"$WORK/big.src"
    start=$(now)
    cp "$WORK/big.src" "$WORK/a/mnt/big.bin"
    wait_for "the big file on b" same_big_file
    local took
    took=$(python3 -c "print($(now) - $start)")
    python3 -c "print('$name', '%.3f' % $first, '%.1f' % ($SIZE_MIB / $took), '$path')" >>"$WORK/results"
    cleanup_run
}

run direct masquerade masquerade
run relayed masquerade "masquerade fully-random"
python3 - "$WORK/results" "$SIZE_MIB" <<'PY'
import sys
rows = [line.split() for line in open(sys.argv[1])]
size = sys.argv[2]
for name, first, rate, path in rows:
    print(f"{name:8} path {path:13} first file after {float(first):6.3f} s   {size} MiB at {float(rate):7.1f} MiB/s")
(_, d_first, d_rate, _), (_, r_first, r_rate, _) = rows
print(f"relayed vs direct: first file {float(r_first) / float(d_first):.2f}x the time, "
      f"throughput {float(r_rate) / float(d_rate):.2f}x")
PY
