#!/usr/bin/env bash
# bench/mount.sh — throughput/latency benchmark of a filesync mount against the
# native filesystem underneath it. Prints figures; it is not a test (it exits 0
# even when targets are missed, non-zero only if it could not run at all).
#
# Usage: bench/mount.sh [--quick] [--no-build]
#   --quick     256 MiB file, 5 s random phases, 2,000 files, 3 runs of the
#               short phases instead of 5 (fast sanity check, ~2 min)
#   --no-build  do not run `cargo build --release`; use the existing binary
# Environment:
#   FILESYNC_BENCH_OPTS  extra mount options appended to both mounts' -o
#                        (e.g. threads=4)
#   FILESYNC_BENCH_BASE  parent of the work directory (default /var/tmp)
#   FILESYNC_BIN         binary to benchmark (default target/release/filesync)
#
# Needs root (mounting, drop_caches). Installs fio with apt-get if missing.
# See bench/README.md.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }

QUICK=0
BUILD=1
for arg in "$@"; do
	case $arg in
	--quick) QUICK=1 ;;
	--no-build) BUILD=0 ;;
	-h | --help) usage; exit 0 ;;
	*) usage >&2; exit 2 ;;
	esac
done

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${FILESYNC_BIN:-$REPO/target/release/filesync}
BASE=${FILESYNC_BENCH_BASE:-/var/tmp}
EXTRA_OPTS=${FILESYNC_BENCH_OPTS:-}
MOUNT_WAIT=10 # seconds to wait for the mount to appear

if ((QUICK)); then
	SIZE_MIB=256 RUNTIME=5 NFILES=2000 REPS=3 MODE=quick
else
	SIZE_MIB=1024 RUNTIME=20 NFILES=10000 REPS=5 MODE=full
fi
# REPS: repetitions of the short phases (seq write/read, metadata); the
# report shows the median and lists every run.
MIN_SIZE_MIB=64
SLACK_MIB=512

# Configurations: native directory, filesync with kernel passthrough (the one
# the targets apply to) and filesync without passthrough (for comparison).
CFGS=(native on off)
declare -A OPTS=(
	[on]="passthrough=on${EXTRA_OPTS:+,$EXTRA_OPTS}"
	[off]="passthrough=off${EXTRA_OPTS:+,$EXTRA_OPTS}"
)
declare -A DIR=() MNT=() PID=() MOUNT_ERR=()
declare -A VAL=() VALS=() ERR=()
WARNINGS=()
ANOMALIES=()
WORK=

log() { printf '==> %s\n' "$*" >&2; }
warn() {
	printf 'WARNING: %s\n' "$*" >&2
	WARNINGS+=("$*")
}
anomaly() {
	printf 'ANOMALY: %s\n' "$*" >&2
	ANOMALIES+=("$*")
}
die() {
	printf 'error: %s\n' "$*" >&2
	exit 1
}

# ---------------------------------------------------------------- mounts ---

# is_mounted DIR [FSTYPE]: DIR is a mount point (of type FSTYPE).
is_mounted() {
	awk -v m="$1" -v t="${2:-}" \
		'$2 == m && (t == "" || $3 == t) { f = 1 } END { exit !f }' /proc/self/mounts
}

pid_alive() {
	local pid=$1 state
	kill -0 "$pid" 2>/dev/null || return 1
	state=$(awk '{ print $3 }' "/proc/$pid/stat" 2>/dev/null) || return 1
	[[ $state != Z ]]
}

# wait_pid_exit PID SECONDS: wait (bounded) for PID to go away.
wait_pid_exit() {
	local pid=$1 i
	for ((i = 0; i < $2 * 10; i++)); do
		pid_alive "$pid" || return 0
		sleep 0.1
	done
	! pid_alive "$pid"
}

daemon_log_tail() {
	local f=$WORK/out/daemon-$1.log
	[[ -s $f ]] && tail -n 5 "$f" | sed 's/^/    | /' || echo "    | (daemon printed nothing)"
}

