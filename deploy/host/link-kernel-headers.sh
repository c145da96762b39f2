#!/usr/bin/env bash
# Give BCC kernel headers for the running kernel.
# BCC looks in /lib/modules/$(uname -r)/{build,source}. Debian splits headers into
# linux-headers-<ver>-<arch> (generated, "build") and linux-headers-<ver>-common (sources, "source");
# BCC_KERNEL_SOURCE alone cannot express that split, so we link both. When the running kernel has no
# headers of its own (custom or cloud kernels), the closest installed version is used and we say so.
set -euo pipefail
release=$(uname -r)
moddir=/lib/modules/$release
if [ -e "$moddir/build/include/generated/autoconf.h" ]; then
    exit 0
fi
arch=$(dpkg --print-architecture)
# Newest installed <ver>-<arch> tree with a matching -common tree.
build=$(ls -d /usr/src/linux-headers-*-"$arch" 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$build" ]; then
    echo "setup: no linux-headers-*-$arch under /usr/src; install linux-headers-$arch" >&2
    exit 1
fi
common=${build%-"$arch"}-common
if [ ! -d "$common" ]; then
    echo "setup: $build has no matching ${common##*/}" >&2
    exit 1
fi
mkdir -p "$moddir"
ln -sfn "$build" "$moddir/build"
ln -sfn "$common" "$moddir/source"
echo "setup: kernel $release has no headers of its own; using ${build##*/} (+ ${common##*/}) via $moddir/{build,source}"
