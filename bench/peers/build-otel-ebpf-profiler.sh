#!/usr/bin/env bash
# Build the OpenTelemetry eBPF profiler, the peer `make bench` compares the agent with, into
# build/otel-ebpf-profiler/ebpf-profiler (the standalone binary from the module root).
#
# Their code is fetched from the Go module proxy at a pinned version and never committed. Two changes
# to the build copy, both for these machines:
#   - GOSUMDB=off: the checksum database is not reachable here (the proxy is);
#   - rlimit.MaximizeMemlock is made non-fatal: root here lacks CAP_SYS_RESOURCE, so raising
#     RLIMIT_MEMLOCK fails with EPERM and the profiler would exit. Kernels >= 5.11 charge BPF memory to
#     the memory cgroup and ignore RLIMIT_MEMLOCK, so the raise is not needed there; on an older kernel
#     the EPERM is still fatal, as upstream.
# The build is cached: skipped when the binary exists and a stamp records the same version and patch.
set -euo pipefail

MODULE="go.opentelemetry.io/ebpf-profiler"
VERSION="v0.0.202547"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
OUT="$ROOT/build/otel-ebpf-profiler"
BINARY="$OUT/ebpf-profiler"
STAMP="$OUT/ebpf-profiler.stamp"
SOURCE="$OUT/src"

mkdir -p "$OUT"
exec 9>"$OUT/.lock"
flock 9

want_stamp="$VERSION $(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)"
if [[ -x "$BINARY" && -f "$STAMP" && "$(cat "$STAMP")" == "$want_stamp" ]]; then
    echo "otel-ebpf-profiler build: $BINARY is up to date"
    exit 0
fi
command -v go >/dev/null || { echo "otel-ebpf-profiler build: 'go' is not on PATH (Go >= 1.24 is needed)" >&2; exit 1; }
export GOSUMDB=off GOFLAGS=-mod=mod

echo "otel-ebpf-profiler build: fetching $MODULE@$VERSION from the module proxy"
module_dir="$(go mod download -json "$MODULE@$VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
[[ -d "$module_dir" ]] || { echo "otel-ebpf-profiler build: go mod download gave no directory" >&2; exit 1; }
rm -rf "$SOURCE"
cp -r "$module_dir" "$SOURCE"
chmod -R u+w "$SOURCE"

# The memlock raise, made non-fatal where the kernel does not need it (see the header).
cat >"$SOURCE/rlimit/rlimit.go" <<'GO'
// Build copy for profiling-agent's benchmark: MaximizeMemlock tolerates EPERM on kernels >= 5.11.

package rlimit // import "go.opentelemetry.io/ebpf-profiler/rlimit"

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"

	"go.opentelemetry.io/ebpf-profiler/internal/log"
)

// memcgAccounting reports whether the running kernel charges BPF memory to the memory cgroup
// (Linux 5.11 and later), so that RLIMIT_MEMLOCK no longer limits BPF maps.
func memcgAccounting() bool {
	var uts unix.Utsname
	if err := unix.Uname(&uts); err != nil {
		return false
	}
	var major, minor int
	if _, err := fmt.Sscanf(unix.ByteSliceToString(uts.Release[:]), "%d.%d", &major, &minor); err != nil {
		return false
	}
	return major > 5 || (major == 5 && minor >= 11)
}

// MaximizeMemlock updates the memlock resource limit to RLIM_INFINITY.
// It returns a function to reset the resource limit to its original value or an error.
func MaximizeMemlock() (func(), error) {
	var oldLimit unix.Rlimit
	tmpLimit := unix.Rlimit{
		Cur: unix.RLIM_INFINITY,
		Max: unix.RLIM_INFINITY,
	}

	if err := unix.Prlimit(0, unix.RLIMIT_MEMLOCK, &tmpLimit, &oldLimit); err != nil {
		if errors.Is(err, unix.EPERM) && memcgAccounting() {
			return func() {}, nil
		}
		return nil, fmt.Errorf("failed to set temporary rlimit: %w", err)
	}

	return func() {
		if err := unix.Setrlimit(unix.RLIMIT_MEMLOCK, &oldLimit); err != nil {
			log.Fatalf("Failed to set old rlimit: %v", err)
		}
	}, nil
}
GO

echo "otel-ebpf-profiler build: building $BINARY (takes minutes on a cold Go cache)"
start=$(date +%s)
rm -f "$STAMP"
(cd "$SOURCE" && go build -o "$BINARY" .)
echo "$want_stamp" >"$STAMP"
echo "otel-ebpf-profiler build: done in $(($(date +%s) - start))s"