# mount_fs CFG: start `filesync mount` in the foreground (in the background of
# this script) and wait up to MOUNT_WAIT seconds for the fuse.filesync mount.
mount_fs() {
	local cfg=$1 src=$WORK/src-$1 mnt=$WORK/mnt-$1 i rc
	mkdir -p "$src" "$mnt"
	spread_dirs "$src"
	MNT[$cfg]=$mnt
	log "mounting $src at $mnt (-o ${OPTS[$cfg]})"
	# setsid: a Ctrl-C aimed at this script must not kill the daemon before
	# the cleanup handler has unmounted cleanly.
	# The index lives in the work dir too, so the run leaves nothing in /var/lib/filesync.
	setsid "$BIN" mount "$src" "$mnt" --foreground -o "${OPTS[$cfg]}" \
		-o "state_dir=$WORK/state-$cfg" \
		</dev/null >"$WORK/out/daemon-$cfg.log" 2>&1 &
	PID[$cfg]=$!
	for ((i = 0; i < MOUNT_WAIT * 10; i++)); do
		if is_mounted "$mnt" fuse.filesync; then
			DIR[$cfg]=$mnt
			return 0
		fi
		if ! pid_alive "${PID[$cfg]}"; then
			rc=0
			wait "${PID[$cfg]}" || rc=$?
			MOUNT_ERR[$cfg]="daemon exited with status $rc before the mount appeared"
			break
		fi
		sleep 0.1
	done
	: "${MOUNT_ERR[$cfg]:=no fuse.filesync mount at $mnt after ${MOUNT_WAIT} s}"
	anomaly "mount -o ${OPTS[$cfg]} failed: ${MOUNT_ERR[$cfg]}"$'\n'"$(daemon_log_tail "$cfg")"
	return 1
}

# unmount_fs CFG QUIET: unmount, then wait (bounded) for the daemon to exit;
# kill it if it does not. Anomalies are only recorded when QUIET=0.
unmount_fs() {
	local cfg=$1 quiet=$2 mnt=${MNT[$1]:-} pid=${PID[$1]:-} rc
	if [[ -n $mnt ]] && is_mounted "$mnt"; then
		if ! timeout 10 umount "$mnt" 2>/dev/null; then
			((quiet)) || anomaly "umount $mnt failed or hung; using umount -l"
			umount -l "$mnt" 2>/dev/null || true
		fi
	fi
	if [[ -n $pid ]]; then
		if ! wait_pid_exit "$pid" 5; then
			((quiet)) || anomaly "daemon (-o ${OPTS[$cfg]}) still running 5 s after umount; sending SIGTERM"
			kill -TERM "$pid" 2>/dev/null || true
			if ! wait_pid_exit "$pid" 5; then
				kill -KILL "$pid" 2>/dev/null || true
				wait_pid_exit "$pid" 2 || true
			fi
		fi
		rc=0
		wait "$pid" 2>/dev/null || rc=$?
		if ((rc != 0 && !quiet)) && [[ -z ${MOUNT_ERR[$cfg]:-} ]]; then
			anomaly "daemon (-o ${OPTS[$cfg]}) exited with status $rc after umount"$'\n'"$(daemon_log_tail "$cfg")"
		fi
		local log=$WORK/out/daemon-$cfg.log n
		n=$(grep -ciE 'error|warn|panick' "$log" 2>/dev/null || true)
		if ((!quiet && ${n:-0} > 0)) && [[ -z ${MOUNT_ERR[$cfg]:-} ]]; then
			anomaly "daemon (-o ${OPTS[$cfg]}) logged ${n} error/warning line(s), first ones:"$'\n'"$(
				grep -iE 'error|warn|panick' "$log" | head -n 3 | cut -c1-300 | sed 's/^/    | /')"
		fi
		PID[$cfg]=
	fi
}

