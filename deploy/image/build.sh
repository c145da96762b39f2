#!/usr/bin/env bash
# `make image`: build the profiling-agent image with podman and no registry (run as root).
#  1. the base: Debian bookworm, minbase with bookworm-slim's dpkg excludes, made by mmdebstrap from the
#     host's Debian mirror, with the packages the Dockerfile wants already in it; imported into podman
#     once and reused (IMAGE_REBUILD_BASE=1 makes it again);
#  2. the Python wheels, downloaded on the host by the venv's pip (the same index and certificates the
#     host set-up uses) into build/image/wheels;
#  3. `podman build --network=none` of the Dockerfile on that base: nothing is fetched inside.
# Installs podman and mmdebstrap from Debian's packages when they are missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
say() { printf 'image: %s\n' "$*"; }

IMAGE=${IMAGE:-localhost/profiling-agent}
BASE=${BASE_IMAGE:-localhost/profiling-agent-base:bookworm}
out=build/image
packages=$(sed -n 's/^ARG PACKAGES="\(.*\)"$/\1/p' Dockerfile)
[ -n "$packages" ] || { echo "image: no ARG PACKAGES line in the Dockerfile" >&2; exit 1; }

missing=()
for tool in podman mmdebstrap runc; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" uidmap >/dev/null
fi

mkdir -p "$out"
if [ "${IMAGE_REBUILD_BASE:-0}" = 1 ] || ! podman image exists "$BASE"; then
    say "making the bookworm base with mmdebstrap (with: $packages)"
    rm -f "$out/base.tar"
    # bookworm-slim's excludes: documentation and locales, which an agent image does not read.
    mmdebstrap --quiet --variant=minbase --include="${packages// /,}" \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
        bookworm "$out/base.tar"
    podman import --quiet "$out/base.tar" "$BASE" >/dev/null
    rm -f "$out/base.tar"
fi

say "downloading the Python wheels into $out/wheels"
requirements=$(.venv/bin/python - <<'PY'
import tomllib
with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)
dev = [r for r in project["project"]["optional-dependencies"]["dev"] if r.startswith("grpcio-tools")]
print("\n".join(project["project"]["dependencies"] + dev + project["build-system"]["requires"]))
PY
)
mapfile -t requirements <<<"$requirements"
.venv/bin/pip download -q --disable-pip-version-check --only-binary=:all: -d "$out/wheels" "${requirements[@]}"

version=$(.venv/bin/python -c 'import agent; print(agent.__version__)')
say "building $IMAGE:$version on $BASE, offline"
# runc rather than crun, which refuses a host with cgroup v1 and v2 mounted side by side (as here); and
# rlimits no higher than podman's own, because root without CAP_SYS_RESOURCE (as here) cannot raise
# them to the maximum podman asks for by default, and conmon runs with at most 32768 processes.
nofile=$(ulimit -Hn) nproc=$(ulimit -Hu)
[ "$nofile" != unlimited ] || nofile=1048576
if [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; then nproc=32768; fi
limits=(--ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc")
podman build --quiet --runtime runc "${limits[@]}" --network=none --build-arg BASE="$BASE" \
    -t "$IMAGE:$version" -t "$IMAGE:latest" -f Dockerfile . >/dev/null
say "built $IMAGE:$version ($(podman image inspect --format "{{.Size}}" "$IMAGE:$version" | numfmt --to=iec))"
