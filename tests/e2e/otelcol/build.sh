#!/usr/bin/env bash
# Build the OpenTelemetry Collector used by the end-to-end OTLP tests (`make otelcol`, or the
# pytest fixture in tests/e2e/conftest.py when the binary is missing).
#
# Installs the collector builder (ocb) from the Go module proxy, then builds the distribution
# described by builder-config.yaml into build/otelcol/dist/otelcol-prof. The build is cached: it is
# skipped when the binary exists and was built from the same manifest and builder version (a
# stamp file records both). A lock serialises concurrent callers (make and pytest at once).
set -euo pipefail

BUILDER_VERSION="v0.159.0"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../../.." && pwd)"
OUT="$ROOT/build/otelcol"
CONFIG="$HERE/builder-config.yaml"
BINARY="$OUT/dist/otelcol-prof"
STAMP="$OUT/otelcol-prof.stamp"

mkdir -p "$OUT"
exec 9>"$OUT/.lock"
flock 9

want_stamp="$BUILDER_VERSION $(sha256sum "$CONFIG" | cut -d' ' -f1)"
if [[ -x "$BINARY" && -f "$STAMP" && "$(cat "$STAMP")" == "$want_stamp" ]]; then
    echo "otelcol build: $BINARY is up to date"
    exit 0
fi
command -v go >/dev/null || { echo "otelcol build: 'go' is not on PATH (Go >= 1.24 is needed)" >&2; exit 1; }

builder="$OUT/bin/builder"
if [[ ! -x "$builder" || ! -f "$OUT/bin/builder.version" || "$(cat "$OUT/bin/builder.version")" != "$BUILDER_VERSION" ]]; then
    echo "otelcol build: installing ocb $BUILDER_VERSION"
    GOBIN="$OUT/bin" go install "go.opentelemetry.io/collector/cmd/builder@$BUILDER_VERSION"
    echo "$BUILDER_VERSION" >"$OUT/bin/builder.version"
fi

echo "otelcol build: building $BINARY (takes minutes on a cold Go cache)"
start=$(date +%s)
rm -f "$STAMP"
# output_path in the manifest is relative to the repository root.
(cd "$ROOT" && "$builder" --config="$CONFIG")
echo "$want_stamp" >"$STAMP"
echo "otelcol build: done in $(($(date +%s) - start))s"