cleanup() {
	local rc=$? cfg
	trap - EXIT INT TERM
	set +e
	for cfg in on off; do
		unmount_fs "$cfg" 1
	done
	if [[ -n $WORK && -d $WORK ]]; then
		if grep -q " $WORK/" /proc/self/mounts; then
			printf 'error: something is still mounted under %s; not removing it\n' "$WORK" >&2
		else
			rm -rf --one-file-system "$WORK"
		fi
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------ preflight ---

((EUID == 0)) || die "must run as root (mounting FUSE, dropping caches)"
command -v python3 >/dev/null || die "python3 is needed to parse fio's JSON output"
command -v cc >/dev/null || die "a C compiler (cc) is needed for bench/metaops.c"

if ((BUILD)); then
	log "cargo build --release"
	(cd "$REPO" && cargo build --release) || die "cargo build --release failed"
fi
[[ -x $BIN ]] || die "$BIN not found (build failed or --no-build without a build)"

if ! command -v fio >/dev/null; then
	log "fio is not installed: installing it with 'apt-get install -y fio'"
	if ! DEBIAN_FRONTEND=noninteractive apt-get install -y fio >&2; then
		if ! { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y fio >&2; }; then
			die "could not install fio"
		fi
	fi
fi

DROP_OK=1
drop_caches() {
	sync
	if ((DROP_OK)); then
		if ! { echo 3 >/proc/sys/vm/drop_caches; } 2>/dev/null; then
			DROP_OK=0
			warn "cannot write /proc/sys/vm/drop_caches: 'cold' figures are not cold"
		fi
	fi
}

# Disk space: one test file per configuration (native + two mount sources)
# exists at the same time, plus slack.
mkdir -p "$BASE"
avail_mib=$(($(df -P -k "$BASE" | awk 'NR == 2 { print $4 }') / 1024))
want_mib=$SIZE_MIB
while ((3 * SIZE_MIB + SLACK_MIB > avail_mib && SIZE_MIB > MIN_SIZE_MIB)); do
	SIZE_MIB=$((SIZE_MIB / 2))
done
((3 * SIZE_MIB + SLACK_MIB <= avail_mib)) ||
	die "only ${avail_mib} MiB free under $BASE; need $((3 * MIN_SIZE_MIB + SLACK_MIB)) MiB even at ${MIN_SIZE_MIB} MiB"
if ((SIZE_MIB != want_mib)); then
	warn "only ${avail_mib} MiB free under $BASE: test file reduced from ${want_mib} MiB to ${SIZE_MIB} MiB"
fi
SIZE_BYTES=$((SIZE_MIB * 1024 * 1024))
if ((SIZE_MIB % 1024 == 0)); then SIZE_H="$((SIZE_MIB / 1024)) GiB"; else SIZE_H="$SIZE_MIB MiB"; fi

WORK=$(mktemp -d "$BASE/filesync-bench.XXXXXX")
mkdir -p "$WORK/native" "$WORK/out"
DIR[native]=$WORK/native

# spread_dirs DIR: ext4's "top of directory hierarchy" flag makes every new
# subdirectory of DIR (the metadata workload makes one per run) land in its own
# block group. Without it, on ext4 *without a journal*, each run's inodes go
# into the block group the previous runs just freed, and ext4 refuses to reuse
# inodes deleted in the last 60-360 s (recently_deleted() in fs/ext4/ialloc.c),
# scanning past every one of them on each create: a later run then creates
# files 10-30x slower than the first, whichever configuration it belongs to.
# Harmless (and ignored) on other filesystems.
spread_dirs() { chattr +T "$1" 2>/dev/null || true; }
spread_dirs "$WORK/native"

cc -O2 -Wall -o "$WORK/metaops" "$REPO/bench/metaops.c" || die "compiling bench/metaops.c failed"

cat >"$WORK/parse_fio.py" <<'EOF'
import json, sys
path, ddir = sys.argv[1], sys.argv[2]
text = open(path).read()
try:
    data = json.loads(text[text.index("{"):])
    job = data["jobs"][0]
except (ValueError, KeyError, IndexError) as e:
    print("ERR unparsable fio output: %s" % e)
    sys.exit(0)
if job.get("error"):
    print("ERR fio job error %s" % job["error"])
    sys.exit(0)
d = job[ddir]
print("%d %.1f %d" % (d["bw_bytes"], d["iops"], d["runtime"]))
EOF

# ----------------------------------------------------------------- header ---

# cpu_busy: percentage of CPU time not idle over the next 3 seconds.
cpu_busy() {
	local a b
	a=$(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6; exit }' /proc/stat)
	sleep 3
	b=$(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6; exit }' /proc/stat)
	awk -v a="$a" -v b="$b" 'BEGIN { split(a, x, " "); split(b, y, " ");
		busy = y[1] - x[1]; idle = y[2] - x[2];
		total = busy + idle; printf "%.0f", (total > 0 ? 100 * busy / total : 0) }'
}
busy_start=$(cpu_busy)

cpu_model=$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo)
mem_gib=$(awk '/^MemTotal/ { printf "%.1f", $2 / 1048576 }' /proc/meminfo)
fs_type=$(findmnt -n -o FSTYPE -T "$WORK" 2>/dev/null || stat -f -c %T "$WORK")
fs_src=$(findmnt -n -o SOURCE -T "$WORK" 2>/dev/null || echo '?')
if [[ $fs_type == ext4 && $(cat "/sys/fs/ext4/${fs_src##*/}/journal_task" 2>/dev/null) == "<none>" ]]; then
	fs_type="ext4 (no journal)"
