# profiling-agent container image: Debian bookworm-slim, BCC from Debian (python3-bpfcc), the agent in a
# venv with --system-site-packages, as deploy/host/setup.sh installs it on a host.
#
# With a registry:  docker build -t profiling-agent .
# Offline (here):   make image  (a bookworm base made by mmdebstrap, the Python wheels downloaded on
#                   the host, and `podman build --network=none`: see deploy/image/build.sh)
#
# At run time the agent needs the host's kernel headers (/lib/modules and /usr/src), tracefs and
# debugfs, and the host's PID namespace: deploy/kubernetes/daemonset.yaml mounts them, and so does
# `podman run --privileged --pid=host -v /lib/modules:/lib/modules:ro -v /usr/src:/usr/src:ro
#  -v /sys/kernel/tracing:/sys/kernel/tracing -v /sys/kernel/debug:/sys/kernel/debug profiling-agent`.
ARG BASE=debian:bookworm-slim
FROM ${BASE}

# The packages the agent runs with (setup.sh's list, less the compilers and test tools). A base that
# already has them (make image's) needs no network here.
ARG PACKAGES="python3-bpfcc python3-venv python3-pip ca-certificates"
RUN set -eu; \
    missing=""; \
    for p in $PACKAGES; do \
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing="$missing $p"; \
    done; \
    if [ -n "$missing" ]; then \
        apt-get update -qq; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing; \
        rm -rf /var/lib/apt/lists/*; \
    fi

COPY . /opt/profiling-agent
WORKDIR /opt/profiling-agent
# The venv and the generated protobuf code as setup.sh makes them; wheels from build/image/wheels when
# make image put them there (offline), else from PyPI. grpcio-tools, pinned in pyproject.toml's dev
# extra, only generates the code and is removed after.
RUN set -eu; \
    /usr/bin/python3 -m venv --system-site-packages .venv; \
    tools=$(/usr/bin/python3 -c 'import tomllib; d = tomllib.load(open("pyproject.toml", "rb")); \
print(*[r for r in d["project"]["optional-dependencies"]["dev"] if r.startswith("grpcio-tools")])'); \
    source=""; \
    if [ -d build/image/wheels ]; then source="--no-index --find-links build/image/wheels"; fi; \
    .venv/bin/pip install -q --disable-pip-version-check --no-cache-dir $source -e . "$tools"; \
    .venv/bin/python -m agent.protogen; \
    .venv/bin/pip uninstall -q -y grpcio-tools; \
    rm -rf build; \
    .venv/bin/python -c 'import bcc, agent.cli, agent._proto.profile_pb2'; \
    .venv/bin/profiling-agent --version

ENTRYPOINT ["/opt/profiling-agent/.venv/bin/profiling-agent"]
CMD ["run"]
