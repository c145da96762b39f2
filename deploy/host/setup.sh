#!/usr/bin/env bash
# Host set-up for profiling-agent on Debian/Ubuntu (idempotent; run as root; `make setup` calls it).
#  1. system packages: BCC's Python bindings, kernel headers, venv support
#  2. kernel headers for BCC: link the closest installed linux-headers-* when the running kernel has none
#  3. tracefs/debugfs mounted
#  4. .venv from the distribution's python3 with --system-site-packages (so `import bcc` works),
#     the package and its PyPI dependencies, and the protobuf code generated from proto/
set -euo pipefail
cd "$(dirname "$0")/../.."
say() { printf 'setup: %s\n' "$*"; }

arch=$(dpkg --print-architecture)
# openssl: the tests make TLS certificates with it
packages=(python3-bpfcc python3-venv python3-pip "linux-headers-$arch" binutils gcc make systemd bpfcc-tools time openssl)
missing=()
for p in "${packages[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

deploy/host/link-kernel-headers.sh

for fs in tracefs:/sys/kernel/tracing debugfs:/sys/kernel/debug; do
    type=${fs%%:*} dir=${fs#*:}
    if ! mountpoint -q "$dir"; then
        say "mounting $type on $dir"
        mount -t "$type" nodev "$dir" || say "warning: could not mount $type on $dir"
    fi
done

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import bcc' 2>/dev/null; then
    say "creating .venv from /usr/bin/python3 with --system-site-packages"
    rm -rf .venv
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
    say "installing the agent and its dependencies into .venv"
    .venv/bin/pip install -q --disable-pip-version-check -e '.[dev]'
    rm -f .venv/.installed-*
    touch "$stamp"
fi

say "generating protobuf code from proto/"
.venv/bin/python -m agent.protogen
say "ready: .venv/bin/profiling-agent"