fi
commit=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
	commit="$commit (+ uncommitted changes)"
fi
MACHINE="Linux $(uname -r), ${cpu_model:-unknown CPU} × $(nproc) CPUs, ${mem_gib} GiB RAM, work dir on $fs_type ($fs_src)"

echo "filesync mount benchmark ($MODE)"
echo "  date:          $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "  kernel:        $(uname -r)"
echo "  cpu:           ${cpu_model:-unknown} × $(nproc)"
echo "  memory:        ${mem_gib} GiB"
echo "  work dir:      $WORK ($fs_type on $fs_src, ${avail_mib} MiB free)"
echo "  filesync:      $commit"
echo "  mount options: filesync: -o ${OPTS[on]}   filesync (pt=off): -o ${OPTS[off]}"
echo "  fio:           $(fio --version)"
echo "  file size:     $SIZE_H; random phases ${RUNTIME} s; metadata: ${NFILES} files; ${REPS} runs of the short phases"
echo "  other load:    CPUs ${busy_start} % busy over 3 s before the run"
echo

# ---------------------------------------------------------------- runners ---

if ((busy_start > 20)); then
	warn "CPUs were ${busy_start} % busy with other work before the run: figures are likely noisy"
fi

ACTIVE=(native)
for cfg in on off; do
	if mount_fs "$cfg"; then ACTIVE+=("$cfg"); fi
done

cfg_name() {
	case $1 in
	native) echo native ;;
	on) echo filesync ;;
	off) echo "filesync (pt=off)" ;;
	esac
}

# runnable CFG KEY: the configuration can still run (its daemon is alive).
runnable() {
	local cfg=$1 key=$2
	[[ $cfg == native ]] && return 0
	if ! pid_alive "${PID[$cfg]}" || ! is_mounted "${MNT[$cfg]}" fuse.filesync; then
		ERR[$key.$cfg]="daemon gone"
		return 1
	fi
}

# record KEY CFG VALUE: one measurement (VAL = median of them, computed later)
record() { VALS[$1.$2]+=" $3"; }

# run_fio CFG KEY DDIR METRIC FIO-ARGS...: run one fio job on CFG's test file;
# record bw_bytes (METRIC=bw) or IOPS (METRIC=iops) for KEY.CFG.
# After a failure, later repetitions of KEY on CFG are skipped.
run_fio() {
	local cfg=$1 key=$2 ddir=$3 metric=$4 rc=0 res
	shift 4
	local json=$WORK/out/$key-$cfg.json errf=$WORK/out/$key-$cfg.err
	[[ -z ${ERR[$key.$cfg]:-} ]] || return 0
	runnable "$cfg" "$key" || return 0
	fio --output-format=json --output="$json" --name="$key" \
		--filename="${DIR[$cfg]}/testfile" --ioengine=psync --direct=0 \
		--invalidate=0 --fadvise_hint=0 --fallocate=none "$@" >"$errf" 2>&1 || rc=$?
	res=$(python3 "$WORK/parse_fio.py" "$json" "$ddir" 2>&1) || res="ERR $res"
	if ((rc != 0)) || [[ $res == ERR* ]]; then
		ERR[$key.$cfg]="fio exit status $rc; ${res#ERR }"
		anomaly "$key on $(cfg_name "$cfg") failed: fio exit status $rc"$'\n'"$(
			{ grep -v '^ *$' "$errf" | tail -n 5; } | sed 's/^/    | /')"
		return 0
	fi
	local bw iops ms
	read -r bw iops ms <<<"$res"
	if [[ $metric == bw ]]; then record "$key" "$cfg" "$bw"; else record "$key" "$cfg" "$iops"; fi
	log "$(printf '%-18s %-24s %9.1f MB/s %10.0f IOPS  (%.2f s)' \
		"$(cfg_name "$cfg")" "$key" "$(bc_div "$bw" 1000000)" "$iops" "$(bc_div "$ms" 1000)")"
}

bc_div() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.6f", a / b }'; }

