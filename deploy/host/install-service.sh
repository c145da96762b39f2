#!/usr/bin/env bash
# Install profiling-agent as a systemd service (run as root; `make install-service` calls it).
#  1. copies this tree (minus .venv, build output, profiles and caches) to /opt/profiling-agent and runs
#     its deploy/host/setup.sh there: system packages, kernel headers, tracefs, the venv, protobuf code;
#  2. creates the unprivileged system user the unit runs as (it gets its capabilities from the unit);
#  3. installs the example config as /etc/profiling-agent/agent.yaml unless one exists;
#  4. installs the unit into /etc/systemd/system and reloads systemd when systemd is running.
# Idempotent: re-running updates the code and the unit, keeps the config and reuses the venv.
set -euo pipefail
src=$(cd "$(dirname "$0")/../.." && pwd)
dest=/opt/profiling-agent
user=profiling-agent
config_dir=/etc/profiling-agent
unit=profiling-agent.service
say() { printf 'install-service: %s\n' "$*"; }

if [ "$(id -u)" != 0 ]; then
    echo "install-service: must run as root (it writes /opt, /etc and creates a system user)" >&2
    exit 1
fi

say "copying $src to $dest"
mkdir -p "$dest"
# Replace the code wholesale so files deleted upstream disappear; keep the venv (setup.sh reuses it).
find "$dest" -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +
tar -C "$src" -cf - \
    --exclude=./.venv --exclude=./build --exclude=./profiles --exclude=./.git \
    --exclude='*.egg-info' --exclude=__pycache__ --exclude=.mypy_cache --exclude=.pytest_cache \
    --exclude=.ruff_cache --exclude='./agent/_proto/*_pb2*' \
    . | tar -C "$dest" -xf -
"$dest/deploy/host/setup.sh"

if ! getent passwd "$user" >/dev/null; then
    say "creating system user $user"
    useradd --system --user-group --no-create-home --home-dir /var/lib/profiling-agent \
        --shell /usr/sbin/nologin --comment "profiling-agent" "$user"
fi

install -d -m 0755 "$config_dir"
if [ -e "$config_dir/agent.yaml" ]; then
    say "keeping the existing $config_dir/agent.yaml (the current example is $dest/config/agent.yaml)"
else
    # Readable by the service's group only: export headers may carry credentials.
    install -m 0640 -o root -g "$user" "$src/config/agent.yaml" "$config_dir/agent.yaml"
    say "installed $config_dir/agent.yaml"
fi

install -m 0644 "$src/systemd/$unit" "/etc/systemd/system/$unit"
say "installed /etc/systemd/system/$unit"
# The same test sd_booted() makes: systemd creates /run/systemd/system only when it runs as PID 1.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    say "systemd reloaded; start it with: systemctl enable --now $unit"
else
    say "systemd is not running here (PID 1 is $(ps -o comm= -p 1 2>/dev/null || echo unknown)):" \
        "the unit is installed but not loaded; it is picked up when the host boots with systemd"
fi
