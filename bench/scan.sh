#!/usr/bin/env bash
# bench/scan.sh — the reconcile scan and the index against native baselines.
# Prints figures and ratios; it is not a test (it exits 0 even when targets are
# missed, non-zero only if it could not run at all).
#
# Usage: bench/scan.sh [--files N] [--reps N] [--no-build]
#   --files N   files in the test tree (default 100000)
#   --reps N    timed repetitions; the report shows the median (default 3)
#   --no-build  do not run `cargo build --release --example scan_bench`
# Environment:
#   FILESYNC_BENCH_BASE  parent of the work directory (default /var/tmp)
#
# What it measures, on one tree of small files (10×10×10 directories):
#   1. a scan that finds nothing changed, against
#      `find ROOT -printf '%s %T@\n'` (the same stat of every entry, no index);
#      both warm, interleaved, median of --reps; target: scan ≤ 1.5 × find;
#   2. Index::open plus one lookup with every file indexed, after a clean close
#      and after a crash (a process that exits with the index open, as kill -9
#      leaves it); target: milliseconds;
#   3. for information: building the index (scan + record_for + put_batch in
#      batches of 1,000) and the latency of a one-record put_batch (fsync'd).
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }

FILES=100000
REPS=3
BUILD=1
while (($#)); do
	case $1 in
	--files) FILES=${2:?--files needs a number}; shift ;;
	--reps) REPS=${2:?--reps needs a number}; shift ;;
	--no-build) BUILD=0 ;;
	-h | --help) usage; exit 0 ;;
	*) usage >&2; exit 2 ;;
	esac
	shift
done

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=$REPO/target/release/examples/scan_bench
BASE=${FILESYNC_BENCH_BASE:-/var/tmp}

if ((BUILD)); then
	(cd "$REPO" && cargo build --release --quiet --example scan_bench)
fi
[[ -x $BIN ]] || { echo "scan.sh: $BIN missing; run without --no-build" >&2; exit 1; }
command -v find >/dev/null || { echo "scan.sh: find is needed" >&2; exit 1; }

WORK=$(mktemp -d "$BASE/filesync-scan.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
TREE=$WORK/tree
INDEX=$WORK/state/index.redb
mkdir -p "$WORK/state"

# Seconds (wall clock) that a command takes, its output discarded.
seconds() {
	local start end
	start=$(date +%s.%N)
	"$@" >/dev/null
	end=$(date +%s.%N)
	awk -v a="$start" -v b="$end" 'BEGIN { printf "%.4f", b - a }'
}

median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

# One value from the key=value line a scan_bench mode prints.
field() { tr ' ' '\n' | awk -F= -v k="$1" '$1 == k { print $2 }'; }

find_stat() { find "$TREE" -printf '%s %T@\n'; }

echo "tree: $FILES files in $TREE"
"$BIN" mktree "$TREE" "$FILES" >/dev/null
build_line=$("$BIN" index "$TREE" "$INDEX")
indexed=$(field indexed <<<"$build_line")
build_s=$(field seconds <<<"$build_line")

# Warm both: dentries, inodes and the index's pages.
find_stat >/dev/null
"$BIN" scan "$TREE" "$INDEX" >/dev/null

scan_times=() find_times=() changes=()
for ((i = 1; i <= REPS; i++)); do
	# Alternate which goes first, so neither always runs in the other's wake.
	if ((i % 2)); then
		find_times+=("$(seconds find_stat)")
		scan_times+=("$(seconds "$BIN" scan "$TREE" "$INDEX")")
	else
		scan_times+=("$(seconds "$BIN" scan "$TREE" "$INDEX")")
		find_times+=("$(seconds find_stat)")
	fi
done
changes=$("$BIN" scan "$TREE" "$INDEX" | field changes)
scan_s=$(median "${scan_times[@]}")
find_s=$(median "${find_times[@]}")

open_clean=()
for ((i = 1; i <= REPS; i++)); do
	open_clean+=("$("$BIN" open "$INDEX" | field open_ms)")
done
open_crash=()
for ((i = 1; i <= REPS; i++)); do
	"$BIN" dirty-exit "$INDEX"
	open_crash+=("$("$BIN" open "$INDEX" | field open_ms)")
done
records=$("$BIN" open "$INDEX" | field records)
commit_ms=$("$BIN" commit "$INDEX" 50 | field commit_ms)

verdict() { awk -v r="$1" -v t="$2" 'BEGIN { print (r <= t) ? "ok" : "MISSED" }'; }
ratio=$(awk -v a="$scan_s" -v b="$find_s" 'BEGIN { printf "%.2f", a / b }')
open_c=$(median "${open_clean[@]}")
open_k=$(median "${open_crash[@]}")

echo
echo "== reconcile scan, nothing changed ($FILES files, warm, median of $REPS) =="
printf '  scan            %8.3f s   (runs: %s; changes reported: %s)\n' "$scan_s" "${scan_times[*]}" "$changes"
printf '  find -printf    %8.3f s   (runs: %s)\n' "$find_s" "${find_times[*]}"
printf '  scan / find     %8s     target <= 1.50  %s\n' "$ratio" "$(verdict "$ratio" 1.5)"
echo
echo "== index open with $records records (median of $REPS) =="
printf '  after clean close  %7.2f ms  (runs: %s)  target < 50 ms  %s\n' "$open_c" "${open_clean[*]}" "$(verdict "$open_c" 50)"
printf '  after a crash      %7.2f ms  (runs: %s)  target < 50 ms  %s\n' "$open_k" "${open_crash[*]}" "$(verdict "$open_k" 50)"
echo
echo "== for information =="
printf '  building the index    %8.2f s for %s records (scan, record_for, put_batch of 1,000)\n' "$build_s" "$indexed"
printf '  one-record put_batch  %8.2f ms (fsync'"'"'d, mean of 50)\n' "$commit_ms"
printf '  index file            %8.1f MiB\n' "$(du -k "$INDEX" | awk '{ print $1 / 1024 }')"
load=$(cut -d' ' -f1 /proc/loadavg)
if awk -v l="$load" -v n="$(nproc)" 'BEGIN { exit !(l > n / 2) }'; then
	echo "  note: load average $load on $(nproc) cores during the run; timings are noisy"
fi