# ensure_file CFG: the test file exists with the full size (in the mount's
# source directory too). If the write phase failed, create it underneath the
# mount so the read phases can still be measured.
ensure_file() {
	local cfg=$1 under=${DIR[$1]} size
	[[ $cfg == native ]] || under=$WORK/src-$cfg
	size=$(stat -c %s "$under/testfile" 2>/dev/null || echo missing)
	if [[ $size != "$SIZE_BYTES" ]]; then
		anomaly "after the write phase, $(cfg_name "$cfg")'s test file in its source dir has size $size (expected $SIZE_BYTES); recreating it there directly for the read phases"
		dd if=/dev/zero of="$under/testfile" bs=1M count="$SIZE_MIB" conv=fsync status=none ||
			anomaly "could not create $under/testfile"
	fi
}

# ---------------------------------------------------------------- workloads ---

log "1. sequential write, ${SIZE_H} in 1 MiB blocks, end_fsync=1 (${REPS} runs)"
for ((rep = 1; rep <= REPS; rep++)); do
	for cfg in "${ACTIVE[@]}"; do
		runnable "$cfg" seqwrite || continue
		rm -f "${DIR[$cfg]}/testfile" 2>/dev/null || true
		drop_caches
		run_fio "$cfg" seqwrite write bw --rw=write --bs=1M --size="$SIZE_BYTES" --end_fsync=1
		ensure_file "$cfg"
	done
done

log "2. sequential read, ${SIZE_H} in 1 MiB blocks, cold (after drop_caches) then warm (${REPS} runs)"
for ((rep = 1; rep <= REPS; rep++)); do
	for cfg in "${ACTIVE[@]}"; do
		drop_caches
		run_fio "$cfg" seqread_cold read bw --rw=read --bs=1M --size="$SIZE_BYTES"
		run_fio "$cfg" seqread_warm read bw --rw=read --bs=1M --size="$SIZE_BYTES"
	done
done

log "3. random read, 4 KiB, ${RUNTIME} s, file in page cache"
for cfg in "${ACTIVE[@]}"; do
	runnable "$cfg" randread || continue
	cat "${DIR[$cfg]}/testfile" >/dev/null 2>&1 || true # warm the cache
	run_fio "$cfg" randread read iops --rw=randread --bs=4k --size="$SIZE_BYTES" \
		--time_based --runtime="$RUNTIME"
done

log "4. random write, 4 KiB, ${RUNTIME} s, end_fsync=1"
for cfg in "${ACTIVE[@]}"; do
	drop_caches
	run_fio "$cfg" randwrite write iops --rw=randwrite --bs=4k --size="$SIZE_BYTES" \
		--time_based --runtime="$RUNTIME" --end_fsync=1
done

log "5. metadata: create+write 100 B+close, stat, unlink of ${NFILES} files (${REPS} runs)"
for ((rep = 1; rep <= REPS; rep++)); do
	for cfg in "${ACTIVE[@]}"; do
		[[ -z ${ERR[meta_total.$cfg]:-} ]] || continue
		runnable "$cfg" meta_total || continue
		sync
		out=$("$WORK/metaops" "${DIR[$cfg]}" "$NFILES" 2>"$WORK/out/meta-$cfg.err") || {
			ERR[meta_total.$cfg]="metaops failed: $(tail -n 1 "$WORK/out/meta-$cfg.err")"
			anomaly "metadata workload on $(cfg_name "$cfg") failed: $(tail -n 3 "$WORK/out/meta-$cfg.err")"
			continue
		}
		for kv in $out; do
			case ${kv%%=*} in
			create_ops | stat_ops | unlink_ops | total_ops) record "meta_${kv%%_ops=*}" "$cfg" "${kv#*=}" ;;
			esac
		done
		log "$(printf '%-18s %-24s %s' "$(cfg_name "$cfg")" metaops "$out")"
	done
done

