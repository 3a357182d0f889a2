#!/usr/bin/env bash
# Rebuilds ebpf/watcher.bpf.o from watcher.bpf.c, byte for byte the same on any machine
# with the same clang and libbpf-dev (Debian 12: clang 14, libbpf-dev 1.1).
#
#   ebpf/build.sh          rebuild the committed object
#   ebpf/build.sh --check  rebuild into a temporary file; fail if it differs from the
#                          committed object (CI runs this, so source and object agree)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"

CLANG=${CLANG:-clang}
STRIP=${STRIP:-llvm-strip}

for tool in "$CLANG" "$STRIP"; do
    command -v "$tool" >/dev/null || {
        echo "error: $tool not found; install clang and llvm (apt-get install clang llvm libbpf-dev)" >&2
        exit 1
    }
done
[[ -f /usr/include/bpf/bpf_helpers.h ]] || {
    echo "error: /usr/include/bpf/bpf_helpers.h not found; install libbpf-dev" >&2
    exit 1
}

build() { # output
    # -fdebug-prefix-map keeps the checkout's absolute path out of the BTF line info;
    # llvm-strip -g drops the DWARF (aya needs only .BTF and .BTF.ext), which also holds paths.
    "$CLANG" -O2 -g -target bpf -D__TARGET_ARCH_x86 \
        -fdebug-prefix-map="$PWD"=. -fno-ident \
        -Wall -Werror \
        -c watcher.bpf.c -o "$1"
    "$STRIP" -g "$1"
}

case "${1:-}" in
"")
    build watcher.bpf.o
    echo "built ebpf/watcher.bpf.o ($(stat -c %s watcher.bpf.o) bytes)"
    ;;
--check)
    tmp=$(mktemp --suffix=.bpf.o)
    trap 'rm -f "$tmp"' EXIT
    build "$tmp"
    if ! cmp -s "$tmp" watcher.bpf.o; then
        echo "error: ebpf/watcher.bpf.o does not match watcher.bpf.c; run ebpf/build.sh and commit the object" >&2
        echo "       (or the compiler differs: $("$CLANG" --version | head -n1))" >&2
        exit 1
    fi
    echo "ebpf/watcher.bpf.o matches its source"
    ;;
*)
    echo "usage: ebpf/build.sh [--check]" >&2
    exit 2
    ;;
esac