median() { tr ' ' '\n' | awk 'NF' | sort -g | awk '{ v[NR] = $1 } END {
	if (NR) printf "%.1f", NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
for k in "${!VALS[@]}"; do
	VAL[$k]=$(median <<<"${VALS[$k]}")
done

rm -f "$WORK"/native/testfile "$WORK"/mnt-*/testfile 2>/dev/null || true
for cfg in on off; do
	if [[ -n ${PID[$cfg]:-} ]]; then
		log "unmounting $(cfg_name "$cfg")"
		unmount_fs "$cfg" 0
	fi
done

# ----------------------------------------------------------------- report ---

busy_end=$(cpu_busy)
if ((busy_end > 20)); then
	warn "CPUs were ${busy_end} % busy with other work right after the run: figures are likely noisy"
fi

# key|label|metric|target%
ROWS=(
	"seqwrite|seq write 1 MiB, ${SIZE_H}, +fsync|bw|60"
	"seqread_cold|seq read 1 MiB, cold|bw|90"
	"seqread_warm|seq read 1 MiB, warm|bw|90"
	"randread|rand read 4 KiB, ${RUNTIME} s, warm|iops|90"
	"randwrite|rand write 4 KiB, ${RUNTIME} s, +fsync|iops|30"
	"meta_create|create+write+close ×${NFILES}|ops|"
	"meta_stat|stat ×${NFILES}|ops|"
	"meta_unlink|unlink ×${NFILES}|ops|"
	"meta_total|create+stat+unlink total|ops|30"
)

fmt_val() { # METRIC VALUE
	case $1 in
	bw) awk -v v="$2" 'BEGIN { v /= 1e6; printf (v < 100 ? "%.1f MB/s" : "%.0f MB/s"), v }' ;;
	iops) awk -v v="$2" 'BEGIN { printf "%.0f IOPS", v }' ;;
	ops) awk -v v="$2" 'BEGIN { printf "%.0f ops/s", v }' ;;
	esac
}

cell() { # KEY CFG METRIC
	local k=$1.$2
	if [[ $2 != native && -n ${MOUNT_ERR[$2]:-} ]]; then
		echo "mount failed"
	elif [[ -n ${VAL[$k]:-} ]]; then
		fmt_val "$3" "${VAL[$k]}"
	elif [[ -n ${ERR[$k]:-} || -n ${ERR[meta_total.$2]:-} && $1 == meta_* ]]; then
		echo "FAILED"
	else
		echo "n/a"
	fi
}

ratio() { # KEY CFG -> percentage (integer) or empty
	local n=${VAL[$1.native]:-} v=${VAL[$1.$2]:-}
	[[ -n $n && -n $v ]] || return 0
	awk -v n="$n" -v v="$v" 'BEGIN { if (n > 0) printf "%.0f", 100 * v / n }'
}

TABLE=()
for row in "${ROWS[@]}"; do
	IFS='|' read -r key label metric target <<<"$row"
	r_on=$(ratio "$key" on)
	r_off=$(ratio "$key" off)
	verdict=
	if [[ -n $target ]]; then
		if [[ -z $r_on ]]; then verdict=miss
		elif ((r_on >= target)); then verdict=pass
		else verdict=miss
		fi
	fi
	TABLE+=("$label|$(cell "$key" native "$metric")|$(cell "$key" on "$metric")|${r_on:+$r_on %}|${target:+≥ $target %}|$verdict|$(cell "$key" off "$metric")|${r_off:+$r_off %}")
done
HEAD="workload|native|filesync|ratio|target|result|filesync (pt=off)|ratio (pt=off)"

echo
echo "Results (ratio = filesync / native; targets apply to filesync with passthrough=on)"
echo
{
	echo "$HEAD"
	printf '%s\n' "${TABLE[@]}"
} | column -t -s '|' -o '  '

echo
echo "Individual runs (the table shows the median):"
for row in "${ROWS[@]}"; do
	IFS='|' read -r key label metric target <<<"$row"
	parts=()
	for cfg in "${CFGS[@]}"; do
		[[ -n ${VALS[$key.$cfg]:-} ]] || continue
		vals=()
		for v in ${VALS[$key.$cfg]}; do vals+=("$(fmt_val "$metric" "$v")"); done
		parts+=("$(cfg_name "$cfg"): $(IFS=,; v="${vals[*]}"; echo "${v//,/, }")")
	done
	if ((${#parts[@]})); then
		printf '  %s\t%s\n' "$label" "$(IFS=';'; p="${parts[*]}"; echo "${p//;/;  }")"
	fi
done | column -t -s $'\t' -o '  '

if ((${#WARNINGS[@]})); then
	echo
	echo "Warnings:"
	printf '  - %s\n' "${WARNINGS[@]}"
fi
if ((${#ANOMALIES[@]})); then
	echo
	echo "Anomalies:"
	printf '  - %s\n' "${ANOMALIES[@]}"
fi

echo
echo "Markdown:"
echo
echo "Machine: $MACHINE. filesync $commit; mounts: \`-o ${OPTS[on]}\` and \`-o ${OPTS[off]}\`; $(fio --version); $MODE run ($(date -u +%Y-%m-%d))."
echo
echo "| ${HEAD//|/ | } |"
echo "|---|--:|--:|--:|--:|:-:|--:|--:|"
for line in "${TABLE[@]}"; do
	echo "| ${line//|/ | } |"
done
